//! The contract's conventions checked route by route: every refusal has the JSON error shape (malformed
//! paths included), and query parameters are strict.

use crate::harness::*;
use reqwest::Method;

/// Every route with a path parameter, as (method, template).
const PARAMETRISED: [(&str, &str); 21] = [
    ("GET", "/v1/users/{user_id}"),
    ("GET", "/v1/users/{user_id}/wallet"),
    ("POST", "/v1/users/{user_id}/tokens"),
    ("GET", "/v1/users/{user_id}/idempotency/{key}"),
    ("POST", "/v1/users/{user_id}/credits"),
    ("POST", "/v1/users/{user_id}/topups"),
    ("GET", "/v1/users/{user_id}/topups/{topup_id}"),
    ("PUT", "/v1/items/{item_id}"),
    ("GET", "/v1/items/{item_id}"),
    ("POST", "/v1/users/{user_id}/orders"),
    ("GET", "/v1/users/{user_id}/orders"),
    ("GET", "/v1/users/{user_id}/orders/{order_id}"),
    ("POST", "/v1/users/{user_id}/orders/{order_id}/complete"),
    ("POST", "/v1/users/{user_id}/orders/{order_id}/cancel"),
    ("POST", "/v1/users/{user_id}/orders/{order_id}/refunds"),
    ("GET", "/v1/users/{user_id}/entitlements"),
    ("POST", "/v1/users/{user_id}/entitlements/{item_id}/consume"),
    ("GET", "/v1/users/{user_id}/ledger"),
    ("GET", "/v1/cluster/route/{user_id}"),
    ("POST", "/v1/admin/cluster/nodes/{node_id}/promote"),
    ("DELETE", "/v1/admin/cluster/nodes/{node_id}"),
];

/// A well-formed value for each path parameter.
fn good(name: &str) -> &'static str {
    match name {
        "node_id" => "7",
        "order_id" | "topup_id" => "0192e4a1-7c3b-7def-8abc-0123456789ab",
        _ => "pc",
    }
}

/// The template with `bad` in place of `name` and good values elsewhere.
fn fill(template: &str, name: &str, bad: &str) -> String {
    template
        .split('/')
        .map(
            |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(param) if param == name => bad.to_owned(),
                Some(param) => good(param).to_owned(),
                None => segment.to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

fn params(template: &str) -> Vec<&str> {
    template
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

/// A segment that is not UTF-8 once decoded, or that does not parse as the parameter's type, is 400
/// `invalid_request` in the error shape on every route (it was `400 text/plain` from axum's `Path`).
#[tokio::test]
async fn malformed_path_segments_get_the_error_shape_on_every_route() {
    let srv = Server::start().await;
    for (method, template) in PARAMETRISED {
        for name in params(template) {
            let mut bad = vec!["%ff", "%C3%28"];
            if name == "node_id" {
                bad.extend(["-1", "x", "18446744073709551616", "1.5"]);
            }
            for segment in bad {
                let path = fill(template, name, segment);
                let method = Method::from_bytes(method.as_bytes()).expect("method");
                let r = srv
                    .call(method, &path)
                    .auth(Auth::Admin)
                    .fresh_key()
                    .raw(b"{}".to_vec())
                    .send()
                    .await;
                assert_eq!(
                    r.header("content-type").as_deref(),
                    Some("application/json"),
                    "{r:?}"
                );
                r.expect_error(400, "invalid_request");
            }
        }
    }
}

/// Node ids are positive: 0 is refused before it reaches the cluster.
#[tokio::test]
async fn node_id_zero_is_invalid_request() {
    let srv = Server::start().await;
    for (method, path) in [
        (Method::DELETE, "/v1/admin/cluster/nodes/0"),
        (Method::POST, "/v1/admin/cluster/nodes/0/promote"),
    ] {
        srv.call(method, path)
            .auth(Auth::Admin)
            .fresh_key()
            .send()
            .await
            .expect_error(400, "invalid_request");
    }
}

/// An empty query value is a value, refused like any other malformed one, not read as "absent" (which
/// made `?consistency=` a linearizable read and `?status=` every order).
#[tokio::test]
async fn empty_query_values_are_invalid_request() {
    let srv = Server::start().await;
    srv.create_user("eq").await;
    for path in [
        "/v1/users/eq/wallet?consistency=",
        "/v1/items?consistency=",
        "/v1/users/eq/orders?status=",
        "/v1/users/eq/orders?cursor=",
        "/v1/users/eq/ledger?cursor=",
    ] {
        srv.get(path, Auth::Service)
            .await
            .expect_error(400, "invalid_request");
    }
    srv.get("/v1/users/eq/wallet?consistency=local", Auth::Service)
        .await
        .expect(200);
}

/// An idempotency key looked up by path has the header's rules.
#[tokio::test]
async fn idempotency_lookup_checks_the_key() {
    let srv = Server::start().await;
    srv.create_user("ik").await;
    let long = "k".repeat(256);
    for key in [long.as_str(), "%7F", "%C3%A9"] {
        srv.get(&format!("/v1/users/ik/idempotency/{key}"), Auth::Service)
            .await
            .expect_error(400, "invalid_request");
    }
    srv.get("/v1/users/ik/idempotency/no-such-key", Auth::Service)
        .await
        .expect_error(404, "not_found");
}
