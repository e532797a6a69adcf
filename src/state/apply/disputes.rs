//! Disputes of completed top-ups, as the PSP reports them: `OpenDispute` holds what is available of the
//! amount (a `hold` posting, like an order's), `CloseDispute` releases it (`won`) or reverses the amount,
//! taking the hold first (lost). Both are idempotent per dispute: a dispute already known, open or
//! closed, changes nothing, so a replayed or late event (a close before its open) is taken once.

use redb::ReadableTable;
use uuid::Uuid;

use super::credits::check_amount;
use super::reversals::{TakeBack, check_reversible};
use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::model::is_valid_external_ref;
use crate::domain::reversal::MAX_DISPUTES_PER_USER;
use crate::domain::{
    Dispute, DisputeStatus, EventData, EventType, Money, PostingKind, PostingRef, Rejection, Reply,
    Reversal, ReversalReason, ReversalSource, User,
};
use crate::state::tables::{decode, encode, get};

impl Applier<'_> {
    pub(super) fn open_dispute(
        &mut self,
        context: &mut CommandContext,
        command: &command::OpenDispute,
    ) -> Step<Reply> {
        check_amount(command.amount)?;
        check_dispute_id(&command.dispute_id)?;
        let mut user = self.begin_user(context, &command.user_id)?;
        if let Some(known) = self.dispute(&command.user_id, &command.dispute_id)? {
            return self.disputed(&user, known);
        }
        let topup = self.completed_topup(&command.user_id, command.topup_id)?;
        self.check_dispute_room(&command.user_id)?;
        let tally = self.tally(command.topup_id, None)?;
        check_reversible(&tally, topup.amount, command.amount)?;
        let held = command.amount.min(user.wallet().available());
        let dispute = Dispute {
            record_id: context.ids.primary(),
            dispute_id: command.dispute_id.clone(),
            user_id: command.user_id.clone(),
            topup_id: command.topup_id,
            amount: command.amount,
            held,
            status: DisputeStatus::Open,
            opened_at: context.now,
            closed_at: None,
            reversal_id: None,
        };
        self.check_postings(&user, &[(PostingKind::Hold, held)])?;
        let reference = PostingRef::Dispute(dispute.record_id);
        self.save_dispute(&dispute)?;
        self.post(
            context,
            &mut user,
            PostingKind::Hold,
            held,
            reference,
            context.now,
        )?;
        self.save_user(&user)?;
        self.emit_dispute(context, EventType::DisputeOpened, &user, &dispute)?;
        self.disputed(&user, dispute)
    }

    pub(super) fn close_dispute(
        &mut self,
        context: &mut CommandContext,
        command: &command::CloseDispute,
    ) -> Step<Reply> {
        check_dispute_id(&command.dispute_id)?;
        if let Some(amount) = command.amount {
            check_amount(amount)?;
        }
        let mut user = self.begin_user(context, &command.user_id)?;
        let dispute = match self.dispute(&command.user_id, &command.dispute_id)? {
            Some(known) if known.status != DisputeStatus::Open => {
                return self.disputed(&user, known);
            }
            Some(open) => open,
            None => self.unopened_dispute(context, command)?,
        };
        let closed = if command.won {
            self.release_dispute(context, &mut user, dispute, DisputeStatus::Won, None)?
        } else {
            self.lose_dispute(context, &mut user, dispute, command.revoke)?
        };
        self.emit_dispute(context, EventType::DisputeClosed, &user, &closed)?;
        self.disputed(&user, closed)
    }

    /// A dispute closed before its opening arrived (the PSP reordered its events): open it as of now,
    /// holding nothing. A lost one needs its amount from the closing event.
    fn unopened_dispute(
        &mut self,
        context: &mut CommandContext,
        command: &command::CloseDispute,
    ) -> Step<Dispute> {
        self.completed_topup(&command.user_id, command.topup_id)?;
        self.check_dispute_room(&command.user_id)?;
        let amount = match (command.amount, command.won) {
            (Some(amount), _) => amount,
            (None, true) => Money::ZERO,
            (None, false) => {
                return Err(Rejection::NotFound {
                    what: "dispute".to_owned(),
                    id: command.dispute_id.clone(),
                }
                .into());
            }
        };
        Ok(Dispute {
            record_id: context.ids.next_id(),
            dispute_id: command.dispute_id.clone(),
            user_id: command.user_id.clone(),
            topup_id: command.topup_id,
            amount,
            held: Money::ZERO,
            status: DisputeStatus::Open,
            opened_at: context.now,
            closed_at: None,
            reversal_id: None,
        })
    }

    /// Closes `dispute` as `status` with nothing taken: its hold goes back to the wallet (a won dispute,
    /// or a lost one with nothing left to reverse, or whose reversal exists already: `reversal_id`).
    fn release_dispute(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        mut dispute: Dispute,
        status: DisputeStatus,
        reversal_id: Option<Uuid>,
    ) -> Step<Dispute> {
        self.check_postings(user, &[(PostingKind::Release, dispute.held)])?;
        let (reference, held) = (PostingRef::Dispute(dispute.record_id), dispute.held);
        dispute.held = Money::ZERO;
        dispute.status = status;
        dispute.closed_at = Some(context.now);
        dispute.reversal_id = reversal_id;
        self.save_dispute(&dispute)?;
        self.post(
            context,
            user,
            PostingKind::Release,
            held,
            reference,
            context.now,
        )?;
        self.save_user(user)?;
        Ok(dispute)
    }

    /// Reverses a lost dispute's amount (no more than the top-up still has to give back), its hold first.
    fn lose_dispute(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        mut dispute: Dispute,
        revoke: bool,
    ) -> Step<Dispute> {
        let topup = self.completed_topup(&dispute.user_id, dispute.topup_id)?;
        let external_ref = format!("dispute:{}", dispute.dispute_id);
        let tally = self.tally(dispute.topup_id, Some(&external_ref))?;
        let reversible = topup.amount.saturating_sub(tally.total).max(Money::ZERO);
        let amount = dispute.amount.min(reversible);
        let already = tally.same_ref.as_ref().map(|r| r.reversal_id);
        if !amount.is_positive() || already.is_some() {
            // Nothing left to take back (refunded meanwhile), or this dispute's reversal exists already (a
            // log entry no edge of ours sends): only the hold goes.
            return self.release_dispute(context, user, dispute, DisputeStatus::Lost, already);
        }
        check_reversible(&tally, topup.amount, amount)?;
        let request = TakeBack {
            source: ReversalSource::Topup {
                topup_id: dispute.topup_id,
            },
            amount,
            reason: ReversalReason::Chargeback,
            external_ref,
            revoke,
            since: topup.finished_at.unwrap_or(topup.created_at),
            hold: Some((dispute.record_id, dispute.held)),
        };
        let plan = self.plan_reversal(user, &request)?;
        let reversal_id = context.ids.primary();
        dispute.held = Money::ZERO;
        dispute.status = DisputeStatus::Lost;
        dispute.closed_at = Some(context.now);
        dispute.reversal_id = Some(reversal_id);
        // Written first: the wallet's held, checked at every save of the user, no longer counts it.
        self.save_dispute(&dispute)?;
        self.take_back(context, user, request, plan, reversal_id)?;
        Ok(dispute)
    }

    fn dispute(&self, user_id: &str, dispute_id: &str) -> Step<Option<Dispute>> {
        Ok(get(self.disputes.read()?, (user_id, dispute_id))?)
    }

    fn save_dispute(&mut self, dispute: &Dispute) -> Step<()> {
        let bytes = encode(dispute)?;
        let key = (dispute.user_id.as_str(), dispute.dispute_id.as_str());
        self.disputes.write()?.insert(key, bytes.as_slice())?;
        Ok(())
    }

    /// The user's disputes, open or closed (at most `MAX_DISPUTES_PER_USER`).
    pub(super) fn user_disputes(&self, user_id: &str) -> Step<Vec<Dispute>> {
        let mut disputes = Vec::new();
        for entry in self.disputes.read()?.range((user_id, "")..)? {
            let (key, value) = entry?;
            if key.value().0 != user_id {
                break;
            }
            disputes.push(decode(value.value())?);
        }
        Ok(disputes)
    }

    fn check_dispute_room(&self, user_id: &str) -> Step<()> {
        let count = self.user_disputes(user_id)?.len();
        if count >= MAX_DISPUTES_PER_USER as usize {
            return Err(Rejection::LimitExceeded {
                limit: "max_disputes_per_user".to_owned(),
                max: MAX_DISPUTES_PER_USER,
                retry_after: None,
            }
            .into());
        }
        Ok(())
    }

    fn emit_dispute(
        &mut self,
        context: &mut CommandContext,
        event_type: EventType,
        user: &User,
        dispute: &Dispute,
    ) -> Step<()> {
        let data = EventData::Dispute {
            dispute: dispute.clone(),
            wallet: user.wallet(),
            debt: self.debt_of(&user.user_id)?,
        };
        self.emit(context, event_type, &user.user_id, data)
    }

    /// The reply of a dispute command: the dispute, the wallet and debt, and its reversal if it has one.
    fn disputed(&self, user: &User, dispute: Dispute) -> Step<Reply> {
        let reversal = match dispute.reversal_id {
            Some(id) => self.reversal(id)?,
            None => None,
        };
        Ok(Reply::Disputed {
            debt: self.debt_of(&user.user_id)?,
            wallet: user.wallet(),
            dispute: Box::new(dispute),
            reversal: reversal.map(Box::new),
        })
    }

    fn reversal(&self, reversal_id: Uuid) -> Step<Option<Reversal>> {
        Ok(get(self.reversals.read()?, reversal_id.as_u128())?)
    }
}

/// A PSP dispute id: 1–255 printable ASCII characters, like every external reference.
fn check_dispute_id(dispute_id: &str) -> Result<(), Rejection> {
    if is_valid_external_ref(dispute_id) {
        Ok(())
    } else {
        Err(Rejection::invalid(
            "dispute_id must be 1-255 printable ASCII characters",
        ))
    }
}
