//! The log file and its writer thread: one transaction and one durable commit (one fsync) for every
//! batch of waiting operations of all shards; a commit refused for want of space reopens the file and
//! retries the batch. Also the watch that reports the disk full below its reserve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use redb::{Database, Durability};
use tokio::sync::mpsc;

use super::{LOG, LOG_CACHE_BYTES, LogDbError, MAX_OPS_PER_COMMIT, Op, RAFT_STATE, redb_error};
use shopkeep_faults::disk::{self, Backoff, DiskHealth};
use shopkeep_faults::failpoints;

/// The open log file, reopened after a commit refused for want of space (see the module docs).
pub(super) struct LogFile {
    pub(super) path: PathBuf,
    /// `None` while the writer reopens it.
    pub(super) db: RwLock<Option<Arc<Database>>>,
    pub(super) health: Arc<DiskHealth>,
}

impl LogFile {
    pub(super) fn open(path: &Path) -> Result<Database, LogDbError> {
        // The log is written far more than it is read (openraft reads the mirror): a small page cache.
        let mut builder = Database::builder();
        builder.set_cache_size(LOG_CACHE_BYTES);
        disk::open_database(&builder, path).map_err(redb_error)
    }

    /// The database, or `None` while it is being reopened.
    pub(super) fn current(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The database, or an error while it is being reopened.
    pub(super) fn open_now(&self) -> Result<Arc<Database>, LogDbError> {
        self.current()
            .ok_or_else(|| LogDbError::Write(format!("{} is being reopened", self.path.display())))
    }

    /// Closes the database (redb refuses everything after a failed write) and opens it again, retrying
    /// until the open succeeds (readers may still hold the old handle for a moment).
    fn reopen(&self, backoff: &mut Backoff) -> Arc<Database> {
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = None;
        for attempt in 1u64.. {
            std::thread::sleep(backoff.pause());
            match LogFile::open(&self.path) {
                Ok(db) => {
                    let db = Arc::new(db);
                    *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(db.clone());
                    return db;
                }
                // a full disk is expected; anything else, said now and then
                Err(error) if attempt.is_power_of_two() => {
                    tracing::warn!(%error, attempt, "reopening the raft log failed; retrying");
                }
                Err(error) => tracing::debug!(%error, "reopening the raft log failed; retrying"),
            }
        }
        unreachable!("the attempts outnumber u64")
    }
}

/// Every 100 ms, reports the data directory full while its file system has less than `disk::reserve`
/// free: writes are then refused before they reach the log, and the reserve takes what is in flight
/// and the applies of what is logged. Stops with the log.
pub(super) fn watch_reserve(file: &std::sync::Weak<LogFile>) {
    if let Some(file) = file.upgrade() {
        file.health.watch(file.path.parent().unwrap_or(&file.path));
    }
    while let Some(file) = file.upgrade() {
        let dir = file.path.parent().unwrap_or(&file.path);
        match disk::below_reserve(&file.path) {
            Some(why) => file.health.full(dir, &why),
            None => file.health.written(dir),
        }
        drop(file);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Values of `Op::Note`s not yet written, by shard and name: the newest of each.
type HeldNotes = BTreeMap<(u32, &'static str), Vec<u8>>;

/// The writer thread: one transaction and one durable commit per batch of waiting operations. A batch of
/// notes alone is held, not committed: the notes go into the next commit (see `Op::Note`).
pub(super) fn run_writer(file: &LogFile, mut queue: mpsc::Receiver<Op>) {
    let mut held = HeldNotes::new();
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_OPS_PER_COMMIT {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if batch.iter().all(|op| matches!(op, Op::Note { .. })) {
            hold(&mut held, batch);
            continue;
        }
        let started = std::time::Instant::now();
        let result = commit_batch(file, &held, &batch).map_err(|e| e.to_string());
        if result.is_ok() {
            held.clear();
        }
        metrics::histogram!(crate::metrics::LOG_OPS_PER_COMMIT).record(batch.len() as f64);
        metrics::histogram!(crate::metrics::LOG_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            tracing::error!(%error, "raft log commit failed");
        } else if batch.iter().any(|op| matches!(op, Op::Append { .. })) {
            failpoints::crash_point(failpoints::AFTER_LOG_APPEND);
        }
        for op in batch {
            let outcome = result.clone();
            match op {
                // In operation order: what is durable of each shard's log (entries below the count).
                Op::Append {
                    flushed,
                    durable,
                    entries,
                    ..
                } => {
                    if outcome.is_ok() {
                        if let Some((last, _)) = entries.last() {
                            durable.fetch_max(last + 1, Ordering::AcqRel);
                        }
                    }
                    flushed.log_io_completed(outcome.map_err(std::io::Error::other));
                }
                Op::Truncate {
                    done,
                    durable,
                    from,
                    ..
                } => {
                    durable.fetch_min(from, Ordering::AcqRel);
                    let _ = done.send(outcome);
                }
                Op::Purge { done, .. } | Op::Reset { done, .. } => {
                    let _ = done.send(outcome);
                }
                Op::Put { done, .. } => {
                    let _ = done.send(outcome);
                }
                Op::Note { .. } => {}
            }
        }
    }
    if !held.is_empty() {
        if let Err(error) = commit_batch(file, &held, &[]) {
            tracing::debug!(%error, "the held committed marks were not written at shutdown");
        }
    }
    tracing::debug!("raft log writer stopped");
}

/// Keeps the newest value of each note in `batch` (a batch of notes alone).
fn hold(held: &mut HeldNotes, batch: Vec<Op>) {
    for op in batch {
        if let Op::Note { shard, name, value } = op {
            held.insert((shard, name), value);
        }
    }
}

/// Commits `batch`, waiting out a full disk: reopens the file and retries the whole batch (every
/// operation in it is idempotent) until it is durable. Returns any other error.
fn commit_batch(file: &LogFile, held: &HeldNotes, batch: &[Op]) -> Result<(), LogDbError> {
    let mut backoff = Backoff::new();
    let mut db = match file.current() {
        Some(db) => db,
        None => file.reopen(&mut backoff),
    };
    loop {
        match write_batch(&db, held, batch) {
            Ok(()) => {
                file.health.written(&file.path);
                return Ok(());
            }
            Err(LogDbError::Redb(error)) if disk::is_disk_full(&error) => {
                file.health.full(&file.path, &error);
                // redb opens a file once: the old handle must be gone before it is reopened
                drop(db);
                db = file.reopen(&mut backoff);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Writes the held notes (queued before anything in `batch`), then `batch` in order, in one durable
/// transaction.
fn write_batch(db: &Database, held: &HeldNotes, batch: &[Op]) -> Result<(), LogDbError> {
    let mut txn = db.begin_write().map_err(redb_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| LogDbError::Redb(e.into()))?;
    {
        let mut log = txn.open_table(LOG).map_err(redb_error)?;
        let mut state = txn.open_table(RAFT_STATE).map_err(redb_error)?;
        for ((shard, name), value) in held {
            state
                .insert((*shard, *name), value.as_slice())
                .map_err(redb_error)?;
        }
        for op in batch {
            match op {
                Op::Append { shard, entries, .. } => {
                    for (index, bytes) in entries {
                        log.insert((*shard, *index), bytes.as_slice())
                            .map_err(redb_error)?;
                    }
                }
                Op::Truncate { shard, from, .. } => {
                    log.retain_in((*shard, *from)..=(*shard, u64::MAX), |_, _| false)
                        .map_err(redb_error)?;
                }
                Op::Purge {
                    shard, upto, mark, ..
                } => {
                    log.retain_in((*shard, 0)..=(*shard, *upto), |_, _| false)
                        .map_err(redb_error)?;
                    state
                        .insert((*shard, "last_purged"), mark.as_slice())
                        .map_err(redb_error)?;
                }
                Op::Put {
                    shard, name, value, ..
                }
                | Op::Note { shard, name, value } => {
                    state
                        .insert((*shard, *name), value.as_slice())
                        .map_err(redb_error)?;
                }
                Op::Reset { shard, .. } => {
                    log.retain_in((*shard, 0)..=(*shard, u64::MAX), |_, _| false)
                        .map_err(redb_error)?;
                    state
                        .retain(|(owner, _), _| owner != *shard)
                        .map_err(redb_error)?;
                }
            }
        }
    }
    txn.commit().map_err(redb_error)?;
    Ok(())
}
