//! Bad input: every refusal has its contract error, changes nothing, and leaves the key usable.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::*;

async fn shop(srv: &Server, user: &str) {
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_item("skin", "skin", "2.00").await;
    srv.create_item("game", "game", "3.00").await;
    srv.funded_user(user, "50.00").await;
}

/// What a user's state looks like from outside.
async fn snapshot(srv: &Server, user: &str) -> (Wallet, Vec<Value>, Vec<Value>, usize) {
    (
        srv.wallet(user).await,
        srv.all_orders(user, "").await,
        srv.entitlements(user).await,
        srv.all_ledger(user).await.len(),
    )
}

/// POST a raw body with a fresh key, expect the error, check nothing changed.
async fn refused(srv: &Server, user: &str, path: &str, body: Vec<u8>, status: u16, code: &str) {
    let before = snapshot(srv, user).await;
    let key = new_key();
    let r = srv
        .call(Method::POST, path)
        .auth(Auth::Service)
        .key(&key)
        .raw(body.clone())
        .send()
        .await;
    assert_eq!(
        (r.status, r.code().as_deref()),
        (status, Some(code)),
        "body {}: {r:?}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    r.expect_error(status, code);
    assert_eq!(
        snapshot(srv, user).await,
        before,
        "state changed after refused {path}"
    );
    srv.get(
        &format!("/v1/users/{user}/idempotency/{key}"),
        Auth::Service,
    )
    .await
    .expect_error(404, "not_found");
}

fn b(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test]
async fn malformed_json_is_invalid_request_and_changes_nothing() {
    let srv = Server::start().await;
    shop(&srv, "b1").await;
    for body in [
        &b"{\"lines\": ["[..],
        b"",
        b"null",
        b"[]",
        b"\"lines\"",
        b"{\"lines\": [{\"item_id\": \"gems\", \"quantity\": 1}]} trailing",
        b"\xff\xfe{}",
    ] {
        refused(
            &srv,
            "b1",
            "/v1/users/b1/orders",
            body.to_vec(),
            400,
            "invalid_request",
        )
        .await;
    }
    refused(
        &srv,
        "b1",
        "/v1/users/b1/credits",
        b"{\"amount\": \"1.00\",".to_vec(),
        400,
        "invalid_request",
    )
    .await;
    refused(
        &srv,
        "b1",
        "/v1/users/b1/topups",
        b"{".to_vec(),
        400,
        "invalid_request",
    )
    .await;
    let r = srv
        .call(Method::POST, "/v1/users")
        .auth(Auth::Service)
        .fresh_key()
        .raw(&b"{"[..])
        .send()
        .await;
    r.expect_error(400, "invalid_request");
    let r = srv
        .call(Method::PUT, "/v1/items/x")
        .auth(Auth::Admin)
        .raw(&b"{\"name\":"[..])
        .send()
        .await;
    r.expect_error(400, "invalid_request");
}

#[tokio::test]
async fn wrong_types_are_invalid_request() {
    let srv = Server::start().await;
    shop(&srv, "b2").await;
    for body in [
        json!({"lines": "gems"}),
        json!({"lines": [{"item_id": "gems", "quantity": "1"}]}),
        json!({"lines": [{"item_id": "gems", "quantity": 1.5}]}),
        json!({"lines": [{"item_id": "gems", "quantity": -1}]}),
        json!({"lines": [{"item_id": 7, "quantity": 1}]}),
        json!({"lines": [{"item_id": "gems"}]}),
        json!({"lines": [{"item_id": "gems", "quantity": 1}], "complete": "yes"}),
        json!({"complete": true}),
        // a line must be an object, not a positional array
        json!({"lines": [["gems", 1]]}),
    ] {
        refused(
            &srv,
            "b2",
            "/v1/users/b2/orders",
            b(body),
            400,
            "invalid_request",
        )
        .await;
    }
    srv.post("/v1/users", Auth::Service, &json!({"user_id": 42}))
        .await
        .expect_error(400, "invalid_request");
    srv.post(
        "/v1/users",
        Auth::Service,
        &json!({"user_id": "x", "display_name": 5}),
    )
    .await
    .expect_error(400, "invalid_request");
}

#[tokio::test]
async fn money_as_json_number_is_invalid_amount() {
    let srv = Server::start().await;
    shop(&srv, "b3").await;
    for amount in [
        json!(20.00),
        json!(20),
        json!(0.5),
        json!(null),
        json!(true),
    ] {
        let code = if amount.is_number() {
            "invalid_amount"
        } else {
            ""
        };
        let body = b(json!({"amount": amount, "external_ref": "r-b3", "source": "card"}));
        if code.is_empty() {
            // not money at all: either refusal is acceptable, but it must be a refusal that changes nothing
            let before = snapshot(&srv, "b3").await;
            let r = srv
                .call(Method::POST, "/v1/users/b3/credits")
                .auth(Auth::Service)
                .fresh_key()
                .raw(body)
                .send()
                .await;
            assert!(
                matches!(
                    (r.status, r.code().as_deref()),
                    (422, Some("invalid_amount")) | (400, Some("invalid_request"))
                ),
                "{r:?}"
            );
            assert_eq!(snapshot(&srv, "b3").await, before);
        } else {
            refused(
                &srv,
                "b3",
                "/v1/users/b3/credits",
                body,
                422,
                "invalid_amount",
            )
            .await;
        }
    }
    refused(
        &srv,
        "b3",
        "/v1/users/b3/topups",
        b(json!({"amount": 5})),
        422,
        "invalid_amount",
    )
    .await;
    refused(
        &srv,
        "b3",
        "/v1/users/b3/orders",
        b(json!({"lines": [{"item_id": "gems", "quantity": 1}], "expected_total": 1.00})),
        422,
        "invalid_amount",
    )
    .await;
}

#[tokio::test]
async fn bad_money_strings_are_invalid_amount() {
    let srv = Server::start().await;
    shop(&srv, "b4").await;
    for amount in [
        "1.234",
        "-1.00",
        "0.00",
        "0",
        "1000000.01",
        "abc",
        "",
        "1,00",
        "1e3",
        "NaN",
        "0.001",
        " 1.00",
        "€1.00",
        "+-1",
    ] {
        refused(
            &srv,
            "b4",
            "/v1/users/b4/credits",
            b(json!({"amount": amount, "external_ref": "r-b4", "source": "card"})),
            422,
            "invalid_amount",
        )
        .await;
        refused(
            &srv,
            "b4",
            "/v1/users/b4/topups",
            b(json!({"amount": amount})),
            422,
            "invalid_amount",
        )
        .await;
    }
    for total in ["1.234", "-1.00", "abc", "1000000.01"] {
        refused(
            &srv,
            "b4",
            "/v1/users/b4/orders",
            b(json!({"lines": [{"item_id": "gems", "quantity": 1}], "expected_total": total})),
            422,
            "invalid_amount",
        )
        .await;
    }
    // the upper bound itself is fine, and the key of a refused request works afterwards
    let key = new_key();
    let bad = json!({"amount": "1000000.01", "external_ref": "r-b4", "source": "card"});
    srv.post_key("/v1/users/b4/credits", Auth::Service, &key, &bad)
        .await
        .expect_error(422, "invalid_amount");
    let good = json!({"amount": "1000000.00", "external_ref": "r-b4", "source": "card"});
    let r = srv
        .post_key("/v1/users/b4/credits", Auth::Service, &key, &good)
        .await;
    r.expect(201);
    assert!(!r.replayed());
    assert_eq!(srv.wallet("b4").await.balance, 5000 + 100_000_000);
}

#[tokio::test]
async fn bodies_over_64_kib_are_payload_too_large() {
    let srv = Server::start().await;
    shop(&srv, "b5").await;
    let big = json!({"amount": "1.00", "external_ref": "r-b5", "source": "x".repeat(65 * 1024)});
    refused(
        &srv,
        "b5",
        "/v1/users/b5/credits",
        b(big.clone()),
        413,
        "payload_too_large",
    )
    .await;
    let big_order =
        json!({"lines": [{"item_id": "gems", "quantity": 1}], "pad": "y".repeat(100 * 1024)});
    refused(
        &srv,
        "b5",
        "/v1/users/b5/orders",
        b(big_order),
        413,
        "payload_too_large",
    )
    .await;
    let r = srv
        .put("/v1/items/huge", Auth::Admin, &json!({"name": "n".repeat(70 * 1024), "kind": "game", "price": "1.00", "active": true}))
        .await;
    r.expect_error(413, "payload_too_large");
    srv.get("/v1/items/huge", Auth::Admin)
        .await
        .expect_error(404, "item_not_found");
    // the key is usable afterwards
    let key = new_key();
    srv.post_key("/v1/users/b5/credits", Auth::Service, &key, &big)
        .await
        .expect_error(413, "payload_too_large");
    srv.post_key(
        "/v1/users/b5/credits",
        Auth::Service,
        &key,
        &json!({"amount": "1.00", "external_ref": "r-b5", "source": "card"}),
    )
    .await
    .expect(201);
    // A body just under the limit is not refused for its size.
    let r = srv
        .post(
            "/v1/users",
            Auth::Service,
            &json!({"user_id": "b5x", "display_name": "d".repeat(60 * 1024)}),
        )
        .await;
    assert_ne!(
        r.status, 413,
        "a 60 KiB body must not be payload_too_large: {r:?}"
    );
    r.expect_error(400, "invalid_request");
}

#[tokio::test]
async fn invalid_identifiers_are_invalid_request() {
    let srv = Server::start().await;
    shop(&srv, "b6").await;
    let long = "u".repeat(65);
    for id in [long.as_str(), "bad id", "bad/id", "bäd", "a*b", "", "a:b"] {
        srv.post("/v1/users", Auth::Service, &json!({"user_id": id}))
            .await
            .expect_error(400, "invalid_request");
    }
    let ok64 = "u".repeat(64);
    srv.post("/v1/users", Auth::Service, &json!({"user_id": ok64}))
        .await
        .expect(201);
    srv.post("/v1/users", Auth::Service, &json!({"user_id": "Az09_.-"}))
        .await
        .expect(201);
    // ids in the path
    for path in [
        format!("/v1/users/{long}"),
        format!("/v1/users/{long}/wallet"),
        "/v1/users/bad%20id".to_string(),
        "/v1/users/bad%2Aid/orders".to_string(),
    ] {
        let r = srv.get(&path, Auth::Service).await;
        assert_eq!(r.status, 400, "{r:?}");
        r.expect_error(400, "invalid_request");
    }
    // item ids in order lines
    for item in [long.as_str(), "bad item", ""] {
        refused(
            &srv,
            "b6",
            "/v1/users/b6/orders",
            b(json!({"lines": [{"item_id": item, "quantity": 1}]})),
            400,
            "invalid_request",
        )
        .await;
    }
    // ids in the consume path
    refused(
        &srv,
        "b6",
        &format!("/v1/users/b6/entitlements/{long}/consume"),
        b(json!({"quantity": 1})),
        400,
        "invalid_request",
    )
    .await;
}

#[tokio::test]
async fn unknown_fields_are_invalid_request() {
    let srv = Server::start().await;
    shop(&srv, "b7").await;
    for body in [
        json!({"lines": [{"item_id": "gems", "quantity": 1}], "total": "0.01"}),
        json!({"lines": [{"item_id": "gems", "quantity": 1, "unit_price": "0.01"}]}),
        json!({"lines": [{"item_id": "gems", "quantity": 1}], "user_id": "other"}),
    ] {
        refused(
            &srv,
            "b7",
            "/v1/users/b7/orders",
            b(body),
            400,
            "invalid_request",
        )
        .await;
    }
    refused(
        &srv,
        "b7",
        "/v1/users/b7/credits",
        b(json!({"amount": "1.00", "external_ref": "r-b7", "source": "card", "bonus": "100.00"})),
        400,
        "invalid_request",
    )
    .await;
    refused(
        &srv,
        "b7",
        "/v1/users/b7/topups",
        b(json!({"amount": "1.00", "status": "COMPLETED"})),
        400,
        "invalid_request",
    )
    .await;
    srv.post(
        "/v1/users",
        Auth::Service,
        &json!({"user_id": "b7x", "balance": "100.00"}),
    )
    .await
    .expect_error(400, "invalid_request");
    srv.get("/v1/users/b7x", Auth::Service)
        .await
        .expect_error(404, "user_not_found");
    srv.post(
        "/v1/users/b7/tokens",
        Auth::Service,
        &json!({"ttl_seconds": 60, "role": "admin"}),
    )
    .await
    .expect_error(400, "invalid_request");
}

/// A key given twice is refused wherever it is, not read as the last one (which a different parser could
/// read as the first).
#[tokio::test]
async fn duplicate_keys_are_invalid_request() {
    let srv = Server::start().await;
    shop(&srv, "bd").await;
    let bodies: [(&str, &[u8]); 4] = [
        ("/v1/users/bd/topups", br#"{"amount": "1.00", "amount": "2.00"}"#),
        (
            "/v1/users/bd/orders",
            br#"{"lines": [{"item_id": "gems", "quantity": 1, "quantity": 2}]}"#,
        ),
        (
            "/v1/users/bd/orders",
            br#"{"lines": [{"item_id": "gems", "quantity": 1}], "complete": false, "complete": true}"#,
        ),
        (
            "/v1/users/bd/credits",
            br#"{"amount": "1.00", "external_ref": "r-bd", "external_ref": "r-bd2"}"#,
        ),
    ];
    for (path, body) in bodies {
        refused(&srv, "bd", path, body.to_vec(), 400, "invalid_request").await;
    }
    let r = srv
        .call(Method::PUT, "/v1/items/dup")
        .auth(Auth::Admin)
        .raw(br#"{"name": "A", "kind": "game", "price": "1.00", "price": "0.00"}"#.to_vec())
        .send()
        .await;
    r.expect_error(400, "invalid_request");
    srv.get("/v1/items/dup", Auth::Admin)
        .await
        .expect_error(404, "item_not_found");
    // The same key in two sibling objects is no duplicate.
    let r = srv
        .call(Method::POST, "/v1/users/bd/orders")
        .auth(Auth::Service)
        .fresh_key()
        .raw(br#"{"lines": [{"item_id": "gems", "quantity": 1}, {"item_id": "skin", "quantity": 1}]}"#.to_vec())
        .send()
        .await;
    r.expect(201);
}

#[tokio::test]
async fn order_lines_are_bounded() {
    let srv = Server::start().await;
    shop(&srv, "b8").await;
    srv.credit("b8", "1000.00").await;
    for i in 0..51 {
        srv.create_item(&format!("c{i:02}"), "currency", "0.01")
            .await;
    }
    let lines = |n: usize| -> Value {
        let l: Vec<Value> = (0..n)
            .map(|i| json!({"item_id": format!("c{i:02}"), "quantity": 1}))
            .collect();
        json!({"lines": l})
    };
    refused(
        &srv,
        "b8",
        "/v1/users/b8/orders",
        b(lines(51)),
        400,
        "invalid_request",
    )
    .await;
    refused(
        &srv,
        "b8",
        "/v1/users/b8/orders",
        b(lines(0)),
        400,
        "invalid_request",
    )
    .await;
    for body in [
        json!({"lines": [{"item_id": "gems", "quantity": 0}]}),
        json!({"lines": [{"item_id": "gems", "quantity": 1001}]}),
        json!({"lines": [{"item_id": "skin", "quantity": 2}]}),
        json!({"lines": [{"item_id": "game", "quantity": 2}]}),
        json!({"lines": [{"item_id": "gems", "quantity": 1}, {"item_id": "gems", "quantity": 2}]}),
        json!({"lines": [{"item_id": "gems", "quantity": 1}, {"item_id": "skin", "quantity": 1}, {"item_id": "gems", "quantity": 1}]}),
    ] {
        refused(
            &srv,
            "b8",
            "/v1/users/b8/orders",
            b(body),
            400,
            "invalid_request",
        )
        .await;
    }
    // the limits themselves are fine
    let o = srv
        .post("/v1/users/b8/orders", Auth::Service, &lines(50))
        .await
        .expect(201);
    assert_eq!(o["lines"].as_array().unwrap().len(), 50);
    assert_eq!(o["total"], "0.50");
    let o = srv.order("b8", &[("gems", 1000)], false).await;
    assert_eq!(o["total"], "1000.00");
}

#[tokio::test]
async fn list_limits_are_checked() {
    let srv = Server::start().await;
    shop(&srv, "b9").await;
    for q in [
        "limit=101",
        "limit=0",
        "limit=1000000000000",
        "limit=",
        "status=NOPE",
        "cursor=not-a-cursor",
    ] {
        let r = srv
            .get(&format!("/v1/users/b9/orders?{q}"), Auth::Service)
            .await;
        r.expect_error(400, "invalid_request");
    }
    for q in ["limit=101", "limit=0"] {
        srv.get(&format!("/v1/users/b9/ledger?{q}"), Auth::Service)
            .await
            .expect_error(400, "invalid_request");
    }
}

#[tokio::test]
async fn refused_requests_leave_the_key_usable() {
    let srv = Server::start().await;
    shop(&srv, "ba").await;
    let key = new_key();
    let path = "/v1/users/ba/orders";
    // 400 invalid_request (quantity 0), then 400 (unknown field), then 422 (number money), then fixed.
    for bad in [
        json!({"lines": [{"item_id": "gems", "quantity": 0}]}),
        json!({"lines": [{"item_id": "gems", "quantity": 1}], "discount": "1.00"}),
        json!({"lines": [{"item_id": "gems", "quantity": 1}], "expected_total": 1}),
    ] {
        let r = srv.post_key(path, Auth::Service, &key, &bad).await;
        assert!(matches!(r.status, 400 | 422), "{r:?}");
    }
    let r = srv
        .post_key(path, Auth::Service, &key, &order_body(&[("gems", 1)], true))
        .await;
    r.expect(201);
    assert!(!r.replayed());
    assert_eq!(srv.wallet("ba").await.balance, 4900);
}

type RawResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// Read one HTTP/1.1 response (status line + headers + Content-Length body) from a blocking stream.
fn read_response(s: &mut std::net::TcpStream) -> std::io::Result<RawResponse> {
    use std::io::Read;
    let mut buf = vec![];
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((status, headers, body))
}

/// After an early 413 the server either keeps the connection usable or says `Connection: close`
/// (RFC 9112 §9.6); closing silently makes keep-alive clients fail their next request.
#[tokio::test]
async fn payload_too_large_either_keeps_the_connection_or_says_connection_close() {
    use std::io::Write;
    let srv = Server::start().await;
    srv.create_user("b0").await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    let result = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let body = serde_json::to_vec(&json!({"amount": "1.00", "external_ref": "r", "source": "x".repeat(70 * 1024)})).unwrap();
        let head = format!(
            "POST /v1/users/b0/credits HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {SERVICE_TOKEN}\r\n\
             Idempotency-Key: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            new_key(),
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let _ = s.write_all(&body);
        let first = read_response(&mut s).expect("a 413 response");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let second = s
            .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .and_then(|_| read_response(&mut s));
        (first, second.map(|r| r.0))
    })
    .await
    .unwrap();
    let ((status, headers, _), second) = result;
    assert_eq!(status, 413);
    let says_close = headers
        .iter()
        .any(|(k, v)| k == "connection" && v.to_ascii_lowercase().contains("close"));
    match second {
        Ok(200) => {}
        other => assert!(
            says_close,
            "the server closed the connection after 413 without `Connection: close` (next request: {other:?}); headers: {headers:?}"
        ),
    }
}
