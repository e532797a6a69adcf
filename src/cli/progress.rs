//! Progress of a long request (a node catching up, an audit of every shard): while it runs, a line on
//! stderr with the seconds waited, redrawn each second, only when stderr is a terminal (scripts and pipes
//! get nothing) and only once it has taken longer than a second.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const FIRST_AFTER: Duration = Duration::from_secs(1);
const EVERY: Duration = Duration::from_secs(1);

/// Runs `work`, showing `what… Ns` on a terminal's stderr while it takes.
pub async fn shown<T>(what: &str, work: impl Future<Output = T>) -> T {
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + FIRST_AFTER, EVERY);
    tokio::pin!(work);
    let mut drawn = false;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            _ = ticks.tick() => {
                eprint!("\r{what}… {}s", started.elapsed().as_secs());
                let _ = std::io::stderr().flush();
                drawn = true;
            }
        }
    };
    if drawn {
        // Clear the line: what follows starts on a clean one.
        eprint!("\r\x1b[2K");
    }
    result
}
