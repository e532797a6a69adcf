//! Money coming back: reversals of direct credits, PSP refunds and disputes of top-ups, debt and the
//! freeze it brings, its repayment, and `--on-reversal revoke` — through a real server.

use serde_json::{Value, json};

use crate::events::drain_events;
use crate::harness::*;

async fn reverse(srv: &Server, user: &str, credit: &Value, amount: &str, reference: &str) -> Resp {
    let path = format!(
        "/v1/users/{user}/credits/{}/reversals",
        credit["credit_id"].as_str().unwrap()
    );
    let body = json!({"amount": amount, "reason": "chargeback", "external_ref": reference});
    srv.post(&path, Auth::Service, &body).await
}

fn psp(event_id: &str, kind: &str, topup: &Value, user: &str) -> Value {
    json!({"event_id": event_id, "type": kind, "topup_id": topup["topup_id"], "user_id": user})
}

fn with(mut event: Value, fields: Value) -> Value {
    for (k, v) in fields.as_object().unwrap() {
        event[k] = v.clone();
    }
    event
}

/// A completed top-up of `amount` for `user`, paid by PSP payment `pi_<user>_<n>`.
async fn paid_topup(srv: &Server, user: &str, amount: &str) -> Value {
    let topup = srv.topup(user, amount).await;
    let payment = format!("pi_{}", uniq(user));
    let event = with(
        psp(&uniq("pay"), "payment.succeeded", &topup, user),
        json!({"amount": amount, "psp_payment_id": payment}),
    );
    srv.webhook(&event).await.expect(200)
}

async fn debt(srv: &Server, user: &str) -> String {
    let wallet = srv
        .get(&format!("/v1/users/{user}/wallet"), Auth::Service)
        .await
        .expect(200);
    wallet["debt"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_chargeback_after_the_player_spent_everything_leaves_balance_zero_debt_and_a_frozen_account()
 {
    let srv = Server::start().await;
    srv.create_item("sword", "skin", "20.00").await;
    srv.create_user("rv1").await;
    let credit = srv.credit("rv1", "20.00").await;
    srv.order("rv1", &[("sword", 1)], true).await;
    let (_, cursor) = drain_events(&srv, None, 1000).await;

    let reversal = reverse(&srv, "rv1", &credit, "20.00", "cb-1")
        .await
        .expect(201);
    assert_eq!(reversal["amount"], "20.00");
    assert_eq!(reversal["reason"], "chargeback");
    assert_eq!(reversal["source"]["type"], "credit");
    assert_eq!(reversal["source"]["id"], credit["credit_id"]);
    assert_eq!(reversal["from_wallet"], "0.00");
    assert_eq!(reversal["debt"], "20.00");
    assert_eq!(reversal["wallet"]["balance"], "0.00");
    assert_eq!(reversal["wallet"]["debt"], "20.00");

    let user = srv.get("/v1/users/rv1", Auth::Service).await.expect(200);
    assert_eq!(user["wallet"]["balance"], "0.00");
    assert_eq!(user["wallet"]["debt"], "20.00");
    assert_eq!(user["frozen"]["reason"], "debt_outstanding");
    srv.create_order("rv1", &[("sword", 1)], true)
        .await
        .expect_error(403, "account_frozen");
    // The player keeps the sword (no revoke): the shop is owed its price.
    assert_eq!(srv.entitlement_qty("rv1", "sword").await, 1);

    let kinds: Vec<String> = srv
        .all_ledger("rv1")
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["credit", "hold", "debit", "debt", "reversal"]);
    let (events, _) = drain_events(&srv, Some(cursor), 1000).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["account.frozen", "payment.reversed"]);
    // The frozen account as the reversal left it (not with the debt lent to it mid-command).
    assert_eq!(events[0]["data"]["wallet"]["balance"], "0.00");
    assert_eq!(events[0]["data"]["frozen"]["reason"], "debt_outstanding");
    assert_eq!(events[1]["data"]["reversal_id"], reversal["reversal_id"]);
    srv.audit_ok().await;

    // Later credits repay the debt first; the freeze the debt made goes with it.
    let partial = srv.credit("rv1", "5.00").await;
    assert_eq!(partial["wallet"]["balance"], "0.00");
    assert_eq!(debt(&srv, "rv1").await, "15.00");
    srv.credit("rv1", "25.00").await;
    assert_eq!(debt(&srv, "rv1").await, "0.00");
    assert_eq!(srv.wallet("rv1").await.balance, 1000);
    let user = srv.get("/v1/users/rv1", Auth::Service).await.expect(200);
    assert_eq!(user["frozen"], Value::Null);
    let kinds: Vec<String> = srv.all_ledger("rv1").await[5..]
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["credit", "debt_repaid", "credit", "debt_repaid"]);
    srv.audit_ok().await;
}

#[tokio::test]
async fn a_reversal_takes_the_available_credit_first_and_only_what_is_missing_becomes_debt() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_user("rv2").await;
    let credit = srv.credit("rv2", "30.00").await;
    srv.order("rv2", &[("gems", 20)], true).await;
    let pending = srv.order("rv2", &[("gems", 4)], false).await;

    let reversal = reverse(&srv, "rv2", &credit, "30.00", "cb-2")
        .await
        .expect(201);
    // Available was 30 - 20 - 4 (held by the pending order) = 6.
    assert_eq!(reversal["from_wallet"], "6.00");
    assert_eq!(reversal["debt"], "24.00");
    let wallet = srv.wallet("rv2").await;
    assert_eq!((wallet.balance, wallet.held), (400, 400));
    // The pending order keeps its hold and may still complete once the account is unfrozen.
    srv.post(
        "/v1/users/rv2/unfreeze",
        Auth::Admin,
        &json!({"force": true}),
    )
    .await
    .expect(200);
    srv.complete_order("rv2", pending["order_id"].as_str().unwrap(), Auth::Service)
        .await
        .expect(200);
    assert_eq!(debt(&srv, "rv2").await, "24.00");
    srv.audit_ok().await;
}

#[tokio::test]
async fn the_reversals_of_a_credit_never_sum_to_more_than_it_brought_in() {
    let srv = Server::start().await;
    srv.create_user("rv3").await;
    srv.create_user("rv3b").await;
    let credit = srv.credit("rv3", "10.00").await;
    reverse(&srv, "rv3", &credit, "6.00", "r-1")
        .await
        .expect(201);
    let refused = reverse(&srv, "rv3", &credit, "4.01", "r-2")
        .await
        .expect_error(409, "reversal_exceeds_credit");
    assert_eq!(refused["details"]["reversible"], "4.00");
    assert_eq!(refused["details"]["requested"], "4.01");
    reverse(&srv, "rv3", &credit, "4.00", "r-3")
        .await
        .expect(201);
    reverse(&srv, "rv3", &credit, "0.01", "r-4")
        .await
        .expect_error(409, "reversal_exceeds_credit");
    assert_eq!(srv.wallet("rv3").await.balance, 0);
    assert_eq!(debt(&srv, "rv3").await, "0.00");
    let user = srv.get("/v1/users/rv3", Auth::Service).await.expect(200);
    assert_eq!(user["frozen"], Value::Null, "no debt, no freeze");

    // Another user's credit, and a credit that does not exist, are not found.
    reverse(&srv, "rv3b", &credit, "1.00", "r-5")
        .await
        .expect_error(404, "not_found");
    let missing = json!({"credit_id": uuid::Uuid::now_v7().to_string()});
    reverse(&srv, "rv3", &missing, "1.00", "r-6")
        .await
        .expect_error(404, "not_found");
    srv.audit_ok().await;
}

#[tokio::test]
async fn the_same_external_ref_is_the_same_reversal_and_another_amount_conflicts() {
    let srv = Server::start().await;
    srv.create_user("rv4").await;
    let credit = srv.credit("rv4", "10.00").await;
    let first = reverse(&srv, "rv4", &credit, "3.00", "same")
        .await
        .expect(201);
    let again = reverse(&srv, "rv4", &credit, "3.00", "same")
        .await
        .expect(200);
    assert_eq!(again["reversal_id"], first["reversal_id"]);
    assert_eq!(srv.wallet("rv4").await.balance, 700, "taken once");
    reverse(&srv, "rv4", &credit, "2.00", "same")
        .await
        .expect_error(409, "external_ref_conflict");

    // The same idempotency key answers the stored outcome.
    let path = format!(
        "/v1/users/rv4/credits/{}/reversals",
        credit["credit_id"].as_str().unwrap()
    );
    let body = json!({"amount": "1.00", "reason": "psp_refund", "external_ref": "keyed"});
    let key = new_key();
    let one = srv.post_key(&path, Auth::Service, &key, &body).await;
    let two = srv.post_key(&path, Auth::Service, &key, &body).await;
    assert_eq!(one.expect(201), two.expect(201));
    assert!(two.replayed());
    assert_eq!(srv.wallet("rv4").await.balance, 600);
    srv.audit_ok().await;
}

#[tokio::test]
async fn bad_reversal_requests_are_refused_and_change_nothing() {
    let srv = Server::start().await;
    srv.create_user("rv5").await;
    let credit = srv.credit("rv5", "10.00").await;
    let path = format!(
        "/v1/users/rv5/credits/{}/reversals",
        credit["credit_id"].as_str().unwrap()
    );
    let ok = json!({"amount": "1.00", "reason": "chargeback", "external_ref": "x"});
    for (body, status, code) in [
        (
            json!({"amount": "1.00", "reason": "fraud", "external_ref": "x"}),
            400,
            "invalid_request",
        ),
        (
            json!({"amount": "0.00", "reason": "chargeback", "external_ref": "x"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"amount": "1.001", "reason": "chargeback", "external_ref": "x"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"amount": "1.00", "reason": "chargeback", "external_ref": "has space"}),
            400,
            "invalid_request",
        ),
        (
            json!({"amount": "1.00", "reason": "chargeback", "external_ref": "x", "extra": 1}),
            400,
            "invalid_request",
        ),
    ] {
        srv.post(&path, Auth::Service, &body)
            .await
            .expect_error(status, code);
    }
    srv.post(
        "/v1/users/rv5/credits/not-a-uuid/reversals",
        Auth::Service,
        &ok,
    )
    .await
    .expect_error(400, "invalid_request");
    let token = srv.user_token("rv5").await;
    srv.post(&path, Auth::user(&token), &ok)
        .await
        .expect_error(403, "forbidden");
    assert_eq!(srv.wallet("rv5").await.balance, 1000);
    srv.audit_ok().await;
}

#[tokio::test]
async fn an_account_with_debt_unfreezes_only_by_an_admins_force() {
    let srv = Server::start().await;
    srv.create_item("sword", "skin", "10.00").await;
    srv.create_user("rv6").await;
    let credit = srv.credit("rv6", "10.00").await;
    srv.order("rv6", &[("sword", 1)], true).await;
    reverse(&srv, "rv6", &credit, "10.00", "cb")
        .await
        .expect(201);
    let refused = srv
        .post("/v1/users/rv6/unfreeze", Auth::Service, &json!({}))
        .await
        .expect_error(409, "debt_outstanding");
    assert_eq!(refused["details"]["debt"], "10.00");
    srv.post(
        "/v1/users/rv6/unfreeze",
        Auth::Service,
        &json!({"force": true}),
    )
    .await
    .expect_error(403, "forbidden");
    let user = srv
        .post(
            "/v1/users/rv6/unfreeze",
            Auth::Admin,
            &json!({"force": true}),
        )
        .await
        .expect(200);
    assert_eq!(user["frozen"], Value::Null);
    assert_eq!(debt(&srv, "rv6").await, "10.00", "the debt stays");
    // An operator's own freeze is not lifted when the debt is repaid.
    srv.post(
        "/v1/users/rv6/freeze",
        Auth::Admin,
        &json!({"reason": "fraud review"}),
    )
    .await
    .expect(200);
    srv.credit("rv6", "10.00").await;
    assert_eq!(debt(&srv, "rv6").await, "0.00");
    let user = srv.get("/v1/users/rv6", Auth::Service).await.expect(200);
    assert_eq!(user["frozen"]["reason"], "fraud review");
    srv.audit_ok().await;
}

#[tokio::test]
async fn psp_refunds_of_a_top_up_full_or_partial_are_taken_once_and_never_exceed_it() {
    let srv = Server::start().await;
    srv.create_user("rv7").await;
    let topup = paid_topup(&srv, "rv7", "10.00").await;
    let payment = topup["psp_payment_id"].as_str().unwrap().to_owned();

    let by_topup = with(
        psp("rf-1", "payment.refunded", &topup, "rv7"),
        json!({"amount": "4.00"}),
    );
    let first = srv.webhook(&by_topup).await.expect(201);
    assert_eq!(first["source"]["type"], "topup");
    assert_eq!(first["reason"], "psp_refund");
    assert_eq!(first["external_ref"], "psp:rf-1");
    let replay = srv.webhook(&by_topup).await;
    assert_eq!(replay.expect(201), first);
    assert!(replay.replayed());

    // By the payment id instead of the top-up id.
    let by_payment = json!({"event_id": "rf-2", "type": "payment.refunded",
        "psp_payment_id": payment, "user_id": "rv7", "amount": "6.00"});
    srv.webhook(&by_payment).await.expect(201);
    let over = with(
        psp("rf-3", "payment.refunded", &topup, "rv7"),
        json!({"amount": "0.01"}),
    );
    srv.webhook(&over)
        .await
        .expect_error(409, "reversal_exceeds_credit");
    assert_eq!(srv.wallet("rv7").await.balance, 0);
    assert_eq!(debt(&srv, "rv7").await, "0.00");

    // Another user's payment id is not found.
    srv.create_user("rv7b").await;
    let stranger = json!({"event_id": "rf-4", "type": "payment.refunded",
        "psp_payment_id": payment, "user_id": "rv7b", "amount": "1.00"});
    srv.webhook(&stranger)
        .await
        .expect_error(404, "topup_not_found");
    srv.audit_ok().await;
}

#[tokio::test]
async fn a_refund_that_arrives_before_its_payment_is_refused_unstored_and_taken_when_sent_again() {
    let srv = Server::start().await;
    srv.create_user("rv8").await;
    let topup = srv.topup("rv8", "5.00").await;
    let refund = with(
        psp("early-refund", "payment.refunded", &topup, "rv8"),
        json!({"amount": "5.00"}),
    );
    srv.webhook(&refund)
        .await
        .expect_error(409, "invalid_state");
    let paid = with(
        psp("late-pay", "payment.succeeded", &topup, "rv8"),
        json!({"amount": "5.00", "psp_payment_id": "pi_rv8"}),
    );
    srv.webhook(&paid).await.expect(200);
    let taken = srv.webhook(&refund).await;
    taken.expect(201);
    assert!(!taken.replayed());
    assert_eq!(srv.wallet("rv8").await.balance, 0);
    srv.audit_ok().await;
}

#[tokio::test]
async fn a_dispute_holds_what_is_available_then_won_releases_it_and_lost_reverses_it_hold_first() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_user("rv9").await;
    let topup = paid_topup(&srv, "rv9", "10.00").await;

    let opened = with(
        psp("d1-open", "dispute.opened", &topup, "rv9"),
        json!({"dispute_id": "dp_1", "amount": "10.00"}),
    );
    let dispute = srv.webhook(&opened).await.expect(200);
    assert_eq!(dispute["status"], "OPEN");
    assert_eq!(dispute["held"], "10.00");
    assert_eq!(dispute["wallet"]["available"], "0.00");
    srv.create_order("rv9", &[("gems", 1)], true)
        .await
        .expect_error(409, "insufficient_funds");
    let won = with(
        psp("d1-won", "dispute.closed", &topup, "rv9"),
        json!({"dispute_id": "dp_1", "outcome": "won"}),
    );
    let closed = srv.webhook(&won).await.expect(200);
    assert_eq!(closed["status"], "WON");
    assert_eq!(closed["held"], "0.00");
    assert_eq!(closed["reversal"], Value::Null);
    assert_eq!(srv.wallet("rv9").await.available, 1000);

    // Spend 7, then a second dispute holds only the 3 left; lost: 3 from the hold, 7 of debt.
    srv.order("rv9", &[("gems", 7)], true).await;
    let opened = with(
        psp("d2-open", "dispute.opened", &topup, "rv9"),
        json!({"dispute_id": "dp_2", "amount": "10.00"}),
    );
    assert_eq!(srv.webhook(&opened).await.expect(200)["held"], "3.00");
    let lost = with(
        psp("d2-lost", "dispute.closed", &topup, "rv9"),
        json!({"dispute_id": "dp_2", "outcome": "lost"}),
    );
    let closed = srv.webhook(&lost).await.expect(200);
    assert_eq!(closed["status"], "LOST");
    assert_eq!(closed["reversal"]["from_hold"], "3.00");
    assert_eq!(closed["reversal"]["from_wallet"], "0.00");
    assert_eq!(closed["reversal"]["debt"], "7.00");
    assert_eq!(closed["reversal"]["external_ref"], "dispute:dp_2");
    let wallet = srv.wallet("rv9").await;
    assert_eq!((wallet.balance, wallet.held), (0, 0));
    assert_eq!(debt(&srv, "rv9").await, "7.00");
    let user = srv.get("/v1/users/rv9", Auth::Service).await.expect(200);
    assert_eq!(user["frozen"]["reason"], "debt_outstanding");
    // The top-up has nothing left to dispute.
    let third = with(
        psp("d3-open", "dispute.opened", &topup, "rv9"),
        json!({"dispute_id": "dp_3", "amount": "0.01"}),
    );
    srv.webhook(&third)
        .await
        .expect_error(409, "reversal_exceeds_credit");
    srv.audit_ok().await;
}

#[tokio::test]
async fn dispute_events_replayed_and_reordered_are_taken_once() {
    let srv = Server::start().await;
    srv.create_user("rv10").await;
    let topup = paid_topup(&srv, "rv10", "10.00").await;
    let opened = with(
        psp("o-1", "dispute.opened", &topup, "rv10"),
        json!({"dispute_id": "dp_x", "amount": "4.00"}),
    );
    let lost_without_amount = with(
        psp("c-1", "dispute.closed", &topup, "rv10"),
        json!({"dispute_id": "dp_x", "outcome": "lost"}),
    );
    // The close overtook the open and names no amount: refused, not stored, taken when sent again.
    srv.webhook(&lost_without_amount)
        .await
        .expect_error(404, "not_found");
    srv.webhook(&opened).await.expect(200);
    let closed = srv.webhook(&lost_without_amount).await.expect(200);
    assert_eq!(closed["reversal"]["amount"], "4.00");
    // Replays, and the same facts under new event ids, change nothing.
    srv.webhook(&opened).await.expect(200);
    srv.webhook(&lost_without_amount).await.expect(200);
    let reopened = with(opened.clone(), json!({"event_id": "o-2"}));
    assert_eq!(srv.webhook(&reopened).await.expect(200)["status"], "LOST");
    let relost = with(lost_without_amount.clone(), json!({"event_id": "c-2"}));
    srv.webhook(&relost).await.expect(200);
    assert_eq!(srv.wallet("rv10").await.balance, 600);

    // A close with its amount, before any open: the reversal happens, the late open is a no-op.
    let lost = with(
        psp("c-3", "dispute.closed", &topup, "rv10"),
        json!({"dispute_id": "dp_y", "outcome": "lost", "amount": "2.00"}),
    );
    assert_eq!(srv.webhook(&lost).await.expect(200)["status"], "LOST");
    let late_open = with(
        psp("o-3", "dispute.opened", &topup, "rv10"),
        json!({"dispute_id": "dp_y", "amount": "2.00"}),
    );
    let unchanged = srv.webhook(&late_open).await.expect(200);
    assert_eq!(unchanged["status"], "LOST");
    assert_eq!(unchanged["held"], "0.00");
    // A won close before its open: recorded, so the late open holds nothing.
    let won = with(
        psp("c-4", "dispute.closed", &topup, "rv10"),
        json!({"dispute_id": "dp_z", "outcome": "won"}),
    );
    srv.webhook(&won).await.expect(200);
    let late_open = with(
        psp("o-4", "dispute.opened", &topup, "rv10"),
        json!({"dispute_id": "dp_z", "amount": "1.00"}),
    );
    assert_eq!(srv.webhook(&late_open).await.expect(200)["status"], "WON");
    let wallet = srv.wallet("rv10").await;
    assert_eq!((wallet.balance, wallet.held), (400, 0));
    srv.audit_ok().await;
}

#[tokio::test]
async fn bad_psp_reversal_events_are_refused() {
    let srv = Server::start().await;
    srv.create_user("rv11").await;
    let topup = paid_topup(&srv, "rv11", "10.00").await;
    let base = psp("bad", "dispute.closed", &topup, "rv11");
    for (event, status, code) in [
        (
            with(base.clone(), json!({"dispute_id": "d", "outcome": "maybe"})),
            400,
            "invalid_request",
        ),
        (
            with(base.clone(), json!({"outcome": "won"})),
            400,
            "invalid_request",
        ),
        (
            with(
                psp("bad", "dispute.opened", &topup, "rv11"),
                json!({"dispute_id": "d"}),
            ),
            400,
            "invalid_request",
        ),
        (
            json!({"event_id": "bad", "type": "payment.refunded", "user_id": "rv11", "amount": "1.00"}),
            400,
            "invalid_request",
        ),
        (
            with(
                psp("bad", "payment.refunded", &topup, "rv11"),
                json!({"amount": "-1.00"}),
            ),
            422,
            "invalid_amount",
        ),
    ] {
        srv.webhook(&event).await.expect_error(status, code);
    }
    assert_eq!(srv.wallet("rv11").await.balance, 1000);
}

#[tokio::test]
async fn on_reversal_revoke_refunds_the_newest_unconsumed_purchases_since_the_credit_first() {
    let srv = Server::start_with(Opts::new().env("SHOPKEEP_ON_REVERSAL", "revoke")).await;
    srv.create_item("sword", "skin", "10.00").await;
    srv.create_item("shield", "skin", "10.00").await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_user("rv12").await;
    srv.credit("rv12", "10.00").await;
    let before = srv.order("rv12", &[("sword", 1)], true).await;
    let credit = srv.credit("rv12", "20.00").await;
    let shield = srv.order("rv12", &[("shield", 1)], true).await;
    let gems = srv.order("rv12", &[("gems", 10)], true).await;
    srv.consume("rv12", "gems", Auth::Service, json!(4))
        .await
        .expect(200);

    let reversal = reverse(&srv, "rv12", &credit, "20.00", "cb-revoke")
        .await
        .expect(201);
    // Newest first: the 6 unconsumed gems, then the shield; the sword was bought before the credit.
    assert_eq!(reversal["revoked_amount"], "16.00");
    assert_eq!(reversal["debt"], "4.00");
    let refunds = reversal["revoked_refunds"].as_array().unwrap();
    assert_eq!(refunds.len(), 2);
    let gems_after = srv
        .get_order("rv12", gems["order_id"].as_str().unwrap())
        .await;
    assert_eq!(gems_after["status"], "PARTIALLY_REFUNDED");
    assert_eq!(gems_after["lines"][0]["refunded_quantity"], 6);
    let shield_after = srv
        .get_order("rv12", shield["order_id"].as_str().unwrap())
        .await;
    assert_eq!(shield_after["status"], "REFUNDED");
    let sword_after = srv
        .get_order("rv12", before["order_id"].as_str().unwrap())
        .await;
    assert_eq!(sword_after["status"], "COMPLETED");
    assert_eq!(srv.entitlement_qty("rv12", "shield").await, 0);
    assert_eq!(srv.entitlement_qty("rv12", "gems").await, 0);
    assert_eq!(srv.entitlement_qty("rv12", "sword").await, 1);
    assert_eq!(srv.wallet("rv12").await.balance, 0);
    assert_eq!(debt(&srv, "rv12").await, "4.00");
    srv.audit_ok().await;
}

#[tokio::test]
async fn on_reversal_revoke_records_no_debt_when_the_purchases_cover_it() {
    let srv = Server::start_with(Opts::new().env("SHOPKEEP_ON_REVERSAL", "revoke")).await;
    srv.create_item("sword", "skin", "15.00").await;
    srv.create_user("rv13").await;
    let credit = srv.credit("rv13", "20.00").await;
    srv.order("rv13", &[("sword", 1)], true).await;
    let reversal = reverse(&srv, "rv13", &credit, "20.00", "cb")
        .await
        .expect(201);
    assert_eq!(reversal["from_wallet"], "20.00");
    assert_eq!(reversal["revoked_amount"], "15.00");
    assert_eq!(reversal["debt"], "0.00");
    assert_eq!(srv.wallet("rv13").await.balance, 0);
    let user = srv.get("/v1/users/rv13", Auth::Service).await.expect(200);
    assert_eq!(user["frozen"], Value::Null);
    srv.audit_ok().await;
}

#[tokio::test]
async fn psp_event_and_dispute_ids_of_the_longest_allowed_length_are_reversed() {
    let srv = Server::start().await;
    srv.create_user("rv14").await;
    let topup = paid_topup(&srv, "rv14", "10.00").await;
    let long = "e".repeat(255);
    let refund = with(
        psp(&long, "payment.refunded", &topup, "rv14"),
        json!({"amount": "1.00"}),
    );
    let reversal = srv.webhook(&refund).await.expect(201);
    assert_eq!(reversal["external_ref"], format!("psp:{long}"));
    let dispute = "d".repeat(255);
    let lost = with(
        psp("lost-long", "dispute.closed", &topup, "rv14"),
        json!({"dispute_id": dispute, "outcome": "lost", "amount": "2.00"}),
    );
    let closed = srv.webhook(&lost).await.expect(200);
    assert_eq!(
        closed["reversal"]["external_ref"],
        format!("dispute:{dispute}")
    );
    assert_eq!(srv.wallet("rv14").await.balance, 700);
    srv.audit_ok().await;
}
