//! Online backups of a node's shards, and their restore into a new data directory.
//!
//! A shard's backup is its state exported at one committed index: taken after a read barrier, so it
//! holds every write acknowledged before the backup started, from one redb read snapshot, so it is
//! consistent while the shop keeps writing. The body is the row stream of a Raft snapshot
//! (`state::snapshot`), streamed in bounded chunks; its head (last applied index, replication marker,
//! `state_hash`) comes from the same read snapshot. A restore imports each body into a new shard file
//! and seeds the shard's Raft log so that the node starts where the backup ends
//! (`LogDb::seed_restored`).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use shopkeep_faults::integrity;
use shopkeep_raft::log_store::LogDb;
use tokio::sync::{mpsc, oneshot};

pub use crate::state::snapshot::{ExportHead, ExportSummary, hash_export};
use crate::state::{ShardStore, snapshot};

use super::{EngineError, Node};

/// Bytes per chunk of a streamed export.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between the reading thread and the client: memory per export stays at
/// `CHUNK_BYTES × (CHUNKS_AHEAD + 2)` whatever the shard's size.
const CHUNKS_AHEAD: usize = 4;

/// A shard's backup as it streams: its head, then its body in chunks (an `Err` chunk ends a failed
/// export, and a body that ends without the export's end marker is incomplete).
pub struct ShardExport {
    pub head: ExportHead,
    pub body: mpsc::Receiver<Result<Vec<u8>, String>>,
}

impl Node {
    /// Starts exporting `shard` as of now: every write acknowledged before the call is in it.
    pub async fn export_shard(&self, shard: u32) -> Result<ShardExport, EngineError> {
        let store = self
            .stores
            .get(shard as usize)
            .ok_or_else(|| EngineError::Internal(format!("no shard {shard}")))?
            .clone();
        self.cluster.read_barrier(shard).await?;
        let (head_tx, head_rx) = oneshot::channel();
        let (body_tx, body) = mpsc::channel(CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || export_blocking(&store, head_tx, body_tx));
        let head = head_rx
            .await
            .map_err(|_| EngineError::Internal("the export stopped".into()))??;
        Ok(ShardExport { head, body })
    }
}

fn export_blocking(
    store: &ShardStore,
    head_tx: oneshot::Sender<Result<ExportHead, EngineError>>,
    body_tx: mpsc::Sender<Result<Vec<u8>, String>>,
) {
    let started = store
        .begin_read()
        .and_then(|txn| snapshot::export_head(&txn).map(|head| (txn, head)));
    let txn = match started {
        Ok((txn, head)) => {
            if head_tx.send(Ok(head)).is_err() {
                return;
            }
            txn
        }
        Err(e) => {
            let _ = head_tx.send(Err(e.into()));
            return;
        }
    };
    let mut chunks = Chunks {
        out: body_tx,
        buffer: Vec::with_capacity(CHUNK_BYTES),
    };
    let result = snapshot::export(&txn, &mut chunks).and_then(|()| {
        chunks
            .flush()
            .map_err(crate::state::StoreError::SnapshotStream)
    });
    if let Err(e) = result {
        // A client that went away is not an error worth reporting to it.
        let _ = chunks.out.blocking_send(Err(e.to_string()));
    }
}

/// A `Write` that hands full chunks to an async receiver, waiting while it is behind.
struct Chunks {
    out: mpsc::Sender<Result<Vec<u8>, String>>,
    buffer: Vec<u8>,
}

impl Write for Chunks {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        self.out
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

/// One shard of a backup to restore: its exported body (a file) and the marker of its head.
pub struct RestoreShard {
    pub shard: u32,
    pub body: PathBuf,
    pub marker: Vec<u8>,
}

/// Writes the shard files and the Raft log of a node restored from `shards` into `data_dir`, which
/// must hold no shard file and no Raft log yet (the caller prepares it). Each shard file is written in
/// one durable transaction; the log is written last, so a restore cut short leaves no log (and the
/// node does not start as if restored: run the restore again into an empty directory).
/// `restored` is called after each shard file is written, with the shard and the time it took.
pub async fn restore(
    data_dir: &Path,
    shards: Vec<RestoreShard>,
    restored: impl Fn(u32, std::time::Duration) + Send + 'static,
) -> Result<(), EngineError> {
    let dir = data_dir.to_path_buf();
    let markers = tokio::task::spawn_blocking(move || -> Result<_, EngineError> {
        let mut markers = Vec::with_capacity(shards.len());
        for shard in shards {
            let started = std::time::Instant::now();
            import_shard(&dir, &shard)?;
            restored(shard.shard, started.elapsed());
            markers.push((shard.shard, shard.marker));
        }
        Ok(markers)
    })
    .await
    .map_err(|e| EngineError::Internal(e.to_string()))??;
    seed_log(data_dir, markers).await
}

/// Writes the Raft log of a data directory whose shard files were written offline (a restore, or the
/// scale benchmark's loader): each shard's vote is seeded after the last entry its `marker` says the
/// state applied, so the node starts where the state ends (`LogDb::seed_restored`). The log file must
/// not exist yet.
pub async fn seed_log(data_dir: &Path, markers: Vec<(u32, Vec<u8>)>) -> Result<(), EngineError> {
    let log_path = integrity::log_path(data_dir);
    let log = LogDb::open(&log_path)
        .map_err(|e| EngineError::Internal(format!("{}: {e}", log_path.display())))?;
    for (shard, marker) in markers {
        log.seed_restored(shard, &marker)
            .await
            .map_err(|e| EngineError::Internal(format!("{}: {e}", log_path.display())))?;
    }
    Ok(())
}

fn import_shard(data_dir: &Path, shard: &RestoreShard) -> Result<(), EngineError> {
    let path = shard_path(data_dir, shard.shard);
    let store = ShardStore::open_for_import(&path, shard.shard)?;
    let file = std::fs::File::open(&shard.body)
        .map_err(|e| EngineError::Internal(format!("{}: {e}", shard.body.display())))?;
    let mut body: Box<dyn Read> = Box::new(io::BufReader::with_capacity(CHUNK_BYTES, file));
    store.import(&mut body, &shard.marker)?;
    Ok(())
}

/// The file of shard `id` in `data_dir`.
pub fn shard_path(data_dir: &Path, id: u32) -> PathBuf {
    data_dir.join(format!("shard-{id:03}.redb"))
}
