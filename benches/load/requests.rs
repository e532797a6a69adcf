//! The requests of the load: one purchase, a two-step purchase, a credit, a refund, a wallet read, each
//! checked against its expected answer; a failure is reported as its bucket (status, `timeout`, …).

use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, RequestBuilder, StatusCode};
use serde::Deserialize;
use uuid::Uuid;

use crate::SERVICE_TOKEN;

const ORDER_BODY: &str = r#"{"lines":[{"item_id":"gems","quantity":1}],"complete":true}"#;
const PENDING_ORDER_BODY: &str = r#"{"lines":[{"item_id":"gems","quantity":1}],"complete":false}"#;

#[derive(Deserialize)]
struct OrderBody {
    #[serde(default)]
    order_id: String,
    #[serde(default)]
    status: String,
}

/// Sends a service-role request (a POST gets a fresh `Idempotency-Key` and a JSON body) and checks its
/// status. Ok: the body, parsed as an order if `order` (else left unparsed); Err: the failure's bucket.
async fn send(
    request: RequestBuilder,
    body: Option<&'static str>,
    expected: StatusCode,
    order: bool,
) -> Result<Option<OrderBody>, String> {
    let mut request = request.bearer_auth(SERVICE_TOKEN);
    if let Some(body) = body {
        request = request
            .header("Idempotency-Key", Uuid::now_v7().to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return Err("timeout".into()),
        Err(_) => return Err("transport".into()),
    };
    let status = response.status();
    // Read the whole body so that the connection goes back to the pool.
    let Ok(bytes) = response.bytes().await else {
        return Err("transport".into());
    };
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

/// One complete purchase of one gem (`url`: the user's orders); the order id.
pub(crate) async fn purchase(client: &Client, url: &str) -> Result<String, String> {
    match send(
        client.post(url),
        Some(ORDER_BODY),
        StatusCode::CREATED,
        true,
    )
    .await?
    {
        Some(order) if order.status == "COMPLETED" => Ok(order.order_id),
        _ => Err("201-not-completed".into()),
    }
}

/// A two-step purchase: create a pending order, then complete it. (Was the order created, outcome.)
pub(crate) async fn two_step(
    client: &Client,
    base: &str,
    user: &str,
) -> (bool, Result<(), String>) {
    let url = format!("{base}/v1/users/{user}/orders");
    let created = send(
        client.post(&url),
        Some(PENDING_ORDER_BODY),
        StatusCode::CREATED,
        true,
    )
    .await;
    let order_id = match created {
        Ok(Some(order)) if order.status == "PENDING" => order.order_id,
        Ok(_) => return (true, Err("201-not-pending".into())),
        Err(bucket) => return (false, Err(bucket)),
    };
    let url = format!("{base}/v1/users/{user}/orders/{order_id}/complete");
    let completed = send(client.post(&url), Some("{}"), StatusCode::OK, true).await;
    let outcome = match completed {
        Ok(Some(order)) if order.status == "COMPLETED" => Ok(()),
        Ok(_) => Err("200-not-completed".into()),
        Err(bucket) => Err(bucket),
    };
    (true, outcome)
}

/// A direct credit of 1.00 with a fresh external reference.
pub(crate) async fn credit(client: &Client, base: &str, user: &str) -> Result<(), String> {
    let body = format!(
        r#"{{"amount":"1.00","external_ref":"mix-{}","source":"card"}}"#,
        Uuid::now_v7()
    );
    let request = client
        .post(format!("{base}/v1/users/{user}/credits"))
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .header(CONTENT_TYPE, "application/json")
        .body(body);
    send(request, None, StatusCode::CREATED, false)
        .await
        .map(|_| ())
}

/// A full refund of an earlier order.
pub(crate) async fn refund(
    client: &Client,
    base: &str,
    user: &str,
    order_id: &str,
) -> Result<(), String> {
    let url = format!("{base}/v1/users/{user}/orders/{order_id}/refunds");
    send(client.post(url), Some("{}"), StatusCode::CREATED, false)
        .await
        .map(|_| ())
}

/// `GET /v1/users/{id}/wallet` (linearizable, the default).
pub(crate) async fn read_wallet(client: &Client, base: &str, user: &str) -> Result<(), String> {
    let url = format!("{base}/v1/users/{user}/wallet");
    send(client.get(url), None, StatusCode::OK, false)
        .await
        .map(|_| ())
}
