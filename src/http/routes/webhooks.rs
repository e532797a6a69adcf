//! Webhooks (admin): `PUT`, `GET` and `DELETE /v1/webhooks/{name}`, `POST /v1/webhooks/{name}/replay`.

use std::time::Duration;

use axum::extract::State;
use axum::response::Response;

use crate::domain::{Reply, Timestamp, Webhook};
use crate::engine::events::EventCursor;
use crate::engine::webhooks::admin::WebhookStatus;
use crate::engine::webhooks::backoff::FAILING_AFTER;
use crate::engine::{Applied, Consistency};
use crate::http::auth::Caller;
use crate::http::dto::{
    PutWebhookRequest, ReplayWebhookRequest, WebhookResponse, WebhookShardResponse,
};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, Body, PathParams, Post, ReadConsistency};
use crate::http::{AppState, render};

/// Create or change a webhook (admin). Every PUT makes a new signing secret, shown once in the answer.
#[utoipa::path(put, path = "/v1/webhooks/{name}", tag = "events", request_body = PutWebhookRequest,
    params(("name" = String, Path, description = "1-64 of [A-Za-z0-9_.-]")),
    responses(
        (status = 200, description = "The webhook with its new secret", body = WebhookResponse),
        (status = 400, description = "`invalid_request` (a URL whose host --webhook-allow-hosts does not allow, an unknown type)", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 409, description = "`limit_exceeded` (32 webhooks)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn put_webhook(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let name = input::client_id("name", &name)?;
    let request: PutWebhookRequest = body.json()?;
    let names = request.types.unwrap_or_default();
    let types = input::event_types(names.iter().map(String::as_str))?;
    app.webhooks
        .allow
        .resolve_checked(&request.url)
        .await
        .map_err(|e| ApiError::invalid_request(format!("url: {e}")))?;
    let applied = app
        .bounded_write(app.node.put_webhook(&name, &request.url, types))
        .await?;
    let webhook = into_webhook(&app, applied)?;
    let status = app
        .bounded(app.node.webhook_status(Consistency::Linearizable, &name))
        .await?;
    let mut response = webhook_response(&status);
    response.secret = Some(app.webhooks.secret(&name, webhook.generation));
    Ok(render::ok(&response))
}

/// A webhook and how its delivery stands on every shard (admin).
#[utoipa::path(get, path = "/v1/webhooks/{name}", tag = "events",
    params(("name" = String, Path)),
    responses((status = 200, description = "The webhook (without its secret)", body = WebhookResponse), (status = 404, description = "`not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_webhook(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(name): PathParams<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let name = input::client_id("name", &name)?;
    let status = app
        .bounded(app.node.webhook_status(consistency, &name))
        .await?;
    Ok(render::ok(&webhook_response(&status)))
}

/// Deliver again every event after a feed cursor (admin). Setting a position is idempotent by itself:
/// the `Idempotency-Key` is required like on every POST, and no outcome is stored under it.
#[utoipa::path(post, path = "/v1/webhooks/{name}/replay", tag = "events", request_body = ReplayWebhookRequest,
    params(("name" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "The webhook after the replay", body = WebhookResponse), (status = 400, description = "`invalid_request`", body = ErrorBody), (status = 404, description = "`not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn replay_webhook(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    post.idempotency_key()?;
    let name = input::client_id("name", &name)?;
    let request: ReplayWebhookRequest = post.json()?;
    let after = EventCursor::decode(&request.after, app.node.shard_count())
        .map_err(|e| ApiError::invalid_request(e.to_string()))?;
    app.bounded_write(app.node.replay_webhook(&name, &after))
        .await?;
    let status = app
        .bounded(app.node.webhook_status(Consistency::Linearizable, &name))
        .await?;
    Ok(render::ok(&webhook_response(&status)))
}

/// Stop delivering and forget a webhook (admin).
#[utoipa::path(delete, path = "/v1/webhooks/{name}", tag = "events",
    params(("name" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, description = "`not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_webhook(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let name = input::client_id("name", &name)?;
    let applied = app.bounded_write(app.node.delete_webhook(&name)).await?;
    into_webhook(&app, applied)?;
    Ok(render::no_content())
}

fn into_webhook(app: &AppState, applied: Applied) -> Result<Webhook, ApiError> {
    match applied.outcome {
        Ok(Reply::Webhook(webhook)) => Ok(webhook),
        Ok(other) => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        Err(rejection) => Err(ApiError::from_rejection(&rejection, &app.config.currency)),
    }
}

/// The webhook as the home shard has it, with the delivery of every shard summed up.
fn webhook_response(status: &WebhookStatus) -> WebhookResponse {
    let webhook = &status.webhook;
    let rows: Vec<(u64, &Webhook)> = status
        .shards
        .iter()
        .filter_map(|d| d.row.as_ref().map(|w| (d.last_seq, w)))
        .collect();
    let lag = rows
        .iter()
        .map(|(last, w)| last.saturating_sub(w.position))
        .sum();
    let failing_since = rows.iter().filter_map(|(_, w)| w.failing_since).min();
    let newest_error = rows
        .iter()
        .filter(|(_, w)| w.last_error.is_some())
        .max_by_key(|(_, w)| w.last_attempt_at);
    let state = match failing_since {
        None => "active",
        Some(since) if failed_for(since) >= FAILING_AFTER => "failing",
        Some(_) => "retrying",
    };
    let positions: Vec<u64> = status
        .shards
        .iter()
        .map(|d| d.row.as_ref().map_or(0, |w| w.position))
        .collect();
    WebhookResponse {
        name: webhook.name.clone(),
        url: webhook.url.clone(),
        types: webhook
            .types
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect(),
        secret: None,
        status: state.to_owned(),
        created_at: webhook.created_at.to_rfc3339(),
        updated_at: webhook.updated_at.to_rfc3339(),
        lag,
        position: EventCursor::from_positions(positions).encode(),
        last_error: newest_error.and_then(|(_, w)| w.last_error.clone()),
        last_attempt_at: newest_error.and_then(|(_, w)| w.last_attempt_at.map(|t| t.to_rfc3339())),
        next_attempt_at: rows
            .iter()
            .filter_map(|(_, w)| w.next_attempt_at)
            .min()
            .map(|t| t.to_rfc3339()),
        dropped: rows.iter().map(|(_, w)| w.dropped).sum(),
        shards: status
            .shards
            .iter()
            .filter_map(|d| {
                d.row.as_ref().map(|w| WebhookShardResponse {
                    shard: d.shard,
                    position: w.position,
                    last_seq: d.last_seq,
                    attempts: w.attempts,
                    last_error: w.last_error.clone(),
                    next_attempt_at: w.next_attempt_at.map(|t| t.to_rfc3339()),
                    failing_since: w.failing_since.map(|t| t.to_rfc3339()),
                })
            })
            .collect(),
    }
}

fn failed_for(since: Timestamp) -> Duration {
    let micros = Timestamp::now().micros().saturating_sub(since.micros());
    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}
