//! Frozen accounts: `FreezeUser`, `UnfreezeUser`, and the check every spending command makes first
//! (orders, completions, top-ups, consumes, tokens). Reads, refunds, credits and reversals ignore a
//! freeze. An account with debt unfreezes only by force (an admin's decision) or by repaying it.

use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::model::MAX_FREEZE_REASON_CHARS;
use crate::domain::{EventData, EventType, Freeze, Rejection, Reply, User};
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
        self.put_freeze(context, &user, freeze.clone())?;
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
        let debt = self.debt_of(&command.user_id)?;
        if debt.is_positive() && !command.force {
            return Err(Rejection::DebtOutstanding { debt }.into());
        }
        self.lift_freeze(context, &user)?;
        Ok(Reply::Account { user, frozen: None })
    }

    /// Freezes `user`'s account (which is not frozen) and emits `account.frozen`.
    pub(super) fn put_freeze(
        &mut self,
        context: &mut CommandContext,
        user: &User,
        freeze: Freeze,
    ) -> Step<()> {
        let bytes = encode(&freeze)?;
        self.frozen
            .write()?
            .insert(user.user_id.as_str(), bytes.as_slice())?;
        let data = EventData::Account {
            user: user.clone(),
            frozen: Some(freeze),
        };
        self.emit(context, EventType::AccountFrozen, &user.user_id, data)
    }

    /// Unfreezes `user`'s account and emits `account.unfrozen`; nothing if it is not frozen.
    pub(super) fn lift_freeze(&mut self, context: &mut CommandContext, user: &User) -> Step<()> {
        if self
            .frozen
            .write()?
            .remove(user.user_id.as_str())?
            .is_some()
        {
            let data = EventData::Account {
                user: user.clone(),
                frozen: None,
            };
            self.emit(context, EventType::AccountUnfrozen, &user.user_id, data)?;
        }
        Ok(())
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

    pub(super) fn freeze_of(&self, user_id: &str) -> Step<Option<Freeze>> {
        Ok(get(self.frozen.read()?, user_id)?)
    }
}
