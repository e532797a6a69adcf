//! The access log: one line per client request at `info`, target `access`, with the request id, method,
//! route template, status, latency, the caller's role and user (once authenticated) and whether the
//! answer was an idempotent replay. Never a header value but the request id, never a token or a body.
//!
//! Node-to-node traffic (`/_node/v1/…`) is not logged here: it is served outside these layers (many
//! calls a second per peer), and its failures are reported by the replication layer.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

use super::auth::Caller;
use super::method_label;

/// Where the authentication of one request leaves who called, for the access line written after the
/// answer (the handler consumes the request and its extensions).
#[derive(Clone, Default)]
pub struct CallerSlot(Arc<OnceLock<Caller>>);

impl CallerSlot {
    /// Records the authenticated caller (the first one, if a handler authenticates twice).
    pub fn record(&self, caller: &Caller) {
        let _ = self.0.set(caller.clone());
    }

    fn caller(&self) -> Option<&Caller> {
        self.0.get()
    }
}

/// The route of a request that matched none (one label, so the log's values stay bounded).
const UNMATCHED: &str = "unmatched";

/// Writes the access line of every request after it was answered.
pub async fn log_access(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let slot = CallerSlot::default();
    request.extensions_mut().insert(slot.clone());
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
    let path_user = path_user_id(&route, request.uri().path());
    let request_id = header_text(&request, "x-request-id");
    let response = next.run(request).await;
    let caller = slot.caller();
    let line = AccessLine {
        request_id: &request_id,
        method,
        route: &route,
        status: response.status().as_u16(),
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        role: role_of(caller),
        user_id: user_of(caller).or(path_user.as_deref()),
        replayed: response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes() == b"true"),
    };
    line.write();
    response
}

/// The fields of one access line.
struct AccessLine<'a> {
    request_id: &'a str,
    method: &'static str,
    route: &'a str,
    status: u16,
    latency_ms: f64,
    role: &'static str,
    user_id: Option<&'a str>,
    replayed: bool,
}

impl AccessLine<'_> {
    fn write(&self) {
        let latency_ms = (self.latency_ms * 1000.0).round() / 1000.0;
        // An absent `user_id` is left out of the line (tracing records an `Option` only when `Some`).
        tracing::info!(
            target: "access",
            request_id = %self.request_id,
            method = %self.method,
            route = %self.route,
            status = self.status,
            latency_ms,
            role = %self.role,
            user_id = self.user_id,
            replayed = self.replayed,
            "request"
        );
    }
}

/// `admin`, `service`, `user`, or `none` (no valid token, or an endpoint without one).
fn role_of(caller: Option<&Caller>) -> &'static str {
    match caller {
        Some(Caller::Admin) => "admin",
        Some(Caller::Service) => "service",
        Some(Caller::User(_)) => "user",
        None => "none",
    }
}

fn user_of(caller: Option<&Caller>) -> Option<&str> {
    match caller {
        Some(Caller::User(user_id)) => Some(user_id),
        _ => None,
    }
}

/// The `{user_id}` segment of `path` under a route template that has one, if it is a valid user id
/// (anything else is not logged: the log holds no text a client made up beyond an id's bounds).
fn path_user_id(route: &str, path: &str) -> Option<String> {
    let at = route
        .split('/')
        .position(|segment| segment == "{user_id}")?;
    let segment = path.split('/').nth(at)?;
    let valid = (1..=64).contains(&segment.len())
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    valid.then(|| segment.to_owned())
}

/// Longest header value the access line copies (a client chooses its `X-Request-Id`).
const MAX_LOGGED_HEADER: usize = 128;

/// A header's value as text, at most `MAX_LOGGED_HEADER` bytes (empty if absent or not visible ASCII).
fn header_text(request: &Request, name: &str) -> String {
    let text = request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // Visible ASCII only (`to_str`), so any byte is a character boundary.
    text.get(..MAX_LOGGED_HEADER).unwrap_or(text).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_id_comes_from_the_templates_segment_and_only_if_it_is_an_id() {
        let route = "/v1/users/{user_id}/orders";
        assert_eq!(
            path_user_id(route, "/v1/users/player-42/orders").as_deref(),
            Some("player-42")
        );
        assert_eq!(path_user_id(route, "/v1/users/bad%20id/orders"), None);
        assert_eq!(path_user_id("/v1/items/{item_id}", "/v1/items/x"), None);
        assert_eq!(path_user_id(UNMATCHED, "/v1/users/x"), None);
    }

    #[test]
    fn a_clients_request_id_is_logged_up_to_a_bound() {
        let long = "r".repeat(1000);
        let request = Request::builder()
            .header("x-request-id", long.as_str())
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(
            header_text(&request, "x-request-id").len(),
            MAX_LOGGED_HEADER
        );
        assert_eq!(header_text(&request, "absent"), "");
    }
}
