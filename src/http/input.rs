//! Everything that checks a request before it becomes a command: body size, JSON shape, identifiers,
//! amounts, the Idempotency-Key header and the request fingerprint. A request refused here reaches no
//! state machine and stores nothing.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::domain::{Currency, Fingerprint, Money, ids};
use crate::engine::Consistency;

mod strict_json;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Idempotency keys are 1–255 printable ASCII characters.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The path parameters of a route, decoded as `T`. Every route takes its parameters through this one
/// extractor, never `axum::extract::Path` itself, whose rejections (a segment that is not UTF-8 once
/// percent-decoded, or does not parse as `T`, such as `-1` for a node id) are plain text: here they are
/// 400 `invalid_request` in the error shape (see `ApiError`'s `From<PathRejection>`).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct PathParams<T>(pub T);

/// How fresh the reads of a request must be: `?consistency=linearizable` (the default) or `local`,
/// checked for every request by the `read_consistency` middleware, which hands it over here.
pub struct ReadConsistency(pub Consistency);

impl<S: Send + Sync> FromRequestParts<S> for ReadConsistency {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<ReadConsistency, ApiError> {
        let consistency = parts.extensions.get::<Consistency>().copied();
        Ok(ReadConsistency(
            consistency.unwrap_or(Consistency::Linearizable),
        ))
    }
}

/// The raw body of a request, at most `MAX_BODY_BYTES`.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Body, ApiError> {
        read_body(request).await
    }
}

/// When a request's body must have arrived whole, set for each request as its head is read
/// (`--body-read-timeout` later). A body that trickles in longer is refused with 408.
#[derive(Clone, Copy, Debug)]
pub struct BodyDeadline {
    pub at: tokio::time::Instant,
    pub timeout: Duration,
}

impl BodyDeadline {
    pub fn starting_now(timeout: Duration) -> BodyDeadline {
        BodyDeadline {
            at: tokio::time::Instant::now() + timeout,
            timeout,
        }
    }
}

/// The deadline used when no middleware set one (requests built in tests).
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a body of at most `limit` bytes before the request's [`BodyDeadline`].
pub async fn read_limited(request: Request, limit: usize) -> Result<Bytes, ApiError> {
    let deadline = request
        .extensions()
        .get::<BodyDeadline>()
        .copied()
        .unwrap_or_else(|| BodyDeadline::starting_now(DEFAULT_BODY_READ_TIMEOUT));
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let read = axum::body::to_bytes(request.into_body(), limit);
    match tokio::time::timeout_at(deadline.at, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::payload_too_large(limit)),
        Err(_) => Err(ApiError::request_timeout(deadline.timeout)),
    }
}

async fn read_body(request: Request) -> Result<Body, ApiError> {
    Ok(Body(read_limited(request, MAX_BODY_BYTES).await?))
}

/// A POST as idempotency sees it: its path, its headers (the `Idempotency-Key`) and its body.
pub struct Post {
    path: String,
    headers: HeaderMap,
    pub body: Body,
}

impl<S: Send + Sync> FromRequest<S> for Post {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Post, ApiError> {
        Post::read(request).await
    }
}

impl Post {
    /// Reads the request's body (bounded in size and time).
    pub async fn read(request: Request) -> Result<Post, ApiError> {
        let path = request.uri().path().to_owned();
        let headers = request.headers().clone();
        Ok(Post {
            path,
            headers,
            body: read_body(request).await?,
        })
    }

    /// The `Idempotency-Key` header, required on every POST.
    pub fn idempotency_key(&self) -> Result<String, ApiError> {
        idempotency_key(&self.headers)
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        self.body.json()
    }

    /// The request's fingerprint: method, path and canonical body.
    pub fn fingerprint(&self) -> Fingerprint {
        self.body.fingerprint("POST", &self.path)
    }
}

impl Body {
    /// Parses the body, which must be a JSON object without repeated keys, as `T` (which rejects unknown
    /// fields). An empty body reads as `{}`. (serde's derive would also take a struct written as a JSON
    /// array.)
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let bytes: &[u8] = if self.is_blank() { b"{}" } else { &self.0 };
        let invalid =
            |e: serde_json::Error| ApiError::invalid_request(format!("invalid JSON body: {e}"));
        let value = strict_json::parse(bytes).map_err(invalid)?;
        if !value.is_object() {
            return Err(ApiError::invalid_request("the body must be a JSON object"));
        }
        serde_json::from_value(value).map_err(invalid)
    }

    fn is_blank(&self) -> bool {
        self.0.iter().all(u8::is_ascii_whitespace)
    }

    /// SHA-256 of method, path and the body in canonical form (keys sorted, no insignificant whitespace),
    /// so that a retry that re-encodes the same JSON has the same fingerprint.
    pub fn fingerprint(&self, method: &str, path: &str) -> Fingerprint {
        let canonical = if self.is_blank() {
            b"{}".to_vec()
        } else {
            match serde_json::from_slice::<Value>(&self.0) {
                Ok(value) => canonical_json(&value),
                Err(_) => self.0.to_vec(),
            }
        };
        let mut hasher = Sha256::new();
        hasher.update(method.as_bytes());
        hasher.update(b"\n");
        hasher.update(path.as_bytes());
        hasher.update(b"\n");
        hasher.update(&canonical);
        hasher.finalize().into()
    }
}

/// JSON with object keys sorted at every level.
fn canonical_json(value: &Value) -> Vec<u8> {
    fn write(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push(b'{');
                for (i, (key, value)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(serde_json::to_vec(key).unwrap_or_default());
                    out.push(b':');
                    write(value, out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out);
                }
                out.push(b']');
            }
            scalar => out.extend(serde_json::to_vec(scalar).unwrap_or_default()),
        }
    }
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

/// The `Idempotency-Key` header, required on every POST.
pub fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers
        .get("idempotency-key")
        .ok_or_else(ApiError::idempotency_key_required)?;
    idempotency_key_text(value.to_str().unwrap_or_default())
}

/// An idempotency key (from the header, or a path): 1–255 printable ASCII characters.
pub fn idempotency_key_text(key: &str) -> Result<String, ApiError> {
    let valid = (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&key.len())
        && key.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if valid {
        Ok(key.to_owned())
    } else {
        Err(ApiError::invalid_request(format!(
            "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
        )))
    }
}

/// A client-chosen identifier (`user_id`, `item_id`): 1–64 chars of `[A-Za-z0-9_.-]`.
pub fn client_id(field: &str, value: &str) -> Result<String, ApiError> {
    if ids::is_valid_id(value) {
        Ok(value.to_owned())
    } else {
        Err(ApiError::invalid_request(format!(
            "{field} must be 1-64 characters of A-Z a-z 0-9 _ . -"
        )))
    }
}

/// Optional free text of at most `max_chars` characters.
pub fn bounded_text(
    field: &str,
    value: Option<String>,
    max_chars: usize,
) -> Result<Option<String>, ApiError> {
    match value {
        Some(text) if text.chars().count() > max_chars => Err(ApiError::invalid_request(format!(
            "{field} must be at most {max_chars} characters"
        ))),
        Some(text) if text.chars().any(char::is_control) => Err(ApiError::invalid_request(
            format!("{field} must not contain control characters"),
        )),
        other => Ok(other),
    }
}

/// How an amount field must be shaped.
#[derive(Clone, Copy)]
pub enum AmountRule {
    Positive,
    NonNegative,
}

/// A money field: a JSON string holding a decimal in the deployment's currency.
pub fn amount(
    currency: &Currency,
    field: &str,
    value: &Value,
    rule: AmountRule,
) -> Result<Money, ApiError> {
    let Value::String(text) = value else {
        return Err(ApiError::invalid_amount(
            field,
            &crate::domain::AmountError::NotAString,
        ));
    };
    let parsed = match rule {
        AmountRule::Positive => currency.parse_positive(text),
        AmountRule::NonNegative => currency.parse_non_negative(text),
    };
    parsed.map_err(|e| ApiError::invalid_amount(field, &e))
}

/// Query parameters as (name, value) pairs. Unknown names are ignored; a malformed query is refused.
pub fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::invalid_request(format!("invalid query: {e}")))
}

/// Event type names (the feed's `types`, a webhook's `types`): each known, each kept once, in order.
pub fn event_types<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<crate::domain::EventType>, ApiError> {
    let mut types = Vec::new();
    for name in names {
        let event_type = crate::domain::EventType::parse(name)
            .ok_or_else(|| ApiError::invalid_request(format!("unknown event type {name:?}")))?;
        if !types.contains(&event_type) {
            types.push(event_type);
        }
    }
    Ok(types)
}

/// The `limit` query parameter: `default` when absent, else 1..=`max`.
pub fn limit(pairs: &[(String, String)], default: usize, max: usize) -> Result<usize, ApiError> {
    match pairs.iter().find(|(k, _)| k == "limit") {
        None => Ok(default),
        Some((_, v)) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_request(format!("limit must be an integer from 1 to {max}"))
            }),
    }
}

/// The value of query parameter `name`, if given. An empty value (`?status=`) is a value, and the
/// parameter's own check refuses it: treating it as absent would answer something the client did not
/// ask for.
pub fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace_but_not_values() {
        let a = Body(Bytes::from_static(
            br#"{"a": 1, "b": {"y": 2, "x": [1, 2]}}"#,
        ));
        let b = Body(Bytes::from_static(br#"{"b":{"x":[1,2],"y":2},"a":1}"#));
        let c = Body(Bytes::from_static(br#"{"b":{"x":[2,1],"y":2},"a":1}"#));
        assert_eq!(a.fingerprint("POST", "/p"), b.fingerprint("POST", "/p"));
        assert_ne!(a.fingerprint("POST", "/p"), c.fingerprint("POST", "/p"));
        assert_ne!(a.fingerprint("POST", "/p"), a.fingerprint("POST", "/q"));
        assert_eq!(
            Body(Bytes::new()).fingerprint("POST", "/p"),
            Body(Bytes::from_static(b"{}")).fingerprint("POST", "/p")
        );
    }
}
