//! The nemesis: injects one fault at a time into the running cluster (seeded choices, every step logged with
//! its time), heals it, and waits until the cluster is whole again (every node ready and caught up) before
//! the next one, so that faults never pile up beyond what a 3-node cluster promises to survive.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
#[cfg(feature = "failpoints")]
use reqwest::Method;
use serde_json::Value;

use super::history::{Timeline, unix_micros};
use crate::cluster_harness::{TestCluster, shard_view};
#[cfg(feature = "failpoints")]
use crate::{cluster_harness::CLUSTER_SECRET, harness::node_auth};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    Kill,
    Pause,
    Partition,
    Crashpoint,
    Wipe,
    /// One node's wall clock jumps ahead or back (libfaketime), then comes back in step.
    Clock,
    /// One node's file system fills up (below the log's reserve, or to the last byte), then is freed.
    Disk,
    /// A stopped node's shard file, Raft log or snapshot gets flipped bits; it starts again.
    Corrupt,
    /// One node's fsyncs and writes to its redb files fail with EIO (an LD_PRELOAD shim): it must stop
    /// at once (SIGABRT), and is started again.
    Eio,
}

impl FaultKind {
    pub const ALL: [FaultKind; 9] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Crashpoint,
        FaultKind::Wipe,
        FaultKind::Clock,
        FaultKind::Disk,
        FaultKind::Corrupt,
        FaultKind::Eio,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Crashpoint => "crashpoint",
            FaultKind::Wipe => "wipe",
            FaultKind::Clock => "clock",
            FaultKind::Disk => "disk",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Eio => "eio",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s.trim())
    }
}

/// What the disk nemesis leaves free when it goes below the log's reserve (64 MiB of a 1 GiB disk).
const DISK_LEFT_BELOW_RESERVE: u64 = 16 << 20;

/// The crash points the server has with the `failpoints` feature.
pub const CRASH_POINTS: [&str; 3] = [
    "crash-after-apply-commit",
    "crash-after-log-append",
    "crash-mid-snapshot-install",
];

/// The span of time one fault kind was being injected.
#[derive(Clone, Debug)]
pub struct Window {
    pub kind: &'static str,
    pub start: i64,
    pub end: i64,
}

pub struct Nemesis<'a> {
    pub c: &'a mut TestCluster,
    rng: StdRng,
    pub timeline: Timeline,
    t0: i64,
    pub windows: Vec<Window>,
    /// "kind/variant" → how many.
    pub counts: BTreeMap<String, usize>,
    /// Broken promises seen while injecting (a node that crashed by itself, a cluster that did not recover).
    pub violations: Vec<String>,
    /// Things the run was asked to do but could not (a crash point that never fired): the run is then not
    /// a valid proof, and the test fails.
    pub coverage_gaps: Vec<String>,
    /// How long a fault is held, in ms (low, high).
    hold_ms: (u64, u64),
    /// How long to wait for a recovery.
    recover_timeout: Duration,
    crash_cycle: usize,
    /// Nodes expected to exit by themselves (an armed crash point).
    expect_exit: Vec<u64>,
    /// The cluster did not recover: no more faults.
    pub broken: bool,
    /// (fault kind, seconds from the heal until every node was ready and caught up).
    pub recoveries: Vec<(String, f64)>,
    /// The cluster's `--snapshot-every` (a leader keeps half of it in its log after a snapshot).
    pub snapshot_every: u64,
    /// The file system of each node's data directory, when each has its own (the disk nemesis).
    pub disks: BTreeMap<u64, PathBuf>,
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

impl<'a> Nemesis<'a> {
    pub fn new(c: &'a mut TestCluster, seed: u64, timeline: Timeline, t0: i64) -> Nemesis<'a> {
        Nemesis {
            c,
            rng: StdRng::seed_from_u64(seed ^ 0x05ee_d0fc_4a05),
            timeline,
            t0,
            windows: vec![],
            counts: BTreeMap::new(),
            violations: vec![],
            coverage_gaps: vec![],
            hold_ms: (800, 3500),
            recover_timeout: Duration::from_secs(60),
            crash_cycle: 0,
            expect_exit: vec![],
            broken: false,
            recoveries: vec![],
            snapshot_every: 100,
            disks: BTreeMap::new(),
        }
    }

    fn log(&self, kind: &'static str, what: impl Into<String>) {
        self.timeline.log(self.t0, kind, what);
    }

    fn count(&mut self, key: String) {
        *self.counts.entry(key).or_insert(0) += 1;
    }

    fn hold(&mut self) -> Duration {
        Duration::from_millis(self.rng.random_range(self.hold_ms.0..=self.hold_ms.1))
    }

    /// Each kind in turn for `per_kind` (at least one fault each).
    pub async fn run(&mut self, kinds: &[FaultKind], per_kind: Duration) {
        for &kind in kinds {
            if self.broken {
                return;
            }
            let start = unix_micros();
            let began = Instant::now();
            self.log(
                kind.name(),
                format!(
                    "--- window of {} faults ({}) ---",
                    kind.name(),
                    secs(per_kind)
                ),
            );
            loop {
                self.inject(kind).await;
                // every crash point at least once, however short the window
                let crash_points_left = kind == FaultKind::Crashpoint
                    && cfg!(feature = "failpoints")
                    && self.crash_cycle < CRASH_POINTS.len();
                if self.broken || (began.elapsed() >= per_kind && !crash_points_left) {
                    break;
                }
                let gap = Duration::from_millis(self.rng.random_range(300..1200));
                tokio::time::sleep(gap).await;
            }
            self.windows.push(Window {
                kind: kind.name(),
                start,
                end: unix_micros(),
            });
        }
    }

    async fn inject(&mut self, kind: FaultKind) {
        match kind {
            FaultKind::Kill => self.kill().await,
            FaultKind::Pause => self.pause().await,
            FaultKind::Partition => self.partition().await,
            FaultKind::Crashpoint => self.crashpoint().await,
            FaultKind::Wipe => self.wipe().await,
            FaultKind::Clock => self.clock().await,
            FaultKind::Disk => self.disk().await,
            FaultKind::Corrupt => self.corrupt().await,
            FaultKind::Eio => self.eio().await,
        }
    }

    fn random_node(&mut self) -> u64 {
        let ids = self.c.ids();
        *ids.choose(&mut self.rng).expect("nodes")
    }

    fn random_shard(&mut self) -> u64 {
        self.rng.random_range(0..self.c.opts.shards as u64)
    }

    /// The leader of `shard` that the reachable nodes agree on (highest term), if any within 10 s.
    pub async fn leader_of(&self, shard: u64) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut best: Option<(u64, u64)> = None; // (term, node)
            for id in self.c.running_ids() {
                if self.c.node(id).is_paused() {
                    continue;
                }
                if let Some(v) = self.c.node(id).try_view().await {
                    let s = shard_view(&v, shard);
                    if s["role"] == "leader" && s["leader"].as_u64() == Some(id) {
                        let term = s["term"].as_u64().unwrap_or(0);
                        if best.is_none_or(|(t, _)| term > t) {
                            best = Some((term, id));
                        }
                    }
                }
            }
            if let Some((_, id)) = best {
                return Some(id);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A node by `variant`: "random", or the leader of a random shard ("leader"), or a follower of it.
    async fn pick(&mut self, variant: &str) -> (u64, String) {
        match variant {
            "leader" | "follower" => {
                let shard = self.random_shard();
                match self.leader_of(shard).await {
                    Some(l) if variant == "leader" => (l, format!("leader of shard {shard}")),
                    Some(l) => {
                        let others: Vec<u64> =
                            self.c.ids().into_iter().filter(|&i| i != l).collect();
                        let f = *others.choose(&mut self.rng).expect("followers");
                        (f, format!("a follower of shard {shard} (leader {l})"))
                    }
                    None => {
                        let n = self.random_node();
                        (n, format!("random (shard {shard} had no leader)"))
                    }
                }
            }
            _ => {
                let n = self.random_node();
                (n, "random".into())
            }
        }
    }

    async fn start_node(&mut self, id: u64) {
        if self.c.node(id).is_running() {
            return;
        }
        match self.c.node_mut(id).try_start().await {
            Ok(()) => self.log("restart", format!("node {id} started")),
            Err(e) => {
                // a node may die before it listens only when a crash point armed at start fires
                self.log("restart", format!("node {id} did not come up: {e}"));
            }
        }
    }

    // ---- the faults ----------------------------------------------------------------------------

    async fn kill(&mut self) {
        let variant = *["random", "leader", "minority"]
            .choose(&mut self.rng)
            .unwrap();
        let victims: Vec<(u64, String)> = if variant == "minority" {
            let n = self.c.ids().len();
            let mut ids = self.c.ids();
            let k = (n - 1) / 2;
            let mut out = vec![];
            for _ in 0..k {
                let i = self.rng.random_range(0..ids.len());
                out.push((ids.remove(i), "minority".to_string()));
            }
            out
        } else {
            vec![self.pick(variant).await]
        };
        let hold = self.hold();
        for (v, why) in &victims {
            self.c.kill9(*v);
            self.log(
                "kill",
                format!("kill -9 node {v} ({why}); down for {}", secs(hold)),
            );
        }
        self.count(format!("kill/{variant}"));
        tokio::time::sleep(hold).await;
        for (v, _) in victims {
            self.start_node(v).await;
        }
        self.recover("kill").await;
    }

    /// Shifts one node's wall clock (not its monotonic clock) for a while: 30 s (inside node traffic's
    /// 60 s window: it keeps talking but must take no timed request and sweep nothing) or an hour (its
    /// node calls are refused both ways), ahead or back (back must change nothing at all).
    async fn clock(&mut self) {
        let (variant, offset) = *[
            ("ahead-30s", "+30"),
            ("behind-30s", "-30"),
            ("ahead-1h", "+1h"),
            ("behind-1h", "-1h"),
        ]
        .choose(&mut self.rng)
        .unwrap();
        let who = *["random", "leader"].choose(&mut self.rng).unwrap();
        let (v, why) = self.pick(who).await;
        let hold = self.hold() + Duration::from_secs(2);
        let file = crate::chaos::clock_offset_file(self.c, v);
        std::fs::write(&file, offset).expect("clock offset file");
        self.log(
            "clock",
            format!("node {v} ({why}): wall clock {offset} for {}", secs(hold)),
        );
        self.count(format!("clock/{variant}"));
        tokio::time::sleep(hold).await;
        std::fs::write(&file, "+0").expect("clock offset file");
        self.log("clock", format!("node {v}: wall clock back in step"));
        self.recover("clock").await;
    }

    /// Fills one node's file system (a tmpfs of its own) from outside: to leave less than the log's
    /// reserve (writes are refused before they reach the log), or to the last byte (redb meets ENOSPC:
    /// the log writer and the shards wait it out). Holds it, then frees the space.
    async fn disk(&mut self) {
        let variant = *["below-reserve", "enospc"].choose(&mut self.rng).unwrap();
        let who = *["random", "leader"].choose(&mut self.rng).unwrap();
        let (v, why) = self.pick(who).await;
        let Some(mount) = self.disks.get(&v).cloned() else {
            self.coverage_gaps
                .push("disk: the nodes' data directories are not file systems of their own".into());
            return;
        };
        let filler = mount.join("filler");
        let held = crate::disk_full::fill(&filler);
        if variant == "below-reserve" {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&filler)
                .expect("filler");
            file.set_len(held.saturating_sub(DISK_LEFT_BELOW_RESERVE))
                .expect("leave a little free");
        }
        let hold = self.hold() + Duration::from_secs(1);
        self.log(
            "disk",
            format!(
                "node {v} ({why}): file system filled ({variant}) for {}",
                secs(hold)
            ),
        );
        self.count(format!("disk/{variant}"));
        tokio::time::sleep(hold).await;
        std::fs::remove_file(&filler).expect("free the space");
        self.log("disk", format!("node {v}: space freed"));
        self.recover("disk").await;
    }

    /// Stops one node (kill -9), flips bits in one of its files at rest, and starts it again. It must
    /// find what matters (a live page, the snapshot) and rebuild it from the others; bits flipped in
    /// pages no longer in use change nothing.
    async fn corrupt(&mut self) {
        let variant = *["shard-table", "shard-random", "log-table", "snapshot"]
            .choose(&mut self.rng)
            .unwrap();
        let who = *["random", "leader"].choose(&mut self.rng).unwrap();
        let (v, why) = self.pick(who).await;
        self.c.kill9(v);
        let dir = self.c.node(v).data_dir();
        let shard = self.random_shard();
        let shard_file = dir.join(format!("shard-{shard:03}.redb"));
        let what = match variant {
            "shard-table" => {
                let n = crate::corruption::flip_every(&shard_file, b"user_postings");
                format!("{n} bits in the table tree of shard {shard}")
            }
            "shard-random" => {
                let at = crate::corruption::flip_random(&shard_file, 16, &mut self.rng);
                format!("{} random bits of shard {shard}", at.len())
            }
            "log-table" => {
                let n = crate::corruption::flip_every(&dir.join("raft-log.redb"), b"raft_state");
                format!("{n} bits in the Raft log's table tree")
            }
            _ => {
                let snapshot = dir
                    .join("snapshots")
                    .join(format!("shard-{shard:03}"))
                    .join("current.snap");
                if snapshot.exists() {
                    crate::corruption::flip_middle(&snapshot);
                    format!("a bit in the middle of shard {shard}'s snapshot")
                } else {
                    format!("nothing (shard {shard} has no snapshot yet)")
                }
            }
        };
        self.log(
            "corrupt",
            format!("kill -9 node {v} ({why}); flipped {what}; restart"),
        );
        self.count(format!("corrupt/{variant}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.start_node(v).await;
        self.recover("corrupt").await;
    }

    /// Arms node `v`'s EIO trigger (see `chaos::with_preloads`): its next fsync or write to a redb file
    /// fails, and it must abort at once, acknowledging nothing that may not be durable. Then it is
    /// disarmed and started again.
    async fn eio(&mut self) {
        let who = *["random", "leader", "follower"]
            .choose(&mut self.rng)
            .unwrap();
        let (v, why) = self.pick(who).await;
        let trigger = crate::chaos::eio_trigger_file(self.c, v);
        self.expect_exit.push(v);
        std::fs::write(&trigger, b"").expect("arm the EIO trigger");
        let armed = Instant::now();
        self.log(
            "eio",
            format!("node {v} ({why}): its redb files fail with EIO"),
        );
        self.count(format!("eio/{who}"));
        let exit = self.wait_exit(v, Duration::from_secs(15)).await;
        std::fs::remove_file(&trigger).expect("disarm the EIO trigger");
        self.expect_exit.retain(|&n| n != v);
        match exit {
            Some(status) if status.signal() == Some(6) => self.log(
                "eio",
                format!(
                    "node {v} stopped (SIGABRT) {} after the first EIO",
                    secs(armed.elapsed())
                ),
            ),
            Some(status) => {
                let msg = format!("node {v} met EIO and exited by {status}, not by abort");
                self.log("VIOLATION", msg.clone());
                self.violations.push(msg);
            }
            None => {
                self.c.kill9(v);
                let msg = format!("node {v} did not stop within 15 s of EIO on its files");
                self.log("VIOLATION", msg.clone());
                self.violations.push(msg);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.start_node(v).await;
        self.recover("eio").await;
    }

    async fn pause(&mut self) {
        let variant = *["random", "leader"].choose(&mut self.rng).unwrap();
        let (v, why) = self.pick(variant).await;
        let hold = self.hold();
        self.c.node_mut(v).pause();
        self.log(
            "pause",
            format!("SIGSTOP node {v} ({why}) for {}", secs(hold)),
        );
        self.count(format!("pause/{variant}"));
        tokio::time::sleep(hold).await;
        self.c.node_mut(v).resume();
        self.log("pause", format!("SIGCONT node {v}"));
        self.recover("pause").await;
    }

    async fn partition(&mut self) {
        let variant = *["isolate-random", "leader-in-minority", "leader-in-majority"]
            .choose(&mut self.rng)
            .unwrap();
        let (v, why) = match variant {
            "leader-in-minority" => self.pick("leader").await,
            "leader-in-majority" => self.pick("follower").await,
            _ => self.pick("random").await,
        };
        let hold = self.hold() + Duration::from_millis(1000);
        self.c.isolate(v);
        self.log(
            "partition",
            format!("isolate node {v} ({variant}: {why}) for {}", secs(hold)),
        );
        self.count(format!("partition/{variant}"));
        tokio::time::sleep(hold).await;
        self.c.heal();
        self.log("partition", "heal every link");
        self.recover("partition").await;
    }

    async fn wipe(&mut self) {
        let variant = *["random", "leader"].choose(&mut self.rng).unwrap();
        let (v, why) = self.pick(variant).await;
        self.c.kill9(v);
        self.c.wipe_data_dir(v);
        let hold = Duration::from_millis(self.rng.random_range(300..2000));
        self.log(
            "wipe",
            format!(
                "kill -9 node {v} ({why}), wipe its data dir; restart in {}",
                secs(hold)
            ),
        );
        self.count(format!("wipe/{variant}"));
        tokio::time::sleep(hold).await;
        self.start_node(v).await;
        self.recover("wipe").await;
    }

    #[cfg(not(feature = "failpoints"))]
    async fn crashpoint(&mut self) {
        self.coverage_gaps
            .push("crashpoint faults need `--features failpoints`".into());
        self.log(
            "crashpoint",
            "skipped: built without the `failpoints` feature",
        );
    }

    #[cfg(feature = "failpoints")]
    async fn crashpoint(&mut self) {
        let name = CRASH_POINTS[self.crash_cycle % CRASH_POINTS.len()];
        self.crash_cycle += 1;
        if name == "crash-mid-snapshot-install" {
            self.crash_mid_snapshot_install().await;
        } else {
            self.crash_at_runtime(name).await;
        }
    }

    /// Arms `name` (`1*return`) on one node and waits for it to abort the process.
    #[cfg(feature = "failpoints")]
    async fn crash_at_runtime(&mut self, name: &'static str) {
        let variant = *["random", "leader", "follower"]
            .choose(&mut self.rng)
            .unwrap();
        let (v, why) = self.pick(variant).await;
        // counted before arming: the crash point may fire within microseconds
        let before = self.fired_count(v, name);
        // The crash point may fire (and the process abort) before the arming request is answered: a
        // transport error here means "maybe armed", and the node's exit tells.
        self.expect_exit.push(v);
        let armed = arm(self.c, v, name, "1*return").await;
        let wait = match &armed {
            Ok(()) => {
                self.log(
                    "crashpoint",
                    format!("armed {name}=1*return on node {v} ({why})"),
                );
                Duration::from_secs(15)
            }
            Err(e) => {
                self.log(
                    "crashpoint",
                    format!("arming {name}=1*return on node {v} ({why}) got no answer: {e}"),
                );
                Duration::from_secs(3)
            }
        };
        let fired = self.wait_exit(v, wait).await;
        match fired {
            Some(st) if self.fired_count(v, name) > before => {
                self.log("crashpoint", format!("node {v} aborted at {name} ({st})"));
                self.count(format!("crashpoint/{name}"));
            }
            Some(st) => {
                let msg = format!("node {v} exited ({st}) while {name} was armed, but not at it");
                self.log("VIOLATION", msg.clone());
                self.violations.push(msg);
            }
            None if armed.is_err() => {
                self.coverage_gaps
                    .push(format!("could not arm {name} on node {v}"));
            }
            None => {
                let _ = disarm(self.c, v, name).await;
                self.log(
                    "crashpoint",
                    format!("{name} did not fire on node {v} within 15 s; disarmed"),
                );
                self.coverage_gaps
                    .push(format!("{name} armed on node {v} did not fire within 15 s"));
            }
        }
        self.expect_exit.retain(|&n| n != v);
        let hold = Duration::from_millis(self.rng.random_range(200..1500));
        tokio::time::sleep(hold).await;
        self.start_node(v).await;
        self.recover("crashpoint").await;
    }

    /// A node far behind (its data dir wiped) is restarted with the crash point armed at start: it dies
    /// installing a snapshot; restarted without, it must recover and converge.
    #[cfg(feature = "failpoints")]
    async fn crash_mid_snapshot_install(&mut self) {
        const NAME: &str = "crash-mid-snapshot-install";
        // the shards' logs must have been compacted, so that a node starting from nothing gets a snapshot
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut compacted = false;
        while Instant::now() < deadline {
            if let Some(v) = self.c.node(self.c.running_ids()[0]).try_view().await {
                let shards = v["shards"].as_array().cloned().unwrap_or_default();
                if shards
                    .iter()
                    .any(|s| s["snapshot_index"].as_u64().is_some())
                {
                    compacted = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !compacted {
            self.log("crashpoint", "no shard took a snapshot within 30 s");
        }
        let (v, why) = self.pick("follower").await;
        // Two ways to need a snapshot: lag behind the leaders' compacted logs (the node keeps its data),
        // or lose the data dir.
        let lagging = self.rng.random_ratio(1, 2);
        let mut view = None;
        for _ in 0..5 {
            view = self.c.node(v).try_view().await;
            if view.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // without a view of its log, "left behind" cannot be judged: wipe it instead
        let log_end = view.map(|view| log_ends(Some(&view)));
        self.c.kill9(v);
        let left_behind = match (&log_end, lagging) {
            (Some(log_end), true) => self.wait_compacted_past(v, log_end).await,
            _ => false,
        };
        let mut wiped = !left_behind;
        if wiped {
            self.c.wipe_data_dir(v);
        }
        loop {
            let how = if wiped {
                "wiped".to_string()
            } else {
                format!(
                    "left behind until the leaders compacted their logs past it (its log ended at {:?})",
                    log_end.as_ref().map(|end| end.values().collect::<Vec<_>>())
                )
            };
            self.log(
                "crashpoint",
                format!(
                    "kill -9 node {v} ({why}), {how}; restart it with FAILPOINTS={NAME}=1*return"
                ),
            );
            self.c
                .node_mut(v)
                .set_run_env(vec![("FAILPOINTS".into(), format!("{NAME}=1*return"))]);
            self.expect_exit.push(v);
            let before = self.fired_count(v, NAME);
            // it may die before it even listens
            let fired = match self.c.node_mut(v).try_start().await {
                Ok(()) => self
                    .wait_exit(v, Duration::from_secs(30))
                    .await
                    .map(|st| st.to_string()),
                Err(e) => Some(e),
            };
            self.c.node_mut(v).set_run_env(vec![]);
            match fired {
                Some(st) if self.fired_count(v, NAME) > before => {
                    self.log(
                        "crashpoint",
                        format!("node {v} aborted installing a snapshot ({st})"),
                    );
                    self.count(format!("crashpoint/{NAME}"));
                    break;
                }
                Some(st) => {
                    let msg =
                        format!("node {v} exited ({st}) while {NAME} was armed, but not at it");
                    self.log("VIOLATION", msg.clone());
                    self.violations.push(msg);
                    break;
                }
                // A leader still had the entries it lacked (compaction is judged from outside):
                // losing its data dir makes it need a snapshot for sure.
                None if !wiped => {
                    self.log(
                        "crashpoint",
                        format!("{NAME} did not fire on node {v} within 30 s: it caught up from the log; wiping it"),
                    );
                    self.c.kill9(v);
                    self.c.wipe_data_dir(v);
                    wiped = true;
                }
                None => {
                    self.log(
                        "crashpoint",
                        format!("{NAME} did not fire on node {v} within 30 s"),
                    );
                    self.coverage_gaps
                        .push(format!("{NAME} on node {v} did not fire within 30 s"));
                    self.c.kill9(v);
                    break;
                }
            }
        }
        self.expect_exit.retain(|&n| n != v);
        tokio::time::sleep(Duration::from_millis(self.rng.random_range(200..1000))).await;
        self.start_node(v).await;
        self.recover("crashpoint").await;
    }

    /// Waits (≤ 30 s) until, on some shard, the leader's snapshot is far enough past the end of node
    /// `v`'s log (`log_end`) that the log `v` needs is compacted away. (The margin covers the
    /// entries `v` received between the view and its kill.)
    #[cfg(feature = "failpoints")]
    async fn wait_compacted_past(&self, v: u64, log_end: &BTreeMap<u64, u64>) -> bool {
        let keep = (self.snapshot_every / 2).max(1);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for id in self.c.running_ids().into_iter().filter(|&i| i != v) {
                let Some(view) = self.c.node(id).try_view().await else {
                    continue;
                };
                let shards = view["shards"].as_array().cloned().unwrap_or_default();
                let past = shards.iter().any(|s| {
                    let shard = s["shard"].as_u64().unwrap_or(0);
                    s["role"] == "leader"
                        && s["snapshot_index"].as_u64().is_some_and(|i| {
                            i > log_end.get(&shard).copied().unwrap_or(0) + keep + 30
                        })
                });
                if past {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// How many times node `v`'s logs (every run) say that crash point `name` fired.
    #[cfg(feature = "failpoints")]
    fn fired_count(&self, v: u64, name: &str) -> usize {
        self.c
            .logs(v)
            .matches(&format!("crash point {name} fired"))
            .count()
    }

    /// Waits (≤ `timeout`) for node `v` to exit by itself.
    async fn wait_exit(&mut self, v: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.c.node_mut(v).try_exited() {
                return Some(st);
            }
            if !self.c.node(v).is_running() {
                return None;
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // ---- recovery ------------------------------------------------------------------------------

    /// Nodes that died without being told to (not killed, no crash point armed): a violation.
    fn reap_unexpected(&mut self, during: &str) {
        for id in self.c.ids() {
            if self.expect_exit.contains(&id) {
                continue;
            }
            if let Some(st) = self.c.node_mut(id).try_exited() {
                let msg = format!("node {id} exited by itself during {during} ({st})");
                self.log("VIOLATION", msg.clone());
                self.violations.push(msg);
            }
        }
    }

    /// Everything healed: links, paused processes, dead processes. Then every node ready and caught up.
    pub async fn recover(&mut self, after: &'static str) -> bool {
        let began = Instant::now();
        self.c.heal();
        for id in self.c.ids() {
            if self.c.node(id).is_paused() {
                self.c.node_mut(id).resume();
            }
        }
        self.reap_unexpected(after);
        for id in self.c.ids() {
            self.start_node(id).await;
        }
        match wait_whole(self.c, self.recover_timeout).await {
            Ok(()) => {
                self.recoveries
                    .push((after.to_string(), began.elapsed().as_secs_f64()));
                self.log(
                    after,
                    format!(
                        "recovered: every node ready and caught up after {}",
                        secs(began.elapsed())
                    ),
                );
                true
            }
            Err(e) => {
                let msg = format!(
                    "the cluster did not recover within {} after a {after} fault: {e}",
                    secs(self.recover_timeout)
                );
                self.log("VIOLATION", msg.clone());
                self.violations.push(msg);
                self.broken = true;
                false
            }
        }
    }
}

/// Shard → the end of a node's log (at least its applied index) in a cluster view (empty without one).
#[cfg(feature = "failpoints")]
fn log_ends(view: Option<&Value>) -> BTreeMap<u64, u64> {
    view.and_then(|v| v["shards"].as_array())
        .map(|a| {
            a.iter()
                .map(|s| {
                    let index = |name: &str| s[name].as_u64().unwrap_or(0);
                    (
                        index("shard"),
                        index("applied_index").max(index("last_log_index")),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every node answers `/readyz` 200, and every node has applied, on every shard, at least what the most
/// advanced node had applied when this started.
pub async fn wait_whole(c: &TestCluster, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let ids = c.ids();
    // ready
    loop {
        let mut last = BTreeMap::new();
        for &id in &ids {
            last.insert(id, c.node(id).readyz().await);
        }
        if last.values().all(|s| *s == Some(200)) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("not every node ready (last /readyz: {last:?})"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // caught up
    let mut target: Option<BTreeMap<u64, u64>> = None;
    loop {
        let mut views: BTreeMap<u64, Value> = BTreeMap::new();
        for &id in &ids {
            if let Some(v) = c.node(id).try_view().await {
                views.insert(id, v);
            }
        }
        let applied = |v: &Value| -> BTreeMap<u64, u64> {
            v["shards"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| {
                            (
                                s["shard"].as_u64().unwrap_or(0),
                                s["applied_index"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        if views.len() == ids.len() {
            let per_node: BTreeMap<u64, BTreeMap<u64, u64>> =
                views.iter().map(|(id, v)| (*id, applied(v))).collect();
            let t = target.get_or_insert_with(|| {
                let mut t = BTreeMap::new();
                for m in per_node.values() {
                    for (s, a) in m {
                        let e = t.entry(*s).or_insert(0);
                        *e = (*e).max(*a);
                    }
                }
                t
            });
            let behind: Vec<String> = per_node
                .iter()
                .flat_map(|(id, m)| {
                    t.iter().filter_map(move |(s, want)| {
                        let got = m.get(s).copied().unwrap_or(0);
                        (got < *want).then(|| format!("node {id} shard {s}: {got} < {want}"))
                    })
                })
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not caught up: {}", behind.join(", ")));
            }
        } else if Instant::now() > deadline {
            return Err(format!(
                "only nodes {:?} answered GET /v1/cluster",
                views.keys().collect::<Vec<_>>()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `PUT /_node/v1/failpoints/{name}` on node `id` with the action (e.g. `1*return`).
#[cfg(feature = "failpoints")]
pub async fn arm(c: &TestCluster, id: u64, name: &str, action: &str) -> Result<(), String> {
    let path = format!("/_node/v1/failpoints/{name}");
    let auth = node_auth(CLUSTER_SECRET, "PUT", &path, action.as_bytes());
    let r = c
        .node(id)
        .call(Method::PUT, &path)
        .header("x-shopkeep-node-auth", &auth)
        .header("content-type", "text/plain")
        .body_bytes(action.as_bytes().to_vec())
        .try_send()
        .await
        .map_err(|e| format!("transport error: {e}"))?;
    answered_ok(&r)
}

#[cfg(feature = "failpoints")]
pub async fn disarm(c: &TestCluster, id: u64, name: &str) -> Result<(), String> {
    let path = format!("/_node/v1/failpoints/{name}");
    let r = c
        .node(id)
        .call(Method::DELETE, &path)
        .header(
            "x-shopkeep-node-auth",
            &node_auth(CLUSTER_SECRET, "DELETE", &path, b""),
        )
        .try_send()
        .await
        .map_err(|e| format!("transport error: {e}"))?;
    answered_ok(&r)
}

/// 200 → Ok; any other status → its status and body.
#[cfg(feature = "failpoints")]
fn answered_ok(r: &crate::harness::Resp) -> Result<(), String> {
    if r.status == 200 {
        Ok(())
    } else {
        Err(format!("{} {}", r.status, r.text()))
    }
}
