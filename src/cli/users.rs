//! `shopkeep users create ID [--name N] | show ID`: a user and its wallet (`POST /v1/users`, `GET
//! /v1/users/{user_id}`).

use clap::Subcommand;
use serde_json::{Value, json};

use crate::cli::error::CliError;
use crate::cli::output::{fields, text};
use crate::cli::{Context, WriteArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Create a user with an empty wallet.
    Create {
        id: String,
        /// The display name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// A user and its wallet.
    Show { id: String },
}

pub async fn run(args: Args, ctx: &Context) -> Result<(), CliError> {
    let client = ctx.service()?;
    let answer = match args.action {
        Action::Create { id, name, write } => {
            let mut body = json!({ "user_id": id });
            if let Some(name) = name {
                body["display_name"] = json!(name);
            }
            client.post(&["v1", "users"], &body, &write.key()).await?
        }
        Action::Show { id } => client.get(&["v1", "users", &id], &[]).await?,
    };
    ctx.out.answer(&answer, user);
    Ok(())
}

/// A user (or anything carrying a `wallet`) as `key: value` lines.
pub fn user(user: &Value) -> String {
    fields(&[
        ("user", text(user, "/user_id")),
        ("name", text(user, "/display_name")),
        ("created", text(user, "/created_at")),
        ("currency", text(user, "/wallet/currency")),
        ("balance", text(user, "/wallet/balance")),
        ("held", text(user, "/wallet/held")),
        ("available", text(user, "/wallet/available")),
    ])
}
