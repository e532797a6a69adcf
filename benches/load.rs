//! HTTP load benchmark of the purchase path: `POST /v1/users/{id}/orders` with `"complete": true`.
//!
//! What it measures: end-to-end latency and throughput of one-step purchases (create + complete an order,
//! i.e. hold, debit and entitlement grant in one atomic step) against a real `shopkeep serve` process over
//! keep-alive HTTP/1 connections, at several levels of concurrency.
//!
//! How it works:
//! 1. starts `shopkeep serve --data-dir <tempdir> --listen 127.0.0.1:0` and waits for its "listening" line;
//! 2. seeds one currency item (`gems`, 0.01 each) and [`USERS`] users, each credited 100,000.00;
//! 3. for each concurrency level runs that many workers, each looping over its own users (worker `w` buys
//!    for users `w`, `w + c`, `w + 2c`, … round-robin), first for a 1 s warm-up that is not measured, then
//!    for the measured duration; every purchase has a fresh `Idempotency-Key`;
//! 4. prints a table and one JSON line (`{"bench":"complete_purchase","results":[...]}`); latency
//!    percentiles are over the successful (201 `COMPLETED`) purchases, anything else counts as an error;
//! 5. runs `GET /v1/admin/audit` and checks that the orders it counts equal the purchases that succeeded
//!    (warm-ups included).
//!
//! Run it with:
//!
//! ```text
//! cargo bench --bench load
//! SHOPKEEP_BENCH_SECONDS=5 SHOPKEEP_BENCH_CONCURRENCY=1,16,64 cargo bench --bench load
//! ```
//!
//! `SHOPKEEP_BENCH_CONCURRENCY` (default `1,16,64,256`) lists the levels, `SHOPKEEP_BENCH_SECONDS`
//! (default 10) the measured duration of each. Progress goes to stderr, results to stdout.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tempfile::TempDir;
use uuid::Uuid;

const ADMIN_TOKEN: &str = "bench-admin";
const SERVICE_TOKEN: &str = "bench-service";
/// Enough users that concurrent workers rarely buy for the same one (and so rarely contend on a wallet).
const USERS: usize = 512;
/// How many seeding requests are in flight at once.
const SEED_PARALLELISM: usize = 32;
const DEFAULT_CONCURRENCY: &[usize] = &[1, 16, 64, 256];
const DEFAULT_SECONDS: f64 = 10.0;
const WARM_UP: Duration = Duration::from_secs(1);
/// How long to wait for the server to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const ORDER_BODY: &str = r#"{"lines":[{"item_id":"gems","quantity":1}],"complete":true}"#;

fn main() {
    let levels = concurrency_levels();
    let duration = measured_duration();
    let max_concurrency = levels.iter().copied().max().unwrap_or(1);

    let server = Server::start();
    eprintln!("server: listening on {}", server.base_url);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    runtime.block_on(async {
        let client = Client::builder()
            .pool_max_idle_per_host(max_concurrency.max(SEED_PARALLELISM))
            .tcp_nodelay(true)
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("cannot build the HTTP client");
        let base = server.base_url.clone();

        eprintln!("seeding: item gems and {USERS} users");
        seed(&client, &base).await;

        let mut results = Vec::new();
        let mut completed_total = 0u64;
        for &concurrency in &levels {
            eprintln!(
                "level {concurrency}: running {:.1?} (after {:?} warm-up)…",
                duration, WARM_UP
            );
            let (result, completed) = run_level(&client, &base, concurrency, duration).await;
            eprintln!(
                "level {concurrency}: {} requests, {:.0} req/s, {} errors",
                result.requests, result.throughput, result.errors
            );
            completed_total += completed;
            results.push(result);
        }

        print_table(&results);
        let json_results: Vec<Value> = results.iter().map(LevelResult::to_json).collect();
        println!(
            "{}",
            json!({"bench": "complete_purchase", "results": json_results})
        );

        check_audit(&client, &base, completed_total).await;
    });
    drop(runtime);
    drop(server);
}

// ------------------------------------------------------------------------------------------------
// Settings
// ------------------------------------------------------------------------------------------------

fn concurrency_levels() -> Vec<usize> {
    let Ok(text) = std::env::var("SHOPKEEP_BENCH_CONCURRENCY") else {
        return DEFAULT_CONCURRENCY.to_vec();
    };
    let levels: Vec<usize> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("SHOPKEEP_BENCH_CONCURRENCY: {s:?} is not a positive integer"),
        })
        .collect();
    assert!(
        !levels.is_empty(),
        "SHOPKEEP_BENCH_CONCURRENCY lists no level (expected e.g. 1,16,64)"
    );
    levels
}

fn measured_duration() -> Duration {
    let Ok(text) = std::env::var("SHOPKEEP_BENCH_SECONDS") else {
        return Duration::from_secs_f64(DEFAULT_SECONDS);
    };
    match text.trim().parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Duration::from_secs_f64(seconds),
        _ => panic!("SHOPKEEP_BENCH_SECONDS: {text:?} is not a positive number of seconds"),
    }
}

// ------------------------------------------------------------------------------------------------
// Server process
// ------------------------------------------------------------------------------------------------

/// The `shopkeep serve` process under test; killed (and its data directory removed) on drop.
struct Server {
    child: Child,
    base_url: String,
    // Dropped after `Drop::drop` has killed the process, which removes the directory.
    dir: TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("shopkeep-bench-")
            .tempdir()
            .expect("cannot create a temporary data directory");
        let data_dir = dir.path().join("data");
        let stderr_path = dir.path().join("server.stderr");
        let stderr =
            std::fs::File::create(&stderr_path).expect("cannot create the server's stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_shopkeep"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("cannot start the shopkeep binary");

        // One thread reads stdout for the whole life of the process (so the pipe never fills up) and
        // hands the lines over until the listening line has been seen.
        let stdout = child.stdout.take().expect("stdout was piped");
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The receiver is gone once the server is up: keep draining regardless.
                let _ = lines_tx.send(line);
            }
        });

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let base_url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.trim().strip_prefix("shopkeep listening on ") {
                        break url.trim_end_matches('/').to_string();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the server printed no listening line within {STARTUP_TIMEOUT:?}; its stderr:\n{}",
                        read_tail(&stderr_path)
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("cannot wait for the server process");
                    panic!(
                        "the server exited ({status}) before listening; its stderr:\n{}",
                        read_tail(&stderr_path)
                    );
                }
            }
        };
        Server {
            child,
            base_url,
            dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!(
                "server: had already exited ({status}); its stderr:\n{}",
                read_tail(&self.dir.path().join("server.stderr"))
            );
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last few KiB of a file, for error messages.
fn read_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read: {e}>"));
    let start = text.len().saturating_sub(8 * 1024);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

// ------------------------------------------------------------------------------------------------
// Seeding
// ------------------------------------------------------------------------------------------------

/// Creates the `gems` item and [`USERS`] users with plenty of credit. Panics on any unexpected answer.
async fn seed(client: &Client, base: &str) {
    let response = client
        .put(format!("{base}/v1/items/gems"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "Gems", "kind": "currency", "price": "0.01"}))
        .send()
        .await
        .expect("PUT /v1/items/gems: request failed");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "PUT /v1/items/gems: {body}");

    let mut tasks = Vec::new();
    for worker in 0..SEED_PARALLELISM {
        let client = client.clone();
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (worker..USERS).step_by(SEED_PARALLELISM) {
                let user = user_id(i);
                service_post(
                    &client,
                    &format!("{base}/v1/users"),
                    json!({"user_id": user}),
                    StatusCode::CREATED,
                )
                .await;
                service_post(
                    &client,
                    &format!("{base}/v1/users/{user}/credits"),
                    json!({"amount": "100000.00", "external_ref": format!("bench-{i}")}),
                    StatusCode::CREATED,
                )
                .await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("a seeding task panicked");
    }
}

/// A service-role POST with a fresh idempotency key that must answer `expected`.
async fn service_post(client: &Client, url: &str, body: Value, expected: StatusCode) {
    let response = client
        .post(url)
        .bearer_auth(SERVICE_TOKEN)
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: request failed: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, expected, "POST {url} {body}: {text}");
}

fn user_id(i: usize) -> String {
    format!("bench-{i}")
}

// ------------------------------------------------------------------------------------------------
// Load
// ------------------------------------------------------------------------------------------------

/// What one worker saw during the measured window.
#[derive(Default)]
struct WorkerStats {
    /// Latency of each successful purchase, in microseconds.
    latencies_us: Vec<u64>,
    /// Failed requests by status ("409", "503", "transport", …).
    errors: BTreeMap<String, u64>,
    /// Successful purchases over the warm-up *and* the measured window (for the audit check).
    completed_total: u64,
}

/// The outcome of one purchase request.
enum Outcome {
    Completed,
    Failed(String),
}

#[derive(Deserialize)]
struct OrderStatus {
    status: String,
}

struct LevelResult {
    concurrency: usize,
    requests: u64,
    successes: u64,
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    errors: u64,
    errors_by_status: BTreeMap<String, u64>,
}

impl LevelResult {
    fn to_json(&self) -> Value {
        json!({
            "concurrency": self.concurrency,
            "requests": self.requests,
            "successes": self.successes,
            "throughput_rps": round2(self.throughput),
            "p50_ms": round2(self.p50_ms),
            "p99_ms": round2(self.p99_ms),
            "p999_ms": round2(self.p999_ms),
            "max_ms": round2(self.max_ms),
            "errors": self.errors,
            "errors_by_status": self.errors_by_status,
        })
    }
}

/// Runs `concurrency` workers for the warm-up plus `duration`; returns the measured result and the number
/// of purchases that completed over the whole level (warm-up included).
async fn run_level(
    client: &Client,
    base: &str,
    concurrency: usize,
    duration: Duration,
) -> (LevelResult, u64) {
    let urls: Arc<Vec<String>> = Arc::new(
        (0..USERS)
            .map(|i| format!("{base}/v1/users/{}/orders", user_id(i)))
            .collect(),
    );
    let measure_from = Instant::now() + WARM_UP;
    let stop_at = measure_from + duration;

    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let client = client.clone();
        let urls = urls.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = WorkerStats::default();
            // Worker-affine users: worker w buys for w, w + c, w + 2c, … (mod USERS).
            let mut user = worker % USERS;
            loop {
                let started = Instant::now();
                if started >= stop_at {
                    break;
                }
                let outcome = purchase(&client, &urls[user]).await;
                let latency = started.elapsed();
                if matches!(outcome, Outcome::Completed) {
                    stats.completed_total += 1;
                }
                if started >= measure_from {
                    match outcome {
                        Outcome::Completed => stats.latencies_us.push(micros(latency)),
                        Outcome::Failed(bucket) => *stats.errors.entry(bucket).or_default() += 1,
                    }
                }
                user = (user + concurrency) % USERS;
            }
            stats
        }));
    }

    let mut latencies_us = Vec::new();
    let mut errors_by_status = BTreeMap::new();
    let mut completed_total = 0;
    for task in tasks {
        let stats = task.await.expect("a load worker panicked");
        latencies_us.extend(stats.latencies_us);
        for (bucket, count) in stats.errors {
            *errors_by_status.entry(bucket).or_default() += count;
        }
        completed_total += stats.completed_total;
    }
    // Requests started just before `stop_at` finish after it: count the window until the last one ended.
    let elapsed = measure_from.elapsed().as_secs_f64();

    latencies_us.sort_unstable();
    let successes = latencies_us.len() as u64;
    let errors: u64 = errors_by_status.values().sum();
    let requests = successes + errors;
    let result = LevelResult {
        concurrency,
        requests,
        successes,
        throughput: requests as f64 / elapsed,
        p50_ms: percentile_ms(&latencies_us, 0.50),
        p99_ms: percentile_ms(&latencies_us, 0.99),
        p999_ms: percentile_ms(&latencies_us, 0.999),
        max_ms: latencies_us
            .last()
            .map_or(f64::NAN, |&us| us as f64 / 1000.0),
        errors,
        errors_by_status,
    };
    (result, completed_total)
}

/// One complete purchase of one gem for the user behind `url`.
async fn purchase(client: &Client, url: &str) -> Outcome {
    let sent = client
        .post(url)
        .bearer_auth(SERVICE_TOKEN)
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .header(CONTENT_TYPE, "application/json")
        .body(ORDER_BODY)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return Outcome::Failed("timeout".into()),
        Err(_) => return Outcome::Failed("transport".into()),
    };
    let status = response.status();
    // Read the whole body so that the connection goes back to the pool.
    let Ok(body) = response.bytes().await else {
        return Outcome::Failed("transport".into());
    };
    if status != StatusCode::CREATED {
        return Outcome::Failed(status.as_u16().to_string());
    }
    match serde_json::from_slice::<OrderStatus>(&body) {
        Ok(order) if order.status == "COMPLETED" => Outcome::Completed,
        _ => Outcome::Failed("201-not-completed".into()),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds (NaN when there are none).
fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[index] as f64 / 1000.0
}

/// A latency for the table: two decimals, rounded as in the JSON line.
fn ms(x: f64) -> String {
    if x.is_finite() {
        format!("{:.2}", (x * 100.0).round() / 100.0)
    } else {
        "-".to_string()
    }
}

fn round2(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

// ------------------------------------------------------------------------------------------------
// Report
// ------------------------------------------------------------------------------------------------

fn print_table(results: &[LevelResult]) {
    println!();
    println!("complete_purchase: POST /v1/users/{{id}}/orders {{\"complete\": true}}");
    println!(
        "{:>11} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>7}  error statuses",
        "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    for r in results {
        let buckets: Vec<String> = r
            .errors_by_status
            .iter()
            .map(|(status, count)| format!("{status}×{count}"))
            .collect();
        let buckets = if buckets.is_empty() {
            "-".to_string()
        } else {
            buckets.join(", ")
        };
        println!(
            "{:>11} {:>9} {:>10.0} {:>9} {:>9} {:>10} {:>9} {:>7}  {}",
            r.concurrency,
            r.requests,
            r.throughput,
            ms(r.p50_ms),
            ms(r.p99_ms),
            ms(r.p999_ms),
            ms(r.max_ms),
            r.errors,
            buckets
        );
    }
    println!();
}

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
}

/// Runs the server's audit and compares its order count with the purchases that succeeded.
async fn check_audit(client: &Client, base: &str, completed_total: u64) {
    eprintln!("audit: GET /v1/admin/audit…");
    let response = client
        .get(format!("{base}/v1/admin/audit"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .expect("GET /v1/admin/audit: request failed");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != StatusCode::OK {
        println!("audit: failed with {status}: {text}");
        return;
    }
    let audit: Audit = match serde_json::from_str(&text) {
        Ok(audit) => audit,
        Err(e) => {
            println!("audit: unexpected body ({e}): {text}");
            return;
        }
    };
    println!("audit: ok = {}", audit.ok);
    for (i, shard) in audit.shards.iter().enumerate() {
        if !shard.violations.is_empty() {
            println!("audit: shard {i} violations: {:?}", shard.violations);
        }
    }
    let orders: u64 = audit.shards.iter().map(|s| s.orders).sum();
    if orders == completed_total {
        println!("consistency: ok ({orders} orders = {completed_total} completed purchases)");
    } else {
        println!(
            "consistency: MISMATCH: audit counts {orders} orders, clients saw {completed_total} completed purchases"
        );
    }
}
