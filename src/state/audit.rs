//! The audit of one shard: recompute everything derivable from the stored rows and report every mismatch,
//! and `state_hash`, a digest of the whole shard that is equal on every replica that applied the same log.
//!
//! Invariants checked (see ARCHITECTURE.md):
//! - the posting chain is unbroken (each posting carries the hash of the previous one; the head matches);
//! - each posting moves a positive amount between the two accounts its kind names;
//! - each wallet's balance and held equal the sums of its postings; `0 ≤ held ≤ balance`;
//! - each wallet's held equals the totals of its pending orders;
//! - the system accounts equal the sums of their postings, and all accounts together sum to zero;
//! - each order's total is the sum of its lines, refunds never exceed what was bought, per line and in all;
//! - each entitlement's granted and revoked quantities equal what completed orders granted and refunds
//!   revoked; `granted ≥ revoked + consumed`; at most one game or skin;
//! - the top-up indexes point at top-ups in their state: each row of a user's pending top-ups at a
//!   PENDING top-up of that user with that deadline, each row of the purge queue at an EXPIRED or FAILED
//!   top-up that became final then;
//! - each wallet's debt equals its `debt` postings minus its `debt_repaid` ones and is never negative;
//!   the `receivable` account is minus the debts, summed; wallets + psp_clearing + revenue + receivable
//!   sum to zero;
//! - each reversal is covered exactly (hold + wallet + debt = amount), and the reversals of a credit or
//!   top-up never sum to more than it brought in;
//! - the outbox has no gap: its events are exactly the seqs after the purged ones up to the newest, in
//!   time order, and no webhook's position is beyond the newest;
//! - limits are in range, overrides belong to users; each usage row is of a user, starts its window, counts
//!   no more than the orders, debits or refunds of its window, and a user has at most one row of today's
//!   spending, one of this hour's orders and 30 days of refunds (rows written before an upgrade that added
//!   them are missing, so a row may count less, never more).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use redb::{
    Key, ReadOnlyTable, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    Value,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::tables::{self, Bytes, TableVisitor, decode};
use super::user_rows::{self, UserKey};
use super::{MetaState, StoreError, query};
use crate::domain::limits::Window;
use crate::domain::{
    Credit, Dispute, LimitSet, Money, Order, OrderStatus, Posting, PostingKind, PostingRef, Refund,
    Reversal, ReversalSource, Timestamp, Topup, TopupStatus, User,
};

#[derive(Clone, Debug, Serialize)]
pub struct ShardAudit {
    pub shard: u32,
    pub last_applied: u64,
    pub users: u64,
    pub orders: u64,
    pub postings: u64,
    pub state_hash: String,
    pub violations: Vec<String>,
}

/// The most violations one shard's audit lists; the rest are counted in a last line.
pub const MAX_LISTED_VIOLATIONS: usize = 1000;

/// The violations found so far: the first `MAX_LISTED_VIOLATIONS` in full, the rest only counted, so that
/// the audit of a badly damaged shard cannot take memory in proportion to its damage.
#[derive(Default)]
pub struct Violations {
    listed: Vec<String>,
    unlisted: u64,
}

impl Violations {
    pub fn push(&mut self, violation: String) {
        if self.listed.len() < MAX_LISTED_VIOLATIONS {
            self.listed.push(violation);
        } else {
            self.unlisted += 1;
        }
    }

    /// The listed violations, and a last line counting those left out.
    pub fn into_list(self) -> Vec<String> {
        let mut list = self.listed;
        if self.unlisted > 0 {
            list.push(format!(
                "{} more violations not listed (the first {MAX_LISTED_VIOLATIONS} are)",
                self.unlisted
            ));
        }
        list
    }
}

/// Sums are `i128`: exact for any number of `i64` amounts a shard can hold, so a stored row that is out of
/// range shows up as a mismatch instead of wrapping (or panicking) in the audit itself.
#[derive(Default)]
struct WalletSums {
    balance: i128,
    held: i128,
    debt: i128,
    entries: u64,
}

/// Audits the shard as `txn` sees it (module docs): every mismatch is a violation in the answer.
///
/// Its memory does not grow with the shard: the tables are walked in key order, what is summed per user is
/// summed one user at a time through the user-keyed indexes (`audit_users`), and what no
/// user reached is found by counting rows (`check_reached`).
pub fn audit(txn: &ReadTransaction, shard: u32) -> Result<ShardAudit, StoreError> {
    let meta = query::meta(txn)?;
    let mut violations = Violations::default();
    let postings = audit_postings(txn, &meta, &mut violations)?;
    let order_count = audit_orders(txn, &mut violations)?;
    let users = audit_users(txn, &mut violations)?;
    check_accounts(&postings, &users, &mut violations);
    check_reached(txn, &postings, order_count, &users, &mut violations)?;
    audit_topup_indexes(txn, &mut violations)?;
    audit_reversals(txn, &mut violations)?;
    audit_events(txn, &mut violations)?;
    audit_limits(txn, &mut violations)?;
    audit_orphan_usage(txn, &mut violations)?;

    Ok(ShardAudit {
        shard,
        last_applied: meta.last_applied,
        users: users.users,
        orders: order_count,
        postings: postings.count,
        state_hash: state_hash(txn)?,
        violations: violations.into_list(),
    })
}

/// What the postings add up to for the system accounts, and how many there are.
struct PostingSums {
    psp_clearing: i128,
    revenue: i128,
    receivable: i128,
    count: u64,
}

/// The posting chain, each posting's accounts, and the sums of the system accounts (the wallets are summed
/// per user, `audit_users`).
fn audit_postings(
    txn: &ReadTransaction,
    meta: &MetaState,
    violations: &mut Violations,
) -> Result<PostingSums, StoreError> {
    let (mut psp_clearing, mut revenue, mut receivable) = (0i128, 0i128, 0i128);
    let mut head = [0u8; 32];
    let mut posting_count = 0u64;
    for entry in txn.open_table(tables::POSTINGS)?.iter()? {
        let (key, value) = entry?;
        let posting: Posting = decode(value.value())?;
        posting_count += 1;
        if key.value() != posting_count || posting.seq != posting_count {
            violations.push(format!(
                "posting {} is out of sequence (expected {posting_count})",
                key.value()
            ));
        }
        if posting.prev_hash != head {
            violations.push(format!("posting {} breaks the hash chain", posting.seq));
        }
        head = Sha256::digest(value.value()).into();
        if posting.amount <= Money::ZERO {
            violations.push(format!(
                "posting {} moves a non-positive amount",
                posting.seq
            ));
        }
        if (posting.debit.clone(), posting.credit.clone())
            != posting.kind.accounts(&posting.user_id)
        {
            violations.push(format!(
                "posting {} uses accounts its kind does not name",
                posting.seq
            ));
        }
        let system = posting.kind.system_delta(posting.amount);
        psp_clearing += system.psp_clearing;
        revenue += system.revenue;
        receivable += system.receivable;
    }
    if head != meta.posting_head || posting_count != meta.posting_seq {
        violations.push("the posting chain's head does not match the recorded head".to_owned());
    }
    let recorded_receivable: i64 = query::receivable(txn)?;
    if psp_clearing != i128::from(meta.psp_clearing)
        || revenue != i128::from(meta.revenue)
        || receivable != i128::from(recorded_receivable)
    {
        violations
            .push("system account balances differ from the sums of their postings".to_owned());
    }
    Ok(PostingSums {
        psp_clearing,
        revenue,
        receivable,
        count: posting_count,
    })
}

/// What the walk of every user found: the sums over all wallets, and how many rows of each user-keyed
/// table it reached (a row no user reaches belongs to no user, or is missing from its user's index).
#[derive(Default)]
struct UserTotals {
    users: u64,
    wallet_total: i128,
    debt_total: i128,
    postings: u64,
    orders: u64,
    pending: u64,
    disputes: u64,
    entitlements: u64,
}

/// The user-keyed tables one user's checks read.
struct UserTables {
    postings: ReadOnlyTable<u64, Bytes>,
    user_rows: ReadOnlyTable<UserKey, Bytes>,
    orders: ReadOnlyTable<u128, Bytes>,
    user_pending: ReadOnlyTable<(&'static str, u128), (i64, i64)>,
    disputes: ReadOnlyTable<(&'static str, &'static str), Bytes>,
    debts: ReadOnlyTable<&'static str, i64>,
    refunds: ReadOnlyTable<u128, Bytes>,
    usage: ReadOnlyTable<(&'static str, u8, i64), i64>,
}

impl UserTables {
    fn open(txn: &ReadTransaction) -> Result<UserTables, StoreError> {
        Ok(UserTables {
            postings: txn.open_table(tables::POSTINGS)?,
            user_rows: txn.open_table(user_rows::USER_ROWS)?,
            orders: txn.open_table(tables::ORDERS)?,
            user_pending: txn.open_table(tables::USER_PENDING)?,
            disputes: txn.open_table(tables::DISPUTES)?,
            debts: txn.open_table(tables::DEBTS)?,
            refunds: txn.open_table(tables::REFUNDS)?,
            usage: txn.open_table(tables::USAGE)?,
        })
    }

    /// The postings of `user_id`'s ledger in its order, each checked to be the user's and in place.
    fn ledger_of(
        &self,
        user_id: &str,
        violations: &mut Violations,
        mut each: impl FnMut(Posting),
    ) -> Result<u64, StoreError> {
        let mut count = 0u64;
        for entry in user_rows::postings(&self.user_rows, user_id, 0)? {
            let (user_seq, seq) = entry?;
            count += 1;
            let Some(posting) = tables::get::<_, Posting, _>(&self.postings, seq)? else {
                violations.push(format!(
                    "the ledger of {user_id} names posting {seq}, which does not exist"
                ));
                continue;
            };
            if posting.user_id != user_id || posting.user_seq != user_seq {
                violations.push(format!(
                    "the ledger of {user_id} names posting {seq} as its entry {user_seq}, which it is not"
                ));
                continue;
            }
            each(posting);
        }
        Ok(count)
    }

    /// Counts the refunds `ids` (of one user, each once) into the windows of `happened`.
    fn count_refunds(
        &self,
        ids: Vec<uuid::Uuid>,
        happened: &mut Happened,
    ) -> Result<(), StoreError> {
        for id in ids {
            if let Some(refund) = tables::get::<_, Refund, _>(&self.refunds, id.as_u128())? {
                count_in(happened, Window::RefundsPerDay, refund.created_at, 1);
            }
        }
        Ok(())
    }

    /// The orders of `user_id`, each checked to be the user's and at its indexed time.
    fn orders_of(
        &self,
        user_id: &str,
        violations: &mut Violations,
        mut each: impl FnMut(Order),
    ) -> Result<u64, StoreError> {
        let mut count = 0u64;
        for entry in
            user_rows::orders(&self.user_rows, user_id, Bound::Unbounded, Bound::Unbounded)?
        {
            let (created, id) = entry?;
            count += 1;
            let order = tables::get::<_, Order, _>(&self.orders, id)?;
            match order {
                Some(order) if order.user_id == user_id && order.created_at.micros() == created => {
                    each(order);
                }
                _ => violations.push(format!(
                    "the orders of {user_id} name order {}, which is not theirs at that time",
                    uuid::Uuid::from_u128(id)
                )),
            }
        }
        Ok(count)
    }
}

/// Every user, one at a time: the wallet against its ledger, pending orders, disputes and debt; the
/// entitlements against what the user's orders granted; the usage rows against what happened.
fn audit_users(
    txn: &ReadTransaction,
    violations: &mut Violations,
) -> Result<UserTotals, StoreError> {
    let tables = UserTables::open(txn)?;
    let mut totals = UserTotals::default();
    for user in user_rows::users(&tables.user_rows)? {
        let user = user?;
        totals.users += 1;
        totals.wallet_total += i128::from(user.balance.minor());
        let mut happened = Happened::new();
        audit_wallet(&tables, &user, &mut happened, &mut totals, violations)?;
        audit_entitlements(
            &tables,
            &user.user_id,
            &mut happened,
            &mut totals,
            violations,
        )?;
        audit_usage_of(&tables, &user.user_id, &happened, violations)?;
    }
    Ok(totals)
}

/// One wallet against the running sums of its ledger, its pending orders and dispute holds, and its debt.
fn audit_wallet(
    tables: &UserTables,
    user: &User,
    happened: &mut Happened,
    totals: &mut UserTotals,
    violations: &mut Violations,
) -> Result<(), StoreError> {
    let id = user.user_id.as_str();
    let mut sums = WalletSums::default();
    let mut running = Vec::new();
    let mut refunds = Vec::new();
    totals.postings += tables.ledger_of(id, violations, |posting| {
        refunds.extend(refund_of(&posting));
        let (balance_delta, held_delta) = posting.kind.wallet_delta(posting.amount);
        sums.balance += balance_delta;
        sums.held += held_delta;
        sums.debt += posting.kind.debt_delta(posting.amount);
        sums.entries += 1;
        if sums.entries != posting.user_seq
            || sums.balance != i128::from(posting.balance_after.minor())
            || sums.held != i128::from(posting.held_after.minor())
        {
            running.push(format!(
                "posting {} disagrees with the running wallet of {id}",
                posting.seq
            ));
        }
    })?;
    for violation in running {
        violations.push(violation);
    }
    tables.count_refunds(refunds, happened)?;
    if i128::from(user.balance.minor()) != sums.balance {
        violations.push(format!(
            "wallet {id}: balance {} != sum of postings {}",
            user.balance.minor(),
            sums.balance
        ));
    }
    if i128::from(user.held.minor()) != sums.held {
        violations.push(format!(
            "wallet {id}: held {} != sum of postings {}",
            user.held.minor(),
            sums.held
        ));
    }
    if user.ledger_seq != sums.entries {
        violations.push(format!(
            "wallet {id}: ledger_seq {} != {} entries",
            user.ledger_seq, sums.entries
        ));
    }
    let mut pending = 0i128;
    for entry in tables.user_pending.range((id, 0)..=(id, u128::MAX))? {
        pending += i128::from(entry?.1.value().1);
        totals.pending += 1;
    }
    for entry in tables.disputes.range((id, "")..)? {
        let (key, value) = entry?;
        if key.value().0 != id {
            break;
        }
        let dispute: Dispute = decode(value.value())?;
        pending += i128::from(dispute.held.minor());
        totals.disputes += 1;
    }
    if i128::from(user.held.minor()) != pending {
        violations.push(format!(
            "wallet {id}: held {} != pending orders and dispute holds {pending}",
            user.held.minor()
        ));
    }
    let debt = i128::from(tables.debts.get(id)?.map_or(0, |d| d.value()));
    totals.debt_total += debt;
    if debt != sums.debt || debt < 0 {
        violations.push(format!(
            "wallet {id}: debt {debt} != sum of debt postings {} (or negative)",
            sums.debt
        ));
    }
    if user.balance.is_negative() || user.held.is_negative() || user.held > user.balance {
        violations.push(format!("wallet {id}: negative balance or available"));
    }
    Ok(())
}

/// The accounts sum to zero, and the receivable is minus the debts.
fn check_accounts(postings: &PostingSums, users: &UserTotals, violations: &mut Violations) {
    let system = postings.psp_clearing + postings.revenue + postings.receivable;
    if users.wallet_total + system != 0 {
        violations.push("accounts do not sum to zero".to_owned());
    }
    if postings.receivable != -users.debt_total {
        violations.push(format!(
            "receivable {} is not minus the debts summed ({})",
            postings.receivable, users.debt_total
        ));
    }
}

/// Rows of the user-keyed tables that the walk of every user did not reach: of no user, or missing from
/// their user's index.
fn check_reached(
    txn: &ReadTransaction,
    postings: &PostingSums,
    order_count: u64,
    users: &UserTotals,
    violations: &mut Violations,
) -> Result<(), StoreError> {
    let counts = [
        ("postings", postings.count, users.postings),
        ("orders", order_count, users.orders),
        (
            "pending orders",
            txn.open_table(tables::USER_PENDING)?.len()?,
            users.pending,
        ),
        (
            "disputes",
            txn.open_table(tables::DISPUTES)?.len()?,
            users.disputes,
        ),
        (
            "user rows",
            txn.open_table(user_rows::USER_ROWS)?.len()?,
            users.users + users.orders + users.postings + users.entitlements,
        ),
    ];
    let legacy = super::migrate::legacy_rows(txn)?;
    if legacy != 0 {
        violations.push(format!(
            "{legacy} rows left in the user tables of schema 2, which the migration empties"
        ));
    }
    for (what, rows, reached) in counts {
        if rows != reached {
            violations.push(format!(
                "{what}: {rows} rows, but the users' own indexes reach {reached}: rows of unknown users, or missing from their user's index"
            ));
        }
    }
    Ok(())
}

/// Each order's totals, refunds and pending index; returns how many orders there are.
fn audit_orders(txn: &ReadTransaction, violations: &mut Violations) -> Result<u64, StoreError> {
    let pending_index = txn.open_table(tables::USER_PENDING)?;
    let mut order_count = 0u64;
    for entry in txn.open_table(tables::ORDERS)?.iter()? {
        let order: Order = decode(entry?.1.value())?;
        order_count += 1;
        let id = order.order_id;
        let total: i128 = order
            .lines
            .iter()
            .map(|l| i128::from(l.unit_price.minor()) * i128::from(l.quantity))
            .sum();
        let refunded: i128 = order
            .lines
            .iter()
            .map(|l| i128::from(l.unit_price.minor()) * i128::from(l.refunded_quantity))
            .sum();
        if total != i128::from(order.total.minor())
            || refunded != i128::from(order.refunded_total.minor())
        {
            violations.push(format!("order {id}: totals differ from its lines"));
        }
        if order.lines.iter().any(|l| l.refunded_quantity > l.quantity)
            || order.refunded_total > order.total
        {
            violations.push(format!("order {id}: refunds exceed the purchase"));
        }
        let indexed = pending_index
            .get((order.user_id.as_str(), id.as_u128()))?
            .is_some();
        if indexed != (order.status == OrderStatus::Pending) {
            violations.push(format!(
                "order {id}: pending index disagrees with status {}",
                order.status.as_str()
            ));
        }
    }
    Ok(order_count)
}

/// One user's entitlements against what the user's completed orders granted and their refunds revoked;
/// no grant without its row. Counts the orders' windows into `happened`.
fn audit_entitlements(
    tables: &UserTables,
    user_id: &str,
    happened: &mut Happened,
    totals: &mut UserTotals,
    violations: &mut Violations,
) -> Result<(), StoreError> {
    // item → (granted, revoked): one user's items.
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    totals.orders += tables.orders_of(user_id, violations, |order| {
        count_order(&order, happened);
        if order.status.was_completed() {
            for line in &order.lines {
                let e = expected.entry(line.item_id.clone()).or_default();
                e.0 = e.0.saturating_add(u64::from(line.quantity));
                e.1 = e.1.saturating_add(u64::from(line.refunded_quantity));
            }
        }
    })?;
    for entitlement in user_rows::entitlements(&tables.user_rows, user_id)? {
        let entitlement = entitlement?;
        let item_id = entitlement.item_id.as_str();
        totals.entitlements += 1;
        let (granted, revoked) = expected.remove(item_id).unwrap_or_default();
        if entitlement.granted != granted || entitlement.revoked != revoked {
            violations.push(format!(
                "entitlement {user_id}/{item_id}: granted {} revoked {} but orders say {granted} and {revoked}",
                entitlement.granted, entitlement.revoked
            ));
        }
        if u128::from(entitlement.granted)
            < u128::from(entitlement.revoked) + u128::from(entitlement.consumed)
        {
            violations.push(format!(
                "entitlement {user_id}/{item_id}: negative quantity"
            ));
        }
        if !entitlement.kind.is_consumable() && entitlement.quantity() > 1 {
            violations.push(format!(
                "entitlement {user_id}/{item_id}: more than one non-consumable"
            ));
        }
    }
    for (item_id, (granted, _)) in expected {
        if granted > 0 {
            violations.push(format!(
                "entitlement {user_id}/{item_id}: completed orders granted it but no row exists"
            ));
        }
    }
    Ok(())
}

/// Each reversal is covered exactly, and no credit or top-up gives back more than it brought in. The
/// reversals are summed walking their sources' index (`SOURCE_REVERSALS`, in source order), so one
/// source's sum is held at a time; a reversal the index does not reach is found by count.
fn audit_reversals(txn: &ReadTransaction, violations: &mut Violations) -> Result<(), StoreError> {
    let reversals = txn.open_table(tables::REVERSALS)?;
    for entry in reversals.iter()? {
        let reversal: Reversal = decode(entry?.1.value())?;
        let covered = i128::from(reversal.from_hold.minor())
            + i128::from(reversal.from_wallet.minor())
            + i128::from(reversal.debt.minor());
        if covered != i128::from(reversal.amount.minor()) || !reversal.amount.is_positive() {
            let id = reversal.reversal_id;
            violations.push(format!("reversal {id}: hold + wallet + debt != amount"));
        }
    }
    let sources = ReversedSources {
        topups: txn.open_table(tables::TOPUPS)?,
        credits: txn.open_table(tables::CREDITS)?,
    };
    let mut reached = 0u64;
    let mut group: Option<(ReversalSource, i128)> = None;
    for entry in txn.open_table(tables::SOURCE_REVERSALS)?.iter()? {
        let (source, reversal_id) = entry?.0.value();
        let Some(reversal) = tables::get::<_, Reversal, _>(&reversals, reversal_id)? else {
            violations.push(format!(
                "the reversals of {}: no reversal {}",
                uuid::Uuid::from_u128(source),
                uuid::Uuid::from_u128(reversal_id)
            ));
            continue;
        };
        if reversal.source.id().as_u128() != source {
            violations.push(format!(
                "reversal {}: indexed under {} but reverses {}",
                reversal.reversal_id,
                uuid::Uuid::from_u128(source),
                reversal.source.id()
            ));
            continue;
        }
        reached += 1;
        if group
            .as_ref()
            .is_some_and(|(s, _)| s.id() != reversal.source.id())
        {
            sources.check(group.take(), violations)?;
        }
        let (_, total) = group.get_or_insert((reversal.source, 0));
        *total += i128::from(reversal.amount.minor());
    }
    sources.check(group, violations)?;
    let rows = reversals.len()?;
    if rows != reached {
        violations.push(format!(
            "reversals: {rows} rows, but the index of their sources reaches {reached}"
        ));
    }
    Ok(())
}

/// The tables that say what a reversed credit or top-up brought in, opened once per audit.
struct ReversedSources {
    topups: ReadOnlyTable<u128, Bytes>,
    credits: ReadOnlyTable<&'static str, Bytes>,
}

impl ReversedSources {
    /// The reversals of one credit or top-up (`group`: the source and their sum) sum to no more than
    /// it brought in.
    fn check(
        &self,
        group: Option<(ReversalSource, i128)>,
        violations: &mut Violations,
    ) -> Result<(), StoreError> {
        let Some((source, total)) = group else {
            return Ok(());
        };
        let brought_in = match &source {
            ReversalSource::Topup { topup_id } => {
                tables::get::<_, Topup, _>(&self.topups, topup_id.as_u128())?
                    .map(|topup| topup.amount)
            }
            ReversalSource::Credit {
                credit_id,
                external_ref,
            } => tables::get::<_, Credit, _>(&self.credits, external_ref.as_str())?
                .filter(|credit| credit.credit_id == *credit_id)
                .map(|credit| credit.amount),
        };
        let limit = brought_in.map_or(0, |amount| i128::from(amount.minor()));
        if total > limit {
            violations.push(format!(
                "the reversals of {} sum to {total}, more than the {limit} it brought in",
                source.id()
            ));
        }
        Ok(())
    }
}

/// The top-up indexes agree with the top-ups they point at.
fn audit_topup_indexes(
    txn: &ReadTransaction,
    violations: &mut Violations,
) -> Result<(), StoreError> {
    let topups = txn.open_table(tables::TOPUPS)?;
    let topup = |id: u128| -> Result<Option<Topup>, StoreError> { tables::get(&topups, id) };
    for entry in txn.open_table(tables::USER_PENDING_TOPUPS)?.iter()? {
        let (key, value) = entry?;
        let (user_id, id) = key.value();
        let indexed = topup(id)?.is_some_and(|t| {
            t.status == TopupStatus::Pending
                && t.user_id == user_id
                && t.expires_at.micros() == value.value()
        });
        if !indexed {
            violations.push(format!(
                "top-up {id:032x}: in the pending top-ups of {user_id} but not a PENDING top-up of theirs"
            ));
        }
    }
    for entry in txn.open_table(tables::FINAL_TOPUPS)?.iter()? {
        let (at, id) = entry?.0.value();
        let indexed = topup(id)?.is_some_and(|t| {
            matches!(t.status, TopupStatus::Expired | TopupStatus::Failed)
                && t.finished_at.unwrap_or(t.expires_at).micros() == at
        });
        if !indexed {
            violations.push(format!(
                "top-up {id:032x}: in the purge queue but not EXPIRED or FAILED since then"
            ));
        }
    }
    Ok(())
}

/// The outbox is gap-free and in time order, and the webhooks' positions are within it.
fn audit_events(txn: &ReadTransaction, violations: &mut Violations) -> Result<(), StoreError> {
    let log = query::event_log(txn)?;
    let mut expected = log.purged_through;
    let mut last_time = i64::MIN;
    for entry in txn.open_table(tables::EVENTS)?.iter()? {
        let (seq, bytes) = entry?;
        let (seq, event): (u64, crate::domain::Event) = (seq.value(), decode(bytes.value())?);
        expected = expected.saturating_add(1);
        if seq != expected {
            violations.push(format!("event seq {seq} follows {}: a gap", expected - 1));
            expected = seq;
        }
        if event.occurred_at.micros() < last_time {
            violations.push(format!("event {seq} is older than the event before it"));
        }
        last_time = event.occurred_at.micros();
    }
    if expected != log.last_seq {
        violations.push(format!(
            "the outbox ends at seq {expected}, its bookkeeping at {}",
            log.last_seq
        ));
    }
    for webhook in query::webhooks(txn)? {
        if webhook.position > log.last_seq {
            violations.push(format!(
                "webhook {} is at seq {}, beyond the newest event",
                webhook.name, webhook.position
            ));
        }
    }
    Ok(())
}

/// The limits' rows (module docs).
fn audit_limits(txn: &ReadTransaction, violations: &mut Violations) -> Result<(), StoreError> {
    if let Some(shop) = query::shop_limits(txn)? {
        if let Err(why) = shop.limits.as_changes().check() {
            violations.push(format!("shop-wide limits: {why}"));
        }
    }
    let users = txn.open_table(user_rows::USER_ROWS)?;
    for entry in txn.open_table(tables::USER_LIMITS)?.iter()? {
        let (key, value) = entry?;
        let user_id = key.value();
        let overrides: LimitSet = decode(value.value())?;
        if !user_rows::has_user(&users, user_id)? {
            violations.push(format!("limits of {user_id}, who is not a user"));
        }
        if let Err(why) = overrides.as_changes().check() {
            violations.push(format!("limits of {user_id}: {why}"));
        }
    }
    Ok(())
}

/// What happened to one user, per (window tag, window start): orders created, money debited, refunds.
type Happened = HashMap<(u8, i64), i128>;

/// The usage rows of users who do not exist (those of users are checked with them, `audit_users`):
/// each is a violation, and is checked against what the indexes say happened to that user.
fn audit_orphan_usage(
    txn: &ReadTransaction,
    violations: &mut Violations,
) -> Result<(), StoreError> {
    let tables = UserTables::open(txn)?;
    let users = txn.open_table(user_rows::USER_ROWS)?;
    let mut next = tables
        .usage
        .first()?
        .map(|(key, _)| key.value().0.to_owned());
    while let Some(user_id) = next.take() {
        if !user_rows::has_user(&users, &user_id)? {
            violations.push(format!("usage of {user_id}, who is not a user"));
            let happened = happened_to(&tables, &user_id)?;
            audit_usage_of(&tables, &user_id, &happened, violations)?;
        }
        let past = (
            Bound::Excluded((user_id.as_str(), u8::MAX, i64::MAX)),
            Bound::Unbounded,
        );
        if let Some(entry) = tables.usage.range::<(&str, u8, i64)>(past)?.next() {
            next = Some(entry?.0.value().0.to_owned());
        }
    }
    Ok(())
}

/// One user's usage rows: each counts no more than happened, no more rows than the pruning keeps.
fn audit_usage_of(
    tables: &UserTables,
    user_id: &str,
    happened: &Happened,
    violations: &mut Violations,
) -> Result<(), StoreError> {
    // (window tag) → the starts of the user's rows of that window, in order.
    let mut rows: BTreeMap<u8, Vec<i64>> = BTreeMap::new();
    let bounds = (user_id, 0u8, i64::MIN)..=(user_id, u8::MAX, i64::MAX);
    for entry in tables.usage.range(bounds)? {
        let (key, value) = entry?;
        let (_, tag, start) = key.value();
        check_usage_row(user_id, tag, start, value.value(), happened, violations);
        rows.entry(tag).or_default().push(start);
    }
    check_usage_rows_kept(user_id, rows, violations);
    Ok(())
}

/// Adds `amount` to the window of `window` that `at` falls in.
fn count_in(happened: &mut Happened, window: Window, at: Timestamp, amount: i64) {
    *happened
        .entry((window.tag(), window.start(at).micros()))
        .or_default() += i128::from(amount);
}

/// The refund a posting paid out, if it is one (each refund has exactly one `refund` posting).
fn refund_of(posting: &Posting) -> Option<uuid::Uuid> {
    match (posting.kind, posting.reference) {
        (PostingKind::Refund, PostingRef::Refund(id)) => Some(id),
        _ => None,
    }
}

/// An order's windows: its creation, and what its completion debited.
fn count_order(order: &Order, happened: &mut Happened) {
    count_in(happened, Window::OrdersPerHour, order.created_at, 1);
    if let Some(at) = order.completed_at {
        count_in(happened, Window::SpendPerDay, at, order.total.minor());
    }
}

/// Everything that happened to `user_id` that a limit counts, from the user's own indexes.
fn happened_to(tables: &UserTables, user_id: &str) -> Result<Happened, StoreError> {
    let mut happened = Happened::new();
    // The indexes' own checks are `audit_users`'s; what they find is reported there.
    let mut ignored = Violations::default();
    tables.orders_of(user_id, &mut ignored, |order| {
        count_order(&order, &mut happened)
    })?;
    let mut refunds = Vec::new();
    tables.ledger_of(user_id, &mut ignored, |posting| {
        refunds.extend(refund_of(&posting));
    })?;
    tables.count_refunds(refunds, &mut happened)?;
    Ok(happened)
}

/// One usage row: a known window, at a window's start, counting no more than happened.
fn check_usage_row(
    user_id: &str,
    tag: u8,
    start: i64,
    count: i64,
    happened: &Happened,
    violations: &mut Violations,
) {
    let Some(window) = Window::from_tag(tag) else {
        violations.push(format!("usage of {user_id}: unknown window {tag}"));
        return;
    };
    if window.start(Timestamp(start)).micros() != start {
        violations.push(format!(
            "usage of {user_id}: {window:?} row at {start} starts no window"
        ));
    }
    let done = happened.get(&(tag, start)).copied().unwrap_or(0);
    if count < 0 || i128::from(count) > done {
        violations.push(format!(
            "usage of {user_id}: {window:?} at {start} counts {count}, more than the {done} that happened"
        ));
    }
}

/// A user's rows of each window: no more than the pruning keeps, none older than it counts.
fn check_usage_rows_kept(user_id: &str, rows: BTreeMap<u8, Vec<i64>>, violations: &mut Violations) {
    for (tag, starts) in rows {
        let Some(window) = Window::from_tag(tag) else {
            continue;
        };
        let span = starts.last().copied().unwrap_or(0) - starts.first().copied().unwrap_or(0);
        let oldest_kept = window
            .oldest_counted(Timestamp(starts.last().copied().unwrap_or(0)))
            .micros();
        if starts.len() > window.max_rows() || starts.first().is_some_and(|&s| s < oldest_kept) {
            violations.push(format!(
                "usage of {user_id}: {} {window:?} rows over {span} µs, more than are counted",
                starts.len()
            ));
        }
    }
}

/// SHA-256 over every row of every table, in key order: equal on replicas that applied the same log.
pub fn state_hash(txn: &ReadTransaction) -> Result<String, StoreError> {
    let mut hashing = Hashing {
        txn,
        hasher: StateHasher::default(),
    };
    tables::visit_all(&mut hashing)?;
    Ok(hashing.hasher.finish())
}

/// The digest behind `state_hash`, fed table by table (in `visit_all` order) and row by row, so that a
/// shard file and an exported stream of it (`snapshot::hash_export`) hash alike.
#[derive(Default)]
pub struct StateHasher {
    hasher: Sha256,
}

impl StateHasher {
    /// Starts the table `name` (every table is hashed, even an empty one).
    pub fn table(&mut self, name: &str) {
        self.hasher.update((name.len() as u64).to_le_bytes());
        self.hasher.update(name.as_bytes());
    }

    /// One row of the current table, as raw redb key and value bytes.
    pub fn row(&mut self, key: &[u8], value: &[u8]) {
        self.hasher.update((key.len() as u64).to_le_bytes());
        self.hasher.update(key);
        self.hasher.update((value.len() as u64).to_le_bytes());
        self.hasher.update(value);
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

struct Hashing<'a> {
    txn: &'a ReadTransaction,
    hasher: StateHasher,
}

impl TableVisitor for Hashing<'_> {
    fn visit<K: Key + 'static, V: Value + 'static>(
        &mut self,
        _tag: u8,
        definition: TableDefinition<'static, K, V>,
    ) -> Result<(), StoreError> {
        self.hasher.table(&definition.to_string());
        let hasher = &mut self.hasher;
        tables::for_each_raw_row(self.txn, definition, |key, value| {
            hasher.row(key, value);
            Ok(())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Entitlement, Timestamp};
    use crate::state::ShardStore;

    /// Writes `user` straight into the user rows, as a corrupt or tampered file would hold it.
    fn put_user(store: &ShardStore, user: &User) {
        let txn = store.begin_write().expect("writes");
        {
            let mut rows = txn.open_table(user_rows::USER_ROWS).expect("user rows");
            user_rows::put_user(&mut rows, user).expect("inserts");
        }
        txn.commit().expect("commits");
    }

    #[test]
    fn a_fresh_shard_has_no_violation_and_a_wallet_without_its_postings_is_one() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        let clean = audit(&store.begin_read().expect("reads"), 0).expect("audits");
        assert!(clean.violations.is_empty(), "{:?}", clean.violations);

        put_user(
            &store,
            &User {
                user_id: "forged".into(),
                display_name: None,
                created_at: Timestamp::from_unix_seconds(1),
                balance: Money::from_minor(100),
                held: Money::ZERO,
                ledger_seq: 0,
            },
        );
        let report = audit(&store.begin_read().expect("reads"), 0).expect("audits");
        assert_eq!(report.users, 1);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v == "wallet forged: balance 100 != sum of postings 0"),
            "{:?}",
            report.violations
        );
        assert!(
            report
                .violations
                .iter()
                .any(|v| v == "accounts do not sum to zero"),
            "{:?}",
            report.violations
        );
    }

    /// A usage row that counts what did not happen, of no user, or beyond what the pruning keeps is a
    /// violation; so is an overrides row of no user.
    #[test]
    fn usage_rows_that_count_more_than_happened_or_are_not_pruned_are_violations() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        let day = 86_400_000_000i64;
        let txn = store.begin_write().expect("writes");
        {
            let mut usage = txn.open_table(tables::USAGE).expect("usage");
            usage
                .insert(("ghost", Window::SpendPerDay.tag(), day), 500)
                .expect("inserts");
            usage
                .insert(("ghost", Window::SpendPerDay.tag(), 2 * day), 0)
                .expect("inserts");
            usage
                .insert(("ghost", Window::OrdersPerHour.tag(), 17), 0)
                .expect("inserts");
            let mut limits = txn.open_table(tables::USER_LIMITS).expect("limits");
            let bytes = tables::encode(&LimitSet::default()).expect("encodes");
            limits.insert("ghost", bytes.as_slice()).expect("inserts");
        }
        txn.commit().expect("commits");
        let report = audit(&store.begin_read().expect("reads"), 0).expect("audits");
        let found = |text: &str| report.violations.iter().any(|v| v.contains(text));
        assert!(
            found("more than the 0 that happened"),
            "{:?}",
            report.violations
        );
        assert!(
            found("usage of ghost, who is not a user"),
            "{:?}",
            report.violations
        );
        assert!(found("starts no window"), "{:?}", report.violations);
        assert!(found("2 SpendPerDay rows"), "{:?}", report.violations);
        assert!(
            found("limits of ghost, who is not a user"),
            "{:?}",
            report.violations
        );
    }

    /// Rows of the user-keyed tables that no user's walk reaches (of a user who does not exist) are
    /// violations, found by counting, not by holding every user's rows in memory.
    #[test]
    fn rows_of_a_user_who_does_not_exist_are_violations() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        let txn = store.begin_write().expect("writes");
        {
            let entitlement = Entitlement {
                item_id: "sword".into(),
                kind: crate::domain::ItemKind::Skin,
                granted: 1,
                revoked: 0,
                consumed: 0,
                granted_at: Timestamp::from_unix_seconds(1),
            };
            let mut rows = txn.open_table(user_rows::USER_ROWS).expect("user rows");
            user_rows::put_entitlement(&mut rows, "ghost", &entitlement).expect("inserts");
            txn.open_table(tables::USER_PENDING)
                .expect("pending")
                .insert(("ghost", 7u128), (1i64, 100i64))
                .expect("inserts");
        }
        txn.commit().expect("commits");
        let report = audit(&store.begin_read().expect("reads"), 0).expect("audits");
        let found = |text: &str| report.violations.iter().any(|v| v.contains(text));
        assert!(
            found("user rows: 1 rows, but the users' own indexes reach 0"),
            "{:?}",
            report.violations
        );
        assert!(
            found("pending orders: 1 rows, but the users' own indexes reach 0"),
            "{:?}",
            report.violations
        );
    }

    /// The reversals of a credit that sum to more than it brought in, and a reversal missing from the
    /// index of its source, are violations: found walking the index, one source at a time.
    #[test]
    fn reversals_beyond_what_their_credit_brought_in_or_missing_from_its_index_are_violations() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        let credit = Credit {
            credit_id: uuid::Uuid::from_u128(1),
            user_id: "u1".into(),
            amount: Money::from_minor(500),
            external_ref: "ref-1".into(),
            source: None,
            created_at: Timestamp::from_unix_seconds(1),
        };
        let reversal = |id: u128, amount: i64| Reversal {
            reversal_id: uuid::Uuid::from_u128(id),
            user_id: "u1".into(),
            source: ReversalSource::Credit {
                credit_id: credit.credit_id,
                external_ref: credit.external_ref.clone(),
            },
            amount: Money::from_minor(amount),
            reason: crate::domain::ReversalReason::Chargeback,
            external_ref: format!("psp:{id}"),
            from_hold: Money::ZERO,
            from_wallet: Money::from_minor(amount),
            debt: Money::ZERO,
            revoked_refunds: Vec::new(),
            revoked_amount: Money::ZERO,
            created_at: Timestamp::from_unix_seconds(2),
        };
        let txn = store.begin_write().expect("writes");
        {
            let bytes = tables::encode(&credit).expect("encodes");
            txn.open_table(tables::CREDITS)
                .expect("credits")
                .insert("ref-1", bytes.as_slice())
                .expect("inserts");
            let mut reversals = txn.open_table(tables::REVERSALS).expect("reversals");
            let mut index = txn.open_table(tables::SOURCE_REVERSALS).expect("index");
            for (id, amount, indexed) in [(10, 300, true), (11, 300, true), (12, 100, false)] {
                let bytes = tables::encode(&reversal(id, amount)).expect("encodes");
                reversals.insert(id, bytes.as_slice()).expect("inserts");
                if indexed {
                    index.insert((1u128, id), ()).expect("inserts");
                }
            }
        }
        txn.commit().expect("commits");
        let report = audit(&store.begin_read().expect("reads"), 0).expect("audits");
        let found = |text: &str| report.violations.iter().any(|v| v.contains(text));
        assert!(
            found(&format!(
                "the reversals of {} sum to 600, more than the 500 it brought in",
                credit.credit_id
            )),
            "{:?}",
            report.violations
        );
        assert!(
            found("reversals: 3 rows, but the index of their sources reaches 2"),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn violations_past_the_listed_ones_are_counted_in_a_last_line() {
        let mut violations = Violations::default();
        for n in 0..MAX_LISTED_VIOLATIONS + 5 {
            violations.push(format!("violation {n}"));
        }
        let list = violations.into_list();
        assert_eq!(list.len(), MAX_LISTED_VIOLATIONS + 1);
        assert_eq!(
            list[MAX_LISTED_VIOLATIONS - 1],
            format!("violation {}", MAX_LISTED_VIOLATIONS - 1)
        );
        assert_eq!(
            list[MAX_LISTED_VIOLATIONS],
            format!("5 more violations not listed (the first {MAX_LISTED_VIOLATIONS} are)")
        );
    }

    /// An event removed from the middle of the outbox (a change without its event) is a violation.
    #[test]
    fn a_gap_in_the_outbox_is_a_violation() {
        use crate::domain::command::CreateUser;
        use crate::domain::{Command, Envelope, IdSeed};
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        for (n, user) in (1u128..).zip(["a", "b", "c"]) {
            let envelope = Envelope {
                now: Timestamp::from_unix_seconds(1_800_000_000),
                seed: IdSeed {
                    unix_millis: 1,
                    entropy: n,
                },
                idempotency: None,
                command: Command::CreateUser(CreateUser {
                    user_id: user.to_owned(),
                    display_name: None,
                }),
            };
            store.apply_batch(&[&envelope]).expect("applies");
        }
        let clean = audit(&store.begin_read().expect("reads"), 0).expect("audits");
        assert!(clean.violations.is_empty(), "{:?}", clean.violations);
        let txn = store.begin_write().expect("writes");
        txn.open_table(tables::EVENTS)
            .expect("events")
            .remove(2)
            .expect("removes");
        txn.commit().expect("commits");
        let report = audit(&store.begin_read().expect("reads"), 0).expect("audits");
        assert_eq!(report.violations, ["event seq 3 follows 1: a gap"]);
    }
}
