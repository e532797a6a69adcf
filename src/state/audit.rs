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
//!   time order, and no webhook's position is beyond the newest.

use std::collections::{BTreeMap, HashMap};

use redb::{Key, ReadTransaction, ReadableTable, TableDefinition, Value};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::tables::{self, TableVisitor, decode};
use super::{MetaState, StoreError, query};
use crate::domain::{
    Credit, Dispute, Entitlement, Money, Order, OrderStatus, Posting, Reversal, ReversalSource,
    Topup, TopupStatus, User,
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
pub fn audit(txn: &ReadTransaction, shard: u32) -> Result<ShardAudit, StoreError> {
    let meta = query::meta(txn)?;
    let mut violations = Vec::new();
    let postings = audit_postings(txn, &meta, &mut violations)?;
    let posting_count = postings.count;
    let user_count = audit_wallets(txn, postings, &mut violations)?;
    let (order_count, expected_grants) = audit_orders(txn, &mut violations)?;
    audit_entitlements(txn, expected_grants, &mut violations)?;
    audit_topup_indexes(txn, &mut violations)?;
    audit_reversals(txn, &mut violations)?;
    audit_events(txn, &mut violations)?;

    Ok(ShardAudit {
        shard,
        last_applied: meta.last_applied,
        users: user_count,
        orders: order_count,
        postings: posting_count,
        state_hash: state_hash(txn)?,
        violations,
    })
}

/// What the postings add up to: per wallet, per system account, and how many there are.
struct PostingSums {
    wallets: HashMap<String, WalletSums>,
    psp_clearing: i128,
    revenue: i128,
    receivable: i128,
    count: u64,
}

/// (user, item) → (granted, revoked) as completed orders and their refunds say.
type ExpectedGrants = BTreeMap<(String, String), (u64, u64)>;

/// The posting chain, each posting's accounts, and the sums per wallet and system account.
fn audit_postings(
    txn: &ReadTransaction,
    meta: &MetaState,
    violations: &mut Vec<String>,
) -> Result<PostingSums, StoreError> {
    let mut wallets: HashMap<String, WalletSums> = HashMap::new();
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
        let (balance_delta, held_delta) = posting.kind.wallet_delta(posting.amount);
        let sums = wallets.entry(posting.user_id.clone()).or_default();
        sums.balance += balance_delta;
        sums.held += held_delta;
        sums.debt += posting.kind.debt_delta(posting.amount);
        sums.entries += 1;
        if sums.entries != posting.user_seq
            || sums.balance != i128::from(posting.balance_after.minor())
            || sums.held != i128::from(posting.held_after.minor())
        {
            violations.push(format!(
                "posting {} disagrees with the running wallet of {}",
                posting.seq, posting.user_id
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
        wallets,
        psp_clearing,
        revenue,
        receivable,
        count: posting_count,
    })
}

/// Each wallet against the sums of its postings and its pending orders; the accounts sum to zero.
/// Returns how many users there are.
fn audit_wallets(
    txn: &ReadTransaction,
    postings: PostingSums,
    violations: &mut Vec<String>,
) -> Result<u64, StoreError> {
    let PostingSums {
        mut wallets,
        psp_clearing,
        revenue,
        receivable,
        ..
    } = postings;
    let mut pending_holds: HashMap<String, i128> = HashMap::new();
    for entry in txn.open_table(tables::USER_PENDING)?.iter()? {
        let (key, value) = entry?;
        *pending_holds.entry(key.value().0.to_owned()).or_default() += i128::from(value.value().1);
    }
    for entry in txn.open_table(tables::DISPUTES)?.iter()? {
        let dispute: Dispute = decode(entry?.1.value())?;
        *pending_holds.entry(dispute.user_id.clone()).or_default() +=
            i128::from(dispute.held.minor());
    }
    let debts = txn.open_table(tables::DEBTS)?;
    let mut debt_total = 0i128;

    // Wallets.
    let mut user_count = 0u64;
    let mut wallet_total = 0i128;
    for entry in txn.open_table(tables::USERS)?.iter()? {
        let user: User = decode(entry?.1.value())?;
        user_count += 1;
        wallet_total += i128::from(user.balance.minor());
        let sums = wallets.remove(&user.user_id).unwrap_or_default();
        let id = &user.user_id;
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
        let pending = pending_holds.remove(id).unwrap_or(0);
        if i128::from(user.held.minor()) != pending {
            violations.push(format!(
                "wallet {id}: held {} != pending orders and dispute holds {pending}",
                user.held.minor()
            ));
        }
        let debt = i128::from(debts.get(id.as_str())?.map_or(0, |d| d.value()));
        debt_total += debt;
        if debt != sums.debt || debt < 0 {
            violations.push(format!(
                "wallet {id}: debt {debt} != sum of debt postings {} (or negative)",
                sums.debt
            ));
        }
        if user.balance.is_negative() || user.held.is_negative() || user.held > user.balance {
            violations.push(format!("wallet {id}: negative balance or available"));
        }
    }
    for user_id in wallets.keys().chain(pending_holds.keys()) {
        violations.push(format!(
            "postings or pending orders reference unknown user {user_id}"
        ));
    }
    if wallet_total + psp_clearing + revenue + receivable != 0 {
        violations.push("accounts do not sum to zero".to_owned());
    }
    if receivable != -debt_total {
        violations.push(format!(
            "receivable {receivable} is not minus the debts summed ({debt_total})"
        ));
    }
    Ok(user_count)
}

/// Each order's totals, refunds and pending index; returns how many orders there are and what the
/// completed ones granted.
fn audit_orders(
    txn: &ReadTransaction,
    violations: &mut Vec<String>,
) -> Result<(u64, ExpectedGrants), StoreError> {
    let pending_index = txn.open_table(tables::USER_PENDING)?;
    let mut expected_grants = ExpectedGrants::new();
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
        if order.status.was_completed() {
            for line in &order.lines {
                let e = expected_grants
                    .entry((order.user_id.clone(), line.item_id.clone()))
                    .or_default();
                e.0 = e.0.saturating_add(u64::from(line.quantity));
                e.1 = e.1.saturating_add(u64::from(line.refunded_quantity));
            }
        }
    }
    Ok((order_count, expected_grants))
}

/// Each entitlement against what orders granted and revoked; no grant without its row.
fn audit_entitlements(
    txn: &ReadTransaction,
    mut expected_grants: ExpectedGrants,
    violations: &mut Vec<String>,
) -> Result<(), StoreError> {
    for entry in txn.open_table(tables::ENTITLEMENTS)?.iter()? {
        let (key, value) = entry?;
        let (user_id, item_id) = key.value();
        let entitlement: Entitlement = decode(value.value())?;
        let (granted, revoked) = expected_grants
            .remove(&(user_id.to_owned(), item_id.to_owned()))
            .unwrap_or_default();
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
    for ((user_id, item_id), (granted, _)) in expected_grants {
        if granted > 0 {
            violations.push(format!(
                "entitlement {user_id}/{item_id}: completed orders granted it but no row exists"
            ));
        }
    }
    Ok(())
}

/// Each reversal is covered exactly, and no credit or top-up gives back more than it brought in.
fn audit_reversals(txn: &ReadTransaction, violations: &mut Vec<String>) -> Result<(), StoreError> {
    let mut brought_in: HashMap<u128, i128> = HashMap::new();
    for entry in txn.open_table(tables::CREDITS)?.iter()? {
        let credit: Credit = decode(entry?.1.value())?;
        brought_in.insert(
            credit.credit_id.as_u128(),
            i128::from(credit.amount.minor()),
        );
    }
    let topups = txn.open_table(tables::TOPUPS)?;
    let mut reversed: HashMap<u128, i128> = HashMap::new();
    for entry in txn.open_table(tables::REVERSALS)?.iter()? {
        let reversal: Reversal = decode(entry?.1.value())?;
        let id = reversal.reversal_id;
        let covered = i128::from(reversal.from_hold.minor())
            + i128::from(reversal.from_wallet.minor())
            + i128::from(reversal.debt.minor());
        if covered != i128::from(reversal.amount.minor()) || !reversal.amount.is_positive() {
            violations.push(format!("reversal {id}: hold + wallet + debt != amount"));
        }
        let source = reversal.source.id().as_u128();
        if let ReversalSource::Topup { topup_id } = reversal.source {
            if let Some(topup) = tables::get::<_, Topup, _>(&topups, topup_id.as_u128())? {
                brought_in.insert(source, i128::from(topup.amount.minor()));
            }
        }
        *reversed.entry(source).or_default() += i128::from(reversal.amount.minor());
    }
    for (source, total) in reversed {
        let limit = brought_in.get(&source).copied().unwrap_or(0);
        if total > limit {
            violations.push(format!(
                "the reversals of {} sum to {total}, more than the {limit} it brought in",
                uuid::Uuid::from_u128(source)
            ));
        }
    }
    Ok(())
}

/// The top-up indexes agree with the top-ups they point at.
fn audit_topup_indexes(
    txn: &ReadTransaction,
    violations: &mut Vec<String>,
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
fn audit_events(txn: &ReadTransaction, violations: &mut Vec<String>) -> Result<(), StoreError> {
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
    use crate::domain::Timestamp;
    use crate::state::ShardStore;

    /// Writes `user` straight into the users table, as a corrupt or tampered file would hold it.
    fn put_user(store: &ShardStore, user: &User) {
        let txn = store.begin_write().expect("writes");
        {
            let mut users = txn.open_table(tables::USERS).expect("users");
            let bytes = tables::encode(user).expect("encodes");
            users
                .insert(user.user_id.as_str(), bytes.as_slice())
                .expect("inserts");
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
