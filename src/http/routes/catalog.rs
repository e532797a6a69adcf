//! The catalog: items for sale, copied into every shard.

use axum::extract::State;
use axum::response::Response;

use crate::domain::model::{MAX_ITEM_NAME_CHARS, MAX_REFUND_WINDOW_DAYS};
use crate::domain::{ItemKind, ItemSpec};
use crate::http::auth::Caller;
use crate::http::dto::{self, ItemResponse, ItemsResponse, PutItemRequest};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, AmountRule, Body, PathParams, ReadConsistency};
use crate::http::{AppState, render};

const DEFAULT_REFUND_WINDOW_DAYS: u32 = 14;

/// Create or replace an item (admin). PUT is idempotent: no Idempotency-Key needed; the version grows
/// only when something changed.
#[utoipa::path(put, path = "/v1/items/{item_id}", tag = "catalog", request_body = PutItemRequest,
    params(("item_id" = String, Path)),
    responses(
        (status = 200, description = "The item as stored, with its version", body = ItemResponse),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 409, description = "`catalog_full`, `invalid_state` (changing an item's kind)", body = ErrorBody),
        (status = 422, description = "`invalid_amount`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn put_item(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(item_id): PathParams<String>,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let item_id = input::client_id("item_id", &item_id)?;
    let request: PutItemRequest = body.json()?;
    let name =
        input::bounded_text("name", Some(request.name), MAX_ITEM_NAME_CHARS)?.unwrap_or_default();
    if name.trim().is_empty() {
        return Err(ApiError::invalid_request("name must not be empty"));
    }
    let kind = ItemKind::parse(&request.kind)
        .ok_or_else(|| ApiError::invalid_request("kind must be one of game, skin, currency"))?;
    let price = input::amount(
        &app.config.currency,
        "price",
        &request.price,
        AmountRule::NonNegative,
    )?;
    let refund_window_days = request
        .refund_window_days
        .unwrap_or(DEFAULT_REFUND_WINDOW_DAYS);
    if refund_window_days > MAX_REFUND_WINDOW_DAYS {
        return Err(ApiError::invalid_request(format!(
            "refund_window_days must be at most {MAX_REFUND_WINDOW_DAYS}"
        )));
    }
    let spec = ItemSpec {
        item_id,
        name,
        kind,
        price,
        active: request.active.unwrap_or(true),
        refund_window_days,
    };
    let applied = app.bounded_write(app.node.put_item(spec)).await?;
    Ok(render::applied(&app, &applied))
}

/// One item (any role).
#[utoipa::path(get, path = "/v1/items/{item_id}", tag = "catalog",
    params(("item_id" = String, Path)),
    responses((status = 200, description = "The item", body = ItemResponse), (status = 404, description = "`item_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_item(
    State(app): State<AppState>,
    _caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(item_id): PathParams<String>,
) -> Result<Response, ApiError> {
    let item_id = input::client_id("item_id", &item_id)?;
    let item = app.bounded(app.node.item(consistency, &item_id)).await?;
    Ok(render::ok(&dto::item(&app.config.currency, &item)))
}

/// The whole catalog, by item id (any role).
#[utoipa::path(get, path = "/v1/items", tag = "catalog",
    responses((status = 200, description = "Every item, by item id", body = ItemsResponse)),
    security(("bearer" = [])))]
pub async fn list_items(
    State(app): State<AppState>,
    _caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
) -> Result<Response, ApiError> {
    let items = app.bounded(app.node.items(consistency)).await?;
    let currency = &app.config.currency;
    Ok(render::ok(&ItemsResponse {
        items: items.iter().map(|i| dto::item(currency, i)).collect(),
    }))
}
