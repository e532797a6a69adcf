//! Frozen accounts: `POST /v1/users/{user_id}/freeze` and `…/unfreeze` (admin, service).

use axum::extract::State;
use axum::response::Response;

use crate::domain::model::MAX_FREEZE_REASON_CHARS;
use crate::domain::{Command, Timestamp, command};
use crate::http::auth::Caller;
use crate::http::dto::{FreezeRequest, UnfreezeRequest, UserResponse};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, PathParams, Post};
use crate::http::{AppState, render};

/// Freeze an account: it can no longer order, complete orders, top up, consume or get tokens (403
/// `account_frozen`); reads, refunds and credits still work. Freezing a frozen account changes nothing.
#[utoipa::path(post, path = "/v1/users/{user_id}/freeze", tag = "users", request_body = FreezeRequest,
    params(("user_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 200, description = "The user, frozen", body = UserResponse),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn freeze(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(user_id): PathParams<String>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let key = post.idempotency_key()?;
    let request: FreezeRequest = post.json()?;
    let reason = input::bounded_text("reason", Some(request.reason), MAX_FREEZE_REASON_CHARS)?
        .unwrap_or_default();
    if reason.trim().is_empty() {
        return Err(ApiError::invalid_request("reason must not be empty"));
    }
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let freeze = Command::FreezeUser(command::FreezeUser {
        user_id: user_id.clone(),
        reason,
    });
    let applied = app
        .submit_for_user(&user_id, now, Some(tag), freeze)
        .await?;
    Ok(render::applied(&app, &applied))
}

/// Unfreeze an account. Unfreezing one that is not frozen changes nothing; one with debt needs an admin's
/// `force` (the debt stays).
#[utoipa::path(post, path = "/v1/users/{user_id}/unfreeze", tag = "users", request_body = UnfreezeRequest,
    params(("user_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 200, description = "The user, not frozen", body = UserResponse),
        (status = 403, description = "`forbidden` (`force` is the admin's)", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 409, description = "`debt_outstanding` (details: `debt`): the account owes the shop; an admin may pass `force`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn unfreeze(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(user_id): PathParams<String>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let key = post.idempotency_key()?;
    let request: UnfreezeRequest = post.json()?;
    let force = request.force.unwrap_or(false);
    if force {
        caller.require_admin()?;
    }
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let unfreeze = Command::UnfreezeUser(command::UnfreezeUser {
        user_id: user_id.clone(),
        force,
    });
    let applied = app
        .submit_for_user(&user_id, now, Some(tag), unfreeze)
        .await?;
    Ok(render::applied(&app, &applied))
}
