//! The outbox: every change writes its events here, in the same transaction, numbered by the shard's
//! `seq`; and their purge once they are past retention (`PurgeEvents`, sent by the sweeper).

use std::time::Duration;

use redb::ReadableTable;

use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::{Event, EventData, EventType, Reply, Timestamp, Webhook};
use crate::state::StoreError;
use crate::state::tables::{decode, encode};

impl Applier<'_> {
    /// Writes one event of the current command, at the shard's next `seq`, dated at the command's time.
    pub(super) fn emit(
        &mut self,
        context: &mut CommandContext,
        event_type: EventType,
        user_id: &str,
        data: EventData,
    ) -> Step<()> {
        let seq = self
            .event_log
            .last_seq
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("the event seq overflowed".to_owned()))?;
        let event = Event {
            event_id: context.ids.event_id(context.events),
            event_type,
            occurred_at: context.now,
            user_id: user_id.to_owned(),
            data,
        };
        context.events = context.events.saturating_add(1);
        let bytes = encode(&event)?;
        self.events.write()?.insert(seq, bytes.as_slice())?;
        self.event_log.last_seq = seq;
        self.event_log_changed = true;
        Ok(())
    }

    /// Purges the oldest events: those older than the retention that every webhook acknowledged, then those
    /// older than the longest retention whatever the webhooks (each webhook that had not acknowledged one
    /// counts it as dropped and moves past it). Stops at the first event that must stay: events are in
    /// time order, because a shard's time never goes back.
    pub(super) fn purge_events(
        &mut self,
        context: &mut CommandContext,
        command: &command::PurgeEvents,
    ) -> Step<Reply> {
        let before = |seconds| context.now.minus(Duration::from_secs(seconds)).micros();
        let (keep_after, drop_before) = (
            before(command.retention_seconds),
            before(command.max_retention_seconds),
        );
        let mut webhooks = self.live_webhooks()?;
        let acknowledged = webhooks
            .iter()
            .map(|w| w.position)
            .min()
            .unwrap_or(u64::MAX);
        let oldest: Vec<(u64, Timestamp)> = self
            .events
            .read()?
            .iter()?
            .take(command.limit as usize)
            .map(|entry| {
                let (seq, bytes) = entry?;
                let event: Event = decode(bytes.value())?;
                Ok((seq.value(), event.occurred_at))
            })
            .collect::<Result<_, StoreError>>()?;
        let (mut purged, mut dropped) = (0u32, 0u32);
        for (seq, occurred_at) in oldest {
            if occurred_at.micros() >= keep_after {
                break;
            }
            if seq > acknowledged {
                if occurred_at.micros() >= drop_before {
                    break;
                }
                dropped = dropped.saturating_add(1);
                for webhook in webhooks.iter_mut().filter(|w| w.position < seq) {
                    webhook.position = seq;
                    webhook.dropped = webhook.dropped.saturating_add(1);
                }
            }
            self.events.write()?.remove(seq)?;
            self.event_log.purged_through = seq;
            purged = purged.saturating_add(1);
        }
        if dropped > 0 {
            self.event_log.dropped = self.event_log.dropped.saturating_add(u64::from(dropped));
            for webhook in &webhooks {
                self.save_webhook(webhook)?;
            }
        }
        if purged > 0 {
            self.event_log_changed = true;
        }
        Ok(Reply::EventsPurged { purged, dropped })
    }

    /// The webhooks that are not deleted.
    pub(super) fn live_webhooks(&self) -> Step<Vec<Webhook>> {
        let mut live = Vec::new();
        for entry in self.webhooks.read()?.iter()? {
            let webhook: Webhook = decode(entry?.1.value())?;
            if !webhook.deleted {
                live.push(webhook);
            }
        }
        Ok(live)
    }
}
