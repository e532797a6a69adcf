//! Idempotency keys: replays, reuse, scoping, refused requests, lookup, restarts.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::*;

async fn shop(srv: &Server, user: &str, balance: &str) {
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_item("skin", "skin", "3.00").await;
    srv.funded_user(user, balance).await;
}

#[tokio::test]
async fn replay_returns_identical_body_and_replayed_header() {
    let srv = Server::start().await;
    shop(&srv, "i1", "10.00").await;
    let key = new_key();
    let body = order_body(&[("gems", 2)], false);
    let first = srv
        .post_key("/v1/users/i1/orders", Auth::Service, &key, &body)
        .await;
    first.expect(201);
    assert!(
        !first.replayed(),
        "first response must not be marked replayed: {first:?}"
    );
    for _ in 0..3 {
        let again = srv
            .post_key("/v1/users/i1/orders", Auth::Service, &key, &body)
            .await;
        assert_eq!(again.status, 201, "{again:?}");
        assert_eq!(again.body, first.body, "replay body differs byte-wise");
        assert_eq!(
            again.header("idempotent-replayed").as_deref(),
            Some("true"),
            "{again:?}"
        );
    }
    assert_eq!(srv.all_orders("i1", "").await.len(), 1);
    assert_eq!(srv.wallet("i1").await.held, 200);
}

#[tokio::test]
async fn replay_returns_the_stored_body_not_the_current_state() {
    let srv = Server::start().await;
    srv.create_user("i2").await;
    let key = new_key();
    let body = json!({"amount": "5.00", "external_ref": "ref-i2", "source": "card"});
    let first = srv
        .post_key("/v1/users/i2/credits", Auth::Service, &key, &body)
        .await;
    assert_eq!(first.expect(201)["wallet"]["balance"], "5.00");
    srv.credit("i2", "1.00").await;
    let again = srv
        .post_key("/v1/users/i2/credits", Auth::Service, &key, &body)
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    assert_eq!(srv.wallet("i2").await.balance, 600);
}

#[tokio::test]
async fn business_errors_are_stored_and_replayed() {
    let srv = Server::start().await;
    shop(&srv, "i3", "1.00").await;
    let key = new_key();
    let body = order_body(&[("skin", 1)], true);
    let first = srv
        .post_key("/v1/users/i3/orders", Auth::Service, &key, &body)
        .await;
    first.expect_error(409, "insufficient_funds");
    // Even once the money is there, the key keeps its outcome.
    srv.credit("i3", "10.00").await;
    let again = srv
        .post_key("/v1/users/i3/orders", Auth::Service, &key, &body)
        .await;
    assert_eq!(again.status, 409);
    assert_eq!(again.body, first.body);
    assert!(again.replayed(), "{again:?}");
    assert!(srv.all_orders("i3", "").await.is_empty());
    assert_eq!(srv.wallet("i3").await.balance, 1100);
    // The lookup shows the stored error outcome.
    let l = srv
        .get(&format!("/v1/users/i3/idempotency/{key}"), Auth::Service)
        .await
        .expect(200);
    assert_eq!(l["status"], 409);
    assert_eq!(l["body"], first.json());
    // A new key buys it.
    srv.post("/v1/users/i3/orders", Auth::Service, &body)
        .await
        .expect(201);
}

#[tokio::test]
async fn same_key_with_a_different_body_is_idempotency_key_reused() {
    let srv = Server::start().await;
    shop(&srv, "i4", "10.00").await;
    let key = new_key();
    let first = srv
        .post_key(
            "/v1/users/i4/orders",
            Auth::Service,
            &key,
            &order_body(&[("gems", 1)], false),
        )
        .await;
    first.expect(201);
    srv.post_key(
        "/v1/users/i4/orders",
        Auth::Service,
        &key,
        &order_body(&[("gems", 2)], false),
    )
    .await
    .expect_error(422, "idempotency_key_reused");
    // same key, other endpoint of the same user
    srv.post_key(
        "/v1/users/i4/credits",
        Auth::Service,
        &key,
        &json!({"amount": "1.00", "external_ref": "ref-i4", "source": "card"}),
    )
    .await
    .expect_error(422, "idempotency_key_reused");
    assert_eq!(srv.all_orders("i4", "").await.len(), 1);
    assert_eq!(
        srv.wallet("i4").await,
        Wallet {
            balance: 1000,
            held: 100,
            available: 900
        }
    );
    // The original still replays.
    let again = srv
        .post_key(
            "/v1/users/i4/orders",
            Auth::Service,
            &key,
            &order_body(&[("gems", 1)], false),
        )
        .await;
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
}

#[tokio::test]
async fn keys_are_scoped_per_user() {
    let srv = Server::start().await;
    shop(&srv, "i5", "10.00").await;
    srv.funded_user("i6", "10.00").await;
    let key = new_key();
    let body = order_body(&[("gems", 1)], true);
    let a = srv
        .post_key("/v1/users/i5/orders", Auth::Service, &key, &body)
        .await
        .expect(201);
    let b = srv
        .post_key("/v1/users/i6/orders", Auth::Service, &key, &body)
        .await;
    assert!(!b.replayed());
    let b = b.expect(201);
    assert_ne!(a["order_id"], b["order_id"]);
    assert_eq!(srv.wallet("i5").await.balance, 900);
    assert_eq!(srv.wallet("i6").await.balance, 900);
}

#[tokio::test]
async fn global_scope_keys_replay_user_creation() {
    let srv = Server::start().await;
    let key = new_key();
    let body = json!({"user_id": "i7", "display_name": "Seven"});
    let first = srv.post_key("/v1/users", Auth::Service, &key, &body).await;
    first.expect(201);
    let again = srv.post_key("/v1/users", Auth::Service, &key, &body).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    srv.post_key("/v1/users", Auth::Service, &key, &json!({"user_id": "i8"}))
        .await
        .expect_error(422, "idempotency_key_reused");
    srv.get("/v1/users/i8", Auth::Service)
        .await
        .expect_error(404, "user_not_found");
}

#[tokio::test]
async fn complete_and_cancel_replay_too() {
    let srv = Server::start().await;
    shop(&srv, "i9", "10.00").await;
    let o = srv.order("i9", &[("gems", 2)], false).await;
    let id = o["order_id"].as_str().unwrap();
    let path = format!("/v1/users/i9/orders/{id}/complete");
    let key = new_key();
    let first = srv.post_key(&path, Auth::Service, &key, &json!({})).await;
    first.expect(200);
    let again = srv.post_key(&path, Auth::Service, &key, &json!({})).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    assert_eq!(srv.wallet("i9").await.balance, 800);
    // cancel with the same key is another fingerprint
    srv.post_key(
        &format!("/v1/users/i9/orders/{id}/cancel"),
        Auth::Service,
        &key,
        &json!({}),
    )
    .await
    .expect_error(422, "idempotency_key_reused");
}

#[tokio::test]
async fn missing_idempotency_key_is_refused_on_every_post() {
    let srv = Server::start().await;
    shop(&srv, "ik", "10.00").await;
    let o = srv.order("ik", &[("gems", 1)], true).await;
    let id = o["order_id"].as_str().unwrap();
    let p = srv.order("ik", &[("gems", 1)], false).await;
    let pid = p["order_id"].as_str().unwrap();
    let posts: Vec<(String, Value)> = vec![
        ("/v1/users".into(), json!({"user_id": "nokey"})),
        ("/v1/users/ik/tokens".into(), json!({"ttl_seconds": 60})),
        (
            "/v1/users/ik/credits".into(),
            json!({"amount": "1.00", "external_ref": "nokey", "source": "card"}),
        ),
        ("/v1/users/ik/topups".into(), json!({"amount": "1.00"})),
        (
            "/v1/users/ik/orders".into(),
            order_body(&[("gems", 1)], true),
        ),
        (format!("/v1/users/ik/orders/{pid}/complete"), json!({})),
        (format!("/v1/users/ik/orders/{pid}/cancel"), json!({})),
        (format!("/v1/users/ik/orders/{id}/refunds"), json!({})),
        (
            "/v1/users/ik/entitlements/gems/consume".into(),
            json!({"quantity": 1}),
        ),
    ];
    let before = srv.wallet("ik").await;
    for (path, body) in posts {
        srv.call(Method::POST, &path)
            .auth(Auth::Admin)
            .json(&body)
            .send()
            .await
            .expect_error(400, "idempotency_key_required");
    }
    assert_eq!(srv.wallet("ik").await, before);
    assert_eq!(srv.get_order("ik", pid).await["status"], "PENDING");
    assert_eq!(srv.get_order("ik", id).await["status"], "COMPLETED");
    assert_eq!(srv.entitlement_qty("ik", "gems").await, 1);
    srv.get("/v1/users/nokey", Auth::Service)
        .await
        .expect_error(404, "user_not_found");
}

#[tokio::test]
async fn idempotency_key_must_be_1_to_255_printable_ascii() {
    let srv = Server::start().await;
    shop(&srv, "il", "10.00").await;
    let ok = "k".repeat(255);
    srv.post_key(
        "/v1/users/il/orders",
        Auth::Service,
        &ok,
        &order_body(&[("gems", 1)], true),
    )
    .await
    .expect(201);
    let long = "k".repeat(256);
    let r = srv
        .post_key(
            "/v1/users/il/orders",
            Auth::Service,
            &long,
            &order_body(&[("gems", 1)], true),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        matches!(
            r.code().as_deref(),
            Some("invalid_request") | Some("idempotency_key_required")
        ),
        "{r:?}"
    );
    let r = srv
        .post_key(
            "/v1/users/il/orders",
            Auth::Service,
            "",
            &order_body(&[("gems", 1)], true),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(srv.wallet("il").await.balance, 900);
}

/// A request refused before the state machine stores nothing: the same key works once the request is fixed.
#[tokio::test]
async fn refused_requests_store_nothing_under_their_key() {
    let srv = Server::start().await;
    shop(&srv, "ir", "10.00").await;
    srv.create_user("other").await;
    let other_tok = srv.user_token("other").await;
    let good = order_body(&[("gems", 1)], true);
    let cases: Vec<(&str, Auth, Vec<u8>, u16, &str)> = vec![
        ("bad json", Auth::Service, b"{\"lines\": [".to_vec(), 400, "invalid_request"),
        (
            "unknown field",
            Auth::Service,
            serde_json::to_vec(&json!({"lines": [{"item_id": "gems", "quantity": 1}], "complete": true, "total": "0.01"})).unwrap(),
            400,
            "invalid_request",
        ),
        ("no token", Auth::None, serde_json::to_vec(&good).unwrap(), 401, "unauthenticated"),
        ("bad token", Auth::Bearer("nope".into()), serde_json::to_vec(&good).unwrap(), 401, "unauthenticated"),
        ("other user", Auth::user(&other_tok), serde_json::to_vec(&good).unwrap(), 403, "forbidden"),
        (
            "number money",
            Auth::Service,
            serde_json::to_vec(&json!({"lines": [{"item_id": "gems", "quantity": 1}], "complete": true, "expected_total": 1.0})).unwrap(),
            422,
            "invalid_amount",
        ),
        (
            "too large",
            Auth::Service,
            serde_json::to_vec(&json!({"lines": [{"item_id": "gems", "quantity": 1}], "complete": true, "pad": "x".repeat(70 * 1024)})).unwrap(),
            413,
            "payload_too_large",
        ),
    ];
    for (what, auth, body, status, code) in cases {
        let key = new_key();
        let r = srv
            .call(Method::POST, "/v1/users/ir/orders")
            .auth(auth)
            .key(&key)
            .raw(body)
            .send()
            .await;
        assert_eq!(
            (r.status, r.code().as_deref()),
            (status, Some(code)),
            "{what}: {r:?}"
        );
        srv.get(&format!("/v1/users/ir/idempotency/{key}"), Auth::Service)
            .await
            .expect_error(404, "not_found");
        let fixed = srv
            .post_key("/v1/users/ir/orders", Auth::Service, &key, &good)
            .await;
        assert!(!fixed.replayed(), "{what}: {fixed:?}");
        assert_eq!(
            fixed.status, 201,
            "{what}: the key must be usable after the refusal: {fixed:?}"
        );
    }
    assert_eq!(srv.all_orders("ir", "").await.len(), 7);
    assert_eq!(srv.wallet("ir").await.balance, 300);
}

#[tokio::test]
async fn idempotency_lookup_returns_the_stored_outcome() {
    let srv = Server::start().await;
    shop(&srv, "iq", "10.00").await;
    let key = new_key();
    let r = srv
        .post_key(
            "/v1/users/iq/orders",
            Auth::Service,
            &key,
            &order_body(&[("gems", 2)], true),
        )
        .await;
    let o = r.expect(201);
    let l = srv
        .get(&format!("/v1/users/iq/idempotency/{key}"), Auth::Service)
        .await
        .expect(200);
    assert_eq!(l["key"], json!(key));
    assert_eq!(l["status"], 201);
    assert_eq!(l["body"], o);
    ts(&l["created_at"]);
    // the user itself may look it up, another user may not
    let tok = srv.user_token("iq").await;
    let mine = srv
        .get(&format!("/v1/users/iq/idempotency/{key}"), Auth::user(&tok))
        .await
        .expect(200);
    assert_eq!(mine, l);
    srv.create_user("iz").await;
    let other = srv.user_token("iz").await;
    srv.get(
        &format!("/v1/users/iq/idempotency/{key}"),
        Auth::user(&other),
    )
    .await
    .expect_error(403, "forbidden");
    // the key is scoped to the user
    srv.get(&format!("/v1/users/iz/idempotency/{key}"), Auth::Service)
        .await
        .expect_error(404, "not_found");
    srv.get(
        &format!("/v1/users/iq/idempotency/{}", new_key()),
        Auth::Service,
    )
    .await
    .expect_error(404, "not_found");
    srv.get(&format!("/v1/users/iq/idempotency/{key}"), Auth::None)
        .await
        .expect_error(401, "unauthenticated");
    // looking up changes nothing
    assert_eq!(srv.all_orders("iq", "").await.len(), 1);
}

#[tokio::test]
async fn replay_survives_a_restart() {
    let mut srv = Server::start().await;
    shop(&srv, "is", "10.00").await;
    let key = new_key();
    let body = order_body(&[("gems", 3)], true);
    let first = srv
        .post_key("/v1/users/is/orders", Auth::Service, &key, &body)
        .await;
    first.expect(201);
    srv.restart().await;
    let again = srv
        .post_key("/v1/users/is/orders", Auth::Service, &key, &body)
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    srv.kill9();
    srv.restart().await;
    let again = srv
        .post_key("/v1/users/is/orders", Auth::Service, &key, &body)
        .await;
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    assert_eq!(srv.wallet("is").await.balance, 700);
    assert_eq!(srv.all_orders("is", "").await.len(), 1);
}

#[tokio::test]
async fn replay_of_a_refund_does_not_refund_twice() {
    let srv = Server::start().await;
    shop(&srv, "it", "10.00").await;
    let o = srv.order("it", &[("gems", 4)], true).await;
    let path = format!(
        "/v1/users/it/orders/{}/refunds",
        o["order_id"].as_str().unwrap()
    );
    let key = new_key();
    let body = json!({"lines": [{"item_id": "gems", "quantity": 1}], "reason": "x"});
    let first = srv.post_key(&path, Auth::Service, &key, &body).await;
    first.expect(201);
    for _ in 0..3 {
        let again = srv.post_key(&path, Auth::Service, &key, &body).await;
        assert_eq!(again.body, first.body);
        assert!(again.replayed());
    }
    assert_eq!(srv.wallet("it").await.balance, 700);
    assert_eq!(srv.entitlement_qty("it", "gems").await, 3);
}

#[tokio::test]
async fn replay_of_a_consume_does_not_consume_twice() {
    let srv = Server::start().await;
    shop(&srv, "iu", "10.00").await;
    srv.order("iu", &[("gems", 4)], true).await;
    let key = new_key();
    let path = "/v1/users/iu/entitlements/gems/consume";
    let first = srv
        .post_key(path, Auth::Service, &key, &json!({"quantity": 3}))
        .await;
    first.expect(200);
    let again = srv
        .post_key(path, Auth::Service, &key, &json!({"quantity": 3}))
        .await;
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    assert_eq!(srv.entitlement_qty("iu", "gems").await, 1);
}

#[tokio::test]
async fn fingerprint_uses_the_canonical_body() {
    let srv = Server::start().await;
    shop(&srv, "cf", "10.00").await;
    let key = new_key();
    let a = br#"{"lines":[{"item_id":"gems","quantity":2}],"complete":true}"#.to_vec();
    let b = br#"{ "complete" : true,
                  "lines" : [ { "quantity" : 2, "item_id" : "gems" } ] }"#
        .to_vec();
    let first = srv
        .call(Method::POST, "/v1/users/cf/orders")
        .auth(Auth::Service)
        .key(&key)
        .raw(a)
        .send()
        .await;
    first.expect(201);
    let again = srv
        .call(Method::POST, "/v1/users/cf/orders")
        .auth(Auth::Service)
        .key(&key)
        .raw(b)
        .send()
        .await;
    assert_eq!(
        again.status, 201,
        "same JSON, other key order/whitespace is the same request: {again:?}"
    );
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    assert_eq!(srv.wallet("cf").await.balance, 800);
}

#[tokio::test]
async fn replay_by_another_authorised_caller_gets_the_stored_outcome() {
    let srv = Server::start().await;
    shop(&srv, "ac", "10.00").await;
    let tok = srv.user_token("ac").await;
    let key = new_key();
    let body = order_body(&[("gems", 1)], true);
    let first = srv
        .post_key("/v1/users/ac/orders", Auth::user(&tok), &key, &body)
        .await;
    first.expect(201);
    let again = srv
        .post_key("/v1/users/ac/orders", Auth::Service, &key, &body)
        .await;
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    assert_eq!(srv.wallet("ac").await.balance, 900);
}

#[tokio::test]
async fn replay_echoes_the_new_request_id() {
    let srv = Server::start().await;
    shop(&srv, "rr", "10.00").await;
    let key = new_key();
    let body = order_body(&[("gems", 1)], false);
    let first = srv
        .call(Method::POST, "/v1/users/rr/orders")
        .auth(Auth::Service)
        .key(&key)
        .header("x-request-id", "first-request")
        .json(&body)
        .send()
        .await;
    first.expect(201);
    let again = srv
        .call(Method::POST, "/v1/users/rr/orders")
        .auth(Auth::Service)
        .key(&key)
        .header("x-request-id", "second-request")
        .json(&body)
        .send()
        .await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(
        again.header("x-request-id").as_deref(),
        Some("second-request")
    );
}

#[tokio::test]
async fn idempotency_lookup_for_an_unknown_user_is_user_not_found() {
    let srv = Server::start().await;
    srv.get(
        &format!("/v1/users/ghost/idempotency/{}", new_key()),
        Auth::Service,
    )
    .await
    .expect_error(404, "user_not_found");
}

#[tokio::test]
async fn a_user_token_cannot_read_back_a_token_issuance() {
    let srv = Server::start().await;
    srv.create_user("tk").await;
    // The service mints a 30-day token under a key it chose.
    let key = new_key();
    let minted = srv
        .post_key(
            "/v1/users/tk/tokens",
            Auth::Service,
            &key,
            &json!({"ttl_seconds": 30 * 86_400}),
        )
        .await
        .expect(201);
    let long_token = minted["token"].as_str().expect("token").to_owned();
    let short = srv
        .post(
            "/v1/users/tk/tokens",
            Auth::Service,
            &json!({"ttl_seconds": 60}),
        )
        .await
        .expect(201);
    let short_token = short["token"].as_str().expect("token");
    let path = format!("/v1/users/tk/idempotency/{key}");
    // To the short-lived user token the key looks empty: the same answer as a key never used.
    let hidden = srv
        .get(&path, Auth::user(short_token))
        .await
        .expect_error(404, "not_found");
    let unused = srv
        .get(
            &format!("/v1/users/tk/idempotency/{}", new_key()),
            Auth::user(short_token),
        )
        .await
        .expect_error(404, "not_found");
    assert_eq!(hidden, unused);
    // The service and the admin still learn the outcome, token included.
    for auth in [Auth::Service, Auth::Admin] {
        let seen = srv.get(&path, auth).await.expect(200);
        assert_eq!(seen["status"], 201);
        assert_eq!(seen["body"]["token"], json!(long_token));
    }
    // The user's other outcomes stay visible to it.
    let topup_key = new_key();
    srv.post_key(
        "/v1/users/tk/topups",
        Auth::user(short_token),
        &topup_key,
        &json!({"amount": "1.00"}),
    )
    .await
    .expect(201);
    srv.get(
        &format!("/v1/users/tk/idempotency/{topup_key}"),
        Auth::user(short_token),
    )
    .await
    .expect(200);
}

/// Past `--idempotency-ttl` the sweeper's walk purges an outcome (through a `PurgeIdempotency` of the
/// shard), the lookup stops finding it, the key runs a new request, and the purge survives a restart.
#[tokio::test]
async fn outcomes_past_their_retention_are_purged_and_the_key_runs_anew() {
    let mut srv =
        Server::start_with(Opts::new().idempotency_ttl("2s").sweep_interval("200ms")).await;
    shop(&srv, "ip", "10.00").await;
    let key = new_key();
    let lookup = format!("/v1/users/ip/idempotency/{key}");
    let first = srv
        .post_key(
            "/v1/users/ip/orders",
            Auth::Service,
            &key,
            &order_body(&[("gems", 2)], true),
        )
        .await
        .expect(201);
    srv.get(&lookup, Auth::Service).await.expect(200);
    let purged = eventually(Duration::from_secs(15), || {
        let srv = srv.api();
        let lookup = lookup.clone();
        async move { (srv.get(&lookup, Auth::Service).await.status == 404).then_some(()) }
    })
    .await;
    assert!(
        purged.is_some(),
        "the outcome outlived its retention by 13 s"
    );
    let counted = crate::metrics::scrape(&srv.api().base)
        .await
        .value("shopkeep_purged_idempotency_records_total", &[])
        .unwrap_or_default();
    assert!(counted >= 1.0, "purges counted: {counted}");
    srv.kill9();
    srv.restart().await;
    srv.get(&lookup, Auth::Service)
        .await
        .expect_error(404, "not_found");
    // The key is free again: another body under it is a new order, not `idempotency_key_reused`.
    let second = srv
        .post_key(
            "/v1/users/ip/orders",
            Auth::Service,
            &key,
            &order_body(&[("gems", 3)], true),
        )
        .await;
    let second = second.expect(201);
    assert_ne!(second["order_id"], first["order_id"]);
    assert_eq!(srv.all_orders("ip", "").await.len(), 2);
}
