//! A backup directory: one export file per shard and `manifest.json`, which says what each file must
//! be (its size and SHA-256, the shard's last applied index, `state_hash` and replication marker) and
//! the settings of a data directory restored from it. The manifest is written last: a directory
//! without one is a backup that did not finish.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cli::error::CliError;
use crate::datadir::FixedSettings;
use crate::engine::backup::{ExportSummary, hash_export};

/// The name of the manifest in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// The manifest format this version writes and reads.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// When the backup finished (RFC 3339, UTC).
    pub created_at: String,
    /// The server version the shards were exported from.
    pub version: String,
    /// The node the shards were exported from (a restored node must run under a member id of the
    /// backed-up cluster).
    pub node_id: u64,
    pub settings: FixedSettings,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardEntry {
    pub shard: u32,
    /// The last command the export holds (the shard's Raft log index).
    pub last_applied: u64,
    /// The exported state's `state_hash` (as `GET /v1/admin/audit` reports it).
    pub state_hash: String,
    /// The replication marker stored with the state, hex.
    pub marker: String,
    /// The export's file, relative to the backup directory.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// A local file problem (exit 5).
pub fn local(path: &Path, error: impl std::fmt::Display) -> CliError {
    CliError::Local {
        code: "io_error",
        message: format!("{}: {error}", path.display()),
    }
}

/// The backup directory's problem (exit 4, `backup_invalid`).
pub fn invalid(message: impl Into<String>) -> CliError {
    CliError::Problem {
        code: "backup_invalid",
        message: message.into(),
    }
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest, CliError> {
        let path = dir.join(MANIFEST);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => invalid(format!(
                "{} is missing: not a backup, or one that did not finish",
                path.display()
            )),
            _ => local(&path, e),
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("{} is unreadable: {e}", path.display())))?;
        if manifest.format != FORMAT {
            return Err(invalid(format!(
                "{} has format {}; this shopkeep reads format {FORMAT}",
                path.display(),
                manifest.format
            )));
        }
        let expected: Vec<u32> = (0..manifest.settings.shards).collect();
        let listed: Vec<u32> = manifest.shards.iter().map(|s| s.shard).collect();
        if listed != expected {
            return Err(invalid(format!(
                "{} lists shards {listed:?}, expected 0 to {}",
                path.display(),
                manifest.settings.shards.saturating_sub(1)
            )));
        }
        Ok(manifest)
    }

    /// Writes the manifest durably (a temporary file renamed over, then the directory synced).
    pub fn write(&self, dir: &Path) -> Result<(), CliError> {
        let path = dir.join(MANIFEST);
        let partial = dir.join(format!("{MANIFEST}.partial"));
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| local(&path, e))?;
        fs::write(&partial, bytes).map_err(|e| local(&partial, e))?;
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(|e| local(&partial, e))?;
        fs::rename(&partial, &path).map_err(|e| local(&path, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| local(dir, e))
    }
}

impl ShardEntry {
    pub fn path(&self, dir: &Path) -> Result<PathBuf, CliError> {
        // The name is the manifest's: never let it point outside the backup.
        let name = Path::new(&self.file);
        if name.components().count() != 1 || name.file_name().is_none() {
            return Err(invalid(format!(
                "shard {}: file name {:?} is not a plain name",
                self.shard, self.file
            )));
        }
        Ok(dir.join(name))
    }

    pub fn marker_bytes(&self) -> Result<Vec<u8>, CliError> {
        hex::decode(&self.marker)
            .map_err(|e| invalid(format!("shard {}: marker is not hex: {e}", self.shard)))
    }
}

/// What checking one shard's file found.
#[derive(Debug, Clone, Serialize)]
pub struct ShardCheck {
    pub shard: u32,
    pub last_applied: u64,
    pub bytes: u64,
    pub rows: u64,
    pub state_hash: String,
    /// Empty when the file is what the manifest says.
    pub problems: Vec<String>,
}

/// Checks one shard's file against the manifest: its size and SHA-256 first (any changed byte), then
/// the `state_hash` recomputed from its rows. Reads the file twice; memory stays at one row.
pub fn check_shard(dir: &Path, entry: &ShardEntry) -> Result<ShardCheck, CliError> {
    let path = entry.path(dir)?;
    let mut check = ShardCheck {
        shard: entry.shard,
        last_applied: entry.last_applied,
        bytes: 0,
        rows: 0,
        state_hash: String::new(),
        problems: Vec::new(),
    };
    let (bytes, sha256) = match digest(&path) {
        Ok(found) => found,
        Err(e) => {
            check.problems.push(format!("{}: {e}", path.display()));
            return Ok(check);
        }
    };
    check.bytes = bytes;
    if bytes != entry.bytes {
        check.problems.push(format!(
            "{} bytes, the manifest says {}",
            bytes, entry.bytes
        ));
    }
    if sha256 != entry.sha256 {
        check.problems.push(format!(
            "SHA-256 {sha256}, the manifest says {}",
            entry.sha256
        ));
    }
    match hash_of(&path)? {
        Ok(summary) => {
            check.rows = summary.rows;
            if summary.state_hash != entry.state_hash {
                check.problems.push(format!(
                    "state_hash {}, the manifest says {}",
                    summary.state_hash, entry.state_hash
                ));
            }
            check.state_hash = summary.state_hash;
        }
        Err(e) => check.problems.push(format!("not a whole export: {e}")),
    }
    Ok(check)
}

/// The `state_hash` an export file's rows recompute (the inner `Err`: not a whole export).
pub fn hash_of(path: &Path) -> Result<Result<ExportSummary, String>, CliError> {
    let file = File::open(path).map_err(|e| local(path, e))?;
    let mut reader: Box<dyn Read> = Box::new(BufReader::with_capacity(256 * 1024, file));
    Ok(hash_export(&mut reader).map_err(|e| e.to_string()))
}

/// The size and SHA-256 (hex) of a file.
pub fn digest(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut bytes: u64 = 0;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}
