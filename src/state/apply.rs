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

use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::tables::{self, decode, encode, get};
use super::{IdempotencyRecord, IdempotencyState, MetaState, StoreError};
use crate::domain::command::{self, GLOBAL_SCOPE, IdempotencyTag};
use crate::domain::model::{MAX_CATALOG_ITEMS, MAX_LINES, MAX_REFUNDS_PER_ORDER};
use crate::domain::money::MAX_WALLET_BALANCE;
use crate::domain::{
    Command, Credit, Entitlement, Envelope, GlobalClaim, HistoryEntry, IdSequence, Item,
    LineRequest, Money, Order, OrderLine, OrderStatus, Outcome, Posting, PostingKind, PostingRef,
    RefClaim, Refund, RefundLine, Rejection, Reply, Timestamp, Topup, TopupStatus, User,
};

type Bytes = &'static [u8];

/// What applying one envelope gave: its outcome, and whether that outcome was replayed from an earlier
/// command with the same idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub outcome: Outcome,
    pub replayed: bool,
}

/// Why a command stopped early: a business rejection (an outcome) or a storage failure (aborts the batch).
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

/// The per-command context: the command's time and its ids.
struct Cx {
    now: Timestamp,
    ids: IdSequence,
}

/// Every table of the shard, opened once per batch.
pub(crate) struct Applier<'t> {
    meta_table: Table<'t, &'static str, Bytes>,
    users: Table<'t, &'static str, Bytes>,
    items: Table<'t, &'static str, Bytes>,
    orders: Table<'t, u128, Bytes>,
    user_orders: Table<'t, (&'static str, i64, u128), ()>,
    pending_orders: Table<'t, (i64, u128), &'static str>,
    user_pending: Table<'t, (&'static str, u128), (i64, i64)>,
    postings: Table<'t, u64, Bytes>,
    user_postings: Table<'t, (&'static str, u64), u64>,
    entitlements: Table<'t, (&'static str, &'static str), Bytes>,
    credits: Table<'t, &'static str, Bytes>,
    external_refs: Table<'t, &'static str, Bytes>,
    topups: Table<'t, u128, Bytes>,
    pending_topups: Table<'t, (i64, u128), ()>,
    user_pending_topups: Table<'t, (&'static str, u128), i64>,
    final_topups: Table<'t, (i64, u128), ()>,
    refunds: Table<'t, u128, Bytes>,
    idempotency: Table<'t, (&'static str, &'static str), Bytes>,
    idempotency_expiry: Table<'t, (i64, &'static str, &'static str), ()>,
    meta: MetaState,
    /// The shard's applied time: the latest time any command ran at (see `applied_time`).
    clock: Timestamp,
}

impl<'t> Applier<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> Result<Applier<'t>, StoreError> {
        let meta_table = txn.open_table(tables::META)?;
        let meta = get(&meta_table, tables::META_STATE_KEY)?.unwrap_or_default();
        let clock = get(&meta_table, tables::CLOCK_KEY)?.unwrap_or(Timestamp(i64::MIN));
        Ok(Applier {
            meta_table,
            users: txn.open_table(tables::USERS)?,
            items: txn.open_table(tables::ITEMS)?,
            orders: txn.open_table(tables::ORDERS)?,
            user_orders: txn.open_table(tables::USER_ORDERS)?,
            pending_orders: txn.open_table(tables::PENDING_ORDERS)?,
            user_pending: txn.open_table(tables::USER_PENDING)?,
            postings: txn.open_table(tables::POSTINGS)?,
            user_postings: txn.open_table(tables::USER_POSTINGS)?,
            entitlements: txn.open_table(tables::ENTITLEMENTS)?,
            credits: txn.open_table(tables::CREDITS)?,
            external_refs: txn.open_table(tables::EXTERNAL_REFS)?,
            topups: txn.open_table(tables::TOPUPS)?,
            pending_topups: txn.open_table(tables::PENDING_TOPUPS)?,
            user_pending_topups: txn.open_table(tables::USER_PENDING_TOPUPS)?,
            final_topups: txn.open_table(tables::FINAL_TOPUPS)?,
            refunds: txn.open_table(tables::REFUNDS)?,
            idempotency: txn.open_table(tables::IDEMPOTENCY)?,
            idempotency_expiry: txn.open_table(tables::IDEMPOTENCY_EXPIRY)?,
            meta,
            clock,
        })
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

    /// Writes the shard's bookkeeping; call once, after the batch's last command.
    pub(crate) fn finish(mut self) -> Result<(), StoreError> {
        let bytes = encode(&self.meta)?;
        self.meta_table
            .insert(tables::META_STATE_KEY, bytes.as_slice())?;
        if self.clock != Timestamp(i64::MIN) {
            let clock = encode(&self.clock)?;
            self.meta_table
                .insert(tables::CLOCK_KEY, clock.as_slice())?;
        }
        Ok(())
    }

    /// Applies one envelope at log position `index`.
    pub(crate) fn apply(&mut self, index: u64, envelope: &Envelope) -> Result<Applied, StoreError> {
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
        let mut cx = Cx {
            now,
            ids: IdSequence::new(envelope.seed),
        };
        let outcome = match self.execute(&mut cx, &envelope.command) {
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

    fn execute(&mut self, cx: &mut Cx, command: &Command) -> Step<Reply> {
        match command {
            Command::CreateUser(c) => self.create_user(cx, c),
            Command::IssueToken(c) => self.issue_token(c),
            Command::ClaimGlobalKey(c) => self.claim_global_key(cx, c),
            Command::SettleGlobalKey(c) => self.settle_global_key(c),
            Command::ClaimExternalRef(c) => self.claim_external_ref(c),
            Command::Credit(c) => self.credit(cx, c),
            Command::CreateTopup(c) => self.create_topup(cx, c),
            Command::CreateTopupCapped(c) => self.create_topup_capped(cx, c),
            Command::PspPayment(c) => self.psp_payment(cx, c),
            Command::PutItem(c) => self.put_item(cx, c),
            Command::CreateOrder(c) => self.create_order(cx, c),
            Command::CompleteOrder(c) => self.complete_order(cx, c),
            Command::CancelOrder(c) => self.cancel_order(cx, c),
            Command::Refund(c) => self.refund(cx, c),
            Command::Consume(c) => self.consume(cx, c),
            Command::Sweep(c) => self.sweep(cx, c),
            Command::SweepAndPurge(c) => self.sweep_and_purge(cx, c),
        }
    }

    // ----- users -------------------------------------------------------------------------------------

    fn create_user(&mut self, cx: &mut Cx, command: &command::CreateUser) -> Step<Reply> {
        if self.users.get(command.user_id.as_str())?.is_some() {
            return Err(Rejection::UserExists.into());
        }
        let user = User {
            user_id: command.user_id.clone(),
            display_name: command.display_name.clone(),
            created_at: cx.now,
            balance: Money::ZERO,
            held: Money::ZERO,
            ledger_seq: 0,
        };
        self.save_user(&user)?;
        Ok(Reply::UserCreated(user))
    }

    fn issue_token(&self, command: &command::IssueToken) -> Step<Reply> {
        self.existing_user(&command.user_id)?;
        Ok(Reply::TokenIssued {
            user_id: command.user_id.clone(),
            expires_at: command.expires_at,
        })
    }

    fn existing_user(&self, user_id: &str) -> Step<User> {
        get(&self.users, user_id)?.ok_or(Stop::Reject(Rejection::UserNotFound))
    }

    /// Loads a user for a command at `cx.now`, first cancelling the user's pending orders whose deadline has
    /// passed, so that the wallet the command sees (and answers with) holds exactly what is still pending.
    fn begin_user(&mut self, cx: &mut Cx, user_id: &str) -> Step<User> {
        let mut user = self.existing_user(user_id)?;
        let due: Vec<(u128, i64)> = self
            .user_pending
            .range((user_id, 0u128)..=(user_id, u128::MAX))?
            .filter_map(|entry| match entry {
                Ok((key, value)) => {
                    let (expires_at, total) = value.value();
                    (expires_at <= cx.now.micros()).then(|| Ok((key.value().1, total)))
                }
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        if !due.is_empty() {
            let releases: Vec<(PostingKind, Money)> = due
                .iter()
                .map(|&(_, total)| (PostingKind::Release, Money(total)))
                .collect();
            self.check_postings(&user, &releases)?;
            for (order_id, _) in due {
                self.expire_order(cx, &mut user, order_id)?;
            }
            self.save_user(&user)?;
        }
        Ok(user)
    }

    fn save_user(&mut self, user: &User) -> Step<()> {
        debug_assert!(!user.held.is_negative(), "held is never negative");
        debug_assert!(user.held <= user.balance, "held never exceeds the balance");
        let bytes = encode(user)?;
        self.users.insert(user.user_id.as_str(), bytes.as_slice())?;
        #[cfg(debug_assertions)]
        self.debug_check_holds(user)?;
        Ok(())
    }

    /// Debug builds: the wallet's `held` equals the sum of its pending orders.
    #[cfg(debug_assertions)]
    fn debug_check_holds(&self, user: &User) -> Step<()> {
        let mut pending_total = 0i128;
        for entry in self
            .user_pending
            .range((user.user_id.as_str(), 0u128)..=(user.user_id.as_str(), u128::MAX))?
        {
            pending_total += i128::from(entry?.1.value().1);
        }
        debug_assert_eq!(
            pending_total,
            i128::from(user.held.0),
            "held = sum of pending orders for {}",
            user.user_id
        );
        Ok(())
    }

    // ----- idempotency -------------------------------------------------------------------------------

    fn idempotency_record(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        get(&self.idempotency, (scope, key))
    }

    fn store_idempotency(
        &mut self,
        tag: &IdempotencyTag,
        now: Timestamp,
        state: IdempotencyState,
    ) -> Result<(), StoreError> {
        let record = IdempotencyRecord {
            fingerprint: tag.fingerprint,
            created_at: now,
            expires_at: tag.expires_at,
            state,
        };
        self.put_idempotency_record(&tag.scope, &tag.key, &record)
    }

    fn put_idempotency_record(
        &mut self,
        scope: &str,
        key: &str,
        record: &IdempotencyRecord,
    ) -> Result<(), StoreError> {
        if let Some(old) = self.idempotency_record(scope, key)? {
            self.idempotency_expiry
                .remove((old.expires_at.micros(), scope, key))?;
        }
        let bytes = encode(record)?;
        self.idempotency.insert((scope, key), bytes.as_slice())?;
        self.idempotency_expiry
            .insert((record.expires_at.micros(), scope, key), ())?;
        Ok(())
    }

    fn remove_idempotency_record(&mut self, scope: &str, key: &str) -> Result<(), StoreError> {
        if let Some(old) = self.idempotency_record(scope, key)? {
            self.idempotency_expiry
                .remove((old.expires_at.micros(), scope, key))?;
            self.idempotency.remove((scope, key))?;
        }
        Ok(())
    }

    fn claim_global_key(&mut self, cx: &mut Cx, command: &command::ClaimGlobalKey) -> Step<Reply> {
        let key = command.key.as_str();
        match self.idempotency_record(GLOBAL_SCOPE, key)? {
            None => {
                let record = IdempotencyRecord {
                    fingerprint: command.fingerprint,
                    created_at: cx.now,
                    expires_at: command.expires_at,
                    state: IdempotencyState::Pending(command.inner.clone()),
                };
                self.put_idempotency_record(GLOBAL_SCOPE, key, &record)?;
                Ok(Reply::GlobalClaim(GlobalClaim::Run(command.inner.clone())))
            }
            Some(record) if record.fingerprint != command.fingerprint => {
                Err(Rejection::IdempotencyKeyReused.into())
            }
            Some(record) => Ok(Reply::GlobalClaim(match record.state {
                IdempotencyState::Pending(first) => GlobalClaim::Run(first),
                IdempotencyState::Done(outcome) => GlobalClaim::Settled(Box::new(outcome)),
            })),
        }
    }

    fn settle_global_key(&mut self, command: &command::SettleGlobalKey) -> Step<Reply> {
        let key = command.key.as_str();
        let outcome: &Outcome = &command.outcome;
        let Some(mut record) = self.idempotency_record(GLOBAL_SCOPE, key)? else {
            // Purged between the two steps (retention shorter than the request): nothing to settle.
            return Ok(Reply::GlobalClaim(GlobalClaim::Settled(Box::new(
                outcome.clone(),
            ))));
        };
        if record.fingerprint != command.fingerprint {
            return Err(Rejection::IdempotencyKeyReused.into());
        }
        match record.state {
            IdempotencyState::Done(stored) => {
                Ok(Reply::GlobalClaim(GlobalClaim::Settled(Box::new(stored))))
            }
            IdempotencyState::Pending(_) => {
                let stored = match outcome {
                    Ok(_) => true,
                    Err(rejection) => rejection.is_stored(),
                };
                if stored {
                    record.state = IdempotencyState::Done(outcome.clone());
                    self.put_idempotency_record(GLOBAL_SCOPE, key, &record)?;
                } else {
                    self.remove_idempotency_record(GLOBAL_SCOPE, key)?;
                }
                Ok(Reply::GlobalClaim(GlobalClaim::Settled(Box::new(
                    outcome.clone(),
                ))))
            }
        }
    }

    // ----- credit ------------------------------------------------------------------------------------

    fn claim_external_ref(&mut self, command: &command::ClaimExternalRef) -> Step<Reply> {
        let reference = command.reference.as_str();
        match get::<_, RefClaim, _>(&self.external_refs, reference)? {
            Some(existing) => Ok(Reply::RefClaim {
                accepted: existing == command.claim,
            }),
            None => {
                let bytes = encode(&command.claim)?;
                self.external_refs.insert(reference, bytes.as_slice())?;
                Ok(Reply::RefClaim { accepted: true })
            }
        }
    }

    fn credit(&mut self, cx: &mut Cx, command: &command::Credit) -> Step<Reply> {
        let user_id = command.user_id.as_str();
        let amount = command.amount;
        let external_ref = command.external_ref.as_str();
        check_amount(amount)?;
        let mut user = self.begin_user(cx, user_id)?;
        if let Some(existing) = get::<_, Credit, _>(&self.credits, external_ref)? {
            if existing.user_id == user_id && existing.amount == amount {
                return Ok(Reply::Credited {
                    credit: existing,
                    wallet: user.wallet(),
                    fresh: false,
                });
            }
            return Err(Rejection::ExternalRefConflict {
                external_ref: external_ref.to_owned(),
            }
            .into());
        }
        if !command.ref_accepted {
            return Err(Rejection::ExternalRefConflict {
                external_ref: external_ref.to_owned(),
            }
            .into());
        }
        self.check_balance_room(&user, amount)?;
        let credit = Credit {
            credit_id: cx.ids.primary(),
            user_id: user_id.to_owned(),
            amount,
            external_ref: external_ref.to_owned(),
            source: command.source.clone(),
            created_at: cx.now,
        };
        self.post(
            cx,
            &mut user,
            PostingKind::Credit,
            amount,
            PostingRef::Credit(credit.credit_id),
            cx.now,
        )?;
        let bytes = encode(&credit)?;
        self.credits.insert(external_ref, bytes.as_slice())?;
        self.save_user(&user)?;
        Ok(Reply::Credited {
            credit,
            wallet: user.wallet(),
            fresh: true,
        })
    }

    fn check_balance_room(&self, user: &User, amount: Money) -> Step<()> {
        let max = MAX_WALLET_BALANCE;
        match user.balance.checked_add(amount) {
            Some(after) if after <= max => Ok(()),
            _ => Err(Rejection::BalanceLimitExceeded { max }.into()),
        }
    }

    fn create_topup(&mut self, cx: &mut Cx, command: &command::CreateTopup) -> Step<Reply> {
        let command::CreateTopup {
            user_id,
            amount,
            expires_at,
        } = command;
        self.open_topup(cx, user_id, *amount, *expires_at, None)
    }

    fn create_topup_capped(
        &mut self,
        cx: &mut Cx,
        command: &command::CreateTopupCapped,
    ) -> Step<Reply> {
        let command::CreateTopupCapped {
            user_id,
            amount,
            expires_at,
            max_pending_topups,
        } = command;
        self.open_topup(cx, user_id, *amount, *expires_at, Some(*max_pending_topups))
    }

    /// Creates a PENDING top-up, refused if `cap` is given and the user already has that many.
    fn open_topup(
        &mut self,
        cx: &mut Cx,
        user_id: &str,
        amount: Money,
        expires_at: Timestamp,
        cap: Option<u32>,
    ) -> Step<Reply> {
        check_amount(amount)?;
        self.begin_user(cx, user_id)?;
        if let Some(max) = cap {
            self.check_pending_topups(cx, user_id, max)?;
        }
        let topup = Topup {
            topup_id: cx.ids.primary(),
            user_id: user_id.to_owned(),
            amount,
            status: TopupStatus::Pending,
            psp_payment_id: None,
            created_at: cx.now,
            expires_at,
            finished_at: None,
        };
        self.save_topup(&topup)?;
        let id = topup.topup_id.as_u128();
        self.pending_topups.insert((expires_at.micros(), id), ())?;
        self.user_pending_topups
            .insert((user_id, id), expires_at.micros())?;
        Ok(Reply::TopupCreated(topup))
    }

    /// Refuses a new top-up when the user already has `max` PENDING top-ups that have not expired at
    /// `cx.now` (one past its deadline counts no more, swept or not). `retry_after` is the earliest expiry
    /// among them: when one more may be started.
    fn check_pending_topups(&self, cx: &Cx, user_id: &str, max: u32) -> Step<()> {
        let mut pending = 0u32;
        let mut earliest: Option<i64> = None;
        for entry in self
            .user_pending_topups
            .range((user_id, 0u128)..=(user_id, u128::MAX))?
        {
            let expires_at = entry?.1.value();
            if expires_at > cx.now.micros() {
                pending = pending.saturating_add(1);
                earliest = Some(earliest.map_or(expires_at, |e| e.min(expires_at)));
            }
        }
        if pending < max {
            return Ok(());
        }
        Err(Rejection::LimitExceeded {
            limit: "max_pending_topups".to_owned(),
            max,
            retry_after: earliest.map(Timestamp),
        }
        .into())
    }

    /// Records that `topup` left PENDING: out of the pending indexes, and into the purge queue if it
    /// ended EXPIRED or FAILED. `was` is the top-up as stored before (an EXPIRED one may still complete).
    fn topup_left_pending(&mut self, was: &Topup, topup: &Topup) -> Step<()> {
        let id = topup.topup_id.as_u128();
        self.pending_topups.remove((was.expires_at.micros(), id))?;
        self.user_pending_topups
            .remove((was.user_id.as_str(), id))?;
        if let Some(at) = final_time(was) {
            self.final_topups.remove((at, id))?;
        }
        if let Some(at) = final_time(topup) {
            self.final_topups.insert((at, id), ())?;
        }
        Ok(())
    }

    /// Purges at most `limit` EXPIRED or FAILED top-ups that became final more than `retention_seconds`
    /// before `cx.now`, with their index rows. Returns how many.
    fn purge_topups(&mut self, cx: &Cx, limit: u32, retention_seconds: u64) -> Step<u32> {
        let bound = crate::domain::topup_purge_bound(cx.now, retention_seconds);
        let due: Vec<(i64, u128)> = self
            .final_topups
            .range(..(bound, 0u128))?
            .take(limit as usize)
            .map(|entry| entry.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for &(at, id) in &due {
            self.final_topups.remove((at, id))?;
            if let Some(topup) = get::<_, Topup, _>(&self.topups, id)? {
                self.pending_topups
                    .remove((topup.expires_at.micros(), id))?;
                self.user_pending_topups
                    .remove((topup.user_id.as_str(), id))?;
                self.topups.remove(id)?;
            }
        }
        Ok(u32::try_from(due.len()).unwrap_or(u32::MAX))
    }

    fn save_topup(&mut self, topup: &Topup) -> Step<()> {
        let bytes = encode(topup)?;
        self.topups
            .insert(topup.topup_id.as_u128(), bytes.as_slice())?;
        Ok(())
    }

    fn psp_payment(&mut self, cx: &mut Cx, command: &command::PspPayment) -> Step<Reply> {
        let (user_id, topup_id, amount) =
            (command.user_id.as_str(), command.topup_id, command.amount);
        let psp_payment_id = command.psp_payment_id.as_str();
        check_amount(amount)?;
        let mut user = self.begin_user(cx, user_id)?;
        let mut topup = match get::<_, Topup, _>(&self.topups, topup_id.as_u128())? {
            Some(topup) if topup.user_id == user_id => topup,
            _ => return Err(Rejection::TopupNotFound.into()),
        };
        if matches!(topup.status, TopupStatus::Completed | TopupStatus::Failed) {
            return Ok(Reply::TopupUpdated(topup));
        }
        if amount != topup.amount {
            return Err(Rejection::AmountMismatch {
                expected: topup.amount,
                received: amount,
            }
            .into());
        }
        let was = topup.clone();
        if command.succeeded {
            if !command.ref_accepted {
                return Err(Rejection::ExternalRefConflict {
                    external_ref: psp_payment_id.to_owned(),
                }
                .into());
            }
            // A payment that arrives after the top-up expired still credits it: the PSP has the money.
            self.check_balance_room(&user, amount)?;
            self.post(
                cx,
                &mut user,
                PostingKind::Credit,
                amount,
                PostingRef::Topup(topup_id),
                cx.now,
            )?;
            topup.status = TopupStatus::Completed;
            topup.psp_payment_id = Some(psp_payment_id.to_owned());
            self.save_user(&user)?;
        } else {
            topup.status = TopupStatus::Failed;
        }
        topup.finished_at = Some(cx.now);
        self.topup_left_pending(&was, &topup)?;
        self.save_topup(&topup)?;
        Ok(Reply::TopupUpdated(topup))
    }

    // ----- catalog -----------------------------------------------------------------------------------

    fn put_item(&mut self, cx: &mut Cx, command: &command::PutItem) -> Step<Reply> {
        let (spec, version) = (&command.spec, command.version);
        check_price(spec.price)?;
        let existing: Option<Item> = get(&self.items, spec.item_id.as_str())?;
        let new_version = match (version, &existing) {
            // The catalog's home shard decides the version: +1 on a change, unchanged otherwise.
            (None, Some(item)) if item.spec == *spec => return Ok(Reply::Item(item.clone())),
            (None, Some(item)) if item.spec.kind != spec.kind => {
                return Err(Rejection::ItemKindFixed {
                    item_id: spec.item_id.clone(),
                    kind: item.spec.kind.as_str().to_owned(),
                }
                .into());
            }
            (None, Some(item)) => item.version + 1,
            (None, None) => {
                if self.items.len()? >= MAX_CATALOG_ITEMS {
                    return Err(Rejection::CatalogFull {
                        limit: MAX_CATALOG_ITEMS,
                    }
                    .into());
                }
                1
            }
            // Other shards copy the home shard's item when it is newer than theirs.
            (Some(_), Some(item)) if item.version >= version.unwrap_or(0) => {
                return Ok(Reply::Item(item.clone()));
            }
            (Some(v), _) => v,
        };
        let item = Item {
            spec: spec.clone(),
            version: new_version,
            updated_at: cx.now,
        };
        let bytes = encode(&item)?;
        self.items.insert(spec.item_id.as_str(), bytes.as_slice())?;
        Ok(Reply::Item(item))
    }

    // ----- orders ------------------------------------------------------------------------------------

    fn create_order(&mut self, cx: &mut Cx, command: &command::CreateOrder) -> Step<Reply> {
        let (user_id, lines) = (command.user_id.as_str(), command.lines.as_slice());
        let (complete, expires_at, max_pending_orders) = (
            command.complete,
            command.expires_at,
            command.max_pending_orders,
        );
        check_line_shape(lines)?;
        let mut user = self.begin_user(cx, user_id)?;
        let pending = self.pending_orders_of(user_id)?;
        if !complete && pending.len() >= max_pending_orders as usize {
            return Err(Rejection::TooManyPendingOrders {
                limit: max_pending_orders,
            }
            .into());
        }
        let mut order_lines = Vec::with_capacity(lines.len());
        let mut total = Money::ZERO;
        for line in lines {
            let item: Item = get(&self.items, line.item_id.as_str())?.ok_or_else(|| {
                Rejection::ItemNotFound {
                    item_id: line.item_id.clone(),
                }
            })?;
            if !item.spec.active {
                return Err(Rejection::ItemInactive {
                    item_id: line.item_id.clone(),
                }
                .into());
            }
            let kind = item.spec.kind;
            if line.quantity > kind.max_quantity() {
                return Err(Rejection::invalid(format!(
                    "quantity of {} ({}) must be at most {}",
                    line.item_id,
                    kind.as_str(),
                    kind.max_quantity()
                ))
                .into());
            }
            if !kind.is_consumable() {
                let owned = self
                    .entitlement(user_id, &line.item_id)?
                    .is_some_and(|e| e.quantity() > 0);
                let in_pending = pending
                    .iter()
                    .any(|o| o.lines.iter().any(|l| l.item_id == line.item_id));
                if owned || in_pending {
                    return Err(Rejection::AlreadyOwned {
                        item_id: line.item_id.clone(),
                    }
                    .into());
                }
            }
            let line_total = item
                .spec
                .price
                .checked_mul(line.quantity)
                .ok_or_else(overflow)?;
            total = total.checked_add(line_total).ok_or_else(overflow)?;
            order_lines.push(OrderLine {
                item_id: line.item_id.clone(),
                kind,
                quantity: line.quantity,
                unit_price: item.spec.price,
                refunded_quantity: 0,
                refund_window_days: item.spec.refund_window_days,
            });
        }
        if let Some(expected) = command.expected_total {
            if expected != total {
                return Err(Rejection::PriceChanged {
                    expected,
                    current: total,
                }
                .into());
            }
        }
        if user.wallet().available() < total {
            return Err(Rejection::InsufficientFunds {
                available: user.wallet().available(),
                required: total,
            }
            .into());
        }
        let mut postings = vec![(PostingKind::Hold, total)];
        if complete {
            postings.push((PostingKind::Debit, total));
        }
        self.check_postings(&user, &postings)?;

        let mut order = Order {
            order_id: cx.ids.primary(),
            user_id: user_id.to_owned(),
            status: OrderStatus::Pending,
            lines: order_lines,
            total,
            refunded_total: Money::ZERO,
            created_at: cx.now,
            expires_at,
            completed_at: None,
            refund_count: 0,
            history: vec![HistoryEntry {
                status: OrderStatus::Pending,
                at: cx.now,
                reason: None,
            }],
        };
        self.post(
            cx,
            &mut user,
            PostingKind::Hold,
            total,
            PostingRef::Order(order.order_id),
            cx.now,
        )?;
        let id = order.order_id.as_u128();
        self.user_orders
            .insert((user_id, order.created_at.micros(), id), ())?;
        if complete {
            self.complete_effects(cx, &mut user, &mut order)?;
        } else {
            self.pending_orders
                .insert((expires_at.micros(), id), user_id)?;
            self.user_pending
                .insert((user_id, id), (expires_at.micros(), total.0))?;
        }
        self.save_order(&order)?;
        self.save_user(&user)?;
        Ok(Reply::OrderCreated(order))
    }

    /// Debit the hold and grant the items: the heart of "never charged without the item".
    fn complete_effects(&mut self, cx: &mut Cx, user: &mut User, order: &mut Order) -> Step<()> {
        debug_assert_eq!(order.status, OrderStatus::Pending);
        self.post(
            cx,
            user,
            PostingKind::Debit,
            order.total,
            PostingRef::Order(order.order_id),
            cx.now,
        )?;
        for line in &order.lines {
            let mut entitlement = self
                .entitlement(&user.user_id, &line.item_id)?
                .unwrap_or_else(|| Entitlement {
                    item_id: line.item_id.clone(),
                    kind: line.kind,
                    granted: 0,
                    revoked: 0,
                    consumed: 0,
                    granted_at: cx.now,
                });
            if entitlement.quantity() == 0 {
                entitlement.granted_at = cx.now;
            }
            entitlement.granted += u64::from(line.quantity);
            debug_assert!(
                line.kind.is_consumable() || entitlement.quantity() == 1,
                "one non-consumable at most"
            );
            self.save_entitlement(&user.user_id, &entitlement)?;
        }
        order.completed_at = Some(cx.now);
        order.transition(OrderStatus::Completed, cx.now, None);
        self.forget_pending(order)?;
        Ok(())
    }

    fn complete_order(&mut self, cx: &mut Cx, command: &command::CompleteOrder) -> Step<Reply> {
        let (user_id, order_id) = (command.user_id.as_str(), command.order_id);
        let mut user = self.begin_user(cx, user_id)?;
        let mut order = self.user_order(user_id, order_id)?;
        match order.status {
            OrderStatus::Pending => {
                self.check_postings(&user, &[(PostingKind::Debit, order.total)])?;
                self.complete_effects(cx, &mut user, &mut order)?;
                self.save_order(&order)?;
                self.save_user(&user)?;
                Ok(Reply::OrderUpdated(order))
            }
            status if status.was_completed() => Ok(Reply::OrderUpdated(order)),
            _ if order.cancel_reason() == Some(crate::domain::CancelReason::Expired) => {
                Err(Rejection::OrderExpired {
                    expires_at: order.expires_at,
                }
                .into())
            }
            status => Err(Rejection::InvalidState {
                status: status.as_str().to_owned(),
            }
            .into()),
        }
    }

    fn cancel_order(&mut self, cx: &mut Cx, command: &command::CancelOrder) -> Step<Reply> {
        let (user_id, order_id) = (command.user_id.as_str(), command.order_id);
        let mut user = self.begin_user(cx, user_id)?;
        let mut order = self.user_order(user_id, order_id)?;
        match order.status {
            OrderStatus::Pending => {
                self.post(
                    cx,
                    &mut user,
                    PostingKind::Release,
                    order.total,
                    PostingRef::Order(order_id),
                    cx.now,
                )?;
                order.transition(
                    OrderStatus::Cancelled,
                    cx.now,
                    Some(crate::domain::CancelReason::CancelledByClient),
                );
                self.forget_pending(&order)?;
                self.save_order(&order)?;
                self.save_user(&user)?;
                Ok(Reply::OrderUpdated(order))
            }
            OrderStatus::Cancelled => Ok(Reply::OrderUpdated(order)),
            status => Err(Rejection::InvalidState {
                status: status.as_str().to_owned(),
            }
            .into()),
        }
    }

    /// Cancels a pending order whose deadline passed, releasing its hold, dated at the deadline.
    fn expire_order(&mut self, cx: &mut Cx, user: &mut User, order_id: u128) -> Step<()> {
        let mut order: Order = get(&self.orders, order_id)?
            .ok_or_else(|| StoreError::Corrupt(format!("pending order {order_id} has no row")))?;
        debug_assert_eq!(order.status, OrderStatus::Pending);
        debug_assert_eq!(order.user_id, user.user_id);
        order.cancel_as_expired();
        let at = order.expires_at;
        self.post(
            cx,
            user,
            PostingKind::Release,
            order.total,
            PostingRef::Order(order.order_id),
            at,
        )?;
        self.forget_pending(&order)?;
        self.save_order(&order)?;
        Ok(())
    }

    fn forget_pending(&mut self, order: &Order) -> Step<()> {
        let id = order.order_id.as_u128();
        self.pending_orders
            .remove((order.expires_at.micros(), id))?;
        self.user_pending.remove((order.user_id.as_str(), id))?;
        Ok(())
    }

    fn pending_orders_of(&self, user_id: &str) -> Step<Vec<Order>> {
        let mut orders = Vec::new();
        for entry in self
            .user_pending
            .range((user_id, 0u128)..=(user_id, u128::MAX))?
        {
            let (key, _) = entry?;
            let order_id = key.value().1;
            let order: Order = get(&self.orders, order_id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("pending order {order_id} has no row"))
            })?;
            orders.push(order);
        }
        Ok(orders)
    }

    fn user_order(&self, user_id: &str, order_id: Uuid) -> Step<Order> {
        match get::<_, Order, _>(&self.orders, order_id.as_u128())? {
            Some(order) if order.user_id == user_id => Ok(order),
            _ => Err(Rejection::OrderNotFound.into()),
        }
    }

    fn save_order(&mut self, order: &Order) -> Step<()> {
        debug_assert_eq!(
            i128::from(order.total.0),
            order
                .lines
                .iter()
                .map(|l| i128::from(l.line_total().0))
                .sum::<i128>()
        );
        let bytes = encode(order)?;
        self.orders
            .insert(order.order_id.as_u128(), bytes.as_slice())?;
        Ok(())
    }

    // ----- refunds -----------------------------------------------------------------------------------

    fn refund(&mut self, cx: &mut Cx, command: &command::Refund) -> Step<Reply> {
        let (user_id, order_id) = (command.user_id.as_str(), command.order_id);
        let (lines, reason, force) = (command.lines.as_deref(), &command.reason, command.force);
        if let Some(lines) = lines {
            check_line_shape(lines)?;
        }
        let mut user = self.begin_user(cx, user_id)?;
        let mut order = self.user_order(user_id, order_id)?;
        if !matches!(
            order.status,
            OrderStatus::Completed | OrderStatus::PartiallyRefunded
        ) {
            return Err(Rejection::InvalidState {
                status: order.status.as_str().to_owned(),
            }
            .into());
        }
        if order.refund_count >= MAX_REFUNDS_PER_ORDER {
            return Err(Rejection::TooManyRefunds {
                limit: MAX_REFUNDS_PER_ORDER,
            }
            .into());
        }
        // (line index, quantity) of what is to be refunded.
        let wanted: Vec<(usize, u32)> = match lines {
            None => order
                .lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.refundable_quantity() > 0)
                .map(|(i, l)| (i, l.refundable_quantity()))
                .collect(),
            Some(lines) => {
                let mut wanted = Vec::with_capacity(lines.len());
                for request in lines {
                    let found = order
                        .lines
                        .iter()
                        .position(|l| l.item_id == request.item_id);
                    let refundable = found.map_or(0, |i| order.lines[i].refundable_quantity());
                    match found {
                        Some(i) if request.quantity <= refundable => {
                            wanted.push((i, request.quantity))
                        }
                        _ => {
                            return Err(Rejection::RefundExceedsPurchase {
                                item_id: request.item_id.clone(),
                                requested: request.quantity,
                                refundable,
                            }
                            .into());
                        }
                    }
                }
                wanted
            }
        };
        if wanted.is_empty() {
            return Err(Rejection::InvalidState {
                status: order.status.as_str().to_owned(),
            }
            .into());
        }
        let completed_at = order.completed_at.unwrap_or(order.created_at);
        let mut refund_lines = Vec::with_capacity(wanted.len());
        let mut entitlements = Vec::with_capacity(wanted.len());
        let mut amount = Money::ZERO;
        for &(index, quantity) in &wanted {
            let line = &order.lines[index];
            let closes_at = completed_at.plus_days(line.refund_window_days);
            if !force && (line.refund_window_days == 0 || cx.now > closes_at) {
                return Err(Rejection::RefundWindowClosed {
                    item_id: line.item_id.clone(),
                    closed_at: closes_at,
                }
                .into());
            }
            let entitlement = self.entitlement(user_id, &line.item_id)?;
            let unspent = entitlement.as_ref().map_or(0, Entitlement::quantity);
            if unspent < u64::from(quantity) {
                return Err(Rejection::AlreadyConsumed {
                    item_id: line.item_id.clone(),
                    requested: quantity,
                    unspent,
                }
                .into());
            }
            let line_amount = line.unit_price.checked_mul(quantity).ok_or_else(overflow)?;
            amount = amount.checked_add(line_amount).ok_or_else(overflow)?;
            refund_lines.push(RefundLine {
                item_id: line.item_id.clone(),
                quantity,
                amount: line_amount,
            });
            entitlements.extend(entitlement);
        }
        self.check_postings(&user, &[(PostingKind::Refund, amount)])?;

        for (entitlement, &(index, quantity)) in entitlements.iter_mut().zip(&wanted) {
            entitlement.revoked += u64::from(quantity);
            self.save_entitlement(user_id, entitlement)?;
            order.lines[index].refunded_quantity += quantity;
        }
        let refund = Refund {
            refund_id: cx.ids.primary(),
            order_id,
            user_id: user_id.to_owned(),
            lines: refund_lines,
            amount,
            reason: reason.clone(),
            forced: force,
            created_at: cx.now,
        };
        order.refunded_total = order
            .refunded_total
            .checked_add(amount)
            .ok_or_else(overflow)?;
        order.refund_count += 1;
        let status = order.status_after_refund();
        order.transition(status, cx.now, None);
        debug_assert!(
            order.refunded_total <= order.total,
            "refunds never exceed what was paid"
        );
        self.post(
            cx,
            &mut user,
            PostingKind::Refund,
            amount,
            PostingRef::Refund(refund.refund_id),
            cx.now,
        )?;
        let bytes = encode(&refund)?;
        self.refunds
            .insert(refund.refund_id.as_u128(), bytes.as_slice())?;
        self.save_order(&order)?;
        self.save_user(&user)?;
        Ok(Reply::Refunded {
            refund,
            wallet: user.wallet(),
        })
    }

    // ----- entitlements ------------------------------------------------------------------------------

    fn entitlement(&self, user_id: &str, item_id: &str) -> Step<Option<Entitlement>> {
        Ok(get(&self.entitlements, (user_id, item_id))?)
    }

    fn save_entitlement(&mut self, user_id: &str, entitlement: &Entitlement) -> Step<()> {
        debug_assert!(entitlement.granted >= entitlement.revoked + entitlement.consumed);
        let bytes = encode(entitlement)?;
        self.entitlements
            .insert((user_id, entitlement.item_id.as_str()), bytes.as_slice())?;
        Ok(())
    }

    fn consume(&mut self, cx: &mut Cx, command: &command::Consume) -> Step<Reply> {
        let (user_id, item_id) = (command.user_id.as_str(), command.item_id.as_str());
        let quantity = command.quantity;
        if quantity == 0 {
            return Err(Rejection::invalid("quantity must be at least 1").into());
        }
        self.begin_user(cx, user_id)?;
        let Some(mut entitlement) = self.entitlement(user_id, item_id)? else {
            return Err(Rejection::InsufficientEntitlement {
                item_id: item_id.to_owned(),
                requested: quantity,
                owned: 0,
            }
            .into());
        };
        if !entitlement.kind.is_consumable() {
            return Err(Rejection::invalid(format!(
                "{item_id} is a {} and cannot be consumed; only currency items can",
                entitlement.kind.as_str()
            ))
            .into());
        }
        if entitlement.quantity() < u64::from(quantity) {
            return Err(Rejection::InsufficientEntitlement {
                item_id: item_id.to_owned(),
                requested: quantity,
                owned: entitlement.quantity(),
            }
            .into());
        }
        entitlement.consumed += u64::from(quantity);
        self.save_entitlement(user_id, &entitlement)?;
        Ok(Reply::Entitlement(entitlement))
    }

    // ----- background work ---------------------------------------------------------------------------

    fn sweep(&mut self, cx: &mut Cx, command: &command::Sweep) -> Step<Reply> {
        let (orders, topups, idempotency_records) = self.expire_and_purge(cx, command.limit)?;
        Ok(Reply::Swept {
            orders,
            topups,
            idempotency_records,
        })
    }

    fn sweep_and_purge(&mut self, cx: &mut Cx, command: &command::SweepAndPurge) -> Step<Reply> {
        let (orders, topups, idempotency_records) = self.expire_and_purge(cx, command.limit)?;
        let purged_topups =
            self.purge_topups(cx, command.limit, command.topup_retention_seconds)?;
        Ok(Reply::SweptAndPurged {
            orders,
            topups,
            idempotency_records,
            purged_topups,
        })
    }

    /// Expires due orders and top-ups and purges idempotency outcomes past their retention, at most
    /// `limit` of each; returns how many of each.
    fn expire_and_purge(&mut self, cx: &mut Cx, limit: u32) -> Step<(u32, u32, u32)> {
        let bound = cx.now.micros().saturating_add(1);
        let limit = limit as usize;

        let due_orders: Vec<(u128, String)> = self
            .pending_orders
            .range(..(bound, 0u128))?
            .take(limit)
            .map(|entry| entry.map(|(k, v)| (k.value().1, v.value().to_owned())))
            .collect::<Result<_, _>>()?;
        for (order_id, user_id) in &due_orders {
            let mut user = self.existing_user(user_id)?;
            self.expire_order(cx, &mut user, *order_id)?;
            self.save_user(&user)?;
        }

        let due_topups: Vec<(i64, u128)> = self
            .pending_topups
            .range(..(bound, 0u128))?
            .take(limit)
            .map(|entry| entry.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for (expires_at, topup_id) in &due_topups {
            self.pending_topups.remove((*expires_at, *topup_id))?;
            if let Some(was) = get::<_, Topup, _>(&self.topups, *topup_id)? {
                if was.status == TopupStatus::Pending {
                    let topup = was.as_of(cx.now);
                    self.topup_left_pending(&was, &topup)?;
                    self.save_topup(&topup)?;
                }
            }
        }

        let due_records: Vec<(String, String)> = self
            .idempotency_expiry
            .range(..(bound, "", ""))?
            .take(limit)
            .map(|entry| entry.map(|(k, _)| (k.value().1.to_owned(), k.value().2.to_owned())))
            .collect::<Result<_, _>>()?;
        for (scope, key) in &due_records {
            self.remove_idempotency_record(scope, key)?;
        }

        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok((
            count(due_orders.len()),
            count(due_topups.len()),
            count(due_records.len()),
        ))
    }

    // ----- the ledger --------------------------------------------------------------------------------

    fn accounts(&self, user: &User) -> Accounts {
        Accounts {
            balance: user.balance,
            held: user.held,
            psp_clearing: self.meta.psp_clearing,
            revenue: self.meta.revenue,
        }
    }

    /// Decides, before a command writes anything, that `postings` (in order) can all be made on `user`'s
    /// wallet: each amount non-negative, every account in range, `0 ≤ held ≤ balance` after each.
    fn check_postings(&self, user: &User, postings: &[(PostingKind, Money)]) -> Step<()> {
        let mut accounts = self.accounts(user);
        for &(kind, amount) in postings {
            accounts = accounts.after(kind, amount)?;
        }
        Ok(())
    }

    /// Moves `amount` between the accounts of `kind` on `user`'s wallet: writes the posting (hash-chained),
    /// the user's ledger entry, and updates the wallet cache and the system accounts. Zero moves nothing.
    fn post(
        &mut self,
        cx: &mut Cx,
        user: &mut User,
        kind: PostingKind,
        amount: Money,
        reference: PostingRef,
        at: Timestamp,
    ) -> Step<()> {
        // Checked before anything is written: a refused posting leaves wallet and accounts as they were.
        let after = self.accounts(user).after(kind, amount)?;
        if amount == Money::ZERO {
            return Ok(());
        }
        let ledger_seq = user.ledger_seq.checked_add(1).ok_or_else(overflow)?;
        let posting_seq = self.meta.posting_seq.checked_add(1).ok_or_else(overflow)?;
        user.balance = after.balance;
        user.held = after.held;
        self.meta.psp_clearing = after.psp_clearing;
        self.meta.revenue = after.revenue;
        user.ledger_seq = ledger_seq;
        self.meta.posting_seq = posting_seq;
        let (debit, credit) = kind.accounts(&user.user_id);
        let posting = Posting {
            seq: self.meta.posting_seq,
            entry_id: cx.ids.next_id(),
            user_id: user.user_id.clone(),
            user_seq: user.ledger_seq,
            kind,
            debit,
            credit,
            amount,
            reference,
            at,
            balance_after: user.balance,
            held_after: user.held,
            prev_hash: self.meta.posting_head,
        };
        let bytes = encode(&posting)?;
        self.meta.posting_head = Sha256::digest(&bytes).into();
        self.postings.insert(posting.seq, bytes.as_slice())?;
        self.user_postings
            .insert((user.user_id.as_str(), user.ledger_seq), posting.seq)?;
        Ok(())
    }
}

/// When a top-up became final, if it is one the purge removes (EXPIRED or FAILED).
fn final_time(topup: &Topup) -> Option<i64> {
    match topup.status {
        TopupStatus::Expired | TopupStatus::Failed => {
            Some(topup.finished_at.unwrap_or(topup.expires_at).micros())
        }
        TopupStatus::Pending | TopupStatus::Completed => None,
    }
}

/// Lines must be 1–50, with distinct items and quantities of at least 1. The edge checks this too; the
/// state machine does not trust its callers.
fn check_line_shape(lines: &[LineRequest]) -> Result<(), Rejection> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(Rejection::invalid(format!(
            "between 1 and {MAX_LINES} lines are required"
        )));
    }
    for (i, line) in lines.iter().enumerate() {
        if line.quantity == 0 || line.quantity > crate::domain::model::MAX_QUANTITY {
            return Err(Rejection::invalid("quantity must be between 1 and 1000"));
        }
        if lines[..i].iter().any(|other| other.item_id == line.item_id) {
            return Err(Rejection::invalid(format!(
                "item {} appears in more than one line",
                line.item_id
            )));
        }
    }
    Ok(())
}

fn overflow() -> Rejection {
    Rejection::invalid("amount out of range")
}

/// An amount a command moves (credit, top-up, payment): positive, and no more than a wallet may hold.
/// The edge refuses anything else with 422; a command in the log may still come from a faulty peer.
fn check_amount(amount: Money) -> Result<(), Rejection> {
    if !amount.is_positive() {
        return Err(Rejection::invalid("amount must be positive"));
    }
    if amount > MAX_WALLET_BALANCE {
        return Err(overflow());
    }
    Ok(())
}

/// A catalog price: zero (a free item) or positive, and no more than a wallet may hold.
fn check_price(price: Money) -> Result<(), Rejection> {
    if price.is_negative() {
        return Err(Rejection::invalid("price must not be negative"));
    }
    if price > MAX_WALLET_BALANCE {
        return Err(overflow());
    }
    Ok(())
}

/// A wallet and the shard's system accounts, as one posting leaves them.
#[derive(Clone, Copy, Debug)]
struct Accounts {
    balance: Money,
    held: Money,
    psp_clearing: i64,
    revenue: i64,
}

impl Accounts {
    /// The accounts after a posting of `amount` of `kind`: computed exactly in `i128`, then narrowed with
    /// a check. A negative amount, a sum outside `i64`, or a wallet left with `held < 0` or
    /// `held > balance` is refused (a zero amount moves nothing and is allowed).
    fn after(self, kind: PostingKind, amount: Money) -> Result<Accounts, Rejection> {
        if amount.is_negative() {
            return Err(Rejection::invalid("postings move positive amounts"));
        }
        let (balance_delta, held_delta) = kind.wallet_delta(amount);
        let (psp_clearing_delta, revenue_delta) = kind.system_delta(amount);
        let moved = |from: i64, delta: i128| {
            i128::from(from)
                .checked_add(delta)
                .and_then(|sum| i64::try_from(sum).ok())
                .ok_or_else(overflow)
        };
        let after = Accounts {
            balance: Money(moved(self.balance.0, balance_delta)?),
            held: Money(moved(self.held.0, held_delta)?),
            psp_clearing: moved(self.psp_clearing, psp_clearing_delta)?,
            revenue: moved(self.revenue, revenue_delta)?,
        };
        if after.held.is_negative() || after.held > after.balance {
            return Err(Rejection::invalid(
                "the posting would leave the wallet's held outside 0..=balance",
            ));
        }
        Ok(after)
    }
}

/// Decodes a posting row (used by queries and the audit too).
pub(crate) fn decode_posting(bytes: &[u8]) -> Result<Posting, StoreError> {
    decode(bytes)
}
