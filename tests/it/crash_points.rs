//! Crash points (test builds with the `failpoints` feature): the process aborts at an exact instant of
//! a write, and a retry with the same key after the restart gets the one outcome, charged once.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const SECRET: &str = "crash-point-test-secret-0123456789";

async fn single_node() -> Server {
    // No background sweeps: the first apply after arming is the test's own purchase.
    Server::start_with(
        Opts::new()
            .sweep_interval("1h")
            .env("SHOPKEEP_CLUSTER_SECRET", SECRET),
    )
    .await
}

/// Arms the crash point `name` with `actions` on the node `api` talks to; the answer's status.
async fn arm(api: &Api, name: &str, actions: &str, secret: &str) -> u16 {
    let path = format!("/_node/v1/failpoints/{name}");
    api.call(reqwest::Method::PUT, &path)
        .header(
            "x-shopkeep-node-auth",
            &node_auth(secret, "PUT", &path, actions.as_bytes()),
        )
        .raw(actions.as_bytes().to_vec())
        .send()
        .await
        .status
}

/// Arms `name`, sends one purchase (which must go unanswered: the process aborts), restarts the node and
/// retries the same key; returns the retry's response and the user's orders.
async fn purchase_across_crash(name: &str) -> (Resp, Value, Value) {
    let mut srv = single_node().await;
    srv.create_item("gems", "currency", "0.10").await;
    srv.funded_user("u1", "10.00").await;
    assert_eq!(arm(&srv, name, "1*return", SECRET).await, 200);

    let key = new_key();
    let path = "/v1/users/u1/orders";
    let body = order_body(&[("gems", 3)], true);
    let first = srv
        .call(reqwest::Method::POST, path)
        .auth(Auth::Service)
        .key(&key)
        .json(&body)
        .try_send()
        .await;
    assert!(
        first.as_ref().map_or(true, |r| r.status >= 500),
        "the crash point did not stop the reply: {first:?}"
    );
    let status = srv.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "the process did not abort at {name}: {status:?}\n{}",
        tail(&srv.logs(), 40)
    );
    assert!(srv.logs().contains(&format!("crash point {name} fired")));

    srv.restart().await;
    let retry = srv
        .call(reqwest::Method::POST, path)
        .auth(Auth::Service)
        .key(&key)
        .json(&body)
        .send()
        .await;
    let wallet = srv
        .get("/v1/users/u1/wallet", Auth::Service)
        .await
        .expect(200);
    let orders = srv
        .get("/v1/users/u1/orders", Auth::Service)
        .await
        .expect(200);
    (retry, wallet, orders)
}

fn order_count(orders: &Value) -> usize {
    orders["orders"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn crash_after_apply_commit_then_retry_replays_the_purchase_charged_once() {
    let (retry, wallet, orders) = purchase_across_crash("crash-after-apply-commit").await;
    retry.expect(201);
    assert!(
        retry.replayed(),
        "the purchase was committed before the crash: {retry:?}"
    );
    assert_eq!(retry.json()["status"], "COMPLETED");
    assert_eq!(wallet["balance"], "9.70");
    assert_eq!(wallet["held"], "0.00");
    assert_eq!(order_count(&orders), 1, "{orders}");
}

#[tokio::test]
async fn crash_after_log_append_then_retry_applies_the_logged_purchase_once() {
    let (retry, wallet, orders) = purchase_across_crash("crash-after-log-append").await;
    retry.expect(201);
    // The entry was durable in the log before the abort: the restarted node commits and applies it,
    // so the retry finds the purchase done.
    assert!(retry.replayed(), "the logged purchase was lost: {retry:?}");
    assert_eq!(wallet["balance"], "9.70");
    assert_eq!(order_count(&orders), 1, "{orders}");
}

#[tokio::test]
async fn crash_points_refuse_unknown_names_and_a_wrong_secret() {
    let srv = single_node().await;
    assert_eq!(arm(&srv, "no-such-point", "return", SECRET).await, 404);
    assert_eq!(
        arm(&srv, "crash-after-apply-commit", "return", "wrong").await,
        401
    );
    assert_eq!(
        arm(&srv, "crash-after-apply-commit", "not-an-action", SECRET).await,
        400
    );
    // Nothing armed: a purchase goes through.
    srv.create_item("gems", "currency", "0.10").await;
    srv.funded_user("u1", "1.00").await;
    srv.create_order("u1", &[("gems", 1)], true)
        .await
        .expect(201);
}

/// A webhook PUT that stops after its home shard took it (the process aborts there) is completed by the
/// node itself: the sweeper copies the home shard's webhook to every other shard, and events of users on
/// every shard reach the receiver.
#[tokio::test]
async fn a_webhook_put_cut_off_after_its_home_shard_is_completed_after_the_restart() {
    // No sweep until the restart: the crash point fires after the first apply on any shard, and a sweep's
    // command applied between the arming and the PUT would fire it before the PUT reached its home.
    let mut srv = Server::start_with(
        Opts::new()
            .shards(8)
            .sweep_interval("1h")
            .env("SHOPKEEP_CLUSTER_SECRET", SECRET),
    )
    .await;
    let receiver = crate::webhook_receiver::WebhookReceiver::start(None).await;
    assert_eq!(
        arm(&srv, "crash-after-apply-commit", "1*return", SECRET).await,
        200
    );
    let cut = srv
        .call(reqwest::Method::PUT, "/v1/webhooks/half")
        .auth(Auth::Admin)
        .json(&serde_json::json!({"url": receiver.url("/e")}))
        .try_send()
        .await;
    assert!(cut.as_ref().map_or(true, |r| r.status >= 500), "{cut:?}");
    let status = srv.wait_exit(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| !s.success()), "no abort: {status:?}");
    srv.opts_mut().sweep_interval = Some("200ms".to_owned());
    srv.restart().await;

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = srv.get("/v1/webhooks/half", Auth::Admin).await;
        if status.status == 200 && status.json()["shards"].as_array().map(Vec::len) == Some(8) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never repaired: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..16 {
        srv.create_user(&format!("half{i}")).await;
    }
    let received = receiver.wait_for(16, Duration::from_secs(20)).await;
    let shards: std::collections::BTreeSet<u64> = received
        .iter()
        .map(|r| r.body["shard"].as_u64().unwrap())
        .collect();
    assert!(shards.len() > 1, "events of several shards: {shards:?}");
}

/// A shop-wide limits PUT that stops after its home shard took it is completed by the node itself: the
/// sweeper copies the home shard's limits to every other shard, so users on every shard are held to them.
#[tokio::test]
async fn a_shop_limits_put_cut_off_after_its_home_shard_is_completed_after_the_restart() {
    // No sweep until the restart: the crash point fires after the first apply on any shard, and a sweep's
    // command applied between the arming and the PUT would fire it before the PUT reached its home.
    let mut srv = Server::start_with(
        Opts::new()
            .sweep_interval("1h")
            .env("SHOPKEEP_CLUSTER_SECRET", SECRET),
    )
    .await;
    srv.create_item("free", "currency", "0.00").await;
    let users: Vec<String> = (0..16).map(|i| format!("cut{i}")).collect();
    for user in &users {
        srv.create_user(user).await;
    }
    assert_eq!(
        arm(&srv, "crash-after-apply-commit", "1*return", SECRET).await,
        200
    );
    let cut = srv
        .call(reqwest::Method::PUT, "/v1/admin/limits")
        .auth(Auth::Admin)
        .json(&serde_json::json!({"max_orders_per_hour": 0}))
        .try_send()
        .await;
    assert!(cut.as_ref().map_or(true, |r| r.status >= 500), "{cut:?}");
    let status = srv.wait_exit(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| !s.success()), "no abort: {status:?}");
    srv.opts_mut().sweep_interval = Some("200ms".to_owned());
    srv.restart().await;

    let limits = srv.get("/v1/admin/limits", Auth::Admin).await.expect(200);
    assert_eq!(
        limits["limits"]["max_orders_per_hour"], 0,
        "the home took it"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut behind: Vec<&String> = users.iter().collect();
    let mut first_round = true;
    while !behind.is_empty() {
        let mut still = vec![];
        for user in behind {
            let limits = srv
                .get(&format!("/v1/users/{user}/limits"), Auth::Service)
                .await
                .expect(200);
            if limits["limits"]["max_orders_per_hour"] != 0 {
                still.push(user);
            }
        }
        behind = still;
        if first_round {
            assert!(
                !behind.is_empty(),
                "no shard was left behind: nothing tested"
            );
            first_round = false;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never repaired for {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for user in &users {
        srv.create_order(user, &[("free", 1)], true)
            .await
            .expect_error(409, "limit_exceeded");
    }
}

/// A shard's leader tells openraft its own entries are flushed once they are queued, so they reach the
/// followers while its log writes them. Killed before it wrote them, it comes back without them while
/// its followers hold them: it must not resume as the leader of that term (openraft 0.9 would, from
/// its committed vote), where its next entries would take the lost entries' ids and the followers,
/// holding entries under those ids, would keep theirs. It stands in a new term, and every member ends
/// with the same state. Regression test: the chaos suite's EIO window found replicas that differed.
#[tokio::test]
async fn a_leader_killed_before_writing_entries_its_followers_hold_does_not_resume_its_term() {
    use crate::cluster_harness::{ClusterOpts, TestCluster};
    let mut opts = ClusterOpts::new().shards(1);
    // the followers wait longer than the killed leader's restart before they stand
    opts.election_timeout = "3s".into();
    let mut cluster = TestCluster::start_with(opts).await;
    let leader = cluster.leader_of_shard(0).await;
    let api = cluster.api(leader);
    api.funded_user("u1", "10.00").await;

    let secret = crate::cluster_harness::CLUSTER_SECRET;
    let point = "crash-before-early-append-write";
    assert_eq!(arm(cluster.node(leader), point, "pause", secret).await, 200);
    let stranded = tokio::spawn(async move {
        let body =
            serde_json::json!({"amount": "1.00", "external_ref": "stranded", "source": "card"});
        api.post("/v1/users/u1/credits", Auth::Service, &body).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill9(leader);
    let _ = stranded.await;
    cluster.restart(leader).await;

    let mut credited = 1000;
    for n in 0..5 {
        // each with its key, retried until a leader is elected (the election timeout is long here)
        let (key, path) = (new_key(), "/v1/users/u1/credits");
        let body = serde_json::json!({"amount": "2.00", "external_ref": format!("after-{n}"), "source": "card"});
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let response = cluster
                .api(leader)
                .post_key(path, Auth::Service, &key, &body)
                .await;
            if response.status != 503 || std::time::Instant::now() > deadline {
                response.expect(201);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        credited += 200;
    }
    // panics unless every member's state is the same
    cluster.wait_converged(Duration::from_secs(30)).await;
    let balance = cluster.api(leader).wallet("u1").await.balance;
    assert!(
        balance == credited || balance == credited + 100,
        "the answered credits, and the stranded one at most once: {balance}"
    );
}
