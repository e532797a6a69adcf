//! Membership changes (add a learner, promote it to voter, remove a member), applied to every shard
//! one at a time on each shard's leader.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};

use super::{Cluster, ClusterError, NodeId, fatal, not_leader};
use crate::rpc::{MembershipChange, NodeRequest, NodeResponse, Refusal};

/// How long a change waits before it tries again while the shard's previous change is not committed yet
/// (openraft refuses a change then, e.g. a promotion right after the add, which answers once the learner
/// caught up, not once its entry is committed).
const IN_PROGRESS_RETRY: Duration = Duration::from_millis(20);

/// How long a node being added has to answer the check of who it is.
const NEWCOMER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Cluster {
    /// Applies a membership change to every shard, one shard at a time, on each shard's leader; then
    /// waits until this node's replicas hold it too, so that what this node tells next (its cluster
    /// view) shows the change.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), ClusterError> {
        let _serialised = self.membership_lock.lock().await;
        if let MembershipChange::AddLearner { node, addr } = &change {
            self.check_newcomer(*node, addr).await?;
            self.transport.remember(*node, addr);
        }
        for shard in 0..self.shard_count() {
            self.on_leader(
                shard,
                || self.change_membership_local(shard, change.clone()),
                || NodeRequest::ChangeMembership {
                    shard,
                    change: change.clone(),
                },
                |response| match response {
                    NodeResponse::Done(result) => Some(result),
                    _ => None,
                },
            )
            .await?;
        }
        let removed_itself =
            matches!(change, MembershipChange::Remove { node } if node == self.config.node_id);
        if !removed_itself {
            self.hold_every_change().await;
        }
        Ok(())
    }

    /// Waits until this node's replica of every shard holds what its leader committed. The change is
    /// made either way: a shard that cannot confirm it in time is only logged (this node's view of it
    /// then lags until its next append).
    async fn hold_every_change(&self) {
        for shard in 0..self.shard_count() {
            if let Err(error) = self.read_barrier(shard).await {
                tracing::warn!(shard, %error, "the membership change is made; this node does not hold it yet");
            }
        }
    }

    /// Refuses to add `node` when the node answering at `addr` is another one, or splits users over another
    /// number of shards (its shard N would hold other users than the cluster's shard N). A node that does
    /// not answer is not refused here: adding it waits for it as before.
    async fn check_newcomer(&self, node: NodeId, addr: &str) -> Result<(), ClusterError> {
        let answer = self
            .transport
            .call(addr, &NodeRequest::Probe, NEWCOMER_PROBE_TIMEOUT)
            .await;
        let Ok(NodeResponse::Probe(probe)) = answer else {
            return Ok(());
        };
        if probe.node_id != node {
            return Err(ClusterError::Rejected(format!(
                "the node at {addr} is node {}, not node {node}",
                probe.node_id
            )));
        }
        if probe.shards != self.shard_count() {
            return Err(ClusterError::Rejected(format!(
                "node {node} was created with {} shards and this cluster has {}: start it on an empty data \
                 directory with --shards {}",
                probe.shards,
                self.shard_count(),
                self.shard_count()
            )));
        }
        Ok(())
    }

    /// Applies `change` to `shard` here, on its leader, waiting out (until the deadline) a previous change
    /// of the shard that is not committed yet.
    pub(super) async fn change_membership_local(
        &self,
        shard: u32,
        change: MembershipChange,
    ) -> Result<(), Refusal> {
        let deadline = Instant::now() + self.config.deadline;
        loop {
            match self.change_membership_once(shard, change.clone()).await? {
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if Instant::now() < deadline => tokio::time::sleep(IN_PROGRESS_RETRY).await,
                Ok(()) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    return Err(not_leader(&self.transport, forward));
                }
                Err(RaftError::APIError(other)) => {
                    return Err(Refusal::Rejected(other.to_string()));
                }
                Err(RaftError::Fatal(error)) => return Err(fatal(error)),
            }
        }
    }

    /// One attempt of `change_membership_local`: a refusal decided here, or what openraft answered.
    async fn change_membership_once(
        &self,
        shard: u32,
        change: MembershipChange,
    ) -> Result<Result<(), RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>, Refusal> {
        let replica = self.replica(shard)?;
        let raft = &replica.raft;
        let membership = raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let members =
            |change| async move { raft.change_membership(change, false).await.map(|_| ()) };
        Ok(match change {
            MembershipChange::AddLearner { node, addr } => {
                self.transport.remember(node, &addr);
                if voters.contains(&node) {
                    return Ok(Ok(()));
                }
                raft.add_learner(node, BasicNode::new(addr), true)
                    .await
                    .map(|_| ())
            }
            MembershipChange::Promote { node } => {
                if voters.contains(&node) {
                    return Ok(Ok(()));
                }
                if !known.contains(&node) {
                    return Err(Refusal::Rejected(format!(
                        "node {node} is not a learner of shard {shard}; add it first"
                    )));
                }
                members(ChangeMembers::AddVoterIds(BTreeSet::from([node]))).await
            }
            MembershipChange::Remove { node } => {
                if !known.contains(&node) {
                    return Ok(Ok(()));
                }
                if voters.contains(&node) {
                    if voters.len() == 1 {
                        return Err(Refusal::Rejected("cannot remove the last voter".into()));
                    }
                    members(ChangeMembers::RemoveVoters(BTreeSet::from([node]))).await
                } else {
                    members(ChangeMembers::RemoveNodes(BTreeSet::from([node]))).await
                }
            }
        })
    }
}
