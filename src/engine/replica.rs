//! A shard's state machine as the replication layer drives it: decodes the committed commands, applies
//! them through `ShardStore`, encodes the outcomes, and exports/imports the state for snapshots.
//!
//! Every replica runs this on the same log, so everything here must be deterministic, failures included:
//! a command that cannot be decoded, or whose `apply` panics (a bug), becomes a no-op with an error reply
//! on every replica alike, and the rest of its batch is still applied (`state::held` rebuilds the
//! transaction the panic tore).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use redb::ReadTransaction;
use shopkeep_raft::{Applying, Export, ReplicatedState, StateError};

use crate::domain::Envelope;
use crate::state::{Applied, ShardStore, snapshot};

/// What a replica answers for one command: its outcome, or why it could not be applied at all.
pub type ApplyReply = Result<Applied, String>;

pub struct ShardMachine {
    pub store: Arc<ShardStore>,
    /// The shard's apply histograms, labelled once rather than at every batch.
    batch_size: metrics::Histogram,
    apply_time: metrics::Histogram,
    /// Told after every applied batch and installed snapshot: the node's (wakes the event feed's long
    /// polls) and this shard's own (wakes the shard's webhook deliveries).
    applied: Vec<Arc<tokio::sync::watch::Sender<u64>>>,
}

impl ShardMachine {
    /// The state machine of `store`'s shard (its metrics are those of the recorder installed now).
    pub fn new(store: Arc<ShardStore>) -> ShardMachine {
        let shard = store.shard().to_string();
        ShardMachine {
            batch_size: metrics::histogram!(crate::metrics::APPLY_BATCH_SIZE, "shard" => shard.clone()),
            apply_time: metrics::histogram!(crate::metrics::APPLY_SECONDS, "shard" => shard),
            store,
            applied: Vec::new(),
        }
    }

    /// The same machine, bumping each of `applied` after every batch it applies and every snapshot it
    /// installs.
    pub fn notifying(mut self, applied: Vec<Arc<tokio::sync::watch::Sender<u64>>>) -> ShardMachine {
        self.applied = applied;
        self
    }

    fn tell_applied(&self) {
        for applied in &self.applied {
            applied.send_modify(|count| *count = count.wrapping_add(1));
        }
    }
}

fn encode_reply(reply: &ApplyReply) -> Vec<u8> {
    // An outcome always encodes; an empty reply would read back as "not applied".
    postcard::to_stdvec(reply).unwrap_or_default()
}

impl ReplicatedState for ShardMachine {
    fn marker(&self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.store.marker()?)
    }

    fn apply_batch(
        &self,
        batch: &[Applying<'_>],
        marker: &[u8],
    ) -> Result<Vec<Vec<u8>>, StateError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.batch_size.record(batch.len() as f64);
        let started = std::time::Instant::now();
        let decoded: Vec<Option<Result<Envelope, String>>> = batch
            .iter()
            .map(|item| {
                item.command.map(|bytes| {
                    postcard::from_bytes::<Envelope>(bytes)
                        .map_err(|e| format!("undecodable command: {e}"))
                })
            })
            .collect();
        let entries: Vec<(u64, Option<&Envelope>)> = batch
            .iter()
            .zip(&decoded)
            .map(|(item, envelope)| (item.index, envelope.as_ref().and_then(|e| e.as_ref().ok())))
            .collect();
        // A command that panics (a bug) is skipped on every replica alike: the store drops the
        // transaction it tore and rebuilds it from the batches before this one, so nothing of this batch
        // was written, and the batch is applied again without the culprit.
        let mut skip = BTreeSet::new();
        let applied = loop {
            let progress = Cell::new(0);
            let attempt = catch_unwind(AssertUnwindSafe(|| {
                self.store
                    .apply_entries_except(&entries, marker, &skip, &progress)
            }));
            match attempt {
                Ok(result) => break result?,
                Err(_) => {
                    let culprit = progress.get();
                    if culprit >= entries.len() || !skip.insert(culprit) {
                        return Err("apply panicked outside any command".into());
                    }
                    tracing::error!(
                        shard = self.store.shard(),
                        index = entries[culprit].0,
                        "apply panicked; the command is skipped"
                    );
                }
            }
        };
        self.apply_time.record(started.elapsed().as_secs_f64());
        self.tell_applied();
        debug_assert_eq!(applied.len(), batch.len());
        Ok(decoded
            .iter()
            .zip(applied)
            .map(|(command, applied)| match (command, applied) {
                (None, _) => Vec::new(),
                (Some(Err(error)), _) => encode_reply(&Err(error.clone())),
                (Some(Ok(_)), Some(applied)) => encode_reply(&Ok(applied)),
                (Some(Ok(_)), None) => {
                    encode_reply(&Err("the command could not be applied".to_owned()))
                }
            })
            .collect())
    }

    fn export(&self) -> Result<Box<dyn Export>, StateError> {
        let view = self.store.durable_view()?;
        let marker = crate::state::query::marker(&view)?;
        Ok(Box::new(ShardExport { view, marker }))
    }

    fn import(&self, body: &mut dyn Read, marker: &[u8]) -> Result<(), StateError> {
        self.store.import(body, marker)?;
        self.tell_applied();
        Ok(())
    }

    fn next_apply_waits_on_disk(&self) -> bool {
        // The margin covers the time between this answer and the apply's own decision.
        self.store
            .durable_commit_due(std::time::Duration::from_millis(20))
    }

    fn location(&self) -> std::path::PathBuf {
        self.store.path().to_path_buf()
    }
}

struct ShardExport {
    view: ReadTransaction,
    marker: Option<Vec<u8>>,
}

impl Export for ShardExport {
    fn marker(&self) -> Option<Vec<u8>> {
        self.marker.clone()
    }

    fn write_to(&mut self, out: &mut dyn Write) -> Result<(), StateError> {
        Ok(snapshot::export(&self.view, out)?)
    }
}
