//! Black-box harness: starts the real `shopkeep` binary on a temporary data directory and talks HTTP to it.
//!
//! Every test starts its own [`Server`] (own process, own temp dir, own port), so tests run in parallel.

use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sha2::Sha256;
use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::launcher::{Launch, LaunchError, Process};

pub const ADMIN_TOKEN: &str = "it-admin-token-5f0c2d9e8b7a41c3a2e1";
pub const SERVICE_TOKEN: &str = "it-service-token-9a8b7c6d5e4f3a2b1c0d";
pub const PSP_SECRET: &str = "it-psp-secret-0123456789abcdef0123456789";

// ------------------------------------------------------------------------------------------------
// Server process
// ------------------------------------------------------------------------------------------------

/// Flags for `shopkeep serve`. Unset options are not passed (the server's defaults apply).
#[derive(Clone, Debug, Default)]
pub struct Opts {
    pub shards: Option<u32>,
    pub order_ttl: Option<String>,
    pub topup_ttl: Option<String>,
    pub idempotency_ttl: Option<String>,
    pub sweep_interval: Option<String>,
    pub max_pending_orders: Option<u32>,
    /// Start without `SHOPKEEP_ADMIN_TOKEN` (the server must generate one).
    pub no_admin_token: bool,
    pub env: Vec<(String, String)>,
}

impl Opts {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn shards(mut self, n: u32) -> Self {
        self.shards = Some(n);
        self
    }
    pub fn order_ttl(mut self, d: &str) -> Self {
        self.order_ttl = Some(d.to_string());
        self
    }
    pub fn topup_ttl(mut self, d: &str) -> Self {
        self.topup_ttl = Some(d.to_string());
        self
    }
    pub fn idempotency_ttl(mut self, d: &str) -> Self {
        self.idempotency_ttl = Some(d.to_string());
        self
    }
    pub fn sweep_interval(mut self, d: &str) -> Self {
        self.sweep_interval = Some(d.to_string());
        self
    }
    pub fn max_pending_orders(mut self, n: u32) -> Self {
        self.max_pending_orders = Some(n);
        self
    }
    pub fn no_admin_token(mut self) -> Self {
        self.no_admin_token = true;
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

/// A running `shopkeep serve` process. Killed (SIGKILL) on drop. Derefs to its [`Api`] client.
pub struct Server {
    process: Option<Process>,
    dir: TempDir,
    opts: Opts,
    api: Api,
    runs: usize,
}

/// Where run `run` of a server in `dir` writes its stdout and stderr.
pub fn run_log_paths(dir: &Path, run: usize) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("run{run}.stdout.log")),
        dir.join(format!("run{run}.stderr.log")),
    )
}

/// Every run's stdout and stderr (`run<N>.stdout.log`, `run<N>.stderr.log` in `dir`), each under a header
/// starting with `label`.
pub fn collect_run_logs(dir: &Path, runs: usize, label: &str) -> String {
    let mut out = String::new();
    for run in 1..=runs {
        for stream in ["stdout", "stderr"] {
            out.push_str(&format!("==== {label}run {run} {stream} ====\n"));
            let (stdout, stderr) = run_log_paths(dir, run);
            let path = if stream == "stdout" { stdout } else { stderr };
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
    }
    out
}

static SPAWNED: AtomicUsize = AtomicUsize::new(0);

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        // The server closes connections idle for its header-read timeout (30 s by default).
        .pool_idle_timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(Opts::default()).await
    }

    pub async fn start_with(opts: Opts) -> Server {
        Self::start_prepared(opts, |_| {}).await
    }

    /// `start_with`, after `prepare` ran on the (empty) data directory (e.g. to mount a file system there).
    pub async fn start_prepared(opts: Opts, prepare: impl FnOnce(&Path)) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("shopkeep-it-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        prepare(&dir.path().join("data"));
        let mut srv = Server {
            process: None,
            dir,
            opts,
            api: Api {
                base: String::new(),
                http: http_client(),
            },
            runs: 0,
        };
        srv.spawn().await;
        srv
    }

    pub fn api(&self) -> Api {
        self.api.clone()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    fn log_paths(&self, run: usize) -> (PathBuf, PathBuf) {
        run_log_paths(self.dir.path(), run)
    }

    /// All stdout + stderr the server printed, over every run.
    pub fn logs(&self) -> String {
        collect_run_logs(self.dir.path(), self.runs, "")
    }

    async fn spawn(&mut self) {
        if let Err(msg) = self.try_spawn().await {
            panic!("{msg}");
        }
    }

    /// Starts the stopped server again; `Err` (with its output) if it exits instead of serving.
    pub async fn try_start(&mut self) -> Result<(), String> {
        self.try_spawn().await
    }

    async fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.process.is_none(), "server already running");
        self.runs += 1;
        SPAWNED.fetch_add(1, Ordering::Relaxed);
        let (out_log, err_log) = self.log_paths(self.runs);
        let launch = launch(&self.data_dir(), &self.opts, &out_log, &err_log);
        let (process, base) = tokio::task::spawn_blocking(move || {
            let mut process = launch.spawn().expect("spawn shopkeep");
            let url = process.wait_listening(Instant::now() + LISTEN_TIMEOUT)?;
            Ok::<_, LaunchError>((process, url))
        })
        .await
        .expect("spawn thread")
        .map_err(|e| e.to_string())?;
        self.process = Some(process);
        self.api.base = base;
        // The server prints the line when it serves; a freshly elected single-node group may still need a moment:
        // wait (bounded) for /readyz like a load balancer would. If it never gets ready, go on: the ops tests say so.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(r) = self
                .api
                .http
                .get(format!("{}/readyz", self.api.base))
                .send()
                .await
            {
                // keep waiting only while it says 503 (no leader yet)
                if r.status().as_u16() != 503 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }

    /// SIGKILL the process and reap it. The data directory stays.
    pub fn kill9(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Waits (≤ `within`) for the process to exit on its own (a crash point firing, or an I/O error
    /// stopping it), and reaps it.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let process = self.process.as_mut()?;
            if let Some(status) = process.try_wait().expect("try_wait") {
                self.process = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Options for the next (re)start.
    pub fn opts_mut(&mut self) -> &mut Opts {
        &mut self.opts
    }

    /// Stop (gracefully if running) and start again on the same data directory; the port may change.
    pub async fn restart(&mut self) {
        if self.process.is_some() {
            let st = self.sigterm_and_wait().await;
            assert!(
                st.success(),
                "server did not exit cleanly on SIGTERM: {st:?}"
            );
        }
        self.spawn().await;
    }

    /// Send SIGTERM and wait (≤ 20 s) for the process to exit.
    pub async fn sigterm_and_wait(&mut self) -> ExitStatus {
        let mut process = self.process.take().expect("server not running");
        tokio::task::spawn_blocking(move || process.terminate(SIGTERM_TIMEOUT))
            .await
            .expect("SIGTERM thread")
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Deref for Server {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- server logs ({}) ----\n{}",
                self.dir.path().display(),
                tail(&self.logs(), 80)
            );
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How long a (re)started server has to print its listening line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server has to exit after SIGTERM.
const SIGTERM_TIMEOUT: Duration = Duration::from_secs(20);

/// The `shopkeep serve` launch of one run: a kernel-picked port, `opts`' flags and environment.
fn launch(data: &Path, opts: &Opts, out_log: &Path, err_log: &Path) -> Launch {
    let mut launch = Launch::new(data, "127.0.0.1:0", out_log, err_log);
    if let Some(n) = opts.shards {
        launch = launch.arg("--shards").arg(n.to_string());
    }
    if let Some(d) = &opts.order_ttl {
        launch = launch.arg("--order-ttl").arg(d);
    }
    if let Some(d) = &opts.topup_ttl {
        launch = launch.arg("--topup-ttl").arg(d);
    }
    if let Some(d) = &opts.idempotency_ttl {
        launch = launch.arg("--idempotency-ttl").arg(d);
    }
    if let Some(d) = &opts.sweep_interval {
        launch = launch.arg("--sweep-interval").arg(d);
    }
    if let Some(n) = opts.max_pending_orders {
        launch = launch.arg("--max-pending-orders").arg(n.to_string());
    }
    if !opts.no_admin_token {
        launch = launch.env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN);
    }
    launch
        .env("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN)
        .env("SHOPKEEP_PSP_SECRET", PSP_SECRET)
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
}

// ------------------------------------------------------------------------------------------------
// HTTP client
// ------------------------------------------------------------------------------------------------

/// Who calls.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Admin,
    Service,
    /// A bearer token (e.g. a user token).
    Bearer(String),
    /// The whole `Authorization` header value.
    Raw(String),
}

impl Auth {
    pub fn user(token: &str) -> Auth {
        Auth::Bearer(token.to_string())
    }
    fn header(&self) -> Option<String> {
        match self {
            Auth::None => None,
            Auth::Admin => Some(format!("Bearer {ADMIN_TOKEN}")),
            Auth::Service => Some(format!("Bearer {SERVICE_TOKEN}")),
            Auth::Bearer(t) => Some(format!("Bearer {t}")),
            Auth::Raw(v) => Some(v.clone()),
        }
    }
}

/// A response: status, headers, raw body.
#[derive(Clone)]
pub struct Resp {
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl fmt::Debug for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = body.chars().take(1500).collect();
        write!(
            f,
            "{} {} -> {} {}",
            self.method, self.path, self.status, body
        )
    }
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        match serde_json::from_slice(&self.body) {
            Ok(v) => v,
            Err(e) => panic!("response is not JSON ({e}): {self:?}"),
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed")
            .map(|v| v.eq_ignore_ascii_case("true"))
            .unwrap_or(false)
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The error code, if the body has the error shape.
    pub fn code(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v.pointer("/error/code")?.as_str().map(str::to_string)
    }

    /// Assert the status and return the JSON body.
    #[track_caller]
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "unexpected status: {self:?}");
        self.json()
    }

    /// Assert the status, the error shape `{"error":{"code","message","details"}}` and the code; return the error.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(
            (self.status, self.code().as_deref()),
            (status, Some(code)),
            "expected {status} `{code}`, got: {self:?}"
        );
        let v = self.json();
        assert_error_shape(&v, self);
        v["error"].clone()
    }
}

#[track_caller]
pub fn assert_error_shape(v: &Value, ctx: &Resp) {
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("no `error` object: {ctx:?}"));
    assert!(e.is_object(), "`error` is not an object: {ctx:?}");
    assert!(e["code"].is_string(), "error.code is not a string: {ctx:?}");
    assert!(
        e["message"].is_string(),
        "error.message is not a string: {ctx:?}"
    );
    assert!(
        e.get("details")
            .is_some_and(|d| d.is_object() || d.is_null()),
        "error.details missing or not an object: {ctx:?}"
    );
}

/// One HTTP request under construction.
pub struct Call {
    api: Api,
    method: Method,
    path: String,
    auth: Auth,
    key: Option<String>,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Call {
    pub fn auth(mut self, a: Auth) -> Self {
        self.auth = a;
        self
    }
    /// Set the `Idempotency-Key` header.
    pub fn key(mut self, k: &str) -> Self {
        self.key = Some(k.to_string());
        self
    }
    /// Set a fresh `Idempotency-Key`.
    pub fn fresh_key(self) -> Self {
        self.key(&new_key())
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn json(mut self, v: &Value) -> Self {
        self.body = Some(serde_json::to_vec(v).unwrap());
        self.headers
            .push(("content-type".into(), "application/json".into()));
        self
    }
    /// A raw body with no `Content-Type` (add one with [`Call::header`]).
    pub fn body_bytes(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.body = Some(bytes.into());
        self
    }
    /// A raw body sent as `application/json`.
    pub fn raw(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.body = Some(bytes.into());
        self.headers
            .push(("content-type".into(), "application/json".into()));
        self
    }
    pub async fn try_send(self) -> Result<Resp, reqwest::Error> {
        let url = format!("{}{}", self.api.base, self.path);
        let mut rb = self.api.http.request(self.method.clone(), url);
        if let Some(h) = self.auth.header() {
            rb = rb.header("authorization", h);
        }
        if let Some(k) = &self.key {
            rb = rb.header("idempotency-key", k.as_str());
        }
        for (k, v) in &self.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some(b) = self.body {
            // Oversized bodies go on a connection of their own: a server may close the connection after an early
            // 413, and a pooled reuse would then fail the *next* request. (http_bad_input tests that separately.)
            if b.len() > 64 * 1024 {
                rb = rb.header("connection", "close");
            }
            rb = rb.body(b);
        }
        let r = rb.send().await?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await?.to_vec();
        Ok(Resp {
            method: self.method,
            path: self.path,
            status,
            headers,
            body,
        })
    }
    pub async fn send(self) -> Resp {
        let what = format!("{} {}", self.method, self.path);
        match self.try_send().await {
            Ok(r) => r,
            Err(e) => panic!("{what}: transport error: {e:?}"),
        }
    }
}

/// A cloneable client bound to one server address.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

/// A wallet read, in minor units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wallet {
    pub balance: i64,
    pub held: i64,
    pub available: i64,
}

impl Api {
    pub fn call(&self, method: Method, path: &str) -> Call {
        Call {
            api: self.clone(),
            method,
            path: path.to_string(),
            auth: Auth::None,
            key: None,
            headers: vec![],
            body: None,
        }
    }

    pub async fn get(&self, path: &str, auth: Auth) -> Resp {
        self.call(Method::GET, path).auth(auth).send().await
    }

    /// POST with a fresh idempotency key.
    pub async fn post(&self, path: &str, auth: Auth, body: &Value) -> Resp {
        self.post_key(path, auth, &new_key(), body).await
    }

    pub async fn post_key(&self, path: &str, auth: Auth, key: &str, body: &Value) -> Resp {
        self.call(Method::POST, path)
            .auth(auth)
            .key(key)
            .json(body)
            .send()
            .await
    }

    pub async fn put(&self, path: &str, auth: Auth, body: &Value) -> Resp {
        self.call(Method::PUT, path)
            .auth(auth)
            .json(body)
            .send()
            .await
    }

    // ---- domain helpers ----------------------------------------------------------------------

    pub async fn create_user(&self, user_id: &str) -> Value {
        self.post("/v1/users", Auth::Service, &json!({"user_id": user_id}))
            .await
            .expect(201)
    }

    /// A new user with `amount` credited (if non-zero).
    pub async fn funded_user(&self, user_id: &str, amount: &str) -> Value {
        let u = self.create_user(user_id).await;
        if cents(amount) > 0 {
            self.credit(user_id, amount).await;
        }
        u
    }

    pub async fn put_item(&self, item_id: &str, body: &Value) -> Resp {
        self.put(&format!("/v1/items/{item_id}"), Auth::Admin, body)
            .await
    }

    /// Create (or replace) an active item with the default refund window.
    pub async fn create_item(&self, item_id: &str, kind: &str, price: &str) -> Value {
        self.put_item(
            item_id,
            &json!({"name": format!("Item {item_id}"), "kind": kind, "price": price, "active": true}),
        )
        .await
        .expect(200)
    }

    pub async fn create_item_window(
        &self,
        item_id: &str,
        kind: &str,
        price: &str,
        days: u32,
    ) -> Value {
        self.put_item(
            item_id,
            &json!({"name": format!("Item {item_id}"), "kind": kind, "price": price, "active": true,
                    "refund_window_days": days}),
        )
        .await
        .expect(200)
    }

    /// Direct credit (service) with a unique `external_ref`; asserts 201.
    pub async fn credit(&self, user_id: &str, amount: &str) -> Value {
        self.post(
            &format!("/v1/users/{user_id}/credits"),
            Auth::Service,
            &json!({"amount": amount, "external_ref": format!("ext-{}", new_key()), "source": "card"}),
        )
        .await
        .expect(201)
    }

    /// [`Api::credit`] that retries a 503 (`unavailable`: a leader that could not confirm its quorum in
    /// time, as a loaded machine can make it) with the same key and body, up to 20 times; asserts 201.
    pub async fn credit_retrying_unavailable(&self, user_id: &str, amount: &str) -> Value {
        let key = new_key();
        let body =
            json!({"amount": amount, "external_ref": format!("ext-{key}"), "source": "card"});
        let path = format!("/v1/users/{user_id}/credits");
        for _ in 0..20 {
            let response = self.post_key(&path, Auth::Service, &key, &body).await;
            if response.status != 503 {
                return response.expect(201);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("POST {path}: still 503 after 20 attempts");
    }

    pub async fn create_order_as(
        &self,
        user_id: &str,
        auth: Auth,
        lines: &[(&str, u32)],
        complete: bool,
    ) -> Resp {
        self.post(
            &format!("/v1/users/{user_id}/orders"),
            auth,
            &order_body(lines, complete),
        )
        .await
    }

    /// Create an order as the service; returns the raw response.
    pub async fn create_order(&self, user_id: &str, lines: &[(&str, u32)], complete: bool) -> Resp {
        self.create_order_as(user_id, Auth::Service, lines, complete)
            .await
    }

    /// Sends `n` identical orders for `user_id` at once, each with its own key; the responses.
    pub async fn concurrent_orders(
        &self,
        user_id: &str,
        lines: &[(&str, u32)],
        complete: bool,
        n: usize,
    ) -> Vec<Resp> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (api, user) = (self.clone(), user_id.to_owned());
                let lines: Vec<(String, u32)> =
                    lines.iter().map(|(i, q)| (i.to_string(), *q)).collect();
                tokio::spawn(async move {
                    let lines: Vec<(&str, u32)> =
                        lines.iter().map(|(i, q)| (i.as_str(), *q)).collect();
                    api.create_order(&user, &lines, complete).await
                })
            })
            .collect();
        let mut responses = Vec::with_capacity(n);
        for task in tasks {
            responses.push(task.await.expect("order task"));
        }
        responses
    }

    /// Create an order as the service; asserts 201 and returns it.
    pub async fn order(&self, user_id: &str, lines: &[(&str, u32)], complete: bool) -> Value {
        self.create_order(user_id, lines, complete)
            .await
            .expect(201)
    }

    pub async fn complete_order(&self, user_id: &str, order_id: &str, auth: Auth) -> Resp {
        self.post(
            &format!("/v1/users/{user_id}/orders/{order_id}/complete"),
            auth,
            &json!({}),
        )
        .await
    }

    pub async fn cancel_order(&self, user_id: &str, order_id: &str, auth: Auth) -> Resp {
        self.post(
            &format!("/v1/users/{user_id}/orders/{order_id}/cancel"),
            auth,
            &json!({}),
        )
        .await
    }

    pub async fn get_order(&self, user_id: &str, order_id: &str) -> Value {
        self.get(
            &format!("/v1/users/{user_id}/orders/{order_id}"),
            Auth::Service,
        )
        .await
        .expect(200)
    }

    pub async fn refund(&self, user_id: &str, order_id: &str, auth: Auth, body: &Value) -> Resp {
        self.post(
            &format!("/v1/users/{user_id}/orders/{order_id}/refunds"),
            auth,
            body,
        )
        .await
    }

    pub async fn consume(&self, user_id: &str, item_id: &str, auth: Auth, quantity: Value) -> Resp {
        self.post(
            &format!("/v1/users/{user_id}/entitlements/{item_id}/consume"),
            auth,
            &json!({"quantity": quantity}),
        )
        .await
    }

    /// The wallet in minor units; asserts the shape and `available = balance - held`, `0 <= held <= balance`.
    pub async fn wallet(&self, user_id: &str) -> Wallet {
        let w = self
            .get(&format!("/v1/users/{user_id}/wallet"), Auth::Service)
            .await
            .expect(200);
        wallet_of(&w)
    }

    /// A user token (service mints it), default TTL.
    pub async fn user_token(&self, user_id: &str) -> String {
        let v = self
            .post(
                &format!("/v1/users/{user_id}/tokens"),
                Auth::Service,
                &json!({"ttl_seconds": 3600}),
            )
            .await
            .expect(201);
        v["token"].as_str().expect("token string").to_string()
    }

    /// Every order of a user, following `next_cursor` (service).
    pub async fn all_orders(&self, user_id: &str, query: &str) -> Vec<Value> {
        let mut out = vec![];
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let mut q = format!(
                "limit=100{}",
                if query.is_empty() {
                    String::new()
                } else {
                    format!("&{query}")
                }
            );
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={}", urlenc(c)));
            }
            let v = self
                .get(&format!("/v1/users/{user_id}/orders?{q}"), Auth::Service)
                .await
                .expect(200);
            out.extend(
                v["orders"]
                    .as_array()
                    .expect("orders array")
                    .iter()
                    .cloned(),
            );
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
        panic!("orders paging never ended");
    }

    /// Every ledger entry of a user, following `next_cursor`.
    pub async fn all_ledger(&self, user_id: &str) -> Vec<Value> {
        let mut out = vec![];
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let mut q = "limit=100".to_string();
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={}", urlenc(c)));
            }
            let v = self
                .get(&format!("/v1/users/{user_id}/ledger?{q}"), Auth::Service)
                .await
                .expect(200);
            out.extend(
                v["entries"]
                    .as_array()
                    .expect("entries array")
                    .iter()
                    .cloned(),
            );
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
        panic!("ledger paging never ended");
    }

    pub async fn entitlements(&self, user_id: &str) -> Vec<Value> {
        let v = self
            .get(&format!("/v1/users/{user_id}/entitlements"), Auth::Service)
            .await
            .expect(200);
        v["entitlements"]
            .as_array()
            .expect("entitlements array")
            .clone()
    }

    /// Quantity of one entitlement (0 if the row is absent).
    pub async fn entitlement_qty(&self, user_id: &str, item_id: &str) -> i64 {
        self.entitlements(user_id)
            .await
            .iter()
            .find(|e| e["item_id"] == item_id)
            .map(|e| e["quantity"].as_i64().expect("quantity integer"))
            .unwrap_or(0)
    }

    /// `GET /v1/admin/audit`, asserting `ok: true` and no violations.
    pub async fn audit_ok(&self) -> Value {
        let v = self.get("/v1/admin/audit", Auth::Admin).await.expect(200);
        assert_eq!(v["ok"], json!(true), "audit not ok: {v:#}");
        for s in v["shards"].as_array().expect("shards array") {
            assert_eq!(
                s["violations"].as_array().map(|a| a.len()),
                Some(0),
                "violations: {v:#}"
            );
        }
        v
    }

    pub async fn topup(&self, user_id: &str, amount: &str) -> Value {
        self.post(
            &format!("/v1/users/{user_id}/topups"),
            Auth::Service,
            &json!({"amount": amount}),
        )
        .await
        .expect(201)
    }

    /// Deliver a webhook event signed now with the right secret.
    pub async fn webhook(&self, event: &Value) -> Resp {
        let body = serde_json::to_vec(event).unwrap();
        let sig = sign_webhook(PSP_SECRET, now_unix(), &body);
        self.webhook_raw(body, Some(&sig)).await
    }

    pub async fn webhook_raw(&self, body: Vec<u8>, signature: Option<&str>) -> Resp {
        let mut c = self.call(Method::POST, "/v1/psp/webhook").raw(body);
        if let Some(s) = signature {
            c = c.header("psp-signature", s);
        }
        c.send().await
    }
}

// ------------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------------

pub fn order_body(lines: &[(&str, u32)], complete: bool) -> Value {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(i, q)| json!({"item_id": i, "quantity": q}))
        .collect();
    json!({"lines": lines, "complete": complete})
}

/// A fresh idempotency key (UUIDv7).
/// How many responses are 201; asserts that every other one is the error `status` / `code`.
pub fn created_else_error(responses: &[Resp], status: u16, code: &str) -> usize {
    let mut created = 0;
    for response in responses {
        if response.status == 201 {
            created += 1;
        } else {
            response.expect_error(status, code);
        }
    }
    created
}

pub fn new_key() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A unique identifier with a readable prefix, valid as a user_id / item_id.
pub fn uniq(prefix: &str) -> String {
    let s = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}-{}", &s[20..])
}

/// The `x-shopkeep-node-auth` header a member holding `cluster_secret` sends with `method path body`.
pub fn node_auth(cluster_secret: &str, method: &str, path: &str, body: &[u8]) -> String {
    use shopkeep::secrets::{KeyPurpose, derive_key};
    // Node id 0 is no member's: the test signs as an outsider that knows the secret.
    shopkeep_raft::auth::NodeAuth::new(derive_key(cluster_secret, KeyPurpose::NodeAuth), 0)
        .sign(method, path, body)
}

/// `Psp-Signature` header value: `t=<t>,v1=<hex hmac-sha256(secret, "<t>.<body>")>`.
pub fn sign_webhook(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let sig = hex::encode(mac.finalize().into_bytes());
    format!("t={t},v1={sig}")
}

pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Parse a money string strictly (`-?digits.two-digits`) into minor units.
#[track_caller]
pub fn cents(s: &str) -> i64 {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (int, frac) = body
        .split_once('.')
        .unwrap_or_else(|| panic!("money {s:?} is not a decimal string with 2 places"));
    assert!(
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.len() == 2
            && frac.bytes().all(|b| b.is_ascii_digit()),
        "money {s:?} is not a decimal string with 2 places"
    );
    let v = int.parse::<i64>().unwrap() * 100 + frac.parse::<i64>().unwrap();
    if neg { -v } else { v }
}

/// Money value of a JSON field (must be a string).
#[track_caller]
pub fn money_of(v: &Value) -> i64 {
    cents(
        v.as_str()
            .unwrap_or_else(|| panic!("money is not a string: {v}")),
    )
}

pub fn money(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", c.abs() / 100, c.abs() % 100)
}

#[track_caller]
pub fn wallet_of(w: &Value) -> Wallet {
    assert_eq!(w["currency"], "EUR", "wallet currency: {w}");
    let wallet = Wallet {
        balance: money_of(&w["balance"]),
        held: money_of(&w["held"]),
        available: money_of(&w["available"]),
    };
    assert_eq!(
        wallet.available,
        wallet.balance - wallet.held,
        "available != balance - held: {w}"
    );
    assert!(
        wallet.balance >= 0 && wallet.held >= 0 && wallet.held <= wallet.balance,
        "wallet invariants: {w}"
    );
    wallet
}

#[track_caller]
pub fn ts(v: &Value) -> OffsetDateTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {v}"));
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .unwrap_or_else(|e| panic!("timestamp {s:?} is not RFC 3339: {e}"));
    assert!(t.offset().is_utc(), "timestamp {s:?} is not UTC");
    t
}

#[track_caller]
pub fn assert_uuid_v7(v: &Value) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("id is not a string: {v}"));
    let u = uuid::Uuid::parse_str(s).unwrap_or_else(|e| panic!("id {s:?} is not a UUID: {e}"));
    assert_eq!(u.get_version_num(), 7, "id {s:?} is not a UUIDv7");
}

pub fn urlenc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sleep until the wall clock has passed `t` (plus a margin).
pub async fn sleep_until(t: OffsetDateTime, margin: Duration) {
    let now = OffsetDateTime::now_utc();
    if t > now {
        let d: Duration = (t - now).try_into().unwrap_or_default();
        tokio::time::sleep(d + margin).await;
    } else {
        tokio::time::sleep(margin).await;
    }
}

/// Poll `f` until it returns `Some`, at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Assert that `actual` contains `expected`: objects may carry extra fields (API.md: "add fields freely"),
/// arrays must have the same length, scalars must be equal.
#[track_caller]
pub fn assert_includes(actual: &Value, expected: &Value) {
    fn walk(a: &Value, e: &Value, path: &str, errs: &mut Vec<String>) {
        match (a, e) {
            (Value::Object(ao), Value::Object(eo)) => {
                for (k, ev) in eo {
                    match ao.get(k) {
                        Some(av) => walk(av, ev, &format!("{path}.{k}"), errs),
                        None => errs.push(format!("{path}.{k}: missing (expected {ev})")),
                    }
                }
            }
            (Value::Array(aa), Value::Array(ea)) => {
                if aa.len() != ea.len() {
                    errs.push(format!(
                        "{path}: {} elements, expected {}",
                        aa.len(),
                        ea.len()
                    ));
                } else {
                    for (i, (av, ev)) in aa.iter().zip(ea).enumerate() {
                        walk(av, ev, &format!("{path}[{i}]"), errs);
                    }
                }
            }
            _ => {
                if a != e {
                    errs.push(format!("{path}: got {a}, expected {e}"));
                }
            }
        }
    }
    let mut errs = vec![];
    walk(actual, expected, "$", &mut errs);
    assert!(
        errs.is_empty(),
        "JSON mismatch:\n  {}\nin {actual}",
        errs.join("\n  ")
    );
}
