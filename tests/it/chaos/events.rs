//! The chaos run's events and webhook checks. A webhook to a real receiver is PUT before the clients start;
//! after the run has converged:
//! - every node's own feed (`?consistency=local`) has, per shard, seqs exactly 1..=n (a chaos run purges
//!   nothing) and the same event ids as every other node;
//! - every change of the final state has its event and no event is without its change: each existing user
//!   one `user.created`, each order one `order.created`, each completed (or refunded) order one
//!   `order.completed`, each cancelled one `order.cancelled`, each refund one `refund.created`;
//! - every event since the webhook reached the receiver at least once (≤ 60 s), with a valid signature,
//!   and per shard the first arrivals came in seq order without a gap.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::checker::Violation;
use super::model::UserModel;
use crate::cluster_harness::TestCluster;
use crate::harness::{Api, Auth};
use crate::webhook_receiver::{Mode, Received, WebhookReceiver};
use crate::webhooks_cluster::{drain_feed, ids_by_shard, put_webhook_retrying};

/// How long the receiver may take to get every event once the run is over.
const DELIVERY_BOUND: Duration = Duration::from_secs(60);

/// The webhook of a chaos run: its receiver and the feed's cursor when it was created.
pub struct Watch {
    pub receiver: WebhookReceiver,
    pub start: String,
}

/// Starts a receiver, PUTs webhook `chaos` to it (through any node, with retries) and notes the feed's end.
pub async fn watch(c: &TestCluster) -> Watch {
    let apis: Vec<Api> = c.ids().into_iter().map(|i| c.api(i)).collect();
    let receiver = WebhookReceiver::start(None).await;
    let hook = put_webhook_retrying(
        &apis,
        "chaos",
        &receiver.url("/chaos-events"),
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("chaos setup: {e}"));
    receiver.set_secret(Some(
        hook["secret"].as_str().expect("webhook secret").to_owned(),
    ));
    let (_, start) = drain_feed(&apis, None, false, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("chaos setup: {e}"));
    Watch { receiver, start }
}

/// Every check of the module header. `final_orders`: each user's orders as a node's replica listed them
/// in the final state (users whose orders were unreadable are left out: that is reported elsewhere).
pub async fn check(
    c: &TestCluster,
    watch: &Watch,
    models: &BTreeMap<String, UserModel>,
    final_orders: &BTreeMap<String, Vec<Value>>,
) -> Vec<Violation> {
    let mut out = vec![];
    let Some(feed) = check_feeds(c, &mut out).await else {
        return out;
    };
    check_changes(c, &feed, models, final_orders, &mut out).await;
    check_deliveries(c, watch, &mut out).await;
    out
}

/// Every node's own feed: seqs 1..=n per shard, the same ids everywhere (re-read ≤ 20 s until they agree).
/// Returns one node's whole feed.
async fn check_feeds(c: &TestCluster, out: &mut Vec<Violation>) -> Option<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut feeds: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
        let mut problems = vec![];
        for id in c.ids() {
            match drain_feed(&[c.api(id)], None, true, Duration::from_secs(20)).await {
                Ok((events, _)) => {
                    feeds.insert(id, events);
                }
                Err(e) => problems.push(format!("node {id}: its own feed is unreadable: {e}")),
            }
        }
        let by_node: BTreeMap<u64, BTreeMap<u64, Vec<(u64, String)>>> = feeds
            .iter()
            .map(|(id, events)| (*id, ids_by_shard(events)))
            .collect();
        for (id, shards) in &by_node {
            for (shard, events) in shards {
                let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
                if seqs != (1..=seqs.len() as u64).collect::<Vec<_>>() {
                    let gaps: Vec<(u64, u64)> = seqs
                        .windows(2)
                        .filter(|w| w[1] != w[0] + 1)
                        .map(|w| (w[0], w[1]))
                        .take(5)
                        .collect();
                    problems.push(format!(
                        "node {id}: shard {shard}'s events are not seqs 1..={}: first {:?}, jumps {gaps:?}",
                        seqs.len(),
                        seqs.first()
                    ));
                }
            }
        }
        if let Some((first_id, first)) = by_node.iter().next() {
            for (id, shards) in &by_node {
                for shard in first.keys().chain(shards.keys()).collect::<BTreeSet<_>>() {
                    let (a, b) = (first.get(shard), shards.get(shard));
                    if a != b {
                        let len = |v: Option<&Vec<(u64, String)>>| v.map_or(0, Vec::len);
                        let differ = a
                            .into_iter()
                            .flatten()
                            .zip(b.into_iter().flatten())
                            .find(|(x, y)| x != y);
                        problems.push(format!(
                            "shard {shard}: node {id}'s events differ from node {first_id}'s ({} vs {} events; first difference {differ:?})",
                            len(b),
                            len(a)
                        ));
                    }
                }
            }
        }
        if problems.is_empty() {
            let total: usize = by_node
                .values()
                .next()
                .map_or(0, |s| s.values().map(Vec::len).sum());
            eprintln!(
                "[chaos] events: every node's own feed has the same {total} events, seqs 1..=n per shard"
            );
            return feeds.into_values().next();
        }
        if Instant::now() > deadline {
            out.extend(problems.into_iter().map(Violation::new));
            return feeds.into_values().next();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn count<'a>(events: &'a [Value], kind: &str, field: &str) -> BTreeMap<&'a str, usize> {
    let mut n = BTreeMap::new();
    for e in events.iter().filter(|e| e["type"] == kind) {
        let key = if field == "user_id" {
            e["user_id"].as_str()
        } else {
            e["data"][field].as_str()
        };
        *n.entry(key.unwrap_or("?")).or_insert(0) += 1;
    }
    n
}

/// No change without its event, no event without its change.
async fn check_changes(
    c: &TestCluster,
    feed: &[Value],
    models: &BTreeMap<String, UserModel>,
    final_orders: &BTreeMap<String, Vec<Value>>,
    out: &mut Vec<Violation>,
) {
    let mut v = |msg: String| out.push(Violation::new(format!("events: {msg}")));
    let created_users = count(feed, "user.created", "user_id");
    let created = count(feed, "order.created", "order_id");
    let completed = count(feed, "order.completed", "order_id");
    let cancelled = count(feed, "order.cancelled", "order_id");
    let refunds = count(feed, "refund.created", "refund_id");
    let n = |m: &BTreeMap<&str, usize>, k: &str| m.get(k).copied().unwrap_or(0);

    // users
    for user in models.iter().filter(|(_, m)| m.exists).map(|(u, _)| u) {
        let got = n(&created_users, user);
        if got != 1 {
            v(format!(
                "user {user} exists, with {got} user.created events"
            ));
        }
    }
    let api = c.api(c.ids()[0]);
    for (user, got) in &created_users {
        if models.get(*user).is_some_and(|m| m.exists) {
            continue;
        }
        // not a user of the model (e.g. a liveness probe's): it must exist on the replicas
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            api.call(
                reqwest::Method::GET,
                &format!("/v1/users/{user}/wallet?consistency=local"),
            )
            .auth(Auth::Service)
            .try_send(),
        )
        .await;
        match r {
            Ok(Ok(r)) if r.status == 200 => {
                if *got != 1 {
                    v(format!("user {user}: {got} user.created events"));
                }
            }
            Ok(Ok(r)) if r.status == 404 => v(format!(
                "user.created for user {user}, who does not exist ({got} events)"
            )),
            other => v(format!(
                "user {user}: cannot tell whether it exists: {other:?}"
            )),
        }
    }

    // orders
    let mut statuses: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for (user, orders) in final_orders {
        for o in orders {
            let (Some(id), Some(status)) = (o["order_id"].as_str(), o["status"].as_str()) else {
                v(format!("user {user}: an order without id or status: {o}"));
                continue;
            };
            statuses.insert(id, (user.as_str(), status));
            let done = matches!(status, "COMPLETED" | "PARTIALLY_REFUNDED" | "REFUNDED");
            let want = [
                ("order.created", &created, 1),
                ("order.completed", &completed, usize::from(done)),
                (
                    "order.cancelled",
                    &cancelled,
                    usize::from(status == "CANCELLED"),
                ),
            ];
            for (kind, counts, wanted) in want {
                let got = n(counts, id);
                if got != wanted {
                    v(format!(
                        "user {user}: order {id} is {status} with {got} {kind} events, not {wanted}"
                    ));
                }
            }
        }
    }
    let read_users: BTreeSet<&str> = final_orders.keys().map(String::as_str).collect();
    for kind in ["order.created", "order.completed", "order.cancelled"] {
        for e in feed.iter().filter(|e| e["type"] == kind) {
            let user = e["user_id"].as_str().unwrap_or("?");
            if !read_users.contains(user) {
                continue; // its orders were not read (reported elsewhere) or it is no user of the model
            }
            let id = e["data"]["order_id"].as_str().unwrap_or("?");
            match statuses.get(id) {
                None => v(format!(
                    "{kind} (shard {} seq {}) for order {id} of user {user}, which does not exist",
                    e["shard"], e["seq"]
                )),
                Some((owner, _)) if *owner != user => v(format!(
                    "{kind} for order {id} names user {user}, but the order is {owner}'s"
                )),
                Some(_) => {}
            }
        }
    }

    // refunds
    let mut refund_owner: BTreeMap<&str, &str> = BTreeMap::new();
    for (user, m) in models {
        for id in m.refunds.keys() {
            refund_owner.insert(id, user);
            let got = n(&refunds, id);
            if got != 1 {
                v(format!(
                    "user {user}: refund {id} with {got} refund.created events"
                ));
            }
        }
    }
    for e in feed.iter().filter(|e| e["type"] == "refund.created") {
        let id = e["data"]["refund_id"].as_str().unwrap_or("?");
        let user = e["user_id"].as_str().unwrap_or("?");
        if refund_owner.get(id) != Some(&user) {
            v(format!(
                "refund.created (shard {} seq {}) for refund {id} of user {user}, which no answer created",
                e["shard"], e["seq"]
            ));
        }
    }
    eprintln!(
        "[chaos] events: {} users, {} orders ({} completed, {} cancelled), {} refunds matched against the feed",
        created_users.len(),
        statuses.len(),
        completed.len(),
        cancelled.len(),
        refunds.len()
    );
}

/// Per shard, the first arrival of each wanted seq came after every earlier wanted one: the problems.
/// (Linear: per shard, the lowest wanted seq not yet seen is the only one that may arrive first next.)
fn order_problems(received: &[Received], wanted: &BTreeMap<u64, BTreeSet<u64>>) -> Vec<String> {
    let mut out = vec![];
    let mut seen: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut frontier: BTreeMap<u64, Option<u64>> = wanted
        .iter()
        .map(|(shard, seqs)| (*shard, seqs.first().copied()))
        .collect();
    for r in received.iter().filter(|r| r.answered == Mode::Ok) {
        let (Some(shard), Some(seq)) = (r.body["shard"].as_u64(), r.body["seq"].as_u64()) else {
            out.push(format!("a delivery without shard or seq: {:?}", r.body));
            continue;
        };
        let seen_here = seen.entry(shard).or_default();
        if !seen_here.insert(seq) {
            continue; // a repeat
        }
        let Some(wanted_here) = wanted.get(&shard).filter(|w| w.contains(&seq)) else {
            continue; // from before the webhook
        };
        let next = frontier.entry(shard).or_default();
        if let Some(f) = *next {
            if seq != f {
                out.push(format!("shard {shard}: seq {seq} arrived before seq {f}"));
            }
        }
        // the lowest wanted seq not seen yet
        *next = (*next).and_then(|f| {
            wanted_here
                .range(f..)
                .find(|s| !seen_here.contains(s))
                .copied()
        });
    }
    out
}

/// Every event since the webhook arrived (≤ 60 s), signed, first arrivals in order per shard.
async fn check_deliveries(c: &TestCluster, watch: &Watch, out: &mut Vec<Violation>) {
    let mut v = |msg: String| out.push(Violation::new(format!("webhook: {msg}")));
    let apis: Vec<Api> = c.ids().into_iter().map(|i| c.api(i)).collect();
    let events = match drain_feed(
        &apis,
        Some(watch.start.clone()),
        false,
        Duration::from_secs(30),
    )
    .await
    {
        Ok((events, _)) => events,
        Err(e) => {
            v(format!("the feed since the webhook is unreadable: {e}"));
            return;
        }
    };
    let wanted: BTreeMap<&str, &Value> = events
        .iter()
        .map(|e| (e["event_id"].as_str().unwrap_or("?"), e))
        .collect();
    // how far behind the webhook is as the checks begin (printed below)
    let status_at_start = webhook_status(&apis[0]).await;
    let began = Instant::now();
    let deadline = began + DELIVERY_BOUND;
    let mut waited = Duration::ZERO;
    let missing = loop {
        let got: BTreeSet<String> = watch
            .receiver
            .received()
            .iter()
            .filter(|r| r.answered == Mode::Ok)
            .filter_map(|r| r.event_id().map(str::to_owned))
            .collect();
        let missing: Vec<&Value> = wanted
            .iter()
            .filter(|(id, _)| !got.contains(**id))
            .map(|(_, e)| *e)
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        waited = began.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !missing.is_empty() {
        let mut per_shard: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for e in &missing {
            per_shard
                .entry(e["shard"].as_u64().unwrap_or(u64::MAX))
                .or_default()
                .push(e["seq"].as_u64().unwrap_or(0));
        }
        let summary: Vec<String> = per_shard
            .iter_mut()
            .map(|(s, seqs)| {
                seqs.sort_unstable();
                format!(
                    "shard {s}: {} from seq {}",
                    seqs.len(),
                    seqs.first().unwrap_or(&0)
                )
            })
            .collect();
        let status = webhook_status(&apis[0]).await;
        v(format!(
            "{} of {} events since the webhook never arrived within {DELIVERY_BOUND:?} ({}); GET /v1/webhooks/chaos: {status}",
            missing.len(),
            events.len(),
            summary.join(", "),
        ));
    }
    let received = watch.receiver.received();
    let bad: Vec<&Received> = received
        .iter()
        .filter(|r| r.signature_matches != Some(true))
        .collect();
    if !bad.is_empty() {
        v(format!(
            "{} of {} requests are not signed with the webhook's secret, e.g. {:?}",
            bad.len(),
            received.len(),
            bad.iter().take(3).map(|r| r.event_id()).collect::<Vec<_>>()
        ));
    }
    for r in &received {
        if let Some(e) = r.event_id().and_then(|id| wanted.get(id)) {
            if r.body != **e {
                v(format!(
                    "the delivery of {:?} is not the feed's event: {} vs {}",
                    r.event_id(),
                    r.body,
                    e
                ));
                break;
            }
        }
    }
    let mut seqs: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for e in &events {
        if let (Some(s), Some(q)) = (e["shard"].as_u64(), e["seq"].as_u64()) {
            seqs.entry(s).or_default().insert(q);
        }
    }
    let disorder = order_problems(&received, &seqs);
    if !disorder.is_empty() {
        v(format!(
            "{} deliveries out of seq order, e.g. {:?}",
            disorder.len(),
            &disorder[..disorder.len().min(5)]
        ));
    }
    let distinct: BTreeSet<&str> = received.iter().filter_map(Received::event_id).collect();
    let stale_timestamps = received
        .iter()
        .filter(|r| r.verified == Some(false) && r.signature_matches == Some(true))
        .count();
    eprintln!(
        "[chaos] webhook: {} events since the webhook, {} requests ({} repeated), the last of them {:.1} s after the checks began; \
         {stale_timestamps} signed with a timestamp outside the 5-minute window (a node's shifted clock); \
         as the checks began, GET /v1/webhooks/chaos said {status_at_start}",
        events.len(),
        received.len(),
        received.len() - distinct.len(),
        waited.as_secs_f64()
    );
}

/// `GET /v1/webhooks/chaos`, in short: lag, status, last error, and per shard its position, attempts and
/// next attempt (or what came back instead).
async fn webhook_status(api: &Api) -> String {
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        api.call(reqwest::Method::GET, "/v1/webhooks/chaos")
            .auth(Auth::Admin)
            .try_send(),
    )
    .await;
    let v = match r {
        Ok(Ok(r)) if r.status == 200 => r.json(),
        other => return format!("{other:?}"),
    };
    let shards: Vec<String> = v["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "shard {} at seq {} of {}, attempts {}, next {}, error {}",
                s["shard"],
                s["position"],
                s["last_seq"],
                s["attempts"],
                s["next_attempt_at"],
                s["last_error"]
            )
        })
        .collect();
    format!(
        "lag {}, {}, last error {} [{}]",
        v["lag"],
        v["status"],
        v["last_error"],
        shards.join("; ")
    )
}

/// The order check itself: repeats and events from before the webhook pass, a first arrival ahead of an
/// earlier seq does not.
#[test]
fn the_order_check_flags_only_a_first_arrival_ahead_of_an_earlier_seq() {
    let at = |shard: u64, seq: u64| Received {
        method: "POST".into(),
        path: "/".into(),
        headers: reqwest::header::HeaderMap::new(),
        body: serde_json::json!({ "shard": shard, "seq": seq }),
        raw: vec![],
        at: Instant::now(),
        verified: None,
        signature_matches: None,
        answered: Mode::Ok,
    };
    let wanted: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::from([
        (0, BTreeSet::from([3, 4, 5, 6])),
        (1, BTreeSet::from([1, 2])),
    ]);
    let fine = [
        at(0, 2),
        at(0, 3),
        at(1, 1),
        at(0, 4),
        at(0, 3),
        at(0, 4),
        at(0, 5),
        at(1, 2),
        at(0, 6),
    ];
    assert!(order_problems(&fine, &wanted).is_empty());
    let ahead = [at(0, 3), at(0, 5), at(0, 4), at(0, 6), at(1, 2), at(1, 1)];
    assert_eq!(
        order_problems(&ahead, &wanted),
        [
            "shard 0: seq 5 arrived before seq 4",
            "shard 1: seq 2 arrived before seq 1"
        ]
    );
}
