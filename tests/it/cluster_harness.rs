//! Black-box cluster harness: N real `shopkeep serve` processes replicating through openraft, with every
//! node-to-node link going through an in-test TCP proxy that the test can cut (partitions) and heal.
//!
//! Topology: node i's `--peers` gives, for every j != i, the address of proxy(i→j) (which forwards to node j's
//! real port) and, for itself, its real address. Clients (the tests) always talk to a node's real port.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::harness::*;
use crate::launcher::{LISTENING, Launch, Process};

pub const CLUSTER_SECRET: &str = "it-cluster-secret-7e6d5c4b3a291807";

/// Longest the harness waits for a cluster (or a restarted node) to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a node has to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// Options
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub nodes: u64,
    pub shards: u32,
    pub heartbeat: String,
    pub election_timeout: String,
    pub request_timeout: String,
    pub snapshot_every: Option<u64>,
    pub snapshot_log_percent: Option<u32>,
    /// Per-node environment overrides (node id, name, value), applied after the common secrets.
    pub node_env: Vec<(u64, String, String)>,
    /// Nodes whose `/readyz` must be 200 before `start_with` returns (None: all of them).
    pub wait_ready: Option<Vec<u64>>,
    /// Nodes whose data directory is a link to this directory (e.g. a small file system).
    pub data_dirs: Vec<(u64, PathBuf)>,
    /// Nodes cut off from every other before any starts (`TestCluster::heal` joins them).
    pub isolated_at_start: Vec<u64>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            nodes: 3,
            shards: 4,
            heartbeat: "50ms".into(),
            election_timeout: "400ms".into(),
            request_timeout: "5s".into(),
            snapshot_every: None,
            snapshot_log_percent: None,
            node_env: vec![],
            wait_ready: None,
            data_dirs: Vec::new(),
            isolated_at_start: Vec::new(),
        }
    }
}

impl ClusterOpts {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn nodes(mut self, n: u64) -> Self {
        self.nodes = n;
        self
    }
    pub fn shards(mut self, n: u32) -> Self {
        self.shards = n;
        self
    }
    /// Snapshots every `n` entries, by entries alone (`--snapshot-log-percent 0`) unless
    /// `snapshot_log_percent` says otherwise: what a test that counts on snapshots wants.
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.snapshot_every = Some(n);
        self.snapshot_log_percent.get_or_insert(0);
        self
    }
    pub fn snapshot_log_percent(mut self, percent: u32) -> Self {
        self.snapshot_log_percent = Some(percent);
        self
    }
    pub fn node_env(mut self, node: u64, k: &str, v: &str) -> Self {
        self.node_env.push((node, k.to_string(), v.to_string()));
        self
    }
    pub fn data_dir_on(mut self, node: u64, dir: &std::path::Path) -> Self {
        self.data_dirs.push((node, dir.to_path_buf()));
        self
    }
    pub fn isolated_at_start(mut self, node: u64) -> Self {
        self.isolated_at_start.push(node);
        self
    }
    pub fn wait_ready(mut self, nodes: &[u64]) -> Self {
        self.wait_ready = Some(nodes.to_vec());
        self
    }
    /// The request timeout as a Duration (the flag's value, `Ns` or `Nms`).
    pub fn request_timeout_duration(&self) -> Duration {
        parse_short_duration(&self.request_timeout)
    }
}

fn parse_short_duration(s: &str) -> Duration {
    if let Some(ms) = s.strip_suffix("ms") {
        Duration::from_millis(ms.parse().expect("duration ms"))
    } else if let Some(sec) = s.strip_suffix('s') {
        Duration::from_secs(sec.parse().expect("duration s"))
    } else {
        panic!("unsupported duration {s:?}")
    }
}

fn cluster_http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(64)
        // The nodes close connections idle for their header-read timeout (30 s by default).
        .pool_idle_timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// A free loopback port for a node, released at once (the node binds it, and binds it again on a restart).
///
/// Picked below the kernel's ephemeral range: a port taken from that range (bind to port 0) could be handed to
/// some outgoing connection while a killed node is down, and its restart would then fail to bind. Below the
/// range only explicit binds compete; the probe bind checks nobody holds it, and a process-wide set keeps two
/// clusters of this test binary from picking the same one.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok())
        })
        .unwrap_or(32768)
        .clamp(12000, 65535);
    let (from, span) = (low - 10000, 10000u32);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 32);
    let mut handed_out = HANDED_OUT.lock().unwrap();
    for _ in 0..1000 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = (from + ((seed >> 33) as u32 % span)) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    // fall back to the kernel's choice
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().unwrap().port()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ------------------------------------------------------------------------------------------------
// One node
// ------------------------------------------------------------------------------------------------

/// One `shopkeep serve --node-id N` process (its data dir and logs survive restarts). Derefs to its [`Api`].
pub struct ClusterNode {
    pub id: u64,
    /// The node's real HTTP port (clients talk to it; proxies forward to it).
    pub port: u16,
    dir: TempDir,
    args: Vec<String>,
    env: Vec<(String, String)>,
    process: Option<Process>,
    runs: usize,
    api: Api,
    /// Extra environment for the next starts only (see [`ClusterNode::set_run_env`]).
    run_env: Vec<(String, String)>,
    /// Stopped with SIGSTOP (see [`ClusterNode::pause`]).
    paused: bool,
}

impl ClusterNode {
    fn new(id: u64, port: u16, args: Vec<String>, env: Vec<(String, String)>) -> ClusterNode {
        let dir = tempfile::Builder::new()
            .prefix(&format!("shopkeep-cluster-n{id}-"))
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        ClusterNode {
            id,
            port,
            dir,
            args,
            env,
            process: None,
            runs: 0,
            api: Api {
                base: format!("http://127.0.0.1:{port}"),
                http: cluster_http_client(),
            },
            run_env: vec![],
            paused: false,
        }
    }

    pub fn api(&self) -> Api {
        self.api.clone()
    }

    /// `127.0.0.1:PORT`, the node's real address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    fn log_paths(&self, run: usize) -> (PathBuf, PathBuf) {
        crate::harness::run_log_paths(self.dir.path(), run)
    }

    /// All stdout + stderr the node printed, over every run.
    pub fn logs(&self) -> String {
        crate::harness::collect_run_logs(self.dir.path(), self.runs, &format!("node {} ", self.id))
    }

    /// Start the process (not waiting for anything).
    fn spawn(&mut self) {
        assert!(self.process.is_none(), "node {} already running", self.id);
        self.runs += 1;
        let (out_log, err_log) = self.log_paths(self.runs);
        let log_filter = std::env::var("SHOPKEEP_IT_RUST_LOG")
            .unwrap_or_else(|_| "warn,shopkeep=info,shopkeep_raft=info".to_string());
        let process = Launch::new(&self.data_dir(), &self.addr(), &out_log, &err_log)
            .args(&self.args)
            .env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN)
            .env("SHOPKEEP_PSP_SECRET", PSP_SECRET)
            .env("SHOPKEEP_CLUSTER_SECRET", CLUSTER_SECRET)
            .env("RUST_LOG", log_filter)
            .envs(self.env.iter().chain(&self.run_env).map(|(k, v)| (k, v)))
            .spawn()
            .expect("spawn shopkeep");
        self.process = Some(process);
        // A fresh client: no pooled connection to a previous incarnation survives.
        self.api.http = cluster_http_client();
    }

    /// Wait (≤ 30 s) until the process printed `shopkeep listening on http://…`; `Err` if it exited first
    /// (it is then reaped) or never did (it is left running).
    async fn listened(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let process = self.process.as_mut().expect("node started");
            match process.poll_listening() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => {}
                Err(e) => {
                    self.process = None;
                    self.paused = false;
                    return Err(format!("node {} {}", self.id, e.reason()));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {} did not print `{LISTENING}http://…` within {READY_TIMEOUT:?}",
                    self.id
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`listened`](Self::listened), panicking on an error (with the logs' tails if it still runs).
    async fn wait_listening(&mut self) {
        if let Err(e) = self.listened().await {
            let tails = self
                .process
                .as_ref()
                .map(Process::log_tails)
                .unwrap_or_default();
            panic!("{e}\n{tails}");
        }
    }

    /// SIGKILL the process and reap it. The data directory stays.
    pub fn kill9(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
        self.paused = false;
    }

    /// SIGTERM the process and wait (≤ 20 s) for it to exit cleanly; the data directory stays.
    pub async fn stop(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        let status = tokio::task::spawn_blocking(move || process.terminate(STOP_TIMEOUT))
            .await
            .expect("SIGTERM thread")
            .unwrap_or_else(|e| panic!("node did not stop within 20 s: {e}"));
        assert!(status.success(), "node did not stop cleanly: {status}");
    }

    /// Extra environment (e.g. `FAILPOINTS`) for the next starts, until set again (empty: none).
    pub fn set_run_env(&mut self, env: Vec<(String, String)>) {
        self.run_env = env;
    }

    /// Freeze the process (SIGSTOP): it holds its sockets but answers nothing until [`resume`](Self::resume).
    pub fn pause(&mut self) {
        if let Some(process) = &self.process {
            process.signal("STOP").expect("kill -STOP");
            self.paused = true;
        }
    }

    /// Let a paused process go on (SIGCONT).
    pub fn resume(&mut self) {
        if let Some(process) = &self.process {
            process.signal("CONT").expect("kill -CONT");
        }
        self.paused = false;
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// If the process has exited by itself (e.g. a crash point aborted it), reap it and return its status.
    pub fn try_exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.process.as_mut()?.try_wait().ok().flatten()?;
        self.process = None;
        self.paused = false;
        Some(st)
    }

    /// Start the process again (it must be stopped) and wait until it listens; `Err` (instead of a panic)
    /// if it exits first or does not listen within 30 s.
    pub async fn try_start(&mut self) -> Result<(), String> {
        assert!(
            self.process.is_none(),
            "try_start: node {} is running",
            self.id
        );
        self.spawn();
        self.listened().await
    }

    /// Start again (after [`kill9`](Self::kill9)) with the same id, ports, flags and data dir; waits until it
    /// listens (not until it is ready: see [`TestCluster::wait_ready`]).
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_listening().await;
    }

    /// Delete everything in the data directory (the node must be stopped).
    pub fn wipe_data_dir(&mut self) {
        assert!(
            self.process.is_none(),
            "wipe_data_dir: node {} is running",
            self.id
        );
        let d = self.data_dir();
        if d.is_symlink() {
            // a file system of its own (see `ClusterOpts::data_dir_on`): empty it, keep the link
            for entry in std::fs::read_dir(&d).expect("read data dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).expect("remove from data dir");
                } else {
                    std::fs::remove_file(&path).expect("remove from data dir");
                }
            }
            return;
        }
        std::fs::remove_dir_all(&d).expect("remove data dir");
        std::fs::create_dir_all(&d).expect("recreate data dir");
    }

    /// `GET /readyz` → status (None on a transport error / timeout).
    pub async fn readyz(&self) -> Option<u16> {
        match tokio::time::timeout(
            Duration::from_secs(3),
            self.api.call(Method::GET, "/readyz").try_send(),
        )
        .await
        {
            Ok(Ok(r)) => Some(r.status),
            _ => None,
        }
    }

    /// `GET /v1/cluster` (admin) → the cluster view, or None if it does not answer 200 within 3 s.
    pub async fn try_view(&self) -> Option<Value> {
        match tokio::time::timeout(
            Duration::from_secs(3),
            self.api
                .call(Method::GET, "/v1/cluster")
                .auth(Auth::Admin)
                .try_send(),
        )
        .await
        {
            Ok(Ok(r)) if r.status == 200 => Some(r.json()),
            _ => None,
        }
    }

    /// `GET /v1/cluster` (admin), asserting 200.
    pub async fn view(&self) -> Value {
        self.api.get("/v1/cluster", Auth::Admin).await.expect(200)
    }

    /// `GET /v1/admin/audit[?consistency=local]` → (ok, shard → state_hash), or None if not 200 within 10 s.
    pub async fn try_audit(&self, local: bool) -> Option<Value> {
        let path = if local {
            "/v1/admin/audit?consistency=local"
        } else {
            "/v1/admin/audit"
        };
        match tokio::time::timeout(
            Duration::from_secs(10),
            self.api
                .call(Method::GET, path)
                .auth(Auth::Admin)
                .try_send(),
        )
        .await
        {
            Ok(Ok(r)) if r.status == 200 => Some(r.json()),
            _ => None,
        }
    }

    /// The wallet of `user` as this node's replica has it now (`?consistency=local`), asserting 200.
    pub async fn local_wallet(&self, user: &str) -> Wallet {
        let w = self
            .api
            .get(
                &format!("/v1/users/{user}/wallet?consistency=local"),
                Auth::Service,
            )
            .await
            .expect(200);
        wallet_of(&w)
    }
}

impl Deref for ClusterNode {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Shard → state_hash of one audit answer (asserting `ok` and no violations).
#[track_caller]
pub fn hashes_of_audit(node: u64, v: &Value) -> BTreeMap<u64, String> {
    assert_eq!(v["ok"], json!(true), "node {node}: audit not ok: {v:#}");
    let mut out = BTreeMap::new();
    for s in v["shards"].as_array().expect("audit shards array") {
        assert_eq!(
            s["violations"].as_array().map(|a| a.len()),
            Some(0),
            "node {node}: violations: {v:#}"
        );
        let shard = s["shard"].as_u64().expect("audit shard number");
        let hash = s["state_hash"].as_str().expect("state_hash string");
        assert!(!hash.is_empty(), "node {node}: empty state_hash: {v:#}");
        out.insert(shard, hash.to_string());
    }
    assert!(!out.is_empty(), "node {node}: audit lists no shard: {v:#}");
    out
}

/// One shard's entry of a cluster view.
#[track_caller]
pub fn shard_view(view: &Value, shard: u64) -> Value {
    view["shards"]
        .as_array()
        .expect("view shards array")
        .iter()
        .find(|s| s["shard"].as_u64() == Some(shard))
        .unwrap_or_else(|| panic!("shard {shard} not in view {view:#}"))
        .clone()
}

/// Sorted ids of a JSON array of numbers (null/absent → empty).
pub fn ids_of(v: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = v
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

// ------------------------------------------------------------------------------------------------
// The proxies (one per ordered pair of nodes)
// ------------------------------------------------------------------------------------------------

struct ProxyShared {
    target: SocketAddr,
    /// Refuse new connections (accepted, then closed at once) while set.
    cut: AtomicBool,
    closed: AtomicBool,
    next_id: AtomicU64,
    /// Live connections: (client side, upstream side), so that a cut can close them.
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
}

/// A TCP forwarder `127.0.0.1:port` → `target` that can be cut and healed.
pub struct Proxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ProxyShared {
            target,
            cut: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                if sh.closed.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = incoming else { continue };
                if sh.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let sh = sh.clone();
                std::thread::spawn(move || Proxy::serve(sh, client));
            }
        });
        Proxy { port, shared }
    }

    fn serve(sh: Arc<ProxyShared>, client: TcpStream) {
        let Ok(upstream) = TcpStream::connect_timeout(&sh.target, Duration::from_secs(1)) else {
            return; // target down: the client sees its connection closed
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
        {
            let mut conns = sh.conns.lock().unwrap();
            // Checked under the lock that `cut` takes too: no connection slips past a cut.
            if sh.cut.load(Ordering::SeqCst) || sh.closed.load(Ordering::SeqCst) {
                return;
            }
            conns.insert(
                id,
                (
                    client.try_clone().expect("clone"),
                    upstream.try_clone().expect("clone"),
                ),
            );
        }
        let (c2, u2) = (
            client.try_clone().expect("clone"),
            upstream.try_clone().expect("clone"),
        );
        let t = std::thread::spawn(move || pump(c2, u2));
        pump(upstream, client);
        let _ = t.join();
        sh.conns.lock().unwrap().remove(&id);
    }

    /// Refuse new connections and close the live ones.
    pub fn cut(&self) {
        let mut conns = self.shared.conns.lock().unwrap();
        self.shared.cut.store(true, Ordering::SeqCst);
        for (_, (a, b)) in conns.drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }
}

/// Copy `from` → `to` until either side ends; then close both (HTTP peers never half-close).
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.cut();
        // wake the accept loop so that it sees `closed`
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_millis(200),
        );
    }
}

// ------------------------------------------------------------------------------------------------
// The cluster
// ------------------------------------------------------------------------------------------------

/// N nodes, every peer link through a proxy. Every process is SIGKILLed on drop; on a panic the logs of every
/// node are printed.
pub struct TestCluster {
    pub opts: ClusterOpts,
    nodes: BTreeMap<u64, ClusterNode>,
    proxies: BTreeMap<(u64, u64), Proxy>,
    /// Where the nodes' clock offset files are, when they run under libfaketime (the chaos suite).
    pub clock_dir: Option<PathBuf>,
}

impl TestCluster {
    pub async fn start(n: u64) -> TestCluster {
        Self::start_with(ClusterOpts::new().nodes(n)).await
    }

    pub async fn start_with(opts: ClusterOpts) -> TestCluster {
        let ids: Vec<u64> = (1..=opts.nodes).collect();
        let ports: BTreeMap<u64, u16> = ids.iter().map(|&i| (i, free_port())).collect();
        let mut c = TestCluster {
            clock_dir: None,
            opts: opts.clone(),
            nodes: BTreeMap::new(),
            proxies: BTreeMap::new(),
        };
        for &i in &ids {
            for &j in &ids {
                if i != j {
                    c.proxies.insert(
                        (i, j),
                        Proxy::start(SocketAddr::from(([127, 0, 0, 1], ports[&j]))),
                    );
                }
            }
        }
        for &i in &ids {
            let peers = c.peers_arg(i, &ports);
            let node = c.make_node(i, ports[&i], peers);
            c.nodes.insert(i, node);
        }
        for &n in &opts.isolated_at_start {
            c.isolate(n);
        }
        for node in c.nodes.values_mut() {
            node.spawn();
        }
        for node in c.nodes.values_mut() {
            node.wait_listening().await;
        }
        let wait: Vec<u64> = opts.wait_ready.clone().unwrap_or(ids);
        c.wait_ready(&wait, READY_TIMEOUT).await;
        c
    }

    /// `--peers` of node `i`: itself at its real address, every other node through proxy(i→j).
    fn peers_arg(&self, i: u64, ports: &BTreeMap<u64, u16>) -> String {
        ports
            .iter()
            .map(|(&j, &port)| {
                if j == i {
                    format!("{j}=127.0.0.1:{port}")
                } else {
                    format!("{j}=127.0.0.1:{}", self.proxies[&(i, j)].port)
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn make_node(&self, id: u64, port: u16, peers: String) -> ClusterNode {
        let o = &self.opts;
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            id.to_string(),
            "--peers".into(),
            peers,
            "--shards".into(),
            o.shards.to_string(),
            "--raft-heartbeat".into(),
            o.heartbeat.clone(),
            "--raft-election-timeout".into(),
            o.election_timeout.clone(),
            "--request-timeout".into(),
            o.request_timeout.clone(),
        ];
        if let Some(n) = o.snapshot_every {
            args.push("--snapshot-every".into());
            args.push(n.to_string());
        }
        if let Some(percent) = o.snapshot_log_percent {
            args.push("--snapshot-log-percent".into());
            args.push(percent.to_string());
        }
        let env = o
            .node_env
            .iter()
            .filter(|(n, _, _)| *n == id)
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect();
        let node = ClusterNode::new(id, port, args, env);
        if let Some((_, dir)) = o.data_dirs.iter().find(|(n, _)| *n == id) {
            std::fs::remove_dir(node.data_dir()).expect("empty data dir");
            std::os::unix::fs::symlink(dir, node.data_dir()).expect("link the data dir");
        }
        node
    }

    /// Start one more node (id = highest + 1) with `--peers` of every node (itself included, the others through
    /// new proxies). It only listens: adding it is the test's business (`POST /v1/admin/cluster/nodes`).
    pub async fn start_extra_node(&mut self) -> u64 {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        let port = free_port();
        let mut ports: BTreeMap<u64, u16> = self.nodes.iter().map(|(&i, n)| (i, n.port)).collect();
        ports.insert(id, port);
        for (&j, &p) in &ports {
            if j != id {
                self.proxies
                    .insert((id, j), Proxy::start(SocketAddr::from(([127, 0, 0, 1], p))));
            }
        }
        let peers = self.peers_arg(id, &ports);
        let mut node = self.make_node(id, port, peers);
        node.spawn();
        self.nodes.insert(id, node);
        self.node_mut(id).wait_listening().await;
        id
    }

    /// `POST /v1/admin/cluster/nodes` on node `via`, as the admin: add node `node` at its real address as a
    /// learner of every shard. The answer is the test's to check.
    pub async fn add_node(&self, via: u64, node: u64) -> Resp {
        self.api(via)
            .call(Method::POST, "/v1/admin/cluster/nodes")
            .auth(Auth::Admin)
            .fresh_key()
            .json(&json!({"node_id": node, "address": self.node(node).addr()}))
            .send()
            .await
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn running_ids(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.is_running())
            .map(|n| n.id)
            .collect()
    }

    #[track_caller]
    pub fn node(&self, id: u64) -> &ClusterNode {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    #[track_caller]
    pub fn node_mut(&mut self, id: u64) -> &mut ClusterNode {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn api(&self, id: u64) -> Api {
        self.node(id).api()
    }

    pub fn kill9(&mut self, id: u64) {
        self.node_mut(id).kill9();
    }

    /// Restart node `id` (same id, ports, flags, data dir); waits until it listens.
    pub async fn restart(&mut self, id: u64) {
        self.node_mut(id).restart().await;
    }

    pub fn wipe_data_dir(&mut self, id: u64) {
        self.node_mut(id).wipe_data_dir();
    }

    pub fn logs(&self, id: u64) -> String {
        self.node(id).logs()
    }

    /// The last `n` lines of every node's logs.
    pub fn all_logs(&self, n: usize) -> String {
        self.nodes
            .values()
            .map(|node| {
                format!(
                    "---- node {} ({}) ----\n{}\n",
                    node.id,
                    node.data_dir().display(),
                    tail(&node.logs(), n)
                )
            })
            .collect()
    }

    // ---- partitions ----------------------------------------------------------------------------

    /// Cut every link to and from node `n`.
    pub fn isolate(&self, n: u64) {
        for (&(i, j), p) in &self.proxies {
            if i == n || j == n {
                p.cut();
            }
        }
    }

    pub fn is_isolated(&self, n: u64) -> bool {
        self.proxies
            .iter()
            .any(|(&(i, j), p)| (i == n || j == n) && p.is_cut())
    }

    /// Cut the link node `from` calls node `to` over (its appends, votes and forwards to `to`, and their
    /// answers); `to`'s calls to `from` go on.
    pub fn cut_link(&self, from: u64, to: u64) {
        self.proxies
            .get(&(from, to))
            .unwrap_or_else(|| panic!("no link {from}→{to}"))
            .cut();
    }

    /// Heal every link.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    // ---- waiting -------------------------------------------------------------------------------

    /// Wait (≤ `timeout`) until node `id` answers `/readyz` with 503; panics with `what` otherwise.
    pub async fn wait_unready(&self, id: u64, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.node(id).readyz().await;
            if status == Some(503) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `/readyz` is 200 on every node of `ids`; panics with the logs of all nodes otherwise.
    pub async fn wait_ready(&self, ids: &[u64], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last: BTreeMap<u64, Option<u16>> = BTreeMap::new();
        loop {
            let mut all = true;
            for &id in ids {
                let st = self.node(id).readyz().await;
                last.insert(id, st);
                all &= st == Some(200);
            }
            if all {
                return;
            }
            if Instant::now() > deadline {
                panic!("nodes {ids:?} not ready within {timeout:?} (last /readyz: {last:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader of `shard` as agreed by the running, non-isolated nodes: a node that says it is the leader,
    /// with the highest term, and every one of those nodes names it. Polls ≤ 20 s; panics otherwise.
    pub async fn leader_of_shard(&self, shard: u64) -> u64 {
        let ids: Vec<u64> = self
            .running_ids()
            .into_iter()
            .filter(|&i| !self.is_isolated(i))
            .collect();
        self.leader_of_shard_among(shard, &ids).await
    }

    pub async fn leader_of_shard_among(&self, shard: u64, ids: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = vec![];
        loop {
            last.clear();
            let mut views = vec![];
            for &id in ids {
                match self.node(id).try_view().await {
                    Some(v) => {
                        let s = shard_view(&v, shard);
                        last.push((id, s.clone()));
                        views.push((id, s));
                    }
                    None => last.push((id, Value::Null)),
                }
            }
            if views.len() == ids.len() {
                let claim = views
                    .iter()
                    .filter(|(id, s)| s["role"] == "leader" && s["leader"].as_u64() == Some(*id))
                    .max_by_key(|(_, s)| s["term"].as_u64().unwrap_or(0))
                    .map(|(id, _)| *id);
                if let Some(l) = claim {
                    if views.iter().all(|(_, s)| s["leader"].as_u64() == Some(l)) {
                        return l;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no agreed leader of shard {shard} among nodes {ids:?} within 20 s: {last:#?}",
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /v1/cluster/route/{user_id}` on the first running node → (shard, leader).
    pub async fn route(&self, user_id: &str) -> (u64, Option<u64>) {
        let id = self.running_ids()[0];
        let v = self
            .node(id)
            .get(&format!("/v1/cluster/route/{user_id}"), Auth::Admin)
            .await
            .expect(200);
        assert_eq!(v["user_id"], user_id, "{v}");
        (
            v["shard"]
                .as_u64()
                .unwrap_or_else(|| panic!("route shard: {v}")),
            v["leader"].as_u64(),
        )
    }

    /// Per node of `ids`, shard → state_hash from `GET /v1/admin/audit` (linearizable unless `local`; retried
    /// ≤ 20 s while a node answers 503 e.g. during an election), asserting the audit is ok.
    pub async fn audit_hashes(
        &self,
        ids: &[u64],
        local: bool,
    ) -> BTreeMap<u64, BTreeMap<u64, String>> {
        let mut out = BTreeMap::new();
        for &id in ids {
            let deadline = Instant::now() + Duration::from_secs(20);
            let v = loop {
                if let Some(v) = self.node(id).try_audit(local).await {
                    break v;
                }
                if Instant::now() > deadline {
                    let r = self
                        .node(id)
                        .call(
                            Method::GET,
                            if local {
                                "/v1/admin/audit?consistency=local"
                            } else {
                                "/v1/admin/audit"
                            },
                        )
                        .auth(Auth::Admin)
                        .try_send()
                        .await;
                    panic!("node {id}: no 200 from the audit within 20 s (last: {r:?})");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            out.insert(id, hashes_of_audit(id, &v));
        }
        out
    }

    /// Wait (≤ `timeout`) until every node of `ids` reports the same local state hashes for every shard, then
    /// check it again with linearizable audits; returns shard → hash. The audits run one node after another,
    /// so a command committed between two of them (the sweeper's, say) makes them differ for a moment: both
    /// checks are repeated until the deadline. Panics with the hashes and logs otherwise.
    pub async fn wait_converged_among(
        &self,
        ids: &[u64],
        timeout: Duration,
    ) -> BTreeMap<u64, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut got = BTreeMap::new();
            for &id in ids {
                if let Some(v) = self.node(id).try_audit(true).await {
                    got.insert(id, hashes_of_audit(id, &v));
                }
            }
            let first = got.values().next().cloned();
            if got.len() == ids.len() && got.values().all(|h| Some(h) == first.as_ref()) {
                let hashes = self.audit_hashes(ids, false).await;
                let first = hashes.values().next();
                if hashes.values().all(|h| Some(h) == first) || Instant::now() > deadline {
                    assert_all_equal(&hashes);
                    return hashes.into_values().next().unwrap_or_default();
                }
            } else if Instant::now() > deadline {
                panic!(
                    "nodes {ids:?} did not converge within {timeout:?}; last local state hashes: {got:#?}",
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`wait_converged_among`](Self::wait_converged_among) over every running node.
    pub async fn wait_converged(&self, timeout: Duration) -> BTreeMap<u64, String> {
        let ids = self.running_ids();
        self.wait_converged_among(&ids, timeout).await
    }
}

/// Assert every node reports the same shard → hash map.
#[track_caller]
pub fn assert_all_equal(hashes: &BTreeMap<u64, BTreeMap<u64, String>>) {
    let mut it = hashes.iter();
    let Some((first_id, first)) = it.next() else {
        return;
    };
    for (id, h) in it {
        assert_eq!(
            h, first,
            "state hashes of node {id} differ from node {first_id}: {hashes:#?}"
        );
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            n.kill9();
        }
        if std::thread::panicking() {
            eprintln!("==== cluster logs ====\n{}", self.all_logs(120));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Client-side helpers for a cluster
// ------------------------------------------------------------------------------------------------

/// POST `body` to `path` with `key` until the answer is definite (not 5xx, no transport error), ≤ `timeout`.
/// Each attempt is bounded by 10 s. Panics with the last answer if it never is.
pub async fn post_until_definite(
    api: &Api,
    path: &str,
    key: &str,
    body: &Value,
    timeout: Duration,
) -> Resp {
    let deadline = Instant::now() + timeout;
    loop {
        let call = api
            .call(Method::POST, path)
            .auth(Auth::Service)
            .key(key)
            .json(body);
        let last = match tokio::time::timeout(Duration::from_secs(10), call.try_send()).await {
            Ok(Ok(r)) if r.status < 500 => return r,
            Ok(Ok(r)) => format!("{r:?}"),
            Ok(Err(e)) => format!("transport error: {e}"),
            Err(_) => "no answer within 10 s".to_string(),
        };
        if Instant::now() > deadline {
            panic!(
                "POST {path} (key {key}) never got a definite answer within {timeout:?}; last: {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
