//! The log file and its writer thread: one transaction and one durable write (one fsync, of the
//! write-ahead file: `wal`) for every batch of waiting operations of all shards, or, under light load,
//! of one append written by the task that appends (`Writing`); a commit refused for
//! want of space reopens the file and retries the batch. Also the watch that reports the disk full
//! below its reserve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use openraft::storage::LogFlushed;
use redb::{Database, Durability, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::Flushed;
use super::wal::{self, Wal, WalOp};
use super::{
    EPOCH_KEY, LOG, LOG_CACHE_BYTES, LogDbError, MAX_OPS_PER_COMMIT, Op, RAFT_STATE, WAL_STATE,
    redb_error,
};
use crate::{LogId, TypeConfig};
use shopkeep_faults::disk::{self, Backoff, DiskHealth};
use shopkeep_faults::failpoints;

/// The open log file and its write-ahead file, reopened after a commit refused for want of space (see
/// the module docs).
pub(super) struct LogFile {
    pub(super) path: PathBuf,
    /// `None` while the writer reopens it.
    pub(super) db: RwLock<Option<Arc<Database>>>,
    /// Only the writer thread writes it; the lock lets `reopen` replace it.
    pub(super) wal: Mutex<Wal>,
    pub(super) health: Arc<DiskHealth>,
    /// Notes not yet written (`LogDb::note`): set by the shards' stores, taken by the writer.
    pub(super) notes: Mutex<HeldNotes>,
}

impl LogFile {
    /// Opens the redb file and its write-ahead file, writes the current epoch's records to the redb
    /// file again and checkpoints (see `wal`): the redb file then holds every acknowledged batch.
    pub(super) fn open(path: &Path) -> Result<(Database, Wal), LogDbError> {
        // The log is written far more than it is read (openraft reads the mirror): a small page cache.
        let mut builder = Database::builder();
        builder.set_cache_size(LOG_CACHE_BYTES);
        let db = disk::open_database(&builder, path).map_err(redb_error)?;
        let wal_path = wal_path(path);
        let wal_error = |e: std::io::Error| LogDbError::Wal(format!("{}: {e}", wal_path.display()));
        let mut wal = Wal::open(&wal_path).map_err(wal_error)?;
        let epoch = {
            let txn = db.begin_write().map_err(redb_error)?;
            let epoch = txn
                .open_table(WAL_STATE)
                .map_err(redb_error)?
                .get(EPOCH_KEY)
                .map_err(redb_error)?
                .map_or(0, |v| v.value());
            txn.abort().map_err(redb_error)?;
            epoch
        };
        let again: Vec<WalOp> = wal
            .records(epoch)
            .map_err(wal_error)?
            .into_iter()
            .flatten()
            .collect();
        if !again.is_empty() {
            tracing::debug!(
                operations = again.len(),
                "the raft log's write-ahead records are written again"
            );
        }
        write_batch(&db, &mut wal, [&again[..], &[]], &[], true)?;
        Ok((db, wal))
    }

    /// The database, or `None` while it is being reopened.
    pub(super) fn current(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The notes held now, leaving none.
    fn take_notes(&self) -> HeldNotes {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Holds `notes` again where no newer note of the same shard and name came meanwhile.
    fn restore_notes(&self, notes: HeldNotes) {
        let mut held = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        for (key, value) in notes {
            held.entry(key).or_insert(value);
        }
    }

    /// The database, or an error while it is being reopened.
    pub(super) fn open_now(&self) -> Result<Arc<Database>, LogDbError> {
        self.current()
            .ok_or_else(|| LogDbError::Write(format!("{} is being reopened", self.path.display())))
    }

    /// Closes the database (redb refuses everything after a failed write) and opens it again, retrying
    /// until the open succeeds (readers may still hold the old handle for a moment). The reopened file
    /// is its last durable commit plus the write-ahead records written again.
    fn reopen(&self, backoff: &mut Backoff) -> Arc<Database> {
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = None;
        for attempt in 1u64.. {
            std::thread::sleep(backoff.pause());
            match LogFile::open(&self.path) {
                Ok((db, wal)) => {
                    *self.wal.lock().unwrap_or_else(|p| p.into_inner()) = wal;
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

/// The write-ahead file beside the log file at `path`.
pub(super) fn wal_path(path: &Path) -> PathBuf {
    path.with_extension("wal")
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

/// Values of notes (`LogDb::note`) not yet written, by shard and name: the newest of each.
pub(super) type HeldNotes = BTreeMap<(u32, &'static str), Vec<u8>>;

/// What is answered once a batch is durable (or failed): an operation without its data.
enum Completion {
    Append {
        flushed: Option<LogFlushed<TypeConfig>>,
        durable: Arc<AtomicU64>,
        last: Option<u64>,
        raises: (Flushed, LogId),
    },
    Truncate {
        done: oneshot::Sender<Result<(), String>>,
        durable: Arc<AtomicU64>,
        from: u64,
        forgets: Flushed,
    },
    Done(oneshot::Sender<Result<(), String>>),
}

/// Commits in a row that found nothing else waiting before appends are written on their caller's
/// thread (see `Writing::calm`).
pub(super) const CALM_BEFORE_INLINE: u32 = 16;

/// What the writer thread and the operations written on their caller's thread (`Writing::try_inline`)
/// share: what the redb file lags behind, under the lock that lets one of them write at a time, and how
/// many operations are queued to the writer and not yet written.
pub(super) struct Writing {
    deferred: Mutex<Deferred>,
    queued: AtomicUsize,
    /// How many of the writer's batches in a row held one operation alone. From `CALM_BEFORE_INLINE`
    /// on, appends are written on their caller's thread; a batch of more, an append that finds the
    /// writer busy or anything queued, or one behind which something was queued while it was written,
    /// starts the count over and sends appends back to the writer's group commit.
    calm: AtomicU32,
    /// Appends written on their caller's thread (also counted in `metrics::LOG_INLINE_COMMITS`).
    inline_commits: AtomicU64,
    /// The most bytes of batches the redb file may lag behind (see `Deferred`).
    defer_bytes: usize,
}

impl Writing {
    pub(super) fn new(defer_bytes: usize) -> Writing {
        Writing {
            deferred: Mutex::new(Deferred::default()),
            queued: AtomicUsize::new(0),
            calm: AtomicU32::new(0),
            inline_commits: AtomicU64::new(0),
            defer_bytes,
        }
    }

    /// An operation is about to be queued to the writer.
    pub(super) fn queuing(&self) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }

    /// The writer committed a batch of `count` queued operations: one alone counts towards calm.
    fn written(&self, count: usize) {
        if count == 1 {
            let _ = self
                .calm
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |calm| {
                    Some(calm.saturating_add(1))
                });
        } else {
            self.calm.store(0, Ordering::Relaxed);
        }
        self.queued.fetch_sub(count, Ordering::SeqCst);
    }

    /// An operation counted by `queuing` was never queued (the writer stopped).
    pub(super) fn not_queued(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// Writes an append on the caller's thread when the writer is idle: nothing queued, nobody writing,
    /// and the batch goes to the write-ahead file alone (see `Deferred`). That spares the hand-off to the
    /// writer thread and back (at one client ~0.06 ms of a purchase's ~0.4 ms in the server); under load
    /// the writer is busy and the append is queued for its group commit. Gives the operation back when it must be
    /// queued. Order: with nothing queued, every operation submitted before is written, so this one
    /// overtakes none, and the notes it takes name no entry that is not durable (see `next_batch`).
    /// The caller's thread (a runtime worker) is blocked through the fsync, which is why it is done
    /// only while the load is light.
    pub(super) fn try_inline(&self, file: &LogFile, op: Op) -> Option<Op> {
        // an append acknowledged already is written by the writer: its caller goes on meanwhile
        if !matches!(
            op,
            Op::Append {
                flushed: Some(_),
                ..
            }
        ) || self.calm.load(Ordering::Relaxed) < CALM_BEFORE_INLINE
        {
            return Some(op);
        }
        let Some(mut deferred) = self.idle() else {
            self.calm.store(0, Ordering::Relaxed);
            return Some(op);
        };
        if deferred.bytes >= self.defer_bytes {
            return Some(op);
        }
        // the notes are taken before the queue is seen empty, as `next_batch` takes them before its drain
        let notes = file.take_notes();
        if self.queued.load(Ordering::SeqCst) != 0 {
            file.restore_notes(notes);
            return Some(op);
        }
        let started = std::time::Instant::now();
        let completion = match defer_one(file, &mut deferred, &notes, op) {
            Ok(completion) => completion,
            Err(op) => {
                file.restore_notes(notes);
                return Some(op);
            }
        };
        drop(deferred);
        if self.queued.load(Ordering::SeqCst) != 0 {
            self.calm.store(0, Ordering::Relaxed);
        }
        record_commit(1, started);
        self.inline_commits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::LOG_INLINE_COMMITS).increment(1);
        failpoints::crash_point(failpoints::AFTER_LOG_APPEND);
        complete(completion, Ok(()));
        None
    }

    /// The writer's state when nobody writes and nothing is queued.
    fn idle(&self) -> Option<MutexGuard<'_, Deferred>> {
        match self.deferred.try_lock() {
            Ok(deferred) if self.queued.load(Ordering::SeqCst) == 0 => Some(deferred),
            _ => None,
        }
    }

    /// Appends written on their caller's thread since the log was opened.
    #[cfg(test)]
    pub(super) fn inline_commits(&self) -> u64 {
        self.inline_commits.load(Ordering::Relaxed)
    }

    /// The writer's lock, held through a commit (poisoning ignored, as everywhere in this module).
    pub(super) fn hold(&self) -> MutexGuard<'_, Deferred> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Appends the append `op`, after `notes`, to the write-ahead file alone (see `Deferred`); what to
/// answer once it is durable, or `op` back when a checkpoint is due.
fn defer_one(
    file: &LogFile,
    deferred: &mut Deferred,
    notes: &HeldNotes,
    op: Op,
) -> Result<Completion, Op> {
    let (ops, mut completions) = split(notes, vec![op]);
    let Ok(payload) = postcard::to_allocvec(&ops) else {
        return Err(rejoin(ops, completions));
    };
    let marks = deferred.marks.len();
    deferred
        .marks
        .extend(completions.iter().filter_map(Completion::durable_mark));
    if let Some(ops) = try_defer(file, deferred, ops, &payload) {
        deferred.marks.truncate(marks);
        return Err(rejoin(ops, completions));
    }
    let (Some(completion), None) = (completions.pop(), completions.pop()) else {
        unreachable!("split answers the one append with one completion");
    };
    Ok(completion)
}

/// The append `defer_one` split, whole again (the notes are ahead of it in `ops`).
fn rejoin(mut ops: Vec<WalOp>, mut completions: Vec<Completion>) -> Op {
    match (ops.pop(), completions.pop()) {
        (
            Some(WalOp::Append { shard, entries }),
            Some(Completion::Append {
                flushed,
                durable,
                raises,
                ..
            }),
        ) => Op::Append {
            shard,
            entries,
            flushed,
            durable,
            raises,
        },
        _ => unreachable!("defer_one splits one append"),
    }
}

/// The writer thread: one transaction and one durable write per batch of waiting operations, with the
/// notes held when it was taken.
pub(super) fn run_writer(file: &LogFile, writing: &Writing, mut queue: mpsc::Receiver<Op>) {
    while let Some(first) = queue.blocking_recv() {
        let mut deferred = writing.hold();
        let (batch, notes) = next_batch(file, first, &mut queue);
        let count = batch.len();
        let (completions, result) =
            commit_queued(file, &mut deferred, batch, notes, writing.defer_bytes);
        // let go before answering: the next append may be written by its caller as soon as it is sent
        drop(deferred);
        writing.written(count);
        for completion in completions {
            complete(completion, result.clone());
        }
    }
    // everything is in the write-ahead file already; a checkpoint leaves the redb file whole
    let notes = split(&file.take_notes(), Vec::new()).0;
    let mut deferred = writing.hold();
    if let Err(error) = checkpoint_now(file, &mut deferred, notes) {
        tracing::debug!(%error, "the raft log was not checkpointed at shutdown");
    }
    tracing::debug!("raft log writer stopped");
}

/// Commits one batch of the writer's, with `notes`: what to answer, and with what.
fn commit_queued(
    file: &LogFile,
    deferred: &mut Deferred,
    batch: Vec<Op>,
    notes: HeldNotes,
    defer_bytes: usize,
) -> (Vec<Completion>, Result<(), String>) {
    let started = std::time::Instant::now();
    let count = batch.len();
    let deferrable = batch.iter().all(|op| matches!(op, Op::Append { .. }));
    let (ops, completions) = split(&notes, batch);
    let appended = completions
        .iter()
        .any(|c| matches!(c, Completion::Append { .. }));
    let before = deferred.marks.len();
    let marks = completions.iter().filter_map(Completion::durable_mark);
    deferred.marks.extend(marks);
    let deferrable = deferrable && deferred.bytes < defer_bytes;
    if completions.iter().any(Completion::acknowledged_early) {
        failpoints::crash_point(failpoints::BEFORE_EARLY_APPEND_WRITE);
    }
    let result = commit_batch(file, deferred, ops, deferrable);
    if result.is_err() {
        // the batch's entries are in no file: the mirror keeps them, and the notes wait
        deferred.marks.truncate(before);
        file.restore_notes(notes);
    }
    let result = result.map_err(|e| e.to_string());
    record_commit(count, started);
    if let Err(error) = &result {
        tracing::error!(%error, "raft log commit failed");
    } else if appended {
        failpoints::crash_point(failpoints::AFTER_LOG_APPEND);
    }
    (completions, result)
}

/// The metrics of one commit of `count` operations started at `started`.
fn record_commit(count: usize, started: std::time::Instant) {
    metrics::histogram!(crate::metrics::LOG_OPS_PER_COMMIT).record(count as f64);
    metrics::histogram!(crate::metrics::LOG_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
}

/// The batch that starts with `first`: every operation waiting behind it (at most `MAX_OPS_PER_COMMIT`
/// in all), and the notes to write with it. The notes are taken before the queue is drained: a note
/// names entries whose append was queued before the note was set, so once the drain empties the queue
/// those appends are in this batch or an earlier one. A drain stopped by the bound leaves the notes held
/// for a later batch, so a note never reaches a file before the entries it names; but not those of a
/// shard the batch resets, which a later batch would write back after the reset.
fn next_batch(file: &LogFile, first: Op, queue: &mut mpsc::Receiver<Op>) -> (Vec<Op>, HeldNotes) {
    let mut notes = file.take_notes();
    let mut batch = vec![first];
    loop {
        if batch.len() >= MAX_OPS_PER_COMMIT {
            let reset: Vec<u32> = batch
                .iter()
                .filter_map(|op| match op {
                    Op::Reset { shard, .. } => Some(*shard),
                    _ => None,
                })
                .collect();
            notes.retain(|(shard, _), _| !reset.contains(shard));
            file.restore_notes(std::mem::take(&mut notes));
            break;
        }
        match queue.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
    (batch, notes)
}

/// The batch as the redb file takes it (the held notes first), and what to answer once it is durable.
fn split(held: &HeldNotes, batch: Vec<Op>) -> (Vec<WalOp>, Vec<Completion>) {
    let mut ops: Vec<WalOp> = held
        .iter()
        .map(|((shard, name), value)| WalOp::Put {
            shard: *shard,
            name: (*name).to_string(),
            value: value.clone(),
        })
        .collect();
    let mut completions = Vec::with_capacity(batch.len());
    for op in batch {
        let (op, completion) = match op {
            Op::Append {
                shard,
                entries,
                flushed,
                durable,
                raises,
            } => {
                let last = entries.last().map(|(index, _)| *index);
                let completion = Completion::Append {
                    flushed,
                    durable,
                    last,
                    raises,
                };
                (WalOp::Append { shard, entries }, Some(completion))
            }
            Op::Truncate {
                shard,
                from,
                done,
                durable,
                forgets,
            } => {
                let completion = Completion::Truncate {
                    done,
                    durable,
                    from,
                    forgets,
                };
                (WalOp::Truncate { shard, from }, Some(completion))
            }
            Op::Purge {
                shard,
                upto,
                mark,
                done,
            } => (
                WalOp::Purge { shard, upto, mark },
                Some(Completion::Done(done)),
            ),
            Op::Put {
                shard,
                name,
                value,
                done,
            } => {
                let name = name.to_string();
                (
                    WalOp::Put { shard, name, value },
                    Some(Completion::Done(done)),
                )
            }
            Op::Reset { shard, done } => (WalOp::Reset { shard }, Some(Completion::Done(done))),
        };
        ops.push(op);
        completions.extend(completion);
    }
    (ops, completions)
}

impl Completion {
    /// An append openraft was told is flushed before it was written (see `flushed`).
    fn acknowledged_early(&self) -> bool {
        matches!(self, Completion::Append { flushed: None, .. })
    }

    /// The mark an append raises once its entries are in the redb file: the mirror may drop them.
    fn durable_mark(&self) -> Option<(Arc<AtomicU64>, u64)> {
        match self {
            Completion::Append {
                durable,
                last: Some(last),
                ..
            } => Some((durable.clone(), last + 1)),
            _ => None,
        }
    }
}

/// What the write-ahead file holds and the redb file does not yet: the appends and committed marks of
/// the batches made of nothing else, written to the redb file with the next batch that is not (a
/// truncation, a purge, a vote…), once they pass `defer_bytes`, or at the next checkpoint, whichever
/// comes first. It spares most batches a redb transaction: at one client, +11–16 % purchases/s. Until then the mirror
/// keeps their entries (their `marks` are raised only then), so nothing reads them from the redb file.
#[derive(Default)]
pub(super) struct Deferred {
    ops: Vec<WalOp>,
    marks: Vec<(Arc<AtomicU64>, u64)>,
    /// The encoded size of `ops`.
    bytes: usize,
}

impl Deferred {
    /// The deferred operations are in the redb file now: their entries may leave the mirror.
    fn written(&mut self) {
        self.ops.clear();
        self.bytes = 0;
        for (durable, mark) in self.marks.drain(..) {
            durable.fetch_max(mark, Ordering::AcqRel);
        }
    }
}

/// Answers one operation of a committed (or failed) batch; in operation order, so that what is durable
/// of each shard's log (entries below `durable`) only moves as the file does.
fn complete(completion: Completion, outcome: Result<(), String>) {
    match completion {
        Completion::Append {
            flushed,
            raises: (mark, last),
            ..
        } => {
            // raised before openraft hears of it: what it then commits finds its entries durable
            match &outcome {
                Ok(()) => mark.raise(last),
                Err(_) => mark.fail(),
            }
            if let Some(flushed) = flushed {
                flushed.log_io_completed(outcome.map_err(std::io::Error::other));
            }
        }
        Completion::Truncate {
            done,
            durable,
            from,
            forgets,
        } => {
            durable.fetch_min(from, Ordering::AcqRel);
            forgets.truncated(from);
            let _ = done.send(outcome);
        }
        Completion::Done(done) => {
            let _ = done.send(outcome);
        }
    }
}

/// Makes `ops` durable. A batch of appends and committed marks alone (`deferrable`) is appended to
/// the write-ahead file only, unless a checkpoint is due (see `Deferred`); any other is written to the
/// redb file after what was deferred. Waits out a full disk: reopens the file (which writes the
/// acknowledged records again) and retries the whole batch (every operation in it is idempotent) until
/// it is durable. Returns any other error.
fn commit_batch(
    file: &LogFile,
    deferred: &mut Deferred,
    ops: Vec<WalOp>,
    deferrable: bool,
) -> Result<(), LogDbError> {
    let payload = postcard::to_allocvec(&ops).map_err(|e| LogDbError::Write(e.to_string()))?;
    let ops = if deferrable {
        match try_defer(file, deferred, ops, &payload) {
            None => return Ok(()),
            Some(ops) => ops,
        }
    } else {
        ops
    };
    write_through(file, deferred, &ops, &payload, false)
}

/// Appends a batch of appends and committed marks alone (encoded as `payload`) to the write-ahead file
/// only, deferring it from the redb file (see `Deferred`); gives `ops` back when a checkpoint is due.
fn try_defer(
    file: &LogFile,
    deferred: &mut Deferred,
    ops: Vec<WalOp>,
    payload: &[u8],
) -> Option<Vec<WalOp>> {
    let mut wal = file.wal.lock().unwrap_or_else(|p| p.into_inner());
    if !wal.takes_without_checkpoint(payload.len()) {
        return Some(ops);
    }
    wal.append(payload);
    deferred.ops.extend(ops);
    deferred.bytes += payload.len();
    None
}

/// Writes what was deferred and `notes` to the redb file durably (the writer stopping).
fn checkpoint_now(
    file: &LogFile,
    deferred: &mut Deferred,
    notes: Vec<WalOp>,
) -> Result<(), LogDbError> {
    // a checkpoint appends no record: no payload
    write_through(file, deferred, &notes, &[], true)
}

/// `commit_batch`'s write to the redb file, retried over a full disk.
fn write_through(
    file: &LogFile,
    deferred: &mut Deferred,
    ops: &[WalOp],
    payload: &[u8],
    checkpoint: bool,
) -> Result<(), LogDbError> {
    let mut backoff = Backoff::new();
    let mut db = match file.current() {
        Some(db) => db,
        None => file.reopen(&mut backoff),
    };
    loop {
        let result = {
            let mut wal = file.wal.lock().unwrap_or_else(|p| p.into_inner());
            write_batch(&db, &mut wal, [&deferred.ops[..], ops], payload, checkpoint)
        };
        match result {
            Ok(()) => {
                deferred.written();
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

/// Makes a batch durable: `parts` (what was deferred, then the batch) written to the redb file unsynced
/// and the batch's `payload` appended to the write-ahead file (one write, one sync), or, when a
/// checkpoint is due (or asked for), `parts` committed to the redb file durably with a new epoch that
/// starts the write-ahead file over (see `wal`).
fn write_batch(
    db: &Database,
    wal: &mut Wal,
    parts: [&[WalOp]; 2],
    payload: &[u8],
    checkpoint: bool,
) -> Result<(), LogDbError> {
    let checkpoint = checkpoint || !wal.takes_without_checkpoint(payload.len());
    let mut txn = db.begin_write().map_err(redb_error)?;
    let durability = if checkpoint {
        Durability::Immediate
    } else {
        Durability::None
    };
    txn.set_durability(durability)
        .map_err(|e| LogDbError::Redb(e.into()))?;
    for ops in parts {
        write_ops(&txn, ops)?;
    }
    let epoch = if checkpoint {
        let epoch = wal::new_epoch();
        txn.open_table(WAL_STATE)
            .map_err(redb_error)?
            .insert(EPOCH_KEY, epoch)
            .map_err(redb_error)?;
        Some(epoch)
    } else {
        None
    };
    txn.commit().map_err(redb_error)?;
    match epoch {
        Some(epoch) => wal.restart(epoch),
        None => wal.append(payload),
    }
    Ok(())
}

/// Writes `ops`, in order, into the transaction.
fn write_ops(txn: &WriteTransaction, ops: &[WalOp]) -> Result<(), LogDbError> {
    let mut log = txn.open_table(LOG).map_err(redb_error)?;
    let mut state = txn.open_table(RAFT_STATE).map_err(redb_error)?;
    for op in ops {
        match op {
            WalOp::Append { shard, entries } => {
                for (index, bytes) in entries {
                    log.insert((*shard, *index), bytes.as_slice())
                        .map_err(redb_error)?;
                }
            }
            WalOp::Truncate { shard, from } => {
                log.retain_in((*shard, *from)..=(*shard, u64::MAX), |_, _| false)
                    .map_err(redb_error)?;
            }
            WalOp::Purge { shard, upto, mark } => {
                log.retain_in((*shard, 0)..=(*shard, *upto), |_, _| false)
                    .map_err(redb_error)?;
                state
                    .insert((*shard, "last_purged"), mark.as_slice())
                    .map_err(redb_error)?;
            }
            WalOp::Put { shard, name, value } => {
                state
                    .insert((*shard, name.as_str()), value.as_slice())
                    .map_err(redb_error)?;
            }
            WalOp::Reset { shard } => {
                log.retain_in((*shard, 0)..=(*shard, u64::MAX), |_, _| false)
                    .map_err(redb_error)?;
                state
                    .retain(|(owner, _), _| owner != *shard)
                    .map_err(redb_error)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::LOG;
    use super::*;
    use redb::ReadableDatabase;

    /// A log file's path in a directory removed when the first value is dropped.
    fn fresh() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("raft-log.redb");
        (dir, path)
    }

    fn append(shard: u32, indexes: std::ops::RangeInclusive<u64>) -> WalOp {
        WalOp::Append {
            shard,
            entries: indexes
                .map(|i| (i, vec![u8::try_from(i % 256).unwrap_or(0); 8]))
                .collect(),
        }
    }

    fn write(db: &Database, wal: &mut Wal, ops: &[WalOp], checkpoint: bool) {
        let payload = postcard::to_allocvec(ops).expect("encode");
        write_batch(db, wal, [ops, &[]], &payload, checkpoint).expect("write");
    }

    fn indexes(db: &Database, shard: u32) -> Vec<u64> {
        let txn = db.begin_read().expect("read");
        let log = txn.open_table(LOG).expect("log");
        log.range((shard, 0)..=(shard, u64::MAX))
            .expect("range")
            .map(|row| row.expect("row").0.value().1)
            .collect()
    }

    fn put(name: &'static str) -> Op {
        Op::Put {
            shard: 0,
            name,
            value: vec![1],
            done: oneshot::channel().0,
        }
    }

    /// A note is written only with a batch that took everything queued when the note was taken, so it
    /// never precedes the append of the entries it names; a held note of a shard the batch resets is
    /// dropped; newer notes replace held ones.
    #[test]
    fn a_note_waits_for_a_batch_that_drains_the_queue_queued_before_it() {
        let (_dir, path) = fresh();
        let (db, wal) = LogFile::open(&path).expect("open");
        let file = LogFile {
            path: path.clone(),
            db: RwLock::new(Some(Arc::new(db))),
            wal: Mutex::new(wal),
            health: Arc::new(DiskHealth::new()),
            notes: Mutex::new(HeldNotes::new()),
        };
        let (ops, mut queue) = mpsc::channel(2 * MAX_OPS_PER_COMMIT);
        for _ in 0..MAX_OPS_PER_COMMIT - 1 {
            ops.try_send(put("vote")).expect("queued");
        }
        ops.try_send(Op::Reset {
            shard: 2,
            done: oneshot::channel().0,
        })
        .expect("queued");
        for shard in [0, 2] {
            file.notes
                .lock()
                .unwrap()
                .insert((shard, "committed"), vec![1]);
        }
        let first = queue.try_recv().expect("first");
        let (batch, notes) = next_batch(&file, first, &mut queue);
        assert_eq!(batch.len(), MAX_OPS_PER_COMMIT);
        assert!(
            notes.is_empty(),
            "the queue was not drained: the notes wait"
        );
        assert_eq!(
            file.notes.lock().unwrap().keys().collect::<Vec<_>>(),
            [&(0, "committed")],
            "held again, but not the reset shard's"
        );

        // a newer value set meanwhile is the one kept
        file.notes.lock().unwrap().insert((0, "committed"), vec![2]);
        let (batch, notes) = next_batch(&file, put("vote"), &mut queue);
        assert_eq!(batch.len(), 1);
        assert_eq!(notes.get(&(0, "committed")), Some(&vec![2]));
        assert!(file.notes.lock().unwrap().is_empty(), "taken");
    }

    /// What a power cut does to the redb file (its commits since the last checkpoint were never synced)
    /// is played by putting back a copy taken at the checkpoint: the batches acknowledged after it come
    /// back from the write-ahead file, truncation and all, and stay after the next open.
    #[test]
    fn batches_acknowledged_after_the_last_checkpoint_are_recovered_from_the_write_ahead_file() {
        let (_dir, path) = fresh();
        let at_checkpoint = path.with_extension("at-checkpoint");
        {
            let (db, mut wal) = LogFile::open(&path).expect("open");
            write(&db, &mut wal, &[append(1, 1..=5)], true);
            std::fs::copy(&path, &at_checkpoint).expect("copy at the checkpoint");
            write(&db, &mut wal, &[append(1, 6..=9), append(2, 1..=2)], false);
            let ops = [
                WalOp::Truncate { shard: 1, from: 8 },
                WalOp::Put {
                    shard: 1,
                    name: "vote".into(),
                    value: vec![7],
                },
            ];
            write(&db, &mut wal, &ops, false);
            assert_eq!(indexes(&db, 1), (1..=7).collect::<Vec<_>>());
        }
        std::fs::copy(&at_checkpoint, &path).expect("the redb file as the power cut leaves it");
        for open in ["recovered", "reopened after the recovery's checkpoint"] {
            let (db, _wal) = LogFile::open(&path).expect("open");
            assert_eq!(indexes(&db, 1), (1..=7).collect::<Vec<_>>(), "{open}");
            assert_eq!(indexes(&db, 2), vec![1, 2], "{open}");
            let txn = db.begin_read().expect("read");
            let state = txn.open_table(RAFT_STATE).expect("state");
            let vote = state
                .get((1, "vote"))
                .expect("get")
                .map(|v| v.value().to_vec());
            assert_eq!(vote, Some(vec![7]), "{open}");
        }
    }
}
