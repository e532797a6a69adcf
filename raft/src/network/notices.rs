//! Commit notices held back: the appends without entries that one shard's replication stream sends one
//! follower, answered at once when the follower already confirmed what they carry, and sent a little later
//! unless the stream's next call makes them needless.
//!
//! openraft 0.9's replication stream sends a follower an append without entries whenever it has nothing
//! else to send: after every commit (to tell the new commit index) and on every heartbeat. It waits for
//! the answer before it sends the next entries, and at load a notice is a third of the node calls. Such a
//! notice asks the follower to confirm only what it confirmed last (the same leader's vote, the same last
//! entry), so when it did, within [`FRESH`], the stream gets that answer back at once and the notice is
//! held here; the stream's next call carries a newer commit index and replaces it, and what nothing
//! replaced is sent [`HOLD`] (or one heartbeat, if shorter) after the first such notice was held, the
//! latest notice then. So a follower learns a commit with the next entries or at most that much later,
//! and hears from its leader as often as before.
//!
//! Nothing the leader decides rests on a held notice's answer:
//! - A commit counts a follower only for entries it acknowledged; an append without entries moves nothing.
//! - The read barrier's leadership check (openraft's `get_read_log_id`) asks each follower through a
//!   network client made for that check, which has no confirmation yet: its calls are never held.
//! - A held notice's real answer, when it is not a plain success (a higher vote, a conflict after the
//!   follower lost its data, no answer), forgets the confirmation, so the stream's next call goes out
//!   and gets that answer itself.

use std::time::{Duration, Instant};

use openraft::raft::AppendEntriesRequest;

use crate::{LogId, TypeConfig, Vote};

/// How long a notice is held before it is sent if nothing replaced it (less with a shorter heartbeat,
/// [`hold_for`]).
pub const HOLD: Duration = Duration::from_millis(10);
/// How recent the follower's last confirmation must be for a notice to be answered from it.
pub const FRESH: Duration = Duration::from_millis(250);

/// How long notices are held with heartbeats every `heartbeat`: [`HOLD`], or one heartbeat when that is
/// shorter, so a follower hears from its leader as often as it would without holding (its election
/// timeout is at least three heartbeats).
pub fn hold_for(heartbeat: Duration) -> Duration {
    HOLD.min(heartbeat)
}

/// What one follower last confirmed to one shard's stream, the notice held back for it, and whether a
/// task is due to send it.
pub struct Notices {
    hold: Duration,
    confirmed: Option<Confirmed>,
    held: Option<Held>,
    scheduled: bool,
}

/// The follower answered a success to the leader's `vote` for the log up to `last`, at `at`.
struct Confirmed {
    vote: Vote,
    last: Option<LogId>,
    at: Instant,
}

/// A notice answered at once at `since`, still to be sent (within `ttl` once it is).
pub struct Held {
    pub rpc: AppendEntriesRequest<TypeConfig>,
    pub ttl: Duration,
    since: Instant,
}

/// What the task that sends held notices does next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Sleep this long: the held notice is younger than `hold`.
    Wait(Duration),
    /// Send the notice: it was held for `hold`.
    Send,
    /// Stop: nothing is held (the stream's next call carried it).
    Stop,
}

impl Notices {
    /// Holds notices for `hold` ([`hold_for`]).
    pub fn new(hold: Duration) -> Notices {
        Notices {
            hold,
            confirmed: None,
            held: None,
            scheduled: false,
        }
    }

    /// Whether `rpc` asks the follower only what it confirmed within [`FRESH`] before `now`: no entries,
    /// the same vote, the same last entry.
    pub fn answers(&self, rpc: &AppendEntriesRequest<TypeConfig>, now: Instant) -> bool {
        rpc.entries.is_empty()
            && self.confirmed.as_ref().is_some_and(|confirmed| {
                confirmed.vote == rpc.vote
                    && confirmed.last == rpc.prev_log_id
                    && now.saturating_duration_since(confirmed.at) < FRESH
            })
    }

    /// Holds `rpc` (answered at once) in place of any notice held before, which it supersedes: a leader's
    /// commit index never moves back. It goes out `hold` after the first notice nothing carried was held,
    /// so notices that come faster than that (a short heartbeat) still reach the follower. True when no task
    /// is due to send it yet: the caller starts one.
    pub fn hold(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
        now: Instant,
    ) -> bool {
        let since = self.held.as_ref().map_or(now, |held| held.since);
        self.held = Some(Held { rpc, ttl, since });
        !std::mem::replace(&mut self.scheduled, true)
    }

    /// Drops the held notice: the call about to be sent carries a newer commit index.
    pub fn supersede(&mut self) {
        self.held = None;
    }

    /// For the sending task at `now`: what to do next.
    pub fn next(&mut self, now: Instant) -> Next {
        match &self.held {
            None => {
                self.scheduled = false;
                Next::Stop
            }
            Some(held) if now < held.since + self.hold => Next::Wait(held.since + self.hold - now),
            Some(_) => Next::Send,
        }
    }

    /// Takes the held notice to send it (after [`Next::Send`]); the task stops after it.
    pub fn take(&mut self) -> Option<Held> {
        self.scheduled = false;
        self.held.take()
    }

    /// Records the follower's answer to a call sent for `vote` up to `last`: a success confirms it; any
    /// other answer, or none, forgets what was confirmed.
    pub fn answered(&mut self, vote: &Vote, last: Option<LogId>, success: bool, now: Instant) {
        self.confirmed = success.then_some(Confirmed {
            vote: *vote,
            last,
            at: now,
        });
    }
}

/// The last entry a follower holds once it accepts `rpc`.
pub fn last_of(rpc: &AppendEntriesRequest<TypeConfig>) -> Option<LogId> {
    rpc.entries
        .last()
        .map(|entry| entry.log_id)
        .or(rpc.prev_log_id)
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::Entry;

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn append(
        vote: Vote,
        prev: Option<LogId>,
        entries: &[LogId],
        commit: u64,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote,
            prev_log_id: prev,
            entries: entries
                .iter()
                .map(|id| Entry {
                    log_id: *id,
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(log_id(2, commit)),
        }
    }

    fn leader(term: u64) -> Vote {
        let mut vote = Vote::new(term, 1);
        vote.commit();
        vote
    }

    #[test]
    fn a_client_that_has_no_confirmation_answers_nothing_itself() {
        let notices = Notices::new(HOLD);
        let now = Instant::now();
        assert!(!notices.answers(&append(leader(2), Some(log_id(2, 5)), &[], 5), now));
    }

    #[test]
    fn a_notice_is_answered_only_for_the_vote_and_last_entry_the_follower_confirmed() {
        let mut notices = Notices::new(HOLD);
        let now = Instant::now();
        let sent = append(leader(2), Some(log_id(2, 4)), &[log_id(2, 5)], 4);
        notices.answered(&sent.vote, last_of(&sent), true, now);

        assert!(notices.answers(&append(leader(2), Some(log_id(2, 5)), &[], 5), now));
        assert!(
            !notices.answers(&append(leader(2), Some(log_id(2, 4)), &[], 5), now),
            "another last entry"
        );
        assert!(
            !notices.answers(&append(leader(3), Some(log_id(2, 5)), &[], 5), now),
            "another vote"
        );
        assert!(
            !notices.answers(
                &append(leader(2), Some(log_id(2, 5)), &[log_id(2, 6)], 5),
                now
            ),
            "entries are always sent"
        );
        assert!(
            !notices.answers(&append(leader(2), Some(log_id(2, 5)), &[], 5), now + FRESH),
            "a confirmation older than FRESH"
        );
    }

    #[test]
    fn an_answer_other_than_success_forgets_the_confirmation() {
        let mut notices = Notices::new(HOLD);
        let now = Instant::now();
        let notice = append(leader(2), Some(log_id(2, 5)), &[], 5);
        notices.answered(&notice.vote, last_of(&notice), true, now);
        assert!(notices.answers(&notice, now));
        notices.answered(&notice.vote, last_of(&notice), false, now);
        assert!(!notices.answers(&notice, now));
    }

    #[test]
    fn a_held_notice_is_sent_hold_after_the_first_one_nothing_carried_unless_superseded() {
        let mut notices = Notices::new(HOLD);
        let ttl = Duration::from_secs(1);
        let t0 = Instant::now();
        assert!(notices.hold(append(leader(2), Some(log_id(2, 5)), &[], 4), ttl, t0));
        assert_eq!(notices.next(t0), Next::Wait(HOLD));
        // Notices faster than HOLD (a short heartbeat) must not put the send off for ever.
        for step in 1..5u32 {
            let at = t0 + HOLD / 5 * step;
            let commit = 4 + u64::from(step);
            assert!(
                !notices.hold(append(leader(2), Some(log_id(2, 5)), &[], commit), ttl, at),
                "a task is already due"
            );
            assert_eq!(notices.next(at), Next::Wait(HOLD - HOLD / 5 * step));
        }
        assert_eq!(notices.next(t0 + HOLD), Next::Send);
        let held = notices.take().expect("held");
        assert_eq!(
            held.rpc.leader_commit,
            Some(log_id(2, 8)),
            "the latest one goes out"
        );
        assert!(notices.take().is_none());

        let t1 = t0 + HOLD * 2;
        assert!(
            notices.hold(append(leader(2), Some(log_id(2, 5)), &[], 9), ttl, t1),
            "a new task"
        );
        notices.supersede();
        assert_eq!(notices.next(t1 + HOLD), Next::Stop);
        assert!(
            notices.hold(
                append(leader(2), Some(log_id(2, 5)), &[], 10),
                ttl,
                t1 + HOLD
            ),
            "the task stopped"
        );
        assert_eq!(
            notices.next(t1 + HOLD),
            Next::Wait(HOLD),
            "a new first notice"
        );
    }

    #[test]
    fn a_heartbeat_shorter_than_hold_is_held_one_heartbeat_at_most() {
        assert_eq!(hold_for(Duration::from_millis(100)), HOLD);
        assert_eq!(hold_for(Duration::from_millis(2)), Duration::from_millis(2));
        let mut notices = Notices::new(hold_for(Duration::from_millis(2)));
        let t0 = Instant::now();
        notices.hold(
            append(leader(2), Some(log_id(2, 5)), &[], 4),
            Duration::from_secs(1),
            t0,
        );
        assert_eq!(notices.next(t0 + Duration::from_millis(2)), Next::Send);
    }
}
