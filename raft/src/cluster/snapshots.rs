//! Asks each shard's Raft for a snapshot when the shard's cadence (`state_machine::SnapshotCadence`:
//! entries and log bytes since the last one) is due. The shards' Rafts run with
//! `SnapshotPolicy::Never`, so this is the only trigger besides a lost snapshot at open.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::Cluster;

/// How often a shard's cadence is looked at: a snapshot comes at most this late, and a request
/// repeated while one is being built is ignored by openraft.
pub(super) const CHECK_EVERY: Duration = Duration::from_millis(250);

pub(super) async fn run_snapshot_cadence(cluster: Weak<Cluster>, shard: u32) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(node) = cluster.upgrade() else {
            return;
        };
        let Some(replica) = node.replicas.get(shard as usize) else {
            return;
        };
        if !replica.cadence.due() {
            continue;
        }
        let (log_bytes, needed) = replica.cadence.log_bytes();
        tracing::debug!(shard, log_bytes, needed, "a snapshot is due");
        if replica.raft.trigger().snapshot().await.is_err() {
            // The shard's Raft stopped (the node is shutting down, or the shard failed).
            return;
        }
    }
}
