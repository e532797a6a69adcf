//! Node-to-node traffic on the client listener, under its own prefix (`/_node/v1/call`): authenticated
//! by the cluster secret (compared in constant time) before the body is even decoded, bounded in size,
//! and handed to the replication layer. It is not part of the public API or its OpenAPI document.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
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
    Router::new()
        .route(CALL_PATH, post(call))
        .layer(DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
        .with_state(state)
}

async fn call(
    State(traffic): State<Arc<NodeTraffic>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let offered = headers
        .get(SECRET_HEADER)
        .map(|value| Sha256::digest(value.as_bytes()));
    let authenticated =
        offered.is_some_and(|digest| bool::from(digest.as_slice().ct_eq(&traffic.secret_digest)));
    if !authenticated {
        metrics::counter!("shopkeep_node_traffic_refused_total").increment(1);
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
