//! `shopkeep serve`: prepares the data directory and secrets, opens the shards, starts the background
//! sweeper and the HTTP server, and shuts everything down in order on SIGTERM / Ctrl-C.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::sync::watch;

use crate::config::{Config, Secrets};
use crate::datadir::{self, FixedSettings};
use crate::engine::{EngineConfig, Node, sweeper};
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
    let token_key = match secrets.token_secret {
        Some(secret) => secret,
        None => datadir::generated_secret(&config.data_dir, "token-secret")?.0,
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

    let engine_config = EngineConfig {
        shards: config.shards,
        max_batch: config.max_batch,
        queue_capacity: config.queue_capacity,
    };
    let data_dir = config.data_dir.clone();
    let node = tokio::task::spawn_blocking(move || Node::open(&data_dir, engine_config))
        .await
        .map_err(|e| StartError::Engine(crate::engine::EngineError::Internal(e.to_string())))??;
    let node = Arc::new(node);
    let repaired = node.repair_catalog().await?;
    if repaired > 0 {
        tracing::info!(repaired, "catalog copies brought up to date");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let sweeper = tokio::spawn(sweeper::run(node.clone(), config.sweep_interval, stop_rx));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(StartError::Serve)?;
    let mut config = config;
    config.listen = address;
    let drain = config.shutdown_timeout;
    let router = http::router(
        node.clone(),
        config,
        auth,
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
    match Arc::try_unwrap(node) {
        Ok(node) => tokio::task::spawn_blocking(move || node.shutdown())
            .await
            .unwrap_or(()),
        Err(_) => {
            tracing::warn!("shards still in use at shutdown; committed data is durable regardless")
        }
    }
    tracing::info!("stopped");
    Ok(())
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
