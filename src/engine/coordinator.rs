//! Operations that span shards, each built from idempotent single-shard commands so that a crash or a
//! retry at any step converges on one outcome without a distributed transaction:
//!
//! - **Global idempotency keys** (`POST /v1/users`, where the key is not scoped by a user in the path):
//!   claim the key on its home shard (which stores the first request's command), run that command on the
//!   user's shard (which dedupes it under the same key), then settle the key with the outcome.
//! - **Globally unique external references** (a credit's `external_ref`, a PSP payment id): reserve the
//!   reference for (user, amount) on its home shard before crediting on the user's shard. A PSP payment
//!   id is reserved only for an event that can credit its top-up (`can_credit`).
//! - **The catalog**, copied into every shard: the home shard (0) decides each item's version under a lock,
//!   then every other shard takes the item if that version is newer than its copy.

use uuid::Uuid;

use crate::domain::command::GLOBAL_INNER_SCOPE;
use crate::domain::{
    Command, Envelope, Fingerprint, GlobalClaim, IdSeed, IdempotencyTag, ItemSpec, Money, RefClaim,
    Reply, Timestamp, Topup, TopupStatus, command,
};
use crate::state::{Applied, query};

use super::{Consistency, EngineError, Missing, Node};

/// The shard whose catalog copy is the source of truth for versions.
pub(super) const CATALOG_HOME_SHARD: u32 = 0;

/// A user to create (`POST /v1/users`), checked.
pub struct NewUser {
    /// `None`: the server makes one.
    pub user_id: Option<String>,
    pub display_name: Option<String>,
}

/// A global idempotency key, with its request's fingerprint and retention.
pub struct GlobalKey {
    pub key: String,
    pub fingerprint: Fingerprint,
    pub expires_at: Timestamp,
}

/// A payment the game backend reports settled (`POST /v1/users/{id}/credits`), checked.
pub struct DirectCredit {
    pub user_id: String,
    pub amount: Money,
    pub external_ref: String,
    pub source: Option<String>,
}

/// A PSP payment notification (`POST /v1/psp/webhook`), authenticated and checked.
pub struct PspEvent {
    pub event_id: String,
    /// `payment.succeeded`, else `payment.failed`.
    pub succeeded: bool,
    pub topup_id: Uuid,
    pub user_id: String,
    pub amount: Money,
    /// Empty for a failed payment that named none.
    pub psp_payment_id: String,
}

/// A fresh random seed for the ids of a command proposed at `now`.
pub(super) fn new_seed(now: Timestamp) -> IdSeed {
    IdSeed {
        unix_millis: now.unix_millis(),
        entropy: rand::random(),
    }
}

/// An envelope without an idempotency key, for the node's own commands.
pub(super) fn system_envelope(command: Command) -> Envelope {
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

/// Whether `event` can credit `topup`: only then is its PSP payment id reserved, so that a malformed
/// event can never lock a payment id away from the real one.
fn can_credit(event: &PspEvent, topup: &Topup) -> bool {
    event.succeeded
        && topup.amount == event.amount
        && matches!(topup.status, TopupStatus::Pending | TopupStatus::Expired)
}

impl Node {
    /// Creates a user under the request's global idempotency key (a user's shard is known only once its
    /// id is: the key is kept on a home shard of its own).
    pub async fn create_user(
        &self,
        now: Timestamp,
        global: GlobalKey,
        user: NewUser,
    ) -> Result<Applied, EngineError> {
        let GlobalKey {
            key,
            fingerprint,
            expires_at,
        } = global;
        let seed = new_seed(now);
        let user_id = user.user_id.unwrap_or_else(|| seed.derive(0).to_string());
        let display_name = user.display_name;
        let inner = Envelope {
            now,
            seed,
            idempotency: Some(IdempotencyTag {
                scope: GLOBAL_INNER_SCOPE.to_owned(),
                key: key.clone(),
                fingerprint,
                expires_at,
            }),
            command: Command::CreateUser(command::CreateUser {
                user_id,
                display_name,
            }),
        };
        self.propose_with_global_key(&key, fingerprint, expires_at, inner)
            .await
    }

    /// Credits a settled payment once per `external_ref` across the shop: reserve the reference, then
    /// credit on the user's shard (which answers `external_ref_conflict` if the reservation was refused).
    pub async fn credit(
        &self,
        consistency: Consistency,
        now: Timestamp,
        tag: IdempotencyTag,
        credit: DirectCredit,
    ) -> Result<Applied, EngineError> {
        let DirectCredit {
            user_id,
            amount,
            external_ref,
            source,
        } = credit;
        // Users are never deleted: a user seen here exists when the credit applies. Checking first keeps an
        // unknown user from reserving the external_ref.
        self.user(consistency, &user_id, now).await?;
        let claim = RefClaim {
            user_id: user_id.clone(),
            amount,
            topup_id: None,
        };
        let ref_accepted = self
            .claim_external_ref(format!("credit:{external_ref}"), claim)
            .await?;
        let command = Command::Credit(command::Credit {
            user_id: user_id.clone(),
            amount,
            external_ref,
            source,
            ref_accepted,
        });
        self.propose_for_user(&user_id, now, Some(tag), command)
            .await
    }

    /// Applies a PSP event to its top-up, reserving its payment id first when the event can credit it.
    pub async fn psp_payment(
        &self,
        consistency: Consistency,
        now: Timestamp,
        tag: IdempotencyTag,
        event: PspEvent,
    ) -> Result<Applied, EngineError> {
        let topup_id = event.topup_id;
        let topup = self
            .read(
                consistency,
                self.shard_of_user(&event.user_id),
                move |txn| query::topup(txn, topup_id),
            )
            .await?
            .filter(|t| t.user_id == event.user_id)
            .ok_or(EngineError::NotFound(Missing::Topup))?;
        let ref_accepted = if can_credit(&event, &topup) {
            let claim = RefClaim {
                user_id: event.user_id.clone(),
                amount: event.amount,
                topup_id: Some(topup_id),
            };
            self.claim_external_ref(format!("psp:{}", event.psp_payment_id), claim)
                .await?
        } else {
            true
        };
        let PspEvent {
            event_id,
            succeeded,
            topup_id,
            user_id,
            amount,
            psp_payment_id,
        } = event;
        let command = Command::PspPayment(command::PspPayment {
            event_id,
            succeeded,
            topup_id,
            user_id: user_id.clone(),
            amount,
            psp_payment_id,
            ref_accepted,
        });
        self.propose_for_user(&user_id, now, Some(tag), command)
            .await
    }

    /// Runs `inner` (a per-user command) under a global idempotency key: claim, run, settle.
    async fn propose_with_global_key(
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
    async fn claim_external_ref(
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
            Ok(Reply::RefClaimed { accepted }) => Ok(accepted),
            Ok(other) => Err(unexpected(&other)),
            Err(rejection) => Err(EngineError::Internal(format!(
                "claim rejected: {rejection}"
            ))),
        }
    }

    /// Creates or replaces an item on every shard. The outcome is the home shard's.
    pub async fn put_item(&self, spec: ItemSpec) -> Result<Applied, EngineError> {
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
            Err(_) => return Ok(home),
        };
        for shard in (0..self.shard_count()).filter(|&s| s != CATALOG_HOME_SHARD) {
            let copy = Command::PutItem(command::PutItem {
                spec: item.spec.clone(),
                version: Some(item.version),
            });
            self.propose(shard, system_envelope(copy)).await?;
        }
        Ok(home)
    }

    /// Brings every shard's catalog up to the home shard's (after a crash between the home write and the
    /// copies). Returns how many copies it wrote.
    pub async fn repair_catalog(&self) -> Result<usize, EngineError> {
        let _serialised = self.catalog_lock.lock().await;
        let truth = self
            .read(Consistency::Linearizable, CATALOG_HOME_SHARD, query::items)
            .await?;
        let mut repaired = 0;
        for shard in (0..self.shard_count()).filter(|&s| s != CATALOG_HOME_SHARD) {
            let copy = self
                .read(Consistency::Linearizable, shard, query::items)
                .await?;
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
