//! A member whose disk is full hands the shards it leads to a healthy member.
//!
//! A leader that cannot write cannot take a write either: while its disk is full (`disk`) every write
//! of its shards would be refused with 503, although the other members could take them. openraft 0.9
//! has no leadership transfer, so the full leader asks the voter that has replicated the most of the
//! shard's log to stand for election now ([`NodeRequest::TakeLeadership`]); that member's higher term
//! deposes it. Meanwhile the full member stands for no election itself (its votes still count, once
//! its disk takes them). It stands again once its disk is written again.
//!
//! The member asked refuses if its own disk is full, if it is rebuilding the shard, or if its clock
//! disagrees with the members' (a leader stamps the time of commands, see `clock`).

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::Cluster;
use crate::rpc::{NodeRequest, NodeResponse, Refusal};

/// How often the member checks its disk and what it leads.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a hand-off call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs until the cluster is dropped: stands down while the disk is full and hands off what it leads.
pub(super) async fn run_handoff(cluster: Weak<Cluster>) {
    let mut standing = true;
    let mut asked: Vec<Option<Instant>> = Vec::new();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let trouble = cluster.disk_trouble();
        if standing == trouble.is_some() {
            standing = trouble.is_none();
            cluster.stand_for_elections(standing);
        }
        let Some(why) = trouble else {
            continue;
        };
        asked.resize(cluster.shard_count() as usize, None);
        for (shard, last) in (0u32..).zip(asked.iter_mut()) {
            let due = last.is_none_or(|at| at.elapsed() >= cluster.config.election_timeout * 2);
            if due && cluster.is_leader(shard) {
                *last = Some(Instant::now());
                cluster.hand_off(shard, &why).await;
            }
        }
    }
}

impl Cluster {
    /// Lets every shard's replica stand for election (as its rebuild mark allows), or none.
    fn stand_for_elections(&self, stand: bool) {
        for (shard, replica) in (0u32..).zip(&self.replicas) {
            let allowed = stand && self.marks.get(shard).takes_part_in_elections();
            replica.raft.runtime_config().elect(allowed);
        }
        if stand {
            tracing::info!("the disk takes writes again: standing for elections");
        } else {
            tracing::warn!("the disk is full: standing for no election until it takes writes");
        }
    }

    /// Asks the most caught-up other voter of `shard` to take its leadership; the first that accepts.
    async fn hand_off(&self, shard: u32, why: &str) {
        let Ok(replica) = self.replica(shard) else {
            return;
        };
        let mut candidates: Vec<(u64, u64)> = {
            let metrics = replica.raft.metrics();
            let metrics = metrics.borrow();
            let matched = metrics.replication.clone().unwrap_or_default();
            metrics
                .membership_config
                .membership()
                .voter_ids()
                .filter(|id| *id != self.config.node_id)
                .map(|id| {
                    let index = matched.get(&id).copied().flatten().map_or(0, |l| l.index);
                    (index, id)
                })
                .collect()
        };
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        for (matched, id) in candidates {
            let addr = self.transport.address_of(id, "");
            let request = NodeRequest::TakeLeadership { shard };
            match self.transport.call(&addr, &request, CALL_TIMEOUT).await {
                Ok(NodeResponse::Done(Ok(()))) => {
                    tracing::warn!(shard, to = id, matched, %why, "handed the shard's leadership over");
                    return;
                }
                Ok(other) => tracing::info!(shard, to = id, answer = ?other, "hand-off refused"),
                Err(error) => tracing::info!(shard, to = id, %error, "hand-off not delivered"),
            }
        }
    }

    /// Answers a full leader's [`NodeRequest::TakeLeadership`]: stands for election now, if fit to lead.
    pub(super) async fn take_leadership(&self, shard: u32) -> Result<(), Refusal> {
        let replica = self.replica(shard)?;
        if let Some(why) = self.disk_trouble() {
            return Err(Refusal::Unavailable(why));
        }
        if !self.marks.get(shard).takes_part_in_elections() {
            return Err(Refusal::Unavailable("rebuilding the shard".into()));
        }
        if !self.clock_verdict().agrees {
            return Err(Refusal::Unavailable(
                "this node's clock disagrees with the members'".into(),
            ));
        }
        replica
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))
    }
}
