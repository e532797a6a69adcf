//! Writing a large file (a snapshot) without stalling the log's syncs: the write-out to the disk is
//! started every `PACE_BYTES` and at most two paces are in flight, so the final `fsync` has little left
//! to write.
//!
//! Why: the kernel keeps a written file in its cache until something syncs it. A snapshot is the whole
//! shard (tens of MB on a busy node), so its one `fsync` put all of it in the disk's queue at once, and
//! the write-ahead log's `fdatasync` of a few KB, queued behind it, took 9–22 ms instead of 0.14 ms:
//! the one-node tail at half peak followed the snapshots. Paced, the log waits behind at most two
//! paces. (The technique is RocksDB's `bytes_per_sync`, with Linux's `sync_file_range`.)

use std::fs::File;
use std::io::Write;
use std::path::Path;

use shopkeep_faults::disk;

/// How many bytes are written before their write-out is started.
pub(super) const PACE_BYTES: u64 = 1024 * 1024;

/// Starting and awaiting the write-out of a range of a file (`sync_file_range`).
pub(super) trait WriteOut: Write {
    /// Starts writing `len` bytes at `from` to the disk, without waiting.
    fn start(&mut self, from: u64, len: u64) -> std::io::Result<()>;
    /// Waits until the `len` bytes at `from` are written to the disk (not flushed from its cache:
    /// the final `fsync` does that).
    fn wait(&mut self, from: u64, len: u64) -> std::io::Result<()>;
}

/// A writer that starts the write-out of each `PACE_BYTES` it is given and, before going on, waits
/// for the pace before it: at most two paces are written but not yet on the disk.
pub(super) struct Paced<F: WriteOut> {
    out: F,
    written: u64,
    /// Where the pace being written starts.
    pace_start: u64,
    /// The pace whose write-out was started last, not yet waited for.
    in_flight: Option<(u64, u64)>,
}

impl<F: WriteOut> Paced<F> {
    pub(super) fn new(out: F) -> Self {
        Self {
            out,
            written: 0,
            pace_start: 0,
            in_flight: None,
        }
    }

    /// The underlying writer; whatever is in flight is left to its `fsync`.
    pub(super) fn into_inner(self) -> F {
        self.out
    }

    fn pace(&mut self) -> std::io::Result<()> {
        let this = (self.pace_start, self.written - self.pace_start);
        self.out.start(this.0, this.1)?;
        if let Some((from, len)) = self.in_flight.replace(this) {
            self.out.wait(from, len)?;
        }
        self.pace_start = self.written;
        Ok(())
    }
}

impl<F: WriteOut> Write for Paced<F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.written += n as u64;
        if self.written - self.pace_start >= PACE_BYTES {
            self.pace()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A file on the disk, whose write-out failures stop the node like a failed `fsync`: the kernel
/// reports a write-back error once, so the `fsync` after a failed `sync_file_range` would not see it.
pub(super) struct DiskFile<'a> {
    pub(super) file: File,
    pub(super) path: &'a Path,
}

impl Write for DiskFile<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl WriteOut for DiskFile<'_> {
    fn start(&mut self, from: u64, len: u64) -> std::io::Result<()> {
        self.sync_range(from, len, false);
        Ok(())
    }

    fn wait(&mut self, from: u64, len: u64) -> std::io::Result<()> {
        self.sync_range(from, len, true);
        Ok(())
    }
}

impl DiskFile<'_> {
    /// Starts the write-out of the range, and with `wait` waits until it is on the disk; a failure
    /// stops the node.
    #[cfg(target_os = "linux")]
    fn sync_range(&mut self, from: u64, len: u64, wait: bool) {
        use std::os::fd::AsRawFd;
        let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
            return; // past what the call takes: left to the fsync
        };
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        // SAFETY: a plain system call on a file descriptor this struct owns; no memory is passed.
        let done = unsafe { libc::sync_file_range(self.file.as_raw_fd(), from, len, flags) };
        if done != 0 {
            let error = std::io::Error::last_os_error();
            disk::fail_stop(self.path, "sync_file_range", &error);
        }
    }

    /// Elsewhere the final `fsync` writes everything, as before pacing.
    #[cfg(not(target_os = "linux"))]
    fn sync_range(&mut self, _from: u64, _len: u64, _wait: bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what was written and every start and wait, in order.
    #[derive(Default)]
    struct Recording {
        bytes: Vec<u8>,
        calls: Vec<(&'static str, u64, u64)>,
    }

    impl Write for Recording {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            // a short write now and then, as a file may do
            let n = buf.len().min(300_000);
            self.bytes.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl WriteOut for Recording {
        fn start(&mut self, from: u64, len: u64) -> std::io::Result<()> {
            self.calls.push(("start", from, len));
            Ok(())
        }
        fn wait(&mut self, from: u64, len: u64) -> std::io::Result<()> {
            self.calls.push(("wait", from, len));
            Ok(())
        }
    }

    #[test]
    fn every_pace_is_started_and_at_most_two_are_in_flight() {
        let body: Vec<u8> = (0..5 * PACE_BYTES + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut paced = Paced::new(Recording::default());
        for chunk in body.chunks(64 * 1024 + 7) {
            paced.write_all(chunk).unwrap();
        }
        let out = paced.into_inner();
        assert_eq!(out.bytes, body, "the bytes pass through unchanged");

        let mut started: Vec<(u64, u64)> = Vec::new();
        let mut waited: Vec<(u64, u64)> = Vec::new();
        let mut end = 0;
        for &(call, from, len) in &out.calls {
            match call {
                "start" => {
                    assert_eq!(from, end, "paces follow each other without a gap");
                    assert!((PACE_BYTES..PACE_BYTES + 300_000).contains(&len), "{len}");
                    end = from + len;
                    started.push((from, len));
                }
                _ => waited.push((from, len)),
            }
            let in_flight = started.len() - waited.len();
            assert!(
                in_flight <= 2,
                "{in_flight} paces in flight after {call} {from}"
            );
        }
        assert_eq!(started.len(), 5, "one start per whole pace written");
        assert_eq!(
            waited,
            started[..4],
            "each pace but the last is waited for, in order"
        );
        assert!(end <= body.len() as u64);
    }

    #[test]
    fn a_file_written_in_paces_holds_every_byte() {
        let dir = std::env::temp_dir().join(format!("skpaced-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("paced");
        let body: Vec<u8> = (0..3 * PACE_BYTES + 99).map(|i| (i % 251) as u8).collect();
        let file = File::create(&path).unwrap();
        let mut paced = Paced::new(DiskFile { file, path: &path });
        paced.write_all(&body).unwrap();
        paced.into_inner().file.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
