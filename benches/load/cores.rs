//! What the machine's cores gave when a system's run began: a fixed chain of dependent multiplies over
//! 1 MiB, timed on one thread alone and then on every core at once. On the 2-core VM every system made
//! about half in one session of what it made in the one before, on a disk that measured the same, and
//! the same loop in C ran 8–35 % slower on each of two threads at once than on one alone
//! (docs/BENCHMARKS.md, thirty-third session), so the report gives it per system, beside the disk's
//! latency (`disk.rs`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::stats::round2;

/// The bytes each thread walks: more than a core's L1, within its L2.
const BUFFER_BYTES: usize = 1 << 20;
/// Passes over them: about 60 ms alone on one of this VM's 2.8 GHz cores.
const PASSES: u8 = 40;

/// Rounds of the probe: each figure is their median, so that one descheduled thread does not make it.
const ROUNDS: usize = 3;

/// How long the fixed loop took alone, and on every core at once (the slowest thread); the median of
/// `ROUNDS` rounds each.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CoreSpeed {
    pub(crate) alone_ms: f64,
    pub(crate) together_ms: f64,
    pub(crate) threads: usize,
}

impl CoreSpeed {
    /// Runs the loop alone, then on each of the machine's cores at the same time, `ROUNDS` times.
    pub(crate) fn probe() -> CoreSpeed {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut alone = Vec::with_capacity(ROUNDS);
        let mut together = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            alone.push(fixed_loop());
            together.push(on_every_core(threads));
        }
        CoreSpeed {
            alone_ms: millis(median(alone)),
            together_ms: millis(median(together)),
            threads,
        }
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "a fixed CPU loop took {:.1} ms alone, {:.1} ms on each of {} threads at once (slowest; medians of {ROUNDS})",
            self.alone_ms, self.together_ms, self.threads
        )
    }

    pub(crate) fn to_json(self) -> Value {
        json!({
            "alone_ms": round2(self.alone_ms),
            "together_ms": round2(self.together_ms),
            "threads": self.threads,
            "rounds": ROUNDS,
        })
    }
}

/// The loop on `threads` threads at once: the slowest thread's time.
fn on_every_core(threads: usize) -> Duration {
    std::thread::scope(|scope| {
        let running: Vec<_> = (0..threads).map(|_| scope.spawn(fixed_loop)).collect();
        running
            .into_iter()
            .map(|thread| thread.join().expect("a thread of the core probe panicked"))
            .max()
            .unwrap_or_default()
    })
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// `PASSES` passes of an FNV-style multiply-and-xor over a buffer of its own, each byte rewritten with
/// the hash so far: every step waits for the one before, so its time is the core's, not the memory's.
fn fixed_loop() -> Duration {
    let mut buffer = vec![0u8; BUFFER_BYTES];
    let started = Instant::now();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for pass in 0..PASSES {
        for byte in &mut buffer {
            hash ^= u64::from(*byte) + u64::from(pass);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
            *byte = hash.to_le_bytes()[0];
        }
    }
    black_box(hash);
    started.elapsed()
}

fn millis(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}
