//! Catalog: `PUT /v1/items/{id}`, `GET /v1/items`, `GET /v1/items/{id}`.

use serde_json::json;

use crate::cluster_harness::CLUSTER_SECRET;
use crate::harness::*;

#[tokio::test]
async fn put_item_creates_it_and_returns_it_with_a_version() {
    let srv = Server::start().await;
    let body = json!({"name": "Dragon Skin", "kind": "skin", "price": "4.99", "active": true, "refund_window_days": 14});
    // No Idempotency-Key needed for PUT.
    let r = srv.put("/v1/items/dragon-skin", Auth::Admin, &body).await;
    let it = r.expect(200);
    assert_eq!(it["item_id"], "dragon-skin");
    assert_eq!(it["name"], "Dragon Skin");
    assert_eq!(it["kind"], "skin");
    assert_eq!(it["price"], "4.99");
    assert_eq!(it["active"], true);
    assert_eq!(it["refund_window_days"], 14);
    assert!(it["version"].as_i64().is_some_and(|v| v >= 1), "{it}");
    let got = srv
        .get("/v1/items/dragon-skin", Auth::Service)
        .await
        .expect(200);
    assert_eq!(got, it);
}

#[tokio::test]
async fn version_increments_only_on_change() {
    let srv = Server::start().await;
    let body = json!({"name": "Gems", "kind": "currency", "price": "0.99", "active": true});
    let v1 = srv.put_item("gems", &body).await.expect(200)["version"]
        .as_i64()
        .unwrap();
    let same = srv.put_item("gems", &body).await.expect(200)["version"]
        .as_i64()
        .unwrap();
    assert_eq!(same, v1, "identical PUT must not bump the version");
    let changed = srv
        .put_item(
            "gems",
            &json!({"name": "Gems", "kind": "currency", "price": "1.09", "active": true}),
        )
        .await
        .expect(200);
    assert_eq!(changed["version"].as_i64().unwrap(), v1 + 1);
    assert_eq!(changed["price"], "1.09");
    let deactivated = srv
        .put_item(
            "gems",
            &json!({"name": "Gems", "kind": "currency", "price": "1.09", "active": false}),
        )
        .await
        .expect(200);
    assert_eq!(deactivated["version"].as_i64().unwrap(), v1 + 2);
    assert_eq!(deactivated["active"], false);
    let got = srv.get("/v1/items/gems", Auth::Admin).await.expect(200);
    assert_eq!(got["version"].as_i64().unwrap(), v1 + 2);
}

#[tokio::test]
async fn refund_window_defaults_to_14_days() {
    let srv = Server::start().await;
    let it = srv.create_item("g1", "game", "29.99").await;
    assert_eq!(it["refund_window_days"], 14);
    let it = srv.create_item_window("g2", "game", "29.99", 0).await;
    assert_eq!(it["refund_window_days"], 0);
}

#[tokio::test]
async fn items_are_listed_for_every_role() {
    let srv = Server::start().await;
    srv.create_item("a-game", "game", "10.00").await;
    srv.create_item("a-skin", "skin", "2.00").await;
    srv.create_item("a-gem", "currency", "0.10").await;
    srv.create_user("u").await;
    let tok = srv.user_token("u").await;
    for auth in [Auth::Admin, Auth::Service, Auth::user(&tok)] {
        let v = srv.get("/v1/items", auth.clone()).await.expect(200);
        let items = v["items"].as_array().expect("items array");
        let mut ids: Vec<&str> = items
            .iter()
            .map(|i| i["item_id"].as_str().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["a-game", "a-gem", "a-skin"]);
        let one = srv.get("/v1/items/a-gem", auth).await.expect(200);
        assert_eq!(one["kind"], "currency");
        assert_eq!(one["price"], "0.10");
    }
    srv.get("/v1/items", Auth::None)
        .await
        .expect_error(401, "unauthenticated");
}

#[tokio::test]
async fn unknown_item_is_item_not_found() {
    let srv = Server::start().await;
    srv.get("/v1/items/nope", Auth::Service)
        .await
        .expect_error(404, "item_not_found");
}

/// `?consistency=local` reads this node's replica as it is, without a read barrier, on one item as on the
/// whole catalog. Shown on a member of a cluster that never formed (its peers do not answer, so no shard
/// has a leader and no barrier can pass): a local read answers from the empty replica, a linearizable
/// one is 503.
#[tokio::test]
async fn one_item_is_read_locally_with_consistency_local() {
    let srv = Server::start_with(
        Opts::new()
            .shards(1)
            .env("SHOPKEEP_NODE_ID", "1")
            .env(
                "SHOPKEEP_PEERS",
                "1=127.0.0.1:1,2=127.0.0.1:1,3=127.0.0.1:1",
            )
            .env("SHOPKEEP_CLUSTER_SECRET", CLUSTER_SECRET)
            .env("SHOPKEEP_REQUEST_TIMEOUT", "1s"),
    )
    .await;
    let all = srv
        .get("/v1/items?consistency=local", Auth::Service)
        .await
        .expect(200);
    assert_eq!(all, json!({"items": []}));
    srv.get("/v1/items/gems?consistency=local", Auth::Service)
        .await
        .expect_error(404, "item_not_found");
    srv.get("/v1/items/gems", Auth::Service)
        .await
        .expect_error(503, "unavailable");
}

#[tokio::test]
async fn catalog_writes_are_admin_only() {
    let srv = Server::start().await;
    srv.create_user("u").await;
    let tok = srv.user_token("u").await;
    let body = json!({"name": "X", "kind": "game", "price": "1.00", "active": true});
    srv.put("/v1/items/x", Auth::Service, &body)
        .await
        .expect_error(403, "forbidden");
    srv.put("/v1/items/x", Auth::user(&tok), &body)
        .await
        .expect_error(403, "forbidden");
    srv.put("/v1/items/x", Auth::None, &body)
        .await
        .expect_error(401, "unauthenticated");
    srv.put("/v1/items/x", Auth::Bearer("wrong".into()), &body)
        .await
        .expect_error(401, "unauthenticated");
    srv.get("/v1/items/x", Auth::Admin)
        .await
        .expect_error(404, "item_not_found");
}

#[tokio::test]
async fn free_items_are_allowed_and_price_is_bounded() {
    let srv = Server::start().await;
    let free = srv.create_item("free", "skin", "0.00").await;
    assert_eq!(free["price"], "0.00");
    srv.create_item("max", "game", "1000000.00").await;
    for bad in [
        json!("1000000.01"),
        json!("-1.00"),
        json!("1.234"),
        json!("abc"),
        json!(4.99),
        json!(5),
    ] {
        srv.put_item(
            "bad",
            &json!({"name": "B", "kind": "game", "price": bad, "active": true}),
        )
        .await
        .expect_error(422, "invalid_amount");
    }
    srv.get("/v1/items/bad", Auth::Admin)
        .await
        .expect_error(404, "item_not_found");
    // Bad price on an existing item leaves it unchanged.
    srv.put_item(
        "max",
        &json!({"name": "M", "kind": "game", "price": "1000000.01", "active": true}),
    )
    .await
    .expect_error(422, "invalid_amount");
    assert_eq!(
        srv.get("/v1/items/max", Auth::Admin).await.expect(200)["price"],
        "1000000.00"
    );
}

#[tokio::test]
async fn item_bodies_are_validated() {
    let srv = Server::start().await;
    for bad in [
        json!({"name": "B", "kind": "armor", "price": "1.00", "active": true}),
        json!({"name": "B", "kind": "game", "price": "1.00", "active": "yes"}),
        json!({"name": "B", "kind": "game", "price": "1.00", "active": true, "refund_window_days": -1}),
        json!({"name": "B", "kind": "game", "price": "1.00", "active": true, "colour": "red"}),
        json!({"name": 7, "kind": "game", "price": "1.00", "active": true}),
    ] {
        srv.put_item("bad", &bad)
            .await
            .expect_error(400, "invalid_request");
    }
    let long = "i".repeat(65);
    let body = json!({"name": "B", "kind": "game", "price": "1.00", "active": true});
    srv.put(&format!("/v1/items/{long}"), Auth::Admin, &body)
        .await
        .expect_error(400, "invalid_request");
    srv.put("/v1/items/bad%20id", Auth::Admin, &body)
        .await
        .expect_error(400, "invalid_request");
    srv.put("/v1/items/bad%24id", Auth::Admin, &body)
        .await
        .expect_error(400, "invalid_request");
    let items = srv.get("/v1/items", Auth::Admin).await.expect(200);
    assert_eq!(
        items["items"],
        json!([]),
        "a refused PUT created something: {items}"
    );
    // 64 chars and every allowed character class are fine.
    let ok = format!("A-z_0.9{}", "x".repeat(57));
    assert_eq!(ok.len(), 64);
    srv.put(&format!("/v1/items/{ok}"), Auth::Admin, &body)
        .await
        .expect(200);
}
