//! When a shard builds its next snapshot: once the log since the last one holds `--snapshot-every`
//! entries **and** `log_percent` % of that snapshot's bytes.
//!
//! openraft 0.9 counts entries only (`SnapshotPolicy::LogsSinceLast`), but a snapshot writes the whole
//! shard: at a fixed count of entries its cost per entry grows with the shop, and a shop of millions of
//! orders would rewrite gigabytes for every few megabytes of log. Counting the log's bytes against
//! the snapshot's keeps the snapshot writes in proportion to the writes that caused them (at most
//! `100 / log_percent` snapshot bytes per log byte), and the log on disk within `log_percent` % of the
//! state plus `--snapshot-every` entries. The shard's Raft runs with `SnapshotPolicy::Never`; the
//! cluster asks it for a snapshot when [`SnapshotCadence::due`] says so.
//!
//! The counts live in memory. At open, the entries since the current snapshot are the state's applied
//! index past the snapshot's (a shard restored or loaded offline, with no snapshot, snapshots at
//! once), and the byte condition counts as met (this process never saw those entries' bytes), so the
//! first snapshot comes after `--snapshot-every` entries, as it did by entries alone: restarts can
//! delay a snapshot, never let the log grow without bound.

use std::sync::atomic::{AtomicU64, Ordering};

/// The log written since the shard's last snapshot, against that snapshot's size.
#[derive(Debug)]
pub struct SnapshotCadence {
    min_entries: u64,
    log_percent: u64,
    entries: AtomicU64,
    bytes: AtomicU64,
    snapshot_bytes: AtomicU64,
}

impl SnapshotCadence {
    /// A cadence for a shard whose current snapshot (if any) holds `snapshot_bytes`, and whose state
    /// is `entries` past it. The byte condition starts met (see the module doc).
    pub fn new(
        min_entries: u64,
        log_percent: u32,
        snapshot_bytes: u64,
        entries: u64,
    ) -> SnapshotCadence {
        let cadence = SnapshotCadence {
            min_entries,
            log_percent: u64::from(log_percent),
            entries: AtomicU64::new(entries),
            bytes: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(snapshot_bytes),
        };
        cadence
            .bytes
            .store(cadence.bytes_needed(), Ordering::Relaxed);
        cadence
    }

    /// `entries` log entries of `bytes` payload were applied (or held back to be applied).
    pub(crate) fn logged(&self, entries: u64, bytes: u64) {
        saturating_add(&self.entries, entries);
        saturating_add(&self.bytes, bytes);
    }

    /// A snapshot's point was taken (its export): the log after it counts towards the next one.
    pub(crate) fn exported(&self) {
        self.entries.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// The snapshot exported last is written, `bytes` long.
    pub(crate) fn written(&self, bytes: u64) {
        self.snapshot_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Whether the shard should build a snapshot now.
    pub fn due(&self) -> bool {
        self.entries.load(Ordering::Relaxed) >= self.min_entries
            && self.bytes.load(Ordering::Relaxed) >= self.bytes_needed()
    }

    /// Log bytes since the last snapshot, and the bytes the next one waits for (for the status).
    pub fn log_bytes(&self) -> (u64, u64) {
        (self.bytes.load(Ordering::Relaxed), self.bytes_needed())
    }

    fn bytes_needed(&self) -> u64 {
        let wanted = u128::from(self.snapshot_bytes.load(Ordering::Relaxed))
            * u128::from(self.log_percent)
            / 100;
        u64::try_from(wanted).unwrap_or(u64::MAX)
    }
}

fn saturating_add(counter: &AtomicU64, n: u64) {
    // One writer at a time (the state machine's lock); `fetch_update` keeps it correct regardless.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(n))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_snapshot_waits_for_entries_alone() {
        let cadence = SnapshotCadence::new(10, 100, 0, 0);
        cadence.logged(9, 9_000);
        assert!(!cadence.due());
        cadence.logged(1, 1);
        assert!(cadence.due());
    }

    #[test]
    fn a_large_snapshot_waits_until_the_log_holds_its_share_of_bytes() {
        let cadence = SnapshotCadence::new(10, 50, 0, 0);
        cadence.logged(10, 100);
        cadence.exported();
        cadence.written(1_000_000);
        cadence.logged(1_000, 499_999);
        assert!(
            !cadence.due(),
            "10× the entries, 1 byte short of half the snapshot"
        );
        cadence.logged(1, 1);
        assert!(cadence.due());
    }

    #[test]
    fn the_log_logged_between_an_export_and_its_write_counts_towards_the_next() {
        let cadence = SnapshotCadence::new(2, 100, 0, 0);
        cadence.logged(5, 500);
        cadence.exported();
        cadence.logged(2, 300);
        cadence.written(250);
        assert!(cadence.due());
    }

    #[test]
    fn zero_percent_snapshots_by_entries_alone() {
        let cadence = SnapshotCadence::new(3, 0, u64::MAX, 0);
        cadence.logged(3, 0);
        assert!(cadence.due());
    }

    #[test]
    fn after_a_restart_the_bytes_count_as_met() {
        let cadence = SnapshotCadence::new(4, 100, 1 << 30, 1);
        cadence.logged(2, 10);
        assert!(!cadence.due());
        cadence.logged(1, 10);
        assert!(
            cadence.due(),
            "a restart must not push the next snapshot past the entries"
        );
    }

    #[test]
    fn a_state_far_past_no_snapshot_is_due_at_once() {
        assert!(SnapshotCadence::new(10_000, 100, 0, 1_250_000).due());
    }
}
