//! The state machine of one shard: its redb file, `apply` and the read queries.
//!
//! `ShardStore::apply_batch` is the only way state changes: it applies a batch of commands, in order, in
//! ONE redb write transaction that also records the position of the last one (`last_applied`). Either
//! the whole batch is on disk or none of it, so a crash can never leave "debited but not granted", and
//! on restart the shard resumes exactly after `last_applied`.

pub mod apply;
pub mod audit;
pub mod query;
pub mod tables;

use std::path::Path;

use redb::{Database, Durability, ReadTransaction, ReadableDatabase};
use serde::{Deserialize, Serialize};

use crate::domain::{Envelope, Fingerprint, Outcome, Timestamp};

pub use apply::Applied;

/// Storage failures. Any of them aborts the whole batch; nothing is half-applied.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot encode a record: {0}")]
    Encode(String),
    #[error("{0}")]
    Incompatible(String),
}

macro_rules! redb_error_into_store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
redb_error_into_store_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The version of the on-disk layout; a file written by another layout is refused, not misread.
pub const SCHEMA_VERSION: u32 = 1;

/// Shard-wide bookkeeping, one row in `META`, rewritten once per batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub schema_version: u32,
    pub shard: u32,
    /// Position of the last applied command (the Raft log index once replicated).
    pub last_applied: u64,
    /// Number of postings; the seq of the newest.
    pub posting_seq: u64,
    /// SHA-256 of the newest posting's stored bytes.
    pub posting_head: [u8; 32],
    /// Balances of the system accounts (credits minus debits). Wallet balances plus these sum to zero.
    pub psp_clearing: i64,
    pub revenue: i64,
}

/// A stored idempotency outcome (or, for a global key between its two steps, the command it runs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: Fingerprint,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub state: IdempotencyState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdempotencyState {
    Pending(Box<Envelope>),
    Done(Outcome),
}

/// One shard's redb database.
pub struct ShardStore {
    shard: u32,
    db: Database,
}

impl ShardStore {
    /// Opens (or creates) the shard's file, creating its tables and checking that it belongs to `shard`.
    pub fn open(path: &Path, shard: u32) -> Result<ShardStore, StoreError> {
        let db = Database::builder().create(path)?;
        let store = ShardStore { shard, db };
        let mut txn = store.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Redb(e.into()))?;
        {
            let mut applier = apply::Applier::open(&txn)?;
            let meta = applier.meta_mut();
            if meta.schema_version == 0 {
                meta.schema_version = SCHEMA_VERSION;
                meta.shard = shard;
            } else if meta.schema_version != SCHEMA_VERSION || meta.shard != shard {
                return Err(StoreError::Incompatible(format!(
                    "{} holds shard {} with schema {}, expected shard {shard} with schema {SCHEMA_VERSION}",
                    path.display(),
                    meta.shard,
                    meta.schema_version
                )));
            }
            applier.finish()?;
        }
        txn.commit()?;
        Ok(store)
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Applies `batch` in order in one write transaction and commits it durably: when this returns `Ok`,
    /// every outcome is on disk. The commands get consecutive positions after `last_applied`.
    pub fn apply_batch(&self, batch: &[&Envelope]) -> Result<Vec<Applied>, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Redb(e.into()))?;
        let applied = {
            let mut applier = apply::Applier::open(&txn)?;
            let mut results = Vec::with_capacity(batch.len());
            for envelope in batch {
                let index = applier.meta_mut().last_applied + 1;
                results.push(applier.apply(index, envelope)?);
            }
            applier.finish()?;
            results
        };
        txn.commit()?;
        Ok(applied)
    }

    pub fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }
}
