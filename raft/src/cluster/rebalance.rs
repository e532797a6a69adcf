//! Spreading shard leaders back out over the healthy voters.
//!
//! After failovers one node may lead every shard, and nothing in Raft moves leadership back. A plan
//! ([`plan`]) moves one shard at a time from the voter that leads the most to the healthy voter that leads
//! the fewest and can take it, until no two healthy voters differ by more than one. A move is the
//! hand-off of `handoff`: the new leader is asked to stand for election now (openraft 0.9 has no
//! leadership transfer), an election like any other, so it can never lose an acknowledged write; a
//! candidate whose log is behind simply loses it.
//!
//! Two ways in: [`Cluster::rebalance_leaders`] does it at once (the operator's endpoint), and
//! [`run_rebalancer`], on every member, sheds the leaderships of its own that the plan moves, once the
//! imbalance has been seen on every check for [`SUSTAINED`] (hysteresis: a node that just returned, or a
//! leader change in flight, moves nothing), and never while this node's disk is full, its clock
//! disagrees or it rebuilds a shard. A member asked to lead refuses for the same reasons (`handoff`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Cluster, NodeId};
use crate::rpc::{NodeRequest, NodeResponse};

/// How often each member looks at the spread of leaders.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long an imbalance must last before a member sheds leaderships by itself.
pub const SUSTAINED: Duration = Duration::from_secs(30);
/// A follower further behind the leader than this (entries) is not asked to lead the shard.
const MAX_LAG: u64 = 64;
/// How long a hand-off call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most plans one rebalance makes (a move whose election was lost is planned again).
const ROUNDS: usize = 3;

/// One leadership moved: `shard` from node `from` to node `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LeaderMove {
    pub shard: u32,
    pub from: NodeId,
    pub to: NodeId,
}

/// What a rebalance did: the moves that took effect, and how many shards each voter leads after them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rebalanced {
    pub moved: Vec<LeaderMove>,
    pub leaders: BTreeMap<NodeId, u32>,
}

/// One shard as the planner sees it: its leader, and the voters fit to take it over.
#[derive(Clone, Debug)]
pub struct Leadership {
    pub shard: u32,
    pub leader: NodeId,
    pub candidates: BTreeSet<NodeId>,
}

/// The moves that spread `shards`' leaders over `healthy` voters until no two differ by more than one
/// (as far as the candidates allow). Deterministic.
pub fn plan(shards: &[Leadership], healthy: &BTreeSet<NodeId>) -> Vec<LeaderMove> {
    let mut leaders: Vec<Leadership> = shards.to_vec();
    let mut counts: BTreeMap<NodeId, u32> = healthy.iter().map(|&node| (node, 0)).collect();
    for shard in &leaders {
        *counts.entry(shard.leader).or_default() += 1;
    }
    let mut moves = Vec::new();
    for _ in 0..leaders.len() {
        let Some((&busiest, &most)) = counts
            .iter()
            .max_by_key(|&(node, count)| (*count, Reverse(*node)))
        else {
            break;
        };
        let best = leaders
            .iter()
            .enumerate()
            .filter(|(_, shard)| shard.leader == busiest)
            .flat_map(|(at, shard)| {
                shard
                    .candidates
                    .iter()
                    .filter(|to| **to != busiest && healthy.contains(to))
                    .map(move |&to| (at, to))
            })
            .min_by_key(|&(at, to)| (counts.get(&to).copied().unwrap_or(0), to, at));
        let Some((at, to)) = best else {
            break;
        };
        if counts.get(&to).copied().unwrap_or(0) + 1 >= most {
            break;
        }
        let shard = &mut leaders[at];
        moves.push(LeaderMove {
            shard: shard.shard,
            from: busiest,
            to,
        });
        shard.leader = to;
        *counts.entry(busiest).or_default() -= 1;
        *counts.entry(to).or_default() += 1;
    }
    moves
}

/// Shards led by each of `healthy` (0 for those leading none) and by any other leader.
fn leader_counts(shards: &[Leadership], healthy: &BTreeSet<NodeId>) -> BTreeMap<NodeId, u32> {
    let mut counts: BTreeMap<NodeId, u32> = healthy.iter().map(|&node| (node, 0)).collect();
    for shard in shards {
        *counts.entry(shard.leader).or_default() += 1;
    }
    counts
}

/// Runs until the cluster is dropped: sheds this node's excess leaderships once an imbalance lasts.
pub(super) async fn run_rebalancer(cluster: Weak<Cluster>) {
    let mut imbalanced_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let own: Vec<LeaderMove> = if cluster.fit_to_rebalance() {
            let (shards, healthy) = cluster.leadership_view();
            plan(&shards, &healthy)
                .into_iter()
                .filter(|m| m.from == cluster.config.node_id)
                .collect()
        } else {
            Vec::new()
        };
        if own.is_empty() {
            imbalanced_since = None;
            continue;
        }
        let since = *imbalanced_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= SUSTAINED {
            for leader_move in own {
                cluster.ask_to_lead(leader_move).await;
            }
            imbalanced_since = None;
        }
    }
}

impl Cluster {
    /// Spreads the shards' leaders evenly over the healthy voters now, as this node sees them: the
    /// moves that took effect and the leaders after them. A move whose election the asked voter did not
    /// win (it may lose it, or take a little longer) is planned again, at most `ROUNDS` times.
    pub async fn rebalance_leaders(&self) -> Rebalanced {
        let mut moved = Vec::new();
        for _ in 0..ROUNDS {
            let (shards, healthy) = self.leadership_view();
            let planned = plan(&shards, &healthy);
            if planned.is_empty() {
                break;
            }
            let mut asked = Vec::new();
            for leader_move in planned {
                if self.ask_to_lead(leader_move).await {
                    asked.push(leader_move);
                }
            }
            moved.extend(self.wait_for_leaders(asked).await);
        }
        let (shards, healthy) = self.leadership_view();
        Rebalanced {
            moved,
            leaders: leader_counts(&shards, &healthy),
        }
    }

    /// Whether this node may shed leaderships by itself: its disk takes writes, its clock agrees and it
    /// rebuilds no shard.
    fn fit_to_rebalance(&self) -> bool {
        self.disk_trouble().is_none()
            && self.clock_verdict().agrees
            && (0..self.shard_count()).all(|shard| self.marks.get(shard).takes_part_in_elections())
    }

    /// Every shard with a known leader, the voters fit to take it over, and the healthy voters (this
    /// node, and every voter whose calls are not failing). On a shard this node leads, a candidate must
    /// also be within `MAX_LAG` entries of its log.
    fn leadership_view(&self) -> (Vec<Leadership>, BTreeSet<NodeId>) {
        let mut shards = Vec::new();
        let mut healthy = BTreeSet::from([self.config.node_id]);
        for (shard, replica) in (0u32..).zip(&self.replicas) {
            let metrics = replica.raft.metrics().borrow().clone();
            let voters: BTreeSet<NodeId> =
                metrics.membership_config.membership().voter_ids().collect();
            let reachable: BTreeSet<NodeId> = voters
                .iter()
                .copied()
                .filter(|&id| id == self.config.node_id || self.transport.answers(id))
                .collect();
            healthy.extend(&reachable);
            let Some(leader) = metrics.current_leader else {
                continue;
            };
            let last = metrics.last_log_index.unwrap_or(0);
            let caught_up = |id: &NodeId| match &metrics.replication {
                Some(matched) if leader == self.config.node_id => matched
                    .get(id)
                    .copied()
                    .flatten()
                    .is_some_and(|m| last.saturating_sub(m.index) <= MAX_LAG),
                _ => true,
            };
            shards.push(Leadership {
                shard,
                leader,
                candidates: reachable.into_iter().filter(|id| caught_up(id)).collect(),
            });
        }
        (shards, healthy)
    }

    /// Asks `to` to stand for election of the shard now (here, if it is this node): whether it accepted.
    async fn ask_to_lead(&self, leader_move: LeaderMove) -> bool {
        let LeaderMove { shard, from, to } = leader_move;
        let answer = if to == self.config.node_id {
            self.take_leadership(shard).await
        } else {
            let addr = self.transport.address_of(to, "");
            match self
                .transport
                .call(&addr, &NodeRequest::TakeLeadership { shard }, CALL_TIMEOUT)
                .await
            {
                Ok(NodeResponse::Done(answer)) => answer,
                Ok(other) => Err(crate::rpc::Refusal::Unavailable(format!("{other:?}"))),
                Err(error) => Err(crate::rpc::Refusal::Unavailable(error.to_string())),
            }
        };
        match answer {
            Ok(()) => {
                tracing::info!(
                    shard,
                    from,
                    to,
                    "asked a voter to lead the shard (spreading leaders)"
                );
                true
            }
            Err(refusal) => {
                tracing::info!(shard, from, to, %refusal, "a voter did not take the shard's leadership");
                false
            }
        }
    }

    /// Waits (at most six election timeouts) until each asked voter leads its shard, as this node
    /// sees it: the moves that took effect.
    async fn wait_for_leaders(&self, asked: Vec<LeaderMove>) -> Vec<LeaderMove> {
        let deadline = Instant::now() + self.config.election_timeout * 6;
        loop {
            let done: Vec<LeaderMove> = asked
                .iter()
                .copied()
                .filter(|m| self.leader_of(m.shard) == Some(m.to))
                .collect();
            if done.len() == asked.len() || Instant::now() >= deadline {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn leader_of(&self, shard: u32) -> Option<NodeId> {
        let replica = self.replicas.get(shard as usize)?;
        replica.raft.metrics().borrow().current_leader
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(leaders: &[NodeId], voters: &[NodeId]) -> Vec<Leadership> {
        (0u32..)
            .zip(leaders)
            .map(|(shard, &leader)| Leadership {
                shard,
                leader,
                candidates: voters.iter().copied().collect(),
            })
            .collect()
    }

    fn after(shards: &[Leadership], moves: &[LeaderMove], healthy: &BTreeSet<NodeId>) -> Vec<u32> {
        let mut shards = shards.to_vec();
        for m in moves {
            assert_eq!(shards[m.shard as usize].leader, m.from, "{m:?}");
            shards[m.shard as usize].leader = m.to;
        }
        leader_counts(&shards, healthy).into_values().collect()
    }

    #[test]
    fn a_node_that_returns_gets_its_share_and_no_two_voters_differ_by_more_than_one() {
        let healthy = BTreeSet::from([1, 2, 3]);
        let all = shards(&[1, 1, 1, 1, 2, 2, 2, 2], &[1, 2, 3]);
        let moves = plan(&all, &healthy);
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert!(moves.iter().all(|m| m.to == 3), "{moves:?}");
        assert_eq!(after(&all, &moves, &healthy), vec![3, 3, 2]);
        let one_leads_all = shards(&[1; 8], &[1, 2, 3]);
        let moves = plan(&one_leads_all, &healthy);
        assert_eq!(after(&one_leads_all, &moves, &healthy), vec![3, 3, 2]);
    }

    #[test]
    fn a_balanced_cluster_moves_nothing_and_an_unhealthy_voter_gets_nothing() {
        let balanced = shards(&[1, 1, 1, 2, 2, 2, 3, 3], &[1, 2, 3]);
        assert!(plan(&balanced, &BTreeSet::from([1, 2, 3])).is_empty());
        let without_3 = shards(&[1, 1, 1, 1, 2, 2, 2, 2], &[1, 2, 3]);
        assert!(plan(&without_3, &BTreeSet::from([1, 2])).is_empty());
    }

    #[test]
    fn a_voter_that_is_no_candidate_of_a_shard_is_not_given_it() {
        let mut lagging = shards(&[1, 1, 1, 1], &[1, 2]);
        for shard in &mut lagging {
            shard.candidates.remove(&2);
        }
        assert!(plan(&lagging, &BTreeSet::from([1, 2])).is_empty());
    }
}
