//! Webhooks on one node, against a real HTTP receiver: every event arrives at least once, in `seq` order
//! per shard, signed; a failing endpoint is retried and holds back only itself; the allow-list, replay,
//! delete and secret rotation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::events::drain_events;
use crate::harness::*;
use crate::webhook_receiver::{Mode, Received, WebhookReceiver};

/// PUTs webhook `name` at `url` and returns its answer (with the secret).
pub async fn put_webhook(srv: &Server, name: &str, url: &str, types: Option<Value>) -> Value {
    let mut body = json!({ "url": url });
    if let Some(types) = types {
        body["types"] = types;
    }
    srv.put(&format!("/v1/webhooks/{name}"), Auth::Admin, &body)
        .await
        .expect(200)
}

/// Waits until the receiver holds every event id in `ids` (at least once).
pub async fn wait_for_ids(receiver: &WebhookReceiver, ids: &BTreeSet<String>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got: BTreeSet<String> = receiver
            .received()
            .iter()
            .filter_map(|r| r.event_id().map(str::to_owned))
            .collect();
        let missing: Vec<&String> = ids.difference(&got).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} events never arrived, e.g. {:?}",
            missing.len(),
            ids.len(),
            missing.iter().take(3).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per shard, the first arrival of each seq comes in seq order, with no gap from the first one seen:
/// an event is delivered only after every earlier one of its shard was.
pub fn assert_in_order_without_gaps(received: &[Received], wanted: &BTreeMap<u64, Vec<u64>>) {
    let mut seen: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for r in received.iter().filter(|r| r.answered == Mode::Ok) {
        let (shard, seq) = (
            r.body["shard"].as_u64().unwrap(),
            r.body["seq"].as_u64().unwrap(),
        );
        let before: Vec<u64> = wanted
            .get(&shard)
            .map(|seqs| seqs.iter().copied().filter(|s| *s < seq).collect())
            .unwrap_or_default();
        let seen_here = seen.entry(shard).or_default();
        for earlier in before {
            assert!(
                seen_here.contains(&earlier),
                "shard {shard}: seq {seq} arrived before seq {earlier}"
            );
        }
        seen_here.insert(seq);
    }
}

/// shard → the seqs of `events`, ascending.
pub fn seqs_by_shard(events: &[Value]) -> BTreeMap<u64, Vec<u64>> {
    let mut by_shard: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for e in events {
        by_shard
            .entry(e["shard"].as_u64().unwrap())
            .or_default()
            .push(e["seq"].as_u64().unwrap());
    }
    by_shard.values_mut().for_each(|v| v.sort_unstable());
    by_shard
}

fn ids(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn some_changes(srv: &Server, prefix: &str, users: usize) {
    for i in 0..users {
        let user = format!("{prefix}{i}");
        srv.funded_user(&user, "10.00").await;
        srv.order(&user, &[("gems", 2)], true).await;
    }
}

#[tokio::test]
async fn a_webhook_gets_every_event_once_in_order_signed_as_the_feed_shows_it() {
    let srv = Server::start_with(Opts::new().shards(4)).await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_user("before-the-webhook").await;
    let receiver = WebhookReceiver::start(None).await;
    let hook = put_webhook(&srv, "game", &receiver.url("/shop-events"), None).await;
    let secret = hook["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{hook}");
    receiver.set_secret(Some(secret));
    let (_, start) = drain_events(&srv, None, 1000).await;

    some_changes(&srv, "wh", 8).await;
    let (events, _) = drain_events(&srv, Some(start), 1000).await;
    assert_eq!(
        events.len(),
        8 * 5,
        "user, credit, order created/granted/completed"
    );
    wait_for_ids(&receiver, &ids(&events), Duration::from_secs(20)).await;

    let received = receiver.received();
    for r in &received {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/shop-events");
        assert_eq!(r.verified, Some(true), "signature of {:?}", r.event_id());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.event_id(), r.body["event_id"].as_str());
    }
    assert!(
        received
            .iter()
            .all(|r| r.body["user_id"] != "before-the-webhook"),
        "a new webhook starts after the events before it"
    );
    let by_id: BTreeMap<&str, &Value> = events
        .iter()
        .map(|e| (e["event_id"].as_str().unwrap(), e))
        .collect();
    for r in &received {
        assert_eq!(
            &&r.body,
            by_id.get(r.event_id().unwrap()).unwrap(),
            "the body is the feed's event"
        );
    }
    assert_in_order_without_gaps(&received, &seqs_by_shard(&events));
    assert_eq!(received.len(), events.len(), "no failure, no repeat");

    // The status shows it caught up.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = srv.get("/v1/webhooks/game", Auth::Admin).await.expect(200);
        assert!(status.get("secret").is_none(), "the secret is shown once");
        if status["lag"] == 0 {
            assert_eq!(status["status"], "active");
            assert_eq!(status["shards"].as_array().unwrap().len(), 4);
            break;
        }
        assert!(Instant::now() < deadline, "lag stays {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_and_holds_back_only_its_own_deliveries() {
    let srv = Server::start_with(Opts::new().shards(2)).await;
    srv.create_item("gems", "currency", "1.00").await;
    let failing = WebhookReceiver::start(None).await;
    let healthy = WebhookReceiver::start(None).await;
    put_webhook(&srv, "flaky", &failing.url("/e"), None).await;
    put_webhook(&srv, "steady", &healthy.url("/e"), None).await;
    failing.fail_with(Mode::Status(500));
    let (_, start) = drain_events(&srv, None, 1000).await;

    some_changes(&srv, "ff", 4).await;
    let (events, _) = drain_events(&srv, Some(start), 1000).await;
    wait_for_ids(&healthy, &ids(&events), Duration::from_secs(20)).await;

    // The failing one is retrying, says why, and got nothing acknowledged.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = srv.get("/v1/webhooks/flaky", Auth::Admin).await.expect(200);
        if status["status"] == "retrying" {
            break status;
        }
        assert!(Instant::now() < deadline, "never retrying: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["last_error"], "HTTP 500", "{status}");
    assert_eq!(
        status["lag"].as_u64().unwrap(),
        events.len() as u64,
        "{status}"
    );
    assert!(status["next_attempt_at"].is_string(), "{status}");
    assert!(
        status["shards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["attempts"].as_u64().unwrap() >= 1),
        "{status}"
    );
    assert!(
        failing.received().iter().all(|r| r.answered != Mode::Ok),
        "nothing was acknowledged"
    );

    // Once it answers again, it gets everything, in order, no gap (the back-off is at most a few s).
    failing.recover();
    wait_for_ids(&failing, &ids(&events), Duration::from_secs(30)).await;
    assert_in_order_without_gaps(&failing.received(), &seqs_by_shard(&events));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = srv.get("/v1/webhooks/flaky", Auth::Admin).await.expect(200);
        if status["lag"] == 0 && status["status"] == "active" {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn only_the_types_asked_for_are_delivered() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    let receiver = WebhookReceiver::start(None).await;
    put_webhook(
        &srv,
        "orders",
        &receiver.url("/e"),
        Some(json!(["order.completed"])),
    )
    .await;
    some_changes(&srv, "ty", 3).await;
    let received = receiver.wait_for(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = if receiver.received().len() > received.len() {
        receiver.received()
    } else {
        received
    };
    let types: BTreeSet<&str> = received
        .iter()
        .map(|r| r.body["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, BTreeSet::from(["order.completed"]));
    assert_eq!(received.len(), 3);
    let status = srv
        .get("/v1/webhooks/orders", Auth::Admin)
        .await
        .expect(200);
    assert_eq!(status["types"], json!(["order.completed"]));
}

/// The deliveries from the `from`th on, once they hold an event of each of `users` (within 10 s).
async fn deliveries_of(receiver: &WebhookReceiver, from: usize, users: &[&str]) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<Received> = receiver.received().into_iter().skip(from).collect();
        let delivered: BTreeSet<&str> = got
            .iter()
            .filter_map(|r| r.body["user_id"].as_str())
            .collect();
        if users.iter().all(|u| delivered.contains(u)) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery of {users:?} after the {from}th: {delivered:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_second_put_rotates_the_secret_and_replay_delivers_again() {
    let srv = Server::start().await;
    let receiver = WebhookReceiver::start(None).await;
    let first = put_webhook(&srv, "rot", &receiver.url("/e"), None).await;
    let (_, start) = drain_events(&srv, None, 100).await;
    srv.create_user("r1").await;
    receiver.wait_for(1, Duration::from_secs(10)).await;

    let second = put_webhook(&srv, "rot", &receiver.url("/e"), None).await;
    assert_ne!(first["secret"], second["secret"]);
    receiver.set_secret(Some(second["secret"].as_str().unwrap().to_owned()));
    srv.create_user("r2").await;
    // At least once: r1 may come again (the rotation restarts delivery from the last acknowledged
    // position), but r2 comes, signed with the new secret.
    let got = deliveries_of(&receiver, 0, &["r2"]).await;
    let r2 = got.iter().find(|r| r.body["user_id"] == "r2").unwrap();
    assert_eq!(r2.verified, Some(true), "signed with the new secret");
    let seen = receiver.received().len();

    // Replay from before r1: both events again.
    let replayed = srv
        .call(reqwest::Method::POST, "/v1/webhooks/rot/replay")
        .auth(Auth::Admin)
        .fresh_key()
        .json(&json!({ "after": start }))
        .send()
        .await
        .expect(200);
    assert_eq!(replayed["name"], "rot");
    // Both again, in either order (on two shards, or one).
    deliveries_of(&receiver, seen, &["r1", "r2"]).await;
    srv.call(reqwest::Method::POST, "/v1/webhooks/rot/replay")
        .auth(Auth::Admin)
        .fresh_key()
        .json(&json!({ "after": "e1.nonsense" }))
        .send()
        .await
        .expect_error(400, "invalid_request");
}

#[tokio::test]
async fn delete_stops_deliveries_and_the_webhook_is_gone() {
    let srv = Server::start().await;
    let receiver = WebhookReceiver::start(None).await;
    put_webhook(&srv, "gone", &receiver.url("/e"), None).await;
    srv.create_user("d1").await;
    receiver.wait_for(1, Duration::from_secs(10)).await;
    let r = srv
        .call(reqwest::Method::DELETE, "/v1/webhooks/gone")
        .auth(Auth::Admin)
        .send()
        .await;
    assert_eq!(r.status, 204);
    srv.get("/v1/webhooks/gone", Auth::Admin)
        .await
        .expect_error(404, "not_found");
    srv.call(reqwest::Method::DELETE, "/v1/webhooks/gone")
        .auth(Auth::Admin)
        .send()
        .await
        .expect_error(404, "not_found");
    srv.create_user("d2").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.received().len(), 1, "nothing after the delete");
}

#[tokio::test]
async fn webhook_targets_outside_the_allow_list_and_bad_bodies_are_refused() {
    let srv = Server::start().await;
    for url in [
        "http://8.8.8.8/hook",
        "https://127.0.0.1/hook",
        "http://user:pw@127.0.0.1/hook",
        "ftp://127.0.0.1/x",
        "not a url",
    ] {
        srv.put("/v1/webhooks/w", Auth::Admin, &json!({ "url": url }))
            .await
            .expect_error(400, "invalid_request");
    }
    for body in [
        json!({}),
        json!({"url": "http://127.0.0.1:9/x", "types": ["order.shipped"]}),
        json!({"url": "http://127.0.0.1:9/x", "extra": 1}),
    ] {
        srv.put("/v1/webhooks/w", Auth::Admin, &body)
            .await
            .expect_error(400, "invalid_request");
    }
    srv.put(
        "/v1/webhooks/bad%20name",
        Auth::Admin,
        &json!({"url": "http://127.0.0.1:9/x"}),
    )
    .await
    .expect_error(400, "invalid_request");
    srv.put(
        "/v1/webhooks/w",
        Auth::Service,
        &json!({"url": "http://127.0.0.1:9/x"}),
    )
    .await
    .expect_error(403, "forbidden");
    srv.get("/v1/webhooks/w", Auth::Admin)
        .await
        .expect_error(404, "not_found");

    // Only loopback allowed by default among these; a narrower list refuses it.
    let narrow =
        Server::start_with(Opts::new().env("SHOPKEEP_WEBHOOK_ALLOW_HOSTS", "10.0.0.0/8")).await;
    narrow
        .put(
            "/v1/webhooks/w",
            Auth::Admin,
            &json!({"url": "http://127.0.0.1:9/x"}),
        )
        .await
        .expect_error(400, "invalid_request");
    narrow
        .put(
            "/v1/webhooks/w",
            Auth::Admin,
            &json!({"url": "http://10.1.2.3:9/x"}),
        )
        .await
        .expect(200);
}

#[tokio::test]
async fn no_more_than_32_webhooks() {
    let srv = Server::start().await;
    for i in 0..32 {
        put_webhook(&srv, &format!("w{i}"), "http://127.0.0.1:9/x", None).await;
    }
    let refused = srv
        .put(
            "/v1/webhooks/w32",
            Auth::Admin,
            &json!({"url": "http://127.0.0.1:9/x"}),
        )
        .await
        .expect_error(409, "limit_exceeded");
    assert_eq!(refused["details"]["limit"], "max_webhooks", "{refused}");
    // Changing an existing one is still allowed.
    put_webhook(&srv, "w0", "http://127.0.0.1:10/x", None).await;
}
