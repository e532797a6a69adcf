//! The log of one shard as openraft sees it ([`LogStore`]): loaded from the file into an in-memory
//! mirror of its newest entries (`LogDb::shard`), read from the mirror or, for older entries, the file,
//! and written through the writer's queue (openraft's `RaftLogReader` and `RaftLogStorage`).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader, StorageIOError};
use redb::ReadableDatabase;
use tokio::sync::oneshot;

use super::{Flushed, LOG, LogDb, LogDbError, Op, RAFT_STATE, redb_error};

/// Most entries one purge removes in one commit of the log's writer. The writer serves every shard,
/// and a shard snapshots by log bytes (`--snapshot-log-percent`), so a purge can cover hundreds of
/// thousands of entries: removed in one commit, they would hold every shard's appends for as long.
const PURGE_CHUNK: u64 = 2048;
use crate::state_machine::PurgeGate;
use crate::{Entry, LogId, StorageError, TypeConfig, Vote, decode, encode};
use shopkeep_faults::disk::{self, Backoff};

/// What an entry costs in the mirror.
fn entry_bytes(entry: &Entry) -> usize {
    let payload = match &entry.payload {
        openraft::EntryPayload::Normal(payload) => payload.0.len(),
        _ => 0,
    };
    payload + 64
}

impl LogDb {
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
            let (_, index) = key.value();
            if last_purged.is_some_and(|purged| index <= purged.index) {
                // left by a purge a crash interrupted between two chunks (see `PURGE_CHUNK`)
                break;
            }
            let entry: Entry = decode(value.value()).map_err(corrupt)?;
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
        let flushed = Flushed::new(entries.back().map(|e| e.log_id).or(last_purged));
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
            flushed,
            leader_as: None,
            alone: false,
            gate: PurgeGate::open(),
        })
    }
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
    /// The newest entry durable in the write-ahead file (see `flushed`).
    flushed: Flushed,
    /// This node's id, when its own entries are acknowledged before they are durable while it leads
    /// (see `flushed`); `None`: every append is acknowledged once durable.
    leader_as: Option<u64>,
    /// The node was started as its shards' only voter (see `acking_early_as`).
    alone: bool,
    /// A purge waits here until the shard's state machine holds what it removes (see [`PurgeGate`]).
    gate: PurgeGate,
}

impl LogStore {
    /// Purges wait at `gate` (shared with the shard's state machine) until the state covers them.
    pub fn with_purge_gate(mut self, gate: PurgeGate) -> Self {
        self.gate = gate;
        self
    }

    /// Acknowledges the entries node `me` appends as the shard's leader before they are durable (see
    /// `flushed`): the shard's state machine must wait for them (`StateMachineStore::with_disk`) and
    /// its network clamp the committed index it sends ([`Flushed::clamp`]).
    /// `alone`: the node was started as the only voter, and its entries are then acknowledged early
    /// only when queued to the writer (not when written on the appending thread, which is quicker).
    ///
    /// A log opened with this node's own committed vote is presented to openraft with the vote not
    /// committed: openraft 0.9 would otherwise resume as the leader of the same term at once
    /// (`Engine::startup`), and entries it acknowledged early and lost in the crash may be on
    /// followers, which would take its new entries under the same ids for the old ones. It stands
    /// in a new term instead, like any restarted member.
    pub fn acking_early_as(mut self, me: u64, alone: bool) -> Self {
        self.leader_as = Some(me);
        self.alone = alone;
        let mut mirror = self.mirror();
        if let Some(vote) = mirror
            .vote
            .filter(|vote| vote.is_committed() && vote.leader_id().voted_for() == Some(me))
        {
            mirror.vote = Some(Vote::new(vote.leader_id().get_term(), me));
        }
        drop(mirror);
        self
    }

    /// How far the log is durable.
    pub fn flushed(&self) -> &Flushed {
        &self.flushed
    }

    /// Whether `entries` are this node's own as the leader its vote names, and ordinary commands:
    /// the entries acknowledged before they are durable. A membership change or a leader's first
    /// (blank) entry is acknowledged once durable, as any entry of another leader's.
    fn own_entries(&self, vote: Option<&Vote>, entries: &[Entry]) -> bool {
        let (Some(me), Some(vote)) = (self.leader_as, vote) else {
            return false;
        };
        vote.is_committed()
            && vote.leader_id().voted_for() == Some(me)
            && entries.iter().all(|entry| {
                entry.log_id.leader_id == *vote.leader_id()
                    && matches!(entry.payload, openraft::EntryPayload::Normal(_))
            })
    }

    fn mirror(&self) -> MutexGuard<'_, Mirror> {
        // A panic while holding the lock cannot leave the mirror half-updated: every update is a single
        // push/pop sequence checked before it starts.
        self.mirror
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn queue(&self, op: Op) -> Result<(), StorageError> {
        self.db.submit(op).await.map_err(|()| writer_stopped())
    }

    /// `queue`, acknowledging an append to openraft at once if it is queued to the writer rather
    /// than written on this thread.
    async fn queue_acking(&self, op: Op) -> Result<(), StorageError> {
        self.db
            .submit_acking(op, true)
            .await
            .map_err(|()| writer_stopped())
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

fn writer_stopped() -> StorageError {
    StorageIOError::write_logs(openraft::AnyError::error("the log writer stopped")).into()
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

    /// The newest entry in the file past the purged ones, if any (after a truncation emptied the
    /// mirror).
    async fn last_in_file(&self) -> Result<Option<Entry>, StorageError> {
        let after_purged = self.mirror().last_purged.map_or(0, |id| id.index + 1);
        self.with_file(|log| {
            let last = log
                .range((self.shard, after_purged)..=(self.shard, u64::MAX))
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
                done,
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
        // Not waited for, and written with the next append rather than in an fsync of its own: the
        // committed mark only lets a restarted node apply sooner; losing the newest one costs nothing
        // but that (and it never runs ahead of the durable log: the writer takes it only into a batch
        // that drained its queue past the append of the entries it names). Setting it wakes no one.
        self.db.note(self.shard, "committed", value);
        Ok(())
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut encoded = Vec::new();
        let (early, last);
        {
            let mut mirror = self.mirror();
            early = self.own_entries(mirror.vote.as_ref(), &entries);
            last = entries.last().map(|e| e.log_id);
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
        // no entries (each entry is encoded, or the append failed above)
        let Some(last) = last else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let mut op = Op::Append {
            shard: self.shard,
            entries: encoded,
            flushed: Some(callback),
            durable: self.durable.clone(),
            raises: (self.flushed.clone(), last),
        };
        if early && self.alone {
            // the only voter: writing it here when the writer is idle is quicker than acknowledging
            // early, which hands the write to the writer's thread; under load it is acknowledged
            return self.queue_acking(op).await;
        }
        if early {
            // replicated while the writer makes it durable here
            op.acknowledge_early();
        }
        self.queue(op).await
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
        let (durable, forgets) = (self.durable.clone(), self.flushed.clone());
        self.queue_and_wait(
            |done| Op::Truncate {
                shard,
                from: log_id.index,
                done,
                durable,
                forgets,
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
        let from = {
            let mut mirror = self.mirror();
            let from = mirror.last_purged.map_or(0, |id| id.index + 1);
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
            from
        };
        // In chunks, each its own commit of the writer, which other shards' batches pass between.
        // Each stores the final mark: a crash between two leaves entries at or below it, which every
        // reader ignores and the next purge (from index 0) removes.
        let shard = self.shard;
        let mut upto = from.saturating_add(PURGE_CHUNK - 1).min(log_id.index);
        loop {
            self.queue_and_wait(
                |done| Op::Purge {
                    shard,
                    upto,
                    mark: mark.clone(),
                    done,
                },
                StorageIOError::write_logs,
            )
            .await?;
            if upto >= log_id.index {
                return Ok(());
            }
            upto = upto.saturating_add(PURGE_CHUNK).min(log_id.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::Payload;
    use crate::log_store::{MIRROR_BYTES, reopen_when_released};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Payload(vec![index.to_le_bytes()[0]; 1000])),
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
        // entries leave it once in the redb file, which lags by at most the bound (`Deferred`)
        assert!(
            store.mirror().entries.len() <= 12,
            "the mirror holds at most twice its bound"
        );
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

    /// A purge a crash interrupted after its first chunk leaves entries at or below its mark: a
    /// reopened log ignores them, and the next purge removes them with the rest.
    #[tokio::test]
    async fn entries_an_interrupted_chunked_purge_left_below_its_mark_are_ignored_and_removed_later()
     {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let db = LogDb::open_with_mirror(&path, 50 * 1100).unwrap();
        let mut store = db.shard(0).unwrap();
        const END: u64 = 3 * PURGE_CHUNK;
        for start in (0..END).step_by(500) {
            store
                .blocking_append((start..(start + 500).min(END)).map(|i| entry(1, i)))
                .await
                .unwrap();
        }
        // The first chunk of a purge up to END - 10 (the mirror holds more than the 9 entries past it),
        // as `purge` queues it; then the crash.
        let mark = LogId::new(CommittedLeaderId::new(1, 1), END - 10);
        let encoded = encode(&mark).unwrap();
        store
            .queue_and_wait(
                |done| Op::Purge {
                    shard: 0,
                    upto: PURGE_CHUNK - 1,
                    mark: encoded,
                    done,
                },
                StorageIOError::write_logs,
            )
            .await
            .unwrap();
        assert_eq!(entries_in_redb(&db) as u64, END - PURGE_CHUNK);
        drop(store);
        drop(db);

        let db = reopen_when_released(&path, 50 * 1100).await;
        let mut store = db.shard(0).unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(mark));
        assert_eq!(state.last_log_id.map(|id| id.index), Some(END - 1));
        assert!(
            store
                .mirror()
                .entries
                .iter()
                .all(|e| e.log_id.index > mark.index),
            "the mirror holds nothing at or below the mark"
        );
        store
            .truncate(LogId::new(CommittedLeaderId::new(1, 1), END - 9))
            .await
            .unwrap();
        assert_eq!(
            store
                .get_log_state()
                .await
                .unwrap()
                .last_log_id
                .map(|id| id.index),
            Some(END - 10),
            "a truncation down to the mark finds no entry past it: the last is the mark"
        );

        store.purge(mark).await.unwrap();
        assert_eq!(
            entries_in_redb(&db),
            0,
            "the next purge removes what was left"
        );
    }

    /// The live redb file's entries of shard 0, as any reader of it sees them (unsynced commits too).
    fn entries_in_redb(db: &LogDb) -> usize {
        let file = db.file.current().expect("the file is open");
        let txn = file.begin_read().unwrap();
        let log = txn.open_table(LOG).unwrap();
        log.range((0, 0)..=(0, u64::MAX)).unwrap().count()
    }

    /// Appends alone reach only the write-ahead file: the redb file gets them with the next batch that
    /// is written through (`writer::Deferred`); a power cut before that, played by a copy of the redb
    /// file taken meanwhile, loses none of them.
    #[tokio::test]
    async fn appends_deferred_from_the_redb_file_survive_a_power_cut_through_the_write_ahead_file()
    {
        let dir = std::env::temp_dir().join(format!("sklog-defer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.redb");
        let copy = dir.join("log.redb.copy");
        let db = LogDb::open(&path).unwrap();
        let mut store = db.shard(0).unwrap();
        for index in 1..=5 {
            store.blocking_append([entry(1, index)]).await.unwrap();
        }
        assert_eq!(
            entries_in_redb(&db),
            0,
            "the appends were deferred from the redb file"
        );
        std::fs::copy(&path, &copy).unwrap();
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert_eq!(
            entries_in_redb(&db),
            5,
            "written with the vote, the next batch written through"
        );
        drop(store);
        drop(db);
        // the writer checkpointed as it stopped; the power cut undoes that
        let released = reopen_when_released(&path, MIRROR_BYTES).await;
        drop(released);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        std::fs::copy(&copy, &path).unwrap();
        let db = reopen_when_released(&path, MIRROR_BYTES).await;
        let mut store = db.shard(0).unwrap();
        assert_eq!(
            indexes(&mut store, 1..6).await,
            (1..=5).map(|i| (1, i)).collect::<Vec<_>>()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_committed_mark_waits_for_the_next_append_instead_of_an_fsync_of_its_own() {
        let dir = std::env::temp_dir().join(format!("sklog-mark-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.redb");
        let db = LogDb::open(&path).unwrap();
        let mut store = db.shard(0).unwrap();
        store.blocking_append([entry(1, 1)]).await.unwrap();
        let committed = LogId::new(CommittedLeaderId::new(1, 1), 1);
        store.save_committed(Some(committed)).await.unwrap();
        // Time enough for the writer to have committed it, had it committed notes on their own.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(
            db.read_state(0, "committed").unwrap(),
            None,
            "held, not committed"
        );
        assert_eq!(store.read_committed().await.unwrap(), Some(committed));

        // it rides with the next append into the write-ahead file, and reaches the redb file with the
        // next batch that is written through (a vote here; see `writer::Deferred`)
        store.blocking_append([entry(1, 2)]).await.unwrap();
        store
            .save_vote(&Vote::new(1, 1))
            .await
            .expect("save the vote");
        let written = db
            .read_state(0, "committed")
            .unwrap()
            .expect("written with the batches after it");
        assert_eq!(decode::<LogId>(&written).unwrap(), committed);

        // A mark held when the log closes is written as the writer stops.
        let later = LogId::new(CommittedLeaderId::new(1, 1), 2);
        store.save_committed(Some(later)).await.unwrap();
        drop(store);
        drop(db);
        let db = reopen_when_released(&path, MIRROR_BYTES).await;
        let written = db.read_state(0, "committed").unwrap().unwrap();
        assert_eq!(decode::<LogId>(&written).unwrap(), later);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Appends `count` entries of term 1, one at a time, at the indexes `next` gives.
    async fn append(store: &mut LogStore, next: &mut std::ops::RangeFrom<u64>, count: u32) {
        for _ in 0..count {
            let index = next.next().unwrap();
            store.blocking_append([entry(1, index)]).await.unwrap();
        }
    }

    /// The writer's hand-off is spared when it is idle: after `CALM_BEFORE_INLINE` of its batches in a
    /// row held one operation alone, appends are written on the appending task's thread, with the
    /// committed mark held meanwhile. An append that finds the writer busy, or any operation queued to
    /// it, is queued behind them instead (so it overtakes nothing), and the writer's group commit takes
    /// over until it is calm again. Written either way, the entries and the marks survive a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_are_written_by_their_caller_only_while_the_writer_is_idle_and_overtake_nothing()
     {
        use crate::log_store::writer::CALM_BEFORE_INLINE;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let db = LogDb::open(&path).unwrap();
        let mut store = db.shard(0).unwrap();
        let mut next = 1..;
        append(&mut store, &mut next, CALM_BEFORE_INLINE).await;
        assert_eq!(db.writing.inline_commits(), 0, "the writer's, until calm");
        // a checkpoint falls due every second, and the writer makes it: of 3, at most one is the writer's
        append(&mut store, &mut next, 3).await;
        let calm = db.writing.inline_commits();
        assert!(calm >= 2, "calm: the caller's ({calm} of 3)");

        // the writer busy (another shard appends meanwhile): queued behind its commit, and the writer's again
        let held = db.writing.hold();
        let mut other = db.shard(1).unwrap();
        let queued = tokio::spawn(async move { other.blocking_append([entry(1, 1)]).await });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!queued.is_finished(), "waits for the writer's commit");
        drop(held);
        queued.await.unwrap().unwrap();
        append(&mut store, &mut next, 1).await;
        assert_eq!(db.writing.inline_commits(), calm, "back to group commits");

        // calm again, with an operation queued: the append waits behind it
        append(&mut store, &mut next, CALM_BEFORE_INLINE).await;
        let calm = db.writing.inline_commits();
        let committed = LogId::new(CommittedLeaderId::new(1, 1), next.start - 1);
        store.save_committed(Some(committed)).await.unwrap();
        db.writing.queuing();
        append(&mut store, &mut next, 1).await;
        db.writing.not_queued();
        assert_eq!(
            db.writing.inline_commits(),
            calm,
            "queued behind the waiting operation"
        );

        // calm once more: a held committed mark rides with the caller's append
        append(&mut store, &mut next, CALM_BEFORE_INLINE).await;
        let mut rode = None;
        for _ in 0..5 {
            let mark = LogId::new(CommittedLeaderId::new(1, 1), next.start - 1);
            store.save_committed(Some(mark)).await.unwrap();
            let before = db.writing.inline_commits();
            append(&mut store, &mut next, 1).await;
            if db.writing.inline_commits() == before + 1 {
                assert!(db.file.notes.lock().unwrap().is_empty(), "taken with it");
                rode = Some(mark);
                break;
            }
        }
        let later =
            rode.expect("an append written by its caller (a checkpoint is due once a second)");
        let last = next.start - 1;

        drop(store);
        drop(db);
        let db = reopen_when_released(&path, MIRROR_BYTES).await;
        let mut store = db.shard(0).unwrap();
        let expected: Vec<(u64, u64)> = (1..=last).map(|i| (1, i)).collect();
        assert_eq!(indexes(&mut store, 1..last + 1).await, expected);
        assert_eq!(store.read_committed().await.unwrap(), Some(later));
    }

    /// Whether an append of `entries` is acknowledged while the writer cannot write (its lock held).
    async fn acknowledged_before_durable(
        db: &LogDb,
        store: &LogStore,
        entries: Vec<Entry>,
    ) -> bool {
        let held = db.writing.hold();
        let mut appending = store.clone();
        let append = tokio::spawn(async move { appending.blocking_append(entries).await });
        std::thread::sleep(std::time::Duration::from_millis(200));
        let early = append.is_finished();
        drop(held);
        append.await.unwrap().unwrap();
        early
    }

    /// A leader's own entries are acknowledged to openraft before they are durable, so that they are
    /// replicated while the writer writes them; what is durable is known apart (`Flushed`), for the
    /// state machine to wait on and the followers' commit index to be clamped to. Every other append
    /// (without a vote of this node's, another leader's entries, a leader's blank or membership entry)
    /// is acknowledged only once durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leaders_own_entries_are_acknowledged_before_they_are_durable_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let db = LogDb::open(&dir.path().join("log.redb")).unwrap();
        let mut store = db.shard(0).unwrap().acking_early_as(1, false);
        let flushed = store.flushed().clone();
        let id = |term, index| LogId::new(CommittedLeaderId::new(term, 1), index);

        assert!(
            !acknowledged_before_durable(&db, &store, vec![entry(1, 1)]).await,
            "no vote"
        );
        store.save_vote(&Vote::new_committed(1, 2)).await.unwrap();
        assert!(
            !acknowledged_before_durable(&db, &store, vec![entry(1, 2)]).await,
            "node 2 leads"
        );
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert!(
            !acknowledged_before_durable(&db, &store, vec![entry(1, 3)]).await,
            "a candidate"
        );

        store.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        let blank = Entry {
            log_id: id(1, 4),
            payload: EntryPayload::Blank,
        };
        assert!(
            !acknowledged_before_durable(&db, &store, vec![blank]).await,
            "a blank entry"
        );
        assert_eq!(flushed.clamp(Some(id(1, 4))), Some(id(1, 4)));

        let held = db.writing.hold();
        let mut appending = store.clone();
        let append =
            tokio::spawn(
                async move { appending.blocking_append([entry(1, 5), entry(1, 6)]).await },
            );
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            append.is_finished(),
            "acknowledged while the writer cannot write"
        );
        assert_eq!(
            flushed.clamp(Some(id(1, 6))),
            Some(id(1, 4)),
            "not durable yet"
        );
        let waiting = tokio::spawn({
            let flushed = flushed.clone();
            async move { flushed.wait_for(6).await }
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!waiting.is_finished(), "the state machine waits for them");
        drop(held);
        append.await.unwrap().unwrap();
        waiting.await.unwrap().unwrap();
        assert_eq!(flushed.clamp(Some(id(1, 6))), Some(id(1, 6)));

        let mut others = entry(1, 7);
        others.log_id = LogId::new(CommittedLeaderId::new(1, 2), 7);
        assert!(
            !acknowledged_before_durable(&db, &store, vec![others]).await,
            "another leader's"
        );
    }

    /// openraft 0.9 resumes a node whose log holds its own committed vote as the leader of that term
    /// at once; one that acknowledges its entries early may have lost some its followers hold, so its
    /// log gives openraft that vote not committed, and it stands in a new term like any member.
    #[tokio::test]
    async fn a_log_that_acknowledges_early_reopens_with_its_own_leaders_vote_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let db = LogDb::open(&path).unwrap();
        let mut store = db.shard(0).unwrap().acking_early_as(1, false);
        store.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        let mut other = db.shard(1).unwrap().acking_early_as(1, false);
        other.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
        drop((store, other));
        drop(db);

        let db = reopen_when_released(&path, MIRROR_BYTES).await;
        let mut plain = db.shard(0).unwrap();
        assert_eq!(
            plain.read_vote().await.unwrap(),
            Some(Vote::new_committed(3, 1))
        );
        let mut store = db.shard(0).unwrap().acking_early_as(1, false);
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        let mut other = db.shard(1).unwrap().acking_early_as(1, false);
        assert_eq!(
            other.read_vote().await.unwrap(),
            Some(Vote::new_committed(3, 2)),
            "another leader's vote stays as it is"
        );
    }
}
