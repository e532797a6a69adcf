//! Operations that span shards, each built from idempotent single-shard commands so that a crash or a
//! retry at any step converges on one outcome without a distributed transaction:
//!
//! - **Global idempotency keys** (`POST /v1/users`, where the key is not scoped by a user in the path):
//!   claim the key on its home shard (which stores the first request's command), run that command on the
//!   user's shard (which dedupes it under the same key), then settle the key with the outcome.
//! - **Globally unique external references** (a credit's `external_ref`, a PSP payment id): reserve the
//!   reference for (user, amount) on its home shard before crediting on the user's shard.
//! - **The catalog**, copied into every shard: the home shard (0) decides each item's version under a lock,
//!   then every other shard takes the item if that version is newer than its copy.

use crate::domain::{
    Command, Envelope, Fingerprint, GlobalClaim, IdSeed, ItemSpec, Outcome, RefClaim, Reply,
    Timestamp, command,
};
use crate::state::{Applied, query};

use super::{EngineError, Node};

/// The shard whose catalog copy is the source of truth for versions.
pub const CATALOG_HOME_SHARD: u32 = 0;

/// A fresh random seed for the ids of a command proposed at `now`.
pub fn new_seed(now: Timestamp) -> IdSeed {
    IdSeed {
        unix_millis: now.unix_millis(),
        entropy: rand::random(),
    }
}

/// An envelope without an idempotency key, for the node's own commands.
pub fn system_envelope(command: Command) -> Envelope {
    let now = Timestamp::now();
    Envelope {
        now,
        seed: new_seed(now),
        idempotency: None,
        command,
    }
}

fn unexpected(reply: &Reply) -> EngineError {
    EngineError::Internal(format!("unexpected reply {reply:?}"))
}

impl Node {
    /// Runs `inner` (a per-user command) under a global idempotency key: claim, run, settle.
    pub async fn propose_with_global_key(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        expires_at: Timestamp,
        inner: Envelope,
    ) -> Result<Applied, EngineError> {
        let home = self.shard_of_system_key(&format!("global/{key}"));
        let claim = Command::ClaimGlobalKey(command::ClaimGlobalKey {
            key: key.to_owned(),
            fingerprint,
            expires_at,
            inner: Box::new(inner),
        });
        let inner = match self.propose(home, system_envelope(claim)).await?.outcome {
            Ok(Reply::GlobalClaim(GlobalClaim::Run(first))) => *first,
            Ok(Reply::GlobalClaim(GlobalClaim::Settled(outcome))) => {
                return Ok(Applied {
                    outcome: *outcome,
                    replayed: true,
                });
            }
            Ok(other) => return Err(unexpected(&other)),
            Err(rejection) => {
                return Ok(Applied {
                    outcome: Err(rejection),
                    replayed: false,
                });
            }
        };
        let user_id = inner.command.user_id().ok_or_else(|| {
            EngineError::Internal("a global-key command must belong to a user".into())
        })?;
        let executed = self.propose(self.shard_of_user(user_id), inner).await?;
        let settle = Command::SettleGlobalKey(command::SettleGlobalKey {
            key: key.to_owned(),
            fingerprint,
            outcome: Box::new(executed.outcome.clone()),
        });
        match self.propose(home, system_envelope(settle)).await?.outcome {
            Ok(Reply::GlobalClaim(GlobalClaim::Settled(outcome))) => Ok(Applied {
                outcome: *outcome,
                replayed: executed.replayed,
            }),
            Ok(other) => Err(unexpected(&other)),
            Err(rejection) => Ok(Applied {
                outcome: Err(rejection),
                replayed: false,
            }),
        }
    }

    /// Reserves `reference` (namespaced, e.g. `credit:psp_pay_8f2c`) for `claim`. `true` if it is now
    /// (or already was) reserved for exactly this claim; `false` if another user or amount holds it.
    pub async fn claim_external_ref(
        &self,
        reference: String,
        claim: RefClaim,
    ) -> Result<bool, EngineError> {
        let home = self.shard_of_system_key(&format!("ref/{reference}"));
        match self
            .propose(
                home,
                system_envelope(Command::ClaimExternalRef(command::ClaimExternalRef {
                    reference,
                    claim,
                })),
            )
            .await?
            .outcome
        {
            Ok(Reply::RefClaim { accepted }) => Ok(accepted),
            Ok(other) => Err(unexpected(&other)),
            Err(rejection) => Err(EngineError::Internal(format!(
                "claim rejected: {rejection}"
            ))),
        }
    }

    /// Creates or replaces an item on every shard. The outcome is the home shard's.
    pub async fn put_item(&self, spec: ItemSpec) -> Result<Outcome, EngineError> {
        let _serialised = self.catalog_lock.lock().await;
        let home = self
            .propose(
                CATALOG_HOME_SHARD,
                system_envelope(Command::PutItem(command::PutItem {
                    spec,
                    version: None,
                })),
            )
            .await?;
        let item = match &home.outcome {
            Ok(Reply::Item(item)) => item.clone(),
            Ok(other) => return Err(unexpected(other)),
            Err(_) => return Ok(home.outcome),
        };
        for shard in (0..self.shard_count()).filter(|&s| s != CATALOG_HOME_SHARD) {
            let copy = Command::PutItem(command::PutItem {
                spec: item.spec.clone(),
                version: Some(item.version),
            });
            self.propose(shard, system_envelope(copy)).await?;
        }
        Ok(home.outcome)
    }

    /// Brings every shard's catalog up to the home shard's (after a crash between the home write and the
    /// copies). Returns how many copies it wrote.
    pub async fn repair_catalog(&self) -> Result<usize, EngineError> {
        let _serialised = self.catalog_lock.lock().await;
        let truth = self.read(CATALOG_HOME_SHARD, query::items).await?;
        let mut repaired = 0;
        for shard in (0..self.shard_count()).filter(|&s| s != CATALOG_HOME_SHARD) {
            let copy = self.read(shard, query::items).await?;
            for item in &truth {
                let current = copy.iter().find(|c| c.spec.item_id == item.spec.item_id);
                if current.is_none_or(|c| c.version < item.version) {
                    let command = Command::PutItem(command::PutItem {
                        spec: item.spec.clone(),
                        version: Some(item.version),
                    });
                    self.propose(shard, system_envelope(command)).await?;
                    repaired += 1;
                }
            }
        }
        Ok(repaired)
    }
}
