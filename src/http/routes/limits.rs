//! Limits: `PUT`/`GET /v1/admin/limits` (the shop-wide limits, admin) and `PUT`/`GET
//! /v1/users/{user_id}/limits` (a user's overrides; PUT admin, GET admin and service). Exceeding a
//! limit is 409 `limit_exceeded`, decided in `apply` (`state/apply/limits.rs`).

use axum::extract::State;
use axum::response::Response;
use serde_json::Value;

use crate::domain::limits::MAX_LIMIT_COUNT;
use crate::domain::{
    Command, LimitChanges, LimitSet, LimitsInForce, Money, Reply, Setting, Timestamp, command,
};
use crate::engine::Consistency;
use crate::http::auth::Caller;
use crate::http::dto::{self, LimitsRequest, ShopLimitsResponse, UserLimitsResponse};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, AmountRule, Body, PathParams, ReadConsistency};
use crate::http::{AppState, render};

/// Change the shop-wide limits (admin). Absent fields are unchanged, `null` is no limit, `"default"`
/// the built-in default. Copied to every shard; the answer is the limits after the change.
#[utoipa::path(put, path = "/v1/admin/limits", tag = "users", request_body = LimitsRequest,
    responses(
        (status = 200, description = "The shop-wide limits", body = ShopLimitsResponse),
        (status = 400, description = "`invalid_request` (an unknown field, a count out of 0-1000000)", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 422, description = "`invalid_amount` (`max_spend_per_day`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn put_shop_limits(
    State(app): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let request: LimitsRequest = body.json()?;
    let changes = changes(&app, &request)?;
    let applied = app.bounded_write(app.node.put_shop_limits(changes)).await?;
    match applied.outcome {
        Ok(Reply::ShopLimits(shop)) => Ok(render::ok(&shop_response(&app, &shop.limits))),
        Ok(other) => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        Err(rejection) => Err(ApiError::from_rejection(&rejection, &app.config.currency)),
    }
}

/// The shop-wide limits (admin): in force, and as set.
#[utoipa::path(get, path = "/v1/admin/limits", tag = "users",
    responses((status = 200, description = "The shop-wide limits", body = ShopLimitsResponse)),
    security(("bearer" = [])))]
pub async fn get_shop_limits(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let shop = app.bounded(app.node.shop_limits(consistency)).await?;
    Ok(render::ok(&shop_response(&app, &shop)))
}

/// Change a user's overrides of the shop-wide limits (admin). Absent fields are unchanged, `null` is
/// no limit for this user, `"default"` drops the override (the shop-wide value applies).
#[utoipa::path(put, path = "/v1/users/{user_id}/limits", tag = "users", request_body = LimitsRequest,
    params(("user_id" = String, Path)),
    responses(
        (status = 200, description = "The user's limits", body = UserLimitsResponse),
        (status = 400, description = "`invalid_request` (an unknown field, a count out of 0-1000000)", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_amount` (`max_spend_per_day`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn put_user_limits(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(user_id): PathParams<String>,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let request: LimitsRequest = body.json()?;
    let changes = changes(&app, &request)?;
    let now = Timestamp::now();
    let put = Command::PutUserLimits(command::PutUserLimits {
        user_id: user_id.clone(),
        changes,
    });
    let applied = app.submit_for_user(&user_id, now, None, put).await?;
    match applied.outcome {
        Ok(Reply::UserLimits { .. }) => {}
        Ok(other) => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        Err(rejection) => {
            return Err(ApiError::from_rejection(&rejection, &app.config.currency));
        }
    }
    user_response(&app, Consistency::Linearizable, &user_id).await
}

/// A user's limits (admin, service): in force (its overrides, else the shop's), its overrides, and
/// what they count now.
#[utoipa::path(get, path = "/v1/users/{user_id}/limits", tag = "users",
    params(("user_id" = String, Path)),
    responses(
        (status = 200, description = "The user's limits", body = UserLimitsResponse),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_user_limits(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(user_id): PathParams<String>,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    user_response(&app, consistency, &user_id).await
}

async fn user_response(
    app: &AppState,
    consistency: Consistency,
    user_id: &str,
) -> Result<Response, ApiError> {
    let view = app
        .bounded(app.node.user_limits(consistency, user_id, Timestamp::now()))
        .await?;
    let currency = &app.config.currency;
    let in_force = LimitsInForce::of_user(&view.overrides, &view.shop, default_pending_topups(app));
    Ok(render::ok(&UserLimitsResponse {
        user_id: user_id.to_owned(),
        limits: dto::limits_in_force(currency, &in_force),
        overrides: dto::limit_settings(currency, &view.overrides),
        usage: dto::usage(currency, &view.usage),
    }))
}

fn shop_response(app: &AppState, shop: &LimitSet) -> ShopLimitsResponse {
    let currency = &app.config.currency;
    let in_force = LimitsInForce::of_shop(shop, default_pending_topups(app));
    ShopLimitsResponse {
        limits: dto::limits_in_force(currency, &in_force),
        settings: dto::limit_settings(currency, shop),
    }
}

/// `--max-pending-topups`: `max_pending_topups` where no level sets it.
fn default_pending_topups(app: &AppState) -> Option<u32> {
    Some(app.config.max_pending_topups)
}

/// The request's fields as changes; 400 or 422 for a value no limit takes.
fn changes(app: &AppState, request: &LimitsRequest) -> Result<LimitChanges, ApiError> {
    let money = |field, value: &Option<Value>| -> Result<Option<Setting<Money>>, ApiError> {
        value
            .as_ref()
            .map(|v| {
                setting(v, |v| {
                    input::amount(&app.config.currency, field, v, AmountRule::NonNegative)
                })
            })
            .transpose()
    };
    let count = |field: &str, value: &Option<Value>| -> Result<Option<Setting<u32>>, ApiError> {
        value
            .as_ref()
            .map(|v| setting(v, |v| count_value(field, v)))
            .transpose()
    };
    Ok(LimitChanges {
        max_spend_per_day: money("max_spend_per_day", &request.max_spend_per_day)?,
        max_orders_per_hour: count("max_orders_per_hour", &request.max_orders_per_hour)?,
        max_pending_topups: count("max_pending_topups", &request.max_pending_topups)?,
        max_refunds_per_30_days: count(
            "max_refunds_per_30_days",
            &request.max_refunds_per_30_days,
        )?,
    })
}

/// `null` (no limit), `"default"`, or what `max` makes of any other value.
fn setting<T>(
    value: &Value,
    max: impl FnOnce(&Value) -> Result<T, ApiError>,
) -> Result<Setting<T>, ApiError> {
    match value {
        Value::Null => Ok(Setting::Unlimited),
        Value::String(s) if s == "default" => Ok(Setting::Default),
        other => max(other).map(Setting::Max),
    }
}

fn count_value(field: &str, value: &Value) -> Result<u32, ApiError> {
    value
        .as_u64()
        .filter(|&n| n <= u64::from(MAX_LIMIT_COUNT))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            ApiError::invalid_request(format!(
                "{field} must be an integer from 0 to {MAX_LIMIT_COUNT}, null or \"default\""
            ))
        })
}
