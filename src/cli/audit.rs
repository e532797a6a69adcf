//! `shopkeep audit`: every invariant recomputed on every shard, one request per shard
//! (`GET /v1/admin/audit?shard=N`, so `--timeout` bounds one shard's audit, not the whole shop's); exit 4
//! (`audit_failed`) when a shard has a violation.

use serde_json::{Value, json};

use crate::cli::Context;
use crate::cli::client::Client;
use crate::cli::error::CliError;
use crate::cli::output::{Table, text};
use crate::cli::progress;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_args: Args, ctx: &Context) -> Result<(), CliError> {
    let client = ctx.admin()?;
    let cluster = client.get(&["v1", "cluster"], &[]).await?.json;
    let audit = every_shard(&client, &cluster).await?;
    ctx.out.document(&audit, report);
    match failed(&audit) {
        None => Ok(()),
        Some(message) => Err(CliError::Problem {
            code: "audit_failed",
            message,
        }),
    }
}

/// The audit of every shard `cluster` (the node's `GET /v1/cluster`) lists, one request each, as
/// `GET /v1/admin/audit` answers for all of them: `{"ok", "shards": [...]}`.
pub async fn every_shard(client: &Client, cluster: &Value) -> Result<Value, CliError> {
    let numbers: Vec<String> = shards(cluster).iter().map(|s| text(s, "/shard")).collect();
    if numbers.is_empty() {
        // No shard listed (not a view this server gives): the whole audit in one request.
        let answer = progress::shown(
            "auditing every shard",
            client.get(&["v1", "admin", "audit"], &[]),
        )
        .await?;
        return Ok(answer.json);
    }
    let mut reports = Vec::with_capacity(numbers.len());
    let mut ok = true;
    for (i, shard) in numbers.iter().enumerate() {
        let what = format!("auditing shard {shard} ({} of {})", i + 1, numbers.len());
        let answer = progress::shown(
            &what,
            client.get(&["v1", "admin", "audit"], &[("shard", shard)]),
        )
        .await?;
        ok &= answer.json["ok"].as_bool() == Some(true);
        reports.extend(shards(&answer.json).iter().cloned());
    }
    Ok(json!({ "ok": ok, "shards": reports }))
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
