//! The progress of the run on stderr: one bar for the phase under way on a terminal, one line per phase
//! otherwise.

use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The progress of the whole run on stderr: one bar for the phase under way (on a terminal; one line
/// per phase otherwise).
pub(crate) struct Progress {
    total: usize,
    done: Cell<usize>,
    tty: bool,
    started: Instant,
}

/// One phase under way: `ops` counts the operations so far (the bar shows it). Clears its bar on drop.
pub(crate) struct Phase {
    pub(crate) ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn new(total: usize) -> Progress {
        Progress {
            total,
            done: Cell::new(0),
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    /// Counts `phases` phases that will not run (a system that was skipped).
    pub(crate) fn skip(&self, phases: usize) {
        self.done.set(self.done.get() + phases);
    }

    pub(crate) fn phase(&self, system: &str, what: &str, planned: Duration) -> Phase {
        let index = self.done.get() + 1;
        self.done.set(index);
        let header = format!("[{index}/{}] {system}: {what}", self.total);
        let ops = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        if !self.tty {
            eprintln!(
                "{header}: {:.1} s… ({:.0} s since the start)",
                planned.as_secs_f64(),
                self.started.elapsed().as_secs_f64()
            );
            return Phase {
                ops,
                stop,
                thread: None,
            };
        }
        let (ops_seen, stop_seen) = (ops.clone(), stop.clone());
        let run_started = self.started;
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            const WIDTH: usize = 30;
            while !stop_seen.load(Ordering::Relaxed) {
                let elapsed = started.elapsed().as_secs_f64();
                let filled =
                    ((elapsed / planned.as_secs_f64().max(1e-3)).min(1.0) * WIDTH as f64) as usize;
                let bar: String = (0..WIDTH)
                    .map(|i| if i < filled { '#' } else { '.' })
                    .collect();
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[2K{header} [{bar}] {elapsed:.1}/{:.1} s, {} ops (total {:.0} s)",
                    planned.as_secs_f64(),
                    ops_seen.load(Ordering::Relaxed),
                    run_started.elapsed().as_secs_f64()
                );
                let _ = err.flush();
                drop(err);
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        });
        Phase {
            ops,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
