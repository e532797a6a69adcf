//! Time as the state machine sees it: a `Timestamp` in microseconds since the Unix epoch, decided by the
//! proposer and carried in every command (apply never reads a clock). RFC 3339 UTC strings at the edge.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::macros::format_description;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub i64);

fn wall_micros() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

impl Timestamp {
    /// The time this process stamps now: the wall clock, but never behind the wall clock at the
    /// process's start plus the time it has run since (measured with the monotonic clock, which does not
    /// step). A wall clock set back — by hand or by a faulty time server — therefore never makes the
    /// process stamp an earlier time; one set forward is followed (and a member whose clock runs ahead of
    /// the others' stamps nothing: see `shopkeep_raft::clock`, which stamps node calls the same way).
    pub fn now() -> Timestamp {
        static START: OnceLock<(i64, Instant)> = OnceLock::new();
        let wall = wall_micros();
        let (start_wall, start) = *START.get_or_init(|| (wall, Instant::now()));
        let running = i64::try_from(start.elapsed().as_micros()).unwrap_or(i64::MAX);
        Timestamp(wall.max(start_wall.saturating_add(running)))
    }

    pub fn from_unix_seconds(seconds: i64) -> Timestamp {
        Timestamp(seconds.saturating_mul(1_000_000))
    }

    pub fn micros(self) -> i64 {
        self.0
    }

    pub fn unix_millis(self) -> u64 {
        u64::try_from(self.0 / 1000).unwrap_or(0)
    }

    pub fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }

    pub fn plus(self, duration: Duration) -> Timestamp {
        let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(micros))
    }

    /// `duration` earlier, saturating (a span longer than the epoch gives the earliest time).
    pub fn minus(self, duration: Duration) -> Timestamp {
        let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_sub(micros))
    }

    pub fn plus_days(self, days: u32) -> Timestamp {
        self.plus(Duration::from_secs(u64::from(days) * 86_400))
    }

    /// RFC 3339 in UTC with microseconds: `2026-11-25T13:15:49.123456Z`.
    pub fn to_rfc3339(self) -> String {
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1000)
            .ok()
            .and_then(|t| t.format(&format).ok())
            .unwrap_or_else(|| "1970-01-01T00:00:00.000000Z".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_utc() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            Timestamp(1_700_000_000_123_456).to_rfc3339(),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            Timestamp::from_unix_seconds(60)
                .plus(Duration::from_secs(1))
                .unix_seconds(),
            61
        );
    }
}
