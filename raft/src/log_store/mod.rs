//! The node's Raft log: one redb file for the logs, votes and purge marks of ALL the node's shards.
//!
//! Group commit: every write (appends of any shard, votes, truncations, purges) goes to one writer
//! thread through a bounded queue. The writer takes everything that is waiting, writes it in ONE redb
//! transaction (unsynced) and as ONE record of the write-ahead file (one write, one `fdatasync`: `wal`,
//! which also says when the redb file itself is synced), and only then reports each append as flushed (`LogFlushed::log_io_completed`) and answers each vote. The committed mark, which
//! a crash may lose, rides along with the next such commit instead of costing an fsync of its own
//! (`LogDb::note`). Under load, while one commit
//! is being flushed the next batch queues up, so the cost of an fsync is shared by every shard's entries.
//! Under light load (the writer's last commits each found one operation waiting) an append is written
//! by the task that appends, when nothing is queued and nobody writes: the same record and fsync,
//! without the two thread hand-offs (`writer::Writing::try_inline`).
//!
//! One kind of append is reported flushed before it is: a shard leader's own entries, once queued, so
//! that openraft replicates them while the writer writes them; `flushed` says how far the log really
//! is durable, which the state machine waits for and the committed index sent to followers is clamped
//! to.
//!
//! openraft reads entries from an in-memory mirror of the tail of each shard's log, updated before an
//! operation is queued, so a read always sees what openraft has written, even before it is durable. The
//! mirror is bounded (`MIRROR_BYTES` per shard): older entries, once in the redb file, are dropped from
//! memory and read from it (a batch of appends alone reaches the redb file only with a later batch, see
//! `writer::Deferred`, so the mirror may hold up to twice its bound meanwhile). Operations of one shard are queued in the order openraft issues them and the
//! writer keeps that order, so the file always holds a prefix of that sequence.
//!
//! A full disk (see `disk`): a commit refused for want of space leaves redb's `Database` unusable, so
//! the writer reopens the file (its state is the last checkpoint, and the write-ahead file's records are
//! written to it again) and retries the same batch, with back-off, until it succeeds. Nothing of the batch is reported
//! flushed before that, and openraft never sees an error for it (a `StorageError` would stop the
//! shard's Raft for good); the node's [`DiskHealth`] says the log is full meanwhile. Readers of the
//! file wait while it is being reopened. Any other I/O error stops the process (`disk`).
//!
//! This module owns the file's tables, the operations queued to the writer and [`LogDb`] (opening the
//! file, values kept beside a shard's log); `wal`: the write-ahead file, its records and checkpoints;
//! `writer`: the open file (reopened after a full disk), the
//! writer thread and its group commit, the disk-reserve watch; `flushed`: how far a shard's log is
//! durable, and the leader's early report; `store`: a shard's log as openraft sees
//! it ([`LogStore`], its in-memory mirror, reads from the file, openraft's storage traits).

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::LogFlushed;
use redb::{ReadableDatabase, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::{LogId, TypeConfig, Vote, decode, encode};
use shopkeep_faults::disk::DiskHealth;
use writer::{LogFile, Writing, run_writer, watch_reserve};

mod flushed;
mod store;
mod wal;
mod writer;

pub use flushed::Flushed;
pub use store::LogStore;

/// (shard, index) → postcard `Entry`.
const LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log");
/// (shard, name) → postcard value: `vote`, `last_purged`, `committed`, and `rebuild` (see `rebuild`).
const RAFT_STATE: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("raft_state");

/// name → value: `epoch`, the write-ahead file's current epoch (see `wal`).
const WAL_STATE: TableDefinition<&str, u64> = TableDefinition::new("wal");
const EPOCH_KEY: &str = "epoch";

/// Most operations one commit takes: bounds a transaction.
const MAX_OPS_PER_COMMIT: usize = 4096;
/// Most operations waiting for the writer; a full queue makes openraft wait (backpressure).
const QUEUE_CAPACITY: usize = 8192;
/// redb's page cache for the log file (its default is 1 GiB).
const LOG_CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of batches the redb file may lag the write-ahead file by (see `writer::Deferred`); also
/// never more than the mirror's bound, so a shard's mirror holds at most twice its bound.
const MAX_DEFERRED_BYTES: usize = 1024 * 1024;
/// Most bytes of entries a shard keeps in memory (beyond the newest entry), by default.
pub const MIRROR_BYTES: usize = 1024 * 1024;

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
    #[error("raft log's write-ahead file: {0}")]
    Wal(String),
}

fn redb_error(e: impl Into<redb::Error>) -> LogDbError {
    LogDbError::Redb(e.into())
}

enum Op {
    Append {
        shard: u32,
        entries: Vec<(u64, Vec<u8>)>,
        /// openraft's callback, answered once the entries are durable; `None` when they were
        /// acknowledged before (a leader's own entries, see `flushed`).
        flushed: Option<LogFlushed<TypeConfig>>,
        durable: Arc<AtomicU64>,
        /// The shard's durable mark and the last entry's id, raised to it once durable.
        raises: (Flushed, LogId),
    },
    /// Deletes the entries at and after `from`.
    Truncate {
        shard: u32,
        from: u64,
        done: oneshot::Sender<Result<(), String>>,
        durable: Arc<AtomicU64>,
        /// The shard's durable mark, which forgets the entries once they are gone.
        forgets: Flushed,
    },
    /// Deletes the entries up to and including `upto` and records the purge mark.
    Purge {
        shard: u32,
        upto: u64,
        mark: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Sets a value kept beside the shard's log, durably before `done` is answered.
    Put {
        shard: u32,
        name: &'static str,
        value: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Deletes everything of the shard: its entries, vote, marks (`LogDb::reset_shard`).
    Reset {
        shard: u32,
        done: oneshot::Sender<Result<(), String>>,
    },
}

impl Op {
    /// Tells openraft an append is flushed now, before the writer writes it (see `flushed`).
    fn acknowledge_early(&mut self) {
        if let Op::Append { flushed, .. } = self {
            if let Some(flushed) = flushed.take() {
                flushed::acknowledge_early(flushed);
            }
        }
    }
}

/// The node's log file and its writer thread.
#[derive(Clone)]
pub struct LogDb {
    file: Arc<LogFile>,
    ops: mpsc::Sender<Op>,
    writing: Arc<Writing>,
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
        let (db, wal) = LogFile::open(path)?;
        let (ops, queue) = mpsc::channel(QUEUE_CAPACITY);
        let file = Arc::new(LogFile {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            wal: Mutex::new(wal),
            health,
            notes: Mutex::new(writer::HeldNotes::new()),
        });
        let watched = Arc::downgrade(&file);
        std::thread::Builder::new()
            .name("disk-reserve".into())
            .spawn(move || watch_reserve(&watched))
            .map_err(LogDbError::Thread)?;
        let writing = Arc::new(Writing::new(mirror_bytes.min(MAX_DEFERRED_BYTES)));
        let (writer_file, writer_writing) = (file.clone(), writing.clone());
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || run_writer(&writer_file, &writer_writing, queue))
            .map_err(LogDbError::Thread)?;
        Ok(LogDb {
            file,
            ops,
            writing,
            mirror_bytes,
        })
    }

    /// What the node reports about its disk.
    pub fn health(&self) -> &Arc<DiskHealth> {
        &self.file.health
    }

    /// Sets a value whose newest version may be lost in a crash (the committed mark): the writer
    /// writes it with the next commit that something else needs, never in a commit (an fsync) of its
    /// own, and is not woken for it. A later note of the same shard and name replaces a held one.
    pub(crate) fn note(&self, shard: u32, name: &'static str, value: Vec<u8>) {
        self.file
            .notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((shard, name), value);
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
        self.queue_and_wait(|done| Op::Put {
            shard,
            name,
            value,
            done,
        })
        .await
    }

    /// Hands `op` to the writer, or writes it on this thread when the writer is idle
    /// (`Writing::try_inline`); `Err` when the writer stopped.
    async fn submit(&self, op: Op) -> Result<(), ()> {
        self.submit_acking(op, false).await
    }

    /// `submit`; an append queued to the writer rather than written here is acknowledged to openraft
    /// at once when `ack_if_queued` (a leader's own entries, see `flushed`).
    async fn submit_acking(&self, op: Op, ack_if_queued: bool) -> Result<(), ()> {
        let Some(mut op) = self.writing.try_inline(&self.file, op) else {
            return Ok(());
        };
        if ack_if_queued {
            op.acknowledge_early();
        }
        self.writing.queuing();
        self.ops
            .send(op)
            .await
            .map_err(|_| self.writing.not_queued())
    }

    /// Queues the operation `op` makes of a completion sender and waits until the writer made it durable.
    async fn queue_and_wait(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Op,
    ) -> Result<(), LogDbError> {
        let (done, wait) = oneshot::channel();
        let stopped = || LogDbError::Write("the log writer stopped".into());
        self.submit(op(done)).await.map_err(|()| stopped())?;
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

    /// Prepares the empty log of `shard` for a state restored from a backup, `marker` being the one
    /// stored with that state. openraft starts such a shard with its log purged up to the state's last
    /// entry, but with the vote of an empty log (term 0): standing in term 1, it would append entries
    /// of an older term after the backup's last one, out of Raft's order. So the vote is set to that
    /// entry's leader and term, and the first election comes after it. Only on a new log file, before
    /// its Raft group is opened (`shopkeep restore`).
    pub async fn seed_restored(&self, shard: u32, marker: &[u8]) -> Result<(), LogDbError> {
        let last = crate::state_machine::marker_last_applied(marker)
            .map_err(|e| LogDbError::Corrupt(format!("the restored state's marker: {e}")))?;
        let Some(last) = last else {
            return Ok(());
        };
        let vote = Vote {
            leader_id: last.leader_id,
            committed: false,
        };
        let bytes = encode(&vote).map_err(|e| LogDbError::Corrupt(e.to_string()))?;
        self.write_state(shard, "vote", bytes).await
    }

    /// Forgets `shard`'s log entirely (entries, vote, purge and rebuild marks), durably: the shard
    /// opens as pristine, as on a wiped member. Only before its Raft group is opened.
    pub async fn reset_shard(&self, shard: u32) -> Result<(), LogDbError> {
        self.queue_and_wait(|done| Op::Reset { shard, done }).await
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
