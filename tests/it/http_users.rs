//! Users, wallets and user tokens.

use serde_json::json;
use time::OffsetDateTime;

use crate::harness::*;

#[tokio::test]
async fn create_user_returns_contract_shape_with_empty_wallet() {
    let srv = Server::start().await;
    let before = OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let r = srv
        .post(
            "/v1/users",
            Auth::Service,
            &json!({"user_id": "player-42", "display_name": "Ada"}),
        )
        .await;
    let u = r.expect(201);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"),
        "{r:?}"
    );
    assert_eq!(u["user_id"], "player-42");
    assert_eq!(u["display_name"], "Ada");
    let created = ts(&u["created_at"]);
    assert!(created >= before && created <= OffsetDateTime::now_utc() + time::Duration::seconds(5));
    assert_includes(
        &u["wallet"],
        &json!({"currency": "EUR", "balance": "0.00", "held": "0.00", "available": "0.00"}),
    );
}

#[tokio::test]
async fn create_user_without_id_gets_uuidv7_and_null_display_name() {
    let srv = Server::start().await;
    let u = srv
        .post("/v1/users", Auth::Service, &json!({}))
        .await
        .expect(201);
    assert_uuid_v7(&u["user_id"]);
    assert!(
        u["display_name"].is_null(),
        "display_name should be null when not given: {u}"
    );
    let id = u["user_id"].as_str().unwrap();
    let got = srv
        .get(&format!("/v1/users/{id}"), Auth::Service)
        .await
        .expect(200);
    assert_eq!(got, u);
}

#[tokio::test]
async fn admin_may_create_users_too() {
    let srv = Server::start().await;
    srv.post("/v1/users", Auth::Admin, &json!({"user_id": "by-admin"}))
        .await
        .expect(201);
}

#[tokio::test]
async fn display_name_is_limited_to_100_chars() {
    let srv = Server::start().await;
    let ok = "x".repeat(100);
    let u = srv
        .post(
            "/v1/users",
            Auth::Service,
            &json!({"user_id": "u100", "display_name": ok}),
        )
        .await
        .expect(201);
    assert_eq!(u["display_name"], json!(ok));
    srv.post(
        "/v1/users",
        Auth::Service,
        &json!({"user_id": "u101", "display_name": "x".repeat(101)}),
    )
    .await
    .expect_error(400, "invalid_request");
    srv.get("/v1/users/u101", Auth::Service)
        .await
        .expect_error(404, "user_not_found");
    // characters, not bytes
    let accented = "é".repeat(100);
    let u = srv
        .post(
            "/v1/users",
            Auth::Service,
            &json!({"user_id": "u100e", "display_name": accented}),
        )
        .await
        .expect(201);
    assert_eq!(u["display_name"], json!(accented));
}

#[tokio::test]
async fn get_user_returns_the_created_shape() {
    let srv = Server::start().await;
    let created = srv
        .post(
            "/v1/users",
            Auth::Service,
            &json!({"user_id": "p1", "display_name": "Bob"}),
        )
        .await
        .expect(201);
    let got = srv.get("/v1/users/p1", Auth::Service).await.expect(200);
    assert_eq!(got, created);
    let admin = srv.get("/v1/users/p1", Auth::Admin).await.expect(200);
    assert_eq!(admin, created);
}

#[tokio::test]
async fn wallet_endpoint_returns_the_wallet_object() {
    let srv = Server::start().await;
    srv.create_user("w1").await;
    srv.credit("w1", "12.50").await;
    let w = srv
        .get("/v1/users/w1/wallet", Auth::Service)
        .await
        .expect(200);
    assert_includes(
        &w,
        &json!({"currency": "EUR", "balance": "12.50", "held": "0.00", "available": "12.50"}),
    );
    let u = srv.get("/v1/users/w1", Auth::Service).await.expect(200);
    assert_eq!(u["wallet"], w);
}

#[tokio::test]
async fn existing_user_id_under_new_key_is_user_exists() {
    let srv = Server::start().await;
    srv.create_user("dup").await;
    srv.credit("dup", "5.00").await;
    srv.post(
        "/v1/users",
        Auth::Service,
        &json!({"user_id": "dup", "display_name": "Other"}),
    )
    .await
    .expect_error(409, "user_exists");
    let u = srv.get("/v1/users/dup", Auth::Service).await.expect(200);
    assert!(u["display_name"].is_null(), "user was overwritten: {u}");
    assert_eq!(u["wallet"]["balance"], "5.00");
}

#[tokio::test]
async fn unknown_user_is_user_not_found_on_every_user_path() {
    let srv = Server::start().await;
    srv.create_item("gem", "currency", "1.00").await;
    let oid = uuid::Uuid::now_v7().to_string();
    for path in [
        "/v1/users/ghost".to_string(),
        "/v1/users/ghost/wallet".into(),
        "/v1/users/ghost/orders".into(),
        format!("/v1/users/ghost/orders/{oid}"),
        "/v1/users/ghost/ledger".into(),
        "/v1/users/ghost/entitlements".into(),
        format!("/v1/users/ghost/topups/{oid}"),
    ] {
        srv.get(&path, Auth::Service)
            .await
            .expect_error(404, "user_not_found");
        srv.get(&path, Auth::Admin)
            .await
            .expect_error(404, "user_not_found");
    }
    let posts = [
        (
            "/v1/users/ghost/credits".to_string(),
            json!({"amount": "1.00", "external_ref": "r-ghost", "source": "card"}),
        ),
        ("/v1/users/ghost/topups".into(), json!({"amount": "1.00"})),
        (
            "/v1/users/ghost/orders".into(),
            order_body(&[("gem", 1)], false),
        ),
        ("/v1/users/ghost/tokens".into(), json!({"ttl_seconds": 60})),
        (format!("/v1/users/ghost/orders/{oid}/complete"), json!({})),
        (format!("/v1/users/ghost/orders/{oid}/cancel"), json!({})),
        (format!("/v1/users/ghost/orders/{oid}/refunds"), json!({})),
        (
            "/v1/users/ghost/entitlements/gem/consume".into(),
            json!({"quantity": 1}),
        ),
    ];
    for (path, body) in posts {
        srv.post(&path, Auth::Service, &body)
            .await
            .expect_error(404, "user_not_found");
    }
    // Nothing was created as a side effect.
    srv.get("/v1/users/ghost", Auth::Service)
        .await
        .expect_error(404, "user_not_found");
}

#[tokio::test]
async fn tokens_default_ttl_is_one_hour() {
    let srv = Server::start().await;
    srv.create_user("t1").await;
    let now = OffsetDateTime::now_utc();
    let v = srv
        .post("/v1/users/t1/tokens", Auth::Service, &json!({}))
        .await
        .expect(201);
    assert!(v["token"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    let exp = ts(&v["expires_at"]);
    let secs = (exp - now).whole_seconds();
    assert!(
        (3590..=3610).contains(&secs),
        "default ttl should be 3600 s, got {secs} s: {v}"
    );

    let v = srv
        .post(
            "/v1/users/t1/tokens",
            Auth::Admin,
            &json!({"ttl_seconds": 60}),
        )
        .await
        .expect(201);
    let secs = (ts(&v["expires_at"]) - now).whole_seconds();
    assert!((50..=70).contains(&secs), "ttl 60 gave {secs} s: {v}");
}

#[tokio::test]
async fn token_ttl_must_be_between_1_second_and_30_days() {
    let srv = Server::start().await;
    srv.create_user("t2").await;
    for bad in [
        json!(0),
        json!(-1),
        json!(2_592_001),
        json!("60"),
        json!(1.5),
    ] {
        srv.post(
            "/v1/users/t2/tokens",
            Auth::Service,
            &json!({"ttl_seconds": bad}),
        )
        .await
        .expect_error(400, "invalid_request");
    }
    for ok in [1, 2_592_000] {
        srv.post(
            "/v1/users/t2/tokens",
            Auth::Service,
            &json!({"ttl_seconds": ok}),
        )
        .await
        .expect(201);
    }
}

#[tokio::test]
async fn token_for_unknown_user_is_user_not_found() {
    let srv = Server::start().await;
    srv.post(
        "/v1/users/nobody/tokens",
        Auth::Service,
        &json!({"ttl_seconds": 60}),
    )
    .await
    .expect_error(404, "user_not_found");
}

#[tokio::test]
async fn minted_token_reads_its_own_user() {
    let srv = Server::start().await;
    let u = srv.create_user("me").await;
    let tok = srv.user_token("me").await;
    let got = srv.get("/v1/users/me", Auth::user(&tok)).await.expect(200);
    assert_eq!(got, u);
}
