//! Work that may take the cores only when requests leave them: a snapshot's write (encoding the whole
//! shard, hashing it, writing it) on a thread of its own at a lower CPU priority (`BACKGROUND_NICE`).
//!
//! Why: the shards of a node take their snapshots at about the same time (the load spreads evenly over
//! them, so they pass `--snapshot-every` entries together). On the bench's two cores, eight of them
//! took most of a core for seconds; a node serving half its peak then had less CPU than its load
//! needed, its queues grew, and the p99 reached hundreds of milliseconds. A thread at nice 10 gets a
//! tenth of the share of a request's thread while both are runnable, and all of an idle core: the
//! snapshot takes longer when the node is busy, which costs only log kept on disk a little longer.
//! The builds of a process also take turns (`take_turn`), so that at most one such thread runs.
//!
//! The thread is new for each build and ends with it: an unprivileged thread cannot raise its priority
//! back, so a pooled one would carry the lower priority into the next request's work.

use tokio::sync::{AcquireError, Semaphore, SemaphorePermit, oneshot};

/// The nice value of a background thread (0 is a request's; 19 the lowest).
pub(super) const BACKGROUND_NICE: i32 = 10;

/// One turn: held by a snapshot build for its whole time, so that the builds of a process's shards
/// run one after another.
static TURNS: Semaphore = Semaphore::const_new(1);

/// Waits for this process's turn to build a snapshot; the turn passes on when the permit is dropped.
pub(super) async fn take_turn() -> Result<SemaphorePermit<'static>, AcquireError> {
    TURNS.acquire().await
}

/// Runs `work` on a new thread named `name` at `BACKGROUND_NICE`; `None` when the thread could not be
/// started or `work` panicked.
pub(super) async fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (done, result) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            lower_priority();
            let _ = done.send(work());
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "could not start a background thread");
        return None;
    }
    result.await.ok()
}

/// Lowers the calling thread's priority to `BACKGROUND_NICE` (best effort: a failure only leaves it
/// at the process's).
#[cfg(target_os = "linux")]
fn lower_priority() {
    if current_nice() >= BACKGROUND_NICE {
        return; // already as low (raising it back would need a privilege)
    }
    // SAFETY: a plain system call on the calling thread's own id; no memory is passed.
    let lowered = unsafe { libc::setpriority(libc::PRIO_PROCESS, this_thread(), BACKGROUND_NICE) };
    if lowered != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "could not lower a background thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

/// The calling thread's id (0, which Linux also takes for the calling thread, should it not fit).
#[cfg(target_os = "linux")]
fn this_thread() -> libc::id_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    libc::id_t::try_from(unsafe { libc::gettid() }).unwrap_or(0)
}

/// This thread's nice value (Linux: per thread).
#[cfg(target_os = "linux")]
fn current_nice() -> i32 {
    // SAFETY: as above. getpriority can return -1 legitimately; errno is cleared first.
    unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, this_thread())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_work_runs_at_the_lower_priority_and_the_caller_keeps_its_own() {
        let before = current_nice();
        let (nice, name) = in_background("bg-test", || {
            (
                current_nice(),
                std::thread::current().name().map(str::to_owned),
            )
        })
        .await
        .expect("the work ran");
        assert_eq!(nice, BACKGROUND_NICE.max(before));
        assert_eq!(name.as_deref(), Some("bg-test"));
        assert_eq!(
            current_nice(),
            before,
            "the calling thread's priority is untouched"
        );
    }

    #[tokio::test]
    async fn a_second_build_waits_until_the_first_gives_its_turn_back() {
        let first = take_turn().await.unwrap();
        let second = tokio::spawn(async { take_turn().await.map(drop) });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "the second build went ahead during the first"
        );
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the second build got its turn")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_panic_in_background_work_is_reported_as_none() {
        let result: Option<()> = in_background("bg-panic", || panic!("boom")).await;
        assert!(result.is_none());
    }
}
