//! Files found corrupt when the node starts: detected before anything is served, then set aside or
//! refused.
//!
//! A bit flipped at rest (a bad sector, a failing controller, a careless copy) must never be served as
//! data, nor rejoin a cluster as if it were the member's promise. At start:
//! - every redb file of the node (the Raft log, each shard file) is opened with redb's integrity check
//!   ([`open_verified`]), which verifies the checksum of every page of the committed trees. A plain
//!   redb open trusts a file that was shut down cleanly, and reads do not verify checksums;
//! - each shard's current snapshot is checked against its SHA-256 digest
//!   (`shopkeep_raft::state_machine`).
//!
//! What is found corrupt:
//! - **in a cluster** is moved aside into `quarantine/<unix seconds>/` under the data directory
//!   ([`quarantine`]), and the member rebuilds what it held from its peers as a member whose data was
//!   wiped would (`shopkeep_raft::cluster::rebuild`). A corrupt log takes the shard files with it: the
//!   log holds the member's votes and acknowledged entries, and shard files without their log would
//!   rejoin without the rebuild's quarantine. A corrupt shard file goes alone; its log is then reset
//!   too if it was purged past what the new, empty file holds (`shopkeep_raft::Cluster::open`);
//! - **on a single node** stops the start with an error naming the file and how to restore a backup:
//!   there is no peer to rebuild from, and guessing would lose money silently.
//!
//! A corrupt snapshot is set aside and built again from the shard's state, on either.
//!
//! The shard files are verified several at a time, and so are the snapshots ([`verify_each`]): a
//! start reads the whole data directory, and one file at a time it waited on the disk.
//!
//! One subtlety of redb's single-phase commits: a file whose newest commit does not verify (a torn
//! write after a power loss, or a bit flipped in it later) falls back to the commit before. For a
//! shard file that is crash recovery: the log re-applies what it lost. For the Raft log of a cluster
//! member it could forget a vote or an acknowledged entry, so a fallback there counts as corruption
//! ([`Fallback::Refuse`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, DatabaseError, StorageError};

use crate::disk;

/// The directory under the data directory that corrupt files are moved into.
pub const QUARANTINE_DIR: &str = "quarantine";

/// What the integrity check may do when a file's newest commit does not verify (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Fall back to the commit before, and say so in the log.
    Allow,
    /// Report the file as corrupt.
    Refuse,
}

/// Why a file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Other {
        path: PathBuf,
        #[source]
        source: DatabaseError,
    },
}

/// redb's repair reports this progress only when it falls back to the commit before the newest
/// (`Database::do_repair`, redb 4.6): the first of its three scans found the newest commit corrupt.
const FALLBACK_PROGRESS: f64 = 0.3;

/// Opens (or creates) the redb file at `path` on the fail-stop backend, verifying every page's
/// checksum first (module docs). A file redb cannot make sense of (it may panic on one) is corrupt.
pub fn open_verified(
    builder: &mut redb::Builder,
    path: &Path,
    fallback: Fallback,
) -> Result<Database, OpenError> {
    let fell_back = Arc::new(AtomicBool::new(false));
    let seen = fell_back.clone();
    builder.set_check_integrity_on_open(true);
    builder.set_repair_callback(move |session| {
        if (session.progress() - FALLBACK_PROGRESS).abs() < 1e-9 {
            seen.store(true, Ordering::Relaxed);
            if fallback == Fallback::Refuse {
                session.abort();
            }
        }
    });
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        disk::open_database(builder, path)
    }));
    let corrupt = |why: String| OpenError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let db = match opened {
        Err(_) => return Err(corrupt("redb could not read it".into())),
        Ok(Err(DatabaseError::Storage(StorageError::Corrupted(why)))) => return Err(corrupt(why)),
        Ok(Err(DatabaseError::RepairAborted)) => {
            return Err(corrupt(
                "its newest commit does not verify, and falling back to the one before could forget a \
                 vote or an acknowledged entry"
                    .into(),
            ));
        }
        Ok(Err(source)) => {
            return Err(OpenError::Other {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(Ok(db)) => db,
    };
    if fell_back.load(Ordering::Relaxed) {
        tracing::warn!(
            file = %path.display(),
            "the newest commit of the file did not verify (a torn write or a flipped bit): it was \
             rolled back to the commit before"
        );
    }
    Ok(db)
}

/// Moves `paths` (files or directories; missing ones are skipped) into a new
/// `quarantine/<unix seconds>[-n]/` under `data_dir`, durably; returns that directory.
pub fn quarantine(data_dir: &Path, paths: &[PathBuf]) -> std::io::Result<PathBuf> {
    let root = data_dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&root)?;
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Created, not tested for: shards found corrupt together are set aside by several threads at once.
    let mut target = root.join(seconds.to_string());
    let mut n = 1;
    loop {
        match std::fs::create_dir(&target) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                target = root.join(format!("{seconds}-{n}"));
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
    for path in paths {
        let Some(name) = path.file_name() else {
            continue;
        };
        match std::fs::rename(path, target.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    for dir in [&target, &root, &data_dir.to_path_buf()] {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(target)
}

/// How many files a start verifies at once. The integrity check reads a file's pages in tree order, one
/// at a time: alone it leaves a virtual disk mostly idle (4 KiB random reads here: 46 MB/s one at a
/// time, 156 MB/s eight at a time), and the page-cache case is bound by one core.
pub const VERIFY_AT_ONCE: usize = 8;

/// Runs `verify` on every item, at most [`VERIFY_AT_ONCE`] at a time on threads of their own (named
/// `verify-files`), and returns the results in the items' order. A start's files are independent of
/// each other, so their checks need not wait for one another. Threads the system refuses are done
/// without: the calling thread verifies what is left.
pub fn verify_each<T: Send, R: Send>(items: Vec<T>, verify: impl Fn(T) -> R + Sync) -> Vec<R> {
    let count = items.len();
    let queue = std::sync::Mutex::new(items.into_iter().enumerate());
    let results = std::sync::Mutex::new((0..count).map(|_| None).collect::<Vec<Option<R>>>());
    let work = || {
        loop {
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((at, item)) = next else { break };
            let result = verify(item);
            results.lock().unwrap_or_else(|e| e.into_inner())[at] = Some(result);
        }
    };
    std::thread::scope(|scope| {
        // The calling thread is one of them.
        for _ in 1..count.min(VERIFY_AT_ONCE) {
            let spawned = std::thread::Builder::new()
                .name("verify-files".into())
                .spawn_scoped(scope, work);
            if let Err(error) = spawned {
                tracing::warn!(%error, "could not start a thread to verify files");
                break;
            }
        }
        work();
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|result| result.expect("every item was verified: a panic would have ended the scope"))
        .collect()
}

/// What an operator of a single node does with a corrupt file.
pub fn restore_advice(path: &Path) -> String {
    format!(
        "This node has no peer to rebuild {} from: stop it, restore the latest backup into a new \
         data directory (`shopkeep restore --from BACKUP --data-dir NEW`, README \"Back up and \
         restore\"), and start it on that; keep the corrupt directory aside for inspection",
        path.display()
    )
}

/// The node's Raft log file in its data directory.
pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join(LOG_FILE)
}

/// The name of the node's Raft log file.
pub const LOG_FILE: &str = "raft-log.redb";
/// The name of its write-ahead file, set aside with it (its records belong to that file alone).
pub const LOG_WAL_FILE: &str = "raft-log.wal";
/// The directory of the shards' snapshots.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// Verifies the node's Raft log, if it has one, before anything opens it (module docs). In a cluster
/// a corrupt log is set aside with `state_files` and the snapshots, and the node starts empty (and
/// rebuilds); on a single node it is an error that says how to restore. Returns where the files went.
pub fn verify_log(
    data_dir: &Path,
    clustered: bool,
    state_files: &[PathBuf],
) -> Result<Option<PathBuf>, OpenError> {
    let path = log_path(data_dir);
    if !path.exists() {
        return Ok(None);
    }
    let fallback = if clustered {
        Fallback::Refuse
    } else {
        Fallback::Allow
    };
    let why = match open_verified(&mut Database::builder(), &path, fallback) {
        Ok(db) => {
            drop(db);
            return Ok(None);
        }
        Err(OpenError::Corrupt { why, .. }) => why,
        Err(other) => return Err(other),
    };
    if !clustered {
        return Err(OpenError::Corrupt {
            why: format!("{why}. {}", restore_advice(&path)),
            path,
        });
    }
    let mut files = vec![
        path.clone(),
        data_dir.join(LOG_WAL_FILE),
        data_dir.join(SNAPSHOT_DIR),
    ];
    files.extend_from_slice(state_files);
    let moved = quarantine(data_dir, &files).map_err(|e| OpenError::Other {
        path: path.clone(),
        source: DatabaseError::Storage(StorageError::Io(e)),
    })?;
    tracing::error!(
        file = %path.display(),
        moved_to = %moved.display(),
        "the Raft log is corrupt ({why}): it was set aside with the shard files, and this member \
         rebuilds every shard from its peers"
    );
    Ok(Some(moved))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use redb::TableDefinition;

    use super::*;

    const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("rows");

    /// A file of `count` rows of `size` bytes, each row's value starting with `row-<n>-`.
    fn write_rows(path: &Path, count: u64, size: usize) {
        let db = Database::create(path).expect("create");
        let txn = db.begin_write().expect("write");
        {
            let mut table = txn.open_table(ROWS).expect("table");
            for n in 0..count {
                let mut value = format!("row-{n}-").into_bytes();
                value.resize(size, b'.');
                table.insert(n, value.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    fn flip_every(path: &Path, needle: &[u8]) -> usize {
        let mut bytes = std::fs::read(path).expect("read");
        let at: Vec<usize> = bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect();
        for &i in &at {
            bytes[i] ^= 0x01;
        }
        std::fs::write(path, &bytes).expect("write");
        at.len()
    }

    #[test]
    fn a_clean_file_opens_and_a_flipped_bit_in_a_live_row_is_reported_corrupt() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("file.redb");
        write_rows(&path, 1000, 100);
        drop(open_verified(&mut Database::builder(), &path, Fallback::Refuse).expect("clean"));

        assert!(flip_every(&path, b"row-500-") > 0);
        match open_verified(&mut Database::builder(), &path, Fallback::Refuse) {
            Err(OpenError::Corrupt { path: reported, .. }) => assert_eq!(reported, path),
            Err(other) => panic!("not reported corrupt: {other}"),
            Ok(_) => panic!("a corrupt file opened"),
        }
    }

    #[test]
    fn quarantine_moves_files_aside_and_skips_missing_ones() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("a.redb"), b"a").expect("a");
        let moved = quarantine(
            dir.path(),
            &[dir.path().join("a.redb"), dir.path().join("missing")],
        )
        .expect("quarantine");
        assert!(moved.starts_with(dir.path().join(QUARANTINE_DIR)));
        assert_eq!(std::fs::read(moved.join("a.redb")).expect("moved"), b"a");
        assert!(!dir.path().join("a.redb").exists());
    }

    #[test]
    fn files_quarantined_at_once_each_get_a_directory_of_their_own() {
        const FILES: usize = 16;
        let dir = tempfile::tempdir().expect("dir");
        let paths: Vec<PathBuf> = (0..FILES)
            .map(|n| dir.path().join(format!("shard-{n:03}.redb")))
            .collect();
        for path in &paths {
            std::fs::write(path, b"x").expect("file");
        }
        let start = std::sync::Barrier::new(FILES);
        let moved: Vec<PathBuf> = std::thread::scope(|scope| {
            let threads: Vec<_> = paths
                .iter()
                .map(|path| {
                    let (start, root) = (&start, dir.path());
                    scope.spawn(move || {
                        start.wait();
                        quarantine(root, std::slice::from_ref(path))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("thread").expect("quarantined"))
                .collect()
        });
        let distinct: std::collections::BTreeSet<_> = moved.iter().collect();
        assert_eq!(
            distinct.len(),
            FILES,
            "two files shared a directory: {moved:?}"
        );
        for (path, into) in paths.iter().zip(&moved) {
            assert!(into.join(path.file_name().expect("name")).exists());
        }
    }

    #[test]
    fn verify_each_answers_in_the_items_order_and_runs_at_most_its_bound_at_once() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let items: Vec<u64> = (0..40).collect();
        let results = verify_each(items, |n| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5 + n % 3));
            running.fetch_sub(1, Ordering::SeqCst);
            n * 2
        });
        assert_eq!(results, (0..40).map(|n| n * 2).collect::<Vec<_>>());
        let most = most.load(Ordering::SeqCst);
        assert!(most > 1, "nothing ran at once");
        assert!(most <= VERIFY_AT_ONCE, "{most} ran at once");
        assert!(verify_each(Vec::<u64>::new(), |n| n).is_empty());
    }

    /// What the check costs at start: `cargo test -p shopkeep-raft --release integrity -- --ignored
    /// --nocapture` (256 MiB of rows).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_of_verifying_a_file_at_open() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("big.redb");
        write_rows(&path, 256 * 1024, 1024);
        let bytes = std::fs::metadata(&path).expect("size").len();
        let started = Instant::now();
        drop(Database::open(&path).expect("plain open"));
        let plain = started.elapsed();
        let started = Instant::now();
        drop(open_verified(&mut Database::builder(), &path, Fallback::Refuse).expect("verified"));
        let verified = started.elapsed();
        eprintln!(
            "{} MiB: plain open {plain:?}, verified open {verified:?}",
            bytes >> 20
        );
    }
}
