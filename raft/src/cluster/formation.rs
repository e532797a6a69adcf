//! Forming the cluster: a single node initialises its shards at once; in a cluster, the peers are
//! probed until a majority is reachable, and each shard is initialised on its preferred node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{InitializeError, RaftError};

use super::{Cluster, NodeId, fatal};
use crate::rpc::{NodeRequest, NodeResponse, Refusal};

/// How often a node that is not yet part of a cluster probes its peers again.
const PROBE_EVERY: Duration = Duration::from_millis(500);

impl Cluster {
    /// Forms the cluster if it has not been: a single node initialises its shards at once; in a
    /// cluster, formation runs in the background until a majority of the peers is reachable.
    pub async fn form(self: &Arc<Self>) {
        if self.config.peers.len() == 1 {
            for shard in 0..self.shard_count() {
                if let Err(refusal) = self
                    .initialize_local(shard, self.config.peers.clone())
                    .await
                {
                    tracing::error!(shard, %refusal, "cannot initialise the shard");
                }
            }
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move { cluster.form_in_background().await });
    }

    pub(super) async fn any_initialized(&self) -> bool {
        for replica in &self.replicas {
            if replica.raft.is_initialized().await.unwrap_or(true) {
                return true;
            }
        }
        false
    }

    /// Exactly one initialisation: only a node that sees a majority of pristine peers, none of them
    /// initialised and itself the lowest id among them, initialises; each shard on its preferred node.
    /// A node restoring from a backup (`trust_empty_shards`) never does.
    /// (Two nodes initialising with the same members, which a race can cause, is safe in openraft.)
    async fn form_in_background(self: Arc<Self>) {
        let me = self.config.node_id;
        let majority = self.config.peers.len() / 2 + 1;
        let mut rounds_with_majority = 0u32;
        let mut waiting_for_restored = false;
        loop {
            if self.any_initialized().await {
                tracing::info!("this node is part of a cluster");
                return;
            }
            let mut reachable = BTreeSet::from([me]);
            let mut joined = false;
            for (&id, addr) in self.config.peers.iter().filter(|(id, _)| **id != me) {
                match self
                    .transport
                    .call(addr, &NodeRequest::Probe, Duration::from_secs(1))
                    .await
                {
                    Ok(NodeResponse::Probe(probe)) if probe.node_id == id => {
                        if probe.shards != self.shard_count() {
                            tracing::error!(
                                peer = id,
                                theirs = probe.shards,
                                ours = self.shard_count(),
                                "peer has a different shard count; not forming a cluster with it"
                            );
                            continue;
                        }
                        joined |= probe.initialized;
                        reachable.insert(id);
                    }
                    Ok(other) => tracing::warn!(peer = id, ?other, "unexpected probe answer"),
                    Err(error) => tracing::debug!(peer = id, %error, "peer not reachable yet"),
                }
            }
            if joined {
                tracing::info!("the cluster exists; waiting for its leaders to contact this node");
                return;
            }
            if self.config.trust_empty_shards {
                // Restored from one member's backup (`rebuild`): the cluster lives in that member's data.
                // Empty members that reach each other without it must not form a new, empty one (its
                // first terms would clash with the restored log's), so this node only ever waits.
                if !waiting_for_restored {
                    tracing::warn!(
                        "restoring from a backup: waiting for the member restored from it to lead; this \
                         node forms no new cluster"
                    );
                    waiting_for_restored = true;
                }
                tokio::time::sleep(PROBE_EVERY).await;
                continue;
            }
            if reachable.len() >= majority {
                // A new cluster: its first elections need this node's vote.
                self.lift_marks_for_new_cluster().await;
            }
            let everyone = reachable.len() == self.config.peers.len();
            if reachable.len() >= majority {
                rounds_with_majority += 1;
            }
            // With only a majority up, wait a little for the rest: each shard is then initialised on
            // its preferred node, and leaders start spread.
            let waited_enough = everyone || rounds_with_majority > 4;
            if reachable.len() >= majority && waited_enough && reachable.first() == Some(&me) {
                // Every pristine peer takes part in the first elections (see `rebuild`); without a
                // majority that does, the shards could elect no leader, so nothing is initialised.
                let mut joined_formation = 1;
                for (&id, addr) in self.config.peers.iter() {
                    if id != me && reachable.contains(&id) {
                        let answer = self
                            .transport
                            .call(addr, &NodeRequest::Forming, Duration::from_secs(2))
                            .await;
                        if matches!(answer, Ok(NodeResponse::Done(Ok(())))) {
                            joined_formation += 1;
                        } else {
                            tracing::warn!(peer = id, ?answer, "peer did not join the formation");
                        }
                    }
                }
                if joined_formation < majority {
                    tokio::time::sleep(PROBE_EVERY).await;
                    continue;
                }
                tracing::info!(members = ?self.config.peers.keys(), "forming the cluster");
                for shard in 0..self.shard_count() {
                    let preferred = preferred_node(&self.config.peers, shard);
                    let members = self.config.peers.clone();
                    let remote = if preferred != me && reachable.contains(&preferred) {
                        let addr = self.transport.address_of(preferred, "");
                        let request = NodeRequest::Initialize {
                            shard,
                            members: members.clone(),
                        };
                        matches!(
                            self.transport
                                .call(&addr, &request, Duration::from_secs(5))
                                .await,
                            Ok(NodeResponse::Done(Ok(())))
                        )
                    } else {
                        false
                    };
                    if !remote {
                        if let Err(refusal) = self.initialize_local(shard, members).await {
                            tracing::error!(shard, %refusal, "cannot initialise the shard");
                        }
                    }
                }
                return;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    pub(super) async fn initialize_local(
        &self,
        shard: u32,
        members: BTreeMap<NodeId, String>,
    ) -> Result<(), Refusal> {
        let replica = self.replica(shard)?;
        // Asked of an initialised shard (every restart of a single node), openraft refuses and logs
        // the refusal at ERROR: an operator would read a fault into every restart.
        if replica.raft.is_initialized().await.map_err(fatal)? {
            return Ok(());
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id, BasicNode::new(addr)))
            .collect();
        match replica.raft.initialize(nodes).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(other)) => Err(Refusal::Rejected(other.to_string())),
            Err(RaftError::Fatal(error)) => Err(fatal(error)),
        }
    }
}

/// The node that initialises `shard` and stands first for election in it.
fn preferred_node(peers: &BTreeMap<NodeId, String>, shard: u32) -> NodeId {
    let ids: Vec<NodeId> = peers.keys().copied().collect();
    ids[shard as usize % ids.len()]
}
