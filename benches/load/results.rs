//! The results of one system (`SystemReport`) and of each of its phases: the closed-loop levels, the
//! mix and the half-peak open loop, with their JSON.

use serde_json::{Value, json};

use crate::cores::CoreSpeed;
use crate::cpu::CpuShare;
use crate::disk::DiskSync;
use crate::settings::System;
use crate::stats::{Stats, round2};

/// Results of one system: every phase, the checks, or why it was skipped.
pub(crate) struct SystemReport {
    pub(crate) system: System,
    /// What the memory figures are.
    pub(crate) memory_label: &'static str,
    pub(crate) levels: Vec<LevelResult>,
    pub(crate) mix: Option<MixResult>,
    pub(crate) half_peak: Option<OpenLoopResult>,
    /// (what, ok) lines of the audit / ledger checks.
    pub(crate) checks: Vec<(String, bool)>,
    pub(crate) skipped: Option<String>,
    /// Remarks for the report (pgbench's complaints, leader changes, …).
    pub(crate) notes: Vec<String>,
    /// CPU time of servers not started as this process's children (PostgreSQL's), seconds.
    pub(crate) server_cpu_seconds: f64,
    /// Who used the CPU during the system's run.
    pub(crate) cpu: Option<CpuShare>,
    /// What a durable write cost right before the system's run.
    pub(crate) disk: Option<DiskSync>,
    /// What a fixed CPU loop took right before the system's run.
    pub(crate) cores: Option<CoreSpeed>,
}

impl SystemReport {
    pub(crate) fn new(system: System) -> SystemReport {
        SystemReport {
            system,
            memory_label: match system {
                System::Postgres(1) => "peak Σ PSS of all postgres processes, MiB",
                System::Postgres(_) => {
                    "peak Σ PSS of each server's postgres processes, MiB (primary/s1/s2)"
                }
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
            disk: None,
            cores: None,
            notes: Vec::new(),
        }
    }

    /// The closed-loop level with the highest throughput.
    pub(crate) fn best(&self) -> Option<&LevelResult> {
        self.levels
            .iter()
            .filter(|l| l.stats.throughput.is_finite())
            .max_by(|a, b| a.stats.throughput.total_cmp(&b.stats.throughput))
    }

    /// The highest memory figure of any node over every phase, KiB.
    pub(crate) fn peak_memory_kib(&self) -> Option<u64> {
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
    pub(crate) fn errors(&self) -> u64 {
        self.levels.iter().map(|l| l.stats.errors).sum::<u64>()
            + self.mix.as_ref().map_or(0, |m| m.total.errors)
            + self.half_peak.as_ref().map_or(0, |h| h.stats.errors)
    }
}

/// One closed-loop level of one-step purchases.
pub(crate) struct LevelResult {
    pub(crate) concurrency: usize,
    pub(crate) stats: Stats,
    /// Cluster mode: the share of measured requests sent to a node that did not lead their shard.
    pub(crate) forwarded_share: Option<f64>,
    /// Cluster mode: a shard's leader changed between the start and the end of the level.
    pub(crate) leaders_changed: bool,
    /// Peak memory of each node over the phase, KiB (`None`: unreadable).
    pub(crate) peak_rss_kib: Vec<Option<u64>>,
    /// The peak could not be reset before the phase: it is the peak since the node started.
    pub(crate) peak_since_start: bool,
}

impl LevelResult {
    pub(crate) fn to_json(&self) -> Value {
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
pub(crate) struct MixResult {
    pub(crate) concurrency: usize,
    pub(crate) total: Stats,
    pub(crate) kinds: Vec<(&'static str, Stats)>,
    pub(crate) peak_rss_kib: Vec<Option<u64>>,
}

impl MixResult {
    pub(crate) fn to_json(&self) -> Value {
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
pub(crate) struct OpenLoopResult {
    pub(crate) connections: usize,
    /// The intended rate (operations per second).
    pub(crate) target_rate: f64,
    /// Latencies measured from the intended send times; `throughput` is the achieved rate.
    pub(crate) stats: Stats,
    pub(crate) peak_rss_kib: Vec<Option<u64>>,
}

impl OpenLoopResult {
    pub(crate) fn to_json(&self) -> Value {
        let mut value = self.stats.to_json();
        value["connections"] = json!(self.connections);
        value["target_rate"] = round2(self.target_rate);
        value["achieved_rate"] = round2(self.stats.throughput);
        value["peak_memory_kib"] = json!(self.peak_rss_kib);
        value
    }
}

/// Kinds of operations of the mix, in the order of the tables.
pub(crate) const MIX_KINDS: [&str; 5] = ["purchase", "two_step", "credit", "refund", "read"];
