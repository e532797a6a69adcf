//! The edge against a stranger with network access and no credentials: each test measures a bound
//! (server CPU per request, RSS growth, time to the API answering while slow connections are open) or
//! proves a refusal comes before the body is read. Raw TCP where a client library would be too polite.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::*;

fn socket_addr(srv: &Server) -> SocketAddr {
    srv.api()
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("server address")
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/pid/stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second
}

/// Resident set size of the process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/pid/status");
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// Sends `head` (and nothing more) and returns the status line of the answer, if one comes within
/// `within`.
async fn status_line_within(addr: SocketAddr, head: &str, within: Duration) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("send head");
    read_status_line(&mut stream, within).await
}

async fn read_status_line(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    text.lines()
        .next()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
}

/// Asserts that an answer's status line (from [`read_status_line`]) carries `status`.
fn assert_status(line: &Option<String>, status: u16, context: &str) {
    assert!(
        line.as_deref()
            .is_some_and(|l| l.contains(&format!(" {status} "))),
        "{context}: {line:?}"
    );
}

/// Whether the server closes `stream` (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn webhook_head(signature: &str, content_length: usize) -> String {
    format!(
        "POST /v1/psp/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Psp-Signature: {signature}\r\nContent-Length: {content_length}\r\n\r\n"
    )
}

// ------------------------------------------------------------------------------------------------
// The PSP webhook

#[tokio::test]
async fn a_webhook_signature_header_stuffed_with_v1_values_costs_no_mac_per_value() {
    let srv = Server::start().await;
    let pid = srv.pid().expect("pid");
    let header = format!("t={},{}", now_unix(), "v1=,".repeat(15_000));
    let body = vec![b'x'; 64 * 1024];
    let before = cpu_seconds(pid);
    let started = Instant::now();
    for _ in 0..8 {
        let r = srv
            .call(reqwest::Method::POST, "/v1/psp/webhook")
            .header("psp-signature", &header)
            .header("content-type", "application/json")
            .body_bytes(body.clone())
            .send()
            .await;
        r.expect_error(401, "invalid_signature");
    }
    let cpu = cpu_seconds(pid) - before;
    eprintln!("8 stuffed webhook requests: {cpu:.3} s of server CPU");
    // Before: every `v1=` value cost an HMAC over the whole body (~0.6 s of CPU per request here).
    assert!(
        cpu < 0.5,
        "8 stuffed webhook requests took {cpu:.2} s of server CPU ({:?} wall)",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_webhook_signature_header_out_of_shape_is_refused_before_the_body_arrives() {
    let srv = Server::start().await;
    let addr = socket_addr(&srv);
    let t = now_unix();
    let valid_hex = "ab".repeat(32);
    let cases = [
        format!("t={t},v1={}", "a".repeat(1100)),
        format!("t={t},v1=abcd"),
        format!("t={t},{}", format!("v1={valid_hex},").repeat(5)),
        format!("t={},v1={valid_hex}", t - 301),
        format!("t=-9223372036854775808,v1={valid_hex}"),
        format!("t=9223372036854775807,v1={valid_hex}"),
        format!("t={t},t={t},v1={valid_hex}"),
        format!("t={t}"),
        "v1=".to_owned(),
    ];
    for signature in cases {
        // The body is announced but never sent: only a check of the headers alone can answer.
        let line = status_line_within(
            addr,
            &webhook_head(&signature, 1000),
            Duration::from_secs(3),
        )
        .await;
        assert_status(&line, 401, &format!("{signature:.80}"));
    }
}

#[tokio::test]
async fn a_webhook_signed_with_any_of_four_secrets_is_checked_with_one_mac() {
    let srv = Server::start().await;
    srv.create_user("u-rot").await;
    let topup = srv
        .post(
            "/v1/users/u-rot/topups",
            Auth::Service,
            &json!({"amount": "5.00"}),
        )
        .await
        .expect(201);
    let body = serde_json::to_vec(&json!({
        "event_id": "evt-rot", "type": "payment.succeeded", "topup_id": topup["topup_id"],
        "user_id": "u-rot", "amount": "5.00", "psp_payment_id": "pi-rot"
    }))
    .expect("json");
    let t = now_unix();
    let good = sign_webhook(PSP_SECRET, t, &body);
    let good_hex = good.split_once(",v1=").expect("v1").1;
    let decoy = "cd".repeat(32);
    let header = format!("t={t},v1={decoy},v1={decoy},v1={decoy},v1={good_hex}");
    let r = srv
        .call(reqwest::Method::POST, "/v1/psp/webhook")
        .header("psp-signature", &header)
        .header("content-type", "application/json")
        .body_bytes(body)
        .send()
        .await;
    assert_eq!(r.expect(200)["status"], "COMPLETED");
}

#[tokio::test]
async fn stalled_webhook_bodies_do_not_take_the_apis_share_of_requests_in_flight() {
    let srv = Server::start_with(
        Opts::new()
            .env("SHOPKEEP_MAX_INFLIGHT", "32")
            .env("SHOPKEEP_MAX_WEBHOOK_INFLIGHT", "8")
            .env("SHOPKEEP_BODY_READ_TIMEOUT", "60s"),
    )
    .await;
    let addr = socket_addr(&srv);
    let signature = format!("t={},v1={}", now_unix(), "ab".repeat(32));
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(webhook_head(&signature, 1000).as_bytes())
            .await
            .expect("head");
        stream
            .write_all(b"{\"event_id\":")
            .await
            .expect("a few bytes");
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let r = srv.get("/v1/items", Auth::Admin).await;
    eprintln!(
        "API with 40 stalled webhook bodies: {} in {:?}",
        r.status,
        started.elapsed()
    );
    assert_eq!(
        r.status, 200,
        "the API answered {} while 40 webhook bodies stalled",
        r.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
}

// ------------------------------------------------------------------------------------------------
// Node traffic

#[tokio::test]
async fn a_node_call_without_a_valid_signature_is_refused_before_its_body_is_read() {
    let srv = Server::start().await;
    let addr = socket_addr(&srv);
    let head = format!(
        "POST /_node/v1/call HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        31 * 1024 * 1024
    );
    let line = status_line_within(addr, &head, Duration::from_secs(3)).await;
    assert_status(&line, 401, "an unsigned node call");
}

#[tokio::test]
async fn unauthenticated_node_uploads_do_not_grow_the_servers_memory() {
    let srv = Server::start().await;
    let (addr, pid) = (socket_addr(&srv), srv.pid().expect("pid"));
    let before = rss_mib(pid);
    let head = format!(
        "POST /_node/v1/call HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         x-shopkeep-cluster-secret: guess\r\nContent-Length: {}\r\n\r\n",
        31 * 1024 * 1024
    );
    let chunk = vec![0u8; 1024 * 1024];
    let mut uploads = Vec::new();
    for _ in 0..20 {
        let head = head.clone();
        let chunk = chunk.clone();
        uploads.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(head.as_bytes()).await.expect("head");
            // Push 16 MiB as fast as the server takes it; it may close the connection first.
            for _ in 0..16 {
                let write = stream.write_all(&chunk);
                match tokio::time::timeout(Duration::from_secs(2), write).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            stream
        }));
    }
    let mut streams = Vec::new();
    for upload in uploads {
        streams.push(upload.await.expect("upload task"));
    }
    let grown = rss_mib(pid) - before;
    eprintln!("20 unauthenticated 16 MiB node uploads: RSS {before:.0} MiB -> +{grown:.1} MiB");
    // Before: each upload was buffered whole before the secret was checked (20 × 16 MiB).
    assert!(
        grown < 64.0,
        "RSS grew by {grown:.0} MiB under 20 unauthenticated uploads"
    );
    drop(streams);
}

// ------------------------------------------------------------------------------------------------
// Slow and many connections

#[tokio::test]
async fn a_connection_that_never_finishes_its_request_head_is_closed_after_the_header_timeout() {
    let srv = Server::start_with(Opts::new().env("SHOPKEEP_HEADER_READ_TIMEOUT", "1s")).await;
    let mut stream = TcpStream::connect(socket_addr(&srv))
        .await
        .expect("connect");
    stream
        .write_all(b"GET /v1/items HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("half a head");
    assert!(
        closed_within(&mut stream, Duration::from_secs(4)).await,
        "a half-sent request head was kept open"
    );
    // An idle keep-alive connection is closed the same way.
    let mut idle = TcpStream::connect(socket_addr(&srv))
        .await
        .expect("connect");
    assert!(
        closed_within(&mut idle, Duration::from_secs(4)).await,
        "an idle connection was kept open"
    );
}

#[tokio::test]
async fn a_body_that_trickles_in_past_the_body_timeout_gets_408() {
    let srv = Server::start_with(Opts::new().env("SHOPKEEP_BODY_READ_TIMEOUT", "1s")).await;
    let mut stream = TcpStream::connect(socket_addr(&srv))
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Idempotency-Key: slow-1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user_id\":"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let started = Instant::now();
    let line = read_status_line(&mut stream, Duration::from_secs(5)).await;
    assert_status(&line, 408, "a body past its deadline");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

async fn connect_from(local_ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{local_ip}:0").parse().expect("local addr"))
        .expect("bind");
    socket.connect(to).await.expect("connect")
}

#[tokio::test]
async fn connections_beyond_the_per_peer_limit_are_closed_while_other_peers_are_served() {
    let srv = Server::start_with(Opts::new().env("SHOPKEEP_MAX_CONNECTIONS_PER_PEER", "8")).await;
    let addr = socket_addr(&srv);
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from("127.0.0.3", addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ninth = connect_from("127.0.0.3", addr).await;
    assert!(
        closed_within(&mut ninth, Duration::from_secs(2)).await,
        "a ninth connection from one address was kept"
    );
    // Another address is served meanwhile.
    let mut other = connect_from("127.0.0.4", addr).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let line = read_status_line(&mut other, Duration::from_secs(2)).await;
    assert_status(&line, 200, "another address");
    // Once one closes, the address may connect again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from("127.0.0.3", addr).await;
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let line = read_status_line(&mut again, Duration::from_secs(2)).await;
    assert_status(&line, 200, "the same address once one closed");
}

// ------------------------------------------------------------------------------------------------
// Metrics

#[tokio::test]
async fn made_up_http_methods_do_not_grow_the_metrics() {
    let srv = Server::start().await;
    let size = |text: &str| text.len();
    let _ = srv.get("/healthz", Auth::None).await;
    let before = size(&srv.get("/metrics", Auth::None).await.text());
    for i in 0..300 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).expect("method");
        let _ = srv.call(method, "/v1/items").send().await;
    }
    let metrics = srv.get("/metrics", Auth::None).await.text();
    assert!(
        !metrics.contains("MADEUP"),
        "a made-up method became a label"
    );
    assert!(metrics.contains("method=\"other\""), "{metrics:.2000}");
    let grown = size(&metrics) - before;
    assert!(grown < 20_000, "/metrics grew by {grown} bytes");
}

// ------------------------------------------------------------------------------------------------
// Tokens and files

#[tokio::test]
async fn a_well_signed_user_token_that_outlives_the_maximum_ttl_is_refused() {
    use shopkeep::domain::Timestamp;
    use shopkeep::http::auth::TokenSigner;
    use shopkeep::secrets::{KeyPurpose, derive_key};
    let srv = Server::start().await;
    srv.create_user("u-long").await;
    let secret =
        std::fs::read_to_string(srv.data_dir().join("token-secret")).expect("token-secret");
    let signer = TokenSigner::new(&derive_key(secret.trim(), KeyPurpose::UserToken));
    let now = now_unix();
    let within = signer.mint("u-long", Timestamp::from_unix_seconds(now + 86_400));
    srv.get("/v1/users/u-long", Auth::user(&within))
        .await
        .expect(200);
    let ten_years = signer.mint(
        "u-long",
        Timestamp::from_unix_seconds(now + 10 * 365 * 86_400),
    );
    srv.get("/v1/users/u-long", Auth::user(&ten_years))
        .await
        .expect_error(401, "unauthenticated");
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[cfg(unix)]
fn modes_below(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u32)>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        out.push((path.clone(), mode(&path)));
        if path.is_dir() {
            modes_below(&path, out);
        }
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_is_private_whatever_the_umask() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fresh");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_shopkeep"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: umask is async-signal-safe and touches only the child's mask.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = command.spawn().expect("spawn");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        if std::io::BufRead::read_line(&mut stdout, &mut line).expect("stdout") == 0 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode(&data), 0o700, "data dir");
    let mut modes = Vec::new();
    modes_below(&data, &mut modes);
    assert!(modes.len() > 3, "{modes:?}");
    for (path, mode) in modes {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{}", path.display());
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_secret_file_that_is_a_symlink_stops_the_start_instead_of_being_read_or_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let elsewhere = dir.path().join("not-a-secret");
    std::fs::write(
        &elsewhere,
        "public text that must not become the admin token",
    )
    .expect("write");
    std::os::unix::fs::symlink(&elsewhere, data.join("admin-token")).expect("symlink");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shopkeep"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env_remove("SHOPKEEP_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.is_some_and(|s| !s.success()),
        "started with a symlinked secret: {stderr}"
    );
    assert!(stderr.contains("admin-token"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&elsewhere).expect("read"),
        "public text that must not become the admin token"
    );
}

// ------------------------------------------------------------------------------------------------
// A listener of node traffic's own

/// Starts `shopkeep serve` with `--node-listen` and returns (process, client address, node address).
fn serve_with_node_listener(data: &std::path::Path) -> (std::process::Child, String, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shopkeep"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--node-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data)
        .env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SHOPKEEP_CLUSTER_SECRET", NODE_LISTEN_SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let (mut client, mut node) = (None, None);
    let mut line = String::new();
    while client.is_none() {
        line.clear();
        if std::io::BufRead::read_line(&mut stdout, &mut line).expect("stdout") == 0 {
            panic!("the server exited before listening");
        }
        let address = line
            .trim()
            .rsplit_once("http://")
            .map(|(_, a)| a.to_owned());
        if line.contains("node traffic on") {
            node = address;
        } else if line.contains("listening on") {
            client = address;
        }
    }
    (
        child,
        client.expect("client address"),
        node.expect("node address printed before the client one"),
    )
}

const NODE_LISTEN_SECRET: &str = "node-listen-test-secret-0123456789abcdef";

#[tokio::test]
async fn with_node_listen_node_traffic_and_the_api_never_share_a_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, client, node) = serve_with_node_listener(&dir.path().join("data"));
    let http = reqwest::Client::new();
    let body = b"\x01\x02".to_vec();
    let signed_call = |base: &str| {
        http.post(format!("http://{base}/_node/v1/call"))
            .header(
                "x-shopkeep-node-auth",
                node_auth(NODE_LISTEN_SECRET, "POST", "/_node/v1/call", &body),
            )
            .body(body.clone())
            .send()
    };
    // The client port knows no node traffic, whoever signs it.
    let r = signed_call(&client).await.expect("client port");
    assert_eq!(r.status().as_u16(), 404);
    // The node port authenticates it (the garbage body is refused after that) …
    let r = signed_call(&node).await.expect("node port");
    assert_eq!(r.status().as_u16(), 400, "{:?}", r.text().await);
    // … and serves no API (a 404 in the error shape).
    let r = http
        .get(format!("http://{node}/v1/items"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("node port");
    assert_eq!(r.status().as_u16(), 404);
    let error: serde_json::Value = r.json().await.expect("JSON error");
    assert_eq!(error["error"]["code"], "not_found");
    let r = http
        .get(format!("http://{client}/v1/items"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("client port");
    assert_eq!(r.status().as_u16(), 200);
    let _ = child.kill();
    let _ = child.wait();
}
