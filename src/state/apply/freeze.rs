//! Frozen accounts: `FreezeUser`, `UnfreezeUser`, and the check every spending command makes first
//! (orders, completions, top-ups, consumes, tokens). Reads, refunds and credits ignore a freeze.

use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::model::MAX_FREEZE_REASON_CHARS;
use crate::domain::{EventData, EventType, Freeze, Rejection, Reply};
use crate::state::tables::{encode, get};

impl Applier<'_> {
    pub(super) fn freeze_user(
        &mut self,
        context: &mut CommandContext,
        command: &command::FreezeUser,
    ) -> Step<Reply> {
        let user = self.existing_user(&command.user_id)?;
        if command.reason.trim().is_empty()
            || command.reason.chars().count() > MAX_FREEZE_REASON_CHARS
        {
            return Err(Rejection::invalid(format!(
                "reason must be 1 to {MAX_FREEZE_REASON_CHARS} characters"
            ))
            .into());
        }
        if let Some(frozen) = self.freeze_of(&command.user_id)? {
            return Ok(Reply::Account {
                user,
                frozen: Some(frozen),
            });
        }
        let freeze = Freeze {
            reason: command.reason.clone(),
            at: context.now,
        };
        let bytes = encode(&freeze)?;
        self.frozen
            .insert(command.user_id.as_str(), bytes.as_slice())?;
        let data = EventData::Account {
            user: user.clone(),
            frozen: Some(freeze.clone()),
        };
        self.emit(context, EventType::AccountFrozen, &command.user_id, data)?;
        Ok(Reply::Account {
            user,
            frozen: Some(freeze),
        })
    }

    pub(super) fn unfreeze_user(
        &mut self,
        context: &mut CommandContext,
        command: &command::UnfreezeUser,
    ) -> Step<Reply> {
        let user = self.existing_user(&command.user_id)?;
        if self.frozen.remove(command.user_id.as_str())?.is_some() {
            let data = EventData::Account {
                user: user.clone(),
                frozen: None,
            };
            self.emit(context, EventType::AccountUnfrozen, &command.user_id, data)?;
        }
        Ok(Reply::Account { user, frozen: None })
    }

    /// Refuses a spending command of a frozen account.
    pub(super) fn check_not_frozen(&self, user_id: &str) -> Step<()> {
        match self.freeze_of(user_id)? {
            Some(freeze) => Err(Rejection::AccountFrozen {
                reason: freeze.reason,
            }
            .into()),
            None => Ok(()),
        }
    }

    fn freeze_of(&self, user_id: &str) -> Step<Option<Freeze>> {
        Ok(get(&self.frozen, user_id)?)
    }
}
