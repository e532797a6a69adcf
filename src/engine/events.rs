//! The event feed: every shard's outbox read after a cursor (a position per shard), merged into one page,
//! and long-polled until an event arrives or the wait ends.
//!
//! A cursor is opaque to clients: `e1.` and the base64url of the postcard list of every shard's position
//! (the seq of the last event already read). It depends only on replicated state, so it stays valid
//! across restarts and leader changes, and reading with the same cursor twice gives the same events
//! (unless they were purged meanwhile).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::try_join_all;

use super::{Consistency, EngineError, Node};
use crate::domain::{Event, EventType};
use crate::state::query;

/// Most events one page holds.
pub const MAX_PAGE: usize = 1000;
/// Longest long poll.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// With a type filter, a shard's scan looks at no more than this many events per event asked for (the
/// cursor still moves past what it looked at, so a sparse type is found over a few pages, never by
/// reading a whole outbox in one request).
const SCAN_PER_EVENT: usize = 10;
/// Most long polls one node keeps waiting; a request beyond them is answered at once (as with `wait=0`).
pub const MAX_LONG_POLLS: usize = 256;
/// What every cursor starts with (its format's version).
const CURSOR_PREFIX: &str = "e1.";

/// Where a reader of the feed is: the seq of the last event it read, per shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventCursor {
    positions: Vec<u64>,
}

/// Why a cursor was refused.
#[derive(Debug, thiserror::Error)]
#[error("after is not a cursor of this shop's event feed")]
pub struct BadCursor;

impl EventCursor {
    /// Before the oldest retained event of every shard.
    pub fn start(shards: u32) -> EventCursor {
        EventCursor {
            positions: vec![0; shards as usize],
        }
    }

    pub fn decode(text: &str, shards: u32) -> Result<EventCursor, BadCursor> {
        let body = text.strip_prefix(CURSOR_PREFIX).ok_or(BadCursor)?;
        if body.len() > 8 * 1024 {
            return Err(BadCursor);
        }
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| BadCursor)?;
        let positions: Vec<u64> = postcard::from_bytes(&bytes).map_err(|_| BadCursor)?;
        if positions.len() != shards as usize {
            return Err(BadCursor);
        }
        Ok(EventCursor { positions })
    }

    pub fn encode(&self) -> String {
        let bytes = postcard::to_stdvec(&self.positions).unwrap_or_default();
        format!("{CURSOR_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// A cursor at these positions (one per shard).
    pub fn from_positions(positions: Vec<u64>) -> EventCursor {
        EventCursor { positions }
    }

    /// The seq of the last event read from `shard`.
    pub fn position(&self, shard: u32) -> u64 {
        self.positions.get(shard as usize).copied().unwrap_or(0)
    }
}

/// One event of the feed, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEvent {
    pub shard: u32,
    pub seq: u64,
    pub event: Event,
}

/// A page of the feed and the cursor after it.
pub struct FeedPage {
    pub events: Vec<FeedEvent>,
    pub next: EventCursor,
}

/// What a reader asks of the feed.
pub struct FeedQuery {
    pub after: EventCursor,
    pub limit: usize,
    /// `None`: every type.
    pub types: Option<Vec<EventType>>,
    pub wait: Duration,
}

impl Node {
    /// Changes whenever `shard` applied something here (or installed a snapshot).
    pub fn shard_applied_changes(&self, shard: u32) -> tokio::sync::watch::Receiver<u64> {
        match self.shard_applied.get(shard as usize) {
            Some(applied) => applied.subscribe(),
            None => self.applied.subscribe(),
        }
    }

    /// A page of the feed after `query.after`; when there is none yet, waits up to `query.wait` for one.
    /// The first read is as fresh as `consistency` asks; later ones (after new applies) are this node's
    /// replica, which is then at least as fresh.
    pub async fn events(
        &self,
        consistency: Consistency,
        query: FeedQuery,
    ) -> Result<FeedPage, EngineError> {
        let permit = self.long_polls.try_acquire().ok();
        let wait = if permit.is_some() {
            query.wait.min(MAX_WAIT)
        } else {
            Duration::ZERO
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut applied = self.applied.subscribe();
        let (mut after, mut consistency) = (query.after, consistency);
        loop {
            applied.borrow_and_update();
            let page = self
                .events_page(consistency, &after, query.limit, query.types.as_deref())
                .await?;
            if !page.events.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(page);
            }
            after = page.next;
            consistency = Consistency::Local;
            tokio::select! {
                changed = applied.changed() => if changed.is_err() {
                    return Ok(FeedPage { events: Vec::new(), next: after });
                },
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// One page: every shard's next events, merged by time (then shard, then seq), the first `limit`.
    async fn events_page(
        &self,
        consistency: Consistency,
        after: &EventCursor,
        limit: usize,
        types: Option<&[EventType]>,
    ) -> Result<FeedPage, EngineError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let max_scanned = if types.is_some() {
            limit.saturating_mul(SCAN_PER_EVENT)
        } else {
            limit
        };
        let scans = try_join_all((0..self.shard_count()).map(|shard| {
            let (position, types) = (after.position(shard), types.map(<[EventType]>::to_vec));
            self.read(consistency, shard, move |txn| {
                query::events_after(txn, position, limit, types.as_deref(), max_scanned)
            })
        }))
        .await?;
        Ok(merge(scans, limit, after))
    }
}

/// The first `limit` events of all shards' scans by time, and the cursor after them: a shard all of
/// whose events were taken moves to the end of its scan (past the events of other types it looked at);
/// one whose events were not all taken moves to its last event taken (each shard's events are in time
/// order, so what is taken of a shard is a prefix of its scan).
fn merge(scans: Vec<query::EventScan>, limit: usize, after: &EventCursor) -> FeedPage {
    let mut next = after.clone();
    let mut all: Vec<FeedEvent> = Vec::new();
    for (shard, scan) in (0u32..).zip(&scans) {
        for (seq, event) in &scan.events {
            all.push(FeedEvent {
                shard,
                seq: *seq,
                event: event.clone(),
            });
        }
    }
    all.sort_by_key(|e| (e.event.occurred_at, e.shard, e.seq));
    all.truncate(limit);
    for (shard, scan) in (0u32..).zip(&scans) {
        let taken = all.iter().filter(|e| e.shard == shard).count();
        let position = if taken == scan.events.len() {
            scan.scanned_through
        } else {
            all.iter()
                .filter(|e| e.shard == shard)
                .map(|e| e.seq)
                .max()
                .unwrap_or(after.position(shard))
        };
        if let Some(slot) = next.positions.get_mut(shard as usize) {
            *slot = position;
        }
    }
    FeedPage { events: all, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_as_it_was_written() {
        let cursor = EventCursor {
            positions: vec![0, 7, 1_000_000, u64::MAX],
        };
        let text = cursor.encode();
        assert!(text.starts_with("e1."));
        assert_eq!(EventCursor::decode(&text, 4).expect("decodes"), cursor);
    }

    #[test]
    fn a_cursor_of_another_shape_is_refused() {
        let text = EventCursor::start(8).encode();
        assert!(
            EventCursor::decode(&text, 4).is_err(),
            "another shard count"
        );
        assert!(EventCursor::decode("e1.!!", 8).is_err(), "not base64url");
        assert!(EventCursor::decode("x1.AA", 8).is_err(), "another prefix");
        assert!(EventCursor::decode("", 8).is_err());
    }
}
