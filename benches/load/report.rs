//! The report: a table per system, the ratio table against PostgreSQL, the targets with PASS / FAIL,
//! the JSON document (stdout and `load.json`) and the plot (`load.png`, drawn by `plot.rs`).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cpu::OTHER_CPU_WARNING;
use crate::plot;
use crate::results::{LevelResult, MixResult, OpenLoopResult, SystemReport};
use crate::scale::{ScaleReport, print_scale};
use crate::settings::{OpenLoop, Settings, System};
use crate::stats::{memory_text, ms, round2};
use crate::{HALF_PEAK, USERS};

// The targets of the issue (shopkeep / PostgreSQL at the best concurrency of each).
const TARGET_RATIO_1: f64 = 3.0;
const TARGET_RATIO_3: f64 = 1.5;
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
    let postgres = reports.iter().find(|r| r.system == System::Postgres);
    let ratios = print_ratios(settings, reports, postgres);
    let targets = print_targets(reports, postgres);
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
        "ratios": ratios,
        "targets": targets,
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
        System::Postgres => println!(
            "== {label}: pgbench, SELECT purchase(...) = one plpgsql transaction (fsync, synchronous_commit on)"
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

/// The ratio table (per level and at the best level of each); its JSON.
fn print_ratios(
    settings: &Settings,
    reports: &[SystemReport],
    postgres: Option<&SystemReport>,
) -> Value {
    let Some(pg) = postgres.filter(|p| p.skipped.is_none() && !p.levels.is_empty()) else {
        println!();
        println!("ratios: no PostgreSQL baseline in this run");
        return Value::Null;
    };
    let shopkeeps: Vec<&SystemReport> = reports
        .iter()
        .filter(|r| matches!(r.system, System::Shopkeep(_)) && r.skipped.is_none())
        .collect();
    println!();
    println!("shopkeep / PostgreSQL, completed purchases per second (closed loop)");
    let mut header = format!("{:>11} {:>12}", "concurrency", "PostgreSQL");
    for s in &shopkeeps {
        header.push_str(&format!(" {:>18} {:>7}", s.system.label(), "ratio"));
    }
    println!("{header}");
    let throughput_at = |r: &SystemReport, c: usize| {
        r.levels
            .iter()
            .find(|l| l.concurrency == c)
            .map(|l| l.stats.throughput)
    };
    let ratio_text = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let mut per_level = Vec::new();
    for &c in &settings.levels {
        let base = throughput_at(pg, c);
        let mut line = format!("{:>11} {:>12}", c, opt(base));
        let mut entry = json!({"concurrency": c, "postgresql": base.map(round2)});
        for s in &shopkeeps {
            let value = throughput_at(s, c);
            line.push_str(&format!(
                " {:>18} {:>7}",
                opt(value),
                ratio_text(value, base)
            ));
            entry[s.system.key()] = json!({
                "throughput": value.map(round2),
                "ratio": match (value, base) {
                    (Some(v), Some(b)) if b > 0.0 => round2(v / b),
                    _ => Value::Null,
                },
            });
        }
        println!("{line}");
        per_level.push(entry);
    }
    let best_text = |r: &SystemReport| {
        r.best().map_or("-".into(), |b| {
            format!("{:.0} (c={})", b.stats.throughput, b.concurrency)
        })
    };
    let pg_best = pg.best().map(|b| b.stats.throughput);
    let mut line = format!("{:>11} {:>12}", "best", best_text(pg));
    let mut best = json!({
        "postgresql": pg.best().map(|b| json!({"throughput": round2(b.stats.throughput), "concurrency": b.concurrency})),
    });
    for s in &shopkeeps {
        let value = s.best().map(|b| b.stats.throughput);
        line.push_str(&format!(
            " {:>18} {:>7}",
            best_text(s),
            ratio_text(value, pg_best)
        ));
        best[s.system.key()] = json!({
            "throughput": value.map(round2),
            "concurrency": s.best().map(|b| b.concurrency),
            "ratio": match (value, pg_best) {
                (Some(v), Some(b)) if b > 0.0 => round2(v / b),
                _ => Value::Null,
            },
        });
    }
    println!("{line}");
    let mut half = Vec::new();
    for r in std::iter::once(pg).chain(shopkeeps.iter().copied()) {
        if let Some(h) = &r.half_peak {
            half.push(format!(
                "{} p99 {} ms at {:.0}/s",
                r.system.label(),
                ms(h.stats.p99_ms),
                h.stats.throughput
            ));
        }
    }
    if !half.is_empty() {
        println!("half peak (open loop): {}", half.join("; "));
    }
    json!({"per_level": per_level, "best": best})
}

/// The targets, PASS / FAIL; their JSON.
fn print_targets(reports: &[SystemReport], postgres: Option<&SystemReport>) -> Value {
    struct Target {
        name: String,
        value: Option<f64>,
        text: String,
        limit: String,
        pass: Option<bool>,
    }
    let mut targets = Vec::new();
    let pg_best = postgres
        .filter(|p| p.skipped.is_none())
        .and_then(|p| p.best())
        .map(|b| b.stats.throughput);
    for r in reports.iter().filter(|r| r.skipped.is_none()) {
        let System::Shopkeep(n) = r.system else {
            continue;
        };
        let label = r.system.label();
        let wanted = if n == 1 {
            TARGET_RATIO_1
        } else {
            TARGET_RATIO_3
        };
        let ratio = match (r.best().map(|b| b.stats.throughput), pg_best) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
        targets.push(Target {
            name: format!("{label}: best purchases/s / PostgreSQL best"),
            value: ratio,
            text: ratio.map_or("no baseline".into(), |r| format!("{r:.2}x")),
            limit: format!(">= {wanted}x"),
            pass: ratio.map(|r| r >= wanted),
        });
        let p99 = r.half_peak.as_ref().map(|h| h.stats.p99_ms);
        targets.push(Target {
            name: format!("{label}: p99 at half peak (open loop)"),
            value: p99,
            text: p99.map_or("-".into(), |p| format!("{} ms", ms(p))),
            limit: format!("<= {TARGET_HALF_PEAK_P99_MS} ms"),
            pass: p99.map(|p| p <= TARGET_HALF_PEAK_P99_MS),
        });
        let errors = r.errors();
        targets.push(Target {
            name: format!("{label}: errors other than 429/503, all phases"),
            value: Some(errors as f64),
            text: errors.to_string(),
            limit: "0".into(),
            pass: Some(errors == 0),
        });
        let rss = r.peak_memory_kib().map(|kib| kib as f64 / 1024.0);
        targets.push(Target {
            name: format!("{label}: peak RSS of any node, any phase"),
            value: rss,
            text: rss.map_or("-".into(), |m| format!("{m:.1} MiB")),
            limit: format!("<= {TARGET_RSS_MIB} MiB"),
            pass: rss.map(|m| m <= TARGET_RSS_MIB),
        });
        let checks_ok = r.checks.iter().all(|(_, ok)| *ok);
        targets.push(Target {
            name: format!("{label}: audit, replicas, order count"),
            value: None,
            text: if checks_ok { "ok" } else { "see above" }.into(),
            limit: "ok".into(),
            pass: Some(checks_ok),
        });
    }
    if targets.is_empty() {
        return json!([]);
    }
    println!();
    println!("targets (shopkeep / PostgreSQL at the best concurrency of each)");
    println!("{:<56} {:>12} {:>12}  result", "target", "value", "limit");
    for t in &targets {
        let result = match t.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a",
        };
        println!("{:<56} {:>12} {:>12}  {result}", t.name, t.text, t.limit);
    }
    Value::Array(
        targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.name,
                    "value": t.value.map_or(Value::Null, round2),
                    "limit": t.limit,
                    "pass": t.pass,
                })
            })
            .collect(),
    )
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
    })
}

fn write_plot(settings: &Settings, reports: &[SystemReport], path: &Path) -> std::io::Result<()> {
    let shown: Vec<&SystemReport> = reports
        .iter()
        .filter(|r| r.skipped.is_none() && !r.levels.is_empty())
        .collect();
    let series = |value: fn(&LevelResult) -> f64| -> Vec<plot::Series> {
        shown
            .iter()
            .enumerate()
            .map(|(i, r)| plot::Series {
                label: r.system.label(),
                color: plot::COLORS[i % plot::COLORS.len()],
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
