//! The finishing touches of the OpenAPI document: what every route shares, said once.
//!
//! The handler annotations describe each operation; this module adds what the shared plumbing does (the
//! error responses of authentication, body reading, limits and the engine; the `consistency` parameter of
//! reads) and the conventions the checks in `input` enforce, from the same constants: identifier
//! patterns, Idempotency-Key, money as a decimal string in the deployment's currency, ranges, enums,
//! `date-time` and `uuid` formats, and the error codes. It works on the document's JSON, after utoipa
//! rendered it, with tables keyed by parameter, schema and property names.

use serde_json::{Map, Value, json};
use utoipa::openapi::OpenApi;

use super::entitlements;
use crate::domain::Currency;
use crate::domain::ids::MAX_ID_LEN;
use crate::domain::model::{
    MAX_DISPLAY_NAME_CHARS, MAX_EXTERNAL_REF_LEN, MAX_ITEM_NAME_CHARS, MAX_LINES, MAX_QUANTITY,
    MAX_REASON_CHARS, MAX_REFUND_WINDOW_DAYS, MAX_SOURCE_CHARS,
};
use crate::http::error::ERROR_CODES;
use crate::http::input::MAX_IDEMPOTENCY_KEY_LEN;

/// Client-chosen identifiers (`user_id`, `item_id`, a webhook's `name`).
const ID_PATTERN: &str = "^[A-Za-z0-9_.-]{1,64}$";
/// External references: printable ASCII without spaces.
const EXTERNAL_REF_PATTERN: &str = "^[!-~]{1,255}$";
/// An Idempotency-Key: printable ASCII. Spaces only inside, as HTTP drops them at either end of a header.
const KEY_PATTERN: &str = "^[!-~]([ -~]{0,253}[!-~])?$";
/// Free text: no control characters (`char::is_control`).
const TEXT_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";
/// Free text that must not be blank either.
const NON_BLANK_TEXT_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$";
/// `host:port` with a port from 1 to 65535.
const ADDRESS_PATTERN: &str = "^[^\\s,]+:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

pub const ORDER_STATUSES: [&str; 5] = [
    "PENDING",
    "COMPLETED",
    "CANCELLED",
    "PARTIALLY_REFUNDED",
    "REFUNDED",
];
const TOPUP_STATUSES: [&str; 4] = ["PENDING", "COMPLETED", "FAILED", "EXPIRED"];
pub const ITEM_KINDS: [&str; 3] = ["game", "skin", "currency"];
const POSTING_KINDS: [&str; 8] = [
    "credit",
    "hold",
    "release",
    "debit",
    "refund",
    "reversal",
    "debt",
    "debt_repaid",
];
const REFERENCE_KINDS: [&str; 6] = ["credit", "topup", "order", "refund", "reversal", "dispute"];
const CANCEL_REASONS: [&str; 2] = ["expired", "cancelled_by_client"];
const WEBHOOK_TYPES: [&str; 5] = [
    "payment.succeeded",
    "payment.failed",
    "payment.refunded",
    "dispute.opened",
    "dispute.closed",
];
const REVERSAL_REASONS: [&str; 2] = ["psp_refund", "chargeback"];
const SHARD_ROLES: [&str; 5] = ["leader", "follower", "candidate", "learner", "shutdown"];
const RECOVERY_STATES: [&str; 3] = ["none", "awaiting_leader", "catching_up"];

/// Ids the server makes (UUIDv7).
const SERVER_IDS: [&str; 6] = [
    "order_id",
    "refund_id",
    "credit_id",
    "topup_id",
    "entry_id",
    "reversal_id",
];
/// Money fields, all decimal strings.
const MONEY: [&str; 16] = [
    "debt",
    "from_hold",
    "from_wallet",
    "revoked_amount",
    "amount",
    "price",
    "expected_total",
    "balance",
    "held",
    "available",
    "unit_price",
    "line_total",
    "total",
    "refunded_total",
    "balance_after",
    "held_after",
];

/// The finished document as JSON: the common parts, then the conventions.
pub fn finish(mut document: OpenApi, currency: &Currency) -> Value {
    document_common_responses(&mut document);
    let mut doc = serde_json::to_value(&document).unwrap_or_else(|_| json!({}));
    describe_parameters(&mut doc);
    describe_schemas(&mut doc, currency);
    describe_request_bodies(&mut doc);
    doc
}

/// Endpoints that answer whatever the load, without the request plumbing (auth, limits, engine).
const PLAIN_ENDPOINTS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"];

/// Adds to every operation the error responses that the shared request plumbing can give, so the document
/// lists what the server really answers: 401/403 where a token is needed, 400/408/413 where a body is read,
/// 429/503 wherever the in-flight limit and the engine apply. Responses an operation documents itself are
/// left as they are.
fn document_common_responses(openapi: &mut OpenApi) {
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
            for (status, description) in common_responses(operation, is_post && keyed) {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| error(description).into());
            }
        }
    }
}

/// The errors the plumbing may answer for `operation` (`keyed`: a POST that needs an Idempotency-Key).
fn common_responses(
    operation: &utoipa::openapi::path::Operation,
    keyed: bool,
) -> Vec<(&'static str, &'static str)> {
    let bad_request = if keyed {
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
    if keyed {
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
    if operation.request_body.is_some() {
        common.push((
            "408",
            "`request_timeout`: the body did not arrive within --body-read-timeout",
        ));
        common.push(("413", "`payload_too_large`: the body is over 64 KiB"));
    }
    common
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
             replica as it is, possibly behind. Anything else, an empty value included, is 400.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["linearizable", "local"])),
        ))
        .build()
}

/// The schema of a client-chosen id.
fn id_schema() -> Value {
    json!({"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": MAX_ID_LEN})
}

fn uuid_schema() -> Value {
    json!({"type": "string", "format": "uuid"})
}

/// The schema of path and header parameters, by (location, name).
fn parameter_schema(location: &str, name: &str) -> Option<Value> {
    Some(match (location, name) {
        ("path", "user_id" | "item_id" | "name") => id_schema(),
        ("path", "order_id" | "topup_id" | "credit_id") => uuid_schema(),
        ("path", "node_id") => {
            json!({"type": "integer", "format": "uint64", "minimum": 1, "maximum": u64::MAX})
        }
        ("path", "key") | ("header", "Idempotency-Key") => json!({
            "type": "string",
            "pattern": KEY_PATTERN,
            "minLength": 1,
            "maxLength": MAX_IDEMPOTENCY_KEY_LEN,
        }),
        ("query", "status") => json!({"type": "string", "enum": ORDER_STATUSES}),
        _ => return None,
    })
}

fn describe_parameters(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let operations = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut());
    for operation in operations {
        let Some(parameters) = operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for parameter in parameters.iter_mut().filter_map(Value::as_object_mut) {
            let location = parameter.get("in").and_then(Value::as_str).unwrap_or("");
            let name = parameter.get("name").and_then(Value::as_str).unwrap_or("");
            if let Some(schema) = parameter_schema(location, name) {
                parameter.insert("schema".to_owned(), schema);
            }
        }
    }
}

/// Money as a decimal string: requests take `-?`-less decimals with at most the currency's decimals, up
/// to the largest amount; `positive` leaves out every spelling of zero. Responses always carry exactly
/// the currency's decimals.
fn money_pattern(currency: &Currency, rule: Money) -> String {
    let e = currency.exponent() as usize;
    let fraction = |n: usize| {
        if e == 0 {
            String::new()
        } else {
            format!("(\\.[0-9]{{1,{n}}})?")
        }
    };
    let max = if e == 0 {
        "1000000".to_owned()
    } else {
        format!("1000000(\\.0{{1,{e}}})?")
    };
    match rule {
        Money::Response if e == 0 => "^[0-9]+$".to_owned(),
        Money::Response => format!("^[0-9]+\\.[0-9]{{{e}}}$"),
        Money::NonNegative => format!("^((0|[1-9][0-9]{{0,5}}){}|{max})$", fraction(e)),
        Money::Positive => {
            // Below one: "0." and a fraction with a non-zero digit, written without look-ahead.
            let below_one: Vec<String> = (0..e)
                .map(|zeros| format!("0{{{zeros}}}[1-9][0-9]{{0,{}}}", e - 1 - zeros))
                .collect();
            let below_one = if below_one.is_empty() {
                String::new()
            } else {
                format!("|0\\.({})", below_one.join("|"))
            };
            format!("^([1-9][0-9]{{0,5}}{}{below_one}|{max})$", fraction(e))
        }
    }
}

#[derive(Clone, Copy)]
enum Money {
    Positive,
    NonNegative,
    Response,
}

/// Extra keywords for one property of one schema, from the checks the handlers make.
fn property_facts(schema: &str, property: &str) -> Option<Value> {
    let text = |max: usize| json!({"maxLength": max, "pattern": TEXT_PATTERN});
    let lines = json!({"minItems": 1, "maxItems": MAX_LINES});
    Some(match (schema, property) {
        ("CreateTokenRequest", "ttl_seconds") => {
            json!({"minimum": 1, "maximum": crate::http::auth::MAX_TOKEN_TTL_SECONDS})
        }
        ("LineInput", "quantity") => json!({"minimum": 1, "maximum": MAX_QUANTITY}),
        ("ConsumeRequest", "quantity") => {
            json!({"minimum": 1, "maximum": entitlements::MAX_CONSUME_QUANTITY})
        }
        ("PutItemRequest", "refund_window_days") => json!({"maximum": MAX_REFUND_WINDOW_DAYS}),
        ("PutItemRequest", "name") => json!({
            "minLength": 1, "maxLength": MAX_ITEM_NAME_CHARS, "pattern": NON_BLANK_TEXT_PATTERN,
        }),
        ("CreateUserRequest", "display_name") => text(MAX_DISPLAY_NAME_CHARS),
        ("FreezeRequest", "reason") => json!({
            "minLength": 1,
            "maxLength": crate::domain::model::MAX_FREEZE_REASON_CHARS,
            "pattern": NON_BLANK_TEXT_PATTERN,
        }),
        ("RefundRequest", "reason") => text(MAX_REASON_CHARS),
        ("CreditRequest", "source") => text(MAX_SOURCE_CHARS),
        ("CreateOrderRequest" | "RefundRequest", "lines") => lines,
        ("CreditRequest" | "ReversalRequest", "external_ref")
        | ("WebhookRequest", "event_id" | "psp_payment_id" | "dispute_id") => {
            json!({"minLength": 1, "maxLength": MAX_EXTERNAL_REF_LEN, "pattern": EXTERNAL_REF_PATTERN})
        }
        ("AddNodeRequest", "node_id") => json!({"minimum": 1}),
        ("AddNodeRequest", "address") => json!({"pattern": ADDRESS_PATTERN}),
        ("ErrorDetail", "code") => json!({"enum": ERROR_CODES.as_slice()}),
        ("OrderResponse" | "HistoryResponse", "status") => json!({"enum": ORDER_STATUSES}),
        ("TopupResponse", "status") => json!({"enum": TOPUP_STATUSES}),
        ("CreditResponse" | "RefundResponse", "status") => json!({"enum": ["COMPLETED"]}),
        (
            "PutItemRequest" | "ItemResponse" | "OrderLineResponse" | "EntitlementResponse",
            "kind",
        ) => json!({"enum": ITEM_KINDS}),
        ("LedgerEntry", "kind") => json!({"enum": POSTING_KINDS}),
        ("EntryRef", "type") => json!({"enum": REFERENCE_KINDS}),
        ("HistoryResponse", "reason") => json!({"enum": CANCEL_REASONS}),
        ("WebhookRequest", "type") => json!({"enum": WEBHOOK_TYPES}),
        ("WebhookRequest", "outcome") => json!({"enum": ["won", "lost"]}),
        ("ReversalRequest" | "ReversalResponse", "reason") => json!({"enum": REVERSAL_REASONS}),
        ("ReversalResponse", "status") => json!({"enum": ["COMPLETED"]}),
        ("ReversalSourceResponse", "type") => json!({"enum": ["credit", "topup"]}),
        ("DisputeResponse", "status") => json!({"enum": ["OPEN", "WON", "LOST"]}),
        ("ClusterResponse", "mode") => json!({"enum": ["single", "cluster"]}),
        ("ClusterShard", "role") => json!({"enum": SHARD_ROLES}),
        ("ClusterShard", "recovery") => json!({"enum": RECOVERY_STATES}),
        _ => return None,
    })
}

/// Keywords every property of this name has, wherever it is.
fn convention_facts(schema: &str, property: &str, currency: &Currency) -> Option<Value> {
    if property == "at" || property.ends_with("_at") {
        return Some(json!({"format": "date-time"}));
    }
    if SERVER_IDS.contains(&property) {
        return Some(json!({"format": "uuid"}));
    }
    if matches!(property, "user_id" | "item_id") {
        return Some(json!({"pattern": ID_PATTERN, "minLength": 1, "maxLength": MAX_ID_LEN}));
    }
    if MONEY.contains(&property) {
        let rule = match (schema.ends_with("Request"), property) {
            (false, _) => Money::Response,
            (true, "amount") => Money::Positive,
            (true, _) => Money::NonNegative,
        };
        return Some(json!({"pattern": money_pattern(currency, rule)}));
    }
    None
}

fn describe_schemas(doc: &mut Value, currency: &Currency) {
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for (name, schema) in schemas.iter_mut() {
        let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
            continue;
        };
        for (property, definition) in properties.iter_mut() {
            if let Some(whole) = limit_schema(name, property, currency) {
                *definition = whole;
                continue;
            }
            let facts = [
                convention_facts(name, property, currency),
                property_facts(name, property),
            ];
            for fact in facts.into_iter().flatten() {
                merge(definition, fact);
            }
        }
    }
}

/// The whole schema of a limit's property (`routes::limits`): a value, `null` (no limit) or, where a
/// level is set, `"default"`.
fn limit_schema(schema: &str, property: &str, currency: &Currency) -> Option<Value> {
    let setting = matches!(schema, "LimitsRequest" | "LimitSettingsResponse");
    let value = match (schema, property) {
        ("LimitsRequest", "max_spend_per_day") => {
            json!({"type": "string", "pattern": money_pattern(currency, Money::NonNegative)})
        }
        (_, "max_spend_per_day" | "spent_today") if schema.ends_with("Response") => {
            json!({"type": "string", "pattern": money_pattern(currency, Money::Response)})
        }
        (
            "LimitsRequest" | "LimitSettingsResponse" | "LimitsResponse",
            "max_orders_per_hour" | "max_pending_topups" | "max_refunds_per_30_days",
        ) => json!({
            "type": "integer", "minimum": 0, "maximum": crate::domain::limits::MAX_LIMIT_COUNT,
        }),
        _ => return None,
    };
    if property == "spent_today" {
        return Some(value);
    }
    let mut choices = vec![value, json!({"type": "null"})];
    if setting {
        choices.push(json!({"type": "string", "enum": ["default"]}));
    }
    Some(json!({"oneOf": choices}))
}

/// Request bodies as `input::Body::json` reads them: an object that refuses unknown fields, and an empty
/// body reads as `{}`, so a body is required only when its schema requires a field.
fn describe_request_bodies(doc: &mut Value) {
    let mut optional = Vec::new();
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (name, schema) in schemas.iter_mut() {
            let Some(schema) = schema.as_object_mut() else {
                continue;
            };
            if !(name.ends_with("Request") || name == "LineInput") {
                continue;
            }
            schema.insert("additionalProperties".to_owned(), Value::Bool(false));
            let requires = schema
                .get("required")
                .and_then(Value::as_array)
                .is_some_and(|r| !r.is_empty());
            if !requires {
                optional.push(format!("#/components/schemas/{name}"));
            }
        }
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let bodies = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("requestBody"));
    for body in bodies {
        let reference = body
            .pointer("/content/application~1json/schema/$ref")
            .and_then(Value::as_str);
        if reference.is_some_and(|r| optional.iter().any(|o| o == r)) {
            body["required"] = Value::Bool(false);
        }
    }
}

/// Adds `facts` to a property's schema (not to a `$ref`, which describes itself).
fn merge(definition: &mut Value, facts: Value) {
    let (Some(target), Value::Object(facts)) = (definition.as_object_mut(), facts) else {
        return;
    };
    if target.contains_key("$ref") {
        return;
    }
    let nullable = is_nullable(target);
    for (key, mut value) in facts {
        if key == "enum" && nullable {
            if let Some(values) = value.as_array_mut() {
                values.push(Value::Null);
            }
        }
        target.insert(key, value);
    }
}

/// Whether a property's type admits `null` (OpenAPI 3.1: `"type": ["string", "null"]`).
fn is_nullable(schema: &Map<String, Value>) -> bool {
    schema
        .get("type")
        .and_then(Value::as_array)
        .is_some_and(|types| types.iter().any(|t| t == "null"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_patterns_follow_the_currency() {
        let eur = Currency::eur();
        assert_eq!(
            money_pattern(&eur, Money::Positive),
            "^([1-9][0-9]{0,5}(\\.[0-9]{1,2})?|0\\.(0{0}[1-9][0-9]{0,1}|0{1}[1-9][0-9]{0,0})|1000000(\\.0{1,2})?)$"
        );
        assert_eq!(
            money_pattern(&eur, Money::NonNegative),
            "^((0|[1-9][0-9]{0,5})(\\.[0-9]{1,2})?|1000000(\\.0{1,2})?)$"
        );
        assert_eq!(money_pattern(&eur, Money::Response), "^[0-9]+\\.[0-9]{2}$");
    }
}
