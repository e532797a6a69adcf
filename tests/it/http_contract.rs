//! The contract's conventions checked route by route: every refusal has the JSON error shape (malformed
//! paths included), query parameters are strict, and the served OpenAPI document describes what the
//! server enforces (patterns, ranges, enums, formats, a description on every response) and passes
//! openapi-spec-validator.

use reqwest::Method;
use serde_json::Value;

use crate::harness::*;

/// Every route with a path parameter, as (method, template).
const PARAMETRISED: [(&str, &str); 24] = [
    ("GET", "/v1/users/{user_id}"),
    ("PUT", "/v1/users/{user_id}/limits"),
    ("GET", "/v1/users/{user_id}/limits"),
    ("GET", "/v1/users/{user_id}/wallet"),
    ("POST", "/v1/users/{user_id}/tokens"),
    ("GET", "/v1/users/{user_id}/idempotency/{key}"),
    ("POST", "/v1/users/{user_id}/credits"),
    ("POST", "/v1/users/{user_id}/credits/{credit_id}/reversals"),
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
        "order_id" | "topup_id" | "credit_id" => "0192e4a1-7c3b-7def-8abc-0123456789ab",
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

/// Removing a node that is no member of any shard is 404 `not_found`, not a 200 that changed nothing.
#[tokio::test]
async fn removing_an_unknown_node_is_not_found() {
    let srv = Server::start().await;
    let r = srv
        .call(Method::DELETE, "/v1/admin/cluster/nodes/42")
        .auth(Auth::Admin)
        .send()
        .await;
    let error = r.expect_error(404, "not_found");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("node 42")),
        "{error}"
    );
    // The one member is still there, and still refused as the last voter rather than "not found".
    srv.call(Method::DELETE, "/v1/admin/cluster/nodes/1")
        .auth(Auth::Admin)
        .send()
        .await
        .expect_error(409, "invalid_state");
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

/// A number is read by its value: `60.0` is the integer 60, as JSON Schema (and so the document, which
/// says `integer`) reads it. It was 400 "invalid type: floating point, expected u64".
#[tokio::test]
async fn integral_numbers_spelled_as_floats_are_integers() {
    let srv = Server::start().await;
    srv.create_user("fl").await;
    srv.post(
        "/v1/users/fl/tokens",
        Auth::Service,
        &serde_json::json!({"ttl_seconds": 60.0}),
    )
    .await
    .expect(201);
    let item = srv
        .put(
            "/v1/items/fl-gems",
            Auth::Admin,
            &serde_json::json!({"name": "G", "kind": "currency", "price": "0.00", "refund_window_days": 7e0}),
        )
        .await
        .expect(200);
    assert_eq!(item["refund_window_days"], 7);
    srv.post(
        "/v1/users/fl/tokens",
        Auth::Service,
        &serde_json::json!({"ttl_seconds": 60.5}),
    )
    .await
    .expect_error(400, "invalid_request");
}

/// Changing an item's kind conflicts with the item as it is: 409 `invalid_state`, not 400 (the request
/// itself is well-formed, and the same body is fine for a new item).
#[tokio::test]
async fn changing_an_items_kind_is_a_conflict() {
    let srv = Server::start().await;
    srv.create_item("kc", "game", "1.00").await;
    let r = srv
        .put(
            "/v1/items/kc",
            Auth::Admin,
            &serde_json::json!({"name": "K", "kind": "skin", "price": "1.00"}),
        )
        .await;
    let error = r.expect_error(409, "invalid_state");
    assert_eq!(error["details"]["kind"], "game", "{error}");
    assert_eq!(
        srv.get("/v1/items/kc", Auth::Admin).await.expect(200)["kind"],
        "game"
    );
}

// ----- the served OpenAPI document ------------------------------------------------------------------

async fn document(srv: &Server) -> Value {
    srv.get("/v1/openapi.json", Auth::None).await.expect(200)
}

/// Every operation of the document, as (label, operation).
fn operations(doc: &Value) -> Vec<(String, &Value)> {
    let mut out = vec![];
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            out.push((format!("{method} {path}"), operation));
        }
    }
    out
}

/// The schema of parameter `name` (in `location`) of an operation.
fn parameter<'a>(
    doc: &'a Value,
    path: &str,
    method: &str,
    location: &str,
    name: &str,
) -> &'a Value {
    doc["paths"][path][method]["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["in"] == location && p["name"] == name))
        .map(|p| &p["schema"])
        .unwrap_or_else(|| panic!("{method} {path}: no {location} parameter {name}"))
}

fn property<'a>(doc: &'a Value, schema: &str, name: &str) -> &'a Value {
    let p = &doc["components"]["schemas"][schema]["properties"][name];
    assert!(p.is_object(), "no property {schema}.{name}");
    p
}

fn enum_of(v: &Value) -> Vec<String> {
    v["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no enum: {v}"))
        .iter()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

/// OpenAPI requires a description on every response (openapi-spec-validator counted 26 without one).
#[tokio::test]
async fn every_response_has_a_description() {
    let srv = Server::start().await;
    let doc = document(&srv).await;
    let mut missing = vec![];
    for (label, operation) in operations(&doc) {
        for (status, response) in operation["responses"].as_object().expect("responses") {
            if response["description"].as_str().is_none_or(str::is_empty) {
                missing.push(format!("{label} {status}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "responses without a description: {missing:?}"
    );
}

/// The `openapi-spec-validator` of the conformance virtualenv, made by `scripts/python-tools.sh` (which
/// `.ci/run` runs before the tests, and this runs when the validator is missing, so that the README's one
/// test command is enough). If it cannot be had, the test fails and says why: a validation that was never
/// run must not pass.
fn openapi_validator() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var_os("SHOPKEEP_CONFORMANCE_VENV")
        .map_or_else(|| root.join(".venv-ci"), |venv| root.join(venv));
    let validator = venv.join("bin").join("openapi-spec-validator");
    if !validator.is_file() {
        let made = std::process::Command::new(root.join("scripts/python-tools.sh"))
            .output()
            .expect("run scripts/python-tools.sh");
        assert!(
            made.status.success(),
            "scripts/python-tools.sh failed (it needs python3 and PyPI): {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    assert!(
        validator.is_file(),
        "{} is missing: run scripts/python-tools.sh once (it installs openapi-spec-validator into {})",
        validator.display(),
        venv.display()
    );
    validator
}

/// Runs the validator on `document`; its verdict and what it said.
fn validate(validator: &std::path::Path, document: &[u8]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, document).expect("write the document");
    let output = std::process::Command::new(validator)
        .arg("--validation-errors")
        .arg("all")
        .arg(&path)
        .output()
        .expect("run openapi-spec-validator");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

/// The served document, byte for byte, passes openapi-spec-validator (which client generators such as
/// openapi-python-client rely on); the same document with one response's description removed does not.
#[tokio::test]
async fn the_served_document_passes_openapi_spec_validator() {
    let validator = openapi_validator();
    let srv = Server::start().await;
    let served = srv.get("/v1/openapi.json", Auth::None).await;
    assert_eq!(served.status, 200, "{served:?}");
    let (valid, said) = validate(&validator, served.text().as_bytes());
    assert!(valid, "the served document does not validate:\n{said}");

    let mut broken = served.json();
    let responses = broken["paths"]["/healthz"]["get"]["responses"]["200"]
        .as_object_mut()
        .expect("GET /healthz 200");
    responses.remove("description");
    let (valid, said) = validate(&validator, &serde_json::to_vec(&broken).unwrap());
    assert!(
        !valid,
        "the validator accepts a response without a description:\n{said}"
    );
}

/// Path and header parameters say what the server accepts.
#[tokio::test]
async fn parameters_carry_the_servers_rules() {
    let srv = Server::start().await;
    let doc = document(&srv).await;
    for (label, operation) in operations(&doc) {
        for p in operation["parameters"].as_array().into_iter().flatten() {
            let (location, name, schema) =
                (&p["in"], p["name"].as_str().unwrap_or(""), &p["schema"]);
            let context = format!("{label}: {location} {name}: {schema}");
            match (location.as_str().unwrap_or(""), name) {
                ("path", "user_id" | "item_id" | "name") => {
                    assert_eq!(schema["pattern"], "^[A-Za-z0-9_.-]{1,64}$", "{context}");
                    assert_eq!(schema["maxLength"], 64, "{context}");
                }
                ("path", "order_id" | "topup_id") => {
                    assert_eq!(schema["format"], "uuid", "{context}")
                }
                ("path", "node_id") => {
                    assert_eq!(schema["type"], "integer", "{context}");
                    assert_eq!(schema["minimum"], 1, "{context}");
                }
                ("header", "Idempotency-Key") | ("path", "key") => {
                    assert_eq!(schema["minLength"], 1, "{context}");
                    assert_eq!(schema["maxLength"], 255, "{context}");
                    assert!(schema["pattern"].is_string(), "{context}");
                }
                ("query", "consistency") => {
                    assert_eq!(enum_of(schema), ["linearizable", "local"], "{context}")
                }
                ("query", "limit") => {
                    // The event feed's pages are larger than the other lists'.
                    let most = if label.contains("/v1/events") {
                        1000
                    } else {
                        100
                    };
                    assert_eq!(
                        (&schema["minimum"], &schema["maximum"]),
                        (&1.into(), &most.into()),
                        "{context}"
                    )
                }
                ("query", "cursor") => assert!(schema["pattern"].is_string(), "{context}"),
                _ => {}
            }
        }
    }
    let status = parameter(&doc, "/v1/users/{user_id}/orders", "get", "query", "status");
    assert_eq!(
        enum_of(status),
        [
            "PENDING",
            "COMPLETED",
            "CANCELLED",
            "PARTIALLY_REFUNDED",
            "REFUNDED"
        ]
    );
    let key = parameter(
        &doc,
        "/v1/users/{user_id}/orders",
        "post",
        "header",
        "Idempotency-Key",
    );
    assert!(key.is_object(), "{key}");
}

/// Bodies: money patterns, ranges, enums, formats, error codes.
#[tokio::test]
async fn schemas_carry_the_servers_rules() {
    let srv = Server::start().await;
    let doc = document(&srv).await;
    let pattern = |schema: &str, name: &str| {
        property(&doc, schema, name)["pattern"]
            .as_str()
            .unwrap_or_else(|| panic!("{schema}.{name} has no pattern"))
            .to_owned()
    };
    // Money: a positive amount refuses zero, a price takes it; responses have the currency's decimals.
    assert!(pattern("CreditRequest", "amount").starts_with("^([1-9]"));
    assert!(pattern("PutItemRequest", "price").starts_with("^((0|"));
    assert_eq!(pattern("WalletResponse", "balance"), "^[0-9]+\\.[0-9]{2}$");
    assert_eq!(
        pattern("CreateUserRequest", "user_id"),
        "^[A-Za-z0-9_.-]{1,64}$"
    );
    let ranges = [
        ("CreateTokenRequest", "ttl_seconds", 1, 2_592_000),
        ("LineInput", "quantity", 1, 1000),
        ("ConsumeRequest", "quantity", 1, 1_000_000),
    ];
    for (schema, name, min, max) in ranges {
        let p = property(&doc, schema, name);
        assert_eq!(
            (&p["minimum"], &p["maximum"]),
            (&min.into(), &max.into()),
            "{schema}.{name}: {p}"
        );
    }
    let lines = property(&doc, "CreateOrderRequest", "lines");
    assert_eq!(
        (&lines["minItems"], &lines["maxItems"]),
        (&1.into(), &50.into()),
        "{lines}"
    );
    assert_eq!(property(&doc, "AddNodeRequest", "node_id")["minimum"], 1);
    assert_eq!(
        enum_of(property(&doc, "PutItemRequest", "kind")),
        ["game", "skin", "currency"]
    );
    assert_eq!(
        enum_of(property(&doc, "ItemResponse", "kind")),
        ["game", "skin", "currency"]
    );
    assert!(
        enum_of(property(&doc, "OrderResponse", "status")).contains(&"PARTIALLY_REFUNDED".into())
    );
    assert!(enum_of(property(&doc, "TopupResponse", "status")).contains(&"EXPIRED".into()));
    let codes = enum_of(property(&doc, "ErrorDetail", "code"));
    for code in [
        "invalid_request",
        "insufficient_funds",
        "idempotency_key_reused",
        "unavailable",
    ] {
        assert!(codes.contains(&code.to_owned()), "{code} not in {codes:?}");
    }
    for (schema, name) in [
        ("UserResponse", "created_at"),
        ("OrderResponse", "expires_at"),
        ("LedgerEntry", "at"),
    ] {
        assert_eq!(
            property(&doc, schema, name)["format"],
            "date-time",
            "{schema}.{name}"
        );
    }
    // Bodies refuse unknown fields (order lines included), and one with no required field may be empty.
    for schema in [
        "LineInput",
        "CreateOrderRequest",
        "EmptyRequest",
        "PutItemRequest",
    ] {
        let closed = &doc["components"]["schemas"][schema]["additionalProperties"];
        assert_eq!(closed, &Value::Bool(false), "{schema}");
    }
    let body = |path: &str| doc["paths"][path]["post"]["requestBody"]["required"].clone();
    assert_eq!(body("/v1/users"), Value::Bool(false));
    assert_eq!(
        body("/v1/users/{user_id}/orders/{order_id}/cancel"),
        Value::Bool(false)
    );
    assert_eq!(body("/v1/users/{user_id}/credits"), Value::Bool(true));
    for (schema, name) in [
        ("OrderResponse", "order_id"),
        ("RefundResponse", "refund_id"),
        ("LedgerEntry", "entry_id"),
    ] {
        assert_eq!(
            property(&doc, schema, name)["format"],
            "uuid",
            "{schema}.{name}"
        );
    }
}
