//! Followers' applies, coalesced: what a replica's state really holds ([`AppliedIndex`]), the entries it
//! holds back ([`Deferred`]), and the task that applies them when they have waited long enough.
//!
//! A follower's reply to an entry is never read: only the node that proposed an entry answers a
//! client, and it proposes under its own leader id. So a replica may hold back the committed entries
//! other leaders proposed and apply many of them in one transaction: a state transaction costs about
//! the same for one entry as for several (redb writes every touched table's root on each commit), and
//! the followers' applies were ~40 % of a cluster's CPU. openraft believes them applied when `apply`
//! returns; what the state holds is [`AppliedIndex`], and everything that reads the state as of an
//! index waits on that, not on openraft's `last_applied`:
//! - the read barrier asks for the entries it needs at once ([`AppliedIndex::wait_for`]): a
//!   linearizable read is never delayed by the deferral, only made to pay for the apply;
//! - entries this node proposed, blank and membership entries, a snapshot build and a too-large
//!   backlog apply what is held back first, in the same transaction;
//! - a received snapshot replaces what it covers;
//! - the flusher applies the rest at most [`MAX_AGE`] after the first was held back, so a local read
//!   (`?consistency=local`), the event feed and a status are at most that much behind.
//!
//! A crash loses only held-back entries, which the log holds: openraft re-applies them from the
//! state's marker, as after any crash (see the parent module's durability argument).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::EntryPayload;
use tokio::sync::{Notify, watch};

use crate::{Entry, NodeId};

/// How long an entry may be held back before the flusher applies it.
pub const MAX_AGE: Duration = Duration::from_millis(50);
/// At most this many entries are held back: the next one applies them all.
pub const MAX_ENTRIES: usize = 256;
/// At most this many bytes of entries' payloads are held back.
pub const MAX_BYTES: usize = 1 << 20;

/// How often a flusher with nothing to do checks that its replica still exists.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The index of the last entry a replica's state holds (not what openraft believes applied), and the
/// way to ask for held-back entries now.
#[derive(Clone)]
pub struct AppliedIndex {
    shared: Arc<Shared>,
}

struct Shared {
    applied: watch::Sender<u64>,
    /// The highest index a reader waits for: an entry at or below it is not held back.
    wanted: AtomicU64,
    /// A reader waits for held-back entries.
    urgent: Notify,
    /// The first entry was held back: the flusher's clock starts.
    held: Notify,
}

impl AppliedIndex {
    pub(crate) fn new() -> AppliedIndex {
        AppliedIndex {
            shared: Arc::new(Shared {
                applied: watch::channel(0).0,
                wanted: AtomicU64::new(0),
                urgent: Notify::new(),
                held: Notify::new(),
            }),
        }
    }

    /// The index of the last entry the state holds (0: none).
    pub fn get(&self) -> u64 {
        *self.shared.applied.borrow()
    }

    /// Waits, at most `within`, until the state holds the entry at `index`; asks for held-back entries
    /// to be applied now. `Err` carries the index reached.
    pub async fn wait_for(&self, index: u64, within: Duration) -> Result<(), u64> {
        let mut applied = self.shared.applied.subscribe();
        if *applied.borrow_and_update() >= index {
            return Ok(());
        }
        self.shared.wanted.fetch_max(index, Ordering::SeqCst);
        self.shared.urgent.notify_one();
        match tokio::time::timeout(within, applied.wait_for(|at| *at >= index)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.get()),
        }
    }

    /// The state now holds everything up to `index` (never moves back).
    pub(crate) fn reached(&self, index: u64) {
        self.shared.applied.send_if_modified(|at| {
            let moved = index > *at;
            *at = (*at).max(index);
            moved
        });
    }

    /// The state holds exactly up to `index` (when the shard opens).
    pub(crate) fn reset(&self, index: u64) {
        self.shared.applied.send_replace(index);
    }

    fn wanted(&self) -> u64 {
        self.shared.wanted.load(Ordering::SeqCst)
    }
}

/// Committed entries of other leaders a replica holds back, oldest first.
#[derive(Default)]
pub(crate) struct Deferred {
    pub entries: Vec<Entry>,
    bytes: usize,
}

impl Deferred {
    /// Whether `entries` may be held back behind these on the replica of node `me` (`None`: a replica
    /// that never holds back): only normal entries other leaders proposed, nobody waiting for them, and
    /// within the bounds.
    pub fn may_hold(&self, entries: &[Entry], me: Option<NodeId>, applied: &AppliedIndex) -> bool {
        let Some(me) = me else {
            return false;
        };
        let Some(first) = self.entries.first().or(entries.first()) else {
            return false;
        };
        let bytes: usize = entries.iter().map(payload_bytes).sum();
        applied.wanted() < first.log_id.index
            && self.entries.len() + entries.len() <= MAX_ENTRIES
            && self.bytes + bytes <= MAX_BYTES
            && entries.iter().all(|entry| {
                entry.log_id.leader_id.node_id != me
                    && matches!(entry.payload, EntryPayload::Normal(_))
            })
    }

    /// Holds `entries` back; tells the flusher when they are the first.
    pub fn hold(&mut self, entries: Vec<Entry>, applied: &AppliedIndex) {
        if self.entries.is_empty() {
            applied.shared.held.notify_one();
        }
        self.append(entries);
    }

    /// Puts `entries` after those held back, to be applied with them now.
    pub fn append(&mut self, entries: Vec<Entry>) {
        self.bytes += entries.iter().map(payload_bytes).sum::<usize>();
        self.entries.extend(entries);
    }

    /// Takes every held-back entry.
    pub fn take(&mut self) -> Vec<Entry> {
        self.bytes = 0;
        std::mem::take(&mut self.entries)
    }

    /// Forgets the entries up to `index` (a snapshot that covers them was installed).
    pub fn forget_upto(&mut self, index: u64) {
        self.entries.retain(|entry| entry.log_id.index > index);
        self.bytes = self.entries.iter().map(payload_bytes).sum();
    }
}

fn payload_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        EntryPayload::Normal(payload) => payload.0.len(),
        _ => 0,
    }
}

/// Applies a replica's held-back entries at most [`MAX_AGE`] after the first was held back, or at once
/// when a reader waits for them; `flush` does it (false: the replica is gone). Stops with the replica.
pub(crate) async fn run_flusher<F, Fut>(applied: AppliedIndex, mut flush: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let shared = &applied.shared;
    loop {
        if tokio::time::timeout(IDLE_CHECK, shared.held.notified())
            .await
            .is_ok()
        {
            tokio::select! {
                () = shared.urgent.notified() => {}
                () = tokio::time::sleep(MAX_AGE) => {}
            }
        }
        if !flush().await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;

    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, RaftSnapshotBuilder};

    use super::*;
    use crate::state_machine::{Applying, Export, ReplicatedState, StateError, StateMachineStore};
    use crate::{LogId, Payload, batch};

    /// A state that keeps its commands in memory and counts its transactions.
    #[derive(Default)]
    struct Recorded {
        inner: Mutex<Written>,
    }

    #[derive(Default)]
    struct Written {
        commands: Vec<Vec<u8>>,
        marker: Option<Vec<u8>>,
        transactions: usize,
    }

    impl Recorded {
        fn commands(&self) -> Vec<Vec<u8>> {
            self.inner.lock().unwrap().commands.clone()
        }
        fn transactions(&self) -> usize {
            self.inner.lock().unwrap().transactions
        }
    }

    struct Nothing(Option<Vec<u8>>);

    impl Export for Nothing {
        fn marker(&self) -> Option<Vec<u8>> {
            self.0.clone()
        }
        fn write_to(&mut self, _out: &mut dyn Write) -> Result<(), StateError> {
            Ok(())
        }
    }

    impl ReplicatedState for Recorded {
        fn marker(&self) -> Result<Option<Vec<u8>>, StateError> {
            Ok(self.inner.lock().unwrap().marker.clone())
        }
        fn apply_batch(
            &self,
            items: &[Applying<'_>],
            marker: &[u8],
        ) -> Result<Vec<Vec<u8>>, StateError> {
            let mut written = self.inner.lock().unwrap();
            for item in items {
                written.commands.extend(item.command.map(<[u8]>::to_vec));
            }
            written.marker = Some(marker.to_vec());
            written.transactions += 1;
            Ok(items
                .iter()
                .map(|item| item.command.unwrap_or_default().to_vec())
                .collect())
        }
        fn export(&self) -> Result<Box<dyn Export>, StateError> {
            Ok(Box::new(Nothing(self.marker()?)))
        }
        fn import(&self, _body: &mut dyn Read, _marker: &[u8]) -> Result<(), StateError> {
            Ok(())
        }
    }

    const ME: NodeId = 1;
    const OTHER: NodeId = 2;

    fn entry(leader: NodeId, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, leader), index),
            payload: EntryPayload::Normal(Payload(batch::encode(&[index.to_le_bytes().to_vec()]))),
        }
    }

    fn replica() -> (
        Arc<Recorded>,
        StateMachineStore<Recorded>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(Recorded::default());
        let store = StateMachineStore::new(state.clone(), dir.path().join("snapshots"))
            .unwrap()
            .coalescing(ME);
        (state, store, dir)
    }

    fn indexes(state: &Recorded) -> Vec<u64> {
        state
            .commands()
            .iter()
            .map(|bytes| u64::from_le_bytes(bytes.as_slice().try_into().unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn other_leaders_entries_are_held_back_until_a_reader_asks_then_applied_in_one_transaction()
     {
        let (state, mut store, _dir) = replica();
        let applied = store.applied_index();
        for index in 1..=5 {
            let replies = store.apply([entry(OTHER, index)]).await.unwrap();
            assert_eq!(replies.len(), 1);
        }
        assert_eq!(state.transactions(), 0, "nothing applied yet");
        assert_eq!(applied.get(), 0);
        // Well within MAX_AGE: the reader's ask, not the flusher's clock, applies them.
        applied.wait_for(5, MAX_AGE / 5).await.unwrap();
        assert_eq!(
            state.transactions(),
            1,
            "one transaction for the five entries"
        );
        assert_eq!(indexes(&state), vec![1, 2, 3, 4, 5]);
        assert_eq!(applied.get(), 5);
        assert_eq!(store.applied_state().await.unwrap().0.unwrap().index, 5);
    }

    #[tokio::test]
    async fn an_entry_this_node_proposed_is_applied_at_once_after_the_held_back_ones_with_its_reply()
     {
        let (state, mut store, _dir) = replica();
        store.apply([entry(OTHER, 1)]).await.unwrap();
        store.apply([entry(OTHER, 2)]).await.unwrap();
        let replies = store.apply([entry(ME, 3)]).await.unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(
            batch::decode(&replies[0].0).unwrap(),
            vec![3u64.to_le_bytes().as_slice()],
            "the reply is the own entry's"
        );
        assert_eq!(state.transactions(), 1);
        assert_eq!(indexes(&state), vec![1, 2, 3]);
        assert_eq!(store.applied_index().get(), 3);
    }

    #[tokio::test]
    async fn a_blank_entry_of_another_leader_is_not_held_back() {
        let (state, mut store, _dir) = replica();
        store.apply([entry(OTHER, 1)]).await.unwrap();
        let blank = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, OTHER), 2),
            payload: EntryPayload::Blank,
        };
        store.apply([blank]).await.unwrap();
        assert_eq!(state.transactions(), 1);
        assert_eq!(store.applied_index().get(), 2);
    }

    #[tokio::test]
    async fn held_back_entries_are_applied_within_their_age_with_no_reader() {
        let (state, mut store, _dir) = replica();
        store.apply([entry(OTHER, 1)]).await.unwrap();
        store.apply([entry(OTHER, 2)]).await.unwrap();
        tokio::time::sleep(MAX_AGE * 4).await;
        assert_eq!(state.transactions(), 1);
        assert_eq!(indexes(&state), vec![1, 2]);
        assert_eq!(store.applied_index().get(), 2);
    }

    #[tokio::test]
    async fn no_more_than_max_entries_are_held_back() {
        let (state, mut store, _dir) = replica();
        for index in 1..=MAX_ENTRIES as u64 + 1 {
            store.apply([entry(OTHER, index)]).await.unwrap();
        }
        assert_eq!(state.transactions(), 1);
        assert_eq!(indexes(&state).len(), MAX_ENTRIES + 1);
    }

    #[tokio::test]
    async fn a_snapshot_holds_the_held_back_entries() {
        let (state, mut store, _dir) = replica();
        store.apply([entry(OTHER, 1)]).await.unwrap();
        store.apply([entry(OTHER, 2)]).await.unwrap();
        let snapshot = store
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snapshot.meta.last_log_id.unwrap().index, 2);
        assert_eq!(indexes(&state), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_replica_not_told_its_node_holds_nothing_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(Recorded::default());
        let mut store = StateMachineStore::new(state.clone(), dir.path().join("s")).unwrap();
        store.apply([entry(OTHER, 1)]).await.unwrap();
        assert_eq!(state.transactions(), 1);
    }
}
