//! Node-to-node traffic on the client listener, under its own prefix (`/_node/v1/call`): authenticated
//! by the cluster secret (compared in constant time) before the body is even decoded, bounded in size,
//! and handed to the replication layer. Test builds (feature `failpoints`) also arm crash points here
//! (`/_node/v1/failpoints/{name}`). None of it is part of the public API or its OpenAPI document.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use sha2::{Digest, Sha256};
use shopkeep_raft::rpc::{self, CALL_PATH, MAX_MESSAGE_BYTES, SECRET_HEADER};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::engine::Node;

struct NodeTraffic {
    node: Arc<Node>,
    /// SHA-256 of the cluster secret: compared in constant time whatever the length of the offer.
    secret_digest: [u8; 32],
}

pub fn router(node: Arc<Node>, secret: String) -> Router {
    let state = Arc::new(NodeTraffic {
        node,
        secret_digest: Sha256::digest(secret.as_bytes()).into(),
    });
    let router = Router::new().route(CALL_PATH, post(call));
    // Crash points exist only in test builds; elsewhere the path is not routed at all (404).
    let router = if shopkeep_raft::failpoints::ENABLED {
        router.route(
            "/_node/v1/failpoints/{name}",
            put(arm_crash_point).delete(disarm_crash_point),
        )
    } else {
        router
    };
    router
        .layer(DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
        .with_state(state)
}

impl NodeTraffic {
    /// Whether the request carries the cluster secret (compared in constant time).
    fn authenticated(&self, headers: &HeaderMap) -> bool {
        let offered = headers
            .get(SECRET_HEADER)
            .map(|value| Sha256::digest(value.as_bytes()));
        let authenticated =
            offered.is_some_and(|digest| bool::from(digest.as_slice().ct_eq(&self.secret_digest)));
        if !authenticated {
            metrics::counter!("shopkeep_node_traffic_refused_total").increment(1);
        }
        authenticated
    }
}

/// `PUT /_node/v1/failpoints/{name}` (test builds only): arms a crash point with the action string in
/// the body (see `shopkeep_raft::failpoints`).
async fn arm_crash_point(
    State(traffic): State<Arc<NodeTraffic>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !traffic.authenticated(&headers) {
        return ApiError::unauthenticated().into_response();
    }
    if !shopkeep_raft::failpoints::is_known(&name) {
        return ApiError::not_found("crash_point_not_found", format!("no crash point {name:?}"))
            .into_response();
    }
    let actions = String::from_utf8_lossy(&body);
    match shopkeep_raft::failpoints::arm(&name, actions.trim()) {
        Ok(()) => {
            tracing::warn!(crash_point = %name, actions = %actions.trim(), "crash point armed");
            StatusCode::OK.into_response()
        }
        Err(message) => ApiError::invalid_request(message).into_response(),
    }
}

/// `DELETE /_node/v1/failpoints/{name}` (test builds only): disarms a crash point.
async fn disarm_crash_point(
    State(traffic): State<Arc<NodeTraffic>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !traffic.authenticated(&headers) {
        return ApiError::unauthenticated().into_response();
    }
    match shopkeep_raft::failpoints::disarm(&name) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(message) => ApiError::not_found("crash_point_not_found", message).into_response(),
    }
}

async fn call(
    State(traffic): State<Arc<NodeTraffic>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !traffic.authenticated(&headers) {
        return ApiError::unauthenticated().into_response();
    }
    let request = match rpc::decode_request(&body) {
        Ok(request) => request,
        Err(error) => {
            return ApiError::invalid_request(format!("undecodable node message: {error}"))
                .into_response();
        }
    };
    let response = traffic.node.cluster().serve_call(request).await;
    match rpc::encode_response(&response) {
        Ok(bytes) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )],
            bytes,
        )
            .into_response(),
        Err(error) => {
            ApiError::internal(format!("cannot encode a node message: {error}")).into_response()
        }
    }
}
