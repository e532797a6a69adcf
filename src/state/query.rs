//! Reads of one shard, for the HTTP read endpoints and the background tasks.
//!
//! Reads happen in a redb read transaction (a consistent snapshot that never blocks the writer). Anything
//! time-dependent is computed "as of" the reader's `now`: a pending order past its deadline reads as
//! cancelled, and its hold is left out of the wallet, even before the sweeper has written that down.

use std::ops::Bound;

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};
use uuid::Uuid;

use super::tables::{self, decode, get};
use super::user_rows;
use super::{IdempotencyRecord, MetaState, StoreError};
use crate::domain::limits::{LimitSet, ShopLimits, Usage, Window};
use crate::domain::{
    Credit, Dispute, Entitlement, Event, EventLog, EventType, Freeze, Item, Money, Order,
    OrderStatus, Posting, PostingRef, RefClaim, Timestamp, Topup, User, WalletView, Webhook,
};

pub fn meta(txn: &ReadTransaction) -> Result<MetaState, StoreError> {
    let table = txn.open_table(tables::META)?;
    Ok(get(&table, tables::META_STATE_KEY)?.unwrap_or_default())
}

/// The replication marker stored with the state, if any.
pub fn marker(txn: &ReadTransaction) -> Result<Option<Vec<u8>>, StoreError> {
    let table = txn.open_table(tables::META)?;
    Ok(table
        .get(tables::MARKER_KEY)?
        .map(|v| v.value().to_vec())
        .filter(|m| !m.is_empty()))
}

pub fn user(txn: &ReadTransaction, user_id: &str) -> Result<Option<User>, StoreError> {
    user_rows::user(&txn.open_table(user_rows::USER_ROWS)?, user_id)
}

/// The user's wallet as of `now`: holds of pending orders whose deadline has passed are released.
pub fn wallet_at(
    txn: &ReadTransaction,
    user: &User,
    now: Timestamp,
) -> Result<WalletView, StoreError> {
    let pending = txn.open_table(tables::USER_PENDING)?;
    let mut expired_holds = Money::ZERO;
    let user_id = user.user_id.as_str();
    let out_of_range = || StoreError::Corrupt(format!("holds of {user_id} out of range"));
    for entry in pending.range((user_id, 0u128)..=(user_id, u128::MAX))? {
        let (expires_at, total) = entry?.1.value();
        if expires_at <= now.micros() {
            expired_holds = expired_holds
                .checked_add(Money::from_minor(total))
                .ok_or_else(out_of_range)?;
        }
    }
    let wallet = WalletView {
        balance: user.balance,
        held: user
            .held
            .checked_sub(expired_holds)
            .ok_or_else(out_of_range)?,
    };
    debug_assert!(!wallet.held.is_negative() && wallet.held <= wallet.balance);
    Ok(wallet)
}

pub fn order(txn: &ReadTransaction, order_id: Uuid) -> Result<Option<Order>, StoreError> {
    get(&txn.open_table(tables::ORDERS)?, order_id.as_u128())
}

/// Where a page of a user's orders starts: the (created_at, order_id) of the last order already shown.
pub type OrderCursor = (i64, u128);

/// A page of a user's orders, newest first, as of `now`, optionally of one status.
pub fn orders_page(
    txn: &ReadTransaction,
    user_id: &str,
    status: Option<OrderStatus>,
    limit: usize,
    before: Option<OrderCursor>,
    now: Timestamp,
) -> Result<(Vec<Order>, Option<OrderCursor>), StoreError> {
    let index = txn.open_table(user_rows::USER_ROWS)?;
    let orders = txn.open_table(tables::ORDERS)?;
    let end = before.map_or(Bound::Unbounded, Bound::Excluded);
    let range = user_rows::orders(&index, user_id, Bound::Unbounded, end)?;
    let mut page = Vec::with_capacity(limit);
    let mut more = false;
    for entry in range.rev() {
        let (created_at, order_id) = entry?;
        let order: Order = get(&orders, order_id)?
            .ok_or_else(|| StoreError::Corrupt(format!("indexed order {order_id} has no row")))?;
        let order = order.as_of(now);
        if status.is_some_and(|s| s != order.status) {
            continue;
        }
        if page.len() == limit {
            more = true;
            break;
        }
        debug_assert_eq!(order.created_at.micros(), created_at);
        page.push(order);
    }
    let next = if more {
        page.last()
            .map(|o| (o.created_at.micros(), o.order_id.as_u128()))
    } else {
        None
    };
    Ok((page, next))
}

/// A page of a user's ledger, oldest first, starting after entry `after_seq`.
pub fn ledger_page(
    txn: &ReadTransaction,
    user_id: &str,
    after_seq: u64,
    limit: usize,
) -> Result<(Vec<Posting>, Option<u64>), StoreError> {
    let index = txn.open_table(user_rows::USER_ROWS)?;
    let postings = txn.open_table(tables::POSTINGS)?;
    let mut page = Vec::with_capacity(limit);
    let mut more = false;
    if after_seq == u64::MAX {
        return Ok((page, None));
    }
    for entry in user_rows::postings(&index, user_id, after_seq + 1)? {
        if page.len() == limit {
            more = true;
            break;
        }
        let (_, seq) = entry?;
        let bytes = postings.get(seq)?.ok_or_else(|| {
            StoreError::Corrupt(format!("ledger entry points at missing posting {seq}"))
        })?;
        page.push(super::apply::decode_posting(bytes.value())?);
    }
    let next = if more {
        page.last().map(|p| p.user_seq)
    } else {
        None
    };
    Ok((page, next))
}

/// The user's entitlements with a quantity above zero, by item id.
pub fn entitlements(txn: &ReadTransaction, user_id: &str) -> Result<Vec<Entitlement>, StoreError> {
    let table = txn.open_table(user_rows::USER_ROWS)?;
    let mut list = Vec::new();
    for entitlement in user_rows::entitlements(&table, user_id)? {
        let entitlement = entitlement?;
        if entitlement.quantity() > 0 {
            list.push(entitlement);
        }
    }
    Ok(list)
}

pub fn topup(txn: &ReadTransaction, topup_id: Uuid) -> Result<Option<Topup>, StoreError> {
    get(&txn.open_table(tables::TOPUPS)?, topup_id.as_u128())
}

pub fn item(txn: &ReadTransaction, item_id: &str) -> Result<Option<Item>, StoreError> {
    get(&txn.open_table(tables::ITEMS)?, item_id)
}

/// The whole catalog, by item id (bounded by `MAX_CATALOG_ITEMS`).
pub fn items(txn: &ReadTransaction) -> Result<Vec<Item>, StoreError> {
    let table = txn.open_table(tables::ITEMS)?;
    let mut list = Vec::new();
    for entry in table.iter()? {
        list.push(tables::decode(entry?.1.value())?);
    }
    Ok(list)
}

pub fn idempotency(
    txn: &ReadTransaction,
    scope: &str,
    key: &str,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    get(&txn.open_table(tables::IDEMPOTENCY)?, (scope, key))
}

/// Is there background work due at `now` (an order or top-up to expire, an outcome to purge, a final
/// top-up older than `topup_retention`)?
pub fn sweep_due(
    txn: &ReadTransaction,
    now: Timestamp,
    topup_retention: std::time::Duration,
) -> Result<bool, StoreError> {
    let bound = now.micros().saturating_add(1);
    let final_topups = txn.open_table(tables::FINAL_TOPUPS)?;
    let purge_bound = crate::domain::topup_purge_bound(now, topup_retention.as_secs());
    if final_topups.range(..(purge_bound, 0u128))?.next().is_some() {
        return Ok(true);
    }
    let orders = txn.open_table(tables::PENDING_ORDERS)?;
    if orders.range(..(bound, 0u128))?.next().is_some() {
        return Ok(true);
    }
    let topups = txn.open_table(tables::PENDING_TOPUPS)?;
    if topups.range(..(bound, 0u128))?.next().is_some() {
        return Ok(true);
    }
    let records = txn.open_table(tables::IDEMPOTENCY_EXPIRY)?;
    Ok(records.range(..(bound, "", ""))?.next().is_some())
}

/// What a read-only look at the shard's idempotency records found (see `idempotency_walk`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WalkLook {
    /// Whether the shard purges by walking yet (`PurgeIdempotency` ran once on it).
    pub walking: bool,
    /// The first record of the window whose retention ended by `now`.
    pub first_due: Option<(String, String)>,
    /// Where the window ended: the first record after it (`None`: the window reached the last record).
    pub after_window: Option<(String, String)>,
}

/// Looks at no more than `window(records in the shard)` idempotency records from (`scope`, `key`) on,
/// for the sweeper to propose a `PurgeIdempotency` only where one is due (and its first one on a shard
/// that is not walking yet). Reads each record's retention only, not its outcome.
pub fn idempotency_walk(
    txn: &ReadTransaction,
    from: (&str, &str),
    now: Timestamp,
    window: impl FnOnce(u64) -> usize,
) -> Result<WalkLook, StoreError> {
    let meta = txn.open_table(tables::META)?;
    let mut look = WalkLook {
        walking: get(&meta, tables::IDEMPOTENCY_WALK_KEY)?.unwrap_or(false),
        ..WalkLook::default()
    };
    let table = txn.open_table(tables::IDEMPOTENCY)?;
    let window = window(table.len()?);
    for (seen, entry) in table.range(from..)?.enumerate() {
        let (k, v) = entry?;
        let (scope, key) = k.value();
        if seen == window {
            look.after_window = Some((scope.to_owned(), key.to_owned()));
            break;
        }
        if crate::state::idempotency_expiry(v.value())? <= now {
            look.first_due = Some((scope.to_owned(), key.to_owned()));
            break;
        }
    }
    Ok(look)
}

/// The outbox's bookkeeping (all zero before the shard's first event).
pub fn event_log(txn: &ReadTransaction) -> Result<EventLog, StoreError> {
    let table = txn.open_table(tables::META)?;
    Ok(get(&table, tables::EVENT_LOG_KEY)?.unwrap_or_default())
}

/// What a scan of the outbox found: the events of the wanted types, oldest first, and the seq the scan
/// covered (every event up to it was looked at, taken or not).
pub struct EventScan {
    pub events: Vec<(u64, Event)>,
    pub scanned_through: u64,
}

/// The shard's events after seq `after`, oldest first: at most `limit` of the wanted types (`None`: every
/// type), looking at no more than `max_scanned` events in all.
pub fn events_after(
    txn: &ReadTransaction,
    after: u64,
    limit: usize,
    types: Option<&[EventType]>,
    max_scanned: usize,
) -> Result<EventScan, StoreError> {
    let table = txn.open_table(tables::EVENTS)?;
    let mut scan = EventScan {
        events: Vec::new(),
        scanned_through: after,
    };
    for entry in table.range(after.saturating_add(1)..)?.take(max_scanned) {
        if scan.events.len() >= limit {
            break;
        }
        let (seq, bytes) = entry?;
        let event: Event = tables::decode(bytes.value())?;
        scan.scanned_through = seq.value();
        if types.is_none_or(|wanted| wanted.contains(&event.event_type)) {
            scan.events.push((seq.value(), event));
        }
    }
    Ok(scan)
}

/// Every webhook row of the shard (deleted ones included), by name.
pub fn webhooks(txn: &ReadTransaction) -> Result<Vec<Webhook>, StoreError> {
    let mut all = Vec::new();
    for entry in txn.open_table(tables::WEBHOOKS)?.iter()? {
        all.push(tables::decode(entry?.1.value())?);
    }
    Ok(all)
}

/// Whether `PurgeEvents` at `now` has work: the shard's oldest event is past `retention` and either every
/// live webhook acknowledged it or it is past `max_retention`.
pub fn events_purge_due(
    txn: &ReadTransaction,
    now: Timestamp,
    retention: std::time::Duration,
    max_retention: std::time::Duration,
) -> Result<bool, StoreError> {
    let table = txn.open_table(tables::EVENTS)?;
    let Some(first) = table.first()? else {
        return Ok(false);
    };
    let (seq, event): (u64, Event) = (first.0.value(), tables::decode(first.1.value())?);
    let before = |span: std::time::Duration| now.minus(span).micros();
    if event.occurred_at.micros() >= before(retention) {
        return Ok(false);
    }
    let acknowledged = webhooks(txn)?
        .iter()
        .filter(|w| !w.deleted)
        .all(|w| w.position >= seq);
    Ok(acknowledged || event.occurred_at.micros() < before(max_retention))
}

/// The user's freeze, if the account is frozen.
pub fn frozen(txn: &ReadTransaction, user_id: &str) -> Result<Option<Freeze>, StoreError> {
    get(&txn.open_table(tables::FROZEN)?, user_id)
}

/// The `receivable` system account's balance (0 before the shard's first debt).
pub fn receivable(txn: &ReadTransaction) -> Result<i64, StoreError> {
    Ok(get(&txn.open_table(tables::META)?, tables::RECEIVABLE_KEY)?.unwrap_or(0))
}

/// What the user owes the shop.
pub fn debt(txn: &ReadTransaction, user_id: &str) -> Result<Money, StoreError> {
    let debts = txn.open_table(tables::DEBTS)?;
    let minor = debts.get(user_id)?.map_or(0, |d| d.value());
    Ok(Money::from_minor(minor))
}

/// The `external_ref` of the user's credit `credit_id` (its key in `CREDITS`), if there is one: from the
/// index of credits made since reversals exist. A credit older than that index is looked for only if the
/// user's own ledger has it (a scan of the user's entries, not of the shard), then by a scan of the shard's
/// credits: an unknown id costs one user's ledger, never the shard's credits.
pub fn credit_ref(
    txn: &ReadTransaction,
    user_id: &str,
    credit_id: Uuid,
) -> Result<Option<String>, StoreError> {
    let credits = txn.open_table(tables::CREDITS)?;
    let indexed = txn
        .open_table(tables::CREDIT_IDS)?
        .get(credit_id.as_u128())?
        .map(|r| r.value().to_owned());
    let owned = |credit: &Credit| credit.user_id == user_id && credit.credit_id == credit_id;
    if let Some(reference) = indexed {
        let credit: Option<Credit> = get(&credits, reference.as_str())?;
        return Ok(credit.filter(owned).map(|_| reference));
    }
    if !ledger_has_credit(txn, user_id, credit_id)? {
        return Ok(None);
    }
    for entry in credits.iter()? {
        let (key, value) = entry?;
        let credit: Credit = decode(value.value())?;
        if owned(&credit) {
            return Ok(Some(key.value().to_owned()));
        }
    }
    Ok(None)
}

/// Whether one of the user's ledger entries is the credit `credit_id`.
fn ledger_has_credit(
    txn: &ReadTransaction,
    user_id: &str,
    credit_id: Uuid,
) -> Result<bool, StoreError> {
    let postings = txn.open_table(tables::POSTINGS)?;
    let index = txn.open_table(user_rows::USER_ROWS)?;
    for entry in user_rows::postings(&index, user_id, 0)? {
        let (_, seq) = entry?;
        let posting: Option<Posting> = get(&postings, seq)?;
        if posting.is_some_and(|p| p.reference == PostingRef::Credit(credit_id)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The user's dispute `dispute_id`, if the PSP opened or closed it here.
pub fn dispute(
    txn: &ReadTransaction,
    user_id: &str,
    dispute_id: &str,
) -> Result<Option<Dispute>, StoreError> {
    get(&txn.open_table(tables::DISPUTES)?, (user_id, dispute_id))
}

/// The PSP payment `psp_payment_id`'s claim (which user and top-up it completed), on its home shard.
pub fn psp_payment_claim(
    txn: &ReadTransaction,
    psp_payment_id: &str,
) -> Result<Option<RefClaim>, StoreError> {
    get(
        &txn.open_table(tables::EXTERNAL_REFS)?,
        format!("psp:{psp_payment_id}").as_str(),
    )
}

/// This shard's copy of the shop-wide limits (`None`: never set).
pub fn shop_limits(txn: &ReadTransaction) -> Result<Option<ShopLimits>, StoreError> {
    get(
        &txn.open_table(tables::SHOP_LIMITS)?,
        tables::SHOP_LIMITS_KEY,
    )
}

/// A user's overrides of the shop-wide limits (all `Default` when it has none), the shop-wide limits
/// as the user's shard has them, and what the limits count as of `now`.
pub fn user_limits(
    txn: &ReadTransaction,
    user_id: &str,
    now: Timestamp,
) -> Result<(LimitSet, LimitSet, Usage), StoreError> {
    let overrides = get(&txn.open_table(tables::USER_LIMITS)?, user_id)?.unwrap_or_default();
    let shop = shop_limits(txn)?.map(|s| s.limits).unwrap_or_default();
    let usage_rows = txn.open_table(tables::USAGE)?;
    let mut pending_topups = 0u64;
    for entry in txn
        .open_table(tables::USER_PENDING_TOPUPS)?
        .range((user_id, 0u128)..=(user_id, u128::MAX))?
    {
        if entry?.1.value() > now.micros() {
            pending_topups += 1;
        }
    }
    let usage = Usage {
        spent_today: Money::from_minor(usage_in(&usage_rows, user_id, Window::SpendPerDay, now)?),
        orders_this_hour: u64::try_from(usage_in(
            &usage_rows,
            user_id,
            Window::OrdersPerHour,
            now,
        )?)
        .unwrap_or(0),
        refunds_in_window: u64::try_from(usage_in(
            &usage_rows,
            user_id,
            Window::RefundsPerDay,
            now,
        )?)
        .unwrap_or(0),
        pending_topups,
    };
    Ok((overrides, shop, usage))
}

/// The rows of `window` a user's limits count at `now` (oldest first): (row start, count).
pub fn usage_rows(
    table: &impl ReadableTable<(&'static str, u8, i64), i64>,
    user_id: &str,
    window: Window,
    now: Timestamp,
) -> Result<Vec<(Timestamp, i64)>, StoreError> {
    let from = window.oldest_counted(now).micros();
    let mut rows = Vec::new();
    for entry in table.range((user_id, window.tag(), from)..=(user_id, window.tag(), i64::MAX))? {
        let (key, value) = entry?;
        rows.push((Timestamp(key.value().2), value.value()));
    }
    Ok(rows)
}

/// What `window` counts for a user at `now` (the sum of its counted rows).
pub fn usage_in(
    table: &impl ReadableTable<(&'static str, u8, i64), i64>,
    user_id: &str,
    window: Window,
    now: Timestamp,
) -> Result<i64, StoreError> {
    let rows = usage_rows(table, user_id, window, now)?;
    Ok(rows.iter().fold(0i64, |sum, (_, n)| sum.saturating_add(*n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Reply;
    use crate::domain::command::{self, Command};
    use crate::state::{ShardStore, test_envelope as envelope};

    /// A credit made before `CREDIT_IDS` existed has no index row: it is found through its user's ledger
    /// and the shard's credits; an id the user's ledger does not have is not looked for any further.
    #[test]
    fn a_credit_without_its_index_row_is_found_through_its_users_ledger() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        let create = Command::CreateUser(command::CreateUser {
            user_id: "u1".into(),
            display_name: None,
        });
        let credit = Command::Credit(command::Credit {
            user_id: "u1".into(),
            amount: Money::from_minor(500),
            external_ref: "old-ref".into(),
            source: None,
            ref_accepted: true,
        });
        let applied = store
            .apply_batch(&[&envelope(1, create), &envelope(2, credit)])
            .expect("applies");
        let Ok(Reply::Credited { credit, .. }) = &applied[1].outcome else {
            panic!("not credited: {:?}", applied[1]);
        };
        let credit_id = credit.credit_id;
        let txn = store.begin_write().expect("writes");
        txn.open_table(tables::CREDIT_IDS)
            .expect("index")
            .remove(credit_id.as_u128())
            .expect("removes");
        txn.commit().expect("commits");

        let read = store.begin_read().expect("reads");
        assert_eq!(
            credit_ref(&read, "u1", credit_id).expect("reads"),
            Some("old-ref".to_owned())
        );
        assert_eq!(credit_ref(&read, "u2", credit_id).expect("reads"), None);
        assert_eq!(
            credit_ref(&read, "u1", Uuid::from_u128(7)).expect("reads"),
            None
        );
    }
}
