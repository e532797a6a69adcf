//! Property tests of the state machine on a real redb file: random sequences of commands (with replays,
//! key reuse, expiries, partial refunds, consumption) against a plain in-memory model of the shop's rules.
//! After every command the outcome's kind must match the model's; at the end every wallet, order and
//! entitlement must match, and the audit must find no violation. A second property applies the same
//! envelopes to a fresh store in different batch sizes and demands the same outcomes and `state_hash`.
//!
//! Money also goes back out: reversals of credits and completed top-ups (duplicate and conflicting
//! `external_ref`s, amounts past what is left, `--on-reversal revoke` modelled exactly), PSP disputes
//! (opened, won, lost, closed before they were opened), debt and its repayment, freezes. After every
//! command every wallet, debt and freeze must match the model, money must be conserved (wallets +
//! psp_clearing + revenue + receivable = 0, receivable = −Σ debts), no balance or debt is negative, and
//! money coming in (a credit, a completed top-up, a player's refund) repays the debt first.

use std::collections::BTreeMap;

use proptest::prelude::*;
use shopkeep::domain::command::{self, IdempotencyTag};
use shopkeep::domain::{
    Command, DisputeStatus, Envelope, IdSeed, ItemKind, ItemSpec, LineRequest, Money, OrderStatus,
    Outcome, RefClaim, Reply, ReversalReason, ReversalSource, Timestamp,
};
use shopkeep::state::{ShardStore, audit};
use uuid::Uuid;

use crate::shop_model::{
    self, Account, Line, Order, OrderStatus as MStatus, ReversalDecision, ReversalPlan, Source,
    Transition,
};

const USERS: [&str; 3] = ["u0", "u1", "u2"];
const MAX_PENDING: u32 = 3;
const IDEMPOTENCY_TTL_MICROS: i64 = 600 * 1_000_000;

/// (id, kind, price in cents, active, refund window days)
const ITEMS: [(&str, ItemKind, i64, bool, u32); 5] = [
    ("skin", ItemKind::Skin, 500, true, 14),
    ("game", ItemKind::Game, 1000, true, 0),
    ("gems", ItemKind::Currency, 99, true, 14),
    ("free", ItemKind::Currency, 0, true, 14),
    ("old", ItemKind::Skin, 300, false, 14),
];
/// Index 5 names an item that does not exist.
const ITEM_NAMES: [&str; 6] = ["skin", "game", "gems", "free", "old", "nope"];
/// The `external_ref`s of reversals: a small pool, so that the same one comes again (the same reversal,
/// or a conflict) on the same source and on others.
const REVERSAL_REFS: usize = 3;
/// The PSP's dispute ids, per user.
const DISPUTE_IDS: usize = 3;
/// The reason of an operator's freeze.
const OPS_FREEZE: &str = "fraud check";

/// An amount relative to what a source brought in and can still give back.
#[derive(Clone, Copy, Debug)]
enum Pick {
    Minor(i64),
    /// All it can still give back.
    Rest,
    /// One more than it can still give back.
    PastRest,
    /// All it brought in.
    All,
}

impl Pick {
    fn resolve(self, source: Option<&Source>) -> i64 {
        let (brought_in, rest) = source.map_or((100, 100), |s| (s.brought_in, s.reversible()));
        match self {
            Pick::Minor(m) => m,
            Pick::Rest => rest.max(1),
            Pick::PastRest => rest + 1,
            Pick::All => brought_in.max(1),
        }
    }
}

fn pick_strategy() -> impl Strategy<Value = Pick> {
    prop_oneof![
        2 => (1i64..2500).prop_map(Pick::Minor),
        3 => Just(Pick::Rest),
        1 => Just(Pick::PastRest),
        1 => Just(Pick::All),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Advance(u32),
    Credit {
        user: usize,
        amount: i64,
        external_ref: usize,
    },
    Order {
        user: usize,
        lines: Vec<(usize, u32)>,
        complete: bool,
        price_delta: i64,
        ttl_seconds: u32,
    },
    Complete {
        user: usize,
        order: usize,
    },
    Cancel {
        user: usize,
        order: usize,
    },
    Refund {
        user: usize,
        order: usize,
        lines: Option<Vec<(usize, u32)>>,
        force: bool,
    },
    Consume {
        user: usize,
        item: usize,
        quantity: u32,
    },
    Sweep,
    /// A `PurgeIdempotency` over every record: the walk, which stops the retention index.
    Walk,
    Replay(usize),
    Reuse(usize),
    /// A (capped) top-up, `paid` at once by the PSP or later by `PayTopup`.
    CreateTopup {
        user: usize,
        amount: i64,
        paid: bool,
    },
    /// The PSP's payment of one of the top-ups made (a replay of one already final changes nothing).
    PayTopup {
        topup: usize,
        succeeded: bool,
    },
    /// A reversal of one of the credits or top-ups made, by its owner unless `user` names another.
    Reverse {
        user: Option<usize>,
        source: usize,
        amount: Pick,
        external_ref: usize,
        revoke: bool,
        chargeback: bool,
    },
    OpenDispute {
        user: Option<usize>,
        topup: usize,
        dispute: usize,
        amount: Pick,
    },
    CloseDispute {
        user: Option<usize>,
        topup: usize,
        dispute: usize,
        won: bool,
        amount: Option<Pick>,
        revoke: bool,
    },
    Freeze {
        user: usize,
    },
    Unfreeze {
        user: usize,
        force: bool,
    },
}

fn lines_strategy(max_qty: u32) -> impl Strategy<Value = Vec<(usize, u32)>> {
    prop::collection::btree_map(0usize..6, 1u32..=max_qty, 1..4)
        .prop_map(|m| m.into_iter().collect())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Multiples of 10 s, like the order TTLs, so that time often lands exactly on a deadline.
        3 => (0u32..6).prop_map(|tens| Op::Advance(tens * 10)),
        4 => (0usize..3, 1i64..3000, 0usize..6).prop_map(|(user, amount, external_ref)| Op::Credit { user, amount, external_ref }),
        6 => (0usize..3, lines_strategy(3), any::<bool>(), prop_oneof![4 => Just(0i64), 1 => -50i64..50], (1u32..9).prop_map(|tens| tens * 10))
            .prop_map(|(user, lines, complete, price_delta, ttl_seconds)| Op::Order { user, lines, complete, price_delta, ttl_seconds }),
        // A purchase that goes through if the money is there: what reversals find spent, and revoke.
        4 => (0usize..3, prop_oneof![Just(0usize), Just(1), Just(2), Just(2)], 1u32..=3).prop_map(|(user, item, quantity)| Op::Order {
            user,
            lines: vec![(item, if item == 2 { quantity } else { 1 })],
            complete: true,
            price_delta: 0,
            ttl_seconds: 60,
        }),
        4 => (0usize..3, 0usize..64).prop_map(|(user, order)| Op::Complete { user, order }),
        2 => (0usize..3, 0usize..64).prop_map(|(user, order)| Op::Cancel { user, order }),
        3 => (0usize..3, 0usize..64, prop::option::of(lines_strategy(2)), prop::bool::weighted(0.2))
            .prop_map(|(user, order, lines, force)| Op::Refund { user, order, lines, force }),
        2 => (0usize..3, 0usize..6, 1u32..4).prop_map(|(user, item, quantity)| Op::Consume { user, item, quantity }),
        1 => Just(Op::Sweep),
        1 => Just(Op::Walk),
        2 => (0usize..1000).prop_map(Op::Replay),
        1 => (0usize..1000).prop_map(Op::Reuse),
        3 => (0usize..3, 1i64..3000, prop::bool::weighted(0.6)).prop_map(|(user, amount, paid)| Op::CreateTopup { user, amount, paid }),
        2 => (0usize..64, prop::bool::weighted(0.8)).prop_map(|(topup, succeeded)| Op::PayTopup { topup, succeeded }),
        5 => (prop::option::weighted(0.1, 0usize..3), 0usize..64, pick_strategy(), 0usize..REVERSAL_REFS, any::<bool>(), any::<bool>())
            .prop_map(|(user, source, amount, external_ref, revoke, chargeback)| Op::Reverse { user, source, amount, external_ref, revoke, chargeback }),
        3 => (prop::option::weighted(0.1, 0usize..3), 0usize..64, 0usize..DISPUTE_IDS, pick_strategy())
            .prop_map(|(user, topup, dispute, amount)| Op::OpenDispute { user, topup, dispute, amount }),
        3 => (prop::option::weighted(0.1, 0usize..3), 0usize..64, 0usize..DISPUTE_IDS, any::<bool>(), prop::option::weighted(0.3, pick_strategy()), any::<bool>())
            .prop_map(|(user, topup, dispute, won, amount, revoke)| Op::CloseDispute { user, topup, dispute, won, amount, revoke }),
        1 => (0usize..3).prop_map(|user| Op::Freeze { user }),
        2 => (0usize..3, any::<bool>()).prop_map(|(user, force)| Op::Unfreeze { user, force }),
    ]
}

// ----- the model ------------------------------------------------------------------------------------
// The rules are `shop_model`'s; what is here is the commands' bookkeeping and the order of their checks.

/// An order of the model: the rules' order, whose it is, and when it was completed.
#[derive(Clone, Debug)]
struct MOrder {
    id: Uuid,
    user: &'static str,
    created_at: i64,
    completed_at: i64,
    order: Order,
}

/// What a top-up's payment did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopupState {
    /// Pending or expired: a successful payment still completes it.
    Open,
    Completed,
    Failed,
}

/// A credit or a top-up of the model, as reversals and disputes see it.
#[derive(Clone, Debug)]
struct MSource {
    user: &'static str,
    /// A credit's `external_ref` (`None`: a top-up).
    credit_ref: Option<String>,
    /// A top-up's amount.
    amount: i64,
    topup: TopupState,
    /// When the money came in (a credit's creation, a top-up's completion): purchases since then are
    /// what `--on-reversal revoke` refunds.
    since: i64,
    source: Source,
}

#[derive(Clone, Debug)]
struct MDispute {
    topup_id: Uuid,
    amount: i64,
    held: i64,
    status: DisputeStatus,
}

#[derive(Default)]
struct Model {
    accounts: BTreeMap<&'static str, Account>,
    orders: Vec<MOrder>,
    /// external_ref → (user, amount)
    credits: BTreeMap<String, (&'static str, i64)>,
    /// (scope, key) → expires_at, for the stored outcomes
    idempotency: BTreeMap<(String, String), i64>,
    /// credit or top-up id → what reversals see of it
    sources: BTreeMap<Uuid, MSource>,
    /// (user, dispute id) → dispute
    disputes: BTreeMap<(&'static str, String), MDispute>,
}

type Expect = Result<(), &'static str>;

fn item(name: &str) -> Option<(ItemKind, i64, bool, u32)> {
    ITEMS
        .iter()
        .find(|i| i.0 == name)
        .map(|i| (i.1, i.2, i.3, i.4))
}

fn consumable(name: &str) -> bool {
    item(name).is_some_and(|(kind, ..)| kind.is_consumable())
}

impl Model {
    fn new() -> Model {
        let mut model = Model::default();
        for user in USERS {
            model.accounts.insert(user, Account::default());
        }
        model
    }

    fn account(&mut self, user: &str) -> &mut Account {
        self.accounts.get_mut(user).unwrap()
    }

    /// Every command of a user first expires that user's orders whose deadline has passed.
    fn expire_user(&mut self, user: &str, now: i64) {
        let account = self.accounts.get_mut(user).unwrap();
        for order in self
            .orders
            .iter_mut()
            .filter(|o| o.user == user && o.order.due_at(now))
        {
            account.expire(&mut order.order);
        }
    }

    fn sweep(&mut self, now: i64) {
        for user in USERS {
            self.expire_user(user, now);
        }
        self.purge_idempotency(now);
    }

    fn purge_idempotency(&mut self, now: i64) {
        self.idempotency.retain(|_, expires_at| *expires_at > now);
    }

    fn credit(
        &mut self,
        user: &'static str,
        amount: i64,
        external_ref: &str,
        ref_accepted: bool,
        now: i64,
    ) -> Expect {
        self.expire_user(user, now);
        if let Some(&(owner, existing)) = self.credits.get(external_ref) {
            return if owner == user && existing == amount {
                Ok(())
            } else {
                Err("external_ref_conflict")
            };
        }
        if !ref_accepted {
            return Err("external_ref_conflict");
        }
        self.credits.insert(external_ref.to_owned(), (user, amount));
        self.account(user).credit(amount);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn create_order(
        &mut self,
        id: Uuid,
        user: &'static str,
        lines: &[(usize, u32)],
        complete: bool,
        price_delta: i64,
        expires_at: i64,
        now: i64,
    ) -> (Expect, Option<i64>) {
        self.expire_user(user, now);
        if let Err(code) = self.accounts[user].check_not_frozen() {
            return (Err(code), None);
        }
        let pending: Vec<&Order> = self
            .orders
            .iter()
            .filter(|o| o.user == user && o.order.status == MStatus::Pending)
            .map(|o| &o.order)
            .collect();
        if !complete && pending.len() >= MAX_PENDING as usize {
            return (Err("too_many_pending_orders"), None);
        }
        let account = &self.accounts[user];
        let mut order_lines = Vec::new();
        for &(index, quantity) in lines {
            let name = ITEM_NAMES[index];
            let Some((kind, price, active, _)) = item(name) else {
                return (Err("item_not_found"), None);
            };
            if !active {
                return (Err("item_inactive"), None);
            }
            if let Err(code) = shop_model::check_quantity(kind.is_consumable(), quantity) {
                return (Err(code), None);
            }
            if !kind.is_consumable() {
                if let Err(code) = account.check_not_owned(name, pending.iter().copied()) {
                    return (Err(code), None);
                }
            }
            order_lines.push(Line::new(name, quantity, price));
        }
        let mut order = match Order::new(order_lines, expires_at) {
            Ok(order) => order,
            Err(code) => return (Err(code), None),
        };
        let expected = order.total + price_delta;
        let sent = (expected >= 0).then_some(expected);
        if let Err(code) =
            shop_model::check_expected_total(sent.filter(|_| price_delta != 0), order.total)
        {
            return (Err(code), sent);
        }
        if let Err(code) = account.wallet.check_hold(order.total) {
            return (Err(code), sent);
        }
        let account = self.account(user);
        account.place(&order);
        if complete {
            account.complete(&mut order);
        }
        self.orders.push(MOrder {
            id,
            user,
            created_at: now,
            completed_at: if complete { now } else { 0 },
            order,
        });
        (Ok(()), sent)
    }

    fn order_of(&self, user: &str, id: Uuid) -> Option<usize> {
        self.orders
            .iter()
            .position(|o| o.id == id && o.user == user)
    }

    fn complete(&mut self, user: &'static str, id: Uuid, now: i64) -> Expect {
        self.expire_user(user, now);
        let Some(index) = self.order_of(user, id) else {
            return Err("order_not_found");
        };
        let order = &mut self.orders[index];
        if shop_model::complete_rule(order.order.status)? == Transition::Applies {
            self.accounts[user].check_not_frozen()?;
            self.accounts
                .get_mut(user)
                .unwrap()
                .complete(&mut order.order);
            order.completed_at = now;
        }
        Ok(())
    }

    fn cancel(&mut self, user: &'static str, id: Uuid, now: i64) -> Expect {
        self.expire_user(user, now);
        let Some(index) = self.order_of(user, id) else {
            return Err("order_not_found");
        };
        let order = &mut self.orders[index];
        if shop_model::cancel_rule(order.order.status)? == Transition::Applies {
            self.accounts
                .get_mut(user)
                .unwrap()
                .cancel(&mut order.order);
        }
        Ok(())
    }

    fn refund(
        &mut self,
        user: &'static str,
        id: Uuid,
        lines: &Option<Vec<(usize, u32)>>,
        force: bool,
        now: i64,
    ) -> Expect {
        self.expire_user(user, now);
        let Some(index) = self.order_of(user, id) else {
            return Err("order_not_found");
        };
        let requested: Option<Vec<(&str, u32)>> = lines
            .as_ref()
            .map(|ls| ls.iter().map(|&(i, q)| (ITEM_NAMES[i], q)).collect());
        let MOrder {
            completed_at,
            order,
            ..
        } = &mut self.orders[index];
        let account = self.accounts.get_mut(user).unwrap();
        let plan = account.decide_refund(order, requested.as_deref(), |line| {
            if force {
                return Ok(());
            }
            let (.., window_days) = item(&line.item_id).expect("a bought item is in the catalog");
            shop_model::check_refund_window(window_days, *completed_at, now)
        })?;
        account.refund(order, &plan);
        Ok(())
    }

    fn consume(
        &mut self,
        user: &'static str,
        item_index: usize,
        quantity: u32,
        now: i64,
    ) -> Expect {
        self.expire_user(user, now);
        self.accounts[user].check_not_frozen()?;
        let name = ITEM_NAMES[item_index];
        self.account(user)
            .consume(name, quantity, consumable(name))
            .map(|_| ())
    }

    fn add_credit_source(
        &mut self,
        credit_id: Uuid,
        user: &'static str,
        amount: i64,
        external_ref: &str,
        now: i64,
    ) {
        let source = MSource {
            user,
            credit_ref: Some(external_ref.to_owned()),
            amount,
            topup: TopupState::Completed,
            since: now,
            source: Source::new(amount),
        };
        self.sources.insert(credit_id, source);
    }

    /// `CreateTopupCapped` (under a cap the test never reaches): refused on a frozen account.
    fn create_topup(&mut self, user: &'static str, now: i64) -> Expect {
        self.expire_user(user, now);
        self.accounts[user].check_not_frozen()
    }

    fn add_topup(&mut self, topup_id: Uuid, user: &'static str, amount: i64) {
        let source = MSource {
            user,
            credit_ref: None,
            amount,
            topup: TopupState::Open,
            since: 0,
            source: Source::new(0),
        };
        self.sources.insert(topup_id, source);
    }

    /// The PSP's payment of a top-up: completes (credits, debt first) or fails an open one; a final one
    /// is answered unchanged. What came in.
    fn pay_topup(&mut self, topup_id: Uuid, succeeded: bool, now: i64) -> Option<i64> {
        let user = self.sources[&topup_id].user;
        self.expire_user(user, now);
        let source = self.sources.get_mut(&topup_id).unwrap();
        if source.topup != TopupState::Open {
            return None;
        }
        if !succeeded {
            source.topup = TopupState::Failed;
            return None;
        }
        source.topup = TopupState::Completed;
        source.since = now;
        source.source = Source::new(source.amount);
        let amount = source.amount;
        self.accounts.get_mut(user).unwrap().credit(amount);
        Some(amount)
    }

    /// The user's completed top-up, or why a dispute or reversal of it is refused.
    fn completed_topup(&self, user: &str, topup_id: Uuid) -> Result<&MSource, &'static str> {
        match self.sources.get(&topup_id) {
            Some(s) if s.user == user && s.credit_ref.is_none() => match s.topup {
                TopupState::Completed => Ok(s),
                _ => Err("invalid_state"),
            },
            _ => Err("topup_not_found"),
        }
    }

    /// `Reverse`. The plan of a new reversal (`None`: an existing one, unchanged), or why it is refused.
    #[allow(clippy::too_many_arguments)]
    fn reverse(
        &mut self,
        user: &'static str,
        source_id: Uuid,
        is_credit: bool,
        amount: i64,
        external_ref: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<ReversalPlan>, &'static str> {
        self.expire_user(user, now);
        let source = if is_credit {
            match self.sources.get(&source_id) {
                Some(s) if s.user == user && s.credit_ref.is_some() => s,
                _ => return Err("not_found"),
            }
        } else {
            self.completed_topup(user, source_id)?
        };
        match source.source.decide_reversal(external_ref, amount)? {
            ReversalDecision::Existing => Ok(None),
            ReversalDecision::New => Ok(Some(self.take_back(
                user,
                source_id,
                amount,
                external_ref,
                revoke,
                0,
            ))),
        }
    }

    /// Writes a reversal of `amount` of `source_id` (a lost dispute's `hold` first), as
    /// `shop_model::plan_reversal` covers it, and records it on the source.
    fn take_back(
        &mut self,
        user: &'static str,
        source_id: Uuid,
        amount: i64,
        external_ref: &str,
        revoke: bool,
        hold: i64,
    ) -> ReversalPlan {
        let since = self.sources[&source_id].since;
        let mut purchases: Vec<(usize, &MOrder)> = self
            .orders
            .iter()
            .enumerate()
            .filter(|(_, o)| o.user == user && o.created_at >= since)
            .collect();
        // Newest first, as the user's order index lists them: by creation time, then id.
        purchases.sort_by_key(|(_, o)| std::cmp::Reverse((o.created_at, o.id.as_u128())));
        let purchases: Vec<(usize, &Order)> =
            purchases.into_iter().map(|(i, o)| (i, &o.order)).collect();
        let account = self.accounts.get_mut(user).unwrap();
        let plan = shop_model::plan_reversal(account, amount, hold, revoke, &purchases, consumable);
        for (index, refund) in &plan.revokes {
            account.revoke(&mut self.orders[*index].order, refund);
        }
        account.take_back(amount, hold, &plan);
        self.sources
            .get_mut(&source_id)
            .unwrap()
            .source
            .record(external_ref, amount);
        plan
    }

    /// `OpenDispute`: a known dispute changes nothing; a new one of a completed top-up, for no more than
    /// it can still give back, holds what is available of its amount.
    fn open_dispute(
        &mut self,
        user: &'static str,
        topup_id: Uuid,
        dispute_id: &str,
        amount: i64,
        now: i64,
    ) -> Expect {
        self.expire_user(user, now);
        if self.disputes.contains_key(&(user, dispute_id.to_owned())) {
            return Ok(());
        }
        self.completed_topup(user, topup_id)?
            .source
            .check_reversible(amount)?;
        let held = self.account(user).hold_dispute(amount);
        let dispute = MDispute {
            topup_id,
            amount,
            held,
            status: DisputeStatus::Open,
        };
        self.disputes.insert((user, dispute_id.to_owned()), dispute);
        Ok(())
    }

    /// `CloseDispute`: a closed dispute changes nothing; won releases the hold; lost reverses
    /// `min(amount, what the top-up can still give back)`, hold first. A dispute never opened is opened
    /// now holding nothing; lost, it needs the closing event's amount. The reversal's plan, if any.
    #[allow(clippy::too_many_arguments)]
    fn close_dispute(
        &mut self,
        user: &'static str,
        topup_id: Uuid,
        dispute_id: &str,
        won: bool,
        amount: Option<i64>,
        revoke: bool,
        now: i64,
    ) -> Result<Option<ReversalPlan>, &'static str> {
        self.expire_user(user, now);
        let key = (user, dispute_id.to_owned());
        let mut dispute = match self.disputes.get(&key) {
            Some(known) if known.status != DisputeStatus::Open => return Ok(None),
            Some(open) => open.clone(),
            None => {
                self.completed_topup(user, topup_id)?;
                let amount = match (amount, won) {
                    (Some(amount), _) => amount,
                    (None, true) => 0,
                    (None, false) => return Err("not_found"),
                };
                MDispute {
                    topup_id,
                    amount,
                    held: 0,
                    status: DisputeStatus::Open,
                }
            }
        };
        let mut plan = None;
        if won {
            self.account(user).release_dispute(dispute.held);
            dispute.status = DisputeStatus::Won;
        } else {
            let source = &self.sources[&dispute.topup_id].source;
            let amount = dispute.amount.min(source.reversible());
            if amount > 0 {
                source.check_reversible(amount)?;
                let external_ref = format!("dispute:{dispute_id}");
                plan = Some(self.take_back(
                    user,
                    dispute.topup_id,
                    amount,
                    &external_ref,
                    revoke,
                    dispute.held,
                ));
            } else {
                self.account(user).release_dispute(dispute.held);
            }
            dispute.status = DisputeStatus::Lost;
        }
        dispute.held = 0;
        self.disputes.insert(key, dispute);
        Ok(plan)
    }
}

// ----- driving the real state machine -------------------------------------------------------------------

struct Harness {
    _dir: tempfile::TempDir,
    store: ShardStore,
    now: i64,
    counter: u128,
    model: Model,
    /// Every envelope applied, in order, with its outcome (for the batching property).
    log: Vec<(Envelope, Outcome)>,
    /// Keyed envelopes whose outcome was stored, with that outcome.
    stored: Vec<(Envelope, Outcome)>,
    /// Ids of every order created, in order.
    order_ids: Vec<Uuid>,
    /// Ids of every credit and top-up made, in order (what reversals pick from).
    source_ids: Vec<Uuid>,
    /// Ids of every top-up made, in order.
    topup_ids: Vec<Uuid>,
}

/// What the store shows of one user's money.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Money3 {
    balance: i64,
    held: i64,
    debt: i64,
}

fn outcome_kind(outcome: &Outcome) -> Expect {
    outcome.as_ref().map(|_| ()).map_err(|r| r.code())
}

/// A new reversal is covered as the model planned it: hold, wallet (with the revoked refunds), debt.
fn check_reversal(
    reversal: &shopkeep::domain::Reversal,
    plan: &ReversalPlan,
) -> Result<(), TestCaseError> {
    let amount = plan.from_hold + plan.from_wallet + plan.debt;
    prop_assert_eq!(
        (
            reversal.amount.minor(),
            reversal.from_hold.minor(),
            reversal.from_wallet.minor(),
            reversal.debt.minor(),
            reversal.revoked_amount.minor(),
            reversal.revoked_refunds.len(),
        ),
        (
            amount,
            plan.from_hold,
            plan.from_wallet,
            plan.debt,
            plan.revoked_amount,
            plan.revokes.len(),
        ),
        "reversal {:?}",
        reversal
    );
    Ok(())
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ShardStore::open(&dir.path().join("shard.redb"), 0).expect("open store");
        let mut harness = Harness {
            _dir: dir,
            store,
            now: 1_800_000_000_000_000,
            counter: 0,
            model: Model::new(),
            log: Vec::new(),
            stored: Vec::new(),
            order_ids: Vec::new(),
            source_ids: Vec::new(),
            topup_ids: Vec::new(),
        };
        for (id, kind, price, active, window) in ITEMS {
            let spec = ItemSpec {
                item_id: id.to_owned(),
                name: id.to_owned(),
                kind,
                price: Money::from_minor(price),
                active,
                refund_window_days: window,
            };
            let outcome = harness.apply(
                Command::PutItem(command::PutItem {
                    spec,
                    version: None,
                }),
                None,
            );
            assert!(outcome.is_ok());
        }
        for user in USERS {
            let outcome = harness.apply(
                Command::CreateUser(command::CreateUser {
                    user_id: user.to_owned(),
                    display_name: None,
                }),
                None,
            );
            assert!(outcome.is_ok());
        }
        harness
    }

    fn envelope(&mut self, command: Command, scope: Option<&str>) -> Envelope {
        self.counter += 1;
        let now = Timestamp(self.now);
        let idempotency = scope.map(|scope| IdempotencyTag {
            scope: scope.to_owned(),
            key: format!("key-{}", self.counter),
            fingerprint: [(self.counter % 251) as u8; 32],
            expires_at: Timestamp(self.now + IDEMPOTENCY_TTL_MICROS),
        });
        Envelope {
            now,
            seed: IdSeed {
                unix_millis: now.unix_millis(),
                entropy: self.counter,
            },
            idempotency,
            command,
        }
    }

    fn apply_envelope(&mut self, envelope: Envelope) -> (Outcome, bool) {
        let applied = self
            .store
            .apply_batch(&[&envelope])
            .expect("apply")
            .remove(0);
        if let Some(tag) = &envelope.idempotency {
            let stored = applied.outcome.as_ref().err().is_none_or(|r| r.is_stored());
            if stored && !applied.replayed {
                self.model.idempotency.insert(
                    (tag.scope.clone(), tag.key.clone()),
                    tag.expires_at.micros(),
                );
                self.stored
                    .push((envelope.clone(), applied.outcome.clone()));
            }
        }
        self.log.push((envelope, applied.outcome.clone()));
        (applied.outcome, applied.replayed)
    }

    fn apply(&mut self, command: Command, scope: Option<&str>) -> Outcome {
        let envelope = self.envelope(command, scope);
        self.apply_envelope(envelope).0
    }

    fn order_id(&self, index: usize) -> Uuid {
        if self.order_ids.is_empty() {
            Uuid::nil()
        } else {
            self.order_ids[index % self.order_ids.len()]
        }
    }

    /// One op, then the invariants every state must keep.
    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.run_op(op)?;
        self.check_money(op)
    }

    /// The source `index` picks among the credits and top-ups made, and its owner (a random id, whose
    /// reversal is `not_found`, before any).
    fn pick_source(&self, index: usize) -> (Uuid, &'static str) {
        if self.source_ids.is_empty() {
            return (Uuid::from_u128(7), USERS[index % USERS.len()]);
        }
        let id = self.source_ids[index % self.source_ids.len()];
        (id, self.model.sources[&id].user)
    }

    /// The top-up `index` picks among those made, and its owner (a random id before any).
    fn pick_topup(&self, index: usize) -> (Uuid, &'static str) {
        if self.topup_ids.is_empty() {
            return (Uuid::from_u128(7), USERS[index % USERS.len()]);
        }
        let id = self.topup_ids[index % self.topup_ids.len()];
        (id, self.model.sources[&id].user)
    }

    /// The PSP's payment of a top-up (succeeded or failed), at the top-up's amount.
    fn pay_topup(&mut self, topup_id: Uuid, succeeded: bool, op: &Op) -> Result<(), TestCaseError> {
        let (user, amount) = {
            let source = &self.model.sources[&topup_id];
            (source.user, source.amount)
        };
        let came_in = self.model.pay_topup(topup_id, succeeded, self.now);
        let before = self.money_of(user);
        let outcome = self.apply(
            Command::PspPayment(command::PspPayment {
                event_id: format!("evt-{}", self.counter),
                succeeded,
                topup_id,
                user_id: user.to_owned(),
                amount: Money::from_minor(amount),
                psp_payment_id: format!("pi-{topup_id}"),
                ref_accepted: true,
            }),
            None,
        );
        prop_assert_eq!(outcome_kind(&outcome), Ok(()), "{:?}", op);
        if let Some(amount) = came_in {
            self.check_repaid_first(user, before, amount)?;
        }
        Ok(())
    }

    /// The user's balance, held and debt in the store.
    fn money_of(&self, user: &str) -> Money3 {
        let txn = self.store.begin_read().expect("read");
        let stored = shopkeep::state::query::user(&txn, user)
            .expect("read user")
            .expect("user exists");
        let debt = shopkeep::state::query::debt(&txn, user).expect("debt");
        Money3 {
            balance: stored.balance.minor(),
            held: stored.held.minor(),
            debt: debt.minor(),
        }
    }

    /// Money that came in (`amount`: a credit, a completed top-up, a player's refund) paid the debt
    /// first: the debt fell by `min(debt, amount)`, and only the rest reached the balance.
    fn check_repaid_first(
        &self,
        user: &str,
        before: Money3,
        amount: i64,
    ) -> Result<(), TestCaseError> {
        let after = self.money_of(user);
        let repaid = before.debt.min(amount);
        prop_assert_eq!(
            after.debt,
            before.debt - repaid,
            "{} had a debt of {} when {} came in",
            user,
            before.debt,
            amount
        );
        prop_assert_eq!(
            after.balance,
            before.balance + amount - repaid,
            "{}: only what the debt left reaches the balance",
            user
        );
        Ok(())
    }

    /// After every op: each wallet, debt and freeze is the model's; no balance, held or debt is negative;
    /// `held ≤ balance`; money is conserved: wallets + psp_clearing + revenue + receivable = 0, and the
    /// receivable is minus the debts.
    fn check_money(&self, op: &Op) -> Result<(), TestCaseError> {
        let txn = self.store.begin_read().expect("read");
        let meta = shopkeep::state::query::meta(&txn).expect("meta");
        let receivable = shopkeep::state::query::receivable(&txn).expect("receivable");
        let mut wallets: i128 = 0;
        let mut debts: i128 = 0;
        for user in USERS {
            let stored = shopkeep::state::query::user(&txn, user)
                .expect("read user")
                .expect("user exists");
            let debt = shopkeep::state::query::debt(&txn, user)
                .expect("debt")
                .minor();
            let frozen = shopkeep::state::query::frozen(&txn, user).expect("frozen");
            let (balance, held) = (stored.balance.minor(), stored.held.minor());
            prop_assert!(
                balance >= 0 && held >= 0 && held <= balance && debt >= 0,
                "{}: balance {}, held {}, debt {} after {:?}",
                user,
                balance,
                held,
                debt,
                op
            );
            let model = &self.model.accounts[user];
            prop_assert_eq!(
                (balance, held, debt),
                (model.wallet.balance, model.wallet.held, model.debt),
                "wallet and debt of {} after {:?}",
                user,
                op
            );
            prop_assert_eq!(
                frozen.map(|f| f.reason),
                model.frozen.clone(),
                "freeze of {} after {:?}",
                user,
                op
            );
            wallets += i128::from(balance);
            debts += i128::from(debt);
        }
        prop_assert_eq!(i128::from(receivable), -debts, "receivable after {:?}", op);
        prop_assert_eq!(
            wallets
                + i128::from(meta.psp_clearing)
                + i128::from(meta.revenue)
                + i128::from(receivable),
            0,
            "money is conserved after {:?}",
            op
        );
        Ok(())
    }

    fn run_op(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = self.now;
        match op.clone() {
            Op::Advance(seconds) => self.now += i64::from(seconds) * 1_000_000,
            Op::Sweep => {
                let outcome = self.apply(Command::Sweep(command::Sweep { limit: 1000 }), None);
                prop_assert!(outcome.is_ok());
                self.model.sweep(now);
            }
            Op::Walk => {
                let outcome = self.apply(walk("", "", u32::MAX, u32::MAX), None);
                prop_assert!(
                    matches!(outcome, Ok(Reply::IdempotencyPurged { next: None, .. })),
                    "{:?}",
                    outcome
                );
                self.model.purge_idempotency(now);
            }
            Op::Credit {
                user,
                amount,
                external_ref,
            } => {
                let user = USERS[user];
                let reference = format!("ref-{external_ref}");
                let claim = RefClaim {
                    user_id: user.to_owned(),
                    amount: Money::from_minor(amount),
                    topup_id: None,
                };
                let accepted = match self.apply(
                    Command::ClaimExternalRef(command::ClaimExternalRef {
                        reference: format!("credit:{reference}"),
                        claim,
                    }),
                    None,
                ) {
                    Ok(Reply::RefClaimed { accepted }) => accepted,
                    other => return Err(TestCaseError::fail(format!("claim: {other:?}"))),
                };
                let expected = self.model.credit(user, amount, &reference, accepted, now);
                let command = Command::Credit(command::Credit {
                    user_id: user.to_owned(),
                    amount: Money::from_minor(amount),
                    external_ref: reference.clone(),
                    source: None,
                    ref_accepted: accepted,
                });
                let before = self.money_of(user);
                let outcome = self.apply(command, Some(user));
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
                if let Ok(Reply::Credited {
                    credit,
                    fresh: true,
                    ..
                }) = &outcome
                {
                    self.model
                        .add_credit_source(credit.credit_id, user, amount, &reference, now);
                    self.source_ids.push(credit.credit_id);
                    self.check_repaid_first(user, before, amount)?;
                }
            }
            Op::Order {
                user,
                lines,
                complete,
                price_delta,
                ttl_seconds,
            } => {
                let user = USERS[user];
                let expires_at = now + i64::from(ttl_seconds) * 1_000_000;
                // The order id the next envelope's seed will give.
                let id = IdSeed {
                    unix_millis: Timestamp(now).unix_millis(),
                    entropy: self.counter + 1,
                }
                .derive(0);
                let (expected, expected_total) = self.model.create_order(
                    id,
                    user,
                    &lines,
                    complete,
                    price_delta,
                    expires_at,
                    now,
                );
                let command = Command::CreateOrder(command::CreateOrder {
                    user_id: user.to_owned(),
                    lines: lines
                        .iter()
                        .map(|&(i, q)| LineRequest {
                            item_id: ITEM_NAMES[i].to_owned(),
                            quantity: q,
                        })
                        .collect(),
                    expected_total: if price_delta == 0 {
                        None
                    } else {
                        expected_total.map(Money::from_minor)
                    },
                    complete,
                    expires_at: Timestamp(expires_at),
                    max_pending_orders: MAX_PENDING,
                });
                let outcome = self.apply(command, Some(user));
                if let Ok(Reply::OrderCreated(order)) = &outcome {
                    prop_assert_eq!(order.order_id, id);
                    self.order_ids.push(id);
                }
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
            }
            Op::Complete { user, order } => {
                let (user, id) = (USERS[user], self.order_id(order));
                let expected = self.model.complete(user, id, now);
                let outcome = self.apply(
                    Command::CompleteOrder(command::CompleteOrder {
                        user_id: user.to_owned(),
                        order_id: id,
                    }),
                    Some(user),
                );
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
            }
            Op::Cancel { user, order } => {
                let (user, id) = (USERS[user], self.order_id(order));
                let expected = self.model.cancel(user, id, now);
                let outcome = self.apply(
                    Command::CancelOrder(command::CancelOrder {
                        user_id: user.to_owned(),
                        order_id: id,
                    }),
                    Some(user),
                );
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
            }
            Op::Refund {
                user,
                order,
                lines,
                force,
            } => {
                let (user, id) = (USERS[user], self.order_id(order));
                let expected = self.model.refund(user, id, &lines, force, now);
                let command = Command::Refund(command::Refund {
                    user_id: user.to_owned(),
                    order_id: id,
                    lines: lines.map(|ls| {
                        ls.iter()
                            .map(|&(i, q)| LineRequest {
                                item_id: ITEM_NAMES[i].to_owned(),
                                quantity: q,
                            })
                            .collect()
                    }),
                    reason: None,
                    force,
                });
                let before = self.money_of(user);
                let outcome = self.apply(command, Some(user));
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
                if let Ok(Reply::Refunded { refund, .. }) = &outcome {
                    prop_assert!(refund.amount >= Money::ZERO);
                    self.check_repaid_first(user, before, refund.amount.minor())?;
                }
            }
            Op::Consume {
                user,
                item,
                quantity,
            } => {
                let user = USERS[user];
                let expected = self.model.consume(user, item, quantity, now);
                let command = Command::Consume(command::Consume {
                    user_id: user.to_owned(),
                    item_id: ITEM_NAMES[item].to_owned(),
                    quantity,
                });
                let outcome = self.apply(command, Some(user));
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
            }
            Op::CreateTopup { user, amount, paid } => {
                let user = USERS[user];
                let expected = self.model.create_topup(user, now);
                let command = Command::CreateTopupCapped(command::CreateTopupCapped {
                    user_id: user.to_owned(),
                    amount: Money::from_minor(amount),
                    // Often past its deadline when paid: a late payment still completes it.
                    expires_at: Timestamp(now + 60 * 1_000_000),
                    max_pending_topups: 1000,
                });
                let outcome = self.apply(command, Some(user));
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
                if let Ok(Reply::TopupCreated(topup)) = &outcome {
                    self.model.add_topup(topup.topup_id, user, amount);
                    self.topup_ids.push(topup.topup_id);
                    self.source_ids.push(topup.topup_id);
                    if paid {
                        self.pay_topup(topup.topup_id, true, op)?;
                    }
                }
            }
            Op::PayTopup { topup, succeeded } => {
                if self.topup_ids.is_empty() {
                    return Ok(());
                }
                let topup_id = self.topup_ids[topup % self.topup_ids.len()];
                self.pay_topup(topup_id, succeeded, op)?;
            }
            Op::Reverse {
                user,
                source,
                amount,
                external_ref,
                revoke,
                chargeback,
            } => {
                let (source_id, owner) = self.pick_source(source);
                let user = user.map_or(owner, |u| USERS[u]);
                let (is_credit, credit_ref, amount) = match self.model.sources.get(&source_id) {
                    Some(s) => (
                        s.credit_ref.is_some(),
                        s.credit_ref.clone(),
                        amount.resolve(Some(&s.source)),
                    ),
                    None => (true, None, amount.resolve(None)),
                };
                let external_ref = format!("rev-{external_ref}");
                let expected = self.model.reverse(
                    user,
                    source_id,
                    is_credit,
                    amount,
                    &external_ref,
                    revoke,
                    now,
                );
                let source = match credit_ref {
                    Some(credit_ref) => ReversalSource::Credit {
                        credit_id: source_id,
                        external_ref: credit_ref,
                    },
                    None if is_credit => ReversalSource::Credit {
                        credit_id: source_id,
                        external_ref: "no-such-credit".to_owned(),
                    },
                    None => ReversalSource::Topup {
                        topup_id: source_id,
                    },
                };
                let command = Command::Reverse(command::Reverse {
                    user_id: user.to_owned(),
                    source,
                    amount: Money::from_minor(amount),
                    reason: if chargeback {
                        ReversalReason::Chargeback
                    } else {
                        ReversalReason::PspRefund
                    },
                    external_ref,
                    revoke,
                });
                let outcome = self.apply(command, Some(user));
                prop_assert_eq!(
                    outcome_kind(&outcome),
                    expected.as_ref().map(|_| ()).map_err(|c| *c),
                    "{:?}",
                    op
                );
                if let (
                    Ok(Reply::Reversed {
                        reversal, fresh, ..
                    }),
                    Ok(plan),
                ) = (&outcome, &expected)
                {
                    prop_assert_eq!(*fresh, plan.is_some(), "{:?}", op);
                    if let Some(plan) = plan {
                        prop_assert_eq!(reversal.amount.minor(), amount);
                        check_reversal(reversal, plan)?;
                    }
                }
            }
            Op::OpenDispute {
                user,
                topup,
                dispute,
                amount,
            } => {
                let (topup_id, owner) = self.pick_topup(topup);
                let user = user.map_or(owner, |u| USERS[u]);
                let amount = amount.resolve(self.model.sources.get(&topup_id).map(|s| &s.source));
                let dispute_id = format!("dp-{dispute}");
                let expected = self
                    .model
                    .open_dispute(user, topup_id, &dispute_id, amount, now);
                let command = Command::OpenDispute(command::OpenDispute {
                    user_id: user.to_owned(),
                    topup_id,
                    dispute_id,
                    amount: Money::from_minor(amount),
                });
                let outcome = self.apply(command, Some(user));
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
            }
            Op::CloseDispute {
                user,
                topup,
                dispute,
                won,
                amount,
                revoke,
            } => {
                let (topup_id, owner) = self.pick_topup(topup);
                let user = user.map_or(owner, |u| USERS[u]);
                let amount =
                    amount.map(|a| a.resolve(self.model.sources.get(&topup_id).map(|s| &s.source)));
                let dispute_id = format!("dp-{dispute}");
                let expected =
                    self.model
                        .close_dispute(user, topup_id, &dispute_id, won, amount, revoke, now);
                let command = Command::CloseDispute(command::CloseDispute {
                    user_id: user.to_owned(),
                    topup_id,
                    dispute_id,
                    won,
                    amount: amount.map(Money::from_minor),
                    revoke,
                });
                let outcome = self.apply(command, Some(user));
                prop_assert_eq!(
                    outcome_kind(&outcome),
                    expected.as_ref().map(|_| ()).map_err(|c| *c),
                    "{:?}",
                    op
                );
                if let (Ok(Reply::Disputed { reversal, .. }), Ok(Some(plan))) =
                    (&outcome, &expected)
                {
                    let reversal = reversal.as_ref().expect("a lost dispute's reversal");
                    check_reversal(reversal, plan)?;
                }
            }
            Op::Freeze { user } => {
                let user = USERS[user];
                self.model.account(user).freeze(OPS_FREEZE);
                let outcome = self.apply(
                    Command::FreezeUser(command::FreezeUser {
                        user_id: user.to_owned(),
                        reason: OPS_FREEZE.to_owned(),
                    }),
                    Some(user),
                );
                prop_assert_eq!(outcome_kind(&outcome), Ok(()), "{:?}", op);
            }
            Op::Unfreeze { user, force } => {
                let user = USERS[user];
                let expected = self.model.account(user).unfreeze(force);
                let outcome = self.apply(
                    Command::UnfreezeUser(command::UnfreezeUser {
                        user_id: user.to_owned(),
                        force,
                    }),
                    Some(user),
                );
                prop_assert_eq!(outcome_kind(&outcome), expected, "{:?}", op);
            }
            Op::Replay(which) => {
                if self.stored.is_empty() {
                    return Ok(());
                }
                let (original, first_outcome) = self.stored[which % self.stored.len()].clone();
                let tag = original
                    .idempotency
                    .clone()
                    .expect("stored envelopes have keys");
                let still_stored = self
                    .model
                    .idempotency
                    .contains_key(&(tag.scope.clone(), tag.key.clone()));
                if still_stored {
                    // A retry: later time, new seed, same key and fingerprint → the stored outcome, no effect.
                    let mut retry = original.clone();
                    retry.now = Timestamp(now);
                    retry.seed.entropy += 1_000_000;
                    let (outcome, replayed) = self.apply_envelope(retry);
                    prop_assert!(replayed);
                    prop_assert_eq!(outcome, first_outcome);
                }
            }
            Op::Reuse(which) => {
                if self.stored.is_empty() {
                    return Ok(());
                }
                let (original, _) = self.stored[which % self.stored.len()].clone();
                let tag = original
                    .idempotency
                    .clone()
                    .expect("stored envelopes have keys");
                if self
                    .model
                    .idempotency
                    .contains_key(&(tag.scope.clone(), tag.key.clone()))
                {
                    let mut reuse = original.clone();
                    reuse.now = Timestamp(now);
                    if let Some(tag) = reuse.idempotency.as_mut() {
                        tag.fingerprint[0] ^= 0xff;
                    }
                    let (outcome, replayed) = self.apply_envelope(reuse);
                    prop_assert!(!replayed);
                    prop_assert_eq!(outcome_kind(&outcome), Err("idempotency_key_reused"));
                }
            }
        }
        Ok(())
    }

    /// The store agrees with the model, and the audit finds nothing wrong.
    fn check_final_state(&mut self) -> Result<(), TestCaseError> {
        let txn = self.store.begin_read().expect("read");
        for user in USERS {
            let stored = shopkeep::state::query::user(&txn, user)
                .expect("read user")
                .expect("user exists");
            let model = &self.model.accounts[user];
            prop_assert_eq!(
                (stored.balance.minor(), stored.held.minor()),
                (model.wallet.balance, model.wallet.held),
                "wallet of {}",
                user
            );
            prop_assert!(stored.held.minor() >= 0 && stored.held <= stored.balance);
            let entitlements =
                shopkeep::state::query::entitlements(&txn, user).expect("entitlements");
            for (name, ..) in ITEMS {
                let stored_quantity = entitlements
                    .iter()
                    .find(|e| e.item_id == name)
                    .map_or(0, |e| e.quantity());
                let model_quantity = model.unspent(name);
                prop_assert_eq!(
                    stored_quantity,
                    model_quantity,
                    "entitlement {}/{}",
                    user,
                    name
                );
            }
        }
        for order in &self.model.orders {
            let stored = shopkeep::state::query::order(&txn, order.id)
                .expect("read order")
                .expect("order exists");
            let expected = match order.order.status {
                MStatus::Pending => OrderStatus::Pending,
                MStatus::Completed => OrderStatus::Completed,
                MStatus::PartiallyRefunded => OrderStatus::PartiallyRefunded,
                MStatus::Refunded => OrderStatus::Refunded,
                MStatus::CancelledByClient | MStatus::Expired => OrderStatus::Cancelled,
            };
            prop_assert_eq!(stored.status, expected, "order {}", order.id);
            for (stored_line, model_line) in stored.lines.iter().zip(&order.order.lines) {
                prop_assert!(stored_line.refunded_quantity <= stored_line.quantity);
                prop_assert_eq!(stored_line.refunded_quantity, model_line.refunded);
            }
        }
        for ((user, dispute_id), model) in &self.model.disputes {
            let stored = shopkeep::state::query::dispute(&txn, user, dispute_id)
                .expect("read dispute")
                .expect("dispute exists");
            prop_assert_eq!(
                (stored.status, stored.held.minor(), stored.topup_id),
                (model.status, model.held, model.topup_id),
                "dispute {}/{}",
                user,
                dispute_id
            );
            prop_assert_eq!(stored.amount.minor(), model.amount);
        }
        let report = audit::audit(&txn, 0).expect("audit");
        prop_assert!(
            report.violations.is_empty(),
            "audit: {:?}",
            report.violations
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn state_machine_agrees_with_the_model_and_keeps_every_invariant(ops in prop::collection::vec(op_strategy(), 1..120)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.run(op)?;
        }
        harness.check_final_state()?;
    }

    #[test]
    fn same_commands_in_any_batches_give_the_same_outcomes_and_state_hash(
        ops in prop::collection::vec(op_strategy(), 1..80),
        batch_sizes in prop::collection::vec(1usize..20, 1..40),
    ) {
        let mut first = Harness::new();
        for op in &ops {
            first.run(op)?;
        }
        let first_hash = audit::state_hash(&first.store.begin_read().expect("read")).expect("hash");
        let (envelopes, first_outcomes): (Vec<Envelope>, Vec<Outcome>) = first.log.iter().cloned().unzip();

        let dir = tempfile::tempdir().expect("temp dir");
        let batched = ShardStore::open(&dir.path().join("batched.redb"), 0).expect("open");
        let mut outcomes = Vec::new();
        let mut rest: &[Envelope] = &envelopes;
        let mut sizes = batch_sizes.iter().cycle();
        while !rest.is_empty() {
            let size = (*sizes.next().expect("cycle")).min(rest.len());
            let (batch, tail) = rest.split_at(size);
            let refs: Vec<&Envelope> = batch.iter().collect();
            outcomes.extend(batched.apply_batch(&refs).expect("apply").into_iter().map(|a| a.outcome));
            rest = tail;
        }
        prop_assert_eq!(&outcomes, &first_outcomes);
        let batched_hash = audit::state_hash(&batched.begin_read().expect("read")).expect("hash");
        prop_assert_eq!(batched_hash, first_hash);
    }
}

/// Found by the property: closing a lost dispute that held money saved the user (hold released) while
/// the dispute row still held it, and the debug check of holds panicked inside apply.
#[test]
fn a_lost_dispute_takes_its_hold_first_and_holds_nothing_after() {
    let mut h = Harness::new();
    let ops = [
        Op::CreateTopup {
            user: 0,
            amount: 2265,
            paid: true,
        },
        Op::OpenDispute {
            user: None,
            topup: 0,
            dispute: 2,
            amount: Pick::Minor(1),
        },
        Op::CloseDispute {
            user: None,
            topup: 0,
            dispute: 2,
            won: false,
            amount: None,
            revoke: false,
        },
    ];
    for op in &ops {
        h.run(op).expect("agrees with the model");
    }
    h.check_final_state().expect("final state");
    let txn = h.store.begin_read().expect("read");
    let dispute = shopkeep::state::query::dispute(&txn, "u0", "dp-2")
        .expect("read")
        .expect("dispute");
    assert_eq!(
        (dispute.status, dispute.held),
        (DisputeStatus::Lost, Money::ZERO)
    );
}

#[test]
fn state_hash_differs_when_the_state_differs() {
    let mut a = Harness::new();
    let mut b = Harness::new();
    let hash = |h: &Harness| audit::state_hash(&h.store.begin_read().expect("read")).expect("hash");
    assert_eq!(hash(&a), hash(&b), "same commands, same hash");
    a.run(&Op::Credit {
        user: 0,
        amount: 100,
        external_ref: 0,
    })
    .expect("credit");
    b.run(&Op::Credit {
        user: 0,
        amount: 101,
        external_ref: 0,
    })
    .expect("credit");
    assert_ne!(hash(&a), hash(&b));
}

#[test]
fn sweep_purges_idempotency_outcomes_after_their_retention() {
    let mut h = Harness::new();
    h.run(&Op::Credit {
        user: 0,
        amount: 100,
        external_ref: 0,
    })
    .expect("credit");
    let (envelope, _) = h.stored[0].clone();
    let tag = envelope.idempotency.clone().expect("keyed");
    let stored = |h: &Harness| {
        shopkeep::state::query::idempotency(
            &h.store.begin_read().expect("read"),
            &tag.scope,
            &tag.key,
        )
        .expect("read")
        .is_some()
    };
    assert!(stored(&h));
    h.now += IDEMPOTENCY_TTL_MICROS - 1;
    h.run(&Op::Sweep).expect("sweep");
    assert!(stored(&h), "kept until its retention ends");
    h.now += 1;
    h.run(&Op::Sweep).expect("sweep");
    assert!(!stored(&h), "purged once its retention ended");
}

fn walk(from_scope: &str, from_key: &str, scan: u32, limit: u32) -> Command {
    Command::PurgeIdempotency(command::PurgeIdempotency {
        from_scope: from_scope.to_owned(),
        from_key: from_key.to_owned(),
        scan,
        limit,
    })
}

/// The keys of the idempotency records stored so far (in the order they were stored) that are still in
/// the shard.
fn stored_keys(h: &Harness) -> Vec<(String, String)> {
    let txn = h.store.begin_read().expect("read");
    h.stored
        .iter()
        .filter_map(|(envelope, _)| envelope.idempotency.clone())
        .map(|tag| (tag.scope, tag.key))
        .filter(|(scope, key)| {
            shopkeep::state::query::idempotency(&txn, scope, key)
                .expect("read")
                .is_some()
        })
        .collect()
}

fn credit_once(h: &mut Harness, external_ref: usize) {
    h.run(&Op::Credit {
        user: 0,
        amount: 100,
        external_ref,
    })
    .expect("credit");
}

#[test]
fn the_walk_purges_outcomes_past_their_retention_and_later_ones_skip_the_index() {
    let mut h = Harness::new();
    credit_once(&mut h, 0);
    let indexed = stored_keys(&h);
    // The first walk (nothing due yet) turns the index off for what is stored after it.
    let first = h.apply(walk("", "", 100, 100), None);
    assert_eq!(
        first,
        Ok(Reply::IdempotencyPurged {
            purged: 0,
            next: None
        })
    );
    credit_once(&mut h, 1);
    let walked: Vec<_> = stored_keys(&h)
        .into_iter()
        .filter(|k| !indexed.contains(k))
        .collect();
    assert_eq!(walked.len(), 1);
    h.now += IDEMPOTENCY_TTL_MICROS;
    // The sweep finds only the record stored before the walk: the later one has no index row.
    h.run(&Op::Sweep).expect("sweep");
    assert_eq!(
        stored_keys(&h),
        walked,
        "the indexed record purged, the walked one kept"
    );
    let txn = h.store.begin_read().expect("read");
    let due = shopkeep::state::query::sweep_due(
        &txn,
        Timestamp(h.now),
        std::time::Duration::from_secs(7 * 86_400),
    )
    .expect("read");
    assert!(!due, "no index row left to sweep");
    drop(txn);
    let purged = h.apply(walk("", "", 100, 100), None);
    assert!(matches!(
        purged,
        Ok(Reply::IdempotencyPurged {
            purged: 1,
            next: None
        })
    ));
    assert!(stored_keys(&h).is_empty(), "the walk purged the rest");
    let report = audit::audit(&h.store.begin_read().expect("read"), 0).expect("audit");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[test]
fn the_walk_keeps_within_its_scan_and_limit_and_says_where_to_go_on() {
    let mut h = Harness::new();
    h.apply(walk("", "", 1, 1), None).expect("walking");
    for reference in 0..3 {
        credit_once(&mut h, reference);
    }
    h.now += IDEMPOTENCY_TTL_MICROS - 1;
    credit_once(&mut h, 3); // not due when the others are
    h.now += 1;
    let mut keys = stored_keys(&h);
    keys.sort();
    assert_eq!(keys.len(), 4);
    let fresh = {
        let tag = h.stored.last().expect("stored").0.idempotency.clone();
        let tag = tag.expect("keyed");
        (tag.scope, tag.key)
    };
    let from = &keys[0];
    let Ok(Reply::IdempotencyPurged { purged, next }) =
        h.apply(walk(&from.0, &from.1, 2, 10), None)
    else {
        panic!("not a purge reply");
    };
    let scanned_due = keys[..2].iter().filter(|k| **k != fresh).count();
    assert_eq!(purged as usize, scanned_due, "only what the scan looked at");
    assert_eq!(next.as_ref(), Some(&keys[2]));
    let next = next.expect("more");
    let Ok(Reply::IdempotencyPurged { purged, next }) =
        h.apply(walk(&next.0, &next.1, 10, 1), None)
    else {
        panic!("not a purge reply");
    };
    assert_eq!(purged, 1, "at most the limit");
    let left = stored_keys(&h);
    assert!(left.contains(&fresh), "a record inside its retention stays");
    if next.is_some() {
        h.apply(walk("", "", 10, 10), None).expect("walk");
    }
    assert_eq!(stored_keys(&h), vec![fresh]);
}

fn topup_count(h: &Harness, user: &str, ids: &[Uuid]) -> usize {
    let txn = h.store.begin_read().expect("read");
    ids.iter()
        .filter(|id| {
            shopkeep::state::query::topup(&txn, **id)
                .expect("read")
                .is_some_and(|t| t.user_id == user)
        })
        .count()
}

fn topup_id(outcome: &Outcome) -> Uuid {
    match outcome {
        Ok(Reply::TopupCreated(topup)) => topup.topup_id,
        other => panic!("expected a top-up, got {other:?}"),
    }
}

#[test]
fn the_capped_topup_refuses_past_the_cap_and_the_old_command_still_does_not() {
    let mut h = Harness::new();
    let expires_at = Timestamp(h.now + 3_600_000_000);
    let capped = |max| {
        Command::CreateTopupCapped(command::CreateTopupCapped {
            user_id: "u0".to_owned(),
            amount: Money::from_minor(100),
            expires_at,
            max_pending_topups: max,
        })
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(topup_id(&h.apply(capped(2), Some("u0"))));
    }
    let refused = h.apply(capped(2), Some("u0"));
    assert_eq!(
        refused,
        Err(shopkeep::domain::Rejection::LimitExceeded {
            limit: "max_pending_topups".to_owned(),
            max: 2,
            retry_after: Some(expires_at),
        })
    );
    // A `CreateTopup` already in a log applies as it always did: no cap.
    let old = h.apply(
        Command::CreateTopup(command::CreateTopup {
            user_id: "u0".to_owned(),
            amount: Money::from_minor(100),
            expires_at,
        }),
        Some("u0"),
    );
    ids.push(topup_id(&old));
    assert_eq!(topup_count(&h, "u0", &ids), 3);
    // Past the deadline none of them counts any more.
    h.now = expires_at.micros();
    topup_id(&h.apply(capped(2), Some("u0")));
    let report = audit::audit(&h.store.begin_read().expect("read"), 0).expect("audit");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[test]
fn sweep_and_purge_removes_final_topups_after_the_retention_in_the_command() {
    let mut h = Harness::new();
    let ttl = 60 * 1_000_000;
    let create = |h: &mut Harness| {
        let command = Command::CreateTopupCapped(command::CreateTopupCapped {
            user_id: "u1".to_owned(),
            amount: Money::from_minor(100),
            expires_at: Timestamp(h.now + ttl),
            max_pending_topups: 10,
        });
        topup_id(&h.apply(command, Some("u1")))
    };
    let expiring = create(&mut h);
    let completed = create(&mut h);
    let failed = create(&mut h);
    for (id, succeeded) in [(completed, true), (failed, false)] {
        let outcome = h.apply(
            Command::PspPayment(command::PspPayment {
                event_id: format!("evt-{id}"),
                succeeded,
                topup_id: id,
                user_id: "u1".to_owned(),
                amount: Money::from_minor(100),
                psp_payment_id: format!("pi-{id}"),
                ref_accepted: true,
            }),
            None,
        );
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let retention_seconds = 3_600;
    let sweep = Command::SweepAndPurge(command::SweepAndPurge {
        limit: 1000,
        topup_retention_seconds: retention_seconds,
    });
    let all = [expiring, completed, failed];
    // The failed one became final now, the expiring one at its deadline.
    let failed_at = h.now;
    h.now += ttl;
    h.apply(sweep.clone(), None).expect("sweep");
    assert_eq!(topup_count(&h, "u1", &all), 3, "kept for the retention");
    h.now = failed_at + retention_seconds as i64 * 1_000_000;
    h.apply(sweep.clone(), None).expect("sweep");
    assert_eq!(
        topup_count(&h, "u1", &all),
        3,
        "purged only once the retention has passed"
    );
    h.now += 1;
    let outcome = h.apply(sweep.clone(), None);
    assert!(
        matches!(
            outcome,
            Ok(Reply::SweptAndPurged {
                purged_topups: 1,
                ..
            })
        ),
        "{outcome:?}"
    );
    assert_eq!(topup_count(&h, "u1", &all), 2);
    h.now += ttl;
    h.apply(sweep.clone(), None).expect("sweep");
    assert_eq!(
        topup_count(&h, "u1", &[completed]),
        1,
        "a COMPLETED top-up stays"
    );
    assert_eq!(topup_count(&h, "u1", &all), 1);
    let report = audit::audit(&h.store.begin_read().expect("read"), 0).expect("audit");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}
