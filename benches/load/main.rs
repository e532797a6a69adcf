//! Load benchmark of the purchase path, against a PostgreSQL baseline, in one command:
//!
//! ```text
//! cargo bench --bench load
//! ```
//!
//! One after the other (never at once, on the same machine), with the same users, item and levels:
//!
//! 1. **PostgreSQL** (`pg`): a throwaway server from the PostgreSQL binaries on the machine (`initdb`,
//!    `pg_ctl`; `fsync = on`, `synchronous_commit = on`) runs the same purchase as ONE stored-procedure
//!    transaction (check funds, debit, order + line, posting, entitlement upsert, idempotency row:
//!    `benches/pg/schema.sql`), driven by `pgbench` (`benches/pg/*.pgbench`). Skipped with a message
//!    if the binaries are missing. Details in `benches/load/pg.rs`.
//! 2. **PostgreSQL 3** (`pg3`): the same server as a primary with two streaming standbys on loopback,
//!    each its own data directory and port (`pg_basebackup -R`, `application_name` `s1` and `s2`, a
//!    replication slot each); the primary has `synchronous_standby_names = 'ANY 1 (s1, s2)'`,
//!    `synchronous_commit = on`, fsync on everywhere: a commit is acknowledged once it is flushed on the
//!    primary and on one standby, the durability a 3-member Raft majority gives. The run starts only
//!    when `pg_stat_replication` shows both standbys `streaming` with `sync_state` `quorum`. Same
//!    schema, seed, scripts and phases as `pg` (pgbench talks to the primary); after the phases, each
//!    standby must have replayed the primary's WAL and hold the same orders, postings and balances.
//! 3. **shopkeep, 1 node** (`1`): one `shopkeep serve` process (release build), every shard a
//!    one-voter Raft group.
//! 4. **shopkeep, 3 nodes** (`3`): three `shopkeep serve` processes on loopback forming one cluster
//!    (every shard replicated on all three, default Raft timings); the client connections are spread
//!    round-robin over the nodes as behind a load balancer, so about 2/3 of the requests reach a node
//!    that does not lead their shard and are forwarded (one hop).
//! 5. **scale** (`scale`, last): the purchase path on a shop of millions of rows, against an empty shop
//!    (`scale.rs`). A loader (`scale_load.rs`) builds a single node's data directory directly through
//!    the state machine — every row written by `apply`, in batches of 2,000 envelopes per redb
//!    transaction, no HTTP — with `users` users (credited) and `orders` completed one-step purchases
//!    spread over the past 30 days, then seeds the Raft log as `shopkeep restore` does. Reported: load
//!    time, disk bytes per user and per order (marginal), purchases/s and p99 at 64 clients and the
//!    p99 of the open loop at half the empty shop's rate, both against the empty shop (goal: within
//!    20 %), peak RSS under load (goal: ≤ 256 MiB), first start and SIGKILL-restart to ready, the audit's
//!    time, and the snapshot sent to each of two new members (time, peak RSS of sender and receiver).
//!
//! shopkeep 1 node is compared with PostgreSQL, shopkeep 3 nodes with PostgreSQL 3 (the same
//! durability: a write survives the loss of any one machine of three).
//!
//! For systems 1–4, these phases (each a warm-up that is not measured, then the measured window):
//!
//! - **purchases, closed loop**, at each concurrency level (default 1, 16, 64, 256): that many
//!   clients, each with one keep-alive HTTP/1.1 connection (per node it sends to: hyper's client
//!   connection driven in the client's own task, `http1.rs`; pgbench's clients each have one libpq
//!   connection over a Unix socket), each sending its next one-step purchase
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
//! `/proc/<pid>/clear_refs` before each phase, warm-up included); per PostgreSQL server (`pg`: the
//! one; `pg3`: primary / s1 / s2, like shopkeep's per node) the sampled peak of the summed `Pss` of its
//! postmaster and all its children. After each shopkeep system, `GET /v1/admin/audit` on every node:
//! the audit must be ok, every shard's `state_hash` equal on every node, and the orders counted equal
//! to the orders the clients saw created; PostgreSQL gets a ledger check in SQL (and `pg3` the
//! standbys' comparison above).
//!
//! Output: progress on stderr (a one-line bar on a terminal); on stdout a table per system, then the
//! summary table, completed purchases per second of the closed-loop levels:
//!
//! ```text
//! | clients | PostgreSQL | shopkeep 1 node | ratio | PostgreSQL 3 | shopkeep 3 nodes | ratio |
//! ```
//!
//! a row per level and a `best` row (each system at its own best level, the ratio of those); then a
//! small table of each system's half-peak rate and p99 (system | best level | half-peak rate | p99); the
//! targets of issue 14 with PASS / FAIL, or SKIPPED when a system they need did not run (or its
//! half-peak phase was off):
//!
//! - shopkeep 1 node ≥ PostgreSQL at every level (1, 16, 64, 256), and ≥ 3× at the best level of
//!   each (best shopkeep throughput / best PostgreSQL throughput);
//! - shopkeep 3 nodes ≥ PostgreSQL 3 at every level, and ≥ 1.5× at the best level of each;
//! - p99 at half of the peak (open loop) ≤ the comparable PostgreSQL's p99 at its half peak, and
//!   ≤ 20 ms, for 1 node (against `pg`) and 3 nodes (against `pg3`);
//! - peak RSS ≤ 256 MiB per shopkeep node; no errors but deliberate 429/503;
//!
//! one line for the correctness checks (audits, replicas, ledgers: not targets, but a failed one makes
//! every figure suspect); and one JSON document (one line, with the same summary under `summary`),
//! also written pretty to `target/bench/load.json`; the plot `target/bench/load.png` (throughput and
//! p99 against concurrency, log scale, every system in a colour of its own). The default run takes
//! about 3 minutes after the build (24 phases of 6 s, plus starts, seeding, base backups and audits),
//! then the scale run (tens of minutes at its default size, see below; `SHOPKEEP_BENCH_SCALE=0` skips
//! it), whose table (with its PASS / FAIL) comes last and goes under `scale` in the JSON.
//!
//! Settings (environment):
//!
//! - `SHOPKEEP_BENCH_SYSTEMS` — which systems, in order: `pg,pg3,1,3` (default); `pg` is PostgreSQL,
//!   `pg3` PostgreSQL with two synchronous standbys, a number a shopkeep cluster of that many nodes
//!   (1 = single node).
//! - `SHOPKEEP_BENCH_CONCURRENCY` — the closed-loop levels (default `1,16,64,256`).
//! - `SHOPKEEP_BENCH_SECONDS` — measured seconds per phase (default 5); `SHOPKEEP_BENCH_WARMUP`
//!   — warm-up seconds before each (default 1). pgbench runs whole seconds.
//! - `SHOPKEEP_BENCH_MIX` — concurrency of the mix (default 64; 0 skips it).
//! - `SHOPKEEP_BENCH_OPEN_LOOP` — connections of the half-peak phase: `best` (default: the
//!   concurrency of the system's best level), a number, or 0 to skip the phase.
//! - `SHOPKEEP_BENCH_PG_BIN` — the directory of `initdb`, `pg_ctl`, `pg_basebackup`, `pgbench`,
//!   `psql` (default: `/usr/local/bin`, `/usr/lib/postgresql/<newest>/bin`, `PATH`).
//! - `SHOPKEEP_BENCH_SCALE` — the scale run's `users,orders` (default `1000000,10000000`; `0` skips
//!   it); `SHOPKEEP_BENCH_SCALE_CLUSTER` — the size of its 3-node part (default: the same, at most
//!   300,000 users and 3,000,000 orders; a smaller
//!   `users,orders` loads a shop of its own for it; `0` skips it). `SHOPKEEP_BENCH_SYSTEMS=none` runs
//!   the scale run alone. Its disk: about 0.9 KB per order for the loaded node (884 B at 10M orders:
//!   9.3 GiB with the users), 6.5 GiB more for its snapshot files (16 GB in all at 10M), and for the 3-node
//!   part three copies and the snapshots: at 10M orders that is beyond 25 GB, so give the 3-node part a
//!   smaller size there. Its time: the loader wrote 10M orders in 21 minutes on the busy 2-core VM.
//! - `SHOPKEEP_BENCH_ROUTE` — where a cluster's closed-loop purchases go: `spread` (default, round-robin
//!   over the nodes as behind a load balancer) or `leader` (to the node leading the user's shard at the
//!   level's start, as a client that asks `GET /v1/cluster/route/{user_id}` would; a note says so).
//! - `SHOPKEEP_BENCH_SHARDS` — `--shards` of every node of the shopkeep systems (`1`, `3`…) (default: the server's
//!   own default, 3).
//! - `SHOPKEEP_BENCH_SERVER_ARGS` — more flags for every `shopkeep serve` it starts, split at whitespace
//!   (e.g. `--cache-mib 64`; the servers never inherit the caller's `SHOPKEEP_*` variables).
//! - `SHOPKEEP_BENCH_SERVER_LOG` — the servers' `RUST_LOG` (default `warn`, without the access log;
//!   `info`, an operator's default, writes a line per request to the node's stderr file in its
//!   temporary directory).
//! - `SHOPKEEP_BENCH_OUT` — where `load.json` and `load.png` go (default `target/bench`).
//!
//! ```text
//! SHOPKEEP_BENCH_SYSTEMS=1 SHOPKEEP_BENCH_SECONDS=3 cargo bench --bench load
//! SHOPKEEP_BENCH_SYSTEMS=3 SHOPKEEP_BENCH_CONCURRENCY=16,64 cargo bench --bench load
//! SHOPKEEP_BENCH_SYSTEMS=pg3,3 cargo bench --bench load     # the replicated pair only
//! SHOPKEEP_BENCH_SYSTEMS=none SHOPKEEP_BENCH_SCALE=100000,1000000 cargo bench --bench load
//! ```
//!
//! Keep in mind that the servers and the load generator share the machine's cores (the HTTP client
//! here costs more CPU per request than pgbench does per transaction), so absolute numbers depend on
//! the machine; the ratios are the point. Like shopkeep's 3 nodes, PostgreSQL 3's three servers share
//! the machine's cores and disk. All processes are stopped and their directories removed when the
//! benchmark ends, panics and Ctrl-C included.
//!
//! Where things are: `settings.rs` (the variables above), `nodes.rs` (the shopkeep processes, started
//! by `tests/it/launcher.rs`, which the integration tests share),
//! `seed.rs`, `shopkeep.rs` (its phases: the load generator), `requests.rs`, `audit.rs`;
//! `postgres.rs` (the baselines' phases) over `pg.rs` (the PostgreSQL servers, standbys and pgbench);
//! `scale.rs` (the scale run) over `scale_load.rs` (its loader);
//! `stats.rs`, `results.rs`, `cpu.rs`, `disk.rs` (the durable-write probe), `cores.rs` (the CPU loop
//! probe), `report.rs`, `plot.rs` (the output); `progress.rs`, `interrupt.rs` (Ctrl-C).

// A benchmark converts counts to rates, percentiles and plot coordinates, and a broken setup may panic:
// the workspace's cast and unwrap lints guard the service, not its measuring tools.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_lossless
)]

mod audit;
mod cores;
mod cpu;
mod disk;
mod http1;
mod interrupt;
// The integration tests' launcher of `shopkeep serve` processes, the same file rather than a copy; the
// tests use parts of it (the non-blocking wait, SIGTERM) that the bench does not.
#[path = "../../tests/it/launcher.rs"]
#[expect(dead_code, reason = "shared with tests/it, which use all of it")]
mod launcher;
mod nodes;
mod pg;
mod plot;
mod postgres;
mod progress;
mod report;
mod requests;
mod results;
mod scale;
mod scale_load;
mod seed;
mod settings;
mod shopkeep;
mod stats;

use std::time::{Duration, Instant};

use crate::cores::CoreSpeed;
use crate::cpu::CpuSample;
use crate::disk::DiskSync;
use crate::interrupt::run_interrupt_cleanups;
use crate::nodes::Nodes;
use crate::postgres::run_postgres;
use crate::progress::Progress;
use crate::report::print_report;
use crate::scale::run_scale;
use crate::settings::{Settings, System};
use crate::shopkeep::drive_shopkeep;

const ADMIN_TOKEN: &str = "bench-admin-token-5c1e0a9b8d7f6e5d4c3b";
const SERVICE_TOKEN: &str = "bench-service-token-9e8d7c6b5a4f3e2d1c0b";
/// Enough users that concurrent workers rarely buy for the same one (and so rarely contend on a wallet).
const USERS: usize = 512;
/// Every user's starting credit, in minor units (100,000.00).
const CREDIT_MINOR: u64 = 10_000_000;
/// How many seeding requests are in flight at once.
const SEED_PARALLELISM: usize = 32;
/// The open-loop phase's rate, as a share of the best closed-loop throughput.
const HALF_PEAK: f64 = 0.5;

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

    // One worker: the load's tasks then never wake each other across threads, and the generator takes
    // ~14 µs of CPU per purchase at 256 clients (0.2 of a core at 14,700/s), ~52 µs at one client,
    // against 23 and 80 µs with two workers and the pooled client (docs/BENCHMARKS.md, twenty-second
    // session). Still the multi-thread scheduler: the scale run's loader leaves it through
    // `block_in_place`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
        settle(&system.label());
        let disk = probe_disk(&system.label());
        let cores = probe_cores(&system.label());
        let cpu_before = CpuSample::take();
        let mut report = match system {
            System::Postgres(servers) => run_postgres(system, servers, &settings, &progress),
            System::Shopkeep(count) => {
                let spawned = Instant::now();
                let nodes = Nodes::start(count, settings.shards);
                for node in &nodes.nodes {
                    eprintln!(
                        "{}: node {} listening on {} (pid {})",
                        system.label(),
                        node.id,
                        node.base_url,
                        node.process.pid()
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
        report.disk = disk;
        report.cores = Some(cores);
        reports.push(report);
    }
    let scale = settings
        .scale
        .map(|(users, orders)| runtime.block_on(run_scale(&settings, users, orders)));
    drop(runtime);

    let wall = started.elapsed();
    print_report(&settings, &reports, scale.as_ref(), wall);
}

/// Lets the disk settle before `label`'s load starts: writes back what came before it from the page
/// cache (`sync`) and waits a moment, so that no load's fsyncs queue behind another's leftovers (the
/// removal of PostgreSQL's data directories, the files of the system before, a loaded shop's files).
/// Prints what was left to write back, and the memory the kernel had available.
pub(crate) fn settle(label: &str) {
    let started = Instant::now();
    let before = page_cache_summary();
    let synced = std::process::Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(2));
    eprintln!(
        "{label}: disk settled before the start ({}, {:.1}s; before it: {before})",
        match synced {
            Ok(status) if status.success() => "sync ok",
            _ => "no sync",
        },
        started.elapsed().as_secs_f64()
    );
}

/// Times durable writes in the directory the servers' data goes to ([`DiskSync`]) and prints the
/// result under `label`: what every server of the run to come will wait on.
pub(crate) fn probe_disk(label: &str) -> Option<DiskSync> {
    match DiskSync::probe(&std::env::temp_dir()) {
        Ok(sync) => {
            eprintln!("{label}: {}", sync.describe());
            Some(sync)
        }
        Err(error) => {
            eprintln!("{label}: the durable-write probe failed: {error}");
            None
        }
    }
}

/// Times a fixed CPU loop alone and on every core at once ([`CoreSpeed`]) and prints the result under
/// `label`: what the machine's cores gave right before the run to come.
pub(crate) fn probe_cores(label: &str) -> CoreSpeed {
    let cores = CoreSpeed::probe();
    eprintln!("{label}: {}", cores.describe());
    cores
}

/// Dirty and under-writeback page cache, and the memory available, from `/proc/meminfo`.
fn page_cache_summary() -> String {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mib = |field: &str| {
        nodes::kib_field(&meminfo, field)
            .map_or_else(|| "?".to_owned(), |kib| (kib / 1024).to_string())
    };
    format!(
        "dirty {} MiB, writeback {} MiB, available {} MiB",
        mib("Dirty"),
        mib("Writeback"),
        mib("MemAvailable")
    )
}
