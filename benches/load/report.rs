//! The report: a table per system, the summary table (each shopkeep deployment against the PostgreSQL of
//! the same durability), the targets with PASS / FAIL / SKIPPED, the JSON document (stdout and `load.json`) and the plot (`load.png`, drawn by `plot.rs`).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cores::CoreSpeed;
use crate::cpu::OTHER_CPU_WARNING;
use crate::disk::DiskSync;
use crate::plot;
use crate::results::{LevelResult, MixResult, OpenLoopResult, SystemReport};
use crate::scale::{ScaleReport, print_scale};
use crate::settings::{OpenLoop, Settings, System};
use crate::stats::{memory_text, ms, round2};
use crate::{HALF_PEAK, USERS};

// The targets of issue 14: shopkeep / PostgreSQL of the same durability at the best level of each (and
// at least 1x at every level), p99 at half the peak, memory per node.
const TARGET_BEST_RATIO_1: f64 = 3.0;
const TARGET_BEST_RATIO_3: f64 = 1.5;
const TARGET_HALF_PEAK_P99_MS: f64 = 20.0;
const TARGET_RSS_MIB: f64 = 256.0;

pub(crate) fn print_report(
    settings: &Settings,
    reports: &[SystemReport],
    scale: Option<&ScaleReport>,
    wall: Duration,
) {
    for report in reports {
        print_system(settings, report);
    }
    let summary = print_summary(settings, reports);
    let targets = print_targets(&settings.levels, reports);
    let checks_ok = print_checks(reports);
    let scale = scale.map(print_scale);
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
        "summary": summary,
        "targets": targets,
        "checks_ok": checks_ok,
        "scale": scale,
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
        System::Postgres(1) => println!(
            "== {label}: pgbench, SELECT purchase(...) = one plpgsql transaction (fsync, synchronous_commit on)"
        ),
        System::Postgres(_) => println!(
            "== {label}: pgbench on the primary, SELECT purchase(...) = one plpgsql transaction (fsync, synchronous_commit on); \
             standbys s1, s2 streaming, synchronous_standby_names 'ANY 1 (s1, s2)'"
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
    if let Some(disk) = &report.disk {
        println!("disk, right before this system's run: {}", disk.describe());
    }
    if let Some(cores) = &report.cores {
        println!(
            "cores, right before this system's run: {}",
            cores.describe()
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

/// What the summary and the targets compare: each shopkeep deployment against the PostgreSQL one of
/// the same durability, and the ratio its best level must reach against that one's best.
const PAIRS: [(System, System, f64); 2] = [
    (
        System::Postgres(1),
        System::Shopkeep(1),
        TARGET_BEST_RATIO_1,
    ),
    (
        System::Postgres(3),
        System::Shopkeep(3),
        TARGET_BEST_RATIO_3,
    ),
];

/// `system`'s report if it ran (listed, not skipped, with at least one level measured).
fn ran(reports: &[SystemReport], system: System) -> Option<&SystemReport> {
    reports
        .iter()
        .find(|r| r.system == system && r.skipped.is_none() && !r.levels.is_empty())
}

fn throughput_at(report: Option<&SystemReport>, clients: usize) -> Option<f64> {
    report?
        .levels
        .iter()
        .find(|l| l.concurrency == clients)
        .map(|l| l.stats.throughput)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => Some(a / b),
        _ => None,
    }
}

/// Prints `rows` (the first is the header) as a Markdown table, every column right-aligned to its
/// widest cell.
fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:>w$}"))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    if let Some((header, body)) = rows.split_first() {
        line(header);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        println!("|-{}-|", rule.join("-|-"));
        for row in body {
            line(row);
        }
    }
}

/// The lines under the summary that say what each system's run began on: the disk and the cores.
fn print_probe_lines(reports: &[SystemReport]) {
    print_per_system_line(
        reports,
        "a durable 4 KiB write right before each system's run, p50",
        |r| r.disk.map(|d| format!("{:.0} µs", d.p50_us)),
    );
    print_per_system_line(
        reports,
        "a fixed CPU loop right before each system's run, ms alone / on every core at once",
        |r| {
            r.cores
                .map(|c| format!("{:.0} / {:.0}", c.alone_ms, c.together_ms))
        },
    );
}

/// `what`, then each system's label and its `figure` (systems without one left out; no line if none
/// has one).
fn print_per_system_line(
    reports: &[SystemReport],
    what: &str,
    figure: impl Fn(&SystemReport) -> Option<String>,
) {
    let each: Vec<String> = reports
        .iter()
        .filter_map(|r| figure(r).map(|f| format!("{} {f}", r.system.label())))
        .collect();
    if !each.is_empty() {
        println!("{what}: {}", each.join(", "));
    }
}

/// The summary: completed purchases per second of the closed-loop levels, each shopkeep deployment
/// next to the PostgreSQL of the same durability, with their ratio, per level and at the best level of
/// each; then each system's half-peak p99. Its JSON.
fn print_summary(settings: &Settings, reports: &[SystemReport]) -> Value {
    let text = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let ratio_text = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
    let mut rows = vec![vec!["clients".to_string()]];
    for (pg, shopkeep, _) in PAIRS {
        rows[0].extend([pg.label(), shopkeep.label(), "ratio".into()]);
    }
    let mut per_level = Vec::new();
    for &clients in &settings.levels {
        let mut row = vec![clients.to_string()];
        let mut entry = json!({"clients": clients});
        for (pg, shopkeep, _) in PAIRS {
            let base = throughput_at(ran(reports, pg), clients);
            let value = throughput_at(ran(reports, shopkeep), clients);
            let r = ratio(value, base);
            row.extend([text(base), text(value), ratio_text(r)]);
            entry[pg.key()] = json!(base.map(round2));
            entry[shopkeep.key()] = json!(value.map(round2));
            entry[format!("{}/{}", shopkeep.key(), pg.key())] = json!(r.map(round2));
        }
        rows.push(row);
        per_level.push(entry);
    }
    let best_of = |system: System| ran(reports, system).and_then(SystemReport::best);
    let best_text = |b: Option<&LevelResult>| {
        b.map_or("-".to_string(), |b| {
            format!("{:.0} (c={})", b.stats.throughput, b.concurrency)
        })
    };
    let mut row = vec!["best".to_string()];
    let mut best = json!({});
    for (pg, shopkeep, _) in PAIRS {
        let (base, value) = (best_of(pg), best_of(shopkeep));
        let r = ratio(
            value.map(|b| b.stats.throughput),
            base.map(|b| b.stats.throughput),
        );
        row.extend([best_text(base), best_text(value), ratio_text(r)]);
        for (system, b) in [(pg, base), (shopkeep, value)] {
            best[system.key()] = b.map_or(
                Value::Null,
                |b| json!({"clients": b.concurrency, "throughput": round2(b.stats.throughput)}),
            );
        }
        best[format!("{}/{}", shopkeep.key(), pg.key())] = json!(r.map(round2));
    }
    rows.push(row);
    println!();
    println!(
        "summary: completed purchases per second, closed loop (ratio: the shopkeep column / the PostgreSQL column to its left; best: each at its own best level)"
    );
    print_table(&rows);
    print_probe_lines(reports);

    let mut half_rows = vec![vec![
        "system".to_string(),
        "best level".into(),
        "half-peak rate (achieved)".into(),
        "p99 ms".into(),
    ]];
    let mut half_peak = Vec::new();
    for r in reports.iter().filter(|r| r.skipped.is_none()) {
        let (Some(b), Some(h)) = (r.best(), &r.half_peak) else {
            continue;
        };
        half_rows.push(vec![
            r.system.label(),
            format!("c={}, {:.0}/s", b.concurrency, b.stats.throughput),
            format!("{:.0}/s ({:.0}/s)", h.target_rate, h.stats.throughput),
            ms(h.stats.p99_ms),
        ]);
        half_peak.push(json!({
            "system": r.system.key(),
            "best_clients": b.concurrency,
            "best_throughput": round2(b.stats.throughput),
            "connections": h.connections,
            "target_rate": round2(h.target_rate),
            "achieved_rate": round2(h.stats.throughput),
            "p99_ms": round2(h.stats.p99_ms),
        }));
    }
    if half_rows.len() > 1 {
        println!();
        println!(
            "half peak: open loop at {:.0}% of the best level's throughput, Poisson arrivals, latency from the intended send time",
            HALF_PEAK * 100.0
        );
        print_table(&half_rows);
    }
    json!({"per_level": per_level, "best": best, "half_peak": half_peak})
}

/// The targets, PASS / FAIL, or SKIPPED when a system they need did not run (or a phase they
/// need was off); their JSON.
fn print_targets(levels: &[usize], reports: &[SystemReport]) -> Value {
    struct Target {
        name: String,
        value: Option<f64>,
        text: String,
        limit: String,
        /// `Err(why)`: skipped.
        pass: Result<bool, String>,
    }
    let not_run = |system: System| format!("{} not run", system.label());
    let mut targets = Vec::new();
    for (pg_system, system, wanted) in PAIRS {
        let label = system.label();
        let pg_label = pg_system.label();
        let (shopkeep, pg) = (ran(reports, system), ran(reports, pg_system));
        let both = match (shopkeep, pg) {
            (Some(s), Some(p)) => Ok((s, p)),
            (None, _) => Err(not_run(system)),
            (_, None) => Err(not_run(pg_system)),
        };

        // Every level of the run: the lowest ratio; a level either system lacks (a failed phase)
        // leaves the target unproven.
        let worst = both.clone().and_then(|(s, p)| {
            let mut worst: Option<(f64, usize)> = None;
            for &c in levels {
                let missing =
                    |r: &SystemReport| format!("c={c} not measured for {}", r.system.label());
                let value = throughput_at(Some(s), c).ok_or_else(|| missing(s))?;
                let base = throughput_at(Some(p), c).ok_or_else(|| missing(p))?;
                let r =
                    ratio(Some(value), Some(base)).ok_or_else(|| format!("no ratio at c={c}"))?;
                if worst.is_none_or(|(w, _)| r < w) {
                    worst = Some((r, c));
                }
            }
            worst.ok_or_else(|| "no level".to_string())
        });
        targets.push(Target {
            name: format!("{label} / {pg_label}, every level"),
            value: worst.as_ref().ok().map(|w| w.0),
            text: worst
                .as_ref()
                .map_or("-".into(), |(r, c)| format!("{r:.2}x c={c}")),
            limit: ">= 1x".into(),
            pass: worst.map(|(r, _)| r >= 1.0),
        });

        let best = both.clone().and_then(|(s, p)| {
            ratio(
                s.best().map(|b| b.stats.throughput),
                p.best().map(|b| b.stats.throughput),
            )
            .ok_or_else(|| "no throughput".to_string())
        });
        targets.push(Target {
            name: format!("{label} / {pg_label}, best level of each"),
            value: best.as_ref().ok().copied(),
            text: best.as_ref().map_or("-".into(), |r| format!("{r:.2}x")),
            limit: format!(">= {wanted}x"),
            pass: best.map(|r| r >= wanted),
        });

        let half_p99 = |r: &SystemReport| {
            r.half_peak
                .as_ref()
                .map(|h| h.stats.p99_ms)
                .filter(|p| p.is_finite())
                .ok_or_else(|| format!("no half-peak p99 for {}", r.system.label()))
        };
        let own = shopkeep.ok_or_else(|| not_run(system)).and_then(half_p99);
        let versus = both
            .clone()
            .and_then(|(s, p)| Ok((half_p99(s)?, half_p99(p)?)));
        targets.push(Target {
            name: format!("{label}: p99 at half peak vs {pg_label}'s"),
            value: versus.as_ref().ok().map(|v| v.0),
            text: versus
                .as_ref()
                .map_or("-".into(), |(p, _)| format!("{} ms", ms(*p))),
            limit: versus
                .as_ref()
                .map_or("<= baseline's".into(), |(_, b)| format!("<= {} ms", ms(*b))),
            pass: versus.map(|(p, b)| p <= b),
        });
        targets.push(Target {
            name: format!("{label}: p99 at half peak"),
            value: own.as_ref().ok().copied(),
            text: own
                .as_ref()
                .map_or("-".into(), |p| format!("{} ms", ms(*p))),
            limit: format!("<= {TARGET_HALF_PEAK_P99_MS} ms"),
            pass: own.map(|p| p <= TARGET_HALF_PEAK_P99_MS),
        });

        let rss = shopkeep
            .ok_or_else(|| not_run(system))
            .and_then(|s| {
                s.peak_memory_kib()
                    .ok_or_else(|| "no memory figure".to_string())
            })
            .map(|kib| kib as f64 / 1024.0);
        targets.push(Target {
            name: format!("{label}: peak RSS of any node, any phase"),
            value: rss.as_ref().ok().copied(),
            text: rss.as_ref().map_or("-".into(), |m| format!("{m:.1} MiB")),
            limit: format!("<= {TARGET_RSS_MIB} MiB"),
            pass: rss.map(|m| m <= TARGET_RSS_MIB),
        });
        let errors = shopkeep
            .ok_or_else(|| not_run(system))
            .map(SystemReport::errors);
        targets.push(Target {
            name: format!("{label}: errors other than 429/503, all phases"),
            value: errors.as_ref().ok().map(|e| *e as f64),
            text: errors.as_ref().map_or("-".into(), u64::to_string),
            limit: "0".into(),
            pass: errors.map(|e| e == 0),
        });
    }
    let result = |t: &Target| match &t.pass {
        Ok(true) => "PASS".to_string(),
        Ok(false) => "FAIL".to_string(),
        Err(why) => format!("SKIPPED ({why})"),
    };
    println!();
    println!("targets (issue 14)");
    println!("{:<60} {:>14} {:>14}  result", "target", "value", "limit");
    for t in &targets {
        println!(
            "{:<60} {:>14} {:>14}  {}",
            t.name,
            t.text,
            t.limit,
            result(t)
        );
    }
    Value::Array(
        targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.name,
                    "value": t.value.map_or(Value::Null, round2),
                    "limit": t.limit,
                    "pass": t.pass.as_ref().ok(),
                    "result": match &t.pass {
                        Ok(true) => "PASS",
                        Ok(false) => "FAIL",
                        Err(_) => "SKIPPED",
                    },
                    "skipped": t.pass.as_ref().err(),
                })
            })
            .collect(),
    )
}

/// The correctness checks of every system (audits, replicas, ledgers): one line, and whether all
/// passed. They are not targets: a failed one makes every figure suspect.
fn print_checks(reports: &[SystemReport]) -> bool {
    let failed: Vec<&str> = reports
        .iter()
        .flat_map(|r| &r.checks)
        .filter(|(_, ok)| !ok)
        .map(|(line, _)| line.as_str())
        .collect();
    let total = reports.iter().map(|r| r.checks.len()).sum::<usize>();
    if failed.is_empty() {
        println!("checks (audits, replicas, ledgers): {total} ok");
    } else {
        println!(
            "checks (audits, replicas, ledgers): {} of {total} FAILED: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    failed.is_empty()
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
        "disk_sync_before": report.disk.map(DiskSync::to_json),
        "cpu_loop_before": report.cores.map(CoreSpeed::to_json),
    })
}

/// One colour per system, the same in every run: PostgreSQL blue, shopkeep 1 node red, shopkeep 3
/// nodes green, PostgreSQL 3 purple, any other shopkeep deployment orange.
fn plot_color(system: System) -> [u8; 3] {
    plot::COLORS[match system {
        System::Postgres(1) => 0,
        System::Shopkeep(1) => 1,
        System::Shopkeep(3) => 2,
        System::Postgres(_) => 3,
        System::Shopkeep(_) => 4,
    }]
}

fn write_plot(settings: &Settings, reports: &[SystemReport], path: &Path) -> std::io::Result<()> {
    let shown: Vec<&SystemReport> = reports
        .iter()
        .filter(|r| r.skipped.is_none() && !r.levels.is_empty())
        .collect();
    let series = |value: fn(&LevelResult) -> f64| -> Vec<plot::Series> {
        shown
            .iter()
            .map(|r| plot::Series {
                label: r.system.label(),
                color: plot_color(r.system),
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
