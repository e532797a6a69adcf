//! The endpoints, one module per resource. Each handler is annotated for the OpenAPI document and
//! registered through `utoipa_axum::routes!`, so the document and the router come from the same list.

mod backup;
mod catalog;
mod cluster;
mod credits;
mod doc;
mod entitlements;
mod events;
mod freeze;
mod limits;
mod ops;
mod orders;
mod users;
mod webhooks;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use doc::finish as finish_document;
pub use ops::metrics_text;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::input;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopkeep",
        description = "The backend of a digital game shop: wallets, catalog, orders, refunds. \
            Money is a decimal string in the deployment's currency. Every POST needs an Idempotency-Key. \
            Errors have one shape: {\"error\": {\"code\", \"message\", \"details\"}}. \
            Every response carries X-Request-Id (echoed when the client sent one); a response replayed from \
            a stored outcome carries Idempotent-Replayed: true."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "users", description = "Users, wallets, tokens, idempotency lookups"),
        (name = "credit", description = "Direct credits, PSP top-ups and the PSP webhook"),
        (name = "catalog", description = "Items for sale"),
        (name = "orders", description = "Purchases and refunds"),
        (name = "entitlements", description = "What users own, and their ledger"),
        (name = "events", description = "The event feed and webhooks to game servers"),
        (name = "operations", description = "Health, metrics, audit, cluster")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(users::create_user))
        .routes(routes!(users::get_user))
        .routes(routes!(users::get_wallet))
        .routes(routes!(users::create_token))
        .routes(routes!(users::get_idempotency))
        .routes(routes!(freeze::freeze))
        .routes(routes!(freeze::unfreeze))
        .routes(routes!(limits::put_user_limits, limits::get_user_limits))
        .routes(routes!(limits::put_shop_limits, limits::get_shop_limits))
        .routes(routes!(credits::create_credit))
        .routes(routes!(credits::create_reversal))
        .routes(routes!(credits::create_topup))
        .routes(routes!(credits::get_topup))
        .routes(routes!(credits::psp_webhook))
        .routes(routes!(catalog::put_item, catalog::get_item))
        .routes(routes!(catalog::list_items))
        .routes(routes!(orders::create_order, orders::list_orders))
        .routes(routes!(orders::get_order))
        .routes(routes!(orders::complete_order))
        .routes(routes!(orders::cancel_order))
        .routes(routes!(orders::create_refund))
        .routes(routes!(entitlements::list_entitlements))
        .routes(routes!(entitlements::consume))
        .routes(routes!(entitlements::ledger))
        .routes(routes!(events::list_events))
        .routes(routes!(
            webhooks::put_webhook,
            webhooks::get_webhook,
            webhooks::delete_webhook
        ))
        .routes(routes!(webhooks::replay_webhook))
        .routes(routes!(ops::audit))
        .routes(routes!(backup::plan))
        .routes(routes!(backup::shard))
        .routes(routes!(cluster::cluster))
        .routes(routes!(cluster::route))
        .routes(routes!(cluster::add_node))
        .routes(routes!(cluster::promote_node))
        .routes(routes!(cluster::remove_node))
        .routes(routes!(cluster::rebalance_leaders))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
}

/// Checks that `caller` may act on `user_id` and that the id is well-formed.
fn user_path(caller: &Caller, user_id: &str) -> Result<String, ApiError> {
    caller.require_user_access(user_id)?;
    input::client_id("user_id", user_id)
}
