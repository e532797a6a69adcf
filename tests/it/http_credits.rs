//! Direct credits (`POST /v1/users/{id}/credits`).

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn direct_credit_returns_completed_credit_and_updates_wallet() {
    let srv = Server::start().await;
    srv.create_user("c1").await;
    let r = srv
        .post(
            "/v1/users/c1/credits",
            Auth::Service,
            &json!({"amount": "20.00", "external_ref": "psp_pay_8f2c", "source": "card"}),
        )
        .await;
    let c = r.expect(201);
    assert_uuid_v7(&c["credit_id"]);
    assert_eq!(c["user_id"], "c1");
    assert_eq!(c["amount"], "20.00");
    assert_eq!(c["external_ref"], "psp_pay_8f2c");
    assert_eq!(c["status"], "COMPLETED");
    assert_includes(
        &c["wallet"],
        &json!({"currency": "EUR", "balance": "20.00", "held": "0.00", "available": "20.00"}),
    );
    ts(&c["created_at"]);
    assert_eq!(
        srv.wallet("c1").await,
        Wallet {
            balance: 2000,
            held: 0,
            available: 2000
        }
    );
}

#[tokio::test]
async fn credits_accumulate_exactly_in_minor_units() {
    let srv = Server::start().await;
    srv.create_user("c2").await;
    for a in ["0.01", "0.10", "0.99", "1000000.00", "12.34"] {
        srv.credit("c2", a).await;
    }
    assert_eq!(
        srv.wallet("c2").await.balance,
        1 + 10 + 99 + 100_000_000 + 1234
    );
    let w = srv
        .get("/v1/users/c2/wallet", Auth::Service)
        .await
        .expect(200);
    assert_eq!(w["balance"], "1000013.44");
}

#[tokio::test]
async fn same_external_ref_same_amount_returns_original_credit_with_200() {
    let srv = Server::start().await;
    srv.create_user("c3").await;
    let body = json!({"amount": "20.00", "external_ref": "ref-1", "source": "card"});
    let first = srv
        .post("/v1/users/c3/credits", Auth::Service, &body)
        .await
        .expect(201);
    let again = srv.post("/v1/users/c3/credits", Auth::Service, &body).await;
    let again_v = again.expect(200);
    assert_eq!(again_v["credit_id"], first["credit_id"], "{again:?}");
    assert_eq!(again_v["amount"], "20.00");
    assert_eq!(again_v["external_ref"], "ref-1");
    assert_eq!(srv.wallet("c3").await.balance, 2000, "credited twice");
    // Admin, another key, same ref: still the original.
    let admin = srv
        .post("/v1/users/c3/credits", Auth::Admin, &body)
        .await
        .expect(200);
    assert_eq!(admin["credit_id"], first["credit_id"]);
    assert_eq!(srv.wallet("c3").await.balance, 2000);
    let credits: Vec<_> = srv
        .all_ledger("c3")
        .await
        .into_iter()
        .filter(|e| e["kind"] == "credit")
        .collect();
    assert_eq!(credits.len(), 1, "{credits:#?}");
}

#[tokio::test]
async fn same_external_ref_with_other_amount_is_external_ref_conflict() {
    let srv = Server::start().await;
    srv.create_user("c4").await;
    srv.post(
        "/v1/users/c4/credits",
        Auth::Service,
        &json!({"amount": "20.00", "external_ref": "ref-2", "source": "card"}),
    )
    .await
    .expect(201);
    srv.post(
        "/v1/users/c4/credits",
        Auth::Service,
        &json!({"amount": "21.00", "external_ref": "ref-2", "source": "card"}),
    )
    .await
    .expect_error(409, "external_ref_conflict");
    assert_eq!(srv.wallet("c4").await.balance, 2000);
}

#[tokio::test]
async fn same_external_ref_for_other_user_is_external_ref_conflict() {
    let srv = Server::start().await;
    srv.create_user("c5").await;
    srv.create_user("c6").await;
    let body = json!({"amount": "7.00", "external_ref": "ref-3", "source": "card"});
    srv.post("/v1/users/c5/credits", Auth::Service, &body)
        .await
        .expect(201);
    srv.post("/v1/users/c6/credits", Auth::Service, &body)
        .await
        .expect_error(409, "external_ref_conflict");
    assert_eq!(srv.wallet("c5").await.balance, 700);
    assert_eq!(srv.wallet("c6").await.balance, 0);
}

#[tokio::test]
async fn credits_are_refused_to_user_tokens_and_anonymous_callers() {
    let srv = Server::start().await;
    srv.create_user("c7").await;
    let tok = srv.user_token("c7").await;
    let body = json!({"amount": "5.00", "external_ref": "ref-4", "source": "card"});
    srv.post("/v1/users/c7/credits", Auth::user(&tok), &body)
        .await
        .expect_error(403, "forbidden");
    srv.post("/v1/users/c7/credits", Auth::None, &body)
        .await
        .expect_error(401, "unauthenticated");
    assert_eq!(srv.wallet("c7").await.balance, 0);
    // The same external_ref still works for an allowed caller: nothing was recorded.
    srv.post("/v1/users/c7/credits", Auth::Admin, &body)
        .await
        .expect(201);
    assert_eq!(srv.wallet("c7").await.balance, 500);
}

#[tokio::test]
async fn credit_is_recorded_in_the_ledger() {
    let srv = Server::start().await;
    srv.create_user("c8").await;
    let c = srv.credit("c8", "3.30").await;
    let entries = srv.all_ledger("c8").await;
    assert_eq!(entries.len(), 1, "{entries:#?}");
    let e = &entries[0];
    assert_eq!(e["kind"], "credit");
    assert_eq!(e["amount"], "3.30");
    assert_eq!(e["balance_after"], "3.30");
    assert_eq!(e["held_after"], "0.00");
    assert_eq!(e["ref"]["type"], "credit");
    assert_eq!(e["ref"]["id"], c["credit_id"]);
}
