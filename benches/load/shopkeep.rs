//! The phases against a shopkeep deployment: seeding, the closed-loop levels, the mix and the half-peak
//! open loop (the load generator's workers), then the audit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Client;

use crate::audit::{check_audit, check_cluster_audit};
use crate::http1::Conns;
use crate::nodes::{Nodes, wait_ready};
use crate::progress::Progress;
use crate::requests::{credit, purchase, read_wallet, refund, two_step};
use crate::results::{LevelResult, MIX_KINDS, MixResult, OpenLoopResult, SystemReport};
use crate::seed::{leaders_text, seed, shard_leaders, user_id, user_shards};
use crate::settings::{OpenLoop, Settings, System};
use crate::stats::{Stats, Tally, memory_text, ms};
use crate::{HALF_PEAK, SEED_PARALLELISM, USERS};

/// Seeds the started nodes and runs every phase against them; then the audit.
pub(crate) async fn drive_shopkeep(
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
        bases: bases.clone(),
        warm_up: settings.warm_up,
        duration: settings.duration,
        route_to_leader: settings.route_to_leader && clustered,
    };
    if let Some(workers) = crate::settings::cluster_workers(nodes.nodes.len() as u64) {
        report.notes.push(format!(
            "each node runs --workers {workers}: the machine's cores shared among the {} nodes",
            nodes.nodes.len()
        ));
    }
    if load.route_to_leader {
        report.notes.push(
            "closed-loop purchases routed to each user's shard leader (SHOPKEEP_BENCH_ROUTE=leader), \
             not spread over the nodes"
                .to_string(),
        );
    }

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

/// What every phase against one shopkeep deployment shares (the scale run's phases too).
pub(crate) struct Load {
    pub(crate) bases: Vec<String>,
    pub(crate) warm_up: Duration,
    pub(crate) duration: Duration,
    /// Closed-loop purchases go to the node leading the user's shard (as it led at the level's start).
    pub(crate) route_to_leader: bool,
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
    pub(crate) async fn closed_loop(
        &self,
        leader_of_user: Option<Arc<Vec<Option<u64>>>>,
        concurrency: usize,
        ops: Arc<AtomicU64>,
    ) -> (LevelResult, u64) {
        let paths = Arc::new(order_paths());
        let measure_from = Instant::now() + self.warm_up;
        let stop_at = measure_from + self.duration;
        let nodes = self.bases.len();

        let mut tasks = Vec::with_capacity(concurrency);
        for worker in 0..concurrency {
            let mut conns = Conns::new(&self.bases);
            let paths = paths.clone();
            let leader_of_user = leader_of_user.clone();
            let route_to_leader = self.route_to_leader;
            let ops = ops.clone();
            tasks.push(tokio::spawn(async move {
                let mut stats = WorkerStats::default();
                // Round-robin over the nodes, as a load balancer would spread the connections (or,
                // routed, the node leading the user's shard at the level's start).
                let node = worker % nodes;
                // Worker-affine users: worker w buys for w, w + c, w + 2c, … (mod USERS).
                let mut user = worker % USERS;
                loop {
                    let started = Instant::now();
                    if started >= stop_at {
                        break;
                    }
                    let target = match (&leader_of_user, route_to_leader) {
                        (Some(leaders), true) => leaders[user]
                            .and_then(|id| usize::try_from(id.checked_sub(1)?).ok())
                            .filter(|&i| i < nodes)
                            .unwrap_or(node),
                        _ => node,
                    };
                    let outcome = purchase(&mut conns, target, &paths[user]).await.map(|_| ());
                    let latency = started.elapsed();
                    ops.fetch_add(1, Ordering::Relaxed);
                    if outcome.is_ok() {
                        stats.created += 1;
                    }
                    if started >= measure_from {
                        if let Some(leaders) = &leader_of_user {
                            if leaders[user] != Some(target as u64 + 1) {
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
        let nodes = self.bases.len();
        let mut tasks = Vec::with_capacity(concurrency);
        for worker in 0..concurrency {
            let mut conns = Conns::new(&self.bases);
            let ops = ops.clone();
            tasks.push(tokio::spawn(async move {
                let node = worker % nodes;
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
                        let path = format!("/v1/users/{user_id}/orders");
                        let outcome = purchase(&mut conns, node, &path).await;
                        if let Ok(order_id) = &outcome {
                            created += 1;
                            if bought.len() < 1024 {
                                bought.push_back((user, order_id.clone()));
                            }
                        }
                        outcome.map(|_| ())
                    } else if kind == 1 {
                        let (was_created, outcome) = two_step(&mut conns, node, &user_id).await;
                        created += u64::from(was_created);
                        outcome
                    } else if kind == 2 {
                        credit(&mut conns, node, &user_id).await
                    } else if kind == 3 {
                        let (owner, order_id) = bought.pop_front().expect("checked above");
                        refund(&mut conns, node, &self::user_id(owner), &order_id).await
                    } else {
                        read_wallet(&mut conns, node, &user_id).await
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
    pub(crate) async fn open_loop(
        &self,
        rate: f64,
        connections: usize,
        ops: Arc<AtomicU64>,
    ) -> (OpenLoopResult, u64) {
        let paths = Arc::new(order_paths());
        let nodes = self.bases.len();
        let first = Instant::now() + Duration::from_millis(20);
        let measure_from = first + self.warm_up;
        let stop_at = measure_from + self.duration;
        // The shared schedule: the next intended send time and the generator of the gaps.
        let schedule = Arc::new(Mutex::new((first, XorShift::new(0x5eed))));
        let mean_gap = 1.0 / rate;

        let mut tasks = Vec::with_capacity(connections);
        for worker in 0..connections {
            let mut conns = Conns::new(&self.bases);
            let paths = paths.clone();
            let schedule = schedule.clone();
            let ops = ops.clone();
            tasks.push(tokio::spawn(async move {
                let node = worker % nodes;
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
                    let outcome = purchase(&mut conns, node, &paths[user]).await.map(|_| ());
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
}

/// `paths[user]`: where to POST the user's orders.
fn order_paths() -> Vec<String> {
    (0..USERS)
        .map(|i| format!("/v1/users/{}/orders", user_id(i)))
        .collect()
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
