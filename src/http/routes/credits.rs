//! Adding credit, and taking it back: direct credits reported by the game backend and their reversals,
//! PSP top-ups, and the signed PSP webhook (payments, refunds and disputes).

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::user_path;
use crate::domain::command::{self, PSP_EVENT_SCOPE};
use crate::domain::model::{MAX_SOURCE_CHARS, is_valid_external_ref};
use crate::domain::{Command, Money, ReversalReason, ReversalSource, Timestamp};
use crate::engine::coordinator::{DirectCredit, PspEvent};
use crate::engine::reversals::{PspReversal, PspReversalKind, PspTopupRef};
use crate::http::auth::Caller;
use crate::http::dto::{
    self, CreditRequest, CreditResponse, PspWebhookResponse, ReversalRequest, ReversalResponse,
    TopupRequest, TopupResponse, WebhookRequest,
};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, AmountRule, PathParams, Post, ReadConsistency};
use crate::http::{AppState, render};

/// How far a webhook's signed timestamp may be from now.
const WEBHOOK_TOLERANCE_SECONDS: u64 = 300;

fn external_ref(field: &str, value: &str) -> Result<(), ApiError> {
    if is_valid_external_ref(value) {
        Ok(())
    } else {
        Err(ApiError::invalid_request(format!(
            "{field} must be 1-255 printable ASCII characters without spaces"
        )))
    }
}

/// Credit a payment the PSP already settled (admin, service). `external_ref` is unique across the shop.
#[utoipa::path(post, path = "/v1/users/{user_id}/credits", tag = "credit", request_body = CreditRequest,
    params(("user_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 201, description = "Credited", body = CreditResponse),
        (status = 200, description = "This external_ref was already credited: the original credit, nothing credited now", body = CreditResponse),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 409, description = "`external_ref_conflict`, `balance_limit_exceeded`", body = ErrorBody),
        (status = 422, description = "`invalid_amount`, `idempotency_key_reused`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_credit(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams(user_id): PathParams<String>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let key = post.idempotency_key()?;
    let request: CreditRequest = post.json()?;
    let amount = input::amount(
        &app.config.currency,
        "amount",
        &request.amount,
        AmountRule::Positive,
    )?;
    external_ref("external_ref", &request.external_ref)?;
    let source = input::bounded_text("source", request.source, MAX_SOURCE_CHARS)?;
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let credit = DirectCredit {
        user_id,
        amount,
        external_ref: request.external_ref,
        source,
    };
    let applied = app
        .bounded_write(app.node.credit(consistency, now, tag, credit))
        .await?;
    Ok(render::applied(&app, &applied))
}

/// Start a top-up through the PSP (user for itself, service, admin); the webhook completes it. A user may
/// have at most `--max-pending-topups` PENDING top-ups at once.
#[utoipa::path(post, path = "/v1/users/{user_id}/topups", tag = "credit", request_body = TopupRequest,
    params(("user_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 201, description = "The top-up, PENDING until the PSP's webhook", body = TopupResponse),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 409, description = "`limit_exceeded` (details: `limit` = `max_pending_topups`, `max`, `retry_after`)", body = ErrorBody),
        (status = 422, description = "`invalid_amount`, `idempotency_key_reused`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_topup(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(user_id): PathParams<String>,
    post: Post,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let key = post.idempotency_key()?;
    let request: TopupRequest = post.json()?;
    let amount = input::amount(
        &app.config.currency,
        "amount",
        &request.amount,
        AmountRule::Positive,
    )?;
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let command = Command::CreateTopupCapped(command::CreateTopupCapped {
        user_id: user_id.clone(),
        amount,
        expires_at: now.plus(app.config.topup_ttl),
        max_pending_topups: app.config.max_pending_topups,
    });
    let applied = app
        .submit_for_user(&user_id, now, Some(tag), command)
        .await?;
    Ok(render::applied(&app, &applied))
}

/// A top-up and its status (`PENDING` past its deadline reads as `EXPIRED`).
#[utoipa::path(get, path = "/v1/users/{user_id}/topups/{topup_id}", tag = "credit",
    params(("user_id" = String, Path), ("topup_id" = String, Path)),
    responses((status = 200, description = "The top-up", body = TopupResponse), (status = 404, description = "`user_not_found`, `topup_not_found`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_topup(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams((user_id, topup_id)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    let user_id = user_path(&caller, &user_id)?;
    let topup_id = Uuid::parse_str(&topup_id).ok();
    let read = app
        .node
        .topup(consistency, &user_id, topup_id, Timestamp::now());
    let topup = app.bounded(read).await?;
    Ok(render::ok(&dto::topup(&app.config.currency, &topup)))
}

/// The longest `Psp-Signature` header accepted.
const MAX_SIGNATURE_HEADER_BYTES: usize = 1024;
/// Most `v1=` signatures in one header (a PSP rotating its secret sends two).
const MAX_SIGNATURES: usize = 4;

/// A `Psp-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>` header whose
/// shape and time are right; whether it signs the body is checked once the body is read.
struct PspSignature {
    timestamp: i64,
    candidates: Vec<[u8; 32]>,
}

impl PspSignature {
    /// Checks the header alone, before a byte of the body is read: at most 1 KiB, one `t=` within 300 s
    /// of now, 1–4 `v1=` values of 64 hex digits. Other schemes' values are ignored.
    fn parse(headers: &HeaderMap, now: Timestamp) -> Result<PspSignature, ApiError> {
        let header = headers
            .get("psp-signature")
            .ok_or_else(|| ApiError::invalid_signature("missing Psp-Signature header"))?;
        if header.len() > MAX_SIGNATURE_HEADER_BYTES {
            return Err(ApiError::invalid_signature(format!(
                "Psp-Signature is longer than {MAX_SIGNATURE_HEADER_BYTES} bytes"
            )));
        }
        let header = header
            .to_str()
            .map_err(|_| ApiError::invalid_signature("Psp-Signature is not ASCII"))?;
        let mut timestamp = None;
        let mut candidates = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", value)) if timestamp.is_none() => {
                    timestamp = Some(value.parse::<i64>().map_err(|_| {
                        ApiError::invalid_signature("Psp-Signature has no valid t=")
                    })?);
                }
                Some(("t", _)) => {
                    return Err(ApiError::invalid_signature("Psp-Signature has two t="));
                }
                Some(("v1", value)) if candidates.len() < MAX_SIGNATURES => {
                    let mut signature = [0u8; 32];
                    hex::decode_to_slice(value, &mut signature).map_err(|_| {
                        ApiError::invalid_signature("a v1= signature is not 64 hex digits")
                    })?;
                    candidates.push(signature);
                }
                Some(("v1", _)) => {
                    return Err(ApiError::invalid_signature(format!(
                        "Psp-Signature has more than {MAX_SIGNATURES} v1= signatures"
                    )));
                }
                _ => {}
            }
        }
        let timestamp = timestamp
            .ok_or_else(|| ApiError::invalid_signature("Psp-Signature has no valid t="))?;
        if candidates.is_empty() {
            return Err(ApiError::invalid_signature(
                "Psp-Signature has no v1= signature",
            ));
        }
        if now.unix_seconds().abs_diff(timestamp) > WEBHOOK_TOLERANCE_SECONDS {
            return Err(ApiError::invalid_signature(format!(
                "Psp-Signature timestamp is more than {WEBHOOK_TOLERANCE_SECONDS} s away from now"
            )));
        }
        Ok(PspSignature {
            timestamp,
            candidates,
        })
    }

    /// Computes the MAC of the body once and compares it with each candidate in constant time.
    fn verify(&self, secret: &[u8], raw: &Bytes) -> Result<(), ApiError> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .map_err(|_| ApiError::internal("the PSP secret cannot key an HMAC"))?;
        mac.update(self.timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(raw);
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        let matches = self
            .candidates
            .iter()
            .fold(subtle::Choice::from(0), |any, candidate| {
                any | candidate.ct_eq(&expected)
            });
        if bool::from(matches) {
            Ok(())
        } else {
            Err(ApiError::invalid_signature("signature does not match"))
        }
    }
}

/// The PSP's notifications: payments, refunds and disputes of top-ups. Authenticated by its HMAC
/// signature; `event_id` is its idempotency key.
#[utoipa::path(post, path = "/v1/psp/webhook", tag = "credit", request_body = WebhookRequest,
    params(("Psp-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<raw body>\")>")),
    responses(
        (status = 200, description = "The top-up after a payment event (unchanged for a replay or a final top-up), or the dispute after a dispute event", body = PspWebhookResponse),
        (status = 201, description = "`payment.refunded`: the reversal", body = ReversalResponse),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_signature`", body = ErrorBody),
        (status = 404, description = "`topup_not_found`; `not_found` (`dispute.closed` lost, of a dispute not opened here, without `amount`: not stored, send it again)", body = ErrorBody),
        (status = 409, description = "`amount_mismatch`, `external_ref_conflict`, `reversal_exceeds_credit`, `invalid_state` (a refund or dispute of a top-up not completed: not stored, send it again), `limit_exceeded`", body = ErrorBody),
        (status = 422, description = "`invalid_amount`", body = ErrorBody),
    ))]
pub async fn psp_webhook(
    State(app): State<AppState>,
    ReadConsistency(consistency): ReadConsistency,
    request: Request,
) -> Result<Response, ApiError> {
    let now = Timestamp::now();
    let secret = app.psp_secret.as_deref().ok_or_else(|| {
        ApiError::invalid_signature("webhooks are disabled: SHOPKEEP_PSP_SECRET is not set")
    })?;
    // Everything a stranger can be refused for without the body is checked before it is read.
    let signature = PspSignature::parse(request.headers(), now)?;
    let post = Post::read(request).await?;
    signature.verify(secret, &post.body.0)?;
    let request: WebhookRequest = post.json()?;
    external_ref("event_id", &request.event_id)?;
    let user_id = input::client_id("user_id", &request.user_id)?;
    let tag = app.tag(
        PSP_EVENT_SCOPE,
        request.event_id.clone(),
        post.fingerprint(),
        now,
    );
    let succeeded = match request.event_type.as_str() {
        "payment.succeeded" => true,
        "payment.failed" => false,
        "payment.refunded" | "dispute.opened" | "dispute.closed" => {
            let event = psp_reversal(&app, request, user_id)?;
            let write = app.node.psp_reversal(consistency, now, tag, event);
            let applied = app.bounded_write(write).await?;
            return Ok(render::applied(&app, &applied));
        }
        other => {
            return Err(ApiError::invalid_request(format!(
                "unknown event type {other:?}"
            )));
        }
    };
    let amount = required_amount(&app, request.amount.as_ref())?;
    let psp_payment_id = match (&request.psp_payment_id, succeeded) {
        (Some(id), _) => {
            external_ref("psp_payment_id", id)?;
            id.clone()
        }
        (None, true) => {
            return Err(ApiError::invalid_request(
                "payment.succeeded needs psp_payment_id",
            ));
        }
        (None, false) => String::new(),
    };
    let topup_id = request
        .topup_id
        .as_deref()
        .and_then(|id| Uuid::parse_str(id).ok())
        .ok_or_else(ApiError::topup_not_found)?;
    let event = PspEvent {
        event_id: request.event_id,
        succeeded,
        topup_id,
        user_id,
        amount,
        psp_payment_id,
    };
    let applied = app
        .bounded_write(app.node.psp_payment(consistency, now, tag, event))
        .await?;
    Ok(render::applied(&app, &applied))
}

/// A webhook's `amount`, which its type requires.
fn required_amount(app: &AppState, amount: Option<&serde_json::Value>) -> Result<Money, ApiError> {
    let amount = amount.ok_or_else(|| ApiError::invalid_request("amount is required"))?;
    input::amount(&app.config.currency, "amount", amount, AmountRule::Positive)
}

/// A `payment.refunded`, `dispute.opened` or `dispute.closed` event, checked: it names its top-up by
/// `topup_id` or `psp_payment_id`; a dispute event names its `dispute_id`.
fn psp_reversal(
    app: &AppState,
    request: WebhookRequest,
    user_id: String,
) -> Result<PspReversal, ApiError> {
    let topup = match (&request.topup_id, &request.psp_payment_id) {
        (Some(id), _) => {
            PspTopupRef::Topup(Uuid::parse_str(id).map_err(|_| ApiError::topup_not_found())?)
        }
        (None, Some(payment)) => {
            external_ref("psp_payment_id", payment)?;
            PspTopupRef::Payment(payment.clone())
        }
        (None, None) => {
            return Err(ApiError::invalid_request(
                "the event needs topup_id or psp_payment_id",
            ));
        }
    };
    let dispute_id = || match &request.dispute_id {
        Some(id) => external_ref("dispute_id", id).map(|()| id.clone()),
        None => Err(ApiError::invalid_request(
            "a dispute event needs dispute_id",
        )),
    };
    let kind = match request.event_type.as_str() {
        "payment.refunded" => PspReversalKind::Refunded {
            amount: required_amount(app, request.amount.as_ref())?,
        },
        "dispute.opened" => PspReversalKind::DisputeOpened {
            dispute_id: dispute_id()?,
            amount: required_amount(app, request.amount.as_ref())?,
        },
        _ => PspReversalKind::DisputeClosed {
            dispute_id: dispute_id()?,
            won: match request.outcome.as_deref() {
                Some("won") => true,
                Some("lost") => false,
                _ => {
                    return Err(ApiError::invalid_request(
                        "dispute.closed needs outcome won or lost",
                    ));
                }
            },
            amount: match &request.amount {
                Some(_) => Some(required_amount(app, request.amount.as_ref())?),
                None => None,
            },
        },
    };
    Ok(PspReversal {
        event_id: request.event_id,
        user_id,
        topup,
        kind,
        revoke: app.config.revoke_on_reversal,
    })
}

/// Reverse (part of) a direct credit the payment provider took back (service, admin): a PSP refund or a
/// chargeback the game backend learned of. Taken from the wallet; what it no longer has becomes debt and
/// freezes the account (see `--on-reversal`).
#[utoipa::path(post, path = "/v1/users/{user_id}/credits/{credit_id}/reversals", tag = "credit",
    request_body = ReversalRequest,
    params(("user_id" = String, Path), ("credit_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 201, description = "Reversed", body = ReversalResponse),
        (status = 200, description = "This external_ref was already reversed on this credit: the original reversal, nothing taken now", body = ReversalResponse),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`user_not_found`, `not_found` (no such credit of this user)", body = ErrorBody),
        (status = 409, description = "`reversal_exceeds_credit`, `external_ref_conflict`, `limit_exceeded` (100 reversals per credit)", body = ErrorBody),
        (status = 422, description = "`invalid_amount`, `idempotency_key_reused`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_reversal(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    PathParams((user_id, credit_id)): PathParams<(String, String)>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let credit_id = Uuid::parse_str(&credit_id)
        .map_err(|_| ApiError::invalid_request("credit_id must be a UUID"))?;
    let key = post.idempotency_key()?;
    let request: ReversalRequest = post.json()?;
    let amount = input::amount(
        &app.config.currency,
        "amount",
        &request.amount,
        AmountRule::Positive,
    )?;
    let reason = ReversalReason::parse(&request.reason)
        .ok_or_else(|| ApiError::invalid_request("reason must be psp_refund or chargeback"))?;
    external_ref("external_ref", &request.external_ref)?;
    let credit_ref = app
        .bounded(app.node.credit_ref(consistency, &user_id, credit_id))
        .await?;
    let now = Timestamp::now();
    let tag = app.tag(&user_id, key, post.fingerprint(), now);
    let command = Command::Reverse(command::Reverse {
        user_id: user_id.clone(),
        source: ReversalSource::Credit {
            credit_id,
            external_ref: credit_ref,
        },
        amount,
        reason,
        external_ref: request.external_ref,
        revoke: app.config.revoke_on_reversal,
    });
    let applied = app
        .submit_for_user(&user_id, now, Some(tag), command)
        .await?;
    Ok(render::applied(&app, &applied))
}
