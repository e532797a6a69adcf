//! Wrong clocks, on real processes whose clock libfaketime shifts (Debian's `faketime` package; `.ci/run`
//! installs it): a single node whose clock is set back, and a cluster member whose clock runs ahead.
//! No order expires early, and none is completed after its `expires_at`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::cluster_harness::*;
use crate::harness::*;

/// libfaketime for multi-threaded programs.
fn libfaketime() -> PathBuf {
    let path = PathBuf::from("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1");
    assert!(
        path.exists(),
        "{} is missing: install Debian's `faketime` package (.ci/run does)",
        path.display()
    );
    path
}

/// The environment that makes a process's wall clock (not its monotonic clock) read the offset written
/// in `offset_file` (e.g. `+0`, `-1h`, `+30`), re-read every second.
fn shifted_clock(offset_file: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", libfaketime().display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE", offset_file.display().to_string()),
        ("FAKETIME_CACHE_DURATION", "1".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}

#[tokio::test]
async fn a_single_node_whose_clock_is_set_back_completes_no_order_after_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0").expect("offset");
    let mut opts = Opts::new().order_ttl("2s").sweep_interval("1h");
    for (k, v) in shifted_clock(&offset) {
        opts = opts.env(k, &v);
    }
    let srv = Server::start_with(opts).await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("u1", "10.00").await;
    let order = srv
        .create_order("u1", &[("gems", 1)], false)
        .await
        .expect(201);
    let order_id = order["order_id"].as_str().expect("order_id").to_owned();
    // Past the deadline, then the wall clock is set back an hour.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    std::fs::write(&offset, "-1h").expect("offset");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let r = srv
        .post(
            &format!("/v1/users/u1/orders/{order_id}/complete"),
            Auth::Service,
            &serde_json::json!({}),
        )
        .await;
    r.expect_error(409, "order_expired");
    let wallet = srv
        .get("/v1/users/u1/wallet", Auth::Service)
        .await
        .expect(200);
    assert_eq!(wallet["balance"], "10.00", "{wallet}");
    // A new order still gets a whole TTL, counted from the true time.
    let fresh = srv
        .create_order("u1", &[("gems", 1)], false)
        .await
        .expect(201);
    let fresh_id = fresh["order_id"].as_str().expect("order_id");
    srv.post(
        &format!("/v1/users/u1/orders/{fresh_id}/complete"),
        Auth::Service,
        &serde_json::json!({}),
    )
    .await
    .expect(200);
}

/// Users whose shard `leader` leads, created through `via`, until there are `n`.
async fn users_led_by(c: &TestCluster, via: u64, leader: u64, n: usize) -> Vec<String> {
    let mut users = Vec::new();
    for i in 0..200 {
        let user = format!("clk-{i}");
        if c.route(&user).await.1 == Some(leader) {
            c.api(via).funded_user(&user, "10.00").await;
            users.push(user);
            if users.len() == n {
                return users;
            }
        }
    }
    panic!("node {leader} leads no shard of 200 users");
}

async fn order_status(c: &TestCluster, via: u64, user: &str, order_id: &str) -> Value {
    c.api(via)
        .get(
            &format!("/v1/users/{user}/orders/{order_id}"),
            Auth::Service,
        )
        .await
        .expect(200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_whose_clock_runs_ahead_takes_no_writes_and_expires_nothing_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0").expect("offset");
    let mut opts = ClusterOpts::new();
    for node in 1..=3 {
        opts = opts.node_env(node, "SHOPKEEP_ORDER_TTL", "20s");
    }
    for (k, v) in shifted_clock(&offset) {
        opts = opts.node_env(3, k, &v);
    }
    let c = TestCluster::start_with(opts).await;
    c.api(1).create_item("gems", "currency", "1.00").await;
    // Node 3 leads some shards from the formation on (leaders are spread); find users there.
    let users = users_led_by(&c, 1, 3, 2).await;
    // Node 3's clock jumps 30 s ahead (within node traffic's 60 s window: it keeps talking).
    std::fs::write(&offset, "+30").expect("offset");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Orders with a 20 s deadline, stamped by node 1, on shards node 3 leads.
    let mut orders = Vec::new();
    for user in &users {
        let order = c
            .api(1)
            .create_order(user, &[("gems", 1)], false)
            .await
            .expect(201);
        orders.push((
            user.clone(),
            order["order_id"].as_str().expect("id").to_owned(),
        ));
    }
    let skewed = 3;
    c.wait_unready(
        skewed,
        Duration::from_secs(10),
        "a member whose clock runs 30 s ahead",
    )
    .await;
    let readyz = c.api(skewed).get("/readyz", Auth::None).await;
    assert!(readyz.text().contains("clock"), "{}", readyz.text());
    let r = c
        .api(skewed)
        .create_order(&users[0], &[("gems", 1)], false)
        .await;
    let error = r.expect_error(503, "unavailable");
    assert!(error.to_string().contains("clock"), "{error}");
    // Its sweeper has run several times meanwhile (every second by default): nothing expired early.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (user, order_id) in &orders {
        let order = order_status(&c, 1, user, order_id).await;
        assert_eq!(order["status"], "PENDING", "{order}");
    }
    let (user, order_id) = &orders[0];
    c.api(1)
        .post(
            &format!("/v1/users/{user}/orders/{order_id}/complete"),
            Auth::Service,
            &serde_json::json!({}),
        )
        .await
        .expect(200);
    // Back in step: it takes writes again.
    std::fs::write(&offset, "+0").expect("offset");
    c.wait_ready(&[skewed], Duration::from_secs(15)).await;
    c.api(skewed)
        .create_order(&users[1], &[("gems", 1)], true)
        .await
        .expect(201);
}
