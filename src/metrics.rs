//! What `GET /metrics` serves (Prometheus text format): the one list of the application's metric names and
//! their descriptions (the replication layer names its own in `shopkeep_raft::metrics`, described from
//! here), the exporter's setup (latencies as histograms with fixed buckets, never summaries), every
//! counter registered at 0 for its known label sets, and the gauges read from the cluster and from
//! `/proc/self` just before each scrape, and the upkeep that drains the exporter's histograms whether or
//! not anyone scrapes.
//!
//! Labels take bounded values only: shard numbers, node ids, command names, the HTTP method (one of
//! GET/POST/PUT/DELETE/other) and the route template.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use shopkeep_raft::{Cluster, ClusterStatus, NodeId};

use crate::domain::Command;
use crate::state::CacheUse;

pub const HTTP_REQUESTS: &str = "shopkeep_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "shopkeep_http_request_duration_seconds";
pub const HTTP_CONNECTIONS: &str = "shopkeep_http_connections";
pub const HTTP_CONNECTIONS_REFUSED: &str = "shopkeep_http_connections_refused_total";
/// The `reason` label of [`HTTP_CONNECTIONS_REFUSED`] (`http::listener`).
pub const CONNECTION_REFUSALS: [&str; 2] = ["total", "per_peer"];
pub const NODE_TRAFFIC_REFUSED: &str = "shopkeep_node_traffic_refused_total";
pub const COMMANDS: &str = "shopkeep_commands_total";
pub const SHARD_OVERLOADED: &str = "shopkeep_shard_overloaded_total";
pub const APPLY_BATCH_SIZE: &str = "shopkeep_apply_batch_size";
pub const APPLY_SECONDS: &str = "shopkeep_apply_seconds";
pub const EXPIRED_ORDERS: &str = "shopkeep_expired_orders_total";
pub const EXPIRED_TOPUPS: &str = "shopkeep_expired_topups_total";
pub const PURGED_IDEMPOTENCY_RECORDS: &str = "shopkeep_purged_idempotency_records_total";
pub const PURGED_TOPUPS: &str = "shopkeep_purged_topups_total";
pub const PURGED_EVENTS: &str = "shopkeep_purged_events_total";
pub const DROPPED_EVENTS: &str = "shopkeep_dropped_events_total";
pub const LIMIT_EXCEEDED: &str = "shopkeep_limit_exceeded_total";
pub const WEBHOOK_DELIVERIES: &str = "shopkeep_webhook_deliveries_total";
pub const WEBHOOK_FAILURES: &str = "shopkeep_webhook_failures_total";
pub const WEBHOOK_DELIVERY_SECONDS: &str = "shopkeep_webhook_delivery_seconds";
pub const WEBHOOK_LAG: &str = "shopkeep_webhook_lag_events";
pub const CLOCK_AGREES: &str = "shopkeep_clock_agrees";
pub const PEER_CLOCK_OFFSET: &str = "shopkeep_peer_clock_offset_seconds";
/// Set by `shopkeep_faults::disk::DiskHealth` (which names it itself).
pub const STORAGE_FULL: &str = "shopkeep_storage_full";
pub const BUILD_INFO: &str = "shopkeep_build_info";
pub const RUNTIME_WORKERS: &str = "shopkeep_runtime_workers";
pub const SHARD_IS_LEADER: &str = "shopkeep_shard_is_leader";
pub const RAFT_TERM: &str = "shopkeep_raft_term";
pub const RAFT_APPLIED_INDEX: &str = "shopkeep_raft_applied_index";
pub const RAFT_FOLLOWER_LAG: &str = "shopkeep_raft_follower_lag_entries";
pub const PEER_UP: &str = "shopkeep_peer_up";
pub const SHARD_CACHE_CAPACITY: &str = "shopkeep_shard_cache_capacity_bytes";
pub const SHARD_CACHE_USED: &str = "shopkeep_shard_cache_used_bytes";
pub const SHARD_CACHE_READS: &str = "shopkeep_shard_cache_reads_total";
pub const SHARD_CACHE_EVICTIONS: &str = "shopkeep_shard_cache_evictions_total";
pub const SHARD_DURABLE_COMMITS: &str = "shopkeep_shard_durable_commits_total";
pub const LOG_LINES_DROPPED: &str = "shopkeep_log_lines_dropped_total";
/// The process's resident memory and open files, under the names Prometheus' client libraries use.
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";

/// Upper bounds of the latency buckets, in seconds: 0.1 ms (an apply, a log commit, a node call served
/// take a few hundred µs) to 10 s (the longest a request waits).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Upper bounds of the buckets of counts (commands per batch, operations per commit).
const SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

const COUNTERS: [(&str, &str); 18] = [
    (
        HTTP_REQUESTS,
        "HTTP requests answered, by method, route template and status",
    ),
    (
        HTTP_CONNECTIONS_REFUSED,
        "Client connections closed at once for being over --max-connections (total) or --max-connections-per-peer (per_peer)",
    ),
    (
        NODE_TRAFFIC_REFUSED,
        "Node-to-node calls refused: bad signature, replayed nonce or a timestamp too far off",
    ),
    (COMMANDS, "Commands applied through this node, by command"),
    (
        SHARD_OVERLOADED,
        "Writes refused with 429 because the shard's queue on this node was full (--queue-capacity)",
    ),
    (
        EXPIRED_ORDERS,
        "PENDING orders cancelled by the sweeper for passing their expires_at",
    ),
    (EXPIRED_TOPUPS, "PENDING top-ups expired by the sweeper"),
    (
        PURGED_IDEMPOTENCY_RECORDS,
        "Stored idempotency outcomes purged after --idempotency-ttl",
    ),
    (
        PURGED_TOPUPS,
        "EXPIRED and FAILED top-ups purged after --topup-retention",
    ),
    (
        PURGED_EVENTS,
        "Events purged after --event-retention (or the 30-day longest retention)",
    ),
    (
        DROPPED_EVENTS,
        "Events purged at the 30-day longest retention before a webhook acknowledged them",
    ),
    (
        LIMIT_EXCEEDED,
        "Commands refused with 409 limit_exceeded through this node, by limit (max_spend_per_day, max_orders_per_hour, max_pending_topups, max_refunds_per_30_days)",
    ),
    (
        WEBHOOK_DELIVERIES,
        "Events delivered (answered 2xx) by webhook, by the shards this node leads",
    ),
    (
        WEBHOOK_FAILURES,
        "Failed delivery attempts by webhook (each is retried after a back-off)",
    ),
    (
        SHARD_CACHE_READS,
        "Page reads of the shard file by where they were found: result=hit in its page cache, miss read from the file (since the file was opened)",
    ),
    (
        SHARD_CACHE_EVICTIONS,
        "Pages evicted from the shard file's full page cache (since the file was opened)",
    ),
    (
        SHARD_DURABLE_COMMITS,
        "Applies of a shard committed durably (with an fsync of its file; the others wait for the next, at most --durable-every later) since the file was opened",
    ),
    (
        LOG_LINES_DROPPED,
        "Log lines dropped because stderr did not keep up and the queue to it (8,192 lines) was full",
    ),
];

const GAUGES: [(&str, &str); 16] = [
    (
        WEBHOOK_LAG,
        "Events of a shard this node leads not yet acknowledged by a webhook, by webhook and shard",
    ),
    (
        HTTP_CONNECTIONS,
        "Connections open now, by listener: client (--listen, node traffic too unless --node-listen), node, metrics",
    ),
    (
        CLOCK_AGREES,
        "1 while this node's clock agrees with a majority of the members' (within 2 s), else 0: it then takes no writes",
    ),
    (
        PEER_CLOCK_OFFSET,
        "The peer's clock minus this node's, from the latest node call either way",
    ),
    (
        STORAGE_FULL,
        "1 while the file (or the data directory's file system, below its reserve) is full: writes are refused",
    ),
    (
        BUILD_INFO,
        "Always 1; the version label says which build runs",
    ),
    (
        RUNTIME_WORKERS,
        "Threads of the async runtime that run requests, Raft and applies (--workers; by default one per core)",
    ),
    (
        SHARD_IS_LEADER,
        "1 while this node leads the shard's Raft group, else 0",
    ),
    (
        RAFT_TERM,
        "The shard's current Raft term as this node knows it",
    ),
    (
        RAFT_APPLIED_INDEX,
        "The index of the last log entry this node applied to the shard",
    ),
    (
        RAFT_FOLLOWER_LAG,
        "On the shard's leader: entries the follower's log is behind the leader's (0 once this node no longer leads)",
    ),
    (
        PEER_UP,
        "1 when this node heard from the member within 5 s (a call either way), else 0",
    ),
    (
        SHARD_CACHE_CAPACITY,
        "The shard file's page cache: its size in bytes (--cache-mib split among the node's shards)",
    ),
    (
        SHARD_CACHE_USED,
        "Bytes the shard file's page cache holds now (pages read, and pages written since the last durable commit)",
    ),
    (
        PROCESS_RSS,
        "Resident memory of the process in bytes (VmRSS)",
    ),
    (PROCESS_OPEN_FDS, "File descriptors the process has open"),
];

const HISTOGRAMS: [(&str, &str); 4] = [
    (
        HTTP_REQUEST_DURATION,
        "Time from a request's head to its answer, by method and route template",
    ),
    (
        APPLY_BATCH_SIZE,
        "Commands applied in one transaction of a shard",
    ),
    (
        APPLY_SECONDS,
        "Time of one apply transaction of a shard: its commands, the marker and the commit",
    ),
    (
        WEBHOOK_DELIVERY_SECONDS,
        "Time from an event's change to its webhook's 2xx (first delivery; a retry counts from the change)",
    ),
];

/// How often the exporter's histograms are drained. The exporter holds every sample recorded since the
/// last drain (8 bytes each, ~15 per purchase), so this bounds that memory by the samples of a second,
/// and each drain's work by a second's samples.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Why the exporter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Exporter(#[from] BuildError),
    #[error("cannot start the metrics upkeep thread: {0}")]
    Upkeep(std::io::Error),
}

/// The exporter's handle, its upkeep and what the last refresh published.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Labelled gauges that go stale when the cluster changes: set to 0 once they are no longer true.
    published: Mutex<Published>,
    _upkeep: Upkeep,
}

#[derive(Default)]
struct Published {
    /// (shard, follower) pairs whose lag this node published as their leader.
    lags: BTreeSet<(u32, NodeId)>,
    peers: BTreeSet<NodeId>,
}

impl Metrics {
    /// Installs the process-wide recorder, starts its upkeep, describes every family and registers what
    /// can be known at start (counters at 0, histograms empty, the build). Once per process.
    pub fn install(shards: u32) -> Result<Metrics, InstallError> {
        let handle = exporter()?.install_recorder()?;
        let upkeep = keep_up(handle.clone(), UPKEEP_EVERY).map_err(InstallError::Upkeep)?;
        describe();
        shopkeep_raft::metrics::describe();
        register_counters(shards);
        for shard in 0..shards {
            let _registered = metrics::histogram!(APPLY_BATCH_SIZE, "shard" => shard.to_string());
            let _registered = metrics::histogram!(APPLY_SECONDS, "shard" => shard.to_string());
        }
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            metrics::gauge!(RUNTIME_WORKERS).set(runtime.metrics().num_workers() as f64);
        }
        Ok(Metrics {
            handle,
            published: Mutex::new(Published::default()),
            _upkeep: upkeep,
        })
    }

    /// The text of a scrape, its gauges read from `cluster`, the shards' page `caches` and
    /// `durable_commits` (in shard order) and the process now.
    pub fn render(
        &self,
        cluster: &Cluster,
        caches: &[CacheUse],
        durable_commits: &[u64],
    ) -> String {
        self.refresh_cluster(cluster);
        publish_caches(caches);
        for (shard, commits) in (0u32..).zip(durable_commits) {
            metrics::counter!(SHARD_DURABLE_COMMITS, "shard" => shard.to_string())
                .absolute(*commits);
        }
        metrics::counter!(LOG_LINES_DROPPED).absolute(crate::logging::dropped_lines());
        refresh_process();
        self.handle.render()
    }

    /// Publishes the cluster's gauges, and sets to 0 the labelled ones it no longer publishes (one scrape
    /// at a time, so two never retire what the other just set).
    fn refresh_cluster(&self, cluster: &Cluster) {
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let status = cluster.status();
        publish_clock(cluster);
        let lags = publish_shards(&status);
        let peers = publish_peers(cluster, &status);
        for (shard, follower) in published.lags.difference(&lags) {
            metrics::gauge!(RAFT_FOLLOWER_LAG, "shard" => shard.to_string(), "follower" => follower.to_string())
                .set(0.0);
        }
        for peer in published.peers.difference(&peers) {
            metrics::gauge!(PEER_UP, "peer" => peer.to_string()).set(0.0);
        }
        *published = Published { lags, peers };
    }
}

/// The exporter's setup: latencies and sizes as histograms with fixed buckets.
fn exporter() -> Result<PrometheusBuilder, BuildError> {
    let mut builder = PrometheusBuilder::new().set_buckets(&LATENCY_BUCKETS)?;
    for name in shopkeep_raft::metrics::SIZES
        .into_iter()
        .chain([APPLY_BATCH_SIZE])
    {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), &SIZE_BUCKETS)?;
    }
    Ok(builder)
}

/// Drains the exporter's histograms into their buckets every `every`, on a thread of its own, until
/// the returned [`Upkeep`] is dropped. The exporter does so only at a scrape or an upkeep
/// (`install_recorder` leaves the upkeep to its caller): without this, a node nobody scrapes keeps every
/// sample it ever recorded, ~100 bytes per purchase, until it runs out of memory. A drain folds every
/// sample since the last one into the buckets: on a runtime worker it would hold up the requests queued
/// behind it, so it has its own thread. The drained samples are
/// freed through crossbeam's epoch collector, which keeps up to 64 deferred frees per thread before it
/// looks at them; flushing this thread's hands them over at once.
fn keep_up(handle: PrometheusHandle, every: Duration) -> std::io::Result<Upkeep> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::park_timeout(every);
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                handle.run_upkeep();
                crossbeam_epoch::pin().flush();
            }
        })
        .map(|thread| Upkeep { stop, thread })
}

/// The upkeep thread; dropping this stops it.
struct Upkeep {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
    }
}

/// Registers the request counter (at 0) and the latency histogram of one operation, for each status it
/// may answer (as the OpenAPI document lists them), so both exist before its first request.
pub fn register_requests<'a>(
    method: &'static str,
    route: &str,
    statuses: impl IntoIterator<Item = &'a String>,
) {
    for status in statuses {
        metrics::counter!(HTTP_REQUESTS, "method" => method, "route" => route.to_owned(), "status" => status.clone())
            .increment(0);
    }
    let _registered =
        metrics::histogram!(HTTP_REQUEST_DURATION, "method" => method, "route" => route.to_owned());
}

fn describe() {
    for (name, help) in COUNTERS {
        metrics::describe_counter!(name, help);
    }
    for (name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
    }
    for (name, help) in HISTOGRAMS {
        metrics::describe_histogram!(name, help);
    }
}

/// Every counter at 0, for each of its label sets known at start (the requests' come from the router).
fn register_counters(shards: u32) {
    for name in [
        NODE_TRAFFIC_REFUSED,
        EXPIRED_ORDERS,
        EXPIRED_TOPUPS,
        PURGED_IDEMPOTENCY_RECORDS,
        PURGED_TOPUPS,
        PURGED_EVENTS,
        DROPPED_EVENTS,
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in CONNECTION_REFUSALS {
        metrics::counter!(HTTP_CONNECTIONS_REFUSED, "reason" => reason).increment(0);
    }
    for command in Command::NAMES {
        metrics::counter!(COMMANDS, "command" => command).increment(0);
    }
    for limit in crate::domain::limits::LIMIT_NAMES {
        metrics::counter!(LIMIT_EXCEEDED, "limit" => limit).increment(0);
    }
    for shard in 0..shards {
        metrics::counter!(SHARD_OVERLOADED, "shard" => shard.to_string()).increment(0);
    }
}

fn publish_clock(cluster: &Cluster) {
    let verdict = cluster.clock_verdict();
    metrics::gauge!(CLOCK_AGREES).set(flag(verdict.agrees));
    for (peer, offset_ms) in &verdict.offsets_ms {
        metrics::gauge!(PEER_CLOCK_OFFSET, "peer" => peer.to_string())
            .set(*offset_ms as f64 / 1000.0);
    }
}

/// Publishes whether each member of any shard (voters and learners) other than this node was heard from
/// recently; returns those members.
fn publish_peers(cluster: &Cluster, status: &ClusterStatus) -> BTreeSet<NodeId> {
    let mut members: BTreeSet<NodeId> = status
        .shards
        .iter()
        .flat_map(|shard| shard.voters.iter().chain(&shard.learners))
        .copied()
        .collect();
    members.remove(&status.node_id);
    for peer in &members {
        metrics::gauge!(PEER_UP, "peer" => peer.to_string())
            .set(flag(cluster.clock().heard_recently(*peer)));
    }
    members
}

/// Publishes each shard's leadership, term, applied index and (on its leader) follower lags; returns
/// the (shard, follower) pairs published.
fn publish_shards(status: &ClusterStatus) -> BTreeSet<(u32, NodeId)> {
    let mut lags = BTreeSet::new();
    for shard in &status.shards {
        let label = shard.shard.to_string();
        metrics::gauge!(SHARD_IS_LEADER, "shard" => label.clone())
            .set(flag(shard.role == "leader"));
        metrics::gauge!(RAFT_TERM, "shard" => label.clone()).set(shard.term as f64);
        metrics::gauge!(RAFT_APPLIED_INDEX, "shard" => label.clone())
            .set(shard.applied_index.unwrap_or(0) as f64);
        if shard.role != "leader" {
            continue;
        }
        for (follower, lag) in &shard.lag {
            let Some(lag) = lag else { continue };
            metrics::gauge!(RAFT_FOLLOWER_LAG, "shard" => label.clone(), "follower" => follower.to_string())
                .set(*lag as f64);
            lags.insert((shard.shard, *follower));
        }
    }
    lags
}

/// Publishes each shard's page cache: size and use (gauges), reads that hit or missed and evictions
/// since the file was opened (counters).
fn publish_caches(caches: &[CacheUse]) {
    for (shard, cache) in (0u32..).zip(caches) {
        let label = shard.to_string();
        metrics::gauge!(SHARD_CACHE_CAPACITY, "shard" => label.clone())
            .set(cache.capacity_bytes as f64);
        metrics::gauge!(SHARD_CACHE_USED, "shard" => label.clone()).set(cache.used_bytes as f64);
        metrics::counter!(SHARD_CACHE_READS, "shard" => label.clone(), "result" => "hit")
            .absolute(cache.read_hits);
        metrics::counter!(SHARD_CACHE_READS, "shard" => label.clone(), "result" => "miss")
            .absolute(cache.read_misses);
        metrics::counter!(SHARD_CACHE_EVICTIONS, "shard" => label).absolute(cache.evictions);
    }
}

fn refresh_process() {
    if let Some(bytes) = resident_bytes() {
        metrics::gauge!(PROCESS_RSS).set(bytes as f64);
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        // Less the descriptor that reads the directory.
        let open = entries.count().saturating_sub(1);
        metrics::gauge!(PROCESS_OPEN_FDS).set(open as f64);
    }
}

/// `VmRSS` of `/proc/self/status`, in bytes (`None` off Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

fn flag(on: bool) -> f64 {
    if on { 1.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn every_family_is_described_once() {
        let mut names: Vec<&str> = COUNTERS
            .iter()
            .chain(&GAUGES)
            .chain(&HISTOGRAMS)
            .map(|(name, _)| *name)
            .collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a family described twice");
    }

    /// Counts what this test binary allocates and frees (every test's: a measuring test runs `alone`), so
    /// that a test can see what the exporter keeps.
    struct Counting;

    static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
    static FREED: AtomicUsize = AtomicUsize::new(0);

    #[global_allocator]
    static COUNTING: Counting = Counting;

    // SAFETY: every call is passed to the system allocator unchanged; only the sizes are counted.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            FREED.fetch_add(layout.size(), Ordering::Relaxed);
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    /// Bytes held on the heap now.
    fn heap_bytes() -> i128 {
        let allocated = i128::try_from(ALLOCATED.load(Ordering::Relaxed)).unwrap_or(i128::MAX);
        let freed = i128::try_from(FREED.load(Ordering::Relaxed)).unwrap_or(i128::MAX);
        allocated - freed
    }

    /// Set in the child process `alone` starts: the test runs its body there.
    const ALONE: &str = "SHOPKEEP_TEST_ALONE";

    /// Whether this process should run the test `name` (of this module) itself: in the test binary's own
    /// run it starts a child of the same binary running that test alone, asserts that it ran and
    /// passed, and answers false. The heap counters are the whole process's, so other tests allocating
    /// beside a measurement (or a busy machine slowing them) would blur it.
    fn alone(name: &str) -> bool {
        if std::env::var_os(ALONE).is_some() {
            return true;
        }
        let module = module_path!().split_once("::").map_or("", |(_, path)| path);
        let test = format!("{module}::{name}");
        let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([test.as_str(), "--exact", "--test-threads=1"])
            .env(ALONE, "1")
            .output()
            .expect("the test binary runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{test} alone: {}\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        false
    }

    #[test]
    fn samples_nobody_scraped_are_released_by_the_upkeep() {
        const SAMPLES: usize = 4_000_000;
        /// What the samples take as `f64`s.
        const SAMPLE_BYTES: i128 = SAMPLES as i128 * 8;
        if !alone("samples_nobody_scraped_are_released_by_the_upkeep") {
            return;
        }
        let recorder = exporter().expect("the exporter's setup").build_recorder();
        let handle = recorder.handle();
        let before = heap_bytes();
        metrics::with_local_recorder(&recorder, || {
            let histogram = metrics::histogram!(HTTP_REQUEST_DURATION, "route" => "/test");
            for i in 0..SAMPLES {
                histogram.record(i as f64 * 1e-6);
            }
        });
        let recorded = heap_bytes() - before;
        assert!(
            recorded >= SAMPLE_BYTES / 2,
            "the exporter holds unscraped samples ({recorded} bytes held after {SAMPLES} samples)"
        );

        let upkeep = keep_up(handle, Duration::from_millis(10)).expect("the upkeep thread");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut held = recorded;
        // Alone in its process, but the exporter's own bookkeeping stays: a quarter of what the samples took.
        while held > recorded / 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            held = heap_bytes() - before;
        }
        drop(upkeep);
        assert!(
            held <= recorded / 4,
            "{held} bytes still held 5 s into the upkeep ({recorded} after recording)"
        );
    }

    #[test]
    fn the_resident_memory_is_read_from_proc() {
        let bytes = resident_bytes().expect("VmRSS on Linux");
        assert!(bytes > 1024 * 1024, "{bytes} bytes resident");
    }
}
