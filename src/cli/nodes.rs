//! `shopkeep nodes add ID ADDR | promote ID | remove ID`: cluster membership, applied to every shard
//! (`POST /v1/admin/cluster/nodes`, `POST /v1/admin/cluster/nodes/{id}/promote`, `DELETE
//! /v1/admin/cluster/nodes/{id}`); prints the cluster after the change.

use clap::Subcommand;
use serde_json::{Value, json};

use crate::cli::error::CliError;
use crate::cli::status::{nodes_table, shards_table};
use crate::cli::{Context, WriteArgs, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Add a started node as a learner of every shard; returns once it has caught up.
    Add {
        id: u64,
        /// host:port the other nodes reach it at (its --listen, or its --node-listen).
        addr: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Make a learner a voter of every shard.
    Promote {
        id: u64,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Remove a node from every shard (never restart it with the same id).
    Remove { id: u64 },
}

pub async fn run(args: Args, ctx: &Context) -> Result<(), CliError> {
    let client = ctx.admin()?;
    let answer = match args.action {
        Action::Add { id, addr, write } => {
            let (body, key) = (json!({ "node_id": id, "address": addr }), write.key());
            let adding = client.post(&["v1", "admin", "cluster", "nodes"], &body, &key);
            let what = format!("adding node {id} (it catches up first)");
            progress::shown(&what, adding).await?
        }
        Action::Promote { id, write } => {
            let id = id.to_string();
            let path = ["v1", "admin", "cluster", "nodes", &id, "promote"];
            let (body, key) = (json!({}), write.key());
            let promoting = client.post(&path, &body, &key);
            let what = format!("promoting node {id}");
            progress::shown(&what, promoting).await?
        }
        Action::Remove { id } => {
            let id = id.to_string();
            let path = ["v1", "admin", "cluster", "nodes", &id];
            let what = format!("removing node {id}");
            progress::shown(&what, client.delete(&path)).await?
        }
    };
    ctx.out.answer(&answer, cluster);
    Ok(())
}

fn cluster(view: &Value) -> String {
    format!("{}\n{}", nodes_table(view), shards_table(view, None))
}
