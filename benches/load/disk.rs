//! What a durable write cost when a system's run began: `pwrite` of 4 KiB and `fdatasync`, into a file
//! written and synced beforehand (as a write-ahead log's records are), in the directory the servers'
//! data goes to. Every server on the machine waits on that latency, and on the 2-core VM it moved by
//! 2–3× within an hour (docs/BENCHMARKS.md, thirty-second session), so the report gives it per system:
//! a ratio between two systems measured on different disks says so.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use crate::stats::{micros, percentile_ms, round2};

/// Durable writes timed per probe: about a tenth of a second on a disk whose fsync takes 0.25 ms.
const PROBE_WRITES: usize = 400;
/// The size of each write: one page.
const BLOCK_BYTES: usize = 4096;

/// The latency of a durable 4 KiB write, over `PROBE_WRITES` writes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DiskSync {
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) max_us: f64,
}

impl DiskSync {
    /// Times `PROBE_WRITES` durable writes in a throwaway file under `dir`.
    pub(crate) fn probe(dir: &Path) -> io::Result<DiskSync> {
        let file = tempfile::tempfile_in(dir)?;
        let block = vec![0xA5u8; BLOCK_BYTES];
        written_and_synced(&file, &block)?;
        let mut sorted_us = Vec::with_capacity(PROBE_WRITES);
        for slot in 0..PROBE_WRITES {
            let started = Instant::now();
            file.write_all_at(&block, offset(slot))?;
            file.sync_data()?;
            sorted_us.push(micros(started.elapsed()));
        }
        sorted_us.sort_unstable();
        let us = |q: f64| percentile_ms(&sorted_us, q) * 1000.0;
        Ok(DiskSync {
            p50_us: us(0.50),
            p90_us: us(0.90),
            max_us: us(1.0),
        })
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "a durable 4 KiB write (pwrite + fdatasync) took p50 {:.0} µs, p90 {:.0} µs, max {:.0} µs",
            self.p50_us, self.p90_us, self.max_us
        )
    }

    pub(crate) fn to_json(self) -> Value {
        json!({
            "p50_us": round2(self.p50_us),
            "p90_us": round2(self.p90_us),
            "max_us": round2(self.max_us),
            "writes": PROBE_WRITES,
        })
    }
}

/// Fills the file's `PROBE_WRITES` blocks once and syncs it, so that the timed writes overwrite
/// allocated, written blocks and time the data's flush rather than the file's growth.
fn written_and_synced(file: &File, block: &[u8]) -> io::Result<()> {
    for slot in 0..PROBE_WRITES {
        file.write_all_at(block, offset(slot))?;
    }
    file.sync_all()
}

fn offset(slot: usize) -> u64 {
    (slot * BLOCK_BYTES) as u64
}
