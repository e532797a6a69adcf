//! The reads of the API: each reads one shard in one snapshot, as fresh as the caller asks
//! (`Consistency`), and answers `EngineError::NotFound` for what is not there.
//!
//! A read of a user's rows first checks, in the same snapshot, that the user exists: one read per
//! request, and the check and the data agree. Anything time-dependent is read as of the caller's `now`.

use uuid::Uuid;

use crate::domain::{
    Entitlement, Freeze, Item, Money, Order, OrderStatus, Outcome, Posting, Timestamp, Topup, User,
    WalletView,
};
use crate::state::audit::{self, ShardAudit};
use crate::state::query::{self, OrderCursor};
use crate::state::{IdempotencyState, StoreError};
use redb::ReadTransaction;

use super::coordinator::CATALOG_HOME_SHARD;
use super::{Consistency, EngineError, Missing, Node};

/// The outcome stored under an idempotency key, and when.
pub struct StoredOutcome {
    pub outcome: Outcome,
    pub created_at: Timestamp,
}

/// A page of rows and where the next one starts (`None`: this is the last).
pub type Page<T, Cursor> = (Vec<T>, Option<Cursor>);

/// A user as reads show it.
pub struct UserView {
    pub user: User,
    /// As of the read's `now`.
    pub wallet: WalletView,
    pub frozen: Option<Freeze>,
    pub debt: Money,
}

impl Node {
    /// One catalog item.
    pub async fn item(&self, consistency: Consistency, item_id: &str) -> Result<Item, EngineError> {
        let id = item_id.to_owned();
        self.read(consistency, CATALOG_HOME_SHARD, move |txn| {
            query::item(txn, &id)
        })
        .await?
        .ok_or_else(|| {
            EngineError::NotFound(Missing::Item {
                item_id: item_id.to_owned(),
            })
        })
    }

    /// The whole catalog, by item id.
    pub async fn items(&self, consistency: Consistency) -> Result<Vec<Item>, EngineError> {
        self.read(consistency, CATALOG_HOME_SHARD, query::items)
            .await
    }

    /// A user, its wallet as of `now`, its freeze and its debt.
    pub async fn user(
        &self,
        consistency: Consistency,
        user_id: &str,
        now: Timestamp,
    ) -> Result<UserView, EngineError> {
        self.read_user_rows(consistency, user_id, move |txn, user| {
            Ok(UserView {
                user: user.clone(),
                wallet: query::wallet_at(txn, user, now)?,
                frozen: query::frozen(txn, &user.user_id)?,
                debt: query::debt(txn, &user.user_id)?,
            })
        })
        .await
    }

    /// The user's entitlements with a quantity above zero, by item id.
    pub async fn entitlements(
        &self,
        consistency: Consistency,
        user_id: &str,
    ) -> Result<Vec<Entitlement>, EngineError> {
        self.read_user_rows(consistency, user_id, |txn, user| {
            query::entitlements(txn, &user.user_id)
        })
        .await
    }

    /// A page of the user's ledger, oldest first, after entry `after_seq`.
    pub async fn ledger_page(
        &self,
        consistency: Consistency,
        user_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Page<Posting, u64>, EngineError> {
        self.read_user_rows(consistency, user_id, move |txn, user| {
            query::ledger_page(txn, &user.user_id, after_seq, limit)
        })
        .await
    }

    /// A page of the user's orders as of `now`, newest first, before `cursor`, optionally of one status.
    pub async fn orders_page(
        &self,
        consistency: Consistency,
        user_id: &str,
        status: Option<OrderStatus>,
        limit: usize,
        cursor: Option<OrderCursor>,
        now: Timestamp,
    ) -> Result<Page<Order, OrderCursor>, EngineError> {
        self.read_user_rows(consistency, user_id, move |txn, user| {
            query::orders_page(txn, &user.user_id, status, limit, cursor, now)
        })
        .await
    }

    /// One of the user's orders as of `now`. `order_id` `None` (not an id the server makes) finds none.
    pub async fn order(
        &self,
        consistency: Consistency,
        user_id: &str,
        order_id: Option<Uuid>,
        now: Timestamp,
    ) -> Result<Order, EngineError> {
        let order = self
            .read_user_rows(consistency, user_id, move |txn, _| match order_id {
                Some(id) => query::order(txn, id),
                None => Ok(None),
            })
            .await?;
        order
            .filter(|order| order.user_id == user_id)
            .map(|order| order.as_of(now))
            .ok_or(EngineError::NotFound(Missing::Order))
    }

    /// One of the user's top-ups as of `now`. `topup_id` `None` (not an id the server makes) finds none.
    pub async fn topup(
        &self,
        consistency: Consistency,
        user_id: &str,
        topup_id: Option<Uuid>,
        now: Timestamp,
    ) -> Result<Topup, EngineError> {
        let topup = self
            .read_user_rows(consistency, user_id, move |txn, _| match topup_id {
                Some(id) => query::topup(txn, id),
                None => Ok(None),
            })
            .await?;
        topup
            .filter(|topup| topup.user_id == user_id)
            .map(|topup| topup.as_of(now))
            .ok_or(EngineError::NotFound(Missing::Topup))
    }

    /// The outcome stored under the user's idempotency key `key` (none while its request is running).
    pub async fn stored_outcome(
        &self,
        consistency: Consistency,
        user_id: &str,
        key: &str,
    ) -> Result<StoredOutcome, EngineError> {
        let key = key.to_owned();
        let record = self
            .read_user_rows(consistency, user_id, move |txn, user| {
                query::idempotency(txn, &user.user_id, &key)
            })
            .await?;
        match record {
            Some(record) => match record.state {
                IdempotencyState::Done(outcome) => Ok(StoredOutcome {
                    outcome,
                    created_at: record.created_at,
                }),
                IdempotencyState::Pending(_) => Err(EngineError::NotFound(Missing::StoredOutcome)),
            },
            None => Err(EngineError::NotFound(Missing::StoredOutcome)),
        }
    }

    /// The audit of `shards`, one after the other, each in its own snapshot (whole shards: the caller
    /// should not bound it by a request timeout). Every shard is below `shard_count()`.
    pub async fn audit(
        &self,
        consistency: Consistency,
        shards: std::ops::Range<u32>,
    ) -> Result<Vec<ShardAudit>, EngineError> {
        debug_assert!(shards.end <= self.shard_count(), "no such shard");
        let mut reports = Vec::with_capacity(shards.len());
        for shard in shards {
            reports.push(
                self.read(consistency, shard, move |txn| audit::audit(txn, shard))
                    .await?,
            );
        }
        Ok(reports)
    }

    /// Runs `read` on `user_id`'s shard with the user's row, in one snapshot; `NotFound(User)` if there
    /// is no such user.
    async fn read_user_rows<T, F>(
        &self,
        consistency: Consistency,
        user_id: &str,
        read: F,
    ) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction, &User) -> Result<T, StoreError> + Send + 'static,
    {
        let id = user_id.to_owned();
        let found = self
            .read(
                consistency,
                self.shard_of_user(user_id),
                move |txn| match query::user(txn, &id)? {
                    Some(user) => read(txn, &user).map(Some),
                    None => Ok(None),
                },
            )
            .await?;
        found.ok_or(EngineError::NotFound(Missing::User))
    }
}
