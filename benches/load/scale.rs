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
//! - **first start to ready** (`/readyz` 200; the node verifies every page of every file at start);
//! - **purchases**, closed loop at `SCALE_CONCURRENCY` clients, then the open loop at half of the
//!   *empty* shop's closed-loop throughput (the same rate on both shops): throughput and p99, with the
//!   peak RSS (`VmHWM`) over both phases. Goal: throughput and p99 within 20 % of the empty shop's,
//!   peak RSS ≤ 256 MiB;
//! - **audit**: `GET /v1/admin/audit` (every row of every shard), its time, its verdict, and its order
//!   count equal to the loaded orders plus those the clients saw created;
//! - **restart to ready**: SIGKILL, start again, time until `/readyz` answers 200;
//! - **snapshots** (unless `SHOPKEEP_BENCH_SCALE_CLUSTER=0`): nodes 2 and then 3 start on empty data
//!   directories and are added as learners (`POST /v1/admin/cluster/nodes`, which answers once the new
//!   member has caught up): node 1's log starts after the loaded state, so each new member receives a
//!   snapshot of every shard. Per member: the time of the call (build + transfer + install), the peak
//!   RSS of the sender (node 1) and of the receiver over it, and the data directories' sizes; then the
//!   audit of every node must agree (`state_hash` per shard).
//!
//! The directories live in a temporary directory (the system's, never the worktree) removed at the end,
//! Ctrl-C included: budget about 3 copies of the loaded directory, plus node 1's snapshot files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::audit::{check_audit, check_cluster_audit};
use crate::interrupt::{forget_interrupt, on_interrupt};
use crate::launcher::{Launch, Process};
use crate::nodes::{CLUSTER_SECRET, proc_status_kib};
use crate::results::{LevelResult, OpenLoopResult};
use crate::scale_load::{Loaded, dir_bytes, load};
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

/// One shop's measurements.
pub(crate) struct ShopRun {
    pub(crate) users: u32,
    pub(crate) orders: u64,
    pub(crate) loaded: Loaded,
    pub(crate) first_ready_s: f64,
    pub(crate) closed: LevelResult,
    pub(crate) half_peak: Option<OpenLoopResult>,
    /// The peak RSS of the node over both load phases, KiB.
    pub(crate) peak_rss_kib: Option<u64>,
    pub(crate) audit_s: f64,
    pub(crate) checks: Vec<(String, bool)>,
    pub(crate) restart_ready_s: Option<f64>,
    /// Orders the clients saw created (both phases, warm-ups included).
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
    pub(crate) big: ShopRun,
    pub(crate) joins: Vec<Join>,
    pub(crate) cluster_checks: Vec<(String, bool)>,
    pub(crate) cluster_audit_s: Option<f64>,
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
}

impl ScaleNode {
    fn start(id: u64, data: &Path, logs: &Path, listen: &str, peers: Option<String>) -> ScaleNode {
        let (process, base) = spawn(id, data, logs, listen, peers.as_deref());
        ScaleNode {
            id,
            process,
            base,
            listen: listen.to_string(),
            data: data.to_path_buf(),
            logs: logs.to_path_buf(),
            peers,
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
        );
        self.process = process;
        self.base = base;
        wait_ready(client, self, started).await
    }
}

fn spawn(id: u64, data: &Path, logs: &Path, listen: &str, peers: Option<&str>) -> (Process, String) {
    let mut launch = Launch::new(
        data,
        listen,
        &logs.join(format!("node-{id}.stdout")),
        &logs.join(format!("node-{id}.stderr")),
    )
    .args(["--node-id", &id.to_string()]);
    if let Some(peers) = peers {
        launch = launch.args(["--peers", peers]);
    }
    let mut process = launch
        .env("SHOPKEEP_CLUSTER_SECRET", CLUSTER_SECRET)
        .env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN)
        .spawn()
        .expect("cannot start the shopkeep binary");
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
        let _ = std::fs::remove_dir_all(&path);
    });
    let client = client();

    eprintln!("scale: the empty shop ({USERS} users, 0 orders)");
    let (empty, node) = run_shop(settings, &client, root.path(), "empty", USERS as u32, 0, None).await;
    drop(node);
    let _ = std::fs::remove_dir_all(root.path().join("empty"));
    let rate = empty.closed.stats.throughput * HALF_PEAK;

    eprintln!("scale: the loaded shop ({users} users, {orders} orders)");
    let (big, node) = run_shop(settings, &client, root.path(), "big", users, orders, Some(rate)).await;
    let mut report = ScaleReport {
        empty,
        big,
        joins: Vec::new(),
        cluster_checks: Vec::new(),
        cluster_audit_s: None,
    };
    if settings.scale_cluster {
        join_members(&client, root.path(), node, &mut report).await;
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
    // On a thread of its own: the loader blocks, and runs a runtime of its own to seed the log.
    let loaded = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| load(&data, &listen, users, orders))
                .join()
                .expect("the loader panicked")
        })
    });

    let started = Instant::now();
    let mut node = ScaleNode::start(1, &data, &logs, &listen, None);
    let first_ready_s = wait_ready(client, &node, started).await;
    eprintln!("scale {name}: ready {first_ready_s:.1} s after the start");

    let phases = Load {
        client: client.clone(),
        bases: vec![node.base.clone()],
        warm_up: settings.warm_up,
        duration: settings.duration,
    };
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
    let rate = rate.unwrap_or(closed.stats.throughput * HALF_PEAK);
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
    let peak_rss_kib = node.peak_kib();

    let audit_started = Instant::now();
    let checks = check_audit(client, &node.base, orders + created).await;
    let audit_s = audit_started.elapsed().as_secs_f64();
    eprintln!("scale {name}: audit in {audit_s:.1} s");

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
        closed,
        half_peak,
        peak_rss_kib,
        audit_s,
        checks,
        restart_ready_s,
        created,
    };
    (run, node)
}

/// Adds nodes 2 and 3 (empty data directories) to the loaded node: each receives a snapshot of every
/// shard. Then the audit of every node.
async fn join_members(client: &Client, root: &Path, first: ScaleNode, report: &mut ScaleReport) {
    let logs = root.join("big");
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
        let node = ScaleNode::start(id, &data, &logs, &listen, Some(peers));
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
    let orders = report.big.orders + report.big.created;
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
    let throughput_ok = within(b.closed.stats.throughput, e.closed.stats.throughput, true);
    let p99_ok = within(b.closed.stats.p99_ms, e.closed.stats.p99_ms, false);
    let half_ok = match (&e.half_peak, &b.half_peak) {
        (Some(eh), Some(bh)) => Some(within(bh.stats.p99_ms, eh.stats.p99_ms, false)),
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
        "{:<34} {:>14} {:>14} {:>8}",
        "", "empty shop", "loaded shop", "goal"
    );
    let row = |label: &str, empty: String, loaded: String, goal: &str| {
        println!("{label:<34} {empty:>14} {loaded:>14} {goal:>8}");
    };
    row(
        &format!("purchases/s, c={SCALE_CONCURRENCY}"),
        format!("{:.0}", e.closed.stats.throughput),
        format!("{:.0}", b.closed.stats.throughput),
        verdict(throughput_ok),
    );
    row(
        &format!("p99 ms, c={SCALE_CONCURRENCY}"),
        ms(e.closed.stats.p99_ms),
        ms(b.closed.stats.p99_ms),
        verdict(p99_ok),
    );
    if let (Some(eh), Some(bh)) = (&e.half_peak, &b.half_peak) {
        row(
            &format!("p99 ms, open loop {:.0}/s", bh.target_rate),
            ms(eh.stats.p99_ms),
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
            "closed_loop": run.closed.stats.to_json(),
            "half_peak": run.half_peak.as_ref().map(OpenLoopResult::to_json),
            "peak_rss_kib": run.peak_rss_kib,
            "audit_seconds": round2(run.audit_s),
            "restart_ready_seconds": run.restart_ready_s.map(round2),
            "checks": run.checks.iter().map(|(t, ok)| json!({"check": t, "ok": ok})).collect::<Vec<_>>(),
        })
    };
    json!({
        "concurrency": SCALE_CONCURRENCY,
        "empty": shop(e),
        "loaded": shop(b),
        "bytes_per_user": round2(per_user),
        "bytes_per_order": round2(per_order),
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
