//! Roles: admin, service, user tokens; 401 vs 403.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

async fn setup(srv: &Server) -> (String, String) {
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("alice", "10.00").await;
    srv.funded_user("bob", "10.00").await;
    (srv.user_token("alice").await, srv.user_token("bob").await)
}

#[tokio::test]
async fn missing_or_bad_token_is_401_unauthenticated() {
    let srv = Server::start().await;
    setup(&srv).await;
    let paths = [
        "/v1/users/alice",
        "/v1/users/alice/wallet",
        "/v1/users/alice/orders",
        "/v1/users/alice/ledger",
        "/v1/users/alice/entitlements",
        "/v1/items",
        "/v1/admin/audit",
        "/v1/cluster",
    ];
    let bads = [
        Auth::None,
        Auth::Bearer("garbage".into()),
        Auth::Bearer(format!("{ADMIN_TOKEN}x")),
        Auth::Raw(format!("Basic {ADMIN_TOKEN}")),
        Auth::Raw(ADMIN_TOKEN.to_string()),
        Auth::Raw("Bearer".into()),
    ];
    for p in paths {
        for a in &bads {
            srv.get(p, a.clone())
                .await
                .expect_error(401, "unauthenticated");
        }
    }
    srv.post("/v1/users", Auth::None, &json!({"user_id": "x"}))
        .await
        .expect_error(401, "unauthenticated");
    srv.get("/v1/users/x", Auth::Admin)
        .await
        .expect_error(404, "user_not_found");
}

#[tokio::test]
async fn user_token_reads_its_own_data() {
    let srv = Server::start().await;
    let (alice, _) = setup(&srv).await;
    let a = Auth::user(&alice);
    for p in [
        "/v1/users/alice",
        "/v1/users/alice/wallet",
        "/v1/users/alice/orders",
        "/v1/users/alice/ledger",
        "/v1/users/alice/entitlements",
        "/v1/items",
        "/v1/items/gems",
    ] {
        srv.get(p, a.clone()).await.expect(200);
    }
}

#[tokio::test]
async fn user_token_creates_completes_and_cancels_its_own_orders() {
    let srv = Server::start().await;
    let (alice, _) = setup(&srv).await;
    let a = Auth::user(&alice);
    let o = srv
        .create_order_as("alice", a.clone(), &[("gems", 2)], false)
        .await
        .expect(201);
    let id = o["order_id"].as_str().unwrap();
    srv.get(&format!("/v1/users/alice/orders/{id}"), a.clone())
        .await
        .expect(200);
    srv.complete_order("alice", id, a.clone()).await.expect(200);
    let o2 = srv
        .create_order_as("alice", a.clone(), &[("gems", 1)], false)
        .await
        .expect(201);
    srv.cancel_order("alice", o2["order_id"].as_str().unwrap(), a.clone())
        .await
        .expect(200);
    srv.create_order_as("alice", a.clone(), &[("gems", 1)], true)
        .await
        .expect(201);
    assert_eq!(srv.wallet("alice").await.balance, 700);
}

#[tokio::test]
async fn user_token_never_touches_another_users_data() {
    let srv = Server::start().await;
    let (alice, _) = setup(&srv).await;
    let a = Auth::user(&alice);
    let bob_order = srv.order("bob", &[("gems", 1)], false).await;
    let bid = bob_order["order_id"].as_str().unwrap();
    for p in [
        "/v1/users/bob".to_string(),
        "/v1/users/bob/wallet".into(),
        "/v1/users/bob/orders".into(),
        format!("/v1/users/bob/orders/{bid}"),
        "/v1/users/bob/ledger".into(),
        "/v1/users/bob/entitlements".into(),
        format!("/v1/users/bob/idempotency/{}", new_key()),
        // a user that does not exist: still 403, not 404
        "/v1/users/nobody".into(),
        "/v1/users/nobody/wallet".into(),
    ] {
        srv.get(&p, a.clone()).await.expect_error(403, "forbidden");
    }
    srv.create_order_as("bob", a.clone(), &[("gems", 1)], true)
        .await
        .expect_error(403, "forbidden");
    srv.complete_order("bob", bid, a.clone())
        .await
        .expect_error(403, "forbidden");
    srv.cancel_order("bob", bid, a.clone())
        .await
        .expect_error(403, "forbidden");
    srv.post(
        "/v1/users/bob/topups",
        a.clone(),
        &json!({"amount": "1.00"}),
    )
    .await
    .expect_error(403, "forbidden");
    srv.create_order_as("nobody", a.clone(), &[("gems", 1)], true)
        .await
        .expect_error(403, "forbidden");
    assert_eq!(srv.get_order("bob", bid).await["status"], "PENDING");
    assert_eq!(
        srv.wallet("bob").await,
        Wallet {
            balance: 1000,
            held: 100,
            available: 900
        }
    );
}

#[tokio::test]
async fn user_token_cannot_do_service_or_admin_things() {
    let srv = Server::start().await;
    let (alice, _) = setup(&srv).await;
    let a = Auth::user(&alice);
    let o = srv.order("alice", &[("gems", 2)], true).await;
    let id = o["order_id"].as_str().unwrap();
    srv.post("/v1/users", a.clone(), &json!({"user_id": "mallory"}))
        .await
        .expect_error(403, "forbidden");
    srv.post(
        "/v1/users/alice/tokens",
        a.clone(),
        &json!({"ttl_seconds": 60}),
    )
    .await
    .expect_error(403, "forbidden");
    srv.post(
        "/v1/users/alice/credits",
        a.clone(),
        &json!({"amount": "100.00", "external_ref": "self-credit", "source": "card"}),
    )
    .await
    .expect_error(403, "forbidden");
    srv.refund("alice", id, a.clone(), &json!({}))
        .await
        .expect_error(403, "forbidden");
    srv.consume("alice", "gems", a.clone(), json!(1))
        .await
        .expect_error(403, "forbidden");
    srv.put(
        "/v1/items/gems",
        a.clone(),
        &json!({"name": "G", "kind": "currency", "price": "0.01", "active": true}),
    )
    .await
    .expect_error(403, "forbidden");
    srv.get("/v1/admin/audit", a.clone())
        .await
        .expect_error(403, "forbidden");
    srv.get("/v1/cluster", a.clone())
        .await
        .expect_error(403, "forbidden");
    srv.get("/v1/users/mallory", Auth::Service)
        .await
        .expect_error(404, "user_not_found");
    assert_eq!(srv.wallet("alice").await.balance, 800);
    assert_eq!(srv.entitlement_qty("alice", "gems").await, 2);
    assert_eq!(
        srv.get("/v1/items/gems", Auth::Admin).await.expect(200)["price"],
        "1.00"
    );
}

#[tokio::test]
async fn the_service_may_ask_which_shard_and_leader_serve_a_player_and_a_player_may_not() {
    let srv = Server::start().await;
    let (alice, _) = setup(&srv).await;
    let route = srv
        .get("/v1/cluster/route/alice", Auth::Service)
        .await
        .expect(200);
    assert_eq!(route["user_id"], "alice");
    assert!(route["shard"].is_u64(), "{route}");
    assert_eq!(route["leader"], 1, "{route}");
    srv.get("/v1/cluster/route/alice", Auth::user(&alice))
        .await
        .expect_error(403, "forbidden");
}

#[tokio::test]
async fn service_token_is_not_admin() {
    let srv = Server::start().await;
    setup(&srv).await;
    srv.get("/v1/admin/audit", Auth::Service)
        .await
        .expect_error(403, "forbidden");
    srv.get("/v1/cluster", Auth::Service)
        .await
        .expect_error(403, "forbidden");
    srv.put(
        "/v1/items/new",
        Auth::Service,
        &json!({"name": "N", "kind": "game", "price": "1.00", "active": true}),
    )
    .await
    .expect_error(403, "forbidden");
    // but it may act on any user
    for p in [
        "/v1/users/alice",
        "/v1/users/bob/wallet",
        "/v1/users/bob/ledger",
    ] {
        srv.get(p, Auth::Service).await.expect(200);
    }
}

#[tokio::test]
async fn expired_user_token_is_401() {
    let srv = Server::start().await;
    srv.create_user("eve").await;
    let v = srv
        .post(
            "/v1/users/eve/tokens",
            Auth::Service,
            &json!({"ttl_seconds": 1}),
        )
        .await
        .expect(201);
    let tok = v["token"].as_str().unwrap().to_string();
    srv.get("/v1/users/eve", Auth::user(&tok)).await.expect(200);
    sleep_until(ts(&v["expires_at"]), Duration::from_millis(1100)).await;
    srv.get("/v1/users/eve", Auth::user(&tok))
        .await
        .expect_error(401, "unauthenticated");
}

#[tokio::test]
async fn tampered_user_token_is_401() {
    let srv = Server::start().await;
    srv.create_user("tam").await;
    srv.create_user("tam2").await;
    let tok = srv.user_token("tam").await;
    let mut variants = vec![];
    // flip one character in several positions
    // (not the very last character: in unpadded base64 its low bits may be padding)
    for pos in [0, tok.len() / 2, tok.len() - 2] {
        let mut b = tok.clone().into_bytes();
        b[pos] = if b[pos] == b'z' { b'A' } else { b'z' };
        variants.push(String::from_utf8(b).unwrap());
    }
    variants.push(tok[..tok.len() - 1].to_string());
    variants.push(format!("{tok}A"));
    // the same token with the user id swapped, where it appears verbatim
    if tok.contains("tam") {
        variants.push(tok.replacen("tam", "tam2", 1));
    }
    for v in variants {
        if v == tok {
            continue;
        }
        let r = srv.get("/v1/users/tam", Auth::user(&v)).await;
        r.expect_error(401, "unauthenticated");
        let r = srv.get("/v1/users/tam2", Auth::user(&v)).await;
        assert!(matches!(r.status, 401 | 403), "tampered token got {r:?}");
    }
}

#[tokio::test]
async fn a_token_survives_a_restart() {
    let mut srv = Server::start().await;
    srv.create_user("keep").await;
    let tok = srv.user_token("keep").await;
    srv.restart().await;
    srv.get("/v1/users/keep", Auth::user(&tok))
        .await
        .expect(200);
}
