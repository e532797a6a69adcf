//! Spending limits: what a shop (and, overriding it, one user) allows per window, and the pure
//! arithmetic of those windows. Decided inside `apply` at the command's time, so identical on every
//! replica: the windows are UTC calendar days and clock hours of `Timestamp`s, never a clock.
//!
//! The records here are stored (a shard's copy of the shop-wide limits, a user's overrides) and carried
//! in commands: the rules of the persisted format (`crate::domain`) hold for every type here.

use serde::{Deserialize, Serialize};

use super::money::{MAX_WALLET_BALANCE, Money};
use super::time::Timestamp;

/// The largest count a limit may be set to.
pub const MAX_LIMIT_COUNT: u32 = 1_000_000;
/// How many UTC days `max_refunds_per_30_days` counts: today and the 29 before.
pub const REFUND_WINDOW_DAYS: u32 = 30;

/// The names of the limits (the `limit` of a `limit_exceeded`, the fields of the API).
pub const MAX_SPEND_PER_DAY: &str = "max_spend_per_day";
pub const MAX_ORDERS_PER_HOUR: &str = "max_orders_per_hour";
pub const MAX_PENDING_TOPUPS: &str = "max_pending_topups";
pub const MAX_REFUNDS_PER_30_DAYS: &str = "max_refunds_per_30_days";
pub const LIMIT_NAMES: [&str; 4] = [
    MAX_SPEND_PER_DAY,
    MAX_ORDERS_PER_HOUR,
    MAX_PENDING_TOPUPS,
    MAX_REFUNDS_PER_30_DAYS,
];

const HOUR_MICROS: i64 = 3_600_000_000;
const DAY_MICROS: i64 = 24 * HOUR_MICROS;

/// One limit as a level sets it. For the shop-wide level `Default` is the built-in default (none, or
/// `--max-pending-topups` for `max_pending_topups`); for a user's overrides it is the shop-wide value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Setting<T> {
    #[default]
    Default,
    /// No limit at this level (whatever the level below says).
    Unlimited,
    Max(T),
}

impl<T: Copy> Setting<T> {
    /// The limit this setting makes, `fallback` for `Default` (`None`: no limit).
    pub fn or(self, fallback: Option<T>) -> Option<T> {
        match self {
            Setting::Default => fallback,
            Setting::Unlimited => None,
            Setting::Max(value) => Some(value),
        }
    }
}

/// Every limit of one level (the shop's, or a user's overrides).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSet {
    pub max_spend_per_day: Setting<Money>,
    pub max_orders_per_hour: Setting<u32>,
    pub max_pending_topups: Setting<u32>,
    pub max_refunds_per_30_days: Setting<u32>,
}

/// A change of some limits of one level: `None` leaves a limit as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitChanges {
    pub max_spend_per_day: Option<Setting<Money>>,
    pub max_orders_per_hour: Option<Setting<u32>>,
    pub max_pending_topups: Option<Setting<u32>>,
    pub max_refunds_per_30_days: Option<Setting<u32>>,
}

impl LimitSet {
    /// This set with `changes` made.
    pub fn changed(&self, changes: &LimitChanges) -> LimitSet {
        LimitSet {
            max_spend_per_day: changes.max_spend_per_day.unwrap_or(self.max_spend_per_day),
            max_orders_per_hour: changes
                .max_orders_per_hour
                .unwrap_or(self.max_orders_per_hour),
            max_pending_topups: changes
                .max_pending_topups
                .unwrap_or(self.max_pending_topups),
            max_refunds_per_30_days: changes
                .max_refunds_per_30_days
                .unwrap_or(self.max_refunds_per_30_days),
        }
    }

    /// The changes that make this whole set (what a copy to another shard carries).
    pub fn as_changes(&self) -> LimitChanges {
        LimitChanges {
            max_spend_per_day: Some(self.max_spend_per_day),
            max_orders_per_hour: Some(self.max_orders_per_hour),
            max_pending_topups: Some(self.max_pending_topups),
            max_refunds_per_30_days: Some(self.max_refunds_per_30_days),
        }
    }
}

impl LimitChanges {
    /// Why these changes cannot be made, if they cannot: counts above [`MAX_LIMIT_COUNT`], money
    /// negative or above the largest amount.
    pub fn check(&self) -> Result<(), String> {
        let counts = [
            ("max_orders_per_hour", self.max_orders_per_hour),
            ("max_pending_topups", self.max_pending_topups),
            ("max_refunds_per_30_days", self.max_refunds_per_30_days),
        ];
        for (name, setting) in counts {
            if let Some(Setting::Max(n)) = setting {
                if n > MAX_LIMIT_COUNT {
                    return Err(format!("{name} must be 0 to {MAX_LIMIT_COUNT}"));
                }
            }
        }
        if let Some(Setting::Max(m)) = self.max_spend_per_day {
            if m.is_negative() || m > MAX_WALLET_BALANCE {
                return Err("max_spend_per_day is out of range".to_owned());
            }
        }
        Ok(())
    }
}

/// The shop-wide limits as a shard holds them: decided on their home shard (which numbers the
/// generations) and copied to every other shard, like a webhook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShopLimits {
    pub limits: LimitSet,
    pub generation: u64,
    pub updated_at: Timestamp,
}

/// The limits in force for one user (`None`: no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitsInForce {
    pub max_spend_per_day: Option<Money>,
    pub max_orders_per_hour: Option<u32>,
    pub max_pending_topups: Option<u32>,
    pub max_refunds_per_30_days: Option<u32>,
}

impl LimitsInForce {
    /// The shop's limits alone (`default_pending_topups`: `--max-pending-topups`).
    pub fn of_shop(shop: &LimitSet, default_pending_topups: Option<u32>) -> LimitsInForce {
        LimitsInForce {
            max_spend_per_day: shop.max_spend_per_day.or(None),
            max_orders_per_hour: shop.max_orders_per_hour.or(None),
            max_pending_topups: shop.max_pending_topups.or(default_pending_topups),
            max_refunds_per_30_days: shop.max_refunds_per_30_days.or(None),
        }
    }

    /// A user's overrides over the shop's limits.
    pub fn of_user(
        user: &LimitSet,
        shop: &LimitSet,
        default_pending_topups: Option<u32>,
    ) -> LimitsInForce {
        let shop = LimitsInForce::of_shop(shop, default_pending_topups);
        LimitsInForce {
            max_spend_per_day: user.max_spend_per_day.or(shop.max_spend_per_day),
            max_orders_per_hour: user.max_orders_per_hour.or(shop.max_orders_per_hour),
            max_pending_topups: user.max_pending_topups.or(shop.max_pending_topups),
            max_refunds_per_30_days: user
                .max_refunds_per_30_days
                .or(shop.max_refunds_per_30_days),
        }
    }
}

/// What a user's limits count at one moment (a view of the usage rows; not stored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Debited today (UTC) by completed orders.
    pub spent_today: Money,
    /// Orders created in this UTC clock hour.
    pub orders_this_hour: u64,
    /// Refunds created today and in the 29 days before.
    pub refunds_in_window: u64,
    /// PENDING top-ups that have not expired.
    pub pending_topups: u64,
}

/// What a usage row counts (the `u8` of its key: never renumber).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// Minor units debited by orders completed in one UTC day (key: the day's start).
    SpendPerDay = 0,
    /// Orders created in one UTC clock hour (key: the hour's start).
    OrdersPerHour = 1,
    /// Refunds created in one UTC day (key: the day's start); the last [`REFUND_WINDOW_DAYS`] are kept.
    RefundsPerDay = 2,
}

impl Window {
    pub const ALL: [Window; 3] = [
        Window::SpendPerDay,
        Window::OrdersPerHour,
        Window::RefundsPerDay,
    ];

    pub fn tag(self) -> u8 {
        self as u8
    }

    pub fn from_tag(tag: u8) -> Option<Window> {
        Window::ALL.into_iter().find(|w| w.tag() == tag)
    }

    /// The most rows of this window a user may have (`state/apply/limits.rs` prunes when it writes).
    pub fn max_rows(self) -> usize {
        match self {
            Window::SpendPerDay | Window::OrdersPerHour => 1,
            Window::RefundsPerDay => REFUND_WINDOW_DAYS as usize,
        }
    }

    /// The start of the row `now` counts in.
    pub fn start(self, now: Timestamp) -> Timestamp {
        match self {
            Window::SpendPerDay | Window::RefundsPerDay => day_start(now),
            Window::OrdersPerHour => hour_start(now),
        }
    }

    /// The oldest row start still counted at `now` (rows before it are pruned when the user's rows of
    /// this window are written).
    pub fn oldest_counted(self, now: Timestamp) -> Timestamp {
        match self {
            Window::SpendPerDay | Window::OrdersPerHour => self.start(now),
            Window::RefundsPerDay => refund_window_start(now),
        }
    }
}

/// The start (00:00:00 UTC) of `at`'s day.
pub fn day_start(at: Timestamp) -> Timestamp {
    Timestamp(
        at.micros()
            .div_euclid(DAY_MICROS)
            .saturating_mul(DAY_MICROS),
    )
}

/// The next UTC midnight after `at` (`at` itself at a midnight is in the day that starts then).
pub fn next_midnight(at: Timestamp) -> Timestamp {
    Timestamp(day_start(at).micros().saturating_add(DAY_MICROS))
}

/// The start of `at`'s UTC clock hour.
pub fn hour_start(at: Timestamp) -> Timestamp {
    Timestamp(
        at.micros()
            .div_euclid(HOUR_MICROS)
            .saturating_mul(HOUR_MICROS),
    )
}

/// The next full hour after `at`.
pub fn next_hour(at: Timestamp) -> Timestamp {
    Timestamp(hour_start(at).micros().saturating_add(HOUR_MICROS))
}

/// The first day `max_refunds_per_30_days` counts at `at`: today and the 29 days before.
pub fn refund_window_start(at: Timestamp) -> Timestamp {
    let days = i64::from(REFUND_WINDOW_DAYS - 1);
    Timestamp(
        day_start(at)
            .micros()
            .saturating_sub(days.saturating_mul(DAY_MICROS)),
    )
}

/// When a refund counted on the day starting at `day` leaves the window.
pub fn refund_day_leaves(day: Timestamp) -> Timestamp {
    Timestamp(
        day.micros()
            .saturating_add(i64::from(REFUND_WINDOW_DAYS).saturating_mul(DAY_MICROS)),
    )
}

/// When fewer than `max` refunds are counted, given the counts per day in the window (oldest first)
/// with `max` or more in all: the day the oldest days that must leave have left. `None` if leaving
/// days never brings the count below `max` (it always does: `max` ≥ 0 and the window empties).
pub fn refunds_retry_after(days: &[(Timestamp, u64)], max: u32) -> Option<Timestamp> {
    let mut counted: u64 = days.iter().map(|(_, n)| *n).sum();
    for (day, n) in days {
        counted = counted.saturating_sub(*n);
        if counted < u64::from(max) {
            return Some(refund_day_leaves(*day));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-02T00:00:00Z
    const MIDNIGHT: i64 = 1_796_169_600_000_000;

    fn at(micros_after_midnight: i64) -> Timestamp {
        Timestamp(MIDNIGHT + micros_after_midnight)
    }

    #[test]
    fn a_day_runs_from_one_utc_midnight_to_the_next() {
        assert_eq!(
            Timestamp(MIDNIGHT).to_rfc3339(),
            "2026-12-02T00:00:00.000000Z"
        );
        assert_eq!(day_start(at(0)), at(0));
        assert_eq!(day_start(at(DAY_MICROS - 1)), at(0));
        assert_eq!(day_start(at(DAY_MICROS)), at(DAY_MICROS));
        assert_eq!(next_midnight(at(0)), at(DAY_MICROS));
        assert_eq!(next_midnight(at(DAY_MICROS - 1)), at(DAY_MICROS));
        assert_eq!(day_start(at(-1)), at(-DAY_MICROS));
        assert_eq!(
            day_start(Timestamp(-1)),
            Timestamp(-DAY_MICROS),
            "before 1970"
        );
    }

    #[test]
    fn an_hour_runs_from_one_full_hour_to_the_next() {
        assert_eq!(hour_start(at(HOUR_MICROS - 1)), at(0));
        assert_eq!(hour_start(at(HOUR_MICROS)), at(HOUR_MICROS));
        assert_eq!(next_hour(at(0)), at(HOUR_MICROS));
        assert_eq!(next_hour(at(23 * HOUR_MICROS + 5)), at(DAY_MICROS));
        assert_eq!(
            next_hour(at(HOUR_MICROS - 1)).to_rfc3339(),
            "2026-12-02T01:00:00.000000Z"
        );
    }

    #[test]
    fn the_refund_window_is_today_and_the_29_days_before() {
        let now = at(10 * HOUR_MICROS);
        let start = refund_window_start(now);
        assert_eq!(start, at(-29 * DAY_MICROS));
        assert_eq!(Window::RefundsPerDay.oldest_counted(now), start);
        assert_eq!(refund_day_leaves(start), at(DAY_MICROS));
        // A day 30 days back is out; its last microsecond too.
        assert!(at(-30 * DAY_MICROS) < start);
        assert!(day_start(at(-29 * DAY_MICROS - 1)) < start);
    }

    #[test]
    fn refunds_free_up_when_enough_of_the_oldest_days_left() {
        let d = |n: i64| at(n * DAY_MICROS);
        let days = [(d(-20), 2), (d(-5), 1), (d(0), 1)];
        // 4 counted, limit 4: the oldest day (2) leaves 30 days after it started.
        assert_eq!(refunds_retry_after(&days, 4), Some(d(10)));
        // Limit lowered to 2: two days must leave.
        assert_eq!(refunds_retry_after(&days, 2), Some(d(25)));
        assert_eq!(refunds_retry_after(&days, 0), None);
    }

    #[test]
    fn a_user_override_wins_over_the_shop_which_wins_over_the_default() {
        let shop = LimitSet {
            max_pending_topups: Setting::Max(5),
            max_orders_per_hour: Setting::Unlimited,
            ..LimitSet::default()
        };
        let user = LimitSet {
            max_pending_topups: Setting::Max(2),
            max_refunds_per_30_days: Setting::Max(1),
            ..LimitSet::default()
        };
        let shop_only = LimitsInForce::of_shop(&shop, Some(10));
        assert_eq!(shop_only.max_pending_topups, Some(5));
        assert_eq!(shop_only.max_orders_per_hour, None);
        let both = LimitsInForce::of_user(&user, &shop, Some(10));
        assert_eq!(both.max_pending_topups, Some(2));
        assert_eq!(both.max_refunds_per_30_days, Some(1));
        let nothing = LimitsInForce::of_user(&LimitSet::default(), &LimitSet::default(), Some(10));
        assert_eq!(nothing.max_pending_topups, Some(10), "the flag's default");
        let unlimited = LimitSet {
            max_pending_topups: Setting::Unlimited,
            ..LimitSet::default()
        };
        assert_eq!(
            LimitsInForce::of_user(&unlimited, &shop, Some(10)).max_pending_topups,
            None
        );
    }

    #[test]
    fn changes_leave_what_they_do_not_name() {
        let set = LimitSet {
            max_orders_per_hour: Setting::Max(3),
            ..LimitSet::default()
        };
        let changes = LimitChanges {
            max_pending_topups: Some(Setting::Unlimited),
            ..LimitChanges::default()
        };
        let changed = set.changed(&changes);
        assert_eq!(changed.max_orders_per_hour, Setting::Max(3));
        assert_eq!(changed.max_pending_topups, Setting::Unlimited);
        assert_eq!(LimitSet::default().changed(&set.as_changes()), set);
        let too_many = LimitChanges {
            max_orders_per_hour: Some(Setting::Max(MAX_LIMIT_COUNT + 1)),
            ..LimitChanges::default()
        };
        assert!(too_many.check().is_err());
    }
}
