//! The front door: accepts TCP connections within bounds and serves HTTP/1.1 on each under timeouts.
//!
//! Every byte before authentication is hostile, so a stranger's share of the server is bounded here,
//! before any handler runs:
//! - **connections**: at most `max_connections` at once, and at most `max_connections_per_peer` from one
//!   IP address; a connection over either is closed at once (and counted);
//! - **time**: a connection must send a complete request head within `header_read_timeout` of becoming
//!   idle (after it connects, and after each response), or it is closed. That one timer (hyper's) bounds
//!   slow headers and idle keep-alive connections alike. Bodies have their own deadline where they are
//!   read (`input::read_body`, the webhook, node traffic);
//! - **memory**: at most `MAX_HEADERS` headers and `MAX_HEAD_BYTES` of request head per connection.
//!
//! Connections may be upgraded (node streams, `node_stream`); an upgraded one leaves the census once it
//! is handed over, and the node-stream limit bounds it from then on.
//!
//! On shutdown it stops accepting, lets in-flight requests finish (bounded by the caller) and closes
//! idle connections. (hyper-util's `GracefulShutdown` cannot watch an upgradeable HTTP/1 connection, so
//! each connection task watches the shutdown signal itself, and the drain waits for every task's
//! `Draining` handle to drop.)

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

/// Most header fields in one request.
const MAX_HEADERS: usize = 64;
/// Largest request head (request line and headers) buffered for one connection.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long the accept loop pauses after an accept error (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub header_read_timeout: Duration,
    /// The `listener` label of its connection gauge: `client` (--listen), `node`, `metrics`.
    pub name: &'static str,
}

/// Open connections, in all and per peer address.
struct Census {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
    /// `shopkeep_http_connections{listener}`: `total`.
    gauge: metrics::Gauge,
}

/// A connection's place in the census, given back when it closes.
struct Admitted {
    census: Arc<Mutex<Census>>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut census = lock(&self.census);
        census.total = census.total.saturating_sub(1);
        if let Some(count) = census.per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                census.per_peer.remove(&self.peer);
            }
        }
        census.gauge.set(census.total as f64);
    }
}

fn lock(census: &Mutex<Census>) -> std::sync::MutexGuard<'_, Census> {
    census
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a connection was refused.
#[derive(Clone, Copy)]
enum Refused {
    Total,
    PerPeer,
}

fn admit(
    census: &Arc<Mutex<Census>>,
    peer: IpAddr,
    limits: &ConnectionLimits,
) -> Result<Admitted, Refused> {
    let mut guard = lock(census);
    if guard.total >= limits.max_connections {
        return Err(Refused::Total);
    }
    let from_peer = guard.per_peer.entry(peer).or_insert(0);
    if *from_peer >= limits.max_connections_per_peer {
        return Err(Refused::PerPeer);
    }
    *from_peer += 1;
    guard.total += 1;
    guard.gauge.set(guard.total as f64);
    Ok(Admitted {
        census: census.clone(),
        peer,
    })
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains in-flight requests for at most
/// `drain`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let gauge = metrics::gauge!(crate::metrics::HTTP_CONNECTIONS, "listener" => limits.name);
    gauge.set(0.0);
    let census = Arc::new(Mutex::new(Census {
        total: 0,
        per_peer: HashMap::new(),
        gauge,
    }));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let (draining, mut drained) = tokio::sync::mpsc::channel::<()>(1);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD_BYTES);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        match admit(&census, peer.ip(), &limits) {
            Ok(admitted) => spawn_connection(
                &builder,
                Stop {
                    signal: stopping.clone(),
                    _draining: draining.clone(),
                },
                stream,
                router.clone(),
                admitted,
            ),
            Err(reason) => refuse(stream, peer, reason),
        }
    }
    drop(listener);
    let _ = stop.send(true);
    drop(draining);
    // `None` once every connection task dropped its `Stop`.
    if tokio::time::timeout(drain, drained.recv()).await.is_err() {
        tracing::warn!("in-flight requests did not finish within {drain:?}; stopping anyway");
    }
    Ok(())
}

/// What a connection task holds of the listener's shutdown: the signal, and a handle the drain waits
/// for (dropped when the task ends).
struct Stop {
    signal: tokio::sync::watch::Receiver<bool>,
    _draining: tokio::sync::mpsc::Sender<()>,
}

fn spawn_connection(
    builder: &http1::Builder,
    mut stop: Stop,
    stream: TcpStream,
    router: Router,
    admitted: Admitted,
) {
    let _ = stream.set_nodelay(true);
    let connection = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
        .with_upgrades();
    tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        // Errors here are a peer's doing (a reset, a timeout, a malformed request): nothing to report.
        tokio::select! {
            _ = connection.as_mut() => {}
            _ = stop.signal.changed() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
        drop(admitted);
        drop(stop);
    });
}

fn refuse(stream: TcpStream, peer: SocketAddr, reason: Refused) {
    let reason = match reason {
        Refused::Total => "total",
        Refused::PerPeer => "per_peer",
    };
    metrics::counter!(crate::metrics::HTTP_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    tracing::debug!(%peer, reason, "connection refused: over the connection limit");
    drop(stream);
}

/// Raises this process's open-file limit to its hard limit, and returns how many connections fit in it
/// next to the files the node keeps open (shards, log, snapshots, sockets to peers).
pub fn connections_that_fit(wanted: usize) -> usize {
    /// Descriptors kept for everything but client connections.
    const RESERVED_FILES: u64 = 256;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    let available = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return wanted;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    let fits = usize::try_from(available.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX);
    if fits < wanted {
        tracing::warn!(
            wanted,
            fits,
            "the open-file limit (ulimit -n) allows fewer connections than --max-connections; using {fits}"
        );
    }
    wanted.min(fits).max(1)
}
