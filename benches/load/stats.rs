//! Statistics of a measured window: the raw outcomes (`Tally`), their summary (`Stats`: throughput and
//! latency percentiles, errors apart from backpressure), and how numbers are written in tables and JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

/// The raw outcomes of one kind of operation over a measured window.
#[derive(Default)]
pub(crate) struct Tally {
    /// Latency of each successful operation, in microseconds.
    pub(crate) latencies_us: Vec<u64>,
    /// Failed operations by bucket: the status code ("409", "503", …), "timeout", "transport", ….
    pub(crate) failures: BTreeMap<String, u64>,
}

impl Tally {
    pub(crate) fn record(&mut self, outcome: &Result<(), String>, latency: Duration) {
        match outcome {
            Ok(()) => self.latencies_us.push(micros(latency)),
            Err(bucket) => *self.failures.entry(bucket.clone()).or_default() += 1,
        }
    }

    pub(crate) fn merge(&mut self, other: Tally) {
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
pub(crate) struct Stats {
    pub(crate) ops: u64,
    pub(crate) throughput: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    /// Failures other than backpressure.
    pub(crate) errors: u64,
    /// 429 and 503 answers.
    pub(crate) backpressure: u64,
    pub(crate) by_status: BTreeMap<String, u64>,
}

impl Stats {
    pub(crate) fn from_tally(mut tally: Tally, elapsed_secs: f64) -> Stats {
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
    pub(crate) fn reclassify(&mut self, bucket: &str, count: u64) {
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

    pub(crate) fn statuses_text(&self) -> String {
        if self.by_status.is_empty() {
            return "-".into();
        }
        self.by_status
            .iter()
            .map(|(status, count)| format!("{status}×{count}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(crate) fn to_json(&self) -> Value {
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

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds (NaN when there are none).
pub(crate) fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[index] as f64 / 1000.0
}

/// A latency for the tables: two decimals, rounded as in the JSON.
pub(crate) fn ms(x: f64) -> String {
    if x.is_finite() {
        format!("{:.2}", (x * 100.0).round() / 100.0)
    } else {
        "-".to_string()
    }
}

pub(crate) fn round2(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".to_string(), |kib| format!("{:.1}", kib as f64 / 1024.0))
}

/// Peak memory for a table cell: `52.3` or, one per node, `52.3/49.8/50.1`.
pub(crate) fn memory_text(peaks: &[Option<u64>]) -> String {
    if peaks.is_empty() {
        return "-".into();
    }
    peaks
        .iter()
        .map(|kib| mib(*kib))
        .collect::<Vec<_>>()
        .join("/")
}
