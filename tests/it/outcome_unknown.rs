//! A write that is not committed in time answers that its outcome is unknown, names the configured
//! `--request-timeout`, and tells to retry with the same key; the retry learns the outcome (it was
//! committed once a quorum returned). No client-facing message carries a member's address.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster_harness::*;
use crate::harness::*;

#[tokio::test]
async fn a_write_without_a_quorum_says_its_outcome_is_unknown_and_the_retry_with_its_key_learns_it()
{
    let mut c = TestCluster::start_with(ClusterOpts::new().nodes(3).shards(1)).await;
    let leader = c.leader_of_shard(0).await;
    let api = c.api(leader);
    api.create_user("unknown-1").await;
    let others: Vec<u64> = c.ids().into_iter().filter(|&n| n != leader).collect();
    for &n in &others {
        c.kill9(n);
    }
    // A top-up intent is one command proposed on the user's shard (no read before it).
    let topups = "/v1/users/unknown-1/topups";
    let body = json!({"amount": "5.00"});
    let started = Instant::now();
    let r = api
        .post_key(topups, Auth::Service, "topup-unknown-1", &body)
        .await;
    let waited = started.elapsed();
    let error = r.expect_error(503, "unavailable");
    let message = error["message"].as_str().unwrap_or_default().to_owned();
    for says in [
        "outcome is unknown",
        "5s (--request-timeout)",
        "same Idempotency-Key",
    ] {
        assert!(
            message.contains(says),
            "the message does not say `{says}`: {message}"
        );
    }
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert!(
        waited <= c.opts.request_timeout_duration() + Duration::from_secs(2),
        "{waited:?}"
    );
    // A linearizable read on a leader without a quorum: no membership dump, no address.
    let read = api.get("/v1/users/unknown-1", Auth::Service).await;
    let read_error = read.expect_error(503, "unavailable");
    for answer in [&message, &read_error["message"].to_string()] {
        assert!(
            !answer.contains("127.0.0.1"),
            "a member's address reached a client: {answer}"
        );
    }

    for &n in &others {
        c.restart(n).await;
    }
    c.wait_ready(&c.ids(), READY_TIMEOUT).await;
    let again = post_until_definite(
        &api,
        topups,
        "topup-unknown-1",
        &body,
        Duration::from_secs(20),
    )
    .await;
    let topup = again.expect(201);
    let id = topup["topup_id"].as_str().unwrap_or_default();
    api.get(&format!("{topups}/{id}"), Auth::Service)
        .await
        .expect(200);
}
