//! `shopkeep credit USER AMOUNT --ref EXTERNAL_REF [--source S]`: a direct credit of a payment the PSP
//! already settled (`POST /v1/users/{user_id}/credits`). The external reference is unique: the same one
//! again with the same amount returns the original credit and credits nothing.

use serde_json::json;

use crate::cli::error::CliError;
use crate::cli::output::{fields, text};
use crate::cli::{Context, WriteArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    user: String,
    /// A decimal string in the shop's currency, e.g. 20.00.
    amount: String,
    /// The PSP's reference of the payment (unique across the shop).
    #[arg(long = "ref", value_name = "EXTERNAL_REF")]
    external_ref: String,
    /// Where the money came from (e.g. card).
    #[arg(long)]
    source: Option<String>,
    #[command(flatten)]
    write: WriteArgs,
}

pub async fn run(args: Args, ctx: &Context) -> Result<(), CliError> {
    let mut body = json!({ "amount": args.amount, "external_ref": args.external_ref });
    if let Some(source) = &args.source {
        body["source"] = json!(source);
    }
    let answer = ctx
        .service()?
        .post(
            &["v1", "users", &args.user, "credits"],
            &body,
            &args.write.key(),
        )
        .await?;
    ctx.out.answer(&answer, |credit| {
        fields(&[
            ("credit", text(credit, "/credit_id")),
            ("user", text(credit, "/user_id")),
            ("amount", text(credit, "/amount")),
            ("ref", text(credit, "/external_ref")),
            ("status", text(credit, "/status")),
            ("balance", text(credit, "/wallet/balance")),
            ("available", text(credit, "/wallet/available")),
        ])
    });
    Ok(())
}
