//! The redb tables of one shard and the encoding of their values.
//!
//! Keys are native redb types (strings, integers, tuples) so that ranges scan in a useful order; values are
//! postcard-encoded records from `domain`. Every table of a shard lives in that shard's one redb file.

use redb::{Key, ReadTransaction, ReadableTable, TableDefinition, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

pub(crate) type Bytes = &'static [u8];

/// name → postcard value (`MetaState`).
pub const META: TableDefinition<&str, Bytes> = TableDefinition::new("meta");
/// Schema 2's user_id → `User`: empty since schema 3 (`user_rows`, `super::migrate`).
pub const USERS: TableDefinition<&str, Bytes> = TableDefinition::new("users");
/// item_id → `Item`
pub const ITEMS: TableDefinition<&str, Bytes> = TableDefinition::new("items");
/// order_id → `Order`
pub const ORDERS: TableDefinition<u128, Bytes> = TableDefinition::new("orders");
/// Schema 2's (user_id, created_at, order_id) → (): empty since schema 3 (`user_rows`).
pub const USER_ORDERS: TableDefinition<(&str, i64, u128), ()> = TableDefinition::new("user_orders");
/// (expires_at, order_id) → user_id: the expiry sweeper's queue of pending orders.
pub const PENDING_ORDERS: TableDefinition<(i64, u128), &str> =
    TableDefinition::new("pending_orders");
/// (user_id, order_id) → (expires_at, total): a user's pending orders, to compute exact holds.
pub const USER_PENDING: TableDefinition<(&str, u128), (i64, i64)> =
    TableDefinition::new("user_pending");
/// seq → `Posting`: the shard's hash-chained journal.
pub const POSTINGS: TableDefinition<u64, Bytes> = TableDefinition::new("postings");
/// Schema 2's (user_id, user_seq) → seq: empty since schema 3 (`user_rows`).
pub const USER_POSTINGS: TableDefinition<(&str, u64), u64> = TableDefinition::new("user_postings");
/// Schema 2's (user_id, item_id) → `Entitlement`: empty since schema 3 (`user_rows`).
pub const ENTITLEMENTS: TableDefinition<(&str, &str), Bytes> = TableDefinition::new("entitlements");
/// external_ref → `Credit` (on the user's shard)
pub const CREDITS: TableDefinition<&str, Bytes> = TableDefinition::new("credits");
/// namespaced external reference → `RefClaim` (on the reference's home shard): global uniqueness.
pub const EXTERNAL_REFS: TableDefinition<&str, Bytes> = TableDefinition::new("external_refs");
/// topup_id → `Topup`
pub const TOPUPS: TableDefinition<u128, Bytes> = TableDefinition::new("topups");
/// (expires_at, topup_id) → (): pending top-ups, for the sweeper.
pub const PENDING_TOPUPS: TableDefinition<(i64, u128), ()> = TableDefinition::new("pending_topups");
/// (user_id, topup_id) → expires_at: a user's PENDING top-ups, for the cap on them.
pub const USER_PENDING_TOPUPS: TableDefinition<(&str, u128), i64> =
    TableDefinition::new("user_pending_topups");
/// (finished_at, topup_id) → (): EXPIRED and FAILED top-ups by when they became final, for their purge.
pub const FINAL_TOPUPS: TableDefinition<(i64, u128), ()> = TableDefinition::new("final_topups");
/// refund_id → `Refund`
pub const REFUNDS: TableDefinition<u128, Bytes> = TableDefinition::new("refunds");
/// (scope, key) → `IdempotencyRecord`
pub const IDEMPOTENCY: TableDefinition<(&str, &str), Bytes> = TableDefinition::new("idempotency");
/// (expires_at, scope, key) → (): idempotency records by retention deadline, for the purge — only those
/// stored before the shard's first `PurgeIdempotency` (`IDEMPOTENCY_WALK_KEY`); the later ones are found
/// by walking `IDEMPOTENCY`, so a keyed command writes one table fewer. It drains as they expire.
pub const IDEMPOTENCY_EXPIRY: TableDefinition<(i64, &str, &str), ()> =
    TableDefinition::new("idempotency_expiry");

/// seq → `Event`: the shard's outbox, oldest first (the transactional outbox of the event feed).
pub const EVENTS: TableDefinition<u64, Bytes> = TableDefinition::new("events");
/// name → `Webhook`: every webhook, with how far this shard's events were delivered to it.
pub const WEBHOOKS: TableDefinition<&str, Bytes> = TableDefinition::new("webhooks");

/// user_id → `Freeze`: the frozen accounts.
pub const FROZEN: TableDefinition<&str, Bytes> = TableDefinition::new("frozen");

/// user_id → what the user owes the shop, in minor units (above zero; no row: no debt).
pub const DEBTS: TableDefinition<&str, i64> = TableDefinition::new("debts");
/// reversal_id → `Reversal`.
pub const REVERSALS: TableDefinition<u128, Bytes> = TableDefinition::new("reversals");
/// (credit_id or topup_id, reversal_id): the reversals of each credit and top-up.
pub const SOURCE_REVERSALS: TableDefinition<(u128, u128), ()> =
    TableDefinition::new("source_reversals");
/// (user_id, PSP dispute_id) → `Dispute`.
pub const DISPUTES: TableDefinition<(&str, &str), Bytes> = TableDefinition::new("disputes");
/// credit_id → the credit's `external_ref` (its key in `CREDITS`), for credits made since reversals
/// exist; an older credit is found by a scan of `CREDITS`.
pub const CREDIT_IDS: TableDefinition<u128, &str> = TableDefinition::new("credit_ids");
/// `SHOP_LIMITS_KEY` → `ShopLimits`: this shard's copy of the shop-wide limits (absent: never set).
pub const SHOP_LIMITS: TableDefinition<&str, Bytes> = TableDefinition::new("shop_limits");
/// The key of the one row of `SHOP_LIMITS`.
pub const SHOP_LIMITS_KEY: &str = "shop";
/// user_id → `LimitSet`: a user's overrides of the shop-wide limits (absent: none; kept once written, even
/// overriding nothing: its presence keeps the user's usage counted).
pub const USER_LIMITS: TableDefinition<&str, Bytes> = TableDefinition::new("user_limits");
/// (user_id, `limits::Window` tag, window start) → count (minor units for spending): what a user's
/// limits count, written once limits are in use (the shard has `SHOP_LIMITS`, or the user a row of
/// `USER_LIMITS`). Pruned when written: at most 1 + 1 + 30 rows per user.
pub const USAGE: TableDefinition<(&str, u8, i64), i64> = TableDefinition::new("usage");

/// The key of the one `MetaState` row in `META`.
pub const META_STATE_KEY: &str = "state";
/// The key of the shard's applied time in `META` (a `Timestamp`: the latest time a command ran at;
/// absent in a shard that never applied a command).
pub const CLOCK_KEY: &str = "clock";
/// The key of the replication marker in `META` (opaque bytes of the Raft layer: last applied log id and
/// membership), written in the same transaction as the state it describes.
pub const MARKER_KEY: &str = "replication";
/// The key of the outbox's bookkeeping in `META` (an `EventLog`; absent before the shard's first event).
pub const EVENT_LOG_KEY: &str = "event_log";
/// The key of the `receivable` system account's balance in `META` (an `i64`: minus the debts, summed;
/// absent before the shard's first debt).
pub const RECEIVABLE_KEY: &str = "receivable";
/// The key in `META` present (a `bool`, `true`) once the shard purges idempotency outcomes by walking
/// `IDEMPOTENCY` (`PurgeIdempotency`): records stored after it get no `IDEMPOTENCY_EXPIRY` row.
pub const IDEMPOTENCY_WALK_KEY: &str = "idempotency_walk";

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|e| StoreError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Reads and decodes one value of a `&[u8]`-valued table.
pub fn get<'k, K, T, Tab>(
    table: &Tab,
    key: impl std::borrow::Borrow<K::SelfType<'k>>,
) -> Result<Option<T>, StoreError>
where
    K: redb::Key + 'static,
    T: DeserializeOwned,
    Tab: ReadableTable<K, Bytes>,
{
    match table.get(key)? {
        Some(guard) => Ok(Some(decode(guard.value())?)),
        None => Ok(None),
    }
}

/// Something done to every table of a shard, in one fixed order (hashing, snapshots).
pub trait TableVisitor {
    fn visit<K: Key + 'static, V: Value + 'static>(
        &mut self,
        tag: u8,
        table: TableDefinition<'static, K, V>,
    ) -> Result<(), StoreError>;
}

/// The tag of a table in the middle of [`visit_all`]'s order (orders and pending orders are before it,
/// postings and entitlements after): where the chaos suite crashes a snapshot install.
pub const HALFWAY_TAG: u8 = 6;

/// Visits every table of a shard with its stable tag. A new table must be added here, or snapshots and
/// `state_hash` would miss it (`tests::visit_all_visits_every_table_of_a_fresh_file` fails then).
pub fn visit_all(visitor: &mut impl TableVisitor) -> Result<(), StoreError> {
    visitor.visit(0, META)?;
    visitor.visit(1, USERS)?;
    visitor.visit(2, ITEMS)?;
    visitor.visit(3, ORDERS)?;
    visitor.visit(4, USER_ORDERS)?;
    visitor.visit(5, PENDING_ORDERS)?;
    visitor.visit(6, USER_PENDING)?;
    visitor.visit(7, POSTINGS)?;
    visitor.visit(8, USER_POSTINGS)?;
    visitor.visit(9, ENTITLEMENTS)?;
    visitor.visit(10, CREDITS)?;
    visitor.visit(11, EXTERNAL_REFS)?;
    visitor.visit(12, TOPUPS)?;
    visitor.visit(13, PENDING_TOPUPS)?;
    visitor.visit(14, REFUNDS)?;
    visitor.visit(15, IDEMPOTENCY)?;
    visitor.visit(16, IDEMPOTENCY_EXPIRY)?;
    visitor.visit(17, USER_PENDING_TOPUPS)?;
    visitor.visit(18, FINAL_TOPUPS)?;
    visitor.visit(19, EVENTS)?;
    visitor.visit(20, WEBHOOKS)?;
    visitor.visit(21, FROZEN)?;
    visitor.visit(22, DEBTS)?;
    visitor.visit(23, REVERSALS)?;
    visitor.visit(24, SOURCE_REVERSALS)?;
    visitor.visit(25, DISPUTES)?;
    visitor.visit(26, CREDIT_IDS)?;
    visitor.visit(27, SHOP_LIMITS)?;
    visitor.visit(28, USER_LIMITS)?;
    visitor.visit(29, USAGE)?;
    visitor.visit(30, super::user_rows::USER_ROWS)?;
    Ok(())
}

/// Calls `row` with every row's raw key and value bytes (redb's own encodings), in key order.
pub fn for_each_raw_row<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<'static, K, V>,
    mut row: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for entry in txn.open_table(table)?.iter()? {
        let (key, value) = entry?;
        let key_value = key.value();
        let value_value = value.value();
        row(
            K::as_bytes(&key_value).as_ref(),
            V::as_bytes(&value_value).as_ref(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use redb::TableHandle;

    use super::*;
    use crate::state::ShardStore;

    /// The names and tags `visit_all` visits.
    #[derive(Default)]
    struct Visited {
        names: BTreeSet<String>,
        tags: Vec<u8>,
    }

    impl TableVisitor for Visited {
        fn visit<K: Key + 'static, V: Value + 'static>(
            &mut self,
            tag: u8,
            table: TableDefinition<'static, K, V>,
        ) -> Result<(), StoreError> {
            self.names.insert(table.name().to_owned());
            self.tags.push(tag);
            Ok(())
        }
    }

    /// A table the shard's file has but `visit_all` misses would be left out of snapshots and
    /// `state_hash` without a sound.
    #[test]
    fn visit_all_visits_every_table_of_a_fresh_file() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        let txn = store.begin_read().expect("reads");
        let in_file: BTreeSet<String> = txn
            .list_tables()
            .expect("lists tables")
            .map(|table| table.name().to_owned())
            .collect();
        assert_eq!(txn.list_multimap_tables().expect("lists").count(), 0);

        let mut visited = Visited::default();
        visit_all(&mut visited).expect("visits");
        assert_eq!(visited.names, in_file);
        let distinct: BTreeSet<u8> = visited.tags.iter().copied().collect();
        assert_eq!(distinct.len(), visited.tags.len(), "tags are distinct");
        assert_eq!(visited.names.len(), visited.tags.len(), "each table once");
    }
}
