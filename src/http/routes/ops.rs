//! Operations: health, readiness, metrics, the audit and the OpenAPI document.

use std::ops::Range;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::engine::Node;
use crate::http::auth::Caller;
use crate::http::dto::{AuditResponse, ShardAuditResponse, StatusResponse};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::ReadConsistency;
use crate::http::{AppState, input, render, status};
use crate::metrics::Metrics;

/// Recompute every invariant on every shard, or on the one `shard` names (admin).
#[utoipa::path(get, path = "/v1/admin/audit", tag = "operations",
    params(("shard" = Option<u32>, Query, minimum = 0, maximum = 255, description = "audit this shard only (0 to the number of shards - 1); absent: every shard, one after the other")),
    responses((status = 200, description = "One report per shard audited; `ok` when none has a violation", body = AuditResponse),
        (status = 400, description = "`invalid_request`: `shard` is not a number", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such shard", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let shards = audited_shards(raw.as_deref(), app.node.shard_count())?;
    // The audit reads whole shards: no request timeout applies.
    let reports = app.node.audit(consistency, shards).await?;
    let shards: Vec<ShardAuditResponse> = reports
        .into_iter()
        .map(|report| ShardAuditResponse {
            shard: report.shard,
            last_applied: report.last_applied,
            users: report.users,
            orders: report.orders,
            postings: report.postings,
            state_hash: report.state_hash,
            violations: report.violations,
        })
        .collect();
    let ok = shards.iter().all(|s| s.violations.is_empty());
    if !ok {
        tracing::error!("audit found violations");
    }
    Ok(render::ok(&AuditResponse { ok, shards }))
}

/// The shards `?shard=` asks to audit: that one, or all `count` when absent. A number past the shards is
/// 404, as for a shard's backup.
fn audited_shards(raw: Option<&str>, count: u32) -> Result<Range<u32>, ApiError> {
    let pairs = input::query_pairs(raw)?;
    let Some(value) = input::param(&pairs, "shard") else {
        return Ok(0..count);
    };
    match value.parse::<u32>() {
        Ok(shard) if shard < count => Ok(shard..shard + 1),
        Ok(shard) => Err(ApiError::shard_not_found(shard, count)),
        Err(_) => Err(ApiError::invalid_request(
            "shard must be a shard number (an integer from 0)",
        )),
    }
}

/// 200 while the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process is up", body = StatusResponse)))]
pub async fn healthz() -> Response {
    status("ok")
}

/// 200 when every shard has a live leader as far as this node can tell (this node leads it with a quorum
/// acknowledging, or its leader reached this node recently) and its disk takes writes; 503 `unavailable`
/// otherwise (no leader yet, this node is cut off from the others, or its disk is full: the message
/// says `disk full at <path>`).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Every shard has a live leader", body = StatusResponse), (status = 503, description = "`unavailable`", body = ErrorBody)))]
pub async fn readyz(State(app): State<AppState>) -> Response {
    if let Some(trouble) = app.node.cluster().disk_trouble() {
        return ApiError::unavailable(trouble).into_response();
    }
    if !app.node.cluster().is_ready() {
        return ApiError::unavailable("not every shard has a live leader reachable from this node")
            .into_response();
    }
    let verdict = app.node.cluster().clock_verdict();
    if !verdict.agrees {
        return ApiError::unavailable(verdict.reason()).into_response();
    }
    status("ready")
}

/// Prometheus metrics (text format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    metrics_text(&app.metrics, &app.node)
}

/// A scrape: the gauges read from the node now, then every family in the text format.
pub fn metrics_text(metrics: &Metrics, node: &Node) -> Response {
    let text = metrics.render(
        node.cluster(),
        &node.shard_caches(),
        &node.shard_durable_commits(),
    );
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations", responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
pub async fn openapi(State(app): State<AppState>) -> Response {
    render::body(StatusCode::OK, app.openapi.clone())
}
