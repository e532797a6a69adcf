//! Disk faults of the node's data directory: a full disk is waited out, any other I/O error stops the
//! process.
//!
//! Every redb file of a node (the Raft log, the shard files) is opened on a [`FailStopBackend`]:
//! - a failed `fsync` (any errno) aborts the process at once. After a failed fsync the kernel may have
//!   dropped the dirty pages it could not write and reports the error only once (the "fsync-gate"
//!   problem), so nothing cached can be trusted: a restart recovers from what is durable, and nothing
//!   that may not be durable was acknowledged;
//! - any other I/O error but a full disk (EIO on a read or a write…) aborts the process too;
//! - a write refused for want of space (`ENOSPC`, `EDQUOT`) is returned to redb. redb then refuses
//!   every later operation on that `Database` (`PreviousIo`) until it is closed: the owner reopens the
//!   file and retries, with back-off, until space is freed (`shopkeep_raft::log_store`,
//!   `shopkeep_raft::state_machine`, `shopkeep::state`).
//!
//! [`DiskHealth`] is what the node reports meanwhile: which files are full (the engine refuses writes
//! with 503, `/readyz` says why, the gauge `shopkeep_storage_full{file}`), with one log line when a file
//! becomes full and one when it is written again.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use redb::backends::FileBackend;
use redb::{BackendError, Database, DatabaseError, StorageBackend};

const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

/// Whether `error` says the disk (or the quota) is full.
pub fn is_full(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull
        || matches!(error.raw_os_error(), Some(ENOSPC | EDQUOT))
        || error.kind() == std::io::ErrorKind::QuotaExceeded
}

/// Whether a storage error, anywhere in its chain of sources, is a full disk: an I/O error saying so,
/// or redb's `PreviousIo`, which follows one (every other I/O error stopped the process, see the
/// module docs), or `DatabaseClosed`, met by a reader of a file closed to be reopened after one.
pub fn is_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(e) = error.downcast_ref::<redb::Error>() {
            match e {
                redb::Error::Io(io) => return is_full(io),
                redb::Error::PreviousIo | redb::Error::DatabaseClosed => return true,
                _ => {}
            }
        }
        if let Some(e) = error.downcast_ref::<redb::StorageError>() {
            match e {
                redb::StorageError::Io(io) => return is_full(io),
                redb::StorageError::PreviousIo | redb::StorageError::DatabaseClosed => return true,
                _ => {}
            }
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if is_full(io) {
                return true;
            }
        }
        next = error.source();
    }
    false
}

/// What [`fail_stop`] runs between its line and the abort (set once, by the binary).
static BEFORE_ABORT: OnceLock<fn()> = OnceLock::new();

/// Sets what [`fail_stop`] runs after logging and before aborting: the binary writes out its log's
/// queue there, so the line reaches stderr. Bounded by the hook: it must not wait long on a stalled
/// stderr. Only the first call counts.
pub fn before_fail_stop(hook: fn()) {
    let _ = BEFORE_ABORT.set(hook);
}

/// Logs one line and aborts the process: `op` on `path` failed in a way that leaves nothing cached
/// trustworthy. A restart recovers from what is durable (the log holds every acknowledged write).
///
/// The line goes to the log, or straight to stderr where no subscriber would record an error (no
/// subscriber set, or `RUST_LOG=off`): once either way. Then the [`before_fail_stop`] hook runs.
pub fn fail_stop(path: &Path, op: &str, error: &std::io::Error) -> ! {
    let message = format!(
        "FATAL: {op} of {} failed: {error}; stopping the node (a restart recovers from the durable log)",
        path.display()
    );
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{message}");
    } else {
        eprintln!("{message}");
    }
    if let Some(hook) = BEFORE_ABORT.get() {
        hook();
    }
    std::process::abort()
}

/// A redb file backend that stops the process on every I/O error but a full disk (module docs).
#[derive(Debug)]
pub struct FailStopBackend {
    inner: FileBackend,
    path: PathBuf,
}

impl FailStopBackend {
    fn check<T>(&self, op: &str, result: Result<T, std::io::Error>) -> Result<T, std::io::Error> {
        match result {
            Err(error) if !is_full(&error) => fail_stop(&self.path, op, &error),
            other => other,
        }
    }
}

impl StorageBackend for FailStopBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.check("reading the length", self.inner.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.check("a read", self.inner.read(offset, out))
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check("resizing", self.inner.set_len(len))
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        // Whatever the errno: after a failed fsync the page cache cannot be trusted.
        match self.inner.sync_data() {
            Err(error) => fail_stop(&self.path, "fsync", &error),
            Ok(()) => Ok(()),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check("a write", self.inner.write(offset, data))
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// Opens (or creates) the redb file at `path` with `builder`'s settings on a [`FailStopBackend`].
pub fn open_database(builder: &redb::Builder, path: &Path) -> Result<Database, DatabaseError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    builder.create_with_backend(FailStopBackend {
        inner: FileBackend::new(file)?,
        path: path.to_path_buf(),
    })
}

/// Bytes that the log keeps free on its file system for the state machines and snapshots: an eighth of
/// it, at most 64 MiB. The log stops growing (as if the disk were full) below it, so that the entries it
/// already holds can still be applied: a shard whose own write is refused for want of space falls
/// behind what was applied and refuses reads until it caught up (see `shopkeep::state`).
pub fn reserve(total: u64) -> u64 {
    (total / 8).min(64 << 20)
}

/// The bytes available to this process on the file system of `path`, and its size (`None` if it
/// cannot be told).
pub fn space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().unwrap_or(path);
    let name = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `name` is a valid C string and `stat` a buffer of the right type, filled on success.
    let stat = unsafe {
        if libc::statvfs(name.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    let fragment = stat.f_frsize as u64;
    Some((
        stat.f_bavail as u64 * fragment,
        stat.f_blocks as u64 * fragment,
    ))
}

/// Why the log should not grow now: less than [`reserve`] left on the file system of `path`.
pub fn below_reserve(path: &Path) -> Option<String> {
    let (free, total) = space(path)?;
    let reserve = reserve(total);
    (free < reserve).then(|| {
        format!("{free} bytes free, less than the {reserve} kept for applying what is logged")
    })
}

/// Which of the node's files are full now.
#[derive(Debug, Default)]
pub struct DiskHealth {
    /// file → why (the first error seen).
    full: Mutex<BTreeMap<PathBuf, String>>,
}

impl DiskHealth {
    pub fn new() -> DiskHealth {
        DiskHealth::default()
    }

    /// Serves `shopkeep_storage_full{file}` for `file` from now on: 0 until it is full (so the series
    /// exists before anything goes wrong).
    pub fn watch(&self, file: &Path) {
        let full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        let value = if full.contains_key(file) { 1.0 } else { 0.0 };
        metrics::gauge!("shopkeep_storage_full", "file" => file.display().to_string()).set(value);
    }

    /// A write to `file` failed for want of space. Logged once until [`DiskHealth::written`].
    pub fn full(&self, file: &Path, error: &dyn std::fmt::Display) {
        let mut full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        if full.contains_key(file) {
            return;
        }
        full.insert(file.to_path_buf(), error.to_string());
        metrics::gauge!("shopkeep_storage_full", "file" => file.display().to_string()).set(1.0);
        tracing::error!(file = %file.display(), %error,
            "disk full: writes are refused and retried until space is freed");
    }

    /// A write to `file` succeeded: if it was full, it is no longer.
    pub fn written(&self, file: &Path) {
        let mut full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        if full.remove(file).is_some() {
            metrics::gauge!("shopkeep_storage_full", "file" => file.display().to_string()).set(0.0);
            tracing::warn!(file = %file.display(), "disk no longer full: writes resume");
        }
    }

    /// Why the node cannot write now (`disk full at <path>`), if it cannot.
    pub fn trouble(&self) -> Option<String> {
        let full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        full.keys()
            .next()
            .map(|file| format!("disk full at {}", file.display()))
    }
}

/// Waits between retries of a write refused for want of space: 20 ms, doubling up to 500 ms.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff(Duration::from_millis(20))
    }

    /// The next pause (and lengthens the one after).
    pub fn pause(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(Duration::from_millis(500));
        pause
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_edquot_are_full_and_eio_is_not() {
        assert!(is_full(&std::io::Error::from_raw_os_error(ENOSPC)));
        assert!(is_full(&std::io::Error::from_raw_os_error(EDQUOT)));
        assert!(!is_full(&std::io::Error::from_raw_os_error(5)));
        let redb_full = redb::Error::Io(std::io::Error::from_raw_os_error(ENOSPC));
        assert!(is_disk_full(&redb_full));
        assert!(is_disk_full(&redb::Error::PreviousIo));
        let commit = redb::CommitError::Storage(redb::StorageError::Io(
            std::io::Error::from_raw_os_error(5),
        ));
        assert!(!is_disk_full(&commit));
        let wrapped = redb::CommitError::Storage(redb::StorageError::PreviousIo);
        assert!(is_disk_full(&redb::Error::from(wrapped)));
    }

    #[test]
    fn health_reports_the_first_full_file_until_it_is_written() {
        let health = DiskHealth::new();
        assert_eq!(health.trouble(), None);
        let path = Path::new("/data/raft-log.redb");
        health.full(path, &"No space left on device");
        health.full(path, &"again");
        assert_eq!(
            health.trouble().as_deref(),
            Some("disk full at /data/raft-log.redb")
        );
        health.written(path);
        assert_eq!(health.trouble(), None);
    }
}
