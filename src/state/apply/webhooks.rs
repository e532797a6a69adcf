//! Webhooks: their rows on every shard (`PutWebhook`, `DeleteWebhook`: the home shard decides the
//! generation, the others copy newer ones, as the catalog does), and how far this shard's events were
//! delivered (`AckWebhook`, `WebhookFailed`, `ReplayWebhook`: sent by the shard's leader and the API).

use redb::ReadableTableMetadata;

use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::event::MAX_WEBHOOKS;
use crate::domain::ids::is_valid_id;
use crate::domain::{EventType, Rejection, Reply, Webhook};
use crate::state::tables::{encode, get};

/// Longest webhook URL.
pub const MAX_URL_LEN: usize = 2048;
/// Longest stored delivery error.
pub const MAX_ERROR_LEN: usize = 200;
/// Rows a shard keeps, deleted webhooks included (the oldest deleted one goes when it is full).
const MAX_ROWS: u64 = 2 * MAX_WEBHOOKS as u64;

impl Applier<'_> {
    pub(super) fn put_webhook(
        &mut self,
        context: &mut CommandContext,
        command: &command::PutWebhook,
    ) -> Step<Reply> {
        check_webhook(&command.name, &command.url, &command.types)?;
        let existing: Option<Webhook> = get(self.webhooks.read()?, command.name.as_str())?;
        let generation = match (command.generation, &existing) {
            (None, Some(w)) => w.generation.saturating_add(1),
            (None, None) => 1,
            (Some(g), Some(w)) if w.generation >= g => return Ok(Reply::Webhook(w.clone())),
            (Some(g), _) => g,
        };
        let live = existing.filter(|w| !w.deleted);
        if live.is_none() {
            self.make_room_for_webhook(command.generation.is_none())?;
        }
        let webhook = match live {
            Some(w) => Webhook {
                url: command.url.clone(),
                types: command.types.clone(),
                generation,
                updated_at: context.now,
                ..w
            },
            None => Webhook::new(
                &command.name,
                &command.url,
                &command.types,
                generation,
                context.now,
                self.event_log.last_seq,
            ),
        };
        self.save_webhook(&webhook)?;
        Ok(Reply::Webhook(webhook))
    }

    pub(super) fn delete_webhook(
        &mut self,
        context: &mut CommandContext,
        command: &command::DeleteWebhook,
    ) -> Step<Reply> {
        let existing: Option<Webhook> = get(self.webhooks.read()?, command.name.as_str())?;
        let not_found = || Rejection::WebhookNotFound {
            name: command.name.clone(),
        };
        let (generation, row) = match (command.generation, existing) {
            (None, Some(w)) if !w.deleted => (w.generation.saturating_add(1), w),
            (None, _) => return Err(not_found().into()),
            (Some(g), Some(w)) if w.generation >= g => return Ok(Reply::Webhook(w)),
            (Some(g), Some(w)) => (g, w),
            (Some(g), None) => {
                check_webhook(&command.name, "", &[])?;
                self.make_room_for_webhook(false)?;
                (g, Webhook::new(&command.name, "", &[], 0, context.now, 0))
            }
        };
        let webhook = Webhook {
            generation,
            deleted: true,
            updated_at: context.now,
            ..row
        };
        self.save_webhook(&webhook)?;
        Ok(Reply::Webhook(webhook))
    }

    pub(super) fn ack_webhook(&mut self, command: &command::AckWebhook) -> Step<Reply> {
        let mut webhook = self.current_webhook(&command.name, command.generation)?;
        if command.position > webhook.position && command.position <= self.event_log.last_seq {
            webhook.move_to(command.position);
            self.save_webhook(&webhook)?;
        }
        Ok(Reply::Webhook(webhook))
    }

    pub(super) fn ack_webhook_from(&mut self, command: &command::AckWebhookFrom) -> Step<Reply> {
        let webhook = self.current_webhook(&command.name, command.generation)?;
        if webhook.position != command.from {
            return Ok(Reply::Webhook(webhook));
        }
        self.ack_webhook(&command::AckWebhook {
            name: command.name.clone(),
            generation: command.generation,
            position: command.position,
        })
    }

    pub(super) fn webhook_failed(
        &mut self,
        context: &mut CommandContext,
        command: &command::WebhookFailed,
    ) -> Step<Reply> {
        let mut webhook = self.current_webhook(&command.name, command.generation)?;
        if command.position == webhook.position {
            webhook.attempts = webhook.attempts.saturating_add(1);
            webhook.last_error = Some(truncate(&command.error, MAX_ERROR_LEN));
            webhook.last_attempt_at = Some(context.now);
            webhook.next_attempt_at = Some(command.next_attempt_at);
            webhook.failing_since = webhook.failing_since.or(Some(context.now));
            self.save_webhook(&webhook)?;
        }
        Ok(Reply::Webhook(webhook))
    }

    pub(super) fn replay_webhook(&mut self, command: &command::ReplayWebhook) -> Step<Reply> {
        let mut webhook = self.live_webhook(&command.name)?;
        webhook.move_to(command.position.min(self.event_log.last_seq));
        self.save_webhook(&webhook)?;
        Ok(Reply::Webhook(webhook))
    }

    /// The live webhook `name` at `generation`: an ack or failure of another generation (the webhook was
    /// changed or deleted meanwhile) is refused as not found, and changes nothing.
    fn current_webhook(&self, name: &str, generation: u64) -> Step<Webhook> {
        let webhook = self.live_webhook(name)?;
        if webhook.generation != generation {
            return Err(Rejection::WebhookNotFound {
                name: name.to_owned(),
            }
            .into());
        }
        Ok(webhook)
    }

    fn live_webhook(&self, name: &str) -> Step<Webhook> {
        match get::<_, Webhook, _>(self.webhooks.read()?, name)? {
            Some(w) if !w.deleted => Ok(w),
            _ => Err(Rejection::WebhookNotFound {
                name: name.to_owned(),
            }
            .into()),
        }
    }

    pub(super) fn save_webhook(&mut self, webhook: &Webhook) -> Step<()> {
        let bytes = encode(webhook)?;
        self.webhooks
            .write()?
            .insert(webhook.name.as_str(), bytes.as_slice())?;
        Ok(())
    }

    /// Before a new row: on the home shard, refuses a webhook beyond `MAX_WEBHOOKS` live ones; on every
    /// shard, forgets the oldest deleted webhook when the table holds `MAX_ROWS`.
    fn make_room_for_webhook(&mut self, home: bool) -> Step<()> {
        if home && self.live_webhooks()?.len() >= MAX_WEBHOOKS as usize {
            return Err(Rejection::LimitExceeded {
                limit: "max_webhooks".to_owned(),
                max: MAX_WEBHOOKS,
                retry_after: None,
            }
            .into());
        }
        if self.webhooks.read()?.len()? >= MAX_ROWS {
            let oldest_deleted = self
                .all_webhooks()?
                .into_iter()
                .filter(|w| w.deleted)
                .min_by_key(|w| (w.updated_at, w.name.clone()));
            if let Some(w) = oldest_deleted {
                self.webhooks.write()?.remove(w.name.as_str())?;
            }
        }
        Ok(())
    }

    fn all_webhooks(&self) -> Step<Vec<Webhook>> {
        use redb::ReadableTable;
        let mut all = Vec::new();
        for entry in self.webhooks.read()?.iter()? {
            all.push(crate::state::tables::decode(entry?.1.value())?);
        }
        Ok(all)
    }
}

/// A webhook's shape, checked again here: the state machine does not trust its callers.
fn check_webhook(name: &str, url: &str, types: &[EventType]) -> Result<(), Rejection> {
    if !is_valid_id(name) {
        return Err(Rejection::invalid(
            "a webhook name is 1-64 of [A-Za-z0-9_.-]",
        ));
    }
    if url.len() > MAX_URL_LEN {
        return Err(Rejection::invalid(format!(
            "a webhook url is at most {MAX_URL_LEN} bytes"
        )));
    }
    if types.len() > EventType::ALL.len() {
        return Err(Rejection::invalid("too many event types"));
    }
    Ok(())
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
