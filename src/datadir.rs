//! The data directory: its layout, the settings fixed at creation, and the secrets generated into it.
//!
//! ```text
//! shopkeep-data/
//!   shopkeep.json        shards and currency, fixed when the directory is created
//!   shard-000.redb …     one redb file per shard (state machine)
//!   admin-token          generated admin token when SHOPKEEP_ADMIN_TOKEN is not set (mode 0600)
//!   token-secret         generated key that signs user tokens when SHOPKEEP_TOKEN_SECRET is not set (0600)
//! ```
//!
//! Nobody but the service's user may read it: the directory is 0700 and every file in it 0600, whatever
//! the umask (`restrict_new_files` sets the process umask to 077 before anything is created, and
//! `prepare` tightens what an older version left behind). Secret files are created exclusively, never
//! through a symlink, and made durable with their directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::Currency;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Mismatch(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What cannot change once a data directory holds data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedSettings {
    pub shards: u32,
    pub currency: String,
    pub currency_decimals: u32,
}

/// Mode of the data directory and every directory in it.
const DIR_MODE: u32 = 0o700;
/// Mode of every file in the data directory.
const FILE_MODE: u32 = 0o600;

/// From now on, files and directories this process creates are readable by its user only (umask 077).
pub fn restrict_new_files() {
    #[cfg(unix)]
    // SAFETY: umask only swaps the process's file-mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Shards of a new data directory when `--shards` is not given. Few shards batch more commands into each
/// log entry and apply transaction (every entry costs its appends, commit notices and one apply on each
/// member, however few commands it carries); more shards apply in parallel and confine a shard's stall (its
/// periodic durable commit, its snapshot) to a smaller share of the users. Measured on two cores against
/// eight (docs/BENCHMARKS.md, twenty-eighth session, paired rounds): three gave a three-node cluster 14–34 %
/// more purchases/s at 16 clients and 13–49 % at 64, and one node 27–28 % more at 64 clients and 10–36 % at
/// 256, at the same or a lower p99 at half the peak. A shard applies on one thread: a node with many more cores
/// than shards may do better with more, named when its data directory is created.
pub const DEFAULT_SHARDS: u32 = 3;

/// The settings `dir` is to be opened with: the shards named (`--shards`), else those the directory was
/// created with, else `DEFAULT_SHARDS` for a new one; and `currency`. [`prepare`] then checks them against
/// the directory (a named number of shards other than its own is refused there).
pub fn settings_for(
    dir: &Path,
    shards: Option<u32>,
    currency: &Currency,
) -> Result<FixedSettings, DataDirError> {
    let shards = match shards {
        Some(named) => named,
        None => stored_settings(dir)?.map_or(DEFAULT_SHARDS, |found| found.shards),
    };
    Ok(FixedSettings::new(shards, currency))
}

/// The settings `dir` was created with, if it was.
fn stored_settings(dir: &Path) -> Result<Option<FixedSettings>, DataDirError> {
    let path = dir.join("shopkeep.json");
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DataDirError::Mismatch(format!("{} is unreadable: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Creates the directory if needed (0700), tightens the modes of what it holds, and records or checks
/// the settings fixed at creation.
pub fn prepare(dir: &Path, wanted: &FixedSettings) -> Result<(), DataDirError> {
    create_private_dir(dir)?;
    restrict_tree(dir)?;
    let path = dir.join("shopkeep.json");
    match stored_settings(dir)? {
        Some(found) => {
            if found != *wanted {
                return Err(DataDirError::Mismatch(format!(
                    "{} was created with {} shards in {} ({} decimals); it cannot be opened with {} shards in {} ({} decimals)",
                    dir.display(),
                    found.shards,
                    found.currency,
                    found.currency_decimals,
                    wanted.shards,
                    wanted.currency,
                    wanted.currency_decimals
                )));
            }
            Ok(())
        }
        None => {
            let bytes = serde_json::to_vec_pretty(wanted)
                .map_err(|e| DataDirError::Mismatch(e.to_string()))?;
            write_atomically(&path, &bytes, FILE_MODE)
        }
    }
}

impl FixedSettings {
    pub fn new(shards: u32, currency: &Currency) -> FixedSettings {
        FixedSettings {
            shards,
            currency: currency.code().to_owned(),
            currency_decimals: currency.exponent(),
        }
    }
}

/// Returns the secret stored in `dir/name`, generating it (32 random bytes, hex) with mode 0600 only when
/// the file is missing. Any other trouble reading it (empty, unreadable, a symlink) is an error: a
/// silently regenerated secret would invalidate every token signed with the old one.
pub fn generated_secret(dir: &Path, name: &str) -> Result<(String, bool, PathBuf), DataDirError> {
    let path = dir.join(name);
    match read_secret(&path) {
        Ok(secret) => Ok((secret, false, path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = hex::encode(rand::random::<[u8; 32]>());
            match create_secret(&path, &secret) {
                Ok(()) => Ok((secret, true, path)),
                // Another process created it in between: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Ok((read_secret(&path).map_err(io(&path))?, false, path))
                }
                Err(e) => Err(io(&path)(e)),
            }
        }
        Err(e) => Err(io(&path)(e)),
    }
}

fn open_no_follow() -> fs::OpenOptions {
    let mut options = fs::OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    options
}

fn read_secret(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    open_no_follow()
        .read(true)
        .open(path)?
        .read_to_string(&mut text)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty; delete it to have a new secret generated",
        ));
    }
    Ok(secret.to_owned())
}

fn create_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut options = open_no_follow();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    let mut file = options.open(path)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    sync_parent(path)
}

/// Makes a new or renamed directory entry durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => fs::File::open(parent)?.sync_all(),
        _ => Ok(()),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), DataDirError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    builder.create(dir).map_err(io(dir))
}

/// Sets 0700 on `dir` and every directory below it, 0600 on every file (symlinks are left alone).
fn restrict_tree(dir: &Path) -> Result<(), DataDirError> {
    set_mode(dir, DIR_MODE)?;
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            restrict_tree(&path)?;
        } else if kind.is_file() {
            set_mode(&path, FILE_MODE)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), DataDirError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Writes `bytes` to a temporary file with `mode`, fsyncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DataDirError> {
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_parent(path).map_err(io(path))
}
