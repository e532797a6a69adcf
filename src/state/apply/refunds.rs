//! Refunds of completed orders: decide what is refunded (a plan), then revoke, credit and record it.

use super::ledger::overflow;
use super::orders::check_line_shape;
use super::{Applier, Cx, Step};
use crate::domain::command;
use crate::domain::model::MAX_REFUNDS_PER_ORDER;
use crate::domain::{
    Entitlement, Money, OrderStatus, PostingKind, PostingRef, Refund, RefundLine, Rejection, Reply,
};
use crate::state::tables::encode;

impl Applier<'_> {
    pub(super) fn refund(&mut self, cx: &mut Cx, command: &command::Refund) -> Step<Reply> {
        let (user_id, order_id) = (command.user_id.as_str(), command.order_id);
        let (lines, reason, force) = (command.lines.as_deref(), &command.reason, command.force);
        if let Some(lines) = lines {
            check_line_shape(lines)?;
        }
        let mut user = self.begin_user(cx, user_id)?;
        let mut order = self.user_order(user_id, order_id)?;
        if !matches!(
            order.status,
            OrderStatus::Completed | OrderStatus::PartiallyRefunded
        ) {
            return Err(Rejection::InvalidState {
                status: order.status.as_str().to_owned(),
            }
            .into());
        }
        if order.refund_count >= MAX_REFUNDS_PER_ORDER {
            return Err(Rejection::TooManyRefunds {
                limit: MAX_REFUNDS_PER_ORDER,
            }
            .into());
        }
        // (line index, quantity) of what is to be refunded.
        let wanted: Vec<(usize, u32)> = match lines {
            None => order
                .lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.refundable_quantity() > 0)
                .map(|(i, l)| (i, l.refundable_quantity()))
                .collect(),
            Some(lines) => {
                let mut wanted = Vec::with_capacity(lines.len());
                for request in lines {
                    let found = order
                        .lines
                        .iter()
                        .position(|l| l.item_id == request.item_id);
                    let refundable = found.map_or(0, |i| order.lines[i].refundable_quantity());
                    match found {
                        Some(i) if request.quantity <= refundable => {
                            wanted.push((i, request.quantity))
                        }
                        _ => {
                            return Err(Rejection::RefundExceedsPurchase {
                                item_id: request.item_id.clone(),
                                requested: request.quantity,
                                refundable,
                            }
                            .into());
                        }
                    }
                }
                wanted
            }
        };
        if wanted.is_empty() {
            return Err(Rejection::InvalidState {
                status: order.status.as_str().to_owned(),
            }
            .into());
        }
        let completed_at = order.completed_at.unwrap_or(order.created_at);
        let mut refund_lines = Vec::with_capacity(wanted.len());
        let mut entitlements = Vec::with_capacity(wanted.len());
        let mut amount = Money::ZERO;
        for &(index, quantity) in &wanted {
            let line = &order.lines[index];
            let closes_at = completed_at.plus_days(line.refund_window_days);
            if !force && (line.refund_window_days == 0 || cx.now > closes_at) {
                return Err(Rejection::RefundWindowClosed {
                    item_id: line.item_id.clone(),
                    closed_at: closes_at,
                }
                .into());
            }
            let entitlement = self.entitlement(user_id, &line.item_id)?;
            let unspent = entitlement.as_ref().map_or(0, Entitlement::quantity);
            if unspent < u64::from(quantity) {
                return Err(Rejection::AlreadyConsumed {
                    item_id: line.item_id.clone(),
                    requested: quantity,
                    unspent,
                }
                .into());
            }
            let line_amount = line.unit_price.checked_mul(quantity).ok_or_else(overflow)?;
            amount = amount.checked_add(line_amount).ok_or_else(overflow)?;
            refund_lines.push(RefundLine {
                item_id: line.item_id.clone(),
                quantity,
                amount: line_amount,
            });
            entitlements.extend(entitlement);
        }
        self.check_postings(&user, &[(PostingKind::Refund, amount)])?;

        for (entitlement, &(index, quantity)) in entitlements.iter_mut().zip(&wanted) {
            entitlement.revoked += u64::from(quantity);
            self.save_entitlement(user_id, entitlement)?;
            order.lines[index].refunded_quantity += quantity;
        }
        let refund = Refund {
            refund_id: cx.ids.primary(),
            order_id,
            user_id: user_id.to_owned(),
            lines: refund_lines,
            amount,
            reason: reason.clone(),
            forced: force,
            created_at: cx.now,
        };
        order.refunded_total = order
            .refunded_total
            .checked_add(amount)
            .ok_or_else(overflow)?;
        order.refund_count += 1;
        let status = order.status_after_refund();
        order.transition(status, cx.now, None);
        debug_assert!(
            order.refunded_total <= order.total,
            "refunds never exceed what was paid"
        );
        self.post(
            cx,
            &mut user,
            PostingKind::Refund,
            amount,
            PostingRef::Refund(refund.refund_id),
            cx.now,
        )?;
        let bytes = encode(&refund)?;
        self.refunds
            .insert(refund.refund_id.as_u128(), bytes.as_slice())?;
        self.save_order(&order)?;
        self.save_user(&user)?;
        Ok(Reply::Refunded {
            refund,
            wallet: user.wallet(),
        })
    }
}
