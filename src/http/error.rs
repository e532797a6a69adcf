//! The one error shape of the API and the one place where every error becomes an HTTP status.
//!
//! `{"error": {"code": "insufficient_funds", "message": "…", "details": {…}}}`. Business rejections from
//! the state machine are rendered here too, so a stored rejection replays byte for byte.

use axum::extract::rejection::PathRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::domain::{AmountError, Currency, Rejection};
use crate::engine::{EngineError, Missing};

// The codes the HTTP layer answers with itself, each written once (the business rejections' are
// `Rejection::code`'s).
const INVALID_REQUEST: &str = "invalid_request";
const IDEMPOTENCY_KEY_REQUIRED: &str = "idempotency_key_required";
const UNAUTHENTICATED: &str = "unauthenticated";
const INVALID_SIGNATURE: &str = "invalid_signature";
const FORBIDDEN: &str = "forbidden";
const NOT_FOUND: &str = "not_found";
const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
const USER_NOT_FOUND: &str = "user_not_found";
const ITEM_NOT_FOUND: &str = "item_not_found";
const ORDER_NOT_FOUND: &str = "order_not_found";
const TOPUP_NOT_FOUND: &str = "topup_not_found";
const CRASH_POINT_NOT_FOUND: &str = "crash_point_not_found";
const INVALID_STATE: &str = "invalid_state";
const REQUEST_TIMEOUT: &str = "request_timeout";
const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
const INVALID_AMOUNT: &str = "invalid_amount";
const RATE_LIMITED: &str = "rate_limited";
const UNAVAILABLE: &str = "unavailable";
const INTERNAL: &str = "internal";

/// Every `code` the server answers with: those of the helpers below, of the routes, and of the
/// business rejections (`Rejection::code`). The OpenAPI document lists them as the code's enum; a test
/// checks that every rejection's code is here.
pub const ERROR_CODES: [&str; 40] = [
    INVALID_REQUEST,
    IDEMPOTENCY_KEY_REQUIRED,
    UNAUTHENTICATED,
    INVALID_SIGNATURE,
    FORBIDDEN,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    USER_NOT_FOUND,
    ITEM_NOT_FOUND,
    ORDER_NOT_FOUND,
    TOPUP_NOT_FOUND,
    CRASH_POINT_NOT_FOUND,
    "user_exists",
    "insufficient_funds",
    "price_changed",
    "already_owned",
    "item_inactive",
    INVALID_STATE,
    "refund_exceeds_purchase",
    "already_consumed",
    "insufficient_entitlement",
    "external_ref_conflict",
    "amount_mismatch",
    "order_expired",
    "refund_window_closed",
    "too_many_pending_orders",
    "too_many_refunds",
    "catalog_full",
    "balance_limit_exceeded",
    "limit_exceeded",
    "account_frozen",
    "reversal_exceeds_credit",
    "debt_outstanding",
    REQUEST_TIMEOUT,
    PAYLOAD_TOO_LARGE,
    INVALID_AMOUNT,
    "idempotency_key_reused",
    RATE_LIMITED,
    UNAVAILABLE,
    INTERNAL,
];

/// An error response. Built by the helpers below, rendered by `IntoResponse`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Value,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u32>,
    /// Answer with `Connection: close`: the request body was not read to its end, so the connection
    /// cannot carry another request.
    pub close_connection: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `insufficient_funds`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Structured facts about the error (may be empty).
    #[schema(value_type = Object)]
    pub details: Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: json!({}),
            retry_after: None,
            close_connection: false,
        }
    }

    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = details;
        self
    }

    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message)
    }

    pub fn idempotency_key_required() -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            IDEMPOTENCY_KEY_REQUIRED,
            format!(
                "POST requests need an Idempotency-Key header (1-{} printable ASCII characters)",
                crate::http::input::MAX_IDEMPOTENCY_KEY_LEN
            ),
        )
    }

    pub fn unauthenticated() -> ApiError {
        ApiError::unauthenticated_because("a valid bearer token is required")
    }

    /// Authentication failed, and why (node calls say which check refused them).
    pub fn unauthenticated_because(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, UNAUTHENTICATED, reason)
    }

    pub fn invalid_signature(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, INVALID_SIGNATURE, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, FORBIDDEN, message)
    }

    /// A path no route serves.
    pub fn no_such_endpoint() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, NOT_FOUND, "no such endpoint")
    }

    /// A shard number beyond the node's shards.
    pub fn shard_not_found(shard: u32, shards: u32) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            NOT_FOUND,
            format!(
                "no shard {shard}: this node has shards 0 to {}",
                shards.saturating_sub(1)
            ),
        )
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            METHOD_NOT_ALLOWED,
            "this endpoint does not accept that method",
        )
    }

    pub fn user_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, USER_NOT_FOUND, "user not found")
    }

    pub fn item_not_found(item_id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ITEM_NOT_FOUND,
            format!("item {item_id} not found"),
        )
        .with_details(json!({ "item_id": item_id }))
    }

    pub fn order_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, ORDER_NOT_FOUND, "order not found")
    }

    pub fn topup_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, TOPUP_NOT_FOUND, "top-up not found")
    }

    /// Nothing is stored (or shown to this caller) under an idempotency key.
    pub fn node_not_found(node_id: u64) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            NOT_FOUND,
            format!("node {node_id} is not a member of any shard"),
        )
    }

    pub fn stored_outcome_not_found() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            NOT_FOUND,
            "no outcome is stored under this key",
        )
    }

    pub fn crash_point_not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, CRASH_POINT_NOT_FOUND, message)
    }

    /// The request is not allowed in the current state (of the cluster, here).
    pub fn invalid_state(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, INVALID_STATE, message)
    }

    pub fn payload_too_large(limit: usize) -> ApiError {
        let mut error = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {limit} bytes"),
        )
        .with_details(json!({ "limit_bytes": limit }));
        error.close_connection = true;
        error
    }

    /// The request body did not arrive whole in time (`--body-read-timeout`).
    pub fn request_timeout(timeout: std::time::Duration) -> ApiError {
        let mut error = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        );
        error.close_connection = true;
        error
    }

    pub fn invalid_amount(field: &str, error: &AmountError) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            INVALID_AMOUNT,
            format!("{field}: {error}"),
        )
        .with_details(json!({ "field": field }))
    }

    /// A write whose outcome is unknown: it was not committed within `--request-timeout` (`timeout`), and
    /// may still be applied. 503 with `Retry-After`; the retry with the same key tells.
    pub fn outcome_unknown(timeout: std::time::Duration) -> ApiError {
        ApiError::unavailable(format!(
            "the write was not committed within {} (--request-timeout); its outcome is unknown: it may \
             still be applied. Retry with the same Idempotency-Key to learn the outcome.",
            humantime::format_duration(timeout)
        ))
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE, message);
        error.retry_after = Some(1);
        error
    }

    pub fn rate_limited(message: impl Into<String>) -> ApiError {
        let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, RATE_LIMITED, message);
        error.retry_after = Some(1);
        error
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL, message)
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Vec<u8> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message.clone(),
                details: self.details.clone(),
            },
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| {
            br#"{"error":{"code":"internal","message":"","details":{}}}"#.to_vec()
        })
    }

    /// A business rejection as the contract shows it. Deterministic: the same rejection always renders the
    /// same bytes, which is what makes stored rejections replay byte for byte.
    pub fn from_rejection(rejection: &Rejection, currency: &Currency) -> ApiError {
        let money = |m| currency.format(m);
        let (status, details) = match rejection {
            Rejection::UserNotFound | Rejection::OrderNotFound | Rejection::TopupNotFound => {
                (StatusCode::NOT_FOUND, json!({}))
            }
            Rejection::ItemNotFound { item_id } => {
                (StatusCode::NOT_FOUND, json!({ "item_id": item_id }))
            }
            Rejection::WebhookNotFound { name } => {
                (StatusCode::NOT_FOUND, json!({ "webhook": name }))
            }
            Rejection::AccountFrozen { reason } => {
                (StatusCode::FORBIDDEN, json!({ "reason": reason }))
            }
            Rejection::NotFound { what, id } => (StatusCode::NOT_FOUND, json!({ what: id })),
            Rejection::ReversalExceedsCredit {
                requested,
                reversible,
            } => (
                StatusCode::CONFLICT,
                json!({ "requested": money(*requested), "reversible": money(*reversible) }),
            ),
            Rejection::DebtOutstanding { debt } => {
                (StatusCode::CONFLICT, json!({ "debt": money(*debt) }))
            }
            Rejection::InvalidRequest { .. } => (StatusCode::BAD_REQUEST, json!({})),
            Rejection::IdempotencyKeyReused => (StatusCode::UNPROCESSABLE_ENTITY, json!({})),
            Rejection::UserExists => (StatusCode::CONFLICT, json!({})),
            Rejection::InsufficientFunds {
                available,
                required,
            } => (
                StatusCode::CONFLICT,
                json!({ "available": money(*available), "required": money(*required) }),
            ),
            Rejection::PriceChanged { expected, current } => (
                StatusCode::CONFLICT,
                json!({ "expected_total": money(*expected), "current_total": money(*current) }),
            ),
            Rejection::AlreadyOwned { item_id } | Rejection::ItemInactive { item_id } => {
                (StatusCode::CONFLICT, json!({ "item_id": item_id }))
            }
            Rejection::InvalidState { status } => {
                (StatusCode::CONFLICT, json!({ "status": status }))
            }
            Rejection::ItemKindFixed { item_id, kind } => (
                StatusCode::CONFLICT,
                json!({ "item_id": item_id, "kind": kind }),
            ),
            Rejection::RefundExceedsPurchase {
                item_id,
                requested,
                refundable,
            } => (
                StatusCode::CONFLICT,
                json!({ "item_id": item_id, "requested": requested, "refundable": refundable }),
            ),
            Rejection::AlreadyConsumed {
                item_id,
                requested,
                unspent,
            } => (
                StatusCode::CONFLICT,
                json!({ "item_id": item_id, "requested": requested, "unspent": unspent }),
            ),
            Rejection::InsufficientEntitlement {
                item_id,
                requested,
                owned,
            } => (
                StatusCode::CONFLICT,
                json!({ "item_id": item_id, "requested": requested, "owned": owned }),
            ),
            Rejection::ExternalRefConflict { external_ref } => (
                StatusCode::CONFLICT,
                json!({ "external_ref": external_ref }),
            ),
            Rejection::AmountMismatch { expected, received } => (
                StatusCode::CONFLICT,
                json!({ "expected": money(*expected), "received": money(*received) }),
            ),
            Rejection::OrderExpired { expires_at } => (
                StatusCode::CONFLICT,
                json!({ "expires_at": expires_at.to_rfc3339() }),
            ),
            Rejection::RefundWindowClosed { item_id, closed_at } => (
                StatusCode::CONFLICT,
                json!({ "item_id": item_id, "closed_at": closed_at.to_rfc3339() }),
            ),
            Rejection::TooManyPendingOrders { limit } | Rejection::TooManyRefunds { limit } => {
                (StatusCode::CONFLICT, json!({ "limit": limit }))
            }
            Rejection::CatalogFull { limit } => (StatusCode::CONFLICT, json!({ "limit": limit })),
            Rejection::BalanceLimitExceeded { max } => {
                (StatusCode::CONFLICT, json!({ "max_balance": money(*max) }))
            }
            Rejection::LimitExceeded {
                limit,
                max,
                retry_after,
            } => {
                let mut details = json!({ "limit": limit, "max": max });
                if let Some(at) = retry_after {
                    details["retry_after"] = json!(at.to_rfc3339());
                }
                (StatusCode::CONFLICT, details)
            }
            Rejection::MoneyLimitExceeded {
                limit,
                max,
                retry_after,
            } => {
                let mut details = json!({ "limit": limit, "max": money(*max) });
                if let Some(at) = retry_after {
                    details["retry_after"] = json!(at.to_rfc3339());
                }
                (StatusCode::CONFLICT, details)
            }
        };
        ApiError::new(status, rejection.code(), rejection.to_string()).with_details(details)
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Overloaded { shard } => ApiError::rate_limited(
                "the shop is busy; retry shortly with the same Idempotency-Key",
            )
            .with_details(json!({ "shard": shard })),
            EngineError::Unavailable(reason) => ApiError::unavailable(reason),
            EngineError::OutcomeUnknown { shard } => ApiError::unavailable(
                "the write was not committed in time; its outcome is unknown: it may still be \
                 applied. Retry with the same Idempotency-Key to learn the outcome.",
            )
            .with_details(json!({ "shard": shard })),
            EngineError::Rejected(reason) => ApiError::invalid_state(reason),
            EngineError::NotFound(missing) => ApiError::not_found(missing),
            EngineError::Storage(e) if e.is_disk_full() => ApiError::unavailable(e.to_string()),
            EngineError::Storage(e) => {
                tracing::error!(error = %e, "storage error");
                ApiError::unavailable("storage error; retry with the same Idempotency-Key")
            }
            EngineError::Open(reason)
            | EngineError::Internal(reason)
            | EngineError::Corrupt(reason) => {
                tracing::error!(%reason, "internal error");
                ApiError::internal(
                    "internal error; retry with the same Idempotency-Key to learn the outcome",
                )
            }
        }
    }
}

impl ApiError {
    fn not_found(missing: Missing) -> ApiError {
        match missing {
            Missing::User => ApiError::user_not_found(),
            Missing::Item { item_id } => ApiError::item_not_found(&item_id),
            Missing::Order => ApiError::order_not_found(),
            Missing::Topup => ApiError::topup_not_found(),
            Missing::StoredOutcome => ApiError::stored_outcome_not_found(),
            Missing::Webhook => ApiError::new(StatusCode::NOT_FOUND, NOT_FOUND, "no such webhook"),
            Missing::Credit => ApiError::new(StatusCode::NOT_FOUND, NOT_FOUND, "credit not found"),
        }
    }
}

impl From<PathRejection> for ApiError {
    /// A path that does not decode or parse is the client's mistake; a route whose parameters do not
    /// match its template is ours.
    fn from(rejection: PathRejection) -> ApiError {
        if rejection.status().is_client_error() {
            ApiError::invalid_request(format!("invalid path: {}", rejection.body_text()))
        } else {
            tracing::error!(error = %rejection.body_text(), "a route's path parameters do not match it");
            ApiError::internal("internal error")
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close_connection {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Money, Timestamp};

    /// One rejection of each kind. The match below stops compiling when a kind is added, so this list
    /// (and `ERROR_CODES`) cannot silently fall behind.
    fn every_rejection() -> Vec<Rejection> {
        let id = || "x".to_owned();
        let at = Timestamp::from_unix_seconds(0);
        let all = vec![
            Rejection::UserNotFound,
            Rejection::UserExists,
            Rejection::ItemNotFound { item_id: id() },
            Rejection::OrderNotFound,
            Rejection::TopupNotFound,
            Rejection::InsufficientFunds {
                available: Money::ZERO,
                required: Money::ZERO,
            },
            Rejection::PriceChanged {
                expected: Money::ZERO,
                current: Money::ZERO,
            },
            Rejection::AlreadyOwned { item_id: id() },
            Rejection::ItemInactive { item_id: id() },
            Rejection::InvalidState { status: id() },
            Rejection::RefundExceedsPurchase {
                item_id: id(),
                requested: 1,
                refundable: 0,
            },
            Rejection::AlreadyConsumed {
                item_id: id(),
                requested: 1,
                unspent: 0,
            },
            Rejection::InsufficientEntitlement {
                item_id: id(),
                requested: 1,
                owned: 0,
            },
            Rejection::ExternalRefConflict { external_ref: id() },
            Rejection::AmountMismatch {
                expected: Money::ZERO,
                received: Money::ZERO,
            },
            Rejection::OrderExpired { expires_at: at },
            Rejection::RefundWindowClosed {
                item_id: id(),
                closed_at: at,
            },
            Rejection::TooManyPendingOrders { limit: 1 },
            Rejection::TooManyRefunds { limit: 1 },
            Rejection::CatalogFull { limit: 1 },
            Rejection::BalanceLimitExceeded { max: Money::ZERO },
            Rejection::InvalidRequest { message: id() },
            Rejection::IdempotencyKeyReused,
            Rejection::LimitExceeded {
                limit: id(),
                max: 1,
                retry_after: Some(at),
            },
            Rejection::ItemKindFixed {
                item_id: id(),
                kind: id(),
            },
            Rejection::WebhookNotFound { name: id() },
            Rejection::AccountFrozen { reason: id() },
            Rejection::NotFound {
                what: id(),
                id: id(),
            },
            Rejection::ReversalExceedsCredit {
                requested: Money::ZERO,
                reversible: Money::ZERO,
            },
            Rejection::DebtOutstanding { debt: Money::ZERO },
            Rejection::MoneyLimitExceeded {
                limit: id(),
                max: Money::ZERO,
                retry_after: Some(at),
            },
        ];
        for rejection in &all {
            match rejection {
                Rejection::UserNotFound
                | Rejection::UserExists
                | Rejection::ItemNotFound { .. }
                | Rejection::OrderNotFound
                | Rejection::TopupNotFound
                | Rejection::InsufficientFunds { .. }
                | Rejection::PriceChanged { .. }
                | Rejection::AlreadyOwned { .. }
                | Rejection::ItemInactive { .. }
                | Rejection::InvalidState { .. }
                | Rejection::RefundExceedsPurchase { .. }
                | Rejection::AlreadyConsumed { .. }
                | Rejection::InsufficientEntitlement { .. }
                | Rejection::ExternalRefConflict { .. }
                | Rejection::AmountMismatch { .. }
                | Rejection::OrderExpired { .. }
                | Rejection::RefundWindowClosed { .. }
                | Rejection::TooManyPendingOrders { .. }
                | Rejection::TooManyRefunds { .. }
                | Rejection::CatalogFull { .. }
                | Rejection::BalanceLimitExceeded { .. }
                | Rejection::InvalidRequest { .. }
                | Rejection::IdempotencyKeyReused
                | Rejection::LimitExceeded { .. }
                | Rejection::ItemKindFixed { .. }
                | Rejection::WebhookNotFound { .. }
                | Rejection::AccountFrozen { .. }
                | Rejection::NotFound { .. }
                | Rejection::ReversalExceedsCredit { .. }
                | Rejection::DebtOutstanding { .. }
                | Rejection::MoneyLimitExceeded { .. } => {}
            }
        }
        all
    }

    #[test]
    fn every_rejection_code_is_listed() {
        for rejection in every_rejection() {
            let error = ApiError::from_rejection(&rejection, &Currency::eur());
            assert!(
                ERROR_CODES.contains(&error.code),
                "{} is not listed",
                error.code
            );
        }
    }
}
