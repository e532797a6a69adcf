//! The `shopkeep serve` processes under test: starting one node or a cluster on loopback, waiting for
//! their listening lines and `/readyz`, their peak memory, and stopping them (drop and Ctrl-C).

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use tempfile::TempDir;

use crate::interrupt::{forget_interrupt, on_interrupt};
use crate::launcher::{Launch, Process};
use crate::{ADMIN_TOKEN, SERVICE_TOKEN};

/// The shared node-to-node secret of the cluster mode.
pub(crate) const CLUSTER_SECRET: &str = "bench-cluster-secret-3f0c9a71d2b84e65";
/// How long to wait for the servers to print their listening lines.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait, after the listening lines, until `/readyz` is 200 on every node of a cluster.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One `shopkeep serve` process under test.
pub(crate) struct Node {
    pub(crate) id: u64,
    pub(crate) process: Process,
    pub(crate) base_url: String,
}

/// The `shopkeep serve` processes under test: one (single-node mode, no `--peers`) or the members of one
/// cluster. All are killed on drop, then their temporary directory (data dirs and logs) is removed.
pub(crate) struct Nodes {
    pub(crate) nodes: Vec<Node>,
    /// The Ctrl-C cleanup of these processes (0: none yet).
    interrupt: u64,
    // Dropped after `Drop::drop` has killed the processes, which removes the directory.
    dir: TempDir,
}

impl Nodes {
    /// `count` nodes, each with `--shards shards` when given (else the server's default).
    pub(crate) fn start(count: u64, shards: Option<u32>) -> Nodes {
        let clustered = count > 1;
        let dir = tempfile::Builder::new()
            .prefix(if clustered {
                "shopkeep-bench-cluster-"
            } else {
                "shopkeep-bench-"
            })
            .tempdir()
            .expect("cannot create a temporary data directory");
        let mut nodes = Nodes {
            nodes: Vec::new(),
            interrupt: 0,
            dir,
        };

        // Free loopback ports: all bound at once (so they differ), released right before the start.
        let (listens, peers) = if clustered {
            let listeners: Vec<TcpListener> = (0..count)
                .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind a free port"))
                .collect();
            let addresses: Vec<String> = listeners
                .iter()
                .map(|l| {
                    let port = l.local_addr().expect("bound listener").port();
                    format!("127.0.0.1:{port}")
                })
                .collect();
            let peers = (1..)
                .zip(&addresses)
                .map(|(id, address)| format!("{id}={address}"))
                .collect::<Vec<_>>()
                .join(",");
            (addresses, Some(peers))
        } else {
            (vec!["127.0.0.1:0".to_string()], None)
        };

        // Start every member before waiting for any: a member may only serve once a majority is up.
        for (id, listen) in (1u64..).zip(&listens) {
            let (data_dir, stdout_path, stderr_path) = if clustered {
                (
                    nodes.dir.path().join(format!("node-{id}")).join("data"),
                    nodes.dir.path().join(format!("node-{id}.stdout")),
                    nodes.dir.path().join(format!("node-{id}.stderr")),
                )
            } else {
                (
                    nodes.dir.path().join("data"),
                    nodes.dir.path().join("server.stdout"),
                    nodes.dir.path().join("server.stderr"),
                )
            };
            let mut launch = crate::settings::for_every_server(Launch::new(
                &data_dir,
                listen,
                &stdout_path,
                &stderr_path,
            ));
            if let Some(shards) = shards {
                launch = launch.args(["--shards", &shards.to_string()]);
            }
            if let Some(workers) = crate::settings::cluster_workers(count) {
                launch = launch.args(["--workers", &workers.to_string()]);
            }
            if let Some(peers) = &peers {
                launch = launch
                    .args(["--node-id", &id.to_string()])
                    .args(["--peers", peers])
                    .env("SHOPKEEP_CLUSTER_SECRET", CLUSTER_SECRET);
            }
            let process = launch
                .env("SHOPKEEP_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("SHOPKEEP_SERVICE_TOKEN", SERVICE_TOKEN)
                .spawn()
                .expect("cannot start the shopkeep binary");
            nodes.nodes.push(Node {
                id,
                process,
                base_url: String::new(),
            });
        }

        let pids: Vec<String> = nodes
            .nodes
            .iter()
            .map(|n| n.process.pid().to_string())
            .collect();
        let dir = nodes.dir.path().to_path_buf();
        nodes.interrupt = on_interrupt(move || {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&pids)
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&dir);
        });

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for node in &mut nodes.nodes {
            node.base_url = node
                .process
                .wait_listening(deadline)
                .unwrap_or_else(|e| panic!("node {}: {e}", node.id));
        }
        nodes
    }

    pub(crate) fn clustered(&self) -> bool {
        self.nodes.len() > 1
    }

    /// Resets the peak RSS (`VmHWM`) of every node to its current RSS; false if any reset was refused.
    pub(crate) fn reset_peak_rss(&self) -> bool {
        self.nodes.iter().fold(true, |all, node| {
            let path = format!("/proc/{}/clear_refs", node.process.pid());
            std::fs::write(path, "5").is_ok() && all
        })
    }

    /// The peak RSS (`VmHWM`, KiB) of every node, `None` where it cannot be read.
    pub(crate) fn peak_rss_kib(&self) -> Vec<Option<u64>> {
        self.nodes
            .iter()
            .map(|node| proc_status_kib(node.process.pid(), "VmHWM"))
            .collect()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        forget_interrupt(self.interrupt);
        for node in &mut self.nodes {
            if let Ok(Some(status)) = node.process.try_wait() {
                eprintln!(
                    "node {}: had already exited ({status}); its logs:\n{}",
                    node.id,
                    node.process.log_tails()
                );
            }
        }
        // Dropping a process SIGKILLs and reaps it.
        self.nodes.clear();
    }
}

/// A `kB` field of `/proc/<pid>/status` (Linux only).
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&text, field)
}

/// The `field: <n> kB` line of a `/proc` file's `text` (`/proc/<pid>/status`, `/proc/meminfo`).
pub(crate) fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
}

/// Waits until `GET /readyz` answers 200 on every node (every shard has a leader it knows); `spawned`:
/// when the processes were started.
pub(crate) async fn wait_ready(client: &Client, nodes: &Nodes, spawned: Instant) {
    eprintln!("cluster: waiting for /readyz on every node…");
    let deadline = Instant::now() + READY_TIMEOUT;
    for node in &nodes.nodes {
        let url = format!("{}/readyz", node.base_url);
        loop {
            let last = match client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(response) if response.status() == StatusCode::OK => break,
                Ok(response) => {
                    let status = response.status();
                    format!("{status}: {}", response.text().await.unwrap_or_default())
                }
                Err(e) => format!("request failed: {e}"),
            };
            if Instant::now() >= deadline {
                panic!(
                    "node {}: /readyz not 200 within {READY_TIMEOUT:?} (last: {last}); its logs:\n{}",
                    node.id,
                    node.process.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "cluster: every node ready {:.1?} after the start",
        spawned.elapsed()
    );
}
