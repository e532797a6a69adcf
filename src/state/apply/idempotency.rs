//! Idempotency records: the stored outcome under each (scope, key), its retention index, and the two
//! steps of a global-scope key on its home shard (`ClaimGlobalKey`, `SettleGlobalKey`).

use super::{Applier, CommandContext, Step};
use crate::domain::command::{self, GLOBAL_SCOPE, IdempotencyTag};
use crate::domain::{GlobalClaim, Outcome, Rejection, Reply, Timestamp};
use crate::state::tables::{encode, get};
use crate::state::{IdempotencyRecord, IdempotencyState, StoreError};

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

    fn put_idempotency_record(
        &mut self,
        scope: &str,
        key: &str,
        record: &IdempotencyRecord,
    ) -> Result<(), StoreError> {
        if let Some(old) = self.idempotency_record(scope, key)? {
            self.idempotency_expiry
                .write()?
                .remove((old.expires_at.micros(), scope, key))?;
        }
        let bytes = encode(record)?;
        self.idempotency
            .write()?
            .insert((scope, key), bytes.as_slice())?;
        self.idempotency_expiry
            .write()?
            .insert((record.expires_at.micros(), scope, key), ())?;
        Ok(())
    }

    pub(super) fn remove_idempotency_record(
        &mut self,
        scope: &str,
        key: &str,
    ) -> Result<(), StoreError> {
        if let Some(old) = self.idempotency_record(scope, key)? {
            self.idempotency_expiry
                .write()?
                .remove((old.expires_at.micros(), scope, key))?;
            self.idempotency.write()?.remove((scope, key))?;
        }
        Ok(())
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
