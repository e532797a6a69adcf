//! Money going back out, as the edge reports it: a game backend's reversal of a direct credit, and the
//! PSP's `payment.refunded`, `dispute.opened` and `dispute.closed`. Each finds what it refers to with a
//! read first (a credit by its id, a top-up by its PSP payment id), then proposes one command on the
//! user's shard. What a retry must be able to fix later (a refund of a top-up not completed yet, the close
//! of a dispute not opened yet) is answered from that read and never stored under the event's key, so
//! the PSP's next delivery of the event is taken.

use uuid::Uuid;

use crate::domain::{
    Command, Dispute, IdempotencyTag, Money, Rejection, ReversalReason, ReversalSource, Timestamp,
    Topup, TopupStatus, command,
};
use crate::state::{Applied, query};

use super::{Consistency, EngineError, Missing, Node};

/// Where a PSP event points: a top-up, by its id or by the payment that completed it.
pub enum PspTopupRef {
    Topup(Uuid),
    Payment(String),
}

/// What the PSP reports about a completed top-up.
pub enum PspReversalKind {
    Refunded {
        amount: Money,
    },
    DisputeOpened {
        dispute_id: String,
        amount: Money,
    },
    DisputeClosed {
        dispute_id: String,
        won: bool,
        amount: Option<Money>,
    },
}

/// One PSP reversal or dispute event, authenticated and checked.
pub struct PspReversal {
    pub event_id: String,
    pub user_id: String,
    pub topup: PspTopupRef,
    pub kind: PspReversalKind,
    /// `--on-reversal revoke`.
    pub revoke: bool,
}

impl Node {
    /// The `external_ref` of the user's credit `credit_id` (`NotFound(Credit)` if the user has none).
    pub async fn credit_ref(
        &self,
        consistency: Consistency,
        user_id: &str,
        credit_id: Uuid,
    ) -> Result<String, EngineError> {
        let shard = self.shard_of_user(user_id);
        let id = user_id.to_owned();
        let found = self
            .read(consistency, shard, move |txn| {
                query::credit_ref(txn, &id, credit_id)
            })
            .await?;
        found.ok_or(EngineError::NotFound(Missing::Credit))
    }

    /// Applies a PSP reversal or dispute event to its top-up under the event's idempotency key.
    pub async fn psp_reversal(
        &self,
        consistency: Consistency,
        now: Timestamp,
        tag: IdempotencyTag,
        event: PspReversal,
    ) -> Result<Applied, EngineError> {
        let topup = self
            .psp_topup(consistency, &event.user_id, event.topup)
            .await?;
        if topup.status != TopupStatus::Completed {
            // Not stored: the PSP sends it again, and the payment's success may have arrived by then.
            return Ok(unstored(Rejection::InvalidState {
                status: topup.as_of(now).status.as_str().to_owned(),
            }));
        }
        let user_id = event.user_id;
        let topup_id = topup.topup_id;
        let command = match event.kind {
            PspReversalKind::Refunded { amount } => Command::Reverse(command::Reverse {
                user_id: user_id.clone(),
                source: ReversalSource::Topup { topup_id },
                amount,
                reason: ReversalReason::PspRefund,
                external_ref: format!("psp:{}", event.event_id),
                revoke: event.revoke,
            }),
            PspReversalKind::DisputeOpened { dispute_id, amount } => {
                Command::OpenDispute(command::OpenDispute {
                    user_id: user_id.clone(),
                    topup_id,
                    dispute_id,
                    amount,
                })
            }
            PspReversalKind::DisputeClosed {
                dispute_id,
                won,
                amount,
            } => {
                let known = self.dispute(consistency, &user_id, &dispute_id).await?;
                if known.is_none() && !won && amount.is_none() {
                    // Not stored: the opening may still be on its way.
                    return Ok(unstored(Rejection::NotFound {
                        what: "dispute".to_owned(),
                        id: dispute_id,
                    }));
                }
                Command::CloseDispute(command::CloseDispute {
                    user_id: user_id.clone(),
                    topup_id,
                    dispute_id,
                    won,
                    amount,
                    revoke: event.revoke,
                })
            }
        };
        self.propose_for_user(&user_id, now, Some(tag), command)
            .await
    }

    /// The user's top-up a PSP event names (`NotFound(Topup)` if it is not the user's).
    async fn psp_topup(
        &self,
        consistency: Consistency,
        user_id: &str,
        reference: PspTopupRef,
    ) -> Result<Topup, EngineError> {
        let topup_id = match reference {
            PspTopupRef::Topup(id) => id,
            PspTopupRef::Payment(payment) => {
                let home = self.shard_of_system_key(&format!("ref/psp:{payment}"));
                let claim = self
                    .read(consistency, home, move |txn| {
                        query::psp_payment_claim(txn, &payment)
                    })
                    .await?;
                match claim.and_then(|c| c.topup_id.filter(|_| c.user_id == user_id)) {
                    Some(id) => id,
                    None => return Err(EngineError::NotFound(Missing::Topup)),
                }
            }
        };
        let found = self
            .read(consistency, self.shard_of_user(user_id), move |txn| {
                query::topup(txn, topup_id)
            })
            .await?;
        found
            .filter(|t| t.user_id == user_id)
            .ok_or(EngineError::NotFound(Missing::Topup))
    }

    async fn dispute(
        &self,
        consistency: Consistency,
        user_id: &str,
        dispute_id: &str,
    ) -> Result<Option<Dispute>, EngineError> {
        let (id, dispute) = (user_id.to_owned(), dispute_id.to_owned());
        self.read(consistency, self.shard_of_user(user_id), move |txn| {
            query::dispute(txn, &id, &dispute)
        })
        .await
    }
}

/// A rejection decided before proposing: answered, not stored.
fn unstored(rejection: Rejection) -> Applied {
    Applied {
        outcome: Err(rejection),
        replayed: false,
    }
}
