//! The shop's rules, once, as the tests' one oracle of them: a plain-data account (a wallet and the
//! entitlements) and orders (lines at unit prices), and the pure functions that move them the way
//! `src/state/apply` does. It owns an order's total (checked), what a purchase holds, what completing
//! (`Debit`), cancelling and expiring (`Release`) do to balance and held, what a refund may refund and
//! what it gives back, entitlement accounting (granted − revoked − consumed), consumption, and crediting
//! (a credit or a completed top-up).
//!
//! `props.rs` (commands against a redb file) and `chaos/model.rs` (HTTP answers, with time windows) both
//! call this and keep only what is their own; a change to a rule is made here and in apply, nowhere
//! else. A refusal is the API's error code (`Rejection::code`).
//!
//! Money going back out (`src/state/apply/reversals.rs`, `disputes.rs`, `debt.rs`): a [`Source`] (a
//! credit or completed top-up) gives back at most what it brought in, one reversal per `external_ref`;
//! [`plan_reversal`] decides how a reversal is covered (a lost dispute's hold, the available money, the
//! refunds `--on-reversal revoke` makes of the newest purchases, and debt), [`Account::take_back`] writes
//! it. Debt freezes the account and is repaid first by credits, completed top-ups and player refunds.

use std::collections::BTreeMap;

/// Money in minor units, as `Money::minor`.
pub type Minor = i64;

fn add(a: Minor, b: Minor) -> Minor {
    a.checked_add(b).expect("the model's money overflows")
}

fn sub(a: Minor, b: Minor) -> Minor {
    a.checked_sub(b).expect("the model's money overflows")
}

/// A user's wallet: `balance`, of which `held` is held by pending orders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wallet {
    pub balance: Minor,
    pub held: Minor,
}

impl Wallet {
    /// What a purchase may hold: balance − held.
    pub fn available(self) -> Minor {
        sub(self.balance, self.held)
    }

    /// A purchase of `amount` is refused unless the available money covers it.
    pub fn check_hold(self, amount: Minor) -> Result<(), &'static str> {
        if self.available() < amount {
            return Err("insufficient_funds");
        }
        Ok(())
    }

    /// A new order holds its total.
    pub fn hold(&mut self, amount: Minor) {
        self.held = add(self.held, amount);
    }

    /// Completing an order turns its hold into a debit.
    pub fn debit(&mut self, amount: Minor) {
        self.balance = sub(self.balance, amount);
        self.held = sub(self.held, amount);
    }

    /// Cancelling or expiring a pending order releases its hold.
    pub fn release(&mut self, amount: Minor) {
        self.held = sub(self.held, amount);
    }

    /// A direct credit, or a top-up whose payment succeeded.
    pub fn credit(&mut self, amount: Minor) {
        self.balance = add(self.balance, amount);
    }

    /// A refund gives its amount back.
    pub fn refund(&mut self, amount: Minor) {
        self.balance = add(self.balance, amount);
    }
}

/// A user's holding of one item.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entitlement {
    pub granted: u64,
    pub revoked: u64,
    pub consumed: u64,
}

impl Entitlement {
    /// What the user holds: granted − revoked − consumed.
    pub fn quantity(self) -> u64 {
        self.granted - self.revoked - self.consumed
    }
}

/// A game or skin is bought one at a time; currency up to the line limit.
pub fn check_quantity(consumable: bool, quantity: u32) -> Result<(), &'static str> {
    if !consumable && quantity > 1 {
        return Err("invalid_request");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderStatus {
    Pending,
    Completed,
    PartiallyRefunded,
    Refunded,
    CancelledByClient,
    /// Cancelled because its deadline passed.
    Expired,
}

impl OrderStatus {
    /// The status as the API shows it.
    pub fn api(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Completed => "COMPLETED",
            OrderStatus::PartiallyRefunded => "PARTIALLY_REFUNDED",
            OrderStatus::Refunded => "REFUNDED",
            OrderStatus::CancelledByClient | OrderStatus::Expired => "CANCELLED",
        }
    }

    pub fn was_completed(self) -> bool {
        matches!(
            self,
            OrderStatus::Completed | OrderStatus::PartiallyRefunded | OrderStatus::Refunded
        )
    }
}

/// What a command does to an order in a status that does not refuse it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The order moves on (a pending order is completed or cancelled).
    Applies,
    /// Already done: the order is answered unchanged.
    Unchanged,
}

/// `CompleteOrder` on an order in `status`.
pub fn complete_rule(status: OrderStatus) -> Result<Transition, &'static str> {
    match status {
        OrderStatus::Pending => Ok(Transition::Applies),
        s if s.was_completed() => Ok(Transition::Unchanged),
        OrderStatus::Expired => Err("order_expired"),
        _ => Err("invalid_state"),
    }
}

/// `CancelOrder` on an order in `status`.
pub fn cancel_rule(status: OrderStatus) -> Result<Transition, &'static str> {
    match status {
        OrderStatus::Pending => Ok(Transition::Applies),
        OrderStatus::CancelledByClient | OrderStatus::Expired => Ok(Transition::Unchanged),
        _ => Err("invalid_state"),
    }
}

/// One line of an order: a quantity of an item at the price it had when the order was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub item_id: String,
    pub quantity: u32,
    pub unit_price: Minor,
    pub refunded: u32,
}

impl Line {
    pub fn new(item_id: &str, quantity: u32, unit_price: Minor) -> Line {
        Line {
            item_id: item_id.to_owned(),
            quantity,
            unit_price,
            refunded: 0,
        }
    }

    /// What is left to refund.
    pub fn refundable(&self) -> u32 {
        self.quantity - self.refunded
    }
}

/// `quantity` units at `unit_price`; out of range is refused as apply refuses it.
pub fn amount_of(unit_price: Minor, quantity: u32) -> Result<Minor, &'static str> {
    unit_price
        .checked_mul(i64::from(quantity))
        .ok_or("invalid_request")
}

/// An order's total: its lines at their unit prices, checked as apply checks it.
pub fn order_total(lines: &[Line]) -> Result<Minor, &'static str> {
    lines.iter().try_fold(0, |total: Minor, line| {
        total
            .checked_add(amount_of(line.unit_price, line.quantity)?)
            .ok_or("invalid_request")
    })
}

/// A client's `expected_total` must be the total at today's prices.
pub fn check_expected_total(expected: Option<Minor>, total: Minor) -> Result<(), &'static str> {
    match expected {
        Some(expected) if expected != total => Err("price_changed"),
        _ => Ok(()),
    }
}

/// The most refunds one order takes (`MAX_REFUNDS_PER_ORDER`).
const MAX_REFUNDS_PER_ORDER: u32 = shopkeep::domain::model::MAX_REFUNDS_PER_ORDER;

/// An order as the rules see it.
#[derive(Clone, Debug)]
pub struct Order {
    pub lines: Vec<Line>,
    pub total: Minor,
    pub status: OrderStatus,
    /// Unix micros: a pending order expires once the clock reaches it.
    pub expires_at: i64,
    pub refund_count: u32,
}

impl Order {
    /// A new pending order of `lines`, its total checked.
    pub fn new(lines: Vec<Line>, expires_at: i64) -> Result<Order, &'static str> {
        let total = order_total(&lines)?;
        Ok(Order {
            lines,
            total,
            status: OrderStatus::Pending,
            expires_at,
            refund_count: 0,
        })
    }

    /// Still pending at time `t` (its deadline is after `t`).
    pub fn pending_at(&self, t: i64) -> bool {
        self.status == OrderStatus::Pending && self.expires_at > t
    }

    /// Pending, but its deadline has passed at `now`: the next command of its user expires it.
    pub fn due_at(&self, now: i64) -> bool {
        self.status == OrderStatus::Pending && self.expires_at <= now
    }

    pub fn has_item(&self, item_id: &str) -> bool {
        self.lines.iter().any(|l| l.item_id == item_id)
    }

    /// What its refunds gave back, at the lines' unit prices.
    pub fn refunded_total(&self) -> Minor {
        self.lines
            .iter()
            .map(|l| amount_of(l.unit_price, l.refunded).expect("a refunded amount fits"))
            .fold(0, add)
    }

    /// Refunded once every line is refunded in full, partially refunded before.
    fn status_after_refund(&self) -> OrderStatus {
        if self.lines.iter().all(|l| l.refunded == l.quantity) {
            OrderStatus::Refunded
        } else {
            OrderStatus::PartiallyRefunded
        }
    }
}

/// What a refund takes back, decided before anything changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundPlan {
    /// (index of the order's line, quantity) of every refunded line.
    pub quantities: Vec<(usize, u32)>,
    pub amount: Minor,
}

/// (index of the order's line, quantity) of what `requested` asks to refund (every line's refundable
/// quantity for `None`), if the order is paid and has that much left.
pub fn refund_quantities(
    order: &Order,
    requested: Option<&[(&str, u32)]>,
) -> Result<Vec<(usize, u32)>, &'static str> {
    if !matches!(
        order.status,
        OrderStatus::Completed | OrderStatus::PartiallyRefunded
    ) {
        return Err("invalid_state");
    }
    if order.refund_count >= MAX_REFUNDS_PER_ORDER {
        return Err("too_many_refunds");
    }
    let quantities: Vec<(usize, u32)> = match requested {
        None => order
            .lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.refundable() > 0)
            .map(|(i, l)| (i, l.refundable()))
            .collect(),
        Some(requested) => requested
            .iter()
            .map(|&(item_id, quantity)| {
                match order.lines.iter().position(|l| l.item_id == item_id) {
                    Some(i) if quantity <= order.lines[i].refundable() => Ok((i, quantity)),
                    _ => Err("refund_exceeds_purchase"),
                }
            })
            .collect::<Result<_, _>>()?,
    };
    if quantities.is_empty() {
        return Err("invalid_state");
    }
    Ok(quantities)
}

/// A line is refundable until its refund window, counted in days from the order's completion, closes
/// (a window of 0 days never opens).
pub fn check_refund_window(
    window_days: u32,
    completed_at: i64,
    now: i64,
) -> Result<(), &'static str> {
    const DAY_MICROS: i64 = 86_400 * 1_000_000;
    let closes_at = completed_at + i64::from(window_days) * DAY_MICROS;
    if window_days == 0 || now > closes_at {
        return Err("refund_window_closed");
    }
    Ok(())
}

/// The reason of the freeze a reversal puts on an account it leaves in debt; only that freeze is lifted
/// when the debt is repaid.
pub const DEBT_FREEZE_REASON: &str = shopkeep::domain::reversal::DEBT_FREEZE_REASON;

/// One user's money and holdings.
#[derive(Clone, Debug, Default)]
pub struct Account {
    pub wallet: Wallet,
    /// item → entitlement.
    pub entitlements: BTreeMap<String, Entitlement>,
    /// What the user owes the shop (a reversal the wallet could not cover). Never negative.
    pub debt: Minor,
    /// The freeze's reason, if the account is frozen.
    pub frozen: Option<String>,
}

impl Account {
    /// How many of `item_id` the user holds.
    pub fn unspent(&self, item_id: &str) -> u64 {
        self.entitlements.get(item_id).map_or(0, |e| e.quantity())
    }

    pub fn owns(&self, item_id: &str) -> bool {
        self.unspent(item_id) > 0
    }

    /// A game or skin is bought once: refused if the user holds it or has it in one of `pending`.
    pub fn check_not_owned<'a>(
        &self,
        item_id: &str,
        pending: impl IntoIterator<Item = &'a Order>,
    ) -> Result<(), &'static str> {
        if self.owns(item_id) || pending.into_iter().any(|o| o.has_item(item_id)) {
            return Err("already_owned");
        }
        Ok(())
    }

    /// A credit, or a top-up whose payment succeeded: repays the debt first. What it repaid.
    pub fn credit(&mut self, amount: Minor) -> Minor {
        self.wallet.credit(amount);
        self.repay_debt(amount)
    }

    /// After `amount` came in: `min(debt, amount)` of it pays the debt back, and once the debt is paid a
    /// freeze the debt made is lifted. What was repaid.
    pub fn repay_debt(&mut self, amount: Minor) -> Minor {
        // (apply also bounds it by the available money, which the money just come in always covers)
        let repaid = self.debt.min(amount);
        if repaid <= 0 {
            return 0;
        }
        self.wallet.balance = sub(self.wallet.balance, repaid);
        self.debt = sub(self.debt, repaid);
        if self.debt == 0 && self.frozen.as_deref() == Some(DEBT_FREEZE_REASON) {
            self.frozen = None;
        }
        repaid
    }

    /// Spending (orders, completions, top-ups, consumption, tokens) is refused on a frozen account.
    pub fn check_not_frozen(&self) -> Result<(), &'static str> {
        if self.frozen.is_some() {
            return Err("account_frozen");
        }
        Ok(())
    }

    /// `FreezeUser`: a frozen account stays frozen for its first reason.
    pub fn freeze(&mut self, reason: &str) {
        if self.frozen.is_none() {
            self.frozen = Some(reason.to_owned());
        }
    }

    /// `UnfreezeUser`: refused while debt is outstanding, unless forced (the debt stays).
    pub fn unfreeze(&mut self, force: bool) -> Result<(), &'static str> {
        if self.debt > 0 && !force {
            return Err("debt_outstanding");
        }
        self.frozen = None;
        Ok(())
    }

    /// `OpenDispute` holds what is available of the disputed amount. What it holds.
    pub fn hold_dispute(&mut self, amount: Minor) -> Minor {
        let held = amount.min(self.wallet.available()).max(0);
        self.wallet.hold(held);
        held
    }

    /// A won dispute (or a lost one with nothing left to take back) releases its hold.
    pub fn release_dispute(&mut self, held: Minor) {
        self.wallet.release(held);
    }

    /// Writes a reversal `plan_reversal` planned, after the caller made its `revokes` (with
    /// [`Account::revoke`]): the dispute's hold released, the wallet charged `amount`, what it lacked lent
    /// as debt (which freezes the account if it is not frozen).
    pub fn take_back(&mut self, amount: Minor, hold: Minor, plan: &ReversalPlan) {
        self.wallet.release(hold);
        self.wallet.balance = add(self.wallet.balance, plan.debt);
        self.wallet.balance = sub(self.wallet.balance, amount);
        if plan.debt > 0 {
            self.debt = add(self.debt, plan.debt);
            if self.frozen.is_none() {
                self.frozen = Some(DEBT_FREEZE_REASON.to_owned());
            }
        }
    }

    /// A new order holds its total (its checks passed).
    pub fn place(&mut self, order: &Order) {
        debug_assert_eq!(order.status, OrderStatus::Pending);
        self.wallet.hold(order.total);
    }

    /// Completing a pending order: debit the hold and grant the items.
    pub fn complete(&mut self, order: &mut Order) {
        debug_assert_eq!(order.status, OrderStatus::Pending);
        self.wallet.debit(order.total);
        for line in &order.lines {
            self.entitlements
                .entry(line.item_id.clone())
                .or_default()
                .granted += u64::from(line.quantity);
        }
        order.status = OrderStatus::Completed;
    }

    /// The client cancels a pending order: its hold is released.
    pub fn cancel(&mut self, order: &mut Order) {
        debug_assert_eq!(order.status, OrderStatus::Pending);
        self.wallet.release(order.total);
        order.status = OrderStatus::CancelledByClient;
    }

    /// A pending order's deadline passed: its hold is released.
    pub fn expire(&mut self, order: &mut Order) {
        debug_assert_eq!(order.status, OrderStatus::Pending);
        self.wallet.release(order.total);
        order.status = OrderStatus::Expired;
    }

    /// Every check of a refund of `requested` (see `refund_quantities`), in apply's order: for each line,
    /// `window` (the refund window, unless forced), then that the units are unspent. The plan, or why the
    /// refund is refused.
    pub fn decide_refund(
        &self,
        order: &Order,
        requested: Option<&[(&str, u32)]>,
        window: impl Fn(&Line) -> Result<(), &'static str>,
    ) -> Result<RefundPlan, &'static str> {
        let quantities = refund_quantities(order, requested)?;
        let mut amount: Minor = 0;
        for &(index, quantity) in &quantities {
            let line = &order.lines[index];
            window(line)?;
            if self.unspent(&line.item_id) < u64::from(quantity) {
                return Err("already_consumed");
            }
            amount = amount
                .checked_add(amount_of(line.unit_price, quantity)?)
                .ok_or("invalid_request")?;
        }
        Ok(RefundPlan { quantities, amount })
    }

    /// Writes a refund the player asked for (`decide_refund` planned it): see [`Account::revoke`]; the
    /// money back repays the debt first.
    pub fn refund(&mut self, order: &mut Order, plan: &RefundPlan) {
        self.revoke(order, plan);
        self.repay_debt(plan.amount);
    }

    /// Writes a refund: the lines' refunded quantities, the revocations, the money back and the order's
    /// new status. A reversal's refund (`--on-reversal revoke`) is only this: its money is the reversal's.
    pub fn revoke(&mut self, order: &mut Order, plan: &RefundPlan) {
        for &(index, quantity) in &plan.quantities {
            let line = &mut order.lines[index];
            line.refunded += quantity;
            self.entitlements
                .get_mut(&line.item_id)
                .expect("a refunded line was granted")
                .revoked += u64::from(quantity);
        }
        self.wallet.refund(plan.amount);
        order.refund_count += 1;
        order.status = order.status_after_refund();
    }

    /// Consumes `quantity` of `item_id` (only currency can be consumed); what is left, or why not.
    pub fn consume(
        &mut self,
        item_id: &str,
        quantity: u32,
        consumable: bool,
    ) -> Result<u64, &'static str> {
        let Some(entitlement) = self.entitlements.get_mut(item_id) else {
            return Err("insufficient_entitlement");
        };
        if !consumable {
            return Err("invalid_request");
        }
        if entitlement.quantity() < u64::from(quantity) {
            return Err("insufficient_entitlement");
        }
        entitlement.consumed += u64::from(quantity);
        Ok(entitlement.quantity())
    }
}

/// The most refunds one reversal makes with `--on-reversal revoke`.
const MAX_REVOKED_ORDERS: usize = shopkeep::domain::reversal::MAX_REVOKED_ORDERS;

/// A credit or a completed top-up, as reversals see it: what it brought in, and its reversals so far by
/// `external_ref`.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub brought_in: Minor,
    /// external_ref → amount.
    pub reversals: BTreeMap<String, Minor>,
}

/// What a reversal request comes to, before anything is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReversalDecision {
    /// The reversal with this `external_ref` exists with this amount: answered unchanged.
    Existing,
    /// A new reversal.
    New,
}

impl Source {
    pub fn new(brought_in: Minor) -> Source {
        Source {
            brought_in,
            reversals: BTreeMap::new(),
        }
    }

    /// What its reversals took back so far.
    pub fn reversed(&self) -> Minor {
        self.reversals.values().copied().fold(0, add)
    }

    /// What it can still give back.
    pub fn reversible(&self) -> Minor {
        sub(self.brought_in, self.reversed()).max(0)
    }

    /// An amount may be reversed (or disputed) if the source can still give it back.
    pub fn check_reversible(&self, amount: Minor) -> Result<(), &'static str> {
        let max = shopkeep::domain::reversal::MAX_REVERSALS_PER_SOURCE as usize;
        if self.reversals.len() >= max {
            return Err("limit_exceeded");
        }
        if amount > self.reversible() {
            return Err("reversal_exceeds_credit");
        }
        Ok(())
    }

    /// `Reverse`: the same `external_ref` is the same reversal (another amount: a conflict); a new one
    /// must fit in what is left.
    pub fn decide_reversal(
        &self,
        external_ref: &str,
        amount: Minor,
    ) -> Result<ReversalDecision, &'static str> {
        if let Some(&existing) = self.reversals.get(external_ref) {
            return if existing == amount {
                Ok(ReversalDecision::Existing)
            } else {
                Err("external_ref_conflict")
            };
        }
        self.check_reversible(amount)?;
        Ok(ReversalDecision::New)
    }

    /// Records a reversal written.
    pub fn record(&mut self, external_ref: &str, amount: Minor) {
        self.reversals.insert(external_ref.to_owned(), amount);
    }
}

/// How a reversal of `amount` is covered: `from_hold + from_wallet + debt = amount`, `from_wallet`
/// including what the `revokes` brought back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReversalPlan {
    pub from_hold: Minor,
    pub from_wallet: Minor,
    pub debt: Minor,
    /// (the caller's key of the order, the refund of it) of every refund `--on-reversal revoke` makes,
    /// newest purchase first.
    pub revokes: Vec<(usize, RefundPlan)>,
    pub revoked_amount: Minor,
}

/// Decides how a reversal of `amount` is covered: first `hold` (a lost dispute's), then the available
/// money; with `revoke`, then refunds of `purchases` (the user's orders made since the money came in,
/// newest first, keyed by the caller; `consumable` tells currency items): each completed or partly refunded order with refunds left, each
/// line's unconsumed units (nothing of a free line, a currency line only as many units as still
/// needed), until the shortfall is covered or `MAX_REVOKED_ORDERS` orders are refunded. The rest is debt.
pub fn plan_reversal(
    account: &Account,
    amount: Minor,
    hold: Minor,
    revoke: bool,
    purchases: &[(usize, &Order)],
    consumable: impl Fn(&str) -> bool,
) -> ReversalPlan {
    let available = add(account.wallet.available(), hold);
    let shortfall = sub(amount, available).max(0);
    let mut revokes = Vec::new();
    let mut covered: Minor = 0;
    if revoke && shortfall > 0 {
        let mut unspent: BTreeMap<&str, u64> = BTreeMap::new();
        for &(key, order) in purchases {
            if covered >= shortfall || revokes.len() >= MAX_REVOKED_ORDERS {
                break;
            }
            if !matches!(
                order.status,
                OrderStatus::Completed | OrderStatus::PartiallyRefunded
            ) || order.refund_count >= MAX_REFUNDS_PER_ORDER
            {
                continue;
            }
            let mut quantities = Vec::new();
            let mut order_amount: Minor = 0;
            for (index, line) in order.lines.iter().enumerate() {
                let still_needed = sub(shortfall, covered);
                if still_needed <= 0 || line.unit_price <= 0 {
                    continue;
                }
                let left = *unspent
                    .get(line.item_id.as_str())
                    .unwrap_or(&account.unspent(&line.item_id));
                let price = line.unit_price;
                let needed_units =
                    (still_needed / price + i64::from(still_needed % price != 0)).max(1);
                let mut quantity = u64::from(line.refundable()).min(left);
                if consumable(&line.item_id) {
                    quantity = quantity.min(needed_units as u64);
                }
                if quantity == 0 {
                    continue;
                }
                let quantity = u32::try_from(quantity).expect("a line's quantity fits");
                unspent.insert(&line.item_id, left - u64::from(quantity));
                let line_amount = amount_of(price, quantity).expect("a line's amount fits");
                covered = add(covered, line_amount);
                order_amount = add(order_amount, line_amount);
                quantities.push((index, quantity));
            }
            if !quantities.is_empty() {
                revokes.push((
                    key,
                    RefundPlan {
                        quantities,
                        amount: order_amount,
                    },
                ));
            }
        }
    }
    let debt = sub(shortfall, covered).max(0);
    let from_hold = hold.min(amount);
    ReversalPlan {
        from_hold,
        from_wallet: sub(sub(amount, from_hold), debt),
        debt,
        revokes,
        revoked_amount: covered,
    }
}
