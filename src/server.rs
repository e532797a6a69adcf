//! `shopkeep serve`: prepares the data directory and secrets, opens the shards and their Raft groups
//! (joining or forming the cluster), starts the background sweeper and the HTTP server, and shuts
//! everything down in order on SIGTERM / Ctrl-C.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, Secrets};
use crate::datadir;
use crate::engine::webhooks::{self, worker::DeliveryConfig};
use crate::engine::{EngineError, Node, ShardFiles, sweeper};
use crate::http::{self, auth::Authenticator, auth::TokenSigner};
use crate::metrics::Metrics;
use crate::secrets::{KeyPurpose, derive_key};
use shopkeep_raft::auth::NodeAuth;

/// Anything that stops the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    DataDir(#[from] datadir::DataDirError),
    #[error("cannot open the shards: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Cluster(String),
    #[error("{0}")]
    Secret(String),
    #[error("{0}")]
    Config(String),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// Runs the server until SIGTERM or Ctrl-C.
pub async fn run(config: Config, secrets: Secrets) -> Result<(), StartError> {
    secrets.check_strength().map_err(StartError::Secret)?;
    datadir::restrict_new_files();
    let settings = datadir::settings_for(&config.data_dir, config.shards, &config.currency)?;
    let cache_bytes_per_shard =
        crate::config::cache_bytes_per_shard(config.cache_mib, settings.shards)
            .map_err(StartError::Config)?;
    datadir::prepare(&config.data_dir, &settings)?;

    let clustered = config.peers.is_some();
    let cluster_secret = match (&secrets.cluster_secret, clustered) {
        (Some(secret), _) => secret.clone(),
        (None, false) => hex::encode(rand::random::<[u8; 32]>()),
        (None, true) => {
            return Err(StartError::Cluster(
                "a cluster member needs SHOPKEEP_CLUSTER_SECRET (the same on every member)".into(),
            ));
        }
    };
    if clustered && secrets.admin_token.is_none() {
        return Err(StartError::Cluster(
            "a cluster member needs SHOPKEEP_ADMIN_TOKEN (the same on every member)".into(),
        ));
    }
    let admin_token = match secrets.admin_token {
        Some(token) => token,
        None => {
            let (token, generated, path) =
                datadir::generated_secret(&config.data_dir, "admin-token")?;
            if generated {
                println!(
                    "admin token: generated and stored in {} (mode 0600)",
                    path.display()
                );
            } else {
                println!("admin token: read from {}", path.display());
            }
            token
        }
    };
    // Every member must verify the tokens any member signs: in a cluster the key comes from the shared
    // secret, under its own HKDF label (a node call's MAC never reveals it).
    let token_secret = match (secrets.token_secret, clustered) {
        (Some(secret), _) => secret,
        (None, true) => cluster_secret.clone(),
        (None, false) => datadir::generated_secret(&config.data_dir, "token-secret")?.0,
    };
    let token_key = derive_key(&token_secret, KeyPurpose::UserToken);
    let node_auth = Arc::new(NodeAuth::new(
        derive_key(&cluster_secret, KeyPurpose::NodeAuth),
        config.node_id,
    ));
    if secrets.service_token.is_none() {
        tracing::warn!("SHOPKEEP_SERVICE_TOKEN is not set: the service role is disabled");
    }
    if secrets.psp_secret.is_none() {
        tracing::warn!("SHOPKEEP_PSP_SECRET is not set: PSP webhooks will be refused");
    }
    let auth = Authenticator::new(
        Some(&admin_token),
        secrets.service_token.as_deref(),
        TokenSigner::new(&token_key),
    );
    let metrics = Arc::new(
        Metrics::install(settings.shards).map_err(|e| StartError::Metrics(e.to_string()))?,
    );

    // Bind before the replicas start: peers that call while this node opens its shards wait in the
    // listen queue instead of being refused.
    let listener = bind(config.listen).await?;
    let address = listener.local_addr().map_err(StartError::Serve)?;
    let node_listener = match config.node_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let mut config = config;
    config.listen = address;
    let peers = config.peers.clone().unwrap_or_else(|| {
        std::collections::BTreeMap::from([(config.node_id, config.listen.to_string())])
    });
    if config.restoring_from_backup {
        tracing::warn!(
            "RESTORING FROM BACKUP (--restoring-from-backup): this node's empty shards take part in \
             elections at once, trusting that the whole cluster is being restored from one backup. Remove \
             the flag once GET /v1/cluster shows this node following; never use it for a node that lost \
             its disk while the others kept serving"
        );
    }
    let cluster_config = shopkeep_raft::ClusterConfig {
        node_id: config.node_id,
        peers,
        shards: settings.shards,
        data_dir: config.data_dir.clone(),
        auth: node_auth.clone(),
        heartbeat: config.raft_heartbeat,
        election_timeout: config.raft_election_timeout,
        snapshot_every: config.snapshot_every,
        snapshot_log_percent: config.snapshot_log_percent,
        max_batch_commands: config.max_batch,
        max_inflight_per_shard: config.queue_capacity,
        // The engine gives up a little before the HTTP request does, so the client gets its reason.
        deadline: config.request_timeout.mul_f64(0.8),
        trust_empty_shards: config.restoring_from_backup,
    };
    let files = ShardFiles {
        cache_bytes: cache_bytes_per_shard,
        durable_every: config.durable_every,
    };
    let node = Arc::new(Node::open(&config.data_dir, cluster_config, files).await?);
    if !clustered {
        // A single node leads every shard at once; check the catalog before serving.
        let repaired = repair_catalog_at_start(&node).await?;
        if repaired > 0 {
            tracing::info!(repaired, "catalog copies brought up to date");
        }
    }

    let webhooks = Arc::new(DeliveryConfig {
        allow: config.webhook_allow_hosts.clone(),
        secret_root: token_secret.clone(),
        render: http::event_renderer(config.currency.clone()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let delivery = tokio::spawn(webhooks::worker::run(
        node.clone(),
        webhooks.clone(),
        stop_rx.clone(),
    ));
    let sweeper = tokio::spawn(sweeper::run(
        node.clone(),
        config.sweep_interval,
        sweeper::Retention {
            topups: config.topup_retention,
            events: config.event_retention,
        },
        stop_rx,
    ));

    let drain = config.shutdown_timeout;
    let limits = http::listener::ConnectionLimits {
        max_connections: http::listener::connections_that_fit(config.max_connections),
        max_connections_per_peer: config.max_connections_per_peer,
        header_read_timeout: config.header_read_timeout,
        name: "client",
    };
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let node_server = node_listener.map(|listener| {
        let router = http::node_router(node.clone(), node_auth.clone(), config.body_read_timeout);
        let announce = |addr| format!("shopkeep node traffic on http://{addr}");
        serve_beside(
            listener,
            router,
            ("node", announce),
            limits,
            &stopping_rx,
            drain,
        )
    });
    let metrics_server = metrics_listener.map(|listener| {
        let router = http::metrics_router(node.clone(), metrics.clone());
        let announce = |addr| format!("shopkeep metrics on http://{addr}/metrics");
        serve_beside(
            listener,
            router,
            ("metrics", announce),
            limits,
            &stopping_rx,
            drain,
        )
    });
    let router = http::router(
        node.clone(),
        config,
        auth,
        node_auth,
        secrets.psp_secret.map(String::into_bytes),
        metrics,
        webhooks,
    );
    // Registered before the address is announced: a SIGTERM sent as soon as it is (an orchestrator, a
    // test restarting the node) stops the server gracefully instead of killing it by the default action.
    let signal = shutdown_signal();
    tracing::info!(%address, shards = node.shard_count(), "serving");
    println!("shopkeep listening on http://{address}");

    let shutdown = async move {
        signal.await;
        let _ = stopping_tx.send(true);
    };
    http::listener::serve(listener, router, limits, shutdown, drain)
        .await
        .map_err(StartError::Serve)?;
    for server in [node_server, metrics_server].into_iter().flatten() {
        let _ = server.await;
    }

    tracing::info!("stopping: in-flight requests drained");
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    let _ = delivery.await;
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves `router` on a listener beside the client one (node traffic, metrics), under the same limits
/// and shutdown, its connections counted under `name`; prints what `announce` says of its address.
fn serve_beside(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    (name, announce): (&'static str, fn(std::net::SocketAddr) -> String),
    limits: http::listener::ConnectionLimits,
    stopping: &watch::Receiver<bool>,
    drain: std::time::Duration,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    if let Ok(addr) = listener.local_addr() {
        println!("{}", announce(addr));
    }
    tokio::spawn(http::listener::serve(
        listener,
        router,
        http::listener::ConnectionLimits { name, ..limits },
        stopped(stopping.clone()),
        drain,
    ))
}

async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

/// Resolves once `stopping` turns true (or its sender is gone).
async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

/// Registers for SIGTERM now (Ctrl-C once polled) and resolves when one arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let terminate = async move {
            match terminate {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate => {}
        }
    }
}

/// How long a single node's start keeps retrying its catalog check while its shards are unavailable.
const CATALOG_CHECK_AT_START: std::time::Duration = std::time::Duration::from_secs(30);

/// The catalog check before a single node serves. Its reads and writes have the request deadline, which
/// a just-opened shard can miss (its leader not yet elected, a loaded machine, a short
/// `--request-timeout`): an unavailable or overloaded shard, or a write whose outcome is unknown (the
/// check's writes are idempotent), is retried for up to [`CATALOG_CHECK_AT_START`]; any other error stops
/// the start.
async fn repair_catalog_at_start(node: &Node) -> Result<usize, EngineError> {
    let started = std::time::Instant::now();
    loop {
        match node.repair_catalog().await {
            Err(
                error @ (EngineError::Unavailable(_)
                | EngineError::OutcomeUnknown { .. }
                | EngineError::Overloaded { .. }),
            ) if started.elapsed() < CATALOG_CHECK_AT_START => {
                tracing::debug!(%error, "catalog check at start: retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}
