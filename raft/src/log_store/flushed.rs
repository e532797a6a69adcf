//! How far a shard's log is durable in the write-ahead file ([`Flushed`]): what lets a leader tell
//! openraft its own appends are flushed before they are, and still count for nothing it has not made
//! durable.
//!
//! openraft 0.9's core awaits each append's flush before it sends the entries to the followers, so on
//! a leader the log's fsync and the replication round trip add up. A leader's append of entries of its
//! own term is therefore acknowledged to openraft as soon as it is in the mirror and queued to the
//! writer (`LogStore::append`); the fsync then runs while the followers receive and write the entries.
//! openraft counts the leader in the majority at once, so its committed index may name entries that are
//! durable on fewer members than a majority. Two rules keep that index from being used before they are:
//! - the shard's state machine applies an entry only once it is durable here ([`Flushed::wait_for`]):
//!   no reply, read or snapshot of this node reflects it before;
//! - the committed index sent to followers is never past this node's durable log
//!   ([`Flushed::clamp`], in `network`): no follower applies it before.
//!
//! An entry openraft takes for committed is then applied anywhere only once the leader holds it
//! durably and so do the followers openraft counted (their acknowledgements are sent after their
//! fsync): a majority. Raft's thesis (§10.2.1) describes the same leader writing in parallel.

use std::sync::Arc;

use openraft::storage::LogFlushed;
use tokio::sync::watch;

use crate::{LogId, TypeConfig};

/// The newest entry of one shard's log known durable (shared by its log store, state machine and
/// network; cheap to clone).
#[derive(Clone)]
pub struct Flushed {
    mark: Arc<watch::Sender<Mark>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Mark {
    /// The index of the newest durable entry (`None`: none).
    index: Option<u64>,
    /// Its id, when known (not after a truncation, until the next append is durable).
    last: Option<LogId>,
    /// A write of the log failed: what waits for it never gets it.
    failed: bool,
}

impl Flushed {
    /// `last`: the newest entry of the log as opened (it is durable).
    pub(super) fn new(last: Option<LogId>) -> Flushed {
        let (mark, _) = watch::channel(Mark {
            index: last.map(|last| last.index),
            last,
            failed: false,
        });
        Flushed {
            mark: Arc::new(mark),
        }
    }

    /// The entries up to `last` are durable.
    pub(super) fn raise(&self, last: LogId) {
        self.mark.send_if_modified(|mark| {
            let newer = mark.index.is_none_or(|index| index < last.index);
            if newer {
                mark.index = Some(last.index);
                mark.last = Some(last);
            }
            newer
        });
    }

    /// The entries at and after `from` are gone; those before it stay durable.
    pub(super) fn truncated(&self, from: u64) {
        self.mark.send_if_modified(|mark| {
            let gone = mark.index.is_some_and(|index| index >= from);
            if gone {
                mark.index = from.checked_sub(1);
                mark.last = None;
            }
            gone
        });
    }

    /// An append acknowledged before it was durable could not be written.
    pub(super) fn fail(&self) {
        self.mark.send_modify(|mark| mark.failed = true);
    }

    /// Waits until the entry at `index` is durable; `Err` when a write of the log failed.
    pub async fn wait_for(&self, index: u64) -> Result<(), String> {
        let mut seen = self.mark.subscribe();
        let mark = seen
            .wait_for(|mark| mark.failed || mark.index.is_some_and(|known| known >= index))
            .await
            .map_err(|_| "the shard's log closed".to_string())?;
        if mark.failed {
            return Err("a write of the shard's log failed".into());
        }
        Ok(())
    }

    /// `committed`, or the newest durable entry if that is older (none, if its id is not known): what
    /// a follower may be told is committed.
    pub fn clamp(&self, committed: Option<LogId>) -> Option<LogId> {
        let mark = *self.mark.borrow();
        match committed {
            Some(committed) if mark.index.is_none_or(|index| index < committed.index) => mark.last,
            _ => committed,
        }
    }
}

/// Tells openraft an append of the leader's own entries is flushed before it is (see the module docs):
/// they are in the mirror, and queued to the writer in openraft's order.
pub(super) fn acknowledge_early(flushed: LogFlushed<TypeConfig>) {
    flushed.log_io_completed(Ok(()));
    metrics::counter!(crate::metrics::LOG_EARLY_ACKS).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(term: u64, index: u64) -> LogId {
        openraft::LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
    }

    #[tokio::test]
    async fn an_entry_is_waited_for_until_its_append_is_durable_and_followers_are_told_no_further()
    {
        let flushed = Flushed::new(Some(log_id(1, 3)));
        assert_eq!(flushed.clamp(Some(log_id(1, 5))), Some(log_id(1, 3)));
        assert_eq!(flushed.clamp(Some(log_id(1, 2))), Some(log_id(1, 2)));
        assert_eq!(flushed.clamp(None), None);
        flushed.wait_for(3).await.expect("entry 3 is durable");

        let waiting = tokio::spawn({
            let flushed = flushed.clone();
            async move { flushed.wait_for(5).await }
        });
        flushed.raise(log_id(1, 4));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "entry 5 is not durable yet");
        flushed.raise(log_id(1, 5));
        waiting.await.expect("join").expect("entry 5 is durable");
        flushed.raise(log_id(1, 4));
        assert_eq!(
            flushed.clamp(Some(log_id(1, 9))),
            Some(log_id(1, 5)),
            "never moves back"
        );

        flushed.truncated(6);
        assert_eq!(
            flushed.clamp(Some(log_id(1, 9))),
            Some(log_id(1, 5)),
            "a truncation past it keeps it"
        );
        flushed.truncated(5);
        flushed
            .wait_for(4)
            .await
            .expect("what comes before a truncation stays durable");
        assert_eq!(flushed.clamp(Some(log_id(1, 4))), Some(log_id(1, 4)));
        assert_eq!(
            flushed.clamp(Some(log_id(1, 5))),
            None,
            "entry 4's id is not known here"
        );
        flushed.raise(log_id(2, 5));
        assert_eq!(flushed.clamp(Some(log_id(2, 6))), Some(log_id(2, 5)));

        let failing = tokio::spawn({
            let flushed = flushed.clone();
            async move { flushed.wait_for(7).await }
        });
        flushed.fail();
        assert!(failing.await.expect("join").is_err());
    }
}
