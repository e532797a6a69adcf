//! The clients: each worker drives a few users of its own, one operation at a time per worker, and retries
//! every operation whose outcome is unknown (timeout, connection error, 5xx, 429) with the same idempotency
//! key, against any node, until it gets a definite answer.
//!
//! Money also goes back out: reversals of direct credits (a few `external_ref`s per credit, amounts past
//! what is left), and the PSP's `payment.refunded`, `dispute.opened` and `dispute.closed` events of
//! completed top-ups, which the PSP replays (same event, same body) and reorders (a dispute closed before
//! it is opened).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};

use super::history::{Attempt, Cents, History, Op, Outcome, PspEvent, Spec, unix_micros};
use super::model::{CATALOG, OrderStatus, TopupState, UserModel, consumable, money};
use crate::harness::{Api, Auth, PSP_SECRET, new_key, now_unix, sign_webhook};

/// What every worker shares.
pub struct Ctx {
    pub nodes: Vec<(u64, Api)>,
    pub history: History,
    /// Start no new operation.
    pub stop: Arc<AtomicBool>,
    /// Give up retrying (the op stays unresolved; the final resolution retries it).
    pub abandon: Arc<AtomicBool>,
    pub attempt_timeout: Duration,
    pub run_tag: String,
}

/// One HTTP request of `op` to `api`.
pub async fn send_once(
    api: &Api,
    method: &'static str,
    path: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
    webhook: bool,
    timeout: Duration,
) -> Outcome {
    let m = if method == "GET" {
        Method::GET
    } else {
        Method::POST
    };
    let mut call = api.call(m, path);
    if !webhook {
        call = call.auth(Auth::Service);
    }
    if let Some(k) = key {
        call = call.key(k);
    }
    if let Some(b) = body {
        if webhook {
            call = call.header("psp-signature", &sign_webhook(PSP_SECRET, now_unix(), b));
        }
        call = call.raw(b.to_vec());
    }
    match tokio::time::timeout(timeout, call.try_send()).await {
        Err(_) => Outcome::Unknown(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Outcome::Unknown(format!("transport error: {e}")),
        Ok(Ok(r)) if r.status >= 500 || r.status == 429 => {
            Outcome::Unknown(format!("{} {}", r.status, r.code().unwrap_or_default()))
        }
        Ok(Ok(r)) => {
            let body = serde_json::from_slice(&r.body).unwrap_or_else(|_| Value::String(r.text()));
            Outcome::Definite {
                status: r.status,
                body,
                replayed: r.replayed(),
            }
        }
    }
}

/// The parts of an op one sender needs.
#[derive(Clone)]
struct Request {
    method: &'static str,
    path: String,
    key: Option<String>,
    body: Option<Vec<u8>>,
    webhook: bool,
}

/// One sender: attempts against the nodes in turn (from `start`) until a definite answer, `abandon`, or
/// `max_attempts`.
async fn sender(
    nodes: Vec<(u64, Api)>,
    req: Request,
    chain: usize,
    start: usize,
    abandon: Arc<AtomicBool>,
    timeout: Duration,
    max_attempts: usize,
) -> Vec<Attempt> {
    let mut attempts = vec![];
    for k in 0..max_attempts {
        let (node, api) = &nodes[(start + k) % nodes.len()];
        let t_start = unix_micros();
        let outcome = send_once(
            api,
            req.method,
            &req.path,
            req.key.as_deref(),
            req.body.as_deref(),
            req.webhook,
            timeout,
        )
        .await;
        let definite = matches!(outcome, Outcome::Definite { .. });
        attempts.push(Attempt {
            chain,
            node: *node,
            start: t_start,
            end: unix_micros(),
            outcome,
        });
        if definite || abandon.load(Ordering::SeqCst) {
            break;
        }
        let backoff = 25u64 << k.min(4);
        tokio::time::sleep(Duration::from_millis(backoff)).await;
    }
    attempts
}

/// Runs `op` (all its senders at once) until every sender has a definite answer (or gives up); fills in
/// its attempts and times.
pub async fn execute(
    nodes: &[(u64, Api)],
    op: &mut Op,
    start: usize,
    abandon: &Arc<AtomicBool>,
    timeout: Duration,
    max_attempts: usize,
) {
    let req = Request {
        method: op.method,
        path: op.path.clone(),
        key: op.key.clone(),
        body: op.body.clone(),
        webhook: matches!(op.spec, Spec::Webhook { .. } | Spec::PspReversal { .. }),
    };
    if op.invoked == 0 {
        op.invoked = unix_micros();
    }
    let mut all = vec![];
    if op.senders == 1 {
        all = sender(
            nodes.to_vec(),
            req,
            0,
            start,
            abandon.clone(),
            timeout,
            max_attempts,
        )
        .await;
    } else {
        let tasks: Vec<_> = (0..op.senders)
            .map(|c| {
                tokio::spawn(sender(
                    nodes.to_vec(),
                    req.clone(),
                    c,
                    start + c,
                    abandon.clone(),
                    timeout,
                    max_attempts,
                ))
            })
            .collect();
        for t in tasks {
            all.extend(t.await.expect("sender task"));
        }
    }
    op.attempts.extend(all);
    op.attempts.sort_by_key(|a| a.start);
    let done = (0..op.senders).all(|c| {
        op.attempts
            .iter()
            .any(|a| a.chain == c && matches!(a.outcome, Outcome::Definite { .. }))
    });
    op.completed = done.then(|| {
        op.attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Definite { .. }))
            .map(|a| a.end)
            .max()
            .unwrap_or(0)
    });
}

// ------------------------------------------------------------------------------------------------

struct Slot {
    user: String,
    model: UserModel,
    /// Orders this client decided to leave to expire.
    leave: BTreeSet<String>,
    /// Credits: (external_ref, amount).
    refs: Vec<(String, Cents)>,
    /// Ops with a stored answer under their key: (op id, key).
    keyed: Vec<(usize, String)>,
    /// PSP events sent: event id → (op id, body bytes).
    events: BTreeMap<String, (usize, Vec<u8>)>,
    /// PSP reversal and dispute events sent: event id → (op id, body bytes, event, top-up id).
    psp_events: BTreeMap<String, (usize, Vec<u8>, PspEvent, String)>,
    counter: u64,
}

pub struct Worker {
    pub id: usize,
    rng: StdRng,
    ctx: Arc<Ctx>,
    slots: Vec<Slot>,
    pending_users: Vec<String>,
    /// Create the late user after this many ops.
    late_user_after: usize,
    /// The order op being run is one to leave to expire.
    leave_next: bool,
}

impl Worker {
    pub fn new(id: usize, seed: u64, ctx: Arc<Ctx>, users: usize) -> Worker {
        let mut rng =
            StdRng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(id as u64 + 1)));
        let mut pending_users: Vec<String> = (0..users)
            .map(|u| format!("{}-w{id}-u{u}", ctx.run_tag))
            .collect();
        pending_users.push(format!("{}-w{id}-late", ctx.run_tag));
        let late_user_after = rng.random_range(20..200);
        Worker {
            id,
            rng,
            ctx,
            slots: vec![],
            pending_users,
            late_user_after,
            leave_next: false,
        }
    }

    fn new_op(
        &mut self,
        user: &str,
        spec: Spec,
        method: &'static str,
        path: String,
        key: bool,
        body: Option<Value>,
    ) -> Op {
        let senders = if method == "POST" && self.rng.random_ratio(1, 12) {
            self.rng.random_range(2..=3)
        } else {
            1
        };
        Op {
            id: self.ctx.history.next_id(),
            worker: self.id,
            user: user.to_string(),
            spec,
            method,
            path,
            key: key.then(new_key),
            body: body.map(|b| serde_json::to_vec(&b).expect("json")),
            senders,
            attempts: vec![],
            invoked: 0,
            completed: None,
            resolved_after_run: false,
        }
    }

    /// Sends `op` until definite (or abandoned), records it, and moves the slot's model on.
    async fn run_op(&mut self, slot: usize, mut op: Op) -> bool {
        let start = self.rng.random_range(0..self.ctx.nodes.len());
        let max_attempts = if op.is_read() { 3 } else { usize::MAX };
        execute(
            &self.ctx.nodes,
            &mut op,
            start,
            &self.ctx.abandon,
            self.ctx.attempt_timeout,
            max_attempts,
        )
        .await;
        let resolved = op.completed.is_some();
        if let Some((status, body)) = op.answer().map(|(s, b)| (s, b.clone())) {
            if resolved || !op.is_read() {
                let s = &mut self.slots[slot];
                let _ = s.model.apply(&op, status, &body);
                // (a user's creation is keyed in the global scope: not a key of the user's scope)
                if op.key.is_some()
                    && !matches!(op.spec, Spec::KeyReuse { .. } | Spec::CreateUser)
                    && status != 422
                    && status != 400
                {
                    s.keyed.push((op.id, op.key.clone().unwrap()));
                }
                if let (
                    Spec::Credit {
                        external_ref,
                        amount,
                    },
                    201,
                ) = (&op.spec, status)
                {
                    s.refs.push((external_ref.clone(), *amount));
                }
                if let (
                    Spec::Order {
                        complete: false, ..
                    },
                    201,
                    true,
                ) = (&op.spec, status, self.leave_next)
                {
                    if let Some(id) = body["order_id"].as_str() {
                        s.leave.insert(id.to_string());
                    }
                }
                if let Spec::PspReversal {
                    event_id,
                    event,
                    topup_id,
                    replay_of: None,
                } = &op.spec
                {
                    s.psp_events.insert(
                        event_id.clone(),
                        (
                            op.id,
                            op.body.clone().unwrap_or_default(),
                            event.clone(),
                            topup_id.clone(),
                        ),
                    );
                }
                if let Spec::Webhook {
                    event_id,
                    replay_of: None,
                    ..
                } = &op.spec
                {
                    s.events.insert(
                        event_id.clone(),
                        (op.id, op.body.clone().unwrap_or_default()),
                    );
                }
            }
        }
        self.leave_next = false;
        let ok_to_go_on = resolved || op.is_read();
        self.ctx.history.push(op);
        ok_to_go_on
    }

    pub async fn run(mut self) {
        // the first users, before anything else
        let first: Vec<String> = self
            .pending_users
            .drain(..self.pending_users.len() - 1)
            .collect();
        for user in first {
            if !self.create_user(&user).await {
                return;
            }
        }
        let mut n = 0usize;
        while !self.ctx.stop.load(Ordering::SeqCst) && !self.slots.is_empty() {
            n += 1;
            if n == self.late_user_after {
                if let Some(user) = self.pending_users.pop() {
                    if !self.create_user(&user).await {
                        return;
                    }
                    continue;
                }
            }
            let slot = self.rng.random_range(0..self.slots.len());
            let op = self.choose(slot);
            if !self.run_op(slot, op).await {
                return; // unresolved when abandoned: this user's history ends here
            }
            let think = self.rng.random_range(15..60);
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
    }

    /// Creates `user` (retried until definite); false if it stayed unresolved (the worker stops).
    async fn create_user(&mut self, user: &str) -> bool {
        self.slots.push(Slot {
            user: user.to_string(),
            model: UserModel::new(user),
            leave: BTreeSet::new(),
            refs: vec![],
            keyed: vec![],
            events: BTreeMap::new(),
            psp_events: BTreeMap::new(),
            counter: 0,
        });
        let slot = self.slots.len() - 1;
        let mut op = self.new_op(
            user,
            Spec::CreateUser,
            "POST",
            "/v1/users".into(),
            true,
            Some(json!({"user_id": user, "display_name": format!("chaos {user}")})),
        );
        op.senders = 1;
        let resolved = self.run_op(slot, op).await;
        if !self.slots[slot].model.exists {
            // no 201: the checker reports it; this worker does not use the user
            self.slots.pop();
        }
        resolved
    }

    fn lines(&mut self, slot: usize) -> Vec<(String, u32)> {
        let m = &self.slots[slot].model;
        let now = unix_micros();
        let free_unique: Vec<&'static str> = CATALOG
            .iter()
            .filter(|i| i.kind != "currency")
            .filter(|i| {
                !m.account.owns(i.id)
                    && !m.orders.values().any(|o| {
                        o.order.status == OrderStatus::Pending
                            && o.order.expires_at > now - 2_000_000
                            && o.order.has_item(i.id)
                    })
            })
            .map(|i| i.id)
            .collect();
        let mut lines = vec![];
        let want_unique = self.rng.random_ratio(1, 3);
        if want_unique && !free_unique.is_empty() {
            let i = free_unique[self.rng.random_range(0..free_unique.len())];
            lines.push((i.to_string(), 1));
        } else if want_unique && self.rng.random_ratio(1, 4) {
            // an owned (or pending) one on purpose: already_owned
            let uniques: Vec<_> = CATALOG.iter().filter(|i| i.kind != "currency").collect();
            let i = uniques[self.rng.random_range(0..uniques.len())];
            lines.push((i.id.to_string(), 1));
        }
        if lines.is_empty() || self.rng.random_ratio(1, 2) {
            let c = if self.rng.random_ratio(2, 3) {
                "gems"
            } else {
                "coins"
            };
            lines.push((c.to_string(), self.rng.random_range(1..=20)));
        }
        lines
    }

    fn choose(&mut self, slot: usize) -> Op {
        let user = self.slots[slot].user.clone();
        let u = format!("/v1/users/{user}");
        let now = unix_micros();
        let pending: Vec<String> = {
            let s = &self.slots[slot];
            s.model
                .order_seq
                .iter()
                .filter(|id| {
                    let o = &s.model.orders[*id];
                    o.order.pending_at(now) && !s.leave.contains(*id)
                })
                .cloned()
                .collect()
        };
        // a two-step order is usually completed or cancelled soon after its creation
        if !pending.is_empty() && self.rng.random_ratio(3, 5) {
            let id = pending[self.rng.random_range(0..pending.len())].clone();
            return if self.rng.random_ratio(4, 5) {
                self.new_op(
                    &user,
                    Spec::Complete {
                        order_id: id.clone(),
                    },
                    "POST",
                    format!("{u}/orders/{id}/complete"),
                    true,
                    Some(json!({})),
                )
            } else {
                self.new_op(
                    &user,
                    Spec::Cancel {
                        order_id: id.clone(),
                    },
                    "POST",
                    format!("{u}/orders/{id}/cancel"),
                    true,
                    Some(json!({})),
                )
            };
        }
        let r = self.rng.random_range(0..112);
        match r {
            100..105 => self.reversal_op(slot),
            105..112 => self.psp_reversal_op(slot),
            0..14 => self.credit_op(slot),
            14..16 => {
                let refs = &self.slots[slot].refs;
                if refs.is_empty() {
                    return self.credit_op(slot);
                }
                let (ext, amount) = refs[self.rng.random_range(0..refs.len())].clone();
                self.new_op(
                    &user,
                    Spec::Credit {
                        amount,
                        external_ref: ext.clone(),
                    },
                    "POST",
                    format!("{u}/credits"),
                    true,
                    Some(json!({"amount": money(amount), "external_ref": ext, "source": "card"})),
                )
            }
            16..22 => {
                let amount = self.rng.random_range(5..=30) * 100 + self.rng.random_range(0..100);
                self.new_op(
                    &user,
                    Spec::Topup { amount },
                    "POST",
                    format!("{u}/topups"),
                    true,
                    Some(json!({"amount": money(amount)})),
                )
            }
            22..30 => self.webhook_op(slot),
            30..48 => self.order_op(slot, true),
            48..60 => self.order_op(slot, false),
            60..63 => {
                // complete an order that is already completed (a new key): 200, charged once
                let s = &self.slots[slot];
                let done: Vec<String> = s
                    .model
                    .order_seq
                    .iter()
                    .filter(|id| s.model.orders[*id].order.status.was_completed())
                    .cloned()
                    .collect();
                if done.is_empty() {
                    return self.order_op(slot, true);
                }
                let id = done[self.rng.random_range(0..done.len())].clone();
                self.new_op(
                    &user,
                    Spec::Complete {
                        order_id: id.clone(),
                    },
                    "POST",
                    format!("{u}/orders/{id}/complete"),
                    true,
                    Some(json!({})),
                )
            }
            63..74 => self.refund_op(slot),
            74..82 => {
                let c = if self.rng.random_ratio(2, 3) {
                    "gems"
                } else {
                    "coins"
                };
                let owned =
                    u32::try_from(self.slots[slot].model.account.unspent(c)).unwrap_or(u32::MAX);
                let quantity = self.rng.random_range(1..=(owned.min(30) + 2));
                self.new_op(
                    &user,
                    Spec::Consume {
                        item_id: c.into(),
                        quantity,
                    },
                    "POST",
                    format!("{u}/entitlements/{c}/consume"),
                    true,
                    Some(json!({"quantity": quantity})),
                )
            }
            82..86 => {
                let keyed = &self.slots[slot].keyed;
                if keyed.is_empty() {
                    return self.credit_op(slot);
                }
                let (of, key) = keyed[self.rng.random_range(0..keyed.len())].clone();
                let n = self.bump(slot);
                let amount = self.rng.random_range(100..=999);
                let mut op = self.new_op(
                    &user,
                    Spec::KeyReuse { of },
                    "POST",
                    format!("{u}/credits"),
                    true,
                    Some(json!({"amount": money(amount), "external_ref": format!("{user}-reuse{n}"), "source": "card"})),
                );
                op.key = Some(key);
                op
            }
            86..93 => self.new_op(
                &user,
                Spec::ReadWallet,
                "GET",
                format!("{u}/wallet"),
                false,
                None,
            ),
            93..96 => self.new_op(
                &user,
                Spec::ReadEntitlements,
                "GET",
                format!("{u}/entitlements"),
                false,
                None,
            ),
            _ => {
                let ids = &self.slots[slot].model.order_seq;
                if ids.is_empty() {
                    return self.new_op(
                        &user,
                        Spec::ReadWallet,
                        "GET",
                        format!("{u}/wallet"),
                        false,
                        None,
                    );
                }
                let id = ids[self.rng.random_range(0..ids.len())].clone();
                self.new_op(
                    &user,
                    Spec::ReadOrder {
                        order_id: id.clone(),
                    },
                    "GET",
                    format!("{u}/orders/{id}"),
                    false,
                    None,
                )
            }
        }
    }

    fn bump(&mut self, slot: usize) -> u64 {
        self.slots[slot].counter += 1;
        self.slots[slot].counter
    }

    fn credit_op(&mut self, slot: usize) -> Op {
        let user = self.slots[slot].user.clone();
        let n = self.bump(slot);
        let amount = self.rng.random_range(5..=40) * 100 + self.rng.random_range(0..100);
        let ext = format!("{user}-ref{n}");
        self.new_op(
            &user,
            Spec::Credit {
                amount,
                external_ref: ext.clone(),
            },
            "POST",
            format!("/v1/users/{user}/credits"),
            true,
            Some(json!({"amount": money(amount), "external_ref": ext, "source": "card"})),
        )
    }

    fn order_op(&mut self, slot: usize, complete: bool) -> Op {
        let user = self.slots[slot].user.clone();
        let lines = self.lines(slot);
        let total: Cents = lines
            .iter()
            .map(|(i, q)| super::model::item(i).map_or(0, |it| it.price) * i64::from(*q))
            .sum();
        let only_consumables = lines.iter().all(|(i, _)| consumable(i));
        let expected_total = match self.rng.random_range(0..20) {
            0 if only_consumables => Some(total + 1),
            1..=9 => Some(total),
            _ => None,
        };
        let body_lines: Vec<Value> = lines
            .iter()
            .map(|(i, q)| json!({"item_id": i, "quantity": q}))
            .collect();
        let mut body = json!({"lines": body_lines, "complete": complete});
        if let Some(x) = expected_total {
            body["expected_total"] = json!(money(x));
        }
        let op = self.new_op(
            &user,
            Spec::Order {
                lines,
                complete,
                expected_total,
            },
            "POST",
            format!("/v1/users/{user}/orders"),
            true,
            Some(body),
        );
        if !complete && self.rng.random_ratio(1, 6) {
            // decided now, applied when the answer names the order: see `run_op` callers
            self.leave_next = true;
        }
        op
    }

    fn webhook_op(&mut self, slot: usize) -> Op {
        let user = self.slots[slot].user.clone();
        let s = &self.slots[slot];
        let pending: Vec<(String, Cents)> = s
            .model
            .topups
            .iter()
            .filter(|(_, t)| t.state == TopupState::Pending)
            .map(|(id, t)| (id.clone(), t.amount))
            .collect();
        let finals: Vec<(String, Cents)> = s
            .model
            .topups
            .iter()
            .filter(|(_, t)| t.state != TopupState::Pending)
            .map(|(id, t)| (id.clone(), t.amount))
            .collect();
        let events: Vec<(String, usize, Vec<u8>)> = s
            .events
            .iter()
            .map(|(e, (op, b))| (e.clone(), *op, b.clone()))
            .collect();
        if !pending.is_empty() && (events.is_empty() || self.rng.random_ratio(3, 4)) {
            let (topup_id, amount) = pending[self.rng.random_range(0..pending.len())].clone();
            let succeeded = self.rng.random_ratio(6, 7);
            return self.event_op(slot, &user, topup_id, amount, succeeded);
        }
        if !events.is_empty() && (finals.is_empty() || self.rng.random_ratio(1, 2)) {
            // the PSP delivers the same event again
            let (event_id, first, bytes) = events[self.rng.random_range(0..events.len())].clone();
            let v: Value = serde_json::from_slice(&bytes).expect("event json");
            let mut op = self.new_op(
                &user,
                Spec::Webhook {
                    event_id,
                    topup_id: v["topup_id"].as_str().unwrap_or_default().to_string(),
                    succeeded: v["type"] == "payment.succeeded",
                    amount: super::model::cents_of(&v["amount"]).unwrap_or(0),
                    psp_payment_id: v["psp_payment_id"].as_str().unwrap_or_default().to_string(),
                    replay_of: Some(first),
                },
                "POST",
                "/v1/psp/webhook".into(),
                false,
                None,
            );
            op.body = Some(bytes);
            return op;
        }
        if !finals.is_empty() {
            // another event for a top-up that is already final: 200, nothing credited
            let (topup_id, amount) = finals[self.rng.random_range(0..finals.len())].clone();
            return self.event_op(slot, &user, topup_id, amount, true);
        }
        let amount = self.rng.random_range(5..=30) * 100;
        self.new_op(
            &user,
            Spec::Topup { amount },
            "POST",
            format!("/v1/users/{user}/topups"),
            true,
            Some(json!({"amount": money(amount)})),
        )
    }

    fn event_op(
        &mut self,
        slot: usize,
        user: &str,
        topup_id: String,
        amount: Cents,
        succeeded: bool,
    ) -> Op {
        let n = self.bump(slot);
        let event_id = format!("evt-{user}-{n}");
        let psp_payment_id = format!("pi-{user}-{n}");
        let body = json!({
            "event_id": event_id,
            "type": if succeeded { "payment.succeeded" } else { "payment.failed" },
            "topup_id": topup_id,
            "user_id": user,
            "amount": money(amount),
            "psp_payment_id": psp_payment_id,
        });
        self.new_op(
            user,
            Spec::Webhook {
                event_id,
                topup_id,
                succeeded,
                amount,
                psp_payment_id,
                replay_of: None,
            },
            "POST",
            "/v1/psp/webhook".into(),
            false,
            Some(body),
        )
    }

    /// An amount to take back of a source that brought in `brought_in` and can still give `left`: often
    /// all that is left, sometimes more (refused), sometimes a part.
    fn reversal_amount(&mut self, brought_in: Cents, left: Cents) -> Cents {
        match self.rng.random_range(0..6) {
            0 => left + 1,
            1 => brought_in,
            2 | 3 if left > 0 => left,
            _ => self.rng.random_range(1..=brought_in.max(2) / 2),
        }
    }

    /// A reversal of one of the user's credits: a few `external_ref`s per credit, so that the same one
    /// comes again (the same reversal: 200, taken once) or with another amount (a conflict).
    fn reversal_op(&mut self, slot: usize) -> Op {
        let s = &self.slots[slot];
        let credits: Vec<(String, Cents)> = s
            .model
            .credits
            .iter()
            .map(|(id, a)| (id.clone(), *a))
            .collect();
        if credits.is_empty() {
            return self.credit_op(slot);
        }
        let user = s.user.clone();
        let left = |id: &str, brought_in: Cents| {
            let reversed: Cents = s
                .model
                .reversals
                .get(id)
                .map_or(0, |r| r.values().map(|(_, a)| a).sum());
            (brought_in - reversed).max(0)
        };
        // often one the wallet can no longer cover: what leaves debt
        let available = s.model.account.wallet.available();
        let spent: Vec<&(String, Cents)> = credits
            .iter()
            .filter(|(id, a)| left(id, *a) > available)
            .collect();
        let (credit_id, brought_in) = if !spent.is_empty() && self.rng.random_ratio(1, 2) {
            spent[self.rng.random_range(0..spent.len())].clone()
        } else {
            credits[self.rng.random_range(0..credits.len())].clone()
        };
        let left = left(&credit_id, brought_in);
        let amount = self.reversal_amount(brought_in, left);
        let external_ref = format!("{credit_id}-rev{}", self.rng.random_range(0..3));
        let reason = if self.rng.random_ratio(1, 2) {
            "chargeback"
        } else {
            "psp_refund"
        };
        self.new_op(
            &user,
            Spec::Reversal {
                credit_id: credit_id.clone(),
                amount,
                external_ref: external_ref.clone(),
            },
            "POST",
            format!("/v1/users/{user}/credits/{credit_id}/reversals"),
            true,
            Some(json!({"amount": money(amount), "reason": reason, "external_ref": external_ref})),
        )
    }

    /// A PSP `payment.refunded`, `dispute.opened` or `dispute.closed` of a completed top-up, or one sent
    /// before again (the PSP replays). Disputes come from a small pool per user, so that one is closed
    /// before it is opened (the PSP reorders), opened twice, or closed twice.
    fn psp_reversal_op(&mut self, slot: usize) -> Op {
        let s = &self.slots[slot];
        let user = s.user.clone();
        let completed: Vec<(String, Cents)> = s
            .model
            .topups
            .iter()
            .filter(|(_, t)| matches!(t.state, TopupState::Completed(_)))
            .map(|(id, t)| (id.clone(), t.amount))
            .collect();
        if completed.is_empty() {
            return self.webhook_op(slot);
        }
        if !s.psp_events.is_empty() && self.rng.random_ratio(1, 4) {
            let sent: Vec<_> = s.psp_events.iter().collect();
            let (event_id, (first, bytes, event, topup_id)) =
                sent[self.rng.random_range(0..sent.len())];
            let (event_id, first, bytes, event, topup_id) = (
                event_id.clone(),
                *first,
                bytes.clone(),
                event.clone(),
                topup_id.clone(),
            );
            let mut op = self.new_op(
                &user,
                Spec::PspReversal {
                    event_id,
                    event,
                    topup_id,
                    replay_of: Some(first),
                },
                "POST",
                "/v1/psp/webhook".into(),
                false,
                None,
            );
            op.body = Some(bytes);
            return op;
        }
        let dispute_id = format!("dp-{user}-{}", self.rng.random_range(0..4));
        // a dispute's events name the top-up it was opened on
        let (topup_id, brought_in) = match s.model.disputes.get(&dispute_id) {
            Some(d) => completed
                .iter()
                .find(|(id, _)| *id == d.topup_id)
                .cloned()
                .unwrap_or_else(|| completed[0].clone()),
            None => completed[self.rng.random_range(0..completed.len())].clone(),
        };
        let reversed: Cents = s
            .model
            .reversals
            .get(&topup_id)
            .map_or(0, |r| r.values().map(|(_, a)| a).sum());
        let left = (brought_in - reversed).max(0);
        let n = self.bump(slot);
        let event_id = format!("evt-{user}-r{n}");
        let mut body = json!({
            "event_id": event_id,
            "topup_id": topup_id,
            "user_id": user,
        });
        let event = match self.rng.random_range(0..3) {
            0 => {
                let amount = self.reversal_amount(brought_in, left);
                body["type"] = json!("payment.refunded");
                body["amount"] = json!(money(amount));
                PspEvent::Refunded { amount }
            }
            1 => {
                let amount = self.reversal_amount(brought_in, left).max(1);
                body["type"] = json!("dispute.opened");
                body["amount"] = json!(money(amount));
                body["dispute_id"] = json!(dispute_id);
                PspEvent::DisputeOpened { dispute_id, amount }
            }
            _ => {
                let won = self.rng.random_ratio(1, 2);
                // the closing event carries the amount (a close before its open needs it when lost)
                let amount = self.reversal_amount(brought_in, left).max(1);
                body["type"] = json!("dispute.closed");
                body["outcome"] = json!(if won { "won" } else { "lost" });
                body["amount"] = json!(money(amount));
                body["dispute_id"] = json!(dispute_id);
                PspEvent::DisputeClosed {
                    dispute_id,
                    won,
                    amount: Some(amount),
                }
            }
        };
        self.new_op(
            &user,
            Spec::PspReversal {
                event_id,
                event,
                topup_id,
                replay_of: None,
            },
            "POST",
            "/v1/psp/webhook".into(),
            false,
            Some(body),
        )
    }

    fn refund_op(&mut self, slot: usize) -> Op {
        let user = self.slots[slot].user.clone();
        let s = &self.slots[slot];
        let refundable: Vec<String> = s
            .model
            .order_seq
            .iter()
            .filter(|id| {
                let o = &s.model.orders[*id];
                o.order.status.was_completed() && o.order.lines.iter().any(|l| l.refundable() > 0)
            })
            .cloned()
            .collect();
        let any: Vec<String> = s.model.order_seq.clone();
        let order_id = if !refundable.is_empty() && !self.rng.random_ratio(1, 15) {
            refundable[self.rng.random_range(0..refundable.len())].clone()
        } else if !any.is_empty() {
            // maybe pending, cancelled or fully refunded: invalid_state
            any[self.rng.random_range(0..any.len())].clone()
        } else {
            return self.order_op(slot, true);
        };
        let o = self.slots[slot].model.orders[&order_id].clone();
        let lines = if self.rng.random_ratio(2, 5) {
            None
        } else {
            let l = &o.order.lines[self.rng.random_range(0..o.order.lines.len())];
            let left = l.refundable();
            let q = if left == 0 || self.rng.random_ratio(1, 10) {
                left + 1
            } else {
                self.rng.random_range(1..=left)
            };
            Some(vec![(l.item_id.clone(), q)])
        };
        let mut body = json!({"reason": "customer_request"});
        if let Some(ls) = &lines {
            body["lines"] = ls
                .iter()
                .map(|(i, q)| json!({"item_id": i, "quantity": q}))
                .collect();
        }
        self.new_op(
            &user,
            Spec::Refund {
                order_id: order_id.clone(),
                lines,
            },
            "POST",
            format!("/v1/users/{user}/orders/{order_id}/refunds"),
            true,
            Some(body),
        )
    }
}
