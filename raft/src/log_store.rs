//! The node's Raft log: one redb file for the logs, votes and purge marks of ALL the node's shards.
//!
//! Group commit: every write (appends of any shard, votes, truncations, purges) goes to one writer
//! thread through a bounded queue. The writer takes everything that is waiting, writes it in ONE redb
//! transaction and commits it with `Durability::Immediate` (one fsync), and only then reports each
//! append as flushed (`LogFlushed::log_io_completed`) and answers each vote. Under load, while one commit
//! is being flushed the next batch queues up, so the cost of an fsync is shared by every shard's entries.
//!
//! openraft reads entries from an in-memory mirror of each shard's live log (the entries after the last
//! purge), updated before an operation is queued, so a read always sees what openraft has written, even
//! before it is durable. Operations of one shard are queued in the order openraft issues them and the
//! writer keeps that order, so the file always holds a prefix of that sequence.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::{Entry, LogId, StorageError, TypeConfig, Vote, decode, encode};

/// (shard, index) → postcard `Entry`.
const LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log");
/// (shard, name) → postcard value: `vote`, `last_purged`, `committed`.
const RAFT_STATE: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("raft_state");

/// Most operations one commit takes: bounds a transaction.
const MAX_OPS_PER_COMMIT: usize = 4096;
/// Most operations waiting for the writer; a full queue makes openraft wait (backpressure).
const QUEUE_CAPACITY: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum LogDbError {
    #[error("raft log storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot start the log writer: {0}")]
    Thread(std::io::Error),
}

fn redb_error(e: impl Into<redb::Error>) -> LogDbError {
    LogDbError::Redb(e.into())
}

enum Op {
    Append {
        shard: u32,
        entries: Vec<(u64, Vec<u8>)>,
        flushed: LogFlushed<TypeConfig>,
    },
    /// Deletes the entries at and after `from`.
    Truncate {
        shard: u32,
        from: u64,
        done: oneshot::Sender<Result<(), String>>,
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
}

/// The node's log file and its writer thread.
#[derive(Clone)]
pub struct LogDb {
    db: Arc<Database>,
    ops: mpsc::Sender<Op>,
}

impl LogDb {
    /// Opens (or creates) the log file and starts its writer thread.
    pub fn open(path: &Path) -> Result<LogDb, LogDbError> {
        let db = Arc::new(Database::builder().create(path).map_err(redb_error)?);
        let txn = db.begin_write().map_err(redb_error)?;
        txn.open_table(LOG).map_err(redb_error)?;
        txn.open_table(RAFT_STATE).map_err(redb_error)?;
        txn.commit().map_err(redb_error)?;
        let (ops, queue) = mpsc::channel(QUEUE_CAPACITY);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || run_writer(&writer_db, queue))
            .map_err(LogDbError::Thread)?;
        Ok(LogDb { db, ops })
    }

    /// The log of `shard`, loaded into memory.
    pub fn shard(&self, shard: u32) -> Result<LogStore, LogDbError> {
        let txn = self.db.begin_read().map_err(redb_error)?;
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
        let mut entries = VecDeque::new();
        for row in log
            .range((shard, 0)..=(shard, u64::MAX))
            .map_err(redb_error)?
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
            if let Some(previous) = entries.back().map(|e: &Entry| e.log_id.index) {
                if index != previous + 1 {
                    return Err(LogDbError::Corrupt(format!(
                        "shard {shard}: gap in the log between {previous} and {index}"
                    )));
                }
            }
            entries.push_back(entry);
        }
        Ok(LogStore {
            shard,
            db: self.clone(),
            mirror: Arc::new(Mutex::new(Mirror {
                entries,
                last_purged,
                vote,
                committed,
            })),
        })
    }
}

/// The writer thread: one transaction and one durable commit per batch of waiting operations.
fn run_writer(db: &Database, mut queue: mpsc::Receiver<Op>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_OPS_PER_COMMIT {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = write_batch(db, &batch).map_err(|e| e.to_string());
        metrics::histogram!("shopkeep_raft_log_ops_per_commit").record(batch.len() as f64);
        metrics::histogram!("shopkeep_raft_log_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            tracing::error!(%error, "raft log commit failed");
        }
        for op in batch {
            let outcome = result.clone();
            match op {
                Op::Append { flushed, .. } => {
                    flushed.log_io_completed(outcome.map_err(std::io::Error::other));
                }
                Op::Truncate { done, .. } | Op::Purge { done, .. } => {
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
            }
        }
    }
    txn.commit().map_err(redb_error)?;
    Ok(())
}

/// What openraft reads: a shard's live log, its vote and its marks.
struct Mirror {
    entries: VecDeque<Entry>,
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
}

impl LogStore {
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
        let mirror = self.mirror();
        let Some(first) = mirror.entries.front().map(|e| e.log_id.index) else {
            return Ok(Vec::new());
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => first,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let from = start.max(first);
        if end <= from {
            return Ok(Vec::new());
        }
        let skip = usize::try_from(from - first).unwrap_or(usize::MAX);
        if skip >= mirror.entries.len() {
            return Ok(Vec::new());
        }
        Ok(mirror
            .entries
            .range(skip..)
            .take_while(|e| e.log_id.index < end)
            .cloned()
            .collect())
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
                mirror.entries.push_back(entry);
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
                mirror.entries.pop_back();
            }
        }
        let shard = self.shard;
        self.queue_and_wait(
            |done| Op::Truncate {
                shard,
                from: log_id.index,
                done,
            },
            StorageIOError::write_logs,
        )
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mark = encode(&log_id).map_err(encode_error)?;
        {
            let mut mirror = self.mirror();
            while mirror
                .entries
                .front()
                .is_some_and(|e| e.log_id.index <= log_id.index)
            {
                mirror.entries.pop_front();
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
