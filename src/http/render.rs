//! Outcome → HTTP response: the status and the exact bytes of every reply and stored rejection.
//!
//! Rendering is a pure function of the outcome (and the deployment's currency and token key), which is
//! why a replayed outcome answers byte for byte what the first request got.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::App;
use super::dto;
use super::error::ApiError;
use crate::domain::{Money, Outcome, Reply};
use crate::engine::Applied;

pub struct Rendered {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Rendered {
    match serde_json::to_vec(value) {
        Ok(body) => Rendered { status, body },
        Err(e) => {
            let error = ApiError::internal(format!("cannot render the response: {e}"));
            Rendered {
                status: error.status,
                body: error.body(),
            }
        }
    }
}

/// 201 for what a command made now, 200 for what an earlier one made (the same external reference).
fn created_if(fresh: bool) -> StatusCode {
    if fresh {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

pub fn outcome(app: &App, outcome: &Outcome) -> Rendered {
    let currency = &app.config.currency;
    match outcome {
        Ok(Reply::UserCreated(user)) => json(
            StatusCode::CREATED,
            // A new user owes nothing: shown, so that the answer has the shape of `GET /v1/users/{id}`.
            &dto::user(currency, user, &user.wallet(), None, Some(Money::ZERO)),
        ),
        Ok(Reply::Account { user, frozen }) => json(
            StatusCode::OK,
            &dto::user(currency, user, &user.wallet(), frozen.as_ref(), None),
        ),
        Ok(Reply::Reversed {
            reversal,
            wallet,
            debt,
            fresh,
        }) => json(
            created_if(*fresh),
            &dto::reversal(currency, reversal, wallet, *debt),
        ),
        Ok(Reply::Disputed {
            dispute,
            wallet,
            debt,
            reversal,
        }) => json(
            StatusCode::OK,
            &dto::dispute(currency, dispute, reversal.as_deref(), wallet, *debt),
        ),
        Ok(Reply::TokenIssued {
            user_id,
            expires_at,
        }) => json(
            StatusCode::CREATED,
            &dto::TokenResponse {
                token: app.auth.signer().mint(user_id, *expires_at),
                expires_at: expires_at.to_rfc3339(),
            },
        ),
        Ok(Reply::Credited {
            credit,
            wallet,
            fresh,
        }) => json(created_if(*fresh), &dto::credit(currency, credit, wallet)),
        Ok(Reply::TopupCreated(topup)) => json(StatusCode::CREATED, &dto::topup(currency, topup)),
        Ok(Reply::TopupUpdated(topup)) => json(StatusCode::OK, &dto::topup(currency, topup)),
        Ok(Reply::Item(item)) => json(StatusCode::OK, &dto::item(currency, item)),
        Ok(Reply::OrderCreated(order)) => json(StatusCode::CREATED, &dto::order(currency, order)),
        Ok(Reply::OrderUpdated(order)) => json(StatusCode::OK, &dto::order(currency, order)),
        Ok(Reply::Refunded { refund, wallet }) => {
            json(StatusCode::CREATED, &dto::refund(currency, refund, wallet))
        }
        Ok(Reply::Entitlement(entitlement)) => json(StatusCode::OK, &dto::entitlement(entitlement)),
        Ok(
            other @ (Reply::GlobalClaim(_)
            | Reply::RefClaimed { .. }
            | Reply::Swept { .. }
            | Reply::SweptAndPurged { .. }
            | Reply::Webhook(_)
            | Reply::EventsPurged { .. }
            | Reply::ShopLimits(_)
            | Reply::UserLimits { .. }
            | Reply::IdempotencyPurged { .. }),
        ) => {
            let error = ApiError::internal(format!("internal reply reached the API: {other:?}"));
            Rendered {
                status: error.status,
                body: error.body(),
            }
        }
        Err(rejection) => {
            let error = ApiError::from_rejection(rejection, currency);
            Rendered {
                status: error.status,
                body: error.body(),
            }
        }
    }
}

/// The response to a command: its rendered outcome, marked `Idempotent-Replayed: true` when it was
/// answered from a stored outcome.
pub fn applied(app: &App, applied: &Applied) -> Response {
    let rendered = outcome(app, &applied.outcome);
    let mut response = body(rendered.status, rendered.body);
    if applied.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// A JSON response from already serialised bytes.
pub fn body(status: StatusCode, bytes: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

/// A JSON response of a read.
pub fn ok<T: Serialize>(value: &T) -> Response {
    let rendered = json(StatusCode::OK, value);
    body(rendered.status, rendered.body)
}

/// 204 without a body (a DELETE).
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}
