//! A node's replicas of every shard (multi-Raft) and everything a caller does with them: cluster
//! formation, writes forwarded to the shard's leader, linearizable read barriers, membership changes
//! and status. A member that lost its data is kept out of every quorum until it has caught up
//! (`rebuild`).
//!
//! Every node hosts a replica of every shard. Each shard has a *preferred* node (the shard number modulo
//! the initial members): it initialises the shard at formation and so becomes its first leader, which
//! spreads the leaders across nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::raft::VoteResponse;
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::auth::NodeAuth;
use crate::clock::{ClockVerdict, ClockWatch};
use crate::log_store::{LogDb, MIRROR_BYTES};
use crate::network::{ShardNetwork, Transport};
use crate::rpc::{MembershipChange, NodeRequest, NodeResponse, Probe, Refusal};
use crate::state_machine::{PurgeGate, ReplicatedState, StateMachineStore};
use crate::{Payload, Raft, batch};
use rebuild::Marks;
use shopkeep_faults::disk::DiskHealth;

mod handoff;
mod rebuild;

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
    /// A snapshot is built after this many new log entries; the log before it is then purged.
    pub snapshot_every: u64,
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
        }
    }
}

/// Most bytes of commands in one log entry. With `MAX_ENTRIES_PER_APPEND` it keeps every append
/// message well under `rpc::MAX_MESSAGE_BYTES`.
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Most entries in one append message to a follower.
const MAX_ENTRIES_PER_APPEND: u64 = 64;
/// Batches of one shard a node has in flight at once: while they are being committed, the next
/// commands gather into the next batch.
const BATCHES_IN_FLIGHT: usize = 2;
const _: () = assert!(
    MAX_BATCH_BYTES * (MAX_ENTRIES_PER_APPEND as usize) * 2 <= crate::rpc::MAX_MESSAGE_BYTES
);

/// A command waiting to be proposed in the next batch.
struct Waiting {
    command: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, ClusterError>>,
}

struct Replica {
    raft: Raft,
    /// Entries this node proposes as the shard's leader (its batches, which take in forwarded ones).
    inflight: Arc<Semaphore>,
    /// Commands waiting for this node's next batch for the shard.
    waiting: mpsc::Sender<Waiting>,
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
    let election = config.election_timeout.as_millis().max(1) as u64;
    let (min, max) = (election, election * 2);
    let keep = (config.snapshot_every / 2).clamp(1, 1000);
    openraft::Config {
        cluster_name: format!("shopkeep-shard-{shard}"),
        heartbeat_interval: config.heartbeat.as_millis().max(1) as u64,
        election_timeout_min: min,
        election_timeout_max: max,
        max_payload_entries: MAX_ENTRIES_PER_APPEND,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
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

fn fatal<E: std::fmt::Display>(error: E) -> Refusal {
    Refusal::Unavailable(format!("the shard's replica stopped: {error}"))
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
        for (shard, state) in (0u32..).zip(states) {
            let snapshot_dir = config
                .data_dir
                .join(shopkeep_faults::integrity::SNAPSHOT_DIR)
                .join(format!("shard-{shard:03}"));
            let clustered = config.peers.len() > 1;
            reset_if_behind(&log_db, shard, &*state, &snapshot_dir, clustered).await?;
            // the log is purged only up to what the state machine holds durably
            let gate = PurgeGate::new();
            let log = log_db
                .shard(shard)
                .map_err(|e| ClusterError::Open(e.to_string()))?
                .with_purge_gate(gate.clone());
            let mut machine = StateMachineStore::new(state, snapshot_dir)
                .map_err(|e| ClusterError::Open(format!("snapshot directory: {e}")))?
                .with_purge_gate(gate)
                .with_disk(health.clone(), log.clone());
            if machine.lost_snapshot() {
                use openraft::{RaftSnapshotBuilder, storage::RaftStateMachine};
                machine
                    .get_snapshot_builder()
                    .await
                    .build_snapshot()
                    .await
                    .map_err(|e| ClusterError::Open(format!("shard {shard}: snapshot: {e}")))?;
            }
            let network = ShardNetwork {
                shard,
                local: config.node_id,
                transport: transport.clone(),
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
                inflight: Arc::new(Semaphore::new(config.max_inflight_per_shard)),
                waiting,
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
            tokio::spawn(rebuild::run_rebuild(Arc::downgrade(&cluster), shard));
        }
        if cluster.config.peers.len() > 1 {
            tokio::spawn(handoff::run_handoff(Arc::downgrade(&cluster)));
        }
        Ok(cluster)
    }

    pub fn shard_count(&self) -> u32 {
        self.replicas.len() as u32
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

    async fn any_initialized(&self) -> bool {
        for replica in &self.replicas {
            if replica.raft.is_initialized().await.unwrap_or(true) {
                return true;
            }
        }
        false
    }

    /// Exactly one initialisation: only a node that sees a majority of pristine peers, none of them
    /// initialised and itself the lowest id among them, initialises; each shard on its preferred node.
    /// (Two nodes initialising with the same members, which a race can cause, is safe in openraft.)
    async fn form_in_background(self: Arc<Self>) {
        let me = self.config.node_id;
        let majority = self.config.peers.len() / 2 + 1;
        let mut rounds_with_majority = 0u32;
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
                    tokio::time::sleep(Duration::from_millis(500)).await;
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
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn initialize_local(
        &self,
        shard: u32,
        members: BTreeMap<NodeId, String>,
    ) -> Result<(), Refusal> {
        let replica = self.replica(shard)?;
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

    /// Runs `local` on the shard's leader: here if this node leads, else forwarded once to the leader
    /// (`remote` builds the request, `answer` reads the reply). Retries while there is no leader or the
    /// leader moves, until the deadline.
    async fn on_leader<T, F, Fut>(
        &self,
        shard: u32,
        local: F,
        remote: impl Fn() -> NodeRequest,
        answer: fn(NodeResponse) -> Option<Result<T, Refusal>>,
    ) -> Result<T, ClusterError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Refusal>>,
    {
        let deadline = Instant::now() + self.config.deadline;
        let mut last_error = String::from("no leader for the shard");
        loop {
            let leader = match local().await {
                Ok(value) => return Ok(value),
                Err(Refusal::NotLeader { leader }) => leader,
                Err(Refusal::Overloaded) => return Err(ClusterError::Overloaded { shard }),
                Err(other) => return Err(other.into()),
            };
            let failed_leader = leader.as_ref().map(|(id, _)| *id);
            if let Some((id, addr)) = leader.filter(|(id, _)| *id != self.config.node_id) {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match self
                    .transport
                    .call(&addr, &remote(), remaining.max(Duration::from_millis(10)))
                    .await
                {
                    Ok(response) => match answer(response) {
                        Some(Ok(value)) => return Ok(value),
                        Some(Err(Refusal::NotLeader { .. })) => {
                            last_error = format!("node {id} no longer leads")
                        }
                        Some(Err(Refusal::Overloaded)) => {
                            return Err(ClusterError::Overloaded { shard });
                        }
                        Some(Err(other)) => return Err(other.into()),
                        None => {
                            return Err(ClusterError::Unavailable(format!(
                                "node {id} answered nonsense"
                            )));
                        }
                    },
                    Err(error) => last_error = error.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Unavailable(format!(
                    "shard {shard}: {last_error}"
                )));
            }
            self.wait_for_other_leader(shard, failed_leader, deadline)
                .await;
        }
    }

    /// Waits until this node's replica of `shard` knows a leader other than `failed` (a leader that
    /// refused or could not be reached), at most 200 ms and not past `deadline`: a retry goes out as
    /// soon as an election is won, without a blind back-off.
    async fn wait_for_other_leader(&self, shard: u32, failed: Option<NodeId>, deadline: Instant) {
        let Ok(replica) = self.replica(shard) else {
            return;
        };
        let until = deadline.min(Instant::now() + Duration::from_millis(200));
        let mut metrics = replica.raft.metrics();
        // A short pause first: a leader that just refused may be about to learn of its successor.
        tokio::time::sleep(Duration::from_millis(5)).await;
        loop {
            let known = metrics.borrow_and_update().current_leader;
            if known.is_some() && known != failed {
                return;
            }
            let remaining = until.saturating_duration_since(Instant::now());
            if remaining.is_zero()
                || tokio::time::timeout(remaining, metrics.changed())
                    .await
                    .is_err()
            {
                return;
            }
        }
    }

    /// Replicates `command` through the shard's log and returns the state machine's reply. Commands
    /// waiting for the same shard are proposed together, in one log entry (see `batch`).
    pub async fn write(&self, shard: u32, command: Vec<u8>) -> Result<Vec<u8>, ClusterError> {
        if let Some(trouble) = self.disk_trouble() {
            return Err(ClusterError::Unavailable(trouble));
        }
        let replica = self.replica(shard).map_err(ClusterError::from)?;
        let (reply, answer) = oneshot::channel();
        match replica.waiting.try_send(Waiting { command, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(ClusterError::Overloaded { shard });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(ClusterError::Unavailable("shutting down".into()));
            }
        }
        answer
            .await
            .map_err(|_| ClusterError::Unavailable("shutting down".into()))?
    }

    /// Proposes `commands` as one entry through the shard's leader; one reply per command.
    async fn write_batch(
        &self,
        shard: u32,
        commands: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, ClusterError> {
        let payload = Payload(batch::encode(commands));
        let reply = self
            .on_leader(
                shard,
                || self.write_local(shard, payload.clone()),
                || NodeRequest::Write {
                    shard,
                    command: payload.clone(),
                },
                |response| match response {
                    NodeResponse::Written(result) => Some(result),
                    _ => None,
                },
            )
            .await?;
        let replies = batch::decode(&reply.0)
            .map_err(|e| ClusterError::Unavailable(format!("shard {shard}: bad reply: {e}")))?;
        if replies.len() != commands.len() {
            return Err(ClusterError::Unavailable(format!(
                "shard {shard}: {} replies for {} commands",
                replies.len(),
                commands.len()
            )));
        }
        Ok(replies.into_iter().map(<[u8]>::to_vec).collect())
    }

    /// A batch another node forwarded to this node as the shard's leader. Its commands join this node's
    /// own queue for the shard, so the leader proposes what every node sends it as one entry: openraft
    /// 0.9 appends (and waits for the fsync of) each proposal on its own, so the batches of three
    /// nodes proposed one by one cost three appends in a row where one does.
    async fn write_forwarded(&self, shard: u32, payload: Payload) -> Result<Payload, Refusal> {
        if let Some(trouble) = self.disk_trouble() {
            return Err(Refusal::Unavailable(trouble));
        }
        let replica = self.replica(shard)?;
        if !self.is_leader(shard) {
            // One hop only: the sender looks for the leader again; this node does not forward.
            let metrics = replica.raft.metrics().borrow().clone();
            let leader_id = metrics
                .current_leader
                .filter(|id| *id != self.config.node_id);
            let leader_node = leader_id.and_then(|id| {
                metrics
                    .membership_config
                    .membership()
                    .get_node(&id)
                    .cloned()
            });
            return Err(not_leader(
                &self.transport,
                ForwardToLeader {
                    leader_id,
                    leader_node,
                },
            ));
        }
        let commands = batch::decode(&payload.0)
            .map_err(|e| Refusal::Rejected(format!("undecodable forwarded batch: {e}")))?;
        // All or nothing: a batch is queued whole or refused whole.
        let permits = match replica.waiting.try_reserve_many(commands.len()) {
            Ok(permits) => permits,
            Err(mpsc::error::TrySendError::Full(())) => return Err(Refusal::Overloaded),
            Err(mpsc::error::TrySendError::Closed(())) => {
                return Err(Refusal::Unavailable("shutting down".into()));
            }
        };
        let mut answers = Vec::with_capacity(commands.len());
        for (permit, command) in permits.zip(commands) {
            let (reply, answer) = oneshot::channel();
            permit.send(Waiting {
                command: command.to_vec(),
                reply,
            });
            answers.push(answer);
        }
        let mut replies = Vec::with_capacity(answers.len());
        for answer in answers {
            match answer.await {
                Ok(Ok(reply)) => replies.push(reply),
                Ok(Err(error)) => return Err(Refusal::from(error)),
                Err(_) => return Err(Refusal::Unavailable("shutting down".into())),
            }
        }
        Ok(Payload(batch::encode(&replies)))
    }

    async fn write_local(&self, shard: u32, payload: Payload) -> Result<Payload, Refusal> {
        let replica = self.replica(shard)?;
        let Ok(_permit) = replica.inflight.clone().try_acquire_owned() else {
            return Err(Refusal::Overloaded);
        };
        let write = replica.raft.client_write(payload);
        let started = Instant::now();
        let written = tokio::time::timeout(self.config.deadline, write).await;
        if let Ok(Ok(_)) = &written {
            // From proposal to applied reply, on the leader (refusals are not proposals).
            metrics::histogram!("shopkeep_raft_proposal_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        match written {
            Err(_) => Err(Refusal::Unavailable(format!(
                "shard {shard}: not committed within {:?} (no quorum?)",
                self.config.deadline
            ))),
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                Err(not_leader(&self.transport, forward))
            }
            Ok(Err(RaftError::APIError(other))) => Err(Refusal::Rejected(other.to_string())),
            Ok(Err(RaftError::Fatal(error))) => Err(fatal(error)),
        }
    }

    /// Waits until this node's replica of `shard` has applied everything committed before the call,
    /// as confirmed by the shard's leader with a quorum (read index). After it, a local read is
    /// linearizable.
    pub async fn read_barrier(&self, shard: u32) -> Result<(), ClusterError> {
        let started = Instant::now();
        let index = self
            .on_leader(
                shard,
                || self.read_index_local(shard),
                || NodeRequest::ReadIndex { shard },
                |response| match response {
                    NodeResponse::ReadIndex(result) => Some(result),
                    _ => None,
                },
            )
            .await?;
        let replica = self.replica(shard).map_err(ClusterError::from)?;
        let remaining = self.config.deadline.saturating_sub(started.elapsed());
        replica
            .raft
            .wait(Some(remaining.max(Duration::from_millis(10))))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| {
                ClusterError::Unavailable(format!("shard {shard}: replica is behind: {e}"))
            })?;
        Ok(())
    }

    async fn read_index_local(&self, shard: u32) -> Result<u64, Refusal> {
        let replica = self.replica(shard)?;
        match tokio::time::timeout(self.config.deadline, replica.raft.get_read_log_id()).await {
            Err(_) => Err(Refusal::Unavailable(format!(
                "shard {shard}: no quorum confirmed the leader"
            ))),
            Ok(Ok((read_log_id, _applied))) => Ok(read_log_id.map(|id| id.index).unwrap_or(0)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                Err(not_leader(&self.transport, forward))
            }
            Ok(Err(RaftError::APIError(other))) => Err(Refusal::Unavailable(other.to_string())),
            Ok(Err(RaftError::Fatal(error))) => Err(fatal(error)),
        }
    }

    /// Applies a membership change to every shard, one shard at a time, on each shard's leader.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), ClusterError> {
        let _serialised = self.membership_lock.lock().await;
        if let MembershipChange::AddLearner { node, addr } = &change {
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
        Ok(())
    }

    async fn change_membership_local(
        &self,
        shard: u32,
        change: MembershipChange,
    ) -> Result<(), Refusal> {
        let replica = self.replica(shard)?;
        let raft = &replica.raft;
        let membership = raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let result = match change {
            MembershipChange::AddLearner { node, addr } => {
                self.transport.remember(node, &addr);
                if voters.contains(&node) {
                    return Ok(());
                }
                raft.add_learner(node, BasicNode::new(addr), true)
                    .await
                    .map(|_| ())
            }
            MembershipChange::Promote { node } => {
                if voters.contains(&node) {
                    return Ok(());
                }
                if !known.contains(&node) {
                    return Err(Refusal::Rejected(format!(
                        "node {node} is not a learner of shard {shard}; add it first"
                    )));
                }
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node])), false)
                    .await
                    .map(|_| ())
            }
            MembershipChange::Remove { node } => {
                if !known.contains(&node) {
                    return Ok(());
                }
                if voters.contains(&node) {
                    if voters.len() == 1 {
                        return Err(Refusal::Rejected("cannot remove the last voter".into()));
                    }
                    raft.change_membership(
                        ChangeMembers::RemoveVoters(BTreeSet::from([node])),
                        false,
                    )
                    .await
                    .map(|_| ())
                } else {
                    raft.change_membership(
                        ChangeMembers::RemoveNodes(BTreeSet::from([node])),
                        false,
                    )
                    .await
                    .map(|_| ())
                }
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(not_leader(&self.transport, forward))
            }
            Err(RaftError::APIError(other)) => Err(Refusal::Rejected(other.to_string())),
            Err(RaftError::Fatal(error)) => Err(fatal(error)),
        }
    }

    /// Answers a call from another node (the HTTP layer has authenticated it).
    pub async fn serve_call(&self, request: NodeRequest) -> NodeResponse {
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
            let now = self.started.elapsed().as_millis() as u64;
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
        let limit = (self.config.election_timeout * 4).as_millis() as u64;
        let now = self.started.elapsed().as_millis() as u64;
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
        let shards = (0u32..)
            .zip(&self.replicas)
            .map(|(shard, replica)| {
                let metrics = replica.raft.metrics().borrow().clone();
                let membership = metrics.membership_config.membership();
                for (id, node) in membership.nodes() {
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
                    applied_index: metrics.last_applied.map(|id| id.index),
                    snapshot_index: metrics.snapshot.map(|id| id.index),
                    voters,
                    learners,
                    lag,
                    recovery: self.marks.get(shard).label(),
                }
            })
            .collect();
        ClusterStatus {
            node_id: self.config.node_id,
            nodes,
            shards,
        }
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

/// Gathers the commands waiting for `shard` into batches and proposes each as one entry, with at most
/// `BATCHES_IN_FLIGHT` batches in flight. Stops when the cluster is gone.
async fn run_batcher(cluster: Weak<Cluster>, shard: u32, mut queue: mpsc::Receiver<Waiting>) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let mut bytes = first.command.len();
        let mut batch = vec![first];
        while batch.len() < cluster.config.max_batch_commands && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.command.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        tokio::spawn(async move {
            let (commands, replies): (Vec<Vec<u8>>, Vec<_>) =
                batch.into_iter().map(|w| (w.command, w.reply)).unzip();
            metrics::histogram!("shopkeep_raft_batch_commands").record(commands.len() as f64);
            let started = Instant::now();
            let written = cluster.write_batch(shard, &commands).await;
            metrics::histogram!("shopkeep_raft_batch_seconds")
                .record(started.elapsed().as_secs_f64());
            match written {
                Ok(answers) => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// The node that initialises `shard` and stands first for election in it.
fn preferred_node(peers: &BTreeMap<NodeId, String>, shard: u32) -> NodeId {
    let ids: Vec<NodeId> = peers.keys().copied().collect();
    ids[shard as usize % ids.len()]
}
