//! The engine of one node: its shards, the routing of users to shards, proposing commands and reading.
//!
//! A user's every row lives on shard `hash(user_id) mod S` (a fixed-key xxh3, stable across builds and
//! machines), so every per-user command is one local transaction on one shard. Each shard has one writer
//! thread (`writer`) fed by a bounded queue. The few operations that span shards (global idempotency keys,
//! globally unique external references, the catalog) are sequences of idempotent single-shard commands,
//! in `coordinator`.

pub mod coordinator;
pub mod sweeper;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use redb::ReadTransaction;
use tokio::sync::{Mutex, oneshot};

use crate::domain::Envelope;
use crate::state::{Applied, ShardStore, StoreError};
use writer::{Proposal, Writer};

/// Engine failures, as the HTTP layer sees them.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The shard's queue is full: the caller should back off and retry (429).
    #[error("shard {shard} is overloaded")]
    Overloaded { shard: u32 },
    /// The shard cannot take writes now (stopped, shutting down, failed storage) (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Storage(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Tuning of the writers.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub shards: u32,
    /// Most commands in one transaction.
    pub max_batch: usize,
    /// Most proposals waiting per shard before new ones are refused.
    pub queue_capacity: usize,
}

/// The stable shard of a routing key. Never `std`'s hasher: it is randomised per process.
pub fn shard_of(routing_key: &str, shards: u32) -> u32 {
    const SEED: u64 = 0x5348_4f50_4b45_4550; // "SHOPKEEP"
    (xxhash_rust::xxh3::xxh3_64_with_seed(routing_key.as_bytes(), SEED) % u64::from(shards)) as u32
}

pub struct ShardHandle {
    id: u32,
    store: Arc<ShardStore>,
    queue: SyncSender<Proposal>,
    failed: Arc<AtomicBool>,
}

impl ShardHandle {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }
}

pub struct Node {
    shards: Vec<ShardHandle>,
    writers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Serialises catalog writes, so every shard sees the same sequence of item versions.
    catalog_lock: Mutex<()>,
}

impl Node {
    /// Opens (or creates) the shard files `shard-NNN.redb` in `data_dir` and starts one writer per shard.
    pub fn open(data_dir: &Path, config: EngineConfig) -> Result<Node, EngineError> {
        assert!(config.shards > 0 && config.max_batch > 0 && config.queue_capacity > 0);
        let mut shards = Vec::with_capacity(config.shards as usize);
        let mut writers = Vec::with_capacity(config.shards as usize);
        for id in 0..config.shards {
            let path = data_dir.join(format!("shard-{id:03}.redb"));
            let store = Arc::new(ShardStore::open(&path, id)?);
            let (queue, receiver) = sync_channel(config.queue_capacity);
            let failed = Arc::new(AtomicBool::new(false));
            let writer = Writer {
                store: store.clone(),
                queue: receiver,
                max_batch: config.max_batch,
                failed: failed.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("shard-{id}-writer"))
                .spawn(move || writer.run())
                .map_err(|e| EngineError::Internal(format!("cannot start a writer thread: {e}")))?;
            writers.push(handle);
            shards.push(ShardHandle {
                id,
                store,
                queue,
                failed,
            });
        }
        Ok(Node {
            shards,
            writers: std::sync::Mutex::new(writers),
            catalog_lock: Mutex::new(()),
        })
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn shards(&self) -> &[ShardHandle] {
        &self.shards
    }

    /// The shard that holds `user_id`'s rows.
    pub fn shard_of_user(&self, user_id: &str) -> u32 {
        shard_of(user_id, self.shard_count())
    }

    /// The home shard of a system key (a global idempotency key, an external reference).
    pub fn shard_of_system_key(&self, key: &str) -> u32 {
        shard_of(&format!("@{key}"), self.shard_count())
    }

    /// Proposes `envelope` to `shard` and waits until it is durably applied.
    pub async fn propose(&self, shard: u32, envelope: Envelope) -> Result<Applied, EngineError> {
        let handle = self.handle(shard)?;
        if !handle.is_healthy() {
            return Err(EngineError::Unavailable(format!(
                "shard {shard} stopped after a storage failure"
            )));
        }
        let (reply, answer) = oneshot::channel();
        let command = envelope.command.name();
        match handle.queue.try_send(Proposal { envelope, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("shopkeep_shard_queue_full_total", "shard" => shard.to_string())
                    .increment(1);
                return Err(EngineError::Overloaded { shard });
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(EngineError::Unavailable("shutting down".into()));
            }
        }
        metrics::counter!("shopkeep_commands_total", "command" => command).increment(1);
        answer
            .await
            .map_err(|_| EngineError::Unavailable("the shard writer stopped".into()))?
    }

    /// Runs `read` on a consistent snapshot of `shard`, off the async workers (redb is blocking).
    pub async fn read<T, F>(&self, shard: u32, read: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.handle(shard)?.store.clone();
        tokio::task::spawn_blocking(move || {
            let txn = store.begin_read()?;
            read(&txn)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("read task failed: {e}")))?
        .map_err(EngineError::from)
    }

    fn handle(&self, shard: u32) -> Result<&ShardHandle, EngineError> {
        self.shards
            .get(shard as usize)
            .ok_or_else(|| EngineError::Internal(format!("no shard {shard}")))
    }

    /// Stops taking proposals, lets every writer finish what is queued, and waits for them.
    pub fn shutdown(self) {
        let Node {
            shards, writers, ..
        } = self;
        drop(shards);
        let writers = writers.into_inner().unwrap_or_default();
        for writer in writers {
            let _ = writer.join();
        }
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
