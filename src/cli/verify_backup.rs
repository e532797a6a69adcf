//! `shopkeep verify-backup DIR`: checks a backup without a server. Every shard's file must have the
//! size and SHA-256 the manifest gives (any changed byte fails), and its rows must hash to the
//! manifest's `state_hash` (the digest `GET /v1/admin/audit` reports, recomputed from the export).
//! Exit 4 (`backup_invalid`) when anything differs.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::cli::error::CliError;
use crate::cli::manifest::{self, Manifest, ShardCheck, invalid};
use crate::cli::output::{Output, Table, text};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The backup directory (the one `shopkeep backup --out` wrote).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Result<(), CliError> {
    let (manifest, checks) = verify(&args.dir)?;
    let report = json!({
        "ok": checks.iter().all(|c| c.problems.is_empty()),
        "node_id": manifest.node_id,
        "created_at": manifest.created_at,
        "shards": checks,
    });
    Output { json: args.json }.document(&report, table);
    ok_or_problem(&args.dir, &checks)
}

/// Reads the manifest and checks every shard's file, printing a line per shard on stderr.
pub fn verify(dir: &Path) -> Result<(Manifest, Vec<ShardCheck>), CliError> {
    let manifest = Manifest::read(dir)?;
    let mut checks = Vec::with_capacity(manifest.shards.len());
    for entry in &manifest.shards {
        let check = manifest::check_shard(dir, entry)?;
        eprintln!(
            "shard {}/{}: {}",
            entry.shard + 1,
            manifest.shards.len(),
            if check.problems.is_empty() {
                "ok".to_owned()
            } else {
                check.problems.join("; ")
            }
        );
        checks.push(check);
    }
    Ok((manifest, checks))
}

/// `Ok` when every shard checked out, else the `backup_invalid` problem naming the bad shards.
pub fn ok_or_problem(dir: &Path, checks: &[ShardCheck]) -> Result<(), CliError> {
    let bad: Vec<String> = checks
        .iter()
        .filter(|c| !c.problems.is_empty())
        .map(|c| format!("shard {}: {}", c.shard, c.problems.join("; ")))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(invalid(format!(
            "{} is not what its manifest says: {}",
            dir.display(),
            bad.join(" | ")
        )))
    }
}

fn table(report: &serde_json::Value) -> String {
    let mut table = Table::new(["SHARD", "LAST APPLIED", "BYTES", "ROWS", "RESULT"]);
    for shard in report["shards"].as_array().map_or(&[][..], Vec::as_slice) {
        let problems: Vec<String> = shard["problems"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect();
        table.row(vec![
            text(shard, "/shard"),
            text(shard, "/last_applied"),
            text(shard, "/bytes"),
            text(shard, "/rows"),
            if problems.is_empty() {
                "ok".into()
            } else {
                problems.join("; ")
            },
        ]);
    }
    table.render()
}
