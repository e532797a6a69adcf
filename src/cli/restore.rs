//! `shopkeep restore --from BACKUP --data-dir DIR`: turns a verified backup into a data directory,
//! without a server. The backup is verified first (as `verify-backup`); the data directory must be new
//! or empty. Each shard file is written in one durable transaction, then the Raft log is seeded so
//! that the node starts where the backup ends (`engine::backup::restore`).
//!
//! The restored node keeps the backed-up cluster's membership: run it under the node id the backup
//! was taken from (a single node: `serve --data-dir DIR`; a cluster: this node with its old id and
//! peers, the others on empty data dirs with `--restoring-from-backup`). Secrets are not in a backup:
//! set the tokens in the environment (or the node generates new ones).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::cli::error::CliError;
use crate::cli::manifest::local;
use crate::cli::output::{Output, fields};
use crate::cli::verify_backup;
use crate::datadir;
use crate::engine::backup::{self, RestoreShard};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The backup directory (the one `shopkeep backup --out` wrote).
    #[arg(long, value_name = "BACKUP")]
    pub from: PathBuf,
    /// The data directory to create (new, or empty).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> Result<(), CliError> {
    let started = Instant::now();
    let (manifest, checks) = verify_backup::verify(&args.from)?;
    verify_backup::ok_or_problem(&args.from, &checks)?;
    require_empty(&args.data_dir)?;
    datadir::restrict_new_files();
    datadir::prepare(&args.data_dir, &manifest.settings).map_err(|e| CliError::Local {
        code: "io_error",
        message: e.to_string(),
    })?;
    let mut shards = Vec::with_capacity(manifest.shards.len());
    for entry in &manifest.shards {
        shards.push(RestoreShard {
            shard: entry.shard,
            body: entry.path(&args.from)?,
            marker: entry.marker_bytes()?,
        });
    }
    eprintln!(
        "restoring {} shards into {}…",
        shards.len(),
        args.data_dir.display()
    );
    let of = shards.len();
    backup::restore(&args.data_dir, shards, move |shard, took| {
        eprintln!(
            "shard {}/{of}: restored in {:.1}s",
            shard + 1,
            took.as_secs_f64()
        );
    })
    .await
    .map_err(|e| local(&args.data_dir, e))?;
    let seconds = started.elapsed().as_secs_f64();
    let result = json!({
        "data_dir": args.data_dir,
        "node_id": manifest.node_id,
        "shards": manifest.shards.len(),
        "created_at": manifest.created_at,
        "seconds": seconds,
        "last_applied": manifest.shards.iter().map(|s| s.last_applied).collect::<Vec<_>>(),
    });
    Output { json: args.json }.document(&result, |_| {
        fields(&[
            ("restored", args.data_dir.display().to_string()),
            ("backup taken", manifest.created_at.clone()),
            ("shards", manifest.shards.len().to_string()),
            ("seconds", format!("{seconds:.1}")),
            (
                "next",
                format!(
                    "start it as node {}: `shopkeep serve --node-id {} --data-dir {}` (a cluster: \
                     with its peers, the other members on empty data dirs with --restoring-from-backup)",
                    manifest.node_id,
                    manifest.node_id,
                    args.data_dir.display()
                ),
            ),
        ])
    });
    Ok(())
}

/// A restore writes only into a new or empty directory: never over a node's data.
fn require_empty(dir: &Path) -> Result<(), CliError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(CliError::Local {
                code: "data_dir_not_empty",
                message: format!(
                    "{} is not empty: restore into a new directory (never over a node's data)",
                    dir.display()
                ),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(local(dir, e)),
    }
}
