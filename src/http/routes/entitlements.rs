//! What users own (entitlements, consumption of in-game currency) and their wallet's ledger.

use axum::extract::{RawQuery, State};
use axum::response::Response;

use super::user_path;
use crate::domain::{Command, Timestamp, command};
use crate::http::auth::Caller;
use crate::http::dto::{
    self, ConsumeRequest, EntitlementResponse, EntitlementsResponse, LedgerPage,
};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, PathParams, Post, ReadConsistency};
use crate::http::{AppState, render};

/// Most units one consume call may spend.
pub(super) const MAX_CONSUME_QUANTITY: u32 = 1_000_000;
const DEFAULT_LEDGER_PAGE: usize = 50;
const MAX_LEDGER_PAGE: usize = 100;

/// The user's entitlements (quantity 0 omitted).
#[utoipa::path(get, path = "/v1/users/{user_id}/entitlements", tag = "entitlements",
    params(("user_id" = String, Path)),
    responses((status = 200, description = "The entitlements", body = EntitlementsResponse), (status = 404, description = "`user_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_entitlements(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(user_id): PathParams<String>,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let list = app
        .bounded(app.node.entitlements(consistency, &user_id))
        .await?;
    Ok(render::ok(&EntitlementsResponse {
        entitlements: list.iter().map(dto::entitlement).collect(),
    }))
}

/// Spend units of an in-game currency item (service, admin).
#[utoipa::path(post, path = "/v1/users/{user_id}/entitlements/{item_id}/consume", tag = "entitlements", request_body = ConsumeRequest,
    params(("user_id" = String, Path), ("item_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 200, description = "The entitlement after the consumption", body = EntitlementResponse),
        (status = 400, description = "`invalid_request` (also: the item is not a currency)", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 409, description = "`insufficient_entitlement`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn consume(
    State(app): State<AppState>,
    caller: Caller,
    PathParams((user_id, item_id)): PathParams<(String, String)>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let item_id = input::client_id("item_id", &item_id)?;
    let key = post.idempotency_key()?;
    let request: ConsumeRequest = post.json()?;
    if !(1..=MAX_CONSUME_QUANTITY).contains(&request.quantity) {
        return Err(ApiError::invalid_request(format!(
            "quantity must be from 1 to {MAX_CONSUME_QUANTITY}"
        )));
    }
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let command = Command::Consume(command::Consume {
        user_id: user_id.clone(),
        item_id,
        quantity: request.quantity,
    });
    let applied = app
        .submit_for_user(&user_id, now, Some(tag), command)
        .await?;
    Ok(render::applied(&app, &applied))
}

/// The wallet's ledger entries, oldest first.
#[utoipa::path(get, path = "/v1/users/{user_id}/ledger", tag = "entitlements",
    params(
        ("user_id" = String, Path),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "1-100, default 50"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,19}$", description = "next_cursor of the previous page"),
    ),
    responses((status = 200, description = "A page of ledger entries", body = LedgerPage), (status = 404, description = "`user_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn ledger(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(user_id): PathParams<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let pairs = input::query_pairs(raw.as_deref())?;
    let limit = input::limit(&pairs, DEFAULT_LEDGER_PAGE, MAX_LEDGER_PAGE)?;
    let after = input::param(&pairs, "cursor")
        .map(|c| {
            c.parse::<u64>()
                .map_err(|_| ApiError::invalid_request("invalid cursor"))
        })
        .transpose()?
        .unwrap_or(0);
    let read = app.node.ledger_page(consistency, &user_id, after, limit);
    let (entries, next) = app.bounded(read).await?;
    let currency = &app.config.currency;
    Ok(render::ok(&LedgerPage {
        entries: entries
            .iter()
            .map(|p| dto::ledger_entry(currency, p))
            .collect(),
        next_cursor: next.map(|seq| seq.to_string()),
    }))
}
