//! The apply's write transaction, held open from one batch to the next with the `Applier` over it
//! ([`OpenTxn`]), whose tables stay open as long.
//!
//! A redb commit costs about as much as the commands of a small batch: it writes the new root of every
//! table the transaction touched into the table of tables, and the next transaction copies again every
//! page it touches. So a shard does not commit after each applied batch: it keeps the transaction open
//! and commits it once it holds [`HOLD_COMMANDS`] commands, at the first apply [`HOLD_FOR`] after it
//! began, when a durable commit is due, and before anything reads or writes the file otherwise
//! (`ShardStore::begin_read`, `marker`, `sync`, `import`: see [`super::ShardStore`]). A reader therefore
//! always sees every batch whose outcome was returned.
//!
//! Nothing is less safe for it. Every applied entry is durable in the Raft log first, and a commit was
//! already not durable (except one per `--durable-every`): a crash loses the held transaction as it lost
//! the non-durable commits, and the shard re-applies from the marker its file holds.
//!
//! Two things can end a held transaction early, and neither may leave in the file less than what was
//! answered:
//! - **a command panics** (a bug). The transaction then holds part of a batch. [`Held`] keeps its own
//!   copy of every batch it holds, so the next use of the transaction drops it and applies those
//!   batches again in a new one ([`Held::applying`]): apply is deterministic, so they come out as they
//!   were answered.
//! - **a write or commit fails** (a full disk, an I/O error). The batches are lost with the
//!   transaction, so the store refuses reads until an apply succeeds again (`ShardStore::behind`); the
//!   replication layer re-applies from the file's marker after a full disk.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use redb::WriteTransaction;

use super::StoreError;
use super::apply::Applier;
use crate::domain::Envelope;

self_cell::self_cell!(
    /// A write transaction and the `Applier` over it, kept together so that the tables a command opened
    /// stay open for the next batches: opening and closing a dozen tables at every batch was a fifth of
    /// the apply's CPU at one or two commands a batch (docs/BENCHMARKS.md, twenty-first session).
    pub(super) struct OpenTxn {
        owner: WriteTransaction,
        #[not_covariant]
        dependent: Applier,
    }
);

impl OpenTxn {
    /// `txn` with an `Applier` over it (its bookkeeping read from the file).
    pub(super) fn open(txn: WriteTransaction) -> Result<OpenTxn, StoreError> {
        OpenTxn::try_new(txn, |txn| Applier::open(txn))
    }

    /// The transaction, for its commit: the `Applier`'s tables are closed first.
    pub(super) fn into_txn(self) -> WriteTransaction {
        self.into_owner()
    }
}

/// A held transaction is committed once it holds this many commands. With [`HOLD_FOR`] at 100 ms, 32
/// instead of 16 (at 5 ms) cut the commits' share of one node's CPU at 16 clients from 7.3 % to 4.1 %;
/// 64 was no faster, and at 5 ms it made 256 clients slower (docs/BENCHMARKS.md, seventeenth and
/// eighteenth sessions); with the tables held open too, 64 was slower at 64 and 256 clients
/// (twenty-first session).
pub const HOLD_COMMANDS: usize = 32;

/// A held transaction is committed by the first apply at least this long after it began. Long enough
/// that the command bound decides on a busy shard: at 5 ms, a shard of one node at 16 clients committed
/// every 3 or 4 commands. It costs no durability: a crash loses what was applied since the last durable
/// commit (`--durable-every`) whether it was held or committed, and the log re-applies it.
pub const HOLD_FOR: Duration = Duration::from_millis(100);

/// An open write transaction of applied batches, and what it needs to be built again.
pub(super) struct Held {
    pub(super) open: OpenTxn,
    began: Instant,
    batches: Vec<HeldBatch>,
    /// A batch is being applied into `open`. Still set at the next use of `open`: that batch panicked
    /// half-way, and the transaction holds part of it.
    pub(super) applying: bool,
}

/// One applied batch, as `ShardStore::apply_entries_except` was given it.
pub(super) struct HeldBatch {
    pub(super) entries: Vec<(u64, Option<Envelope>)>,
    pub(super) marker: Vec<u8>,
    pub(super) skip: BTreeSet<usize>,
}

impl HeldBatch {
    /// The batch's entries as the apply takes them.
    pub(super) fn borrowed(&self) -> Vec<(u64, Option<&Envelope>)> {
        self.entries
            .iter()
            .map(|(index, envelope)| (*index, envelope.as_ref()))
            .collect()
    }
}

impl Held {
    pub(super) fn new(open: OpenTxn) -> Held {
        Held {
            open,
            began: Instant::now(),
            batches: Vec::new(),
            applying: false,
        }
    }

    /// Whether the transaction holds any applied batch.
    pub(super) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Records a batch that was applied in full into the transaction and stays held there.
    pub(super) fn applied(
        &mut self,
        entries: &[(u64, Option<&Envelope>)],
        marker: &[u8],
        skip: &BTreeSet<usize>,
    ) {
        self.batches.push(HeldBatch {
            entries: entries
                .iter()
                .map(|(index, envelope)| (*index, envelope.cloned()))
                .collect(),
            marker: marker.to_vec(),
            skip: skip.clone(),
        });
    }

    /// Whether the transaction is to be committed now that `more` commands were applied into it.
    pub(super) fn due_with(&self, more: usize) -> bool {
        let held: usize = self.batches.iter().map(|batch| batch.entries.len()).sum();
        held.saturating_add(more) >= HOLD_COMMANDS || self.began.elapsed() >= HOLD_FOR
    }

    /// The batches the transaction holds, to apply again in a new one; the torn transaction is dropped
    /// (redb rolls it back).
    pub(super) fn into_batches(self) -> (Vec<HeldBatch>, Instant) {
        (self.batches, self.began)
    }

    /// A new transaction holding `batches` (applied again into `open`), as old as the one it replaces.
    pub(super) fn rebuilt(open: OpenTxn, batches: Vec<HeldBatch>, began: Instant) -> Held {
        Held {
            open,
            began,
            batches,
            applying: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeSet;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::time::Instant;

    use super::{HOLD_COMMANDS, HOLD_FOR};
    use crate::domain::{Envelope, ItemKind, Reply};
    use crate::state::apply::PANICS_AFTER_WRITING;
    use crate::state::{ShardStore, audit, query, test_commands, test_envelope};

    fn create(n: u8, user_id: &str) -> Envelope {
        test_envelope(n, test_commands::create_user(user_id))
    }

    fn store() -> (tempfile::TempDir, ShardStore) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        (dir, store)
    }

    fn user_exists(store: &ShardStore, user_id: &str) -> bool {
        let txn = store.begin_read().expect("reads");
        query::user(&txn, user_id).expect("queries").is_some()
    }

    /// A batch is answered before its transaction commits; whatever reads the file next finds it, and
    /// the marker with it.
    #[test]
    fn a_read_finds_every_applied_batch_though_its_transaction_is_held() {
        let (_dir, store) = store();
        let (a, b) = (create(1, "a"), create(2, "b"));
        store
            .apply_entries(&[(1, Some(&a))], b"m1")
            .expect("applies");
        assert!(user_exists(&store, "a"));
        store
            .apply_entries(&[(2, Some(&b))], b"m2")
            .expect("applies");
        assert_eq!(store.marker().expect("reads").as_deref(), Some(&b"m2"[..]));
        assert!(user_exists(&store, "b"));
        store.sync().expect("syncs");
        let meta = query::meta(&store.begin_read().expect("reads")).expect("queries");
        assert_eq!(meta.last_applied, 2);
    }

    /// A batch that panics half-way (a bug) leaves its transaction holding part of it. The retry without
    /// the culprit, as the replica runs it, finds the batches held before it and none of the torn one's
    /// writes: its first command is applied once, as new.
    #[test]
    fn a_batch_that_panics_half_way_keeps_the_held_batches_before_it_and_none_of_its_own_writes() {
        let (_dir, store) = store();
        let kept = create(1, "kept");
        store
            .apply_entries(&[(1, Some(&kept))], b"m1")
            .expect("applies");
        let (torn, culprit) = (create(2, "torn"), create(3, PANICS_AFTER_WRITING));
        let batch = [(2, Some(&torn)), (3, Some(&culprit))];
        let progress = Cell::new(0);
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            store.apply_entries_except(&batch, b"m2", &BTreeSet::new(), &progress)
        }));
        assert!(panicked.is_err(), "the culprit did not panic");
        assert_eq!(progress.get(), 1);

        let skip = BTreeSet::from([1]);
        let applied = store
            .apply_entries_except(&batch, b"m2", &skip, &Cell::new(0))
            .expect("applies without the culprit");
        let Some(Ok(Reply::UserCreated(_))) = applied[0].as_ref().map(|a| &a.outcome) else {
            panic!("the torn batch's first command was not applied as new: {applied:?}");
        };
        assert!(
            user_exists(&store, "kept"),
            "the held batch before the panic was lost"
        );
        assert!(user_exists(&store, "torn"));
        assert!(!user_exists(&store, PANICS_AFTER_WRITING));
    }

    /// The transaction is held below `HOLD_COMMANDS` commands and committed once it holds them.
    #[test]
    fn a_held_transaction_is_committed_once_it_holds_its_bound_of_commands() {
        let (_dir, store) = store();
        let users: Vec<Envelope> = (0..HOLD_COMMANDS)
            .map(|n| create(u8::try_from(n).expect("small"), &format!("u{n}")))
            .collect();
        for (index, user) in (1u64..).zip(&users) {
            assert!(
                index == 1 || store.lock_held().is_some(),
                "committed after {} commands (within {:?})",
                index - 1,
                super::HOLD_FOR
            );
            store
                .apply_entries(&[(index, Some(user))], b"m")
                .expect("applies");
        }
        assert!(
            store.lock_held().is_none(),
            "still held after {HOLD_COMMANDS} commands"
        );
    }

    /// A transaction that holds fewer commands than its bound is committed by the first apply
    /// `HOLD_FOR` after it began, and not before.
    #[test]
    fn a_held_transaction_is_committed_by_the_first_apply_once_it_is_old_enough() {
        let (_dir, store) = store();
        let users: Vec<Envelope> = (0..3).map(|n| create(n, &format!("u{n}"))).collect();
        let began = Instant::now();
        store
            .apply_entries(&[(1, Some(&users[0]))], b"m")
            .expect("applies");
        store
            .apply_entries(&[(2, Some(&users[1]))], b"m")
            .expect("applies");
        // "Not before" can only be checked where two commands took less than `HOLD_FOR` to apply.
        if began.elapsed() < HOLD_FOR {
            assert!(store.lock_held().is_some(), "committed before {HOLD_FOR:?}");
        }
        std::thread::sleep(HOLD_FOR);
        store
            .apply_entries(&[(3, Some(&users[2]))], b"m")
            .expect("applies");
        assert!(
            store.lock_held().is_none(),
            "still held {HOLD_FOR:?} after it began"
        );
    }

    /// An item, two users with credit, orders completed at once and one left pending: commands that
    /// move the shard's bookkeeping (the clock, the outbox's log, the applied position) and a dozen tables.
    fn shop_entries() -> Vec<(u64, Envelope)> {
        let mut commands = vec![test_commands::put_item("gems", ItemKind::Currency)];
        for user_id in ["ana", "bo"] {
            commands.push(test_commands::create_user(user_id));
            commands.push(test_commands::credit(user_id));
            for complete in [true, true, false] {
                commands.push(test_commands::order(user_id, "gems", 3, complete));
            }
        }
        (1u64..)
            .zip(commands)
            .map(|(index, command)| {
                let n = u8::try_from(index).expect("a few commands");
                (index, test_envelope(n, command))
            })
            .collect()
    }

    /// The shard's state hash and its audit's violations, from what its file holds.
    fn state_of(store: &ShardStore) -> (String, Vec<String>) {
        let txn = store.begin_read().expect("reads");
        let hash = audit::state_hash(&txn).expect("hashes");
        (hash, audit::audit(&txn, 0).expect("audits").violations)
    }

    /// A held transaction keeps its `Applier` (and what it read of the shard's bookkeeping) from batch to
    /// batch. Applied one command a batch in one held transaction, the commands leave the same file as
    /// applied all in one batch, and as applied one a batch with a commit (a fresh `Applier`) after each.
    #[test]
    fn batches_applied_into_one_held_transaction_leave_the_state_one_batch_of_them_leaves() {
        let entries = shop_entries();
        let borrowed: Vec<(u64, Option<&Envelope>)> = entries
            .iter()
            .map(|(index, envelope)| (*index, Some(envelope)))
            .collect();
        assert!(borrowed.len() < HOLD_COMMANDS, "every batch stays held");

        let (_one_dir, one_batch) = store();
        for applied in one_batch.apply_entries(&borrowed, b"m").expect("applies") {
            assert!(applied.is_some_and(|a| a.outcome.is_ok()));
        }
        let (_held_dir, held) = store();
        for entry in &borrowed {
            held.apply_entries(std::slice::from_ref(entry), b"m")
                .expect("applies");
        }
        assert!(held.lock_held().is_some(), "the batches were held together");
        let (_fresh_dir, fresh) = store();
        for entry in &borrowed {
            fresh
                .apply_entries(std::slice::from_ref(entry), b"m")
                .expect("applies");
            fresh.sync().expect("commits");
        }

        let expected = state_of(&one_batch);
        assert!(
            expected.1.is_empty(),
            "the audit of one batch: {:?}",
            expected.1
        );
        assert_eq!(state_of(&held), expected, "held one command a batch");
        assert_eq!(state_of(&fresh), expected, "committed after every batch");
    }
}
