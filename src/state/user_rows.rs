//! A user's rows, kept together in one table: the wallet (`User`), the index of their orders, the index
//! of their ledger and their entitlements, under keys that begin with the user id.
//!
//! A purchase writes all four. In four tables they were four leaves of four B-trees, each a random page
//! on a shop of millions of orders: a miss in redb's cache to read, and a dirty page (and the branches
//! above it) to copy, checksum and write out. Clustered, a user's rows sit in one leaf or two, so a
//! purchase dirties one path (schema 3; `migrate` moves a schema-2 file's rows here).
//!
//! The key is (user_id, kind, sub): `kind` says which of the four rows it is, and `sub` is the row's own
//! key in big-endian bytes. The rows a purchase writes come first: the wallet, the entitlements (by item
//! id), then the orders and the ledger **newest first** (their subs complemented), so that a user with a
//! long history still has the wallet, the entitlements and the newest orders in one leaf, and the newest
//! ledger entries in at most one more. The functions below give and take the orders and the ledger in
//! their natural order, oldest first.

use std::ops::Bound;

use redb::{ReadableTable, Table, TableDefinition};

use super::StoreError;
use super::tables::{Bytes, decode, encode, get};
use crate::domain::{Entitlement, User};

/// The key of a user's row: (user_id, kind, sub).
pub type UserKey = (&'static str, u8, &'static [u8]);

/// (user_id, kind, sub) → the row (see the module doc).
pub const USER_ROWS: TableDefinition<UserKey, Bytes> = TableDefinition::new("user_rows");

/// The user's `User` (sub empty; value its postcard bytes).
const USER: u8 = 0;
/// One of the user's entitlements (sub: the item id; value: its postcard `Entitlement`).
const ENTITLEMENT: u8 = 1;
/// One of the user's orders (sub: created_at in micros then the order id, complemented: newest first;
/// value empty).
const ORDER: u8 = 2;
/// One of the user's ledger entries (sub: the user's sequence, complemented: newest first; value: the
/// shard's posting sequence). A row of any other kind belongs to no user's walk, and the audit counts it.
const POSTING: u8 = 3;

/// A user's order in their index: (created_at in micros, order id).
pub type OrderRef = (i64, u128);

/// `created_at` and the order id as bytes that sort the other way round from the pair: the complement
/// of the pair with `created_at`'s sign bit flipped (`created_at ^ i64::MAX`).
fn order_sub((created_at, order_id): OrderRef) -> [u8; 24] {
    let mut sub = [0u8; 24];
    sub[..8].copy_from_slice(&(created_at ^ i64::MAX).to_be_bytes());
    sub[8..].copy_from_slice(&(!order_id).to_be_bytes());
    sub
}

fn decode_order_sub(sub: &[u8]) -> Result<OrderRef, StoreError> {
    let (time, id) = sub
        .split_at_checked(8)
        .filter(|(_, id)| id.len() == 16)
        .ok_or_else(|| StoreError::Corrupt(format!("an order's key of {} bytes", sub.len())))?;
    let time = i64::from_be_bytes(time.try_into().map_err(|_| corrupt_sub("order"))?);
    let id = u128::from_be_bytes(id.try_into().map_err(|_| corrupt_sub("order"))?);
    Ok((time ^ i64::MAX, !id))
}

/// The user's ledger sequence as bytes that sort newest first (its complement).
fn posting_sub(user_seq: u64) -> [u8; 8] {
    (!user_seq).to_be_bytes()
}

fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(
        bytes.try_into().map_err(|_| corrupt_sub(what))?,
    ))
}

fn corrupt_sub(what: &str) -> StoreError {
    StoreError::Corrupt(format!("a user's {what} row of the wrong length"))
}

/// The user `user_id`, if the shard has them.
pub fn user(
    table: &impl ReadableTable<UserKey, Bytes>,
    user_id: &str,
) -> Result<Option<User>, StoreError> {
    get(table, (user_id, USER, &[][..]))
}

pub fn put_user(table: &mut Table<UserKey, Bytes>, user: &User) -> Result<(), StoreError> {
    let bytes = encode(user)?;
    table.insert((user.user_id.as_str(), USER, &[][..]), bytes.as_slice())?;
    Ok(())
}

pub fn put_order(
    table: &mut Table<UserKey, Bytes>,
    user_id: &str,
    order: OrderRef,
) -> Result<(), StoreError> {
    table.insert((user_id, ORDER, &order_sub(order)[..]), &[][..])?;
    Ok(())
}

/// The user's orders from `from` to `to` in (created_at, order id) order (reverse it for newest first).
pub fn orders(
    table: &impl ReadableTable<UserKey, Bytes>,
    user_id: &str,
    from: Bound<OrderRef>,
    to: Bound<OrderRef>,
) -> Result<impl DoubleEndedIterator<Item = Result<OrderRef, StoreError>>, StoreError> {
    // Stored newest first: `to` is the lower key, `from` the upper.
    let (lower, upper) = (to.map(order_sub), from.map(order_sub));
    let lower = match &lower {
        Bound::Included(sub) => Bound::Included((user_id, ORDER, &sub[..])),
        Bound::Excluded(sub) => Bound::Excluded((user_id, ORDER, &sub[..])),
        Bound::Unbounded => Bound::Included((user_id, ORDER, &[][..])),
    };
    let upper = match &upper {
        Bound::Included(sub) => Bound::Included((user_id, ORDER, &sub[..])),
        Bound::Excluded(sub) => Bound::Excluded((user_id, ORDER, &sub[..])),
        Bound::Unbounded => Bound::Excluded((user_id, ORDER + 1, &[][..])),
    };
    Ok(table
        .range::<(&str, u8, &[u8])>((lower, upper))?
        .rev()
        .map(|entry| decode_order_sub(entry?.0.value().2)))
}

pub fn put_posting(
    table: &mut Table<UserKey, Bytes>,
    user_id: &str,
    user_seq: u64,
    seq: u64,
) -> Result<(), StoreError> {
    let sub = posting_sub(user_seq);
    table.insert((user_id, POSTING, &sub[..]), &seq.to_be_bytes()[..])?;
    Ok(())
}

/// The user's ledger from their entry `from_user_seq` on, oldest first, as (user_seq, the shard's
/// posting seq).
pub fn postings(
    table: &impl ReadableTable<UserKey, Bytes>,
    user_id: &str,
    from_user_seq: u64,
) -> Result<impl Iterator<Item = Result<(u64, u64), StoreError>>, StoreError> {
    // Stored newest first: the ledger from `from_user_seq` is the range up to its key, read backwards.
    let from = posting_sub(from_user_seq);
    let range = (user_id, POSTING, &[][..])..=(user_id, POSTING, &from[..]);
    Ok(table.range::<(&str, u8, &[u8])>(range)?.rev().map(|entry| {
        let (key, value) = entry?;
        Ok((
            !decode_u64(key.value().2, "ledger")?,
            decode_u64(value.value(), "ledger")?,
        ))
    }))
}

pub fn entitlement(
    table: &impl ReadableTable<UserKey, Bytes>,
    user_id: &str,
    item_id: &str,
) -> Result<Option<Entitlement>, StoreError> {
    get(table, (user_id, ENTITLEMENT, item_id.as_bytes()))
}

pub fn put_entitlement(
    table: &mut Table<UserKey, Bytes>,
    user_id: &str,
    entitlement: &Entitlement,
) -> Result<(), StoreError> {
    let bytes = encode(entitlement)?;
    let key = (user_id, ENTITLEMENT, entitlement.item_id.as_bytes());
    table.insert(key, bytes.as_slice())?;
    Ok(())
}

/// Every entitlement of the user, by item id.
pub fn entitlements(
    table: &impl ReadableTable<UserKey, Bytes>,
    user_id: &str,
) -> Result<impl Iterator<Item = Result<Entitlement, StoreError>>, StoreError> {
    let range = (user_id, ENTITLEMENT, &[][..])..(user_id, ENTITLEMENT + 1, &[][..]);
    Ok(table
        .range::<(&str, u8, &[u8])>(range)?
        .map(|entry| decode(entry?.1.value())))
}

/// Whether the shard has the user `user_id`.
pub fn has_user(
    table: &impl ReadableTable<UserKey, Bytes>,
    user_id: &str,
) -> Result<bool, StoreError> {
    Ok(table.get((user_id, USER, &[][..]))?.is_some())
}

/// Every user of the shard, by user id.
pub fn users(
    table: &impl ReadableTable<UserKey, Bytes>,
) -> Result<impl Iterator<Item = Result<User, StoreError>>, StoreError> {
    Ok(table.iter()?.filter_map(|entry| match entry {
        Ok((key, value)) => (key.value().1 == USER).then(|| decode(value.value())),
        Err(e) => Some(Err(e.into())),
    }))
}

#[cfg(test)]
mod tests {
    use redb::Value;

    use super::*;

    /// The raw redb key of a row, as hex.
    fn key_hex(user_id: &str, kind: u8, sub: &[u8]) -> String {
        hex::encode(<(&str, u8, &[u8]) as Value>::as_bytes(&(
            user_id, kind, sub,
        )))
    }

    #[test]
    fn order_and_ledger_keys_sort_newest_first_and_decode_back() {
        let refs = [
            (i64::MIN, 0u128),
            (-1, u128::MAX),
            (0, 0),
            (0, 1),
            (1_700_000_000_000_000, 5),
            (i64::MAX, u128::MAX),
        ];
        for pair in refs.windows(2) {
            assert!(order_sub(pair[0]) > order_sub(pair[1]), "{pair:?}");
        }
        for order in refs {
            assert_eq!(decode_order_sub(&order_sub(order)).expect("decodes"), order);
        }
        assert!(decode_order_sub(&[0; 23]).is_err());
        assert!(posting_sub(0) > posting_sub(1) && posting_sub(1) > posting_sub(u64::MAX));
    }

    /// Orders and ledger entries are stored newest first and read back oldest first, from any bound.
    #[test]
    fn orders_and_ledger_read_back_in_their_order_between_bounds() {
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        let db = redb::Database::create(file.path()).expect("creates");
        let txn = db.begin_write().expect("writes");
        {
            let mut table = txn.open_table(USER_ROWS).expect("opens");
            for n in 1..=5u64 {
                let at = i64::try_from(n).expect("small") * 10;
                put_order(&mut table, "ana", (at, u128::from(n))).expect("inserts");
                put_posting(&mut table, "ana", n, 100 + n).expect("inserts");
            }
            put_order(&mut table, "bo", (25, 9)).expect("inserts");
            put_posting(&mut table, "bo", 1, 7).expect("inserts");
            let orders = |from, to| -> Vec<OrderRef> {
                orders(&table, "ana", from, to)
                    .expect("reads")
                    .collect::<Result<_, _>>()
                    .expect("decodes")
            };
            let all: Vec<OrderRef> = (1..=5u8)
                .map(|n| (i64::from(n) * 10, u128::from(n)))
                .collect();
            assert_eq!(orders(Bound::Unbounded, Bound::Unbounded), all);
            assert_eq!(
                orders(Bound::Included((20, 2)), Bound::Excluded((40, 4))),
                all[1..3]
            );
            assert_eq!(
                orders(Bound::Excluded((20, 2)), Bound::Included((40, 4))),
                all[2..4]
            );
            let newest_first: Vec<OrderRef> = orders(Bound::Unbounded, Bound::Unbounded)
                .into_iter()
                .rev()
                .collect();
            assert_eq!(newest_first.first(), Some(&(50, 5)));
            let ledger: Vec<(u64, u64)> = postings(&table, "ana", 3)
                .expect("reads")
                .collect::<Result<_, _>>()
                .expect("decodes");
            assert_eq!(ledger, [(3, 103), (4, 104), (5, 105)]);
        }
        txn.commit().expect("commits");
    }

    /// The stored format of the keys (golden bytes): redb's encoding of the tuple, with each kind's sub.
    #[test]
    fn the_keys_of_each_kind_are_these_bytes() {
        let order = order_sub((1_700_000_000_000_000, 0x0102));
        let cases = [
            (key_hex("ana", USER, &[]), "03616e6100"),
            (key_hex("ana", ENTITLEMENT, b"gems"), "03616e610167656d73"),
            (
                key_hex("ana", ORDER, &order),
                "03616e61027ff9f5dbe7e1bffffffffffffffffffffffffffffffffefd",
            ),
            (
                key_hex("ana", POSTING, &posting_sub(7)),
                "03616e6103fffffffffffffff8",
            ),
        ];
        for (kind, (got, want)) in cases.iter().enumerate() {
            assert_eq!(got, want, "kind {kind}");
        }
    }
}
