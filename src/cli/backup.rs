//! `shopkeep backup --out DIR`: an online backup of every shard while the shop keeps serving.
//!
//! The server's plan (`GET /v1/admin/backup`) names the shards; each shard's export
//! (`GET /v1/admin/backup/shards/{shard}`) is taken at one committed index after a read barrier, so
//! the backup holds every write acknowledged before it started. Each export streams into its file
//! (memory stays at one chunk), is checked against the `state_hash` the server sent, and is made
//! durable; `manifest.json` is written last. One line per shard on stderr shows the progress.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cli::Context;
use crate::cli::client::Client;
use crate::cli::error::CliError;
use crate::cli::manifest::{self, FORMAT, Manifest, ShardEntry, local};
use crate::cli::output::{Table, text};
use crate::datadir::{self, FixedSettings};

/// The longest wait for the next chunk of an export before the backup gives up.
const STALL: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory to write the backup into (created; must be empty if it exists).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// The server's `GET /v1/admin/backup`.
#[derive(Debug, Deserialize)]
struct Plan {
    node_id: u64,
    shards: u32,
    currency: String,
    currency_decimals: u32,
    version: String,
}

pub async fn run(args: Args, ctx: &Context) -> Result<(), CliError> {
    let client = ctx.admin()?;
    datadir::restrict_new_files();
    prepare_out(&args.out)?;
    let started = Instant::now();
    let answer = client.get(&["v1", "admin", "backup"], &[]).await?;
    let plan: Plan = serde_json::from_value(answer.json).map_err(|e| CliError::NoAnswer {
        code: "bad_answer".into(),
        detail: format!("the backup plan is not what this shopkeep reads: {e}"),
        key: None,
    })?;
    let mut shards = Vec::with_capacity(plan.shards as usize);
    for shard in 0..plan.shards {
        let entry = fetch_shard(&client, &args.out, shard, plan.shards).await?;
        shards.push(entry);
    }
    let manifest = Manifest {
        format: FORMAT,
        created_at: now_rfc3339(),
        version: plan.version,
        node_id: plan.node_id,
        settings: FixedSettings {
            shards: plan.shards,
            currency: plan.currency,
            currency_decimals: plan.currency_decimals,
        },
        shards,
    };
    manifest.write(&args.out)?;
    eprintln!(
        "backup of {} shards written to {} in {:.1}s",
        manifest.shards.len(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    let json = serde_json::to_value(&manifest).map_err(|e| local(&args.out, e))?;
    ctx.out.document(&json, report);
    Ok(())
}

/// Creates `out` (0700), or accepts it when it exists and is empty.
fn prepare_out(out: &Path) -> Result<(), CliError> {
    match fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(CliError::Local {
                    code: "backup_dir_not_empty",
                    message: format!(
                        "{} is not empty: back up into a new directory",
                        out.display()
                    ),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(out).map_err(|e| local(out, e))
        }
        Err(e) => Err(local(out, e)),
    }
}

/// Streams shard `shard`'s export into its file, then checks and records it.
async fn fetch_shard(
    client: &Client,
    out: &Path,
    shard: u32,
    of: u32,
) -> Result<ShardEntry, CliError> {
    let started = Instant::now();
    let shard_segment = shard.to_string();
    let mut response = client
        .get_stream(&["v1", "admin", "backup", "shards", &shard_segment])
        .await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| bad_answer(format!("shard {shard}: the export has no {name} header")))
    };
    let last_applied: u64 = header("shopkeep-last-applied")?.parse().map_err(|_| {
        bad_answer(format!(
            "shard {shard}: shopkeep-last-applied is not a number"
        ))
    })?;
    let state_hash = header("shopkeep-state-hash")?;
    let marker = header("shopkeep-marker")?;
    let name = format!("shard-{shard:03}.export");
    let path = out.join(&name);
    let mut file = BufWriter::with_capacity(
        256 * 1024,
        File::create(&path).map_err(|e| local(&path, e))?,
    );
    let mut hasher = Sha256::new();
    let mut bytes: u64 = 0;
    loop {
        let chunk = tokio::time::timeout(STALL, response.chunk())
            .await
            .map_err(|_| bad_answer(format!("shard {shard}: no data for {}s", STALL.as_secs())))?
            .map_err(|e| bad_answer(format!("shard {shard}: the export broke off: {e}")))?;
        let Some(chunk) = chunk else { break };
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(|e| local(&path, e))?;
        bytes += chunk.len() as u64;
    }
    let file = file.into_inner().map_err(|e| local(&path, e.error()))?;
    file.sync_all().map_err(|e| local(&path, e))?;
    let entry = ShardEntry {
        shard,
        last_applied,
        state_hash,
        marker,
        file: name,
        bytes,
        sha256: hex::encode(hasher.finalize()),
    };
    // A body cut short, or not the state the server hashed, is caught here rather than at restore
    // (the size and SHA-256 were taken as it streamed in).
    let summary = manifest::hash_of(&path)?.map_err(|why| {
        bad_answer(format!(
            "shard {shard}: the export received is not whole: {why}"
        ))
    })?;
    if summary.state_hash != entry.state_hash {
        return Err(bad_answer(format!(
            "shard {shard}: the export received hashes to {}, the server said {}",
            summary.state_hash, entry.state_hash
        )));
    }
    eprintln!(
        "shard {}/{of}: {} at index {last_applied}, {} rows, {:.1}s",
        shard + 1,
        human_bytes(bytes),
        summary.rows,
        started.elapsed().as_secs_f64()
    );
    Ok(entry)
}

fn bad_answer(detail: String) -> CliError {
    CliError::NoAnswer {
        code: "backup_incomplete".into(),
        detail,
        key: None,
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `1.2 MiB`-style sizes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    #[allow(clippy::cast_precision_loss)] // a size shown to one decimal
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn report(manifest: &serde_json::Value) -> String {
    let mut table = Table::new(["SHARD", "LAST APPLIED", "BYTES", "STATE HASH"]);
    for shard in manifest["shards"].as_array().map_or(&[][..], Vec::as_slice) {
        table.row(vec![
            text(shard, "/shard"),
            text(shard, "/last_applied"),
            text(shard, "/bytes"),
            text(shard, "/state_hash"),
        ]);
    }
    table.render()
}
