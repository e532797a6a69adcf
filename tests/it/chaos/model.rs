//! The model of one user's account, computed from the definite outcomes of that user's operations, in
//! integer minor units. Each user is driven by one client at a time (an operation is retried until it is
//! definite before the next one starts), so the model is exact; the only thing it cannot know to the
//! microsecond is when the server's clock passed an order's deadline, so it keeps both possibilities open
//! while an operation's time window straddles one.
//!
//! `apply` checks that the answer is one the API allows in the current state (given the op's time window)
//! and moves the model on by that answer. Every check here is a property of the contract, not of timing.
//! The shop's rules (totals, holds, completion, expiry, refunds, entitlements, crediting, debt and its
//! repayment, freezes) are `shop_model`'s; this file keeps the HTTP answers' checks and the time windows.
//!
//! Reversals (of direct credits, and the PSP's `payment.refunded`) and disputes: the same
//! `external_ref` is the same reversal (200, the original, taken once), another amount a conflict; a
//! source never gives back more than it brought in, summed over its reversals. How a new reversal is
//! covered depends on the available money at the server's time, which the model knows to within the
//! deadlines in the op's window: it checks the answer's split (hold first, then the wallet, the rest
//! debt) against that range and follows it. Debt freezes the account (403 `account_frozen` for
//! orders, completions, top-ups, consumption) until money coming in has repaid it.

use std::collections::BTreeMap;

use serde_json::Value;

use super::history::{Cents, Op, PspEvent, Spec};
pub use crate::shop_model::OrderStatus;
use crate::shop_model::{self, Account, Line, Order, ReversalPlan, Transition, Wallet};

/// One catalog item of the run (created before the faults start and never changed).
pub struct CatalogItem {
    pub id: &'static str,
    pub kind: &'static str,
    pub price: Cents,
}

pub const CATALOG: &[CatalogItem] = &[
    CatalogItem {
        id: "gems",
        kind: "currency",
        price: 10,
    },
    CatalogItem {
        id: "coins",
        kind: "currency",
        price: 25,
    },
    CatalogItem {
        id: "skin-a",
        kind: "skin",
        price: 199,
    },
    CatalogItem {
        id: "skin-b",
        kind: "skin",
        price: 249,
    },
    CatalogItem {
        id: "skin-c",
        kind: "skin",
        price: 499,
    },
    CatalogItem {
        id: "game-x",
        kind: "game",
        price: 999,
    },
];

pub fn item(id: &str) -> Option<&'static CatalogItem> {
    CATALOG.iter().find(|i| i.id == id)
}

pub fn consumable(id: &str) -> bool {
    item(id).is_some_and(|i| i.kind == "currency")
}

/// A money string of the API (`"12.50"`) in minor units; None if it is not one.
pub fn cents_of(v: &Value) -> Option<Cents> {
    let s = v.as_str()?;
    let (int, frac) = s.split_once('.')?;
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || frac.len() != 2
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some(int.parse::<i64>().ok()? * 100 + frac.parse::<i64>().ok()?)
}

pub fn money(c: Cents) -> String {
    crate::harness::money(c)
}

/// An order of the model: the rules' order, and the op that created it. Its status is `Pending` until an
/// answer shows it completed or cancelled; whether a pending one has passed its deadline at some server
/// time is `Order::pending_at`'s to say.
#[derive(Clone, Debug)]
pub struct MOrder {
    pub order_id: String,
    /// The op that created it.
    pub op: usize,
    pub order: Order,
}

/// The server's default `--max-pending-topups`.
pub const MAX_PENDING_TOPUPS: usize = 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopupState {
    Pending,
    Completed(String),
    Failed,
}

#[derive(Clone, Debug)]
pub struct MTopup {
    pub amount: Cents,
    pub state: TopupState,
    /// Unix micros: a PENDING top-up reads as EXPIRED from then on (a payment still completes it).
    pub expires_at: i64,
    /// Op id of the webhook that completed it.
    pub completed_by: Option<usize>,
}

/// A PSP dispute of one of the user's top-ups.
#[derive(Clone, Debug)]
pub struct MDispute {
    pub topup_id: String,
    pub amount: Cents,
    /// What it holds while open.
    pub held: Cents,
    /// `OPEN`, `WON` or `LOST`.
    pub status: &'static str,
}

/// The model of one user.
#[derive(Clone, Debug, Default)]
pub struct UserModel {
    pub user: String,
    pub exists: bool,
    /// The wallet (its `held` is what the orders still `Pending` in the model hold, deadlines aside) and
    /// the entitlements.
    pub account: Account,
    /// order_id → order, and the creation order.
    pub orders: BTreeMap<String, MOrder>,
    pub order_seq: Vec<String>,
    /// credit_id → amount.
    pub credits: BTreeMap<String, Cents>,
    /// external_ref → (credit_id, amount).
    pub ext_refs: BTreeMap<String, (String, Cents)>,
    pub topups: BTreeMap<String, MTopup>,
    /// refund_id → (order_id, amount).
    pub refunds: BTreeMap<String, (String, Cents)>,
    /// Idempotency key → the stored answer.
    pub keys: BTreeMap<String, (u16, Value)>,
    /// PSP event id → its answer.
    pub events: BTreeMap<String, (u16, Value)>,
    /// Credit or top-up id → external_ref → (reversal_id, amount): its reversals.
    pub reversals: BTreeMap<String, BTreeMap<String, (String, Cents)>>,
    /// reversal_id → (amount, debt): what its postings move.
    pub reversal_postings: BTreeMap<String, (Cents, Cents)>,
    /// dispute_id → dispute.
    pub disputes: BTreeMap<String, MDispute>,
    /// (ref type, id) of money that came in (credit, top-up, refund) → what it repaid of the debt.
    pub repaid: BTreeMap<(String, String), Cents>,
}

/// The server-time window of an op: [first attempt's start, end of the first definite attempt].
pub fn window(op: &Op) -> (i64, i64) {
    let t1 = op
        .attempts
        .iter()
        .filter(|a| matches!(a.outcome, super::history::Outcome::Definite { .. }))
        .map(|a| a.end)
        .min()
        .unwrap_or(i64::MAX);
    if op.is_read() {
        // a read is answered from the state at the time of the attempt that answered
        let a = op
            .attempts
            .iter()
            .find(|a| matches!(a.outcome, super::history::Outcome::Definite { .. }));
        if let Some(a) = a {
            return (a.start, a.end);
        }
    }
    (op.invoked, t1)
}

fn code_of(body: &Value) -> Option<&str> {
    body.pointer("/error/code").and_then(|c| c.as_str())
}

type Check = Result<(), String>;

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Check {
    if cond { Ok(()) } else { Err(msg()) }
}

fn err_is(status: u16, body: &Value, want_status: u16, code: &str) -> bool {
    status == want_status && code_of(body) == Some(code)
}

/// The HTTP status of a refusal of the rules: a malformed request is 400, every other refusal a 409.
fn status_of(code: &str) -> u16 {
    if code == "invalid_request" { 400 } else { 409 }
}

impl UserModel {
    pub fn new(user: &str) -> UserModel {
        UserModel {
            user: user.to_string(),
            ..Default::default()
        }
    }

    pub fn balance(&self) -> Cents {
        self.account.wallet.balance
    }

    /// Held at server time `t`: the model's holds less those of pending orders whose deadline passed by
    /// `t` (the server releases them at the deadline).
    pub fn held_at(&self, t: i64) -> Cents {
        let due: Cents = self
            .orders
            .values()
            .filter(|o| o.order.due_at(t))
            .map(|o| o.order.total)
            .sum();
        self.account.wallet.held - due
    }

    /// The wallet as it is at server time `t`.
    pub fn wallet_at(&self, t: i64) -> Wallet {
        Wallet {
            balance: self.balance(),
            held: self.held_at(t),
        }
    }

    /// Held somewhere in [t0, t1]: (lowest, highest).
    pub fn held_range(&self, t0: i64, t1: i64) -> (Cents, Cents) {
        (self.held_at(t1), self.held_at(t0))
    }

    pub fn check_wallet(&self, w: &Value, t0: i64, t1: i64, what: &str) -> Check {
        let (lo, hi) = self.held_range(t0, t1);
        let balance = cents_of(&w["balance"]);
        let held = cents_of(&w["held"]);
        let available = cents_of(&w["available"]);
        ensure(balance == Some(self.balance()), || {
            format!(
                "{what}: wallet balance {} but the model says {} (every definite credit, purchase and refund of the user)",
                w["balance"],
                money(self.balance())
            )
        })?;
        ensure(held.is_some_and(|h| lo <= h && h <= hi), || {
            format!(
                "{what}: wallet held {} but the pending orders hold between {} and {}",
                w["held"],
                money(lo),
                money(hi)
            )
        })?;
        if let Some(debt) = w.get("debt").filter(|d| !d.is_null()) {
            ensure(cents_of(debt) == Some(self.account.debt), || {
                format!(
                    "{what}: wallet debt {debt} but the model says {} (reversals the wallet could not cover, less what came in since)",
                    money(self.account.debt)
                )
            })?;
        }
        ensure(
            matches!((balance, held, available), (Some(b), Some(h), Some(a)) if a == b - h && h <= b && h >= 0),
            || {
                format!(
                    "{what}: wallet inconsistent (available != balance - held, or negative): {w}"
                )
            },
        )
    }

    /// Applies op `op` whose (agreed) answer is `status`/`body`. Returns a violation if the answer is not
    /// one the contract allows here; the model then follows the answer as far as it can.
    pub fn apply(&mut self, op: &Op, status: u16, body: &Value) -> Check {
        let (t0, t1) = window(op);
        let result = self.apply_inner(op, status, body, t0, t1);
        if let Some(key) = &op.key {
            // 422 idempotency_key_reused and 400 invalid_request are not stored under the key
            let stored = !(err_is(status, body, 422, "idempotency_key_reused")
                || err_is(status, body, 400, "invalid_request"));
            // (a user's creation is keyed in the global scope, not under the user)
            if stored && !matches!(op.spec, Spec::KeyReuse { .. } | Spec::CreateUser) {
                self.keys.insert(key.clone(), (status, body.clone()));
            }
        }
        result
    }

    fn apply_inner(&mut self, op: &Op, status: u16, body: &Value, t0: i64, t1: i64) -> Check {
        match &op.spec {
            Spec::CreateUser => {
                ensure(status == 201, || {
                    format!("create_user: expected 201 for a new user id, got {status} {body}")
                })?;
                self.exists = true;
                ensure(
                    body["user_id"] == self.user.as_str()
                        && cents_of(&body["wallet"]["balance"]) == Some(0),
                    || format!("create_user: unexpected body {body}"),
                )
            }
            Spec::Credit {
                amount,
                external_ref,
            } => {
                if let Some((credit_id, first_amount)) = self.ext_refs.get(external_ref).cloned() {
                    // the same external_ref again under a new key: the original credit, nothing credited
                    ensure(status == 200, || {
                        format!(
                            "credit with an already credited external_ref {external_ref}: expected 200 (the original credit), got {status} {body}"
                        )
                    })?;
                    ensure(
                        body["credit_id"] == credit_id.as_str()
                            && cents_of(&body["amount"]) == Some(first_amount),
                        || {
                            format!(
                                "credit with an already credited external_ref: not the original credit {credit_id}: {body}"
                            )
                        },
                    )?;
                    return self.check_wallet(
                        &body["wallet"],
                        t0,
                        t1,
                        "credit (same external_ref)",
                    );
                }
                ensure(status == 201, || {
                    format!("credit: expected 201, got {status} {body}")
                })?;
                let Some(credit_id) = body["credit_id"].as_str() else {
                    return Err(format!("credit: no credit_id in {body}"));
                };
                let repaid = self.account.credit(*amount);
                self.note_repaid("credit", credit_id, repaid);
                self.credits.insert(credit_id.to_string(), *amount);
                self.ext_refs
                    .insert(external_ref.clone(), (credit_id.to_string(), *amount));
                ensure(
                    cents_of(&body["amount"]) == Some(*amount)
                        && body["external_ref"] == external_ref.as_str(),
                    || format!("credit: body does not match the request: {body}"),
                )?;
                self.check_wallet(&body["wallet"], t0, t1, "credit")
            }
            Spec::Topup { amount } => {
                if self.account.frozen.is_some() {
                    return self.frozen_refusal(status, body, "topup");
                }
                // At most MAX_PENDING_TOPUPS pending, unexpired top-ups per user (the server's default).
                let pending_at = |t: i64| {
                    self.topups
                        .values()
                        .filter(|t_| t_.state == TopupState::Pending && t_.expires_at > t)
                        .count()
                };
                let (surely, possibly) = (pending_at(t1), pending_at(t0));
                if err_is(status, body, 409, "limit_exceeded") {
                    return ensure(possibly >= MAX_PENDING_TOPUPS, || {
                        format!("topup: limit_exceeded with {possibly} pending: {body}")
                    });
                }
                ensure(status == 201 && surely < MAX_PENDING_TOPUPS, || {
                    format!("topup: expected 201 with {surely} pending, got {status} {body}")
                })?;
                let Some(id) = body["topup_id"].as_str() else {
                    return Err(format!("topup: no topup_id in {body}"));
                };
                self.topups.insert(
                    id.to_string(),
                    MTopup {
                        amount: *amount,
                        state: TopupState::Pending,
                        completed_by: None,
                        expires_at: body["expires_at"]
                            .as_str()
                            .map(|_| super::history::micros_of(&body["expires_at"]))
                            .unwrap_or(i64::MAX),
                    },
                );
                ensure(
                    body["status"] == "PENDING" && cents_of(&body["amount"]) == Some(*amount),
                    || format!("topup: unexpected body {body}"),
                )
            }
            Spec::Webhook {
                event_id,
                topup_id,
                succeeded,
                amount,
                psp_payment_id,
                replay_of,
            } => {
                if replay_of.is_some() {
                    let Some((s, b)) = self.events.get(event_id) else {
                        return Err(format!(
                            "webhook replay of event {event_id}, whose first delivery has no answer"
                        ));
                    };
                    return ensure(*s == status && b == body, || {
                        format!(
                            "webhook replay of event {event_id}: answer {status} {body} differs from the first delivery's {s} {b}"
                        )
                    });
                }
                self.events.insert(event_id.clone(), (status, body.clone()));
                let Some(topup) = self.topups.get_mut(topup_id) else {
                    return Err(format!("webhook for unknown topup {topup_id}"));
                };
                ensure(status == 200, || {
                    format!("webhook: expected 200, got {status} {body}")
                })?;
                match topup.state.clone() {
                    TopupState::Pending => {
                        if *succeeded {
                            ensure(*amount == topup.amount, || "webhook amount".into())?;
                            topup.state = TopupState::Completed(psp_payment_id.clone());
                            topup.completed_by = Some(op.id);
                            let repaid = self.account.credit(*amount);
                            if repaid > 0 {
                                self.repaid
                                    .insert(("topup".to_string(), topup_id.clone()), repaid);
                            }
                            ensure(
                                body["status"] == "COMPLETED"
                                    && body["psp_payment_id"] == psp_payment_id.as_str(),
                                || {
                                    format!(
                                        "webhook payment.succeeded: expected the topup COMPLETED with psp_payment_id {psp_payment_id}: {body}"
                                    )
                                },
                            )
                        } else {
                            topup.state = TopupState::Failed;
                            ensure(body["status"] == "FAILED", || {
                                format!("webhook payment.failed: expected the topup FAILED: {body}")
                            })
                        }
                    }
                    TopupState::Completed(psp) => ensure(
                        body["status"] == "COMPLETED" && body["psp_payment_id"] == psp.as_str(),
                        || {
                            format!(
                                "webhook for a completed topup: expected it unchanged (COMPLETED, {psp}): {body}"
                            )
                        },
                    ),
                    TopupState::Failed => ensure(body["status"] == "FAILED", || {
                        format!(
                            "webhook for a failed topup: expected it unchanged (FAILED): {body}"
                        )
                    }),
                }
            }
            Spec::Order {
                lines,
                complete,
                expected_total,
            } => self.apply_order(op, lines, *complete, *expected_total, status, body, t0, t1),
            Spec::Complete { order_id } => self.apply_complete(order_id, status, body, t0, t1),
            Spec::Cancel { order_id } => self.apply_cancel(order_id, status, body, t0, t1),
            Spec::Refund { order_id, lines } => {
                self.apply_refund(order_id, lines.as_deref(), status, body, t0, t1)
            }
            Spec::Consume { item_id, quantity } => {
                if self.account.frozen.is_some() {
                    return self.frozen_refusal(status, body, "consume");
                }
                let owned = self.account.unspent(item_id);
                let mut after = self.account.clone();
                match after.consume(item_id, *quantity, consumable(item_id)) {
                    Ok(left) => {
                        ensure(status == 200, || {
                            format!(
                                "consume {quantity} {item_id} (owned {owned}): expected 200, got {status} {body}"
                            )
                        })?;
                        self.account = after;
                        ensure(body["quantity"].as_u64() == Some(left), || {
                            format!("consume: expected {left} left, got {body}")
                        })
                    }
                    Err(code) => ensure(err_is(status, body, status_of(code), code), || {
                        format!(
                            "consume {quantity} {item_id} (owned {owned}): expected {} {code}, got {status} {body}",
                            status_of(code)
                        )
                    }),
                }
            }
            Spec::Reversal {
                credit_id,
                amount,
                external_ref,
            } => {
                let Some(&brought_in) = self.credits.get(credit_id) else {
                    return ensure(err_is(status, body, 404, "not_found"), || {
                        format!("reversal of an unknown credit: expected 404, got {status} {body}")
                    });
                };
                self.apply_reversal(
                    credit_id,
                    brought_in,
                    *amount,
                    external_ref,
                    status,
                    body,
                    t0,
                    t1,
                )
            }
            Spec::PspReversal {
                event_id,
                event,
                topup_id,
                replay_of,
            } => {
                if replay_of.is_some() {
                    let Some((s, b)) = self.events.get(event_id) else {
                        return Err(format!(
                            "PSP event {event_id} replayed, whose first delivery has no answer"
                        ));
                    };
                    return ensure(*s == status && b == body, || {
                        format!(
                            "PSP event {event_id} replayed: answer {status} {body} differs from the first delivery's {s} {b}"
                        )
                    });
                }
                self.events.insert(event_id.clone(), (status, body.clone()));
                self.apply_psp_reversal(event_id, event, topup_id, status, body, t0, t1)
            }
            Spec::KeyReuse { of } => {
                ensure(err_is(status, body, 422, "idempotency_key_reused"), || {
                    format!(
                        "the key of op #{of} with another body: expected 422 idempotency_key_reused, got {status} {body}"
                    )
                })
            }
            Spec::ReadWallet => {
                ensure(status == 200, || {
                    format!("wallet read: expected 200, got {status} {body}")
                })?;
                self.check_wallet(body, t0, t1, "wallet read")
            }
            Spec::ReadEntitlements => {
                ensure(status == 200, || {
                    format!("entitlements read: expected 200, got {status} {body}")
                })?;
                self.check_entitlements(body, "entitlements read")
            }
            Spec::ReadOrder { order_id } => {
                ensure(status == 200, || {
                    format!("order read: expected 200, got {status} {body}")
                })?;
                let Some(o) = self.orders.get(order_id) else {
                    return Err(format!("read of unknown order {order_id}"));
                };
                check_order(o, body, t0, t1, "order read")
            }
        }
    }

    pub fn check_entitlements(&self, body: &Value, what: &str) -> Check {
        let Some(list) = body["entitlements"].as_array() else {
            return Err(format!("{what}: no entitlements array: {body}"));
        };
        let mut got: BTreeMap<String, i64> = BTreeMap::new();
        for e in list {
            let (Some(id), Some(q)) = (e["item_id"].as_str(), e["quantity"].as_i64()) else {
                return Err(format!("{what}: malformed entitlement {e}"));
            };
            if got.insert(id.to_string(), q).is_some() {
                return Err(format!("{what}: item {id} listed twice: {body}"));
            }
        }
        let want: BTreeMap<String, i64> = self
            .account
            .entitlements
            .iter()
            .filter(|(_, e)| e.quantity() != 0)
            .map(|(k, e)| (k.clone(), e.quantity() as i64))
            .collect();
        ensure(got == want, || {
            format!(
                "{what}: entitlements {got:?} but the model (grants of completed orders − refunds − consumes) says {want:?}"
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_order(
        &mut self,
        op: &Op,
        lines: &[(String, u32)],
        complete: bool,
        expected_total: Option<Cents>,
        status: u16,
        body: &Value,
        t0: i64,
        t1: i64,
    ) -> Check {
        if self.account.frozen.is_some() {
            return self.frozen_refusal(status, body, "order");
        }
        let order_lines: Vec<Line> = lines
            .iter()
            .map(|(i, q)| Line::new(i, *q, item(i).map_or(0, |it| it.price)))
            .collect();
        let total = match shop_model::order_total(&order_lines) {
            Ok(total) => total,
            Err(code) => {
                return ensure(err_is(status, body, status_of(code), code), || {
                    format!("order total out of range: expected {code}, got {status} {body}")
                });
            }
        };
        // non-consumables: owned, or in an order pending at the server's time
        let mut surely_owned = false;
        let mut maybe_owned = false;
        for (i, _) in lines.iter().filter(|(i, _)| !consumable(i)) {
            let pending_at = |t: i64| {
                self.orders
                    .values()
                    .map(|o| &o.order)
                    .filter(move |o| o.pending_at(t))
            };
            surely_owned |= self.account.check_not_owned(i, pending_at(t1)).is_err();
            maybe_owned |= self.account.check_not_owned(i, pending_at(t0)).is_err();
        }
        if err_is(status, body, 409, "already_owned") {
            return ensure(maybe_owned, || {
                format!(
                    "order: 409 already_owned but no line's item is owned or in a pending order (ent {:?})",
                    self.account.entitlements
                )
            });
        }
        ensure(!surely_owned, || {
            format!(
                "order: {status} but a non-consumable line is owned or pending (expected already_owned): {body}"
            )
        })?;
        if let (Some(x), Err(code)) = (
            expected_total,
            shop_model::check_expected_total(expected_total, total),
        ) {
            return ensure(err_is(status, body, 409, code), || {
                format!(
                    "order with expected_total {} (real total {}): expected 409 {code}, got {status} {body}",
                    money(x),
                    money(total)
                )
            });
        }
        // the most held (least available) at the window's start, the least at its end
        let (least, most) = (self.wallet_at(t0), self.wallet_at(t1));
        let (held_lo, avail_hi, avail_lo) = (most.held, most.available(), least.available());
        if err_is(status, body, 409, "insufficient_funds") {
            return ensure(least.check_hold(total).is_err(), || {
                format!(
                    "order of {}: 409 insufficient_funds but the model has at least {} available",
                    money(total),
                    money(avail_lo)
                )
            });
        }
        ensure(status == 201, || {
            format!("order: expected 201 / already_owned / insufficient_funds, got {status} {body}")
        })?;
        let Some(order_id) = body["order_id"].as_str() else {
            return Err(format!("order: no order_id in {body}"));
        };
        let expires_at = body["expires_at"]
            .as_str()
            .map(|_| super::history::micros_of(&body["expires_at"]))
            .unwrap_or(0);
        let mut o = MOrder {
            order_id: order_id.to_string(),
            op: op.id,
            order: Order {
                lines: order_lines,
                total,
                status: OrderStatus::Pending,
                expires_at,
                refund_count: 0,
            },
        };
        let funded = most.check_hold(total).is_ok();
        // the model follows the answer: the order holds its total (and, completed, is debited and granted)
        self.account.place(&o.order);
        if complete {
            self.account.complete(&mut o.order);
        }
        let check = check_order(&o, body, t0, t1, "order answer");
        if let Some(old) = self.orders.insert(order_id.to_string(), o) {
            if old.order.status == OrderStatus::Pending {
                // the replaced order's hold is no longer the model's
                self.account.wallet.release(old.order.total);
            }
            return Err(format!(
                "order: order id {order_id} returned for two different keys"
            ));
        }
        self.order_seq.push(order_id.to_string());
        ensure(funded, || {
            format!(
                "order of {} accepted but the model has at most {} available (balance {}, held ≥ {})",
                money(total),
                money(avail_hi),
                money(self.balance()),
                money(held_lo)
            )
        })?;
        ensure(
            body["status"] == if complete { "COMPLETED" } else { "PENDING" },
            || {
                format!(
                    "order (complete: {complete}): status {} in {body}",
                    body["status"]
                )
            },
        )?;
        check
    }

    fn apply_complete(
        &mut self,
        order_id: &str,
        status: u16,
        body: &Value,
        t0: i64,
        t1: i64,
    ) -> Check {
        let Some(o) = self.orders.get_mut(order_id) else {
            return Err(format!(
                "complete of an order the model does not know: {order_id}"
            ));
        };
        let expires_at = o.order.expires_at;
        match shop_model::complete_rule(o.order.status) {
            // pending in the model: completed, or (its deadline passed) expired first
            Ok(Transition::Applies) => {
                let expired = shop_model::complete_rule(OrderStatus::Expired).err();
                if self.account.frozen.is_some() {
                    // a pending order of a frozen account is not completed (expired first, if it was due)
                    if err_is(status, body, 403, "account_frozen") {
                        return ensure(t0 < expires_at, || {
                            format!(
                                "complete: 403 account_frozen for an order whose deadline had passed: {body}"
                            )
                        });
                    }
                    ensure(status != 200, || {
                        format!("complete answered 200 on a frozen account: {body}")
                    })?;
                }
                if status == 200 {
                    ensure(t0 < expires_at, || {
                        format!(
                            "complete answered 200 but it was sent after the order's deadline: {body}"
                        )
                    })?;
                    self.account.complete(&mut o.order);
                    check_order(o, body, t0, t1, "complete answer")
                } else if expired.is_some_and(|code| err_is(status, body, 409, code)) {
                    ensure(t1 >= expires_at, || {
                        format!(
                            "complete answered order_expired before the order's deadline ({} µs early)",
                            expires_at - t1
                        )
                    })?;
                    self.account.expire(&mut o.order);
                    Ok(())
                } else {
                    Err(format!(
                        "complete of a PENDING order: expected 200 or order_expired, got {status} {body}"
                    ))
                }
            }
            Ok(Transition::Unchanged) => {
                let s = o.order.status;
                ensure(status == 200 && body["status"] == s.api(), || {
                    format!(
                        "complete of a {} order: expected 200 unchanged, got {status} {body}",
                        s.api()
                    )
                })?;
                check_order(o, body, t0, t1, "complete (again) answer")
            }
            Err(code) => ensure(err_is(status, body, 409, code), || {
                format!(
                    "complete of a {:?} order: expected 409 {code}, got {status} {body}",
                    o.order.status
                )
            }),
        }
    }

    fn apply_cancel(
        &mut self,
        order_id: &str,
        status: u16,
        body: &Value,
        t0: i64,
        t1: i64,
    ) -> Check {
        let Some(o) = self.orders.get_mut(order_id) else {
            return Err(format!(
                "cancel of an order the model does not know: {order_id}"
            ));
        };
        let expires_at = o.order.expires_at;
        match shop_model::cancel_rule(o.order.status) {
            // pending in the model: cancelled by the client, or (its deadline passed) expired first
            Ok(Transition::Applies) => {
                ensure(status == 200 && body["status"] == "CANCELLED", || {
                    format!(
                        "cancel of a PENDING order: expected 200 CANCELLED, got {status} {body}"
                    )
                })?;
                let reason = last_reason(body);
                match reason.as_deref() {
                    Some("cancelled_by_client") => {
                        ensure(t0 < expires_at, || {
                            format!(
                                "cancel: cancelled_by_client although sent after the deadline: {body}"
                            )
                        })?;
                        self.account.cancel(&mut o.order);
                    }
                    Some("expired") => {
                        ensure(t1 >= expires_at, || {
                            format!("cancel: reason expired before the deadline: {body}")
                        })?;
                        self.account.expire(&mut o.order);
                    }
                    _ => return Err(format!("cancel: no cancel reason in {body}")),
                }
                check_order(o, body, t0, t1, "cancel answer")
            }
            Ok(Transition::Unchanged) => {
                ensure(status == 200, || {
                    format!(
                        "cancel of a cancelled order: expected 200 unchanged, got {status} {body}"
                    )
                })?;
                check_order(o, body, t0, t1, "cancel (again) answer")
            }
            Err(code) => ensure(err_is(status, body, 409, code), || {
                format!(
                    "cancel of a {} order: expected 409 {code}, got {status} {body}",
                    o.order.status.api()
                )
            }),
        }
    }

    fn apply_refund(
        &mut self,
        order_id: &str,
        lines: Option<&[(String, u32)]>,
        status: u16,
        body: &Value,
        t0: i64,
        t1: i64,
    ) -> Check {
        let Some(o) = self.orders.get_mut(order_id) else {
            return Err(format!(
                "refund of an order the model does not know: {order_id}"
            ));
        };
        let requested: Option<Vec<(&str, u32)>> =
            lines.map(|ls| ls.iter().map(|(i, q)| (i.as_str(), *q)).collect());
        // (the chaos catalog's items have the default 14-day refund window, longer than any run)
        let plan = match self
            .account
            .decide_refund(&o.order, requested.as_deref(), |_| Ok(()))
        {
            Ok(plan) => plan,
            Err(code) => {
                return ensure(err_is(status, body, status_of(code), code), || {
                    format!(
                        "refund: expected {} {code}, got {status} {body}",
                        status_of(code)
                    )
                });
            }
        };
        ensure(status == 201, || {
            format!(
                "refund of {:?} of order {order_id}: expected 201, got {status} {body}",
                plan.quantities
            )
        })?;
        let amount = plan.amount;
        let Some(refund_id) = body["refund_id"].as_str() else {
            return Err(format!("refund: no refund_id in {body}"));
        };
        if self
            .refunds
            .insert(refund_id.to_string(), (order_id.to_string(), amount))
            .is_some()
        {
            return Err(format!("refund id {refund_id} returned for two keys"));
        }
        let debt_before = self.account.debt;
        self.account.refund(&mut o.order, &plan);
        let repaid = debt_before - self.account.debt;
        self.note_repaid("refund", refund_id, repaid);
        ensure(cents_of(&body["amount"]) == Some(amount), || {
            format!(
                "refund: amount {} but the order's unit prices give {}",
                body["amount"],
                money(amount)
            )
        })?;
        ensure(body["order_id"] == order_id, || {
            format!("refund: order_id in {body}")
        })?;
        self.check_wallet(&body["wallet"], t0, t1, "refund")
    }
}

impl UserModel {
    fn note_repaid(&mut self, kind: &str, id: &str, repaid: Cents) {
        if repaid > 0 {
            self.repaid
                .insert((kind.to_string(), id.to_string()), repaid);
        }
    }

    /// A spending request of a frozen account: `403 account_frozen`, nothing changes.
    fn frozen_refusal(&self, status: u16, body: &Value, what: &str) -> Check {
        ensure(err_is(status, body, 403, "account_frozen"), || {
            format!(
                "{what} on an account frozen ({:?}, debt {}): expected 403 account_frozen, got {status} {body}",
                self.account.frozen,
                money(self.account.debt)
            )
        })
    }

    /// What a completed top-up brought in (`None`: not a completed top-up of the model).
    fn topup_brought_in(&self, topup_id: &str) -> Option<Cents> {
        self.topups
            .get(topup_id)
            .filter(|t| matches!(t.state, TopupState::Completed(_)))
            .map(|t| t.amount)
    }

    /// What `source_id` can still give back.
    fn reversible(&self, source_id: &str, brought_in: Cents) -> Cents {
        let reversed: Cents = self
            .reversals
            .get(source_id)
            .map_or(0, |r| r.values().map(|(_, a)| a).sum());
        (brought_in - reversed).max(0)
    }

    /// A reversal of `amount` of a source that brought in `brought_in`, under `external_ref`: the same
    /// external_ref is the same reversal (another amount: a conflict), never more than what is left.
    #[allow(clippy::too_many_arguments)]
    fn apply_reversal(
        &mut self,
        source_id: &str,
        brought_in: Cents,
        amount: Cents,
        external_ref: &str,
        status: u16,
        body: &Value,
        t0: i64,
        t1: i64,
    ) -> Check {
        let known = self
            .reversals
            .get(source_id)
            .and_then(|r| r.get(external_ref))
            .cloned();
        if let Some((reversal_id, first)) = known {
            if first != amount {
                return ensure(err_is(status, body, 409, "external_ref_conflict"), || {
                    format!(
                        "reversal {external_ref} again with another amount ({} then {}): expected 409 external_ref_conflict, got {status} {body}",
                        money(first),
                        money(amount)
                    )
                });
            }
            ensure(
                status == 200 && body["reversal_id"] == reversal_id.as_str(),
                || {
                    format!(
                        "reversal {external_ref} again: expected 200 with the original reversal {reversal_id} (not taken twice), got {status} {body}"
                    )
                },
            )?;
            return self.check_wallet(&body["wallet"], t0, t1, "reversal (same external_ref)");
        }
        let reversible = self.reversible(source_id, brought_in);
        if amount > reversible {
            return ensure(err_is(status, body, 409, "reversal_exceeds_credit"), || {
                format!(
                    "reversal of {} with {} left to reverse: expected 409 reversal_exceeds_credit, got {status} {body}",
                    money(amount),
                    money(reversible)
                )
            });
        }
        ensure(status == 201, || {
            format!(
                "reversal of {} ({} left): expected 201, got {status} {body}",
                money(amount),
                money(reversible)
            )
        })?;
        self.take_back(source_id, external_ref, amount, 0, body, t0, t1)?;
        self.check_wallet(&body["wallet"], t0, t1, "reversal")
    }

    /// A new reversal the server made (`reversal` is its JSON): covered by `hold` (a lost dispute's),
    /// then the available money (known to within the pending orders whose deadline fell in [t0, t1]),
    /// the rest debt. Checks the split, follows it, and records the reversal on its source.
    #[allow(clippy::too_many_arguments)]
    fn take_back(
        &mut self,
        source_id: &str,
        external_ref: &str,
        amount: Cents,
        hold: Cents,
        reversal: &Value,
        t0: i64,
        t1: i64,
    ) -> Check {
        let Some(reversal_id) = reversal["reversal_id"].as_str() else {
            return Err(format!("reversal: no reversal_id in {reversal}"));
        };
        let field = |name: &str| cents_of(&reversal[name]);
        let (Some(from_hold), Some(from_wallet), Some(debt)) =
            (field("from_hold"), field("from_wallet"), field("debt"))
        else {
            return Err(format!("reversal: malformed split in {reversal}"));
        };
        let (lo, hi) = self.held_range(t0, t1);
        let balance = self.balance();
        let least_debt = (amount - (balance - lo + hold)).max(0);
        let most_debt = (amount - (balance - hi + hold)).max(0);
        ensure(
            field("amount") == Some(amount)
                && reversal["external_ref"] == external_ref
                && from_hold == hold.min(amount)
                && from_hold + from_wallet + debt == amount
                && (least_debt..=most_debt).contains(&debt)
                && field("revoked_amount") == Some(0),
            || {
                format!(
                    "reversal of {} (hold {}, balance {}, held {}..{}): expected from_hold {}, debt {}..{}, the parts summing to the amount: {reversal}",
                    money(amount),
                    money(hold),
                    money(balance),
                    money(lo),
                    money(hi),
                    money(hold.min(amount)),
                    money(least_debt),
                    money(most_debt)
                )
            },
        )?;
        let plan = ReversalPlan {
            from_hold,
            from_wallet,
            debt,
            revokes: vec![],
            revoked_amount: 0,
        };
        self.account.take_back(amount, hold, &plan);
        let taken = self.reversals.entry(source_id.to_string()).or_default();
        if taken
            .insert(external_ref.to_string(), (reversal_id.to_string(), amount))
            .is_some()
        {
            return Err(format!(
                "a second reversal {external_ref} of {source_id}: taken twice"
            ));
        }
        if self
            .reversal_postings
            .insert(reversal_id.to_string(), (amount, debt))
            .is_some()
        {
            return Err(format!(
                "reversal id {reversal_id} answered for two reversals"
            ));
        }
        Ok(())
    }

    /// A PSP `payment.refunded`, `dispute.opened` or `dispute.closed` of a completed top-up.
    #[allow(clippy::too_many_arguments)]
    fn apply_psp_reversal(
        &mut self,
        event_id: &str,
        event: &PspEvent,
        topup_id: &str,
        status: u16,
        body: &Value,
        t0: i64,
        t1: i64,
    ) -> Check {
        let Some(brought_in) = self.topup_brought_in(topup_id) else {
            return ensure(err_is(status, body, 409, "invalid_state"), || {
                format!(
                    "PSP reversal of a top-up not completed: expected 409 invalid_state, got {status} {body}"
                )
            });
        };
        match event {
            PspEvent::Refunded { amount } => {
                let external_ref = format!("psp:{event_id}");
                self.apply_reversal(
                    topup_id,
                    brought_in,
                    *amount,
                    &external_ref,
                    status,
                    body,
                    t0,
                    t1,
                )
            }
            PspEvent::DisputeOpened { dispute_id, amount } => {
                if let Some(known) = self.disputes.get(dispute_id) {
                    ensure(status == 200 && body["status"] == known.status, || {
                        format!(
                            "dispute {dispute_id} opened again: expected 200 {} unchanged, got {status} {body}",
                            known.status
                        )
                    })?;
                    return self.check_wallet(&body["wallet"], t0, t1, "dispute opened again");
                }
                let reversible = self.reversible(topup_id, brought_in);
                if *amount > reversible {
                    return ensure(err_is(status, body, 409, "reversal_exceeds_credit"), || {
                        format!(
                            "dispute of {} with {} left to reverse: expected 409 reversal_exceeds_credit, got {status} {body}",
                            money(*amount),
                            money(reversible)
                        )
                    });
                }
                let (lo, hi) = self.held_range(t0, t1);
                let balance = self.balance();
                let least = (*amount).min(balance - hi).max(0);
                let most = (*amount).min(balance - lo).max(0);
                let held = cents_of(&body["held"]);
                ensure(
                    status == 200
                        && body["status"] == "OPEN"
                        && held.is_some_and(|h| (least..=most).contains(&h)),
                    || {
                        format!(
                            "dispute of {} opened: expected 200 OPEN holding {}..{} (what is available of it), got {status} {body}",
                            money(*amount),
                            money(least),
                            money(most)
                        )
                    },
                )?;
                // (the server's: the model knows the available money only to within the deadlines)
                let held = held.unwrap_or(0);
                self.account.wallet.hold(held);
                self.disputes.insert(
                    dispute_id.clone(),
                    MDispute {
                        topup_id: topup_id.to_string(),
                        amount: *amount,
                        held,
                        status: "OPEN",
                    },
                );
                self.check_wallet(&body["wallet"], t0, t1, "dispute opened")
            }
            PspEvent::DisputeClosed {
                dispute_id,
                won,
                amount,
            } => {
                let mut dispute = match self.disputes.get(dispute_id) {
                    Some(known) if known.status != "OPEN" => {
                        ensure(status == 200 && body["status"] == known.status, || {
                            format!(
                                "dispute {dispute_id} closed again: expected 200 {} unchanged, got {status} {body}",
                                known.status
                            )
                        })?;
                        return self.check_wallet(&body["wallet"], t0, t1, "dispute closed again");
                    }
                    Some(open) => open.clone(),
                    None => match (amount, won) {
                        (None, false) => {
                            return ensure(err_is(status, body, 404, "not_found"), || {
                                format!(
                                    "lost dispute {dispute_id} never opened, without an amount: expected 404 not_found, got {status} {body}"
                                )
                            });
                        }
                        (amount, _) => MDispute {
                            topup_id: topup_id.to_string(),
                            amount: amount.unwrap_or(0),
                            held: 0,
                            status: "OPEN",
                        },
                    },
                };
                ensure(status == 200, || {
                    format!("dispute {dispute_id} closed: expected 200, got {status} {body}")
                })?;
                if *won {
                    self.account.release_dispute(dispute.held);
                    dispute.status = "WON";
                } else {
                    let brought_in = self.topup_brought_in(&dispute.topup_id).unwrap_or(0);
                    let take = dispute
                        .amount
                        .min(self.reversible(&dispute.topup_id, brought_in));
                    if take > 0 {
                        let external_ref = format!("dispute:{dispute_id}");
                        let topup = dispute.topup_id.clone();
                        self.take_back(
                            &topup,
                            &external_ref,
                            take,
                            dispute.held,
                            &body["reversal"],
                            t0,
                            t1,
                        )?;
                    } else {
                        ensure(body["reversal"].is_null(), || {
                            format!(
                                "dispute {dispute_id} lost with nothing left to take back, yet a reversal: {body}"
                            )
                        })?;
                        self.account.release_dispute(dispute.held);
                    }
                    dispute.status = "LOST";
                }
                dispute.held = 0;
                let expected_status = dispute.status;
                self.disputes.insert(dispute_id.clone(), dispute);
                ensure(
                    body["status"] == expected_status && cents_of(&body["held"]) == Some(0),
                    || {
                        format!(
                            "dispute {dispute_id} closed: expected {expected_status} holding nothing, got {body}"
                        )
                    },
                )?;
                self.check_wallet(&body["wallet"], t0, t1, "dispute closed")
            }
        }
    }
}

fn last_reason(order: &Value) -> Option<String> {
    order["history"]
        .as_array()?
        .last()?
        .get("reason")?
        .as_str()
        .map(str::to_string)
}

/// An order as the API shows it (at some time in [t0, t1]) against the model's order.
pub fn check_order(m: &MOrder, v: &Value, t0: i64, t1: i64, what: &str) -> Check {
    let (id, o) = (&m.order_id, &m.order);
    ensure(v["order_id"] == id.as_str(), || {
        format!("{what}: order_id {} is not {id}", v["order_id"])
    })?;
    let status = v["status"].as_str().unwrap_or("?");
    let reason = last_reason(v);
    let ok_status = match o.status {
        OrderStatus::Pending => {
            let pending_ok = t0 < o.expires_at && status == "PENDING";
            let expired_ok =
                t1 >= o.expires_at && status == "CANCELLED" && reason.as_deref() == Some("expired");
            pending_ok || expired_ok
        }
        OrderStatus::Expired => status == "CANCELLED" && reason.as_deref() == Some("expired"),
        OrderStatus::CancelledByClient => {
            status == "CANCELLED" && reason.as_deref() == Some("cancelled_by_client")
        }
        s => status == s.api(),
    };
    ensure(ok_status, || {
        format!(
            "{what}: order {id} is {status} (reason {reason:?}) but the model says {:?} (deadline {} µs after the window's start)",
            o.status,
            o.expires_at - t0
        )
    })?;
    ensure(cents_of(&v["total"]) == Some(o.total), || {
        format!(
            "{what}: order {id} total {} but the catalog prices give {}",
            v["total"],
            money(o.total)
        )
    })?;
    let Some(lines) = v["lines"].as_array() else {
        return Err(format!("{what}: order {id} without lines: {v}"));
    };
    ensure(lines.len() == o.lines.len(), || {
        format!(
            "{what}: order {id} has {} lines, the model {}",
            lines.len(),
            o.lines.len()
        )
    })?;
    for (l, m) in lines.iter().zip(&o.lines) {
        let refunded = l["refunded_quantity"].as_u64().unwrap_or(u64::MAX);
        let quantity = l["quantity"].as_u64().unwrap_or(0);
        ensure(
            l["item_id"] == m.item_id.as_str()
                && quantity == u64::from(m.quantity)
                && cents_of(&l["unit_price"]) == Some(m.unit_price)
                && refunded == u64::from(m.refunded)
                && refunded <= quantity,
            || {
                format!(
                    "{what}: order {id} line {l} but the model has {} × {} at {} with {} refunded",
                    m.quantity,
                    m.item_id,
                    money(m.unit_price),
                    m.refunded
                )
            },
        )?;
    }
    let refunded_total = cents_of(&v["refunded_total"]);
    ensure(
        refunded_total == Some(o.refunded_total()) && o.refunded_total() <= o.total,
        || {
            format!(
                "{what}: order {id} refunded_total {} but the model's refunds sum to {} (total {})",
                v["refunded_total"],
                money(o.refunded_total()),
                money(o.total)
            )
        },
    )
}
