//! `shopkeep-raft`: the openraft glue of shopkeep, and nothing about shops.
//!
//! A node hosts one Raft group per shard (multi-Raft). This crate owns everything between "here is an
//! opaque command for shard 3" and "it is committed on a majority and applied by every replica":
//!
//! - [`log_store`]: the node's Raft log in ONE redb file for all shards, written by one thread that
//!   groups the appends of every shard into one durable commit (one fsync), and an in-memory mirror
//!   of each shard's live log that openraft reads.
//! - [`state_machine`]: the adapter from openraft's `RaftStateMachine` to [`ReplicatedState`], the
//!   trait the application implements (apply a batch in one transaction, export, import), plus the
//!   snapshot files.
//! - [`network`]: node-to-node RPCs over HTTP with postcard bodies, authenticated per request ([`auth`]);
//!   [`peer_health`] reports a peer that stops answering once, not per failed call.
//! - [`cluster`]: the shards' Raft instances, cluster formation, forwarding writes to leaders,
//!   linearizable read barriers, membership changes and status; its `rebuild` part keeps a member that
//!   lost its data out of every quorum until it has caught up.
//!
//! - [`metrics`]: the names and descriptions of what it records for `/metrics`.
//! - [`batch`]: many commands in one log entry, so a shard's fsync, replication and apply serve many
//!   commands at once.
//!
//! Its redb files fail as every file of the node does: `shopkeep_faults::disk` (a fail-stop backend, a
//! full disk waited out), `shopkeep_faults::integrity` (verified at start, set aside when corrupt), with
//! the crash points of `shopkeep_faults::failpoints`.
//!
//! Commands and replies are opaque bytes: the application encodes them.

// openraft's `StorageError` is large; it is the trait's error type, so it is returned as it is.
#![allow(clippy::result_large_err)]

/// `d` in whole milliseconds, saturating (a duration beyond 584 million years is not one we meet).
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub mod auth;
pub mod batch;
pub mod clock;
pub mod cluster;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod peer_health;
pub mod rpc;
pub mod state_machine;
pub mod stream;

/// The openraft this crate is built on (for its test kit and types).
pub use openraft;
use serde::{Deserialize, Serialize};

pub use cluster::{
    Cluster, ClusterConfig, ClusterError, ClusterStatus, LeaderMove, NodeId, Rebalanced,
    ShardStatus,
};
pub use state_machine::{Applying, Export, ReplicatedState, StateError};

/// An application command or reply, encoded by the application.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload(pub Vec<u8>);

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// The openraft types of every shard's group: opaque payloads, u64 node ids, snapshots as files.
    pub TypeConfig:
        D = Payload,
        R = Payload,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type StorageError = openraft::StorageError<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;

/// Encodes a value for the log, the wire or a snapshot header.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
