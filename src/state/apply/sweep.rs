//! Background work inside `apply`: expiring due orders and top-ups, purging idempotency outcomes past
//! their retention and final top-ups past theirs.

use redb::ReadableTable;

use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::{EventData, EventType, Reply, Topup, TopupStatus};
use crate::state::tables::get;

impl Applier<'_> {
    pub(super) fn sweep(
        &mut self,
        context: &mut CommandContext,
        command: &command::Sweep,
    ) -> Step<Reply> {
        let (orders, topups, idempotency_records) =
            self.expire_and_purge(context, command.limit)?;
        Ok(Reply::Swept {
            orders,
            topups,
            idempotency_records,
        })
    }

    pub(super) fn sweep_and_purge(
        &mut self,
        context: &mut CommandContext,
        command: &command::SweepAndPurge,
    ) -> Step<Reply> {
        let (orders, topups, idempotency_records) =
            self.expire_and_purge(context, command.limit)?;
        let purged_topups =
            self.purge_topups(context, command.limit, command.topup_retention_seconds)?;
        Ok(Reply::SweptAndPurged {
            orders,
            topups,
            idempotency_records,
            purged_topups,
        })
    }

    /// Expires due orders and top-ups and purges idempotency outcomes past their retention, at most
    /// `limit` of each; returns how many of each.
    fn expire_and_purge(
        &mut self,
        context: &mut CommandContext,
        limit: u32,
    ) -> Step<(u32, u32, u32)> {
        let bound = context.now.micros().saturating_add(1);
        let limit = limit as usize;

        let due_orders: Vec<(u128, String)> = self
            .pending_orders
            .read()?
            .range(..(bound, 0u128))?
            .take(limit)
            .map(|entry| entry.map(|(k, v)| (k.value().1, v.value().to_owned())))
            .collect::<Result<_, _>>()?;
        for (order_id, user_id) in &due_orders {
            let mut user = self.existing_user(user_id)?;
            self.expire_order(context, &mut user, *order_id)?;
            self.save_user(&user)?;
        }

        let due_topups: Vec<(i64, u128)> = self
            .pending_topups
            .read()?
            .range(..(bound, 0u128))?
            .take(limit)
            .map(|entry| entry.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for (expires_at, topup_id) in &due_topups {
            self.pending_topups
                .write()?
                .remove((*expires_at, *topup_id))?;
            if let Some(was) = get::<_, Topup, _>(self.topups.read()?, *topup_id)? {
                if was.status == TopupStatus::Pending {
                    let topup = was.as_of(context.now);
                    self.topup_left_pending(&was, &topup)?;
                    self.save_topup(&topup)?;
                    let user_id = topup.user_id.clone();
                    let data = EventData::Topup(topup);
                    self.emit(context, EventType::TopupExpired, &user_id, data)?;
                }
            }
        }

        let due_records: Vec<(String, String)> = self
            .idempotency_expiry
            .read()?
            .range(..(bound, "", ""))?
            .take(limit)
            .map(|entry| entry.map(|(k, _)| (k.value().1.to_owned(), k.value().2.to_owned())))
            .collect::<Result<_, _>>()?;
        for (scope, key) in &due_records {
            self.remove_idempotency_record(scope, key)?;
        }

        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok((
            count(due_orders.len()),
            count(due_topups.len()),
            count(due_records.len()),
        ))
    }

    /// Purges at most `limit` EXPIRED or FAILED top-ups that became final more than `retention_seconds`
    /// before `context.now`, with their index rows. Returns how many.
    fn purge_topups(
        &mut self,
        context: &CommandContext,
        limit: u32,
        retention_seconds: u64,
    ) -> Step<u32> {
        let bound = crate::domain::topup_purge_bound(context.now, retention_seconds);
        let due: Vec<(i64, u128)> = self
            .final_topups
            .read()?
            .range(..(bound, 0u128))?
            .take(limit as usize)
            .map(|entry| entry.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for &(at, id) in &due {
            self.final_topups.write()?.remove((at, id))?;
            if let Some(topup) = get::<_, Topup, _>(self.topups.read()?, id)? {
                self.pending_topups
                    .write()?
                    .remove((topup.expires_at.micros(), id))?;
                self.user_pending_topups
                    .write()?
                    .remove((topup.user_id.as_str(), id))?;
                self.topups.write()?.remove(id)?;
            }
        }
        Ok(u32::try_from(due.len()).unwrap_or(u32::MAX))
    }
}
