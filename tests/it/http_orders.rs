//! Orders: create (hold), complete (debit + grant), cancel, expiry, listing.

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::harness::*;

/// A shop with a skin (4.99), a game (10.00) and gems (1.99), and a user with `balance`.
async fn shop(srv: &Server, user: &str, balance: &str) {
    srv.create_item("dragon-skin", "skin", "4.99").await;
    srv.create_item("space-game", "game", "10.00").await;
    srv.create_item("gems-100", "currency", "1.99").await;
    srv.funded_user(user, balance).await;
}

fn statuses(order: &Value) -> Vec<String> {
    order["history"]
        .as_array()
        .expect("history array")
        .iter()
        .map(|h| h["status"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn pending_order_holds_its_total_and_has_the_contract_shape() {
    let srv = Server::start().await;
    shop(&srv, "p1", "20.00").await;
    let before = OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let o = srv
        .post(
            "/v1/users/p1/orders",
            Auth::Service,
            &json!({"lines": [{"item_id": "dragon-skin", "quantity": 1}, {"item_id": "gems-100", "quantity": 3}],
                    "expected_total": "10.96", "complete": false}),
        )
        .await
        .expect(201);
    assert_uuid_v7(&o["order_id"]);
    assert_eq!(o["user_id"], "p1");
    assert_eq!(o["status"], "PENDING");
    assert_eq!(o["currency"], "EUR");
    assert_includes(
        &o["lines"],
        &json!([
            {"item_id": "dragon-skin", "quantity": 1, "unit_price": "4.99", "line_total": "4.99", "refunded_quantity": 0},
            {"item_id": "gems-100", "quantity": 3, "unit_price": "1.99", "line_total": "5.97", "refunded_quantity": 0}
        ]),
    );
    assert_eq!(o["total"], "10.96");
    assert_eq!(o["refunded_total"], "0.00");
    let created = ts(&o["created_at"]);
    assert!(created >= before);
    let expires = ts(&o["expires_at"]);
    let ttl = (expires - created).whole_seconds();
    assert!(
        (890..=910).contains(&ttl),
        "default order ttl is 15 min, got {ttl} s: {o}"
    );
    let h = o["history"].as_array().unwrap();
    assert_eq!(h.len(), 1, "{o}");
    assert_eq!(h[0]["status"], "PENDING");
    ts(&h[0]["at"]);

    assert_eq!(
        srv.wallet("p1").await,
        Wallet {
            balance: 2000,
            held: 1096,
            available: 904
        }
    );
    let got = srv.get_order("p1", o["order_id"].as_str().unwrap()).await;
    assert_eq!(got, o);
    assert_eq!(
        srv.entitlements("p1").await,
        Vec::<Value>::new(),
        "nothing granted while PENDING"
    );
}

#[tokio::test]
async fn completing_an_order_debits_the_wallet_and_grants_entitlements() {
    let srv = Server::start().await;
    shop(&srv, "p2", "20.00").await;
    let o = srv
        .order("p2", &[("dragon-skin", 1), ("gems-100", 3)], false)
        .await;
    let id = o["order_id"].as_str().unwrap();
    let tok = srv.user_token("p2").await;
    let c = srv
        .complete_order("p2", id, Auth::user(&tok))
        .await
        .expect(200);
    assert_eq!(c["status"], "COMPLETED");
    assert_eq!(statuses(&c), ["PENDING", "COMPLETED"]);
    assert_eq!(c["total"], "10.96");
    assert_eq!(
        srv.wallet("p2").await,
        Wallet {
            balance: 904,
            held: 0,
            available: 904
        }
    );
    let ents = srv.entitlements("p2").await;
    assert_eq!(ents.len(), 2, "{ents:#?}");
    let skin = ents
        .iter()
        .find(|e| e["item_id"] == "dragon-skin")
        .expect("skin granted");
    assert_eq!(skin["kind"], "skin");
    assert_eq!(skin["quantity"], 1);
    ts(&skin["granted_at"]);
    let gems = ents
        .iter()
        .find(|e| e["item_id"] == "gems-100")
        .expect("gems granted");
    assert_eq!(gems["kind"], "currency");
    assert_eq!(gems["quantity"], 3);
    srv.audit_ok().await;
}

#[tokio::test]
async fn complete_true_creates_and_completes_in_one_step() {
    let srv = Server::start().await;
    shop(&srv, "p3", "20.00").await;
    let o = srv.order("p3", &[("space-game", 1)], true).await;
    assert_eq!(o["status"], "COMPLETED");
    assert_eq!(statuses(&o), ["PENDING", "COMPLETED"]);
    assert_eq!(
        srv.wallet("p3").await,
        Wallet {
            balance: 1000,
            held: 0,
            available: 1000
        }
    );
    assert_eq!(srv.entitlement_qty("p3", "space-game").await, 1);
    assert_eq!(
        srv.get_order("p3", o["order_id"].as_str().unwrap()).await,
        o
    );
}

#[tokio::test]
async fn completing_a_completed_order_returns_it_unchanged() {
    let srv = Server::start().await;
    shop(&srv, "p4", "20.00").await;
    let o = srv.order("p4", &[("gems-100", 2)], false).await;
    let id = o["order_id"].as_str().unwrap();
    let first = srv
        .complete_order("p4", id, Auth::Service)
        .await
        .expect(200);
    let second = srv
        .complete_order("p4", id, Auth::Service)
        .await
        .expect(200);
    assert_eq!(second, first);
    assert_eq!(srv.wallet("p4").await.balance, 2000 - 398);
    assert_eq!(srv.entitlement_qty("p4", "gems-100").await, 2);
}

#[tokio::test]
async fn cancelling_a_pending_order_releases_the_hold() {
    let srv = Server::start().await;
    shop(&srv, "p5", "20.00").await;
    let o = srv.order("p5", &[("space-game", 1)], false).await;
    let id = o["order_id"].as_str().unwrap();
    assert_eq!(srv.wallet("p5").await.held, 1000);
    let tok = srv.user_token("p5").await;
    let c = srv
        .cancel_order("p5", id, Auth::user(&tok))
        .await
        .expect(200);
    assert_eq!(c["status"], "CANCELLED");
    let last = c["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["status"], "CANCELLED");
    assert_eq!(last["reason"], "cancelled_by_client");
    assert_eq!(
        srv.wallet("p5").await,
        Wallet {
            balance: 2000,
            held: 0,
            available: 2000
        }
    );
    // Cancelling again returns it unchanged.
    let again = srv.cancel_order("p5", id, Auth::Service).await.expect(200);
    assert_eq!(again, c);
    // Completing a client-cancelled order is invalid_state.
    srv.complete_order("p5", id, Auth::Service)
        .await
        .expect_error(409, "invalid_state");
    assert_eq!(srv.entitlement_qty("p5", "space-game").await, 0);
    assert_eq!(srv.wallet("p5").await.balance, 2000);
    // The game can be bought again: a cancelled order does not make it owned.
    srv.order("p5", &[("space-game", 1)], true).await;
}

#[tokio::test]
async fn cancelling_a_completed_or_refunded_order_is_invalid_state() {
    let srv = Server::start().await;
    shop(&srv, "p6", "20.00").await;
    let o = srv.order("p6", &[("gems-100", 1)], true).await;
    let id = o["order_id"].as_str().unwrap();
    srv.cancel_order("p6", id, Auth::Service)
        .await
        .expect_error(409, "invalid_state");
    srv.refund(
        "p6",
        id,
        Auth::Service,
        &json!({"reason": "customer_request"}),
    )
    .await
    .expect(201);
    srv.cancel_order("p6", id, Auth::Service)
        .await
        .expect_error(409, "invalid_state");
    // Completing a refunded order returns it unchanged.
    let c = srv
        .complete_order("p6", id, Auth::Service)
        .await
        .expect(200);
    assert_eq!(c["status"], "REFUNDED");
    assert_eq!(srv.wallet("p6").await.balance, 2000);
}

#[tokio::test]
async fn insufficient_funds_creates_nothing() {
    let srv = Server::start().await;
    shop(&srv, "p7", "9.99").await;
    let e = srv
        .create_order("p7", &[("space-game", 1)], true)
        .await
        .expect_error(409, "insufficient_funds");
    assert!(e["details"].is_object() || e["details"].is_null());
    srv.create_order("p7", &[("space-game", 1)], false)
        .await
        .expect_error(409, "insufficient_funds");
    assert_eq!(
        srv.wallet("p7").await,
        Wallet {
            balance: 999,
            held: 0,
            available: 999
        }
    );
    assert!(srv.all_orders("p7", "").await.is_empty());
    // Held money is not available.
    srv.order("p7", &[("gems-100", 5)], false).await; // 9.95 held
    srv.create_order("p7", &[("gems-100", 1)], false)
        .await
        .expect_error(409, "insufficient_funds");
    assert_eq!(
        srv.wallet("p7").await,
        Wallet {
            balance: 999,
            held: 995,
            available: 4
        }
    );
}

#[tokio::test]
async fn expected_total_mismatch_is_price_changed_with_current_total() {
    let srv = Server::start().await;
    shop(&srv, "p8", "50.00").await;
    let body = |exp: &str| {
        json!({"lines": [{"item_id": "dragon-skin", "quantity": 1}, {"item_id": "gems-100", "quantity": 3}],
               "expected_total": exp})
    };
    let e = srv
        .post("/v1/users/p8/orders", Auth::Service, &body("9.99"))
        .await
        .expect_error(409, "price_changed");
    assert!(
        e["details"].to_string().contains("10.96"),
        "details must carry the current total: {e}"
    );
    assert_eq!(srv.wallet("p8").await.held, 0);
    assert!(srv.all_orders("p8", "").await.is_empty());
    // After a price change, the old total is refused and the new one accepted.
    srv.create_item("gems-100", "currency", "2.49").await;
    srv.post("/v1/users/p8/orders", Auth::Service, &body("10.96"))
        .await
        .expect_error(409, "price_changed");
    let o = srv
        .post("/v1/users/p8/orders", Auth::Service, &body("12.46"))
        .await
        .expect(201);
    assert_eq!(o["total"], "12.46");
}

#[tokio::test]
async fn server_prices_are_used_and_kept_on_the_order() {
    let srv = Server::start().await;
    shop(&srv, "p9", "50.00").await;
    let o = srv.order("p9", &[("gems-100", 2)], false).await;
    assert_eq!(o["total"], "3.98");
    // The price changes while the order is pending: the order keeps its prices.
    srv.create_item("gems-100", "currency", "5.00").await;
    let c = srv
        .complete_order("p9", o["order_id"].as_str().unwrap(), Auth::Service)
        .await
        .expect(200);
    assert_eq!(c["total"], "3.98");
    assert_eq!(c["lines"][0]["unit_price"], "1.99");
    assert_eq!(
        srv.wallet("p9").await,
        Wallet {
            balance: 5000 - 398,
            held: 0,
            available: 5000 - 398
        }
    );
}

#[tokio::test]
async fn free_items_can_be_ordered() {
    let srv = Server::start().await;
    srv.create_item("free-skin", "skin", "0.00").await;
    srv.create_user("pf").await;
    let o = srv.order("pf", &[("free-skin", 1)], true).await;
    assert_eq!(o["total"], "0.00");
    assert_eq!(srv.entitlement_qty("pf", "free-skin").await, 1);
    assert_eq!(srv.wallet("pf").await.balance, 0);
}

#[tokio::test]
async fn non_consumables_are_owned_at_most_once() {
    let srv = Server::start().await;
    shop(&srv, "pa", "50.00").await;
    srv.order("pa", &[("dragon-skin", 1)], true).await;
    srv.create_order("pa", &[("dragon-skin", 1)], true)
        .await
        .expect_error(409, "already_owned");
    // pending also counts as owned
    srv.order("pa", &[("space-game", 1)], false).await;
    srv.create_order("pa", &[("space-game", 1)], false)
        .await
        .expect_error(409, "already_owned");
    srv.create_order("pa", &[("gems-100", 1), ("space-game", 1)], true)
        .await
        .expect_error(409, "already_owned");
    assert_eq!(
        srv.wallet("pa").await,
        Wallet {
            balance: 5000 - 499,
            held: 1000,
            available: 5000 - 499 - 1000
        }
    );
    assert_eq!(srv.all_orders("pa", "").await.len(), 2);
    // Currency stacks.
    srv.order("pa", &[("gems-100", 2)], true).await;
    srv.order("pa", &[("gems-100", 3)], true).await;
    assert_eq!(srv.entitlement_qty("pa", "gems-100").await, 5);
}

#[tokio::test]
async fn unknown_and_inactive_items_are_refused() {
    let srv = Server::start().await;
    shop(&srv, "pb", "50.00").await;
    srv.create_order("pb", &[("nope", 1)], true)
        .await
        .expect_error(404, "item_not_found");
    srv.create_order("pb", &[("gems-100", 1), ("nope", 1)], true)
        .await
        .expect_error(404, "item_not_found");
    srv.put_item(
        "old-game",
        &json!({"name": "Old", "kind": "game", "price": "1.00", "active": false}),
    )
    .await
    .expect(200);
    srv.create_order("pb", &[("old-game", 1)], true)
        .await
        .expect_error(409, "item_inactive");
    assert_eq!(
        srv.wallet("pb").await,
        Wallet {
            balance: 5000,
            held: 0,
            available: 5000
        }
    );
    assert!(srv.all_orders("pb", "").await.is_empty());
    assert!(srv.entitlements("pb").await.is_empty());
}

#[tokio::test]
async fn unknown_order_is_order_not_found() {
    let srv = Server::start().await;
    shop(&srv, "pc", "5.00").await;
    let id = uuid::Uuid::now_v7().to_string();
    srv.get(&format!("/v1/users/pc/orders/{id}"), Auth::Service)
        .await
        .expect_error(404, "order_not_found");
    srv.complete_order("pc", &id, Auth::Service)
        .await
        .expect_error(404, "order_not_found");
    srv.cancel_order("pc", &id, Auth::Service)
        .await
        .expect_error(404, "order_not_found");
    srv.refund("pc", &id, Auth::Service, &json!({}))
        .await
        .expect_error(404, "order_not_found");
}

#[tokio::test]
async fn another_users_order_is_not_reachable_under_my_path() {
    let srv = Server::start().await;
    shop(&srv, "pd", "20.00").await;
    srv.funded_user("pe", "20.00").await;
    let o = srv.order("pd", &[("gems-100", 1)], false).await;
    let id = o["order_id"].as_str().unwrap();
    srv.get(&format!("/v1/users/pe/orders/{id}"), Auth::Service)
        .await
        .expect_error(404, "order_not_found");
    srv.complete_order("pe", id, Auth::Service)
        .await
        .expect_error(404, "order_not_found");
    srv.cancel_order("pe", id, Auth::Service)
        .await
        .expect_error(404, "order_not_found");
    assert_eq!(srv.get_order("pd", id).await["status"], "PENDING");
    assert_eq!(
        srv.wallet("pe").await,
        Wallet {
            balance: 2000,
            held: 0,
            available: 2000
        }
    );
}

#[tokio::test]
async fn orders_list_is_newest_first_and_pages_with_cursor() {
    let srv = Server::start().await;
    shop(&srv, "pl", "100.00").await;
    let mut ids = vec![];
    for q in 1..=5u32 {
        let o = srv.order("pl", &[("gems-100", q)], false).await;
        ids.push(o["order_id"].as_str().unwrap().to_string());
    }
    ids.reverse();
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=2&cursor={}", urlenc(c)),
            None => "limit=2".to_string(),
        };
        let v = srv
            .get(&format!("/v1/users/pl/orders?{q}"), Auth::Service)
            .await
            .expect(200);
        let page = v["orders"].as_array().unwrap();
        assert!(page.len() <= 2, "{v}");
        seen.extend(
            page.iter()
                .map(|o| o["order_id"].as_str().unwrap().to_string()),
        );
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(
                    v.get("next_cursor").is_some(),
                    "next_cursor must be present (null): {v}"
                );
                break;
            }
        }
        assert!(pages < 10);
    }
    assert_eq!(seen, ids, "newest first, each once");
    assert_eq!(pages, 3);
    // no limit: everything (≤ 20), newest first
    let all = srv
        .get("/v1/users/pl/orders", Auth::Service)
        .await
        .expect(200);
    let all_ids: Vec<_> = all["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(all_ids, ids);
    assert!(all["next_cursor"].is_null());
}

#[tokio::test]
async fn orders_list_default_limit_is_20_and_bounds_are_checked() {
    let srv = Server::start().await;
    shop(&srv, "pm", "100.00").await;
    for _ in 0..21 {
        srv.order("pm", &[("gems-100", 1)], false).await;
    }
    let v = srv
        .get("/v1/users/pm/orders", Auth::Service)
        .await
        .expect(200);
    assert_eq!(v["orders"].as_array().unwrap().len(), 20);
    assert!(v["next_cursor"].is_string(), "{v}");
    let v = srv
        .get("/v1/users/pm/orders?limit=100", Auth::Service)
        .await
        .expect(200);
    assert_eq!(v["orders"].as_array().unwrap().len(), 21);
    for bad in ["limit=0", "limit=101", "limit=-1", "limit=abc"] {
        srv.get(&format!("/v1/users/pm/orders?{bad}"), Auth::Service)
            .await
            .expect_error(400, "invalid_request");
    }
}

#[tokio::test]
async fn orders_list_filters_by_status() {
    let srv = Server::start().await;
    shop(&srv, "ps", "100.00").await;
    let pending = srv.order("ps", &[("gems-100", 1)], false).await;
    let done = srv.order("ps", &[("gems-100", 2)], true).await;
    let cancelled = srv.order("ps", &[("gems-100", 3)], false).await;
    srv.cancel_order("ps", cancelled["order_id"].as_str().unwrap(), Auth::Service)
        .await
        .expect(200);
    for (status, want) in [
        ("PENDING", &pending),
        ("COMPLETED", &done),
        ("CANCELLED", &cancelled),
    ] {
        let v = srv
            .get(
                &format!("/v1/users/ps/orders?status={status}"),
                Auth::Service,
            )
            .await
            .expect(200);
        let got = v["orders"].as_array().unwrap();
        assert_eq!(got.len(), 1, "{status}: {v}");
        assert_eq!(got[0]["order_id"], want["order_id"]);
        assert_eq!(got[0]["status"], status);
    }
    let v = srv
        .get("/v1/users/ps/orders?status=REFUNDED", Auth::Service)
        .await
        .expect(200);
    assert_eq!(v["orders"], json!([]));
}

#[tokio::test]
async fn completing_after_expires_at_is_order_expired_even_before_the_sweeper() {
    // The sweeper practically never runs: expiry must be exact anyway.
    let srv = Server::start_with(Opts::new().order_ttl("1s").sweep_interval("1h")).await;
    shop(&srv, "px", "20.00").await;
    let o = srv.order("px", &[("space-game", 1)], false).await;
    let id = o["order_id"].as_str().unwrap();
    let exp = ts(&o["expires_at"]);
    let ttl = (exp - ts(&o["created_at"])).as_seconds_f64();
    assert!((0.5..=1.5).contains(&ttl), "order ttl 1s not applied: {o}");
    assert_eq!(srv.wallet("px").await.held, 1000);
    sleep_until(exp, Duration::from_millis(50)).await;
    // A wallet read after expires_at leaves the hold out.
    let w = srv
        .get("/v1/users/px/wallet", Auth::Service)
        .await
        .expect(200);
    assert_includes(
        &w,
        &json!({"currency": "EUR", "balance": "20.00", "held": "0.00", "available": "20.00"}),
    );
    let u = srv.get("/v1/users/px", Auth::Service).await.expect(200);
    assert_eq!(u["wallet"], w);
    // The books balance at this instant too (held = sum of the holds still in force).
    srv.audit_ok().await;
    srv.complete_order("px", id, Auth::Service)
        .await
        .expect_error(409, "order_expired");
    let got = srv.get_order("px", id).await;
    assert_eq!(got["status"], "CANCELLED");
    let last = got["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["status"], "CANCELLED");
    assert_eq!(last["reason"], "expired");
    // Cancelling it now returns it unchanged (still "expired").
    let c = srv.cancel_order("px", id, Auth::Service).await.expect(200);
    assert_eq!(c, got);
    // Still order_expired on a second try; nothing debited or granted.
    srv.complete_order("px", id, Auth::Service)
        .await
        .expect_error(409, "order_expired");
    assert_eq!(
        srv.wallet("px").await,
        Wallet {
            balance: 2000,
            held: 0,
            available: 2000
        }
    );
    assert_eq!(srv.entitlement_qty("px", "space-game").await, 0);
    // The expired hold does not block spending the money.
    srv.order("px", &[("space-game", 1), ("gems-100", 5)], true)
        .await;
    assert_eq!(srv.wallet("px").await.balance, 2000 - 1000 - 995);
    srv.audit_ok().await;
}

#[tokio::test]
async fn sweeper_cancels_expired_orders_with_reason_expired() {
    let srv = Server::start_with(Opts::new().order_ttl("1s").sweep_interval("200ms")).await;
    shop(&srv, "py", "20.00").await;
    let o = srv.order("py", &[("gems-100", 2)], false).await;
    let id = o["order_id"].as_str().unwrap().to_string();
    sleep_until(ts(&o["expires_at"]), Duration::from_millis(100)).await;
    let got = eventually(Duration::from_secs(5), || {
        let id = id.clone();
        let srv = srv.api();
        async move {
            let v = srv.get_order("py", &id).await;
            (v["status"] == "CANCELLED").then_some(v)
        }
    })
    .await
    .expect("sweeper never cancelled the expired order");
    let last = got["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["reason"], "expired");
    assert_eq!(
        srv.wallet("py").await,
        Wallet {
            balance: 2000,
            held: 0,
            available: 2000
        }
    );
    srv.complete_order("py", &id, Auth::Service)
        .await
        .expect_error(409, "order_expired");
    let v = srv
        .get("/v1/users/py/orders?status=CANCELLED", Auth::Service)
        .await
        .expect(200);
    assert_eq!(v["orders"].as_array().unwrap().len(), 1);
    srv.audit_ok().await;
}

#[tokio::test]
async fn expired_hold_is_not_counted_against_a_new_order() {
    let srv = Server::start_with(Opts::new().order_ttl("1s").sweep_interval("1h")).await;
    shop(&srv, "pz", "10.00").await;
    let o = srv.order("pz", &[("space-game", 1)], false).await;
    srv.create_order("pz", &[("gems-100", 1)], false)
        .await
        .expect_error(409, "insufficient_funds");
    sleep_until(ts(&o["expires_at"]), Duration::from_millis(50)).await;
    let n = srv.order("pz", &[("gems-100", 1)], false).await;
    assert_eq!(n["status"], "PENDING");
    let w = srv.wallet("pz").await;
    assert_eq!(
        w,
        Wallet {
            balance: 1000,
            held: 199,
            available: 801
        }
    );
    srv.audit_ok().await;
}

#[tokio::test]
async fn at_most_max_pending_orders_per_user() {
    let srv = Server::start_with(Opts::new().max_pending_orders(3)).await;
    shop(&srv, "pp", "100.00").await;
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(
            srv.order("pp", &[("gems-100", 1)], false).await["order_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    srv.create_order("pp", &[("gems-100", 1)], false)
        .await
        .expect_error(409, "too_many_pending_orders");
    assert_eq!(srv.wallet("pp").await.held, 3 * 199);
    // the limit is per user
    srv.funded_user("pp2", "10.00").await;
    srv.order("pp2", &[("gems-100", 1)], false).await;
    srv.cancel_order("pp", &ids[0], Auth::Service)
        .await
        .expect(200);
    srv.order("pp", &[("gems-100", 1)], false).await;
    srv.create_order("pp", &[("gems-100", 1)], false)
        .await
        .expect_error(409, "too_many_pending_orders");
    srv.complete_order("pp", &ids[1], Auth::Service)
        .await
        .expect(200);
    srv.order("pp", &[("gems-100", 1)], false).await;
    assert_eq!(srv.all_orders("pp", "status=PENDING").await.len(), 3);
}

#[tokio::test]
async fn default_pending_limit_is_100() {
    let srv = Server::start().await;
    srv.create_item("g", "currency", "0.01").await;
    srv.funded_user("pq", "10.00").await;
    for _ in 0..100 {
        srv.order("pq", &[("g", 1)], false).await;
    }
    srv.create_order("pq", &[("g", 1)], false)
        .await
        .expect_error(409, "too_many_pending_orders");
    assert_eq!(srv.wallet("pq").await.held, 100);
}
