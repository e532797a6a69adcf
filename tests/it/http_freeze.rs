//! Frozen accounts: what a freeze refuses, what it still allows, its events, and who may freeze.

use serde_json::{Value, json};

use crate::events::drain_events;
use crate::harness::*;

async fn freeze(srv: &Server, user: &str, auth: Auth, body: &Value) -> Resp {
    srv.post(&format!("/v1/users/{user}/freeze"), auth, body)
        .await
}

async fn unfreeze(srv: &Server, user: &str, auth: Auth, body: &Value) -> Resp {
    srv.post(&format!("/v1/users/{user}/unfreeze"), auth, body)
        .await
}

#[tokio::test]
async fn a_frozen_account_cannot_spend_top_up_consume_or_get_tokens_but_can_be_read_credited_and_refunded()
 {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("fz1", "20.00").await;
    let bought = srv.order("fz1", &[("gems", 5)], true).await;
    let pending = srv.order("fz1", &[("gems", 1)], false).await;
    let token = srv.user_token("fz1").await;

    let user = freeze(
        &srv,
        "fz1",
        Auth::Service,
        &json!({"reason": "chargeback cb_1"}),
    )
    .await
    .expect(200);
    assert_eq!(user["frozen"]["reason"], "chargeback cb_1");
    ts(&user["frozen"]["at"]);
    let read = srv.get("/v1/users/fz1", Auth::Service).await.expect(200);
    assert_eq!(read["frozen"], user["frozen"]);

    let refused = srv
        .create_order("fz1", &[("gems", 1)], true)
        .await
        .expect_error(403, "account_frozen");
    assert_eq!(refused["details"]["reason"], "chargeback cb_1");
    srv.complete_order("fz1", pending["order_id"].as_str().unwrap(), Auth::Service)
        .await
        .expect_error(403, "account_frozen");
    srv.post(
        "/v1/users/fz1/topups",
        Auth::Service,
        &json!({"amount": "5.00"}),
    )
    .await
    .expect_error(403, "account_frozen");
    srv.consume("fz1", "gems", Auth::Service, json!(1))
        .await
        .expect_error(403, "account_frozen");
    srv.post("/v1/users/fz1/tokens", Auth::Service, &json!({}))
        .await
        .expect_error(403, "account_frozen");
    // A player's own token made before the freeze cannot order either.
    srv.create_order_as("fz1", Auth::user(&token), &[("gems", 1)], true)
        .await
        .expect_error(403, "account_frozen");

    // Still allowed: reads, credits, refunds, cancelling a pending order.
    srv.get("/v1/users/fz1/wallet", Auth::user(&token))
        .await
        .expect(200);
    srv.credit("fz1", "1.00").await;
    srv.refund(
        "fz1",
        bought["order_id"].as_str().unwrap(),
        Auth::Service,
        &json!({"lines": [{"item_id": "gems", "quantity": 1}]}),
    )
    .await
    .expect(201);
    srv.cancel_order("fz1", pending["order_id"].as_str().unwrap(), Auth::Service)
        .await
        .expect(200);

    let user = unfreeze(&srv, "fz1", Auth::Service, &json!({}))
        .await
        .expect(200);
    assert_eq!(user["frozen"], Value::Null);
    srv.order("fz1", &[("gems", 1)], true).await;
    srv.audit_ok().await;
}

#[tokio::test]
async fn freezing_twice_keeps_the_first_freeze_and_each_change_emits_its_event() {
    let srv = Server::start().await;
    srv.create_user("fz2").await;
    let first = freeze(&srv, "fz2", Auth::Admin, &json!({"reason": "fraud review"}))
        .await
        .expect(200);
    let second = freeze(&srv, "fz2", Auth::Admin, &json!({"reason": "another"}))
        .await
        .expect(200);
    assert_eq!(
        second["frozen"], first["frozen"],
        "already frozen: unchanged"
    );
    unfreeze(&srv, "fz2", Auth::Admin, &json!({}))
        .await
        .expect(200);
    unfreeze(&srv, "fz2", Auth::Admin, &json!({}))
        .await
        .expect(200);

    let (events, _) = drain_events(&srv, None, 100).await;
    let mine: Vec<&Value> = events.iter().filter(|e| e["user_id"] == "fz2").collect();
    let types: Vec<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["user.created", "account.frozen", "account.unfrozen"]
    );
    assert_eq!(mine[1]["data"], first, "the user as the freeze answered");
    assert_eq!(mine[2]["data"]["frozen"], Value::Null);
}

#[tokio::test]
async fn freeze_is_for_staff_needs_a_reason_and_replays_by_its_key() {
    let srv = Server::start().await;
    srv.create_user("fz3").await;
    let token = srv.user_token("fz3").await;
    freeze(&srv, "fz3", Auth::user(&token), &json!({"reason": "x"}))
        .await
        .expect_error(403, "forbidden");
    for body in [
        json!({}),
        json!({"reason": ""}),
        json!({"reason": "x".repeat(501)}),
    ] {
        freeze(&srv, "fz3", Auth::Service, &body)
            .await
            .expect_error(400, "invalid_request");
    }
    freeze(&srv, "nobody", Auth::Service, &json!({"reason": "x"}))
        .await
        .expect_error(404, "user_not_found");
    // `force` is the admin's.
    unfreeze(&srv, "fz3", Auth::Service, &json!({"force": true}))
        .await
        .expect_error(403, "forbidden");
    unfreeze(&srv, "fz3", Auth::Admin, &json!({"force": true}))
        .await
        .expect(200);

    let body = json!({"reason": "kept"});
    let first = srv
        .post_key("/v1/users/fz3/freeze", Auth::Service, "fz-key", &body)
        .await;
    first.expect(200);
    unfreeze(&srv, "fz3", Auth::Service, &json!({}))
        .await
        .expect(200);
    let again = srv
        .post_key("/v1/users/fz3/freeze", Auth::Service, "fz-key", &body)
        .await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body, "the stored answer, byte for byte");
    let now = srv.get("/v1/users/fz3", Auth::Service).await.expect(200);
    assert_eq!(now["frozen"], Value::Null, "a replay changes nothing");
}
