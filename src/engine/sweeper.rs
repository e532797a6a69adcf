//! Background work of a node, always proposed as commands (state never changes outside `apply`): expire
//! pending orders and top-ups at their deadlines, purge idempotency outcomes past their retention (a walk
//! over each shard's records, a window per interval, proposing a purge where one is due) and
//! EXPIRED or FAILED top-ups past `--topup-retention` and events past `--event-retention`, and bring the catalog copies up to date after a
//! crash. Each shard's work is done by the node that leads
//! it, so a cluster sweeps each shard once, not once per node.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::coordinator::{CATALOG_HOME_SHARD, system_envelope};
use super::{Consistency, Node};
use crate::domain::{Command, Reply, Timestamp, command};
use crate::state::query;

/// Most orders (and top-ups, and idempotency records) one sweep command handles: bounds the transaction.
pub const SWEEP_LIMIT: u32 = 500;

/// Most idempotency records the walk looks at per shard and interval, and what one `PurgeIdempotency`
/// walks over. The walk reads only each record's retention, but each record's whole page: at scale that is
/// read traffic, so a look takes only the share of a shard's records that brings the walk round in
/// `WALK_ROUNDS` intervals (an hour at the default `--sweep-interval`), at least `WALK_MIN_WINDOW`.
pub const WALK_WINDOW: u32 = 4_000;

/// Fewest idempotency records the walk looks at per shard and interval.
pub const WALK_MIN_WINDOW: usize = 500;

/// In how many intervals the walk comes round a shard's records (while that takes no more than
/// `WALK_WINDOW` a look): an outcome is purged at most about that late.
pub const WALK_ROUNDS: u64 = 3_600;

/// How many records one look of the walk takes on a shard holding `records`.
pub fn walk_window(records: u64) -> usize {
    let share = usize::try_from(records / WALK_ROUNDS).unwrap_or(usize::MAX);
    share.clamp(WALK_MIN_WINDOW, WALK_WINDOW as usize)
}

/// How long an EXPIRED or FAILED top-up is kept after it became final, unless `--topup-retention` says
/// otherwise (the flag's default is this). Long enough for any late PSP event: a success that arrives
/// after the expiry still credits the top-up, which it can only while the top-up exists.
pub const TOPUP_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// The longest an event is kept, even for a webhook that has not acknowledged it.
pub const MAX_EVENT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// How often the webhooks' copies on every shard are compared with their home shard's.
const WEBHOOK_REPAIR_EVERY: Duration = Duration::from_secs(10);

/// How long what the sweeper purges is kept.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// EXPIRED and FAILED top-ups, after they became final (`--topup-retention`).
    pub topups: Duration,
    /// Events every webhook acknowledged (`--event-retention`; at most `MAX_EVENT_RETENTION` for the rest).
    pub events: Duration,
}

/// Sweeps every shard this node leads every `interval` until `stop` turns true.
pub async fn run(
    node: Arc<Node>,
    interval: Duration,
    retention: Retention,
    mut stop: watch::Receiver<bool>,
) {
    // The catalog's copies are checked once by whichever node leads the catalog's home shard (again
    // after the leadership moves to this node).
    let mut catalog_checked = false;
    let mut clock_agreed = true;
    let mut webhooks_checked = std::time::Instant::now();
    // Where each shard's walk over its idempotency records goes on (kept by whichever node walks it:
    // another leader starts over, which only costs reading).
    let mut walks: Vec<(String, String)> = vec![Default::default(); node.shard_count() as usize];
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        // A node whose clock disagrees with the cluster's would expire orders and top-ups by a wrong
        // time: it sweeps nothing until it agrees again (a correct member leads or forwards meanwhile).
        let agrees = watch_clock(&node, &mut clock_agreed);
        // A full disk refuses the sweep's commands anyway (and says so once): no retry every interval.
        if !agrees || node.cluster().disk_trouble().is_some() {
            continue;
        }
        let leads_catalog = node.cluster().is_leader(CATALOG_HOME_SHARD);
        if !leads_catalog {
            catalog_checked = false;
        } else if !catalog_checked {
            match node.repair_catalog().await {
                Ok(repaired) => {
                    catalog_checked = true;
                    if repaired > 0 {
                        tracing::info!(repaired, "catalog copies brought up to date");
                    }
                }
                Err(error) => tracing::warn!(%error, "catalog check failed; will retry"),
            }
        }
        if webhooks_checked.elapsed() >= WEBHOOK_REPAIR_EVERY {
            webhooks_checked = std::time::Instant::now();
            match node.repair_webhooks().await {
                Ok(0) => {}
                Ok(repaired) => tracing::info!(repaired, "webhook copies brought up to date"),
                Err(error) => tracing::warn!(%error, "webhook check failed; will retry"),
            }
            match node.repair_shop_limits().await {
                Ok(0) => {}
                Ok(repaired) => tracing::info!(repaired, "shop-wide limits brought up to date"),
                Err(error) => tracing::warn!(%error, "shop-wide limits check failed; will retry"),
            }
        }
        for shard in 0..node.shard_count() {
            if !node.cluster().is_leader(shard) {
                continue;
            }
            if let Err(error) = sweep_shard(&node, shard, retention.topups).await {
                tracing::warn!(shard, %error, "sweep failed; will retry");
            }
            if let Err(error) = purge_events(&node, shard, retention.events).await {
                tracing::warn!(shard, %error, "event purge failed; will retry");
            }
            if let Some(walk) = walks.get_mut(shard as usize) {
                if let Err(error) = walk_idempotency(&node, shard, walk).await {
                    tracing::warn!(shard, %error, "idempotency purge failed; will retry");
                }
            }
        }
    }
}

/// Publishes the clock verdict (metrics) and logs when it changes; returns whether the clock agrees.
fn watch_clock(node: &Node, agreed: &mut bool) -> bool {
    let verdict = node.cluster().clock_verdict();
    metrics::gauge!(crate::metrics::CLOCK_AGREES).set(if verdict.agrees { 1.0 } else { 0.0 });
    for (peer, offset_ms) in &verdict.offsets_ms {
        metrics::gauge!(crate::metrics::PEER_CLOCK_OFFSET, "peer" => peer.to_string())
            .set(*offset_ms as f64 / 1000.0);
    }
    if verdict.agrees != *agreed {
        *agreed = verdict.agrees;
        if verdict.agrees {
            tracing::info!(
                ?verdict,
                "this node's clock agrees with the cluster's again: taking writes"
            );
        } else {
            tracing::warn!(
                ?verdict,
                "this node's clock disagrees with the cluster's: no writes, no sweeps until it agrees (check NTP)"
            );
        }
    }
    verdict.agrees
}

/// Proposes sweeps on `shard` while work is due (each sweep handles at most `SWEEP_LIMIT` of each kind).
/// The retention travels in the command, so every replica purges the same top-ups.
pub async fn sweep_shard(
    node: &Node,
    shard: u32,
    topup_retention: Duration,
) -> Result<(), super::EngineError> {
    let command = Command::SweepAndPurge(command::SweepAndPurge {
        limit: SWEEP_LIMIT,
        topup_retention_seconds: topup_retention.as_secs(),
    });
    loop {
        let now = Timestamp::now();
        if !node
            .read(Consistency::Local, shard, move |txn| {
                query::sweep_due(txn, now, topup_retention)
            })
            .await?
        {
            return Ok(());
        }
        let applied = node
            .propose(shard, system_envelope(command.clone()))
            .await?;
        if let Ok(Reply::SweptAndPurged {
            orders,
            topups,
            idempotency_records,
            purged_topups,
        }) = applied.outcome
        {
            tracing::debug!(
                shard,
                orders,
                topups,
                idempotency_records,
                purged_topups,
                "swept"
            );
            metrics::counter!(crate::metrics::EXPIRED_ORDERS).increment(u64::from(orders));
            metrics::counter!(crate::metrics::EXPIRED_TOPUPS).increment(u64::from(topups));
            metrics::counter!(crate::metrics::PURGED_IDEMPOTENCY_RECORDS)
                .increment(u64::from(idempotency_records));
            metrics::counter!(crate::metrics::PURGED_TOPUPS).increment(u64::from(purged_topups));
            let full = [orders, topups, idempotency_records, purged_topups].contains(&SWEEP_LIMIT);
            if !full {
                return Ok(());
            }
        } else {
            return Ok(());
        }
    }
}

/// The event purge the sweeper proposes for `retention` (`--event-retention`): at most `SWEEP_LIMIT`
/// events, those past `retention` that every webhook acknowledged and those past `MAX_EVENT_RETENTION`.
/// Both retentions travel in the command, so every replica purges the same events.
pub fn purge_events_command(retention: Duration) -> Command {
    Command::PurgeEvents(command::PurgeEvents {
        retention_seconds: retention.as_secs(),
        max_retention_seconds: MAX_EVENT_RETENTION.as_secs(),
        limit: SWEEP_LIMIT,
    })
}

/// Proposes event purges on `shard` while its oldest event is due (`purge_events_command`, each purging
/// at most `SWEEP_LIMIT`).
pub async fn purge_events(
    node: &Node,
    shard: u32,
    retention: Duration,
) -> Result<(), super::EngineError> {
    let command = purge_events_command(retention);
    loop {
        let now = Timestamp::now();
        if !node
            .read(Consistency::Local, shard, move |txn| {
                query::events_purge_due(txn, now, retention, MAX_EVENT_RETENTION)
            })
            .await?
        {
            return Ok(());
        }
        let applied = node
            .propose(shard, system_envelope(command.clone()))
            .await?;
        let Ok(Reply::EventsPurged { purged, dropped }) = applied.outcome else {
            return Ok(());
        };
        metrics::counter!(crate::metrics::PURGED_EVENTS).increment(u64::from(purged));
        metrics::counter!(crate::metrics::DROPPED_EVENTS).increment(u64::from(dropped));
        if dropped > 0 {
            tracing::warn!(
                shard,
                dropped,
                "events older than the longest retention were dropped before a webhook acknowledged them"
            );
        }
        if purged < SWEEP_LIMIT {
            return Ok(());
        }
    }
}

/// Looks at the next `walk_window` idempotency records of `shard` from `from` on, and proposes a
/// `PurgeIdempotency` from the first one past its retention (and once on a shard that does not walk yet,
/// which turns its retention index off); goes on while a purge removes a full `SWEEP_LIMIT`. Leaves
/// `from` where the next look starts (the first record again after the last).
pub async fn walk_idempotency(
    node: &Node,
    shard: u32,
    from: &mut (String, String),
) -> Result<(), super::EngineError> {
    loop {
        let now = Timestamp::now();
        let start = from.clone();
        let look = node
            .read(Consistency::Local, shard, move |txn| {
                query::idempotency_walk(txn, (&start.0, &start.1), now, walk_window)
            })
            .await?;
        let purge_from = match look.first_due {
            Some(due) => due,
            None if !look.walking => from.clone(),
            None => {
                *from = look.after_window.unwrap_or_default();
                return Ok(());
            }
        };
        let command = Command::PurgeIdempotency(command::PurgeIdempotency {
            from_scope: purge_from.0,
            from_key: purge_from.1,
            scan: WALK_WINDOW,
            limit: SWEEP_LIMIT,
        });
        let applied = node.propose(shard, system_envelope(command)).await?;
        let Ok(Reply::IdempotencyPurged { purged, next }) = applied.outcome else {
            return Ok(());
        };
        metrics::counter!(crate::metrics::PURGED_IDEMPOTENCY_RECORDS).increment(u64::from(purged));
        *from = next.unwrap_or_default();
        if purged < SWEEP_LIMIT {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_takes_a_share_of_a_shards_records_within_its_bounds() {
        assert_eq!(walk_window(0), WALK_MIN_WINDOW);
        assert_eq!(walk_window(1_000_000), WALK_MIN_WINDOW);
        assert_eq!(walk_window(3_600_000), 1_000);
        assert_eq!(walk_window(100_000_000), WALK_WINDOW as usize);
    }
}
