//! `shopkeep orders list USER | show USER ORDER_ID`: a user's orders (`GET /v1/users/{user_id}/orders`,
//! newest first, one page; `GET /v1/users/{user_id}/orders/{order_id}`).

use clap::Subcommand;
use serde_json::Value;

use crate::cli::Context;
use crate::cli::error::CliError;
use crate::cli::output::{Table, fields, text};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// One page of a user's orders, newest first.
    List {
        user: String,
        /// Only orders in this status (PENDING, COMPLETED, CANCELLED, PARTIALLY_REFUNDED, REFUNDED).
        #[arg(long)]
        status: Option<String>,
        /// Orders per page (server default and maximum: 100).
        #[arg(long)]
        limit: Option<u32>,
        /// The page after the one that printed this cursor.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One order with its lines and history.
    Show { user: String, order_id: String },
}

pub async fn run(args: Args, ctx: &Context) -> Result<(), CliError> {
    let client = ctx.service()?;
    match args.action {
        Action::List {
            user,
            status,
            limit,
            cursor,
        } => {
            let limit = limit.map(|l| l.to_string());
            let query: Vec<(&str, &str)> = [
                ("status", status.as_deref()),
                ("limit", limit.as_deref()),
                ("cursor", cursor.as_deref()),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            let answer = client
                .get(&["v1", "users", &user, "orders"], &query)
                .await?;
            ctx.out.answer(&answer, page);
        }
        Action::Show { user, order_id } => {
            let answer = client
                .get(&["v1", "users", &user, "orders", &order_id], &[])
                .await?;
            ctx.out.answer(&answer, order);
        }
    }
    Ok(())
}

fn page(page: &Value) -> String {
    let mut table = Table::new(["ORDER", "STATUS", "TOTAL", "REFUNDED", "LINES", "CREATED"]);
    for order in page["orders"].as_array().map_or(&[][..], Vec::as_slice) {
        table.row(vec![
            text(order, "/order_id"),
            text(order, "/status"),
            text(order, "/total"),
            text(order, "/refunded_total"),
            order["lines"].as_array().map_or(0, Vec::len).to_string(),
            text(order, "/created_at"),
        ]);
    }
    let mut out = table.render();
    if let Some(cursor) = page["next_cursor"].as_str() {
        out.push_str(&format!("more: --cursor {cursor}\n"));
    }
    out
}

fn order(order: &Value) -> String {
    let mut out = fields(&[
        ("order", text(order, "/order_id")),
        ("user", text(order, "/user_id")),
        ("status", text(order, "/status")),
        (
            "total",
            format!("{} {}", text(order, "/total"), text(order, "/currency")),
        ),
        ("refunded", text(order, "/refunded_total")),
        ("created", text(order, "/created_at")),
        ("completed", text(order, "/completed_at")),
    ]);
    let mut lines = Table::new([
        "ITEM",
        "KIND",
        "QTY",
        "UNIT_PRICE",
        "LINE_TOTAL",
        "REFUNDED_QTY",
    ]);
    for line in order["lines"].as_array().map_or(&[][..], Vec::as_slice) {
        lines.row(
            [
                "/item_id",
                "/kind",
                "/quantity",
                "/unit_price",
                "/line_total",
                "/refunded_quantity",
            ]
            .iter()
            .map(|p| text(line, p))
            .collect(),
        );
    }
    out.push('\n');
    out.push_str(&lines.render());
    out
}
