//! Webhooks as the admin manages them: a PUT or DELETE decided on the webhook's home shard (which
//! numbers its generations) and copied to every other shard, a replay from a feed cursor, and the
//! status gathered from every shard's row.

use super::super::coordinator::system_envelope;
use super::super::events::EventCursor;
use super::super::{Applied, Consistency, EngineError, Missing, Node, shard_of_system_key};
use crate::domain::{Command, EventType, Reply, Webhook, command};
use crate::state::query;

/// One shard's part of a webhook's delivery.
#[derive(Clone, Debug)]
pub struct ShardDelivery {
    pub shard: u32,
    /// The shard's newest event.
    pub last_seq: u64,
    /// The webhook's row on this shard (`None`: this shard has not got the webhook yet).
    pub row: Option<Webhook>,
}

/// A webhook as the whole shop sees it: the home shard's row and every shard's delivery.
#[derive(Clone, Debug)]
pub struct WebhookStatus {
    pub webhook: Webhook,
    pub shards: Vec<ShardDelivery>,
}

impl Node {
    /// The shard that numbers `name`'s generations.
    pub fn webhook_home(&self, name: &str) -> u32 {
        shard_of_system_key(&format!("webhook:{name}"), self.shard_count())
    }

    /// Creates or changes a webhook on every shard; the outcome is the home shard's (a rejection stops
    /// there). A PUT that fails midway leaves some shards behind: repeating it brings them all up.
    pub async fn put_webhook(
        &self,
        name: &str,
        url: &str,
        types: Vec<EventType>,
    ) -> Result<Applied, EngineError> {
        let put = |generation| {
            Command::PutWebhook(command::PutWebhook {
                name: name.to_owned(),
                url: url.to_owned(),
                types: types.clone(),
                generation,
            })
        };
        self.decide_then_copy(name, put).await
    }

    /// Deletes a webhook on every shard (`not_found` if the home shard has no live one).
    pub async fn delete_webhook(&self, name: &str) -> Result<Applied, EngineError> {
        let delete = |generation| {
            Command::DeleteWebhook(command::DeleteWebhook {
                name: name.to_owned(),
                generation,
            })
        };
        self.decide_then_copy(name, delete).await
    }

    /// The change on the home shard (generation `None`: it decides), then the same generation on every
    /// other shard.
    async fn decide_then_copy(
        &self,
        name: &str,
        change: impl Fn(Option<u64>) -> Command,
    ) -> Result<Applied, EngineError> {
        let home = self.webhook_home(name);
        let decided = self.propose(home, system_envelope(change(None))).await?;
        let generation = match &decided.outcome {
            Ok(Reply::Webhook(webhook)) => webhook.generation,
            Ok(other) => {
                return Err(EngineError::Internal(format!("unexpected reply {other:?}")));
            }
            Err(_) => return Ok(decided),
        };
        for shard in (0..self.shard_count()).filter(|&s| s != home) {
            self.propose(shard, system_envelope(change(Some(generation))))
                .await?;
        }
        Ok(decided)
    }

    /// Moves the webhook's position on every shard to the cursor's: events after it are delivered again.
    pub async fn replay_webhook(&self, name: &str, after: &EventCursor) -> Result<(), EngineError> {
        let status = self.webhook_status(Consistency::Linearizable, name).await?;
        for delivery in status.shards.iter().filter(|d| d.row.is_some()) {
            let replay = Command::ReplayWebhook(command::ReplayWebhook {
                name: name.to_owned(),
                position: after.position(delivery.shard),
            });
            let applied = self
                .propose(delivery.shard, system_envelope(replay))
                .await?;
            if let Err(rejection) = applied.outcome {
                return Err(EngineError::Internal(format!(
                    "replay on shard {}: {rejection}",
                    delivery.shard
                )));
            }
        }
        Ok(())
    }

    /// Brings every shard's copy of the webhooks whose home shard this node leads up to the home's
    /// generation (after a PUT or DELETE that stopped midway: a crash, a timeout). Returns how many copies
    /// it wrote. Reads this node's replicas: a stale read only costs a copy that changes nothing.
    pub async fn repair_webhooks(&self) -> Result<usize, EngineError> {
        let mut repaired = 0;
        for home in 0..self.shard_count() {
            if !self.cluster().is_leader(home) {
                continue;
            }
            let homed: Vec<Webhook> = self
                .read(Consistency::Local, home, query::webhooks)
                .await?
                .into_iter()
                .filter(|w| self.webhook_home(&w.name) == home)
                .collect();
            if homed.is_empty() {
                continue;
            }
            for shard in (0..self.shard_count()).filter(|&s| s != home) {
                let copies = self
                    .read(Consistency::Local, shard, query::webhooks)
                    .await?;
                for webhook in &homed {
                    let copy = copies.iter().find(|c| c.name == webhook.name);
                    if copy.is_some_and(|c| c.generation >= webhook.generation) {
                        continue;
                    }
                    self.propose(shard, system_envelope(copy_of(webhook)))
                        .await?;
                    repaired += 1;
                }
            }
        }
        Ok(repaired)
    }

    /// The webhook as every shard has it; `NotFound` unless the home shard has a live one.
    pub async fn webhook_status(
        &self,
        consistency: Consistency,
        name: &str,
    ) -> Result<WebhookStatus, EngineError> {
        let mut shards = Vec::with_capacity(self.shard_count() as usize);
        for shard in 0..self.shard_count() {
            let wanted = name.to_owned();
            let (last_seq, row) = self
                .read(consistency, shard, move |txn| {
                    let row = query::webhooks(txn)?.into_iter().find(|w| w.name == wanted);
                    Ok((query::event_log(txn)?.last_seq, row))
                })
                .await?;
            shards.push(ShardDelivery {
                shard,
                last_seq,
                row: row.filter(|w| !w.deleted),
            });
        }
        let home = self.webhook_home(name) as usize;
        let webhook = shards
            .get(home)
            .and_then(|d| d.row.clone())
            .ok_or(EngineError::NotFound(Missing::Webhook))?;
        Ok(WebhookStatus { webhook, shards })
    }
}

/// The command that makes another shard's copy of `webhook` what the home shard has.
fn copy_of(webhook: &Webhook) -> Command {
    if webhook.deleted {
        Command::DeleteWebhook(command::DeleteWebhook {
            name: webhook.name.clone(),
            generation: Some(webhook.generation),
        })
    } else {
        Command::PutWebhook(command::PutWebhook {
            name: webhook.name.clone(),
            url: webhook.url.clone(),
            types: webhook.types.clone(),
            generation: Some(webhook.generation),
        })
    }
}
