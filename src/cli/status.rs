//! `shopkeep status`: the cluster as the node at `--url` sees it (`GET /v1/cluster`), its readiness
//! (`GET /readyz`) and the audit's summary (`GET /v1/admin/audit`: ok and the violations per shard) in one
//! view. Exit 4 with `not_ready` when the node is not ready, or `audit_failed` when the audit is not ok
//! (or could not be run).

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::client::Client;
use crate::cli::error::CliError;
use crate::cli::output::{Table, text};
use crate::cli::{Context, audit};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_args: Args, ctx: &Context) -> Result<(), CliError> {
    let client = ctx.admin()?;
    let cluster = client.get(&["v1", "cluster"], &[]).await?.json;
    let ready = readiness(&client).await?;
    let audit = audit_summary(&client, &cluster, ctx.audit_timeout()).await?;
    let view = json!({ "cluster": cluster, "ready": ready, "audit": audit });
    ctx.out.document(&view, human);
    verdict(&view)
}

/// `{"ready": bool, "reason": text|null}` from `/readyz`.
async fn readiness(client: &Client) -> Result<Value, CliError> {
    let (status, body) = client.probe(&["readyz"]).await?;
    let reason = body
        .pointer("/error/message")
        .cloned()
        .unwrap_or(Value::Null);
    Ok(json!({ "ready": status == 200, "reason": reason }))
}

/// `{"ok": bool, "shards": [{"shard", "violations": count}], "error": text|null}`; an audit that could
/// not be run is not ok, with the reason.
async fn audit_summary(
    client: &Client,
    cluster: &Value,
    timeout: Duration,
) -> Result<Value, CliError> {
    match audit::every_shard(client, cluster, timeout).await {
        Ok(audit) => {
            let shards: Vec<Value> = audit::shards(&audit)
                .iter()
                .map(|s| json!({ "shard": s["shard"], "violations": audit::violations(s) }))
                .collect();
            let ok = audit["ok"].as_bool() == Some(true);
            Ok(json!({ "ok": ok, "shards": shards, "error": null }))
        }
        Err(e @ CliError::Unreachable { .. }) => Err(e),
        Err(e) => Ok(json!({ "ok": false, "shards": [], "error": format!("{}: {e}", e.code()) })),
    }
}

fn verdict(view: &Value) -> Result<(), CliError> {
    let mut problems = Vec::new();
    let ready = view.pointer("/ready/ready").and_then(Value::as_bool) == Some(true);
    if !ready {
        problems.push(format!("not ready: {}", text(view, "/ready/reason")));
    }
    if view.pointer("/audit/ok").and_then(Value::as_bool) != Some(true) {
        problems.push(audit_line(view));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(CliError::Problem {
        code: if ready { "audit_failed" } else { "not_ready" },
        message: problems.join("; "),
    })
}

fn human(view: &Value) -> String {
    let cluster = &view["cluster"];
    let ready = match view.pointer("/ready/ready").and_then(Value::as_bool) {
        Some(true) => "ready".to_owned(),
        _ => format!("NOT READY: {}", text(view, "/ready/reason")),
    };
    let mut out = format!(
        "node {} ({}): {ready}\n\n",
        text(cluster, "/node_id"),
        text(cluster, "/mode")
    );
    out.push_str(&nodes_table(cluster));
    out.push('\n');
    out.push_str(&shards_table(cluster, Some(&view["audit"])));
    out.push('\n');
    out.push_str(&audit_line(view));
    out.push('\n');
    out
}

pub fn nodes_table(cluster: &Value) -> String {
    let mut table = Table::new(["NODE", "ADDRESS", "THIS"]);
    for node in cluster["nodes"].as_array().map_or(&[][..], Vec::as_slice) {
        let this = if node["this_node"].as_bool() == Some(true) {
            "*"
        } else {
            ""
        };
        table.row(vec![
            text(node, "/node_id"),
            text(node, "/address"),
            this.to_owned(),
        ]);
    }
    table.render()
}

/// Per shard: role here, leader, term, indexes, followers' lag (known on the leader), recovery, and the
/// audit's violations per shard when the audit is given.
pub fn shards_table(cluster: &Value, audit: Option<&Value>) -> String {
    let mut table = Table::new([
        "SHARD", "ROLE", "LEADER", "TERM", "APPLIED", "LAST_LOG", "LAG", "RECOVERY",
    ]);
    if audit.is_some() {
        table = table.column("VIOLATIONS");
    }
    for shard in cluster["shards"].as_array().map_or(&[][..], Vec::as_slice) {
        let mut cells = vec![
            text(shard, "/shard"),
            text(shard, "/role"),
            text(shard, "/leader"),
            text(shard, "/term"),
            text(shard, "/applied_index"),
            text(shard, "/last_log_index"),
            lag(&shard["lag"]),
            text(shard, "/recovery"),
        ];
        if let Some(audit) = audit {
            let of_shard = audit["shards"]
                .as_array()
                .and_then(|all| all.iter().find(|s| s["shard"] == shard["shard"]));
            cells.push(of_shard.map_or("-".to_owned(), |s| text(s, "/violations")));
        }
        table.row(cells);
    }
    table.render()
}

/// `2:0 3:1` (follower: entries behind; `?` when the leader does not know), `-` when none is known here.
fn lag(lag: &Value) -> String {
    let Some(followers) = lag.as_object().filter(|f| !f.is_empty()) else {
        return "-".to_owned();
    };
    followers
        .iter()
        .map(|(node, behind)| match behind.as_u64() {
            Some(n) => format!("{node}:{n}"),
            None => format!("{node}:?"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn audit_line(view: &Value) -> String {
    let audit = &view["audit"];
    if audit["ok"].as_bool() == Some(true) {
        return "audit: ok".to_owned();
    }
    if let Some(error) = audit["error"].as_str() {
        return format!("audit: not run ({error})");
    }
    let shards: Vec<String> = audit["shards"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter(|s| s["violations"].as_u64().is_some_and(|n| n > 0))
        .map(|s| format!("shard {}: {}", text(s, "/shard"), text(s, "/violations")))
        .collect();
    format!("audit: VIOLATIONS ({})", shards.join(", "))
}
