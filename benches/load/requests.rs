//! The requests of the load: one purchase, a two-step purchase, a credit, a refund, a wallet read, each
//! checked against its expected answer; a failure is reported as its bucket (status, `timeout`, …). Each
//! goes over the worker's own connection to the node it names (`http1::Conns`).

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use uuid::Uuid;

use crate::http1::{Call, Conns};

const ORDER_BODY: &str = r#"{"lines":[{"item_id":"gems","quantity":1}],"complete":true}"#;
const PENDING_ORDER_BODY: &str = r#"{"lines":[{"item_id":"gems","quantity":1}],"complete":false}"#;

#[derive(Deserialize)]
struct OrderBody {
    #[serde(default)]
    order_id: String,
    #[serde(default)]
    status: String,
}

/// Sends a service-role request to `node` (a POST with `body`, a fresh `Idempotency-Key` and JSON's
/// content type; else a GET) and checks its status. Ok: the body, parsed as an order if `order` (else
/// left unparsed); Err: the failure's bucket.
async fn send(
    conns: &mut Conns,
    node: usize,
    path: &str,
    body: Option<Bytes>,
    expected: StatusCode,
    order: bool,
) -> Result<Option<OrderBody>, String> {
    let call = Call {
        method: if body.is_some() {
            Method::POST
        } else {
            Method::GET
        },
        path,
        body: body.map(|json| (json, Uuid::now_v7().to_string())),
    };
    let (status, bytes) = conns.send(node, call).await?;
    if status != expected {
        return Err(status.as_u16().to_string());
    }
    if !order {
        return Ok(None);
    }
    match serde_json::from_slice::<OrderBody>(&bytes) {
        Ok(body) => Ok(Some(body)),
        Err(_) => Err(format!("{}-unreadable", status.as_u16())),
    }
}

/// One complete purchase of one gem (`path`: the user's orders) on `node`; the order id.
pub(crate) async fn purchase(conns: &mut Conns, node: usize, path: &str) -> Result<String, String> {
    let body = Some(Bytes::from_static(ORDER_BODY.as_bytes()));
    match send(conns, node, path, body, StatusCode::CREATED, true).await? {
        Some(order) if order.status == "COMPLETED" => Ok(order.order_id),
        _ => Err("201-not-completed".into()),
    }
}

/// A two-step purchase on `node`: create a pending order, then complete it. (Was the order created,
/// outcome.)
pub(crate) async fn two_step(
    conns: &mut Conns,
    node: usize,
    user: &str,
) -> (bool, Result<(), String>) {
    let path = format!("/v1/users/{user}/orders");
    let body = Some(Bytes::from_static(PENDING_ORDER_BODY.as_bytes()));
    let created = send(conns, node, &path, body, StatusCode::CREATED, true).await;
    let order_id = match created {
        Ok(Some(order)) if order.status == "PENDING" => order.order_id,
        Ok(_) => return (true, Err("201-not-pending".into())),
        Err(bucket) => return (false, Err(bucket)),
    };
    let path = format!("/v1/users/{user}/orders/{order_id}/complete");
    let body = Some(Bytes::from_static(b"{}"));
    let completed = send(conns, node, &path, body, StatusCode::OK, true).await;
    let outcome = match completed {
        Ok(Some(order)) if order.status == "COMPLETED" => Ok(()),
        Ok(_) => Err("200-not-completed".into()),
        Err(bucket) => Err(bucket),
    };
    (true, outcome)
}

/// A direct credit of 1.00 with a fresh external reference.
pub(crate) async fn credit(conns: &mut Conns, node: usize, user: &str) -> Result<(), String> {
    let body = format!(
        r#"{{"amount":"1.00","external_ref":"mix-{}","source":"card"}}"#,
        Uuid::now_v7()
    );
    let path = format!("/v1/users/{user}/credits");
    send(
        conns,
        node,
        &path,
        Some(Bytes::from(body)),
        StatusCode::CREATED,
        false,
    )
    .await
    .map(|_| ())
}

/// A full refund of an earlier order.
pub(crate) async fn refund(
    conns: &mut Conns,
    node: usize,
    user: &str,
    order_id: &str,
) -> Result<(), String> {
    let path = format!("/v1/users/{user}/orders/{order_id}/refunds");
    let body = Some(Bytes::from_static(b"{}"));
    send(conns, node, &path, body, StatusCode::CREATED, false)
        .await
        .map(|_| ())
}

/// `GET /v1/users/{id}/wallet` (linearizable, the default).
pub(crate) async fn read_wallet(conns: &mut Conns, node: usize, user: &str) -> Result<(), String> {
    let path = format!("/v1/users/{user}/wallet");
    send(conns, node, &path, None, StatusCode::OK, false)
        .await
        .map(|_| ())
}
