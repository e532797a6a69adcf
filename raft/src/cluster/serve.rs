//! Answering other nodes' calls (`serve_call`), and what this node tells about its replicas:
//! leadership, readiness (live leaders) and status.

use std::sync::atomic::Ordering;
use std::time::Instant;

use openraft::ServerState;
use openraft::error::RaftError;
use openraft::raft::VoteResponse;

use super::{Cluster, ClusterStatus, NodeId, ShardStatus};
use crate::rpc::{NodeRequest, NodeResponse, Probe, Refusal};

impl Cluster {
    /// Answers a call from another node (the HTTP layer has authenticated it), timed by its kind.
    pub async fn serve_call(&self, request: NodeRequest) -> NodeResponse {
        let kind = request.kind();
        let started = Instant::now();
        let response = self.answer_call(request).await;
        metrics::histogram!(crate::metrics::NODE_SERVE_SECONDS, "call" => kind)
            .record(started.elapsed().as_secs_f64());
        response
    }

    async fn answer_call(&self, request: NodeRequest) -> NodeResponse {
        if let Some((shard, term)) = request.from_leader_of_term() {
            if !self.marks.get(shard).admits_leader(term) {
                return NodeResponse::Rebuilding { shard };
            }
        }
        match request {
            NodeRequest::Append { shard, rpc } => NodeResponse::Append(match self.replica(shard) {
                Ok(replica) => {
                    let result = replica.raft.append_entries(rpc).await;
                    if result.is_ok() {
                        self.note_leader_contact(shard);
                    }
                    result
                }
                Err(_) => Err(RaftError::Fatal(openraft::error::Fatal::Stopped)),
            }),
            NodeRequest::Vote { shard, rpc } => NodeResponse::Vote(match self.replica(shard) {
                Ok(_) if !self.marks.get(shard).takes_part_in_elections() => {
                    tracing::info!(shard, candidate = %rpc.vote, "not voting: rebuilding lost data");
                    Ok(VoteResponse::new(openraft::Vote::default(), None, false))
                }
                Ok(replica) => replica.raft.vote(rpc).await,
                Err(_) => Err(RaftError::Fatal(openraft::error::Fatal::Stopped)),
            }),
            // openraft stops a shard whose snapshot chunk cannot be written: refuse it while full
            NodeRequest::InstallSnapshot { shard, .. } if self.disk_trouble().is_some() => {
                NodeResponse::DiskFull { shard }
            }
            NodeRequest::InstallSnapshot { shard, rpc } => {
                NodeResponse::InstallSnapshot(match self.replica(shard) {
                    Ok(replica) => replica.raft.install_snapshot(rpc).await,
                    Err(_) => Err(RaftError::Fatal(openraft::error::Fatal::Stopped)),
                })
            }
            NodeRequest::Write { shard, command } => {
                NodeResponse::Written(self.write_forwarded(shard, command).await)
            }
            NodeRequest::ReadIndex { shard } => {
                NodeResponse::ReadIndex(self.read_index_local(shard).await)
            }
            NodeRequest::ChangeMembership { shard, change } => {
                NodeResponse::Done(self.change_membership_local(shard, change).await)
            }
            NodeRequest::Initialize { shard, members } => {
                // The cluster is being formed: it is new, and its first elections need this vote.
                self.lift_marks_for_new_cluster().await;
                NodeResponse::Done(self.initialize_local(shard, members).await)
            }
            NodeRequest::Forming => {
                if self.any_initialized().await {
                    NodeResponse::Done(Err(Refusal::Rejected(
                        "this node is part of a cluster already".into(),
                    )))
                } else {
                    self.lift_marks_for_new_cluster().await;
                    NodeResponse::Done(Ok(()))
                }
            }
            NodeRequest::Floor { shard } => NodeResponse::Floor(self.floor_local(shard).await),
            NodeRequest::TakeLeadership { shard } => {
                NodeResponse::Done(self.take_leadership(shard).await)
            }
            NodeRequest::Probe => NodeResponse::Probe(Probe {
                node_id: self.config.node_id,
                shards: self.shard_count(),
                initialized: self.any_initialized().await,
            }),
        }
    }

    /// Whether `shard`'s membership names a node besides this one (a voter or a learner).
    pub fn has_other_members(&self, shard: u32) -> bool {
        self.replicas.get(shard as usize).is_some_and(|r| {
            let metrics = r.raft.metrics();
            let metrics = metrics.borrow();
            metrics
                .membership_config
                .membership()
                .nodes()
                .any(|(id, _)| *id != self.config.node_id)
        })
    }

    /// Whether this node currently leads `shard` (background work runs on leaders only).
    pub fn is_leader(&self, shard: u32) -> bool {
        self.replicas.get(shard as usize).is_some_and(|r| {
            let metrics = r.raft.metrics();
            let metrics = metrics.borrow();
            metrics.current_leader == Some(self.config.node_id)
                && metrics.state == ServerState::Leader
        })
    }

    fn note_leader_contact(&self, shard: u32) {
        if let Some(contact) = self.leader_contact.get(shard as usize) {
            let now = crate::millis(self.started.elapsed());
            contact.fetch_max(now.max(1), Ordering::Relaxed);
        }
    }

    /// Whether every shard has a leader that is alive as far as this node can tell: this node leads it
    /// and a quorum acknowledged it recently, or its leader reached this node recently ("recently":
    /// within two leader leases). A single voter is always its own live leader.
    pub fn is_ready(&self) -> bool {
        if self.disk_trouble().is_some() {
            return false;
        }
        let limit = crate::millis(self.config.election_timeout * 4);
        let now = crate::millis(self.started.elapsed());
        (0u32..).zip(&self.replicas).all(|(shard, replica)| {
            let metrics = replica.raft.metrics();
            let metrics = metrics.borrow();
            if metrics.running_state.is_err() || metrics.current_leader.is_none() {
                return false;
            }
            if metrics.membership_config.membership().voter_ids().count() <= 1
                && metrics.state == ServerState::Leader
            {
                return true;
            }
            if metrics.state == ServerState::Leader {
                return metrics
                    .millis_since_quorum_ack
                    .is_some_and(|ms| ms <= limit);
            }
            let contact = self.leader_contact[shard as usize].load(Ordering::Relaxed);
            contact > 0 && now.saturating_sub(contact) <= limit
        })
    }

    pub fn status(&self) -> ClusterStatus {
        let mut nodes = self.transport.peers();
        let mut members = std::collections::BTreeSet::new();
        let shards = (0u32..)
            .zip(&self.replicas)
            .map(|(shard, replica)| {
                let metrics = replica.raft.metrics().borrow().clone();
                let membership = metrics.membership_config.membership();
                for (id, node) in membership.nodes() {
                    members.insert(*id);
                    nodes.entry(*id).or_insert_with(|| node.addr.clone());
                }
                let voters: Vec<NodeId> = membership.voter_ids().collect();
                let learners: Vec<NodeId> = membership.learner_ids().collect();
                let last = metrics.last_log_index.unwrap_or(0);
                let lag = metrics
                    .replication
                    .as_ref()
                    .map(|replication| {
                        replication
                            .iter()
                            .filter(|(id, _)| **id != self.config.node_id)
                            .map(|(id, matched)| {
                                (*id, matched.map(|m| last.saturating_sub(m.index)))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let (snapshot_log_bytes, snapshot_at_log_bytes) = replica.cadence.log_bytes();
                ShardStatus {
                    shard,
                    role: match metrics.state {
                        ServerState::Leader => "leader",
                        ServerState::Follower => "follower",
                        ServerState::Candidate => "candidate",
                        ServerState::Learner => "learner",
                        ServerState::Shutdown => "shutdown",
                    },
                    leader: metrics.current_leader,
                    term: metrics.current_term,
                    last_log_index: metrics.last_log_index,
                    applied_index: metrics.last_applied.map(|_| replica.applied.get()),
                    snapshot_index: metrics.snapshot.map(|id| id.index),
                    snapshot_log_bytes,
                    snapshot_at_log_bytes,
                    voters,
                    learners,
                    lag,
                    recovery: self.marks.get(shard).label(),
                }
            })
            .collect();
        // Once the shards have members, a node none of them has (removed, or an initial peer never
        // added) is no longer part of the cluster, whatever the address book remembers.
        if !members.is_empty() {
            nodes.retain(|id, _| members.contains(id) || *id == self.config.node_id);
        }
        ClusterStatus {
            node_id: self.config.node_id,
            nodes,
            shards,
        }
    }
}
