//! The HTTP API: the router, shared request plumbing, and the server's life cycle.
//!
//! Requests are checked (`input`, `auth`), turned into commands, proposed to the user's shard through the
//! engine, and answered by rendering the outcome (`render`). Errors have one shape (`error`). The OpenAPI
//! document is generated from the same handler annotations that register the routes, so it cannot
//! describe a route the server does not have.

pub mod auth;
pub mod dto;
pub mod error;
pub mod input;
mod node_traffic;
pub mod render;
mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::config::Config;
use crate::domain::{Command, Envelope, Fingerprint, IdempotencyTag, Timestamp};
use crate::engine::coordinator::new_seed;
use crate::engine::{Consistency, Node};
use crate::state::Applied;
use auth::Authenticator;
use error::ApiError;

/// Everything a request handler may use.
pub struct App {
    pub node: Arc<Node>,
    pub config: Config,
    pub auth: Authenticator,
    pub psp_secret: Option<Vec<u8>>,
    pub metrics: PrometheusHandle,
    /// The served OpenAPI document, rendered once.
    pub openapi: Vec<u8>,
}

pub type AppState = Arc<App>;

impl App {
    /// The idempotency tag of a request scoped to `scope` (a user id, or a system scope).
    pub fn tag(
        &self,
        scope: &str,
        key: String,
        fingerprint: Fingerprint,
        now: Timestamp,
    ) -> IdempotencyTag {
        IdempotencyTag {
            scope: scope.to_owned(),
            key,
            fingerprint,
            expires_at: now.plus(self.config.idempotency_ttl),
        }
    }

    /// Proposes a command for `user_id`'s shard and waits (bounded) for its outcome.
    pub async fn submit_for_user(
        &self,
        user_id: &str,
        now: Timestamp,
        tag: Option<IdempotencyTag>,
        command: Command,
    ) -> Result<Applied, ApiError> {
        let envelope = Envelope {
            now,
            seed: new_seed(now),
            idempotency: tag,
            command,
        };
        let shard = self.node.shard_of_user(user_id);
        self.bounded(self.node.propose(shard, envelope)).await
    }

    /// Waits for an engine operation at most `request_timeout`. A timed-out command may still be applied;
    /// the client learns its outcome by retrying with the same Idempotency-Key.
    pub async fn bounded<T>(
        &self,
        operation: impl Future<Output = Result<T, crate::engine::EngineError>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.config.request_timeout, operation).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ApiError::unavailable(
                "timed out waiting for the command to apply; retry with the same Idempotency-Key",
            )),
        }
    }
}

/// The OpenAPI document of the API for a deployment in `currency` (also served at `/v1/openapi.json`).
pub fn openapi_document(currency: &crate::domain::Currency) -> serde_json::Value {
    routes::finish_document(routes::api().into_openapi(), currency)
}

/// Builds the complete router (routes, OpenAPI, middleware) around the node.
pub fn router(
    node: Arc<Node>,
    config: Config,
    auth: Authenticator,
    cluster_secret: String,
    psp_secret: Option<Vec<u8>>,
    metrics: PrometheusHandle,
) -> Router {
    let (router, document) = routes::api().split_for_parts();
    let openapi = serde_json::to_vec(&routes::finish_document(document, &config.currency))
        .unwrap_or_default();
    let inflight = Arc::new(tokio::sync::Semaphore::new(config.max_inflight));
    let node_traffic = node_traffic::router(node.clone(), cluster_secret);
    let app = Arc::new(App {
        node,
        config,
        auth,
        psp_secret,
        metrics,
        openapi,
    });
    router
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method",
            )
        })
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(
            inflight,
            limit_inflight,
        ))
        .layer(axum::middleware::from_fn(read_consistency))
        .layer(axum::middleware::from_fn(record_metrics))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Node traffic has its own authentication and limits, and is never refused for client load.
        .merge(node_traffic)
}

tokio::task_local! {
    /// The read consistency the current request asked for (`?consistency=`).
    static READ_CONSISTENCY: Consistency;
}

/// The consistency reads of the current request use: linearizable unless it said `?consistency=local`.
pub fn current_consistency() -> Consistency {
    READ_CONSISTENCY
        .try_with(|c| *c)
        .unwrap_or(Consistency::Linearizable)
}

/// Reads `?consistency=linearizable|local` once for the whole request (400 for anything else).
async fn read_consistency(request: Request, next: Next) -> Response {
    let pairs = match input::query_pairs(request.uri().query()) {
        Ok(pairs) => pairs,
        Err(error) => return error.into_response(),
    };
    let consistency = match input::param(&pairs, "consistency") {
        None | Some("linearizable") => Consistency::Linearizable,
        Some("local") => Consistency::Local,
        Some(_) => {
            return ApiError::invalid_request("consistency must be `linearizable` or `local`")
                .into_response();
        }
    };
    READ_CONSISTENCY.scope(consistency, next.run(request)).await
}

/// Refuses requests beyond `--max-inflight` at once with 429, so a flood cannot grow memory or threads
/// without bound. Health and metrics endpoints are always answered.
async fn limit_inflight(
    axum::extract::State(limit): axum::extract::State<Arc<tokio::sync::Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(request).await;
    }
    match limit.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            ApiError::rate_limited("too many requests in flight; retry shortly").into_response()
        }
    }
}

/// Counts requests and their latency by route and status.
async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("shopkeep_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("shopkeep_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains in-flight requests for at most
/// `drain`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        result = &mut server => result,
        _ = async { let _ = stopping_rx.await; tokio::time::sleep(drain).await } => {
            tracing::warn!("in-flight requests did not finish within {drain:?}; stopping anyway");
            Ok(())
        }
    }
}

/// A 200 `{"status": "..."}`.
fn status(text: &str) -> Response {
    render::ok(&dto::StatusResponse {
        status: text.to_owned(),
    })
    .into_response()
}
