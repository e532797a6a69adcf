//! The event feed: every change emits exactly the events the contract lists, with the API's shapes, and
//! the feed pages never skip or repeat an event, across pages and restarts.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

/// Every event after `cursor` (following `next_cursor` until a page comes back empty), and the cursor
/// after them.
pub async fn drain_events(
    srv: &Server,
    cursor: Option<String>,
    limit: u32,
) -> (Vec<Value>, String) {
    let mut all = Vec::new();
    let mut cursor = cursor;
    loop {
        let mut path = format!("/v1/events?limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&after={c}"));
        }
        let page = srv.get(&path, Auth::Service).await.expect(200);
        let events = page["events"].as_array().unwrap().clone();
        let next = page["next_cursor"].as_str().unwrap().to_owned();
        let done = events.is_empty();
        all.extend(events);
        cursor = Some(next);
        if done {
            return (all, cursor.unwrap());
        }
    }
}

fn types_of(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

/// The events about one user, in the order they were applied (one user is on one shard).
fn of_user<'a>(events: &'a [Value], user: &str) -> Vec<&'a Value> {
    let mut mine: Vec<&Value> = events.iter().filter(|e| e["user_id"] == user).collect();
    mine.sort_by_key(|e| e["seq"].as_u64().unwrap());
    mine
}

fn psp_event(event_id: &str, kind: &str, topup: &Value, user: &str, amount: &str) -> Value {
    json!({"event_id": event_id, "type": kind, "topup_id": topup["topup_id"], "user_id": user,
           "amount": amount, "psp_payment_id": format!("pi_{event_id}")})
}

#[tokio::test]
async fn every_change_emits_exactly_the_events_the_contract_lists() {
    let srv = Server::start_with(Opts::new().shards(2)).await;
    srv.create_item("gems", "currency", "0.50").await;
    srv.create_item("sword", "skin", "2.00").await;
    let user = srv.create_user("ev1").await;
    let credit = srv.credit("ev1", "30.00").await;
    let top = srv.topup("ev1", "5.00").await;
    srv.webhook(&psp_event("p1", "payment.succeeded", &top, "ev1", "5.00"))
        .await
        .expect(200);
    let failed = srv.topup("ev1", "7.00").await;
    srv.webhook(&psp_event("p2", "payment.failed", &failed, "ev1", "7.00"))
        .await
        .expect(200);
    let bought = srv.order("ev1", &[("gems", 4), ("sword", 1)], true).await;
    let pending = srv.order("ev1", &[("gems", 2)], false).await;
    let pending_id = pending["order_id"].as_str().unwrap();
    let completed = srv
        .complete_order("ev1", pending_id, Auth::Service)
        .await
        .expect(200);
    let to_cancel = srv.order("ev1", &[("gems", 1)], false).await;
    let cancelled = srv
        .cancel_order(
            "ev1",
            to_cancel["order_id"].as_str().unwrap(),
            Auth::Service,
        )
        .await
        .expect(200);
    let refund = srv
        .refund(
            "ev1",
            bought["order_id"].as_str().unwrap(),
            Auth::Service,
            &json!({"lines": [{"item_id": "sword", "quantity": 1}], "reason": "changed mind"}),
        )
        .await
        .expect(201);
    let consumed = srv
        .consume("ev1", "gems", Auth::Service, json!(3))
        .await
        .expect(200);

    let (events, _) = drain_events(&srv, None, 1000).await;
    let mine = of_user(&events, "ev1");
    let mine_owned: Vec<Value> = mine.iter().map(|e| (*e).clone()).collect();
    assert_eq!(
        types_of(&mine_owned),
        [
            "user.created",
            "wallet.credited",
            "topup.completed",
            "wallet.credited",
            "topup.failed",
            "order.created",
            "entitlement.granted",
            "entitlement.granted",
            "order.completed",
            "order.created",
            "entitlement.granted",
            "order.completed",
            "order.created",
            "order.cancelled",
            "refund.created",
            "entitlement.revoked",
            "entitlement.consumed",
        ]
    );
    // The envelope.
    let shard = mine[0]["shard"].as_u64().unwrap();
    let mut seqs = BTreeSet::new();
    for e in &mine {
        assert!(e["event_id"].as_str().unwrap().starts_with("evt_"), "{e}");
        assert_eq!(e["event_id"].as_str().unwrap().len(), 36, "{e}");
        ts(&e["occurred_at"]);
        assert_eq!(e["shard"].as_u64().unwrap(), shard, "one user, one shard");
        assert!(seqs.insert(e["seq"].as_u64().unwrap()), "seq repeats: {e}");
    }
    // `data` is the resource as the API returned it.
    assert_eq!(mine[0]["data"], user);
    assert_eq!(mine[1]["data"], credit);
    assert_eq!(mine[2]["data"]["status"], "COMPLETED");
    assert_eq!(mine[2]["data"]["topup_id"], top["topup_id"]);
    assert_eq!(mine[3]["data"]["topup_id"], top["topup_id"]);
    assert_eq!(mine[3]["data"]["wallet"]["balance"], "35.00");
    assert_eq!(mine[4]["data"]["status"], "FAILED");
    assert_eq!(mine[5]["data"]["order_id"], bought["order_id"]);
    assert_eq!(
        mine[5]["data"]["status"], "PENDING",
        "order.created: as created"
    );
    assert_eq!(
        mine[8]["data"], bought,
        "order.completed: the order as returned"
    );
    assert_eq!(mine[11]["data"], completed);
    assert_eq!(mine[13]["data"], cancelled);
    assert_eq!(mine[13]["data"]["status"], "CANCELLED");
    assert_eq!(mine[14]["data"], refund);
    assert_eq!(mine[15]["data"]["item_id"], "sword");
    assert_eq!(mine[15]["data"]["quantity"], 0);
    assert_eq!(mine[16]["data"], consumed);
    srv.audit_ok().await;
}

#[tokio::test]
async fn a_replayed_or_refused_request_emits_no_event() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("ev2", "3.00").await;
    let body = order_body(&[("gems", 2)], true);
    let first = srv
        .post_key("/v1/users/ev2/orders", Auth::Service, "k-ev2", &body)
        .await;
    first.expect(201);
    let again = srv
        .post_key("/v1/users/ev2/orders", Auth::Service, "k-ev2", &body)
        .await;
    assert!(again.replayed());
    srv.create_order("ev2", &[("gems", 5)], true)
        .await
        .expect_error(409, "insufficient_funds");
    let (events, _) = drain_events(&srv, None, 100).await;
    let types = types_of(&events);
    assert_eq!(
        types.iter().filter(|t| *t == "order.completed").count(),
        1,
        "{types:?}"
    );
    assert_eq!(types.iter().filter(|t| *t == "order.created").count(), 1);
}

#[tokio::test]
async fn expiries_emit_their_events_from_the_sweeper() {
    let srv = Server::start_with(
        Opts::new()
            .order_ttl("1s")
            .topup_ttl("1s")
            .sweep_interval("200ms"),
    )
    .await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("ev3", "5.00").await;
    let order = srv.order("ev3", &[("gems", 2)], false).await;
    let top = srv.topup("ev3", "4.00").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (events, _) = drain_events(&srv, None, 100).await;
        let mine = of_user(&events, "ev3");
        let cancelled = mine.iter().find(|e| e["type"] == "order.cancelled");
        let expired = mine.iter().find(|e| e["type"] == "topup.expired");
        if let (Some(c), Some(x)) = (cancelled, expired) {
            assert_eq!(c["data"]["order_id"], order["order_id"]);
            assert_eq!(c["data"]["status"], "CANCELLED");
            let last = c["data"]["history"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .clone();
            assert_eq!(last["reason"], "expired", "{c}");
            assert_eq!(x["data"]["topup_id"], top["topup_id"]);
            assert_eq!(x["data"]["status"], "EXPIRED");
            return;
        }
        assert!(Instant::now() < deadline, "no expiry events: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn pages_never_skip_or_repeat_an_event_across_pages_and_a_restart() {
    let mut srv = Server::start_with(Opts::new().shards(4)).await;
    srv.create_item("gems", "currency", "0.10").await;
    for i in 0..12 {
        srv.funded_user(&format!("pg{i}"), "5.00").await;
        srv.order(&format!("pg{i}"), &[("gems", 1)], true).await;
    }
    let (all_at_once, end) = drain_events(&srv, None, 1000).await;
    let (mut paged, mid) = drain_events(&srv, None, 7).await;
    assert_eq!(
        ids(&paged),
        ids(&all_at_once),
        "small pages give the same events"
    );
    assert_eq!(mid, end, "and end at the same cursor");

    srv.restart().await;
    for i in 12..16 {
        srv.funded_user(&format!("pg{i}"), "5.00").await;
    }
    let (after_restart, _) = drain_events(&srv, Some(mid.clone()), 3).await;
    assert_eq!(
        after_restart.len(),
        4 * 2,
        "user.created + wallet.credited each"
    );
    paged.extend(after_restart);
    let unique: BTreeSet<String> = ids(&paged).into_iter().collect();
    assert_eq!(unique.len(), paged.len(), "no event twice");
    // Reading with the same cursor twice gives the same events.
    let again = srv
        .get(&format!("/v1/events?after={mid}&limit=5"), Auth::Service)
        .await
        .expect(200);
    let twice = srv
        .get(&format!("/v1/events?after={mid}&limit=5"), Auth::Service)
        .await
        .expect(200);
    assert_eq!(again, twice);
    // Per shard, seq has no gaps from the start.
    for shard in 0..4u64 {
        let seqs: Vec<u64> = paged
            .iter()
            .filter(|e| e["shard"] == shard)
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "shard {shard}");
    }
}

fn ids(events: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_an_event_arrives() {
    let srv = Server::start().await;
    srv.create_user("lp0").await;
    let (_, cursor) = drain_events(&srv, None, 100).await;
    let api = srv.api();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        api.get(&format!("/v1/events?after={cursor}&wait=20"), Auth::Service)
            .await
            .expect(200)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    srv.create_user("lp1").await;
    let page = poll.await.unwrap();
    let took = started.elapsed();
    assert_eq!(
        types_of(page["events"].as_array().unwrap()),
        ["user.created"]
    );
    assert_eq!(page["events"][0]["user_id"], "lp1");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    // With nothing new, a short wait ends empty, with a cursor to go on from.
    let quiet = srv
        .get(
            &format!(
                "/v1/events?after={}&wait=1s",
                page["next_cursor"].as_str().unwrap()
            ),
            Auth::Service,
        )
        .await
        .expect(200);
    assert_eq!(quiet["events"], json!([]));
    assert_eq!(quiet["next_cursor"], page["next_cursor"]);
}

#[tokio::test]
async fn the_types_filter_leaves_out_other_events_and_the_cursor_moves_past_them() {
    let srv = Server::start_with(Opts::new().shards(2)).await;
    srv.create_item("gems", "currency", "1.00").await;
    for i in 0..5 {
        srv.funded_user(&format!("tf{i}"), "5.00").await;
    }
    srv.order("tf3", &[("gems", 1)], true).await;
    let page = srv
        .get(
            "/v1/events?types=order.completed,refund.created",
            Auth::Service,
        )
        .await
        .expect(200);
    assert_eq!(
        types_of(page["events"].as_array().unwrap()),
        ["order.completed"]
    );
    let rest = srv
        .get(
            &format!(
                "/v1/events?types=user.created&after={}",
                page["next_cursor"].as_str().unwrap()
            ),
            Auth::Service,
        )
        .await
        .expect(200);
    assert_eq!(
        rest["events"],
        json!([]),
        "the cursor moved past what it looked at"
    );
}

#[tokio::test]
async fn bad_feed_requests_are_refused_with_the_error_shape() {
    let srv = Server::start().await;
    srv.create_user("bf1").await;
    for query in [
        "after=nonsense",
        "after=e1.AAAA",
        "limit=0",
        "limit=1001",
        "wait=31",
        "wait=-1",
        "wait=soon",
        "types=order.shipped",
        "types=",
    ] {
        srv.get(&format!("/v1/events?{query}"), Auth::Service)
            .await
            .expect_error(400, "invalid_request");
    }
    let token = srv.user_token("bf1").await;
    srv.get("/v1/events", Auth::user(&token))
        .await
        .expect_error(403, "forbidden");
    srv.get("/v1/events", Auth::Admin).await.expect(200);
}

/// The purge, applied to a real shard file at chosen times (an hour's retention cannot be waited out
/// in a test): events past the retention go once every webhook acknowledged them; a webhook that did
/// not holds them until the longest retention, then they are dropped and counted, and it moves past.
#[test]
fn the_purge_keeps_events_a_webhook_still_needs_until_the_longest_retention() {
    use shopkeep::domain::command::{self as cmd};
    use shopkeep::domain::{Command, Envelope, IdSeed, Reply, Timestamp};
    use shopkeep::state::{ShardStore, query};

    const DAY: i64 = 86_400_000_000;
    let dir = tempfile::tempdir().unwrap();
    let store = ShardStore::open(&dir.path().join("shard.redb"), 0).unwrap();
    let mut counter = 0u128;
    let mut apply = |at: i64, command: Command| {
        counter += 1;
        let envelope = Envelope {
            now: Timestamp(at),
            seed: IdSeed {
                unix_millis: (at / 1000) as u64,
                entropy: counter,
            },
            idempotency: None,
            command,
        };
        store.apply_batch(&[&envelope]).unwrap().remove(0).outcome
    };
    let t0 = 1_800_000_000_000_000i64;
    let create = |user: &str| {
        Command::CreateUser(cmd::CreateUser {
            user_id: user.to_owned(),
            display_name: None,
        })
    };
    let purge = || {
        Command::PurgeEvents(cmd::PurgeEvents {
            retention_seconds: 7 * 86_400,
            max_retention_seconds: 30 * 86_400,
            limit: 500,
        })
    };
    apply(t0, create("a")).unwrap();
    // A webhook made after the first event starts after it; then two more events.
    apply(
        t0 + 1,
        Command::PutWebhook(cmd::PutWebhook {
            name: "gs".to_owned(),
            url: "http://127.0.0.1:9/e".to_owned(),
            types: vec![],
            generation: None,
        }),
    )
    .unwrap();
    apply(t0 + 2, create("b")).unwrap();
    apply(t0 + DAY, create("c")).unwrap();

    let purged = |outcome| match outcome {
        Ok(Reply::EventsPurged { purged, dropped }) => (purged, dropped),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        purged(apply(t0 + 6 * DAY, purge())),
        (0, 0),
        "not yet 7 days old"
    );
    assert_eq!(
        purged(apply(t0 + 8 * DAY, purge())),
        (1, 0),
        "the event before the webhook goes; the webhook holds the rest"
    );
    assert_eq!(purged(apply(t0 + 29 * DAY, purge())), (0, 0));
    assert_eq!(
        purged(apply(t0 + 30 * DAY + 3, purge())),
        (1, 1),
        "past 30 days: dropped, though unacknowledged"
    );
    let txn = store.begin_read().unwrap();
    let log = query::event_log(&txn).unwrap();
    assert_eq!((log.last_seq, log.purged_through, log.dropped), (3, 2, 1));
    let webhook = query::webhooks(&txn).unwrap().remove(0);
    assert_eq!((webhook.position, webhook.dropped), (2, 1));
    let left = query::events_after(&txn, 0, 10, None, 10).unwrap();
    assert_eq!(left.events.len(), 1);
    assert_eq!(left.events[0].0, 3, "seq is never reused");
    assert!(
        shopkeep::state::audit::audit(&txn, 0)
            .unwrap()
            .violations
            .is_empty()
    );
}

/// A replay that lands while the leader delivers a batch wins over that batch's acknowledgement: the
/// acknowledgement names where its batch started, and the shard takes it only if the webhook is still
/// there (the older acknowledgement without it would have moved the position past the replay point).
#[test]
fn a_replay_wins_over_the_acknowledgement_of_a_batch_delivered_before_it() {
    use shopkeep::domain::command::{self as cmd};
    use shopkeep::domain::{Command, Envelope, IdSeed, Timestamp};
    use shopkeep::state::{ShardStore, query};

    let dir = tempfile::tempdir().unwrap();
    let store = ShardStore::open(&dir.path().join("shard.redb"), 0).unwrap();
    let mut counter = 0u128;
    let mut apply = |command: Command| {
        counter += 1;
        let envelope = Envelope {
            now: Timestamp(1_800_000_000_000_000 + counter as i64),
            seed: IdSeed {
                unix_millis: 1_800_000_000_000,
                entropy: counter,
            },
            idempotency: None,
            command,
        };
        store
            .apply_batch(&[&envelope])
            .unwrap()
            .remove(0)
            .outcome
            .unwrap();
    };
    let user = |id: &str| {
        Command::CreateUser(cmd::CreateUser {
            user_id: id.to_owned(),
            display_name: None,
        })
    };
    let position = |store: &ShardStore| {
        let txn = store.begin_read().unwrap();
        query::webhooks(&txn).unwrap().remove(0).position
    };
    apply(Command::PutWebhook(cmd::PutWebhook {
        name: "gs".to_owned(),
        url: "http://127.0.0.1:9/e".to_owned(),
        types: vec![],
        generation: None,
    }));
    for id in ["a", "b", "c", "d", "e"] {
        apply(user(id));
    }
    let ack_from = |from, position| {
        Command::AckWebhookFrom(cmd::AckWebhookFrom {
            name: "gs".to_owned(),
            generation: 1,
            from,
            position,
        })
    };
    apply(ack_from(0, 3));
    assert_eq!(position(&store), 3);
    // The leader is delivering 4..=5 (a batch from 3) when the admin replays from 1.
    apply(Command::ReplayWebhook(cmd::ReplayWebhook {
        name: "gs".to_owned(),
        position: 1,
    }));
    apply(ack_from(3, 5));
    assert_eq!(position(&store), 1, "the replay stands");
    // The acknowledgement without `from` (what entries in older logs hold) would have lost it.
    apply(Command::AckWebhook(cmd::AckWebhook {
        name: "gs".to_owned(),
        generation: 1,
        position: 5,
    }));
    assert_eq!(position(&store), 5);
}
