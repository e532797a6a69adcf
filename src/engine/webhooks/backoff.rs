//! When a failed webhook delivery is tried again, and when a webhook counts as failing.
//!
//! The delays are deterministic (no jitter): each shard leader retries one webhook's head event at a
//! time, so there is no herd of clients to spread out, and fixed values keep the schedule testable and
//! explainable in `GET /v1/webhooks/{name}`.

use std::time::Duration;

/// The first retry's delay.
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest delay between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(60 * 60);
/// A webhook whose oldest undelivered event has failed for this long is reported `failing`.
pub const FAILING_AFTER: Duration = Duration::from_secs(3 * 24 * 60 * 60);

/// The delay before the next attempt after `attempts` consecutive failed ones: none after none, then
/// 1 s, 2 s, 4 s, … doubling, at most [`MAX_DELAY`] (reached at the 13th failure).
pub fn next_delay(attempts: u32) -> Duration {
    let Some(doublings) = attempts.checked_sub(1) else {
        return Duration::ZERO;
    };
    FIRST_DELAY
        .checked_mul(2u32.checked_pow(doublings).unwrap_or(u32::MAX))
        .map_or(MAX_DELAY, |delay| delay.min(MAX_DELAY))
}

/// Whether a webhook whose oldest undelivered event has been failing for `failing_for` is `failing`.
pub fn is_failing(failing_for: Duration) -> bool {
    failing_for >= FAILING_AFTER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_one_second_up_to_an_hour() {
        let secs = |attempts| next_delay(attempts).as_secs();
        assert_eq!(next_delay(0), Duration::ZERO);
        assert_eq!(
            (1..=13).map(secs).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600]
        );
        for attempts in [14, 31, 32, 33, 64, 1000, u32::MAX] {
            assert_eq!(next_delay(attempts), MAX_DELAY, "{attempts}");
        }
    }

    #[test]
    fn failing_after_three_days() {
        assert_eq!(FAILING_AFTER, Duration::from_secs(259_200));
        assert!(!is_failing(FAILING_AFTER - Duration::from_secs(1)));
        assert!(is_failing(FAILING_AFTER));
        // About how many attempts three days of back-off makes: bounded, so retrying is cheap.
        let mut elapsed = Duration::ZERO;
        let mut attempts = 0;
        while elapsed < FAILING_AFTER {
            attempts += 1;
            elapsed += next_delay(attempts);
        }
        assert_eq!(attempts, 83);
    }
}
