//! The state-machine side of a shard's group: [`ReplicatedState`] (what the application implements) and
//! the adapter that plugs it into openraft, with the shard's snapshot files.
//!
//! Durability argument (openraft asks that `applied_state` never reports effects that a crash can lose):
//! the application may commit an apply batch non-durably, or leave it uncommitted in a transaction it
//! holds open for the next batches as long as its own reads see it, because
//! 1. every applied entry is first durable in the Raft log on a majority (openraft applies only committed
//!    entries, and our log reports an append only after its fsync);
//! 2. the marker (last applied log id + membership) is written in the same transaction as the effects,
//!    so after a crash the state and its marker roll back together to the last durable commit, and
//!    openraft re-applies the committed entries after it, exactly once;
//! 3. the log is only purged up to a snapshot, and [`ReplicatedState::export`] makes the state durable
//!    before the snapshot is taken, so no purged entry is ever missing from the durable state; for a
//!    received snapshot, the log store waits at the shard's [`PurgeGate`] (`purge_gate`) until the
//!    install committed.
//!
//! Snapshot file (`snapshot_file`): `SKSNAP01` | meta length (u32 LE) | postcard `SnapshotMeta` |
//! application body | SHA-256 of everything before it. A received snapshot is verified whole before the
//! state is touched, and the application imports it in one transaction: after a crash the shard has
//! the old state or the new one, never a mix.
//!
//! A full disk (see `disk`) is waited out, never reported to openraft (a `StorageError` stops the
//! shard's Raft for good): a state write refused for want of space is retried with back-off until it
//! succeeds. The application reopens its file after such a failure, which rolls its state back to its
//! last durable commit (point 1 above): before retrying, [`Recovery`] re-applies from the log what
//! openraft believes applied (the log still holds it, point 3). Every state write holds
//! [`Recovery`]'s lock, so a catch-up never races another write.

use std::fs::File;
use std::future::Future;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use crate::log_store::LogStore;
use crate::{
    Entry, LogId, NodeId, Payload, SnapshotMeta, StorageError, StoredMembership, TypeConfig, batch,
    decode, encode,
};
use background::{in_background, take_turn};
use coalesce::Deferred;
use shopkeep_faults::disk::{self, Backoff, DiskHealth};
use snapshot_file::{SnapshotDir, verify, write_snapshot};

mod background;
mod cadence;
mod coalesce;
mod paced;
mod purge_gate;
mod snapshot_file;

pub use cadence::SnapshotCadence;
pub use coalesce::AppliedIndex;
pub use purge_gate::PurgeGate;

/// An application error, reported to openraft as a storage error.
pub type StateError = Box<dyn std::error::Error + Send + Sync>;

/// One committed command handed to the application, with the index of its log entry, or an entry
/// without commands (a new leader's blank entry, a membership change), which only advances the index.
/// The commands of one entry (see `batch`) come one after the other and share its index.
pub struct Applying<'a> {
    pub index: u64,
    pub command: Option<&'a [u8]>,
}

/// A consistent view of the state being written out as a snapshot.
pub trait Export: Send {
    /// The marker stored with the exported state (`None` when nothing was applied yet).
    fn marker(&self) -> Option<Vec<u8>>;
    fn write_to(&mut self, out: &mut dyn Write) -> Result<(), StateError>;
}

/// The application's state machine of one shard. Every method is blocking and deterministic in what it
/// stores. They are called off the async workers, except `apply_batch` of a small batch whose commit will
/// not wait on the disk (`next_apply_waits_on_disk`): that one runs on the worker, as a short poll would.
pub trait ReplicatedState: Send + Sync + 'static {
    /// The marker stored by the last `apply` or `import`, `None` for a new state.
    fn marker(&self) -> Result<Option<Vec<u8>>, StateError>;
    /// Applies `batch` in order in ONE transaction that also stores `marker`; one reply per item
    /// (ignored for items without a command). May commit non-durably (see the module docs).
    fn apply_batch(
        &self,
        batch: &[Applying<'_>],
        marker: &[u8],
    ) -> Result<Vec<Vec<u8>>, StateError>;
    /// Makes everything applied so far durable, then starts exporting a consistent view of the state.
    fn export(&self) -> Result<Box<dyn Export>, StateError>;
    /// Replaces the whole state by an exported body and its marker, atomically and durably.
    fn import(&self, body: &mut dyn Read, marker: &[u8]) -> Result<(), StateError>;
    /// Whether the next `apply_batch` may wait on the disk (a durable commit). The adapter runs a small
    /// batch that will not on the async worker itself, sparing it two thread hand-offs (to a blocking
    /// thread and back); any other on a blocking thread.
    fn next_apply_waits_on_disk(&self) -> bool {
        true
    }
    /// The file the state lives in (named when the disk is full).
    fn location(&self) -> PathBuf {
        PathBuf::from("state")
    }
}

/// The index of the last entry `state` applied (0: none).
pub fn applied_index<S: ReplicatedState>(state: &S) -> Result<u64, StateError> {
    Ok(match state.marker()? {
        Some(bytes) => decode::<Marker>(&bytes)?
            .last_applied
            .map_or(0, |id| id.index),
        None => 0,
    })
}

/// The last log id a state's marker says it applied (`None`: nothing applied).
pub(crate) fn marker_last_applied(marker: &[u8]) -> Result<Option<LogId>, postcard::Error> {
    Ok(decode::<Marker>(marker)?.last_applied)
}

/// The marker of a state written offline (not through a Raft group) as if it had applied the log up to
/// `last_applied` with `membership`: what a tool that builds a data directory stores with the state
/// before it seeds the log with [`crate::log_store::LogDb::seed_restored`] (the scale benchmark's
/// loader). The bytes are those `apply` stores.
pub fn offline_marker(
    last_applied: LogId,
    membership: StoredMembership,
) -> Result<Vec<u8>, postcard::Error> {
    encode(&Marker {
        last_applied: Some(last_applied),
        membership,
    })
}

/// What the state stores as its marker: where it is in the log and the membership it has applied.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Marker {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

fn sm_error(e: impl ToString) -> StorageError {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

fn snapshot_error(e: impl ToString) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

/// How a state write ended: written, refused for want of space (retried), or failed for good.
enum Attempt {
    Full(String),
    Failed(StorageError),
}

impl Attempt {
    fn of(error: StateError, failed: fn(String) -> StorageError) -> Attempt {
        if disk::is_disk_full(&*error) {
            Attempt::Full(error.to_string())
        } else {
            Attempt::Failed(failed(error.to_string()))
        }
    }
}

fn sm_failed(message: String) -> StorageError {
    sm_error(message)
}

fn snapshot_failed(message: String) -> StorageError {
    snapshot_error(message)
}

async fn attempt<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Attempt> + Send + 'static,
) -> Result<T, Attempt> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => Err(Attempt::Failed(sm_error(e))),
    }
}

/// Brings the state back to what it held after a full disk rolled it back, and serialises the state's
/// writes (see the module docs).
struct Recovery {
    /// The shard's log, to re-apply from (`None`: a state machine used on its own, never caught up).
    log: Option<LogStore>,
    health: Arc<DiskHealth>,
    /// What the state holds and what is held back; the lock is held by every write of the state.
    applied: tokio::sync::Mutex<Applied>,
    /// What the state holds, for readers.
    index: AppliedIndex,
}

/// What a replica's state holds (`held` is what a full disk may roll back), and the entries it holds
/// back (see `coalesce`) with the marker their apply stores.
#[derive(Default)]
struct Applied {
    held: Marker,
    deferred: Deferred,
    deferred_marker: Marker,
}

impl Recovery {
    /// Runs `write` until it succeeds or fails with anything but a full disk. After a full disk, waits
    /// (back-off), then, when `catch_up`, re-applies what the state lost before trying again.
    async fn until_written<S, T, F, Fut>(
        &self,
        state: &Arc<S>,
        believed: &Marker,
        catch_up: bool,
        mut write: F,
    ) -> Result<T, StorageError>
    where
        S: ReplicatedState,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let file = state.location();
        let mut backoff = Backoff::new();
        let mut behind = false;
        loop {
            let result = if behind {
                match self.catch_up(state, believed).await {
                    Ok(()) => write().await,
                    Err(error) => Err(error),
                }
            } else {
                write().await
            };
            match result {
                Ok(value) => {
                    self.health.written(&file);
                    return Ok(value);
                }
                Err(Attempt::Full(error)) => {
                    self.health.full(&file, &error);
                    behind = catch_up;
                    tokio::time::sleep(backoff.pause()).await;
                }
                Err(Attempt::Failed(error)) => return Err(error),
            }
        }
    }

    /// Re-applies the entries between the state's own marker and `believed`, from the log.
    async fn catch_up<S: ReplicatedState>(
        &self,
        state: &Arc<S>,
        believed: &Marker,
    ) -> Result<(), Attempt> {
        let Some(target) = believed.last_applied else {
            return Ok(());
        };
        let reader = state.clone();
        let stored = attempt(move || match reader.marker() {
            Ok(Some(bytes)) => decode::<Marker>(&bytes).map_err(|e| Attempt::Failed(sm_error(e))),
            Ok(None) => Ok(Marker::default()),
            Err(error) => Err(Attempt::of(error, sm_failed)),
        })
        .await?;
        let from = stored.last_applied.map_or(0, |id| id.index + 1);
        if from > target.index {
            return Ok(());
        }
        let Some(log) = &self.log else {
            return Err(Attempt::Failed(sm_error(
                "the state rolled back and there is no log to re-apply from",
            )));
        };
        let entries =
            openraft::RaftLogReader::try_get_log_entries(&mut log.clone(), from..=target.index)
                .await
                .map_err(Attempt::Failed)?;
        let contiguous = entries
            .iter()
            .zip(from..)
            .all(|(entry, index)| entry.log_id.index == index);
        if entries.len() as u64 != target.index + 1 - from || !contiguous {
            return Err(Attempt::Failed(sm_error(format!(
                "cannot re-apply {from}..={}: the log no longer holds it",
                target.index
            ))));
        }
        tracing::info!(
            from,
            to = target.index,
            "re-applying what a full disk rolled back"
        );
        let marker = encode(believed).map_err(|e| Attempt::Failed(sm_error(e)))?;
        let state = state.clone();
        attempt(move || apply_now(&*state, &entries, &marker)).await?;
        Ok(())
    }

    /// Applies the held-back entries in one transaction (waiting out a full disk); one response per
    /// entry. `applied` is this recovery's lock, held.
    async fn flush<S: ReplicatedState>(
        &self,
        state: &Arc<S>,
        applied: &mut Applied,
    ) -> Result<Vec<Payload>, StorageError> {
        if applied.deferred.entries.is_empty() {
            return Ok(Vec::new());
        }
        let target = applied.deferred_marker.clone();
        let marker = encode(&target).map_err(sm_error)?;
        let entries = Arc::new(applied.deferred.take());
        let small = entries.iter().map(payload_bytes).sum::<u64>() <= INLINE_APPLY_BYTES;
        let written = self
            .until_written(state, &applied.held, true, || {
                let (state, entries, marker) = (state.clone(), entries.clone(), marker.clone());
                // Asked at each attempt: a retry after a full disk's back-off may be due to fsync.
                let inline = small && !state.next_apply_waits_on_disk();
                async move {
                    if inline {
                        apply_now(&*state, &entries, &marker)
                    } else {
                        attempt(move || apply_now(&*state, &entries, &marker)).await
                    }
                }
            })
            .await;
        let replies = match written {
            Ok(replies) => replies,
            Err(error) => {
                // Kept for the next attempt (the state rolled back to `held`).
                let entries = Arc::try_unwrap(entries).unwrap_or_else(|shared| (*shared).clone());
                applied.deferred.append(entries);
                return Err(error);
            }
        };
        metrics::histogram!(crate::metrics::APPLY_ENTRIES).record(entries.len() as f64);
        if let Some(last) = target.last_applied {
            self.index.reached(last.index);
        }
        applied.held = target;
        Ok(replies)
    }
}

/// The most payload bytes a batch applied on the async worker itself may hold (a few commands: their
/// apply takes ~0.1 ms, no longer than a worker may be held).
const INLINE_APPLY_BYTES: u64 = 1024;

/// Applies `entries` in one transaction of the state with `marker`; one response per entry.
fn apply_now<S: ReplicatedState>(
    state: &S,
    entries: &[Entry],
    marker: &[u8],
) -> Result<Vec<Payload>, Attempt> {
    let failed = |e: String| Attempt::Failed(sm_error(e));
    // Flatten the entries into their commands; remember how many each entry has.
    let mut items = Vec::with_capacity(entries.len());
    let mut counts = Vec::with_capacity(entries.len());
    for entry in entries {
        let index = entry.log_id.index;
        match &entry.payload {
            EntryPayload::Normal(payload) => {
                // Only this crate proposes entries, always as batches.
                let commands = batch::decode(&payload.0).map_err(|e| failed(e.to_string()))?;
                counts.push(Some(commands.len()));
                items.extend(commands.into_iter().map(|command| Applying {
                    index,
                    command: Some(command),
                }));
            }
            EntryPayload::Blank | EntryPayload::Membership(_) => {
                counts.push(None);
                items.push(Applying {
                    index,
                    command: None,
                });
            }
        }
    }
    let replies = state
        .apply_batch(&items, marker)
        .map_err(|e| Attempt::of(e, sm_failed))?;
    if replies.len() != items.len() {
        return Err(failed(format!(
            "{} replies for {} commands",
            replies.len(),
            items.len()
        )));
    }
    // One response per entry: the batch of its commands' replies.
    let mut replies = replies.into_iter();
    Ok(counts
        .into_iter()
        .map(|count| match count {
            Some(n) => Payload(batch::encode(&replies.by_ref().take(n).collect::<Vec<_>>())),
            None => {
                replies.next();
                Payload::default()
            }
        })
        .collect())
}

/// A shard's state machine as openraft drives it.
pub struct StateMachineStore<S: ReplicatedState> {
    state: Arc<S>,
    /// The current snapshot failed its digest when the shard opened and was set aside.
    lost_snapshot: bool,
    snapshots: Arc<SnapshotDir>,
    membership: StoredMembership,
    gate: PurgeGate,
    recovery: Arc<Recovery>,
    /// This node, when the replica holds back the entries of other leaders (see `coalesce`).
    coalescing: Option<NodeId>,
    /// What the log since the last snapshot holds, when the owner asks for snapshots by it.
    cadence: Option<Arc<SnapshotCadence>>,
}

impl<S: ReplicatedState> StateMachineStore<S> {
    /// `snapshot_dir` holds this shard's snapshot files (created if missing).
    pub fn new(state: Arc<S>, snapshot_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&snapshot_dir)?;
        let snapshots = SnapshotDir {
            dir: snapshot_dir,
            replace: std::sync::Mutex::new(()),
        };
        snapshots.remove_temporaries();
        let lost_snapshot = snapshots.set_aside_if_corrupt()?;
        Ok(StateMachineStore {
            state,
            lost_snapshot,
            snapshots: Arc::new(snapshots),
            membership: StoredMembership::default(),
            gate: PurgeGate::open(),
            recovery: Arc::new(Recovery {
                log: None,
                health: Arc::new(DiskHealth::new()),
                applied: tokio::sync::Mutex::new(Applied::default()),
                index: AppliedIndex::new(),
            }),
            coalescing: None,
            cadence: None,
        })
    }

    /// Counts the log since the shard's last snapshot against that snapshot's size (see `cadence`);
    /// the owner asks openraft for a snapshot when the returned cadence is due.
    pub fn snapshot_cadence(
        &mut self,
        min_entries: u64,
        log_percent: u32,
    ) -> std::io::Result<Arc<SnapshotCadence>> {
        let (bytes, covered) = match self.snapshots.current()? {
            Some((meta, file)) => (
                file.metadata()?.len(),
                meta.last_log_id.map_or(0, |id| id.index),
            ),
            None => (0, 0),
        };
        let applied = applied_index(&*self.state).map_err(std::io::Error::other)?;
        let cadence = Arc::new(SnapshotCadence::new(
            min_entries,
            log_percent,
            bytes,
            applied.saturating_sub(covered),
        ));
        self.cadence = Some(cadence.clone());
        Ok(cadence)
    }

    /// Whether the shard needs a snapshot before its Raft starts: its current one was corrupt when the
    /// shard opened (and was set aside), or it has none while its log was purged (a directory restored
    /// or loaded offline). A peer may need it, and openraft 0.9 would otherwise build it inside
    /// `Raft::new`, one shard after another.
    pub fn needs_snapshot_at_start(&self, log_purged: bool) -> std::io::Result<bool> {
        Ok(self.lost_snapshot || (log_purged && self.snapshots.current()?.is_none()))
    }

    /// Builds the snapshot [`Self::needs_snapshot_at_start`] asked for, not waiting for the process's
    /// turn: nothing is served before the shards start, so their builds may run side by side.
    pub async fn build_snapshot_at_start(&mut self) -> Result<(), StorageError> {
        use openraft::storage::RaftStateMachine;
        self.get_snapshot_builder().await.build().await.map(drop)
    }

    /// Reports a full disk to `health`, and re-applies from `log` what a full disk rolled back.
    pub fn with_disk(mut self, health: Arc<DiskHealth>, log: LogStore) -> Self {
        self.recovery = Arc::new(Recovery {
            log: Some(log),
            health,
            applied: tokio::sync::Mutex::new(Applied::default()),
            index: self.recovery.index.clone(),
        });
        self
    }

    /// Holds back the entries other leaders than node `me` proposed and applies them together (see
    /// `coalesce`); starts the task that applies them once they have waited. Call in a runtime, last.
    pub fn coalescing(mut self, me: NodeId) -> Self {
        self.coalescing = Some(me);
        let (state, recovery) = (Arc::downgrade(&self.state), Arc::downgrade(&self.recovery));
        tokio::spawn(coalesce::run_flusher(
            self.recovery.index.clone(),
            move || {
                let (state, recovery) = (state.upgrade(), recovery.upgrade());
                async move {
                    let (Some(state), Some(recovery)) = (state, recovery) else {
                        return false;
                    };
                    let mut applied = recovery.applied.lock().await;
                    if let Err(error) = recovery.flush(&state, &mut applied).await {
                        // The next apply meets it again and reports it to openraft.
                        tracing::error!(%error, "applying held-back entries failed");
                    }
                    true
                }
            },
        ));
        self
    }

    /// What the state holds (not what openraft believes applied): what a read waits on.
    pub fn applied_index(&self) -> AppliedIndex {
        self.recovery.index.clone()
    }

    /// Reports to `gate` (shared with the shard's log store) what this state machine holds durably.
    pub fn with_purge_gate(mut self, gate: PurgeGate) -> Self {
        self.gate = gate;
        self
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work).await.map_err(sm_error)?
}

impl<S: ReplicatedState> StateMachineStore<S> {
    /// Verifies the received snapshot `file`, imports it (waiting out a full disk) and keeps it as the
    /// current snapshot.
    async fn install(&self, meta: &SnapshotMeta, file: File) -> Result<(), StorageError> {
        let expected = meta.clone();
        let path = self.snapshots.receiving_path();
        let (mut file, stored, body_start, body_len) = blocking(move || {
            let mut file = file;
            if let Err(error) = file.sync_all() {
                disk::fail_stop(&path, "fsync", &error);
            }
            let (stored, body_len) = verify(&mut file).map_err(snapshot_error)?;
            if stored.last_log_id != expected.last_log_id
                || stored.last_membership != expected.last_membership
            {
                return Err(snapshot_error(format!(
                    "snapshot file holds {:?}, the leader announced {:?}",
                    stored.last_log_id, expected.last_log_id
                )));
            }
            let body_start = file.stream_position().map_err(snapshot_error)?;
            Ok((file, stored, body_start, body_len))
        })
        .await?;
        let installed = Marker {
            last_applied: stored.last_log_id,
            membership: stored.last_membership.clone(),
        };
        let marker = encode(&installed).map_err(sm_error)?;
        let mut applied = self.recovery.applied.lock().await;
        let before = applied.held.clone();
        self.recovery
            .until_written(&self.state, &before, false, || {
                let (state, marker) = (self.state.clone(), marker.clone());
                let body = file.try_clone();
                attempt(move || {
                    let mut body = body.map_err(|e| Attempt::Failed(snapshot_error(e)))?;
                    body.seek(SeekFrom::Start(body_start))
                        .map_err(|e| Attempt::Failed(snapshot_error(e)))?;
                    let mut body = BufReader::new(body).take(body_len);
                    state
                        .import(&mut body, &marker)
                        .map_err(|e| Attempt::of(e, sm_failed))
                })
            })
            .await?;
        // The snapshot holds what it covers of the held-back entries (openraft installs only a
        // snapshot ahead of what it believes applied, so all of them).
        let covered = installed.last_applied.map_or(0, |id| id.index);
        applied.deferred.forget_upto(covered);
        applied.held = installed;
        self.recovery.index.reached(covered);
        if let Some(cadence) = &self.cadence {
            cadence.exported();
            cadence.written(body_len);
        }
        drop(applied);
        let snapshots = self.snapshots.clone();
        blocking(move || {
            // Keep the verified file as the current snapshot: rename it when it is the file this
            // directory received into, else copy it here first.
            let received = snapshots.receiving_path();
            let kept = if same_file(&file, &received) {
                received
            } else {
                let copy = snapshots.installing_path();
                file.seek(SeekFrom::Start(0)).map_err(snapshot_error)?;
                let mut out = File::create(&copy).map_err(snapshot_error)?;
                std::io::copy(&mut file, &mut out).map_err(snapshot_error)?;
                out.sync_all().map_err(snapshot_error)?;
                copy
            };
            snapshots.keep(&kept, &stored)
        })
        .await
    }
}

impl<S: ReplicatedState> RaftStateMachine<TypeConfig> for StateMachineStore<S> {
    type SnapshotBuilder = SnapshotBuilder<S>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        // Called when the shard opens (nothing is held back then): held-back entries are applied first,
        // so that the answer is what openraft believes applied.
        let mut applied = self.recovery.applied.lock().await;
        self.recovery.flush(&self.state, &mut applied).await?;
        let state = self.state.clone();
        let marker = blocking(move || match state.marker().map_err(sm_error)? {
            Some(bytes) => decode::<Marker>(&bytes).map_err(sm_error),
            None => Ok(Marker::default()),
        })
        .await?;
        self.membership = marker.membership.clone();
        applied.held = marker.clone();
        drop(applied);
        self.recovery
            .index
            .reset(marker.last_applied.map_or(0, |id| id.index));
        // Called when the shard opens: what the state holds now is what survived, durably.
        if let Some(id) = marker.last_applied {
            self.gate.raise(id.index);
        }
        Ok((marker.last_applied, marker.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Payload>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        if let Some(log) = &self.recovery.log {
            // a leader's own entries were committed before its log had them durable (`log_store::flushed`)
            log.flushed()
                .wait_for(last.index)
                .await
                .map_err(|error| StorageIOError::write_logs(AnyError::error(error)))?;
        }
        for entry in &entries {
            if let EntryPayload::Membership(membership) = &entry.payload {
                self.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
            }
        }
        let target = Marker {
            last_applied: Some(last),
            membership: self.membership.clone(),
        };
        let count = entries.len();
        let mut applied = self.recovery.applied.lock().await;
        if let Some(cadence) = &self.cadence {
            cadence.logged(count as u64, entries.iter().map(payload_bytes).sum());
        }
        let hold = applied
            .deferred
            .may_hold(&entries, self.coalescing, &self.recovery.index);
        applied.deferred_marker = target;
        if hold {
            applied.deferred.hold(entries, &self.recovery.index);
            // Nobody reads the replies to other leaders' entries.
            return Ok(vec![Payload::default(); count]);
        }
        applied.deferred.append(entries);
        let mut replies = self.recovery.flush(&self.state, &mut applied).await?;
        Ok(replies.split_off(replies.len() - count))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            state: self.state.clone(),
            snapshots: self.snapshots.clone(),
            gate: self.gate.clone(),
            recovery: self.recovery.clone(),
            cadence: self.cadence.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.snapshots.receiving_path();
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(snapshot_error)?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let file = snapshot.into_std().await;
        let installed = self.install(meta, file).await;
        match (&installed, meta.last_log_id) {
            // the import committed durably: the log may now be purged up to the snapshot
            (Ok(()), Some(id)) => self.gate.raise(id.index),
            (Ok(()), None) => {}
            (Err(_), _) => self.gate.fail(),
        }
        installed?;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snapshots = self.snapshots.clone();
        let current = blocking(move || snapshots.current().map_err(snapshot_error)).await?;
        match current {
            None => Ok(None),
            Some((meta, file)) => Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(tokio::fs::File::from_std(file)),
            })),
        }
    }
}

/// Builds a snapshot from a consistent export of the state.
pub struct SnapshotBuilder<S: ReplicatedState> {
    state: Arc<S>,
    snapshots: Arc<SnapshotDir>,
    gate: PurgeGate,
    recovery: Arc<Recovery>,
    cadence: Option<Arc<SnapshotCadence>>,
}

impl<S: ReplicatedState> SnapshotBuilder<S> {
    /// A durable export of the state (its write waits out a full disk, see `Recovery`).
    async fn export(&self) -> Result<Box<dyn Export>, StorageError> {
        let mut applied = self.recovery.applied.lock().await;
        self.recovery.flush(&self.state, &mut applied).await?;
        let export = self
            .recovery
            .until_written(&self.state, &applied.held, true, || {
                let state = self.state.clone();
                attempt(move || state.export().map_err(|e| Attempt::of(e, snapshot_failed)))
            })
            .await?;
        // Still under the lock every apply takes: the log after this point counts towards the next.
        if let Some(cadence) = &self.cadence {
            cadence.exported();
        }
        Ok(export)
    }

    /// Writes `export` as the current snapshot; `Full` when the disk has no room for it (the partial
    /// file is removed).
    fn write(
        snapshots: &SnapshotDir,
        mut export: Box<dyn Export>,
    ) -> Result<(SnapshotMeta, File), Attempt> {
        let failed = |e: String| Attempt::Failed(snapshot_error(e));
        let marker = match export.marker() {
            Some(bytes) => decode::<Marker>(&bytes).map_err(|e| failed(e.to_string()))?,
            None => Marker::default(),
        };
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let meta = SnapshotMeta {
            last_log_id: marker.last_applied,
            last_membership: marker.membership,
            snapshot_id: match marker.last_applied {
                Some(id) => format!(
                    "{}-{}-{}-{unique}",
                    id.leader_id.term, id.leader_id.node_id, id.index
                ),
                None => format!("empty-{unique}"),
            },
        };
        let path = snapshots.building_path();
        if let Err(error) = write_snapshot(&path, &meta, export.as_mut()) {
            let _ = std::fs::remove_file(&path);
            return Err(if disk::is_full(&error) {
                Attempt::Full(format!("{}: {error}", path.display()))
            } else {
                failed(error.to_string())
            });
        }
        snapshots.keep(&path, &meta).map_err(Attempt::Failed)?;
        snapshots
            .current()
            .map_err(|e| failed(e.to_string()))?
            .ok_or_else(|| failed("the snapshot just built is gone".into()))
    }
}

impl<S: ReplicatedState> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // One build at a time in this process (see `background`): the shards reach their snapshot
        // points together, and each build is the whole shard.
        let _turn = take_turn().await.map_err(snapshot_error)?;
        self.build().await
    }
}

impl<S: ReplicatedState> SnapshotBuilder<S> {
    /// Exports the state and writes it as the current snapshot, whoever else is building.
    async fn build(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let path = self.snapshots.building_path();
        let mut backoff = Backoff::new();
        let (meta, file) = loop {
            let export = self.export().await?;
            let snapshots = self.snapshots.clone();
            let written = in_background("snapshot-build", move || Self::write(&snapshots, export))
                .await
                .unwrap_or_else(|| {
                    Err(Attempt::Failed(snapshot_error(
                        "the snapshot's thread stopped before it was written",
                    )))
                });
            match written {
                Ok(built) => {
                    self.recovery.health.written(&path);
                    break built;
                }
                Err(Attempt::Full(error)) => {
                    self.recovery.health.full(&path, &error);
                    tokio::time::sleep(backoff.pause()).await;
                }
                Err(Attempt::Failed(error)) => return Err(error),
            }
        };
        // The export made the state durable up to the snapshot (`ReplicatedState::export`).
        if let Some(id) = meta.last_log_id {
            self.gate.raise(id.index);
        }
        if let (Some(cadence), Ok(written)) = (&self.cadence, file.metadata()) {
            cadence.written(written.len());
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

/// The bytes an entry adds to the log, as the snapshot cadence counts them: its commands.
fn payload_bytes(entry: &Entry) -> u64 {
    match &entry.payload {
        EntryPayload::Normal(payload) => payload.0.len() as u64,
        EntryPayload::Blank | EntryPayload::Membership(_) => 0,
    }
}

/// Whether the open `file` is the file at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::ThreadId;

    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::{
        Applying, Export, INLINE_APPLY_BYTES, ReplicatedState, StateError, StateMachineStore,
    };
    use crate::{Entry, LogId, Payload, batch};

    /// A state that notes the thread each batch was applied on, and says its next commit waits on the
    /// disk when told to.
    #[derive(Default)]
    struct ThreadNoted {
        waits: AtomicBool,
        threads: Mutex<Vec<ThreadId>>,
    }

    struct Nothing;

    impl Export for Nothing {
        fn marker(&self) -> Option<Vec<u8>> {
            None
        }
        fn write_to(&mut self, _out: &mut dyn Write) -> Result<(), StateError> {
            Ok(())
        }
    }

    impl ReplicatedState for ThreadNoted {
        fn marker(&self) -> Result<Option<Vec<u8>>, StateError> {
            Ok(None)
        }
        fn apply_batch(
            &self,
            items: &[Applying<'_>],
            _marker: &[u8],
        ) -> Result<Vec<Vec<u8>>, StateError> {
            self.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            Ok(vec![Vec::new(); items.len()])
        }
        fn next_apply_waits_on_disk(&self) -> bool {
            self.waits.load(Ordering::Relaxed)
        }
        fn export(&self) -> Result<Box<dyn Export>, StateError> {
            Ok(Box::new(Nothing))
        }
        fn import(&self, _body: &mut dyn Read, _marker: &[u8]) -> Result<(), StateError> {
            Ok(())
        }
    }

    fn entry(index: u64, command_bytes: usize) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Payload(batch::encode(&[vec![7u8; command_bytes]]))),
        }
    }

    #[tokio::test]
    async fn a_small_batch_whose_commit_does_not_wait_on_the_disk_is_applied_on_the_worker_any_other_on_a_blocking_thread()
     {
        let dir = tempfile::tempdir().unwrap();
        let state = std::sync::Arc::new(ThreadNoted::default());
        let mut store =
            StateMachineStore::new(state.clone(), dir.path().join("snapshots")).unwrap();
        let worker = std::thread::current().id();
        store.apply([entry(1, 100)]).await.unwrap();
        state.waits.store(true, Ordering::Relaxed);
        store.apply([entry(2, 100)]).await.unwrap();
        state.waits.store(false, Ordering::Relaxed);
        store
            .apply([entry(3, usize::try_from(INLINE_APPLY_BYTES).unwrap())])
            .await
            .unwrap();
        let threads = state.threads.lock().unwrap().clone();
        assert_eq!(threads.len(), 3);
        assert_eq!(threads[0], worker, "small, no fsync due: on the worker");
        assert_ne!(threads[1], worker, "an fsync due: on a blocking thread");
        assert_ne!(threads[2], worker, "too large: on a blocking thread");
    }
}
