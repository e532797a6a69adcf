//! The checks after a shopkeep system: `GET /v1/admin/audit` on every node must be ok, every shard's
//! `state_hash` equal on every node, and the orders counted equal to the orders the clients saw created.

use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::ADMIN_TOKEN;

#[derive(Deserialize)]
struct Audit {
    ok: bool,
    shards: Vec<AuditShard>,
}

#[derive(Deserialize)]
struct AuditShard {
    orders: u64,
    #[serde(default)]
    violations: Vec<Value>,
    #[serde(default)]
    state_hash: String,
    #[serde(default)]
    last_applied: u64,
}

/// `GET /v1/admin/audit` on `base`: the audit, or why there is none.
async fn fetch_audit(client: &Client, base: &str) -> Result<Audit, String> {
    fetch_audit_of(client, base, "").await
}

/// `GET /v1/admin/audit?shard=N` for each shard of `base` in turn (its `GET /v1/cluster` lists them):
/// the audits as one, and each shard's seconds.
async fn fetch_audit_by_shard(client: &Client, base: &str) -> Result<(Audit, Vec<f64>), String> {
    let mut audit = Audit {
        ok: true,
        shards: Vec::new(),
    };
    let mut seconds = Vec::new();
    for shard in 0..shard_count(client, base).await? {
        let started = Instant::now();
        let one = fetch_audit_of(client, base, &format!("?shard={shard}")).await?;
        seconds.push(started.elapsed().as_secs_f64());
        audit.ok &= one.ok;
        audit.shards.extend(one.shards);
    }
    Ok((audit, seconds))
}

/// The number of shards `base` lists in `GET /v1/cluster`.
pub(crate) async fn shard_count(client: &Client, base: &str) -> Result<u32, String> {
    let cluster: Value = client
        .get(format!("{base}/v1/cluster"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .map_err(|e| format!("GET /v1/cluster failed: {e}"))?
        .json()
        .await
        .map_err(|e| format!("GET /v1/cluster: unexpected body: {e}"))?;
    let shards = cluster["shards"]
        .as_array()
        .ok_or("GET /v1/cluster lists no shards")?;
    u32::try_from(shards.len()).map_err(|e| e.to_string())
}

/// Audits the shards of `base` one after the other, round and round, until `stop` is set (it finishes
/// the shard it is on): the shard audits that finished.
pub(crate) async fn audit_until(
    client: &Client,
    base: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<u64, String> {
    let shards = shard_count(client, base).await?;
    let mut done = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let shard = done % u64::from(shards);
        fetch_audit_of(client, base, &format!("?shard={shard}")).await?;
        done += 1;
    }
    Ok(done)
}

async fn fetch_audit_of(client: &Client, base: &str, query: &str) -> Result<Audit, String> {
    let response = client
        .get(format!("{base}/v1/admin/audit{query}"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != StatusCode::OK {
        return Err(format!("failed with {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("unexpected body ({e}): {text}"))
}

/// Runs the server's audit and compares its order count with the orders the clients saw created.
pub(crate) async fn check_audit(client: &Client, base: &str, created: u64) -> Vec<(String, bool)> {
    match fetch_audit(client, base).await {
        Ok(audit) => checks_of(&audit, created),
        Err(e) => vec![(format!("audit: {e}"), false)],
    }
}

/// As `check_audit`, one shard per request (`?shard=N`): the checks, and each shard's seconds.
pub(crate) async fn check_audit_by_shard(
    client: &Client,
    base: &str,
    created: u64,
) -> (Vec<(String, bool)>, Vec<f64>) {
    match fetch_audit_by_shard(client, base).await {
        Ok((audit, seconds)) => (checks_of(&audit, created), seconds),
        Err(e) => (vec![(format!("audit: {e}"), false)], Vec::new()),
    }
}

fn checks_of(audit: &Audit, created: u64) -> Vec<(String, bool)> {
    let mut checks = vec![(format!("audit: ok = {}", audit.ok), audit.ok)];
    for (i, shard) in audit.shards.iter().enumerate() {
        if !shard.violations.is_empty() {
            checks.push((
                format!("audit: shard {i} violations: {:?}", shard.violations),
                false,
            ));
        }
    }
    let orders: u64 = audit.shards.iter().map(|s| s.orders).sum();
    checks.push(consistency(orders, created));
    checks
}

fn consistency(orders: u64, created: u64) -> (String, bool) {
    if orders == created {
        (
            format!("consistency: ok ({orders} orders = {created} orders the clients saw created)"),
            true,
        )
    } else {
        (
            format!(
                "consistency: MISMATCH: audit counts {orders} orders, clients saw {created} created"
            ),
            false,
        )
    }
}

/// Cluster mode: the audit of every node must be ok, every shard's `state_hash` equal on every node, and
/// the orders counted equal the orders the clients saw created.
pub(crate) async fn check_cluster_audit(
    client: &Client,
    bases: &[String],
    created: u64,
) -> Vec<(String, bool)> {
    let mut checks = Vec::new();
    let mut audits = Vec::new();
    for (id, base) in (1u64..).zip(bases) {
        match fetch_audit(client, base).await {
            Ok(audit) => {
                checks.push((format!("audit: node {id} ok = {}", audit.ok), audit.ok));
                for (i, shard) in audit.shards.iter().enumerate() {
                    if !shard.violations.is_empty() {
                        checks.push((
                            format!(
                                "audit: node {id} shard {i} violations: {:?}",
                                shard.violations
                            ),
                            false,
                        ));
                    }
                }
                audits.push((id, audit));
            }
            Err(e) => checks.push((format!("audit: node {id} FAILED: {e}"), false)),
        }
    }
    if audits.len() < bases.len() {
        checks.push((
            format!(
                "replicas: NOT CHECKED: only {} of {} nodes answered the audit",
                audits.len(),
                bases.len()
            ),
            false,
        ));
    } else {
        let shard_count = audits
            .iter()
            .map(|(_, a)| a.shards.len())
            .max()
            .unwrap_or(0);
        let mut mismatches = 0;
        for shard in 0..shard_count {
            let replicas: Vec<(u64, Option<&AuditShard>)> = audits
                .iter()
                .map(|(id, audit)| (*id, audit.shards.get(shard)))
                .collect();
            let first = replicas[0].1.map(|s| &s.state_hash);
            let equal = replicas
                .iter()
                .all(|(_, s)| s.is_some() && s.map(|s| &s.state_hash) == first);
            if !equal {
                mismatches += 1;
                let parts: Vec<String> = replicas
                    .iter()
                    .map(|(id, s)| match s {
                        Some(s) => format!(
                            "node {id} {} (last_applied {}, orders {})",
                            s.state_hash, s.last_applied, s.orders
                        ),
                        None => format!("node {id} <shard missing>"),
                    })
                    .collect();
                checks.push((
                    format!(
                        "replicas: MISMATCH: shard {shard} state_hash differs: {}",
                        parts.join("; ")
                    ),
                    false,
                ));
            }
        }
        if mismatches == 0 {
            checks.push((
                format!(
                    "replicas: ok ({shard_count} shards, state_hash equal on all {} nodes)",
                    audits.len()
                ),
                true,
            ));
        }
    }
    let Some((first_id, first)) = audits.first() else {
        checks.push((
            "consistency: NOT CHECKED: no node answered the audit".into(),
            false,
        ));
        return checks;
    };
    let orders: u64 = first.shards.iter().map(|s| s.orders).sum();
    for (id, audit) in &audits[1..] {
        let theirs: u64 = audit.shards.iter().map(|s| s.orders).sum();
        if theirs != orders {
            checks.push((
                format!(
                    "consistency: MISMATCH: node {first_id} counts {orders} orders, node {id} counts {theirs}"
                ),
                false,
            ));
        }
    }
    checks.push(consistency(orders, created));
    checks
}
