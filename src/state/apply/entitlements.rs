//! Entitlements: a user's holding of each item, read, saved and consumed.

use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::{Entitlement, EventData, EventType, Rejection, Reply};
use crate::state::user_rows;

impl Applier<'_> {
    pub(super) fn entitlement(&self, user_id: &str, item_id: &str) -> Step<Option<Entitlement>> {
        Ok(user_rows::entitlement(
            self.user_rows.read()?,
            user_id,
            item_id,
        )?)
    }

    pub(super) fn save_entitlement(
        &mut self,
        user_id: &str,
        entitlement: &Entitlement,
    ) -> Step<()> {
        debug_assert!(entitlement.granted >= entitlement.revoked + entitlement.consumed);
        user_rows::put_entitlement(self.user_rows.write()?, user_id, entitlement)?;
        Ok(())
    }

    pub(super) fn consume(
        &mut self,
        context: &mut CommandContext,
        command: &command::Consume,
    ) -> Step<Reply> {
        let (user_id, item_id) = (command.user_id.as_str(), command.item_id.as_str());
        let quantity = command.quantity;
        if quantity == 0 {
            return Err(Rejection::invalid("quantity must be at least 1").into());
        }
        self.begin_user(context, user_id)?;
        self.check_not_frozen(user_id)?;
        let Some(mut entitlement) = self.entitlement(user_id, item_id)? else {
            return Err(Rejection::InsufficientEntitlement {
                item_id: item_id.to_owned(),
                requested: quantity,
                owned: 0,
            }
            .into());
        };
        if !entitlement.kind.is_consumable() {
            return Err(Rejection::invalid(format!(
                "{item_id} is a {} and cannot be consumed; only currency items can",
                entitlement.kind.as_str()
            ))
            .into());
        }
        if entitlement.quantity() < u64::from(quantity) {
            return Err(Rejection::InsufficientEntitlement {
                item_id: item_id.to_owned(),
                requested: quantity,
                owned: entitlement.quantity(),
            }
            .into());
        }
        entitlement.consumed += u64::from(quantity);
        self.save_entitlement(user_id, &entitlement)?;
        let consumed = EventData::Entitlement(entitlement.clone());
        self.emit(context, EventType::EntitlementConsumed, user_id, consumed)?;
        Ok(Reply::Entitlement(entitlement))
    }
}
