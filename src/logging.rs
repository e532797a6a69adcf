//! The process's log: text or JSON lines on stderr, the default filter, and what it leaves out.
//!
//! `RUST_LOG` (when set and not empty) decides what is logged, alone. Without it the default is
//! [`DEFAULT_FILTER`]: our own lines at `info` (the access log included), openraft's at `error` only,
//! and not even those of openraft's errors that are about reaching one peer (a failed append, vote or
//! read-index heartbeat: one line per retry, many a second while a member is down). Whether a peer
//! answers is reported by the replication layer instead, once when it goes and once when it returns
//! (`shopkeep_raft::peer_health`).

use tracing::Metadata;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// What is logged when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,openraft=error";

/// Starts the log in `format` on stderr. Call once, before anything logs.
pub fn init_logging(format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.trim().is_empty());
    let quiet_peers = rust_log.is_none();
    let filter = EnvFilter::try_new(rust_log.as_deref().unwrap_or(DEFAULT_FILTER))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let peer_noise = filter_fn(move |metadata| !(quiet_peers && is_peer_noise(metadata)));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
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
