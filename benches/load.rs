//! HTTP load benchmark of the purchase path: `POST /v1/users/{id}/orders` with `"complete": true`.
//!
//! What it measures: end-to-end latency and throughput of one-step purchases (create + complete an order,
//! i.e. hold, debit and entitlement grant in one atomic step) against real `shopkeep serve` processes over
//! keep-alive HTTP/1 connections, at several levels of concurrency. Two modes:
//!
//! - **single node** (the default): one `shopkeep serve` process, every shard a one-voter Raft group;
//! - **cluster** (`SHOPKEEP_BENCH_NODES=3`): three `shopkeep serve` processes on loopback forming one
//!   cluster (every shard replicated on all three, default Raft timings), the client connections spread
//!   round-robin over the nodes as behind a load balancer, so about 2/3 of the purchases reach a node that
//!   is not their shard's leader and are forwarded to it (one hop).
//!
//! How it works:
//! 1. starts the node(s) in a temporary directory, release build:
//!    - single node: `shopkeep serve --data-dir <tempdir> --listen 127.0.0.1:0`, then waits for its
//!      "listening" line;
//!    - cluster: picks free loopback ports (bind port 0, release), starts node `i` with `--node-id i
//!      --listen 127.0.0.1:<port i> --peers 1=127.0.0.1:<port 1>,2=…,3=…` and the same
//!      `SHOPKEEP_CLUSTER_SECRET`, `SHOPKEEP_ADMIN_TOKEN` and `SHOPKEEP_SERVICE_TOKEN` on each, waits for
//!      every "listening" line, then until `GET /readyz` answers 200 on every node;
//! 2. seeds (through node 1) one currency item (`gems`, 0.01 each) and [`USERS`] users, each credited
//!    100,000.00; in cluster mode it also asks node 1 which shard each user lives on
//!    (`GET /v1/cluster/route/{id}`);
//! 3. for each concurrency level runs that many workers, each looping over its own users (worker `w` buys
//!    for users `w`, `w + c`, `w + 2c`, … round-robin) over its own keep-alive connection to node
//!    `w mod nodes` (always node 1 in single-node mode), first for a 1 s warm-up that is not measured, then
//!    for the measured duration; every purchase has a fresh `Idempotency-Key`. The peak RSS of every node
//!    over the level (warm-up included) is `VmHWM` of `/proc/<pid>/status`, reset through
//!    `/proc/<pid>/clear_refs` before the level (Linux; if the reset is refused it is the peak since start);
//! 4. prints a table and one JSON line (`{"bench":"complete_purchase","results":[...]}`); latency
//!    percentiles are over the successful (201 `COMPLETED`) purchases, anything else counts as an error.
//!    In cluster mode it adds `"nodes":3` to the JSON line and, per level, the share of measured purchases
//!    sent to a node that was not the shard's leader at the start of the level (`forwarded_pct`, from
//!    `GET /v1/cluster` on node 1) and the peak RSS of each node (`peak_rss_kib`, also printed as a second
//!    table; in single-node mode the peak RSS is only shown in the progress lines on stderr);
//! 5. runs `GET /v1/admin/audit` (on every node in cluster mode: each audit must be ok, and each shard's
//!    `state_hash` must be equal on every node) and checks that the orders it counts equal the purchases
//!    that succeeded (warm-ups included). Failures are printed (`MISMATCH`, `ok = false`), not fatal.
//!
//! All nodes are killed and their data directories removed when the benchmark ends, panics included.
//!
//! Run it with:
//!
//! ```text
//! cargo bench --bench load
//! SHOPKEEP_BENCH_SECONDS=5 SHOPKEEP_BENCH_CONCURRENCY=1,16,64 cargo bench --bench load
//! SHOPKEEP_BENCH_NODES=3 cargo bench --bench load
//! SHOPKEEP_BENCH_NODES=3 SHOPKEEP_BENCH_SECONDS=5 SHOPKEEP_BENCH_CONCURRENCY=16,64 cargo bench --bench load
//! ```
//!
//! `SHOPKEEP_BENCH_CONCURRENCY` (default `1,16,64,256`) lists the levels, `SHOPKEEP_BENCH_SECONDS`
//! (default 10) the measured duration of each, `SHOPKEEP_BENCH_NODES` (default 1) the number of nodes:
//! 1 is the single-node mode, 2 or more a cluster of that many (3 is the configuration the product
//! supports; with `n` nodes about `(n-1)/n` of the purchases are forwarded). Progress goes to stderr,
//! results to stdout. Keep in mind that every node and the load generator share the machine's cores.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tempfile::TempDir;
use uuid::Uuid;

const ADMIN_TOKEN: &str = "bench-admin";
const SERVICE_TOKEN: &str = "bench-service";
/// The shared node-to-node secret of the cluster mode.
const CLUSTER_SECRET: &str = "bench-cluster-secret-3f0c9a71d2b84e65";
/// Enough users that concurrent workers rarely buy for the same one (and so rarely contend on a wallet).
const USERS: usize = 512;
/// How many seeding requests are in flight at once.
const SEED_PARALLELISM: usize = 32;
const DEFAULT_CONCURRENCY: &[usize] = &[1, 16, 64, 256];
const DEFAULT_SECONDS: f64 = 10.0;
const WARM_UP: Duration = Duration::from_secs(1);
/// How long to wait for the servers to print their listening lines.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait, after the listening lines, until `/readyz` is 200 on every node of a cluster.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const ORDER_BODY: &str = r#"{"lines":[{"item_id":"gems","quantity":1}],"complete":true}"#;

fn main() {
    let levels = concurrency_levels();
    let duration = measured_duration();
    let node_count = node_count();
    let max_concurrency = levels.iter().copied().max().unwrap_or(1);

    let spawned = Instant::now();
    let nodes = Nodes::start(node_count);
    let clustered = nodes.clustered();
    if clustered {
        for node in &nodes.nodes {
            eprintln!(
                "node {}: listening on {} (pid {})",
                node.id,
                node.base_url,
                node.child.id()
            );
        }
    } else {
        eprintln!("server: listening on {}", nodes.nodes[0].base_url);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    runtime.block_on(async {
        let client = Client::builder()
            .pool_max_idle_per_host(max_concurrency.max(SEED_PARALLELISM))
            .tcp_nodelay(true)
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("cannot build the HTTP client");
        let bases: Vec<String> = nodes.nodes.iter().map(|n| n.base_url.clone()).collect();
        let base = bases[0].clone();

        if clustered {
            wait_ready(&client, &nodes, spawned).await;
        }

        eprintln!("seeding: item gems and {USERS} users");
        seed(&client, &base).await;
        let user_shards = if clustered {
            Some(user_shards(&client, &base).await)
        } else {
            None
        };

        let mut results = Vec::new();
        let mut completed_total = 0u64;
        for &concurrency in &levels {
            eprintln!(
                "level {concurrency}: running {:.1?} (after {:?} warm-up)…",
                duration, WARM_UP
            );
            let peak_since_start = !nodes.reset_peak_rss();
            // Where each user's shard is led right now: the node a purchase goes to is compared with it.
            let leaders_before = match &user_shards {
                Some(_) => Some(shard_leaders(&client, &base).await),
                None => None,
            };
            let leader_of_user: Option<Arc<Vec<Option<u64>>>> =
                match (&user_shards, &leaders_before) {
                    (Some(shards), Some(leaders)) => Some(Arc::new(
                        shards
                            .iter()
                            .map(|&s| leaders.get(s as usize).copied().flatten())
                            .collect(),
                    )),
                    _ => None,
                };
            let (mut result, completed) =
                run_level(&client, &bases, leader_of_user, concurrency, duration).await;
            result.peak_rss_kib = nodes.peak_rss_kib();
            result.peak_since_start = peak_since_start;
            if let Some(before) = &leaders_before {
                let after = shard_leaders(&client, &base).await;
                if &after != before {
                    result.leaders_changed = true;
                    eprintln!(
                        "level {concurrency}: shard leaders changed during the level: {} → {}",
                        leaders_text(before),
                        leaders_text(&after)
                    );
                }
            }
            eprintln!(
                "level {concurrency}: {} requests, {:.0} req/s, {} errors, peak RSS {}",
                result.requests,
                result.throughput,
                result.errors,
                rss_text(&result.peak_rss_kib)
            );
            completed_total += completed;
            results.push(result);
        }

        print_table(&results);
        let json_results: Vec<Value> = results
            .iter()
            .map(|r| r.to_json(clustered))
            .collect();
        if clustered {
            print_cluster_table(&results, nodes.nodes.len());
            println!(
                "{}",
                json!({"bench": "complete_purchase", "nodes": nodes.nodes.len(), "results": json_results})
            );
            check_cluster_audit(&client, &bases, completed_total).await;
        } else {
            println!(
                "{}",
                json!({"bench": "complete_purchase", "results": json_results})
            );
            check_audit(&client, &base, completed_total).await;
        }
    });
    drop(runtime);
    drop(nodes);
}

// ------------------------------------------------------------------------------------------------
// Settings
// ------------------------------------------------------------------------------------------------

fn concurrency_levels() -> Vec<usize> {
    let Ok(text) = std::env::var("SHOPKEEP_BENCH_CONCURRENCY") else {
        return DEFAULT_CONCURRENCY.to_vec();
    };
    let levels: Vec<usize> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("SHOPKEEP_BENCH_CONCURRENCY: {s:?} is not a positive integer"),
        })
        .collect();
    assert!(
        !levels.is_empty(),
        "SHOPKEEP_BENCH_CONCURRENCY lists no level (expected e.g. 1,16,64)"
    );
    levels
}

fn measured_duration() -> Duration {
    let Ok(text) = std::env::var("SHOPKEEP_BENCH_SECONDS") else {
        return Duration::from_secs_f64(DEFAULT_SECONDS);
    };
    match text.trim().parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Duration::from_secs_f64(seconds),
        _ => panic!("SHOPKEEP_BENCH_SECONDS: {text:?} is not a positive number of seconds"),
    }
}

/// `SHOPKEEP_BENCH_NODES`: 1 (the default) is the single-node mode, more is a cluster of that many.
fn node_count() -> u64 {
    let Ok(text) = std::env::var("SHOPKEEP_BENCH_NODES") else {
        return 1;
    };
    if text.trim().is_empty() {
        return 1;
    }
    match text.trim().parse::<u64>() {
        Ok(n) if (1..=9).contains(&n) => n,
        _ => panic!("SHOPKEEP_BENCH_NODES: {text:?} is not a number of nodes from 1 to 9 (e.g. 3)"),
    }
}

// ------------------------------------------------------------------------------------------------
// Server processes
// ------------------------------------------------------------------------------------------------

/// One `shopkeep serve` process under test.
struct Node {
    id: u64,
    child: Child,
    base_url: String,
    stderr_path: PathBuf,
}

/// The `shopkeep serve` processes under test: one (single-node mode, no `--peers`) or the members of one
/// cluster. All are killed on drop, then their temporary directory (data dirs and logs) is removed.
struct Nodes {
    nodes: Vec<Node>,
    // Dropped after `Drop::drop` has killed the processes, which removes the directory.
    dir: TempDir,
}

impl Nodes {
    fn start(count: u64) -> Nodes {
        let clustered = count > 1;
        let dir = tempfile::Builder::new()
            .prefix(if clustered {
                "shopkeep-bench-cluster-"
            } else {
                "shopkeep-bench-"
            })
            .tempdir()
            .expect("cannot create a temporary data directory");
        let mut nodes = Nodes {
            nodes: Vec::new(),
            dir,
        };

        // Free loopback ports: all bound at once (so they differ), released right before the start.
        let (listens, peers) = if clustered {
            let listeners: Vec<TcpListener> = (0..count)
                .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind a free port"))
                .collect();
            let addresses: Vec<String> = listeners
                .iter()
                .map(|l| {
                    let port = l.local_addr().expect("bound listener").port();
                    format!("127.0.0.1:{port}")
                })
                .collect();
            let peers = (1..)
                .zip(&addresses)
                .map(|(id, address)| format!("{id}={address}"))
                .collect::<Vec<_>>()
                .join(",");
            (addresses, Some(peers))
        } else {
            (vec!["127.0.0.1:0".to_string()], None)
        };

        // Start every member before waiting for any: a member may only serve once a majority is up.
        let mut pending = Vec::new();
        for (id, listen) in (1u64..).zip(&listens) {
            let (data_dir, stderr_path) = if clustered {
                (
                    nodes.dir.path().join(format!("node-{id}")).join("data"),
                    nodes.dir.path().join(format!("node-{id}.stderr")),
                )
            } else {
                (
                    nodes.dir.path().join("data"),
                    nodes.dir.path().join("server.stderr"),
                )
            };
            let stderr = std::fs::File::create(&stderr_path)
                .expect("cannot create the server's stderr file");
            let mut command = Command::new(env!("CARGO_BIN_EXE_shopkeep"));
            command
                .arg("serve")
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--listen", listen]);
            if let Some(peers) = &peers {
                command
                    .args(["--node-id", &id.to_string()])
                    .args(["--peers", peers])
                    .env("SHOPKEEP_CLUSTER_SECRET", CLUSTER_SECRET);
            }
            let mut child = command
                .env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .expect("cannot start the shopkeep binary");

            // One thread reads stdout for the whole life of the process (so the pipe never fills up) and
            // hands the lines over until the listening line has been seen.
            let stdout = child.stdout.take().expect("stdout was piped");
            let (lines_tx, lines_rx) = mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // The receiver is gone once the server is up: keep draining regardless.
                    let _ = lines_tx.send(line);
                }
            });
            nodes.nodes.push(Node {
                id,
                child,
                base_url: String::new(),
                stderr_path,
            });
            pending.push(lines_rx);
        }

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for (node, lines_rx) in nodes.nodes.iter_mut().zip(pending) {
            node.base_url = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match lines_rx.recv_timeout(left) {
                    Ok(line) => {
                        if let Some(url) = line.trim().strip_prefix("shopkeep listening on ") {
                            break url.trim_end_matches('/').to_string();
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                        "node {} printed no listening line within {STARTUP_TIMEOUT:?}; its stderr:\n{}",
                        node.id,
                        read_tail(&node.stderr_path)
                    ),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let status = node
                            .child
                            .wait()
                            .expect("cannot wait for the server process");
                        panic!(
                            "node {} exited ({status}) before listening; its stderr:\n{}",
                            node.id,
                            read_tail(&node.stderr_path)
                        );
                    }
                }
            };
        }
        nodes
    }

    fn clustered(&self) -> bool {
        self.nodes.len() > 1
    }

    /// Resets the peak RSS (`VmHWM`) of every node to its current RSS; false if any reset was refused.
    fn reset_peak_rss(&self) -> bool {
        self.nodes.iter().fold(true, |all, node| {
            let path = format!("/proc/{}/clear_refs", node.child.id());
            std::fs::write(path, "5").is_ok() && all
        })
    }

    /// The peak RSS (`VmHWM`, KiB) of every node, `None` where it cannot be read.
    fn peak_rss_kib(&self) -> Vec<Option<u64>> {
        self.nodes
            .iter()
            .map(|node| proc_status_kib(node.child.id(), "VmHWM"))
            .collect()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Ok(Some(status)) = node.child.try_wait() {
                eprintln!(
                    "node {}: had already exited ({status}); its stderr:\n{}",
                    node.id,
                    read_tail(&node.stderr_path)
                );
            } else {
                let _ = node.child.kill();
            }
        }
        for node in &mut self.nodes {
            let _ = node.child.wait();
        }
    }
}

/// A `kB` field of `/proc/<pid>/status` (Linux only).
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
}

/// The last few KiB of a file, for error messages.
fn read_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read: {e}>"));
    let start = text.len().saturating_sub(8 * 1024);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// Waits until `GET /readyz` answers 200 on every node (every shard has a leader it knows); `spawned`:
/// when the processes were started.
async fn wait_ready(client: &Client, nodes: &Nodes, spawned: Instant) {
    eprintln!("cluster: waiting for /readyz on every node…");
    let deadline = Instant::now() + READY_TIMEOUT;
    for node in &nodes.nodes {
        let url = format!("{}/readyz", node.base_url);
        loop {
            let last = match client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(response) if response.status() == StatusCode::OK => break,
                Ok(response) => {
                    let status = response.status();
                    format!("{status}: {}", response.text().await.unwrap_or_default())
                }
                Err(e) => format!("request failed: {e}"),
            };
            if Instant::now() >= deadline {
                panic!(
                    "node {}: /readyz not 200 within {READY_TIMEOUT:?} (last: {last}); its stderr:\n{}",
                    node.id,
                    read_tail(&node.stderr_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "cluster: every node ready {:.1?} after the start",
        spawned.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------
// Seeding
// ------------------------------------------------------------------------------------------------

/// Creates the `gems` item and [`USERS`] users with plenty of credit. Panics on any unexpected answer.
async fn seed(client: &Client, base: &str) {
    let response = client
        .put(format!("{base}/v1/items/gems"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "Gems", "kind": "currency", "price": "0.01"}))
        .send()
        .await
        .expect("PUT /v1/items/gems: request failed");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "PUT /v1/items/gems: {body}");

    let mut tasks = Vec::new();
    for worker in 0..SEED_PARALLELISM {
        let client = client.clone();
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (worker..USERS).step_by(SEED_PARALLELISM) {
                let user = user_id(i);
                service_post(
                    &client,
                    &format!("{base}/v1/users"),
                    json!({"user_id": user}),
                    StatusCode::CREATED,
                )
                .await;
                service_post(
                    &client,
                    &format!("{base}/v1/users/{user}/credits"),
                    json!({"amount": "100000.00", "external_ref": format!("bench-{i}")}),
                    StatusCode::CREATED,
                )
                .await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("a seeding task panicked");
    }
}

/// A service-role POST with a fresh idempotency key that must answer `expected`.
async fn service_post(client: &Client, url: &str, body: Value, expected: StatusCode) {
    let response = client
        .post(url)
        .bearer_auth(SERVICE_TOKEN)
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: request failed: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, expected, "POST {url} {body}: {text}");
}

fn user_id(i: usize) -> String {
    format!("bench-{i}")
}

/// An admin GET that must answer 200 with JSON. Panics otherwise.
async fn admin_get<T: serde::de::DeserializeOwned>(client: &Client, url: &str) -> T {
    let response = client
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: request failed: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "GET {url}: {text}");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET {url}: unexpected body ({e}): {text}"))
}

#[derive(Deserialize)]
struct Route {
    shard: u32,
}

/// The shard of every bench user (`GET /v1/cluster/route/{id}`), indexed like [`user_id`].
async fn user_shards(client: &Client, base: &str) -> Vec<u32> {
    let mut tasks = Vec::new();
    for worker in 0..SEED_PARALLELISM {
        let client = client.clone();
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            let mut shards = Vec::new();
            for i in (worker..USERS).step_by(SEED_PARALLELISM) {
                let url = format!("{base}/v1/cluster/route/{}", user_id(i));
                let route: Route = admin_get(&client, &url).await;
                shards.push((i, route.shard));
            }
            shards
        }));
    }
    let mut shards = vec![0; USERS];
    for task in tasks {
        for (i, shard) in task.await.expect("a routing task panicked") {
            shards[i] = shard;
        }
    }
    shards
}

#[derive(Deserialize)]
struct ClusterView {
    shards: Vec<ClusterShard>,
}

#[derive(Deserialize)]
struct ClusterShard {
    leader: Option<u64>,
}

/// Each shard's leader as `base` sees it (`GET /v1/cluster`), indexed by shard.
async fn shard_leaders(client: &Client, base: &str) -> Vec<Option<u64>> {
    let view: ClusterView = admin_get(client, &format!("{base}/v1/cluster")).await;
    view.shards.into_iter().map(|s| s.leader).collect()
}

fn leaders_text(leaders: &[Option<u64>]) -> String {
    let parts: Vec<String> = leaders
        .iter()
        .map(|l| l.map_or("-".to_string(), |id| id.to_string()))
        .collect();
    format!("[{}]", parts.join(","))
}

// ------------------------------------------------------------------------------------------------
// Load
// ------------------------------------------------------------------------------------------------

/// What one worker saw during the measured window.
#[derive(Default)]
struct WorkerStats {
    /// Latency of each successful purchase, in microseconds.
    latencies_us: Vec<u64>,
    /// Failed requests by status ("409", "503", "transport", …).
    errors: BTreeMap<String, u64>,
    /// Successful purchases over the warm-up *and* the measured window (for the audit check).
    completed_total: u64,
    /// Measured requests sent to a node that did not lead the user's shard at the start of the level.
    forwarded: u64,
}

/// The outcome of one purchase request.
enum Outcome {
    Completed,
    Failed(String),
}

#[derive(Deserialize)]
struct OrderStatus {
    status: String,
}

struct LevelResult {
    concurrency: usize,
    requests: u64,
    successes: u64,
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    errors: u64,
    errors_by_status: BTreeMap<String, u64>,
    /// Cluster mode: the share of measured requests sent to a node that did not lead their shard.
    forwarded_share: Option<f64>,
    /// Cluster mode: a shard's leader changed between the start and the end of the level.
    leaders_changed: bool,
    /// Peak RSS of each node over the level, KiB (`None`: unreadable).
    peak_rss_kib: Vec<Option<u64>>,
    /// The peak could not be reset before the level: it is the peak since the node started.
    peak_since_start: bool,
}

impl LevelResult {
    fn to_json(&self, clustered: bool) -> Value {
        let mut value = json!({
            "concurrency": self.concurrency,
            "requests": self.requests,
            "successes": self.successes,
            "throughput_rps": round2(self.throughput),
            "p50_ms": round2(self.p50_ms),
            "p99_ms": round2(self.p99_ms),
            "p999_ms": round2(self.p999_ms),
            "max_ms": round2(self.max_ms),
            "errors": self.errors,
            "errors_by_status": self.errors_by_status,
        });
        if clustered {
            value["forwarded_pct"] = self
                .forwarded_share
                .map_or(Value::Null, |share| round2(share * 100.0));
            value["leaders_changed"] = json!(self.leaders_changed);
            value["peak_rss_kib"] = json!(self.peak_rss_kib);
            value["peak_rss_since_start"] = json!(self.peak_since_start);
        }
        value
    }
}

/// Runs `concurrency` workers for the warm-up plus `duration`, worker `w` over connections to node
/// `w mod bases.len()`; returns the measured result and the number of purchases that completed over the
/// whole level (warm-up included). `leader_of_user` (cluster mode): the node leading each user's shard.
async fn run_level(
    client: &Client,
    bases: &[String],
    leader_of_user: Option<Arc<Vec<Option<u64>>>>,
    concurrency: usize,
    duration: Duration,
) -> (LevelResult, u64) {
    // urls[node][user]
    let urls: Arc<Vec<Vec<String>>> = Arc::new(
        bases
            .iter()
            .map(|base| {
                (0..USERS)
                    .map(|i| format!("{base}/v1/users/{}/orders", user_id(i)))
                    .collect()
            })
            .collect(),
    );
    let measure_from = Instant::now() + WARM_UP;
    let stop_at = measure_from + duration;

    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let client = client.clone();
        let urls = urls.clone();
        let leader_of_user = leader_of_user.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = WorkerStats::default();
            // Round-robin over the nodes, as a load balancer would spread the connections.
            let node = worker % urls.len();
            let node_id = node as u64 + 1;
            let urls = &urls[node];
            // Worker-affine users: worker w buys for w, w + c, w + 2c, … (mod USERS).
            let mut user = worker % USERS;
            loop {
                let started = Instant::now();
                if started >= stop_at {
                    break;
                }
                let outcome = purchase(&client, &urls[user]).await;
                let latency = started.elapsed();
                if matches!(outcome, Outcome::Completed) {
                    stats.completed_total += 1;
                }
                if started >= measure_from {
                    if let Some(leaders) = &leader_of_user {
                        if leaders[user] != Some(node_id) {
                            stats.forwarded += 1;
                        }
                    }
                    match outcome {
                        Outcome::Completed => stats.latencies_us.push(micros(latency)),
                        Outcome::Failed(bucket) => *stats.errors.entry(bucket).or_default() += 1,
                    }
                }
                user = (user + concurrency) % USERS;
            }
            stats
        }));
    }

    let mut latencies_us = Vec::new();
    let mut errors_by_status = BTreeMap::new();
    let mut completed_total = 0;
    let mut forwarded = 0;
    for task in tasks {
        let stats = task.await.expect("a load worker panicked");
        latencies_us.extend(stats.latencies_us);
        for (bucket, count) in stats.errors {
            *errors_by_status.entry(bucket).or_default() += count;
        }
        completed_total += stats.completed_total;
        forwarded += stats.forwarded;
    }
    // Requests started just before `stop_at` finish after it: count the window until the last one ended.
    let elapsed = measure_from.elapsed().as_secs_f64();

    latencies_us.sort_unstable();
    let successes = latencies_us.len() as u64;
    let errors: u64 = errors_by_status.values().sum();
    let requests = successes + errors;
    let result = LevelResult {
        concurrency,
        requests,
        successes,
        throughput: requests as f64 / elapsed,
        p50_ms: percentile_ms(&latencies_us, 0.50),
        p99_ms: percentile_ms(&latencies_us, 0.99),
        p999_ms: percentile_ms(&latencies_us, 0.999),
        max_ms: latencies_us
            .last()
            .map_or(f64::NAN, |&us| us as f64 / 1000.0),
        errors,
        errors_by_status,
        forwarded_share: match leader_of_user {
            Some(_) if requests > 0 => Some(forwarded as f64 / requests as f64),
            _ => None,
        },
        leaders_changed: false,
        peak_rss_kib: Vec::new(),
        peak_since_start: false,
    };
    (result, completed_total)
}

/// One complete purchase of one gem for the user behind `url`.
async fn purchase(client: &Client, url: &str) -> Outcome {
    let sent = client
        .post(url)
        .bearer_auth(SERVICE_TOKEN)
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .header(CONTENT_TYPE, "application/json")
        .body(ORDER_BODY)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return Outcome::Failed("timeout".into()),
        Err(_) => return Outcome::Failed("transport".into()),
    };
    let status = response.status();
    // Read the whole body so that the connection goes back to the pool.
    let Ok(body) = response.bytes().await else {
        return Outcome::Failed("transport".into());
    };
    if status != StatusCode::CREATED {
        return Outcome::Failed(status.as_u16().to_string());
    }
    match serde_json::from_slice::<OrderStatus>(&body) {
        Ok(order) if order.status == "COMPLETED" => Outcome::Completed,
        _ => Outcome::Failed("201-not-completed".into()),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds (NaN when there are none).
fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[index] as f64 / 1000.0
}

/// A latency for the table: two decimals, rounded as in the JSON line.
fn ms(x: f64) -> String {
    if x.is_finite() {
        format!("{:.2}", (x * 100.0).round() / 100.0)
    } else {
        "-".to_string()
    }
}

fn round2(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".to_string(), |kib| format!("{:.1}", kib as f64 / 1024.0))
}

/// Peak RSS of the nodes for a progress line: `52.3 MiB` or `node 1 52.3, node 2 49.8, … MiB`.
fn rss_text(peaks: &[Option<u64>]) -> String {
    match peaks {
        [one] => format!("{} MiB", mib(*one)),
        _ => {
            let parts: Vec<String> = (1..)
                .zip(peaks)
                .map(|(id, kib)| format!("node {id} {}", mib(*kib)))
                .collect();
            format!("{} MiB", parts.join(", "))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Report
// ------------------------------------------------------------------------------------------------

fn print_table(results: &[LevelResult]) {
    println!();
    println!("complete_purchase: POST /v1/users/{{id}}/orders {{\"complete\": true}}");
    println!(
        "{:>11} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>7}  error statuses",
        "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    for r in results {
        let buckets: Vec<String> = r
            .errors_by_status
            .iter()
            .map(|(status, count)| format!("{status}×{count}"))
            .collect();
        let buckets = if buckets.is_empty() {
            "-".to_string()
        } else {
            buckets.join(", ")
        };
        println!(
            "{:>11} {:>9} {:>10.0} {:>9} {:>9} {:>10} {:>9} {:>7}  {}",
            r.concurrency,
            r.requests,
            r.throughput,
            ms(r.p50_ms),
            ms(r.p99_ms),
            ms(r.p999_ms),
            ms(r.max_ms),
            r.errors,
            buckets
        );
    }
    println!();
}

/// Cluster mode: per level, the share of forwarded requests and the peak RSS of each node.
fn print_cluster_table(results: &[LevelResult], node_count: usize) {
    println!(
        "cluster: {node_count} nodes, client connections round-robin over them; forwarded = measured \
         purchases sent to a node that did not lead the user's shard; peak RSS (VmHWM) per node over \
         each level, warm-up included"
    );
    let mut header = format!("{:>11} {:>10}", "concurrency", "forwarded");
    for id in 1..=node_count {
        header.push_str(&format!(" {:>12}", format!("node {id} MiB")));
    }
    println!("{header}  notes");
    for r in results {
        let forwarded = r
            .forwarded_share
            .map_or("-".to_string(), |share| format!("{:.1}%", share * 100.0));
        let mut line = format!("{:>11} {:>10}", r.concurrency, forwarded);
        for kib in &r.peak_rss_kib {
            line.push_str(&format!(" {:>12}", mib(*kib)));
        }
        let mut notes = Vec::new();
        if r.leaders_changed {
            notes.push("shard leaders changed during the level");
        }
        if r.peak_since_start {
            notes.push("peak RSS since start (reset refused)");
        }
        let notes = if notes.is_empty() {
            "-".to_string()
        } else {
            notes.join("; ")
        };
        println!("{line}  {notes}");
    }
    println!();
}

#[derive(Deserialize)]
struct Audit {
    ok: bool,
    shards: Vec<AuditShard>,
}

#[derive(Deserialize)]
struct AuditShard {
    orders: u64,
    #[serde(default)]
    violations: Vec<Value>,
    #[serde(default)]
    state_hash: String,
    #[serde(default)]
    last_applied: u64,
}

/// `GET /v1/admin/audit` on `base`: the audit, or why there is none.
async fn fetch_audit(client: &Client, base: &str) -> Result<Audit, String> {
    let response = client
        .get(format!("{base}/v1/admin/audit"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != StatusCode::OK {
        return Err(format!("failed with {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("unexpected body ({e}): {text}"))
}

/// Runs the server's audit and compares its order count with the purchases that succeeded.
async fn check_audit(client: &Client, base: &str, completed_total: u64) {
    eprintln!("audit: GET /v1/admin/audit…");
    let audit = match fetch_audit(client, base).await {
        Ok(audit) => audit,
        Err(e) => {
            println!("audit: {e}");
            return;
        }
    };
    println!("audit: ok = {}", audit.ok);
    for (i, shard) in audit.shards.iter().enumerate() {
        if !shard.violations.is_empty() {
            println!("audit: shard {i} violations: {:?}", shard.violations);
        }
    }
    let orders: u64 = audit.shards.iter().map(|s| s.orders).sum();
    print_consistency(orders, completed_total);
}

fn print_consistency(orders: u64, completed_total: u64) {
    if orders == completed_total {
        println!("consistency: ok ({orders} orders = {completed_total} completed purchases)");
    } else {
        println!(
            "consistency: MISMATCH: audit counts {orders} orders, clients saw {completed_total} completed purchases"
        );
    }
}

/// Cluster mode: the audit of every node must be ok, every shard's `state_hash` equal on every node, and
/// the orders counted equal the purchases that succeeded.
async fn check_cluster_audit(client: &Client, bases: &[String], completed_total: u64) {
    eprintln!("audit: GET /v1/admin/audit on every node…");
    let mut audits = Vec::new();
    for (id, base) in (1u64..).zip(bases) {
        match fetch_audit(client, base).await {
            Ok(audit) => {
                println!("audit: node {id} ok = {}", audit.ok);
                for (i, shard) in audit.shards.iter().enumerate() {
                    if !shard.violations.is_empty() {
                        println!(
                            "audit: node {id} shard {i} violations: {:?}",
                            shard.violations
                        );
                    }
                }
                audits.push((id, audit));
            }
            Err(e) => println!("audit: node {id} FAILED: {e}"),
        }
    }
    if audits.len() < bases.len() {
        println!(
            "replicas: NOT CHECKED: only {} of {} nodes answered the audit",
            audits.len(),
            bases.len()
        );
    } else {
        let shard_count = audits
            .iter()
            .map(|(_, a)| a.shards.len())
            .max()
            .unwrap_or(0);
        let mut mismatches = 0;
        for shard in 0..shard_count {
            let replicas: Vec<(u64, Option<&AuditShard>)> = audits
                .iter()
                .map(|(id, audit)| (*id, audit.shards.get(shard)))
                .collect();
            let first = replicas[0].1.map(|s| &s.state_hash);
            let equal = replicas
                .iter()
                .all(|(_, s)| s.is_some() && s.map(|s| &s.state_hash) == first);
            if !equal {
                mismatches += 1;
                let parts: Vec<String> = replicas
                    .iter()
                    .map(|(id, s)| match s {
                        Some(s) => format!(
                            "node {id} {} (last_applied {}, orders {})",
                            s.state_hash, s.last_applied, s.orders
                        ),
                        None => format!("node {id} <shard missing>"),
                    })
                    .collect();
                println!(
                    "replicas: MISMATCH: shard {shard} state_hash differs: {}",
                    parts.join("; ")
                );
            }
        }
        if mismatches == 0 {
            println!(
                "replicas: ok ({shard_count} shards, state_hash equal on all {} nodes)",
                audits.len()
            );
        } else {
            println!("replicas: MISMATCH on {mismatches} of {shard_count} shards (see above)");
        }
    }
    let Some((first_id, first)) = audits.first() else {
        println!("consistency: NOT CHECKED: no node answered the audit");
        return;
    };
    let orders: u64 = first.shards.iter().map(|s| s.orders).sum();
    for (id, audit) in &audits[1..] {
        let theirs: u64 = audit.shards.iter().map(|s| s.orders).sum();
        if theirs != orders {
            println!(
                "consistency: MISMATCH: node {first_id} counts {orders} orders, node {id} counts {theirs}"
            );
        }
    }
    print_consistency(orders, completed_total);
}
