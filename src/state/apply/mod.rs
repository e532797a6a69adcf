//! `apply`: one command, deterministically, inside the batch's redb write transaction.
//!
//! Rules every command here follows:
//! - **No clock, no randomness, no I/O** but the transaction: time and ids come from the envelope.
//! - **Decide, then write.** A command first reads and validates everything; only when it cannot be
//!   rejected any more does it write. A rejected command therefore leaves no trace but its stored outcome.
//!   The one exception is `begin_user`, which first cancels the user's pending orders whose deadline has
//!   passed: that is the sweeper's work done early, the same whatever the command then decides.
//! - **Money moves only through `post`**, which writes the double-entry posting, extends the hash chain and
//!   updates the wallet cache and the system accounts together.
//! - **Peers are not trusted.** A command in the log may come from a buggy or hostile node, so every amount
//!   is checked (positive, in range) and every sum is computed exactly and narrowed with a check
//!   (`Accounts::after`). A command that would break an invariant is rejected before it writes, the same
//!   on every replica: never a panic, never wrapped arithmetic.
//!
//! This file owns the `Applier` (every table of the shard, opened once per batch) and the path of one
//! envelope: the idempotency check, the shard's applied time, `execute`'s one-line hand-off to the file
//! of the command, and the stored outcome. The commands live by subject: `users`, `idempotency` (global
//! keys), `credits` (credits and top-ups), `catalog`, `orders`, `refunds`, `entitlements`, `sweep`,
//! `ledger` (`post` and the checks of every posting), `events` (the outbox every change writes to, and its
//! purge), `webhooks` (their rows and delivery positions), `freeze`, `reversals` (money going back out,
//! and `--on-reversal revoke`), `disputes`, `debt` (what a reversal could not take, and its repayment)
//! and `limits` (shop-wide and per-user limits, the usage they count, and the checks of orders,
//! completions, refunds and top-ups).

mod catalog;
mod credits;
mod debt;
mod disputes;
mod entitlements;
mod events;
mod freeze;
mod idempotency;
mod lazy;
mod ledger;
mod limits;
mod orders;
mod refunds;
mod reversals;
mod sweep;
mod users;
#[cfg(test)]
pub(crate) use users::PANICS_AFTER_WRITING;
mod webhooks;

use redb::{Table, WriteTransaction};

use lazy::LazyTable;

use super::tables::{self, encode, get};
use super::user_rows::{self, UserKey};
use super::{IdempotencyState, MetaState, StoreError};
use crate::domain::{
    Command, Envelope, EventLog, IdSequence, Outcome, Rejection, Reply, Timestamp,
};

pub(crate) use ledger::decode_posting;

type Bytes = &'static [u8];

/// What applying one envelope gave: its outcome, and whether that outcome was replayed from an earlier
/// command with the same idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub outcome: Outcome,
    pub replayed: bool,
}

/// Why a command stopped early: a business rejection (an outcome) or a storage failure (aborts the batch).
#[derive(Debug)]
enum Stop {
    Reject(Rejection),
    Store(StoreError),
}

impl From<Rejection> for Stop {
    fn from(r: Rejection) -> Self {
        Stop::Reject(r)
    }
}

impl<E: Into<StoreError>> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Store(e.into())
    }
}

type Step<T> = Result<T, Stop>;

/// The per-command context: the command's time, its ids, and how many events it emitted.
struct CommandContext {
    now: Timestamp,
    ids: IdSequence,
    events: u32,
}

/// Every table of the shard: `META` opened with the batch, the others the first time a command of the
/// batch touches them (`lazy.rs`).
pub(crate) struct Applier<'t> {
    meta_table: Table<'t, &'static str, Bytes>,
    user_rows: LazyTable<'t, UserKey, Bytes>,
    items: LazyTable<'t, &'static str, Bytes>,
    orders: LazyTable<'t, u128, Bytes>,
    pending_orders: LazyTable<'t, (i64, u128), &'static str>,
    user_pending: LazyTable<'t, (&'static str, u128), (i64, i64)>,
    postings: LazyTable<'t, u64, Bytes>,
    credits: LazyTable<'t, &'static str, Bytes>,
    external_refs: LazyTable<'t, &'static str, Bytes>,
    topups: LazyTable<'t, u128, Bytes>,
    pending_topups: LazyTable<'t, (i64, u128), ()>,
    user_pending_topups: LazyTable<'t, (&'static str, u128), i64>,
    final_topups: LazyTable<'t, (i64, u128), ()>,
    refunds: LazyTable<'t, u128, Bytes>,
    idempotency: LazyTable<'t, (&'static str, &'static str), Bytes>,
    idempotency_expiry: LazyTable<'t, (i64, &'static str, &'static str), ()>,
    events: LazyTable<'t, u64, Bytes>,
    webhooks: LazyTable<'t, &'static str, Bytes>,
    frozen: LazyTable<'t, &'static str, Bytes>,
    debts: LazyTable<'t, &'static str, i64>,
    reversals: LazyTable<'t, u128, Bytes>,
    source_reversals: LazyTable<'t, (u128, u128), ()>,
    disputes: LazyTable<'t, (&'static str, &'static str), Bytes>,
    credit_ids: LazyTable<'t, u128, &'static str>,
    shop_limits: LazyTable<'t, &'static str, Bytes>,
    user_limits: LazyTable<'t, &'static str, Bytes>,
    usage: LazyTable<'t, (&'static str, u8, i64), i64>,
    meta: MetaState,
    /// The `receivable` account's balance (a `META` row of its own: `MetaState` never changes shape),
    /// written back by `finish` when a command changed it.
    receivable: i64,
    receivable_changed: bool,
    /// The outbox's bookkeeping, written back by `finish` when a command changed it.
    event_log: EventLog,
    event_log_changed: bool,
    /// The shard's applied time: the latest time any command ran at (see `applied_time`).
    clock: Timestamp,
    /// Whether the shard purges idempotency outcomes by walking them (`PurgeIdempotency` ran once), so
    /// that new records get no row in the retention index.
    idempotency_walk: bool,
}

impl<'t> Applier<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> Result<Applier<'t>, StoreError> {
        let meta_table = txn.open_table(tables::META)?;
        let meta = get(&meta_table, tables::META_STATE_KEY)?.unwrap_or_default();
        let clock = get(&meta_table, tables::CLOCK_KEY)?.unwrap_or(Timestamp(i64::MIN));
        let event_log = get(&meta_table, tables::EVENT_LOG_KEY)?.unwrap_or_default();
        let receivable = get(&meta_table, tables::RECEIVABLE_KEY)?.unwrap_or(0i64);
        let idempotency_walk = get(&meta_table, tables::IDEMPOTENCY_WALK_KEY)?.unwrap_or(false);
        Ok(Applier {
            meta_table,
            user_rows: LazyTable::new(txn, user_rows::USER_ROWS),
            items: LazyTable::new(txn, tables::ITEMS),
            orders: LazyTable::new(txn, tables::ORDERS),
            pending_orders: LazyTable::new(txn, tables::PENDING_ORDERS),
            user_pending: LazyTable::new(txn, tables::USER_PENDING),
            postings: LazyTable::new(txn, tables::POSTINGS),
            credits: LazyTable::new(txn, tables::CREDITS),
            external_refs: LazyTable::new(txn, tables::EXTERNAL_REFS),
            topups: LazyTable::new(txn, tables::TOPUPS),
            pending_topups: LazyTable::new(txn, tables::PENDING_TOPUPS),
            user_pending_topups: LazyTable::new(txn, tables::USER_PENDING_TOPUPS),
            final_topups: LazyTable::new(txn, tables::FINAL_TOPUPS),
            refunds: LazyTable::new(txn, tables::REFUNDS),
            idempotency: LazyTable::new(txn, tables::IDEMPOTENCY),
            idempotency_expiry: LazyTable::new(txn, tables::IDEMPOTENCY_EXPIRY),
            events: LazyTable::new(txn, tables::EVENTS),
            webhooks: LazyTable::new(txn, tables::WEBHOOKS),
            frozen: LazyTable::new(txn, tables::FROZEN),
            debts: LazyTable::new(txn, tables::DEBTS),
            reversals: LazyTable::new(txn, tables::REVERSALS),
            source_reversals: LazyTable::new(txn, tables::SOURCE_REVERSALS),
            disputes: LazyTable::new(txn, tables::DISPUTES),
            credit_ids: LazyTable::new(txn, tables::CREDIT_IDS),
            shop_limits: LazyTable::new(txn, tables::SHOP_LIMITS),
            user_limits: LazyTable::new(txn, tables::USER_LIMITS),
            usage: LazyTable::new(txn, tables::USAGE),
            meta,
            receivable,
            receivable_changed: false,
            event_log,
            event_log_changed: false,
            clock,
            idempotency_walk,
        })
    }

    /// Opens every table, creating those a file does not hold yet (a new file, or one written by a version
    /// before the table existed), so that readers find them all. Called when a shard's file is opened.
    pub(crate) fn create_every_table(&self) -> Result<(), StoreError> {
        // Exhaustive: a table added to the `Applier` must be named here too.
        let Applier {
            meta_table: _,
            user_rows,
            items,
            orders,
            pending_orders,
            user_pending,
            postings,
            credits,
            external_refs,
            topups,
            pending_topups,
            user_pending_topups,
            final_topups,
            refunds,
            idempotency,
            idempotency_expiry,
            events,
            webhooks,
            frozen,
            debts,
            reversals,
            source_reversals,
            disputes,
            credit_ids,
            shop_limits,
            user_limits,
            usage,
            meta: _,
            receivable: _,
            receivable_changed: _,
            event_log: _,
            event_log_changed: _,
            clock: _,
            idempotency_walk: _,
        } = self;
        for opened in [
            user_rows.read().map(drop),
            items.read().map(drop),
            orders.read().map(drop),
            pending_orders.read().map(drop),
            user_pending.read().map(drop),
            postings.read().map(drop),
            credits.read().map(drop),
            external_refs.read().map(drop),
            topups.read().map(drop),
            pending_topups.read().map(drop),
            user_pending_topups.read().map(drop),
            final_topups.read().map(drop),
            refunds.read().map(drop),
            idempotency.read().map(drop),
            idempotency_expiry.read().map(drop),
            events.read().map(drop),
            webhooks.read().map(drop),
            frozen.read().map(drop),
            debts.read().map(drop),
            reversals.read().map(drop),
            source_reversals.read().map(drop),
            disputes.read().map(drop),
            credit_ids.read().map(drop),
            shop_limits.read().map(drop),
            user_limits.read().map(drop),
            usage.read().map(drop),
        ] {
            opened?;
        }
        Ok(())
    }

    pub(crate) fn meta_mut(&mut self) -> &mut MetaState {
        &mut self.meta
    }

    /// Records that the entry at `index` (which carries no command) is applied.
    pub(crate) fn advance(&mut self, index: u64) {
        debug_assert!(
            index >= self.meta.last_applied,
            "log positions never go back (the commands of one entry share its index)"
        );
        self.meta.last_applied = index;
    }

    /// Stores the replication layer's marker (where this state is in the log) with the batch.
    pub(crate) fn set_marker(&mut self, marker: &[u8]) -> Result<(), StoreError> {
        self.meta_table.insert(tables::MARKER_KEY, marker)?;
        Ok(())
    }

    /// Writes the shard's bookkeeping; call after a batch's last command (the `Applier` may go on with
    /// the next batch in the same transaction).
    pub(crate) fn finish(&mut self) -> Result<(), StoreError> {
        let bytes = encode(&self.meta)?;
        self.meta_table
            .insert(tables::META_STATE_KEY, bytes.as_slice())?;
        if self.clock != Timestamp(i64::MIN) {
            let clock = encode(&self.clock)?;
            self.meta_table
                .insert(tables::CLOCK_KEY, clock.as_slice())?;
        }
        if self.receivable_changed {
            let receivable = encode(&self.receivable)?;
            self.meta_table
                .insert(tables::RECEIVABLE_KEY, receivable.as_slice())?;
            self.receivable_changed = false;
        }
        if self.event_log_changed {
            let log = encode(&self.event_log)?;
            self.meta_table
                .insert(tables::EVENT_LOG_KEY, log.as_slice())?;
            self.event_log_changed = false;
        }
        Ok(())
    }

    /// Applies one envelope at log position `index`.
    pub(crate) fn apply_envelope(
        &mut self,
        index: u64,
        envelope: &Envelope,
    ) -> Result<Applied, StoreError> {
        debug_assert!(
            index >= self.meta.last_applied,
            "log positions never go back (the commands of one entry share its index)"
        );
        self.meta.last_applied = index;
        if let Some(tag) = &envelope.idempotency {
            if let Some(record) = self.idempotency_record(&tag.scope, &tag.key)? {
                if record.fingerprint != tag.fingerprint {
                    return Ok(Applied {
                        outcome: Err(Rejection::IdempotencyKeyReused),
                        replayed: false,
                    });
                }
                if let IdempotencyState::Done(outcome) = record.state {
                    return Ok(Applied {
                        outcome,
                        replayed: true,
                    });
                }
            }
        }
        let now = self.applied_time(envelope.now);
        let mut context = CommandContext {
            now,
            ids: IdSequence::new(envelope.seed),
            events: 0,
        };
        let outcome = match self.execute(&mut context, &envelope.command) {
            Ok(reply) => Ok(reply),
            Err(Stop::Reject(rejection)) => Err(rejection),
            Err(Stop::Store(e)) => return Err(e),
        };
        if let Some(tag) = &envelope.idempotency {
            let stored = match &outcome {
                Ok(_) => true,
                Err(rejection) => rejection.is_stored(),
            };
            if stored {
                self.store_idempotency(tag, now, IdempotencyState::Done(outcome.clone()))?;
            }
        }
        Ok(Applied {
            outcome,
            replayed: false,
        })
    }

    /// The time a command runs at: the time its proposer stamped, but never earlier than a command this
    /// shard already ran (proposers' clocks differ a little, and one may step back): the shard's time
    /// never goes backwards, so nothing that has expired can come back, and no deadline is judged by an
    /// earlier clock than one already used. Deterministic: the previous time is state.
    fn applied_time(&mut self, proposed: Timestamp) -> Timestamp {
        self.clock = self.clock.max(proposed);
        self.clock
    }

    fn execute(&mut self, context: &mut CommandContext, command: &Command) -> Step<Reply> {
        match command {
            Command::CreateUser(c) => self.create_user(context, c),
            Command::IssueToken(c) => self.issue_token(c),
            Command::ClaimGlobalKey(c) => self.claim_global_key(context, c),
            Command::SettleGlobalKey(c) => self.settle_global_key(c),
            Command::ClaimExternalRef(c) => self.claim_external_ref(c),
            Command::Credit(c) => self.credit(context, c),
            Command::CreateTopup(c) => self.create_topup(context, c),
            Command::CreateTopupCapped(c) => self.create_topup_capped(context, c),
            Command::PspPayment(c) => self.psp_payment(context, c),
            Command::PutItem(c) => self.put_item(context, c),
            Command::CreateOrder(c) => self.create_order(context, c),
            Command::CompleteOrder(c) => self.complete_order(context, c),
            Command::CancelOrder(c) => self.cancel_order(context, c),
            Command::Refund(c) => self.refund(context, c),
            Command::Consume(c) => self.consume(context, c),
            Command::Sweep(c) => self.sweep(context, c),
            Command::SweepAndPurge(c) => self.sweep_and_purge(context, c),
            Command::PutWebhook(c) => self.put_webhook(context, c),
            Command::DeleteWebhook(c) => self.delete_webhook(context, c),
            Command::AckWebhook(c) => self.ack_webhook(c),
            Command::WebhookFailed(c) => self.webhook_failed(context, c),
            Command::ReplayWebhook(c) => self.replay_webhook(c),
            Command::PurgeEvents(c) => self.purge_events(context, c),
            Command::FreezeUser(c) => self.freeze_user(context, c),
            Command::UnfreezeUser(c) => self.unfreeze_user(context, c),
            Command::AckWebhookFrom(c) => self.ack_webhook_from(c),
            Command::Reverse(c) => self.reverse(context, c),
            Command::OpenDispute(c) => self.open_dispute(context, c),
            Command::CloseDispute(c) => self.close_dispute(context, c),
            Command::PutShopLimits(c) => self.put_shop_limits(context, c),
            Command::PutUserLimits(c) => self.put_user_limits(c),
            Command::PurgeIdempotency(c) => self.purge_idempotency(context, c),
        }
    }
}
