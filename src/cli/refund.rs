//! `shopkeep refund USER ORDER_ID [--line ITEM=QTY …] [--reason R] [--force]`: refund an order, whole or
//! the lines given (`POST /v1/users/{user_id}/orders/{order_id}/refunds`). `--force` refunds past the
//! item's refund window; the server allows it to an admin only, so it uses `SHOPKEEP_ADMIN_TOKEN`.

use serde_json::{Value, json};

use crate::cli::error::CliError;
use crate::cli::output::{Table, fields, text};
use crate::cli::{Context, WriteArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    user: String,
    order_id: String,
    /// Refund this quantity of this item (repeatable); without any, everything not yet refunded.
    #[arg(long = "line", value_name = "ITEM=QTY", value_parser = parse_line)]
    lines: Vec<(String, u32)>,
    /// Why (kept with the refund).
    #[arg(long)]
    reason: Option<String>,
    /// Refund past the refund window (admin).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    write: WriteArgs,
}

fn parse_line(text: &str) -> Result<(String, u32), String> {
    let (item, quantity) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not ITEM=QTY"))?;
    let quantity = quantity
        .parse::<u32>()
        .ok()
        .filter(|q| *q > 0)
        .ok_or_else(|| format!("`{quantity}` is not a positive quantity"))?;
    Ok((item.to_owned(), quantity))
}

pub async fn run(args: Args, ctx: &Context) -> Result<(), CliError> {
    let client = if args.force {
        ctx.admin()?
    } else {
        ctx.service()?
    };
    let answer = client
        .post(
            &[
                "v1",
                "users",
                &args.user,
                "orders",
                &args.order_id,
                "refunds",
            ],
            &body(&args),
            &args.write.key(),
        )
        .await?;
    ctx.out.answer(&answer, refund);
    Ok(())
}

fn body(args: &Args) -> Value {
    let mut body = json!({});
    if !args.lines.is_empty() {
        let lines: Vec<Value> = args
            .lines
            .iter()
            .map(|(item, quantity)| json!({ "item_id": item, "quantity": quantity }))
            .collect();
        body["lines"] = json!(lines);
    }
    if let Some(reason) = &args.reason {
        body["reason"] = json!(reason);
    }
    if args.force {
        body["force"] = json!(true);
    }
    body
}

fn refund(refund: &Value) -> String {
    let mut out = fields(&[
        ("refund", text(refund, "/refund_id")),
        ("order", text(refund, "/order_id")),
        ("user", text(refund, "/user_id")),
        ("amount", text(refund, "/amount")),
        ("status", text(refund, "/status")),
        ("forced", text(refund, "/forced")),
        ("balance", text(refund, "/wallet/balance")),
        ("available", text(refund, "/wallet/available")),
    ]);
    let mut lines = Table::new(["ITEM", "QTY", "AMOUNT"]);
    for line in refund["lines"].as_array().map_or(&[][..], Vec::as_slice) {
        lines.row(vec![
            text(line, "/item_id"),
            text(line, "/quantity"),
            text(line, "/amount"),
        ]);
    }
    out.push('\n');
    out.push_str(&lines.render());
    out
}

#[cfg(test)]
mod tests {
    use super::parse_line;

    #[test]
    fn a_line_is_item_equals_a_positive_quantity() {
        assert_eq!(parse_line("gems-100=2"), Ok(("gems-100".to_owned(), 2)));
        assert!(parse_line("gems-100").is_err());
        assert!(parse_line("gems-100=0").is_err());
        assert!(parse_line("gems-100=-1").is_err());
    }
}
