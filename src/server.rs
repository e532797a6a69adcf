//! `shopkeep serve`: prepares the data directory and secrets, opens the shards and their Raft groups
//! (joining or forming the cluster), starts the background sweeper and the HTTP server, and shuts
//! everything down in order on SIGTERM / Ctrl-C.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::sync::watch;

use crate::config::{Config, Secrets};
use crate::datadir::{self, FixedSettings};
use crate::engine::{Node, sweeper};
use crate::http::{self, auth::Authenticator, auth::TokenSigner};

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
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// Runs the server until SIGTERM or Ctrl-C.
pub async fn run(config: Config, secrets: Secrets) -> Result<(), StartError> {
    datadir::prepare(
        &config.data_dir,
        &FixedSettings::new(config.shards, &config.currency),
    )?;

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
    let token_key = match (secrets.token_secret, clustered) {
        (Some(secret), _) => secret,
        // Every member must verify the tokens any member signs: derive the key from the shared secret.
        (None, true) => derive_key(&cluster_secret, "user-token-key"),
        (None, false) => datadir::generated_secret(&config.data_dir, "token-secret")?.0,
    };
    if secrets.service_token.is_none() {
        tracing::warn!("SHOPKEEP_SERVICE_TOKEN is not set: the service role is disabled");
    }
    if secrets.psp_secret.is_none() {
        tracing::warn!("SHOPKEEP_PSP_SECRET is not set: PSP webhooks will be refused");
    }
    let auth = Authenticator::new(
        Some(&admin_token),
        secrets.service_token.as_deref(),
        TokenSigner::new(token_key.as_bytes()),
    );
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| StartError::Metrics(e.to_string()))?;

    // Bind before the replicas start: peers that call while this node opens its shards wait in the
    // listen queue instead of being refused.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(StartError::Serve)?;
    let mut config = config;
    config.listen = address;
    let peers = config.peers.clone().unwrap_or_else(|| {
        std::collections::BTreeMap::from([(config.node_id, config.listen.to_string())])
    });
    let cluster_config = shopkeep_raft::ClusterConfig {
        node_id: config.node_id,
        peers,
        shards: config.shards,
        data_dir: config.data_dir.clone(),
        secret: cluster_secret.clone(),
        heartbeat: config.raft_heartbeat,
        election_timeout: config.raft_election_timeout,
        snapshot_every: config.snapshot_every,
        max_batch_commands: config.max_batch,
        max_inflight_per_shard: config.queue_capacity,
        // The engine gives up a little before the HTTP request does, so the client gets its reason.
        deadline: config.request_timeout.mul_f64(0.8),
        trust_empty_shards: config.restoring_from_backup,
    };
    let node = Arc::new(Node::open(&config.data_dir, cluster_config).await?);
    if !clustered {
        // A single node leads every shard at once; check the catalog before serving.
        let repaired = node.repair_catalog().await?;
        if repaired > 0 {
            tracing::info!(repaired, "catalog copies brought up to date");
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let sweeper = tokio::spawn(sweeper::run(
        node.clone(),
        config.sweep_interval,
        config.topup_retention,
        stop_rx,
    ));

    let drain = config.shutdown_timeout;
    let router = http::router(
        node.clone(),
        config,
        auth,
        cluster_secret,
        secrets.psp_secret.map(String::into_bytes),
        metrics,
    );
    tracing::info!(%address, shards = node.shard_count(), "serving");
    println!("shopkeep listening on http://{address}");

    http::serve(listener, router, shutdown_signal(), drain)
        .await
        .map_err(StartError::Serve)?;

    tracing::info!("stopping: in-flight requests drained");
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// A key for `purpose` derived from `secret` (SHA-256 of both, domain-separated).
fn derive_key(secret: &str, purpose: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"shopkeep/");
    hasher.update(purpose.as_bytes());
    hasher.update(b"/");
    hasher.update(secret.as_bytes());
    hex::encode(hasher.finalize())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
