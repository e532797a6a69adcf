//! The README's example consumers (`examples/*.py`) run as they are against a real server: the feed
//! consumer keeps its cursor across a restart of itself, the webhook receiver accepts what the shop
//! signs, and the routed buyer sends each purchase to its shard's leader on a 3-node cluster.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::cluster_harness::{ClusterOpts, TestCluster, free_port};
use crate::harness::*;
use crate::webhooks::put_webhook;

/// A Python example running with `env`; its stdout lines arrive on the receiver.
struct Example {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Example {
    fn start(script: &str, args: &[&str], env: &[(&str, String)]) -> Example {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(script);
        let mut command = Command::new("python3");
        command
            .arg(&path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("python3 runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Example { child, lines }
    }

    /// The next `n` lines it prints (within 20 s).
    fn next_lines(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                self.lines
                    .recv_timeout(Duration::from_secs(20))
                    .expect("the example printed a line in time")
            })
            .collect()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_feed_consumer_example_resumes_from_its_stored_cursor_after_a_restart() {
    let srv = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cursor = dir.path().join("cursor").to_string_lossy().into_owned();
    let env = [
        ("SHOPKEEP_URL", srv.api().base.clone()),
        ("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
    ];
    srv.create_user("fc1").await;
    let consumer = Example::start("feed_consumer.py", &[&cursor], &env);
    assert!(consumer.next_lines(1)[0].starts_with("user.created fc1 evt_"));
    srv.create_user("fc2").await;
    assert!(consumer.next_lines(1)[0].starts_with("user.created fc2 "));
    drop(consumer);

    srv.create_user("fc3").await;
    let again = Example::start("feed_consumer.py", &[&cursor], &env);
    // Killed between printing a page and storing the cursor after it, it handles that page again (at
    // least once); it never goes back further.
    let mut line = again.next_lines(1).remove(0);
    if line.starts_with("user.created fc2 ") {
        line = again.next_lines(1).remove(0);
    }
    assert!(
        line.starts_with("user.created fc3 "),
        "resumed from its cursor: {line}"
    );
}

#[tokio::test]
async fn the_webhook_receiver_example_accepts_what_the_shop_signs() {
    let srv = Server::start().await;
    let port = free_port();
    let hook = put_webhook(&srv, "example", &format!("http://127.0.0.1:{port}/"), None).await;
    let receiver = Example::start(
        "webhook_receiver.py",
        &[],
        &[
            ("PORT", port.to_string()),
            (
                "WEBHOOK_SECRET",
                hook["secret"].as_str().unwrap().to_owned(),
            ),
        ],
    );
    srv.create_user("wr1").await;
    // (The receiver may start after the first attempt: the shop retries until it answers.)
    let line = &receiver.next_lines(1)[0];
    assert!(line.starts_with("user.created wr1 "), "{line}");

    // A receiver holding another secret refuses, and the status says so.
    drop(receiver);
    let wrong = Example::start(
        "webhook_receiver.py",
        &[],
        &[
            ("PORT", port.to_string()),
            (
                "WEBHOOK_SECRET",
                "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned(),
            ),
        ],
    );
    srv.create_user("wr2").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = srv
            .get("/v1/webhooks/example", Auth::Admin)
            .await
            .expect(200);
        if status["last_error"] == "HTTP 401" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(wrong.lines.try_recv().is_err(), "nothing accepted");
}

/// Writes a node answered for another node (forwarded to it as their shard's leader), per its metrics.
async fn forwarded_writes_answered(api: &Api) -> f64 {
    crate::metrics::scrape(&api.base)
        .await
        .value("shopkeep_node_serve_seconds_count", &[("call", "write")])
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routed_buyer_example_sends_each_purchase_to_its_shards_leader_and_none_is_forwarded() {
    let cluster = TestCluster::start_with(ClusterOpts::new().nodes(3)).await;
    let ids = cluster.ids();
    let api = cluster.api(1);
    api.create_item("gems", "currency", "0.10").await;
    let players: Vec<String> = (0..12).map(|i| format!("routed-{i}")).collect();
    for player in &players {
        api.funded_user(player, "10.00").await;
    }
    let mut before = 0.0;
    for &id in &ids {
        before += forwarded_writes_answered(&cluster.api(id)).await;
    }
    let nodes = ids
        .iter()
        .map(|&id| format!("{id}={}", cluster.api(id).base))
        .collect::<Vec<_>>()
        .join(",");
    let env = [
        ("SHOPKEEP_NODES", nodes),
        ("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
    ];
    let mut args = vec!["gems"];
    args.extend(players.iter().map(String::as_str));
    let buyer = Example::start("routed_buyer.py", &args, &env);
    let mut leaders_used = std::collections::BTreeSet::new();
    for line in buyer.next_lines(players.len()) {
        let fields: Vec<&str> = line.split(' ').collect();
        let [player, node, status] = fields[..] else {
            panic!("unexpected line {line:?}");
        };
        assert_eq!(status, "201", "{line}");
        let route = api
            .get(&format!("/v1/cluster/route/{player}"), Auth::Service)
            .await
            .expect(200);
        assert_eq!(
            route["leader"].as_u64().map(|id| id.to_string()).as_deref(),
            Some(node),
            "{player} was not sent to its shard's leader: {route}"
        );
        leaders_used.insert(node.to_owned());
        assert_eq!(api.entitlement_qty(player, "gems").await, 1);
    }
    assert!(
        leaders_used.len() > 1,
        "every player on one leader: {leaders_used:?}"
    );
    let mut after = 0.0;
    for &id in &ids {
        after += forwarded_writes_answered(&cluster.api(id)).await;
    }
    assert_eq!(after, before, "purchases were forwarded to a leader");
}
