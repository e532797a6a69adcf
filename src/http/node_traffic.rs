//! Node-to-node traffic (`/_node/v1/call`, and the upgrade to a stream, `node_stream`), on the client
//! listener or on its own (`--node-listen`).
//!
//! A call is authenticated from its headers alone (`shopkeep_raft::auth`: a per-request MAC with a
//! timestamp and a nonce) before a byte of its body is read, so a stranger costs one small HMAC and no
//! memory. Authenticated calls then share a small concurrency limit of their own, and their bodies are
//! read up to `MAX_MESSAGE_BYTES` before the body deadline, checked against the signed digest, decoded
//! and handed to the replication layer. Test builds (feature `failpoints`) also arm crash points here
//! (`/_node/v1/failpoints/{name}`). Every error has the API's JSON shape. None of it is part of the
//! public API or its OpenAPI document.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use shopkeep_raft::auth::{AUTH_HEADER, NodeAuth, NodeAuthError, Verified};
use shopkeep_raft::clock::{TIME_HEADER, unix_micros};
use shopkeep_raft::rpc::{self, CALL_PATH, MAX_MESSAGE_BYTES};
use shopkeep_raft::stream::STREAM_PATH;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::input;
use crate::engine::Node;

/// Most node calls handled at once on this node. Replication sends one append per peer and shard at a
/// time, forwarding at most two batches per shard: this leaves room for 5 nodes × 32 shards.
pub const MAX_NODE_CALLS_INFLIGHT: usize = 512;
/// The largest body of a crash-point request (test builds).
const MAX_CRASH_POINT_BODY_BYTES: usize = 1024;
/// The path prefix of crash points (test builds).
const CRASH_POINT_PATH: &str = "/_node/v1/failpoints/{name}";

pub(super) struct NodeTraffic {
    pub(super) node: Arc<Node>,
    pub(super) auth: Arc<NodeAuth>,
    /// Node calls being answered, over HTTP and streams alike.
    pub(super) inflight: Arc<Semaphore>,
    /// Streams accepted and open (`node_stream::MAX_NODE_STREAMS`).
    pub(super) streams: Arc<Semaphore>,
    stale_log: RateLimitedLog,
}

/// A warning at most once a minute.
#[derive(Default)]
struct RateLimitedLog {
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl RateLimitedLog {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    pub(super) fn warn(&self, sender: u64, error: &NodeAuthError) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= Self::EVERY) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(peer = sender, %error, "node call refused: clocks disagree");
        }
    }
}

pub fn router(node: Arc<Node>, auth: Arc<NodeAuth>) -> Router {
    let state = Arc::new(NodeTraffic {
        node,
        auth,
        inflight: Arc::new(Semaphore::new(MAX_NODE_CALLS_INFLIGHT)),
        streams: Arc::new(Semaphore::new(super::node_stream::MAX_NODE_STREAMS)),
        stale_log: RateLimitedLog::default(),
    });
    let router = Router::new()
        .route(CALL_PATH, post(call))
        .route(STREAM_PATH, post(super::node_stream::open));
    // Crash points exist only in test builds; elsewhere the path is not routed at all (404).
    let router = if shopkeep_faults::failpoints::ENABLED {
        router.route(
            CRASH_POINT_PATH,
            put(arm_crash_point).delete(disarm_crash_point),
        )
    } else {
        router
    };
    router
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
        // Every answer carries this node's time: the caller samples its clock against ours.
        .layer(axum::middleware::map_response(stamp_time))
}

async fn stamp_time(mut response: Response) -> Response {
    if let Ok(value) = HeaderValue::from_str(&unix_micros().to_string()) {
        response.headers_mut().insert(TIME_HEADER, value);
    }
    response
}

impl NodeTraffic {
    /// Counts and (for a member's clock too far off, at most once a minute) logs a refused call.
    pub(super) fn refused(&self, error: &NodeAuthError) -> ApiError {
        metrics::counter!(crate::metrics::NODE_TRAFFIC_REFUSED).increment(1);
        if let NodeAuthError::Stale { sender, .. } = error {
            self.stale_log.warn(*sender, error);
        } else {
            tracing::debug!(%error, "node call refused");
        }
        ApiError::unauthenticated_because(error.to_string())
    }

    /// Authenticates a call (or a stream's upgrade) from its headers, and samples the caller's clock.
    pub(super) fn authenticate(&self, request: &Request) -> Result<Verified, ApiError> {
        let verified = self
            .auth
            .verify(
                request.method().as_str(),
                request.uri().path(),
                request
                    .headers()
                    .get(AUTH_HEADER)
                    .map(HeaderValue::as_bytes),
            )
            .map_err(|error| self.refused(&error))?;
        self.node
            .cluster()
            .clock()
            .observe(verified.sender, verified.offset_micros, verified.at);
        Ok(verified)
    }

    /// Authenticates a call from its headers, takes a place among the calls in flight, then reads and
    /// checks its body.
    async fn admit(
        &self,
        request: Request,
        limit: usize,
    ) -> Result<(OwnedSemaphorePermit, Bytes), ApiError> {
        let signed = self.authenticate(&request)?.body;
        let permit =
            self.inflight.clone().try_acquire_owned().map_err(|_| {
                ApiError::rate_limited("too many node calls in flight; retry shortly")
            })?;
        let body = input::read_limited(request, limit).await?;
        signed.check(&body).map_err(|error| self.refused(&error))?;
        Ok((permit, body))
    }
}

/// `PUT /_node/v1/failpoints/{name}` (test builds only): arms a crash point with the action string in
/// the body (see `shopkeep_faults::failpoints`).
async fn arm_crash_point(
    State(traffic): State<Arc<NodeTraffic>>,
    request: Request,
) -> Result<Response, ApiError> {
    let name = crash_point_name(&request)?;
    let (_permit, body) = traffic.admit(request, MAX_CRASH_POINT_BODY_BYTES).await?;
    if !shopkeep_faults::failpoints::is_known(&name) {
        return Err(ApiError::crash_point_not_found(format!(
            "no crash point {name:?}"
        )));
    }
    let actions = String::from_utf8_lossy(&body);
    shopkeep_faults::failpoints::arm(&name, actions.trim()).map_err(ApiError::invalid_request)?;
    tracing::warn!(crash_point = %name, actions = %actions.trim(), "crash point armed");
    Ok(StatusCode::OK.into_response())
}

/// `DELETE /_node/v1/failpoints/{name}` (test builds only): disarms a crash point.
async fn disarm_crash_point(
    State(traffic): State<Arc<NodeTraffic>>,
    request: Request,
) -> Result<Response, ApiError> {
    let name = crash_point_name(&request)?;
    let _admitted = traffic.admit(request, MAX_CRASH_POINT_BODY_BYTES).await?;
    shopkeep_faults::failpoints::disarm(&name).map_err(ApiError::crash_point_not_found)?;
    Ok(StatusCode::OK.into_response())
}

/// The `{name}` of a crash-point path.
fn crash_point_name(request: &Request) -> Result<String, ApiError> {
    request
        .uri()
        .path()
        .rsplit_once('/')
        .map(|(_, name)| name.to_owned())
        .filter(|name| !name.is_empty())
        .ok_or_else(|| ApiError::invalid_request("no crash point named"))
}

async fn call(
    State(traffic): State<Arc<NodeTraffic>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (_permit, body) = traffic.admit(request, MAX_MESSAGE_BYTES).await?;
    let request = rpc::decode_request(&body)
        .map_err(|error| ApiError::invalid_request(format!("undecodable node message: {error}")))?;
    let response = traffic.node.cluster().serve_call(request).await;
    let bytes = rpc::encode_response(&response)
        .map_err(|error| ApiError::internal(format!("cannot encode a node message: {error}")))?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        bytes,
    )
        .into_response())
}
