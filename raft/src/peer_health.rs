//! Whether each peer answers this node's calls, reported as changes rather than per failed call.
//!
//! A peer that has failed every call for [`GRACE`] is reported once (WARN `peer unreachable`), then
//! reminded of at most once per [`REMINDER`] while it stays so (WARN `peer still unreachable`), and
//! reported once more when a call succeeds again (INFO `peer reachable again`). A call that fails once
//! in between successes (a slow answer under load) is not reported at all. openraft's own per-retry
//! errors about a peer are left out of the default log (`shopkeep::logging`): these lines replace them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a peer must fail every call before it is reported unreachable.
pub const GRACE: Duration = Duration::from_secs(1);
/// Least time between two reports of the same unreachable peer.
pub const REMINDER: Duration = Duration::from_secs(60);

/// What a call's result changes in how a peer is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// It has failed every call for `GRACE`: it went.
    Gone,
    /// Still failing, and the last report is `REMINDER` old: down this long.
    StillGone(Duration),
    /// Answered again after it was reported gone, down this long.
    Back(Duration),
}

/// A peer that is failing its calls.
#[derive(Clone, Copy, Debug)]
struct Failing {
    since: Instant,
    /// When it was last reported (gone or still gone); `None`: not yet.
    reported: Option<Instant>,
}

/// The failing peers, by address.
#[derive(Default)]
pub struct PeerHealth {
    failing: Mutex<HashMap<String, Failing>>,
}

impl PeerHealth {
    /// A call to `addr` (node `peer`, if known) succeeded: logs it back if it was reported gone.
    pub fn answered(&self, addr: &str, peer: Option<u64>) {
        if let Some(report) = self.observe(addr, true, Instant::now()) {
            log(report, addr, peer, "");
        }
    }

    /// A call to `addr` (node `peer`, if known) could not be made: logs it once it counts as gone,
    /// and the reminders.
    pub fn failed(&self, addr: &str, peer: Option<u64>, reason: &str) {
        if let Some(report) = self.observe(addr, false, Instant::now()) {
            log(report, addr, peer, reason);
        }
    }

    /// Whether the last call to `addr` failed.
    pub fn is_failing(&self, addr: &str) -> bool {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(addr)
    }

    /// What a call's outcome at `now` changes (the state machine behind the two above).
    pub fn observe(&self, addr: &str, answered: bool, now: Instant) -> Option<Report> {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if answered {
            let was = failing.remove(addr)?;
            return was
                .reported
                .map(|_| Report::Back(now.saturating_duration_since(was.since)));
        }
        let state = failing.entry(addr.to_owned()).or_insert(Failing {
            since: now,
            reported: None,
        });
        let down_for = now.saturating_duration_since(state.since);
        match state.reported {
            None if down_for >= GRACE => {
                state.reported = Some(now);
                Some(Report::Gone)
            }
            Some(last) if now.saturating_duration_since(last) >= REMINDER => {
                state.reported = Some(now);
                Some(Report::StillGone(down_for))
            }
            _ => None,
        }
    }
}

fn log(report: Report, addr: &str, peer: Option<u64>, reason: &str) {
    let peer = peer.map_or_else(|| "?".to_owned(), |id| id.to_string());
    match report {
        Report::Gone => tracing::warn!(%peer, addr, reason, "peer unreachable"),
        Report::StillGone(down) => {
            tracing::warn!(%peer, addr, down_for = ?down, reason, "peer still unreachable");
        }
        Report::Back(down) => tracing::info!(%peer, addr, down_for = ?down, "peer reachable again"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_reported_once_when_it_goes_reminded_once_a_minute_and_once_when_it_returns() {
        let health = PeerHealth::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut reports = Vec::new();
        // Failing every 50 ms for three minutes.
        for ms in (0..180_000).step_by(50) {
            reports.extend(health.observe("n2", false, at(ms)));
        }
        reports.extend(health.observe("n2", true, at(180_000)));
        reports.extend(health.observe("n2", true, at(180_050)));
        assert_eq!(
            reports,
            vec![
                Report::Gone,
                Report::StillGone(Duration::from_secs(61)),
                Report::StillGone(Duration::from_secs(121)),
                Report::Back(Duration::from_secs(180)),
            ]
        );
    }

    #[test]
    fn a_single_failure_between_answers_is_not_reported() {
        let health = PeerHealth::default();
        let t0 = Instant::now();
        assert_eq!(health.observe("n2", false, t0), None);
        assert_eq!(
            health.observe("n2", true, t0 + Duration::from_millis(300)),
            None
        );
        assert_eq!(
            health.observe("n2", false, t0 + Duration::from_millis(1_500)),
            None
        );
    }
}
