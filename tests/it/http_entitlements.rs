//! Entitlements and consume.

use serde_json::json;

use crate::harness::*;

async fn shop(srv: &Server, user: &str) {
    srv.create_item("gems", "currency", "0.50").await;
    srv.create_item("skin", "skin", "2.00").await;
    srv.create_item("game", "game", "5.00").await;
    srv.funded_user(user, "50.00").await;
}

#[tokio::test]
async fn entitlements_list_has_the_contract_shape() {
    let srv = Server::start().await;
    shop(&srv, "e1").await;
    assert_includes(
        &srv.get("/v1/users/e1/entitlements", Auth::Service)
            .await
            .expect(200),
        &json!({"entitlements": []}),
    );
    srv.order("e1", &[("gems", 10), ("skin", 1), ("game", 1)], true)
        .await;
    let ents = srv.entitlements("e1").await;
    assert_eq!(ents.len(), 3);
    for (item, kind, q) in [
        ("gems", "currency", 10),
        ("skin", "skin", 1),
        ("game", "game", 1),
    ] {
        let e = ents
            .iter()
            .find(|e| e["item_id"] == item)
            .unwrap_or_else(|| panic!("{item} missing: {ents:?}"));
        assert_eq!(e["kind"], kind);
        assert_eq!(e["quantity"], q);
        ts(&e["granted_at"]);
    }
    let tok = srv.user_token("e1").await;
    let mine = srv
        .get("/v1/users/e1/entitlements", Auth::user(&tok))
        .await
        .expect(200);
    assert_eq!(mine["entitlements"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn consume_reduces_units_and_returns_the_entitlement() {
    let srv = Server::start().await;
    shop(&srv, "e2").await;
    srv.order("e2", &[("gems", 10)], true).await;
    let e = srv
        .consume("e2", "gems", Auth::Service, json!(3))
        .await
        .expect(200);
    assert_eq!(e["item_id"], "gems");
    assert_eq!(e["kind"], "currency");
    assert_eq!(e["quantity"], 7);
    ts(&e["granted_at"]);
    let e = srv
        .consume("e2", "gems", Auth::Admin, json!(2))
        .await
        .expect(200);
    assert_eq!(e["quantity"], 5);
    assert_eq!(srv.entitlement_qty("e2", "gems").await, 5);
    // consuming everything removes the row from the list
    srv.consume("e2", "gems", Auth::Service, json!(5))
        .await
        .expect(200);
    let ents = srv.entitlements("e2").await;
    assert!(
        ents.iter().all(|e| e["item_id"] != "gems"),
        "quantity-0 rows are omitted: {ents:?}"
    );
    srv.audit_ok().await;
}

#[tokio::test]
async fn consuming_more_than_owned_is_insufficient_entitlement() {
    let srv = Server::start().await;
    shop(&srv, "e3").await;
    // none owned at all
    srv.consume("e3", "gems", Auth::Service, json!(1))
        .await
        .expect_error(409, "insufficient_entitlement");
    srv.order("e3", &[("gems", 2)], true).await;
    srv.consume("e3", "gems", Auth::Service, json!(3))
        .await
        .expect_error(409, "insufficient_entitlement");
    assert_eq!(srv.entitlement_qty("e3", "gems").await, 2);
    // pending purchases grant nothing yet
    srv.order("e3", &[("gems", 5)], false).await;
    srv.consume("e3", "gems", Auth::Service, json!(3))
        .await
        .expect_error(409, "insufficient_entitlement");
    assert_eq!(srv.entitlement_qty("e3", "gems").await, 2);
}

#[tokio::test]
async fn consume_of_a_non_currency_item_is_invalid_request() {
    let srv = Server::start().await;
    shop(&srv, "e4").await;
    srv.order("e4", &[("skin", 1), ("game", 1)], true).await;
    for item in ["skin", "game"] {
        srv.consume("e4", item, Auth::Service, json!(1))
            .await
            .expect_error(400, "invalid_request");
        assert_eq!(srv.entitlement_qty("e4", item).await, 1);
    }
}

#[tokio::test]
async fn consume_quantity_is_validated() {
    let srv = Server::start().await;
    shop(&srv, "e5").await;
    srv.order("e5", &[("gems", 5)], true).await;
    for bad in [json!(0), json!(-1), json!("1"), json!(1.5), json!(null)] {
        srv.consume("e5", "gems", Auth::Service, bad)
            .await
            .expect_error(400, "invalid_request");
    }
    srv.post(
        "/v1/users/e5/entitlements/gems/consume",
        Auth::Service,
        &json!({"quantity": 1, "why": "x"}),
    )
    .await
    .expect_error(400, "invalid_request");
    assert_eq!(srv.entitlement_qty("e5", "gems").await, 5);
}

#[tokio::test]
async fn consume_of_an_unknown_item_is_refused() {
    // API.md does not say which of the two; either is a correct refusal.
    let srv = Server::start().await;
    shop(&srv, "e6").await;
    let r = srv
        .consume("e6", "no-such-item", Auth::Service, json!(1))
        .await;
    match r.status {
        404 => r.expect_error(404, "item_not_found"),
        _ => r.expect_error(409, "insufficient_entitlement"),
    };
    assert!(srv.entitlements("e6").await.is_empty());
}

#[tokio::test]
async fn consume_is_refused_to_user_tokens() {
    let srv = Server::start().await;
    shop(&srv, "e7").await;
    srv.order("e7", &[("gems", 5)], true).await;
    let tok = srv.user_token("e7").await;
    srv.consume("e7", "gems", Auth::user(&tok), json!(1))
        .await
        .expect_error(403, "forbidden");
    srv.consume("e7", "gems", Auth::None, json!(1))
        .await
        .expect_error(401, "unauthenticated");
    assert_eq!(srv.entitlement_qty("e7", "gems").await, 5);
}
