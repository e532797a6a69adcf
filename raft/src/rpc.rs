//! The node-to-node wire: every message between nodes is one `POST /_node/v1/call` whose body is a
//! postcard [`NodeRequest`] and whose answer is a postcard [`NodeResponse`]. The caller proves it is a
//! member with a per-request MAC (see [`crate::auth`]); the HTTP layer checks it before anything here
//! runs.

use std::collections::BTreeMap;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::{Payload, TypeConfig};

/// The one path of node traffic.
pub const CALL_PATH: &str = "/_node/v1/call";
/// The largest node message accepted: an append of `max_payload_entries` full-size commands, or one
/// snapshot chunk, fits well inside it.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum NodeRequest {
    Append {
        shard: u32,
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    Vote {
        shard: u32,
        rpc: VoteRequest<u64>,
    },
    InstallSnapshot {
        shard: u32,
        rpc: InstallSnapshotRequest<TypeConfig>,
    },
    /// A command forwarded to the node that leads `shard`.
    Write {
        shard: u32,
        command: Payload,
    },
    /// Asks the leader of `shard` for the index a linearizable read must wait for.
    ReadIndex {
        shard: u32,
    },
    /// A membership change, run by the leader of `shard`.
    ChangeMembership {
        shard: u32,
        change: MembershipChange,
    },
    /// Asks a pristine node to initialise `shard` with these voters (cluster formation).
    Initialize {
        shard: u32,
        members: BTreeMap<u64, String>,
    },
    /// Who are you, and have you joined a cluster yet?
    Probe,
    /// From the node forming a new cluster to a pristine peer: its first elections need you.
    Forming,
    /// From a node rebuilding `shard` to the shard's leader: your term and last log index, once a
    /// quorum confirmed you lead (see `cluster::rebuild`).
    Floor {
        shard: u32,
    },
    /// From the leader of `shard`, whose disk is full, to a voter: stand for election now (see
    /// `cluster::handoff`).
    TakeLeadership {
        shard: u32,
    },
}

impl NodeRequest {
    /// The kind of call, as the node-call metrics label it. An append without entries (a heartbeat,
    /// or a leader telling a follower how far the log is committed) is a `heartbeat`.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeRequest::Append { rpc, .. } if rpc.entries.is_empty() => "heartbeat",
            NodeRequest::Append { .. } => "append",
            NodeRequest::Vote { .. } => "vote",
            NodeRequest::InstallSnapshot { .. } => "snapshot",
            NodeRequest::Write { .. } => "write",
            NodeRequest::ReadIndex { .. } => "read_index",
            NodeRequest::ChangeMembership { .. } => "membership",
            NodeRequest::Initialize { .. } => "initialize",
            NodeRequest::Probe => "probe",
            NodeRequest::Forming => "forming",
            NodeRequest::Floor { .. } => "floor",
            NodeRequest::TakeLeadership { .. } => "take_leadership",
        }
    }

    /// Whether the call goes over the node stream to its callee (`crate::stream`): the frequent, small
    /// ones. Snapshot chunks and the rare calls of membership and formation are HTTP calls of their own.
    pub fn rides_stream(&self) -> bool {
        matches!(
            self,
            NodeRequest::Append { .. }
                | NodeRequest::Vote { .. }
                | NodeRequest::Write { .. }
                | NodeRequest::ReadIndex { .. }
        )
    }

    /// (shard, term) of a message only a leader sends: an append or a snapshot.
    pub fn from_leader_of_term(&self) -> Option<(u32, u64)> {
        match self {
            NodeRequest::Append { shard, rpc } => Some((*shard, rpc.vote.leader_id().term)),
            NodeRequest::InstallSnapshot { shard, rpc } => {
                Some((*shard, rpc.vote.leader_id().term))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum NodeResponse {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Written(Result<Payload, Refusal>),
    ReadIndex(Result<u64, Refusal>),
    Done(Result<(), Refusal>),
    Probe(Probe),
    /// (term, last log index) of the shard's confirmed leader.
    Floor(Result<(u64, u64), Refusal>),
    /// This node lost its data and is rebuilding `shard`: it takes no part yet (see
    /// `cluster::rebuild`).
    Rebuilding {
        shard: u32,
    },
    /// This node's disk is full: it takes no snapshot of `shard` now (retried after a back-off, as
    /// an unreachable node is).
    DiskFull {
        shard: u32,
    },
}

/// Why a node did not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("not the leader of this shard (leader: {leader:?})")]
    NotLeader { leader: Option<(u64, String)> },
    #[error("overloaded")]
    Overloaded,
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("rejected: {0}")]
    Rejected(String),
    /// A write was proposed but not committed before the deadline: it may still be (new at the end, so
    /// the variants before it keep their encoding).
    #[error("shard {shard}: the write was not committed in time; its outcome is unknown")]
    OutcomeUnknown { shard: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Adds `node` as a learner (or updates its address) and waits until it has caught up.
    AddLearner { node: u64, addr: String },
    /// Makes `node` (already a learner) a voter.
    Promote { node: u64 },
    /// Removes `node` from the voters and the learners.
    Remove { node: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub node_id: u64,
    pub shards: u32,
    /// Whether any of its shards has a log or a vote (it is, or was, part of a cluster).
    pub initialized: bool,
}

/// Reads a request body (the caller is authenticated already).
pub fn decode_request(body: &[u8]) -> Result<NodeRequest, postcard::Error> {
    crate::decode(body)
}

pub fn encode_response(response: &NodeResponse) -> Result<Vec<u8>, postcard::Error> {
    crate::encode(response)
}
