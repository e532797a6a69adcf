//! The log (API.md, Operations, Logs): one access line per request with its fields and nothing secret,
//! `--log-format json`, a member that goes down reported once by each survivor, not per retry, and a
//! stderr nobody reads costing dropped lines, not stalled requests.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::cluster_harness::*;
use crate::harness::*;

/// The JSON access lines (target `access`) in `logs`; panics on any stderr line that is not JSON.
fn access_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .filter(|line| line["target"] == "access")
        .collect()
}

/// The access line of the request with this id (waits a little: it is written as the answer leaves).
async fn line_of(srv: &Server, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = access_lines(&srv.logs());
        if let Some(line) = lines.iter().find(|l| l["request_id"] == request_id) {
            return line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no access line for {request_id}:\n{}",
            tail(&srv.logs(), 40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_request_has_one_json_access_line_with_its_fields_and_no_token_or_body() {
    let srv = Server::start_with(
        Opts::new()
            .env("SHOPKEEP_LOG_FORMAT", "json")
            // The default filter (the launcher's RUST_LOG=warn would hide `info`).
            .env("RUST_LOG", ""),
    )
    .await;
    let secret_name = "Body-Marker-Never-Logged-7f3e";
    let create = |rid: &'static str| {
        srv.call(Method::POST, "/v1/users")
            .auth(Auth::Service)
            .key("log-user-1")
            .header("x-request-id", rid)
            .json(&json!({"user_id": "log-player", "display_name": secret_name}))
    };
    create("rid-created").send().await.expect(201);
    let replay = create("rid-replayed").send().await;
    assert!(replay.replayed(), "{replay:?}");
    let bad_token = "wrong-token-0123456789abcdef0123456789";
    srv.call(Method::GET, "/v1/users/log-player")
        .auth(Auth::user(bad_token))
        .header("x-request-id", "rid-401")
        .send()
        .await
        .expect_error(401, "unauthenticated");
    srv.call(Method::GET, "/v1/no/such/path")
        .auth(Auth::Service)
        .header("x-request-id", "rid-404")
        .send()
        .await
        .expect_error(404, "not_found");
    let token = srv.user_token("log-player").await;
    srv.call(Method::GET, "/v1/users/log-player/wallet")
        .auth(Auth::user(&token))
        .header("x-request-id", "rid-user")
        .send()
        .await
        .expect(200);

    let created = line_of(&srv, "rid-created").await;
    assert_eq!(created["level"], "INFO", "{created}");
    assert_eq!(created["method"], "POST", "{created}");
    assert_eq!(created["route"], "/v1/users", "{created}");
    assert_eq!(created["status"], 201, "{created}");
    assert_eq!(created["role"], "service", "{created}");
    assert_eq!(created["replayed"], false, "{created}");
    assert!(
        created["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{created}"
    );
    let replayed = line_of(&srv, "rid-replayed").await;
    assert_eq!(
        (replayed["status"].clone(), replayed["replayed"].clone()),
        (json!(201), json!(true)),
        "{replayed}"
    );
    let refused = line_of(&srv, "rid-401").await;
    assert_eq!(refused["status"], 401, "{refused}");
    assert_eq!(refused["role"], "none", "{refused}");
    assert_eq!(refused["route"], "/v1/users/{user_id}", "{refused}");
    let unknown = line_of(&srv, "rid-404").await;
    assert_eq!(
        (unknown["status"].clone(), unknown["route"].clone()),
        (json!(404), json!("unmatched")),
        "{unknown}"
    );
    let own = line_of(&srv, "rid-user").await;
    assert_eq!(own["route"], "/v1/users/{user_id}/wallet", "{own}");
    assert_eq!(
        (own["role"].clone(), own["user_id"].clone()),
        (json!("user"), json!("log-player")),
        "{own}"
    );
    assert_eq!(own["status"], 200, "{own}");

    let logs = srv.logs();
    for (what, text) in [
        ("the service token", SERVICE_TOKEN),
        ("the admin token", ADMIN_TOKEN),
        ("a user token", token.as_str()),
        ("a refused token", bad_token),
        ("a request body", secret_name),
    ] {
        assert!(!logs.contains(text), "the log holds {what}:\n{logs}");
    }
    for rid in [
        "rid-created",
        "rid-replayed",
        "rid-401",
        "rid-404",
        "rid-user",
    ] {
        let lines = access_lines(&logs);
        assert_eq!(
            lines.iter().filter(|l| l["request_id"] == rid).count(),
            1,
            "one line per request: {rid}"
        );
    }
}

/// Makes `path` a named pipe and opens its reading end without waiting for a writer. Nothing reads it
/// until the caller does: once the kernel's buffer (64 KiB) is full, a writer's next write blocks, as
/// it does behind a stalled journald or a stopped `| less`.
fn unread_pipe(path: &Path) -> File {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .expect("the pipe's reading end")
}

/// Reads what `pipe` holds now, without waiting.
fn drain(pipe: &mut File) -> String {
    let mut text = Vec::new();
    let mut chunk = [0u8; 65_536];
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading the pipe: {e}"),
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[tokio::test]
async fn a_stderr_nobody_reads_drops_and_counts_access_lines_and_never_stalls_requests() {
    let reader: Arc<Mutex<Option<File>>> = Arc::default();
    let opened = reader.clone();
    let stderr_of = |data: &Path| run_log_paths(data.parent().expect("the run's directory"), 1).1;
    // The default filter: every request writes an access line.
    let srv = Server::start_prepared(Opts::new().shards(1).env("RUST_LOG", ""), move |data| {
        *opened.lock().expect("pipe") = Some(unread_pipe(&stderr_of(data)));
    })
    .await;
    let mut pipe = reader
        .lock()
        .expect("pipe")
        .take()
        .expect("the pipe was made");
    // The server holds the pipe open; a plain file under its name lets the harness read "the logs" of a
    // failed test without waiting for a writer that is gone.
    let path = stderr_of(&srv.data_dir());
    std::fs::remove_file(&path).expect("unlink the pipe");
    std::fs::write(&path, "").expect("a plain file in its place");
    let base = srv.api().base;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    // Far more lines than the pipe (~250 of these) and the writer's queue (8,192) hold together.
    const REQUESTS: usize = 12_000;
    const CALLERS: usize = 32;
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let (client, base) = (client.clone(), base.clone());
        callers.spawn(async move {
            for i in (caller..REQUESTS).step_by(CALLERS) {
                let answer = client
                    .get(format!("{base}/v1/users/nobody-{i}"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("request {i} got no answer: {e}"));
                assert_eq!(answer.status().as_u16(), 404, "request {i}");
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.expect("a caller");
    }
    let took = started.elapsed();
    let scrape = crate::metrics::scrape(&base).await;
    let dropped = scrape
        .value("shopkeep_log_lines_dropped_total", &[])
        .expect("the dropped lines' counter");
    assert!(
        dropped > 0.0,
        "{REQUESTS} requests in {took:?} against a full pipe dropped no line"
    );

    // Read the pipe: it kept access lines, and the log goes on.
    let kept = drain(&mut pipe);
    assert!(kept.contains("nobody-"), "{}", tail(&kept, 5));
    let marker = "rid-after-the-pipe-drained";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while !seen.contains(marker) {
        assert!(
            Instant::now() < deadline,
            "no line for {marker}: {}",
            tail(&seen, 5)
        );
        client
            .get(format!("{base}/v1/users/nobody-after"))
            .bearer_auth(ADMIN_TOKEN)
            .header("x-request-id", marker)
            .send()
            .await
            .expect("an answer after the drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen.push_str(&drain(&mut pipe));
    }
}

#[tokio::test]
async fn the_text_log_has_the_access_line_too() {
    let srv = Server::start_with(Opts::new().env("RUST_LOG", "")).await;
    srv.call(Method::GET, "/v1/items")
        .auth(Auth::Service)
        .header("x-request-id", "rid-text-1")
        .send()
        .await
        .expect(200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !srv.logs().contains("rid-text-1") {
        assert!(Instant::now() < deadline, "no access line:\n{}", srv.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = srv.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("rid-text-1"))
        .unwrap_or_default();
    for field in [
        "INFO access",
        "method=GET",
        "route=/v1/items",
        "status=200",
        "role=service",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

/// Lines of `logs` after the first `skip` that speak of node `peer`: ours (`peer=N`) and openraft's
/// (`target=N`, in its replication, vote and heartbeat errors).
fn lines_about_peer(logs: &str, skip: usize, peer: u64) -> Vec<String> {
    logs.lines()
        .skip(skip)
        .filter(|l| l.contains(&format!("peer={peer}")) || l.contains(&format!("target={peer}")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_killed_member_is_reported_once_by_each_survivor_and_again_when_it_returns() {
    let mut opts = ClusterOpts::new().nodes(3).shards(8);
    for node in 1..=3 {
        // The default filter, as an operator runs it.
        opts = opts.node_env(node, "RUST_LOG", "");
    }
    let mut cluster = TestCluster::start_with(opts).await;
    let survivors = [1u64, 2];
    let before: Vec<usize> = survivors
        .iter()
        .map(|&n| cluster.logs(n).lines().count())
        .collect();
    cluster.kill9(3);
    tokio::time::sleep(Duration::from_secs(10)).await;
    for (i, &n) in survivors.iter().enumerate() {
        let about = lines_about_peer(&cluster.logs(n), before[i], 3);
        assert!(
            (1..=2).contains(&about.len()),
            "node {n} logged {} lines about the dead node 3 in 10 s:\n{}",
            about.len(),
            about.join("\n")
        );
        assert!(about[0].contains("peer unreachable"), "{}", about[0]);
    }
    let during: Vec<usize> = survivors
        .iter()
        .map(|&n| cluster.logs(n).lines().count())
        .collect();
    cluster.restart(3).await;
    cluster.wait_ready(&[1, 2, 3], READY_TIMEOUT).await;
    for (i, &n) in survivors.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let about = lines_about_peer(&cluster.logs(n), during[i], 3);
            if about.iter().any(|l| l.contains("peer reachable again")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {n} never said node 3 is back:\n{}",
                about.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_single_node_restarted_on_its_data_logs_no_error() {
    let mut srv = Server::start_with(Opts::new().shards(4)).await;
    srv.funded_user(&uniq("calm"), "1.00").await;
    srv.restart().await;
    srv.api().get("/readyz", Auth::None).await.expect(200);
    let logs = srv.logs();
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
