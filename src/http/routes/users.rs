//! Users, wallets, user tokens and the idempotency lookup.

use axum::extract::State;
use axum::response::Response;

use super::user_path;
use crate::domain::model::MAX_DISPLAY_NAME_CHARS;
use crate::domain::{Command, Outcome, Reply, Timestamp, command};
use crate::engine::coordinator::{GlobalKey, NewUser};
use crate::http::auth::{Caller, MAX_TOKEN_TTL_SECONDS};
use crate::http::dto::{
    self, CreateTokenRequest, CreateUserRequest, IdempotencyResponse, TokenResponse, UserResponse,
    WalletResponse,
};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, PathParams, Post, ReadConsistency};
use crate::http::{AppState, render};

const DEFAULT_TOKEN_TTL_SECONDS: u64 = 3_600;

/// Create a user with an empty wallet (admin, service).
#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = CreateUserRequest,
    params(("Idempotency-Key" = String, Header, description = "1-255 printable ASCII characters; scope `global`")),
    responses(
        (status = 201, description = "Created", body = UserResponse),
        (status = 400, description = "`invalid_request`, `idempotency_key_required`", body = ErrorBody),
        (status = 409, description = "`user_exists`", body = ErrorBody),
        (status = 422, description = "`idempotency_key_reused`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_user(
    State(app): State<AppState>,
    caller: Caller,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let key = post.idempotency_key()?;
    let request: CreateUserRequest = post.json()?;
    let user_id = request
        .user_id
        .map(|id| input::client_id("user_id", &id))
        .transpose()?;
    let display_name =
        input::bounded_text("display_name", request.display_name, MAX_DISPLAY_NAME_CHARS)?;
    let now = Timestamp::now();
    let global = GlobalKey {
        key,
        fingerprint: post.fingerprint(),
        expires_at: now.plus(app.config.idempotency_ttl),
    };
    let user = NewUser {
        user_id,
        display_name,
    };
    let applied = app
        .bounded_write(app.node.create_user(now, global, user))
        .await?;
    Ok(render::applied(&app, &applied))
}

/// A user and its wallet.
#[utoipa::path(get, path = "/v1/users/{user_id}", tag = "users",
    params(("user_id" = String, Path)),
    responses((status = 200, description = "The user and its wallet", body = UserResponse), (status = 404, description = "`user_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_user(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(user_id): PathParams<String>,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let read = app.node.user(consistency, &user_id, Timestamp::now());
    let view = app.bounded(read).await?;
    Ok(render::ok(&dto::user(
        &app.config.currency,
        &view.user,
        &view.wallet,
        view.frozen.as_ref(),
        Some(view.debt),
    )))
}

/// The wallet: `available = balance - held`, holds of expired orders left out.
#[utoipa::path(get, path = "/v1/users/{user_id}/wallet", tag = "users",
    params(("user_id" = String, Path)),
    responses((status = 200, description = "The wallet", body = WalletResponse), (status = 404, description = "`user_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_wallet(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(user_id): PathParams<String>,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let read = app.node.user(consistency, &user_id, Timestamp::now());
    let view = app.bounded(read).await?;
    let wallet = dto::wallet_owing(&app.config.currency, &view.wallet, view.debt);
    Ok(render::ok(&wallet))
}

/// Mint a token bound to this user (admin, service).
#[utoipa::path(post, path = "/v1/users/{user_id}/tokens", tag = "users", request_body = CreateTokenRequest,
    params(("user_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 201, description = "The token", body = TokenResponse), (status = 404, description = "`user_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(user_id): PathParams<String>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let key = post.idempotency_key()?;
    let request: CreateTokenRequest = post.json()?;
    let ttl = request.ttl_seconds.unwrap_or(DEFAULT_TOKEN_TTL_SECONDS);
    if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl) {
        return Err(ApiError::invalid_request(format!(
            "ttl_seconds must be from 1 to {MAX_TOKEN_TTL_SECONDS}"
        )));
    }
    let now = Timestamp::now();
    let expires_at = Timestamp::from_unix_seconds(now.unix_seconds().saturating_add_unsigned(ttl));
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let applied = app
        .submit_for_user(
            &user_id,
            now,
            Some(tag),
            Command::IssueToken(command::IssueToken {
                user_id: user_id.clone(),
                expires_at,
            }),
        )
        .await?;
    Ok(render::applied(&app, &applied))
}

/// What happened to a request sent with this Idempotency-Key (for a client whose request timed out).
#[utoipa::path(get, path = "/v1/users/{user_id}/idempotency/{key}", tag = "users",
    params(("user_id" = String, Path), ("key" = String, Path)),
    responses(
        (status = 200, description = "The stored outcome", body = IdempotencyResponse),
        (status = 404, description = "`user_not_found`, `not_found` (also to a user token when the key's outcome is a token issuance)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_idempotency(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams((user_id, key)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let key = input::idempotency_key_text(&key)?;
    let record = app
        .bounded(app.node.stored_outcome(consistency, &user_id, &key))
        .await?;
    if hidden_from(&caller, &record.outcome) {
        return Err(ApiError::stored_outcome_not_found());
    }
    let rendered = render::outcome(&app, &record.outcome);
    let body =
        serde_json::from_slice(&rendered.body).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(render::ok(&IdempotencyResponse {
        key,
        status: rendered.status.as_u16(),
        body,
        created_at: record.created_at.to_rfc3339(),
    }))
}

/// Whether `caller` must not see this stored outcome. A token issuance renders the token itself: a user
/// holding a short-lived token must not read back a longer one the service minted for it, so to a user the
/// key looks as if nothing were stored under it (admin and service still see it).
fn hidden_from(caller: &Caller, outcome: &Outcome) -> bool {
    matches!(caller, Caller::User(_)) && matches!(outcome, Ok(Reply::TokenIssued { .. }))
}
