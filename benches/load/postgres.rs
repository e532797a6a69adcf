//! The PostgreSQL baselines' phases (`pg`: one server; `pg3`: a primary and two synchronous standbys):
//! the same levels, mix and half-peak phase as shopkeep's, run through pgbench and turned into the same
//! results. The servers and pgbench themselves are in `pg.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::pg;
use crate::progress::Progress;
use crate::results::{LevelResult, MixResult, OpenLoopResult, SystemReport};
use crate::settings::{OpenLoop, Settings, System};
use crate::stats::{Stats, Tally, ms};
use crate::{CREDIT_MINOR, HALF_PEAK, USERS};

/// A PostgreSQL baseline of `servers` servers (1, or 3: a primary and two standbys): every phase
/// through pgbench (see `load/pg.rs`).
pub(crate) fn run_postgres(
    system: System,
    servers: u64,
    settings: &Settings,
    progress: &Progress,
) -> SystemReport {
    let mut report = SystemReport::new(system);
    let label = system.label();
    let skip = |report: &mut SystemReport, why: String| {
        eprintln!("{label} baseline SKIPPED: {why}");
        progress.skip(settings.phases_per_system());
        report.skipped = Some(why);
    };
    let bins = match pg::find_bins() {
        Ok(bins) => bins,
        Err(e) => {
            skip(&mut report, e);
            return report;
        }
    };
    let standbys = servers.saturating_sub(1) as usize;
    if standbys == 0 {
        eprintln!("{label}: initdb, start (fsync on, synchronous_commit on), schema, seed…");
    } else {
        eprintln!(
            "{label}: initdb, start (fsync on, synchronous_commit on), schema, seed, \
             {standbys} standbys (pg_basebackup), synchronous_standby_names 'ANY 1 (…)'…"
        );
    }
    let server = match pg::PgServer::start(
        bins,
        standbys,
        settings.max_connections() + 10,
        USERS,
        CREDIT_MINOR,
    ) {
        Ok(server) => server,
        Err(e) => {
            skip(&mut report, e);
            return report;
        }
    };
    if standbys == 0 {
        eprintln!("{label}: listening on {}", server.describe());
    } else {
        eprintln!(
            "{label}: {}; both standbys streaming, sync_state quorum",
            server.describe()
        );
    }
    let seconds = settings.phase_time().as_secs_f64();
    // pgbench's -T is whole seconds: the warm-up absorbs the rounding.
    let warm_up = Duration::from_secs_f64(seconds.ceil() - settings.duration.as_secs_f64());
    let failed = |report: &mut SystemReport, what: &str, e: String| {
        eprintln!("{label}: {what}: {e}");
        report.notes.push(format!("{what}: {e}"));
    };

    // Rejections stored under idempotency keys during a run, by kind: (kind, status) → count.
    let rejections_during = |before: &BTreeMap<(String, String), u64>| {
        let after = server.rejections().unwrap_or_default();
        let mut new = BTreeMap::new();
        for (key, count) in after {
            let old = before.get(&key).copied().unwrap_or(0);
            if count > old {
                new.insert(key, count - old);
            }
        }
        new
    };

    for &concurrency in &settings.levels {
        let phase = progress.phase(
            &label,
            &format!("purchases, c={concurrency}"),
            settings.phase_time(),
        );
        let before = server.rejections().unwrap_or_default();
        let run = server.pgbench(
            &format!("c{concurrency}"),
            concurrency,
            seconds,
            None,
            &[("purchase.pgbench", 1)],
            &phase,
        );
        drop(phase);
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                failed(&mut report, &format!("purchases c={concurrency}"), e);
                continue;
            }
        };
        let (tallies, elapsed) = run.measured(warm_up, settings.duration, 1);
        let tally = tallies.into_iter().next().unwrap_or_default();
        let mut stats = Stats::from_tally(tally, elapsed);
        pg::add_failures(&mut stats, &run);
        for ((_, status), count) in rejections_during(&before) {
            stats.reclassify(&status, count);
        }
        report
            .notes
            .extend(run.problems.iter().map(|p| format!("c={concurrency}: {p}")));
        eprintln!(
            "{label}: c={concurrency}: {:.0} purchases/s, p99 {} ms, {} errors",
            stats.throughput,
            ms(stats.p99_ms),
            stats.errors
        );
        report.levels.push(LevelResult {
            concurrency,
            stats,
            forwarded_share: None,
            leaders_changed: false,
            peak_rss_kib: run.peak_pss_kib.clone(),
            peak_since_start: false,
        });
    }

    if settings.mix_concurrency > 0 {
        let concurrency = settings.mix_concurrency;
        let phase = progress.phase(
            &label,
            &format!("mix, c={concurrency}"),
            settings.phase_time(),
        );
        let before = server.rejections().unwrap_or_default();
        let scripts: Vec<(&str, u32)> = pg::MIX.iter().map(|(_, name, _, w)| (*name, *w)).collect();
        let run = server.pgbench("mix", concurrency, seconds, None, &scripts, &phase);
        drop(phase);
        match run {
            Ok(run) => {
                let (tallies, elapsed) = run.measured(warm_up, settings.duration, pg::MIX.len());
                let rejected = rejections_during(&before);
                let mut total = Tally::default();
                let mut kinds = Vec::new();
                for ((kind, ..), tally) in pg::MIX.iter().zip(tallies) {
                    let mut stats = Stats::from_tally(
                        Tally {
                            latencies_us: tally.latencies_us.clone(),
                            failures: BTreeMap::new(),
                        },
                        elapsed,
                    );
                    for ((k, status), count) in &rejected {
                        if k == kind {
                            stats.reclassify(status, *count);
                        }
                    }
                    total.merge(tally);
                    kinds.push((*kind, stats));
                }
                let mut total = Stats::from_tally(total, elapsed);
                pg::add_failures(&mut total, &run);
                for ((_, status), count) in &rejected {
                    total.reclassify(status, *count);
                }
                report
                    .notes
                    .extend(run.problems.iter().map(|p| format!("mix: {p}")));
                report.mix = Some(MixResult {
                    concurrency,
                    total,
                    kinds,
                    peak_rss_kib: run.peak_pss_kib.clone(),
                });
            }
            Err(e) => failed(&mut report, "mix", e),
        }
    }

    if settings.open_loop != OpenLoop::Off {
        match report
            .best()
            .map(|b| (b.stats.throughput, settings.open_loop.connections(b)))
        {
            Some((best, connections)) if best > 0.0 => {
                let rate = best * HALF_PEAK;
                let phase = progress.phase(
                    &label,
                    &format!("half peak, open loop at {rate:.0}/s"),
                    settings.phase_time(),
                );
                let before = server.rejections().unwrap_or_default();
                let run = server.pgbench(
                    "half-peak",
                    connections,
                    seconds,
                    Some(rate),
                    &[("purchase.pgbench", 1)],
                    &phase,
                );
                drop(phase);
                match run {
                    Ok(run) => {
                        let (tallies, elapsed) = run.measured(warm_up, settings.duration, 1);
                        let tally = tallies.into_iter().next().unwrap_or_default();
                        let mut stats = Stats::from_tally(tally, elapsed);
                        pg::add_failures(&mut stats, &run);
                        for ((_, status), count) in rejections_during(&before) {
                            stats.reclassify(&status, count);
                        }
                        report
                            .notes
                            .extend(run.problems.iter().map(|p| format!("half peak: {p}")));
                        report.half_peak = Some(OpenLoopResult {
                            connections,
                            target_rate: rate,
                            stats,
                            peak_rss_kib: run.peak_pss_kib.clone(),
                        });
                    }
                    Err(e) => failed(&mut report, "half peak", e),
                }
            }
            _ => progress.skip(1),
        }
    }

    report.checks.extend(server.check(&system.key()));
    report.server_cpu_seconds = server.cpu_seconds().unwrap_or(0.0);
    eprintln!("{label}: stopping the servers, removing their directory");
    drop(server);
    report
}
