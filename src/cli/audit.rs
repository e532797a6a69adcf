//! `shopkeep audit`: every invariant recomputed on every shard, one request per shard
//! (`GET /v1/admin/audit?shard=N`, so `--timeout`, 15 minutes when not given, bounds one shard's audit,
//! not the whole shop's); exit 4
//! (`audit_failed`) when a shard has a violation.

use std::time::Duration;

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
    let audit = every_shard(&client, &cluster, ctx.audit_timeout()).await?;
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
/// `GET /v1/admin/audit` answers for all of them: `{"ok", "shards": [...]}`, each request given `timeout`.
pub async fn every_shard(
    client: &Client,
    cluster: &Value,
    timeout: Duration,
) -> Result<Value, CliError> {
    let numbers = shard_numbers(cluster)?;
    let mut reports = Vec::with_capacity(numbers.len());
    let mut ok = true;
    for (i, shard) in numbers.iter().enumerate() {
        let what = format!("auditing shard {shard} ({} of {})", i + 1, numbers.len());
        let answer = progress::shown(
            &what,
            client.get_within(
                &["v1", "admin", "audit"],
                &[("shard", &shard.to_string())],
                timeout,
            ),
        )
        .await?;
        ok &= answer.json["ok"].as_bool() == Some(true);
        reports.extend(shards(&answer.json).iter().cloned());
    }
    Ok(json!({ "ok": ok, "shards": reports }))
}

/// The shard numbers `GET /v1/cluster` lists. None, or one that is not a number, is not an answer a
/// shopkeep server gives: auditing nothing (or the wrong shards) and calling it ok would be a lie.
fn shard_numbers(cluster: &Value) -> Result<Vec<u64>, CliError> {
    let bad = |detail: String| CliError::NoAnswer {
        code: "bad_answer".to_owned(),
        detail,
        key: None,
    };
    let numbers = shards(cluster)
        .iter()
        .map(|s| {
            s["shard"].as_u64().ok_or_else(|| {
                bad(format!(
                    "GET /v1/cluster listed a shard without its number: {s}"
                ))
            })
        })
        .collect::<Result<Vec<u64>, CliError>>()?;
    if numbers.is_empty() {
        return Err(bad(
            "GET /v1/cluster listed no shards (is --url a shopkeep server?)".to_owned(),
        ));
    }
    Ok(numbers)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_numbers_are_read_from_the_cluster_view_and_an_empty_or_unnumbered_list_is_refused() {
        let cluster = json!({"shards": [{"shard": 0, "leader": 1}, {"shard": 2}]});
        assert_eq!(shard_numbers(&cluster).unwrap(), vec![0, 2]);
        for view in [
            json!({"shards": []}),
            json!({}),
            json!({"shards": [{"shard": 0}, {"shard": "1"}]}),
            json!({"shards": [{"leader": 1}]}),
        ] {
            let refused = shard_numbers(&view).unwrap_err();
            assert_eq!(refused.code(), "bad_answer", "{view}");
            assert_eq!(refused.exit_status(), crate::cli::error::EXIT_NO_ANSWER);
        }
    }
}
