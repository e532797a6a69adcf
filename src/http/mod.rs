//! The HTTP API: the router, shared request plumbing, and the server's life cycle.
//!
//! Requests are checked (`input`, `auth`), handed to the engine (one engine method per request: a command
//! for the user's shard, a cross-shard sequence, or a read at the consistency the request asked for), and
//! answered by rendering the outcome (`render`). The engine is the only way to the shop: nothing here
//! touches `state` or its files. Errors have one shape and get their status in one place (`error`).
//! The OpenAPI document is generated from the same handler annotations that register the routes, so it
//! cannot describe a route the server does not have.

mod access_log;
pub mod auth;
pub mod dto;
pub mod error;
pub mod input;
pub mod listener;
mod node_stream;
mod node_traffic;
pub mod render;
mod request_id;
mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::config::Config;
use crate::domain::{Command, Fingerprint, IdempotencyTag, Timestamp};
use crate::engine::webhooks::worker::{DeliveryConfig, RenderEvent};
use crate::engine::{Applied, Consistency, Node};
use crate::metrics::Metrics;
use auth::Authenticator;
use error::ApiError;
use shopkeep_raft::auth::NodeAuth;

/// Everything a request handler may use.
pub struct App {
    pub node: Arc<Node>,
    pub config: Config,
    pub auth: Authenticator,
    pub psp_secret: Option<Vec<u8>>,
    pub metrics: Arc<Metrics>,
    /// Where webhooks may point, and their secrets.
    pub webhooks: Arc<DeliveryConfig>,
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
        self.bounded_write(self.node.propose_for_user(user_id, now, tag, command))
            .await
    }

    /// Waits for a read at most `--request-timeout`.
    pub async fn bounded<T>(
        &self,
        operation: impl Future<Output = Result<T, crate::engine::EngineError>>,
    ) -> Result<T, ApiError> {
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, operation).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ApiError::unavailable(format!(
                "no answer within {} (--request-timeout); retry shortly",
                humantime::format_duration(timeout)
            ))),
        }
    }

    /// Waits for a write at most `--request-timeout`. One not known to be committed by then (timed out
    /// here, or in the replication layer) may still be applied: the answer says its outcome is unknown,
    /// and a retry with the same Idempotency-Key learns it.
    pub async fn bounded_write<T>(
        &self,
        operation: impl Future<Output = Result<T, crate::engine::EngineError>>,
    ) -> Result<T, ApiError> {
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(crate::engine::EngineError::OutcomeUnknown { .. })) | Err(_) => {
                Err(ApiError::outcome_unknown(timeout))
            }
            Ok(Err(error)) => Err(error.into()),
        }
    }
}

/// How webhooks render an event: as the feed shows it (`GET /v1/events`).
pub fn event_renderer(currency: crate::domain::Currency) -> RenderEvent {
    Arc::new(move |shard, seq, event| {
        serde_json::to_vec(&dto::event(&currency, shard, seq, event)).unwrap_or_default()
    })
}

/// Builds the client-facing router (routes, OpenAPI, middleware) around the node; it also serves node
/// traffic unless that has a listener of its own (`--node-listen`).
pub fn router(
    node: Arc<Node>,
    config: Config,
    auth: Authenticator,
    node_auth: Arc<NodeAuth>,
    psp_secret: Option<Vec<u8>>,
    metrics: Arc<Metrics>,
    webhooks: Arc<DeliveryConfig>,
) -> Router {
    let (router, document) = routes::api().split_for_parts();
    let document = routes::finish_document(document, &config.currency);
    register_documented_requests(&document);
    let openapi = serde_json::to_vec(&document).unwrap_or_default();
    let limits = Arc::new(RequestLimits {
        general: tokio::sync::Semaphore::new(config.max_inflight),
        webhook: tokio::sync::Semaphore::new(config.max_webhook_inflight),
    });
    let body_read_timeout = config.body_read_timeout;
    let clock_node = node.clone();
    let node_traffic = config
        .node_listen
        .is_none()
        .then(|| node_routes(node.clone(), node_auth, body_read_timeout));
    let app = Arc::new(App {
        node,
        config,
        auth,
        psp_secret,
        metrics,
        webhooks,
        openapi,
    });
    let router = router
        .fallback(|| async { ApiError::no_such_endpoint() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(limits, limit_inflight))
        .layer(axum::middleware::from_fn_with_state(
            clock_node,
            refuse_timed_requests_while_the_clock_disagrees,
        ))
        .layer(axum::middleware::from_fn(read_consistency))
        .layer(axum::middleware::from_fn(record_metrics))
        .layer(axum::middleware::from_fn_with_state(
            body_read_timeout,
            set_body_deadline,
        ))
        .layer(axum::middleware::from_fn(access_log::log_access))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(request_id::RandomRequestId));
    match node_traffic {
        // Node traffic has its own authentication and limits, and is never refused for client load.
        Some(node_traffic) => router.merge(node_traffic),
        None => router,
    }
}

/// The router of `--metrics-listen`: `GET /metrics` and `GET /healthz` alone; anything else is a JSON
/// 404 (or 405).
pub fn metrics_router(node: Arc<Node>, metrics: Arc<Metrics>) -> Router {
    let scrape = move || async move { routes::metrics_text(&metrics, &node) };
    Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .route("/healthz", axum::routing::get(|| async { status("ok") }))
        .fallback(|| async { ApiError::no_such_endpoint() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(request_id::RandomRequestId))
}

/// Registers the request counter (at 0) for every status the document says each operation may answer,
/// and each operation's latency histogram, so both exist from the start.
fn register_documented_requests(document: &serde_json::Value) {
    let Some(paths) = document.get("paths").and_then(serde_json::Value::as_object) else {
        return;
    };
    for (route, item) in paths {
        for (method, operation) in item.as_object().into_iter().flatten() {
            let responses = operation
                .get("responses")
                .and_then(serde_json::Value::as_object);
            let (Some(responses), Ok(method)) = (
                responses,
                axum::http::Method::from_bytes(method.to_uppercase().as_bytes()),
            ) else {
                continue;
            };
            crate::metrics::register_requests(method_label(&method), route, responses.keys());
        }
    }
}

/// The router of `--node-listen`: node-to-node traffic alone; any other path is a JSON 404.
pub fn node_router(node: Arc<Node>, auth: Arc<NodeAuth>, body_read_timeout: Duration) -> Router {
    node_routes(node, auth, body_read_timeout).fallback(|| async { ApiError::no_such_endpoint() })
}

/// The node-to-node routes (`/_node/…`) with their body deadline, without a fallback (so they can be
/// merged into the client-facing router).
fn node_routes(node: Arc<Node>, auth: Arc<NodeAuth>, body_read_timeout: Duration) -> Router {
    node_traffic::router(node, auth).layer(axum::middleware::from_fn_with_state(
        body_read_timeout,
        set_body_deadline,
    ))
}

/// Starts each request's body-read clock as its head arrives.
async fn set_body_deadline(
    axum::extract::State(timeout): axum::extract::State<Duration>,
    mut request: Request,
    next: Next,
) -> Response {
    request
        .extensions_mut()
        .insert(input::BodyDeadline::starting_now(timeout));
    next.run(request).await
}

/// Reads `?consistency=linearizable|local` once for every request (400 for anything else) and hands it
/// to the handlers that read (`input::ReadConsistency`).
async fn read_consistency(mut request: Request, next: Next) -> Response {
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
    request.extensions_mut().insert(consistency);
    next.run(request).await
}

/// How many requests may be handled at once: the API's, and the PSP webhook's apart (it is answered
/// before any authentication, so strangers must not be able to use up the API's share).
struct RequestLimits {
    general: tokio::sync::Semaphore,
    webhook: tokio::sync::Semaphore,
}

/// The path of the PSP webhook, the one API route without a bearer token.
const WEBHOOK_PATH: &str = "/v1/psp/webhook";

/// Refuses requests beyond `--max-inflight` (the webhook: `--max-webhook-inflight`) at once with 429, so
/// a flood cannot grow memory or threads without bound. Health and metrics endpoints are always answered.
async fn limit_inflight(
    axum::extract::State(limits): axum::extract::State<Arc<RequestLimits>>,
    request: Request,
    next: Next,
) -> Response {
    let semaphore = match request.uri().path() {
        "/healthz" | "/readyz" | "/metrics" => return next.run(request).await,
        WEBHOOK_PATH => &limits.webhook,
        _ => &limits.general,
    };
    match semaphore.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            ApiError::rate_limited("too many requests in flight; retry shortly").into_response()
        }
    }
}

/// A node whose clock disagrees with the cluster's (`shopkeep_raft::clock`) neither stamps time nor reads
/// by it: it refuses every write (each is a command stamped with this node's time) and every read of a
/// user's data (a wallet is read as of now: which holds have expired) with 503 and the reason, until it
/// agrees again. The catalog, health, metrics and the operator's views stay served.
async fn refuse_timed_requests_while_the_clock_disagrees(
    axum::extract::State(node): axum::extract::State<Arc<Node>>,
    request: Request,
    next: Next,
) -> Response {
    let writes = !matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if writes || request.uri().path().starts_with("/v1/users/") {
        let verdict = node.cluster().clock_verdict();
        if !verdict.agrees {
            return ApiError::unavailable(verdict.reason()).into_response();
        }
    }
    next.run(request).await
}

/// The HTTP method as a metric label: one of a fixed few, whatever a client sends.
fn method_label(method: &axum::http::Method) -> &'static str {
    match *method {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// Counts requests and their latency by route and status.
async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(crate::metrics::HTTP_REQUEST_DURATION, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A 200 `{"status": "..."}`.
fn status(text: &str) -> Response {
    render::ok(&dto::StatusResponse {
        status: text.to_owned(),
    })
    .into_response()
}
