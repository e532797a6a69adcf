//! The data directory: its layout, the settings fixed at creation, and the secrets generated into it.
//!
//! ```text
//! shopkeep-data/
//!   shopkeep.json        shards and currency, fixed when the directory is created
//!   shard-000.redb …     one redb file per shard (state machine)
//!   admin-token          generated admin token when SHOPKEEP_ADMIN_TOKEN is not set (mode 0600)
//!   token-secret         generated key that signs user tokens when SHOPKEEP_TOKEN_SECRET is not set (0600)
//! ```

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

/// Creates the directory if needed, and records or checks the settings fixed at creation.
pub fn prepare(dir: &Path, wanted: &FixedSettings) -> Result<(), DataDirError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("shopkeep.json");
    match fs::read(&path) {
        Ok(bytes) => {
            let found: FixedSettings = serde_json::from_slice(&bytes).map_err(|e| {
                DataDirError::Mismatch(format!("{} is unreadable: {e}", path.display()))
            })?;
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = serde_json::to_vec_pretty(wanted)
                .map_err(|e| DataDirError::Mismatch(e.to_string()))?;
            write_atomically(&path, &bytes, 0o644)
        }
        Err(e) => Err(io(&path)(e)),
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

/// Returns the secret stored in `dir/name`, generating (32 random bytes, hex) and storing it with mode
/// 0600 on first use. The bool is `true` when it was just generated.
pub fn generated_secret(dir: &Path, name: &str) -> Result<(String, bool, PathBuf), DataDirError> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(secret) if !secret.trim().is_empty() => Ok((secret.trim().to_owned(), false, path)),
        Ok(_) | Err(_) => {
            let secret = hex::encode(rand::random::<[u8; 32]>());
            write_atomically(&path, secret.as_bytes(), 0o600)?;
            Ok((secret, true, path))
        }
    }
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
    Ok(())
}
