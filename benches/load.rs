//! Load benchmark of the purchase path, against a PostgreSQL baseline, in one command:
//!
//! ```text
//! cargo bench --bench load
//! ```
//!
//! One after the other (never at once, on the same machine), with the same users, item and levels:
//!
//! 1. **PostgreSQL** (`pg`): a throwaway cluster from the PostgreSQL binaries on the machine (`initdb`,
//!    `pg_ctl`; `fsync = on`, `synchronous_commit = on`) runs the same purchase as ONE stored-procedure
//!    transaction (check funds, debit, order + line, posting, entitlement upsert, idempotency row:
//!    `benches/pg/schema.sql`), driven by `pgbench` (`benches/pg/*.pgbench`). Skipped with a message
//!    if the binaries are missing. Details in `benches/load/pg.rs`.
//! 2. **shopkeep, 1 node** (`1`): one `shopkeep serve` process (release build), every shard a
//!    one-voter Raft group.
//! 3. **shopkeep, 3 nodes** (`3`): three `shopkeep serve` processes on loopback forming one cluster
//!    (every shard replicated on all three, default Raft timings); the client connections are spread
//!    round-robin over the nodes as behind a load balancer, so about 2/3 of the requests reach a node
//!    that does not lead their shard and are forwarded (one hop).
//!
//! For each system, these phases (each a warm-up that is not measured, then the measured window):
//!
//! - **purchases, closed loop**, at each concurrency level (default 1, 16, 64, 256): that many
//!   clients, each with one keep-alive connection, each sending its next one-step purchase
//!   (`POST /v1/users/{id}/orders` `{"complete": true}`, one gem at 0.01, a fresh `Idempotency-Key`)
//!   as soon as the previous one is answered. Client `w` buys for users `w`, `w + c`, `w + 2c`, …
//!   (mod 512), so concurrent clients rarely contend on one wallet (pgbench's clients do the same).
//!   These levels are what the targets compare.
//! - **mix**, closed loop at one concurrency (default 64): 60 % one-step purchases, 10 % two-step
//!   purchases (create pending, then complete: one operation, both requests), 10 % direct credits,
//!   10 % full refunds of an earlier order of the same client, 10 % wallet reads; per kind of operation.
//! - **half peak, open loop**: purchases sent at a fixed rate of 50 % of the system's best closed-loop
//!   throughput, Poisson arrivals, over as many connections as that best level had (the pool size at
//!   which the system peaked); every latency is measured from the request's *intended* send time, so
//!   a stall delays (and counts against) every request scheduled behind it (no coordinated omission).
//!   This is the "p99 at half of the peak" target; closed-loop p99 at high concurrency measures
//!   queueing instead. PostgreSQL gets the same through `pgbench --rate` (which measures from the
//!   scheduled start as well, on one schedule per pgbench thread shared by its clients).
//!
//! Reported per phase: completed operations per second, p50 / p99 / p99.9 / max latency (over the
//! successful operations started in the measured window), errors (anything but the expected answer:
//! the status code, `timeout` or `transport`) with 429/503 — deliberate backpressure — counted
//! apart, and the peak memory: per shopkeep node its peak RSS (`VmHWM`, reset through
//! `/proc/<pid>/clear_refs` before each phase, warm-up included); for PostgreSQL the sampled peak of
//! the summed `Pss` of all its processes. After each shopkeep system, `GET /v1/admin/audit` on every
//! node: the audit must be ok, every shard's `state_hash` equal on every node, and the orders counted
//! equal to the orders the clients saw created; PostgreSQL gets a ledger check in SQL.
//!
//! Output: progress on stderr (a one-line bar on a terminal); on stdout a table per system, a ratio
//! table (shopkeep / PostgreSQL, per level and at the best level of each), the targets with PASS /
//! FAIL, and one JSON document (one line), also written pretty to `target/bench/load.json`; the plot
//! `target/bench/load.png` (throughput and p99 against concurrency, log scale, all systems). The
//! default run takes about 2 minutes after the build (18 phases of 6 s, plus starts, seeding and
//! audits).
//!
//! Settings (environment):
//!
//! - `SHOPKEEP_BENCH_SYSTEMS` — which systems, in order: `pg,1,3` (default); a number is a shopkeep
//!   cluster of that many nodes (1 = single node). `SHOPKEEP_BENCH_NODES=n` alone (the older setting)
//!   means `SHOPKEEP_BENCH_SYSTEMS=n`.
//! - `SHOPKEEP_BENCH_CONCURRENCY` — the closed-loop levels (default `1,16,64,256`).
//! - `SHOPKEEP_BENCH_SECONDS` — measured seconds per phase (default 5); `SHOPKEEP_BENCH_WARMUP`
//!   — warm-up seconds before each (default 1). pgbench runs whole seconds.
//! - `SHOPKEEP_BENCH_MIX` — concurrency of the mix (default 64; 0 skips it).
//! - `SHOPKEEP_BENCH_OPEN_LOOP` — connections of the half-peak phase: `best` (default: the
//!   concurrency of the system's best level), a number, or 0 to skip the phase.
//! - `SHOPKEEP_BENCH_PG_BIN` — the directory of `initdb`, `pg_ctl`, `pgbench`, `psql` (default:
//!   `/usr/local/bin`, `/usr/lib/postgresql/<newest>/bin`, `PATH`).
//! - `SHOPKEEP_BENCH_OUT` — where `load.json` and `load.png` go (default `target/bench`).
//!
//! ```text
//! SHOPKEEP_BENCH_SYSTEMS=1 SHOPKEEP_BENCH_SECONDS=3 cargo bench --bench load
//! SHOPKEEP_BENCH_NODES=3 SHOPKEEP_BENCH_CONCURRENCY=16,64 cargo bench --bench load
//! ```
//!
//! Keep in mind that the servers and the load generator share the machine's cores (the HTTP client
//! here costs more CPU per request than pgbench does per transaction), so absolute numbers depend on
//! the machine; the ratios are the point. All processes are stopped and their directories removed
//! when the benchmark ends, panics and Ctrl-C included.

#[path = "load/pg.rs"]
mod pg;
#[path = "load/plot.rs"]
mod plot;

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tempfile::TempDir;
use uuid::Uuid;

const ADMIN_TOKEN: &str = "bench-admin-token-5c1e0a9b8d7f6e5d4c3b";
const SERVICE_TOKEN: &str = "bench-service-token-9e8d7c6b5a4f3e2d1c0b";
/// The shared node-to-node secret of the cluster mode.
const CLUSTER_SECRET: &str = "bench-cluster-secret-3f0c9a71d2b84e65";
/// Enough users that concurrent workers rarely buy for the same one (and so rarely contend on a wallet).
const USERS: usize = 512;
/// Every user's starting credit, in minor units (100,000.00).
const CREDIT_MINOR: u64 = 10_000_000;
/// How many seeding requests are in flight at once.
const SEED_PARALLELISM: usize = 32;
const DEFAULT_CONCURRENCY: &[usize] = &[1, 16, 64, 256];
const DEFAULT_SECONDS: f64 = 5.0;
const DEFAULT_WARM_UP: f64 = 1.0;
const DEFAULT_MIX_CONCURRENCY: usize = 64;
/// The open-loop phase's rate, as a share of the best closed-loop throughput.
const HALF_PEAK: f64 = 0.5;
/// How long to wait for the servers to print their listening lines.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait, after the listening lines, until `/readyz` is 200 on every node of a cluster.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const ORDER_BODY: &str = r#"{"lines":[{"item_id":"gems","quantity":1}],"complete":true}"#;
const PENDING_ORDER_BODY: &str = r#"{"lines":[{"item_id":"gems","quantity":1}],"complete":false}"#;

// The targets of the issue (shopkeep / PostgreSQL at the best concurrency of each).
const TARGET_RATIO_1: f64 = 3.0;
const TARGET_RATIO_3: f64 = 1.5;
const TARGET_HALF_PEAK_P99_MS: f64 = 20.0;
const TARGET_RSS_MIB: f64 = 256.0;

fn main() {
    let started = Instant::now();
    let settings = Settings::from_env();
    let progress = Progress::new(settings.systems.len() * settings.phases_per_system());
    eprintln!(
        "load benchmark: systems {}, levels {:?}, {:.1?} measured + {:.1?} warm-up per phase, \
         mix at c={}, {}",
        settings
            .systems
            .iter()
            .map(System::label)
            .collect::<Vec<_>>()
            .join(" → "),
        settings.levels,
        settings.duration,
        settings.warm_up,
        settings.mix_concurrency,
        settings.open_loop.describe()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    runtime.spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: stopping the servers, removing their directories");
            run_interrupt_cleanups();
            std::process::exit(130);
        }
    });
    let mut reports = Vec::new();
    for &system in &settings.systems {
        let cpu_before = CpuSample::take();
        let mut report = match system {
            System::Postgres => run_postgres(&settings, &progress),
            System::Shopkeep(count) => {
                let spawned = Instant::now();
                let nodes = Nodes::start(count);
                for node in &nodes.nodes {
                    eprintln!(
                        "{}: node {} listening on {} (pid {})",
                        system.label(),
                        node.id,
                        node.base_url,
                        node.child.id()
                    );
                }
                let report = runtime.block_on(drive_shopkeep(
                    system, &nodes, &settings, &progress, spawned,
                ));
                // Stops the nodes (and removes their data) before the next system starts.
                drop(nodes);
                report
            }
        };
        report.cpu = cpu_before.and_then(|before| before.share_since(report.server_cpu_seconds));
        reports.push(report);
    }
    drop(runtime);

    let wall = started.elapsed();
    print_report(&settings, &reports, wall);
}

// ------------------------------------------------------------------------------------------------
// Interruption
// ------------------------------------------------------------------------------------------------

type Cleanup = Box<dyn FnOnce() + Send>;

/// What to undo if the run is interrupted (Ctrl-C): drop guards do not run when a signal ends the
/// process, and the PostgreSQL server (which `pg_ctl` starts in a session of its own) would not even
/// see the terminal's Ctrl-C.
static CLEANUPS: Mutex<Vec<(u64, Cleanup)>> = Mutex::new(Vec::new());
static NEXT_CLEANUP: AtomicU64 = AtomicU64::new(1);

/// Registers `cleanup` to run on Ctrl-C; the token forgets it again.
fn on_interrupt(cleanup: impl FnOnce() + Send + 'static) -> u64 {
    let token = NEXT_CLEANUP.fetch_add(1, Ordering::Relaxed);
    CLEANUPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((token, Box::new(cleanup)));
    token
}

fn forget_interrupt(token: u64) {
    CLEANUPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(t, _)| *t != token);
}

fn run_interrupt_cleanups() {
    let cleanups = std::mem::take(&mut *CLEANUPS.lock().unwrap_or_else(|p| p.into_inner()));
    for (_, cleanup) in cleanups {
        cleanup();
    }
}

// ------------------------------------------------------------------------------------------------
// Settings
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Postgres,
    /// A shopkeep deployment of this many nodes (1: single node, no `--peers`).
    Shopkeep(u64),
}

impl System {
    fn key(&self) -> String {
        match self {
            System::Postgres => "postgresql".into(),
            System::Shopkeep(n) => format!("shopkeep-{n}"),
        }
    }

    fn label(&self) -> String {
        match self {
            System::Postgres => "PostgreSQL".into(),
            System::Shopkeep(1) => "shopkeep 1 node".into(),
            System::Shopkeep(n) => format!("shopkeep {n} nodes"),
        }
    }
}

struct Settings {
    systems: Vec<System>,
    levels: Vec<usize>,
    duration: Duration,
    warm_up: Duration,
    /// 0: no mix phase.
    mix_concurrency: usize,
    /// The connections of the open-loop phase.
    open_loop: OpenLoop,
    out_dir: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            systems: systems(),
            levels: concurrency_levels(),
            duration: seconds_setting("SHOPKEEP_BENCH_SECONDS", DEFAULT_SECONDS, false),
            warm_up: seconds_setting("SHOPKEEP_BENCH_WARMUP", DEFAULT_WARM_UP, true),
            mix_concurrency: count_setting("SHOPKEEP_BENCH_MIX", DEFAULT_MIX_CONCURRENCY),
            open_loop: open_loop_setting(),
            out_dir: out_dir(),
        }
    }

    fn phases_per_system(&self) -> usize {
        self.levels.len()
            + usize::from(self.mix_concurrency > 0)
            + usize::from(self.open_loop != OpenLoop::Off)
    }

    fn phase_time(&self) -> Duration {
        self.warm_up + self.duration
    }

    fn max_connections(&self) -> usize {
        self.levels
            .iter()
            .copied()
            .chain([self.mix_concurrency, self.open_loop.fixed().unwrap_or(0)])
            .max()
            .unwrap_or(1)
            .max(1)
    }
}

/// How many connections the open-loop phase sends over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpenLoop {
    Off,
    /// As many as the concurrency of the system's best closed-loop level: the pool size at which it
    /// peaked (for PostgreSQL, what a connection pool in front of it would hold).
    Best,
    Fixed(usize),
}

impl OpenLoop {
    fn fixed(self) -> Option<usize> {
        match self {
            OpenLoop::Fixed(n) => Some(n),
            _ => None,
        }
    }

    fn connections(self, best: &LevelResult) -> usize {
        self.fixed().unwrap_or(best.concurrency)
    }

    fn describe(self) -> String {
        match self {
            OpenLoop::Off => "no half-peak phase".into(),
            OpenLoop::Best => "half peak over as many connections as the best level".into(),
            OpenLoop::Fixed(n) => format!("half peak over {n} connections"),
        }
    }
}

/// `SHOPKEEP_BENCH_OPEN_LOOP`: `best` (default), a number of connections, or 0 (off).
fn open_loop_setting() -> OpenLoop {
    match env_text("SHOPKEEP_BENCH_OPEN_LOOP")
        .as_deref()
        .map(str::trim)
    {
        None | Some("best") => OpenLoop::Best,
        Some(text) => match text.parse::<usize>() {
            Ok(0) => OpenLoop::Off,
            Ok(n) => OpenLoop::Fixed(n),
            Err(_) => panic!(
                "SHOPKEEP_BENCH_OPEN_LOOP: {text:?} is neither `best` nor a number of connections (0 skips the phase)"
            ),
        },
    }
}

fn env_text(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|t| !t.trim().is_empty())
}

/// `SHOPKEEP_BENCH_SYSTEMS` (`pg,1,3`), else `SHOPKEEP_BENCH_NODES` (one shopkeep system), else all.
fn systems() -> Vec<System> {
    let text = match (
        env_text("SHOPKEEP_BENCH_SYSTEMS"),
        env_text("SHOPKEEP_BENCH_NODES"),
    ) {
        (Some(systems), _) => systems,
        (None, Some(nodes)) => nodes,
        (None, None) => "pg,1,3".to_string(),
    };
    let systems: Vec<System> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.to_ascii_lowercase().as_str() {
            "pg" | "postgres" | "postgresql" => System::Postgres,
            n => match n.parse::<u64>() {
                Ok(n) if (1..=9).contains(&n) => System::Shopkeep(n),
                _ => panic!(
                    "SHOPKEEP_BENCH_SYSTEMS / SHOPKEEP_BENCH_NODES: {s:?} is neither `pg` nor a number \
                     of shopkeep nodes from 1 to 9 (e.g. pg,1,3)"
                ),
            },
        })
        .collect();
    assert!(
        !systems.is_empty(),
        "SHOPKEEP_BENCH_SYSTEMS lists no system (expected e.g. pg,1,3)"
    );
    systems
}

fn concurrency_levels() -> Vec<usize> {
    let Some(text) = env_text("SHOPKEEP_BENCH_CONCURRENCY") else {
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

fn seconds_setting(name: &str, default: f64, zero_ok: bool) -> Duration {
    let Some(text) = env_text(name) else {
        return Duration::from_secs_f64(default);
    };
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (s > 0.0 || (zero_ok && s == 0.0)) => Duration::from_secs_f64(s),
        _ => panic!("{name}: {text:?} is not a positive number of seconds"),
    }
}

fn count_setting(name: &str, default: usize) -> usize {
    let Some(text) = env_text(name) else {
        return default;
    };
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name}: {text:?} is not a number (0 skips the phase)"))
}

/// `SHOPKEEP_BENCH_OUT`, else `<target dir>/bench` (the bench binary is `<target>/<profile>/deps/…`).
fn out_dir() -> PathBuf {
    if let Some(dir) = env_text("SHOPKEEP_BENCH_OUT") {
        return PathBuf::from(dir);
    }
    let target = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        (deps.file_name()? == "deps").then(|| deps.parent()?.parent().map(Path::to_path_buf))?
    });
    target
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench")
}

// ------------------------------------------------------------------------------------------------
// Progress
// ------------------------------------------------------------------------------------------------

/// The progress of the whole run on stderr: one bar for the phase under way (on a terminal; one line
/// per phase otherwise).
struct Progress {
    total: usize,
    done: Cell<usize>,
    tty: bool,
    started: Instant,
}

/// One phase under way: `ops` counts the operations so far (the bar shows it). Clears its bar on drop.
struct Phase {
    ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            done: Cell::new(0),
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    /// Counts `phases` phases that will not run (a system that was skipped).
    fn skip(&self, phases: usize) {
        self.done.set(self.done.get() + phases);
    }

    fn phase(&self, system: &str, what: &str, planned: Duration) -> Phase {
        let index = self.done.get() + 1;
        self.done.set(index);
        let header = format!("[{index}/{}] {system}: {what}", self.total);
        let ops = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        if !self.tty {
            eprintln!(
                "{header}: {:.1} s… ({:.0} s since the start)",
                planned.as_secs_f64(),
                self.started.elapsed().as_secs_f64()
            );
            return Phase {
                ops,
                stop,
                thread: None,
            };
        }
        let (ops_seen, stop_seen) = (ops.clone(), stop.clone());
        let run_started = self.started;
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            const WIDTH: usize = 30;
            while !stop_seen.load(Ordering::Relaxed) {
                let elapsed = started.elapsed().as_secs_f64();
                let filled =
                    ((elapsed / planned.as_secs_f64().max(1e-3)).min(1.0) * WIDTH as f64) as usize;
                let bar: String = (0..WIDTH)
                    .map(|i| if i < filled { '#' } else { '.' })
                    .collect();
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[2K{header} [{bar}] {elapsed:.1}/{:.1} s, {} ops (total {:.0} s)",
                    planned.as_secs_f64(),
                    ops_seen.load(Ordering::Relaxed),
                    run_started.elapsed().as_secs_f64()
                );
                let _ = err.flush();
                drop(err);
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        });
        Phase {
            ops,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Statistics
// ------------------------------------------------------------------------------------------------

/// The raw outcomes of one kind of operation over a measured window.
#[derive(Default)]
struct Tally {
    /// Latency of each successful operation, in microseconds.
    latencies_us: Vec<u64>,
    /// Failed operations by bucket: the status code ("409", "503", …), "timeout", "transport", ….
    failures: BTreeMap<String, u64>,
}

impl Tally {
    fn record(&mut self, outcome: &Result<(), String>, latency: Duration) {
        match outcome {
            Ok(()) => self.latencies_us.push(micros(latency)),
            Err(bucket) => *self.failures.entry(bucket.clone()).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (bucket, count) in other.failures {
            *self.failures.entry(bucket).or_default() += count;
        }
    }
}

/// 429 and 503 are the deliberate backpressure of the server (full queue, no leader yet).
fn is_backpressure(bucket: &str) -> bool {
    bucket == "429" || bucket == "503"
}

/// The summary of a tally: successful operations per second and their latency percentiles.
#[derive(Clone, Debug, Default)]
struct Stats {
    ops: u64,
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// Failures other than backpressure.
    errors: u64,
    /// 429 and 503 answers.
    backpressure: u64,
    by_status: BTreeMap<String, u64>,
}

impl Stats {
    fn from_tally(mut tally: Tally, elapsed_secs: f64) -> Stats {
        tally.latencies_us.sort_unstable();
        let sorted = &tally.latencies_us;
        let ops = sorted.len() as u64;
        let mut stats = Stats {
            ops,
            throughput: ops as f64 / elapsed_secs.max(1e-9),
            p50_ms: percentile_ms(sorted, 0.50),
            p99_ms: percentile_ms(sorted, 0.99),
            p999_ms: percentile_ms(sorted, 0.999),
            max_ms: sorted.last().map_or(f64::NAN, |&us| us as f64 / 1000.0),
            ..Stats::default()
        };
        for (bucket, count) in tally.failures {
            stats.add_failures(&bucket, count);
        }
        stats
    }

    fn add_failures(&mut self, bucket: &str, count: u64) {
        if is_backpressure(bucket) {
            self.backpressure += count;
        } else {
            self.errors += count;
        }
        *self.by_status.entry(bucket.to_string()).or_default() += count;
    }

    /// Moves `count` operations that were counted as successes to the failures (PostgreSQL: a
    /// function that answered a business rejection is a successful transaction to pgbench).
    fn reclassify(&mut self, bucket: &str, count: u64) {
        if count == 0 {
            return;
        }
        let moved = count.min(self.ops);
        if self.ops > 0 {
            self.throughput *= (self.ops - moved) as f64 / self.ops as f64;
        }
        self.ops -= moved;
        self.add_failures(bucket, count);
    }

    fn statuses_text(&self) -> String {
        if self.by_status.is_empty() {
            return "-".into();
        }
        self.by_status
            .iter()
            .map(|(status, count)| format!("{status}×{count}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn to_json(&self) -> Value {
        json!({
            "ops": self.ops,
            "throughput_ops": round2(self.throughput),
            "p50_ms": round2(self.p50_ms),
            "p99_ms": round2(self.p99_ms),
            "p999_ms": round2(self.p999_ms),
            "max_ms": round2(self.max_ms),
            "errors": self.errors,
            "backpressure_429_503": self.backpressure,
            "by_status": self.by_status,
        })
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

/// A latency for the tables: two decimals, rounded as in the JSON.
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

// ------------------------------------------------------------------------------------------------
// CPU accounting: was the machine quiet?
// ------------------------------------------------------------------------------------------------

/// More CPU than this (in cores, on average) used by processes other than the benchmark, its
/// servers and the kernel (or stolen by the hypervisor) makes the report say that its figures are
/// unreliable.
const OTHER_CPU_WARNING: f64 = 0.25;
/// Linux's USER_HZ: the unit of `/proc/stat` and `/proc/<pid>/stat` times (100 on every common
/// architecture).
const CLOCK_TICKS: f64 = 100.0;

/// The machine's CPU time by kind, and this process's (threads and waited-for children included).
struct CpuSample {
    at: Instant,
    machine: MachineCpu,
    ours: f64,
    kernel_threads: f64,
}

/// Who used the CPU during a system's run, in cores on average.
struct CpuShare {
    wall_seconds: f64,
    /// The benchmark, its servers and its tools.
    ours_cores: f64,
    /// Interrupts, soft interrupts (loopback networking, block I/O completions) and kernel threads
    /// (writeback, the journal): mostly work done for the benchmark.
    kernel_cores: f64,
    /// Every other process on the machine, plus the time the hypervisor gave to other guests
    /// (steal): what makes the figures unreliable.
    other_cores: f64,
    cores: usize,
}

impl CpuSample {
    fn take() -> Option<CpuSample> {
        Some(CpuSample {
            at: Instant::now(),
            machine: MachineCpu::read()?,
            ours: process_cpu_seconds("self", true)?,
            kernel_threads: kernel_threads_cpu_seconds(),
        })
    }

    /// The share since this sample; `servers`: CPU seconds of servers that are not our children
    /// (they are not in our children's times). Call after the system's processes were waited for.
    fn share_since(&self, servers: f64) -> Option<CpuShare> {
        let now = CpuSample::take()?;
        let wall = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let ours = now.ours - self.ours + servers;
        let kernel_threads = (now.kernel_threads - self.kernel_threads).max(0.0);
        let kernel = now.machine.interrupts - self.machine.interrupts + kernel_threads;
        let processes = now.machine.processes - self.machine.processes;
        let other =
            (processes - ours - kernel_threads).max(0.0) + now.machine.steal - self.machine.steal;
        Some(CpuShare {
            wall_seconds: wall,
            ours_cores: ours / wall,
            kernel_cores: kernel / wall,
            other_cores: other / wall,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        })
    }
}

/// The machine's CPU seconds, all cores (`/proc/stat`).
struct MachineCpu {
    /// user + nice + system: time charged to processes and kernel threads.
    processes: f64,
    /// irq + softirq: charged to no process.
    interrupts: f64,
    /// Taken by the hypervisor for other guests.
    steal: f64,
}

impl MachineCpu {
    fn read() -> Option<MachineCpu> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let f: Vec<f64> = text
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / CLOCK_TICKS;
        Some(MachineCpu {
            processes: at(0) + at(1) + at(2),
            interrupts: at(5) + at(6),
            steal: at(7),
        })
    }
}

/// CPU seconds of the kernel's threads (`kthreadd`, pid 2, and its children).
fn kernel_threads_cpu_seconds() -> f64 {
    children_of(2)
        .into_iter()
        .chain([2])
        .filter_map(|pid| process_cpu_seconds(&pid.to_string(), false))
        .sum()
}

/// User + system CPU seconds of `pid` (`self` for this process), plus those of its waited-for
/// children if `children`.
fn process_cpu_seconds(pid: &str, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) start after the last ')': state is
    // the first of them, utime the 12th, stime, cutime, cstime the next.
    let fields: Vec<f64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse().ok())
        .collect();
    let own = fields.first()? + fields.get(1)?;
    let waited = if children {
        fields.get(2)? + fields.get(3)?
    } else {
        0.0
    };
    Some((own + waited) / CLOCK_TICKS)
}

/// The processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Peak memory for a table cell: `52.3` or, one per node, `52.3/49.8/50.1`.
fn memory_text(peaks: &[Option<u64>]) -> String {
    if peaks.is_empty() {
        return "-".into();
    }
    peaks
        .iter()
        .map(|kib| mib(*kib))
        .collect::<Vec<_>>()
        .join("/")
}

/// Results of one system: every phase, the checks, or why it was skipped.
struct SystemReport {
    system: System,
    /// What the memory figures are.
    memory_label: &'static str,
    levels: Vec<LevelResult>,
    mix: Option<MixResult>,
    half_peak: Option<OpenLoopResult>,
    /// (what, ok) lines of the audit / ledger checks.
    checks: Vec<(String, bool)>,
    skipped: Option<String>,
    /// Remarks for the report (pgbench's complaints, leader changes, …).
    notes: Vec<String>,
    /// CPU time of servers not started as this process's children (PostgreSQL's), seconds.
    server_cpu_seconds: f64,
    /// Who used the CPU during the system's run.
    cpu: Option<CpuShare>,
}

impl SystemReport {
    fn new(system: System) -> SystemReport {
        SystemReport {
            system,
            memory_label: match system {
                System::Postgres => "peak Σ PSS of all postgres processes, MiB",
                System::Shopkeep(1) => "peak RSS (VmHWM), MiB",
                System::Shopkeep(_) => "peak RSS (VmHWM) per node, MiB (node 1/2/3)",
            },
            levels: Vec::new(),
            mix: None,
            half_peak: None,
            checks: Vec::new(),
            skipped: None,
            server_cpu_seconds: 0.0,
            cpu: None,
            notes: Vec::new(),
        }
    }

    /// The closed-loop level with the highest throughput.
    fn best(&self) -> Option<&LevelResult> {
        self.levels
            .iter()
            .filter(|l| l.stats.throughput.is_finite())
            .max_by(|a, b| a.stats.throughput.total_cmp(&b.stats.throughput))
    }

    /// The highest memory figure of any node over every phase, KiB.
    fn peak_memory_kib(&self) -> Option<u64> {
        self.levels
            .iter()
            .map(|l| &l.peak_rss_kib)
            .chain(self.mix.iter().map(|m| &m.peak_rss_kib))
            .chain(self.half_peak.iter().map(|h| &h.peak_rss_kib))
            .flatten()
            .flatten()
            .copied()
            .max()
    }

    /// Errors other than 429/503 over every phase.
    fn errors(&self) -> u64 {
        self.levels.iter().map(|l| l.stats.errors).sum::<u64>()
            + self.mix.as_ref().map_or(0, |m| m.total.errors)
            + self.half_peak.as_ref().map_or(0, |h| h.stats.errors)
    }
}

/// One closed-loop level of one-step purchases.
struct LevelResult {
    concurrency: usize,
    stats: Stats,
    /// Cluster mode: the share of measured requests sent to a node that did not lead their shard.
    forwarded_share: Option<f64>,
    /// Cluster mode: a shard's leader changed between the start and the end of the level.
    leaders_changed: bool,
    /// Peak memory of each node over the phase, KiB (`None`: unreadable).
    peak_rss_kib: Vec<Option<u64>>,
    /// The peak could not be reset before the phase: it is the peak since the node started.
    peak_since_start: bool,
}

impl LevelResult {
    fn to_json(&self) -> Value {
        let mut value = self.stats.to_json();
        value["concurrency"] = json!(self.concurrency);
        value["peak_memory_kib"] = json!(self.peak_rss_kib);
        if let Some(share) = self.forwarded_share {
            value["forwarded_pct"] = round2(share * 100.0);
            value["leaders_changed"] = json!(self.leaders_changed);
        }
        if self.peak_since_start {
            value["peak_memory_since_start"] = json!(true);
        }
        value
    }
}

/// The mixed workload: per kind of operation, and all together.
struct MixResult {
    concurrency: usize,
    total: Stats,
    kinds: Vec<(&'static str, Stats)>,
    peak_rss_kib: Vec<Option<u64>>,
}

impl MixResult {
    fn to_json(&self) -> Value {
        let mut kinds = serde_json::Map::new();
        for (kind, stats) in &self.kinds {
            kinds.insert(kind.to_string(), stats.to_json());
        }
        json!({
            "concurrency": self.concurrency,
            "total": self.total.to_json(),
            "kinds": kinds,
            "peak_memory_kib": self.peak_rss_kib,
        })
    }
}

/// The open-loop phase at half the peak throughput.
struct OpenLoopResult {
    connections: usize,
    /// The intended rate (operations per second).
    target_rate: f64,
    /// Latencies measured from the intended send times; `throughput` is the achieved rate.
    stats: Stats,
    peak_rss_kib: Vec<Option<u64>>,
}

impl OpenLoopResult {
    fn to_json(&self) -> Value {
        let mut value = self.stats.to_json();
        value["connections"] = json!(self.connections);
        value["target_rate"] = round2(self.target_rate);
        value["achieved_rate"] = round2(self.stats.throughput);
        value["peak_memory_kib"] = json!(self.peak_rss_kib);
        value
    }
}

/// Kinds of operations of the mix, in the order of the tables.
const MIX_KINDS: [&str; 5] = ["purchase", "two_step", "credit", "refund", "read"];

// ------------------------------------------------------------------------------------------------
// PostgreSQL
// ------------------------------------------------------------------------------------------------

/// The PostgreSQL baseline: every phase through pgbench (see `load/pg.rs`).
fn run_postgres(settings: &Settings, progress: &Progress) -> SystemReport {
    let mut report = SystemReport::new(System::Postgres);
    let label = System::Postgres.label();
    let skip = |report: &mut SystemReport, why: String| {
        eprintln!("PostgreSQL baseline SKIPPED: {why}");
        progress.skip(settings.phases_per_system());
        report.skipped = Some(why);
    };
    let bins = match pg::find_bins() {
        Ok(bins) => bins,
        Err(e) => {
            skip(&mut report, e);
            return report;
        }
    };
    eprintln!("{label}: initdb, start (fsync on, synchronous_commit on), schema, seed…");
    let server =
        match pg::PgServer::start(bins, settings.max_connections() + 10, USERS, CREDIT_MINOR) {
            Ok(server) => server,
            Err(e) => {
                skip(&mut report, e);
                return report;
            }
        };
    let seconds = settings.phase_time().as_secs_f64();
    // pgbench's -T is whole seconds: the warm-up absorbs the rounding.
    let warm_up = Duration::from_secs_f64(seconds.ceil() - settings.duration.as_secs_f64());
    let failed = |report: &mut SystemReport, what: &str, e: String| {
        eprintln!("{label}: {what}: {e}");
        report.notes.push(format!("{what}: {e}"));
    };

    // Rejections stored under idempotency keys during a run, by kind: (kind, status) → count.
    let rejections_during = |before: &BTreeMap<(String, String), u64>| {
        let after = server.rejections().unwrap_or_default();
        let mut new = BTreeMap::new();
        for (key, count) in after {
            let old = before.get(&key).copied().unwrap_or(0);
            if count > old {
                new.insert(key, count - old);
            }
        }
        new
    };

    for &concurrency in &settings.levels {
        let phase = progress.phase(
            &label,
            &format!("purchases, c={concurrency}"),
            settings.phase_time(),
        );
        let before = server.rejections().unwrap_or_default();
        let run = server.pgbench(
            &format!("c{concurrency}"),
            concurrency,
            seconds,
            None,
            &[("purchase.pgbench", 1)],
            &phase,
        );
        drop(phase);
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                failed(&mut report, &format!("purchases c={concurrency}"), e);
                continue;
            }
        };
        let (tallies, elapsed) = run.measured(warm_up, settings.duration, 1);
        let tally = tallies.into_iter().next().unwrap_or_default();
        let mut stats = Stats::from_tally(tally, elapsed);
        pg::add_failures(&mut stats, &run);
        for ((_, status), count) in rejections_during(&before) {
            stats.reclassify(&status, count);
        }
        report
            .notes
            .extend(run.problems.iter().map(|p| format!("c={concurrency}: {p}")));
        eprintln!(
            "{label}: c={concurrency}: {:.0} purchases/s, p99 {} ms, {} errors",
            stats.throughput,
            ms(stats.p99_ms),
            stats.errors
        );
        report.levels.push(LevelResult {
            concurrency,
            stats,
            forwarded_share: None,
            leaders_changed: false,
            peak_rss_kib: vec![run.peak_pss_kib],
            peak_since_start: false,
        });
    }

    if settings.mix_concurrency > 0 {
        let concurrency = settings.mix_concurrency;
        let phase = progress.phase(
            &label,
            &format!("mix, c={concurrency}"),
            settings.phase_time(),
        );
        let before = server.rejections().unwrap_or_default();
        let scripts: Vec<(&str, u32)> = pg::MIX.iter().map(|(_, name, _, w)| (*name, *w)).collect();
        let run = server.pgbench("mix", concurrency, seconds, None, &scripts, &phase);
        drop(phase);
        match run {
            Ok(run) => {
                let (tallies, elapsed) = run.measured(warm_up, settings.duration, pg::MIX.len());
                let rejected = rejections_during(&before);
                let mut total = Tally::default();
                let mut kinds = Vec::new();
                for ((kind, ..), tally) in pg::MIX.iter().zip(tallies) {
                    let mut stats = Stats::from_tally(
                        Tally {
                            latencies_us: tally.latencies_us.clone(),
                            failures: BTreeMap::new(),
                        },
                        elapsed,
                    );
                    for ((k, status), count) in &rejected {
                        if k == kind {
                            stats.reclassify(status, *count);
                        }
                    }
                    total.merge(tally);
                    kinds.push((*kind, stats));
                }
                let mut total = Stats::from_tally(total, elapsed);
                pg::add_failures(&mut total, &run);
                for ((_, status), count) in &rejected {
                    total.reclassify(status, *count);
                }
                report
                    .notes
                    .extend(run.problems.iter().map(|p| format!("mix: {p}")));
                report.mix = Some(MixResult {
                    concurrency,
                    total,
                    kinds,
                    peak_rss_kib: vec![run.peak_pss_kib],
                });
            }
            Err(e) => failed(&mut report, "mix", e),
        }
    }

    if settings.open_loop != OpenLoop::Off {
        match report
            .best()
            .map(|b| (b.stats.throughput, settings.open_loop.connections(b)))
        {
            Some((best, connections)) if best > 0.0 => {
                let rate = best * HALF_PEAK;
                let phase = progress.phase(
                    &label,
                    &format!("half peak, open loop at {rate:.0}/s"),
                    settings.phase_time(),
                );
                let before = server.rejections().unwrap_or_default();
                let run = server.pgbench(
                    "half-peak",
                    connections,
                    seconds,
                    Some(rate),
                    &[("purchase.pgbench", 1)],
                    &phase,
                );
                drop(phase);
                match run {
                    Ok(run) => {
                        let (tallies, elapsed) = run.measured(warm_up, settings.duration, 1);
                        let tally = tallies.into_iter().next().unwrap_or_default();
                        let mut stats = Stats::from_tally(tally, elapsed);
                        pg::add_failures(&mut stats, &run);
                        for ((_, status), count) in rejections_during(&before) {
                            stats.reclassify(&status, count);
                        }
                        report
                            .notes
                            .extend(run.problems.iter().map(|p| format!("half peak: {p}")));
                        report.half_peak = Some(OpenLoopResult {
                            connections,
                            target_rate: rate,
                            stats,
                            peak_rss_kib: vec![run.peak_pss_kib],
                        });
                    }
                    Err(e) => failed(&mut report, "half peak", e),
                }
            }
            _ => progress.skip(1),
        }
    }

    report.checks.push(server.check());
    report.server_cpu_seconds = server.cpu_seconds().unwrap_or(0.0);
    eprintln!("{label}: stopping the server, removing its directory");
    drop(server);
    report
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
    /// The Ctrl-C cleanup of these processes (0: none yet).
    interrupt: u64,
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
            interrupt: 0,
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

        let pids: Vec<String> = nodes
            .nodes
            .iter()
            .map(|n| n.child.id().to_string())
            .collect();
        let dir = nodes.dir.path().to_path_buf();
        nodes.interrupt = on_interrupt(move || {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&pids)
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&dir);
        });

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
        forget_interrupt(self.interrupt);
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
// shopkeep: the phases
// ------------------------------------------------------------------------------------------------

/// Seeds the started nodes and runs every phase against them; then the audit.
async fn drive_shopkeep(
    system: System,
    nodes: &Nodes,
    settings: &Settings,
    progress: &Progress,
    spawned: Instant,
) -> SystemReport {
    let mut report = SystemReport::new(system);
    let label = system.label();
    let clustered = nodes.clustered();
    let client = Client::builder()
        .pool_max_idle_per_host(settings.max_connections().max(SEED_PARALLELISM))
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        // The nodes close connections idle for their header-read timeout (30 s by default).
        .pool_idle_timeout(Duration::from_secs(10))
        .build()
        .expect("cannot build the HTTP client");
    let bases: Vec<String> = nodes.nodes.iter().map(|n| n.base_url.clone()).collect();
    let base = bases[0].clone();
    if clustered {
        wait_ready(&client, nodes, spawned).await;
    }
    eprintln!("{label}: seeding item gems and {USERS} users");
    seed(&client, &base).await;
    let user_shards = if clustered {
        Some(user_shards(&client, &base).await)
    } else {
        None
    };

    // Orders the clients saw created (warm-ups included), for the audit's count.
    let mut orders_created = 0u64;
    let load = Load {
        client: client.clone(),
        bases: bases.clone(),
        warm_up: settings.warm_up,
        duration: settings.duration,
    };

    for &concurrency in &settings.levels {
        let peak_since_start = !nodes.reset_peak_rss();
        // Where each user's shard is led right now: the node a purchase goes to is compared with it.
        let leaders_before = match &user_shards {
            Some(_) => Some(shard_leaders(&client, &base).await),
            None => None,
        };
        let leader_of_user: Option<Arc<Vec<Option<u64>>>> = match (&user_shards, &leaders_before) {
            (Some(shards), Some(leaders)) => Some(Arc::new(
                shards
                    .iter()
                    .map(|&s| leaders.get(s as usize).copied().flatten())
                    .collect(),
            )),
            _ => None,
        };
        let phase = progress.phase(
            &label,
            &format!("purchases, c={concurrency}"),
            settings.phase_time(),
        );
        let (mut result, created) = load
            .closed_loop(leader_of_user, concurrency, phase.ops.clone())
            .await;
        drop(phase);
        result.peak_rss_kib = nodes.peak_rss_kib();
        result.peak_since_start = peak_since_start;
        if let Some(before) = &leaders_before {
            let after = shard_leaders(&client, &base).await;
            if &after != before {
                result.leaders_changed = true;
                report.notes.push(format!(
                    "c={concurrency}: shard leaders changed during the level: {} → {}",
                    leaders_text(before),
                    leaders_text(&after)
                ));
            }
        }
        eprintln!(
            "{label}: c={concurrency}: {:.0} purchases/s, p99 {} ms, {} errors, {} × 429/503, peak RSS {} MiB",
            result.stats.throughput,
            ms(result.stats.p99_ms),
            result.stats.errors,
            result.stats.backpressure,
            memory_text(&result.peak_rss_kib)
        );
        orders_created += created;
        report.levels.push(result);
    }

    if settings.mix_concurrency > 0 {
        nodes.reset_peak_rss();
        let concurrency = settings.mix_concurrency;
        let phase = progress.phase(
            &label,
            &format!("mix, c={concurrency}"),
            settings.phase_time(),
        );
        let (mut mix, created) = load.mix(concurrency, phase.ops.clone()).await;
        drop(phase);
        mix.peak_rss_kib = nodes.peak_rss_kib();
        eprintln!(
            "{label}: mix c={concurrency}: {:.0} ops/s, {} errors",
            mix.total.throughput, mix.total.errors
        );
        orders_created += created;
        report.mix = Some(mix);
    }

    if settings.open_loop != OpenLoop::Off {
        match report
            .best()
            .map(|b| (b.stats.throughput, settings.open_loop.connections(b)))
        {
            Some((best, connections)) if best > 0.0 => {
                nodes.reset_peak_rss();
                let rate = best * HALF_PEAK;
                let phase = progress.phase(
                    &label,
                    &format!("half peak, open loop at {rate:.0}/s over {connections} connections"),
                    settings.phase_time(),
                );
                let (mut result, created) =
                    load.open_loop(rate, connections, phase.ops.clone()).await;
                drop(phase);
                result.peak_rss_kib = nodes.peak_rss_kib();
                eprintln!(
                    "{label}: half peak: {:.0}/s intended, {:.0}/s achieved, p99 {} ms, {} errors",
                    rate,
                    result.stats.throughput,
                    ms(result.stats.p99_ms),
                    result.stats.errors
                );
                orders_created += created;
                report.half_peak = Some(result);
            }
            _ => progress.skip(1),
        }
    }

    eprintln!("{label}: audit (GET /v1/admin/audit on every node)…");
    report.checks = if clustered {
        check_cluster_audit(&client, &bases, orders_created).await
    } else {
        check_audit(&client, &base, orders_created).await
    };
    report
}

/// What every phase against one shopkeep deployment shares.
struct Load {
    client: Client,
    bases: Vec<String>,
    warm_up: Duration,
    duration: Duration,
}

/// What one worker of a closed-loop level saw.
#[derive(Default)]
struct WorkerStats {
    tally: Tally,
    /// Orders created over the warm-up *and* the measured window (for the audit check).
    created: u64,
    /// Measured requests sent to a node that did not lead the user's shard at the start of the level.
    forwarded: u64,
}

impl Load {
    /// `concurrency` workers for the warm-up plus the measured duration, worker `w` over connections
    /// to node `w mod nodes`; returns the measured result and the number of orders created over the
    /// whole level (warm-up included). `leader_of_user` (cluster mode): the node leading each user's
    /// shard.
    async fn closed_loop(
        &self,
        leader_of_user: Option<Arc<Vec<Option<u64>>>>,
        concurrency: usize,
        ops: Arc<AtomicU64>,
    ) -> (LevelResult, u64) {
        let urls = Arc::new(self.order_urls());
        let measure_from = Instant::now() + self.warm_up;
        let stop_at = measure_from + self.duration;

        let mut tasks = Vec::with_capacity(concurrency);
        for worker in 0..concurrency {
            let client = self.client.clone();
            let urls = urls.clone();
            let leader_of_user = leader_of_user.clone();
            let ops = ops.clone();
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
                    let outcome = purchase(&client, &urls[user]).await.map(|_| ());
                    let latency = started.elapsed();
                    ops.fetch_add(1, Ordering::Relaxed);
                    if outcome.is_ok() {
                        stats.created += 1;
                    }
                    if started >= measure_from {
                        if let Some(leaders) = &leader_of_user {
                            if leaders[user] != Some(node_id) {
                                stats.forwarded += 1;
                            }
                        }
                        stats.tally.record(&outcome, latency);
                    }
                    user = (user + concurrency) % USERS;
                }
                stats
            }));
        }

        let mut tally = Tally::default();
        let mut created = 0;
        let mut forwarded = 0;
        for task in tasks {
            let stats = task.await.expect("a load worker panicked");
            tally.merge(stats.tally);
            created += stats.created;
            forwarded += stats.forwarded;
        }
        // Requests started just before `stop_at` finish after it: count the window until the last one ended.
        let elapsed = measure_from.elapsed().as_secs_f64();
        let requests = tally.latencies_us.len() as u64 + tally.failures.values().sum::<u64>();
        let result = LevelResult {
            concurrency,
            stats: Stats::from_tally(tally, elapsed),
            forwarded_share: match leader_of_user {
                Some(_) if requests > 0 => Some(forwarded as f64 / requests as f64),
                _ => None,
            },
            leaders_changed: false,
            peak_rss_kib: Vec::new(),
            peak_since_start: false,
        };
        (result, created)
    }

    /// The mixed workload at `concurrency`; returns it and the orders created (warm-up included).
    async fn mix(&self, concurrency: usize, ops: Arc<AtomicU64>) -> (MixResult, u64) {
        let measure_from = Instant::now() + self.warm_up;
        let stop_at = measure_from + self.duration;
        let bases = Arc::new(self.bases.clone());
        let mut tasks = Vec::with_capacity(concurrency);
        for worker in 0..concurrency {
            let client = self.client.clone();
            let bases = bases.clone();
            let ops = ops.clone();
            tasks.push(tokio::spawn(async move {
                let base = &bases[worker % bases.len()];
                let mut tallies: Vec<Tally> = MIX_KINDS.iter().map(|_| Tally::default()).collect();
                let mut created = 0u64;
                let mut rng = XorShift::new(worker as u64 + 1);
                // This worker's completed orders, oldest first: what its refunds take back.
                let mut bought: VecDeque<(usize, String)> = VecDeque::new();
                let mut user = worker % USERS;
                loop {
                    let started = Instant::now();
                    if started >= stop_at {
                        break;
                    }
                    let user_id = user_id(user);
                    // The kind by MIX_KINDS index: a refund with no order to take back buys instead.
                    let kind = match rng.next() % 100 {
                        0..60 => 0,
                        60..70 => 1,
                        70..80 => 2,
                        80..90 if !bought.is_empty() => 3,
                        80..90 => 0,
                        _ => 4,
                    };
                    let outcome = if kind == 0 {
                        let url = format!("{base}/v1/users/{user_id}/orders");
                        let outcome = purchase(&client, &url).await;
                        if let Ok(order_id) = &outcome {
                            created += 1;
                            if bought.len() < 1024 {
                                bought.push_back((user, order_id.clone()));
                            }
                        }
                        outcome.map(|_| ())
                    } else if kind == 1 {
                        let (was_created, outcome) = two_step(&client, base, &user_id).await;
                        created += u64::from(was_created);
                        outcome
                    } else if kind == 2 {
                        credit(&client, base, &user_id).await
                    } else if kind == 3 {
                        let (owner, order_id) = bought.pop_front().expect("checked above");
                        refund(&client, base, &self::user_id(owner), &order_id).await
                    } else {
                        read_wallet(&client, base, &user_id).await
                    };
                    let latency = started.elapsed();
                    ops.fetch_add(1, Ordering::Relaxed);
                    if started >= measure_from {
                        tallies[kind].record(&outcome, latency);
                    }
                    user = (user + concurrency) % USERS;
                }
                (tallies, created)
            }));
        }
        let mut tallies: Vec<Tally> = MIX_KINDS.iter().map(|_| Tally::default()).collect();
        let mut created = 0;
        for task in tasks {
            let (worker_tallies, worker_created) = task.await.expect("a mix worker panicked");
            for (tally, worker_tally) in tallies.iter_mut().zip(worker_tallies) {
                tally.merge(worker_tally);
            }
            created += worker_created;
        }
        let elapsed = measure_from.elapsed().as_secs_f64();
        let mut total = Tally::default();
        let mut kinds = Vec::new();
        for (kind, tally) in MIX_KINDS.iter().zip(tallies) {
            let stats = Stats::from_tally(
                Tally {
                    latencies_us: tally.latencies_us.clone(),
                    failures: tally.failures.clone(),
                },
                elapsed,
            );
            total.merge(tally);
            kinds.push((*kind, stats));
        }
        let result = MixResult {
            concurrency,
            total: Stats::from_tally(total, elapsed),
            kinds,
            peak_rss_kib: Vec::new(),
        };
        (result, created)
    }

    /// Purchases at `rate` per second (Poisson arrivals) over `connections` workers, each latency
    /// measured from the request's intended send time; returns the result (its throughput is the
    /// achieved rate) and the orders created (warm-up included).
    async fn open_loop(
        &self,
        rate: f64,
        connections: usize,
        ops: Arc<AtomicU64>,
    ) -> (OpenLoopResult, u64) {
        let urls = Arc::new(self.order_urls());
        let first = Instant::now() + Duration::from_millis(20);
        let measure_from = first + self.warm_up;
        let stop_at = measure_from + self.duration;
        // The shared schedule: the next intended send time and the generator of the gaps.
        let schedule = Arc::new(Mutex::new((first, XorShift::new(0x5eed))));
        let mean_gap = 1.0 / rate;

        let mut tasks = Vec::with_capacity(connections);
        for worker in 0..connections {
            let client = self.client.clone();
            let urls = urls.clone();
            let schedule = schedule.clone();
            let ops = ops.clone();
            tasks.push(tokio::spawn(async move {
                let urls = &urls[worker % urls.len()];
                let mut tally = Tally::default();
                let mut created = 0u64;
                let mut last_end = measure_from;
                let mut user = worker % USERS;
                loop {
                    let intended = {
                        let mut next = schedule.lock().unwrap_or_else(|p| p.into_inner());
                        let intended = next.0;
                        let gap = -(1.0 - next.1.unit()).ln() * mean_gap;
                        next.0 += Duration::from_secs_f64(gap);
                        intended
                    };
                    if intended >= stop_at {
                        break;
                    }
                    tokio::time::sleep_until(intended.into()).await;
                    let outcome = purchase(&client, &urls[user]).await.map(|_| ());
                    let ended = Instant::now();
                    ops.fetch_add(1, Ordering::Relaxed);
                    if outcome.is_ok() {
                        created += 1;
                    }
                    if intended >= measure_from {
                        tally.record(&outcome, ended.duration_since(intended));
                        last_end = last_end.max(ended);
                    }
                    user = (user + connections) % USERS;
                }
                (tally, created, last_end)
            }));
        }
        let mut tally = Tally::default();
        let mut created = 0;
        let mut last_end = measure_from;
        for task in tasks {
            let (worker_tally, worker_created, worker_end) =
                task.await.expect("an open-loop worker panicked");
            tally.merge(worker_tally);
            created += worker_created;
            last_end = last_end.max(worker_end);
        }
        let elapsed = last_end
            .duration_since(measure_from)
            .max(self.duration)
            .as_secs_f64();
        let result = OpenLoopResult {
            connections,
            target_rate: rate,
            stats: Stats::from_tally(tally, elapsed),
            peak_rss_kib: Vec::new(),
        };
        (result, created)
    }

    /// `urls[node][user]`: where to POST the user's orders on each node.
    fn order_urls(&self) -> Vec<Vec<String>> {
        self.bases
            .iter()
            .map(|base| {
                (0..USERS)
                    .map(|i| format!("{base}/v1/users/{}/orders", user_id(i)))
                    .collect()
            })
            .collect()
    }
}

/// A small deterministic generator (xorshift64*), enough to pick operations and arrival gaps.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ------------------------------------------------------------------------------------------------
// shopkeep: the requests
// ------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct OrderBody {
    #[serde(default)]
    order_id: String,
    #[serde(default)]
    status: String,
}

/// Sends a service-role request (a POST gets a fresh `Idempotency-Key` and a JSON body) and checks its
/// status. Ok: the body, parsed as an order if `order` (else left unparsed); Err: the failure's bucket.
async fn send(
    request: RequestBuilder,
    body: Option<&'static str>,
    expected: StatusCode,
    order: bool,
) -> Result<Option<OrderBody>, String> {
    let mut request = request.bearer_auth(SERVICE_TOKEN);
    if let Some(body) = body {
        request = request
            .header("Idempotency-Key", Uuid::now_v7().to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return Err("timeout".into()),
        Err(_) => return Err("transport".into()),
    };
    let status = response.status();
    // Read the whole body so that the connection goes back to the pool.
    let Ok(bytes) = response.bytes().await else {
        return Err("transport".into());
    };
    if status != expected {
        return Err(status.as_u16().to_string());
    }
    if !order {
        return Ok(None);
    }
    match serde_json::from_slice::<OrderBody>(&bytes) {
        Ok(body) => Ok(Some(body)),
        Err(_) => Err(format!("{}-unreadable", status.as_u16())),
    }
}

/// One complete purchase of one gem (`url`: the user's orders); the order id.
async fn purchase(client: &Client, url: &str) -> Result<String, String> {
    match send(
        client.post(url),
        Some(ORDER_BODY),
        StatusCode::CREATED,
        true,
    )
    .await?
    {
        Some(order) if order.status == "COMPLETED" => Ok(order.order_id),
        _ => Err("201-not-completed".into()),
    }
}

/// A two-step purchase: create a pending order, then complete it. (Was the order created, outcome.)
async fn two_step(client: &Client, base: &str, user: &str) -> (bool, Result<(), String>) {
    let url = format!("{base}/v1/users/{user}/orders");
    let created = send(
        client.post(&url),
        Some(PENDING_ORDER_BODY),
        StatusCode::CREATED,
        true,
    )
    .await;
    let order_id = match created {
        Ok(Some(order)) if order.status == "PENDING" => order.order_id,
        Ok(_) => return (true, Err("201-not-pending".into())),
        Err(bucket) => return (false, Err(bucket)),
    };
    let url = format!("{base}/v1/users/{user}/orders/{order_id}/complete");
    let completed = send(client.post(&url), Some("{}"), StatusCode::OK, true).await;
    let outcome = match completed {
        Ok(Some(order)) if order.status == "COMPLETED" => Ok(()),
        Ok(_) => Err("200-not-completed".into()),
        Err(bucket) => Err(bucket),
    };
    (true, outcome)
}

/// A direct credit of 1.00 with a fresh external reference.
async fn credit(client: &Client, base: &str, user: &str) -> Result<(), String> {
    let body = format!(
        r#"{{"amount":"1.00","external_ref":"mix-{}","source":"card"}}"#,
        Uuid::now_v7()
    );
    let request = client
        .post(format!("{base}/v1/users/{user}/credits"))
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .header(CONTENT_TYPE, "application/json")
        .body(body);
    send(request, None, StatusCode::CREATED, false)
        .await
        .map(|_| ())
}

/// A full refund of an earlier order.
async fn refund(client: &Client, base: &str, user: &str, order_id: &str) -> Result<(), String> {
    let url = format!("{base}/v1/users/{user}/orders/{order_id}/refunds");
    send(client.post(url), Some("{}"), StatusCode::CREATED, false)
        .await
        .map(|_| ())
}

/// `GET /v1/users/{id}/wallet` (linearizable, the default).
async fn read_wallet(client: &Client, base: &str, user: &str) -> Result<(), String> {
    let url = format!("{base}/v1/users/{user}/wallet");
    send(client.get(url), None, StatusCode::OK, false)
        .await
        .map(|_| ())
}

// ------------------------------------------------------------------------------------------------
// Report
// ------------------------------------------------------------------------------------------------

fn print_report(settings: &Settings, reports: &[SystemReport], wall: Duration) {
    for report in reports {
        print_system(settings, report);
    }
    let postgres = reports.iter().find(|r| r.system == System::Postgres);
    let ratios = print_ratios(settings, reports, postgres);
    let targets = print_targets(reports, postgres);
    println!(
        "wall time: {:.0} s (servers and load generator on {} cores)",
        wall.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let document = json!({
        "bench": "load",
        "settings": {
            "systems": settings.systems.iter().map(System::key).collect::<Vec<_>>(),
            "concurrency": settings.levels,
            "seconds": settings.duration.as_secs_f64(),
            "warmup_seconds": settings.warm_up.as_secs_f64(),
            "users": USERS,
            "mix_concurrency": settings.mix_concurrency,
            "open_loop_connections": match settings.open_loop {
                OpenLoop::Off => json!(0),
                OpenLoop::Best => json!("best"),
                OpenLoop::Fixed(n) => json!(n),
            },
            "half_peak_share": HALF_PEAK,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        },
        "systems": reports.iter().map(system_json).collect::<Vec<_>>(),
        "ratios": ratios,
        "targets": targets,
        "wall_seconds": round2(wall.as_secs_f64()),
    });
    println!("{document}");

    if let Err(e) = std::fs::create_dir_all(&settings.out_dir) {
        println!("output: cannot create {}: {e}", settings.out_dir.display());
        return;
    }
    let json_path = settings.out_dir.join("load.json");
    let pretty = serde_json::to_string_pretty(&document).unwrap_or_default();
    match std::fs::write(&json_path, pretty + "\n") {
        Ok(()) => println!("json: {}", json_path.display()),
        Err(e) => println!("json: cannot write {}: {e}", json_path.display()),
    }
    let png_path = settings.out_dir.join("load.png");
    match write_plot(settings, reports, &png_path) {
        Ok(()) => println!("plot: {}", png_path.display()),
        Err(e) => println!("plot: cannot write {}: {e}", png_path.display()),
    }
}

fn print_system(settings: &Settings, report: &SystemReport) {
    let label = report.system.label();
    println!();
    if let Some(why) = &report.skipped {
        println!("== {label}: SKIPPED: {why}");
        return;
    }
    match report.system {
        System::Postgres => println!(
            "== {label}: pgbench, SELECT purchase(...) = one plpgsql transaction (fsync, synchronous_commit on)"
        ),
        System::Shopkeep(1) => {
            println!("== {label}: POST /v1/users/{{id}}/orders {{\"complete\": true}}")
        }
        System::Shopkeep(n) => println!(
            "== {label}: POST /v1/users/{{id}}/orders {{\"complete\": true}}, connections round-robin over the {n} nodes"
        ),
    }
    println!(
        "closed loop, {:.1} s measured after {:.1} s warm-up; memory: {}",
        settings.duration.as_secs_f64(),
        settings.warm_up.as_secs_f64(),
        report.memory_label
    );
    if let Some(cpu) = &report.cpu {
        println!(
            "CPU over the {:.0} s of this system, in cores (of {}): benchmark + servers {:.2}, kernel (interrupts, kernel threads) {:.2}, other processes and steal {:.2}{}",
            cpu.wall_seconds,
            cpu.cores,
            cpu.ours_cores,
            cpu.kernel_cores,
            cpu.other_cores,
            if cpu.other_cores > OTHER_CPU_WARNING {
                " — the machine was not quiet: these figures are unreliable"
            } else {
                ""
            }
        );
    }
    println!(
        "{:>11} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>16}  error statuses",
        "concurrency",
        "purchases",
        "per s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "429/503",
        "peak memory"
    );
    for level in &report.levels {
        let s = &level.stats;
        println!(
            "{:>11} {:>9} {:>9.0} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>16}  {}",
            level.concurrency,
            s.ops,
            s.throughput,
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            ms(s.max_ms),
            s.errors,
            s.backpressure,
            memory_text(&level.peak_rss_kib),
            s.statuses_text()
        );
    }
    if report.levels.iter().any(|l| l.forwarded_share.is_some()) {
        let shares: Vec<String> = report
            .levels
            .iter()
            .map(|l| {
                format!(
                    "c={} {}",
                    l.concurrency,
                    l.forwarded_share
                        .map_or("-".into(), |s| format!("{:.0}%", s * 100.0))
                )
            })
            .collect();
        println!(
            "forwarded (sent to a node not leading the user's shard): {}",
            shares.join(", ")
        );
    }
    if report.levels.iter().any(|l| l.peak_since_start) {
        println!(
            "note: the peak RSS could not be reset: some figures are the peak since the start"
        );
    }

    if let Some(mix) = &report.mix {
        println!(
            "mix, closed loop at c={}: 60% purchase, 10% two-step (create + complete), 10% credit, 10% refund, 10% wallet read; peak memory {}",
            mix.concurrency,
            memory_text(&mix.peak_rss_kib)
        );
        println!(
            "{:>11} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8}  error statuses",
            "operation",
            "ops",
            "per s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "errors",
            "429/503"
        );
        for (kind, s) in mix
            .kinds
            .iter()
            .map(|(k, s)| (*k, s))
            .chain([("all", &mix.total)])
        {
            println!(
                "{:>11} {:>9} {:>9.0} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8}  {}",
                kind,
                s.ops,
                s.throughput,
                ms(s.p50_ms),
                ms(s.p99_ms),
                ms(s.p999_ms),
                ms(s.max_ms),
                s.errors,
                s.backpressure,
                s.statuses_text()
            );
        }
    }

    if let Some(h) = &report.half_peak {
        let s = &h.stats;
        println!(
            "half peak, open loop: {:.0} purchases/s intended (50% of the best {:.0}/s), Poisson arrivals over {} connections, latency from the intended send time",
            h.target_rate,
            h.target_rate / HALF_PEAK,
            h.connections
        );
        println!(
            "{:>11} {:>9} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>16}  error statuses",
            "achieved/s",
            "purchases",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "errors",
            "429/503",
            "peak memory"
        );
        println!(
            "{:>11.0} {:>9} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>16}  {}",
            s.throughput,
            s.ops,
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            ms(s.max_ms),
            s.errors,
            s.backpressure,
            memory_text(&h.peak_rss_kib),
            s.statuses_text()
        );
    }
    for (line, _) in &report.checks {
        println!("{line}");
    }
    for note in &report.notes {
        println!("note: {note}");
    }
}

/// The ratio table (per level and at the best level of each); its JSON.
fn print_ratios(
    settings: &Settings,
    reports: &[SystemReport],
    postgres: Option<&SystemReport>,
) -> Value {
    let Some(pg) = postgres.filter(|p| p.skipped.is_none() && !p.levels.is_empty()) else {
        println!();
        println!("ratios: no PostgreSQL baseline in this run");
        return Value::Null;
    };
    let shopkeeps: Vec<&SystemReport> = reports
        .iter()
        .filter(|r| matches!(r.system, System::Shopkeep(_)) && r.skipped.is_none())
        .collect();
    println!();
    println!("shopkeep / PostgreSQL, completed purchases per second (closed loop)");
    let mut header = format!("{:>11} {:>12}", "concurrency", "PostgreSQL");
    for s in &shopkeeps {
        header.push_str(&format!(" {:>18} {:>7}", s.system.label(), "ratio"));
    }
    println!("{header}");
    let throughput_at = |r: &SystemReport, c: usize| {
        r.levels
            .iter()
            .find(|l| l.concurrency == c)
            .map(|l| l.stats.throughput)
    };
    let ratio_text = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let mut per_level = Vec::new();
    for &c in &settings.levels {
        let base = throughput_at(pg, c);
        let mut line = format!("{:>11} {:>12}", c, opt(base));
        let mut entry = json!({"concurrency": c, "postgresql": base.map(round2)});
        for s in &shopkeeps {
            let value = throughput_at(s, c);
            line.push_str(&format!(
                " {:>18} {:>7}",
                opt(value),
                ratio_text(value, base)
            ));
            entry[s.system.key()] = json!({
                "throughput": value.map(round2),
                "ratio": match (value, base) {
                    (Some(v), Some(b)) if b > 0.0 => round2(v / b),
                    _ => Value::Null,
                },
            });
        }
        println!("{line}");
        per_level.push(entry);
    }
    let best_text = |r: &SystemReport| {
        r.best().map_or("-".into(), |b| {
            format!("{:.0} (c={})", b.stats.throughput, b.concurrency)
        })
    };
    let pg_best = pg.best().map(|b| b.stats.throughput);
    let mut line = format!("{:>11} {:>12}", "best", best_text(pg));
    let mut best = json!({
        "postgresql": pg.best().map(|b| json!({"throughput": round2(b.stats.throughput), "concurrency": b.concurrency})),
    });
    for s in &shopkeeps {
        let value = s.best().map(|b| b.stats.throughput);
        line.push_str(&format!(
            " {:>18} {:>7}",
            best_text(s),
            ratio_text(value, pg_best)
        ));
        best[s.system.key()] = json!({
            "throughput": value.map(round2),
            "concurrency": s.best().map(|b| b.concurrency),
            "ratio": match (value, pg_best) {
                (Some(v), Some(b)) if b > 0.0 => round2(v / b),
                _ => Value::Null,
            },
        });
    }
    println!("{line}");
    let mut half = Vec::new();
    for r in std::iter::once(pg).chain(shopkeeps.iter().copied()) {
        if let Some(h) = &r.half_peak {
            half.push(format!(
                "{} p99 {} ms at {:.0}/s",
                r.system.label(),
                ms(h.stats.p99_ms),
                h.stats.throughput
            ));
        }
    }
    if !half.is_empty() {
        println!("half peak (open loop): {}", half.join("; "));
    }
    json!({"per_level": per_level, "best": best})
}

/// The issue's targets, PASS / FAIL; their JSON.
fn print_targets(reports: &[SystemReport], postgres: Option<&SystemReport>) -> Value {
    struct Target {
        name: String,
        value: Option<f64>,
        text: String,
        limit: String,
        pass: Option<bool>,
    }
    let mut targets = Vec::new();
    let pg_best = postgres
        .filter(|p| p.skipped.is_none())
        .and_then(|p| p.best())
        .map(|b| b.stats.throughput);
    for r in reports.iter().filter(|r| r.skipped.is_none()) {
        let System::Shopkeep(n) = r.system else {
            continue;
        };
        let label = r.system.label();
        let wanted = if n == 1 {
            TARGET_RATIO_1
        } else {
            TARGET_RATIO_3
        };
        let ratio = match (r.best().map(|b| b.stats.throughput), pg_best) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
        targets.push(Target {
            name: format!("{label}: best purchases/s / PostgreSQL best"),
            value: ratio,
            text: ratio.map_or("no baseline".into(), |r| format!("{r:.2}x")),
            limit: format!(">= {wanted}x"),
            pass: ratio.map(|r| r >= wanted),
        });
        let p99 = r.half_peak.as_ref().map(|h| h.stats.p99_ms);
        targets.push(Target {
            name: format!("{label}: p99 at half peak (open loop)"),
            value: p99,
            text: p99.map_or("-".into(), |p| format!("{} ms", ms(p))),
            limit: format!("<= {TARGET_HALF_PEAK_P99_MS} ms"),
            pass: p99.map(|p| p <= TARGET_HALF_PEAK_P99_MS),
        });
        let errors = r.errors();
        targets.push(Target {
            name: format!("{label}: errors other than 429/503, all phases"),
            value: Some(errors as f64),
            text: errors.to_string(),
            limit: "0".into(),
            pass: Some(errors == 0),
        });
        let rss = r.peak_memory_kib().map(|kib| kib as f64 / 1024.0);
        targets.push(Target {
            name: format!("{label}: peak RSS of any node, any phase"),
            value: rss,
            text: rss.map_or("-".into(), |m| format!("{m:.1} MiB")),
            limit: format!("<= {TARGET_RSS_MIB} MiB"),
            pass: rss.map(|m| m <= TARGET_RSS_MIB),
        });
        let checks_ok = r.checks.iter().all(|(_, ok)| *ok);
        targets.push(Target {
            name: format!("{label}: audit, replicas, order count"),
            value: None,
            text: if checks_ok { "ok" } else { "see above" }.into(),
            limit: "ok".into(),
            pass: Some(checks_ok),
        });
    }
    if targets.is_empty() {
        return json!([]);
    }
    println!();
    println!("targets (shopkeep / PostgreSQL at the best concurrency of each)");
    println!("{:<56} {:>12} {:>12}  result", "target", "value", "limit");
    for t in &targets {
        let result = match t.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a",
        };
        println!("{:<56} {:>12} {:>12}  {result}", t.name, t.text, t.limit);
    }
    Value::Array(
        targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.name,
                    "value": t.value.map_or(Value::Null, round2),
                    "limit": t.limit,
                    "pass": t.pass,
                })
            })
            .collect(),
    )
}

fn system_json(report: &SystemReport) -> Value {
    json!({
        "system": report.system.key(),
        "label": report.system.label(),
        "skipped": report.skipped,
        "memory": report.memory_label,
        "purchases": report.levels.iter().map(LevelResult::to_json).collect::<Vec<_>>(),
        "best": report.best().map(|b| json!({"concurrency": b.concurrency, "throughput_ops": round2(b.stats.throughput)})),
        "mix": report.mix.as_ref().map(MixResult::to_json),
        "half_peak": report.half_peak.as_ref().map(OpenLoopResult::to_json),
        "checks": report.checks.iter().map(|(line, ok)| json!({"check": line, "ok": ok})).collect::<Vec<_>>(),
        "notes": report.notes,
        "cpu": report.cpu.as_ref().map(|c| json!({
            "wall_seconds": round2(c.wall_seconds),
            "benchmark_and_servers_cores": round2(c.ours_cores),
            "kernel_cores": round2(c.kernel_cores),
            "other_processes_and_steal_cores": round2(c.other_cores),
            "cores": c.cores,
        })),
    })
}

fn write_plot(settings: &Settings, reports: &[SystemReport], path: &Path) -> std::io::Result<()> {
    let shown: Vec<&SystemReport> = reports
        .iter()
        .filter(|r| r.skipped.is_none() && !r.levels.is_empty())
        .collect();
    let series = |value: fn(&LevelResult) -> f64| -> Vec<plot::Series> {
        shown
            .iter()
            .enumerate()
            .map(|(i, r)| plot::Series {
                label: r.system.label(),
                color: plot::COLORS[i % plot::COLORS.len()],
                points: r
                    .levels
                    .iter()
                    .map(|l| (l.concurrency as f64, value(l)))
                    .collect(),
            })
            .collect()
    };
    let throughput = series(|l| l.stats.throughput);
    let p99 = series(|l| l.stats.p99_ms);
    let mut notes = vec![format!(
        "closed loop: {:.0} s measured after {:.0} s warm-up per level; one-step purchases (complete: true), fresh idempotency key each; {} cores shared by servers and load",
        settings.duration.as_secs_f64(),
        settings.warm_up.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )];
    let half: Vec<String> = shown
        .iter()
        .filter_map(|r| {
            let h = r.half_peak.as_ref()?;
            Some(format!(
                "{} {} ms at {:.0}/s",
                r.system.label(),
                ms(h.stats.p99_ms),
                h.stats.throughput
            ))
        })
        .collect();
    if !half.is_empty() {
        notes.push(format!(
            "p99 at half peak (open loop, from intended send time): {}",
            half.join("; ")
        ));
    }
    plot::write_chart(
        path,
        "shopkeep vs PostgreSQL: purchases",
        &notes,
        &throughput,
        &p99,
    )
}

// ------------------------------------------------------------------------------------------------
// Audit
// ------------------------------------------------------------------------------------------------

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

/// Runs the server's audit and compares its order count with the orders the clients saw created.
async fn check_audit(client: &Client, base: &str, created: u64) -> Vec<(String, bool)> {
    let audit = match fetch_audit(client, base).await {
        Ok(audit) => audit,
        Err(e) => return vec![(format!("audit: {e}"), false)],
    };
    let mut checks = vec![(format!("audit: ok = {}", audit.ok), audit.ok)];
    for (i, shard) in audit.shards.iter().enumerate() {
        if !shard.violations.is_empty() {
            checks.push((
                format!("audit: shard {i} violations: {:?}", shard.violations),
                false,
            ));
        }
    }
    let orders: u64 = audit.shards.iter().map(|s| s.orders).sum();
    checks.push(consistency(orders, created));
    checks
}

fn consistency(orders: u64, created: u64) -> (String, bool) {
    if orders == created {
        (
            format!("consistency: ok ({orders} orders = {created} orders the clients saw created)"),
            true,
        )
    } else {
        (
            format!(
                "consistency: MISMATCH: audit counts {orders} orders, clients saw {created} created"
            ),
            false,
        )
    }
}

/// Cluster mode: the audit of every node must be ok, every shard's `state_hash` equal on every node, and
/// the orders counted equal the orders the clients saw created.
async fn check_cluster_audit(
    client: &Client,
    bases: &[String],
    created: u64,
) -> Vec<(String, bool)> {
    let mut checks = Vec::new();
    let mut audits = Vec::new();
    for (id, base) in (1u64..).zip(bases) {
        match fetch_audit(client, base).await {
            Ok(audit) => {
                checks.push((format!("audit: node {id} ok = {}", audit.ok), audit.ok));
                for (i, shard) in audit.shards.iter().enumerate() {
                    if !shard.violations.is_empty() {
                        checks.push((
                            format!(
                                "audit: node {id} shard {i} violations: {:?}",
                                shard.violations
                            ),
                            false,
                        ));
                    }
                }
                audits.push((id, audit));
            }
            Err(e) => checks.push((format!("audit: node {id} FAILED: {e}"), false)),
        }
    }
    if audits.len() < bases.len() {
        checks.push((
            format!(
                "replicas: NOT CHECKED: only {} of {} nodes answered the audit",
                audits.len(),
                bases.len()
            ),
            false,
        ));
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
                checks.push((
                    format!(
                        "replicas: MISMATCH: shard {shard} state_hash differs: {}",
                        parts.join("; ")
                    ),
                    false,
                ));
            }
        }
        if mismatches == 0 {
            checks.push((
                format!(
                    "replicas: ok ({shard_count} shards, state_hash equal on all {} nodes)",
                    audits.len()
                ),
                true,
            ));
        }
    }
    let Some((first_id, first)) = audits.first() else {
        checks.push((
            "consistency: NOT CHECKED: no node answered the audit".into(),
            false,
        ));
        return checks;
    };
    let orders: u64 = first.shards.iter().map(|s| s.orders).sum();
    for (id, audit) in &audits[1..] {
        let theirs: u64 = audit.shards.iter().map(|s| s.orders).sum();
        if theirs != orders {
            checks.push((
                format!(
                    "consistency: MISMATCH: node {first_id} counts {orders} orders, node {id} counts {theirs}"
                ),
                false,
            ));
        }
    }
    checks.push(consistency(orders, created));
    checks
}
