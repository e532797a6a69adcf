//! `shopkeep leaders rebalance`: spread the shards' leaders evenly over the nodes now (`POST
//! /v1/admin/cluster/leaders/rebalance`, answering `{"moved": [{"shard", "from", "to"}], "leaders":
//! {"<node_id>": count}}`).

use clap::Subcommand;
use serde_json::{Value, json};

use crate::cli::error::CliError;
use crate::cli::output::{Table, text};
use crate::cli::{Context, WriteArgs, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Move shard leaders so that every node leads about as many shards.
    Rebalance {
        #[command(flatten)]
        write: WriteArgs,
    },
}

pub async fn run(args: Args, ctx: &Context) -> Result<(), CliError> {
    let Action::Rebalance { write } = args.action;
    let client = ctx.admin()?;
    let path = ["v1", "admin", "cluster", "leaders", "rebalance"];
    let (body, key) = (json!({}), write.key());
    let rebalancing = client.post(&path, &body, &key);
    let answer = progress::shown("moving shard leaders", rebalancing).await?;
    ctx.out.answer(&answer, report);
    Ok(())
}

fn report(answer: &Value) -> String {
    let moved = answer["moved"].as_array().map_or(&[][..], Vec::as_slice);
    let mut out = if moved.is_empty() {
        "no leader moved\n".to_owned()
    } else {
        let mut table = Table::new(["SHARD", "FROM", "TO"]);
        for m in moved {
            table.row(vec![text(m, "/shard"), text(m, "/from"), text(m, "/to")]);
        }
        table.render()
    };
    let mut leaders = Table::new(["NODE", "LEADS"]);
    if let Some(counts) = answer["leaders"].as_object() {
        for (node, count) in counts {
            leaders.row(vec![node.clone(), count.to_string()]);
        }
    }
    out.push('\n');
    out.push_str(&leaders.render());
    out
}
