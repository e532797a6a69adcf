//! The event feed: `GET /v1/events` (admin, service), paged by an opaque cursor, long-polled with `wait`.

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::Response;

use crate::engine::events::{EventCursor, FeedQuery, MAX_PAGE, MAX_WAIT};
use crate::http::auth::Caller;
use crate::http::dto::{self, EventPage};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, ReadConsistency};
use crate::http::{AppState, render};

const DEFAULT_PAGE: usize = 100;

/// The events of every shard after a cursor, oldest first per shard (admin, service).
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(
        ("after" = Option<String>, Query, pattern = "^e1\\.[A-Za-z0-9_-]{1,8192}$", description = "next_cursor of the previous page; absent: from the oldest retained event"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1-1000, default 100"),
        ("wait" = Option<String>, Query, pattern = "^([0-9]|[12][0-9]|30)s?$", description = "0-30 seconds to wait for an event when there is none yet (long poll); default 0"),
        ("types" = Option<String>, Query, pattern = "^[a-z]+\\.[a-z]+(,[a-z]+\\.[a-z]+)*$", description = "comma-separated event types (user.created, order.completed, ...); absent: every type"),
    ),
    responses((status = 200, description = "A page of events", body = EventPage), (status = 400, description = "`invalid_request`", body = ErrorBody), (status = 403, description = "`forbidden`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_events(
    State(app): State<AppState>,
    caller: Caller,
    ReadConsistency(consistency): ReadConsistency,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let pairs = input::query_pairs(raw.as_deref())?;
    let shards = app.node.shard_count();
    let after = match input::param(&pairs, "after") {
        Some(text) => EventCursor::decode(text, shards)
            .map_err(|e| ApiError::invalid_request(e.to_string()))?,
        None => EventCursor::start(shards),
    };
    let query = FeedQuery {
        after,
        limit: input::limit(&pairs, DEFAULT_PAGE, MAX_PAGE)?,
        types: input::param(&pairs, "types")
            .map(|text| input::event_types(text.split(',').map(str::trim)))
            .transpose()?,
        wait: input::param(&pairs, "wait")
            .map(parse_wait)
            .transpose()?
            .unwrap_or(Duration::ZERO),
    };
    let bound = query.wait + app.config.request_timeout;
    let page = tokio::time::timeout(bound, app.node.events(consistency, query))
        .await
        .map_err(|_| ApiError::unavailable("the feed did not answer in time; retry"))??;
    let currency = &app.config.currency;
    Ok(render::ok(&EventPage {
        events: page
            .events
            .iter()
            .map(|e| dto::event(currency, e.shard, e.seq, &e.event))
            .collect(),
        next_cursor: page.next.encode(),
    }))
}

/// `wait=N` or `wait=Ns`: whole seconds from 0 to 30.
fn parse_wait(text: &str) -> Result<Duration, ApiError> {
    text.strip_suffix('s')
        .unwrap_or(text)
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
        .filter(|wait| *wait <= MAX_WAIT)
        .ok_or_else(|| ApiError::invalid_request("wait must be whole seconds from 0 to 30"))
}
