//! Races: concurrent purchases, duplicates, complete-vs-cancel, refunds, consumes.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::json;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_purchases_with_funds_for_ten_yield_exactly_ten() {
    let srv = Server::start().await;
    for i in 0..50 {
        srv.create_item(&format!("g{i:02}"), "game", "1.00").await;
    }
    srv.funded_user("racer", "10.00").await;
    let api = srv.api();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                api.create_order("racer", &[(&format!("g{i:02}"), 1)], true)
                    .await
            })
        })
        .collect();
    let mut by_outcome: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 201 {
            assert_eq!(r.json()["status"], "COMPLETED");
        } else {
            r.expect_error(409, "insufficient_funds");
        }
        *by_outcome
            .entry((r.status, r.code().unwrap_or_default()))
            .or_default() += 1;
    }
    let expect: BTreeMap<(u16, String), usize> = [
        ((201, String::new()), 10),
        ((409, "insufficient_funds".to_string()), 40),
    ]
    .into();
    assert_eq!(by_outcome, expect);
    assert_eq!(
        srv.wallet("racer").await,
        Wallet {
            balance: 0,
            held: 0,
            available: 0
        }
    );
    let ents = srv.entitlements("racer").await;
    assert_eq!(ents.len(), 10, "{ents:#?}");
    assert!(ents.iter().all(|e| e["quantity"] == 1));
    let orders = srv.all_orders("racer", "").await;
    assert_eq!(orders.len(), 10);
    assert!(orders.iter().all(|o| o["status"] == "COMPLETED"));
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_pending_orders_hold_no_more_than_the_balance() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("holder", "10.00").await;
    let responses = srv
        .concurrent_orders("holder", &[("gems", 1)], false, 50)
        .await;
    let ok = created_else_error(&responses, 409, "insufficient_funds");
    assert_eq!(ok, 10);
    assert_eq!(
        srv.wallet("holder").await,
        Wallet {
            balance: 1000,
            held: 1000,
            available: 0
        }
    );
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_duplicates_with_one_key_have_one_effect() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("dupe", "10.00").await;
    let api = srv.api();
    let key = new_key();
    let body = order_body(&[("gems", 1)], true);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (api, key, body) = (api.clone(), key.clone(), body.clone());
            tokio::spawn(async move {
                api.post_key("/v1/users/dupe/orders", Auth::Service, &key, &body)
                    .await
            })
        })
        .collect();
    let mut resps = vec![];
    for t in tasks {
        resps.push(t.await.unwrap());
    }
    let first = &resps[0];
    assert_eq!(first.status, 201, "{first:?}");
    for r in &resps {
        assert_eq!(r.status, first.status, "{r:?}");
        assert_eq!(r.body, first.body, "bodies differ: {r:?} vs {first:?}");
    }
    let fresh = resps.iter().filter(|r| !r.replayed()).count();
    assert!(fresh <= 1, "{fresh} responses claim to be the original");
    assert_eq!(srv.all_orders("dupe", "").await.len(), 1);
    assert_eq!(
        srv.wallet("dupe").await,
        Wallet {
            balance: 900,
            held: 0,
            available: 900
        }
    );
    assert_eq!(srv.entitlement_qty("dupe", "gems").await, 1);
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicate_credits_credit_once() {
    let srv = Server::start().await;
    srv.create_user("dc").await;
    let api = srv.api();
    let key = new_key();
    let body = json!({"amount": "7.00", "external_ref": "dc-1", "source": "card"});
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let (api, key, body) = (api.clone(), key.clone(), body.clone());
            tokio::spawn(async move {
                api.post_key("/v1/users/dc/credits", Auth::Service, &key, &body)
                    .await
            })
        })
        .collect();
    let mut bodies = vec![];
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "bodies differ");
    // Same external_ref under many other keys at once: still one credit.
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let (api, body) = (api.clone(), body.clone());
            tokio::spawn(
                async move { api.post("/v1/users/dc/credits", Auth::Service, &body).await },
            )
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(matches!(r.status, 200 | 201), "{r:?}");
    }
    assert_eq!(srv.wallet("dc").await.balance, 700);
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_complete_and_cancel_have_exactly_one_winner() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("cc", "20.00").await;
    let api = srv.api();
    let mut orders = vec![];
    for _ in 0..10 {
        orders.push(
            srv.order("cc", &[("gems", 1)], false).await["order_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut tasks = vec![];
    for id in &orders {
        let (a, b) = (api.clone(), api.clone());
        let (ia, ib) = (id.clone(), id.clone());
        tasks.push((
            tokio::spawn(async move { a.complete_order("cc", &ia, Auth::Service).await }),
            tokio::spawn(async move { b.cancel_order("cc", &ib, Auth::Service).await }),
        ));
    }
    let mut completed = 0;
    for (id, (c, x)) in orders.iter().zip(tasks) {
        let (c, x) = (c.await.unwrap(), x.await.unwrap());
        let final_status = srv.get_order("cc", id).await["status"]
            .as_str()
            .unwrap()
            .to_string();
        match final_status.as_str() {
            "COMPLETED" => {
                completed += 1;
                assert_eq!(c.status, 200, "{c:?}");
                x.expect_error(409, "invalid_state");
            }
            "CANCELLED" => {
                assert_eq!(x.status, 200, "{x:?}");
                c.expect_error(409, "invalid_state");
            }
            s => panic!("order ended {s}"),
        }
    }
    let w = srv.wallet("cc").await;
    assert_eq!(
        w,
        Wallet {
            balance: 2000 - completed * 100,
            held: 0,
            available: 2000 - completed * 100
        }
    );
    assert_eq!(srv.entitlement_qty("cc", "gems").await, completed);
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_partial_refunds_never_exceed_the_purchase() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("cr", "20.00").await;
    let o = srv.order("cr", &[("gems", 10)], true).await;
    let id = o["order_id"].as_str().unwrap().to_string();
    let api = srv.api();
    let tasks: Vec<_> = (0..25)
        .map(|_| {
            let (api, id) = (api.clone(), id.clone());
            tokio::spawn(async move {
                api.refund(
                    "cr",
                    &id,
                    Auth::Service,
                    &json!({"lines": [{"item_id": "gems", "quantity": 1}]}),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            201 => ok += 1,
            _ => {
                assert_eq!(r.status, 409, "{r:?}");
                let code = r.code().unwrap_or_default();
                assert!(
                    code == "refund_exceeds_purchase" || code == "invalid_state",
                    "{r:?}"
                );
            }
        }
    }
    assert_eq!(ok, 10);
    let got = srv.get_order("cr", &id).await;
    assert_eq!(got["status"], "REFUNDED");
    assert_eq!(got["refunded_total"], "10.00");
    assert_eq!(srv.wallet("cr").await.balance, 2000);
    assert_eq!(srv.entitlement_qty("cr", "gems").await, 0);
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_consumes_never_go_below_zero() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("cu", "20.00").await;
    srv.order("cu", &[("gems", 10)], true).await;
    let api = srv.api();
    let tasks: Vec<_> = (0..25)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.consume("cu", "gems", Auth::Service, json!(1)).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 200 {
            ok += 1;
        } else {
            r.expect_error(409, "insufficient_entitlement");
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(srv.entitlement_qty("cu", "gems").await, 0);
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_skin_purchases_grant_it_once() {
    let srv = Server::start().await;
    srv.create_item("skin", "skin", "1.00").await;
    srv.funded_user("sk", "20.00").await;
    let responses = srv.concurrent_orders("sk", &[("skin", 1)], true, 20).await;
    let ok = created_else_error(&responses, 409, "already_owned");
    assert_eq!(ok, 1);
    assert_eq!(srv.wallet("sk").await.balance, 1900);
    assert_eq!(srv.entitlement_qty("sk", "skin").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_load_over_many_users_keeps_the_books_balanced() {
    let srv = Server::start_with(Opts::new().shards(4)).await;
    srv.create_item("gems", "currency", "0.25").await;
    srv.create_item("skin", "skin", "1.50").await;
    let users: Vec<String> = (0..8).map(|i| format!("mx{i}")).collect();
    for u in &users {
        srv.funded_user(u, "5.00").await;
    }
    let api = srv.api();
    let mut tasks = vec![];
    for u in &users {
        for j in 0..6 {
            let (api, u) = (api.clone(), u.clone());
            tasks.push(tokio::spawn(async move {
                match j % 3 {
                    0 => {
                        api.call(Method::POST, &format!("/v1/users/{u}/credits"))
                            .auth(Auth::Service)
                            .fresh_key()
                            .json(&json!({"amount": "1.00", "external_ref": format!("{u}-{j}"), "source": "card"}))
                            .send()
                            .await
                    }
                    1 => api.create_order(&u, &[("gems", 3)], true).await,
                    _ => api.create_order(&u, &[("skin", 1)], false).await,
                }
            }));
        }
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.status == 201 || r.status == 409, "{r:?}");
    }
    for u in &users {
        let w = srv.wallet(u).await;
        let orders = srv.all_orders(u, "").await;
        let spent: i64 = orders
            .iter()
            .filter(|o| o["status"] == "COMPLETED")
            .map(|o| money_of(&o["total"]))
            .sum();
        let held: i64 = orders
            .iter()
            .filter(|o| o["status"] == "PENDING")
            .map(|o| money_of(&o["total"]))
            .sum();
        assert_eq!(w.balance, 500 + 200 - spent, "{u}");
        assert_eq!(w.held, held, "{u}");
        assert!(
            orders
                .iter()
                .filter(|o| o["lines"][0]["item_id"] == "skin")
                .count()
                <= 1,
            "{u} has two skin orders"
        );
    }
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_completes_of_one_order_debit_once() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("c1", "10.00").await;
    let o = srv.order("c1", &[("gems", 3)], false).await;
    let id = o["order_id"].as_str().unwrap().to_string();
    let api = srv.api();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (api, id) = (api.clone(), id.clone());
            tokio::spawn(async move { api.complete_order("c1", &id, Auth::Service).await })
        })
        .collect();
    let mut bodies = vec![];
    for t in tasks {
        bodies.push(t.await.unwrap().expect(200));
    }
    assert!(bodies.iter().all(|b| b == &bodies[0]), "completes disagree");
    assert_eq!(bodies[0]["status"], "COMPLETED");
    assert_eq!(
        srv.wallet("c1").await,
        Wallet {
            balance: 700,
            held: 0,
            available: 700
        }
    );
    assert_eq!(srv.entitlement_qty("c1", "gems").await, 3);
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pending_orders_respect_the_pending_limit() {
    let srv = Server::start_with(Opts::new().max_pending_orders(5)).await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("pl", "100.00").await;
    let responses = srv.concurrent_orders("pl", &[("gems", 1)], false, 20).await;
    let ok = created_else_error(&responses, 409, "too_many_pending_orders");
    assert_eq!(ok, 5);
    assert_eq!(srv.wallet("pl").await.held, 500);
    assert_eq!(srv.all_orders("pl", "status=PENDING").await.len(), 5);
}

/// An answered write is found by the next request, whatever else is in flight: each of 16 clients creates
/// users and, at once, credits and reads each one three times (the credit reads the user first: four
/// reads race).
/// A shard answers a batch before it commits the transaction holding it (`state::held`), and every read
/// commits that transaction first: two readers at once must both find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_created_user_is_found_at_once_while_sixteen_clients_write() {
    let srv = Server::start().await;
    let api = srv.api();
    let tasks: Vec<_> = (0..16)
        .map(|client| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut missed = Vec::new();
                for i in 0..64 {
                    let user = format!("seen-{client}-{i}");
                    api.create_user(&user).await;
                    let body = json!({"amount": "1.00", "external_ref": format!("seen-{user}")});
                    let credits = format!("/v1/users/{user}/credits");
                    let (user_path, wallet_path) = (
                        format!("/v1/users/{user}"),
                        format!("/v1/users/{user}/wallet"),
                    );
                    let (credit, read, wallet, again) = tokio::join!(
                        api.post(&credits, Auth::Service, &body),
                        api.get(&user_path, Auth::Service),
                        api.get(&wallet_path, Auth::Service),
                        api.get(&user_path, Auth::Service),
                    );
                    let statuses = [credit.status, read.status, wallet.status, again.status];
                    if statuses != [201, 200, 200, 200] {
                        missed.push((user, statuses));
                    }
                }
                missed
            })
        })
        .collect();
    let mut missed = Vec::new();
    for task in tasks {
        missed.extend(task.await.expect("a client task panicked"));
    }
    assert!(
        missed.is_empty(),
        "{} of 1,024 users not found right after their creation (user, [credit, user, wallet, user]): {:?}",
        missed.len(),
        &missed[..missed.len().min(5)]
    );
    srv.audit_ok().await;
}
