//! A node's replicas of every shard (multi-Raft) and everything a caller does with them: cluster
//! formation, writes forwarded to the shard's leader, linearizable read barriers, membership changes
//! and status. A member that lost its data is kept out of every quorum until it has caught up
//! (`rebuild`).
//!
//! Every node hosts a replica of every shard. Each shard has a *preferred* node (the shard number modulo
//! the initial members): it initialises the shard at formation and so becomes its first leader, which
//! spreads the leaders across nodes.
//!
//! This module owns the configuration, the errors, the `Cluster` and its status types, and opening the
//! replicas (and stopping them). The rest, by concern:
//! - `formation`: forming the cluster (probing the peers, initialising each shard on its preferred node);
//! - `write`: batching and proposing writes, forwarding them to the shard's leader, read barriers;
//! - `membership`: adding learners, promoting and removing members;
//! - `serve`: answering other nodes' calls, leadership, readiness and status;
//! - `rebuild`: a member that lost its data; `handoff`: a member whose disk is full;
//! - `snapshots`: asking each shard for a snapshot when its log has grown enough.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use openraft::error::ForwardToLeader;
use openraft::{BasicNode, SnapshotPolicy};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::Raft;
use crate::auth::NodeAuth;
use crate::clock::{ClockVerdict, ClockWatch};
use crate::log_store::{LogDb, MIRROR_BYTES};
use crate::network::{ShardNetwork, Transport};
use crate::rpc::Refusal;
use crate::state_machine::{
    AppliedIndex, PurgeGate, ReplicatedState, SnapshotCadence, StateMachineStore,
};
pub use rebalance::{LeaderMove, Rebalanced};
use rebuild::Marks;
use shopkeep_faults::disk::DiskHealth;
use write::run_batcher;

mod formation;
mod handoff;
mod membership;
mod rebalance;
mod rebuild;
mod serve;
mod snapshots;
mod write;

pub type NodeId = u64;

/// How a node takes part in the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    /// The initial members and how this node reaches them, this node included. One entry (this node)
    /// for a single-node shop.
    pub peers: BTreeMap<NodeId, String>,
    pub shards: u32,
    /// Holds `raft-log.redb` and `snapshots/`.
    pub data_dir: PathBuf,
    /// Signs this node's calls to the others and checks theirs (a key derived from the cluster secret).
    pub auth: Arc<NodeAuth>,
    pub heartbeat: Duration,
    /// A follower that hears nothing from its leader for one to two of these stands for election.
    pub election_timeout: Duration,
    /// A snapshot is built after this many new log entries (and `snapshot_log_percent`); the log
    /// before it is then purged.
    pub snapshot_every: u64,
    /// ... and once the log since the last snapshot holds this share (in percent) of that snapshot's
    /// bytes; 0: by entries alone (see `state_machine::SnapshotCadence`).
    pub snapshot_log_percent: u32,
    /// Most commands in one log entry (see `batch`).
    pub max_batch_commands: usize,
    /// Most commands waiting on this node for a shard, and most entries a shard's leader has in flight;
    /// more are refused (backpressure).
    pub max_inflight_per_shard: usize,
    /// How long a write or a read barrier may look for a leader and a quorum before giving up.
    pub deadline: Duration,
    /// Empty shards take part in elections at once instead of rebuilding first (see `rebuild`): only
    /// for a cluster being restored from one member's backup, whose other members were emptied on
    /// purpose.
    pub trust_empty_shards: bool,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("shard {shard} is overloaded")]
    Overloaded { shard: u32 },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("cannot open the replicas: {0}")]
    Open(String),
    /// A write was proposed (or handed to a leader) but not known to be committed before the deadline:
    /// it may still be applied. Only a retry with the same idempotency tag tells.
    #[error("shard {shard}: the write was not committed in time; its outcome is unknown")]
    OutcomeUnknown { shard: u32 },
}

impl From<Refusal> for ClusterError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotLeader { .. } => {
                ClusterError::Unavailable("no leader for the shard".into())
            }
            Refusal::Overloaded => ClusterError::Unavailable("the leader is overloaded".into()),
            Refusal::Unavailable(message) => ClusterError::Unavailable(message),
            Refusal::Rejected(message) => ClusterError::Rejected(message),
            Refusal::OutcomeUnknown { shard } => ClusterError::OutcomeUnknown { shard },
        }
    }
}

impl From<ClusterError> for Refusal {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Overloaded { .. } => Refusal::Overloaded,
            ClusterError::Unavailable(message) | ClusterError::Open(message) => {
                Refusal::Unavailable(message)
            }
            ClusterError::Rejected(message) => Refusal::Rejected(message),
            ClusterError::OutcomeUnknown { shard } => Refusal::OutcomeUnknown { shard },
        }
    }
}

/// Most bytes of commands in one log entry. With `MAX_ENTRIES_PER_APPEND` it keeps every append
/// message well under `rpc::MAX_MESSAGE_BYTES`.
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Most entries in one append message to a follower.
const MAX_ENTRIES_PER_APPEND: u64 = 64;
#[allow(clippy::cast_possible_truncation)] // 64 fits every usize
const MAX_ENTRIES_PER_APPEND_USIZE: usize = MAX_ENTRIES_PER_APPEND as usize;
/// Batches of one shard a node has in flight at once when it is the shard's only member: while they are
/// being committed, the next commands gather into the next batch. A shard with other members has one:
/// each entry then costs every follower an append and an apply, so fewer, fuller entries are worth more
/// than a second one in flight (3 nodes: +14–23 % purchases/s at 16 clients, +28–30 % at 64), where
/// alone the second one is worth ~7–12 % at 1 client.
const BATCHES_IN_FLIGHT: usize = 2;
/// Batches of one shard a node that does not lead it has forwarded and not yet had answered, at most.
/// The leader puts forwarded commands into its own queue, so they join its next entry whatever batch
/// they came in: holding them back until the previous forward is answered saves no entry, and made
/// each wait a round trip to the leader for nothing (3 nodes, 4 against 1: +9.7 % purchases/s at 16
/// clients and +8 % at 64 over paired rounds, level at 256; docs/BENCHMARKS.md, twenty-seventh
/// session). Bounded, so a node under heavy load still sends its commands to the leader in batches.
const FORWARDS_IN_FLIGHT: usize = 4;
const _: () =
    assert!(MAX_BATCH_BYTES * MAX_ENTRIES_PER_APPEND_USIZE * 2 <= crate::rpc::MAX_MESSAGE_BYTES);

/// A command waiting to be proposed in the next batch.
struct Waiting {
    command: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, ClusterError>>,
}

struct Replica {
    raft: Raft,
    /// What this node's state of the shard holds (it may hold other leaders' entries back, see
    /// `state_machine::coalesce`): what reads wait on, rather than openraft's `last_applied`.
    applied: AppliedIndex,
    /// Entries this node proposes as the shard's leader (its batches, which take in forwarded ones).
    inflight: Arc<Semaphore>,
    /// Commands waiting for this node's next batch for the shard.
    waiting: mpsc::Sender<Waiting>,
    /// When the shard's next snapshot is due (see `snapshots`).
    cadence: Arc<SnapshotCadence>,
}

/// The node's replicas and its client to the other nodes.
pub struct Cluster {
    /// Which of the node's files are full (see `disk`): writes are refused meanwhile.
    health: Arc<DiskHealth>,
    config: ClusterConfig,
    replicas: Vec<Replica>,
    transport: Arc<Transport>,
    /// Serialises membership changes made through this node.
    membership_lock: tokio::sync::Mutex<()>,
    /// Per shard, whether this node's replica is a full member or rebuilding lost data (see `rebuild`).
    marks: Marks,
    /// When this node started; the base of `leader_contact`.
    started: Instant,
    /// Per shard, milliseconds after `started` when a leader last reached this node (an append).
    leader_contact: Vec<AtomicU64>,
    /// The members' clocks against this node's (see `clock`).
    clock: Arc<ClockWatch>,
}

/// One shard as this node sees it.
#[derive(Clone, Debug, Serialize)]
pub struct ShardStatus {
    pub shard: u32,
    /// `leader`, `follower`, `candidate` or `learner`.
    pub role: &'static str,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// Bytes of commands logged since the newest snapshot (a restart starts at the share), and the
    /// bytes the next snapshot waits for (see `state_machine::SnapshotCadence`).
    pub snapshot_log_bytes: u64,
    pub snapshot_at_log_bytes: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// On the leader: how many entries each other replica is behind (`None`: not known yet).
    pub lag: BTreeMap<NodeId, Option<u64>>,
    /// `none`, or how far this replica is in rebuilding data it lost: `awaiting_leader` (takes part in
    /// nothing yet), `catching_up` (follows the leader, neither votes nor stands); see `rebuild`.
    pub recovery: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    /// Every node this node knows: the initial peers and the members of any shard.
    pub nodes: BTreeMap<NodeId, String>,
    pub shards: Vec<ShardStatus>,
}

/// The Raft configuration of `shard`'s group.
///
/// Every node waits between one and two election timeouts before it stands. (openraft 0.9 makes a voter
/// refuse candidates for `election_timeout_max` after it last heard from a leader — its leader lease — so
/// the first candidate after a leader dies is usually refused and the second round wins: failover takes
/// about two to four election timeouts. Giving the shard's preferred node a shorter timeout than the others
/// would lengthen their leases and slow failover, so leaders are spread at formation instead.)
fn raft_config(config: &ClusterConfig, shard: u32) -> Result<openraft::Config, ClusterError> {
    let election = crate::millis(config.election_timeout).max(1);
    let (min, max) = (election, election * 2);
    let keep = (config.snapshot_every / 2).clamp(1, 1000);
    openraft::Config {
        cluster_name: format!("shopkeep-shard-{shard}"),
        heartbeat_interval: crate::millis(config.heartbeat).max(1),
        election_timeout_min: min,
        election_timeout_max: max,
        max_payload_entries: MAX_ENTRIES_PER_APPEND,
        // `snapshots` asks for them, by entries and bytes (openraft 0.9 counts entries only).
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: keep,
        snapshot_max_chunk_size: 1024 * 1024,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ClusterError::Open(format!("raft configuration: {e}")))
}

fn not_leader(transport: &Transport, forward: ForwardToLeader<NodeId, BasicNode>) -> Refusal {
    let leader = match (forward.leader_id, forward.leader_node) {
        (Some(id), Some(node)) => Some((id, transport.address_of(id, &node.addr))),
        (Some(id), None) => {
            let addr = transport.address_of(id, "");
            (!addr.is_empty()).then_some((id, addr))
        }
        _ => None,
    };
    Refusal::NotLeader { leader }
}

/// openraft stopped the shard's replica: the detail (openraft's, which may name members and their
/// addresses) goes to the log, the caller gets a plain reason.
fn fatal<E: std::fmt::Display>(error: E) -> Refusal {
    tracing::error!(%error, "the shard's replica stopped");
    Refusal::Unavailable("the shard's replica stopped on this node".into())
}

/// An openraft error a caller should not see verbatim (its Display can carry the membership with the
/// members' addresses): logged at WARN, and `plain` returned instead.
fn logged<E: std::fmt::Display>(shard: u32, plain: &str, error: E) -> String {
    tracing::warn!(shard, %error, "{plain}");
    format!("shard {shard}: {plain}")
}

/// A shard whose state holds less than its log was purged past (its file was set aside as corrupt, or
/// lost) cannot catch up from its own log. In a cluster its log is forgotten too, so it opens as
/// pristine and rebuilds from its peers (`rebuild`), its snapshot set aside with it (a snapshot ahead of
/// an empty log is no state openraft accepts); on a single node the start stops.
async fn reset_if_behind<S: ReplicatedState>(
    log_db: &LogDb,
    shard: u32,
    state: &S,
    snapshot_dir: &std::path::Path,
    clustered: bool,
) -> Result<(), ClusterError> {
    let open_error = |e: &dyn std::fmt::Display| ClusterError::Open(format!("shard {shard}: {e}"));
    let applied = crate::state_machine::applied_index(state).map_err(|e| open_error(&e))?;
    let purged = log_db.last_purged(shard).map_err(|e| open_error(&e))?;
    let Some(purged) = purged.filter(|purged| purged.index > applied) else {
        return Ok(());
    };
    let what = format!(
        "shard {shard}'s state ({}) holds entries up to {applied} but its log starts after {}",
        state.location().display(),
        purged.index
    );
    if !clustered {
        return Err(ClusterError::Open(format!(
            "{what}. {}",
            shopkeep_faults::integrity::restore_advice(&state.location())
        )));
    }
    tracing::error!("{what}: the shard's log is reset and it rebuilds from its peers");
    shopkeep_faults::integrity::quarantine(snapshot_dir, &[snapshot_dir.join("current.snap")])
        .map_err(|e| open_error(&e))?;
    log_db.reset_shard(shard).await.map_err(|e| open_error(&e))
}

/// How many shards build their missing snapshots at once at start (`build_missing_snapshots`).
const START_BUILDS_AT_ONCE: usize = 4;

/// Builds, before any shard's Raft starts, the snapshots the shards need then
/// (`StateMachineStore::needs_snapshot_at_start`), up to [`START_BUILDS_AT_ONCE`] side by side. Each is
/// an export of the whole shard: one after another, a restored 10M-order node spent a minute on them.
async fn build_missing_snapshots<'m, S: ReplicatedState>(
    log_db: &LogDb,
    machines: impl Iterator<Item = &'m mut StateMachineStore<S>>,
) -> Result<(), ClusterError> {
    use futures_util::{StreamExt, TryStreamExt};
    let mut missing = Vec::new();
    for (shard, machine) in (0u32..).zip(machines) {
        let purged = log_db
            .last_purged(shard)
            .map_err(|e| snapshot_open_error(shard, e))?
            .is_some();
        if machine
            .needs_snapshot_at_start(purged)
            .map_err(|e| snapshot_open_error(shard, e))?
        {
            tracing::info!(shard, "building the shard's snapshot before it starts");
            missing.push((shard, machine));
        }
    }
    futures_util::stream::iter(missing)
        .map(|(shard, machine)| async move {
            machine
                .build_snapshot_at_start()
                .await
                .map_err(|e| snapshot_open_error(shard, e))
        })
        .buffer_unordered(START_BUILDS_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
}

/// A start refused because of `shard`'s snapshot.
fn snapshot_open_error(shard: u32, error: impl std::fmt::Display) -> ClusterError {
    ClusterError::Open(format!("shard {shard}: snapshot: {error}"))
}

/// Each shard's state machine on its snapshot directory, the current snapshots verified several at a
/// time (`integrity::verify_each`: each is read whole for its digest).
async fn open_machines<S: ReplicatedState>(
    shards: Vec<(Arc<S>, PathBuf)>,
) -> Result<Vec<StateMachineStore<S>>, ClusterError> {
    let opened = tokio::task::spawn_blocking(move || {
        shopkeep_faults::integrity::verify_each(shards, |(state, snapshot_dir)| {
            StateMachineStore::new(state, snapshot_dir)
        })
    })
    .await
    .map_err(|e| ClusterError::Open(e.to_string()))?;
    opened
        .into_iter()
        .map(|machine| machine.map_err(|e| ClusterError::Open(format!("snapshot directory: {e}"))))
        .collect()
}

impl Cluster {
    /// Opens the node's log, one Raft group per shard on `states` (index = shard), and the network.
    pub async fn open<S: ReplicatedState>(
        config: ClusterConfig,
        states: Vec<Arc<S>>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        assert_eq!(states.len(), config.shards as usize, "one state per shard");
        assert!(
            config.peers.contains_key(&config.node_id),
            "the peers include this node"
        );
        let log_path = shopkeep_faults::integrity::log_path(&config.data_dir);
        let health = Arc::new(DiskHealth::new());
        let log_health = health.clone();
        let log_db = tokio::task::spawn_blocking(move || {
            LogDb::open_with(&log_path, MIRROR_BYTES, log_health)
        })
        .await
        .map_err(|e| ClusterError::Open(e.to_string()))?
        .map_err(|e| ClusterError::Open(e.to_string()))?;
        let clock = Arc::new(ClockWatch::default());
        let transport = Arc::new(Transport::new(
            config.auth.clone(),
            clock.clone(),
            config.peers.clone(),
        ));
        let marks = Marks::new(log_db.clone(), config.shards);
        let quarantine_if_empty = config.peers.len() > 1 && !config.trust_empty_shards;
        let mut replicas = Vec::with_capacity(states.len());
        let mut queues = Vec::with_capacity(states.len());
        let clustered = config.peers.len() > 1;
        let mut shards = Vec::with_capacity(states.len());
        for (shard, state) in (0u32..).zip(states) {
            let snapshot_dir = config
                .data_dir
                .join(shopkeep_faults::integrity::SNAPSHOT_DIR)
                .join(format!("shard-{shard:03}"));
            reset_if_behind(&log_db, shard, &*state, &snapshot_dir, clustered).await?;
            shards.push((state, snapshot_dir));
        }
        let mut prepared = Vec::with_capacity(shards.len());
        for (shard, machine) in (0u32..).zip(open_machines(shards).await?) {
            // the log is purged only up to what the state machine holds durably
            let gate = PurgeGate::new();
            let log = log_db
                .shard(shard)
                .map_err(|e| ClusterError::Open(e.to_string()))?
                .with_purge_gate(gate.clone())
                .acking_early_as(config.node_id, !clustered);
            let mut machine = machine
                .with_purge_gate(gate)
                .with_disk(health.clone(), log.clone())
                .coalescing(config.node_id);
            let cadence = machine
                .snapshot_cadence(config.snapshot_every, config.snapshot_log_percent)
                .map_err(|e| snapshot_open_error(shard, e))?;
            prepared.push((machine, log, cadence));
        }
        build_missing_snapshots(&log_db, prepared.iter_mut().map(|(machine, ..)| machine)).await?;
        for (shard, (machine, log, cadence)) in (0u32..).zip(prepared) {
            let applied = machine.applied_index();
            let network = ShardNetwork {
                shard,
                local: config.node_id,
                transport: transport.clone(),
                hold: crate::network::notices::hold_for(config.heartbeat),
                flushed: Some(log.flushed().clone()),
            };
            let raft = Raft::new(
                config.node_id,
                Arc::new(raft_config(&config, shard)?),
                network,
                log,
                machine,
            )
            .await
            .map_err(|e| ClusterError::Open(format!("shard {shard}: {e}")))?;
            let pristine = !raft
                .is_initialized()
                .await
                .map_err(|e| ClusterError::Open(format!("shard {shard}: {e}")))?;
            let mark = marks
                .open_shard(shard, pristine, quarantine_if_empty)
                .await
                .map_err(|e| ClusterError::Open(format!("shard {shard}: {e}")))?;
            raft.runtime_config().elect(mark.takes_part_in_elections());
            let (waiting, queue) = mpsc::channel(config.max_inflight_per_shard);
            queues.push(queue);
            replicas.push(Replica {
                raft,
                applied,
                inflight: Arc::new(Semaphore::new(config.max_inflight_per_shard)),
                waiting,
                cadence,
            });
        }
        let cluster = Arc::new(Cluster {
            health,
            config,
            replicas,
            transport,
            membership_lock: tokio::sync::Mutex::new(()),
            marks,
            started: Instant::now(),
            leader_contact: (0..queues.len()).map(|_| AtomicU64::new(0)).collect(),
            clock,
        });
        for (shard, queue) in (0u32..).zip(queues) {
            tokio::spawn(run_batcher(Arc::downgrade(&cluster), shard, queue));
            tokio::spawn(snapshots::run_snapshot_cadence(
                Arc::downgrade(&cluster),
                shard,
            ));
            tokio::spawn(rebuild::run_rebuild(Arc::downgrade(&cluster), shard));
        }
        if cluster.config.peers.len() > 1 {
            tokio::spawn(handoff::run_handoff(Arc::downgrade(&cluster)));
            tokio::spawn(rebalance::run_rebalancer(Arc::downgrade(&cluster)));
        }
        Ok(cluster)
    }

    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.replicas.len()).expect("one replica per shard, and shards are a u32")
    }

    /// The members' clocks as this node has sampled them (fed by node traffic both ways).
    pub fn clock(&self) -> &ClockWatch {
        &self.clock
    }

    /// Whether this node's clock agrees with a majority of the members' (always, for a single node):
    /// only then may it stamp the time of a command.
    pub fn clock_verdict(&self) -> ClockVerdict {
        self.clock
            .verdict(self.config.node_id, self.transport.peer_ids())
    }

    /// Why this node cannot write now (`disk full at <path>`), if it cannot: it refuses writes, fast,
    /// rather than make clients wait for a commit it cannot make.
    pub fn disk_trouble(&self) -> Option<String> {
        self.health.trouble()
    }

    fn replica(&self, shard: u32) -> Result<&Replica, Refusal> {
        self.replicas
            .get(shard as usize)
            .ok_or_else(|| Refusal::Rejected(format!("no shard {shard}")))
    }

    /// Stops every replica (their committed data is durable already).
    pub async fn shutdown(&self) {
        for replica in &self.replicas {
            if let Err(error) = replica.raft.shutdown().await {
                tracing::warn!(%error, "a replica did not stop cleanly");
            }
        }
    }
}
