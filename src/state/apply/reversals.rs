//! Reversals: the money of a credit or top-up going back out (`Reverse`; a lost dispute comes here too).
//!
//! A reversal takes, in order: the lost dispute's hold, the wallet's available credit, then (with
//! `--on-reversal revoke`) what refunds of the newest unconsumed purchases made since the credit bring
//! back, and records the rest as debt. Decide (`plan_reversal`, reading only), then write: release the
//! hold, make the refunds, record the debt, post the reversal. No balance ever goes negative: the debt
//! posting lends the wallet what it lacks, from the `receivable` account, and the reversal takes it.

use std::collections::BTreeMap;
use std::ops::Bound;

use redb::ReadableTable;
use uuid::Uuid;

use super::credits::check_amount;
use super::ledger::overflow;
use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::model::MAX_REFUNDS_PER_ORDER;
use crate::domain::reversal::{
    MAX_REVERSALS_PER_SOURCE, MAX_REVOKED_ORDERS, is_valid_reversal_ref,
};
use crate::domain::{
    Credit, Entitlement, EventData, EventType, LineRequest, Money, Order, OrderStatus, PostingKind,
    PostingRef, Rejection, Reply, Reversal, ReversalReason, ReversalSource, Timestamp, Topup,
    TopupStatus, User,
};
use crate::state::tables::{decode, encode, get};
use crate::state::user_rows;

/// Most of a user's orders a revoking reversal looks at (newest first) for refundable purchases.
const MAX_REVOKE_SCANNED_ORDERS: usize = 1_000;

/// What a reversal takes back, and from where: decided before anything is written.
pub(super) struct TakeBack {
    pub source: ReversalSource,
    pub amount: Money,
    pub reason: ReversalReason,
    pub external_ref: String,
    pub revoke: bool,
    /// When the money came in: only purchases made since are revoked.
    pub since: Timestamp,
    /// A lost dispute's (record id, hold): released first, and taken first.
    pub hold: Option<(Uuid, Money)>,
}

/// A refund `--on-reversal revoke` makes: these lines of this order, for `amount`.
struct Revoke {
    order: Order,
    lines: Vec<LineRequest>,
}

/// How a reversal is covered (see `Reversal`).
pub(super) struct ReversalPlan {
    from_hold: Money,
    debt: Money,
    revokes: Vec<Revoke>,
}

/// A credit or top-up's reversals so far.
pub(super) struct Tally {
    pub count: u32,
    pub total: Money,
    /// The one with the `external_ref` asked about, if one was asked about and exists.
    pub same_ref: Option<Reversal>,
}

impl Applier<'_> {
    pub(super) fn reverse(
        &mut self,
        context: &mut CommandContext,
        command: &command::Reverse,
    ) -> Step<Reply> {
        check_amount(command.amount)?;
        if !is_valid_reversal_ref(&command.external_ref) {
            return Err(Rejection::invalid("external_ref must be 1-300 printable ASCII").into());
        }
        let mut user = self.begin_user(context, &command.user_id)?;
        let (brought_in, since) = self.reversal_source(&command.user_id, &command.source)?;
        let tally = self.tally(command.source.id(), Some(&command.external_ref))?;
        if let Some(existing) = tally.same_ref {
            if existing.amount != command.amount {
                return Err(Rejection::ExternalRefConflict {
                    external_ref: command.external_ref.clone(),
                }
                .into());
            }
            let debt = self.debt_of(&user.user_id)?;
            return Ok(Reply::Reversed {
                reversal: Box::new(existing),
                wallet: user.wallet(),
                debt,
                fresh: false,
            });
        }
        check_reversible(&tally, brought_in, command.amount)?;
        let request = TakeBack {
            source: command.source.clone(),
            amount: command.amount,
            reason: command.reason,
            external_ref: command.external_ref.clone(),
            revoke: command.revoke,
            since,
            hold: None,
        };
        let plan = self.plan_reversal(&user, &request)?;
        let reversal_id = context.ids.primary();
        let reversal = self.take_back(context, &mut user, request, plan, reversal_id)?;
        let debt = self.debt_of(&user.user_id)?;
        Ok(Reply::Reversed {
            reversal: Box::new(reversal),
            wallet: user.wallet(),
            debt,
            fresh: true,
        })
    }

    /// What the credit or top-up brought in, and when, if it is the user's and (a top-up) completed.
    pub(super) fn reversal_source(
        &self,
        user_id: &str,
        source: &ReversalSource,
    ) -> Step<(Money, Timestamp)> {
        match source {
            ReversalSource::Credit {
                credit_id,
                external_ref,
            } => match get::<_, Credit, _>(self.credits.read()?, external_ref.as_str())? {
                Some(c) if c.user_id == user_id && c.credit_id == *credit_id => {
                    Ok((c.amount, c.created_at))
                }
                _ => Err(Rejection::NotFound {
                    what: "credit".to_owned(),
                    id: credit_id.to_string(),
                }
                .into()),
            },
            ReversalSource::Topup { topup_id } => {
                let topup = self.completed_topup(user_id, *topup_id)?;
                Ok((topup.amount, topup.finished_at.unwrap_or(topup.created_at)))
            }
        }
    }

    /// The user's top-up, if it is COMPLETED (only then did money come in).
    pub(super) fn completed_topup(&self, user_id: &str, topup_id: Uuid) -> Step<Topup> {
        match get::<_, Topup, _>(self.topups.read()?, topup_id.as_u128())? {
            Some(t) if t.user_id == user_id && t.status == TopupStatus::Completed => Ok(t),
            Some(t) if t.user_id == user_id => Err(Rejection::InvalidState {
                status: t.status.as_str().to_owned(),
            }
            .into()),
            _ => Err(Rejection::TopupNotFound.into()),
        }
    }

    /// The reversals of `source_id` so far (at most `MAX_REVERSALS_PER_SOURCE` rows).
    pub(super) fn tally(&self, source_id: Uuid, external_ref: Option<&str>) -> Step<Tally> {
        let id = source_id.as_u128();
        let mut tally = Tally {
            count: 0,
            total: Money::ZERO,
            same_ref: None,
        };
        for entry in self
            .source_reversals
            .read()?
            .range((id, 0u128)..=(id, u128::MAX))?
        {
            let reversal_id = entry?.0.value().1;
            let reversal: Reversal = match self.reversals.read()?.get(reversal_id)? {
                Some(bytes) => decode(bytes.value())?,
                None => continue,
            };
            tally.count = tally.count.saturating_add(1);
            tally.total = tally
                .total
                .checked_add(reversal.amount)
                .ok_or_else(overflow)?;
            if Some(reversal.external_ref.as_str()) == external_ref {
                tally.same_ref = Some(reversal);
            }
        }
        Ok(tally)
    }

    /// Takes `request.amount` back from `user` as `plan` (from `plan_reversal`) says, as reversal
    /// `reversal_id`, and emits `payment.reversed`. The caller checked that the source can give that much,
    /// and wrote a lost dispute as closed (its hold is released here).
    pub(super) fn take_back(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        request: TakeBack,
        plan: ReversalPlan,
        reversal_id: Uuid,
    ) -> Step<Reversal> {
        if let Some((record_id, held)) = request.hold {
            let reference = PostingRef::Dispute(record_id);
            self.post(
                context,
                user,
                PostingKind::Release,
                held,
                reference,
                context.now,
            )?;
        }
        let (revoked_refunds, revoked_amount) =
            self.write_revokes(context, user, plan.revokes, reversal_id)?;
        if plan.debt.is_positive() {
            self.owe(context, user, plan.debt, reversal_id)?;
        }
        let reference = PostingRef::Reversal(reversal_id);
        let amount = request.amount;
        self.post(
            context,
            user,
            PostingKind::Reversal,
            amount,
            reference,
            context.now,
        )?;
        let from_wallet = amount
            .checked_sub(plan.from_hold)
            .and_then(|rest| rest.checked_sub(plan.debt))
            .ok_or_else(overflow)?;
        let reversal = Reversal {
            reversal_id,
            user_id: user.user_id.clone(),
            source: request.source,
            amount,
            reason: request.reason,
            external_ref: request.external_ref,
            from_hold: plan.from_hold,
            from_wallet,
            debt: plan.debt,
            revoked_refunds,
            revoked_amount,
            created_at: context.now,
        };
        self.save_reversal(&reversal)?;
        self.save_user(user)?;
        if plan.debt.is_positive() {
            // After the reversal is posted: `account.frozen` shows the wallet as the command leaves it.
            self.freeze_for_debt(context, user)?;
        }
        let data = EventData::Reversal {
            reversal: reversal.clone(),
            wallet: user.wallet(),
            debt: self.debt_of(&user.user_id)?,
        };
        self.emit(context, EventType::PaymentReversed, &user.user_id, data)?;
        Ok(reversal)
    }

    fn save_reversal(&mut self, reversal: &Reversal) -> Step<()> {
        let bytes = encode(reversal)?;
        let id = reversal.reversal_id.as_u128();
        self.reversals.write()?.insert(id, bytes.as_slice())?;
        self.source_reversals
            .write()?
            .insert((reversal.source.id().as_u128(), id), ())?;
        Ok(())
    }

    /// Decides how `request` is covered, reading only, and checks every posting it will make.
    pub(super) fn plan_reversal(&self, user: &User, request: &TakeBack) -> Step<ReversalPlan> {
        let held = request.hold.map_or(Money::ZERO, |(_, held)| held);
        let available = user
            .wallet()
            .available()
            .checked_add(held)
            .ok_or_else(overflow)?;
        let shortfall = request.amount.saturating_sub(available).max(Money::ZERO);
        let revokes = if request.revoke && shortfall.is_positive() {
            self.plan_revokes(&user.user_id, request.since, shortfall)?
        } else {
            Vec::new()
        };
        let mut postings = vec![(PostingKind::Release, held)];
        let mut revoked = Money::ZERO;
        for revoke in &revokes {
            let amount = revoke_amount(revoke)?;
            revoked = revoked.checked_add(amount).ok_or_else(overflow)?;
            postings.push((PostingKind::Refund, amount));
        }
        let debt = shortfall.saturating_sub(revoked).max(Money::ZERO);
        postings.push((PostingKind::Debt, debt));
        postings.push((PostingKind::Reversal, request.amount));
        self.check_postings(user, &postings)?;
        Ok(ReversalPlan {
            from_hold: held.min(request.amount),
            debt,
            revokes,
        })
    }

    /// The refunds that cover `shortfall`: the user's completed orders made since `since`, newest first,
    /// each line's unconsumed units (a currency line only as many units as still needed). At most
    /// `MAX_REVOKED_ORDERS` orders, looking at no more than `MAX_REVOKE_SCANNED_ORDERS`.
    fn plan_revokes(&self, user_id: &str, since: Timestamp, shortfall: Money) -> Step<Vec<Revoke>> {
        let mut revokes = Vec::new();
        let mut unspent: BTreeMap<String, u64> = BTreeMap::new();
        let mut covered = Money::ZERO;
        let since = Bound::Included((since.micros(), 0u128));
        for entry in user_rows::orders(self.user_rows.read()?, user_id, since, Bound::Unbounded)?
            .rev()
            .take(MAX_REVOKE_SCANNED_ORDERS)
        {
            if covered >= shortfall || revokes.len() >= MAX_REVOKED_ORDERS {
                break;
            }
            let order_id = Uuid::from_u128(entry?.1);
            let order = self.user_order(user_id, order_id)?;
            if !matches!(
                order.status,
                OrderStatus::Completed | OrderStatus::PartiallyRefunded
            ) || order.refund_count >= MAX_REFUNDS_PER_ORDER
            {
                continue;
            }
            let mut lines = Vec::new();
            for line in &order.lines {
                let still_needed = shortfall.saturating_sub(covered);
                if !still_needed.is_positive() || !line.unit_price.is_positive() {
                    continue;
                }
                let left = match unspent.get(&line.item_id) {
                    Some(left) => *left,
                    None => self
                        .entitlement(user_id, &line.item_id)?
                        .as_ref()
                        .map_or(0, Entitlement::quantity),
                };
                let price = line.unit_price.minor();
                let needed_units = (still_needed.minor() / price
                    + i64::from(still_needed.minor() % price != 0))
                .max(1);
                let mut quantity = u64::from(line.refundable_quantity()).min(left);
                if line.kind.is_consumable() {
                    quantity = quantity.min(u64::try_from(needed_units).unwrap_or(u64::MAX));
                }
                let Ok(quantity) = u32::try_from(quantity) else {
                    continue;
                };
                if quantity == 0 {
                    continue;
                }
                unspent.insert(line.item_id.clone(), left - u64::from(quantity));
                let amount = line.unit_price.checked_mul(quantity).ok_or_else(overflow)?;
                covered = covered.checked_add(amount).ok_or_else(overflow)?;
                lines.push(LineRequest {
                    item_id: line.item_id.clone(),
                    quantity,
                });
            }
            if !lines.is_empty() {
                revokes.push(Revoke { order, lines });
            }
        }
        Ok(revokes)
    }

    /// Makes the planned refunds (forced past refund windows), returning their ids and total.
    fn write_revokes(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        revokes: Vec<Revoke>,
        reversal_id: Uuid,
    ) -> Step<(Vec<Uuid>, Money)> {
        let mut ids = Vec::with_capacity(revokes.len());
        let mut total = Money::ZERO;
        for revoke in revokes {
            let command = command::Refund {
                user_id: user.user_id.clone(),
                order_id: revoke.order.order_id,
                lines: Some(revoke.lines),
                reason: Some(format!("reversal {reversal_id}")),
                force: true,
            };
            // Decided again on the state the earlier refunds left: the plan counted the same units.
            let mut plan = self.decide_refund(context.now, user, &revoke.order, &command)?;
            plan.for_reversal = true;
            let refund_id = context.ids.next_id();
            let refund =
                self.write_refund(context, user, revoke.order, &command, plan, refund_id)?;
            total = total.checked_add(refund.amount).ok_or_else(overflow)?;
            ids.push(refund.refund_id);
        }
        Ok((ids, total))
    }
}

/// What a planned revoke refunds.
fn revoke_amount(revoke: &Revoke) -> Result<Money, Rejection> {
    let mut amount = Money::ZERO;
    for request in &revoke.lines {
        let line = revoke
            .order
            .lines
            .iter()
            .find(|l| l.item_id == request.item_id)
            .ok_or_else(overflow)?;
        let line_amount = line
            .unit_price
            .checked_mul(request.quantity)
            .ok_or_else(overflow)?;
        amount = amount.checked_add(line_amount).ok_or_else(overflow)?;
    }
    Ok(amount)
}

/// A source may give back at most what it brought in, over at most `MAX_REVERSALS_PER_SOURCE` reversals.
pub(super) fn check_reversible(
    tally: &Tally,
    brought_in: Money,
    amount: Money,
) -> Result<(), Rejection> {
    if tally.count >= MAX_REVERSALS_PER_SOURCE {
        return Err(Rejection::LimitExceeded {
            limit: "max_reversals_per_credit".to_owned(),
            max: MAX_REVERSALS_PER_SOURCE,
            retry_after: None,
        });
    }
    let reversible = brought_in.saturating_sub(tally.total).max(Money::ZERO);
    if amount > reversible {
        return Err(Rejection::ReversalExceedsCredit {
            requested: amount,
            reversible,
        });
    }
    Ok(())
}
