//! Refunds: full, partial, per-line ceiling, consumed units, window, force, state.

use serde_json::{Value, json};

use crate::harness::*;

async fn shop(srv: &Server, user: &str) {
    srv.create_item("game", "game", "10.00").await;
    srv.create_item("skin", "skin", "4.99").await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user(user, "100.00").await;
}

fn line<'a>(order: &'a Value, item: &str) -> &'a Value {
    order["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["item_id"] == item)
        .unwrap_or_else(|| panic!("no line {item} in {order}"))
}

fn oid(o: &Value) -> String {
    o["order_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn full_refund_without_lines_refunds_everything() {
    let srv = Server::start().await;
    shop(&srv, "r1").await;
    let o = srv.order("r1", &[("game", 1), ("gems", 5)], true).await;
    assert_eq!(srv.wallet("r1").await.balance, 8500);
    let r = srv
        .refund(
            "r1",
            &oid(&o),
            Auth::Service,
            &json!({"reason": "customer_request"}),
        )
        .await
        .expect(201);
    assert_uuid_v7(&r["refund_id"]);
    assert_eq!(r["order_id"], o["order_id"]);
    assert_eq!(r["amount"], "15.00");
    assert_eq!(r["status"], "COMPLETED");
    assert!(r["lines"].is_array(), "{r}");
    assert_includes(
        &r["wallet"],
        &json!({"currency": "EUR", "balance": "100.00", "held": "0.00", "available": "100.00"}),
    );
    ts(&r["created_at"]);

    let got = srv.get_order("r1", &oid(&o)).await;
    assert_eq!(got["status"], "REFUNDED");
    assert_eq!(got["refunded_total"], "15.00");
    assert_eq!(got["total"], "15.00");
    assert_eq!(line(&got, "game")["refunded_quantity"], 1);
    assert_eq!(line(&got, "gems")["refunded_quantity"], 5);
    assert_eq!(
        srv.wallet("r1").await,
        Wallet {
            balance: 10000,
            held: 0,
            available: 10000
        }
    );
    // entitlements revoked; quantity-0 rows omitted
    assert!(
        srv.entitlements("r1").await.is_empty(),
        "{:?}",
        srv.entitlements("r1").await
    );
    srv.audit_ok().await;
}

#[tokio::test]
async fn partial_refunds_move_the_order_to_partially_refunded_then_refunded() {
    let srv = Server::start().await;
    shop(&srv, "r2").await;
    let o = srv.order("r2", &[("gems", 5)], true).await;
    let id = oid(&o);
    let r = srv
        .refund(
            "r2",
            &id,
            Auth::Service,
            &json!({"lines": [{"item_id": "gems", "quantity": 2}], "reason": "customer_request"}),
        )
        .await
        .expect(201);
    assert_eq!(r["amount"], "2.00");
    let got = srv.get_order("r2", &id).await;
    assert_eq!(got["status"], "PARTIALLY_REFUNDED");
    assert_eq!(got["refunded_total"], "2.00");
    assert_eq!(line(&got, "gems")["refunded_quantity"], 2);
    assert_eq!(srv.entitlement_qty("r2", "gems").await, 3);
    assert_eq!(srv.wallet("r2").await.balance, 10000 - 500 + 200);
    // completing a partially refunded order returns it unchanged; cancelling it is invalid_state
    let c = srv
        .complete_order("r2", &id, Auth::Service)
        .await
        .expect(200);
    assert_eq!(c, got);
    srv.cancel_order("r2", &id, Auth::Service)
        .await
        .expect_error(409, "invalid_state");

    // admin refunds the rest (no lines = everything not yet refunded)
    let r = srv
        .refund("r2", &id, Auth::Admin, &json!({"reason": "goodwill"}))
        .await
        .expect(201);
    assert_eq!(r["amount"], "3.00");
    let got = srv.get_order("r2", &id).await;
    assert_eq!(got["status"], "REFUNDED");
    assert_eq!(got["refunded_total"], "5.00");
    assert_eq!(srv.wallet("r2").await.balance, 10000);
    assert_eq!(srv.entitlement_qty("r2", "gems").await, 0);

    // A fully refunded order: invalid_state.
    srv.refund(
        "r2",
        &id,
        Auth::Service,
        &json!({"lines": [{"item_id": "gems", "quantity": 1}]}),
    )
    .await
    .expect_error(409, "invalid_state");
    srv.refund("r2", &id, Auth::Service, &json!({}))
        .await
        .expect_error(409, "invalid_state");
    assert_eq!(srv.wallet("r2").await.balance, 10000);
    srv.audit_ok().await;
}

#[tokio::test]
async fn refund_never_exceeds_paid_per_line() {
    let srv = Server::start().await;
    shop(&srv, "r3").await;
    let o = srv.order("r3", &[("gems", 5), ("game", 1)], true).await;
    let id = oid(&o);
    let refund =
        |item: &str, q: u32| json!({"lines": [{"item_id": item, "quantity": q}], "reason": "x"});
    srv.refund("r3", &id, Auth::Service, &refund("gems", 6))
        .await
        .expect_error(409, "refund_exceeds_purchase");
    srv.refund("r3", &id, Auth::Service, &refund("game", 2))
        .await
        .expect_error(409, "refund_exceeds_purchase");
    srv.refund("r3", &id, Auth::Service, &refund("skin", 1))
        .await
        .expect_error(409, "refund_exceeds_purchase");
    srv.refund("r3", &id, Auth::Service, &refund("gems", 3))
        .await
        .expect(201);
    srv.refund("r3", &id, Auth::Service, &refund("gems", 3))
        .await
        .expect_error(409, "refund_exceeds_purchase");
    srv.refund("r3", &id, Auth::Service, &refund("gems", 2))
        .await
        .expect(201);
    srv.refund("r3", &id, Auth::Service, &refund("gems", 1))
        .await
        .expect_error(409, "refund_exceeds_purchase");
    let got = srv.get_order("r3", &id).await;
    assert_eq!(got["status"], "PARTIALLY_REFUNDED");
    assert_eq!(got["refunded_total"], "5.00");
    assert_eq!(line(&got, "gems")["refunded_quantity"], 5);
    assert_eq!(line(&got, "game")["refunded_quantity"], 0);
    assert_eq!(srv.wallet("r3").await.balance, 10000 - 1500 + 500);
    // the rest (the game) without lines
    let r = srv
        .refund("r3", &id, Auth::Service, &json!({}))
        .await
        .expect(201);
    assert_eq!(r["amount"], "10.00");
    assert_eq!(srv.wallet("r3").await.balance, 10000);
    assert_eq!(srv.get_order("r3", &id).await["status"], "REFUNDED");
    srv.audit_ok().await;
}

#[tokio::test]
async fn refund_uses_the_price_paid_not_the_current_price() {
    let srv = Server::start().await;
    shop(&srv, "r4").await;
    let o = srv.order("r4", &[("gems", 4)], true).await;
    srv.create_item("gems", "currency", "7.77").await;
    let r = srv
        .refund(
            "r4",
            &oid(&o),
            Auth::Service,
            &json!({"lines": [{"item_id": "gems", "quantity": 1}]}),
        )
        .await
        .expect(201);
    assert_eq!(r["amount"], "1.00");
    assert_eq!(srv.wallet("r4").await.balance, 10000 - 400 + 100);
}

#[tokio::test]
async fn spent_currency_cannot_be_refunded() {
    let srv = Server::start().await;
    shop(&srv, "r5").await;
    let o = srv.order("r5", &[("gems", 5)], true).await;
    let id = oid(&o);
    srv.consume("r5", "gems", Auth::Service, json!(4))
        .await
        .expect(200);
    srv.refund(
        "r5",
        &id,
        Auth::Service,
        &json!({"lines": [{"item_id": "gems", "quantity": 2}]}),
    )
    .await
    .expect_error(409, "already_consumed");
    srv.refund("r5", &id, Auth::Service, &json!({}))
        .await
        .expect_error(409, "already_consumed");
    assert_eq!(srv.wallet("r5").await.balance, 9500);
    assert_eq!(srv.entitlement_qty("r5", "gems").await, 1);
    let r = srv
        .refund(
            "r5",
            &id,
            Auth::Service,
            &json!({"lines": [{"item_id": "gems", "quantity": 1}]}),
        )
        .await
        .expect(201);
    assert_eq!(r["amount"], "1.00");
    assert_eq!(srv.entitlement_qty("r5", "gems").await, 0);
    assert_eq!(srv.wallet("r5").await.balance, 9600);
    srv.audit_ok().await;
}

#[tokio::test]
async fn refunding_a_skin_revokes_it_and_it_can_be_bought_again() {
    let srv = Server::start().await;
    shop(&srv, "r6").await;
    let o = srv.order("r6", &[("skin", 1)], true).await;
    assert_eq!(srv.entitlement_qty("r6", "skin").await, 1);
    srv.refund("r6", &oid(&o), Auth::Service, &json!({}))
        .await
        .expect(201);
    assert_eq!(srv.entitlement_qty("r6", "skin").await, 0);
    srv.order("r6", &[("skin", 1)], true).await;
    assert_eq!(srv.entitlement_qty("r6", "skin").await, 1);
    assert_eq!(srv.wallet("r6").await.balance, 10000 - 499);
}

#[tokio::test]
async fn refund_of_an_order_that_is_not_completed_is_invalid_state() {
    let srv = Server::start().await;
    shop(&srv, "r7").await;
    let pending = srv.order("r7", &[("gems", 2)], false).await;
    srv.refund("r7", &oid(&pending), Auth::Service, &json!({}))
        .await
        .expect_error(409, "invalid_state");
    srv.cancel_order("r7", &oid(&pending), Auth::Service)
        .await
        .expect(200);
    srv.refund("r7", &oid(&pending), Auth::Service, &json!({}))
        .await
        .expect_error(409, "invalid_state");
    assert_eq!(
        srv.wallet("r7").await,
        Wallet {
            balance: 10000,
            held: 0,
            available: 10000
        }
    );
}

#[tokio::test]
async fn refund_window_closed_unless_admin_forces() {
    let srv = Server::start().await;
    srv.create_item_window("final-sale", "game", "3.00", 0)
        .await;
    srv.funded_user("r8", "10.00").await;
    let o = srv.order("r8", &[("final-sale", 1)], true).await;
    let id = oid(&o);
    srv.refund(
        "r8",
        &id,
        Auth::Service,
        &json!({"reason": "customer_request"}),
    )
    .await
    .expect_error(409, "refund_window_closed");
    srv.refund(
        "r8",
        &id,
        Auth::Admin,
        &json!({"reason": "customer_request"}),
    )
    .await
    .expect_error(409, "refund_window_closed");
    // force is admin-only
    srv.refund(
        "r8",
        &id,
        Auth::Service,
        &json!({"reason": "x", "force": true}),
    )
    .await
    .expect_error(403, "forbidden");
    assert_eq!(srv.wallet("r8").await.balance, 700);
    let r = srv
        .refund(
            "r8",
            &id,
            Auth::Admin,
            &json!({"reason": "support", "force": true}),
        )
        .await
        .expect(201);
    assert_eq!(r["amount"], "3.00");
    assert_eq!(srv.wallet("r8").await.balance, 1000);
    assert_eq!(srv.entitlement_qty("r8", "final-sale").await, 0);
}

#[tokio::test]
async fn refunds_are_refused_to_user_tokens() {
    let srv = Server::start().await;
    shop(&srv, "r9").await;
    let o = srv.order("r9", &[("gems", 2)], true).await;
    let tok = srv.user_token("r9").await;
    srv.refund("r9", &oid(&o), Auth::user(&tok), &json!({}))
        .await
        .expect_error(403, "forbidden");
    srv.refund("r9", &oid(&o), Auth::None, &json!({}))
        .await
        .expect_error(401, "unauthenticated");
    assert_eq!(srv.get_order("r9", &oid(&o)).await["status"], "COMPLETED");
    assert_eq!(srv.wallet("r9").await.balance, 9800);
}

#[tokio::test]
async fn refund_lines_are_validated() {
    let srv = Server::start().await;
    shop(&srv, "ra").await;
    let o = srv.order("ra", &[("gems", 5)], true).await;
    for bad in [
        json!({"lines": [{"item_id": "gems", "quantity": 0}]}),
        json!({"lines": [{"item_id": "gems", "quantity": -1}]}),
        json!({"lines": [{"item_id": "gems", "quantity": "1"}]}),
        json!({"lines": [{"item_id": "gems", "quantity": 1}], "amount": "5.00"}),
        json!({"lines": [{"item_id": "gems", "quantity": 1}, {"item_id": "gems", "quantity": 1}]}),
        json!({"force": "yes"}),
    ] {
        srv.refund("ra", &oid(&o), Auth::Admin, &bad)
            .await
            .expect_error(400, "invalid_request");
    }
    assert_eq!(
        srv.get_order("ra", &oid(&o)).await["refunded_total"],
        "0.00"
    );
    assert_eq!(srv.wallet("ra").await.balance, 9500);
}

#[tokio::test]
async fn refund_is_recorded_in_the_ledger() {
    let srv = Server::start().await;
    shop(&srv, "rb").await;
    let o = srv.order("rb", &[("gems", 3)], true).await;
    let r = srv
        .refund(
            "rb",
            &oid(&o),
            Auth::Service,
            &json!({"lines": [{"item_id": "gems", "quantity": 2}]}),
        )
        .await
        .expect(201);
    let entries = srv.all_ledger("rb").await;
    let last = entries.last().unwrap();
    assert_eq!(last["kind"], "refund", "{entries:#?}");
    assert_eq!(last["amount"], "2.00");
    assert_eq!(last["balance_after"], "99.00");
    assert!(
        last["ref"]["id"] == r["refund_id"] || last["ref"]["id"] == o["order_id"],
        "refund entry must reference the refund (or its order): {last}"
    );
}
