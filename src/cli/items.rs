//! `shopkeep items list | get ID | put ID …`: the catalog (`GET /v1/items`, `GET` and `PUT
//! /v1/items/{item_id}`).

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::cli::Context;
use crate::cli::error::CliError;
use crate::cli::output::{Table, text};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Every item.
    List,
    /// One item.
    Get { id: String },
    /// Create or replace an item (admin).
    Put(PutArgs),
}

#[derive(Debug, clap::Args)]
struct PutArgs {
    id: String,
    #[arg(long)]
    name: String,
    #[arg(long, value_enum)]
    kind: Kind,
    /// A decimal string in the shop's currency, e.g. 4.99.
    #[arg(long)]
    price: String,
    /// Days after completion a refund is allowed (server default 14; 0: not refundable).
    #[arg(long)]
    refund_window_days: Option<u32>,
    /// Put the item out of sale (it stays in the catalog).
    #[arg(long)]
    inactive: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    Game,
    Skin,
    Currency,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Game => "game",
            Kind::Skin => "skin",
            Kind::Currency => "currency",
        }
    }
}

pub async fn run(args: Args, ctx: &Context) -> Result<(), CliError> {
    match args.action {
        Action::List => {
            let answer = ctx.service()?.get(&["v1", "items"], &[]).await?;
            ctx.out.answer(&answer, |json| {
                let items = json["items"].as_array().map_or(&[][..], Vec::as_slice);
                table(items)
            });
        }
        Action::Get { id } => {
            let answer = ctx.service()?.get(&["v1", "items", &id], &[]).await?;
            ctx.out
                .answer(&answer, |item| table(std::slice::from_ref(item)));
        }
        Action::Put(put) => {
            let answer = ctx
                .admin()?
                .put(&["v1", "items", &put.id], &body(&put))
                .await?;
            ctx.out
                .answer(&answer, |item| table(std::slice::from_ref(item)));
        }
    }
    Ok(())
}

fn body(put: &PutArgs) -> Value {
    let mut body = json!({
        "name": put.name,
        "kind": put.kind.as_str(),
        "price": put.price,
        "active": !put.inactive,
    });
    if let Some(days) = put.refund_window_days {
        body["refund_window_days"] = json!(days);
    }
    body
}

fn table(items: &[Value]) -> String {
    let mut table = Table::new([
        "ITEM",
        "NAME",
        "KIND",
        "PRICE",
        "ACTIVE",
        "REFUND_DAYS",
        "VERSION",
    ]);
    for item in items {
        table.row(
            [
                "/item_id",
                "/name",
                "/kind",
                "/price",
                "/active",
                "/refund_window_days",
                "/version",
            ]
            .iter()
            .map(|p| text(item, p))
            .collect(),
        );
    }
    table.render()
}
