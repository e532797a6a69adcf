//! The gate that holds a shard's log purge back until its state machine holds durably what the purge
//! removes (see [`PurgeGate`]).

use std::sync::Arc;

/// How far a shard's log may be purged: up to the newest log index the state machine holds durably (the
/// state it opened with, a snapshot it built, a snapshot it installed).
///
/// openraft 0.9 purges a follower's log up to a received snapshot as soon as it hands the snapshot to
/// the state machine, without waiting for the install (`install_full_snapshot` emits the state-machine
/// command and `PurgeLog` together). A crash between the durable purge and the install's commit left a
/// log purged beyond the durable state, which openraft refuses at the next start ("purge_upto <=
/// committed"): the node could never start again. The log store waits at this gate before it purges, so
/// a purge is never durable before the state that covers it.
#[derive(Clone)]
pub struct PurgeGate {
    tx: Arc<tokio::sync::watch::Sender<GateState>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct GateState {
    /// Purges up to this index (inclusive) may proceed.
    upto: Option<u64>,
    /// A snapshot install failed: purges waiting for it give up.
    failed: bool,
}

impl PurgeGate {
    /// A gate that holds purges back until the state machine reports what it holds durably.
    pub fn new() -> PurgeGate {
        PurgeGate {
            tx: Arc::new(tokio::sync::watch::channel(GateState::default()).0),
        }
    }

    /// A gate that never holds a purge back (a log store or state machine used on its own).
    pub fn open() -> PurgeGate {
        let gate = PurgeGate::new();
        gate.raise(u64::MAX);
        gate
    }

    /// The state machine holds everything up to `index` durably.
    pub(super) fn raise(&self, index: u64) {
        self.tx.send_if_modified(|s| {
            let raised = s.upto.is_none_or(|u| u < index);
            if raised {
                s.upto = Some(index);
            }
            raised
        });
    }

    pub(super) fn fail(&self) {
        self.tx.send_modify(|s| s.failed = true);
    }

    /// Waits until a purge up to `index` is covered by the durable state; `Err` if the install that
    /// would have covered it failed.
    pub async fn wait(&self, index: u64) -> Result<(), String> {
        let mut rx = self.tx.subscribe();
        let covered = |s: &GateState| s.upto.is_some_and(|u| u >= index);
        let state = *rx
            .wait_for(|s| covered(s) || s.failed)
            .await
            .map_err(|_| "the state machine is gone".to_string())?;
        if covered(&state) {
            Ok(())
        } else {
            Err(format!(
                "not purging the log up to {index}: the snapshot install that covers it failed"
            ))
        }
    }
}

impl Default for PurgeGate {
    fn default() -> Self {
        PurgeGate::new()
    }
}
