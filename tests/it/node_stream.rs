//! Node streams (`/_node/v1/stream`): a cluster's replication rides one stream per pair of nodes, a
//! killed peer's stream is opened again, and the upgrade and every frame are refused unless a member
//! signed them (raw TCP against a real node: the upgrade, then frames written by hand).

use std::time::Duration;

use shopkeep::secrets::{KeyPurpose, derive_key};
use shopkeep_raft::auth::NodeAuth;
use shopkeep_raft::rpc::{NodeRequest, NodeResponse};
use shopkeep_raft::stream::{Direction, PROTOCOL, STREAM_PATH, StreamKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cluster_harness::{CLUSTER_SECRET, ClusterOpts, TestCluster};
use crate::metrics::{Scrape, scrape};

const SETTLE: Duration = Duration::from_secs(20);

fn streams(scrape: &Scrape, direction: &str) -> f64 {
    scrape
        .value("shopkeep_node_streams", &[("direction", direction)])
        .expect("the node streams gauge is served")
}

fn calls(scrape: &Scrape, call: &str) -> f64 {
    scrape.sum_where("shopkeep_node_call_seconds_count", "call", call)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_rides_one_stream_per_peer_and_a_killed_peers_stream_is_opened_again() {
    let mut cluster = TestCluster::start_with(ClusterOpts::new()).await;
    let api = cluster.api(1);
    for user in 0..20 {
        api.funded_user(&format!("stream-{user}"), "5.00").await;
    }
    for id in cluster.ids() {
        let scrape = scrape(&cluster.api(id).base).await;
        let (out, inbound) = (streams(&scrape, "out"), streams(&scrape, "in"));
        assert!(
            (1.0..=2.0).contains(&out) && inbound <= 2.0,
            "node {id}: {out} streams out, {inbound} in (one per peer at most)"
        );
        assert!(
            calls(&scrape, "heartbeat") + calls(&scrape, "append") > 0.0,
            "node {id} made no replication call"
        );
    }

    cluster.kill9(3);
    for user in 20..30 {
        api.funded_user(&format!("stream-{user}"), "5.00").await;
    }
    cluster.restart(3).await;
    cluster.wait_converged(SETTLE).await;
    for user in 0..30 {
        let wallet = cluster
            .node(3)
            .local_wallet(&format!("stream-{user}"))
            .await;
        assert_eq!(wallet.balance, 500, "stream-{user} on the restarted node");
    }
    // The survivors' streams to the killed node ended with it and were opened again, not added to.
    for id in [1, 2] {
        let scrape = scrape(&cluster.api(id).base).await;
        let out = streams(&scrape, "out");
        assert!(
            out <= 2.0,
            "node {id}: {out} streams out after node 3 came back"
        );
    }
}

/// A raw connection to a node's stream endpoint.
struct RawStream {
    tcp: TcpStream,
}

impl RawStream {
    /// Sends the upgrade with `auth` (or none) and the `upgrade` header (or none); the status line.
    async fn upgrade(addr: &str, auth: Option<&str>, upgrade: Option<&str>) -> (RawStream, String) {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mut head =
            format!("POST {STREAM_PATH} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\n");
        if let Some(auth) = auth {
            head.push_str(&format!("x-shopkeep-node-auth: {auth}\r\n"));
        }
        if let Some(protocol) = upgrade {
            head.push_str(&format!("connection: upgrade\r\nupgrade: {protocol}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        let mut byte = [0u8; 1];
        while !response.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
                .await
                .expect("an answer in time")
                .expect("read");
            assert_eq!(n, 1, "the connection ended before the answer's head");
            response.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.lines().next().unwrap_or_default().to_owned();
        (RawStream { tcp }, status)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("write a frame");
    }

    /// The next answer, or `None` once the node closed the stream.
    async fn answer(&mut self, key: &StreamKey) -> Option<NodeResponse> {
        let read = key.read(&mut self.tcp, Direction::Answer, 1 << 20);
        let frame = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("an answer or the end in time")
            .ok()?;
        Some(postcard::from_bytes(&frame.payload).expect("an answer decodes"))
    }
}

fn probe_frame(key: &StreamKey, id: u64, time_micros: i64) -> Vec<u8> {
    let probe = postcard::to_stdvec(&NodeRequest::Probe).expect("encode");
    key.encode(Direction::Call, id, time_micros, &probe)
        .expect("a frame")
}

/// A frame the node must not answer: `forged` (a changed byte), `stale` (from a clock two minutes off),
/// `too long` (a length past the bound), or one under another stream's key.
fn bad_frame(what: &str, key: &StreamKey, member: &NodeAuth) -> Vec<u8> {
    match what {
        "forged" => {
            let mut frame = probe_frame(key, 1, now_micros());
            let last = frame.len() - 1;
            frame[last] ^= 0x55;
            frame
        }
        "stale" => probe_frame(key, 1, now_micros() - 120_000_000),
        "too long" => u32::MAX.to_le_bytes().to_vec(),
        _ => probe_frame(&member.stream_key(b"another header"), 1, now_micros()),
    }
}

fn now_micros() -> i64 {
    shopkeep_raft::clock::unix_micros()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_stream_takes_only_a_members_signed_upgrade_and_ends_at_a_forged_or_replayed_frame()
{
    let cluster = TestCluster::start_with(ClusterOpts::new().nodes(1)).await;
    let addr = cluster.node(1).addr();
    let member = NodeAuth::new(derive_key(CLUSTER_SECRET, KeyPurpose::NodeAuth), 0);
    let signed = || member.sign("POST", STREAM_PATH, b"");

    // Refused before any stream exists: no signature, a signature under another secret, one for
    // another path or body, and a signed request that does not ask to upgrade.
    let stranger = NodeAuth::new(
        derive_key(
            "not-the-cluster-secret-0123456789abcdef",
            KeyPurpose::NodeAuth,
        ),
        0,
    );
    let refusals = [
        (None, Some(PROTOCOL), "401"),
        (
            Some(stranger.sign("POST", STREAM_PATH, b"")),
            Some(PROTOCOL),
            "401",
        ),
        (
            Some(member.sign("POST", "/_node/v1/call", b"")),
            Some(PROTOCOL),
            "401",
        ),
        (
            Some(member.sign("POST", STREAM_PATH, b"body")),
            Some(PROTOCOL),
            "401",
        ),
        (Some(signed()), None, "400"),
        (Some(signed()), Some("websocket"), "400"),
    ];
    for (auth, upgrade, status) in refusals {
        let (_, line) = RawStream::upgrade(&addr, auth.as_deref(), upgrade).await;
        assert!(
            line.contains(&format!(" {status} ")),
            "auth {auth:?}, upgrade {upgrade:?}: {line}"
        );
    }

    // A member's upgrade: calls are answered, in order of their ids.
    let header = signed();
    let key = member.stream_key(header.as_bytes());
    let (mut stream, line) = RawStream::upgrade(&addr, Some(&header), Some(PROTOCOL)).await;
    assert!(line.contains(" 101 "), "{line}");
    stream.send(&probe_frame(&key, 1, now_micros())).await;
    match stream.answer(&key).await {
        Some(NodeResponse::Probe(probe)) => assert_eq!(probe.node_id, 1),
        other => panic!("a probe's answer: {other:?}"),
    }
    // The same upgrade header again is a replay: refused.
    let (_, line) = RawStream::upgrade(&addr, Some(&header), Some(PROTOCOL)).await;
    assert!(line.contains(" 401 "), "a replayed upgrade: {line}");

    // A replayed frame (its id does not grow) ends the stream.
    stream.send(&probe_frame(&key, 1, now_micros())).await;
    assert!(
        stream.answer(&key).await.is_none(),
        "a replayed frame was answered"
    );

    // A frame whose tag is not the stream's, a frame from a clock two minutes off, or a length past
    // the bound: each ends its stream unanswered.
    for what in ["forged", "stale", "too long", "another stream's key"] {
        let header = signed();
        let key = member.stream_key(header.as_bytes());
        let (mut stream, line) = RawStream::upgrade(&addr, Some(&header), Some(PROTOCOL)).await;
        assert!(line.contains(" 101 "), "{what}: {line}");
        stream.send(&bad_frame(what, &key, &member)).await;
        assert!(
            stream.answer(&key).await.is_none(),
            "a {what} frame was answered"
        );
    }
    let refused = scrape(&cluster.api(1).base)
        .await
        .value("shopkeep_node_traffic_refused_total", &[])
        .expect("the refusals are counted");
    assert!(refused >= 10.0, "{refused} refusals counted");
}
