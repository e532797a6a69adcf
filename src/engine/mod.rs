//! The engine of one node: its shards, the routing of users to shards, proposing commands and reading.
//!
//! A user's every row lives on shard `hash(user_id) mod S` (a fixed-key xxh3, stable across builds and
//! machines), so every per-user command is one local transaction on one shard. Each shard is a Raft
//! group (`shopkeep_raft`): a command is proposed to the shard's leader (from any node), committed on a
//! majority and applied by every replica (`replica`). Reads (`reads`) wait for a read barrier (leader +
//! read index) unless the caller asks for this node's replica as it is (`Consistency::Local`), then read
//! this node's replica. The few operations that span shards (global idempotency keys, globally unique
//! external references, the catalog) are sequences of idempotent single-shard commands, in
//! `coordinator`.
//!
//! This is the HTTP layer's only door to the shop: what it needs of `state` comes through here (the
//! re-exports below are part of the engine's API).

pub mod backup;
pub mod coordinator;
pub mod events;
pub mod limits;
pub mod reads;
pub mod replica;
pub mod reversals;
pub mod sweeper;
pub mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::ReadTransaction;
use shopkeep_faults::integrity;
use shopkeep_raft::{Cluster, ClusterConfig, ClusterError};

pub use crate::state::Applied;
pub use crate::state::audit::ShardAudit;
pub use crate::state::query::OrderCursor;
pub use shopkeep_raft::rpc::MembershipChange;
use tokio::sync::Mutex;

use crate::domain::{Command, Envelope, IdempotencyTag, Rejection, Timestamp};
use crate::state::{CacheUse, ShardStore, StoreError};
use replica::{ApplyReply, ShardMachine};

/// Engine failures, as the HTTP layer sees them. The replication layer's (`ClusterError`) keep their
/// kind: each has a variant of the same name here.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The shard's leader has too many writes in flight: the caller should back off and retry.
    #[error("shard {shard} is overloaded")]
    Overloaded { shard: u32 },
    /// The shard cannot take writes or serve reads now: no leader, no quorum, stopped, or this node's
    /// clock disagrees with the cluster's.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The cluster refused the request as not allowed now (e.g. a membership change it cannot make).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The replicas could not be opened.
    #[error("cannot open the replicas: {0}")]
    Open(String),
    /// A write was not known to be committed in time: it may still be applied.
    #[error("shard {shard}: the write's outcome is unknown")]
    OutcomeUnknown { shard: u32 },
    /// What the request is about does not exist.
    #[error("not found: {0:?}")]
    NotFound(Missing),
    #[error(transparent)]
    Storage(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    /// A file of this node is corrupt and cannot be rebuilt here (a single node): the start stops.
    #[error("{0}")]
    Corrupt(String),
}

/// What a request looked for and did not find.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    User,
    Item {
        item_id: String,
    },
    Order,
    Topup,
    /// No outcome is stored under an idempotency key.
    StoredOutcome,
    /// No live webhook of that name.
    Webhook,
    /// The user has no credit with that id.
    Credit,
}

impl From<ClusterError> for EngineError {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Overloaded { shard } => EngineError::Overloaded { shard },
            ClusterError::Unavailable(message) => EngineError::Unavailable(message),
            ClusterError::Rejected(message) => EngineError::Rejected(message),
            ClusterError::Open(message) => EngineError::Open(message),
            ClusterError::OutcomeUnknown { shard } => EngineError::OutcomeUnknown { shard },
        }
    }
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Sees every write acknowledged before the read started (the default).
    Linearizable,
    /// This node's replica as it is: may be behind the leader.
    Local,
}

/// The stable shard of a routing key. Never `std`'s hasher: it is randomised per process.
pub fn shard_of(routing_key: &str, shards: u32) -> u32 {
    const SEED: u64 = 0x5348_4f50_4b45_4550; // "SHOPKEEP"
    let hash = xxhash_rust::xxh3::xxh3_64_with_seed(routing_key.as_bytes(), SEED);
    u32::try_from(hash % u64::from(shards)).expect("a remainder of a u32 divisor")
}

/// The home shard of a system key (a global idempotency key, an external reference): its own routing
/// namespace, apart from user ids.
pub fn shard_of_system_key(key: &str, shards: u32) -> u32 {
    shard_of(&format!("@{key}"), shards)
}

pub struct Node {
    cluster: Arc<Cluster>,
    stores: Vec<Arc<ShardStore>>,
    /// Serialises catalog writes made through this node, so every shard sees the same sequence of item
    /// versions.
    catalog_lock: Mutex<()>,
    /// Bumped after every batch any shard applies (see `events`: what wakes a long poll).
    applied: Arc<tokio::sync::watch::Sender<u64>>,
    /// Bumped after every batch the shard applies (what wakes the shard's webhook deliveries).
    shard_applied: Vec<Arc<tokio::sync::watch::Sender<u64>>>,
    /// Long polls of the feed waiting now, at most `events::MAX_LONG_POLLS` (more answer at once).
    long_polls: tokio::sync::Semaphore,
}

/// Opens shard `id`'s file, verifying it (see `shopkeep_faults::integrity`). A corrupt file is set aside
/// in a cluster (the shard then rebuilds from its peers) and refused on a single node. Its durable commits
/// take its own phase among the node's `shards` opened from `opened` (`state::first_durable_due`).
fn open_shard(
    data_dir: &Path,
    path: &Path,
    id: u32,
    clustered: bool,
    files: ShardFiles,
    opened: Instant,
    shards: u32,
) -> Result<ShardStore, EngineError> {
    let cache_bytes = files.cache_bytes;
    let store = match ShardStore::open_verified(path, id, cache_bytes) {
        Err(StoreError::CorruptFile(why)) if clustered => {
            let moved = integrity::quarantine(data_dir, &[path.to_path_buf()])
                .map_err(|e| EngineError::Internal(format!("setting aside {why}: {e}")))?;
            tracing::error!(
                shard = id,
                moved_to = %moved.display(),
                "{why}; it was set aside and the shard rebuilds from its peers"
            );
            ShardStore::open_with_cache(path, id, cache_bytes)?
        }
        Err(StoreError::CorruptFile(why)) => {
            return Err(EngineError::Corrupt(format!(
                "{why}. {}",
                integrity::restore_advice(path)
            )));
        }
        other => other?,
    };
    Ok(store.durable_every(files.durable_every, opened, shards))
}

/// How a node keeps its shard files: the operator's `--cache-mib` and `--durable-every`.
#[derive(Clone, Copy, Debug)]
pub struct ShardFiles {
    /// redb's page cache of each shard file.
    pub cache_bytes: usize,
    /// Longest time between two durable commits of a shard's state.
    pub durable_every: Duration,
}

impl Node {
    /// Opens (or creates) the shard files `shard-NNN.redb` in `data_dir`, kept as `shard_files` says,
    /// and their Raft groups, and starts forming the cluster if it has not been formed.
    pub async fn open(
        data_dir: &Path,
        config: ClusterConfig,
        shard_files: ShardFiles,
    ) -> Result<Node, EngineError> {
        assert!(config.shards > 0);
        let clustered = config.peers.len() > 1;
        let paths: Vec<PathBuf> = (0..config.shards)
            .map(|id| backup::shard_path(data_dir, id))
            .collect();
        let (dir, files) = (data_dir.to_path_buf(), paths.clone());
        tokio::task::spawn_blocking(move || integrity::verify_log(&dir, clustered, &files))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Corrupt(e.to_string()))?;
        let dir = data_dir.to_path_buf();
        let (began, shards) = (Instant::now(), config.shards);
        let opened = tokio::task::spawn_blocking(move || {
            let each = (0u32..).zip(paths).collect();
            integrity::verify_each(each, |(id, path)| {
                open_shard(&dir, &path, id, clustered, shard_files, began, shards)
            })
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?;
        let stores = opened
            .into_iter()
            .map(|store| store.map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let applied = Arc::new(tokio::sync::watch::Sender::new(0));
        let shard_applied: Vec<_> = stores
            .iter()
            .map(|_| Arc::new(tokio::sync::watch::Sender::new(0)))
            .collect();
        let machines = stores
            .iter()
            .zip(&shard_applied)
            .map(|(store, own)| {
                let told = vec![applied.clone(), own.clone()];
                Arc::new(ShardMachine::new(store.clone()).notifying(told))
            })
            .collect();
        let cluster = Cluster::open(config, machines).await?;
        cluster.form().await;
        Ok(Node {
            cluster,
            stores,
            catalog_lock: Mutex::new(()),
            applied,
            shard_applied,
            long_polls: tokio::sync::Semaphore::new(events::MAX_LONG_POLLS),
        })
    }

    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.stores.len()).expect("one store per shard, and shards are a u32")
    }

    /// Each shard's page cache (size, use, hits), in shard order.
    pub fn shard_caches(&self) -> Vec<CacheUse> {
        self.stores.iter().map(|store| store.cache()).collect()
    }

    /// Each shard's durable commits since its file was opened, in shard order.
    pub fn shard_durable_commits(&self) -> Vec<u64> {
        self.stores
            .iter()
            .map(|store| store.durable_commits())
            .collect()
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The shard that holds `user_id`'s rows.
    pub fn shard_of_user(&self, user_id: &str) -> u32 {
        shard_of(user_id, self.shard_count())
    }

    /// The home shard of a system key (a global idempotency key, an external reference).
    pub fn shard_of_system_key(&self, key: &str) -> u32 {
        shard_of_system_key(key, self.shard_count())
    }

    /// Proposes `envelope` to `shard` (through its leader, wherever it is) and waits until it is
    /// committed and applied.
    pub async fn propose(&self, shard: u32, envelope: Envelope) -> Result<Applied, EngineError> {
        // The envelope's time was stamped before this check. Had this node's clock stepped before the
        // stamp, the verdict (a step voids every sample taken before it) no longer agrees: refused.
        let verdict = self.cluster.clock_verdict();
        if !verdict.agrees {
            return Err(EngineError::Unavailable(verdict.reason()));
        }
        let command = envelope.command.name();
        let bytes = postcard::to_stdvec(&envelope)
            .map_err(|e| EngineError::Internal(format!("cannot encode a command: {e}")))?;
        let reply = match self.cluster.write(shard, bytes).await {
            Ok(reply) => reply,
            Err(ClusterError::Overloaded { shard }) => {
                metrics::counter!(crate::metrics::SHARD_OVERLOADED, "shard" => shard.to_string())
                    .increment(1);
                return Err(EngineError::Overloaded { shard });
            }
            Err(error) => return Err(error.into()),
        };
        metrics::counter!(crate::metrics::COMMANDS, "command" => command).increment(1);
        let reply: ApplyReply = postcard::from_bytes(&reply)
            .map_err(|e| EngineError::Internal(format!("undecodable reply: {e}")))?;
        if let Ok(Applied {
            outcome:
                Err(
                    Rejection::LimitExceeded { limit, .. }
                    | Rejection::MoneyLimitExceeded { limit, .. },
                ),
            replayed: false,
        }) = &reply
        {
            if crate::domain::limits::LIMIT_NAMES.contains(&limit.as_str()) {
                metrics::counter!(crate::metrics::LIMIT_EXCEEDED, "limit" => limit.clone())
                    .increment(1);
            }
        }
        reply.map_err(EngineError::Internal)
    }

    /// Proposes `command`, stamped `now` and tagged with its idempotency key, to `user_id`'s shard.
    pub async fn propose_for_user(
        &self,
        user_id: &str,
        now: Timestamp,
        tag: Option<IdempotencyTag>,
        command: Command,
    ) -> Result<Applied, EngineError> {
        let envelope = Envelope {
            now,
            seed: coordinator::new_seed(now),
            idempotency: tag,
            command,
        };
        self.propose(self.shard_of_user(user_id), envelope).await
    }

    /// Runs `read` on a consistent snapshot of `shard`, off the async workers (redb is blocking). A
    /// `Linearizable` read reflects every write acknowledged before the call; a `Local` one this node's
    /// replica as it is.
    pub(in crate::engine) async fn read<T, F>(
        &self,
        consistency: Consistency,
        shard: u32,
        read: F,
    ) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        if consistency == Consistency::Linearizable {
            self.cluster.read_barrier(shard).await?;
        }
        let store = self
            .stores
            .get(shard as usize)
            .ok_or_else(|| EngineError::Internal(format!("no shard {shard}")))?
            .clone();
        tokio::task::spawn_blocking(move || {
            let txn = store.begin_read()?;
            read(&txn)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("read task failed: {e}")))?
        .map_err(EngineError::from)
    }

    /// Applies a membership change to every shard (through each shard's leader).
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), EngineError> {
        Ok(self.cluster.change_membership(change).await?)
    }

    /// Stops the node's replicas.
    pub async fn shutdown(&self) {
        self.cluster.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_and_spread() {
        // Fixed values: a change here would move every user to another shard on upgrade.
        assert_eq!(shard_of("player-42", 8), 5);
        assert_eq!(shard_of("a", 8), 1);
        assert_eq!(shard_of("user-1", 8), 3);
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[shard_of(&format!("user-{i}"), 8) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
