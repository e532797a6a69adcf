//! Debt: what a reversal could not take from the wallet. `owe` records it (a `debt` posting from the
//! `receivable` account and the user's row in `DEBTS`), `freeze_for_debt` freezes the account;
//! `repay_debt` pays it back first from money coming in (credits, completed top-ups, refunds) and lifts
//! the freeze the debt made once it is paid.

use redb::ReadableTable;
use uuid::Uuid;

use super::{Applier, CommandContext, Step};
use crate::domain::reversal::DEBT_FREEZE_REASON;
use crate::domain::{Freeze, Money, PostingKind, PostingRef, User};
use crate::state::StoreError;

impl Applier<'_> {
    /// What `user_id` owes the shop (zero without a row).
    pub(super) fn debt_of(&self, user_id: &str) -> Step<Money> {
        let minor = self
            .debts
            .read()?
            .get(user_id)?
            .map_or(0, |guard| guard.value());
        Ok(Money::from_minor(minor))
    }

    fn set_debt(&mut self, user_id: &str, debt: Money) -> Step<()> {
        debug_assert!(!debt.is_negative(), "debt is never negative");
        if debt.is_positive() {
            self.debts.write()?.insert(user_id, debt.minor())?;
        } else {
            self.debts.write()?.remove(user_id)?;
        }
        Ok(())
    }

    /// Records `amount` owed by `user` for reversal `reversal_id`: a `debt` posting (receivable →
    /// available, which the reversal posting then takes). The caller checked the postings
    /// (`check_postings`) first, and freezes the account once the reversal is posted (`freeze_for_debt`).
    pub(super) fn owe(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        amount: Money,
        reversal_id: Uuid,
    ) -> Step<()> {
        let debt = self.debt_of(&user.user_id)?;
        let after = debt
            .checked_add(amount)
            .ok_or_else(|| StoreError::Corrupt(format!("debt of {} overflowed", user.user_id)))?;
        self.post(
            context,
            user,
            PostingKind::Debt,
            amount,
            PostingRef::Reversal(reversal_id),
            context.now,
        )?;
        self.set_debt(&user.user_id, after)
    }

    /// Freezes an account left in debt, unless it is frozen already (its own reason stays).
    pub(super) fn freeze_for_debt(
        &mut self,
        context: &mut CommandContext,
        user: &User,
    ) -> Step<()> {
        if self.freeze_of(&user.user_id)?.is_none() {
            let freeze = Freeze {
                reason: DEBT_FREEZE_REASON.to_owned(),
                at: context.now,
            };
            self.put_freeze(context, user, freeze)?;
        }
        Ok(())
    }

    /// After `amount` came into `user`'s wallet, pays as much of the user's debt as it covers (a
    /// `debt_repaid` posting referring to where the money came from). When the debt is paid off, a freeze
    /// the debt made is lifted. Returns what was repaid.
    pub(super) fn repay_debt(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        amount: Money,
        reference: PostingRef,
    ) -> Step<Money> {
        let debt = self.debt_of(&user.user_id)?;
        let repaid = debt.min(amount).min(user.wallet().available());
        if !repaid.is_positive() {
            return Ok(Money::ZERO);
        }
        self.post(
            context,
            user,
            PostingKind::DebtRepaid,
            repaid,
            reference,
            context.now,
        )?;
        let left = debt.saturating_sub(repaid);
        self.set_debt(&user.user_id, left)?;
        let debt_freeze = self
            .freeze_of(&user.user_id)?
            .is_some_and(|f| f.reason == DEBT_FREEZE_REASON);
        if !left.is_positive() && debt_freeze {
            self.lift_freeze(context, user)?;
        }
        Ok(repaid)
    }
}
