//! The snapshot file format: `SKSNAP01` | meta length (u32 LE) | postcard `SnapshotMeta` | application
//! body | SHA-256 of everything before it; writing one (`write_snapshot`, paced: see `paced`),
//! checking one whole against its digest (`verify`), and a shard's snapshot directory (`SnapshotDir`:
//! `current.snap`, its temporaries, setting a corrupt one aside, replacing it atomically).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::paced::{DiskFile, Paced};
use super::{Export, snapshot_error};
use crate::{SnapshotMeta, StorageError, decode, encode};
use shopkeep_faults::disk;

const MAGIC: &[u8; 8] = b"SKSNAP01";
const DIGEST_LEN: u64 = DIGEST_BYTES as u64;
const DIGEST_BYTES: usize = 32;
/// The largest snapshot header accepted: a membership of a few nodes is far smaller.
const MAX_META_LEN: u32 = 1 << 20;

/// A writer that hashes what it writes.
struct Hashing<W: Write> {
    inner: W,
    digest: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.digest.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn io_error(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

pub(super) fn write_snapshot(
    path: &Path,
    meta: &SnapshotMeta,
    export: &mut dyn Export,
) -> std::io::Result<()> {
    let file = File::create(path)?;
    let mut out = Hashing {
        inner: BufWriter::new(Paced::new(DiskFile { file, path })),
        digest: Sha256::new(),
    };
    let header = encode(meta).map_err(io_error)?;
    out.write_all(MAGIC)?;
    out.write_all(&u32::try_from(header.len()).map_err(io_error)?.to_le_bytes())?;
    out.write_all(&header)?;
    export.write_to(&mut out).map_err(|e| {
        // keep a full disk recognisable, so that the build is retried (`Attempt::Full`)
        if disk::is_disk_full(&*e) {
            std::io::Error::new(std::io::ErrorKind::StorageFull, e.to_string())
        } else {
            io_error(e)
        }
    })?;
    let digest = out.digest.finalize();
    let mut inner = out.inner;
    inner.write_all(&digest)?;
    let file = inner
        .into_inner()
        .map_err(|e| e.into_error())?
        .into_inner()
        .file;
    // After a failed fsync nothing the kernel cached can be trusted (see `disk`).
    if let Err(error) = file.sync_all() {
        disk::fail_stop(path, "fsync", &error);
    }
    Ok(())
}

/// Reads the header of a snapshot file: its meta and where the body starts.
fn read_header(file: &mut File) -> std::io::Result<(SnapshotMeta, u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(io_error("not a shopkeep snapshot"));
    }
    let mut len = [0u8; 4];
    file.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_META_LEN {
        return Err(io_error("snapshot header too large"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let meta: SnapshotMeta = decode(&header).map_err(io_error)?;
    Ok((meta, 12 + u64::from(len)))
}

/// Checks a whole snapshot file against its digest; returns its meta and body length, and leaves the
/// file positioned at the start of the body.
pub(super) fn verify(file: &mut File) -> std::io::Result<(SnapshotMeta, u64)> {
    let total = file.metadata()?.len();
    let (meta, body_start) = read_header(file)?;
    if total < body_start + DIGEST_LEN {
        return Err(io_error("snapshot file is truncated"));
    }
    file.seek(SeekFrom::Start(0))?;
    let mut digest = Sha256::new();
    let mut reader = BufReader::new(&mut *file).take(total - DIGEST_LEN);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        digest.update(&buffer[..n]);
    }
    let mut stored = [0u8; DIGEST_BYTES];
    file.seek(SeekFrom::Start(total - DIGEST_LEN))?;
    file.read_exact(&mut stored)?;
    if digest.finalize().as_slice() != stored {
        return Err(io_error("snapshot file is corrupt (digest mismatch)"));
    }
    file.seek(SeekFrom::Start(body_start))?;
    Ok((meta, total - DIGEST_LEN - body_start))
}

/// The directory of one shard's snapshots: `current.snap`, and temporaries while building or receiving.
pub(super) struct SnapshotDir {
    pub(super) dir: PathBuf,
    /// Serialises replacing `current.snap`, so a slow build never replaces a newer received snapshot.
    pub(super) replace: std::sync::Mutex<()>,
}

impl SnapshotDir {
    fn current_path(&self) -> PathBuf {
        self.dir.join("current.snap")
    }

    pub(super) fn building_path(&self) -> PathBuf {
        self.dir.join("building.tmp")
    }

    pub(super) fn receiving_path(&self) -> PathBuf {
        self.dir.join("receiving.tmp")
    }

    pub(super) fn installing_path(&self) -> PathBuf {
        self.dir.join("installing.tmp")
    }

    pub(super) fn remove_temporaries(&self) {
        let _ = std::fs::remove_file(self.building_path());
        let _ = std::fs::remove_file(self.receiving_path());
        let _ = std::fs::remove_file(self.installing_path());
    }

    /// Checks the current snapshot against its digest; a corrupt one is moved into `quarantine/` under
    /// this directory (see `shopkeep_faults::integrity`). Returns whether it was.
    pub(super) fn set_aside_if_corrupt(&self) -> std::io::Result<bool> {
        let path = self.current_path();
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let Err(why) = verify(&mut file) else {
            return Ok(false);
        };
        drop(file);
        let moved = shopkeep_faults::integrity::quarantine(&self.dir, std::slice::from_ref(&path))?;
        tracing::error!(
            file = %path.display(),
            moved_to = %moved.display(),
            "the snapshot is corrupt ({why}): it was set aside and is built again from the state"
        );
        Ok(true)
    }

    /// The current snapshot's meta and an open file positioned at its start.
    pub(super) fn current(&self) -> std::io::Result<Option<(SnapshotMeta, File)>> {
        let mut file = match File::open(self.current_path()) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let (meta, _) = read_header(&mut file)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Some((meta, file)))
    }

    /// Makes the complete, synced file at `path` the current snapshot, unless a newer one is current.
    pub(super) fn keep(&self, path: &Path, meta: &SnapshotMeta) -> Result<(), StorageError> {
        let _serialised = self.replace.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((current, _)) = self.current().map_err(snapshot_error)? {
            if current.last_log_id > meta.last_log_id {
                let _ = std::fs::remove_file(path);
                return Ok(());
            }
        }
        std::fs::rename(path, self.current_path()).map_err(snapshot_error)?;
        let dir = File::open(&self.dir).map_err(snapshot_error)?;
        if let Err(error) = dir.sync_all() {
            disk::fail_stop(&self.dir, "fsync", &error);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::StateError;

    struct Fixed(Vec<u8>);

    impl Export for Fixed {
        fn marker(&self) -> Option<Vec<u8>> {
            None
        }
        fn write_to(&mut self, out: &mut dyn Write) -> Result<(), StateError> {
            out.write_all(&self.0)?;
            Ok(())
        }
    }

    #[test]
    fn a_snapshot_file_round_trips_and_a_flipped_byte_is_refused() {
        let dir = std::env::temp_dir().join(format!("sksnap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.snap");
        let meta = SnapshotMeta::default();
        write_snapshot(&path, &meta, &mut Fixed(b"hello body".to_vec())).unwrap();
        let mut file = File::open(&path).unwrap();
        let (read, body_len) = verify(&mut file).unwrap();
        assert_eq!(read, meta);
        let mut body = String::new();
        file.take(body_len).read_to_string(&mut body).unwrap();
        assert_eq!(body, "hello body");

        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() - 36;
        bytes[middle] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let error = verify(&mut File::open(&path).unwrap()).unwrap_err();
        assert!(error.to_string().contains("digest"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
