//! The log's write-ahead file (`raft-log.wal` beside `raft-log.redb`): what makes a batch of the writer
//! durable with ONE write and ONE `fdatasync` into blocks the file already has, where a durable redb
//! commit writes every B-tree page the batch changed and syncs them (~1.5× the time on this project's
//! VM: 220–250 µs against 157 µs for one entry).
//!
//! How the two files work together (the writer, `writer.rs`):
//! - each batch is appended here as one record and synced; only then is it acknowledged. A batch of
//!   appends and committed marks alone goes no further for now (openraft reads those entries from the
//!   mirror); any other batch is written, after those, to the redb file in a commit that is not flushed
//!   (`Durability::None`: readers see it at once) before its record is appended (`writer::Deferred`);
//! - every `CHECKPOINT_EVERY`, or when the next record would pass `CHECKPOINT_BYTES`, a batch is
//!   committed to the redb file durably instead (a checkpoint: everything before it is in the redb file
//!   for good) together with a new epoch, and this file starts over from offset 0 under that epoch;
//! - when the redb file is opened (a start, or the writer's reopen after a full disk), the records of
//!   its epoch are written to it again and a checkpoint follows. Every operation is a put or a delete of
//!   a key range, so writing again what the file already holds changes nothing: the redb file ends as
//!   the whole sequence of acknowledged batches left it.
//!
//! The epoch is random (a `u64`, kept in the redb file's `wal` table), so a record left over from an
//! earlier epoch, or from another redb file that once sat beside this one, is never taken for a current
//! one.
//!
//! Format (a format: change it only by appending `WalOp` variants and fields). The file is written with
//! zeros when it is created (`INITIAL_BYTES`) and grows the same way, by doubling up to `WAL_BYTES`,
//! before a record would pass its end (a zeroed extension synced with its new size): syncing a record
//! then never has a block to allocate or a size to record, and a node that writes little keeps a
//! small file. A record is a 20-byte header, `len` u32 LE, `epoch` u64 LE, `sum`
//! u64 LE (xxh3-64 of the epoch's and the length's bytes and the payload), then `len` bytes of payload:
//! a postcard `Vec<WalOp>`, the batch. The records of an epoch follow each other from offset 0; the
//! first that does not check (another epoch, a length of 0 or past the end, a wrong sum) ends them. A
//! record is only ever acknowledged after its sync, so only the last one can be torn by a crash.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shopkeep_faults::disk;

/// The file's size when created.
const INITIAL_BYTES: u64 = 1024 * 1024;
/// The most it grows to.
pub(super) const WAL_BYTES: u64 = 32 * 1024 * 1024;
/// Past this offset the next batch is a checkpoint (the file keeps room for one more large record).
const CHECKPOINT_BYTES: u64 = WAL_BYTES / 2;
/// Longest time between two checkpoints while batches are written: bounds what a start writes again
/// and the pages the redb file holds unsynced.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const HEADER: usize = 20;

/// One operation of a batch, as the redb file takes it (see `writer::write_ops`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum WalOp {
    /// Sets `shard`'s entries (index → postcard `Entry`).
    Append {
        shard: u32,
        entries: Vec<(u64, Vec<u8>)>,
    },
    /// Deletes the shard's entries at and after `from`.
    Truncate { shard: u32, from: u64 },
    /// Deletes the shard's entries up to and including `upto` and sets `last_purged` to `mark`.
    Purge {
        shard: u32,
        upto: u64,
        mark: Vec<u8>,
    },
    /// Sets a value kept beside the shard's log.
    Put {
        shard: u32,
        name: String,
        value: Vec<u8>,
    },
    /// Deletes everything of the shard.
    Reset { shard: u32 },
}

/// The open write-ahead file and where the current epoch's next record goes.
pub(super) struct Wal {
    path: PathBuf,
    file: File,
    /// The file's length: zeros or records up to there.
    allocated: u64,
    epoch: u64,
    offset: u64,
    checkpointed_at: Instant,
}

impl Wal {
    /// Opens the file at `path`, creating it (`INITIAL_BYTES` of zeros, synced) if it is missing.
    pub(super) fn open(path: &Path) -> std::io::Result<Wal> {
        if !path.exists() {
            create(path)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let allocated = file.metadata()?.len().min(WAL_BYTES);
        Ok(Wal {
            path: path.to_path_buf(),
            file,
            allocated,
            epoch: 0,
            offset: 0,
            checkpointed_at: Instant::now(),
        })
    }

    /// The batches of `epoch`, in the order they were written.
    pub(super) fn records(&self, epoch: u64) -> std::io::Result<Vec<Vec<WalOp>>> {
        let mut batches = Vec::new();
        let mut offset = 0;
        while let Some((ops, next)) = self.record_at(epoch, offset)? {
            batches.push(ops);
            offset = next;
        }
        Ok(batches)
    }

    /// The record of `epoch` at `offset` and where the next one starts, or `None` where they end.
    fn record_at(&self, epoch: u64, offset: u64) -> std::io::Result<Option<(Vec<WalOp>, u64)>> {
        let mut header = [0u8; HEADER];
        if offset + HEADER as u64 > self.allocated {
            return Ok(None);
        }
        self.file.read_exact_at(&mut header, offset)?;
        let (len, found, sum) = split_header(&header);
        let end = offset + HEADER as u64 + u64::from(len);
        if found != epoch || len == 0 || end > self.allocated {
            return Ok(None);
        }
        let mut payload = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut payload, offset + HEADER as u64)?;
        if checksum(epoch, len, &payload) != sum {
            return Ok(None);
        }
        match postcard::from_bytes(&payload) {
            Ok(ops) => Ok(Some((ops, end))),
            // a sum that checks over bytes we cannot read is a bug or another version, not a torn write
            Err(e) => Err(std::io::Error::other(format!(
                "{}: a record at {offset} checks but does not decode: {e}",
                self.path.display()
            ))),
        }
    }

    /// Whether the next batch should be a checkpoint: the file is half full, or the last checkpoint
    /// is older than `CHECKPOINT_EVERY` and records were written since.
    fn checkpoint_due(&self, payload_len: usize) -> bool {
        let end = self.offset + (HEADER + payload_len) as u64;
        end > CHECKPOINT_BYTES
            || (self.offset > 0 && self.checkpointed_at.elapsed() >= CHECKPOINT_EVERY)
    }

    /// Whether a record of `payload_len` bytes can be appended now: no checkpoint is due and the file
    /// has (or was grown to) room for it.
    pub(super) fn takes_without_checkpoint(&mut self, payload_len: usize) -> bool {
        !self.checkpoint_due(payload_len) && self.make_room(payload_len)
    }

    /// Whether a record of `payload_len` bytes fits in the file, growing it if need be. `false` when
    /// the disk has no room for the growth: that batch is then a checkpoint, and the redb file's commit
    /// waits out the full disk as it always did. Any other failure stops the process.
    fn make_room(&mut self, payload_len: usize) -> bool {
        let end = self.offset + (HEADER + payload_len) as u64;
        if end <= self.allocated {
            return true;
        }
        match self.grow(end) {
            Ok(()) => true,
            Err(e) if disk::is_full(&e) => {
                tracing::warn!(path = %self.path.display(), "no room to grow the raft log's write-ahead file; checkpointing instead");
                false
            }
            Err(e) => disk::fail_stop(&self.path, "growing", &e),
        }
    }

    /// After a checkpoint that stored `epoch` in the redb file: the records start over under it.
    pub(super) fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.offset = 0;
        self.checkpointed_at = Instant::now();
    }

    /// Appends `payload` as the current epoch's next record and syncs it. A failed write or sync
    /// stops the process (`disk::fail_stop`): what the kernel kept of it is unknown. The caller has
    /// checked that it fits (`checkpoint_due` is false).
    pub(super) fn append(&mut self, payload: &[u8]) {
        let Ok(len) = u32::try_from(payload.len()) else {
            unreachable!("checkpoint_due keeps records under WAL_BYTES");
        };
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&self.epoch.to_le_bytes());
        record.extend_from_slice(&checksum(self.epoch, len, payload).to_le_bytes());
        record.extend_from_slice(payload);
        let end = self.offset + record.len() as u64;
        if end > self.allocated {
            if let Err(e) = self.grow(end) {
                disk::fail_stop(&self.path, "growing", &e);
            }
        }
        if let Err(e) = self.file.write_all_at(&record, self.offset) {
            disk::fail_stop(&self.path, "a write", &e);
        }
        if let Err(e) = self.file.sync_data() {
            disk::fail_stop(&self.path, "fsync", &e);
        }
        self.offset += record.len() as u64;
    }
}

impl Wal {
    /// Extends the file with zeros, doubling it until it holds `end` (at most `WAL_BYTES`), and syncs
    /// its data and new length.
    fn grow(&mut self, end: u64) -> std::io::Result<()> {
        let mut size = self.allocated.max(INITIAL_BYTES);
        while size < end {
            size = size.saturating_mul(2);
        }
        let size = size.min(WAL_BYTES);
        let zeros = vec![0u8; 1024 * 1024];
        let mut at = self.allocated;
        while at < size {
            let chunk = usize::try_from(size - at).map_or(zeros.len(), |n| n.min(zeros.len()));
            self.file.write_all_at(&zeros[..chunk], at)?;
            at += chunk as u64;
        }
        self.file.sync_all()?;
        self.allocated = size;
        Ok(())
    }
}

/// A new epoch: random and never 0 (a zeroed header's).
pub(super) fn new_epoch() -> u64 {
    loop {
        let epoch: u64 = rand::random();
        if epoch != 0 {
            return epoch;
        }
    }
}

fn split_header(header: &[u8; HEADER]) -> (u32, u64, u64) {
    let mut len = [0u8; 4];
    let mut epoch = [0u8; 8];
    let mut sum = [0u8; 8];
    len.copy_from_slice(&header[0..4]);
    epoch.copy_from_slice(&header[4..12]);
    sum.copy_from_slice(&header[12..20]);
    (
        u32::from_le_bytes(len),
        u64::from_le_bytes(epoch),
        u64::from_le_bytes(sum),
    )
}

fn checksum(epoch: u64, len: u32, payload: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&epoch.to_le_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.digest()
}

/// Writes a zeroed file of `INITIAL_BYTES` under a temporary name, syncs it, and renames it into place
/// (synced directory), so that `path` is either absent or whole.
fn create(path: &Path) -> std::io::Result<()> {
    let partial = path.with_extension("wal.partial");
    let mut file = File::create(&partial)?;
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..INITIAL_BYTES / zeros.len() as u64 {
        file.write_all(&zeros)?;
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write-ahead file's path in a directory removed when the first value is dropped.
    fn fresh() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("raft-log.wal");
        (dir, path)
    }

    fn put(shard: u32, value: u8) -> WalOp {
        WalOp::Put {
            shard,
            name: "vote".into(),
            value: vec![value],
        }
    }

    #[test]
    fn records_of_the_current_epoch_are_read_back_in_order_and_older_epochs_are_not() {
        let (_dir, path) = fresh();
        let mut wal = Wal::open(&path).expect("open");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            INITIAL_BYTES,
            "created with its first MiB"
        );
        wal.restart(7);
        for v in 0..3 {
            wal.append(&postcard::to_allocvec(&vec![put(1, v)]).expect("encode"));
        }
        // a new epoch overwrites the start: the old epoch's later records are not the new one's
        wal.restart(8);
        wal.append(&postcard::to_allocvec(&vec![put(2, 9)]).expect("encode"));
        let reopened = Wal::open(&path).expect("reopen");
        assert_eq!(reopened.records(8).expect("read"), vec![vec![put(2, 9)]]);
        assert_eq!(
            reopened.records(7).expect("read"),
            Vec::<Vec<WalOp>>::new(),
            "offset 0 belongs to epoch 8 now"
        );
    }

    #[test]
    fn a_torn_last_record_ends_the_records_before_it() {
        let (_dir, path) = fresh();
        let mut wal = Wal::open(&path).expect("open");
        wal.restart(5);
        wal.append(&postcard::to_allocvec(&vec![put(1, 1)]).expect("encode"));
        let second = wal.offset;
        wal.append(&postcard::to_allocvec(&vec![put(1, 2)]).expect("encode"));
        // flip a byte of the second record's payload, as a write cut off by a crash leaves it
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.write_all_at(&[0xff], second + HEADER as u64 + 1)
            .expect("flip");
        let reopened = Wal::open(&path).expect("reopen");
        assert_eq!(reopened.records(5).expect("read"), vec![vec![put(1, 1)]]);
    }

    #[test]
    fn a_checkpoint_is_due_when_half_full_or_after_its_interval_with_records_written() {
        let (_dir, path) = fresh();
        let mut wal = Wal::open(&path).expect("open");
        wal.restart(3);
        assert!(!wal.checkpoint_due(100), "empty and young");
        assert!(
            wal.checkpoint_due(usize::try_from(CHECKPOINT_BYTES).expect("fits")),
            "past half"
        );
        wal.append(&[1, 2, 3]);
        wal.checkpointed_at = Instant::now() - CHECKPOINT_EVERY;
        assert!(wal.checkpoint_due(100), "records older than the interval");
        wal.restart(4);
        wal.checkpointed_at = Instant::now() - CHECKPOINT_EVERY;
        assert!(!wal.checkpoint_due(100), "nothing written since");
    }

    #[test]
    fn the_file_doubles_before_a_record_would_pass_its_end_and_keeps_the_records_before() {
        let (_dir, path) = fresh();
        let mut wal = Wal::open(&path).expect("open");
        wal.restart(9);
        let small = postcard::to_allocvec(&vec![put(1, 1)]).expect("encode");
        wal.append(&small);
        let big = vec![WalOp::Append {
            shard: 2,
            entries: vec![(1, vec![5u8; 1_500_000])],
        }];
        wal.append(&postcard::to_allocvec(&big).expect("encode"));
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            2 * INITIAL_BYTES,
            "doubled once"
        );
        let reopened = Wal::open(&path).expect("reopen");
        assert_eq!(
            reopened.records(9).expect("read"),
            vec![vec![put(1, 1)], big]
        );
    }

    /// A full disk never stops the node over the write-ahead file: the batch that cannot grow it is
    /// told to checkpoint instead (the redb file's commit then waits the disk out). On a small tmpfs,
    /// which needs root (as CI runs); unmounted at the end.
    #[test]
    fn no_room_to_grow_asks_for_a_checkpoint_instead_of_stopping() {
        let dir = std::env::temp_dir().join(format!("skwal-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(mounted.success(), "mounting a tmpfs needs root");
        let result = std::panic::catch_unwind(|| {
            let mut wal = Wal::open(&dir.join("raft-log.wal")).expect("open");
            wal.restart(1);
            // what is left of the 3 MiB after the file's first MiB, filled
            let filler = dir.join("filler");
            let mut file = File::create(&filler).expect("filler");
            let chunk = vec![1u8; 64 * 1024];
            while file.write_all(&chunk).is_ok() {}
            assert!(wal.make_room(100), "fits in the first MiB");
            assert!(!wal.make_room(1_500_000), "no room to double");
            wal.append(&postcard::to_allocvec(&vec![put(1, 1)]).expect("encode"));
            assert_eq!(wal.records(1).expect("read"), vec![vec![put(1, 1)]]);
        });
        let _ = std::process::Command::new("umount").arg(&dir).status();
        let _ = std::fs::remove_dir(&dir);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    /// The record's bytes are a format: pinned.
    #[test]
    fn a_record_keeps_its_bytes() {
        let ops = vec![
            WalOp::Append {
                shard: 1,
                entries: vec![(2, vec![3, 4])],
            },
            WalOp::Truncate { shard: 5, from: 6 },
            WalOp::Purge {
                shard: 7,
                upto: 8,
                mark: vec![9],
            },
            put(10, 11),
            WalOp::Reset { shard: 12 },
        ];
        let payload = postcard::to_allocvec(&ops).expect("encode");
        assert_eq!(
            hex::encode(&payload),
            "05000101020203040105060207080109030a04766f7465010b040c"
        );
        let (_dir, path) = fresh();
        let mut wal = Wal::open(&path).expect("open");
        wal.restart(0x0102_0304_0506_0708);
        wal.append(&payload);
        let mut header = [0u8; HEADER];
        wal.file.read_exact_at(&mut header, 0).expect("read");
        assert_eq!(
            hex::encode(&header[..12]),
            "1b0000000807060504030201",
            "length, then epoch, little-endian"
        );
        assert_eq!(wal.records(0x0102_0304_0506_0708).expect("read"), vec![ops]);
    }
}
