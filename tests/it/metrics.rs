//! `/metrics`, black-box: what a scrape of a real server (and of a real 3-node cluster) holds, the
//! second address of `--metrics-listen`, and that the Grafana dashboard and the Prometheus alert rules in
//! `deploy/` use only series the server serves.
//!
//! The exposition text is parsed here, by a few lines: `prometheus-parse` cuts label values at a `}`,
//! and every route label holds one (`/v1/users/{user_id}`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use crate::cluster_harness::*;
use crate::harness::*;

/// One scrape: `# HELP` and `# TYPE` lines by family, and the samples.
#[derive(Debug, Default)]
pub(crate) struct Scrape {
    help: BTreeSet<String>,
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(!help.trim().is_empty(), "empty help: {line}");
                scrape.help.insert(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                scrape.types.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') {
                scrape.samples.push(parse_sample(line));
            }
        }
        scrape
    }

    /// The family a sample belongs to (`x_bucket`, `x_sum`, `x_count` of histogram `x` → `x`).
    fn family_of(&self, sample: &str) -> Option<String> {
        if self.types.contains_key(sample) {
            return Some(sample.to_owned());
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| sample.strip_suffix(suffix))
            .find(|base| self.types.get(*base).is_some_and(|t| t == "histogram"))
            .map(str::to_owned)
    }

    /// The value of the one sample of `name` with exactly these labels.
    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// The samples of `name` whose label `key` is `value`, summed over their other labels.
    pub(crate) fn sum_where(&self, name: &str, key: &str, value: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.labels.get(key).is_some_and(|v| v == value))
            .map(|s| s.value)
            .sum()
    }

    /// Every sample of `name` (any labels).
    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The samples of `name` summed over every label set (a counter's total over its shards, say).
    pub(crate) fn sum(&self, name: &str) -> f64 {
        self.all(name).iter().map(|s| s.value).sum()
    }
}

/// `name{k="v",…} value`: label values may hold `{`, `}`, `,` and escaped quotes.
fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).expect("a sample has a value");
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inner.split_once("=\"").expect("label key=\"");
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().expect("a closing quote") {
                    (_, '\\') => value.push(chars.next().expect("escaped char").1),
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.trim_start_matches(',').to_owned(), value);
            inner = after[end + 1..].trim_start_matches(',');
        }
    }
    let text = rest.split_whitespace().next().expect("a value");
    let value = match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => text
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}")),
    };
    Sample {
        name,
        labels,
        value,
    }
}

/// `GET {base}/metrics`, checked to be Prometheus text, parsed.
pub(crate) async fn scrape(base: &str) -> Scrape {
    let response = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scrape");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    Scrape::parse(&response.text().await.expect("body"))
}

/// Every family has `# HELP` and `# TYPE`, no sample is outside a typed family, latencies are histograms
/// with buckets from 0.1 ms to 10 s (and +Inf), and nothing is a summary.
fn assert_well_formed(scrape: &Scrape) {
    for sample in &scrape.samples {
        let family = scrape
            .family_of(&sample.name)
            .unwrap_or_else(|| panic!("{} has no # TYPE", sample.name));
        assert!(scrape.help.contains(&family), "{family} has no # HELP");
    }
    for (family, kind) in &scrape.types {
        assert_ne!(kind, "summary", "{family} is a summary");
        if family.ends_with("_seconds") && kind != "gauge" {
            assert_eq!(kind, "histogram", "{family}: latencies are histograms");
        }
        if kind == "histogram" {
            let bucket = format!("{family}_bucket");
            assert!(
                scrape
                    .all(&bucket)
                    .iter()
                    .any(|s| s.labels.get("le").is_some_and(|le| le == "+Inf")),
                "{family} has no le=+Inf bucket"
            );
        }
        if kind == "histogram" && family.ends_with("_seconds") {
            // the contract's bounds: sub-millisecond work (an apply, a log commit) is told apart
            let bucket = format!("{family}_bucket");
            for bound in ["0.0001", "10"] {
                assert!(
                    scrape
                        .all(&bucket)
                        .iter()
                        .any(|s| s.labels.get("le").is_some_and(|le| le == bound)),
                    "{family} has no le={bound} bucket"
                );
            }
        }
    }
}

#[tokio::test]
async fn metrics_describe_every_family_start_counters_at_zero_and_time_with_histograms() {
    let port = free_port();
    let second = format!("http://127.0.0.1:{port}");
    let srv = Server::start_with(
        Opts::new()
            .shards(2)
            .env("SHOPKEEP_METRICS_LISTEN", &format!("127.0.0.1:{port}")),
    )
    .await;
    let first = scrape(&srv.api().base).await;
    assert_well_formed(&first);
    let zero_at_start = [
        ("shopkeep_commands_total", vec![("command", "credit")]),
        ("shopkeep_commands_total", vec![("command", "refund")]),
        ("shopkeep_shard_overloaded_total", vec![("shard", "1")]),
        ("shopkeep_expired_orders_total", vec![]),
        ("shopkeep_purged_idempotency_records_total", vec![]),
        ("shopkeep_node_traffic_refused_total", vec![]),
        ("shopkeep_log_lines_dropped_total", vec![]),
        (
            "shopkeep_http_connections_refused_total",
            vec![("reason", "per_peer")],
        ),
        (
            "shopkeep_http_requests_total",
            vec![
                ("method", "POST"),
                ("route", "/v1/users/{user_id}/credits"),
                ("status", "201"),
            ],
        ),
        (
            "shopkeep_http_request_duration_seconds_count",
            vec![("method", "POST"), ("route", "/v1/users/{user_id}/credits")],
        ),
        ("shopkeep_raft_proposal_seconds_count", vec![]),
    ];
    for (name, labels) in &zero_at_start {
        assert_eq!(first.value(name, labels), Some(0.0), "{name} {labels:?}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        first.value("shopkeep_build_info", &[("version", version)]),
        Some(1.0)
    );
    for shard in ["0", "1"] {
        let shard = [("shard", shard)];
        assert_eq!(first.value("shopkeep_shard_is_leader", &shard), Some(1.0));
        assert!(first.value("shopkeep_raft_term", &shard) >= Some(1.0));
        assert!(first.value("shopkeep_raft_applied_index", &shard) >= Some(1.0));
    }
    assert!(first.value("process_resident_memory_bytes", &[]) > Some(1e6));
    assert!(first.value("process_open_fds", &[]) > Some(3.0));
    assert_eq!(first.value("shopkeep_clock_agrees", &[]), Some(1.0));
    assert!(
        first
            .all("shopkeep_storage_full")
            .iter()
            .all(|s| s.value == 0.0)
            && !first.all("shopkeep_storage_full").is_empty(),
        "{:?}",
        first.all("shopkeep_storage_full")
    );

    srv.create_user("m1").await;
    srv.credit("m1", "5.00").await;
    let after = scrape(&srv.api().base).await;
    assert!(after.value("shopkeep_commands_total", &[("command", "credit")]) >= Some(1.0));
    let credits = [
        ("method", "POST"),
        ("route", "/v1/users/{user_id}/credits"),
        ("status", "201"),
    ];
    assert_eq!(
        after.value("shopkeep_http_requests_total", &credits),
        Some(1.0)
    );
    assert_eq!(
        after.value(
            "shopkeep_http_request_duration_seconds_bucket",
            &[
                ("method", "POST"),
                ("route", "/v1/users/{user_id}/credits"),
                ("le", "+Inf")
            ]
        ),
        Some(1.0)
    );
    assert!(after.value("shopkeep_raft_proposal_seconds_count", &[]) >= Some(1.0));

    // The second address serves the same families, and nothing but /metrics and /healthz.
    let elsewhere = scrape(&second).await;
    assert_well_formed(&elsewhere);
    assert_eq!(
        elsewhere.types.keys().collect::<Vec<_>>(),
        after.types.keys().collect::<Vec<_>>()
    );
    // Its scrapes are counted apart from the clients' connections.
    assert_eq!(
        elsewhere.value("shopkeep_http_connections", &[("listener", "metrics")]),
        Some(1.0)
    );
    assert!(after.value("shopkeep_http_connections", &[("listener", "client")]) >= Some(1.0));
    let health = reqwest::get(format!("{second}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    let other = reqwest::get(format!("{second}/v1/users/m1"))
        .await
        .expect("other path");
    assert_eq!(other.status().as_u16(), 404);
    let body: Value = other.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}

/// `--cache-mib` is split among the node's shards and reaches each shard file's page cache: the size
/// is served, and once the shop holds more than that the cache is full, holds no more, and evicts.
#[tokio::test]
async fn cache_mib_is_split_among_the_shards_and_bounds_what_each_shard_caches() {
    // Durable commits every 100 ms: what a commit wrote enters redb's read cache (what the gauge counts)
    // when a durable commit flushes its write buffer, and a release build writes the users below in about
    // a second, inside the default 2 s.
    let srv = Server::start_with(
        Opts::new()
            .shards(2)
            .env("SHOPKEEP_CACHE_MIB", "2")
            .env("SHOPKEEP_DURABLE_EVERY", "100ms"),
    )
    .await;
    // 1,600 funded users: several MiB of rows (and their pages) in each shard file.
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..16 {
        let api = srv.api();
        writers.spawn(async move {
            for i in 0..100 {
                api.funded_user(&format!("cache-{writer}-{i}"), "5.00")
                    .await;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    let scrape = scrape(&srv.api().base).await;
    assert_well_formed(&scrape);
    let per_shard = 1024.0 * 1024.0;
    for shard in ["0", "1"] {
        let at = [("shard", shard)];
        let capacity = scrape.value("shopkeep_shard_cache_capacity_bytes", &at);
        assert_eq!(capacity, Some(per_shard), "shard {shard}");
        let used = scrape
            .value("shopkeep_shard_cache_used_bytes", &at)
            .expect("used bytes");
        assert!(
            used > per_shard / 2.0 && used <= per_shard,
            "shard {shard}: {used} bytes cached of {per_shard}"
        );
        let hits = [("shard", shard), ("result", "hit")];
        assert!(scrape.value("shopkeep_shard_cache_reads_total", &hits) > Some(0.0));
        let evictions = scrape.value("shopkeep_shard_cache_evictions_total", &at);
        assert!(evictions > Some(0.0), "shard {shard}: {evictions:?}");
    }
}

/// `--durable-every` sets how often a shard's applies are committed with an fsync of the file, and the
/// counter shows it: every 100 ms, 1.5 s of writes make several durable commits; every 60 s, none (the
/// interval starts when the file is opened).
#[tokio::test]
async fn durable_every_sets_how_often_a_shards_applies_are_committed_durably() {
    for (every, durable) in [("100ms", true), ("60s", false)] {
        let srv =
            Server::start_with(Opts::new().shards(1).env("SHOPKEEP_DURABLE_EVERY", every)).await;
        let api = srv.api();
        let writing = Instant::now();
        let mut users = 0;
        while writing.elapsed() < Duration::from_millis(1500) {
            api.funded_user(&format!("durable-{users}"), "5.00").await;
            users += 1;
        }
        let scrape = scrape(&api.base).await;
        let commits = scrape
            .value("shopkeep_shard_durable_commits_total", &[("shard", "0")])
            .expect("the shard's durable commits");
        if durable {
            assert!(
                commits >= 5.0,
                "every {every}: {commits} durable commits in 1.5 s of writes ({users} users)"
            );
        } else {
            assert_eq!(commits, 0.0, "every {every}, {users} users");
        }
    }
}

/// The shards of a node take turns at their durable commits instead of making them together: with three
/// shards and `--durable-every 6s`, under steady writes to all three, shard 0 first commits durably about
/// 2 s after the node opened its shards, shard 1 about 4 s and shard 2 about 6 s. (When each counted from
/// its own file's opening, all three came at about 6 s, within a few milliseconds of one another.)
#[tokio::test]
async fn the_shards_of_a_node_take_turns_at_their_durable_commits() {
    let srv = Server::start_with(Opts::new().shards(3).env("SHOPKEEP_DURABLE_EVERY", "6s")).await;
    let started = Instant::now();
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..3 {
        let (api, writing) = (srv.api(), writing.clone());
        writers.spawn(async move {
            let mut user = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                api.funded_user(&format!("turns-{writer}-{user}"), "5.00")
                    .await;
                user += 1;
            }
        });
    }
    let mut first: [Option<Duration>; 3] = [None; 3];
    while first.iter().any(Option::is_none) && started.elapsed() < Duration::from_secs(20) {
        let scrape = scrape(&srv.api().base).await;
        for (shard, seen) in first.iter_mut().enumerate() {
            let label = shard.to_string();
            let at = [("shard", label.as_str())];
            let commits = scrape.value("shopkeep_shard_durable_commits_total", &at);
            if seen.is_none() && commits >= Some(1.0) {
                *seen = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    let first: Vec<Duration> = first
        .iter()
        .map(|seen| seen.expect("every shard committed durably within 20 s of writes"))
        .collect();
    assert!(
        first[0] < first[1] && first[1] < first[2],
        "first durable commits after {first:?}"
    );
    assert!(
        first[2] - first[0] >= Duration::from_secs(2),
        "the shards' first durable commits came together: {first:?}"
    );
}

/// Under light load the Raft log's appends are written by the appending task itself (the log writer
/// idle, no hand-off to its thread): one client's writes, one after another, are counted in
/// `shopkeep_raft_log_inline_commits_total`, which is served from the start.
#[tokio::test]
async fn one_clients_writes_one_after_another_are_committed_by_the_appending_task() {
    let srv = Server::start_with(Opts::new().shards(1)).await;
    let api = srv.api();
    let inline = |scrape: &Scrape| {
        scrape
            .value("shopkeep_raft_log_inline_commits_total", &[])
            .expect("the inline commits are served")
    };
    let before = inline(&scrape(&api.base).await);
    // two writes each (the user, then the credit); the writer's first 16 commits come before any inline
    for user in 0..40 {
        api.funded_user(&format!("inline-{user}"), "5.00").await;
    }
    let after = inline(&scrape(&api.base).await);
    assert!(
        after - before >= 40.0,
        "80 writes one after another: {before} inline commits before, {after} after"
    );
}

/// A shard's leader acknowledges its own entries to openraft before its log has them durable, so they
/// are sent to the followers while its log writes them (`shopkeep_raft_log_early_acks_total`); its
/// followers never do. Nothing is applied before it is durable on a majority: every write a client was
/// answered survives the leader's SIGKILL right after it, and the members end with the same state.
#[tokio::test]
async fn a_shards_leader_replicates_while_its_log_writes_and_loses_no_answered_write_when_killed() {
    let mut cluster = TestCluster::start_with(ClusterOpts::new().shards(1)).await;
    let leader = cluster.leader_of_shard(0).await;
    let early = |scrape: &Scrape| {
        scrape
            .value("shopkeep_raft_log_early_acks_total", &[])
            .expect("the early acknowledgements are served")
    };
    let before = early(&scrape(&cluster.api(leader).base).await);
    let api = cluster.api(leader);
    for user in 0..30 {
        api.funded_user(&format!("early-{user}"), "5.00").await;
    }
    let after = early(&scrape(&cluster.api(leader).base).await);
    assert!(
        after - before >= 30.0,
        "60 writes one after another on the leader: {before} early acknowledgements before, {after} after"
    );
    let followers = others(&cluster.ids(), leader);
    for &id in &followers {
        let theirs = early(&scrape(&cluster.api(id).base).await);
        assert_eq!(
            theirs, 0.0,
            "node {id} follows: it acknowledges once durable"
        );
    }

    cluster.kill9(leader);
    let new = cluster.leader_of_shard_among(0, &followers).await;
    for user in 0..30 {
        let wallet = cluster.api(new).wallet(&format!("early-{user}")).await;
        assert_eq!(
            wallet.balance, 500,
            "early-{user}'s credit, answered before the kill"
        );
    }
    cluster.restart(leader).await;
    cluster.wait_converged(SETTLE).await;
}

/// Scrapes node `id` until `done` holds for its scrape (≤ `within`); the last scrape either way.
async fn scrape_until(
    cluster: &TestCluster,
    id: u64,
    within: Duration,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + within;
    loop {
        let scrape = scrape(&cluster.api(id).base).await;
        if done(&scrape) {
            return scrape;
        }
        let cluster_gauges: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| {
                s.name.starts_with("shopkeep_raft_")
                    || s.name.contains("leader")
                    || s.name.contains("peer")
            })
            .filter(|s| !s.name.ends_with("_bucket"))
            .collect();
        assert!(
            Instant::now() < deadline,
            "node {id}: {what}: {cluster_gauges:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn others(ids: &[u64], id: u64) -> Vec<u64> {
    ids.iter().copied().filter(|&i| i != id).collect()
}

const SETTLE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_cluster_serves_leadership_lag_and_peer_gauges_and_every_series_of_the_dashboard_and_alerts()
 {
    let cluster = TestCluster::start_with(ClusterOpts::new().shards(2)).await;
    let ids = cluster.ids();
    // A webhook, so that its delivery series exist (on the nodes leading a shard).
    let receiver = crate::webhook_receiver::WebhookReceiver::start(None).await;
    cluster
        .api(1)
        .put(
            "/v1/webhooks/m1",
            Auth::Admin,
            &serde_json::json!({"url": receiver.url("/e")}),
        )
        .await
        .expect(200);
    cluster.api(1).create_user("g1").await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    let mut families = BTreeMap::new();
    let mut leaders: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for &id in &ids {
        let peers = others(&ids, id);
        let scrape = scrape_until(&cluster, id, SETTLE, "every peer up", |s| {
            peers.iter().all(|p| {
                s.value("shopkeep_peer_up", &[("peer", p.to_string().as_str())]) == Some(1.0)
            })
        })
        .await;
        assert_well_formed(&scrape);
        for shard in ["0", "1"] {
            if scrape.value("shopkeep_shard_is_leader", &[("shard", shard)]) == Some(1.0) {
                leaders.entry(shard.to_owned()).or_default().push(id);
                for follower in &peers {
                    let follower_label = follower.to_string();
                    let lag = [("shard", shard), ("follower", follower_label.as_str())];
                    assert!(
                        scrape
                            .value("shopkeep_raft_follower_lag_entries", &lag)
                            .is_some(),
                        "node {id} leads shard {shard}: no lag of node {follower}"
                    );
                    // A leader's heartbeats are node calls, timed per peer.
                    let heartbeats = [("call", "heartbeat"), ("peer", follower_label.as_str())];
                    assert!(
                        scrape.value("shopkeep_node_call_seconds_count", &heartbeats) >= Some(1.0),
                        "node {id} leads shard {shard}: no timed heartbeat to node {follower}"
                    );
                }
            } else {
                // ... and answering them is timed on the follower.
                assert!(
                    scrape.value(
                        "shopkeep_node_serve_seconds_count",
                        &[("call", "heartbeat")]
                    ) >= Some(1.0),
                    "node {id} follows shard {shard}: no timed heartbeat answered"
                );
            }
        }
        for (family, kind) in scrape.types {
            families.insert(family, kind);
        }
    }
    for shard in ["0", "1"] {
        assert_eq!(
            leaders.get(shard).map(Vec::len),
            Some(1),
            "shard {shard}: {leaders:?}"
        );
    }
    assert!(families.contains_key("shopkeep_peer_clock_offset_seconds"));

    let names = used_series(&dashboard_expressions(), &families)
        .into_iter()
        .chain(used_series(&alert_expressions(), &families));
    let used: BTreeSet<String> = names.collect();
    for family in [
        "shopkeep_http_requests_total",
        "shopkeep_http_request_duration_seconds",
        "shopkeep_shard_is_leader",
        "shopkeep_raft_term",
        "shopkeep_raft_applied_index",
        "shopkeep_raft_follower_lag_entries",
        "shopkeep_peer_up",
        "shopkeep_storage_full",
        "shopkeep_clock_agrees",
        "process_resident_memory_bytes",
        "process_open_fds",
        "shopkeep_shard_overloaded_total",
    ] {
        assert!(used.contains(family), "deploy/ never shows {family}");
    }
}

/// The families whose series `expressions` name (`shopkeep_*`, `process_*`); panics on a name the
/// server does not serve.
fn used_series(expressions: &[String], families: &BTreeMap<String, String>) -> Vec<String> {
    let mut used = vec![];
    for expression in expressions {
        let names = expression
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|t| t.starts_with("shopkeep_") || t.starts_with("process_"));
        for name in names {
            let family = if families.contains_key(name) {
                Some(name)
            } else {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name.strip_suffix(suffix))
                    .find(|base| families.get(*base).is_some_and(|t| t == "histogram"))
            };
            let family = family.unwrap_or_else(|| {
                panic!("`{name}` in `{expression}` is not served; served: {families:?}")
            });
            used.push(family.to_owned());
        }
    }
    used
}

fn deploy_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every query of every panel of `deploy/grafana-dashboard.json`.
fn dashboard_expressions() -> Vec<String> {
    let dashboard: Value =
        serde_json::from_str(&deploy_file("grafana-dashboard.json")).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 12, "{} panels", panels.len());
    let mut expressions = vec![];
    for panel in panels {
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel without targets: {panel}"));
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            expressions.push(expr.to_owned());
        }
    }
    let templating = &dashboard["templating"]["list"];
    for variable in templating.as_array().into_iter().flatten() {
        if let Some(query) = variable["query"]["query"].as_str() {
            expressions.push(query.to_owned());
        }
    }
    expressions
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    #[allow(dead_code)]
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    #[allow(dead_code)]
    pending: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// Every expression of `deploy/prometheus-alerts.yml`, whose rules are the ten the operators need.
fn alert_expressions() -> Vec<String> {
    let rules: RuleFile =
        serde_norway::from_str(&deploy_file("prometheus-alerts.yml")).expect("alert rules YAML");
    let rules: Vec<Rule> = rules.groups.into_iter().flat_map(|g| g.rules).collect();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    let wanted = BTreeSet::from([
        "ShopkeepNodeDown",
        "ShopkeepShardWithoutLeader",
        "ShopkeepFollowerLagGrowing",
        "ShopkeepPeerDown",
        "ShopkeepDiskFull",
        "ShopkeepClockDisagrees",
        "ShopkeepHigh5xxRatio",
        "ShopkeepHighP99Latency",
        "ShopkeepWebhookFailing",
        "ShopkeepLogLinesDropped",
    ]);
    assert_eq!(names, wanted);
    for rule in &rules {
        assert!(rule.labels.contains_key("severity"), "{}", rule.alert);
        assert!(rule.annotations.contains_key("summary"), "{}", rule.alert);
    }
    rules.into_iter().map(|r| r.expr).collect()
}

#[tokio::test]
async fn a_node_that_loses_a_shards_leadership_stops_reporting_follower_lag_and_its_peers_see_it_down()
 {
    let cluster = TestCluster::start_with(ClusterOpts::new().shards(1)).await;
    let ids = cluster.ids();
    cluster.api(1).create_user("lag1").await;
    let old = cluster.leader_of_shard(0).await;
    let followers = others(&ids, old);
    scrape_until(&cluster, old, SETTLE, "a lag for each follower", |s| {
        followers.iter().all(|f| {
            s.value(
                "shopkeep_raft_follower_lag_entries",
                &[("shard", "0"), ("follower", f.to_string().as_str())],
            )
            .is_some()
        })
    })
    .await;

    cluster.isolate(old);
    // At once (its clock agrees with the others for 5 s more), a write the cut-off leader appends but
    // cannot commit: its followers now lag behind its log.
    let stranded = cluster.api(old);
    let write = tokio::spawn(async move {
        let body = serde_json::json!({"user_id": "lag2"});
        stranded.post("/v1/users", Auth::Service, &body).await
    });
    scrape_until(&cluster, old, SETTLE, "its followers lagging", |s| {
        followers.iter().all(|f| {
            s.value(
                "shopkeep_raft_follower_lag_entries",
                &[("shard", "0"), ("follower", f.to_string().as_str())],
            ) >= Some(1.0)
        })
    })
    .await;
    let new = cluster.leader_of_shard_among(0, &followers).await;
    assert_ne!(new, old);
    let cut_off = old.to_string();
    for &id in &followers {
        scrape_until(&cluster, id, SETTLE, "the isolated node down", |s| {
            s.value("shopkeep_peer_up", &[("peer", cut_off.as_str())]) == Some(0.0)
        })
        .await;
    }
    cluster.heal();
    let demoted = scrape_until(&cluster, old, SETTLE, "a follower again", |s| {
        s.value("shopkeep_shard_is_leader", &[("shard", "0")]) == Some(0.0)
    })
    .await;
    let stale: Vec<_> = demoted
        .all("shopkeep_raft_follower_lag_entries")
        .into_iter()
        .filter(|s| s.value != 0.0)
        .collect();
    assert!(
        stale.is_empty(),
        "lags of a shard it no longer leads: {stale:?}"
    );
    let fresh = scrape_until(&cluster, new, SETTLE, "lags as the new leader", |s| {
        s.value(
            "shopkeep_raft_follower_lag_entries",
            &[("shard", "0"), ("follower", cut_off.as_str())],
        )
        .is_some()
    })
    .await;
    assert_eq!(
        fresh.value("shopkeep_shard_is_leader", &[("shard", "0")]),
        Some(1.0)
    );
    write.abort();
}

/// `--workers N` runs the node on N threads of its async runtime, which serve requests, and
/// `shopkeep_runtime_workers` says how many; without it, the runtime's default (one per core).
#[tokio::test]
async fn workers_set_the_runtimes_threads_and_the_gauge_says_how_many() {
    // Unset, tokio's default: `TOKIO_WORKER_THREADS` when the environment has it, else one per core.
    let cores = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    for (workers, expected) in [(Some(1), 1), (Some(3), 3), (None, cores)] {
        let opts = match workers {
            Some(n) => Opts::new().env("SHOPKEEP_WORKERS", &n.to_string()),
            None => Opts::new(),
        };
        let srv = Server::start_with(opts).await;
        let api = srv.api();
        api.funded_user("worker-count", "5.00").await;
        let scrape = scrape(&api.base).await;
        assert_eq!(
            scrape.value("shopkeep_runtime_workers", &[]),
            Some(expected as f64),
            "--workers {workers:?}"
        );
    }
}
