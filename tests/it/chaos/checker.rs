//! The checker. First it replays the history: per user, in order, every operation's definite answer must be
//! one the contract allows in the model's state (see `model.rs`), every duplicate sender of a key must have
//! got the same answer, and no operation may be left unknown. Then, after healing, it reads every user's
//! final state from every node's own replica (`?consistency=local`) and compares it with the model:
//! wallets, orders (none missing, none extra), the ledger (each credit, top-up, hold, debit, release and
//! refund posted exactly once, the running balance never negative), entitlements, top-ups, and the stored
//! outcome of every idempotency key.

use std::collections::BTreeMap;

use serde_json::Value;

use super::history::{Cents, Op, unix_micros};
use super::model::{OrderStatus, TopupState, UserModel, cents_of, check_order, money};
use crate::harness::{Api, Auth};

#[derive(Clone, Debug)]
pub struct Violation {
    pub user: Option<String>,
    pub op: Option<usize>,
    pub node: Option<u64>,
    pub msg: String,
}

impl Violation {
    pub fn new(msg: impl Into<String>) -> Violation {
        Violation {
            user: None,
            op: None,
            node: None,
            msg: msg.into(),
        }
    }
    fn user(user: &str, op: Option<usize>, node: Option<u64>, msg: String) -> Violation {
        Violation {
            user: Some(user.to_string()),
            op,
            node,
            msg,
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(n) = self.node {
            write!(f, "[node {n}] ")?;
        }
        if let Some(u) = &self.user {
            write!(f, "[user {u}] ")?;
        }
        if let Some(o) = self.op {
            write!(f, "[op #{o}] ")?;
        }
        write!(f, "{}", self.msg)
    }
}

/// Groups ops by user, each in invocation order.
pub fn by_user(ops: &[Op]) -> BTreeMap<String, Vec<&Op>> {
    let mut m: BTreeMap<String, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        m.entry(op.user.clone()).or_default().push(op);
    }
    for v in m.values_mut() {
        v.sort_by_key(|o| o.id);
    }
    m
}

/// Replays every user's history through the model.
pub fn replay(ops: &[Op]) -> (BTreeMap<String, UserModel>, Vec<Violation>) {
    let mut models = BTreeMap::new();
    let mut violations = vec![];
    for (user, ops) in by_user(ops) {
        let mut model = UserModel::new(&user);
        for op in ops {
            let answers = op.definite_answers();
            if answers.is_empty() {
                if !op.is_read() {
                    violations.push(Violation::user(
                        &user,
                        Some(op.id),
                        None,
                        format!(
                            "{} never got a definite answer, even after healing ({} attempts)",
                            op.spec.name(),
                            op.attempts.len()
                        ),
                    ));
                }
                continue;
            }
            if !op.is_read() && answers.len() < op.senders {
                violations.push(Violation::user(
                    &user,
                    Some(op.id),
                    None,
                    format!(
                        "only {} of the {} senders of one key got a definite answer",
                        answers.len(),
                        op.senders
                    ),
                ));
            }
            let (_, status, body) = answers[0];
            for (chain, s, b) in &answers[1..] {
                if *s != status || *b != body {
                    violations.push(Violation::user(
                        &user,
                        Some(op.id),
                        None,
                        format!(
                            "two senders of the same key got different answers: sender 0 {status} {body}, sender {chain} {s} {b}"
                        ),
                    ));
                }
            }
            if let Err(msg) = model.apply(op, status, body) {
                violations.push(Violation::user(&user, Some(op.id), None, msg));
            }
        }
        models.insert(user, model);
    }
    (models, violations)
}

/// One user's state as one node's replica has it.
#[derive(Clone, Debug)]
pub struct NodeUser {
    pub node: u64,
    /// When it was read (unix micros): [start, end].
    pub read: (i64, i64),
    pub wallet: Result<Value, String>,
    pub orders: Result<Vec<Value>, String>,
    pub ledger: Result<Vec<Value>, String>,
    pub entitlements: Result<Value, String>,
    pub topups: BTreeMap<String, Result<Value, String>>,
    /// Idempotency key → (status, JSON) of `GET …/idempotency/{key}`.
    pub keys: BTreeMap<String, Result<(u16, Value), String>>,
}

async fn local_get(api: &Api, path: &str) -> Result<(u16, Value), String> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let full = format!("{path}{sep}consistency=local");
    let mut last = String::new();
    for _ in 0..5 {
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            api.call(reqwest::Method::GET, &full)
                .auth(Auth::Service)
                .try_send(),
        )
        .await
        {
            Ok(Ok(r)) if r.status < 500 => {
                let v = serde_json::from_slice(&r.body)
                    .map_err(|e| format!("GET {full}: not JSON ({e}): {r:?}"))?;
                return Ok((r.status, v));
            }
            Ok(Ok(r)) => last = format!("{r:?}"),
            Ok(Err(e)) => last = format!("transport error {e}"),
            Err(_) => last = "timeout".into(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Err(format!("GET {full}: {last}"))
}

async fn local_get_ok(api: &Api, path: &str) -> Result<Value, String> {
    match local_get(api, path).await? {
        (200, v) => Ok(v),
        (s, v) => Err(format!("GET {path}: {s} {v}")),
    }
}

async fn pages(api: &Api, path: &str, field: &str) -> Result<Vec<Value>, String> {
    let mut out = vec![];
    let mut cursor: Option<String> = None;
    for _ in 0..100_000 {
        let mut p = format!("{path}?limit=100");
        if let Some(c) = &cursor {
            p.push_str(&format!("&cursor={}", crate::harness::urlenc(c)));
        }
        let v = local_get_ok(api, &p).await?;
        out.extend(v[field].as_array().cloned().unwrap_or_default());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(out),
        }
    }
    Err(format!("{path}: paging never ended"))
}

/// Reads everything the checker needs about `model`'s user from node `node`'s replica.
pub async fn read_node_user(api: &Api, node: u64, model: &UserModel) -> NodeUser {
    let u = format!("/v1/users/{}", model.user);
    let t0 = unix_micros();
    let wallet = local_get_ok(api, &format!("{u}/wallet")).await;
    let orders = pages(api, &format!("{u}/orders"), "orders").await;
    let ledger = pages(api, &format!("{u}/ledger"), "entries").await;
    let entitlements = local_get_ok(api, &format!("{u}/entitlements")).await;
    let mut topups = BTreeMap::new();
    for id in model.topups.keys() {
        topups.insert(
            id.clone(),
            local_get_ok(api, &format!("{u}/topups/{id}")).await,
        );
    }
    let mut keys = BTreeMap::new();
    for key in model.keys.keys() {
        keys.insert(
            key.clone(),
            local_get(
                api,
                &format!("{u}/idempotency/{}", crate::harness::urlenc(key)),
            )
            .await,
        );
    }
    NodeUser {
        node,
        read: (t0, unix_micros()),
        wallet,
        orders,
        ledger,
        entitlements,
        topups,
        keys,
    }
}

/// The final state of one user on one node against the model.
pub fn check_final(model: &UserModel, st: &NodeUser) -> Vec<Violation> {
    let mut out = vec![];
    let user = model.user.as_str();
    let node = Some(st.node);
    let mut v = |op: Option<usize>, msg: String| out.push(Violation::user(user, op, node, msg));
    let (t0, t1) = st.read;

    // wallet
    match &st.wallet {
        Ok(w) => {
            if let Err(e) = model.check_wallet(w, t0, t1, "final wallet") {
                v(None, e);
            }
        }
        Err(e) => v(None, format!("final wallet unreadable: {e}")),
    }

    // orders: every acknowledged one, as the model says; none that nobody was told about
    match &st.orders {
        Ok(list) => {
            let mut seen: BTreeMap<String, &Value> = BTreeMap::new();
            for o in list {
                let id = o["order_id"].as_str().unwrap_or("?").to_string();
                if seen.insert(id.clone(), o).is_some() {
                    v(None, format!("order {id} listed twice"));
                }
            }
            for (id, m) in &model.orders {
                match seen.get(id) {
                    None => v(
                        Some(m.op),
                        format!("acknowledged order {id} ({:?}) is missing", m.order.status),
                    ),
                    Some(o) => {
                        if let Err(e) = check_order(m, o, t0, t1, "final order") {
                            v(Some(m.op), e);
                        }
                    }
                }
            }
            for (id, o) in &seen {
                if !model.orders.contains_key(id) {
                    v(
                        None,
                        format!(
                            "order {id} exists but no definite answer created it (applied twice, or applied although refused): {o}"
                        ),
                    );
                }
            }
        }
        Err(e) => v(None, format!("final orders unreadable: {e}")),
    }

    // entitlements
    match &st.entitlements {
        Ok(e) => {
            if let Err(e) = model.check_entitlements(e, "final entitlements") {
                v(None, e);
            }
        }
        Err(e) => v(None, format!("final entitlements unreadable: {e}")),
    }

    // top-ups
    for (id, t) in &model.topups {
        match st.topups.get(id) {
            Some(Ok(got)) => {
                let ok = match &t.state {
                    TopupState::Pending => {
                        (got["status"] == "PENDING" && t.expires_at > t0)
                            || (got["status"] == "EXPIRED" && t.expires_at <= t1)
                    }
                    TopupState::Failed => got["status"] == "FAILED",
                    TopupState::Completed(psp) => {
                        got["status"] == "COMPLETED" && got["psp_payment_id"] == psp.as_str()
                    }
                };
                if !ok {
                    v(
                        t.completed_by,
                        format!("topup {id} is {got} but the model says {:?}", t.state),
                    );
                }
            }
            Some(Err(e)) => v(None, format!("topup {id} unreadable: {e}")),
            None => v(None, format!("topup {id} not read")),
        }
    }

    // stored outcomes
    for (key, (status, body)) in &model.keys {
        match st.keys.get(key) {
            Some(Ok((200, got))) => {
                if got["status"].as_u64() != Some(u64::from(*status)) || got["body"] != *body {
                    v(
                        None,
                        format!(
                            "the stored outcome of key {key} is {} {} but the client's definite answer was {status} {body}",
                            got["status"], got["body"]
                        ),
                    );
                }
            }
            Some(Ok((s, got))) => v(
                None,
                format!("the outcome of key {key} (answered {status}) is not stored: {s} {got}"),
            ),
            Some(Err(e)) => v(None, format!("idempotency lookup of key {key}: {e}")),
            None => v(None, format!("key {key} not looked up")),
        }
    }

    // the ledger
    match &st.ledger {
        Ok(entries) => {
            for e in check_ledger(model, entries, t0, t1) {
                v(None, e);
            }
        }
        Err(e) => v(None, format!("final ledger unreadable: {e}")),
    }
    out
}

/// The ledger: a running balance that is never negative and ends at the wallet; every credit, top-up and
/// refund posted exactly once with its amount, followed by what it repaid of the debt; every order held
/// once, debited once if it was completed (never otherwise), released once if it was cancelled or
/// expired; every reversal posted once (after the debt it lent); every dispute held once and released at
/// most once.
pub fn check_ledger(model: &UserModel, entries: &[Value], t0: i64, t1: i64) -> Vec<String> {
    let mut out = vec![];
    let (mut bal, mut held) = (0i64, 0i64);
    // (ref type, ref id) → [(kind, amount)]
    let mut by_ref: BTreeMap<(String, String), Vec<(String, i64)>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let seq = e["seq"].as_u64();
        if seq != Some(i as u64 + 1) {
            out.push(format!("ledger entry #{i} has seq {seq:?}: {e}"));
        }
        let kind = e["kind"].as_str().unwrap_or("?").to_string();
        let Some(a) = cents_of(&e["amount"]).filter(|a| *a > 0) else {
            out.push(format!("ledger entry with a bad amount: {e}"));
            continue;
        };
        match kind.as_str() {
            "credit" | "refund" | "debt" => bal += a,
            "reversal" | "debt_repaid" => bal -= a,
            "hold" => held += a,
            "release" => held -= a,
            "debit" => {
                bal -= a;
                held -= a
            }
            _ => out.push(format!("ledger entry of unknown kind: {e}")),
        }
        if cents_of(&e["balance_after"]) != Some(bal) || cents_of(&e["held_after"]) != Some(held) {
            out.push(format!(
                "ledger entry {} says balance {} held {} but the entries before it sum to {} / {}",
                i + 1,
                e["balance_after"],
                e["held_after"],
                money(bal),
                money(held)
            ));
        }
        if bal < 0 || held < 0 || held > bal {
            out.push(format!(
                "ledger goes negative (balance {} held {}) at entry {e}",
                money(bal),
                money(held)
            ));
        }
        let r = (
            e["ref"]["type"].as_str().unwrap_or("?").to_string(),
            e["ref"]["id"].as_str().unwrap_or("?").to_string(),
        );
        by_ref.entry(r).or_default().push((kind, a));
    }
    if bal != model.balance() {
        out.push(format!(
            "the ledger sums to a balance of {} but the model says {}",
            money(bal),
            money(model.balance())
        ));
    }
    let (lo, hi) = model.held_range(t0, t1);
    if held < lo || held > hi {
        out.push(format!(
            "the ledger sums to held {} but the pending orders hold between {} and {}",
            money(held),
            money(lo),
            money(hi)
        ));
    }
    let fmt = |v: &[(String, i64)]| -> String {
        v.iter()
            .map(|(k, a)| format!("{k} {}", money(*a)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // disputes' holds (their ref is an internal record id): each held once, released at most once,
    // and what they still hold is what the open disputes hold in the model
    let dispute_refs: Vec<(String, String)> = by_ref
        .keys()
        .filter(|(t, _)| t == "dispute")
        .cloned()
        .collect();
    let mut still_held: Cents = 0;
    for r in dispute_refs {
        let got = by_ref.remove(&r).unwrap_or_default();
        match got.as_slice() {
            [(h, a)] if h == "hold" => still_held += a,
            [(h, a), (rel, b)] if h == "hold" && rel == "release" && a == b => {}
            _ => out.push(format!(
                "dispute {}: ledger has [{}] (want one hold, then at most one release of it)",
                r.1,
                fmt(&got)
            )),
        }
    }
    let model_held: Cents = model.disputes.values().map(|d| d.held).sum();
    if still_held != model_held {
        out.push(format!(
            "the disputes' holds in the ledger sum to {} but the open disputes hold {}",
            money(still_held),
            money(model_held)
        ));
    }
    let mut take = |t: &str, id: &str| {
        by_ref
            .remove(&(t.to_string(), id.to_string()))
            .unwrap_or_default()
    };
    // money coming in repays the debt first: a `debt_repaid` entry right after it
    let came_in = |kind: &str, t: &str, id: &str, amount: Cents| {
        let mut want = vec![(kind.to_string(), amount)];
        if let Some(&repaid) = model.repaid.get(&(t.to_string(), id.to_string())) {
            want.push(("debt_repaid".to_string(), repaid));
        }
        want
    };
    for (id, amount) in &model.credits {
        let got = take("credit", id);
        let want = came_in("credit", "credit", id, *amount);
        if got != want {
            out.push(format!(
                "credit {id} of {}: ledger has [{}] (want exactly [{}])",
                money(*amount),
                fmt(&got),
                fmt(&want)
            ));
        }
    }
    // a reversal: the debt it lent (if any), then the reversal itself, exactly once
    for (id, (amount, debt)) in &model.reversal_postings {
        let got = take("reversal", id);
        let mut want = vec![];
        if *debt > 0 {
            want.push(("debt".to_string(), *debt));
        }
        want.push(("reversal".to_string(), *amount));
        if got != want {
            out.push(format!(
                "reversal {id} of {}: ledger has [{}] (want exactly [{}])",
                money(*amount),
                fmt(&got),
                fmt(&want)
            ));
        }
    }
    for (id, t) in &model.topups {
        let got = take("topup", id);
        let want = match t.state {
            TopupState::Completed(_) => came_in("credit", "topup", id, t.amount),
            _ => vec![],
        };
        if got != want {
            out.push(format!(
                "topup {id} ({:?}, {}): ledger has [{}] (want [{}])",
                t.state,
                money(t.amount),
                fmt(&got),
                fmt(&want)
            ));
        }
    }
    for (id, (_, amount)) in &model.refunds {
        let got = take("refund", id);
        let want = came_in("refund", "refund", id, *amount);
        if got != want {
            out.push(format!(
                "refund {id} of {}: ledger has [{}] (want exactly [{}])",
                money(*amount),
                fmt(&got),
                fmt(&want)
            ));
        }
    }
    for (id, o) in &model.orders {
        let got = take("order", id);
        let count = |k: &str| got.iter().filter(|(kind, _)| kind == k).count();
        let amounts_ok = got.iter().all(|(_, a)| *a == o.order.total);
        let holds = count("hold");
        let debits = count("debit");
        let releases = count("release");
        let want_debits = usize::from(o.order.status.was_completed());
        let ok_release = match o.order.status {
            OrderStatus::CancelledByClient | OrderStatus::Expired => releases == 1,
            OrderStatus::Pending if o.order.expires_at <= t0 => releases == 1,
            OrderStatus::Pending if o.order.expires_at > t1 => releases == 0,
            OrderStatus::Pending => releases <= 1,
            _ => releases == 0,
        };
        if holds != 1
            || debits != want_debits
            || !ok_release
            || !amounts_ok
            || got.len() != holds + debits + releases
        {
            out.push(format!(
                "order {id} ({:?}, total {}): ledger has [{}] (want one hold, {want_debits} debit, and a release iff cancelled)",
                o.order.status,
                money(o.order.total),
                fmt(&got)
            ));
        }
    }
    for ((t, id), got) in by_ref {
        out.push(format!(
            "ledger entries [{}] for {t} {id}, which no definite answer created",
            fmt(&got)
        ));
    }
    out
}

/// The replicas must hold the same user state (`wallet`, orders, ledger, entitlements).
pub fn check_replicas_agree(user: &str, states: &[NodeUser]) -> Vec<Violation> {
    let mut out = vec![];
    let Some(first) = states.first() else {
        return out;
    };
    for st in &states[1..] {
        let pairs: [(&str, String, String); 4] = [
            (
                "wallet",
                format!("{:?}", first.wallet),
                format!("{:?}", st.wallet),
            ),
            (
                "orders",
                format!("{:?}", first.orders),
                format!("{:?}", st.orders),
            ),
            (
                "ledger",
                format!("{:?}", first.ledger),
                format!("{:?}", st.ledger),
            ),
            (
                "entitlements",
                format!("{:?}", first.entitlements),
                format!("{:?}", st.entitlements),
            ),
        ];
        for (what, a, b) in pairs {
            if a != b {
                out.push(Violation::user(
                    user,
                    None,
                    Some(st.node),
                    format!(
                        "replicas differ: the {what} on node {} is not the one on node {}",
                        st.node, first.node
                    ),
                ));
            }
        }
    }
    out
}

/// The ops of `v`'s user around `v`'s op (or its last ops), with every attempt.
pub fn excerpt(v: &Violation, ops: &[Op], t0: i64) -> String {
    let Some(user) = &v.user else {
        return String::new();
    };
    let mine: Vec<&Op> = {
        let mut m: Vec<&Op> = ops.iter().filter(|o| &o.user == user).collect();
        m.sort_by_key(|o| o.id);
        m
    };
    let (from, to) = match v.op.and_then(|id| mine.iter().position(|o| o.id == id)) {
        Some(i) => (i.saturating_sub(6), (i + 3).min(mine.len())),
        None => (mine.len().saturating_sub(10), mine.len()),
    };
    let mut s = format!(
        "  history of user {user} (ops {}..{} of {}):\n",
        from + 1,
        to,
        mine.len()
    );
    for o in &mine[from..to] {
        let mark = if Some(o.id) == v.op { ">>" } else { "  " };
        s.push_str(&format!("  {mark} {}\n", o.describe(t0)));
    }
    s
}

// ------------------------------------------------------------------------------------------------
// The checker must be able to fail: hand-made histories it has to flag.
// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::history::{Attempt, Outcome, Spec};
    use super::*;

    const USER: &str = "u1";

    fn op(id: usize, spec: Spec, path: &str, key: &str, answers: Vec<(u16, Value)>) -> Op {
        let base = 1_000_000_000_000i64 + id as i64 * 1_000_000;
        Op {
            id,
            worker: 0,
            user: USER.into(),
            spec,
            method: "POST",
            path: path.into(),
            key: Some(key.into()),
            body: None,
            senders: answers.len(),
            attempts: answers
                .into_iter()
                .enumerate()
                .map(|(chain, (status, body))| Attempt {
                    chain,
                    node: 1,
                    start: base,
                    end: base + 1000,
                    outcome: Outcome::Definite {
                        status,
                        body,
                        replayed: false,
                    },
                })
                .collect(),
            invoked: base,
            completed: Some(base + 1000),
            resolved_after_run: false,
        }
    }

    fn wallet(balance: &str, held: &str, available: &str) -> Value {
        json!({"currency": "EUR", "balance": balance, "held": held, "available": available})
    }

    fn order_json(id: &str, status: &str, total: &str) -> Value {
        json!({"order_id": id, "status": status, "total": total, "refunded_total": "0.00",
               "lines": [{"item_id": "gems", "quantity": 3, "unit_price": "0.10", "line_total": "0.30", "refunded_quantity": 0}],
               "history": [], "expires_at": "2100-01-01T00:00:00Z"})
    }

    /// A credit of 20.00 and a completed purchase of 3 gems.
    fn history() -> Vec<Op> {
        vec![
            op(
                1,
                Spec::CreateUser,
                "/v1/users",
                "k1",
                vec![(
                    201,
                    json!({"user_id": USER, "wallet": wallet("0.00", "0.00", "0.00")}),
                )],
            ),
            op(
                2,
                Spec::Credit {
                    amount: 2000,
                    external_ref: "r1".into(),
                },
                "/v1/users/u1/credits",
                "k2",
                vec![(
                    201,
                    json!({"credit_id": "c1", "amount": "20.00", "external_ref": "r1", "wallet": wallet("20.00", "0.00", "20.00")}),
                )],
            ),
            op(
                3,
                Spec::Order {
                    lines: vec![("gems".into(), 3)],
                    complete: true,
                    expected_total: None,
                },
                "/v1/users/u1/orders",
                "k3",
                vec![(201, order_json("o1", "COMPLETED", "0.30"))],
            ),
        ]
    }

    fn ledger(with_double_debit: bool) -> Vec<Value> {
        let mut l = vec![
            json!({"seq": 1, "kind": "credit", "amount": "20.00", "balance_after": "20.00", "held_after": "0.00", "ref": {"type": "credit", "id": "c1"}}),
            json!({"seq": 2, "kind": "hold", "amount": "0.30", "balance_after": "20.00", "held_after": "0.30", "ref": {"type": "order", "id": "o1"}}),
            json!({"seq": 3, "kind": "debit", "amount": "0.30", "balance_after": "19.70", "held_after": "0.00", "ref": {"type": "order", "id": "o1"}}),
        ];
        if with_double_debit {
            l.push(json!({"seq": 4, "kind": "hold", "amount": "0.30", "balance_after": "19.70", "held_after": "0.30", "ref": {"type": "order", "id": "o1"}}));
            l.push(json!({"seq": 5, "kind": "debit", "amount": "0.30", "balance_after": "19.40", "held_after": "0.00", "ref": {"type": "order", "id": "o1"}}));
        }
        l
    }

    fn final_state(
        models: &BTreeMap<String, UserModel>,
        balance: &str,
        orders: Vec<Value>,
        ledger: Vec<Value>,
    ) -> NodeUser {
        let m = &models[USER];
        NodeUser {
            node: 1,
            read: (2_000_000_000_000, 2_000_000_001_000),
            wallet: Ok(wallet(balance, "0.00", balance)),
            orders: Ok(orders),
            ledger: Ok(ledger),
            entitlements: Ok(json!({"entitlements": [{"item_id": "gems", "quantity": 3}]})),
            topups: BTreeMap::new(),
            keys: m
                .keys
                .iter()
                .map(|(k, (s, b))| {
                    (
                        k.clone(),
                        Ok((200, json!({"key": k, "status": s, "body": b}))),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn the_checker_accepts_a_correct_history_and_final_state() {
        let ops = history();
        let (models, violations) = replay(&ops);
        assert!(violations.is_empty(), "{violations:?}");
        let st = final_state(
            &models,
            "19.70",
            vec![order_json("o1", "COMPLETED", "0.30")],
            ledger(false),
        );
        let v = check_final(&models[USER], &st);
        assert!(v.is_empty(), "{v:#?}");
    }

    #[test]
    fn the_checker_flags_a_purchase_applied_twice() {
        let ops = history();
        let (models, _) = replay(&ops);
        // the same purchase applied a second time under another order id: charged twice
        let st = final_state(
            &models,
            "19.40",
            vec![
                order_json("o1", "COMPLETED", "0.30"),
                order_json("o2", "COMPLETED", "0.30"),
            ],
            ledger(true),
        );
        let v = check_final(&models[USER], &st);
        let text = v
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains("wallet balance \"19.40\""), "{text}");
        assert!(
            text.contains("order o2 exists but no definite answer created it"),
            "{text}"
        );
        assert!(text.contains("order o1"), "{text}");
    }

    #[test]
    fn the_checker_flags_a_lost_acknowledged_credit() {
        let ops = history();
        let (models, _) = replay(&ops);
        let mut l = ledger(false);
        l.remove(0);
        let st = final_state(
            &models,
            "0.00",
            vec![order_json("o1", "COMPLETED", "0.30")],
            l,
        );
        let v = check_final(&models[USER], &st);
        let text = v
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains("credit c1"), "{text}");
        assert!(text.contains("model says 19.70"), "{text}");
    }

    #[test]
    fn the_checker_flags_answers_the_contract_forbids() {
        let mut ops = history();
        // a game, then the same game again while owned: must have been already_owned
        ops.push(op(
            4,
            Spec::Order {
                lines: vec![("game-x".into(), 1)],
                complete: true,
                expected_total: None,
            },
            "/v1/users/u1/orders",
            "k4",
            vec![(
                201,
                json!({"order_id": "o9", "status": "COMPLETED", "total": "9.99"}),
            )],
        ));
        ops.push(op(
            5,
            Spec::Order {
                lines: vec![("game-x".into(), 1)],
                complete: true,
                expected_total: None,
            },
            "/v1/users/u1/orders",
            "k5",
            vec![(
                201,
                json!({"order_id": "o10", "status": "COMPLETED", "total": "9.99"}),
            )],
        ));
        // a purchase the wallet cannot pay for, accepted
        ops.push(op(
            9,
            Spec::Order {
                lines: vec![("coins".into(), 1000)],
                complete: true,
                expected_total: None,
            },
            "/v1/users/u1/orders",
            "k9",
            vec![(
                201,
                json!({"order_id": "o11", "status": "COMPLETED", "total": "250.00"}),
            )],
        ));
        // two senders of one key with different answers
        ops.push(op(
            6,
            Spec::Credit { amount: 100, external_ref: "r2".into() },
            "/v1/users/u1/credits",
            "k6",
            vec![
                (201, json!({"credit_id": "c2", "amount": "1.00", "external_ref": "r2", "wallet": wallet("1.00", "0.00", "1.00")})),
                (201, json!({"credit_id": "c3", "amount": "1.00", "external_ref": "r2", "wallet": wallet("2.00", "0.00", "2.00")})),
            ],
        ));
        // a key reused with another body that took effect
        ops.push(op(
            7,
            Spec::KeyReuse { of: 2 },
            "/v1/users/u1/credits",
            "k2",
            vec![(201, json!({"credit_id": "c4"}))],
        ));
        // unresolved
        let mut unresolved = op(
            8,
            Spec::Credit {
                amount: 100,
                external_ref: "r3".into(),
            },
            "/v1/users/u1/credits",
            "k8",
            vec![],
        );
        unresolved.senders = 1;
        unresolved.attempts.push(Attempt {
            chain: 0,
            node: 2,
            start: 0,
            end: 1,
            outcome: Outcome::Unknown("timeout".into()),
        });
        ops.push(unresolved);
        let (_, v) = replay(&ops);
        let text = v
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.contains("already_owned") || text.contains("owned or pending"),
            "second game: {text}"
        );
        assert!(text.contains("different answers"), "{text}");
        assert!(text.contains("idempotency_key_reused"), "{text}");
        assert!(text.contains("never got a definite answer"), "{text}");
        assert!(v.iter().any(|x| x.op == Some(5)), "{text}");
        assert!(
            v.iter()
                .any(|x| x.op == Some(9) && x.msg.contains("available")),
            "{text}"
        );
    }
}
