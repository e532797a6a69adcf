//! Orders (purchases) and their refunds.

use axum::extract::{RawQuery, State};
use axum::response::Response;
use uuid::Uuid;

use super::user_path;
use crate::domain::model::{MAX_LINES, MAX_QUANTITY, MAX_REASON_CHARS};
use crate::domain::{Command, LineRequest, OrderStatus, Timestamp, command};
use crate::engine::OrderCursor;
use crate::http::auth::Caller;
use crate::http::dto::{
    self, CreateOrderRequest, EmptyRequest, LineInput, OrderResponse, OrdersPage, RefundRequest,
    RefundResponse,
};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, AmountRule, PathParams, Post, ReadConsistency};
use crate::http::{AppState, render};

const DEFAULT_PAGE: usize = 20;
const MAX_PAGE: usize = 100;

/// Checks order or refund lines: 1–50, distinct well-formed item ids, quantities 1–1000.
fn lines(input: Vec<LineInput>) -> Result<Vec<LineRequest>, ApiError> {
    if input.is_empty() || input.len() > MAX_LINES {
        return Err(ApiError::invalid_request(format!(
            "lines must have 1 to {MAX_LINES} entries"
        )));
    }
    let mut lines: Vec<LineRequest> = Vec::with_capacity(input.len());
    for line in input {
        let item_id = input::client_id("item_id", &line.item_id)?;
        if !(1..=MAX_QUANTITY).contains(&line.quantity) {
            return Err(ApiError::invalid_request(format!(
                "quantity must be from 1 to {MAX_QUANTITY}"
            )));
        }
        if lines.iter().any(|l| l.item_id == item_id) {
            return Err(ApiError::invalid_request(format!(
                "item {item_id} appears in more than one line"
            )));
        }
        lines.push(LineRequest {
            item_id,
            quantity: line.quantity,
        });
    }
    Ok(lines)
}

fn order_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::order_not_found())
}

/// Buy items: the server prices them and holds the total (or, with `complete: true`, debits and grants at
/// once).
#[utoipa::path(post, path = "/v1/users/{user_id}/orders", tag = "orders", request_body = CreateOrderRequest,
    params(("user_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 201, description = "The order (PENDING, or COMPLETED with `complete: true`)", body = OrderResponse),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`user_not_found`, `item_not_found`", body = ErrorBody),
        (status = 409, description = "`insufficient_funds`, `price_changed`, `already_owned`, `item_inactive`, `too_many_pending_orders`, `limit_exceeded` (`max_orders_per_hour`, `max_spend_per_day`; details: `limit`, `max`, `retry_after`)", body = ErrorBody),
        (status = 422, description = "`invalid_amount`, `idempotency_key_reused`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_order(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(user_id): PathParams<String>,
    post: Post,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let key = post.idempotency_key()?;
    let request: CreateOrderRequest = post.json()?;
    let lines = lines(request.lines)?;
    let expected_total = match &request.expected_total {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => Some(input::amount(
            &app.config.currency,
            "expected_total",
            value,
            AmountRule::NonNegative,
        )?),
    };
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let command = Command::CreateOrder(command::CreateOrder {
        user_id: user_id.clone(),
        lines,
        expected_total,
        complete: request.complete.unwrap_or(false),
        expires_at: now.plus(app.config.order_ttl),
        max_pending_orders: app.config.max_pending_orders,
    });
    let applied = app
        .submit_for_user(&user_id, now, Some(tag), command)
        .await?;
    Ok(render::applied(&app, &applied))
}

/// The user's orders, newest first.
#[utoipa::path(get, path = "/v1/users/{user_id}/orders", tag = "orders",
    params(
        ("user_id" = String, Path),
        ("status" = Option<String>, Query, description = "PENDING, COMPLETED, CANCELLED, PARTIALLY_REFUNDED or REFUNDED"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "1-100, default 20"),
        ("cursor" = Option<String>, Query, pattern = r"^[0-9]{1,18}_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
            description = "next_cursor of the previous page"),
    ),
    responses((status = 200, description = "A page of orders, newest first", body = OrdersPage), (status = 404, description = "`user_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_orders(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(user_id): PathParams<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let pairs = input::query_pairs(raw.as_deref())?;
    let limit = input::limit(&pairs, DEFAULT_PAGE, MAX_PAGE)?;
    let status = input::param(&pairs, "status")
        .map(|s| {
            OrderStatus::parse(s)
                .ok_or_else(|| ApiError::invalid_request(format!("unknown status {s:?}")))
        })
        .transpose()?;
    let cursor = input::param(&pairs, "cursor")
        .map(|c| parse_order_cursor(c).ok_or_else(|| ApiError::invalid_request("invalid cursor")))
        .transpose()?;
    let read = app.node.orders_page(
        consistency,
        &user_id,
        status,
        limit,
        cursor,
        Timestamp::now(),
    );
    let (orders, next) = app.bounded(read).await?;
    let currency = &app.config.currency;
    Ok(render::ok(&OrdersPage {
        orders: orders.iter().map(|o| dto::order(currency, o)).collect(),
        next_cursor: next.map(|(created, id)| format!("{created}_{}", Uuid::from_u128(id))),
    }))
}

fn parse_order_cursor(cursor: &str) -> Option<OrderCursor> {
    let (created, id) = cursor.split_once('_')?;
    Some((created.parse().ok()?, Uuid::parse_str(id).ok()?.as_u128()))
}

/// One order, as of now (a pending order past its deadline reads as cancelled, reason `expired`).
#[utoipa::path(get, path = "/v1/users/{user_id}/orders/{order_id}", tag = "orders",
    params(("user_id" = String, Path), ("order_id" = String, Path)),
    responses((status = 200, description = "The order", body = OrderResponse), (status = 404, description = "`user_not_found`, `order_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_order(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams((user_id, order_id_text)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let order_id = Uuid::parse_str(&order_id_text).ok();
    let read = app
        .node
        .order(consistency, &user_id, order_id, Timestamp::now());
    let order = app.bounded(read).await?;
    Ok(render::ok(&dto::order(&app.config.currency, &order)))
}

async fn order_transition(
    app: AppState,
    caller: Caller,
    (user_id, order_id_text): (String, String),
    post: Post,
    complete: bool,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let key = post.idempotency_key()?;
    let _: EmptyRequest = post.json()?;
    let order_id = order_id(&order_id_text)?;
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let command = if complete {
        Command::CompleteOrder(command::CompleteOrder {
            user_id: user_id.clone(),
            order_id,
        })
    } else {
        Command::CancelOrder(command::CancelOrder {
            user_id: user_id.clone(),
            order_id,
        })
    };
    let applied = app
        .submit_for_user(&user_id, now, Some(tag), command)
        .await?;
    Ok(render::applied(&app, &applied))
}

/// Complete a pending order: debit the hold and grant the items, in one transaction.
#[utoipa::path(post, path = "/v1/users/{user_id}/orders/{order_id}/complete", tag = "orders", request_body = EmptyRequest,
    params(("user_id" = String, Path), ("order_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 200, description = "COMPLETED (also when it already was)", body = OrderResponse),
        (status = 404, description = "`user_not_found`, `order_not_found`", body = ErrorBody),
        (status = 409, description = "`invalid_state` (cancelled), `order_expired`, `limit_exceeded` (`max_spend_per_day`; details: `limit`, `max`, `retry_after`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn complete_order(
    State(app): State<AppState>,
    caller: Caller,
    PathParams((user_id, order_id)): PathParams<(String, String)>,
    post: Post,
) -> Result<Response, ApiError> {
    order_transition(app, caller, (user_id, order_id), post, true).await
}

/// Cancel a pending order and release its hold.
#[utoipa::path(post, path = "/v1/users/{user_id}/orders/{order_id}/cancel", tag = "orders", request_body = EmptyRequest,
    params(("user_id" = String, Path), ("order_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 200, description = "CANCELLED (also when it already was)", body = OrderResponse),
        (status = 404, description = "`user_not_found`, `order_not_found`", body = ErrorBody),
        (status = 409, description = "`invalid_state` (completed or refunded: refund it instead)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cancel_order(
    State(app): State<AppState>,
    caller: Caller,
    PathParams((user_id, order_id)): PathParams<(String, String)>,
    post: Post,
) -> Result<Response, ApiError> {
    order_transition(app, caller, (user_id, order_id), post, false).await
}

/// Refund some or all of a completed order (service, admin; `force` is admin only).
#[utoipa::path(post, path = "/v1/users/{user_id}/orders/{order_id}/refunds", tag = "orders", request_body = RefundRequest,
    params(("user_id" = String, Path), ("order_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 201, description = "The refund", body = RefundResponse),
        (status = 404, description = "`user_not_found`, `order_not_found`", body = ErrorBody),
        (status = 409, description = "`refund_exceeds_purchase`, `already_consumed`, `invalid_state`, `refund_window_closed`, `too_many_refunds`, `limit_exceeded` (`max_refunds_per_30_days`, not for a forced refund; details: `limit`, `max`, `retry_after`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_refund(
    State(app): State<AppState>,
    caller: Caller,
    PathParams((user_id, order_id_text)): PathParams<(String, String)>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let key = post.idempotency_key()?;
    let request: RefundRequest = post.json()?;
    let force = request.force.unwrap_or(false);
    if force {
        caller.require_admin()?;
    }
    let refund_lines = request.lines.map(lines).transpose()?;
    let reason = input::bounded_text("reason", request.reason, MAX_REASON_CHARS)?;
    let order_id = order_id(&order_id_text)?;
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let command = Command::Refund(command::Refund {
        user_id: user_id.clone(),
        order_id,
        lines: refund_lines,
        reason,
        force,
    });
    let applied = app
        .submit_for_user(&user_id, now, Some(tag), command)
        .await?;
    Ok(render::applied(&app, &applied))
}
