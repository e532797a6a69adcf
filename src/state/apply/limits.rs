//! Limits: the shop-wide limits (`PutShopLimits`: decided on their home shard, which numbers the
//! generations, and copied to every other shard, like a webhook), a user's overrides (`PutUserLimits`,
//! on the user's shard), the usage rows they count, and the checks the commands make. Everything is
//! decided at the command's time: UTC days and clock hours of `context.now` (`domain::limits`).

use redb::ReadableTable;

use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::limits::{
    LimitChanges, LimitSet, LimitsInForce, MAX_ORDERS_PER_HOUR, MAX_REFUNDS_PER_30_DAYS,
    MAX_SPEND_PER_DAY, ShopLimits, Window, next_hour, next_midnight, refunds_retry_after,
};
use crate::domain::{Money, Rejection, Reply, Timestamp};
use crate::state::query::{usage_in, usage_rows};
use crate::state::tables::{SHOP_LIMITS_KEY, encode, get};

impl Applier<'_> {
    pub(super) fn put_shop_limits(
        &mut self,
        context: &mut CommandContext,
        command: &command::PutShopLimits,
    ) -> Step<Reply> {
        check_changes(&command.changes)?;
        let existing = self.shop_limits()?;
        let (generation, limits) = match (command.generation, &existing) {
            (None, Some(s)) => (
                s.generation.saturating_add(1),
                s.limits.changed(&command.changes),
            ),
            (None, None) => (1, LimitSet::default().changed(&command.changes)),
            (Some(g), Some(s)) if s.generation >= g => return Ok(Reply::ShopLimits(s.clone())),
            (Some(g), _) => (g, LimitSet::default().changed(&command.changes)),
        };
        let shop = ShopLimits {
            limits,
            generation,
            updated_at: context.now,
        };
        let bytes = encode(&shop)?;
        self.shop_limits
            .write()?
            .insert(SHOP_LIMITS_KEY, bytes.as_slice())?;
        Ok(Reply::ShopLimits(shop))
    }

    pub(super) fn put_user_limits(&mut self, command: &command::PutUserLimits) -> Step<Reply> {
        check_changes(&command.changes)?;
        self.existing_user(&command.user_id)?;
        let user_id = command.user_id.as_str();
        let overrides = self.overrides_of(user_id)?.changed(&command.changes);
        // The row stays when it overrides nothing any more: it keeps the user's usage counted.
        let bytes = encode(&overrides)?;
        self.user_limits
            .write()?
            .insert(user_id, bytes.as_slice())?;
        Ok(Reply::UserLimits {
            user_id: command.user_id.clone(),
            overrides,
        })
    }

    fn shop_limits(&self) -> Step<Option<ShopLimits>> {
        Ok(get(self.shop_limits.read()?, SHOP_LIMITS_KEY)?)
    }

    fn overrides_of(&self, user_id: &str) -> Step<LimitSet> {
        Ok(get(self.user_limits.read()?, user_id)?.unwrap_or_default())
    }

    /// The limits in force for `user_id`: its overrides, else the shop's, else the built-in defaults
    /// (`default_pending_topups`: what the command carries of `--max-pending-topups`).
    pub(super) fn limits_in_force(
        &self,
        user_id: &str,
        default_pending_topups: Option<u32>,
    ) -> Step<LimitsInForce> {
        let shop = self.shop_limits()?.map(|s| s.limits).unwrap_or_default();
        let overrides = self.overrides_of(user_id)?;
        Ok(LimitsInForce::of_user(
            &overrides,
            &shop,
            default_pending_topups,
        ))
    }

    /// Refuses a new order of `total` at `now`: `max_orders_per_hour` orders were created this UTC
    /// clock hour, or `total` does not fit in what `max_spend_per_day` leaves of today.
    pub(super) fn check_order_limits(
        &self,
        now: Timestamp,
        user_id: &str,
        total: Money,
    ) -> Step<()> {
        let limits = self.limits_in_force(user_id, None)?;
        if let Some(max) = limits.max_orders_per_hour {
            let created = usage_in(self.usage.read()?, user_id, Window::OrdersPerHour, now)?;
            if created >= i64::from(max) {
                return Err(Rejection::LimitExceeded {
                    limit: MAX_ORDERS_PER_HOUR.to_owned(),
                    max,
                    retry_after: Some(next_hour(now)),
                }
                .into());
            }
        }
        self.check_spend(now, user_id, &limits, total)
    }

    /// Refuses to debit `amount` at `now` if today's debits (UTC) and `amount` exceed
    /// `max_spend_per_day` (an order's total exactly reaching it is allowed).
    pub(super) fn check_spend_limit(
        &self,
        now: Timestamp,
        user_id: &str,
        amount: Money,
    ) -> Step<()> {
        let limits = self.limits_in_force(user_id, None)?;
        self.check_spend(now, user_id, &limits, amount)
    }

    fn check_spend(
        &self,
        now: Timestamp,
        user_id: &str,
        limits: &LimitsInForce,
        amount: Money,
    ) -> Step<()> {
        let Some(max) = limits.max_spend_per_day else {
            return Ok(());
        };
        let spent = usage_in(self.usage.read()?, user_id, Window::SpendPerDay, now)?;
        let after = i128::from(spent) + i128::from(amount.minor());
        if after > i128::from(max.minor()) {
            return Err(Rejection::MoneyLimitExceeded {
                limit: MAX_SPEND_PER_DAY.to_owned(),
                max,
                retry_after: Some(next_midnight(now)),
            }
            .into());
        }
        Ok(())
    }

    /// Refuses a refund at `now` when `max_refunds_per_30_days` refunds were created in the window
    /// (today and the 29 UTC days before), unless `enforce` is false: an admin's forced refund (and
    /// any refund the system makes) is counted but never refused.
    pub(super) fn check_refund_limit(
        &self,
        now: Timestamp,
        user_id: &str,
        enforce: bool,
    ) -> Step<()> {
        if !enforce {
            return Ok(());
        }
        let Some(max) = self.limits_in_force(user_id, None)?.max_refunds_per_30_days else {
            return Ok(());
        };
        let rows = usage_rows(self.usage.read()?, user_id, Window::RefundsPerDay, now)?;
        let days: Vec<(Timestamp, u64)> = rows
            .into_iter()
            .map(|(day, n)| (day, u64::try_from(n).unwrap_or(0)))
            .collect();
        let counted: u64 = days.iter().map(|(_, n)| *n).sum();
        if counted >= u64::from(max) {
            return Err(Rejection::LimitExceeded {
                limit: MAX_REFUNDS_PER_30_DAYS.to_owned(),
                max,
                retry_after: refunds_retry_after(&days, max),
            }
            .into());
        }
        Ok(())
    }

    /// Counts `amount` in the user's usage of `window` at `now`, once limits are in use for the user:
    /// its shard has the shop-wide limits or the user has an overrides row (even one overriding nothing
    /// now). Before either was ever set, nothing is written: an order or refund applies exactly as it did
    /// before limits existed, so replicas still running a build without limits (a rolling upgrade) agree
    /// with the others until a limits command, which needs every node upgraded, is applied.
    pub(super) fn count_usage(
        &mut self,
        user_id: &str,
        window: Window,
        now: Timestamp,
        amount: i64,
    ) -> Step<()> {
        let in_use = self.shop_limits.read()?.get(SHOP_LIMITS_KEY)?.is_some()
            || self.user_limits.read()?.get(user_id)?.is_some();
        if in_use {
            self.record_usage(user_id, window, now, amount)?;
        }
        Ok(())
    }

    /// Adds `amount` to the user's row of `window` at `now`, and removes the user's rows of `window`
    /// that are no longer counted (so a user has at most one row per day or hour counted).
    fn record_usage(
        &mut self,
        user_id: &str,
        window: Window,
        now: Timestamp,
        amount: i64,
    ) -> Step<()> {
        let tag = window.tag();
        let oldest = window.oldest_counted(now).micros();
        let mut stale = Vec::new();
        for entry in self
            .usage
            .read()?
            .range((user_id, tag, i64::MIN)..(user_id, tag, oldest))?
        {
            stale.push(entry?.0.value().2);
        }
        for start in stale {
            self.usage.write()?.remove((user_id, tag, start))?;
        }
        let start = window.start(now).micros();
        let before = self
            .usage
            .read()?
            .get((user_id, tag, start))?
            .map_or(0, |v| v.value());
        self.usage
            .write()?
            .insert((user_id, tag, start), before.saturating_add(amount))?;
        Ok(())
    }
}

/// The changes' values, checked again here: the state machine does not trust its callers.
fn check_changes(changes: &LimitChanges) -> Result<(), Rejection> {
    changes.check().map_err(Rejection::invalid)
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;
    use crate::domain::limits::Setting;
    use crate::domain::{Command, Envelope, IdSeed, ItemKind, ItemSpec, LineRequest};
    use crate::state::ShardStore;

    const DAY: i64 = 86_400_000_000;
    /// 2026-12-02T00:00:00Z
    const MIDNIGHT: i64 = 1_796_169_600_000_000;

    fn with_applier(f: impl FnOnce(&mut Applier<'_>)) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
        let txn = store.begin_write().expect("writes");
        let mut applier = Applier::open(&txn).expect("opens the tables");
        f(&mut applier);
    }

    #[test]
    fn refund_rows_older_than_30_days_are_pruned_when_written() {
        with_applier(|a| {
            for day in 0..40 {
                a.record_usage(
                    "u1",
                    Window::RefundsPerDay,
                    Timestamp(MIDNIGHT + day * DAY),
                    1,
                )
                .expect("records");
            }
            a.record_usage("u2", Window::RefundsPerDay, Timestamp(MIDNIGHT), 1)
                .expect("records");
            let now = Timestamp(MIDNIGHT + 39 * DAY + 5);
            let rows = usage_rows(
                a.usage.read().expect("opens"),
                "u1",
                Window::RefundsPerDay,
                now,
            )
            .expect("reads");
            assert_eq!(rows.len(), 30, "today and the 29 days before");
            assert_eq!(rows[0].0, Timestamp(MIDNIGHT + 10 * DAY));
            // u1's 30 rows and u2's one: nothing older is left.
            assert_eq!(a.usage.read().expect("opens").len().expect("counts"), 31);
        });
    }

    #[test]
    fn spend_and_order_rows_keep_only_the_current_day_and_hour() {
        with_applier(|a| {
            let hour = 3_600_000_000;
            a.record_usage(
                "u1",
                Window::OrdersPerHour,
                Timestamp(MIDNIGHT + hour - 1),
                1,
            )
            .expect("records");
            a.record_usage("u1", Window::OrdersPerHour, Timestamp(MIDNIGHT + hour), 1)
                .expect("records");
            a.record_usage("u1", Window::SpendPerDay, Timestamp(MIDNIGHT - 1), 500)
                .expect("records");
            a.record_usage("u1", Window::SpendPerDay, Timestamp(MIDNIGHT), 200)
                .expect("records");
            a.record_usage("u1", Window::SpendPerDay, Timestamp(MIDNIGHT + 1), 100)
                .expect("records");
            let now = Timestamp(MIDNIGHT + hour + 1);
            assert_eq!(
                usage_in(
                    a.usage.read().expect("opens"),
                    "u1",
                    Window::OrdersPerHour,
                    now
                )
                .unwrap(),
                1
            );
            assert_eq!(
                usage_in(
                    a.usage.read().expect("opens"),
                    "u1",
                    Window::SpendPerDay,
                    now
                )
                .unwrap(),
                300
            );
            assert_eq!(a.usage.read().expect("opens").len().expect("counts"), 2);
        });
    }

    #[test]
    fn usage_is_counted_only_once_limits_are_in_use_on_the_shard_or_for_the_user() {
        with_applier(|a| {
            let now = Timestamp(MIDNIGHT);
            a.count_usage("u1", Window::OrdersPerHour, now, 1)
                .expect("counts");
            assert_eq!(
                a.usage.read().expect("opens").len().expect("counts"),
                0,
                "no limits ever set"
            );
            a.user_limits
                .write()
                .expect("opens")
                .insert(
                    "u1",
                    encode(&LimitSet::default()).expect("encodes").as_slice(),
                )
                .expect("inserts");
            a.count_usage("u1", Window::OrdersPerHour, now, 1)
                .expect("counts");
            a.count_usage("u2", Window::OrdersPerHour, now, 1)
                .expect("counts");
            assert_eq!(
                a.usage.read().expect("opens").len().expect("counts"),
                1,
                "u1's row only"
            );
            let mut context = CommandContext {
                now,
                ids: crate::domain::IdSequence::new(crate::domain::IdSeed {
                    unix_millis: 1,
                    entropy: 1,
                }),
                events: 0,
            };
            let shop = command::PutShopLimits {
                changes: LimitChanges::default(),
                generation: None,
            };
            a.put_shop_limits(&mut context, &shop).expect("puts");
            a.count_usage("u2", Window::OrdersPerHour, now, 1)
                .expect("counts");
            assert_eq!(
                a.usage.read().expect("opens").len().expect("counts"),
                2,
                "everyone's, once the shop's are set"
            );
        });
    }

    /// A day of orders and refunds under limits, as envelopes at their times.
    fn scenario() -> Vec<Envelope> {
        let hour = 3_600_000_000;
        let at = |micros: i64, n: u128, command: Command| Envelope {
            now: Timestamp(MIDNIGHT + micros),
            seed: IdSeed {
                unix_millis: 1,
                entropy: n,
            },
            idempotency: None,
            command,
        };
        let order = |complete| {
            Command::CreateOrder(command::CreateOrder {
                user_id: "u1".to_owned(),
                lines: vec![LineRequest {
                    item_id: "gems".to_owned(),
                    quantity: 3,
                }],
                expected_total: None,
                complete,
                expires_at: Timestamp(MIDNIGHT + 30 * DAY),
                max_pending_orders: 100,
            })
        };
        let limits = LimitChanges {
            max_orders_per_hour: Some(Setting::Max(2)),
            max_spend_per_day: Some(Setting::Max(Money::from_minor(800))),
            max_refunds_per_30_days: Some(Setting::Max(1)),
            ..LimitChanges::default()
        };
        vec![
            at(
                0,
                1,
                Command::CreateUser(command::CreateUser {
                    user_id: "u1".to_owned(),
                    display_name: None,
                }),
            ),
            at(
                1,
                2,
                Command::Credit(command::Credit {
                    user_id: "u1".to_owned(),
                    amount: Money::from_minor(10_000),
                    external_ref: "r1".to_owned(),
                    source: None,
                    ref_accepted: true,
                }),
            ),
            at(
                2,
                3,
                Command::PutItem(command::PutItem {
                    spec: ItemSpec {
                        item_id: "gems".to_owned(),
                        name: "Gems".to_owned(),
                        kind: ItemKind::Currency,
                        price: Money::from_minor(100),
                        active: true,
                        refund_window_days: 14,
                    },
                    version: None,
                }),
            ),
            at(
                3,
                4,
                Command::PutShopLimits(command::PutShopLimits {
                    changes: limits,
                    generation: None,
                }),
            ),
            at(10, 5, order(true)),
            at(11, 6, order(false)),
            // The hour's third order.
            at(12, 7, order(true)),
            // The next hour: 6.00 spent (the pending order is not), within the day's 8.00.
            at(hour, 8, order(true)),
            // 9.00 would be over.
            at(hour + 1, 9, order(true)),
        ]
    }

    /// The same envelopes give the same outcomes and `state_hash` however they are batched, and the
    /// limits refuse what they should, each with its `retry_after`.
    #[test]
    fn limits_decide_the_same_whatever_the_batches() {
        let envelopes = scenario();
        let mut runs = Vec::new();
        for batch in [1, 3, envelopes.len()] {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let store = ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("opens");
            let mut outcomes = Vec::new();
            for chunk in envelopes.chunks(batch) {
                let refs: Vec<&Envelope> = chunk.iter().collect();
                outcomes.extend(store.apply_batch(&refs).expect("applies"));
            }
            let txn = store.begin_read().expect("reads");
            let report = crate::state::audit::audit(&txn, 0).expect("audits");
            assert!(report.violations.is_empty(), "{:?}", report.violations);
            runs.push((outcomes, report.state_hash));
        }
        assert!(runs.windows(2).all(|w| w[0] == w[1]), "batches differ");
        let outcomes = &runs[0].0;
        let hour = 3_600_000_000;
        match &outcomes[6].outcome {
            Err(Rejection::LimitExceeded {
                limit,
                max: 2,
                retry_after,
            }) => {
                assert_eq!(limit, MAX_ORDERS_PER_HOUR);
                assert_eq!(*retry_after, Some(Timestamp(MIDNIGHT + hour)));
            }
            other => panic!("the hour's third order: {other:?}"),
        }
        assert!(outcomes[7].outcome.is_ok(), "{:?}", outcomes[7]);
        match &outcomes[8].outcome {
            Err(Rejection::MoneyLimitExceeded { retry_after, .. }) => {
                assert_eq!(*retry_after, Some(Timestamp(MIDNIGHT + DAY)));
            }
            other => panic!("over the day's spending: {other:?}"),
        }
    }

    #[test]
    fn spending_exactly_the_daily_limit_is_allowed_and_one_cent_more_is_not() {
        with_applier(|a| {
            let put = command::PutUserLimits {
                user_id: "u1".to_owned(),
                changes: LimitChanges {
                    max_spend_per_day: Some(Setting::Max(Money::from_minor(1000))),
                    ..LimitChanges::default()
                },
            };
            assert!(a.put_user_limits(&put).is_err(), "no user u1");
            let limits = LimitsInForce {
                max_spend_per_day: Some(Money::from_minor(1000)),
                ..LimitsInForce::default()
            };
            let now = Timestamp(MIDNIGHT + 5);
            a.record_usage("u1", Window::SpendPerDay, now, 600)
                .expect("records");
            assert!(
                a.check_spend(now, "u1", &limits, Money::from_minor(400))
                    .is_ok()
            );
            match a.check_spend(now, "u1", &limits, Money::from_minor(401)) {
                Err(super::super::Stop::Reject(Rejection::MoneyLimitExceeded {
                    retry_after,
                    ..
                })) => assert_eq!(retry_after, Some(Timestamp(MIDNIGHT + DAY))),
                _ => panic!("refused with the next midnight"),
            }
            // The next day starts from nothing.
            let tomorrow = Timestamp(MIDNIGHT + DAY);
            assert!(
                a.check_spend(tomorrow, "u1", &limits, Money::from_minor(1000))
                    .is_ok()
            );
        });
    }
}
