//! Money coming in: external-reference claims, direct credits, top-ups (created, capped, completed or
//! failed by a PSP payment) and the indexes of pending and final top-ups.

use redb::ReadableTable;

use super::ledger::overflow;
use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::money::MAX_WALLET_BALANCE;
use crate::domain::{
    Credit, EventData, EventType, Money, PostingKind, PostingRef, RefClaim, Rejection, Reply,
    Timestamp, Topup, TopupStatus, User,
};
use crate::state::tables::{encode, get};

impl Applier<'_> {
    pub(super) fn claim_external_ref(
        &mut self,
        command: &command::ClaimExternalRef,
    ) -> Step<Reply> {
        let reference = command.reference.as_str();
        match get::<_, RefClaim, _>(self.external_refs.read()?, reference)? {
            Some(existing) => Ok(Reply::RefClaimed {
                accepted: existing == command.claim,
            }),
            None => {
                let bytes = encode(&command.claim)?;
                self.external_refs
                    .write()?
                    .insert(reference, bytes.as_slice())?;
                Ok(Reply::RefClaimed { accepted: true })
            }
        }
    }

    pub(super) fn credit(
        &mut self,
        context: &mut CommandContext,
        command: &command::Credit,
    ) -> Step<Reply> {
        let user_id = command.user_id.as_str();
        let amount = command.amount;
        let external_ref = command.external_ref.as_str();
        check_amount(amount)?;
        let mut user = self.begin_user(context, user_id)?;
        if let Some(existing) = get::<_, Credit, _>(self.credits.read()?, external_ref)? {
            if existing.user_id == user_id && existing.amount == amount {
                return Ok(Reply::Credited {
                    credit: existing,
                    wallet: user.wallet(),
                    fresh: false,
                });
            }
            return Err(Rejection::ExternalRefConflict {
                external_ref: external_ref.to_owned(),
            }
            .into());
        }
        if !command.ref_accepted {
            return Err(Rejection::ExternalRefConflict {
                external_ref: external_ref.to_owned(),
            }
            .into());
        }
        self.check_balance_room(&user, amount)?;
        let credit = Credit {
            credit_id: context.ids.primary(),
            user_id: user_id.to_owned(),
            amount,
            external_ref: external_ref.to_owned(),
            source: command.source.clone(),
            created_at: context.now,
        };
        self.post(
            context,
            &mut user,
            PostingKind::Credit,
            amount,
            PostingRef::Credit(credit.credit_id),
            context.now,
        )?;
        let reference = PostingRef::Credit(credit.credit_id);
        self.repay_debt(context, &mut user, amount, reference)?;
        let bytes = encode(&credit)?;
        self.credits
            .write()?
            .insert(external_ref, bytes.as_slice())?;
        self.credit_ids
            .write()?
            .insert(credit.credit_id.as_u128(), external_ref)?;
        self.save_user(&user)?;
        let data = EventData::Credit {
            credit: credit.clone(),
            wallet: user.wallet(),
        };
        self.emit(context, EventType::WalletCredited, user_id, data)?;
        Ok(Reply::Credited {
            credit,
            wallet: user.wallet(),
            fresh: true,
        })
    }

    fn check_balance_room(&self, user: &User, amount: Money) -> Step<()> {
        let max = MAX_WALLET_BALANCE;
        match user.balance.checked_add(amount) {
            Some(after) if after <= max => Ok(()),
            _ => Err(Rejection::BalanceLimitExceeded { max }.into()),
        }
    }

    pub(super) fn create_topup(
        &mut self,
        context: &mut CommandContext,
        command: &command::CreateTopup,
    ) -> Step<Reply> {
        let command::CreateTopup {
            user_id,
            amount,
            expires_at,
        } = command;
        self.open_topup(context, user_id, *amount, *expires_at, None)
    }

    pub(super) fn create_topup_capped(
        &mut self,
        context: &mut CommandContext,
        command: &command::CreateTopupCapped,
    ) -> Step<Reply> {
        let command::CreateTopupCapped {
            user_id,
            amount,
            expires_at,
            max_pending_topups,
        } = command;
        self.open_topup(
            context,
            user_id,
            *amount,
            *expires_at,
            Some(*max_pending_topups),
        )
    }

    /// Creates a PENDING top-up. With a `cap` (`--max-pending-topups`), refused when the user already
    /// has `max_pending_topups` of them: its override, else the shop's, else `cap`.
    fn open_topup(
        &mut self,
        context: &mut CommandContext,
        user_id: &str,
        amount: Money,
        expires_at: Timestamp,
        cap: Option<u32>,
    ) -> Step<Reply> {
        check_amount(amount)?;
        self.begin_user(context, user_id)?;
        self.check_not_frozen(user_id)?;
        if let Some(default) = cap {
            let limits = self.limits_in_force(user_id, Some(default))?;
            if let Some(max) = limits.max_pending_topups {
                self.check_pending_topups(context, user_id, max)?;
            }
        }
        let topup = Topup {
            topup_id: context.ids.primary(),
            user_id: user_id.to_owned(),
            amount,
            status: TopupStatus::Pending,
            psp_payment_id: None,
            created_at: context.now,
            expires_at,
            finished_at: None,
        };
        self.save_topup(&topup)?;
        let id = topup.topup_id.as_u128();
        self.pending_topups
            .write()?
            .insert((expires_at.micros(), id), ())?;
        self.user_pending_topups
            .write()?
            .insert((user_id, id), expires_at.micros())?;
        Ok(Reply::TopupCreated(topup))
    }

    /// Refuses a new top-up when the user already has `max` PENDING top-ups that have not expired at
    /// `context.now` (one past its deadline counts no more, swept or not). `retry_after` is the earliest expiry
    /// among them: when one more may be started.
    fn check_pending_topups(&self, context: &CommandContext, user_id: &str, max: u32) -> Step<()> {
        let mut pending = 0u32;
        let mut earliest: Option<i64> = None;
        for entry in self
            .user_pending_topups
            .read()?
            .range((user_id, 0u128)..=(user_id, u128::MAX))?
        {
            let expires_at = entry?.1.value();
            if expires_at > context.now.micros() {
                pending = pending.saturating_add(1);
                earliest = Some(earliest.map_or(expires_at, |e| e.min(expires_at)));
            }
        }
        if pending < max {
            return Ok(());
        }
        Err(Rejection::LimitExceeded {
            limit: "max_pending_topups".to_owned(),
            max,
            retry_after: earliest.map(Timestamp),
        }
        .into())
    }

    /// Records that `topup` left PENDING: out of the pending indexes, and into the purge queue if it
    /// ended EXPIRED or FAILED. `was` is the top-up as stored before (an EXPIRED one may still complete).
    pub(super) fn topup_left_pending(&mut self, was: &Topup, topup: &Topup) -> Step<()> {
        let id = topup.topup_id.as_u128();
        self.pending_topups
            .write()?
            .remove((was.expires_at.micros(), id))?;
        self.user_pending_topups
            .write()?
            .remove((was.user_id.as_str(), id))?;
        if let Some(at) = final_time(was) {
            self.final_topups.write()?.remove((at, id))?;
        }
        if let Some(at) = final_time(topup) {
            self.final_topups.write()?.insert((at, id), ())?;
        }
        Ok(())
    }

    pub(super) fn save_topup(&mut self, topup: &Topup) -> Step<()> {
        let bytes = encode(topup)?;
        self.topups
            .write()?
            .insert(topup.topup_id.as_u128(), bytes.as_slice())?;
        Ok(())
    }

    pub(super) fn psp_payment(
        &mut self,
        context: &mut CommandContext,
        command: &command::PspPayment,
    ) -> Step<Reply> {
        let (user_id, topup_id, amount) =
            (command.user_id.as_str(), command.topup_id, command.amount);
        let psp_payment_id = command.psp_payment_id.as_str();
        check_amount(amount)?;
        let mut user = self.begin_user(context, user_id)?;
        let mut topup = match get::<_, Topup, _>(self.topups.read()?, topup_id.as_u128())? {
            Some(topup) if topup.user_id == user_id => topup,
            _ => return Err(Rejection::TopupNotFound.into()),
        };
        if matches!(topup.status, TopupStatus::Completed | TopupStatus::Failed) {
            return Ok(Reply::TopupUpdated(topup));
        }
        if amount != topup.amount {
            return Err(Rejection::AmountMismatch {
                expected: topup.amount,
                received: amount,
            }
            .into());
        }
        let was = topup.clone();
        if command.succeeded {
            if !command.ref_accepted {
                return Err(Rejection::ExternalRefConflict {
                    external_ref: psp_payment_id.to_owned(),
                }
                .into());
            }
            // A payment that arrives after the top-up expired still credits it: the PSP has the money.
            self.check_balance_room(&user, amount)?;
            self.post(
                context,
                &mut user,
                PostingKind::Credit,
                amount,
                PostingRef::Topup(topup_id),
                context.now,
            )?;
            self.repay_debt(context, &mut user, amount, PostingRef::Topup(topup_id))?;
            topup.status = TopupStatus::Completed;
            topup.psp_payment_id = Some(psp_payment_id.to_owned());
            self.save_user(&user)?;
        } else {
            topup.status = TopupStatus::Failed;
        }
        topup.finished_at = Some(context.now);
        self.topup_left_pending(&was, &topup)?;
        self.save_topup(&topup)?;
        if command.succeeded {
            let completed = EventData::Topup(topup.clone());
            self.emit(context, EventType::TopupCompleted, user_id, completed)?;
            let credited = EventData::TopupCredit {
                topup: topup.clone(),
                wallet: user.wallet(),
            };
            self.emit(context, EventType::WalletCredited, user_id, credited)?;
        } else {
            let failed = EventData::Topup(topup.clone());
            self.emit(context, EventType::TopupFailed, user_id, failed)?;
        }
        Ok(Reply::TopupUpdated(topup))
    }
}

/// When a top-up became final, if it is one the purge removes (EXPIRED or FAILED).
fn final_time(topup: &Topup) -> Option<i64> {
    match topup.status {
        TopupStatus::Expired | TopupStatus::Failed => {
            Some(topup.finished_at.unwrap_or(topup.expires_at).micros())
        }
        TopupStatus::Pending | TopupStatus::Completed => None,
    }
}

/// An amount a command moves (credit, top-up, payment): positive, and no more than a wallet may hold.
/// The edge refuses anything else with 422; a command in the log may still come from a faulty peer.
pub(super) fn check_amount(amount: Money) -> Result<(), Rejection> {
    if !amount.is_positive() {
        return Err(Rejection::invalid("amount must be positive"));
    }
    if amount > MAX_WALLET_BALANCE {
        return Err(overflow());
    }
    Ok(())
}
