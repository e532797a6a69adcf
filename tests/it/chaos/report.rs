//! The run's report: operations by kind and outcome, faults by kind, violations, and per fault window the
//! latency of writes and the longest time without a successful write.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::checker::Violation;
use super::history::Op;
use super::nemesis::Window;

#[derive(Default)]
struct Row {
    attempted: usize,
    ok: usize,
    failed: usize,
    unknown: usize,
    replayed_after_unknown: usize,
    after_run: usize,
    unresolved: usize,
    duplicate_sends: usize,
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Longest gap (µs) in [start, end] without a successful write completing.
fn longest_gap(ok_times: &[i64], start: i64, end: i64) -> i64 {
    let mut prev = start;
    let mut gap = 0;
    for &t in ok_times.iter().filter(|&&t| t >= start && t <= end) {
        gap = gap.max(t - prev);
        prev = t;
    }
    gap.max(end - prev)
}

pub struct ReportInput<'a> {
    pub seed: u64,
    pub t0: i64,
    pub ops: &'a [Op],
    pub windows: &'a [Window],
    pub fault_counts: &'a BTreeMap<String, usize>,
    pub recoveries: &'a [(String, f64)],
    pub liveness: &'a [(u64, Option<f64>)],
    pub violations: &'a [Violation],
    pub coverage_gaps: &'a [String],
    pub wall: std::time::Duration,
    pub timeline: String,
}

pub fn render(r: &ReportInput) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "==================== chaos report (seed {}) ====================",
        r.seed
    );
    let _ = writeln!(
        s,
        "wall time {:.1} s; {} operations",
        r.wall.as_secs_f64(),
        r.ops.len()
    );

    // ops by kind
    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    for op in r.ops {
        let row = rows.entry(op.spec.name()).or_default();
        row.attempted += 1;
        match op.answer() {
            Some((s, _)) if (200..300).contains(&s) => row.ok += 1,
            Some(_) => row.failed += 1,
            None => row.unresolved += 1,
        }
        if op.had_unknown() {
            row.unknown += 1;
            if op.attempts.iter().any(|a| {
                matches!(
                    a.outcome,
                    super::history::Outcome::Definite { replayed: true, .. }
                )
            }) {
                row.replayed_after_unknown += 1;
            }
        }
        if op.resolved_after_run {
            row.after_run += 1;
        }
        if op.senders > 1 {
            row.duplicate_sends += 1;
        }
    }
    let _ = writeln!(
        s,
        "\noperations (ok = 2xx, failed = definite refusal, unknown = at least one attempt timed out / 5xx / \
         connection error, then retried with the same key; replayed = the retry found it already applied; \
         unresolved = still unknown after the final retries, a violation for writes (reads are given up after \
         3 attempts)):"
    );
    let _ = writeln!(
        s,
        "  {:<18} {:>9} {:>7} {:>7} {:>8} {:>9} {:>9} {:>10} {:>6}",
        "kind",
        "attempted",
        "ok",
        "failed",
        "unknown",
        "replayed",
        "after-run",
        "unresolved",
        "dup"
    );
    let mut total = Row::default();
    for (k, row) in &rows {
        let _ = writeln!(
            s,
            "  {:<18} {:>9} {:>7} {:>7} {:>8} {:>9} {:>9} {:>10} {:>6}",
            k,
            row.attempted,
            row.ok,
            row.failed,
            row.unknown,
            row.replayed_after_unknown,
            row.after_run,
            row.unresolved,
            row.duplicate_sends
        );
        total.attempted += row.attempted;
        total.ok += row.ok;
        total.failed += row.failed;
        total.unknown += row.unknown;
        total.replayed_after_unknown += row.replayed_after_unknown;
        total.after_run += row.after_run;
        total.unresolved += row.unresolved;
        total.duplicate_sends += row.duplicate_sends;
    }
    let _ = writeln!(
        s,
        "  {:<18} {:>9} {:>7} {:>7} {:>8} {:>9} {:>9} {:>10} {:>6}",
        "TOTAL",
        total.attempted,
        total.ok,
        total.failed,
        total.unknown,
        total.replayed_after_unknown,
        total.after_run,
        total.unresolved,
        total.duplicate_sends
    );
    let attempts: usize = r.ops.iter().map(|o| o.attempts.len()).sum();
    let _ = writeln!(s, "  ({attempts} HTTP requests in all)");

    // faults
    let _ = writeln!(s, "\nfaults injected:");
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, n) in r.fault_counts {
        *by_kind.entry(k.split('/').next().unwrap_or(k)).or_default() += n;
    }
    for (k, n) in &by_kind {
        let variants: Vec<String> = r
            .fault_counts
            .iter()
            .filter(|(v, _)| v.split('/').next() == Some(k))
            .map(|(v, n)| format!("{} ×{n}", v.split_once('/').map_or(v.as_str(), |x| x.1)))
            .collect();
        let rec: Vec<f64> = r
            .recoveries
            .iter()
            .filter(|(kind, _)| kind == k)
            .map(|(_, s)| *s)
            .collect();
        let max_rec = rec.iter().cloned().fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "  {k:<11} {n:>3}   ({}); slowest recovery {max_rec:.1} s",
            variants.join(", ")
        );
    }

    // latency and unavailability per window
    let mut ok_writes: Vec<i64> = r
        .ops
        .iter()
        .filter(|o| !o.is_read() && o.ok())
        .filter_map(|o| o.completed)
        .collect();
    ok_writes.sort();
    let _ = writeln!(
        s,
        "\nper fault window: writes invoked in it, latency from first attempt to definite answer, and the \
         longest time without any successful write:"
    );
    let _ = writeln!(
        s,
        "  {:<11} {:>8} {:>7} {:>9} {:>9} {:>9} {:>16}",
        "window", "length", "writes", "p50 ms", "p99 ms", "max ms", "unavailable ms"
    );
    let mut spans: Vec<(String, i64, i64)> = r
        .windows
        .iter()
        .map(|w| (w.kind.to_string(), w.start, w.end))
        .collect();
    if let (Some(first), Some(last)) = (r.windows.first(), r.windows.last()) {
        let start = r
            .ops
            .iter()
            .map(|o| o.invoked)
            .filter(|&t| t > 0)
            .min()
            .unwrap_or(first.start);
        spans.insert(0, ("(no fault)".into(), start, first.start));
        let _ = last;
    }
    for (kind, start, end) in spans {
        let mut lat: Vec<i64> = r
            .ops
            .iter()
            .filter(|o| !o.is_read() && o.invoked >= start && o.invoked < end)
            .filter_map(|o| o.completed.map(|c| c - o.invoked))
            .collect();
        lat.sort();
        let gap = longest_gap(&ok_writes, start, end);
        let _ = writeln!(
            s,
            "  {:<11} {:>7.1}s {:>7} {:>9.1} {:>9.1} {:>9.1} {:>16.0}",
            kind,
            (end - start) as f64 / 1e6,
            lat.len(),
            percentile(&lat, 0.50) as f64 / 1e3,
            percentile(&lat, 0.99) as f64 / 1e3,
            lat.last().copied().unwrap_or(0) as f64 / 1e3,
            gap as f64 / 1e3
        );
    }

    let _ = writeln!(
        s,
        "\nliveness after the final heal (a fresh write through each node):"
    );
    for (node, secs) in r.liveness {
        match secs {
            Some(t) => {
                let _ = writeln!(s, "  node {node}: succeeded after {t:.2} s");
            }
            None => {
                let _ = writeln!(s, "  node {node}: NO SUCCESS within the bound");
            }
        }
    }

    if !r.coverage_gaps.is_empty() {
        let _ = writeln!(
            s,
            "\ncoverage gaps (the run did not do what it was asked to):"
        );
        for g in r.coverage_gaps {
            let _ = writeln!(s, "  - {g}");
        }
    }
    let _ = writeln!(s, "\nviolations: {}", r.violations.len());
    for v in r.violations.iter().take(40) {
        let _ = writeln!(s, "  - {v}");
    }
    if r.violations.len() > 40 {
        let _ = writeln!(s, "  ... and {} more", r.violations.len() - 40);
    }
    if !r.violations.is_empty() {
        let _ = writeln!(
            s,
            "\nreproduce with SHOPKEEP_CHAOS_SEED={} (the fault schedule and every client's choices follow the seed; \
             timing does not)",
            r.seed
        );
        let _ = writeln!(s, "\nfault timeline:\n{}", r.timeline);
        let mut shown = 0;
        let mut seen_users = std::collections::BTreeSet::new();
        for v in r.violations {
            if shown >= 5 {
                break;
            }
            if let Some(u) = &v.user {
                // the first violation of each user: the later ones often follow from it
                if !seen_users.insert(u.clone()) {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "\nviolation: {v}\n{}",
                    super::checker::excerpt(v, r.ops, r.t0)
                );
                shown += 1;
            }
        }
    }
    let _ = writeln!(
        s,
        "=================================================================="
    );
    s
}
