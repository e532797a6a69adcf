//! The run's settings: the `SHOPKEEP_BENCH_*` environment variables (listed in `main.rs`), parsed and
//! checked, and the systems to measure.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::launcher::Launch;
use crate::results::LevelResult;

const DEFAULT_CONCURRENCY: &[usize] = &[1, 16, 64, 256];
const DEFAULT_SECONDS: f64 = 5.0;
const DEFAULT_WARM_UP: f64 = 1.0;
const DEFAULT_MIX_CONCURRENCY: usize = 64;
/// The scale run's users and orders.
const DEFAULT_SCALE: (u32, u64) = (1_000_000, 10_000_000);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum System {
    /// A PostgreSQL deployment of this many servers: 1 (`pg`, a single server) or 3 (`pg3`, a primary
    /// and two synchronous streaming standbys).
    Postgres(u64),
    /// A shopkeep deployment of this many nodes (1: single node, no `--peers`).
    Shopkeep(u64),
}

impl System {
    pub(crate) fn key(&self) -> String {
        match self {
            System::Postgres(1) => "postgresql".into(),
            System::Postgres(n) => format!("postgresql-{n}"),
            System::Shopkeep(n) => format!("shopkeep-{n}"),
        }
    }

    pub(crate) fn label(&self) -> String {
        match self {
            System::Postgres(1) => "PostgreSQL".into(),
            System::Postgres(n) => format!("PostgreSQL {n}"),
            System::Shopkeep(1) => "shopkeep 1 node".into(),
            System::Shopkeep(n) => format!("shopkeep {n} nodes"),
        }
    }
}

pub(crate) struct Settings {
    pub(crate) systems: Vec<System>,
    pub(crate) levels: Vec<usize>,
    pub(crate) duration: Duration,
    pub(crate) warm_up: Duration,
    /// 0: no mix phase.
    pub(crate) mix_concurrency: usize,
    /// The connections of the open-loop phase.
    pub(crate) open_loop: OpenLoop,
    pub(crate) out_dir: PathBuf,
    /// The scale run's users and orders (`None`: skipped).
    pub(crate) scale: Option<(u32, u64)>,
    /// The size of the scale run's 3-node part (snapshots to new members): `None` skips it.
    pub(crate) scale_cluster: Option<(u32, u64)>,
    /// Closed-loop purchases go to the node leading each user's shard instead of round-robin.
    pub(crate) route_to_leader: bool,
    /// `--shards` of every shopkeep node (`None`: the server's default).
    pub(crate) shards: Option<u32>,
}

impl Settings {
    pub(crate) fn from_env() -> Settings {
        let scale = scale_setting("SHOPKEEP_BENCH_SCALE", Some(DEFAULT_SCALE));
        Settings {
            systems: systems(),
            levels: concurrency_levels(),
            duration: seconds_setting("SHOPKEEP_BENCH_SECONDS", DEFAULT_SECONDS, false),
            warm_up: seconds_setting("SHOPKEEP_BENCH_WARMUP", DEFAULT_WARM_UP, true),
            mix_concurrency: count_setting("SHOPKEEP_BENCH_MIX", DEFAULT_MIX_CONCURRENCY),
            open_loop: open_loop_setting(),
            out_dir: out_dir(),
            scale,
            // Three copies and their snapshots: at 10M orders beyond a small disk, so at most 3M.
            scale_cluster: scale_setting(
                "SHOPKEEP_BENCH_SCALE_CLUSTER",
                scale.map(|(users, orders)| (users.min(300_000), orders.min(3_000_000))),
            ),
            route_to_leader: route_setting(),
            shards: shards_setting(),
        }
    }

    pub(crate) fn phases_per_system(&self) -> usize {
        self.levels.len()
            + usize::from(self.mix_concurrency > 0)
            + usize::from(self.open_loop != OpenLoop::Off)
    }

    pub(crate) fn phase_time(&self) -> Duration {
        self.warm_up + self.duration
    }

    pub(crate) fn max_connections(&self) -> usize {
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
pub(crate) enum OpenLoop {
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

    pub(crate) fn connections(self, best: &LevelResult) -> usize {
        self.fixed().unwrap_or(best.concurrency)
    }

    pub(crate) fn describe(self) -> String {
        match self {
            OpenLoop::Off => "no half-peak phase".into(),
            OpenLoop::Best => "half peak over as many connections as the best level".into(),
            OpenLoop::Fixed(n) => format!("half peak over {n} connections"),
        }
    }
}

/// `SHOPKEEP_BENCH_ROUTE`: `spread` (default: connections round-robin over the nodes, as behind a load
/// balancer) or `leader` (each purchase sent to the node leading its user's shard, as a client that asks
/// `GET /v1/cluster/route/{user_id}` would).
fn route_setting() -> bool {
    match env_text("SHOPKEEP_BENCH_ROUTE").as_deref().map(str::trim) {
        None | Some("spread") => false,
        Some("leader") => true,
        Some(other) => panic!("SHOPKEEP_BENCH_ROUTE: {other:?} is neither `spread` nor `leader`"),
    }
}

/// `SHOPKEEP_BENCH_SHARDS`: the shopkeep nodes' `--shards` (1–256); unset, the server's default.
fn shards_setting() -> Option<u32> {
    let text = env_text("SHOPKEEP_BENCH_SHARDS")?;
    match text.trim().parse() {
        Ok(shards) if (1..=256).contains(&shards) => Some(shards),
        _ => panic!("SHOPKEEP_BENCH_SHARDS: {text:?} is not a number of shards from 1 to 256"),
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

/// `launch` with what the caller asked for every `shopkeep serve` the benchmark starts:
/// `SHOPKEEP_BENCH_SERVER_ARGS`, more flags split at whitespace (e.g. `--cache-mib 64`; the servers never
/// inherit the caller's `SHOPKEEP_*` variables), and `SHOPKEEP_BENCH_SERVER_LOG`, their `RUST_LOG` (unset:
/// the launcher's `warn`, which leaves out the access log; `info` is an operator's default).
pub(crate) fn for_every_server(launch: Launch) -> Launch {
    let flags: Vec<String> = env_text("SHOPKEEP_BENCH_SERVER_ARGS")
        .map(|text| text.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let launch = launch.args(flags);
    match env_text("SHOPKEEP_BENCH_SERVER_LOG") {
        Some(filter) => launch.env("RUST_LOG", filter),
        None => launch,
    }
}

/// The `--workers` of each of the `nodes` members of a cluster on this machine: its cores shared among
/// them, at least 1, as an operator running several nodes on one machine would set it (each node's
/// default is every core, so three nodes would run three times as many runtime threads as there are
/// cores). `None` for one node, or when `SHOPKEEP_BENCH_SERVER_ARGS` names `--workers` itself.
pub(crate) fn cluster_workers(nodes: u64) -> Option<u64> {
    let named = env_text("SHOPKEEP_BENCH_SERVER_ARGS").is_some_and(|text| {
        text.split_whitespace()
            .any(|flag| flag.starts_with("--workers"))
    });
    if nodes < 2 || named {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    Some((cores / nodes).max(1))
}

fn env_text(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|t| !t.trim().is_empty())
}

/// `SHOPKEEP_BENCH_SCALE`: `users,orders` (default 1,000,000 and 10,000,000), or 0 to skip;
/// `SHOPKEEP_BENCH_SCALE_CLUSTER` likewise (the size of its 3-node part), by default the scale run's up to
/// 300,000 users and 3,000,000 orders.
fn scale_setting(name: &str, otherwise: Option<(u32, u64)>) -> Option<(u32, u64)> {
    let Some(text) = env_text(name) else {
        return otherwise;
    };
    if text.trim() == "0" {
        return None;
    }
    let parsed = text
        .split_once(',')
        .and_then(|(u, o)| Some((u.trim().parse().ok()?, o.trim().parse().ok()?)));
    match parsed {
        Some((users, orders)) if users >= crate::USERS as u32 => Some((users, orders)),
        _ => panic!(
            "{name}: {text:?} is not `users,orders` with at least {} users (0 skips the run)",
            crate::USERS
        ),
    }
}

/// `SHOPKEEP_BENCH_SYSTEMS` (`pg,pg3,1,3`), else all; `none` runs none (only the scale run).
fn systems() -> Vec<System> {
    let text = env_text("SHOPKEEP_BENCH_SYSTEMS").unwrap_or_else(|| "pg,pg3,1,3".to_string());
    if text.trim() == "none" {
        return Vec::new();
    }
    let systems: Vec<System> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.to_ascii_lowercase().as_str() {
            "pg" | "postgres" | "postgresql" => System::Postgres(1),
            "pg3" | "postgres3" | "postgresql3" => System::Postgres(3),
            n => match n.parse::<u64>() {
                Ok(n) if (1..=9).contains(&n) => System::Shopkeep(n),
                _ => panic!(
                    "SHOPKEEP_BENCH_SYSTEMS: {s:?} is neither `pg`, `pg3` nor a number of shopkeep \
                     nodes from 1 to 9 (e.g. pg,pg3,1,3)"
                ),
            },
        })
        .collect();
    assert!(
        !systems.is_empty(),
        "SHOPKEEP_BENCH_SYSTEMS lists no system (expected e.g. pg,pg3,1,3)"
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
