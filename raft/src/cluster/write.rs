//! Writes and reads through the shard's leader: commands are gathered into batches (`run_batcher`),
//! each proposed as one log entry here or forwarded once to the leader (`on_leader`), and a leader
//! takes the batches other nodes forward into its own queue; linearizable read barriers (read index).

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use tokio::sync::{mpsc, oneshot};

use super::{
    BATCHES_IN_FLIGHT, Cluster, ClusterError, FORWARDS_IN_FLIGHT, MAX_BATCH_BYTES, NodeId, Waiting,
    fatal, logged, not_leader,
};
use crate::rpc::{NodeRequest, NodeResponse, Refusal};
use crate::{Payload, batch};

impl Cluster {
    /// Runs `local` on the shard's leader: here if this node leads, else forwarded once to the leader
    /// (`remote` builds the request, `answer` reads the reply). Retries while there is no leader or the
    /// leader moves, until the deadline.
    pub(super) async fn on_leader<T, F, Fut>(
        &self,
        shard: u32,
        local: F,
        remote: impl Fn() -> NodeRequest,
        answer: fn(NodeResponse) -> Option<Result<T, Refusal>>,
    ) -> Result<T, ClusterError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Refusal>>,
    {
        let deadline = Instant::now() + self.config.deadline;
        let mut last_error = String::from("no leader for the shard");
        // A write sent to a leader whose answer never came may have been proposed there.
        let writes = matches!(remote(), NodeRequest::Write { .. });
        let mut maybe_proposed = false;
        loop {
            let leader = match local().await {
                Ok(value) => return Ok(value),
                Err(Refusal::NotLeader { leader }) => leader,
                Err(Refusal::Overloaded) => return Err(ClusterError::Overloaded { shard }),
                Err(other) => return Err(other.into()),
            };
            let failed_leader = leader.as_ref().map(|(id, _)| *id);
            if let Some((id, addr)) = leader.filter(|(id, _)| *id != self.config.node_id) {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match self
                    .transport
                    .call(&addr, &remote(), remaining.max(Duration::from_millis(10)))
                    .await
                {
                    Ok(response) => match answer(response) {
                        Some(Ok(value)) => return Ok(value),
                        Some(Err(Refusal::NotLeader { .. })) => {
                            last_error = format!("node {id} no longer leads")
                        }
                        Some(Err(Refusal::Overloaded)) => {
                            return Err(ClusterError::Overloaded { shard });
                        }
                        Some(Err(other)) => return Err(other.into()),
                        None => {
                            tracing::warn!(shard, node = id, "a node answered nonsense");
                            return Err(ClusterError::Unavailable(format!(
                                "shard {shard}: the leader answered nonsense"
                            )));
                        }
                    },
                    Err(error) => {
                        maybe_proposed |= writes;
                        last_error = error.to_string();
                    }
                }
            }
            if Instant::now() >= deadline {
                if maybe_proposed {
                    tracing::warn!(shard, reason = %last_error, "a forwarded write's outcome is unknown");
                    return Err(ClusterError::OutcomeUnknown { shard });
                }
                // The reason may name peers' addresses: for the log, not for the caller.
                tracing::warn!(shard, reason = %last_error, "no leader took the request in time");
                return Err(ClusterError::Unavailable(format!(
                    "shard {shard}: no leader took the request in time"
                )));
            }
            self.wait_for_other_leader(shard, failed_leader, deadline)
                .await;
        }
    }

    /// Waits until this node's replica of `shard` knows a leader other than `failed` (a leader that
    /// refused or could not be reached), at most 200 ms and not past `deadline`: a retry goes out as
    /// soon as an election is won, without a blind back-off.
    async fn wait_for_other_leader(&self, shard: u32, failed: Option<NodeId>, deadline: Instant) {
        let Ok(replica) = self.replica(shard) else {
            return;
        };
        let until = deadline.min(Instant::now() + Duration::from_millis(200));
        let mut metrics = replica.raft.metrics();
        // A short pause first: a leader that just refused may be about to learn of its successor.
        tokio::time::sleep(Duration::from_millis(5)).await;
        loop {
            let known = metrics.borrow_and_update().current_leader;
            if known.is_some() && known != failed {
                return;
            }
            let remaining = until.saturating_duration_since(Instant::now());
            if remaining.is_zero()
                || tokio::time::timeout(remaining, metrics.changed())
                    .await
                    .is_err()
            {
                return;
            }
        }
    }

    /// Replicates `command` through the shard's log and returns the state machine's reply. Commands
    /// waiting for the same shard are proposed together, in one log entry (see `batch`).
    pub async fn write(&self, shard: u32, command: Vec<u8>) -> Result<Vec<u8>, ClusterError> {
        if let Some(trouble) = self.disk_trouble() {
            return Err(ClusterError::Unavailable(trouble));
        }
        let replica = self.replica(shard).map_err(ClusterError::from)?;
        let (reply, answer) = oneshot::channel();
        match replica.waiting.try_send(Waiting { command, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(ClusterError::Overloaded { shard });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(ClusterError::Unavailable("shutting down".into()));
            }
        }
        answer
            .await
            .map_err(|_| ClusterError::Unavailable("shutting down".into()))?
    }

    /// Proposes `commands` as one entry through the shard's leader; one reply per command.
    async fn write_batch(
        &self,
        shard: u32,
        commands: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, ClusterError> {
        let payload = Payload(batch::encode(commands));
        let reply = self
            .on_leader(
                shard,
                || self.write_local(shard, payload.clone()),
                || NodeRequest::Write {
                    shard,
                    command: payload.clone(),
                },
                |response| match response {
                    NodeResponse::Written(result) => Some(result),
                    _ => None,
                },
            )
            .await?;
        let replies = batch::decode(&reply.0)
            .map_err(|e| ClusterError::Unavailable(format!("shard {shard}: bad reply: {e}")))?;
        if replies.len() != commands.len() {
            return Err(ClusterError::Unavailable(format!(
                "shard {shard}: {} replies for {} commands",
                replies.len(),
                commands.len()
            )));
        }
        Ok(replies.into_iter().map(<[u8]>::to_vec).collect())
    }

    /// A batch another node forwarded to this node as the shard's leader. Its commands join this node's
    /// own queue for the shard, so the leader proposes what every node sends it as one entry: openraft
    /// 0.9 appends (and waits for the fsync of) each proposal on its own, so the batches of three
    /// nodes proposed one by one cost three appends in a row where one does.
    pub(super) async fn write_forwarded(
        &self,
        shard: u32,
        payload: Payload,
    ) -> Result<Payload, Refusal> {
        if let Some(trouble) = self.disk_trouble() {
            return Err(Refusal::Unavailable(trouble));
        }
        let replica = self.replica(shard)?;
        if !self.is_leader(shard) {
            // One hop only: the sender looks for the leader again; this node does not forward.
            let metrics = replica.raft.metrics().borrow().clone();
            let leader_id = metrics
                .current_leader
                .filter(|id| *id != self.config.node_id);
            let leader_node = leader_id.and_then(|id| {
                metrics
                    .membership_config
                    .membership()
                    .get_node(&id)
                    .cloned()
            });
            return Err(not_leader(
                &self.transport,
                ForwardToLeader {
                    leader_id,
                    leader_node,
                },
            ));
        }
        let commands = batch::decode(&payload.0)
            .map_err(|e| Refusal::Rejected(format!("undecodable forwarded batch: {e}")))?;
        // All or nothing: a batch is queued whole or refused whole.
        let permits = match replica.waiting.try_reserve_many(commands.len()) {
            Ok(permits) => permits,
            Err(mpsc::error::TrySendError::Full(())) => return Err(Refusal::Overloaded),
            Err(mpsc::error::TrySendError::Closed(())) => {
                return Err(Refusal::Unavailable("shutting down".into()));
            }
        };
        let mut answers = Vec::with_capacity(commands.len());
        for (permit, command) in permits.zip(commands) {
            let (reply, answer) = oneshot::channel();
            permit.send(Waiting {
                command: command.to_vec(),
                reply,
            });
            answers.push(answer);
        }
        let mut replies = Vec::with_capacity(answers.len());
        for answer in answers {
            match answer.await {
                Ok(Ok(reply)) => replies.push(reply),
                Ok(Err(error)) => return Err(Refusal::from(error)),
                Err(_) => return Err(Refusal::Unavailable("shutting down".into())),
            }
        }
        Ok(Payload(batch::encode(&replies)))
    }

    async fn write_local(&self, shard: u32, payload: Payload) -> Result<Payload, Refusal> {
        let replica = self.replica(shard)?;
        let Ok(_permit) = replica.inflight.clone().try_acquire_owned() else {
            return Err(Refusal::Overloaded);
        };
        let write = replica.raft.client_write(payload);
        let started = Instant::now();
        let written = tokio::time::timeout(self.config.deadline, write).await;
        if let Ok(Ok(_)) = &written {
            // From proposal to applied reply, on the leader (refusals are not proposals).
            metrics::histogram!(crate::metrics::PROPOSAL_SECONDS)
                .record(started.elapsed().as_secs_f64());
        }
        match written {
            Err(_) => {
                tracing::warn!(shard, waited = ?self.config.deadline, "a write was not committed in time (no quorum?); its outcome is unknown");
                Err(Refusal::OutcomeUnknown { shard })
            }
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                Err(not_leader(&self.transport, forward))
            }
            Ok(Err(RaftError::APIError(other))) => Err(Refusal::Rejected(logged(
                shard,
                "the write was refused",
                other,
            ))),
            Ok(Err(RaftError::Fatal(error))) => Err(fatal(error)),
        }
    }

    /// Waits until this node's replica of `shard` has applied everything committed before the call,
    /// as confirmed by the shard's leader with a quorum (read index). After it, a local read is
    /// linearizable.
    pub async fn read_barrier(&self, shard: u32) -> Result<(), ClusterError> {
        let started = Instant::now();
        let index = self
            .on_leader(
                shard,
                || self.read_index_local(shard),
                || NodeRequest::ReadIndex { shard },
                |response| match response {
                    NodeResponse::ReadIndex(result) => Some(result),
                    _ => None,
                },
            )
            .await?;
        let replica = self.replica(shard).map_err(ClusterError::from)?;
        let remaining = self.config.deadline.saturating_sub(started.elapsed());
        replica
            .applied
            .wait_for(index, remaining.max(Duration::from_millis(10)))
            .await
            .map_err(|reached| {
                ClusterError::Unavailable(format!(
                    "shard {shard}: replica is behind: it holds entries up to {reached}, the read needs {index}"
                ))
            })
    }

    pub(super) async fn read_index_local(&self, shard: u32) -> Result<u64, Refusal> {
        let replica = self.replica(shard)?;
        match tokio::time::timeout(self.config.deadline, replica.raft.get_read_log_id()).await {
            Err(_) => Err(Refusal::Unavailable(format!(
                "shard {shard}: no quorum confirmed the leader"
            ))),
            Ok(Ok((read_log_id, _applied))) => Ok(read_log_id.map(|id| id.index).unwrap_or(0)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                Err(not_leader(&self.transport, forward))
            }
            Ok(Err(RaftError::APIError(other))) => Err(Refusal::Unavailable(logged(
                shard,
                "no quorum confirmed the leader",
                other,
            ))),
            Ok(Err(RaftError::Fatal(error))) => Err(fatal(error)),
        }
    }
}

/// Gathers the commands waiting for `shard` into batches and proposes each as one entry, with as many
/// batches in flight as [`batches_in_flight`] allows. The batches in flight run inside this task, not
/// in tasks of their own: without a task spawned per batch one node made 7–12 % more purchases/s at
/// 16–256 clients (docs/BENCHMARKS.md, thirteenth session). Stops when the cluster is gone.
pub(super) async fn run_batcher(
    cluster: Weak<Cluster>,
    shard: u32,
    mut queue: mpsc::Receiver<Waiting>,
) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        let room = match cluster.upgrade() {
            Some(cluster) => {
                // Leadership matters only when there are other members: a single node does not look.
                let other_members = cluster.has_other_members(shard);
                batches_in_flight(other_members, other_members && cluster.is_leader(shard))
            }
            None => return,
        };
        if in_flight.len() >= room {
            in_flight.next().await;
            continue;
        }
        let first = tokio::select! {
            biased;
            Some(()) = in_flight.next() => continue,
            first = queue.recv() => first,
        };
        let Some(first) = first else {
            return;
        };
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let mut bytes = first.command.len();
        let mut batch = vec![first];
        while batch.len() < cluster.config.max_batch_commands && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.command.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        in_flight.push(propose_batch(cluster, shard, batch));
    }
}

/// How many batches of a shard a node has in flight at once:
/// - the shard's only member: `BATCHES_IN_FLIGHT` (the next commands gather while they commit);
/// - the leader of a shard with other members: one, so that entries are fewer and fuller (each costs
///   every follower an append and an apply);
/// - any other member: `FORWARDS_IN_FLIGHT` forwards, which the leader merges into its own entries.
fn batches_in_flight(other_members: bool, leads: bool) -> usize {
    match (other_members, leads) {
        (false, _) => BATCHES_IN_FLIGHT,
        (true, true) => 1,
        (true, false) => FORWARDS_IN_FLIGHT,
    }
}

/// Proposes one batch and answers each of its commands.
async fn propose_batch(cluster: Arc<Cluster>, shard: u32, batch: Vec<Waiting>) {
    let (commands, replies): (Vec<Vec<u8>>, Vec<_>) =
        batch.into_iter().map(|w| (w.command, w.reply)).unzip();
    metrics::histogram!(crate::metrics::BATCH_COMMANDS).record(commands.len() as f64);
    let started = Instant::now();
    let written = cluster.write_batch(shard, &commands).await;
    metrics::histogram!(crate::metrics::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    match written {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_that_does_not_lead_forwards_several_batches_while_the_leader_proposes_one() {
        assert!(batches_in_flight(true, false) > 1);
        assert_eq!(batches_in_flight(true, false), FORWARDS_IN_FLIGHT);
        assert_eq!(batches_in_flight(true, true), 1);
        assert_eq!(batches_in_flight(false, true), BATCHES_IN_FLIGHT);
    }
}
