//! Operations: health, readiness, metrics, OpenAPI, cluster, audit, request ids, restarts, secrets.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::*;

#[tokio::test]
async fn healthz_and_readyz_answer_without_auth() {
    let srv = Server::start().await;
    let r = srv.get("/healthz", Auth::None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = srv.get("/readyz", Auth::None).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let srv = Server::start().await;
    srv.create_user("m1").await;
    srv.get("/v1/users/m1", Auth::Service).await.expect(200);
    srv.get("/v1/users/none", Auth::Service).await.expect(404);
    let r = srv.get("/metrics", Auth::None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    let text = r.text();
    assert!(text.contains("# TYPE "), "no metric families: {text}");
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name_part, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
        let name: String = name_part.chars().take_while(|c| *c != '{').collect();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad metric value in {line:?}"
        );
    }
}

/// Every endpoint of API.md, as (method, path template).
const ENDPOINTS: &[(&str, &str)] = &[
    ("post", "/v1/users"),
    ("get", "/v1/users/{user_id}"),
    ("get", "/v1/users/{user_id}/wallet"),
    ("post", "/v1/users/{user_id}/tokens"),
    ("post", "/v1/users/{user_id}/credits"),
    ("post", "/v1/users/{user_id}/topups"),
    ("get", "/v1/users/{user_id}/topups/{topup_id}"),
    ("post", "/v1/psp/webhook"),
    ("put", "/v1/items/{item_id}"),
    ("get", "/v1/items"),
    ("get", "/v1/items/{item_id}"),
    ("post", "/v1/users/{user_id}/orders"),
    ("get", "/v1/users/{user_id}/orders"),
    ("get", "/v1/users/{user_id}/orders/{order_id}"),
    ("post", "/v1/users/{user_id}/orders/{order_id}/complete"),
    ("post", "/v1/users/{user_id}/orders/{order_id}/cancel"),
    ("post", "/v1/users/{user_id}/orders/{order_id}/refunds"),
    ("get", "/v1/users/{user_id}/entitlements"),
    ("post", "/v1/users/{user_id}/entitlements/{item_id}/consume"),
    ("get", "/v1/users/{user_id}/ledger"),
    ("get", "/v1/users/{user_id}/idempotency/{key}"),
    ("get", "/v1/admin/audit"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/cluster"),
    ("get", "/v1/cluster/route/{user_id}"),
    ("post", "/v1/admin/cluster/nodes"),
    ("post", "/v1/admin/cluster/nodes/{node_id}/promote"),
    ("delete", "/v1/admin/cluster/nodes/{node_id}"),
    ("post", "/v1/admin/cluster/leaders/rebalance"),
    ("get", "/v1/openapi.json"),
];

/// `/v1/users/{anything}/x` → `/v1/users/{}/x`
fn normalize(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') && seg.ends_with('}') {
                "{}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn openapi_document_describes_every_endpoint() {
    let srv = Server::start().await;
    let mut r = srv.get("/v1/openapi.json", Auth::None).await;
    if r.status == 401 {
        r = srv.get("/v1/openapi.json", Auth::Admin).await;
    }
    let doc = r.expect(200);
    let version = doc["openapi"]
        .as_str()
        .unwrap_or_else(|| panic!("no openapi version: {doc}"));
    assert!(version.starts_with("3."), "openapi {version}");
    assert!(doc["info"].is_object(), "info missing");
    let paths = doc["paths"].as_object().expect("paths object");
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(p, ops)| {
            let p = normalize(p);
            ops.as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .map(move |m| (m.to_lowercase(), p.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let missing: Vec<_> = ENDPOINTS
        .iter()
        .filter(|(m, p)| !documented.contains(&(m.to_string(), normalize(p))))
        .collect();
    assert!(
        missing.is_empty(),
        "OpenAPI paths lack {missing:?}; documented: {documented:?}"
    );
    // Reads say how fresh they are.
    let wallet_params = doc["paths"]["/v1/users/{user_id}/wallet"]["get"]["parameters"]
        .as_array()
        .unwrap_or_else(|| panic!("wallet GET parameters: {doc}"));
    assert!(
        wallet_params
            .iter()
            .any(|p| p["name"] == "consistency" && p["in"] == "query"),
        "no consistency parameter: {wallet_params:?}"
    );
}

#[tokio::test]
async fn reads_take_a_consistency_and_refuse_an_unknown_one() {
    let srv = Server::start().await;
    srv.api().create_user("cons").await;
    for consistency in ["linearizable", "local"] {
        let wallet = srv
            .get(
                &format!("/v1/users/cons/wallet?consistency={consistency}"),
                Auth::Service,
            )
            .await
            .expect(200);
        assert_eq!(wallet["balance"], "0.00", "{consistency}: {wallet}");
    }
    srv.get("/v1/users/cons/wallet?consistency=eventual", Auth::Service)
        .await
        .expect_error(400, "invalid_request");
}

#[tokio::test]
async fn cluster_lists_nodes_and_shards_with_leaders() {
    let srv = Server::start_with(Opts::new().shards(4)).await;
    let c = srv.get("/v1/cluster", Auth::Admin).await.expect(200);
    let nodes = c["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("nodes array: {c}"));
    assert!(!nodes.is_empty(), "{c}");
    let shards = c["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("shards array: {c}"));
    assert_eq!(shards.len(), 4, "{c}");
    for s in shards {
        assert!(
            s.get("leader").is_some_and(|l| !l.is_null()),
            "shard without leader: {c}"
        );
        assert!(
            s.get("term").is_some_and(|t| !t.is_null()),
            "shard without term: {c}"
        );
    }
}

#[tokio::test]
async fn audit_of_one_shard_reports_that_shard_as_the_whole_audit_does_and_refuses_a_shard_not_in_the_cluster()
 {
    let srv = Server::start_with(Opts::new().shards(3)).await;
    for i in 0..6 {
        srv.funded_user(&format!("as{i}"), "10.00").await;
    }
    let whole = srv.audit_ok().await;
    for shard in 0..3 {
        let one = srv
            .get(&format!("/v1/admin/audit?shard={shard}"), Auth::Admin)
            .await
            .expect(200);
        assert_eq!(one["ok"], true, "{one}");
        assert_eq!(
            one["shards"],
            json!([whole["shards"][shard].clone()]),
            "shard {shard}"
        );
    }
    for absent in ["3", "255"] {
        srv.get(&format!("/v1/admin/audit?shard={absent}"), Auth::Admin)
            .await
            .expect_error(404, "not_found");
    }
    for bad in ["-1", "one", "", "4294967296"] {
        srv.get(&format!("/v1/admin/audit?shard={bad}"), Auth::Admin)
            .await
            .expect_error(400, "invalid_request");
    }
    srv.get("/v1/admin/audit?shard=0", Auth::Service)
        .await
        .expect_error(403, "forbidden");
}

#[tokio::test]
async fn audit_reports_every_shard_and_counts() {
    let srv = Server::start_with(Opts::new().shards(4)).await;
    srv.create_item("gems", "currency", "1.00").await;
    for i in 0..6 {
        let u = format!("au{i}");
        srv.funded_user(&u, "10.00").await;
        srv.order(&u, &[("gems", 1)], true).await;
        srv.order(&u, &[("gems", 2)], false).await;
    }
    let a = srv.audit_ok().await;
    let shards = a["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 4, "{a}");
    let ids: BTreeSet<i64> = shards
        .iter()
        .map(|s| s["shard"].as_i64().expect("shard number"))
        .collect();
    assert_eq!(ids, (0..4).collect::<BTreeSet<_>>());
    let users: i64 = shards
        .iter()
        .map(|s| s["users"].as_i64().expect("users"))
        .sum();
    let orders: i64 = shards
        .iter()
        .map(|s| s["orders"].as_i64().expect("orders"))
        .sum();
    let postings: i64 = shards
        .iter()
        .map(|s| s["postings"].as_i64().expect("postings"))
        .sum();
    assert_eq!(users, 6, "{a}");
    assert_eq!(orders, 12, "{a}");
    assert!(postings >= 6 * 3, "{a}");
    for s in shards {
        let h = s["state_hash"].as_str().expect("state_hash");
        assert!(
            !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()),
            "state_hash {h:?}"
        );
        assert_eq!(s["violations"], json!([]));
    }
    // state hashes move when state moves
    let before: Vec<Value> = shards.iter().map(|s| s["state_hash"].clone()).collect();
    srv.credit("au0", "1.00").await;
    let after = srv.audit_ok().await;
    let after: Vec<Value> = after["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state_hash"].clone())
        .collect();
    assert_ne!(
        before, after,
        "a credit must change some shard's state_hash"
    );
}

#[tokio::test]
async fn unknown_route_is_404_not_found() {
    let srv = Server::start().await;
    for p in ["/nope", "/v1/nope", "/v1/users/x/nope/deeper", "/v2/users"] {
        srv.get(p, Auth::Admin).await.expect_error(404, "not_found");
    }
    srv.get("/nope", Auth::None)
        .await
        .expect_error(404, "not_found");
}

#[tokio::test]
async fn every_response_carries_x_request_id() {
    let srv = Server::start().await;
    srv.create_user("rq").await;
    let big = "x".repeat(70 * 1024);
    let calls: Vec<(Method, &str, Auth, Option<Vec<u8>>)> = vec![
        (Method::GET, "/healthz", Auth::None, None),
        (Method::GET, "/v1/users/rq", Auth::Service, None),
        (Method::GET, "/v1/users/none", Auth::Service, None),
        (Method::GET, "/v1/users/rq", Auth::None, None),
        (Method::GET, "/v1/admin/audit", Auth::Service, None),
        (Method::GET, "/no/such/route", Auth::None, None),
        (
            Method::POST,
            "/v1/users/rq/credits",
            Auth::Service,
            Some(b"{".to_vec()),
        ),
        (
            Method::POST,
            "/v1/users/rq/credits",
            Auth::Service,
            Some(serde_json::to_vec(&json!({"amount": 1})).unwrap()),
        ),
        (
            Method::POST,
            "/v1/users/rq/credits",
            Auth::Service,
            Some(
                serde_json::to_vec(
                    &json!({"amount": "1.00", "external_ref": big, "source": "card"}),
                )
                .unwrap(),
            ),
        ),
        (
            Method::POST,
            "/v1/users/rq/credits",
            Auth::Service,
            Some(
                serde_json::to_vec(
                    &json!({"amount": "1.00", "external_ref": "rq-1", "source": "card"}),
                )
                .unwrap(),
            ),
        ),
        (
            Method::POST,
            "/v1/psp/webhook",
            Auth::None,
            Some(b"{}".to_vec()),
        ),
    ];
    let mut generated_ids = std::collections::HashSet::new();
    for (i, (m, p, a, body)) in calls.into_iter().enumerate() {
        // echoed when sent
        let rid = format!("it-req-{i}-{}", new_key());
        let mut c = srv
            .call(m.clone(), p)
            .auth(a.clone())
            .fresh_key()
            .header("x-request-id", &rid);
        if let Some(b) = body.clone() {
            c = c.raw(b);
        }
        let r = c.send().await;
        assert_eq!(
            r.header("x-request-id").as_deref(),
            Some(rid.as_str()),
            "not echoed: {r:?}"
        );
        if r.status >= 400 {
            let v = r.json();
            assert_error_shape(&v, &r);
            let ct = r.header("content-type").unwrap_or_default();
            assert!(
                ct.starts_with("application/json"),
                "error content-type {ct:?}: {r:?}"
            );
        }
        // generated when not sent
        let mut c = srv.call(m, p).auth(a).fresh_key();
        if let Some(b) = body {
            c = c.raw(b);
        }
        let r = c.send().await;
        let generated = r.header("x-request-id").expect("a generated X-Request-Id");
        let uuid = uuid::Uuid::parse_str(&generated).expect("the generated id is a UUID");
        assert_eq!(uuid.get_version_num(), 4, "{generated}: a random UUID");
        assert!(
            generated_ids.insert(generated),
            "an id was generated twice: {r:?}"
        );
    }
}

/// Everything a client can see of a user.
async fn user_view(srv: &Server, user: &str) -> Value {
    json!({
        "user": srv.get(&format!("/v1/users/{user}"), Auth::Service).await.expect(200),
        "orders": srv.all_orders(user, "").await,
        "ledger": srv.all_ledger(user).await,
        "entitlements": srv.entitlements(user).await,
    })
}

#[tokio::test]
async fn data_survives_graceful_and_hard_restarts() {
    let mut srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_item("skin", "skin", "2.50").await;
    srv.funded_user("rs", "30.00").await;
    srv.order("rs", &[("gems", 3)], false).await;
    let done = srv.order("rs", &[("gems", 5), ("skin", 1)], true).await;
    srv.refund(
        "rs",
        done["order_id"].as_str().unwrap(),
        Auth::Service,
        &json!({"lines": [{"item_id": "gems", "quantity": 2}]}),
    )
    .await
    .expect(201);
    srv.consume("rs", "gems", Auth::Service, json!(1))
        .await
        .expect(200);
    let t = srv.topup("rs", "5.00").await;
    let items = srv.get("/v1/items", Auth::Admin).await.expect(200);
    let view = user_view(&srv, "rs").await;

    let st = srv.sigterm_and_wait().await;
    assert!(st.success(), "SIGTERM exit status {st:?}");
    srv.restart().await;
    assert_eq!(user_view(&srv, "rs").await, view);
    assert_eq!(srv.get("/v1/items", Auth::Admin).await.expect(200), items);
    srv.get(
        &format!("/v1/users/rs/topups/{}", t["topup_id"].as_str().unwrap()),
        Auth::Service,
    )
    .await
    .expect(200);
    srv.audit_ok().await;

    srv.kill9();
    srv.restart().await;
    assert_eq!(user_view(&srv, "rs").await, view);
    srv.audit_ok().await;
    // and it keeps working
    srv.order("rs", &[("gems", 1)], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    let mut srv = Server::start().await;
    srv.create_user("dr").await;
    let api = srv.api();
    let mut tasks = vec![];
    for i in 0..40 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let key = new_key();
            let body =
                json!({"amount": "1.00", "external_ref": format!("drain-{i}"), "source": "card"});
            let r = api
                .call(Method::POST, "/v1/users/dr/credits")
                .auth(Auth::Service)
                .key(&key)
                .json(&body)
                .try_send()
                .await;
            (key, r)
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let st = srv.sigterm_and_wait().await;
    assert!(st.success(), "SIGTERM exit status {st:?}");
    let mut acked = vec![];
    for t in tasks {
        let (key, r) = t.await.unwrap();
        if let Ok(r) = r {
            assert!(
                r.status == 201 || r.status == 503,
                "a drained request got {r:?}"
            );
            if r.status == 201 {
                acked.push(key);
            }
        }
    }
    srv.restart().await;
    for key in &acked {
        let l = srv
            .get(&format!("/v1/users/dr/idempotency/{key}"), Auth::Service)
            .await
            .expect(200);
        assert_eq!(l["status"], 201);
    }
    assert!(srv.wallet("dr").await.balance >= acked.len() as i64 * 100);
    srv.audit_ok().await;
}

#[tokio::test]
async fn generated_admin_token_is_stored_0600_and_never_logged() {
    use std::os::unix::fs::PermissionsExt;
    let srv = Server::start_with(Opts::new().no_admin_token().env("RUST_LOG", "info")).await;
    // Find the file holding the generated token: a small file in the data dir whose content authenticates.
    let mut found = None;
    let mut stack = vec![srv.data_dir()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(p);
                continue;
            }
            if md.len() == 0 || md.len() > 4096 {
                continue;
            }
            let Ok(s) = std::fs::read_to_string(&p) else {
                continue;
            };
            let tok = s.trim();
            if tok.is_empty() || tok.contains('\n') {
                continue;
            }
            let r = srv
                .get("/v1/admin/audit", Auth::Bearer(tok.to_string()))
                .await;
            if r.status == 200 {
                found = Some((p, tok.to_string(), md.permissions().mode() & 0o777));
            }
        }
    }
    let (path, tok, mode) = found.expect("no file in the data dir holds a working admin token");
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
    assert!(
        !srv.logs().contains(&tok),
        "the generated admin token was printed"
    );
    // The service token still works and is not admin.
    srv.get("/v1/admin/audit", Auth::Service)
        .await
        .expect_error(403, "forbidden");
    srv.get("/v1/admin/audit", Auth::Admin)
        .await
        .expect_error(401, "unauthenticated");
}

#[tokio::test]
async fn secrets_never_appear_in_logs() {
    let srv = Server::start_with(Opts::new().env("RUST_LOG", "debug")).await;
    srv.create_user("sec").await;
    let tok = srv.user_token("sec").await;
    srv.get("/v1/users/sec", Auth::user(&tok)).await.expect(200);
    srv.get("/v1/admin/audit", Auth::Admin).await.expect(200);
    srv.get("/v1/users/sec", Auth::Bearer("wrong-token".into()))
        .await
        .expect(401);
    let t = srv.topup("sec", "1.00").await;
    let ev = json!({"event_id": "evt_sec", "type": "payment.succeeded", "topup_id": t["topup_id"], "user_id": "sec",
                    "amount": "1.00", "psp_payment_id": "pi_sec"});
    assert!(srv.webhook(&ev).await.is_success());
    let logs = srv.logs();
    for (what, s) in [
        ("admin token", ADMIN_TOKEN),
        ("service token", SERVICE_TOKEN),
        ("psp secret", PSP_SECRET),
        ("user token", tok.as_str()),
    ] {
        assert!(!logs.contains(s), "the {what} appears in the logs");
    }
}

#[tokio::test]
async fn unusual_requests_still_get_the_error_shape() {
    let srv = Server::start().await;
    srv.create_user("sh").await;
    let resps = vec![
        // wrong method on a known route
        srv.call(Method::DELETE, "/v1/users/sh")
            .auth(Auth::Admin)
            .send()
            .await,
        srv.call(Method::PATCH, "/v1/items")
            .auth(Auth::Admin)
            .send()
            .await,
    ];
    for r in resps {
        assert!((400..500).contains(&r.status), "{r:?}");
        let v = r.json();
        assert_error_shape(&v, &r);
    }
    // JSON as text/plain or without a content type: accepted, or refused in the error shape
    let body = br#"{"amount": "1.00"}"#.to_vec();
    for ct in [Some("text/plain"), None] {
        let mut c = srv
            .call(Method::POST, "/v1/users/sh/topups")
            .auth(Auth::Service)
            .fresh_key()
            .body_bytes(body.clone());
        if let Some(ct) = ct {
            c = c.header("content-type", ct);
        }
        let r = c.send().await;
        if !r.is_success() {
            assert_error_shape(&r.json(), &r);
        }
    }
    assert_eq!(srv.wallet("sh").await.balance, 0);
}
