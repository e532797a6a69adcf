//! The state machine of one shard: its redb file, `apply` and the read queries.
//!
//! `ShardStore::apply_entries` is the only way state changes: it applies a batch of committed log
//! entries, in order, in one redb write transaction that also records the position of the last one
//! (`last_applied`) and the replication layer's marker. That transaction is held open for the next few
//! batches (`held`), and committed before anything else reads or writes the file. Either a whole batch
//! is in the file or none of it, so a crash can never leave "debited but not granted", and on restart
//! the shard resumes exactly after `last_applied`. Snapshots (`snapshot`) export and import the whole file's tables.
//!
//! A full disk: a write refused for want of space leaves redb's `Database` unusable (`PreviousIo`), so
//! the store closes it and reopens the file at the next use; the file then holds its last durable
//! commit, which may be older than what was applied. Until a write succeeds again (the replication
//! layer first re-applies what was lost, `raft/src/state_machine.rs`), reads of the shard are
//! refused (`StoreError::is_disk_full`): they would see the past. Every other I/O error stops the
//! process (`shopkeep_faults::disk`).

pub mod apply;
pub mod audit;
mod held;
mod migrate;
pub mod query;
pub mod snapshot;
pub mod tables;
pub mod user_rows;

#[cfg(test)]
mod golden;
#[cfg(test)]
mod test_commands;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadTransaction, ReadableDatabase};
use serde::{Deserialize, Serialize};
use shopkeep_faults::{disk, failpoints, integrity};

use crate::domain::{Envelope, Fingerprint, Outcome, Timestamp};

pub use apply::Applied;
pub use held::{HOLD_COMMANDS, HOLD_FOR};

use held::{Held, OpenTxn};

/// An envelope for unit tests: `command` at a fixed time and seed, moved on by `n`.
#[cfg(test)]
pub(crate) fn test_envelope(n: u8, command: crate::domain::Command) -> Envelope {
    Envelope {
        now: Timestamp(1_700_000_000_000_000 + i64::from(n)),
        seed: crate::domain::IdSeed {
            unix_millis: 1_700_000_000_000,
            entropy: 1000 + u128::from(n),
        },
        idempotency: None,
        command,
    }
}

/// Storage failures. Any of them aborts the whole batch; nothing is half-applied.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot encode a record: {0}")]
    Encode(String),
    #[error("{0}")]
    Incompatible(String),
    /// Reading or writing a snapshot's body failed (a full disk among the sources is retried).
    #[error("snapshot stream: {0}")]
    SnapshotStream(#[source] std::io::Error),
    /// The file failed its integrity check when opened (`ShardStore::open_verified`).
    #[error("{0}")]
    CorruptFile(String),
    /// The file is being reopened after a full disk, or holds less than was applied until a write
    /// succeeds again (see the module docs).
    #[error(transparent)]
    DiskFull(Box<DiskFull>),
}

/// A shard's file that a full disk made unusable for now.
#[derive(Debug, thiserror::Error)]
#[error("disk full at {path}: {why}")]
pub struct DiskFull {
    path: String,
    why: String,
    /// redb's verdict on the file meanwhile.
    #[source]
    source: redb::Error,
}

impl StoreError {
    /// Whether this error is a full disk (retried until space is freed), not a fault of the data.
    pub fn is_disk_full(&self) -> bool {
        disk::is_disk_full(self)
    }
}

macro_rules! redb_error_into_store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
redb_error_into_store_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The version of the on-disk layout; a file written by another layout is refused, not misread, except
/// one of version 2, which is migrated (`migrate`) when opened or imported.
/// Version 2: positions are Raft log indexes and `META` holds the replication marker. Version 3: a
/// user's rows are clustered in one table (`user_rows`). Bumped by any
/// change to the tables or to the postcard bytes of what they hold other than a new enum variant at the
/// end (the persisted format's rules are in `crate::domain`; `golden` pins the bytes).
pub const SCHEMA_VERSION: u32 = 3;

/// redb's page cache of a shard file a tool opens on its own (a node splits its `--cache-mib` among its
/// shards instead; this is what each of eight got from the default 32). (redb's own default is 1 GiB
/// per file, which lets a node with 8 shards grow far beyond what it needs: reads are of recent rows,
/// and the OS caches the file anyway.) 4 MiB holds the hot pages of the purchase path on a small shop: 16 MiB was no faster there
/// and cost 100 MiB of peak RSS at 256 clients (`cargo bench --bench load`). On a shop of 3,000,000
/// orders 16 MiB made 19 % more purchases/s (3,828 against 3,223 at 64 clients), but the node peaked at
/// 283 MiB, over the 256 MiB budget (docs/BENCHMARKS.md, 2026-12-03 fifth session): an operator with
/// the memory gives `--cache-mib` more.
pub const SHARD_CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The page cache of one shard file, as [`ShardStore::cache`] reads it (counts since the file was
/// opened; a reopen after a full disk starts them again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUse {
    pub capacity_bytes: usize,
    pub used_bytes: usize,
    pub read_hits: u64,
    pub read_misses: u64,
    pub evictions: u64,
}

/// redb's page cache for a file being filled in one big transaction by `shopkeep restore`: with
/// `SHARD_CACHE_BYTES` the import evicts and rereads its own pages (15.5 s for a 37 MiB backup of
/// 5,000 users and 50,000 orders; 8.8 s with 64 MiB; 2.4 s with 256 MiB). A bound, not an
/// allocation: the restore of that backup peaked at 40 MiB of RSS.
pub const IMPORT_CACHE_BYTES: usize = 256 * 1024 * 1024;

/// Longest time between two durable commits of a shard's state, unless `--durable-every` says otherwise
/// (the others skip the fsync; see `apply_entries`). Bounds how much of the log a restart re-applies,
/// and how long a failing disk under a shard file goes unnoticed.
///
/// A durable commit costs more than its fsync: redb copies a page on its first write after a durable
/// commit and updates it in place until the next one, so each durable commit makes the purchases after
/// it copy again the branch pages of every tree they touch (on a big shop, the leaves too), and the
/// commit itself records every page the commits since the last one replaced. At 300,000 users and
/// 3,000,000 orders one node made 2,564–2,755 purchases/s at 64 clients with 500 ms, 3,381 with 2 s
/// and 4,536 with 5 s (two more pairs a session later: 2 s 3,178 and 2,454, 5 s 2,625 and 2,648, so
/// 5 s is not reliably faster); and with 5 s the commit's own pause doubled one node's p99.9 at half
/// its peak on an empty shop, where 2 s left it as it was (docs/BENCHMARKS.md, seventh and eighth
/// sessions).
pub const DEFAULT_DURABLE_EVERY: Duration = Duration::from_secs(2);
/// The shortest `--durable-every`: below it the durable commits' fsyncs and page copies dominate.
pub const MIN_DURABLE_EVERY: Duration = Duration::from_millis(100);
/// The longest `--durable-every`: a restart re-applies at most this much of the log, and a failing disk
/// under a shard file stops the node within it.
pub const MAX_DURABLE_EVERY: Duration = Duration::from_secs(60);

/// How long after opening its file shard `shard` of a node's `shards` first commits durably: its own
/// share of `every` (shard 0 after `every / shards`, the last after `every`). Each later durable commit
/// is due a whole `every` after the one before (`next_durable_due`), so the shards keep these phases:
/// their durable commits are spread over the interval instead of coming together.
///
/// Why: a durable commit writes out every page the commits since the last one left in redb's write
/// buffer, then fsyncs them (6–10 MB per shard at 2,000 purchases/s, 25–50 ms), and the shard applies
/// nothing meanwhile. When the shards of a node were opened together they stayed in step, so all of
/// them paused at once, each fsync slowed by the others' (docs/BENCHMARKS.md, twenty-ninth session).
fn first_durable_due(every: Duration, shard: u32, shards: u32) -> Duration {
    let shards = shards.max(1);
    let position = shard % shards + 1;
    every.mul_f64(f64::from(position) / f64::from(shards))
}

/// When the durable commit after one due at `due` and taken at `now` is due: `due` plus the fewest
/// whole `every`s that put it after `now`, so a late commit (no apply came while it was due) keeps the
/// shard's phase instead of moving it; `due` itself when the commit came before it.
fn next_durable_due(due: Instant, every: Duration, now: Instant) -> Instant {
    if now < due {
        // Taken early (a near-full disk makes every commit durable): the schedule stays.
        return due;
    }
    let late = now.duration_since(due);
    let every_nanos = every.as_nanos().max(1);
    let skipped = u32::try_from(late.as_nanos() / every_nanos).unwrap_or(u32::MAX);
    due + every.saturating_mul(skipped.saturating_add(1))
}

/// Shard-wide bookkeeping, one row in `META`, rewritten once per batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub schema_version: u32,
    pub shard: u32,
    /// Position of the last applied command (the Raft log index once replicated).
    pub last_applied: u64,
    /// Number of postings; the seq of the newest.
    pub posting_seq: u64,
    /// SHA-256 of the newest posting's stored bytes.
    pub posting_head: [u8; 32],
    /// Balances of the system accounts (credits minus debits). Wallet balances plus these sum to zero.
    pub psp_clearing: i64,
    pub revenue: i64,
}

/// A stored idempotency outcome (or, for a global key between its two steps, the command it runs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: Fingerprint,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub state: IdempotencyState,
}

/// The leading fields of an encoded `IdempotencyRecord`: postcard is positional and ignores what follows,
/// so a walk reads a record's retention without decoding its outcome.
#[derive(Deserialize)]
struct IdempotencyRecordHead {
    _fingerprint: Fingerprint,
    _created_at: Timestamp,
    expires_at: Timestamp,
}

/// When the stored outcome encoded in `bytes` (an `IdempotencyRecord`) may be purged.
pub fn idempotency_expiry(bytes: &[u8]) -> Result<Timestamp, StoreError> {
    let head: IdempotencyRecordHead = tables::decode(bytes)?;
    Ok(head.expires_at)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdempotencyState {
    Pending(Box<Envelope>),
    Done(Outcome),
}

/// One shard's redb database.
pub struct ShardStore {
    shard: u32,
    path: PathBuf,
    /// `None` once a full disk made redb refuse it, until it is reopened.
    db: RwLock<Option<Arc<Database>>>,
    /// The file was reopened after a full disk and may hold less than was applied: reads are refused
    /// until a write succeeds.
    behind: AtomicBool,
    /// When the next apply's commit is due to be durable (`first_durable_due`, `next_durable_due`).
    durable_due: Mutex<Instant>,
    /// Longest time between two durable commits (`DEFAULT_DURABLE_EVERY` unless set).
    durable_every: Duration,
    /// Durable commits of applied batches since the file was opened (the metric's counter).
    durable_commits: AtomicU64,
    /// redb's page cache of this file, in bytes (kept for a reopen after a full disk).
    cache_bytes: usize,
    /// When the file system's free space was last looked at, and whether it was near full then.
    space_seen: Mutex<(Option<Instant>, bool)>,
    /// The apply's write transaction while it is held open between batches (`held`). Locked by every
    /// apply, and by every other read or write of the file for as long as it takes to commit it.
    held: Mutex<Option<Held>>,
}

impl Drop for ShardStore {
    /// Commits what is held, so that closing the file makes it durable, as redb does with every
    /// non-durable commit at a clean close. A failure loses nothing the log does not hold: the next start
    /// re-applies it.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = self.flush_held();
        }
    }
}

/// Below this many times the log's reserve (`shopkeep_faults::disk::reserve`) of free space, every
/// apply commits durably. A commit that is not durable leaves its pages in redb's write buffer (up to
/// the file's cache), and the next durable one writes them all at once: near a full disk that burst
/// could take the space the log keeps for applying what it holds, and the log itself then cannot
/// write. Committing each batch durably keeps the free space what it seems, so the log stops first.
pub const NEAR_FULL_RESERVES: u64 = 4;

/// How often an apply looks at the file system's free space (one `statvfs`).
const SPACE_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Applies `entries` with `applier` (over the held transaction) and stores `marker`, skipping the
/// positions in `skip` (see `ShardStore::apply_entries_except`).
fn apply_into(
    applier: &mut apply::Applier<'_>,
    entries: &[(u64, Option<&Envelope>)],
    marker: &[u8],
    skip: &BTreeSet<usize>,
    progress: &Cell<usize>,
) -> Result<Vec<Option<Applied>>, StoreError> {
    let mut results = Vec::with_capacity(entries.len());
    for (position, (index, envelope)) in entries.iter().enumerate() {
        progress.set(position);
        match envelope {
            Some(envelope) if !skip.contains(&position) => {
                results.push(Some(applier.apply_envelope(*index, envelope)?));
            }
            _ => {
                applier.advance(*index);
                results.push(None);
            }
        }
    }
    progress.set(entries.len());
    applier.set_marker(marker)?;
    applier.finish()?;
    Ok(results)
}

fn open_database_with_cache(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let mut builder = Database::builder();
    builder.set_cache_size(cache_bytes);
    Ok(disk::open_database(&builder, path)?)
}

impl ShardStore {
    /// Opens (or creates) the shard's file, creating its tables and checking that it belongs to `shard`,
    /// with a cache of `SHARD_CACHE_BYTES`.
    pub fn open(path: &Path, shard: u32) -> Result<ShardStore, StoreError> {
        ShardStore::open_with_cache(path, shard, SHARD_CACHE_BYTES)
    }

    /// [`ShardStore::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        path: &Path,
        shard: u32,
        cache_bytes: usize,
    ) -> Result<ShardStore, StoreError> {
        let db = open_database_with_cache(path, cache_bytes)?;
        ShardStore::init(path, shard, db, cache_bytes)
    }

    /// [`ShardStore::open`] with the larger cache of a file about to be filled by one import
    /// (`IMPORT_CACHE_BYTES`): for `shopkeep restore`, never for a serving node.
    pub fn open_for_import(path: &Path, shard: u32) -> Result<ShardStore, StoreError> {
        ShardStore::open_with_cache(path, shard, IMPORT_CACHE_BYTES)
    }

    /// [`ShardStore::open_with_cache`], first verifying every page of the file
    /// (`shopkeep_faults::integrity`): a corrupt file is [`StoreError::CorruptFile`]. Done once, when
    /// the node starts.
    pub fn open_verified(
        path: &Path,
        shard: u32,
        cache_bytes: usize,
    ) -> Result<ShardStore, StoreError> {
        let mut builder = Database::builder();
        builder.set_cache_size(cache_bytes);
        let db = match integrity::open_verified(&mut builder, path, integrity::Fallback::Allow) {
            Ok(db) => db,
            Err(corrupt @ integrity::OpenError::Corrupt { .. }) => {
                return Err(StoreError::CorruptFile(corrupt.to_string()));
            }
            Err(integrity::OpenError::Other { source, .. }) => return Err(source.into()),
        };
        ShardStore::init(path, shard, db, cache_bytes)
    }

    fn init(
        path: &Path,
        shard: u32,
        db: Database,
        cache_bytes: usize,
    ) -> Result<ShardStore, StoreError> {
        let store = ShardStore {
            shard,
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            behind: AtomicBool::new(false),
            durable_due: Mutex::new(Instant::now() + DEFAULT_DURABLE_EVERY),
            durable_every: DEFAULT_DURABLE_EVERY,
            durable_commits: AtomicU64::new(0),
            cache_bytes,
            space_seen: Mutex::new((None, false)),
            held: Mutex::new(None),
        };
        let mut txn = store.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Redb(e.into()))?;
        migrate::to_current(&txn)?;
        {
            let mut applier = apply::Applier::open(&txn)?;
            applier.create_every_table()?;
            let meta = applier.meta_mut();
            if meta.schema_version == 0 {
                meta.schema_version = SCHEMA_VERSION;
                meta.shard = shard;
            } else if meta.schema_version != SCHEMA_VERSION || meta.shard != shard {
                return Err(StoreError::Incompatible(format!(
                    "{} holds shard {} with schema {}, expected shard {shard} with schema {SCHEMA_VERSION}",
                    path.display(),
                    meta.shard,
                    meta.schema_version
                )));
            }
            applier.finish()?;
        }
        txn.commit()?;
        Ok(store)
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// The shard's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// redb's page cache of the file: its size, and how full it is with how many hits.
    pub fn cache(&self) -> CacheUse {
        let stats = self
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|db| db.cache_stats());
        CacheUse {
            capacity_bytes: self.cache_bytes,
            used_bytes: stats.as_ref().map_or(0, redb::CacheStats::used_bytes),
            read_hits: stats.as_ref().map_or(0, redb::CacheStats::read_hits),
            read_misses: stats.as_ref().map_or(0, redb::CacheStats::read_misses),
            evictions: stats.as_ref().map_or(0, redb::CacheStats::evictions),
        }
    }

    fn disk_full(&self, why: impl Into<String>) -> StoreError {
        StoreError::DiskFull(Box::new(DiskFull {
            path: self.path.display().to_string(),
            why: why.into(),
            source: redb::Error::PreviousIo,
        }))
    }

    /// The open database, reopening the file if a full disk closed it.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(db.clone());
        }
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        // Fails while a reader still holds the old handle, or while the disk refuses the repair.
        let db = Arc::new(
            open_database_with_cache(&self.path, self.cache_bytes)
                .map_err(|e| self.disk_full(format!("reopening: {e}")))?,
        );
        *slot = Some(db.clone());
        Ok(db)
    }

    /// Passes `result` on; a full disk first closes the database (redb refuses it from then on) and
    /// marks the state as possibly behind.
    fn checked<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(error) = &result {
            if error.is_disk_full() {
                self.behind.store(true, Ordering::Release);
                // The held transaction (if any) is lost with the database it belongs to.
                self.lock_held().take();
                *self.db.write().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
        result
    }

    /// A write succeeded: the state is what was applied.
    fn caught_up(&self) {
        self.behind.store(false, Ordering::Release);
    }

    /// Applies committed commands in order in one write transaction that also stores `marker`, held
    /// open for the next batches (`held`). Each carries the index of its log entry (the commands of one
    /// entry share it); an item without an envelope (a new leader's blank entry, a membership change)
    /// only advances `last_applied`; its result is `None`.
    ///
    /// The commit is durable (fsync) only when the last durable one is older than `durable_every`:
    /// every entry is durable in the Raft log before it is applied, and the marker rolls back with the
    /// state, so a crash only makes the shard re-apply entries the log still holds (the argument is in
    /// `raft/src/state_machine.rs`). `sync` makes everything durable before a snapshot.
    pub fn apply_entries(
        &self,
        entries: &[(u64, Option<&Envelope>)],
        marker: &[u8],
    ) -> Result<Vec<Option<Applied>>, StoreError> {
        self.apply_entries_except(entries, marker, &BTreeSet::new(), &Cell::new(0))
    }

    /// `apply_entries`, but the items at the positions in `skip` only advance `last_applied` (their
    /// result is `None`), and `progress` holds the position of the item being applied (so that the
    /// caller knows which one panicked).
    pub fn apply_entries_except(
        &self,
        entries: &[(u64, Option<&Envelope>)],
        marker: &[u8],
        skip: &BTreeSet<usize>,
        progress: &Cell<usize>,
    ) -> Result<Vec<Option<Applied>>, StoreError> {
        let applied = self.checked(self.apply_entries_once(entries, marker, skip, progress))?;
        self.caught_up();
        Ok(applied)
    }

    /// Whether the next apply's commit is due to be durable (an fsync) now or within `margin`: its
    /// interval is over, or the disk is near full (`NEAR_FULL_RESERVES`).
    pub fn durable_commit_due(&self, margin: Duration) -> bool {
        let due = {
            let durable_due = self.durable_due.lock().unwrap_or_else(|p| p.into_inner());
            Instant::now() + margin >= *durable_due
        };
        due || self.near_full()
    }

    /// Whether the file system holding the file has less than `NEAR_FULL_RESERVES` log reserves free
    /// (looked at once per `SPACE_CHECK_EVERY`; `false` if it cannot be told).
    fn near_full(&self) -> bool {
        let mut seen = self.space_seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0.is_none_or(|at| at.elapsed() >= SPACE_CHECK_EVERY) {
            let near = disk::space(&self.path).is_some_and(|(free, total)| {
                free < disk::reserve(total).saturating_mul(NEAR_FULL_RESERVES)
            });
            *seen = (Some(Instant::now()), near);
        }
        seen.1
    }

    /// The same store, its state committed durably at least every `every` (clamped to
    /// `MIN_DURABLE_EVERY`..=`MAX_DURABLE_EVERY`) instead of `DEFAULT_DURABLE_EVERY`, at this shard's
    /// own phase of `every` among a node's `shards`, counted from `opened` (when the node began opening
    /// them; see `first_durable_due`).
    pub fn durable_every(mut self, every: Duration, opened: Instant, shards: u32) -> ShardStore {
        self.durable_every = every.clamp(MIN_DURABLE_EVERY, MAX_DURABLE_EVERY);
        *self
            .durable_due
            .get_mut()
            .unwrap_or_else(|p| p.into_inner()) =
            opened + first_durable_due(self.durable_every, self.shard, shards);
        self
    }

    /// Durable commits of applied batches since the file was opened.
    pub fn durable_commits(&self) -> u64 {
        self.durable_commits.load(Ordering::Relaxed)
    }

    fn apply_entries_once(
        &self,
        entries: &[(u64, Option<&Envelope>)],
        marker: &[u8],
        skip: &BTreeSet<usize>,
        progress: &Cell<usize>,
    ) -> Result<Vec<Option<Applied>>, StoreError> {
        let durable = self.durable_commit_due(Duration::ZERO);
        // Out of the batch's range until a command runs: a panic before one is nobody's to skip.
        progress.set(usize::MAX);
        let mut slot = self.lock_held();
        let held = match slot.take() {
            Some(torn) if torn.applying => self.rebuilt(torn)?,
            Some(held) => held,
            None => Held::new(OpenTxn::open(self.db()?.begin_write()?)?),
        };
        let held = slot.insert(held);
        held.applying = true;
        let applied = held
            .open
            .with_dependent_mut(|_, applier| apply_into(applier, entries, marker, skip, progress));
        let applied = match applied {
            Ok(applied) => applied,
            Err(error) => {
                self.discard(&mut slot);
                return Err(error);
            }
        };
        held.applying = false;
        if durable || held.due_with(entries.len()) {
            // Not recorded: its outcome is returned only once it is committed.
            self.commit_held(&mut slot, durable)?;
        } else {
            held.applied(entries, marker, skip);
        }
        failpoints::crash_point(failpoints::AFTER_APPLY_COMMIT);
        Ok(applied)
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        // A panic inside a command leaves the lock poisoned and `Held::applying` set: that is handled.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new transaction holding again what `torn` held (a batch panicked half-way in it); on failure
    /// those batches are lost, so reads are refused until an apply succeeds.
    fn rebuilt(&self, torn: Held) -> Result<Held, StoreError> {
        let (batches, began) = torn.into_batches();
        let rebuild = || -> Result<OpenTxn, StoreError> {
            let mut open = OpenTxn::open(self.db()?.begin_write()?)?;
            for batch in &batches {
                open.with_dependent_mut(|_, applier| {
                    apply_into(
                        applier,
                        &batch.borrowed(),
                        &batch.marker,
                        &batch.skip,
                        &Cell::new(0),
                    )
                })?;
            }
            Ok(open)
        };
        match rebuild() {
            Ok(open) => Ok(Held::rebuilt(open, batches, began)),
            Err(error) => {
                if !batches.is_empty() {
                    self.behind.store(true, Ordering::Release);
                }
                Err(error)
            }
        }
    }

    /// Drops the held transaction after a failed write: what it held is lost, so reads are refused until
    /// an apply succeeds (after a full disk, the replication layer re-applies it from the log).
    fn discard(&self, slot: &mut Option<Held>) {
        if slot.take().is_some_and(|held| !held.is_empty()) {
            self.behind.store(true, Ordering::Release);
        }
    }

    /// Commits the held transaction, if any (durably when `durable`).
    fn commit_held(&self, slot: &mut Option<Held>, durable: bool) -> Result<(), StoreError> {
        let Some(held) = slot.take() else {
            return Ok(());
        };
        let held = if held.applying {
            self.rebuilt(held)?
        } else {
            held
        };
        let answered = !held.is_empty();
        let mut txn = held.open.into_txn();
        let committed = txn
            .set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .map_err(|e| StoreError::Redb(e.into()))
            .and_then(|()| Ok(txn.commit()?));
        if let Err(error) = committed {
            if answered {
                self.behind.store(true, Ordering::Release);
            }
            return Err(error);
        }
        if durable {
            let mut due = self.durable_due.lock().unwrap_or_else(|p| p.into_inner());
            *due = next_durable_due(*due, self.durable_every, Instant::now());
            self.durable_commits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Commits the held transaction, if any, so that what the file holds is everything applied.
    fn flush_held(&self) -> Result<(), StoreError> {
        self.commit_held(&mut self.lock_held(), false)
    }

    /// Applies `batch` at the positions after `last_applied`, with no marker (tests and tools).
    pub fn apply_batch(&self, batch: &[&Envelope]) -> Result<Vec<Applied>, StoreError> {
        let next = query::meta(&self.begin_read()?)?.last_applied + 1;
        let entries: Vec<(u64, Option<&Envelope>)> = (next..)
            .zip(batch)
            .map(|(index, envelope)| (index, Some(*envelope)))
            .collect();
        let applied = self.apply_entries(&entries, &[])?;
        Ok(applied.into_iter().flatten().collect())
    }

    /// The replication marker stored by the last apply or import (read even while the state is
    /// behind: it says how far behind).
    pub fn marker(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.checked(self.flush_held())?;
        let txn = self.checked(self.db().and_then(|db| Ok(db.begin_read()?)))?;
        self.checked(query::marker(&txn))
    }

    /// Makes every commit so far durable (one empty durable commit).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.checked(self.sync_once())
    }

    fn sync_once(&self) -> Result<(), StoreError> {
        let mut txn = self.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Redb(e.into()))?;
        // The schedule stays: one more durable commit only shortens the interval it falls in.
        txn.commit()?;
        Ok(())
    }

    /// A read view of the state; refused while a full disk left the state behind what was applied.
    pub fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        if self.behind.load(Ordering::Acquire) {
            return Err(self.disk_full("the shard is catching up"));
        }
        self.checked(self.flush_held())?;
        self.checked(self.db().and_then(|db| Ok(db.begin_read()?)))
    }

    /// A write transaction of the file, after the held one (if any) is committed.
    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut slot = self.lock_held();
        let began = self
            .commit_held(&mut slot, false)
            .and_then(|()| Ok(self.db()?.begin_write()?));
        drop(slot);
        self.checked(began)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shards_of_a_node_first_commit_durably_each_at_its_own_share_of_the_interval() {
        let every = Duration::from_secs(2);
        let firsts: Vec<Duration> = (0..3)
            .map(|shard| first_durable_due(every, shard, 3))
            .collect();
        assert_eq!(firsts[2], every);
        assert!(firsts[0] < firsts[1] && firsts[1] < firsts[2], "{firsts:?}");
        assert!(
            firsts[0] >= every / 3 - Duration::from_millis(1),
            "{firsts:?}"
        );
        assert_eq!(first_durable_due(every, 0, 1), every);
        // Never more than the interval, whatever it is told.
        assert_eq!(
            first_durable_due(every, 7, 3),
            first_durable_due(every, 1, 3)
        );
        assert_eq!(first_durable_due(every, 0, 0), every);
    }

    #[test]
    fn a_late_durable_commit_keeps_its_shards_phase_and_an_early_one_keeps_the_schedule() {
        let every = Duration::from_secs(2);
        let due = Instant::now();
        assert_eq!(next_durable_due(due, every, due), due + every);
        let just_late = due + Duration::from_millis(30);
        assert_eq!(next_durable_due(due, every, just_late), due + every);
        let idle = due + Duration::from_millis(5_300);
        assert_eq!(next_durable_due(due, every, idle), due + every * 3);
        let early = due.checked_sub(Duration::from_millis(500));
        if let Some(early) = early {
            assert_eq!(next_durable_due(due, every, early), due);
        }
    }

    #[test]
    fn shards_opened_together_are_not_due_to_commit_durably_together() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let opened = Instant::now();
        let every = Duration::from_secs(60);
        let stores: Vec<ShardStore> = (0..3)
            .map(|shard| {
                let path = dir.path().join(format!("shard-{shard}.redb"));
                ShardStore::open(&path, shard)
                    .expect("a new shard file")
                    .durable_every(every, opened, 3)
            })
            .collect();
        // Within the first shard's share of the interval, only the first shard is due.
        let margin = Duration::from_secs(30).saturating_sub(opened.elapsed());
        let due: Vec<bool> = stores
            .iter()
            .map(|s| s.durable_commit_due(margin))
            .collect();
        assert_eq!(due, [true, false, false]);
    }
}
