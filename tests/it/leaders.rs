//! Leaders spread back out: `POST /v1/admin/cluster/leaders/rebalance` moves them at once, and a node
//! that returns after a failover gets its share back by itself within about a minute. Each move is an
//! election: every acknowledged write survives.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::{Tokens, shopkeep};
use crate::cluster_harness::*;
use crate::harness::*;

const SHARDS: u32 = 8;

/// How many shards each node leads, as node `from` sees it.
async fn leader_counts(c: &TestCluster, from: u64) -> Vec<u64> {
    let view = c.node(from).view().await;
    let mut counts = vec![0u64; 4];
    for shard in view["shards"].as_array().into_iter().flatten() {
        if let Some(leader) = shard["leader"].as_u64() {
            counts[leader as usize] += 1;
        }
    }
    counts
}

/// Waits until `done` holds for the leader counts node 1 sees, at most `within`.
async fn wait_counts(c: &TestCluster, within: Duration, what: &str, done: impl Fn(&[u64]) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let counts = leader_counts(c, 1).await;
        if done(&counts) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}; leaders per node (index = node): {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Kills node 3, waits until nodes 1 and 2 lead every shard, starts it again and waits until it is ready.
async fn fail_over_and_return(c: &mut TestCluster) {
    c.kill9(3);
    wait_counts(
        c,
        Duration::from_secs(30),
        "nodes 1 and 2 lead every shard",
        |n| n[1] + n[2] == u64::from(SHARDS),
    )
    .await;
    c.restart(3).await;
    c.wait_ready(&[1, 2, 3], READY_TIMEOUT).await;
}

async fn credit(api: &Api, user: &str, key: &str) {
    let body = json!({"amount": "1.00", "external_ref": format!("ext-{key}"), "source": "card"});
    let path = format!("/v1/users/{user}/credits");
    post_until_definite(api, &path, key, &body, Duration::from_secs(30))
        .await
        .expect(201);
}

#[tokio::test]
async fn the_endpoint_spreads_leaders_at_once_and_a_returning_node_gets_its_share_back_by_itself() {
    let mut c = TestCluster::start_with(ClusterOpts::new().nodes(3).shards(SHARDS)).await;
    let users: Vec<String> = (0..8).map(|i| format!("spread-{i}")).collect();
    for user in &users {
        c.api(1).create_user(user).await;
        credit(&c.api(1), user, &format!("{user}-a")).await;
    }

    // At once: the endpoint.
    fail_over_and_return(&mut c).await;
    let r = c
        .api(1)
        .call(reqwest::Method::POST, "/v1/admin/cluster/leaders/rebalance")
        .auth(Auth::Admin)
        .fresh_key()
        .send()
        .await;
    let body: Value = r.expect(200);
    let moved = body["moved"].as_array().cloned().unwrap_or_default();
    assert!(moved.len() >= 2, "{body}");
    assert!(
        moved.iter().all(|m| m["to"] == 3 && m["shard"].is_u64()),
        "{body}"
    );
    let leaders = body["leaders"].as_object().cloned().unwrap_or_default();
    let counts: Vec<u64> = ["1", "2", "3"]
        .iter()
        .map(|n| leaders.get(*n).and_then(Value::as_u64).unwrap_or(0))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), u64::from(SHARDS), "{body}");
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{body}"
    );
    // Already spread: nothing to move.
    let again: Value = c
        .api(2)
        .call(reqwest::Method::POST, "/v1/admin/cluster/leaders/rebalance")
        .auth(Auth::Admin)
        .fresh_key()
        .send()
        .await
        .expect(200);
    assert_eq!(again["moved"], json!([]), "{again}");

    // By itself: within about a minute of its return (the imbalance must last 30 s first).
    fail_over_and_return(&mut c).await;
    let returned = Instant::now();
    wait_counts(
        &c,
        Duration::from_secs(90),
        "node 3 leads 2 shards or more",
        |n| n[3] >= 2,
    )
    .await;
    eprintln!(
        "node 3 got its share back {:.1?} after it was ready",
        returned.elapsed()
    );

    // Nothing acknowledged was lost through the elections.
    for user in &users {
        credit(&c.api(2), user, &format!("{user}-b")).await;
        assert_eq!(c.api(3).wallet(user).await.balance, 200, "{user}");
    }
}

#[tokio::test]
async fn shopkeep_leaders_rebalance_moves_leaders_to_a_returned_node_and_then_has_nothing_to_move()
{
    let mut c = TestCluster::start_with(ClusterOpts::new().nodes(3).shards(SHARDS)).await;
    fail_over_and_return(&mut c).await;
    let url = c.api(1).base;
    let run = shopkeep(&url, Tokens::AdminOnly, &["leaders", "rebalance"]).await;
    let stdout = &run.success().stdout;
    let moves: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("SHARD"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(moves.len() >= 2, "moves to node 3 as a table: {stdout}");
    assert!(
        moves
            .iter()
            .all(|m| m.split_whitespace().last() == Some("3")),
        "{stdout}"
    );
    assert!(stdout.contains("NODE  LEADS"), "{stdout}");

    let again = shopkeep(&url, Tokens::AdminOnly, &["leaders", "rebalance", "--json"]).await;
    assert_eq!(again.success().json()["moved"], json!([]), "{again:?}");
}
