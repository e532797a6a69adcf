//! `shopkeep audit`: every invariant recomputed on every shard (`GET /v1/admin/audit`); exit 4
//! (`audit_failed`) when a shard has a violation.

use serde_json::Value;

use crate::cli::Context;
use crate::cli::error::CliError;
use crate::cli::output::{Table, text};
use crate::cli::progress;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_args: Args, ctx: &Context) -> Result<(), CliError> {
    let client = ctx.admin()?;
    let answer = progress::shown(
        "auditing every shard",
        client.get(&["v1", "admin", "audit"], &[]),
    )
    .await?;
    ctx.out.answer(&answer, report);
    match failed(&answer.json) {
        None => Ok(()),
        Some(message) => Err(CliError::Problem {
            code: "audit_failed",
            message,
        }),
    }
}

/// What is wrong when the audit is not ok: the violations, counted per shard.
pub fn failed(audit: &Value) -> Option<String> {
    if audit["ok"].as_bool() == Some(true) {
        return None;
    }
    let shards: Vec<String> = shards(audit)
        .iter()
        .filter_map(|s| match violations(s) {
            0 => None,
            n => Some(format!("shard {}: {n}", text(s, "/shard"))),
        })
        .collect();
    Some(format!(
        "the audit found violations ({})",
        shards.join(", ")
    ))
}

pub fn shards(audit: &Value) -> &[Value] {
    audit["shards"].as_array().map_or(&[][..], Vec::as_slice)
}

pub fn violations(shard: &Value) -> usize {
    shard["violations"].as_array().map_or(0, Vec::len)
}

fn report(audit: &Value) -> String {
    let mut table = Table::new([
        "SHARD",
        "APPLIED",
        "USERS",
        "ORDERS",
        "POSTINGS",
        "VIOLATIONS",
        "STATE_HASH",
    ]);
    for shard in shards(audit) {
        table.row(vec![
            text(shard, "/shard"),
            text(shard, "/last_applied"),
            text(shard, "/users"),
            text(shard, "/orders"),
            text(shard, "/postings"),
            violations(shard).to_string(),
            text(shard, "/state_hash"),
        ]);
    }
    let mut out = table.render();
    for shard in shards(audit) {
        for violation in shard["violations"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
        {
            out.push_str(&format!(
                "shard {}: {}\n",
                text(shard, "/shard"),
                violation.as_str().unwrap_or_default()
            ));
        }
    }
    let verdict = if audit["ok"].as_bool() == Some(true) {
        "ok"
    } else {
        "VIOLATIONS"
    };
    out.push_str(&format!("audit: {verdict}\n"));
    out
}
