//! Moving a shard written by an older layout to this one (`SCHEMA_VERSION`).
//!
//! Schema 2 → 3: the users, their order indexes, their ledger indexes and their entitlements move from
//! four tables (`tables::LEGACY_USER_TABLES`) into `user_rows::USER_ROWS`, clustered by user. The four
//! tables stay in every file, empty, and keep their tags in `tables::visit_all`, so that a schema-2
//! snapshot or backup still imports (and is migrated in the same transaction, `ShardStore::import`).
//!
//! The move is one write transaction over the whole shard: on a shard of 1,250,000 orders it rewrites
//! about five million rows once, when a node of this version first opens the file. It is a pure
//! function of the rows, so every replica of a shard comes out of it with the same state hash.

use redb::{Key, ReadableTable, ReadableTableMetadata, TableDefinition, Value, WriteTransaction};

use super::tables::{self, decode};
use super::user_rows::{self, USER_ROWS};
use super::{MetaState, SCHEMA_VERSION, StoreError};
use crate::domain::{Entitlement, User};

/// Brings the file `txn` writes to `SCHEMA_VERSION`, if it is of a layout this version migrates: a
/// schema-2 file or import has its user rows moved and its `META` marked schema 3; a new file (no
/// `META` yet) gets the four tables of schema 2, empty. Any other version is left for the caller to
/// accept or refuse.
pub(super) fn to_current(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut meta_table = txn.open_table(tables::META)?;
    let meta: Option<MetaState> = tables::get(&meta_table, tables::META_STATE_KEY)?;
    match meta {
        None => user_rows_into_one_table(txn),
        Some(mut meta) if meta.schema_version == 2 => {
            user_rows_into_one_table(txn)?;
            meta.schema_version = SCHEMA_VERSION;
            let bytes = tables::encode(&meta)?;
            meta_table.insert(tables::META_STATE_KEY, bytes.as_slice())?;
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

/// Moves schema 2's user-keyed rows into `USER_ROWS`, leaving their four tables empty.
fn user_rows_into_one_table(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut rows = txn.open_table(USER_ROWS)?;
    let before = rows.len()?;
    let mut moved = drain(txn, tables::USERS, |_, user| {
        user_rows::put_user(&mut rows, &decode::<User>(user)?)
    })?;
    moved += drain(
        txn,
        tables::USER_ORDERS,
        |(user_id, created_at, order_id), ()| {
            user_rows::put_order(&mut rows, user_id, (created_at, order_id))
        },
    )?;
    moved += drain(txn, tables::USER_POSTINGS, |(user_id, user_seq), seq| {
        user_rows::put_posting(&mut rows, user_id, user_seq, seq)
    })?;
    moved += drain(txn, tables::ENTITLEMENTS, |(user_id, item_id), value| {
        let entitlement: Entitlement = decode(value)?;
        if entitlement.item_id != item_id {
            return Err(StoreError::Corrupt(format!(
                "the entitlement {user_id}/{item_id} is of {}",
                entitlement.item_id
            )));
        }
        user_rows::put_entitlement(&mut rows, user_id, &entitlement)
    })?;
    let after = rows.len()?;
    if before.checked_add(moved) != Some(after) {
        return Err(StoreError::Corrupt(format!(
            "moved {moved} user rows into a table of {before}, which now holds {after}"
        )));
    }
    Ok(())
}

/// Calls `put` with every row of `table`, then empties it; returns how many rows it held.
fn drain<K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    table: TableDefinition<'static, K, V>,
    mut put: impl FnMut(K::SelfType<'_>, V::SelfType<'_>) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut table = txn.open_table(table)?;
    let mut count = 0u64;
    for entry in table.iter()? {
        let (key, value) = entry?;
        put(key.value(), value.value())?;
        count += 1;
    }
    table.retain(|_, _| false)?;
    Ok(count)
}

/// How many rows the four tables of schema 2 still hold (none, once a shard is migrated).
pub(super) fn legacy_rows(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    Ok(txn.open_table(tables::USERS)?.len()?
        + txn.open_table(tables::USER_ORDERS)?.len()?
        + txn.open_table(tables::USER_POSTINGS)?.len()?
        + txn.open_table(tables::ENTITLEMENTS)?.len()?)
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;

    use super::*;
    use crate::domain::command::{self, Command, LineRequest};
    use crate::domain::{ItemKind, Reply, Timestamp};
    use crate::state::test_envelope as envelope;
    use crate::state::{
        MetaState, SCHEMA_VERSION, ShardStore, audit, query, snapshot, test_commands,
    };

    /// Two users with credit, two items, and completed orders of both (one of them refunded in part):
    /// every kind of user row, written through `apply`.
    fn shop(store: &ShardStore) {
        let mut commands = Vec::new();
        for (item_id, kind) in [("sword", ItemKind::Skin), ("gems", ItemKind::Currency)] {
            commands.push(test_commands::put_item(item_id, kind));
        }
        for user_id in ["ana", "bo"] {
            commands.push(test_commands::create_user(user_id));
            commands.push(test_commands::credit(user_id));
            for (item_id, quantity) in [("gems", 5), ("sword", 1), ("gems", 2)] {
                commands.push(test_commands::order(user_id, item_id, quantity, true));
            }
        }
        let envelopes: Vec<_> = (1..)
            .zip(commands)
            .map(|(n, command)| envelope(n, command))
            .collect();
        let applied = store
            .apply_batch(&envelopes.iter().collect::<Vec<_>>())
            .expect("applies");
        for one in &applied {
            assert!(one.outcome.is_ok(), "{one:?}");
        }
        let Ok(Reply::OrderCreated(order)) = &applied.last().expect("applied").outcome else {
            panic!("the last command is an order: {:?}", applied.last());
        };
        let refund = Command::Refund(command::Refund {
            user_id: "bo".into(),
            order_id: order.order_id,
            lines: Some(vec![LineRequest {
                item_id: "gems".into(),
                quantity: 1,
            }]),
            reason: None,
            force: false,
        });
        let refunded = store
            .apply_batch(&[&envelope(100, refund)])
            .expect("applies");
        assert!(refunded[0].outcome.is_ok(), "{refunded:?}");
    }

    /// Moves a shard's user rows back into the four tables of schema 2 and marks it schema 2, as a node
    /// of that version left it.
    fn as_schema_2(store: &ShardStore) {
        let txn = store.begin_write().expect("writes");
        {
            let mut rows = txn.open_table(USER_ROWS).expect("user rows");
            let mut users = txn.open_table(tables::USERS).expect("users");
            let mut orders = txn.open_table(tables::USER_ORDERS).expect("orders");
            let mut postings = txn.open_table(tables::USER_POSTINGS).expect("postings");
            let mut entitlements = txn.open_table(tables::ENTITLEMENTS).expect("entitlements");
            let all: Vec<User> = user_rows::users(&rows)
                .expect("users")
                .collect::<Result<_, _>>()
                .expect("decode");
            for user in &all {
                let id = user.user_id.as_str();
                let bytes = tables::encode(user).expect("encodes");
                users.insert(id, bytes.as_slice()).expect("inserts");
                let all = Bound::Unbounded;
                for order in user_rows::orders(&rows, id, all, all).expect("orders") {
                    let (created_at, order_id) = order.expect("order");
                    orders
                        .insert((id, created_at, order_id), ())
                        .expect("inserts");
                }
                for posting in user_rows::postings(&rows, id, 0).expect("postings") {
                    let (user_seq, seq) = posting.expect("posting");
                    postings.insert((id, user_seq), seq).expect("inserts");
                }
                for entitlement in user_rows::entitlements(&rows, id).expect("entitlements") {
                    let entitlement = entitlement.expect("entitlement");
                    let bytes = tables::encode(&entitlement).expect("encodes");
                    let key = (id, entitlement.item_id.as_str());
                    entitlements.insert(key, bytes.as_slice()).expect("inserts");
                }
            }
            rows.retain(|_, _| false).expect("empties");
            let mut meta_table = txn.open_table(tables::META).expect("meta");
            let mut meta: MetaState = tables::get(&meta_table, tables::META_STATE_KEY)
                .expect("reads")
                .expect("meta");
            meta.schema_version = 2;
            let bytes = tables::encode(&meta).expect("encodes");
            meta_table
                .insert(tables::META_STATE_KEY, bytes.as_slice())
                .expect("inserts");
        }
        txn.commit().expect("commits");
    }

    /// What the shop's reads show of both users.
    fn views(store: &ShardStore) -> Vec<String> {
        let txn = store.begin_read().expect("reads");
        let now = Timestamp::from_unix_seconds(1_800_000_000);
        let mut views = Vec::new();
        for user_id in ["ana", "bo"] {
            views.push(format!("{:?}", query::user(&txn, user_id).expect("user")));
            let orders = query::orders_page(&txn, user_id, None, 10, None, now).expect("orders");
            views.push(format!("{orders:?}"));
            let ledger = query::ledger_page(&txn, user_id, 0, 20).expect("ledger");
            views.push(format!("{ledger:?}"));
            let entitlements = query::entitlements(&txn, user_id).expect("entitlements");
            views.push(format!("{entitlements:?}"));
        }
        views
    }

    fn schema(store: &ShardStore) -> u32 {
        query::meta(&store.begin_read().expect("reads"))
            .expect("meta")
            .schema_version
    }

    #[test]
    fn a_schema_2_file_is_migrated_when_opened_and_keeps_its_state() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("shard-000.redb");
        let store = ShardStore::open(&path, 0).expect("opens");
        shop(&store);
        let (hash, shown) = (
            audit::state_hash(&store.begin_read().expect("reads")).expect("hashes"),
            views(&store),
        );
        assert_eq!(shown.len(), 8);
        as_schema_2(&store);
        assert_eq!(schema(&store), 2);
        let legacy = legacy_rows(&store.begin_read().expect("reads")).expect("counts");
        assert!(
            legacy >= 2 + 6 + 2 + 4,
            "{legacy} rows in schema 2's tables"
        );
        drop(store);

        let store = ShardStore::open(&path, 0).expect("opens and migrates");
        assert_eq!(schema(&store), SCHEMA_VERSION);
        let txn = store.begin_read().expect("reads");
        assert_eq!(legacy_rows(&txn).expect("counts"), 0);
        assert_eq!(audit::state_hash(&txn).expect("hashes"), hash);
        let report = audit::audit(&txn, 0).expect("audits");
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(views(&store), shown);
    }

    #[test]
    fn a_schema_2_snapshot_is_migrated_when_imported() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        shop(&store);
        let marker = [7u8; 8];
        let txn = store.begin_write().expect("writes");
        txn.open_table(tables::META)
            .expect("meta")
            .insert(tables::MARKER_KEY, &marker[..])
            .expect("inserts");
        txn.commit().expect("commits");
        let hash = audit::state_hash(&store.begin_read().expect("reads")).expect("hashes");
        let shown = views(&store);
        as_schema_2(&store);
        let mut body = Vec::new();
        snapshot::export(&store.begin_read().expect("reads"), &mut body).expect("exports");

        let other = dir.path().join("other");
        std::fs::create_dir(&other).expect("creates");
        let imported = ShardStore::open(&other.join("shard-000.redb"), 0).expect("opens");
        imported
            .import(&mut body.as_slice(), &marker)
            .expect("imports");
        assert_eq!(schema(&imported), SCHEMA_VERSION);
        let txn = imported.begin_read().expect("reads");
        assert_eq!(legacy_rows(&txn).expect("counts"), 0);
        assert_eq!(audit::state_hash(&txn).expect("hashes"), hash);
        assert_eq!(views(&imported), shown);
    }
}
