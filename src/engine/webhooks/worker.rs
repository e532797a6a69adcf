//! Delivery: on every node, one task per (shard this node leads, live webhook) POSTs the shard's events
//! in `seq` order, one per request, signed, and records progress through Raft (`AckWebhook`, in
//! batches) and failures (`WebhookFailed`, with the next attempt's time), so a new leader resumes where
//! the old one stopped: an event may come twice, never a gap. A failing webhook holds back only its own
//! task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::allow::AllowHosts;
use super::backoff;
use super::deliver::Deliverer;
use super::sign;
use crate::domain::{Command, Event, Reply, Timestamp, Webhook, command};
use crate::engine::coordinator::system_envelope;
use crate::engine::{Consistency, EngineError, Node};
use crate::state::query;

/// How a node renders an event as the body of a delivery (the API's JSON; the HTTP layer provides it).
pub type RenderEvent = Arc<dyn Fn(u32, u64, &Event) -> Vec<u8> + Send + Sync>;

/// What delivery needs besides the node.
pub struct DeliveryConfig {
    pub allow: AllowHosts,
    /// The secret every member shares that webhook secrets are derived from (`secrets::webhook_key`).
    pub secret_root: String,
    pub render: RenderEvent,
}

impl DeliveryConfig {
    /// The signing secret of webhook `name` at `generation` (`whsec_…`), the same on every member.
    pub fn secret(&self, name: &str, generation: u64) -> String {
        sign::webhook_secret(crate::secrets::webhook_key(
            &self.secret_root,
            name,
            generation,
        ))
    }
}

/// Events read from the outbox at a time.
const READ_BATCH: usize = 100;
/// Acknowledge after this many events, or this long, whichever comes first (and when caught up).
const ACK_EVERY_EVENTS: u64 = 100;
const ACK_EVERY: Duration = Duration::from_millis(250);
/// How often the set of (shard, webhook) to deliver is looked at.
const RESCAN: Duration = Duration::from_millis(500);

type TaskKey = (u32, String, u64);

/// Runs delivery until `stop` turns true.
pub async fn run(node: Arc<Node>, config: Arc<DeliveryConfig>, mut stop: watch::Receiver<bool>) {
    let deliverer = Arc::new(Deliverer::new());
    let mut tasks: HashMap<TaskKey, JoinHandle<()>> = HashMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(RESCAN) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            tasks.values().for_each(JoinHandle::abort);
            return;
        }
        let wanted = match wanted_tasks(&node).await {
            Ok(wanted) => wanted,
            Err(error) => {
                tracing::warn!(%error, "cannot read the webhooks; will retry");
                continue;
            }
        };
        tasks.retain(|key, task| {
            let keep = wanted.contains(key) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(key) {
                let (shard, name, generation) = slot.key().clone();
                let task = ShardDelivery {
                    node: node.clone(),
                    config: config.clone(),
                    deliverer: deliverer.clone(),
                    shard,
                    name,
                    generation,
                };
                slot.insert(tokio::spawn(task.run()));
            }
        }
    }
}

/// (shard, webhook, generation) of every live webhook of every shard this node leads.
async fn wanted_tasks(node: &Node) -> Result<Vec<TaskKey>, EngineError> {
    let mut wanted = Vec::new();
    for shard in 0..node.shard_count() {
        if !node.cluster().is_leader(shard) {
            continue;
        }
        for webhook in node
            .read(Consistency::Local, shard, query::webhooks)
            .await?
        {
            if !webhook.deleted {
                wanted.push((shard, webhook.name, webhook.generation));
            }
        }
    }
    Ok(wanted)
}

/// One shard's deliveries to one webhook (at one generation).
struct ShardDelivery {
    node: Arc<Node>,
    config: Arc<DeliveryConfig>,
    deliverer: Arc<Deliverer>,
    shard: u32,
    name: String,
    generation: u64,
}

/// Why a task stops: the webhook changed or went, or this node no longer leads the shard.
struct Stopped;

impl ShardDelivery {
    async fn run(self) {
        let secret = self.config.secret(&self.name, self.generation);
        for family in [
            crate::metrics::WEBHOOK_DELIVERIES,
            crate::metrics::WEBHOOK_FAILURES,
        ] {
            metrics::counter!(family, "webhook" => self.name.clone()).increment(0);
        }
        let mut applied = self.node.shard_applied_changes(self.shard);
        loop {
            applied.borrow_and_update();
            match self.round(&secret).await {
                Ok(true) => {}
                Ok(false) => {
                    // Caught up: wait for something new to be applied (or look again in a second).
                    tokio::select! {
                        _ = applied.changed() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(Stopped) => {
                    // Another node (or nobody) delivers this now: its lag is not this node's to show.
                    self.lag().set(0.0);
                    return;
                }
            }
        }
    }

    /// One round: waits out a back-off, then delivers what the outbox has after the webhook's position.
    /// `Ok(false)` when there was nothing to deliver.
    async fn round(&self, secret: &str) -> Result<bool, Stopped> {
        let webhook = self.current_row().await?;
        if let Some(at) = webhook.next_attempt_at {
            let wait = at.micros().saturating_sub(Timestamp::now().micros());
            if wait > 0 {
                let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                return Ok(true);
            }
        }
        let after = webhook.position;
        let (scan, last_seq) = self
            .node
            .read(Consistency::Local, self.shard, move |txn| {
                let scan = query::events_after(txn, after, READ_BATCH, None, READ_BATCH)?;
                Ok((scan, query::event_log(txn)?.last_seq))
            })
            .await
            .map_err(|_| Stopped)?;
        self.lag().set(last_seq.saturating_sub(after) as f64);
        if scan.events.is_empty() {
            return Ok(false);
        }
        self.deliver_batch(&webhook, secret, scan.events).await?;
        Ok(true)
    }

    /// Delivers `events` in order, acknowledging as it goes; at the first failure records it and stops.
    /// An acknowledgement the shard refuses (a replay moved the position meanwhile) ends the batch: the
    /// next round starts from the replayed position.
    async fn deliver_batch(
        &self,
        webhook: &Webhook,
        secret: &str,
        events: Vec<(u64, Event)>,
    ) -> Result<(), Stopped> {
        let (mut delivered, mut acked) = (webhook.position, webhook.position);
        let mut last_ack = Instant::now();
        for (seq, event) in events {
            if webhook.wants(event.event_type) {
                if let Err(error) = self.deliver(webhook, secret, seq, &event).await {
                    if delivered > acked && !self.ack(acked, delivered).await? {
                        return Ok(());
                    }
                    return self.failed(webhook, delivered, &error).await;
                }
                record_delivery(&self.name, &event);
            }
            delivered = seq;
            if delivered - acked >= ACK_EVERY_EVENTS || last_ack.elapsed() >= ACK_EVERY {
                if !self.ack(acked, delivered).await? {
                    return Ok(());
                }
                (acked, last_ack) = (delivered, Instant::now());
            }
        }
        if delivered > acked {
            self.ack(acked, delivered).await?;
        }
        Ok(())
    }

    /// One POST of one event; the error text is what the webhook's status shows.
    async fn deliver(
        &self,
        webhook: &Webhook,
        secret: &str,
        seq: u64,
        event: &Event,
    ) -> Result<(), String> {
        let addrs = self
            .config
            .allow
            .resolve_checked(&webhook.url)
            .await
            .map_err(|e| e.to_string())?;
        let body = (self.config.render)(self.shard, seq, event);
        let event_id = format!("evt_{}", event.event_id.simple());
        let now = Timestamp::now().micros() / 1_000_000;
        let headers =
            sign::sign_headers(secret, &event_id, now, &body).map_err(|e| e.to_string())?;
        self.deliverer
            .post(&webhook.url, &addrs, &headers, body)
            .await
            .map_err(|e| e.to_string())
    }

    fn lag(&self) -> metrics::Gauge {
        metrics::gauge!(crate::metrics::WEBHOOK_LAG, "webhook" => self.name.clone(), "shard" => self.shard.to_string())
    }

    /// The webhook's row on this shard, while this node leads the shard and the row is this task's.
    async fn current_row(&self) -> Result<Webhook, Stopped> {
        if !self.node.cluster().is_leader(self.shard) {
            return Err(Stopped);
        }
        let name = self.name.clone();
        let row = self
            .node
            .read(Consistency::Local, self.shard, move |txn| {
                Ok(query::webhooks(txn)?.into_iter().find(|w| w.name == name))
            })
            .await
            .map_err(|_| Stopped)?;
        match row {
            Some(w) if !w.deleted && w.generation == self.generation => Ok(w),
            _ => Err(Stopped),
        }
    }

    /// Records delivery up to `position` if the webhook is still at `from`; whether it was taken.
    async fn ack(&self, from: u64, position: u64) -> Result<bool, Stopped> {
        let ack = Command::AckWebhookFrom(command::AckWebhookFrom {
            name: self.name.clone(),
            generation: self.generation,
            from,
            position,
        });
        Ok(self.propose(ack).await?.position == position)
    }

    async fn failed(&self, webhook: &Webhook, position: u64, error: &str) -> Result<(), Stopped> {
        let attempts = webhook.attempts.saturating_add(1);
        metrics::counter!(crate::metrics::WEBHOOK_FAILURES, "webhook" => self.name.clone())
            .increment(1);
        tracing::debug!(webhook = %self.name, shard = self.shard, attempts, error, "delivery failed");
        let delay = i64::try_from(backoff::next_delay(attempts).as_micros()).unwrap_or(i64::MAX);
        let failed = Command::WebhookFailed(command::WebhookFailed {
            name: self.name.clone(),
            generation: self.generation,
            position,
            error: error.to_owned(),
            next_attempt_at: Timestamp(Timestamp::now().micros().saturating_add(delay)),
        });
        self.propose(failed).await.map(|_| ())
    }

    /// Proposes a delivery record on the shard and answers the row after it; a refusal (the webhook
    /// changed) or an error stops the task.
    async fn propose(&self, command: Command) -> Result<Webhook, Stopped> {
        match self
            .node
            .propose(self.shard, system_envelope(command))
            .await
        {
            Ok(applied) => match applied.outcome {
                Ok(Reply::Webhook(webhook)) => Ok(webhook),
                _ => Err(Stopped),
            },
            Err(error) => {
                tracing::debug!(webhook = %self.name, shard = self.shard, %error, "cannot record delivery");
                Err(Stopped)
            }
        }
    }
}

/// Counts a delivery and how long after the change it reached the receiver.
fn record_delivery(name: &str, event: &Event) {
    metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "webhook" => name.to_owned())
        .increment(1);
    let micros = Timestamp::now()
        .micros()
        .saturating_sub(event.occurred_at.micros());
    metrics::histogram!(crate::metrics::WEBHOOK_DELIVERY_SECONDS)
        .record(micros.max(0) as f64 / 1e6);
}
