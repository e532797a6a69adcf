//! The endpoints, one module per resource. Each handler is annotated for the OpenAPI document and
//! registered through `utoipa_axum::routes!`, so the document and the router come from the same list.

mod catalog;
mod cluster;
mod credits;
mod entitlements;
mod ops;
mod orders;
mod users;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::error::ApiError;
use super::input;
use super::{AppState, current_consistency};
use crate::domain::{Timestamp, User, WalletView};
use crate::state::{StoreError, query};
use redb::ReadTransaction;

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

/// Endpoints that answer whatever the load, without the request plumbing (auth, limits, engine).
const PLAIN_ENDPOINTS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"];

/// Adds to every operation the error responses that the shared request plumbing can give, so the document
/// lists what the server really answers: 401/403 where a token is needed, 400/413 where a body is read,
/// 429/503 wherever the in-flight limit and the engine apply. Responses an operation documents itself are
/// left as they are.
pub fn document_common_responses(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    for (path, item) in openapi.paths.paths.iter_mut() {
        if PLAIN_ENDPOINTS.contains(&path.as_str()) {
            continue;
        }
        let keyed = path != "/v1/psp/webhook";
        if let Some(get) = item.get.as_mut() {
            get.parameters
                .get_or_insert_with(Vec::new)
                .push(consistency_parameter().into());
        }
        let operations = [
            (&mut item.post, true),
            (&mut item.put, false),
            (&mut item.get, false),
            (&mut item.delete, false),
        ];
        for (operation, is_post) in operations {
            let Some(operation) = operation.as_mut() else {
                continue;
            };
            let reads_body = operation.request_body.is_some();
            let bad_request = if is_post && keyed {
                "`invalid_request` (malformed input), `idempotency_key_required` (no Idempotency-Key)"
            } else {
                "`invalid_request` (malformed input)"
            };
            let mut common = vec![
                ("400", bad_request),
                (
                    "429",
                    "`rate_limited`: too many requests in flight or a full shard queue (Retry-After)",
                ),
                (
                    "503",
                    "`unavailable`: not applied in time; retry with the same Idempotency-Key (Retry-After)",
                ),
            ];
            if is_post && keyed {
                common.push((
                    "422",
                    "`idempotency_key_reused`: this key was used with another request",
                ));
            }
            if operation.security.is_some() {
                common.push(("401", "`unauthenticated`: no or bad bearer token"));
                common.push((
                    "403",
                    "`forbidden`: the token's role or user may not do this",
                ));
            }
            if reads_body {
                common.push(("413", "`payload_too_large`: the body is over 64 KiB"));
            }
            for (status, description) in common {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| error(description).into());
            }
        }
    }
}

/// The `consistency` query parameter every read takes (see `http::read_consistency`).
fn consistency_parameter() -> utoipa::openapi::path::Parameter {
    use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
    use utoipa::openapi::{ObjectBuilder, Type};
    ParameterBuilder::new()
        .name("consistency")
        .parameter_in(ParameterIn::Query)
        .required(utoipa::openapi::Required::False)
        .description(Some(
            "`linearizable` (default): the read reflects every write acknowledged before it \
             (leader + read index; 503 `unavailable` without a quorum). `local`: this node's \
             replica as it is, possibly behind.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["linearizable", "local"])),
        ))
        .build()
}

pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(users::create_user))
        .routes(routes!(users::get_user))
        .routes(routes!(users::get_wallet))
        .routes(routes!(users::create_token))
        .routes(routes!(users::get_idempotency))
        .routes(routes!(credits::create_credit))
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
        .routes(routes!(ops::audit))
        .routes(routes!(cluster::cluster))
        .routes(routes!(cluster::route))
        .routes(routes!(cluster::add_node))
        .routes(routes!(cluster::promote_node))
        .routes(routes!(cluster::remove_node))
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

/// Runs `read` on `user_id`'s shard in one snapshot, after checking there that the user exists (404
/// `user_not_found` otherwise): one read per request, and the check and the data agree.
async fn read_for_user<T, F>(app: &AppState, user_id: &str, read: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&ReadTransaction, &User) -> Result<T, StoreError> + Send + 'static,
{
    let shard = app.node.shard_of_user(user_id);
    let id = user_id.to_owned();
    let found =
        app.bounded(app.node.read_with(
            current_consistency(),
            shard,
            move |txn| match query::user(txn, &id)? {
                Some(user) => read(txn, &user).map(Some),
                None => Ok(None),
            },
        ))
        .await?;
    found.ok_or_else(ApiError::user_not_found)
}

/// Reads a user and its wallet as of `now`; 404 `user_not_found` if there is no such user.
async fn read_user(
    app: &AppState,
    user_id: &str,
    now: Timestamp,
) -> Result<(User, WalletView), ApiError> {
    read_for_user(app, user_id, move |txn, user| {
        Ok((user.clone(), query::wallet_at(txn, user, now)?))
    })
    .await
}
