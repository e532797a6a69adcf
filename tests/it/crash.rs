//! Crash safety: SIGKILL under write load loses nothing acknowledged and duplicates nothing on retry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

#[derive(Clone, Debug)]
struct Op {
    user: String,
    path: String,
    key: String,
    body: Value,
    is_credit: bool,
}

#[derive(Debug)]
struct Outcome {
    op: Op,
    /// `Some((status, body))` when the server answered with a definite outcome (< 500); `None` when unknown.
    answer: Option<(u16, Value)>,
}

const GEM_CENTS: i64 = 10;

/// One user's load: credit 1.00, then buy 1–3 gems (complete), repeat until the server goes away.
async fn user_load(api: Api, user: String, acks: Arc<AtomicUsize>, round: usize) -> Vec<Outcome> {
    let mut out = vec![];
    for i in 0.. {
        let op = if i % 2 == 0 {
            Op {
                user: user.clone(),
                path: format!("/v1/users/{user}/credits"),
                key: new_key(),
                body: json!({"amount": "1.00", "external_ref": format!("crash-{round}-{user}-{i}"), "source": "card"}),
                is_credit: true,
            }
        } else {
            Op {
                user: user.clone(),
                path: format!("/v1/users/{user}/orders"),
                key: new_key(),
                body: order_body(&[("gems", (i % 3 + 1) as u32)], true),
                is_credit: false,
            }
        };
        let r = api
            .call(reqwest::Method::POST, &op.path)
            .auth(Auth::Service)
            .key(&op.key)
            .json(&op.body)
            .try_send()
            .await;
        match r {
            Ok(r) if r.status < 500 => {
                assert!(r.is_success(), "unexpected refusal under load: {r:?}");
                acks.fetch_add(1, Ordering::Relaxed);
                out.push(Outcome {
                    op,
                    answer: Some((r.status, r.json())),
                });
            }
            Ok(_) | Err(_) => {
                // The server is going away: this one's fate is unknown. Stop this user here so that it has at
                // most one unknown request.
                out.push(Outcome { op, answer: None });
                return out;
            }
        }
    }
    unreachable!()
}

/// The effect of one applied outcome on the user's balance, and the order it created.
fn effect(op: &Op, status: u16, body: &Value) -> (i64, Option<String>) {
    if !(200..300).contains(&status) {
        return (0, None);
    }
    if op.is_credit {
        (money_of(&body["amount"]), None)
    } else {
        assert_eq!(body["status"], "COMPLETED", "{body}");
        (
            -money_of(&body["total"]),
            Some(body["order_id"].as_str().unwrap().to_string()),
        )
    }
}

/// After a restart: every definite outcome is stored as it was answered; unknown ones are resolved by lookup.
/// Returns the resolved (status, body) of every op, or None for ops that did not happen.
async fn verify(srv: &Server, outcomes: &[Outcome]) -> Vec<Option<(u16, Value)>> {
    let mut resolved = vec![];
    for o in outcomes {
        let r = srv
            .get(
                &format!("/v1/users/{}/idempotency/{}", o.op.user, o.op.key),
                Auth::Service,
            )
            .await;
        match &o.answer {
            Some((status, body)) => {
                let l = r.expect(200);
                assert_eq!(
                    l["status"], *status,
                    "acknowledged op {:?} stored with another status: {l}",
                    o.op
                );
                assert_eq!(
                    &l["body"], body,
                    "acknowledged op {:?} stored with another body",
                    o.op
                );
                resolved.push(Some((*status, body.clone())));
            }
            None => match r.status {
                200 => {
                    let l = r.json();
                    resolved.push(Some((
                        l["status"].as_u64().unwrap() as u16,
                        l["body"].clone(),
                    )));
                }
                _ => {
                    r.expect_error(404, "not_found");
                    resolved.push(None);
                }
            },
        }
    }
    resolved
}

/// Balances and order sets must equal what the resolved outcomes say, on top of `base`.
async fn check_books(
    srv: &Server,
    users: &[String],
    base: &BTreeMap<String, i64>,
    outcomes: &[Outcome],
    resolved: &[Option<(u16, Value)>],
) {
    let mut balance: BTreeMap<String, i64> = base.clone();
    let mut orders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (o, r) in outcomes.iter().zip(resolved) {
        if let Some((status, body)) = r {
            let (delta, order) = effect(&o.op, *status, body);
            *balance.entry(o.op.user.clone()).or_default() += delta;
            if let Some(id) = order {
                orders.entry(o.op.user.clone()).or_default().insert(id);
            }
        }
    }
    for u in users {
        let w = srv.wallet(u).await;
        assert_eq!(
            w.balance, balance[u],
            "{u}: balance differs from the sum of acknowledged effects"
        );
        assert_eq!(w.held, 0, "{u}");
        let listed: BTreeSet<String> = srv
            .all_orders(u, "")
            .await
            .iter()
            .map(|o| o["order_id"].as_str().unwrap().to_string())
            .collect();
        let want = orders.get(u).cloned().unwrap_or_default();
        assert!(
            want.is_subset(&listed),
            "{u}: acknowledged orders missing after restart"
        );
        let created_before: BTreeSet<String> = listed.difference(&want).cloned().collect();
        for id in created_before {
            // only orders of earlier rounds may be extra; they are already counted in `base`
            let o = srv.get_order(u, &id).await;
            assert_eq!(o["status"], "COMPLETED");
        }
    }
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_and_retries_apply_once() {
    let mut srv = Server::start_with(Opts::new().shards(4).idempotency_ttl("7d")).await;
    srv.create_item("gems", "currency", &money(GEM_CENTS)).await;
    let users: Vec<String> = (0..8).map(|i| format!("crash{i}")).collect();
    for u in &users {
        srv.create_user(u).await;
    }
    let mut base: BTreeMap<String, i64> = users.iter().map(|u| (u.clone(), 0)).collect();
    let mut known_orders: BTreeMap<String, usize> = BTreeMap::new();

    for round in 0..2 {
        let acks = Arc::new(AtomicUsize::new(0));
        let api = srv.api();
        let tasks: Vec<_> = users
            .iter()
            .map(|u| tokio::spawn(user_load(api.clone(), u.clone(), acks.clone(), round)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while acks.load(Ordering::Relaxed) < 80 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        srv.kill9();
        let mut outcomes = vec![];
        for t in tasks {
            outcomes.extend(t.await.unwrap());
        }
        let acked = outcomes.iter().filter(|o| o.answer.is_some()).count();
        assert!(
            acked >= 40,
            "load too slow to test anything: {acked} acknowledged"
        );

        srv.restart().await;
        let resolved = verify(&srv, &outcomes).await;
        let unknown = outcomes.iter().filter(|o| o.answer.is_none()).count();
        let unknown_applied = outcomes
            .iter()
            .zip(&resolved)
            .filter(|(o, r)| o.answer.is_none() && r.is_some())
            .count();
        eprintln!(
            "crash round {round}: {acked} acknowledged, {unknown} unknown ({unknown_applied} of them applied)"
        );
        check_books(&srv, &users, &base, &outcomes, &resolved).await;

        // Retry every unknown request with its key: one effect each.
        for (o, r) in outcomes.iter().zip(&resolved) {
            if o.answer.is_some() {
                continue;
            }
            let again = srv
                .post_key(&o.op.path, Auth::Service, &o.op.key, &o.op.body)
                .await;
            match r {
                Some((status, body)) => {
                    assert_eq!(again.status, *status, "{again:?}");
                    assert_eq!(&again.json(), body);
                    assert!(again.replayed(), "{again:?}");
                }
                None => {
                    assert!(!again.replayed(), "{again:?}");
                    assert!(again.is_success(), "{again:?}");
                }
            }
            let twice = srv
                .post_key(&o.op.path, Auth::Service, &o.op.key, &o.op.body)
                .await;
            assert_eq!(twice.body, again.body);
            assert!(twice.replayed());
        }
        // Now every op is definite: recheck the books with everything resolved.
        let resolved = verify(&srv, &outcomes).await;
        assert!(
            resolved.iter().all(|r| r.is_some()),
            "a retried request left no outcome"
        );
        check_books(&srv, &users, &base, &outcomes, &resolved).await;

        // Carry the totals into the next round.
        for (o, r) in outcomes.iter().zip(&resolved) {
            let (status, body) = r.as_ref().unwrap();
            let (delta, order) = effect(&o.op, *status, body);
            *base.get_mut(&o.op.user).unwrap() += delta;
            if order.is_some() {
                *known_orders.entry(o.op.user.clone()).or_default() += 1;
            }
        }
        for u in &users {
            assert_eq!(
                srv.all_orders(u, "").await.len(),
                known_orders.get(u).copied().unwrap_or(0),
                "{u}"
            );
        }
    }
    // Gems granted equal gems bought.
    for u in &users {
        let orders = srv.all_orders(u, "").await;
        let bought: i64 = orders
            .iter()
            .map(|o| o["lines"][0]["quantity"].as_i64().unwrap())
            .sum();
        assert_eq!(srv.entitlement_qty(u, "gems").await, bought, "{u}");
    }
}

#[tokio::test]
async fn pending_orders_expire_across_a_crash() {
    let mut srv = Server::start_with(Opts::new().order_ttl("1s").sweep_interval("200ms")).await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("pc", "10.00").await;
    let o = srv.order("pc", &[("gems", 4)], false).await;
    let id = o["order_id"].as_str().unwrap().to_string();
    assert_eq!(srv.wallet("pc").await.held, 400);
    srv.kill9();
    sleep_until(ts(&o["expires_at"]), Duration::from_millis(100)).await;
    srv.restart().await;
    assert_eq!(
        srv.wallet("pc").await,
        Wallet {
            balance: 1000,
            held: 0,
            available: 1000
        }
    );
    srv.complete_order("pc", &id, Auth::Service)
        .await
        .expect_error(409, "order_expired");
    let got = srv.get_order("pc", &id).await;
    assert_eq!(got["status"], "CANCELLED");
    assert_eq!(
        got["history"].as_array().unwrap().last().unwrap()["reason"],
        "expired"
    );
    srv.audit_ok().await;
}

#[tokio::test]
async fn sigkill_right_after_an_acknowledged_write_loses_nothing() {
    let mut srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    for i in 0..5 {
        let u = format!("k{i}");
        srv.funded_user(&u, "3.00").await;
        let o = srv.order(&u, &[("gems", 2)], true).await;
        srv.kill9();
        srv.restart().await;
        assert_eq!(srv.get_order(&u, o["order_id"].as_str().unwrap()).await, o);
        assert_eq!(srv.wallet(&u).await.balance, 100);
        assert_eq!(srv.entitlement_qty(&u, "gems").await, 2);
    }
    srv.audit_ok().await;
}
