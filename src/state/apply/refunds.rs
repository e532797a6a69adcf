//! Refunds of completed orders: decide what is refunded (a plan, reading only), then write it: revoke
//! the entitlements, credit the wallet, record the refund and the order's new state.

use super::ledger::overflow;
use super::orders::check_line_shape;
use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::limits::Window;
use crate::domain::model::MAX_REFUNDS_PER_ORDER;
use crate::domain::{
    Entitlement, EventData, EventType, LineRequest, Money, Order, OrderLine, OrderStatus,
    PostingKind, PostingRef, Refund, RefundLine, Rejection, Reply, Timestamp, User,
};
use crate::state::tables::encode;
use uuid::Uuid;

/// What a `Refund` writes, decided before anything is written.
pub(super) struct RefundPlan {
    /// (index of the order's line, quantity refunded) of every refunded line.
    quantities: Vec<(usize, u32)>,
    /// The refund's lines, one per entry of `quantities`, and the sum of their amounts.
    lines: Vec<RefundLine>,
    amount: Money,
    /// The user's entitlement of each refunded line as it is now, one per entry of `quantities`.
    entitlements: Vec<Entitlement>,
    /// The order's `refunded_total` once this refund is in it.
    refunded_total: Money,
    /// Made by a reversal (`--on-reversal revoke`): its money is the reversal's, not the debt's.
    pub(super) for_reversal: bool,
}

impl Applier<'_> {
    pub(super) fn refund(
        &mut self,
        context: &mut CommandContext,
        command: &command::Refund,
    ) -> Step<Reply> {
        if let Some(lines) = &command.lines {
            check_line_shape(lines)?;
        }
        let mut user = self.begin_user(context, &command.user_id)?;
        let order = self.user_order(&command.user_id, command.order_id)?;
        let plan = self.decide_refund(context.now, &user, &order, command)?;
        self.check_refund_limit(context.now, &command.user_id, !command.force)?;
        let refund_id = context.ids.primary();
        let refund = self.write_refund(context, &mut user, order, command, plan, refund_id)?;
        Ok(Reply::Refunded {
            refund,
            wallet: user.wallet(),
        })
    }

    /// Every check of a refund at `now`, in order, reading only: what is refunded and for how much, or
    /// why the refund is refused.
    pub(super) fn decide_refund(
        &self,
        now: Timestamp,
        user: &User,
        order: &Order,
        command: &command::Refund,
    ) -> Step<RefundPlan> {
        check_refundable(order)?;
        let quantities = refund_quantities(order, command.lines.as_deref())?;
        let completed_at = order.completed_at.unwrap_or(order.created_at);
        let mut lines = Vec::with_capacity(quantities.len());
        let mut entitlements = Vec::with_capacity(quantities.len());
        let mut amount = Money::ZERO;
        for &(index, quantity) in &quantities {
            let line = &order.lines[index];
            if !command.force {
                check_refund_window(line, completed_at, now)?;
            }
            entitlements.push(self.unspent_entitlement(&user.user_id, line, quantity)?);
            let line_amount = line.unit_price.checked_mul(quantity).ok_or_else(overflow)?;
            amount = amount.checked_add(line_amount).ok_or_else(overflow)?;
            lines.push(RefundLine {
                item_id: line.item_id.clone(),
                quantity,
                amount: line_amount,
            });
        }
        self.check_postings(user, &[(PostingKind::Refund, amount)])?;
        let refunded_total = order
            .refunded_total
            .checked_add(amount)
            .ok_or_else(overflow)?;
        Ok(RefundPlan {
            quantities,
            lines,
            amount,
            entitlements,
            refunded_total,
            for_reversal: false,
        })
    }

    /// The user's entitlement of `line`'s item, if at least `quantity` units of it are unspent.
    fn unspent_entitlement(
        &self,
        user_id: &str,
        line: &OrderLine,
        quantity: u32,
    ) -> Step<Entitlement> {
        let entitlement = self.entitlement(user_id, &line.item_id)?;
        let unspent = entitlement.as_ref().map_or(0, Entitlement::quantity);
        match entitlement {
            Some(entitlement) if unspent >= u64::from(quantity) => Ok(entitlement),
            _ => Err(Rejection::AlreadyConsumed {
                item_id: line.item_id.clone(),
                requested: quantity,
                unspent,
            }
            .into()),
        }
    }

    /// Writes the refund `plan` describes: the revocations, the order's refunded lines and state, the
    /// refund posting and the refund itself. Nothing here is refused that `decide_refund` accepted. A
    /// refund the player asked for pays their debt first; one a reversal makes (`force` with a reversal
    /// `reason`) does not: the reversal takes that money itself.
    pub(super) fn write_refund(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        mut order: Order,
        command: &command::Refund,
        mut plan: RefundPlan,
        refund_id: Uuid,
    ) -> Step<Refund> {
        for (entitlement, &(index, quantity)) in plan.entitlements.iter_mut().zip(&plan.quantities)
        {
            entitlement.revoked += u64::from(quantity);
            self.save_entitlement(&command.user_id, entitlement)?;
            order.lines[index].refunded_quantity += quantity;
        }
        let refund = Refund {
            refund_id,
            order_id: command.order_id,
            user_id: command.user_id.clone(),
            lines: plan.lines,
            amount: plan.amount,
            reason: command.reason.clone(),
            forced: command.force,
            created_at: context.now,
        };
        order.refunded_total = plan.refunded_total;
        order.refund_count += 1;
        let status = order.status_after_refund();
        order.transition(status, context.now, None);
        debug_assert!(
            order.refunded_total <= order.total,
            "refunds never exceed what was paid"
        );
        self.post(
            context,
            user,
            PostingKind::Refund,
            refund.amount,
            PostingRef::Refund(refund.refund_id),
            context.now,
        )?;
        if !plan.for_reversal {
            let reference = PostingRef::Refund(refund.refund_id);
            self.repay_debt(context, user, refund.amount, reference)?;
            self.count_usage(&command.user_id, Window::RefundsPerDay, context.now, 1)?;
        }
        let bytes = encode(&refund)?;
        self.refunds
            .write()?
            .insert(refund.refund_id.as_u128(), bytes.as_slice())?;
        self.save_order(&order)?;
        self.save_user(user)?;
        let created = EventData::Refund {
            refund: refund.clone(),
            wallet: user.wallet(),
        };
        self.emit(context, EventType::RefundCreated, &command.user_id, created)?;
        for entitlement in plan.entitlements {
            let revoked = EventData::Entitlement(entitlement);
            self.emit(
                context,
                EventType::EntitlementRevoked,
                &command.user_id,
                revoked,
            )?;
        }
        Ok(refund)
    }
}

/// Only a paid order that has not reached its refund limit can be refunded.
fn check_refundable(order: &Order) -> Result<(), Rejection> {
    if !matches!(
        order.status,
        OrderStatus::Completed | OrderStatus::PartiallyRefunded
    ) {
        return Err(Rejection::InvalidState {
            status: order.status.as_str().to_owned(),
        });
    }
    if order.refund_count >= MAX_REFUNDS_PER_ORDER {
        return Err(Rejection::TooManyRefunds {
            limit: MAX_REFUNDS_PER_ORDER,
        });
    }
    Ok(())
}

/// (index of the order's line, quantity) of what `requested` asks to refund: every line's refundable
/// quantity for `None`. Refused if a requested line is not in the order or asks for more than is left,
/// or if nothing is left to refund.
fn refund_quantities(
    order: &Order,
    requested: Option<&[LineRequest]>,
) -> Result<Vec<(usize, u32)>, Rejection> {
    let quantities: Vec<(usize, u32)> = match requested {
        None => order
            .lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.refundable_quantity() > 0)
            .map(|(i, l)| (i, l.refundable_quantity()))
            .collect(),
        Some(requests) => requests
            .iter()
            .map(|request| requested_quantity(order, request))
            .collect::<Result<_, _>>()?,
    };
    if quantities.is_empty() {
        return Err(Rejection::InvalidState {
            status: order.status.as_str().to_owned(),
        });
    }
    Ok(quantities)
}

/// (index of the order's line, quantity) of one requested line, if the order has that much left.
fn requested_quantity(order: &Order, request: &LineRequest) -> Result<(usize, u32), Rejection> {
    let found = order
        .lines
        .iter()
        .position(|l| l.item_id == request.item_id);
    let refundable = found.map_or(0, |i| order.lines[i].refundable_quantity());
    match found {
        Some(i) if request.quantity <= refundable => Ok((i, request.quantity)),
        _ => Err(Rejection::RefundExceedsPurchase {
            item_id: request.item_id.clone(),
            requested: request.quantity,
            refundable,
        }),
    }
}

/// A line is refundable until its refund window, counted from the order's completion, closes (a window
/// of 0 days never opens).
fn check_refund_window(
    line: &OrderLine,
    completed_at: Timestamp,
    now: Timestamp,
) -> Result<(), Rejection> {
    let closes_at = completed_at.plus_days(line.refund_window_days);
    if line.refund_window_days == 0 || now > closes_at {
        return Err(Rejection::RefundWindowClosed {
            item_id: line.item_id.clone(),
            closed_at: closes_at,
        });
    }
    Ok(())
}
