//! Background work of a node, always proposed as commands (state never changes outside `apply`): expire
//! pending orders and top-ups at their deadlines, purge idempotency outcomes past their retention, and
//! bring the catalog copies up to date after a crash. Each shard's work is done by the node that leads
//! it, so a cluster sweeps each shard once, not once per node.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::coordinator::{CATALOG_HOME_SHARD, system_envelope};
use super::{Consistency, Node};
use crate::domain::{Command, Reply, Timestamp};
use crate::state::query;

/// Most orders (and top-ups, and idempotency records) one sweep command handles: bounds the transaction.
pub const SWEEP_LIMIT: u32 = 500;

/// Sweeps every shard this node leads every `interval` until `stop` turns true.
pub async fn run(node: Arc<Node>, interval: Duration, mut stop: watch::Receiver<bool>) {
    // The catalog's copies are checked once by whichever node leads the catalog's home shard (again
    // after the leadership moves to this node).
    let mut catalog_checked = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
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
        for shard in 0..node.shard_count() {
            if !node.cluster().is_leader(shard) {
                continue;
            }
            if let Err(error) = sweep_shard(&node, shard).await {
                tracing::warn!(shard, %error, "sweep failed; will retry");
            }
        }
    }
}

/// Proposes sweeps on `shard` while work is due (each sweep handles at most `SWEEP_LIMIT` of each kind).
pub async fn sweep_shard(node: &Node, shard: u32) -> Result<(), super::EngineError> {
    loop {
        let now = Timestamp::now();
        if !node
            .read_with(Consistency::Local, shard, move |txn| {
                query::sweep_due(txn, now)
            })
            .await?
        {
            return Ok(());
        }
        let applied = node
            .propose(
                shard,
                system_envelope(Command::Sweep { limit: SWEEP_LIMIT }),
            )
            .await?;
        if let Ok(Reply::Swept {
            orders,
            topups,
            idempotency_records,
        }) = applied.outcome
        {
            tracing::debug!(shard, orders, topups, idempotency_records, "swept");
            metrics::counter!("shopkeep_expired_orders_total").increment(u64::from(orders));
            metrics::counter!("shopkeep_expired_topups_total").increment(u64::from(topups));
            metrics::counter!("shopkeep_purged_idempotency_records_total")
                .increment(u64::from(idempotency_records));
            let full = orders == SWEEP_LIMIT
                || topups == SWEEP_LIMIT
                || idempotency_records == SWEEP_LIMIT;
            if !full {
                return Ok(());
            }
        } else {
            return Ok(());
        }
    }
}
