//! Whether this node's wall clock agrees with the cluster's.
//!
//! Commands carry the time of the node that stamped them, so a member whose clock runs ahead would
//! expire other players' orders early, and one behind would accept completions late. Every node call
//! already carries the caller's signed timestamp (`auth`), and every answer carries the callee's time
//! ([`TIME_HEADER`]): each gives a sample of a peer's clock offset from this node's. A node's clock
//! *agrees* when a majority of the members, itself included, have a recent sample within
//! [`MAX_CLOCK_OFFSET`]. A node whose clock does not agree stamps no time: the application refuses its
//! writes and its background sweeps until it does again (see `ClockVerdict`).
//!
//! A sample counts only while this node's own clock has not stepped since it was taken (its offset from
//! the monotonic clock is unchanged): the moment this node's clock jumps, what it knew of the others is
//! void, and it stamps nothing until fresh samples (every heartbeat brings some) say it agrees.
//!
//! A cluster of one always agrees with itself: a single node cannot tell that its clock is wrong.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::NodeId;

/// The header of a node call's answer that carries the callee's wall-clock time (unix microseconds).
pub const TIME_HEADER: &str = "x-shopkeep-node-time";
/// The largest offset between two members' clocks under which they agree.
pub const MAX_CLOCK_OFFSET: Duration = Duration::from_secs(2);
/// How long a sample counts: a peer not heard from for longer is not known to agree.
pub const SAMPLE_LIFETIME: Duration = Duration::from_secs(5);

/// This node's time now, in unix microseconds: the wall clock, but never behind the wall clock at the
/// process's start plus the (monotonic) time it has run since, so a wall clock set back does not take
/// the node's stamps back. The application stamps its commands the same way (`Timestamp::now`).
pub fn unix_micros() -> i64 {
    Reading::now().unix_micros
}

/// The latest clock sample of each peer.
#[derive(Default)]
pub struct ClockWatch {
    samples: Mutex<BTreeMap<NodeId, Sample>>,
}

#[derive(Clone, Copy)]
struct Sample {
    /// The peer's clock minus this node's, in microseconds.
    offset_micros: i64,
    at: Instant,
    /// The reading of this node's clock the offset was measured against: if this node's clock stepped
    /// since, the sample says nothing about it any more.
    measured: Reading,
}

/// How far this node's clock may drift from its monotonic clock during a sample's lifetime without
/// counting as a step (time servers slew clocks by at most 0.05 %).
const MAX_DRIFT_MICROS: i64 = 100_000;

/// One reading of this node's clock: the time `unix_micros` gives, and its anchor (that time minus the
/// monotonic time since the process started), from ONE read of the wall clock. A sample must carry the
/// anchor of the reading its offset was measured with: an anchor read later could come after a step of
/// this node's clock, and an offset measured before the step would then count as measured after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub unix_micros: i64,
    anchor_micros: i64,
}

impl Reading {
    /// The clock now: the time [`unix_micros`] gives and its anchor, from one read of each clock.
    pub fn now() -> Reading {
        static START: OnceLock<(i64, Instant)> = OnceLock::new();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let (start_wall, start) = *START.get_or_init(|| (wall, Instant::now()));
        let running = i64::try_from(start.elapsed().as_micros()).unwrap_or(i64::MAX);
        let unix_micros = wall.max(start_wall.saturating_add(running));
        Reading {
            unix_micros,
            anchor_micros: unix_micros.saturating_sub(running),
        }
    }

    /// A reading at `unix_micros` with anchor 0 (tests).
    #[cfg(test)]
    pub(crate) fn at(unix_micros: i64) -> Reading {
        Reading {
            unix_micros,
            anchor_micros: 0,
        }
    }

    /// Whether this node's clock stepped between `self` and `later`.
    fn stepped_before(&self, later: &Reading) -> bool {
        self.anchor_micros.abs_diff(later.anchor_micros) > MAX_DRIFT_MICROS.unsigned_abs()
    }
}

/// What this node knows of its clock against the members'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockVerdict {
    /// A majority of the members (this node included) agree with this node's clock.
    pub agrees: bool,
    /// Members known to agree, this node included.
    pub agreeing: usize,
    pub members: usize,
    /// The latest offset of each peer with a recent sample (peer minus this node), in milliseconds.
    pub offsets_ms: BTreeMap<NodeId, i64>,
}

impl ClockVerdict {
    /// Why a node with this verdict stamps no time, for clients and operators.
    pub fn reason(&self) -> String {
        format!(
            "this node's clock does not agree with the cluster's (within {} s: {} of {} members; offsets of the others in ms: {:?}); it serves no writes and no user data until it does: check NTP",
            MAX_CLOCK_OFFSET.as_secs(),
            self.agreeing,
            self.members,
            self.offsets_ms
        )
    }
}

impl ClockWatch {
    /// Records that `peer`'s clock reads `offset_micros` ahead of this node's (negative: behind), as
    /// measured against this node's clock reading `at`.
    pub fn observe(&self, peer: NodeId, offset_micros: i64, at: Reading) {
        let sample = Sample {
            offset_micros,
            at: Instant::now(),
            measured: at,
        };
        self.samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(peer, sample);
    }

    /// Records the answer of a call sent at `sent` and answered at `received` (this node's clock
    /// readings), stamped `peer_time` by the peer: the peer's clock against the call's midpoint. A call
    /// across a step of this node's clock tells nothing and is not recorded.
    pub fn observe_answer(&self, peer: NodeId, sent: Reading, received: Reading, peer_time: i64) {
        if sent.stepped_before(&received) {
            return;
        }
        let midpoint = sent.unix_micros + (received.unix_micros - sent.unix_micros) / 2;
        self.observe(peer, peer_time - midpoint, received);
    }

    /// Whether `peer` was heard from within [`SAMPLE_LIFETIME`]: it answered a call of this node's, or
    /// one of its calls arrived (the samples of both ways). Whatever its clock says: this is reachability.
    pub fn heard_recently(&self, peer: NodeId) -> bool {
        self.samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&peer)
            .is_some_and(|sample| sample.at.elapsed() <= SAMPLE_LIFETIME)
    }

    /// The verdict for `me` among `members` (`me` included).
    pub fn verdict(&self, me: NodeId, members: impl IntoIterator<Item = NodeId>) -> ClockVerdict {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bound = i64::try_from(MAX_CLOCK_OFFSET.as_micros()).unwrap_or(i64::MAX);
        let now = Reading::now();
        let (mut agreeing, mut count) = (0, 0);
        let mut offsets_ms = BTreeMap::new();
        for member in members {
            count += 1;
            if member == me {
                agreeing += 1;
                continue;
            }
            let Some(sample) = samples.get(&member) else {
                continue;
            };
            // Too old, or taken before this node's own clock stepped: it no longer tells.
            if sample.at.elapsed() > SAMPLE_LIFETIME || sample.measured.stepped_before(&now) {
                continue;
            }
            offsets_ms.insert(member, sample.offset_micros / 1000);
            if sample.offset_micros.abs() <= bound {
                agreeing += 1;
            }
        }
        ClockVerdict {
            agrees: agreeing * 2 > count,
            agreeing,
            members: count,
            offsets_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reading of the clock now, at `unix_micros`.
    fn now_at(unix_micros: i64) -> Reading {
        Reading {
            unix_micros,
            ..Reading::now()
        }
    }

    /// A reading taken before this node's clock stepped `step_micros` (so its anchor is that much off).
    fn before_a_step_of(step_micros: i64) -> Reading {
        let now = Reading::now();
        Reading {
            unix_micros: now.unix_micros - step_micros,
            anchor_micros: now.anchor_micros - step_micros,
        }
    }

    #[test]
    fn a_node_agrees_when_a_majority_is_within_the_bound() {
        let watch = ClockWatch::default();
        assert!(watch.verdict(1, [1]).agrees, "a cluster of one agrees");
        assert!(!watch.verdict(1, [1, 2, 3]).agrees, "nothing known yet");
        watch.observe(2, 1_500_000, Reading::now());
        assert!(watch.verdict(1, [1, 2, 3]).agrees, "2 of 3 within 2 s");
        watch.observe(2, 3_000_000, Reading::now());
        watch.observe(3, -30_000_000, Reading::now());
        let verdict = watch.verdict(1, [1, 2, 3]);
        assert!(!verdict.agrees);
        assert_eq!(
            verdict.offsets_ms,
            BTreeMap::from([(2, 3_000), (3, -30_000)])
        );
        watch.observe(3, 0, Reading::now());
        assert!(watch.verdict(1, [1, 2, 3]).agrees);
        assert!(!watch.verdict(1, [1, 2, 3, 4, 5]).agrees, "2 of 5");
    }

    #[test]
    fn a_peer_is_heard_recently_only_once_sampled_and_whatever_its_offset() {
        let watch = ClockWatch::default();
        assert!(!watch.heard_recently(2), "never heard from");
        watch.observe(2, 3_600_000_000, Reading::now());
        assert!(watch.heard_recently(2), "an hour off, but it answered");
        if let Some(sample) = watch.samples.lock().expect("lock").get_mut(&2) {
            sample.at -= SAMPLE_LIFETIME + Duration::from_millis(1);
        }
        assert!(!watch.heard_recently(2), "too long ago");
    }

    #[test]
    fn a_sample_taken_before_this_nodes_clock_stepped_no_longer_counts() {
        let watch = ClockWatch::default();
        watch.observe(2, 0, Reading::now());
        assert!(watch.verdict(1, [1, 2, 3]).agrees);
        // As if this node's clock had stepped 30 s ahead since the sample was taken.
        if let Some(sample) = watch.samples.lock().expect("lock").get_mut(&2) {
            sample.measured.anchor_micros -= 30_000_000;
        }
        assert!(!watch.verdict(1, [1, 2, 3]).agrees);
    }

    #[test]
    fn an_answer_is_judged_against_the_calls_midpoint() {
        let watch = ClockWatch::default();
        watch.observe_answer(2, now_at(1_000_000), now_at(1_200_000), 1_100_000);
        assert_eq!(watch.verdict(1, [1, 2]).offsets_ms.get(&2), Some(&0));
    }

    #[test]
    fn an_offset_read_before_this_nodes_clock_stepped_does_not_count_once_recorded_after_it() {
        // The offset was measured with the clock before a 30 s step, and recorded after it: the
        // sample must carry the anchor of that measurement, or the stepped clock would agree with it.
        let watch = ClockWatch::default();
        watch.observe(2, 0, before_a_step_of(30_000_000));
        assert!(!watch.verdict(1, [1, 2, 3]).agrees);
    }

    #[test]
    fn a_call_across_a_step_of_this_nodes_clock_is_not_recorded() {
        let watch = ClockWatch::default();
        let sent = before_a_step_of(30_000_000);
        let received = Reading::now();
        watch.observe_answer(2, sent, received, received.unix_micros);
        assert!(
            !watch.heard_recently(2),
            "no sample from a call across a step"
        );
        watch.observe_answer(
            2,
            now_at(received.unix_micros),
            Reading::now(),
            received.unix_micros,
        );
        assert!(
            watch.heard_recently(2),
            "a call within one clock is recorded"
        );
    }
}
