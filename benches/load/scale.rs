//! The scale run (`SHOPKEEP_BENCH_SCALE=users,orders`, default 1,000,000 users and 10,000,000
//! orders): the purchase path on a shop that holds millions of rows, against an empty shop.
//!
//! Both shops are built by the loader (`scale_load.rs`: every row written by `apply`, no HTTP), so they
//! differ only in size: the *empty* shop holds the load's 512 users and the item, the *loaded* shop
//! `users` users (the 512 among them) and `orders` completed purchases spread over the past 30 days.
//! Each is served by one `shopkeep serve` node (release build, no `--peers`, `--node-id 1` on a fixed
//! loopback port, as the membership the loader wrote names it). Measured:
//!
//! - **load time** and **disk bytes**: the data directory's size with the catalog only, after the users,
//!   after the orders: bytes per user and per order are the *marginal* costs (the differences divided
//!   by the counts), so the empty directory's fixed size is left out;
//! - **first start to ready** (`/readyz` 200; the node verifies every page of every file at start),
//!   then until every shard has built its first snapshot: a directory written offline has none, so
//!   each shard exports its whole state right after the start; the load phases wait for that (they
//!   measure the steady state) and the time and the snapshot files' size are reported;
//! - **purchases**, closed loop at `SCALE_CONCURRENCY` clients, then the open loop at half of the
//!   *empty* shop's closed-loop throughput (the same rate on both shops): throughput and p99, with the
//!   peak RSS (`VmHWM`) over both phases. The empty shop is measured before the loaded one and again
//!   right after it (the machine's load drifts over minutes); the reference is the better of the two.
//!   Goal: throughput and p99 within 20 % of the empty shop's, peak RSS ≤ 256 MiB;
//! - **audit**: `GET /v1/admin/audit` (every row of every shard), its time, its verdict, and its order
//!   count equal to the loaded orders plus those the clients saw created, and the node's peak RSS
//!   through it (`VmHWM` read after it: the audit holds per-user sums in memory);
//! - **restart to ready**: SIGKILL, start again, time until `/readyz` answers 200;
//! - **snapshots** (`SHOPKEEP_BENCH_SCALE_CLUSTER=users,orders`, by default the run's size; `0` skips
//!   them): on the loaded shop, or on a smaller one loaded for this part alone (the loaded shop's
//!   directory removed first): nodes 2 and then 3 start on empty data
//!   directories and are added as learners (`POST /v1/admin/cluster/nodes`, which answers once the new
//!   member has caught up): node 1's log starts after the loaded state, so each new member receives a
//!   snapshot of every shard. Per member: the time of the call (build + transfer + install), the peak
//!   RSS of the sender (node 1) and of the receiver over it, and the data directories' sizes; then the
//!   audit of every node must agree (`state_hash` per shard). The nodes of this part run without a
//!   sweeper (`--sweep-interval 1d`): the loaded outcomes expire all along, and each sweep would move
//!   the applied index between the audits of the replicas.
//!
//! The directories live in a temporary directory (the system's, never the worktree) removed at the end,
//! Ctrl-C included: budget about 3 copies of the loaded directory, plus node 1's snapshot files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::audit::{audit_until, check_audit_by_shard, check_cluster_audit};
use crate::cores::CoreSpeed;
use crate::disk::DiskSync;
use crate::interrupt::{forget_interrupt, on_interrupt};
use crate::launcher::{Launch, Process};
use crate::nodes::{CLUSTER_SECRET, proc_status_kib};
use crate::results::{LevelResult, OpenLoopResult};
use crate::scale_load::{Loaded, SHARDS, dir_bytes, load};
use crate::settings::Settings;
use crate::shopkeep::Load;
use crate::stats::{ms, round2};
use crate::{ADMIN_TOKEN, HALF_PEAK, SERVICE_TOKEN, USERS};

/// Clients of the closed-loop phase (and connections of the open loop).
const SCALE_CONCURRENCY: usize = 64;
/// The goals: within this share of the empty shop, and at most this much RSS.
const WITHIN: f64 = 0.20;
const RSS_GOAL_KIB: u64 = 256 * 1024;
const READY_TIMEOUT: Duration = Duration::from_secs(1800);
/// The server's default `--snapshot-every`: a shard whose state is this many entries past its last
/// snapshot builds one.
const SNAPSHOT_EVERY: u64 = 10_000;

/// The pids of every node the scale run started, for the Ctrl-C cleanup (a restarted node is a new
/// process).
static STARTED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// One shop's measurements.
pub(crate) struct ShopRun {
    pub(crate) users: u32,
    pub(crate) orders: u64,
    pub(crate) loaded: Loaded,
    pub(crate) first_ready_s: f64,
    /// After the first start, until every shard had built its first snapshot (the loaded state is
    /// more than `SNAPSHOT_EVERY` entries past none): `None` when no shard had to.
    pub(crate) first_snapshots_s: Option<f64>,
    /// The bytes of node 1's snapshot files then.
    pub(crate) snapshot_bytes: u64,
    pub(crate) closed: LevelResult,
    pub(crate) half_peak: Option<OpenLoopResult>,
    /// The peak RSS of the node over both load phases, KiB.
    pub(crate) peak_rss_kib: Option<u64>,
    /// What a durable 4 KiB write cost right before the load phases.
    pub(crate) disk: Option<DiskSync>,
    /// What a fixed CPU loop took right before the load phases.
    pub(crate) cores: Option<CoreSpeed>,
    /// The audit of every shard, one request each (`?shard=N`), one after the other.
    pub(crate) audit_s: f64,
    /// The longest of those requests.
    pub(crate) slowest_shard_audit_s: f64,
    /// The closed loop again while the node audits its shards back to back, and the shard audits that
    /// finished meanwhile (`None`: the audits failed).
    pub(crate) during_audit: Option<(LevelResult, u64)>,
    /// The node's peak RSS from its start through the audit (the audit's own memory included), KiB.
    pub(crate) audit_rss_kib: Option<u64>,
    pub(crate) checks: Vec<(String, bool)>,
    pub(crate) restart_ready_s: Option<f64>,
    /// Orders the clients saw created (every phase, warm-ups included; the audit's check counts those
    /// before it, the 3-node part's all of them).
    pub(crate) created: u64,
}

/// A member added to the loaded node: the snapshot it received.
pub(crate) struct Join {
    pub(crate) node: u64,
    pub(crate) seconds: f64,
    pub(crate) status: u16,
    pub(crate) sender_rss_kib: Option<u64>,
    pub(crate) receiver_rss_kib: Option<u64>,
    pub(crate) receiver_bytes: u64,
    pub(crate) sender_bytes: u64,
}

pub(crate) struct ScaleReport {
    pub(crate) empty: ShopRun,
    /// The empty shop measured again after the loaded one: closed loop, open loop, peak RSS, the disk
    /// and the cores.
    pub(crate) empty_after: Measured,
    pub(crate) big: ShopRun,
    pub(crate) joins: Vec<Join>,
    pub(crate) cluster_checks: Vec<(String, bool)>,
    pub(crate) cluster_audit_s: Option<f64>,
    /// The users and orders of the 3-node part's shop (`None`: no 3-node part).
    pub(crate) cluster_size: Option<(u32, u64)>,
    /// Its load time when it is a shop of its own.
    pub(crate) cluster_load_s: Option<f64>,
}

/// A node of the scale run.
struct ScaleNode {
    id: u64,
    process: Process,
    base: String,
    listen: String,
    data: PathBuf,
    logs: PathBuf,
    peers: Option<String>,
    /// Started without a sweeper (the 3-node part).
    quiet: bool,
}

impl ScaleNode {
    fn start(
        id: u64,
        data: &Path,
        logs: &Path,
        listen: &str,
        peers: Option<String>,
        quiet: bool,
    ) -> ScaleNode {
        let (process, base) = spawn(id, data, logs, listen, peers.as_deref(), quiet);
        ScaleNode {
            id,
            process,
            base,
            listen: listen.to_string(),
            data: data.to_path_buf(),
            logs: logs.to_path_buf(),
            peers,
            quiet,
        }
    }

    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.process.pid()), "5");
    }

    fn peak_kib(&self) -> Option<u64> {
        proc_status_kib(self.process.pid(), "VmHWM")
    }

    /// SIGKILL, then the same node again: the time until `/readyz` answers 200.
    async fn kill_and_restart(&mut self, client: &Client) -> f64 {
        self.process.kill();
        let started = Instant::now();
        let (process, base) = spawn(
            self.id,
            &self.data,
            &self.logs,
            &self.listen,
            self.peers.as_deref(),
            self.quiet,
        );
        self.process = process;
        self.base = base;
        wait_ready(client, self, started).await
    }
}

fn spawn(
    id: u64,
    data: &Path,
    logs: &Path,
    listen: &str,
    peers: Option<&str>,
    quiet: bool,
) -> (Process, String) {
    let mut launch = crate::settings::for_every_server(
        Launch::new(
            data,
            listen,
            &logs.join(format!("node-{id}.stdout")),
            &logs.join(format!("node-{id}.stderr")),
        )
        .args(["--node-id", &id.to_string()]),
    );
    if let Some(peers) = peers {
        launch = launch.args(["--peers", peers]);
    }
    if quiet {
        // No sweeps: the loaded idempotency outcomes expire all along (a sweep a second or so), and the
        // replicas' audits, seconds apart, would each see another applied index.
        launch = launch.args(["--sweep-interval", "1d"]);
    }
    let mut process = launch
        .env("SHOPKEEP_CLUSTER_SECRET", CLUSTER_SECRET)
        .env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN)
        .spawn()
        .expect("cannot start the shopkeep binary");
    STARTED.lock().unwrap().push(process.pid());
    let base = process
        .wait_listening(Instant::now() + READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("scale: node {id}: {e}"));
    (process, base)
}

/// Waits until `/readyz` is 200: the seconds since `started`.
async fn wait_ready(client: &Client, node: &ScaleNode, started: Instant) -> f64 {
    let url = format!("{}/readyz", node.base);
    loop {
        if let Ok(response) = client
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            if response.status() == StatusCode::OK {
                return started.elapsed().as_secs_f64();
            }
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "scale: node {}: not ready within {READY_TIMEOUT:?}; its logs:\n{}",
            node.id,
            node.process.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every shard of `node` has a snapshot: the seconds since `started`.
async fn wait_snapshots(node: &ScaleNode, started: Instant) -> f64 {
    let built = |shard: u32| {
        node.data
            .join("snapshots")
            .join(format!("shard-{shard:03}"))
            .join("current.snap")
            .exists()
    };
    loop {
        if (0..SHARDS).all(built) {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "scale: node {}: no snapshot of every shard within {READY_TIMEOUT:?}",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    format!("127.0.0.1:{}", listener.local_addr().expect("bound").port())
}

fn client() -> Client {
    Client::builder()
        .pool_max_idle_per_host(SCALE_CONCURRENCY * 2)
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(10))
        .build()
        .expect("cannot build the HTTP client")
}

/// The scale run: the empty shop, the loaded one, then (unless switched off) its snapshots.
pub(crate) async fn run_scale(settings: &Settings, users: u32, orders: u64) -> ScaleReport {
    let root = tempfile::Builder::new()
        .prefix("shopkeep-bench-scale-")
        .tempdir()
        .expect("cannot create a temporary directory");
    let path = root.path().to_path_buf();
    let interrupt = on_interrupt(move || {
        // Every node this run started (those already gone are refused, harmlessly), then the data.
        let pids: Vec<String> = STARTED.lock().unwrap().iter().map(u32::to_string).collect();
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&path);
    });
    let client = client();

    eprintln!("scale: the empty shop ({USERS} users, 0 orders)");
    let (empty, mut empty_node) = run_shop(
        settings,
        &client,
        root.path(),
        "empty",
        USERS as u32,
        0,
        None,
    )
    .await;
    // Stopped while the loaded shop is measured; its directory (a few MiB) is kept for the rerun.
    empty_node.process.kill();
    let rate = empty.closed.stats.throughput * HALF_PEAK;

    eprintln!("scale: the loaded shop ({users} users, {orders} orders)");
    let (big, node) = run_shop(
        settings,
        &client,
        root.path(),
        "big",
        users,
        orders,
        Some(rate),
    )
    .await;
    // The empty shop again, right after: the machine's load drifts over minutes, so the loaded shop
    // is compared with the better of the empty shop's runs before and after it.
    let node = {
        let mut node = node;
        node.process.kill();
        eprintln!("scale: the empty shop again");
        empty_node.kill_and_restart(&client).await;
        let after = measure(settings, &empty_node, "empty (after)", rate).await;
        drop(empty_node);
        (node, after)
    };
    let (node, after) = node;
    let mut report = ScaleReport {
        empty,
        empty_after: after,
        big,
        joins: Vec::new(),
        cluster_checks: Vec::new(),
        cluster_audit_s: None,
        cluster_size: None,
        cluster_load_s: None,
    };
    match settings.scale_cluster {
        Some(size) if size == (users, orders) => {
            report.cluster_size = Some(size);
            // Started again (it was stopped for the empty shop's rerun), without a sweeper.
            let mut node = node;
            node.quiet = true;
            node.kill_and_restart(&client).await;
            join_members(&client, root.path(), "big", node, &mut report).await;
        }
        Some((users, orders)) => {
            // A smaller shop for the 3-node part (its 3 copies would not fit the disk at full size).
            drop(node);
            let _ = std::fs::remove_dir_all(root.path().join("big"));
            eprintln!("scale: the 3-node part's shop ({users} users, {orders} orders)");
            let data = root.path().join("cluster").join("node-1");
            let listen = free_address();
            let loaded = load_apart(&data, &listen, users, orders);
            report.cluster_size = Some((users, orders));
            report.cluster_load_s = Some(loaded.seconds);
            let node =
                ScaleNode::start(1, &data, &root.path().join("cluster"), &listen, None, true);
            wait_ready(&client, &node, Instant::now()).await;
            join_members(&client, root.path(), "cluster", node, &mut report).await;
        }
        None => drop(node),
    }
    forget_interrupt(interrupt);
    report
}

/// Loads one shop, starts its node and measures it; the node is returned still running.
async fn run_shop(
    settings: &Settings,
    client: &Client,
    root: &Path,
    name: &str,
    users: u32,
    orders: u64,
    rate: Option<f64>,
) -> (ShopRun, ScaleNode) {
    let data = root.join(name).join("node-1");
    let logs = root.join(name);
    std::fs::create_dir_all(&logs).expect("a directory");
    let listen = free_address();
    let loaded = load_apart(&data, &listen, users, orders);

    let started = Instant::now();
    let mut node = ScaleNode::start(1, &data, &logs, &listen, None, false);
    let first_ready_s = wait_ready(client, &node, started).await;
    eprintln!("scale {name}: ready {first_ready_s:.1} s after the start");
    // A directory written offline has no snapshot: each shard builds one (an export of its whole state)
    // right after the start. The load waits for them, so it measures the steady state; their time is
    // reported.
    let first_snapshots_s = if loaded.min_shard_entries >= SNAPSHOT_EVERY {
        let seconds = wait_snapshots(&node, started).await;
        eprintln!("scale {name}: every shard's first snapshot {seconds:.1} s after the start");
        Some(seconds)
    } else {
        None
    };
    let snapshot_bytes = dir_bytes(&data.join("snapshots"));

    let rate = rate.unwrap_or(0.0);
    let Measured {
        closed,
        half_peak,
        peak_rss_kib,
        mut created,
        disk,
        cores,
    } = measure(settings, &node, name, rate).await;

    let audit_started = Instant::now();
    let (checks, shard_seconds) = check_audit_by_shard(client, &node.base, orders + created).await;
    let audit_s = audit_started.elapsed().as_secs_f64();
    let slowest_shard_audit_s = shard_seconds.iter().copied().fold(0.0, f64::max);
    let audit_rss_kib = node.peak_kib();
    eprintln!(
        "scale {name}: audit in {audit_s:.1} s (slowest shard {slowest_shard_audit_s:.1} s), peak RSS through it {} MiB",
        mib(audit_rss_kib)
    );
    let (during_audit, created_while_auditing) =
        load_while_auditing(settings, client, &node, name).await;
    created += created_while_auditing;

    let restart_ready_s = if orders > 0 {
        let seconds = node.kill_and_restart(client).await;
        eprintln!("scale {name}: SIGKILL, restart: ready in {seconds:.1} s");
        Some(seconds)
    } else {
        None
    };
    let run = ShopRun {
        users,
        orders,
        loaded,
        first_ready_s,
        first_snapshots_s,
        snapshot_bytes,
        closed,
        half_peak,
        peak_rss_kib,
        disk,
        cores,
        audit_s,
        slowest_shard_audit_s,
        during_audit,
        audit_rss_kib,
        checks,
        restart_ready_s,
        created,
    };
    (run, node)
}

/// The load phases on `node`: the closed loop, then the open loop at `rate` (0: at half of the closed
/// loop's throughput). The peak RSS over both, and the orders the clients saw created.
async fn measure(settings: &Settings, node: &ScaleNode, name: &str, rate: f64) -> Measured {
    let label = format!("scale {name}");
    let (disk, cores) = tokio::task::spawn_blocking(move || {
        crate::settle(&label);
        (crate::probe_disk(&label), Some(crate::probe_cores(&label)))
    })
    .await
    .unwrap_or((None, None));
    let phases = load_on(settings, node);
    node.reset_peak();
    let (closed, mut created) = phases
        .closed_loop(None, SCALE_CONCURRENCY, Arc::new(AtomicU64::new(0)))
        .await;
    eprintln!(
        "scale {name}: c={SCALE_CONCURRENCY}: {:.0} purchases/s, p99 {} ms, {} errors",
        closed.stats.throughput,
        ms(closed.stats.p99_ms),
        closed.stats.errors
    );
    let rate = if rate > 0.0 {
        rate
    } else {
        closed.stats.throughput * HALF_PEAK
    };
    let half_peak = if rate > 0.0 {
        let (result, more) = phases
            .open_loop(rate, SCALE_CONCURRENCY, Arc::new(AtomicU64::new(0)))
            .await;
        created += more;
        eprintln!(
            "scale {name}: open loop at {rate:.0}/s: {:.0}/s achieved, p99 {} ms",
            result.stats.throughput,
            ms(result.stats.p99_ms)
        );
        Some(result)
    } else {
        None
    };
    Measured {
        closed,
        half_peak,
        peak_rss_kib: node.peak_kib(),
        created,
        disk,
        cores,
    }
}

/// What [`measure`] found: the closed loop, the open loop, the peak RSS over both, the orders the
/// clients saw created, and what a durable 4 KiB write and a fixed CPU loop cost right before.
pub(crate) struct Measured {
    pub(crate) closed: LevelResult,
    pub(crate) half_peak: Option<OpenLoopResult>,
    pub(crate) peak_rss_kib: Option<u64>,
    pub(crate) created: u64,
    pub(crate) disk: Option<DiskSync>,
    pub(crate) cores: Option<CoreSpeed>,
}

/// The closed loop again while the node audits its shards back to back: an audit reads one snapshot of
/// a shard, so purchases go on meanwhile; this measures how fast. The shard audits that finished in
/// that time come with it; and the orders the clients saw created (warm-up included).
async fn load_while_auditing(
    settings: &Settings,
    client: &Client,
    node: &ScaleNode,
    name: &str,
) -> (Option<(LevelResult, u64)>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let auditor = {
        let (client, base, stop) = (client.clone(), node.base.clone(), stop.clone());
        tokio::spawn(async move { audit_until(&client, &base, &stop).await })
    };
    let (closed, created) = load_on(settings, node)
        .closed_loop(None, SCALE_CONCURRENCY, Arc::new(AtomicU64::new(0)))
        .await;
    stop.store(true, Ordering::Relaxed);
    let during = match auditor.await.expect("the auditor panicked") {
        Ok(audits) => {
            eprintln!(
                "scale {name}: c={SCALE_CONCURRENCY} while auditing: {:.0} purchases/s, p99 {} ms ({audits} shard audits)",
                closed.stats.throughput,
                ms(closed.stats.p99_ms)
            );
            Some((closed, audits))
        }
        Err(e) => {
            eprintln!("scale {name}: the audits during the load failed: {e}");
            None
        }
    };
    (during, created)
}

/// The closed and open loops of the scale run on `node`.
fn load_on(settings: &Settings, node: &ScaleNode) -> Load {
    Load {
        bases: vec![node.base.clone()],
        warm_up: settings.warm_up,
        duration: settings.duration,
        route_to_leader: false,
    }
}

/// The loader on a thread of its own: it blocks, and runs a runtime of its own to seed the log.
fn load_apart(data: &Path, listen: &str, users: u32, orders: u64) -> Loaded {
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| load(data, listen, users, orders))
                .join()
                .expect("the loader panicked")
        })
    })
}

/// Adds nodes 2 and 3 (empty data directories) to the loaded node: each receives a snapshot of every
/// shard. Then the audit of every node.
async fn join_members(
    client: &Client,
    root: &Path,
    name: &str,
    first: ScaleNode,
    report: &mut ScaleReport,
) {
    let logs = root.join(name);
    let mut members = vec![(1u64, first.listen.clone())];
    let mut nodes = vec![first];
    for id in [2u64, 3] {
        let listen = free_address();
        members.push((id, listen.clone()));
        let peers = members
            .iter()
            .map(|(id, address)| format!("{id}={address}"))
            .collect::<Vec<_>>()
            .join(",");
        let data = logs.join(format!("node-{id}"));
        let node = ScaleNode::start(id, &data, &logs, &listen, Some(peers), true);
        nodes[0].reset_peak();
        node.reset_peak();
        eprintln!("scale: adding node {id} (snapshots of every shard)…");
        let started = Instant::now();
        let response = client
            .post(format!("{}/v1/admin/cluster/nodes", nodes[0].base))
            .bearer_auth(ADMIN_TOKEN)
            .header("Idempotency-Key", uuid::Uuid::now_v7().to_string())
            .json(&json!({"node_id": id, "address": listen}))
            .timeout(READY_TIMEOUT)
            .send()
            .await;
        let seconds = started.elapsed().as_secs_f64();
        let status = match response {
            Ok(response) => {
                let status = response.status().as_u16();
                if status != 200 {
                    eprintln!(
                        "scale: adding node {id}: {status} {}",
                        response.text().await.unwrap_or_default()
                    );
                }
                status
            }
            Err(e) => {
                eprintln!("scale: adding node {id}: {e}");
                0
            }
        };
        let join = Join {
            node: id,
            seconds,
            status,
            sender_rss_kib: nodes[0].peak_kib(),
            receiver_rss_kib: node.peak_kib(),
            receiver_bytes: dir_bytes(&data),
            sender_bytes: dir_bytes(&nodes[0].data),
        };
        eprintln!(
            "scale: node {id} added in {seconds:.1} s; peak RSS sender {} MiB, receiver {} MiB",
            mib(join.sender_rss_kib),
            mib(join.receiver_rss_kib)
        );
        report.joins.push(join);
        nodes.push(node);
    }
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let started = Instant::now();
    // The big shop's clients' orders are in it only when the 3-node part runs on it.
    let orders = match report.cluster_size {
        Some((_, orders)) if orders == report.big.orders => orders + report.big.created,
        Some((_, orders)) => orders,
        None => 0,
    };
    report.cluster_checks = check_cluster_audit(client, &bases, orders).await;
    report.cluster_audit_s = Some(started.elapsed().as_secs_f64());
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.0}", k as f64 / 1024.0))
}

fn within(loaded: f64, empty: f64, higher_is_better: bool) -> bool {
    if higher_is_better {
        loaded >= empty * (1.0 - WITHIN)
    } else {
        loaded <= empty * (1.0 + WITHIN)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// Prints the scale table and returns its JSON.
pub(crate) fn print_scale(report: &ScaleReport) -> Value {
    let (e, b) = (&report.empty, &report.big);
    let users_bytes = b.loaded.bytes_users.saturating_sub(b.loaded.bytes_empty);
    let order_bytes = b.loaded.bytes_total.saturating_sub(b.loaded.bytes_users);
    let per_user = users_bytes as f64 / f64::from(b.users.max(1));
    let per_order = order_bytes as f64 / b.orders.max(1) as f64;
    // The empty shop's reference: the better of its runs before and after the loaded shop (a mean
    // would let one disturbed run of the empty shop turn a loaded shop's FAIL into a PASS).
    let after = &report.empty_after;
    let (after_closed, after_half) = (&after.closed, &after.half_peak);
    let ref_throughput = e.closed.stats.throughput.max(after_closed.stats.throughput);
    let ref_p99 = e.closed.stats.p99_ms.min(after_closed.stats.p99_ms);
    let ref_half_p99 = match (&e.half_peak, after_half) {
        (Some(before), Some(after)) => Some(before.stats.p99_ms.min(after.stats.p99_ms)),
        _ => None,
    };
    let throughput_ok = within(b.closed.stats.throughput, ref_throughput, true);
    let p99_ok = within(b.closed.stats.p99_ms, ref_p99, false);
    let half_ok = match (ref_half_p99, &b.half_peak) {
        (Some(reference), Some(bh)) => Some(within(bh.stats.p99_ms, reference, false)),
        _ => None,
    };
    let rss_ok = b.peak_rss_kib.is_some_and(|k| k <= RSS_GOAL_KIB);

    println!();
    println!(
        "== scale: {} users, {} orders (loaded through apply in {:.0} s: users {:.0} s, orders {:.0} s, {:.0} orders/s)",
        b.users,
        b.orders,
        b.loaded.seconds,
        b.loaded.users_seconds,
        b.loaded.orders_seconds,
        b.orders as f64 / b.loaded.orders_seconds.max(1e-9)
    );
    println!(
        "disk: {:.1} MiB in all ({:.1} MiB empty); {per_user:.0} bytes per user, {per_order:.0} bytes per order (marginal)",
        b.loaded.bytes_total as f64 / 1048576.0,
        b.loaded.bytes_empty as f64 / 1048576.0
    );
    println!(
        "empty shop before / after the loaded one: {:.0} / {:.0} purchases/s, p99 {} / {} ms; open loop p99 {} / {} ms; peak RSS {} / {} MiB",
        e.closed.stats.throughput,
        after_closed.stats.throughput,
        ms(e.closed.stats.p99_ms),
        ms(after_closed.stats.p99_ms),
        e.half_peak
            .as_ref()
            .map_or("-".into(), |h| ms(h.stats.p99_ms)),
        after_half
            .as_ref()
            .map_or("-".into(), |h| ms(h.stats.p99_ms)),
        mib(e.peak_rss_kib),
        mib(after.peak_rss_kib)
    );
    let p50 = |disk: Option<DiskSync>| disk.map_or("-".into(), |d| format!("{:.0}", d.p50_us));
    println!(
        "a durable 4 KiB write right before each, p50 µs: empty shop {} / {}, loaded shop {}",
        p50(e.disk),
        p50(after.disk),
        p50(b.disk)
    );
    let loop_ms = |cores: Option<CoreSpeed>| {
        cores.map_or("-".into(), |c| {
            format!("{:.0} / {:.0}", c.alone_ms, c.together_ms)
        })
    };
    println!(
        "a fixed CPU loop right before each, ms alone / on every core at once: empty shop {}, then {}; loaded shop {}",
        loop_ms(e.cores),
        loop_ms(after.cores),
        loop_ms(b.cores)
    );
    println!(
        "{:<34} {:>14} {:>14} {:>8}",
        "", "empty (best)", "loaded shop", "goal"
    );
    let row = |label: &str, empty: String, loaded: String, goal: &str| {
        println!("{label:<34} {empty:>14} {loaded:>14} {goal:>8}");
    };
    row(
        &format!("purchases/s, c={SCALE_CONCURRENCY}"),
        format!("{ref_throughput:.0}"),
        format!("{:.0}", b.closed.stats.throughput),
        verdict(throughput_ok),
    );
    row(
        &format!("p99 ms, c={SCALE_CONCURRENCY}"),
        ms(ref_p99),
        ms(b.closed.stats.p99_ms),
        verdict(p99_ok),
    );
    if let (Some(eh), Some(bh)) = (&e.half_peak, &b.half_peak) {
        row(
            &format!("p99 ms, open loop {:.0}/s", bh.target_rate),
            ref_half_p99.map_or("-".into(), ms),
            ms(bh.stats.p99_ms),
            half_ok.map_or("", verdict),
        );
        row(
            "  achieved/s",
            format!("{:.0}", eh.stats.throughput),
            format!("{:.0}", bh.stats.throughput),
            "",
        );
    }
    row(
        "errors (closed + open)",
        (e.closed.stats.errors + e.half_peak.as_ref().map_or(0, |h| h.stats.errors)).to_string(),
        (b.closed.stats.errors + b.half_peak.as_ref().map_or(0, |h| h.stats.errors)).to_string(),
        "",
    );
    row(
        "peak RSS MiB under load",
        mib(e.peak_rss_kib),
        mib(b.peak_rss_kib),
        verdict(rss_ok),
    );
    row(
        "first start to ready, s",
        format!("{:.2}", e.first_ready_s),
        format!("{:.2}", b.first_ready_s),
        "",
    );
    row(
        "first snapshot of every shard, s",
        e.first_snapshots_s
            .map_or("-".into(), |s| format!("{s:.2}")),
        b.first_snapshots_s
            .map_or("-".into(), |s| format!("{s:.2}")),
        "",
    );
    row(
        "  snapshot files, MiB",
        format!("{:.1}", e.snapshot_bytes as f64 / 1048576.0),
        format!("{:.1}", b.snapshot_bytes as f64 / 1048576.0),
        "",
    );
    row(
        "SIGKILL + restart to ready, s",
        e.restart_ready_s.map_or("-".into(), |s| format!("{s:.2}")),
        b.restart_ready_s.map_or("-".into(), |s| format!("{s:.2}")),
        "",
    );
    row(
        "GET /v1/admin/audit, s",
        format!("{:.2}", e.audit_s),
        format!("{:.2}", b.audit_s),
        "",
    );
    row(
        "  slowest shard (one request), s",
        format!("{:.2}", e.slowest_shard_audit_s),
        format!("{:.2}", b.slowest_shard_audit_s),
        "",
    );
    row(
        "  peak RSS MiB through the audit",
        mib(e.audit_rss_kib),
        mib(b.audit_rss_kib),
        "",
    );
    let during = |run: &ShopRun, what: fn(&LevelResult) -> String| {
        run.during_audit
            .as_ref()
            .map_or("-".into(), |(l, _)| what(l))
    };
    row(
        &format!("purchases/s, c={SCALE_CONCURRENCY}, while auditing"),
        during(e, |l| format!("{:.0}", l.stats.throughput)),
        during(b, |l| format!("{:.0}", l.stats.throughput)),
        "",
    );
    row(
        &format!("p99 ms, c={SCALE_CONCURRENCY}, while auditing"),
        during(e, |l| ms(l.stats.p99_ms)),
        during(b, |l| ms(l.stats.p99_ms)),
        "",
    );
    if let Some((users, orders)) = report.cluster_size {
        println!(
            "3-node part on a shop of {users} users and {orders} orders{}:",
            report
                .cluster_load_s
                .map_or(String::new(), |s| format!(" (its own, loaded in {s:.0} s)"))
        );
    }
    for join in &report.joins {
        println!(
            "snapshot to new node {}: {:.1} s (status {}), peak RSS sender {} MiB, receiver {} MiB; data dirs: sender {:.0} MiB, receiver {:.0} MiB",
            join.node,
            join.seconds,
            join.status,
            mib(join.sender_rss_kib),
            mib(join.receiver_rss_kib),
            join.sender_bytes as f64 / 1048576.0,
            join.receiver_bytes as f64 / 1048576.0
        );
    }
    if let Some(s) = report.cluster_audit_s {
        println!("audit of the 3 nodes: {s:.1} s");
    }
    for (text, ok) in b.checks.iter().chain(&report.cluster_checks) {
        println!("  [{}] {text}", if *ok { "ok" } else { "FAILED" });
    }

    let shop = |run: &ShopRun| {
        json!({
            "users": run.users,
            "orders": run.orders,
            "load_seconds": round2(run.loaded.seconds),
            "load_users_seconds": round2(run.loaded.users_seconds),
            "load_orders_seconds": round2(run.loaded.orders_seconds),
            "bytes_empty": run.loaded.bytes_empty,
            "bytes_after_users": run.loaded.bytes_users,
            "bytes_total": run.loaded.bytes_total,
            "first_ready_seconds": round2(run.first_ready_s),
            "first_snapshots_seconds": run.first_snapshots_s.map(round2),
            "snapshot_bytes": run.snapshot_bytes,
            "closed_loop": run.closed.stats.to_json(),
            "half_peak": run.half_peak.as_ref().map(OpenLoopResult::to_json),
            "peak_rss_kib": run.peak_rss_kib,
            "disk_sync_before": run.disk.map(DiskSync::to_json),
            "cpu_loop_before": run.cores.map(CoreSpeed::to_json),
            "audit_seconds": round2(run.audit_s),
            "audit_peak_rss_kib": run.audit_rss_kib,
            "audit_slowest_shard_seconds": round2(run.slowest_shard_audit_s),
            "during_audit": run.during_audit.as_ref().map(|(l, audits)| json!({
                "throughput": round2(l.stats.throughput),
                "p99_ms": round2(l.stats.p99_ms),
                "shard_audits": audits,
            })),
            "restart_ready_seconds": run.restart_ready_s.map(round2),
            "checks": run.checks.iter().map(|(t, ok)| json!({"check": t, "ok": ok})).collect::<Vec<_>>(),
        })
    };
    json!({
        "concurrency": SCALE_CONCURRENCY,
        "empty": shop(e),
        "empty_after": {
            "closed_loop": after_closed.stats.to_json(),
            "half_peak": after_half.as_ref().map(OpenLoopResult::to_json),
            "peak_rss_kib": after.peak_rss_kib,
            "disk_sync_before": after.disk.map(DiskSync::to_json),
            "cpu_loop_before": after.cores.map(CoreSpeed::to_json),
        },
        "loaded": shop(b),
        "bytes_per_user": round2(per_user),
        "bytes_per_order": round2(per_order),
        "cluster_users": report.cluster_size.map(|(users, _)| users),
        "cluster_orders": report.cluster_size.map(|(_, orders)| orders),
        "cluster_load_seconds": report.cluster_load_s.map(round2),
        "snapshots": report.joins.iter().map(|j| json!({
            "node": j.node,
            "seconds": round2(j.seconds),
            "status": j.status,
            "sender_peak_rss_kib": j.sender_rss_kib,
            "receiver_peak_rss_kib": j.receiver_rss_kib,
            "sender_bytes": j.sender_bytes,
            "receiver_bytes": j.receiver_bytes,
        })).collect::<Vec<_>>(),
        "cluster_audit_seconds": report.cluster_audit_s.map(round2),
        "cluster_checks": report.cluster_checks.iter().map(|(t, ok)| json!({"check": t, "ok": ok})).collect::<Vec<_>>(),
        "goals": {
            "throughput_within_20_percent": throughput_ok,
            "p99_within_20_percent": p99_ok,
            "half_peak_p99_within_20_percent": half_ok,
            "peak_rss_at_most_256_mib": rss_ok,
        },
    })
}
