//! The node's Raft log: one redb file for the logs, votes and purge marks of ALL the node's shards.
//!
//! Group commit: every write (appends of any shard, votes, truncations, purges) goes to one writer
//! thread through a bounded queue. The writer takes everything that is waiting, writes it in ONE redb
//! transaction and commits it with `Durability::Immediate` (one fsync), and only then reports each
//! append as flushed (`LogFlushed::log_io_completed`) and answers each vote. Under load, while one commit
//! is being flushed the next batch queues up, so the cost of an fsync is shared by every shard's entries.
//!
//! openraft reads entries from an in-memory mirror of the tail of each shard's log, updated before an
//! operation is queued, so a read always sees what openraft has written, even before it is durable. The
//! mirror is bounded (`MIRROR_BYTES` per shard): older entries, once durable, are dropped from memory and
//! read from the file. Operations of one shard are queued in the order openraft issues them and the
//! writer keeps that order, so the file always holds a prefix of that sequence.
//!
//! A full disk (see `disk`): a commit refused for want of space leaves redb's `Database` unusable, so
//! the writer reopens the file (its state is the last durable commit: every commit here is durable)
//! and retries the same batch, with back-off, until it succeeds. Nothing of the batch is reported
//! flushed before that, and openraft never sees an error for it (a `StorageError` would stop the
//! shard's Raft for good); the node's [`DiskHealth`] says the log is full meanwhile. Readers of the
//! file wait while it is being reopened. Any other I/O error stops the process (`disk`).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::state_machine::PurgeGate;
use crate::{Entry, LogId, StorageError, TypeConfig, Vote, decode, encode};
use shopkeep_faults::disk::{self, Backoff, DiskHealth};
use shopkeep_faults::failpoints;

/// (shard, index) → postcard `Entry`.
const LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log");
/// (shard, name) → postcard value: `vote`, `last_purged`, `committed`, and `rebuild` (see `rebuild`).
const RAFT_STATE: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("raft_state");

/// Most operations one commit takes: bounds a transaction.
const MAX_OPS_PER_COMMIT: usize = 4096;
/// Most operations waiting for the writer; a full queue makes openraft wait (backpressure).
const QUEUE_CAPACITY: usize = 8192;
/// redb's page cache for the log file (its default is 1 GiB).
const LOG_CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of entries a shard keeps in memory (beyond the newest entry), by default.
pub const MIRROR_BYTES: usize = 4 * 1024 * 1024;

/// What an entry costs in the mirror.
fn entry_bytes(entry: &Entry) -> usize {
    let payload = match &entry.payload {
        openraft::EntryPayload::Normal(payload) => payload.0.len(),
        _ => 0,
    };
    payload + 64
}

#[derive(Debug, thiserror::Error)]
pub enum LogDbError {
    #[error("raft log storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot start the log writer: {0}")]
    Thread(std::io::Error),
    #[error("raft log write failed: {0}")]
    Write(String),
}

fn redb_error(e: impl Into<redb::Error>) -> LogDbError {
    LogDbError::Redb(e.into())
}

enum Op {
    Append {
        shard: u32,
        entries: Vec<(u64, Vec<u8>)>,
        flushed: LogFlushed<TypeConfig>,
        durable: Arc<AtomicU64>,
    },
    /// Deletes the entries at and after `from`.
    Truncate {
        shard: u32,
        from: u64,
        done: oneshot::Sender<Result<(), String>>,
        durable: Arc<AtomicU64>,
    },
    /// Deletes the entries up to and including `upto` and records the purge mark.
    Purge {
        shard: u32,
        upto: u64,
        mark: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Put {
        shard: u32,
        name: &'static str,
        value: Vec<u8>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
    /// Deletes everything of the shard: its entries, vote, marks (`LogDb::reset_shard`).
    Reset {
        shard: u32,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// The open log file, reopened after a commit refused for want of space (see the module docs).
struct LogFile {
    path: PathBuf,
    /// `None` while the writer reopens it.
    db: RwLock<Option<Arc<Database>>>,
    health: Arc<DiskHealth>,
}

impl LogFile {
    fn open(path: &Path) -> Result<Database, LogDbError> {
        // The log is written far more than it is read (openraft reads the mirror): a small page cache.
        let mut builder = Database::builder();
        builder.set_cache_size(LOG_CACHE_BYTES);
        disk::open_database(&builder, path).map_err(redb_error)
    }

    /// The database, or `None` while it is being reopened.
    fn current(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The database, or an error while it is being reopened.
    fn open_now(&self) -> Result<Arc<Database>, LogDbError> {
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

/// The node's log file and its writer thread.
#[derive(Clone)]
pub struct LogDb {
    file: Arc<LogFile>,
    ops: mpsc::Sender<Op>,
    mirror_bytes: usize,
}

impl LogDb {
    /// Opens (or creates) the log file and starts its writer thread.
    pub fn open(path: &Path) -> Result<LogDb, LogDbError> {
        Self::open_with_mirror(path, MIRROR_BYTES)
    }

    /// `open`, keeping at most `mirror_bytes` of each shard's entries in memory.
    pub fn open_with_mirror(path: &Path, mirror_bytes: usize) -> Result<LogDb, LogDbError> {
        Self::open_with(path, mirror_bytes, Arc::new(DiskHealth::new()))
    }

    /// `open_with_mirror`, reporting a full disk to `health`.
    pub fn open_with(
        path: &Path,
        mirror_bytes: usize,
        health: Arc<DiskHealth>,
    ) -> Result<LogDb, LogDbError> {
        let db = Arc::new(LogFile::open(path)?);
        let txn = db.begin_write().map_err(redb_error)?;
        txn.open_table(LOG).map_err(redb_error)?;
        txn.open_table(RAFT_STATE).map_err(redb_error)?;
        txn.commit().map_err(redb_error)?;
        let (ops, queue) = mpsc::channel(QUEUE_CAPACITY);
        let file = Arc::new(LogFile {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            health,
        });
        let watched = Arc::downgrade(&file);
        std::thread::Builder::new()
            .name("disk-reserve".into())
            .spawn(move || watch_reserve(&watched))
            .map_err(LogDbError::Thread)?;
        let writer_file = file.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || run_writer(&writer_file, queue))
            .map_err(LogDbError::Thread)?;
        Ok(LogDb {
            file,
            ops,
            mirror_bytes,
        })
    }

    /// What the node reports about its disk.
    pub fn health(&self) -> &Arc<DiskHealth> {
        &self.file.health
    }

    /// A value another module keeps beside `shard`'s log (see `RAFT_STATE`), as stored.
    pub fn read_state(&self, shard: u32, name: &str) -> Result<Option<Vec<u8>>, LogDbError> {
        let txn = self.file.open_now()?.begin_read().map_err(redb_error)?;
        let state = txn.open_table(RAFT_STATE).map_err(redb_error)?;
        Ok(state
            .get((shard, name))
            .map_err(redb_error)?
            .map(|v| v.value().to_vec()))
    }

    /// Stores a value beside `shard`'s log; returns once it is durable. Ordered with the shard's log
    /// writes queued before it.
    pub async fn write_state(
        &self,
        shard: u32,
        name: &'static str,
        value: Vec<u8>,
    ) -> Result<(), LogDbError> {
        let (done, wait) = oneshot::channel();
        let stopped = || LogDbError::Write("the log writer stopped".into());
        self.ops
            .send(Op::Put {
                shard,
                name,
                value,
                done: Some(done),
            })
            .await
            .map_err(|_| stopped())?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(LogDbError::Write(error)),
            Err(_) => Err(stopped()),
        }
    }

    /// Where `shard`'s log was purged up to (`None`: never purged).
    pub fn last_purged(&self, shard: u32) -> Result<Option<LogId>, LogDbError> {
        self.read_state(shard, "last_purged")?
            .map(|bytes| decode(&bytes))
            .transpose()
            .map_err(|e| LogDbError::Corrupt(e.to_string()))
    }

    /// Forgets `shard`'s log entirely (entries, vote, purge and rebuild marks), durably: the shard
    /// opens as pristine, as on a wiped member. Only before its Raft group is opened.
    pub async fn reset_shard(&self, shard: u32) -> Result<(), LogDbError> {
        let (done, wait) = oneshot::channel();
        let stopped = || LogDbError::Write("the log writer stopped".into());
        self.ops
            .send(Op::Reset { shard, done })
            .await
            .map_err(|_| stopped())?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(LogDbError::Write(error)),
            Err(_) => Err(stopped()),
        }
    }

    /// The log of `shard`, loaded into memory.
    pub fn shard(&self, shard: u32) -> Result<LogStore, LogDbError> {
        let txn = self.file.open_now()?.begin_read().map_err(redb_error)?;
        let state = txn.open_table(RAFT_STATE).map_err(redb_error)?;
        let read_state = |name: &str| -> Result<Option<Vec<u8>>, LogDbError> {
            Ok(state
                .get((shard, name))
                .map_err(redb_error)?
                .map(|v| v.value().to_vec()))
        };
        let corrupt = |e: postcard::Error| LogDbError::Corrupt(e.to_string());
        let vote: Option<Vote> = read_state("vote")?
            .map(|b| decode(&b))
            .transpose()
            .map_err(corrupt)?;
        let last_purged: Option<LogId> = read_state("last_purged")?
            .map(|b| decode(&b))
            .transpose()
            .map_err(corrupt)?;
        let committed: Option<LogId> = read_state("committed")?
            .map(|b| decode(&b))
            .transpose()
            .map_err(corrupt)?;
        let log = txn.open_table(LOG).map_err(redb_error)?;
        // The newest entries, up to the mirror's bound; older ones stay in the file.
        let mut entries = VecDeque::new();
        let mut bytes = 0;
        for row in log
            .range((shard, 0)..=(shard, u64::MAX))
            .map_err(redb_error)?
            .rev()
        {
            let (key, value) = row.map_err(redb_error)?;
            let entry: Entry = decode(value.value()).map_err(corrupt)?;
            let (_, index) = key.value();
            if entry.log_id.index != index {
                return Err(LogDbError::Corrupt(format!(
                    "shard {shard}: entry {} stored at {index}",
                    entry.log_id
                )));
            }
            if let Some(next) = entries.front().map(|e: &Entry| e.log_id.index) {
                if index + 1 != next {
                    return Err(LogDbError::Corrupt(format!(
                        "shard {shard}: gap in the log between {index} and {next}"
                    )));
                }
            }
            bytes += entry_bytes(&entry);
            entries.push_front(entry);
            if bytes > self.mirror_bytes {
                break;
            }
        }
        let durable = entries.back().map_or(0, |e| e.log_id.index + 1);
        Ok(LogStore {
            shard,
            db: self.clone(),
            mirror: Arc::new(Mutex::new(Mirror {
                entries,
                bytes,
                last_purged,
                vote,
                committed,
            })),
            durable: Arc::new(AtomicU64::new(durable)),
            gate: PurgeGate::open(),
        })
    }
}

/// Every 100 ms, reports the data directory full while its file system has less than `disk::reserve`
/// free: writes are then refused before they reach the log, and the reserve takes what is in flight
/// and the applies of what is logged. Stops with the log.
fn watch_reserve(file: &std::sync::Weak<LogFile>) {
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

/// The writer thread: one transaction and one durable commit per batch of waiting operations.
fn run_writer(file: &LogFile, mut queue: mpsc::Receiver<Op>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_OPS_PER_COMMIT {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = commit_batch(file, &batch).map_err(|e| e.to_string());
        metrics::histogram!("shopkeep_raft_log_ops_per_commit").record(batch.len() as f64);
        metrics::histogram!("shopkeep_raft_log_commit_seconds")
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
                    if let Some(done) = done {
                        let _ = done.send(outcome);
                    }
                }
            }
        }
    }
    tracing::debug!("raft log writer stopped");
}

/// Commits `batch`, waiting out a full disk: reopens the file and retries the whole batch (every
/// operation in it is idempotent) until it is durable. Returns any other error.
fn commit_batch(file: &LogFile, batch: &[Op]) -> Result<(), LogDbError> {
    let mut backoff = Backoff::new();
    let mut db = match file.current() {
        Some(db) => db,
        None => file.reopen(&mut backoff),
    };
    loop {
        match write_batch(&db, batch) {
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

fn write_batch(db: &Database, batch: &[Op]) -> Result<(), LogDbError> {
    let mut txn = db.begin_write().map_err(redb_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| LogDbError::Redb(e.into()))?;
    {
        let mut log = txn.open_table(LOG).map_err(redb_error)?;
        let mut state = txn.open_table(RAFT_STATE).map_err(redb_error)?;
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
                } => {
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

/// What openraft reads: a shard's live log, its vote and its marks.
struct Mirror {
    /// The newest entries, contiguous; older ones are in the file only.
    entries: VecDeque<Entry>,
    /// `entry_bytes` of `entries`.
    bytes: usize,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

/// The log of one shard, as openraft sees it. Cheap to clone (the reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    shard: u32,
    db: LogDb,
    mirror: Arc<Mutex<Mirror>>,
    /// One past the index of the newest entry known durable in the file (0: none). Only entries below it
    /// may leave the mirror.
    durable: Arc<AtomicU64>,
    /// A purge waits here until the shard's state machine holds what it removes (see [`PurgeGate`]).
    gate: PurgeGate,
}

impl LogStore {
    /// Purges wait at `gate` (shared with the shard's state machine) until the state covers them.
    pub fn with_purge_gate(mut self, gate: PurgeGate) -> Self {
        self.gate = gate;
        self
    }

    fn mirror(&self) -> MutexGuard<'_, Mirror> {
        // A panic while holding the lock cannot leave the mirror half-updated: every update is a single
        // push/pop sequence checked before it starts.
        self.mirror
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn queue(&self, op: Op) -> Result<(), StorageError> {
        self.db.ops.send(op).await.map_err(|_| {
            StorageIOError::write_logs(openraft::AnyError::error("the log writer stopped")).into()
        })
    }

    async fn queue_and_wait(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Op,
        failed: fn(openraft::AnyError) -> StorageIOError<u64>,
    ) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        self.queue(op(done)).await?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(failed(openraft::AnyError::error(error)).into()),
            Err(_) => Err(failed(openraft::AnyError::error("the log writer stopped")).into()),
        }
    }
}

fn encode_error(e: postcard::Error) -> StorageError {
    StorageIOError::write_logs(openraft::AnyError::error(e.to_string())).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        if end <= start {
            return Ok(Vec::new());
        }
        let (first_in_memory, from_memory) = {
            let mirror = self.mirror();
            let first = mirror.entries.front().map_or(u64::MAX, |e| e.log_id.index);
            let skip = usize::try_from(start.saturating_sub(first)).unwrap_or(usize::MAX);
            let from_memory: Vec<Entry> = if skip < mirror.entries.len() {
                mirror
                    .entries
                    .range(skip..)
                    .take_while(|e| e.log_id.index < end)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            (first, from_memory)
        };
        if start >= first_in_memory {
            return Ok(from_memory);
        }
        // The older part is durable in the file (entries leave the mirror only once durable).
        let mut entries = self.read_file(start, end.min(first_in_memory)).await?;
        entries.extend(from_memory);
        Ok(entries)
    }
}

fn read_error(e: impl ToString) -> StorageError {
    StorageIOError::read_logs(openraft::AnyError::error(e.to_string())).into()
}

/// A read of the log file: a storage error (retried while the disk is full) or another one.
enum ReadFault {
    Redb(redb::Error),
    Other(StorageError),
}

fn redb_fault(e: impl Into<redb::Error>) -> ReadFault {
    ReadFault::Redb(e.into())
}

type LogTable = redb::ReadOnlyTable<(u32, u64), &'static [u8]>;

impl LogStore {
    /// Runs `read` on the log table of the file (a consistent read view). While the writer reopens
    /// the file after a full disk, waits for it: a read error would stop the shard's Raft, and the old
    /// handle refuses reads until then.
    async fn with_file<T>(
        &self,
        read: impl Fn(&LogTable) -> Result<T, ReadFault>,
    ) -> Result<T, StorageError> {
        let mut backoff = Backoff::new();
        loop {
            let attempt = match self.db.file.current() {
                None => Err(redb_fault(redb::StorageError::PreviousIo)),
                Some(db) => db
                    .begin_read()
                    .map_err(redb_fault)
                    .and_then(|txn| txn.open_table(LOG).map_err(redb_fault))
                    .and_then(|log| read(&log)),
            };
            match attempt {
                Ok(value) => return Ok(value),
                Err(ReadFault::Redb(error)) if disk::is_disk_full(&error) => {
                    tokio::time::sleep(backoff.pause()).await;
                }
                Err(ReadFault::Redb(error)) => return Err(read_error(error)),
                Err(ReadFault::Other(error)) => return Err(error),
            }
        }
    }

    /// Entries `start..end` of this shard from the file.
    async fn read_file(&self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        if end <= start {
            return Ok(Vec::new());
        }
        self.with_file(|log| {
            let mut entries = Vec::new();
            for row in log
                .range((self.shard, start)..=(self.shard, end - 1))
                .map_err(redb_fault)?
            {
                let (_, value) = row.map_err(redb_fault)?;
                entries.push(decode(value.value()).map_err(|e| ReadFault::Other(read_error(e)))?);
            }
            Ok(entries)
        })
        .await
    }

    /// The newest entry in the file, if any (after a truncation emptied the mirror).
    async fn last_in_file(&self) -> Result<Option<Entry>, StorageError> {
        self.with_file(|log| {
            let last = log
                .range((self.shard, 0)..=(self.shard, u64::MAX))
                .map_err(redb_fault)?
                .next_back()
                .transpose()
                .map_err(redb_fault)?;
            last.map(|(_, value)| {
                decode(value.value()).map_err(|e| ReadFault::Other(read_error(e)))
            })
            .transpose()
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mirror = self.mirror();
        let last_purged_log_id = mirror.last_purged;
        let last_log_id = mirror
            .entries
            .back()
            .map(|e| *e.get_log_id())
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let value = encode(vote).map_err(encode_error)?;
        self.mirror().vote = Some(*vote);
        let shard = self.shard;
        self.queue_and_wait(
            |done| Op::Put {
                shard,
                name: "vote",
                value,
                done: Some(done),
            },
            StorageIOError::write_vote,
        )
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.mirror().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let Some(committed) = committed else {
            return Ok(());
        };
        self.mirror().committed = Some(committed);
        let value = encode(&committed).map_err(encode_error)?;
        // Not waited for: the committed mark only lets a restarted node apply sooner; losing the newest
        // one costs nothing but that.
        self.queue(Op::Put {
            shard: self.shard,
            name: "committed",
            value,
            done: None,
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.mirror().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        {
            let mut mirror = self.mirror();
            for entry in entries {
                let index = entry.log_id.index;
                if let Some(last) = mirror.entries.back() {
                    if index != last.log_id.index + 1 {
                        return Err(StorageIOError::write_logs(openraft::AnyError::error(
                            format!("append of {index} after {} leaves a gap", last.log_id.index),
                        ))
                        .into());
                    }
                }
                encoded.push((index, encode(&entry).map_err(encode_error)?));
                mirror.bytes += entry_bytes(&entry);
                mirror.entries.push_back(entry);
            }
            // Bound the mirror: drop the oldest entries that are durable in the file.
            let durable = self.durable.load(Ordering::Acquire);
            while mirror.bytes > self.db.mirror_bytes
                && mirror.entries.len() > 1
                && mirror
                    .entries
                    .front()
                    .is_some_and(|e| e.log_id.index < durable)
            {
                if let Some(dropped) = mirror.entries.pop_front() {
                    mirror.bytes -= entry_bytes(&dropped);
                }
            }
        }
        if encoded.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        self.queue(Op::Append {
            shard: self.shard,
            entries: encoded,
            flushed: callback,
            durable: self.durable.clone(),
        })
        .await
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut mirror = self.mirror();
            while mirror
                .entries
                .back()
                .is_some_and(|e| e.log_id.index >= log_id.index)
            {
                if let Some(dropped) = mirror.entries.pop_back() {
                    mirror.bytes -= entry_bytes(&dropped);
                }
            }
        }
        let shard = self.shard;
        let durable = self.durable.clone();
        self.queue_and_wait(
            |done| Op::Truncate {
                shard,
                from: log_id.index,
                done,
                durable,
            },
            StorageIOError::write_logs,
        )
        .await?;
        // The truncation may have removed every entry still in memory: the newest entry is then in
        // the file (it is durable there), and the mirror must hold it for `get_log_state`.
        if self.mirror().entries.is_empty() {
            if let Some(last) = self.last_in_file().await? {
                let mut mirror = self.mirror();
                if mirror.entries.is_empty() {
                    mirror.bytes += entry_bytes(&last);
                    mirror.entries.push_back(last);
                }
            }
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Never durably purge what the state machine does not hold durably yet: after a snapshot is
        // received, openraft purges while the state machine is still installing it.
        self.gate
            .wait(log_id.index)
            .await
            .map_err(|e| StorageIOError::write_logs(openraft::AnyError::error(e)))?;
        let mark = encode(&log_id).map_err(encode_error)?;
        {
            let mut mirror = self.mirror();
            while mirror
                .entries
                .front()
                .is_some_and(|e| e.log_id.index <= log_id.index)
            {
                if let Some(dropped) = mirror.entries.pop_front() {
                    mirror.bytes -= entry_bytes(&dropped);
                }
            }
            mirror.last_purged = Some(log_id);
        }
        let shard = self.shard;
        self.queue_and_wait(
            |done| Op::Purge {
                shard,
                upto: log_id.index,
                mark,
                done,
            },
            StorageIOError::write_logs,
        )
        .await
    }
}

/// Opens the log file at `path` again once the writer thread of its last `LogDb` let go of it (it does
/// when it sees every sender gone): a restart, in tests.
#[cfg(test)]
pub(crate) async fn reopen_when_released(path: &Path, mirror_bytes: usize) -> LogDb {
    let mut reopened = LogDb::open_with_mirror(path, mirror_bytes);
    for _ in 0..100 {
        if reopened.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        reopened = LogDb::open_with_mirror(path, mirror_bytes);
    }
    reopened.expect("reopen the log file")
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::Payload;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Payload(vec![index as u8; 1000])),
        }
    }

    async fn indexes(store: &mut LogStore, range: std::ops::Range<u64>) -> Vec<(u64, u64)> {
        store
            .try_get_log_entries(range)
            .await
            .unwrap()
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    #[tokio::test]
    async fn a_bounded_mirror_reads_old_entries_from_the_file_and_survives_truncation_and_restart()
    {
        let dir = std::env::temp_dir().join(format!("sklog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.redb");
        // Room for about 5 entries in memory.
        let db = LogDb::open_with_mirror(&path, 5 * 1100).unwrap();
        let mut store = db.shard(0).unwrap();
        for index in 0..40 {
            store.blocking_append([entry(1, index)]).await.unwrap();
        }
        assert!(store.mirror().entries.len() <= 7, "the mirror is bounded");
        let expected: Vec<(u64, u64)> = (10..30).map(|i| (1, i)).collect();
        assert_eq!(
            indexes(&mut store, 10..30).await,
            expected,
            "old entries come from the file"
        );

        // Truncate into the part that is only in the file, then go on in a new term.
        store
            .truncate(LogId::new(CommittedLeaderId::new(1, 1), 20))
            .await
            .unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|id| id.index), Some(19));
        for index in 20..25 {
            store.blocking_append([entry(2, index)]).await.unwrap();
        }
        let read = indexes(&mut store, 18..25).await;
        assert_eq!(
            read,
            vec![
                (1, 18),
                (1, 19),
                (2, 20),
                (2, 21),
                (2, 22),
                (2, 23),
                (2, 24)
            ]
        );

        // A restart sees the same log.
        drop(store);
        drop(db);
        let db = reopen_when_released(&path, 5 * 1100).await;
        let mut store = db.shard(0).unwrap();
        assert_eq!(indexes(&mut store, 18..25).await, read);
        assert_eq!(
            store
                .get_log_state()
                .await
                .unwrap()
                .last_log_id
                .map(|id| id.index),
            Some(24)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
