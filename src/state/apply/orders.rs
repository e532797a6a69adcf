//! Orders: creation (decide a plan, then write it), completion (debit and grant), cancellation, expiry,
//! and the pending-order indexes that back the wallet's `held`. Creation counts against
//! `max_orders_per_hour`, completion against `max_spend_per_day` (`limits`).

use redb::ReadableTable;
use uuid::Uuid;

use super::ledger::overflow;
use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::limits::Window;
use crate::domain::model::MAX_LINES;
use crate::domain::{
    Entitlement, EventData, EventType, HistoryEntry, Item, LineRequest, Money, Order, OrderLine,
    OrderStatus, PostingKind, PostingRef, Rejection, Reply, User,
};
use crate::state::StoreError;
use crate::state::tables::{encode, get};
use crate::state::user_rows;

/// What a `CreateOrder` writes, decided before anything is written: the lines at the catalog's prices,
/// and their total (checked to fit, to be available, and to post).
struct OrderPlan {
    lines: Vec<OrderLine>,
    total: Money,
}

impl Applier<'_> {
    pub(super) fn create_order(
        &mut self,
        context: &mut CommandContext,
        command: &command::CreateOrder,
    ) -> Step<Reply> {
        check_line_shape(&command.lines)?;
        let mut user = self.begin_user(context, &command.user_id)?;
        self.check_not_frozen(&command.user_id)?;
        let plan = self.decide_order(&user, command)?;
        self.check_order_limits(context.now, &command.user_id, plan.total)?;
        self.write_order(context, &mut user, command, plan)
    }

    /// Every check of a new order, in order, reading only: the lines at the catalog's prices and their
    /// total, or why the order is refused.
    fn decide_order(&self, user: &User, command: &command::CreateOrder) -> Step<OrderPlan> {
        let pending = self.pending_orders_of(&command.user_id)?;
        let max_pending_orders = command.max_pending_orders;
        if !command.complete && pending.len() >= max_pending_orders as usize {
            return Err(Rejection::TooManyPendingOrders {
                limit: max_pending_orders,
            }
            .into());
        }
        let mut lines = Vec::with_capacity(command.lines.len());
        let mut total = Money::ZERO;
        for request in &command.lines {
            let (line, line_total) = self.priced_line(&command.user_id, request, &pending)?;
            total = total.checked_add(line_total).ok_or_else(overflow)?;
            lines.push(line);
        }
        if let Some(expected) = command.expected_total {
            if expected != total {
                return Err(Rejection::PriceChanged {
                    expected,
                    current: total,
                }
                .into());
            }
        }
        if user.wallet().available() < total {
            return Err(Rejection::InsufficientFunds {
                available: user.wallet().available(),
                required: total,
            }
            .into());
        }
        let mut postings = vec![(PostingKind::Hold, total)];
        if command.complete {
            postings.push((PostingKind::Debit, total));
        }
        self.check_postings(user, &postings)?;
        Ok(OrderPlan { lines, total })
    }

    /// The order line for `request` at the item's current price, with its total, if the item is for
    /// sale in that quantity to a user who does not already own it (or have it in a pending order).
    fn priced_line(
        &self,
        user_id: &str,
        request: &LineRequest,
        pending: &[Order],
    ) -> Step<(OrderLine, Money)> {
        let item: Item = get(self.items.read()?, request.item_id.as_str())?.ok_or_else(|| {
            Rejection::ItemNotFound {
                item_id: request.item_id.clone(),
            }
        })?;
        if !item.spec.active {
            return Err(Rejection::ItemInactive {
                item_id: request.item_id.clone(),
            }
            .into());
        }
        let kind = item.spec.kind;
        if request.quantity > kind.max_quantity() {
            return Err(Rejection::invalid(format!(
                "quantity of {} ({}) must be at most {}",
                request.item_id,
                kind.as_str(),
                kind.max_quantity()
            ))
            .into());
        }
        if !kind.is_consumable() {
            self.check_not_owned(user_id, &request.item_id, pending)?;
        }
        let line_total = item
            .spec
            .price
            .checked_mul(request.quantity)
            .ok_or_else(overflow)?;
        let line = OrderLine {
            item_id: request.item_id.clone(),
            kind,
            quantity: request.quantity,
            unit_price: item.spec.price,
            refunded_quantity: 0,
            refund_window_days: item.spec.refund_window_days,
        };
        Ok((line, line_total))
    }

    /// A game or skin is bought once: refused if the user holds it or has it in a pending order.
    fn check_not_owned(&self, user_id: &str, item_id: &str, pending: &[Order]) -> Step<()> {
        let owned = self
            .entitlement(user_id, item_id)?
            .is_some_and(|e| e.quantity() > 0);
        let in_pending = pending
            .iter()
            .any(|o| o.lines.iter().any(|l| l.item_id == item_id));
        if owned || in_pending {
            return Err(Rejection::AlreadyOwned {
                item_id: item_id.to_owned(),
            }
            .into());
        }
        Ok(())
    }

    /// Writes the order `plan` describes: the hold, the indexes, and (for `complete`) the debit and the
    /// grants. Nothing here is refused that `decide_order` accepted.
    fn write_order(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        command: &command::CreateOrder,
        plan: OrderPlan,
    ) -> Step<Reply> {
        let (user_id, expires_at, total) =
            (command.user_id.as_str(), command.expires_at, plan.total);
        let mut order = Order {
            order_id: context.ids.primary(),
            user_id: user_id.to_owned(),
            status: OrderStatus::Pending,
            lines: plan.lines,
            total,
            refunded_total: Money::ZERO,
            created_at: context.now,
            expires_at,
            completed_at: None,
            refund_count: 0,
            history: vec![HistoryEntry {
                status: OrderStatus::Pending,
                at: context.now,
                reason: None,
            }],
        };
        self.post(
            context,
            user,
            PostingKind::Hold,
            total,
            PostingRef::Order(order.order_id),
            context.now,
        )?;
        let id = order.order_id.as_u128();
        user_rows::put_order(
            self.user_rows.write()?,
            user_id,
            (order.created_at.micros(), id),
        )?;
        self.count_usage(user_id, Window::OrdersPerHour, context.now, 1)?;
        let created = EventData::Order(order.clone());
        self.emit(context, EventType::OrderCreated, user_id, created)?;
        if command.complete {
            self.complete_effects(context, user, &mut order)?;
        } else {
            self.pending_orders
                .write()?
                .insert((expires_at.micros(), id), user_id)?;
            self.user_pending
                .write()?
                .insert((user_id, id), (expires_at.micros(), total.minor()))?;
        }
        self.save_order(&order)?;
        self.save_user(user)?;
        Ok(Reply::OrderCreated(order))
    }

    /// Debit the hold and grant the items: the heart of "never charged without the item".
    fn complete_effects(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        order: &mut Order,
    ) -> Step<()> {
        debug_assert_eq!(order.status, OrderStatus::Pending);
        self.post(
            context,
            user,
            PostingKind::Debit,
            order.total,
            PostingRef::Order(order.order_id),
            context.now,
        )?;
        for line in &order.lines {
            let mut entitlement = self
                .entitlement(&user.user_id, &line.item_id)?
                .unwrap_or_else(|| Entitlement {
                    item_id: line.item_id.clone(),
                    kind: line.kind,
                    granted: 0,
                    revoked: 0,
                    consumed: 0,
                    granted_at: context.now,
                });
            if entitlement.quantity() == 0 {
                entitlement.granted_at = context.now;
            }
            entitlement.granted += u64::from(line.quantity);
            debug_assert!(
                line.kind.is_consumable() || entitlement.quantity() == 1,
                "one non-consumable at most"
            );
            self.save_entitlement(&user.user_id, &entitlement)?;
            let granted = EventData::Entitlement(entitlement);
            self.emit(
                context,
                EventType::EntitlementGranted,
                &user.user_id,
                granted,
            )?;
        }
        self.count_usage(
            &user.user_id,
            Window::SpendPerDay,
            context.now,
            order.total.minor(),
        )?;
        order.completed_at = Some(context.now);
        order.transition(OrderStatus::Completed, context.now, None);
        self.forget_pending(order)?;
        let completed = EventData::Order(order.clone());
        self.emit(context, EventType::OrderCompleted, &user.user_id, completed)?;
        Ok(())
    }

    pub(super) fn complete_order(
        &mut self,
        context: &mut CommandContext,
        command: &command::CompleteOrder,
    ) -> Step<Reply> {
        let (user_id, order_id) = (command.user_id.as_str(), command.order_id);
        let mut user = self.begin_user(context, user_id)?;
        let mut order = self.user_order(user_id, order_id)?;
        match order.status {
            OrderStatus::Pending => {
                self.check_not_frozen(user_id)?;
                self.check_postings(&user, &[(PostingKind::Debit, order.total)])?;
                self.check_spend_limit(context.now, user_id, order.total)?;
                self.complete_effects(context, &mut user, &mut order)?;
                self.save_order(&order)?;
                self.save_user(&user)?;
                Ok(Reply::OrderUpdated(order))
            }
            status if status.was_completed() => Ok(Reply::OrderUpdated(order)),
            _ if order.cancel_reason() == Some(crate::domain::CancelReason::Expired) => {
                Err(Rejection::OrderExpired {
                    expires_at: order.expires_at,
                }
                .into())
            }
            status => Err(Rejection::InvalidState {
                status: status.as_str().to_owned(),
            }
            .into()),
        }
    }

    pub(super) fn cancel_order(
        &mut self,
        context: &mut CommandContext,
        command: &command::CancelOrder,
    ) -> Step<Reply> {
        let (user_id, order_id) = (command.user_id.as_str(), command.order_id);
        let mut user = self.begin_user(context, user_id)?;
        let mut order = self.user_order(user_id, order_id)?;
        match order.status {
            OrderStatus::Pending => {
                self.post(
                    context,
                    &mut user,
                    PostingKind::Release,
                    order.total,
                    PostingRef::Order(order_id),
                    context.now,
                )?;
                order.transition(
                    OrderStatus::Cancelled,
                    context.now,
                    Some(crate::domain::CancelReason::CancelledByClient),
                );
                self.forget_pending(&order)?;
                self.save_order(&order)?;
                self.save_user(&user)?;
                let cancelled = EventData::Order(order.clone());
                self.emit(context, EventType::OrderCancelled, user_id, cancelled)?;
                Ok(Reply::OrderUpdated(order))
            }
            OrderStatus::Cancelled => Ok(Reply::OrderUpdated(order)),
            status => Err(Rejection::InvalidState {
                status: status.as_str().to_owned(),
            }
            .into()),
        }
    }

    /// Cancels a pending order whose deadline passed, releasing its hold, dated at the deadline.
    pub(super) fn expire_order(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        order_id: u128,
    ) -> Step<()> {
        let mut order: Order = get(self.orders.read()?, order_id)?
            .ok_or_else(|| StoreError::Corrupt(format!("pending order {order_id} has no row")))?;
        debug_assert_eq!(order.status, OrderStatus::Pending);
        debug_assert_eq!(order.user_id, user.user_id);
        order.cancel_as_expired();
        let at = order.expires_at;
        self.post(
            context,
            user,
            PostingKind::Release,
            order.total,
            PostingRef::Order(order.order_id),
            at,
        )?;
        self.forget_pending(&order)?;
        self.save_order(&order)?;
        let user_id = order.user_id.clone();
        self.emit(
            context,
            EventType::OrderCancelled,
            &user_id,
            EventData::Order(order),
        )?;
        Ok(())
    }

    fn forget_pending(&mut self, order: &Order) -> Step<()> {
        let id = order.order_id.as_u128();
        self.pending_orders
            .write()?
            .remove((order.expires_at.micros(), id))?;
        self.user_pending
            .write()?
            .remove((order.user_id.as_str(), id))?;
        Ok(())
    }

    fn pending_orders_of(&self, user_id: &str) -> Step<Vec<Order>> {
        let mut orders = Vec::new();
        for entry in self
            .user_pending
            .read()?
            .range((user_id, 0u128)..=(user_id, u128::MAX))?
        {
            let (key, _) = entry?;
            let order_id = key.value().1;
            let order: Order = get(self.orders.read()?, order_id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("pending order {order_id} has no row"))
            })?;
            orders.push(order);
        }
        Ok(orders)
    }

    pub(super) fn user_order(&self, user_id: &str, order_id: Uuid) -> Step<Order> {
        match get::<_, Order, _>(self.orders.read()?, order_id.as_u128())? {
            Some(order) if order.user_id == user_id => Ok(order),
            _ => Err(Rejection::OrderNotFound.into()),
        }
    }

    pub(super) fn save_order(&mut self, order: &Order) -> Step<()> {
        debug_assert_eq!(
            i128::from(order.total.minor()),
            order
                .lines
                .iter()
                .map(|l| i128::from(l.line_total().minor()))
                .sum::<i128>()
        );
        let bytes = encode(order)?;
        self.orders
            .write()?
            .insert(order.order_id.as_u128(), bytes.as_slice())?;
        Ok(())
    }
}

/// Lines must be 1–50, with distinct items and quantities of at least 1. The edge checks this too; the
/// state machine does not trust its callers.
pub(super) fn check_line_shape(lines: &[LineRequest]) -> Result<(), Rejection> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(Rejection::invalid(format!(
            "between 1 and {MAX_LINES} lines are required"
        )));
    }
    for (i, line) in lines.iter().enumerate() {
        if line.quantity == 0 || line.quantity > crate::domain::model::MAX_QUANTITY {
            return Err(Rejection::invalid(format!(
                "quantity must be between 1 and {}",
                crate::domain::model::MAX_QUANTITY
            )));
        }
        if lines[..i].iter().any(|other| other.item_id == line.item_id) {
            return Err(Rejection::invalid(format!(
                "item {} appears in more than one line",
                line.item_id
            )));
        }
    }
    Ok(())
}
