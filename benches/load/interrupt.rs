//! Cleanups on Ctrl-C: the registry of what to undo (kill the servers, remove their directories) when a
//! signal ends the run and no drop guard gets to run.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

type Cleanup = Box<dyn FnOnce() + Send>;

/// What to undo if the run is interrupted (Ctrl-C): drop guards do not run when a signal ends the
/// process, and the PostgreSQL server (which `pg_ctl` starts in a session of its own) would not even
/// see the terminal's Ctrl-C.
static CLEANUPS: Mutex<Vec<(u64, Cleanup)>> = Mutex::new(Vec::new());
static NEXT_CLEANUP: AtomicU64 = AtomicU64::new(1);

/// Registers `cleanup` to run on Ctrl-C; the token forgets it again.
pub(crate) fn on_interrupt(cleanup: impl FnOnce() + Send + 'static) -> u64 {
    let token = NEXT_CLEANUP.fetch_add(1, Ordering::Relaxed);
    CLEANUPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((token, Box::new(cleanup)));
    token
}

pub(crate) fn forget_interrupt(token: u64) {
    CLEANUPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(t, _)| *t != token);
}

pub(crate) fn run_interrupt_cleanups() {
    let cleanups = std::mem::take(&mut *CLEANUPS.lock().unwrap_or_else(|p| p.into_inner()));
    for (_, cleanup) in cleanups {
        cleanup();
    }
}
