//! The group-commit writer of one shard: a dedicated thread that owns the shard's redb writes.
//!
//! Proposals arrive on a bounded queue. The writer takes the first, then everything else already waiting
//! (up to `max_batch`), applies them in order in ONE write transaction with ONE durable commit (one fsync),
//! and only then answers each proposer. Under load the batch grows by itself: while one commit is being
//! flushed, the next batch queues up. A full queue is refused at once (backpressure), never waited on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use tokio::sync::oneshot;

use super::EngineError;
use crate::domain::Envelope;
use crate::state::{Applied, ShardStore};

pub(crate) struct Proposal {
    pub envelope: Envelope,
    pub reply: oneshot::Sender<Result<Applied, EngineError>>,
}

pub(crate) struct Writer {
    pub store: Arc<ShardStore>,
    pub queue: Receiver<Proposal>,
    pub max_batch: usize,
    /// Set when a commit failed: the shard stops taking writes rather than risk diverging from its disk.
    pub failed: Arc<AtomicBool>,
}

impl Writer {
    /// Runs until every sender of the queue is gone, answering everything that was queued before that.
    pub fn run(self) {
        let shard = self.store.shard().to_string();
        while let Ok(first) = self.queue.recv() {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match self.queue.try_recv() {
                    Ok(proposal) => batch.push(proposal),
                    Err(_) => break,
                }
            }
            if self.failed.load(Ordering::Acquire) {
                reply_all(batch, || {
                    EngineError::Unavailable("the shard stopped after a storage failure".into())
                });
                continue;
            }
            metrics::histogram!("shopkeep_shard_batch_size", "shard" => shard.clone())
                .record(batch.len() as f64);
            let started = Instant::now();
            self.commit_batch(batch);
            metrics::histogram!("shopkeep_shard_commit_seconds", "shard" => shard.clone())
                .record(started.elapsed().as_secs_f64());
        }
        tracing::debug!(shard = %shard, "writer stopped");
    }

    fn commit_batch(&self, batch: Vec<Proposal>) {
        let envelopes: Vec<&Envelope> = batch.iter().map(|p| &p.envelope).collect();
        match catch_unwind(AssertUnwindSafe(|| self.store.apply_batch(&envelopes))) {
            Ok(Ok(applied)) => {
                debug_assert_eq!(applied.len(), batch.len());
                for (proposal, applied) in batch.into_iter().zip(applied) {
                    // A proposer that gave up waiting still has its outcome stored under its key.
                    let _ = proposal.reply.send(Ok(applied));
                }
            }
            Ok(Err(error)) => {
                tracing::error!(shard = self.store.shard(), %error, "commit failed; the shard stops taking writes");
                self.failed.store(true, Ordering::Release);
                reply_all(batch, || EngineError::Unavailable("storage failure".into()));
            }
            Err(_) if batch.len() > 1 => {
                // A command panicked (a bug). The transaction was dropped, so nothing of the batch is on
                // disk; apply the commands one by one so that only the culprit fails.
                tracing::error!(
                    shard = self.store.shard(),
                    "apply panicked; retrying the batch one by one"
                );
                for proposal in batch {
                    self.commit_batch(vec![proposal]);
                }
            }
            Err(_) => {
                tracing::error!(
                    shard = self.store.shard(),
                    command = batch[0].envelope.command.name(),
                    "apply panicked"
                );
                reply_all(batch, || {
                    EngineError::Internal("the command could not be applied".into())
                });
            }
        }
    }
}

fn reply_all(batch: Vec<Proposal>, error: impl Fn() -> EngineError) {
    for proposal in batch {
        let _ = proposal.reply.send(Err(error()));
    }
}
