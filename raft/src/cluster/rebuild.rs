//! Bringing back a member that lost its data, without letting it break the quorum it belonged to.
//!
//! Raft's safety rests on every member keeping, durably, what it promised: its vote, its term and the
//! entries it acknowledged. A member whose data dir was wiped (or replaced by an empty disk) under the
//! same node id has forgotten all three. Taking part at once, it could
//! - vote twice in one term;
//! - accept a deposed leader (it forgot the newer term) and help it commit over committed entries;
//! - vote for, or stand as, a candidate that lacks entries committed with its own, now lost,
//!   acknowledgements: a leader without acknowledged writes gets elected. (An early chaos run did
//!   exactly this; `chaos::a_wiped_member_does_not_help_elect_a_leader_that_lacks_acknowledged_writes`
//!   reproduces it.)
//!
//! So in a cluster of more than one node, a shard that opens empty is **quarantined**, with a durable
//! mark beside its log (`rebuild` in the log file), and climbs back in three steps:
//! 1. [`Mark::Quarantined`]: it answers no append, snapshot or vote, and does not stand. It asks the
//!    peers for the shard's *floor*: the leader's term and last log index, read after the leader
//!    confirmed its leadership with a quorum, which cannot include this node since it refuses the
//!    leader's heartbeats. That leader's log holds every entry committed so far, including any
//!    committed with this node's lost acknowledgements (a majority without this node meets every
//!    majority that committed something in a node that still has it).
//! 2. [`Mark::CatchingUp`]: it accepts appends and snapshots from leaders of the floor's term or later
//!    only (once it accepted one, openraft keeps the term itself), and still neither votes nor stands,
//!    until its log reaches the floor's index. If it makes no progress for a while (that leader lost
//!    its place), it asks for a fresh floor.
//! 3. [`Mark::Member`]: a full member again.
//!
//! The mark survives restarts, so a node that crashes while rebuilding resumes where it was. Two
//! exceptions to "empty means quarantined": every node of a new cluster opens empty, and lifts its
//! marks when it sees a majority of its peers pristine, or when the node that forms the cluster tells
//! it so ([`NodeRequest::Forming`]); and when a cluster is restored from one member's backup, the
//! members emptied on purpose are told so by the operator (`ClusterConfig::trust_empty_shards`), since
//! the backup is the only truth left; those never form a cluster among themselves (`formation`), which
//! would start an empty shop whose first terms clash with the restored log's.
//!
//! The price: while a member rebuilds, its shard needs a majority of the *other* members, as it must,
//! since the data it rebuilds from lives only there.

use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::log_store::{LogDb, LogDbError};
use crate::rpc::{NodeRequest, NodeResponse, Refusal};

/// Where a shard's replica on this node stands in the rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mark {
    /// Takes part in everything.
    Member,
    /// Lost its data (or never had any): takes part in nothing until a floor is known.
    Quarantined,
    /// Follows leaders of `term` or later; neither votes nor stands until its log reaches `index`.
    CatchingUp { term: u64, index: u64 },
}

impl Mark {
    /// Whether a leader of `term` may append to (or send a snapshot to) this replica.
    pub fn admits_leader(self, term: u64) -> bool {
        match self {
            Mark::Member => true,
            Mark::Quarantined => false,
            Mark::CatchingUp { term: floor, .. } => term >= floor,
        }
    }

    /// Whether this replica may vote and stand for election.
    pub fn takes_part_in_elections(self) -> bool {
        self == Mark::Member
    }

    /// The name shown in the cluster status.
    pub fn label(self) -> &'static str {
        match self {
            Mark::Member => "none",
            Mark::Quarantined => "awaiting_leader",
            Mark::CatchingUp { .. } => "catching_up",
        }
    }
}

/// The key of the mark beside each shard's log.
const MARK_KEY: &str = "rebuild";
/// How often a rebuilding shard looks at its progress.
const POLL: Duration = Duration::from_millis(200);
/// How long a shard that is catching up may make no progress before it asks for a fresh floor.
const STALL: Duration = Duration::from_secs(5);
/// How long one floor request may take.
const FLOOR_TIMEOUT: Duration = Duration::from_secs(2);

/// Every shard's mark: read without waiting, changed one at a time and durably.
pub struct Marks {
    db: LogDb,
    marks: Mutex<Vec<Mark>>,
    changing: tokio::sync::Mutex<()>,
}

impl Marks {
    pub fn new(db: LogDb, shards: u32) -> Marks {
        Marks {
            db,
            marks: Mutex::new(vec![Mark::Member; shards as usize]),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// Decides `shard`'s mark as it opens: a pristine shard is quarantined if `quarantine_if_empty` (a
    /// cluster, not being restored from a backup); any other keeps the mark it had (a node that crashed
    /// mid-rebuild resumes).
    pub async fn open_shard(
        &self,
        shard: u32,
        pristine: bool,
        quarantine_if_empty: bool,
    ) -> Result<Mark, LogDbError> {
        let stored = match self.db.read_state(shard, MARK_KEY)? {
            Some(bytes) => Some(
                crate::decode::<Mark>(&bytes).map_err(|e| LogDbError::Corrupt(e.to_string()))?,
            ),
            None => None,
        };
        let mark = match (pristine, quarantine_if_empty) {
            (true, true) => Mark::Quarantined,
            (true, false) => Mark::Member,
            (false, _) => stored.unwrap_or(Mark::Member),
        };
        self.change(shard, |_| Some(mark)).await?;
        Ok(mark)
    }

    pub fn get(&self, shard: u32) -> Mark {
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.get(shard as usize).copied().unwrap_or(Mark::Member)
    }

    /// Moves `shard` to what `next` makes of its current mark (`None`: no change), durably before
    /// anyone sees it. Returns the new mark if it changed.
    pub async fn change(
        &self,
        shard: u32,
        next: impl FnOnce(Mark) -> Option<Mark>,
    ) -> Result<Option<Mark>, LogDbError> {
        let _one_at_a_time = self.changing.lock().await;
        let current = self.get(shard);
        let Some(mark) = next(current).filter(|mark| *mark != current) else {
            return Ok(None);
        };
        let stored = self.db.read_state(shard, MARK_KEY)?;
        let bytes = crate::encode(&mark).map_err(|e| LogDbError::Write(e.to_string()))?;
        // A member's mark is only written if another was stored: clusters that never rebuilt stay as
        // they were.
        if stored.is_some() || mark != Mark::Member {
            self.db.write_state(shard, MARK_KEY, bytes).await?;
        }
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = marks.get_mut(shard as usize) {
            *slot = mark;
        }
        Ok(Some(mark))
    }
}

impl Cluster {
    /// Moves `shard` to a new mark (see [`Marks::change`]) and lets its replica stand for election
    /// only as a member.
    pub(super) async fn change_mark(&self, shard: u32, next: impl FnOnce(Mark) -> Option<Mark>) {
        match self.marks.change(shard, next).await {
            Ok(Some(mark)) => {
                if let Some(replica) = self.replicas.get(shard as usize) {
                    replica
                        .raft
                        .runtime_config()
                        .elect(mark.takes_part_in_elections());
                }
                tracing::info!(shard, ?mark, "rebuild mark changed");
            }
            Ok(None) => {}
            Err(error) => tracing::error!(shard, %error, "cannot store the rebuild mark"),
        }
    }

    /// A new cluster is being formed: its first elections need every node, so no shard stays
    /// quarantined. Only for a node that holds nothing.
    pub(super) async fn lift_marks_for_new_cluster(&self) {
        if self.any_initialized().await {
            return;
        }
        for shard in 0..self.shard_count() {
            self.change_mark(shard, |_| Some(Mark::Member)).await;
        }
    }

    /// The floor of `shard` as its leader: its term and last log index, after a quorum confirmed it
    /// leads (see the module comment).
    pub(super) async fn floor_local(&self, shard: u32) -> Result<(u64, u64), Refusal> {
        let replica = self.replica(shard)?;
        let term_before = replica.raft.metrics().borrow().current_term;
        self.read_index_local(shard).await?;
        let metrics = replica.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader || metrics.current_term != term_before {
            return Err(Refusal::Unavailable(format!(
                "shard {shard}: leadership moved while confirming it"
            )));
        }
        Ok((term_before, metrics.last_log_index.unwrap_or(0)))
    }

    /// Asks the peers, then the leader one of them names, for `shard`'s floor.
    async fn fetch_floor(&self, shard: u32) -> Option<(u64, u64)> {
        let me = self.config.node_id;
        let ask = |addr: String| async move {
            match self
                .transport
                .call(&addr, &NodeRequest::Floor { shard }, FLOOR_TIMEOUT)
                .await
            {
                Ok(NodeResponse::Floor(answer)) => answer,
                Ok(other) => Err(Refusal::Unavailable(format!("unexpected answer {other:?}"))),
                Err(error) => Err(Refusal::Unavailable(error.to_string())),
            }
        };
        for (id, addr) in self.transport.peers() {
            if id == me {
                continue;
            }
            match ask(addr).await {
                Ok(floor) => return Some(floor),
                Err(Refusal::NotLeader {
                    leader: Some((leader, leader_addr)),
                }) if leader != me && leader != id => {
                    if let Ok(floor) = ask(leader_addr).await {
                        return Some(floor);
                    }
                }
                Err(refusal) => {
                    tracing::debug!(shard, peer = id, %refusal, "no floor from this peer")
                }
            }
        }
        None
    }
}

/// Walks `shard` from its mark back to [`Mark::Member`] (see the module comment); returns at once for
/// a member. Stops when the cluster is gone.
pub(super) async fn run_rebuild(cluster: Weak<Cluster>, shard: u32) {
    let mut progress: (Option<u64>, Instant) = (None, Instant::now());
    loop {
        let Some(node) = cluster.upgrade() else {
            return;
        };
        match node.marks.get(shard) {
            Mark::Member => return,
            Mark::Quarantined => {
                if let Some((term, index)) = node.fetch_floor(shard).await {
                    tracing::info!(
                        shard,
                        term,
                        index,
                        "rebuilding: catching up with the leader"
                    );
                    node.change_mark(shard, |mark| {
                        (mark == Mark::Quarantined).then_some(Mark::CatchingUp { term, index })
                    })
                    .await;
                    progress = (None, Instant::now());
                }
            }
            Mark::CatchingUp { term, index } => {
                let Some(replica) = node.replicas.get(shard as usize) else {
                    return;
                };
                let (current_term, last_index) = {
                    let metrics = replica.raft.metrics();
                    let metrics = metrics.borrow();
                    (metrics.current_term, metrics.last_log_index)
                };
                if current_term >= term && last_index.is_some_and(|last| last >= index) {
                    node.change_mark(shard, |mark| {
                        matches!(mark, Mark::CatchingUp { .. }).then_some(Mark::Member)
                    })
                    .await;
                    tracing::info!(shard, "rebuilt: a full member again");
                    return;
                }
                if last_index != progress.0 {
                    progress = (last_index, Instant::now());
                } else if progress.1.elapsed() > STALL {
                    progress.1 = Instant::now();
                    if let Some((new_term, new_index)) = node.fetch_floor(shard).await {
                        if new_term > term {
                            tracing::info!(shard, new_term, new_index, "rebuilding: a new floor");
                            node.change_mark(shard, |mark| {
                                matches!(mark, Mark::CatchingUp { .. }).then_some(
                                    Mark::CatchingUp {
                                        term: new_term,
                                        index: new_index,
                                    },
                                )
                            })
                            .await;
                        }
                    }
                }
            }
        }
        drop(node);
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::reopen_when_released;

    fn fresh_log(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("skrebuild-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("raft-log.redb")
    }

    #[tokio::test]
    async fn a_rebuild_mark_survives_a_restart_and_only_an_empty_clustered_shard_is_quarantined() {
        let path = fresh_log("restart");
        let db = LogDb::open(&path).expect("open log");
        let marks = Marks::new(db, 3);
        // shard 0 opens empty in a cluster, shard 1 holds data, shard 2 is empty on a single node (or in
        // a cluster restored from a backup)
        assert_eq!(
            marks.open_shard(0, true, true).await.unwrap(),
            Mark::Quarantined
        );
        assert_eq!(
            marks.open_shard(1, false, true).await.unwrap(),
            Mark::Member
        );
        assert_eq!(
            marks.open_shard(2, true, false).await.unwrap(),
            Mark::Member
        );
        let floor = Mark::CatchingUp { term: 7, index: 42 };
        let moved = marks
            .change(0, |mark| (mark == Mark::Quarantined).then_some(floor))
            .await
            .unwrap();
        assert_eq!(moved, Some(floor));
        assert_eq!(
            marks.change(0, |_| Some(floor)).await.unwrap(),
            None,
            "no change, nothing written"
        );
        drop(marks);

        // The node crashes mid-rebuild; its shard now holds part of the log, so it is not empty: the
        // stored mark, not emptiness, says where it is.
        let db = reopen_when_released(&path, crate::log_store::MIRROR_BYTES).await;
        let marks = Marks::new(db, 3);
        assert_eq!(marks.open_shard(0, false, true).await.unwrap(), floor);
        assert!(!marks.get(0).takes_part_in_elections());
        assert!(!marks.get(0).admits_leader(6), "a deposed leader's term");
        assert!(marks.get(0).admits_leader(7));
        marks.change(0, |_| Some(Mark::Member)).await.unwrap();
        drop(marks);

        let db = reopen_when_released(&path, crate::log_store::MIRROR_BYTES).await;
        let marks = Marks::new(db, 3);
        assert_eq!(
            marks.open_shard(0, false, true).await.unwrap(),
            Mark::Member
        );
        assert!(marks.get(0).takes_part_in_elections());
    }

    #[test]
    fn a_quarantined_replica_admits_no_leader_and_does_not_vote() {
        assert!(!Mark::Quarantined.admits_leader(u64::MAX));
        assert!(!Mark::Quarantined.takes_part_in_elections());
        assert!(Mark::Member.admits_leader(0));
    }
}
