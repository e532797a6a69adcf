//! Idempotency records: the stored outcome under each (scope, key), their purge past the retention (the
//! walk of `PurgeIdempotency`, and the retention index of the records stored before a shard's first walk),
//! and the two steps of a global-scope key on its home shard (`ClaimGlobalKey`, `SettleGlobalKey`).

use redb::ReadableTable;

use super::{Applier, CommandContext, Step};
use crate::domain::command::{self, GLOBAL_SCOPE, IdempotencyTag};
use crate::domain::{GlobalClaim, Outcome, Rejection, Reply, Timestamp};
use crate::state::tables::{self, encode, get};
use crate::state::{IdempotencyRecord, IdempotencyState, StoreError, idempotency_expiry};

/// An idempotency record's key: (scope, key).
type ScopedKey = (String, String);

/// A record the walk found past its retention: (scope, key, expires_at).
type DueRecord = (String, String, Timestamp);

impl Applier<'_> {
    pub(super) fn idempotency_record(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        get(self.idempotency.read()?, (scope, key))
    }

    pub(super) fn store_idempotency(
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

    /// Writes `record` under (`scope`, `key`) with one B-tree operation: the insert hands back the record
    /// it replaces, if any, whose row in the retention index is then removed.
    fn put_idempotency_record(
        &mut self,
        scope: &str,
        key: &str,
        record: &IdempotencyRecord,
    ) -> Result<(), StoreError> {
        let bytes = encode(record)?;
        let replaced = match self
            .idempotency
            .write()?
            .insert((scope, key), bytes.as_slice())?
        {
            Some(old) => Some(idempotency_expiry(old.value())?),
            None => None,
        };
        if let Some(expires_at) = replaced {
            self.unindex_idempotency_record(scope, key, expires_at)?;
        }
        if !self.idempotency_walk {
            self.idempotency_expiry
                .write()?
                .insert((record.expires_at.micros(), scope, key), ())?;
        }
        Ok(())
    }

    /// Removes the row in the retention index of a record that may be purged at `expires_at`, if it has
    /// one (stored before the shard's walk).
    fn unindex_idempotency_record(
        &mut self,
        scope: &str,
        key: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.idempotency_expiry
            .write()?
            .remove((expires_at.micros(), scope, key))?;
        Ok(())
    }

    pub(super) fn remove_idempotency_record(
        &mut self,
        scope: &str,
        key: &str,
    ) -> Result<(), StoreError> {
        if let Some(old) = self.idempotency_record(scope, key)? {
            self.forget_idempotency_record(scope, key, old.expires_at)?;
        }
        Ok(())
    }

    /// Removes a record known to be there, with `expires_at`, and its index row.
    fn forget_idempotency_record(
        &mut self,
        scope: &str,
        key: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.unindex_idempotency_record(scope, key, expires_at)?;
        self.idempotency.write()?.remove((scope, key))?;
        Ok(())
    }

    /// Walks the records from (`from_scope`, `from_key`) in key order, looking at no more than `scan` of
    /// them, and removes those whose retention ended by `context.now` (at most `limit`). The first walk
    /// turns the retention index off for records stored after it. Deterministic: it decides on the
    /// records' own `expires_at` and the command's bounds only.
    pub(super) fn purge_idempotency(
        &mut self,
        context: &CommandContext,
        command: &command::PurgeIdempotency,
    ) -> Step<Reply> {
        if !self.idempotency_walk {
            self.idempotency_walk = true;
            let walk = encode(&true)?;
            self.meta_table
                .insert(tables::IDEMPOTENCY_WALK_KEY, walk.as_slice())?;
        }
        let (due, next) = self.due_idempotency_records(context.now, command)?;
        for (scope, key, expires_at) in &due {
            self.forget_idempotency_record(scope, key, *expires_at)?;
        }
        Ok(Reply::IdempotencyPurged {
            purged: u32::try_from(due.len()).unwrap_or(u32::MAX),
            next,
        })
    }

    /// The records the walk of `command` removes at `now` (with their `expires_at`), and the record it
    /// goes on from.
    fn due_idempotency_records(
        &self,
        now: Timestamp,
        command: &command::PurgeIdempotency,
    ) -> Result<(Vec<DueRecord>, Option<ScopedKey>), StoreError> {
        let from = (command.from_scope.as_str(), command.from_key.as_str());
        let scan = usize::try_from(command.scan).unwrap_or(usize::MAX);
        let limit = usize::try_from(command.limit).unwrap_or(usize::MAX);
        let mut due = Vec::new();
        for (looked_at, entry) in self.idempotency.read()?.range(from..)?.enumerate() {
            let (k, v) = entry?;
            let (scope, key) = k.value();
            if looked_at == scan || due.len() == limit {
                return Ok((due, Some((scope.to_owned(), key.to_owned()))));
            }
            let expires_at = idempotency_expiry(v.value())?;
            if expires_at <= now {
                due.push((scope.to_owned(), key.to_owned(), expires_at));
            }
        }
        Ok((due, None))
    }

    pub(super) fn claim_global_key(
        &mut self,
        context: &mut CommandContext,
        command: &command::ClaimGlobalKey,
    ) -> Step<Reply> {
        let key = command.key.as_str();
        match self.idempotency_record(GLOBAL_SCOPE, key)? {
            None => {
                let record = IdempotencyRecord {
                    fingerprint: command.fingerprint,
                    created_at: context.now,
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

    pub(super) fn settle_global_key(&mut self, command: &command::SettleGlobalKey) -> Step<Reply> {
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
}

#[cfg(test)]
mod tests {
    use redb::{ReadableTable, ReadableTableMetadata};

    use super::*;
    use crate::domain::Rejection;
    use crate::state::ShardStore;

    fn tag(expires_at: i64) -> IdempotencyTag {
        IdempotencyTag {
            scope: "u1".to_owned(),
            key: "k1".to_owned(),
            fingerprint: [7; 32],
            expires_at: Timestamp(expires_at),
        }
    }

    #[test]
    fn a_replaced_record_keeps_one_row_in_the_retention_index_at_its_new_expiry() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        let txn = store.begin_write().expect("writes");
        let mut a = Applier::open(&txn).expect("opens the tables");
        let done = |r: Rejection| IdempotencyState::Done(Err(r));
        a.store_idempotency(&tag(100), Timestamp(1), done(Rejection::OrderNotFound))
            .expect("stores");
        a.store_idempotency(
            &tag(200),
            Timestamp(2),
            done(Rejection::IdempotencyKeyReused),
        )
        .expect("replaces");

        let record = a.idempotency_record("u1", "k1").expect("reads");
        assert_eq!(
            record.map(|r| (r.expires_at, r.state)),
            Some((Timestamp(200), done(Rejection::IdempotencyKeyReused)))
        );
        let index = a.idempotency_expiry.read().expect("opens");
        assert_eq!(index.len().expect("counts"), 1, "the first row went");
        let (row, _) = index.first().expect("reads").expect("a row");
        assert_eq!(row.value(), (200, "u1", "k1"));
    }
}
