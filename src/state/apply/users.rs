//! Users: creating them, answering token issues, and loading a user for a command (`begin_user`, which
//! first expires the user's orders past their deadline) and saving the wallet cache back.

use redb::ReadableTable;

use super::{Applier, CommandContext, Step, Stop};
use crate::domain::command;
use crate::domain::{EventData, EventType, Money, PostingKind, Rejection, Reply, User};
use crate::state::user_rows;

/// In unit tests, creating a user of this id panics after the user's row is written.
#[cfg(test)]
pub(crate) const PANICS_AFTER_WRITING: &str = "panics-after-writing";

impl Applier<'_> {
    pub(super) fn create_user(
        &mut self,
        context: &mut CommandContext,
        command: &command::CreateUser,
    ) -> Step<Reply> {
        if user_rows::has_user(self.user_rows.read()?, &command.user_id)? {
            return Err(Rejection::UserExists.into());
        }
        let user = User {
            user_id: command.user_id.clone(),
            display_name: command.display_name.clone(),
            created_at: context.now,
            balance: Money::ZERO,
            held: Money::ZERO,
            ledger_seq: 0,
        };
        self.save_user(&user)?;
        // Unit tests make a command panic half-way, after it wrote (`state::held`).
        #[cfg(test)]
        assert_ne!(
            user.user_id, PANICS_AFTER_WRITING,
            "a command made to panic"
        );
        self.emit(
            context,
            EventType::UserCreated,
            &user.user_id,
            EventData::User(user.clone()),
        )?;
        Ok(Reply::UserCreated(user))
    }

    pub(super) fn issue_token(&self, command: &command::IssueToken) -> Step<Reply> {
        self.existing_user(&command.user_id)?;
        self.check_not_frozen(&command.user_id)?;
        Ok(Reply::TokenIssued {
            user_id: command.user_id.clone(),
            expires_at: command.expires_at,
        })
    }

    pub(super) fn existing_user(&self, user_id: &str) -> Step<User> {
        user_rows::user(self.user_rows.read()?, user_id)?
            .ok_or(Stop::Reject(Rejection::UserNotFound))
    }

    /// Loads a user for a command at `context.now`, first cancelling the user's pending orders whose deadline has
    /// passed, so that the wallet the command sees (and answers with) holds exactly what is still pending.
    pub(super) fn begin_user(&mut self, context: &mut CommandContext, user_id: &str) -> Step<User> {
        let mut user = self.existing_user(user_id)?;
        let due: Vec<(u128, i64)> = self
            .user_pending
            .read()?
            .range((user_id, 0u128)..=(user_id, u128::MAX))?
            .filter_map(|entry| match entry {
                Ok((key, value)) => {
                    let (expires_at, total) = value.value();
                    (expires_at <= context.now.micros()).then(|| Ok((key.value().1, total)))
                }
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        if !due.is_empty() {
            let releases: Vec<(PostingKind, Money)> = due
                .iter()
                .map(|&(_, total)| (PostingKind::Release, Money::from_minor(total)))
                .collect();
            self.check_postings(&user, &releases)?;
            for (order_id, _) in due {
                self.expire_order(context, &mut user, order_id)?;
            }
            self.save_user(&user)?;
        }
        Ok(user)
    }

    pub(super) fn save_user(&mut self, user: &User) -> Step<()> {
        debug_assert!(!user.held.is_negative(), "held is never negative");
        debug_assert!(user.held <= user.balance, "held never exceeds the balance");
        user_rows::put_user(self.user_rows.write()?, user)?;
        #[cfg(debug_assertions)]
        self.debug_check_holds(user)?;
        Ok(())
    }

    /// Debug builds: the wallet's `held` equals the sum of its pending orders and open disputes' holds.
    #[cfg(debug_assertions)]
    fn debug_check_holds(&self, user: &User) -> Step<()> {
        let mut pending_total = 0i128;
        for entry in self
            .user_pending
            .read()?
            .range((user.user_id.as_str(), 0u128)..=(user.user_id.as_str(), u128::MAX))?
        {
            pending_total += i128::from(entry?.1.value().1);
        }
        for dispute in self.user_disputes(&user.user_id)? {
            pending_total += i128::from(dispute.held.minor());
        }
        debug_assert_eq!(
            pending_total,
            i128::from(user.held.minor()),
            "held = sum of pending orders and dispute holds for {}",
            user.user_id
        );
        Ok(())
    }
}
