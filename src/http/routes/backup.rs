//! Online backups (admin): what a backup of this node holds, and each shard's export as a stream.
//!
//! `shopkeep backup` (the operator CLI) reads the plan, then every shard's export into a directory with
//! a manifest; `shopkeep restore` turns that directory into a data directory. Each export is taken
//! after a read barrier, at one committed index, while the shop keeps serving.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use tokio::sync::Semaphore;

use crate::datadir::FixedSettings;
use crate::http::auth::Caller;
use crate::http::dto::BackupPlan;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::PathParams;
use crate::http::{AppState, render};

/// Exports streaming at once from this node: each holds a redb read snapshot and a blocking thread.
static EXPORTS: Semaphore = Semaphore::const_new(2);

/// The header naming the last command the export holds (the shard's Raft log index).
pub const LAST_APPLIED: &str = "shopkeep-last-applied";
/// The header carrying the export's `state_hash` (as `GET /v1/admin/audit` reports it).
pub const STATE_HASH: &str = "shopkeep-state-hash";
/// The header carrying the replication marker stored with the state (hex), needed to restore it.
pub const MARKER: &str = "shopkeep-marker";

/// What a backup of this node holds (admin).
#[utoipa::path(get, path = "/v1/admin/backup", tag = "operations",
    responses(
        (status = 200, description = "The shards to export and the settings of a restored data directory", body = BackupPlan),
        (status = 403, description = "`forbidden`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn plan(State(app): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let settings = FixedSettings::new(app.node.shard_count(), &app.config.currency);
    Ok(render::ok(&BackupPlan {
        node_id: app.config.node_id,
        shards: settings.shards,
        currency: settings.currency,
        currency_decimals: settings.currency_decimals,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }))
}

/// One shard's state, exported at one committed index after a read barrier (every write acknowledged
/// before the request is in it), streamed (admin). The headers give the index, the `state_hash` of
/// the exported state and its replication marker; a body cut short lacks the export's end marker.
#[utoipa::path(get, path = "/v1/admin/backup/shards/{shard}", tag = "operations",
    params(("shard" = u32, Path, minimum = 0, maximum = 255)),
    responses(
        (status = 200, description = "The shard's rows as a stream (the body of a Raft snapshot)", content_type = "application/octet-stream", body = Vec<u8>,
            headers(
                ("shopkeep-last-applied" = u64, description = "The last command the export holds"),
                ("shopkeep-state-hash" = String, description = "The exported state's `state_hash`"),
                ("shopkeep-marker" = String, description = "The replication marker stored with the state, hex"),
            )),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such shard", body = ErrorBody),
        (status = 429, description = "`rate_limited`: two exports are already streaming from this node", body = ErrorBody),
        (status = 503, description = "`unavailable`: the shard has no leader now", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn shard(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(shard): PathParams<u32>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let shards = app.node.shard_count();
    if shard >= shards {
        return Err(ApiError::shard_not_found(shard, shards));
    }
    let permit = EXPORTS.try_acquire().map_err(|_| {
        ApiError::rate_limited(
            "two exports are already streaming from this node; retry when one ends",
        )
    })?;
    let export = app.node.export_shard(shard).await?;
    tracing::info!(
        shard,
        last_applied = export.head.last_applied,
        "backup export started"
    );
    let body =
        futures_util::stream::unfold((export.body, permit), |(mut chunks, permit)| async move {
            let chunk = chunks.recv().await?;
            Some((
                chunk.map(Bytes::from).map_err(std::io::Error::other),
                (chunks, permit),
            ))
        });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    for (name, value) in [
        (LAST_APPLIED, export.head.last_applied.to_string()),
        (STATE_HASH, export.head.state_hash),
        (MARKER, hex::encode(&export.head.marker)),
    ] {
        let value = HeaderValue::from_str(&value).map_err(|e| ApiError::internal(e.to_string()))?;
        headers.insert(name, value);
    }
    Ok(response)
}
