//! The process's log: text or JSON lines on stderr, the default filter, and what it leaves out.
//!
//! `RUST_LOG` (when set and not empty) decides what is logged, alone. Without it the default is
//! [`DEFAULT_FILTER`]: our own lines at `info` (the access log included), openraft's at `error` only,
//! and not even those of openraft's errors that are about reaching one peer (a failed append, vote or
//! read-index heartbeat: one line per retry, many a second while a member is down). Whether a peer
//! answers is reported by the replication layer instead, once when it goes and once when it returns
//! (`shopkeep_raft::peer_health`).
//!
//! Where lines go: through a bounded queue to one writer thread, so no thread that logs (a request's
//! worker above all) ever waits on stderr. When the queue is full (stderr stalled: a full pipe, a slow
//! journald) a line is dropped and counted ([`dropped_lines`], `shopkeep_log_lines_dropped_total`)
//! rather than stall the node. What is queued is written out when the guard of [`init_logging`] is
//! dropped (the process's normal end) and before a fail-stop abort
//! (`shopkeep_faults::disk::before_fail_stop`), each waiting about a second at most.

use std::sync::{Mutex, OnceLock};

use tracing::Metadata;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// What is logged when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,openraft=error";

/// Lines waiting for the writer thread, at most: a burst of about a second of access lines at full
/// load, in a few MiB (a line is a few hundred bytes).
pub const QUEUED_LINES: usize = 8_192;

/// The queue's count of dropped lines, once the log has started.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
/// The writer thread's guard, until [`flush`] takes it.
static WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Lines dropped because the queue to stderr was full, since the log started (0 before).
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// Writes out what is queued and stops the writer thread (about a second at most, however stalled
/// stderr is); lines logged afterwards are lost. For the end of the process.
pub fn flush() {
    let guard = WRITER.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(guard);
}

/// Dropping it [`flush`]es the log.
#[must_use = "dropping the guard stops the log's writer thread"]
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush();
    }
}

/// Starts the log in `format` on stderr. Call once, before anything logs; keep the guard until exit.
pub fn init_logging(format: LogFormat) -> LogGuard {
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.trim().is_empty());
    let quiet_peers = rust_log.is_none();
    let filter = EnvFilter::try_new(rust_log.as_deref().unwrap_or(DEFAULT_FILTER))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let peer_noise = filter_fn(move |metadata| !(quiet_peers && is_peer_noise(metadata)));
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("shopkeep-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    *WRITER.lock().unwrap_or_else(|p| p.into_inner()) = Some(worker);
    shopkeep_faults::disk::before_fail_stop(flush);
    let lines = tracing_subscriber::fmt::layer().with_writer(writer);
    let lines = match format {
        LogFormat::Text => lines
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(peer_noise)
            .boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(peer_noise)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .init();
    LogGuard(())
}

/// An openraft event about one peer's RPC failing: its replication stream's errors, its snapshot
/// transport's, and the per-target errors of votes and leadership checks (they carry a `target` field).
fn is_peer_noise(metadata: &Metadata<'_>) -> bool {
    let module = metadata.module_path().unwrap_or_default();
    if !module.starts_with("openraft") || !metadata.is_event() {
        return false;
    }
    module.starts_with("openraft::replication")
        || module.starts_with("openraft::network")
        || metadata.fields().field("target").is_some()
}
