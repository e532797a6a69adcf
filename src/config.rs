//! The command line (`shopkeep serve …`) and the configuration it yields.
//!
//! Every flag has an environment variable twin (`SHOPKEEP_*`); secrets come only from the environment or
//! from files in the data directory, never from flags (flags show up in `ps`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::domain::Currency;

#[derive(Debug, Parser)]
#[command(
    name = "shopkeep",
    version,
    about = "The backend of a digital game shop: wallets, catalog, orders, refunds."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: CliCommand,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the shop's HTTP server (one node; with no flags: ./shopkeep-data on 127.0.0.1:8080).
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory of the node's data (one redb file per shard, generated secrets). Created if missing.
    #[arg(long, env = "SHOPKEEP_DATA_DIR", default_value = "./shopkeep-data")]
    pub data_dir: PathBuf,

    /// Address the HTTP server listens on. Port 0 picks a free port (printed on stdout).
    #[arg(long, env = "SHOPKEEP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Number of shards users are spread over. Fixed when the data directory is created.
    #[arg(long, env = "SHOPKEEP_SHARDS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: u32,

    /// This node's id in a cluster (reserved: replication across nodes is not part of this build).
    #[arg(long, env = "SHOPKEEP_NODE_ID", default_value_t = 1)]
    pub node_id: u64,

    /// The cluster's members as id=host:port,… (reserved: replication across nodes is not part of this build).
    #[arg(long, env = "SHOPKEEP_PEERS")]
    pub peers: Option<String>,

    /// ISO code of the deployment's one currency. Fixed when the data directory is created.
    #[arg(long, env = "SHOPKEEP_CURRENCY", default_value = "EUR")]
    pub currency: String,

    /// Decimal places of the currency (2 for EUR, 0 for JPY). Fixed when the data directory is created.
    #[arg(long, env = "SHOPKEEP_CURRENCY_DECIMALS", default_value_t = 2)]
    pub currency_decimals: u32,

    /// How long a PENDING order holds funds before the server cancels it.
    #[arg(long, env = "SHOPKEEP_ORDER_TTL", default_value = "15m", value_parser = parse_duration)]
    pub order_ttl: Duration,

    /// How long a PENDING top-up waits for the PSP before it is EXPIRED.
    #[arg(long, env = "SHOPKEEP_TOPUP_TTL", default_value = "1h", value_parser = parse_duration)]
    pub topup_ttl: Duration,

    /// How long idempotency outcomes are kept (at least 7 days is the contract).
    #[arg(long, env = "SHOPKEEP_IDEMPOTENCY_TTL", default_value = "7d", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,

    /// How often the background sweeper looks for expired orders, top-ups and outcomes.
    #[arg(long, env = "SHOPKEEP_SWEEP_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// Most PENDING orders one user may have at once.
    #[arg(long, env = "SHOPKEEP_MAX_PENDING_ORDERS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_pending_orders: u32,

    /// Most commands a shard applies in one transaction (one fsync).
    #[arg(long, env = "SHOPKEEP_MAX_BATCH", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_batch: u32,

    /// Most commands waiting per shard; beyond it requests get 429 rate_limited.
    #[arg(long, env = "SHOPKEEP_QUEUE_CAPACITY", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub queue_capacity: u32,

    /// Longest a request waits for its command to be applied before it answers 503 (retry with the same key).
    #[arg(long, env = "SHOPKEEP_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Most requests handled at once; beyond it requests get 429 rate_limited (health endpoints excepted).
    #[arg(long, env = "SHOPKEEP_MAX_INFLIGHT", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_inflight: u32,

    /// Longest the server waits for in-flight requests on SIGTERM.
    #[arg(long, env = "SHOPKEEP_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("{e} (use e.g. 30s, 15m, 1h, 7d)"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

/// Secrets, read from the environment (`SHOPKEEP_*`) at start.
#[derive(Clone, Default)]
pub struct Secrets {
    pub admin_token: Option<String>,
    pub service_token: Option<String>,
    pub psp_secret: Option<String>,
    pub token_secret: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |s: &Option<String>| if s.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("Secrets")
            .field("admin_token", &shown(&self.admin_token))
            .field("service_token", &shown(&self.service_token))
            .field("psp_secret", &shown(&self.psp_secret))
            .field("token_secret", &shown(&self.token_secret))
            .finish()
    }
}

impl Secrets {
    pub fn from_env() -> Secrets {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Secrets {
            admin_token: var("SHOPKEEP_ADMIN_TOKEN"),
            service_token: var("SHOPKEEP_SERVICE_TOKEN"),
            psp_secret: var("SHOPKEEP_PSP_SECRET"),
            token_secret: var("SHOPKEEP_TOKEN_SECRET"),
        }
    }
}

/// The settings the running service uses (validated).
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub shards: u32,
    pub currency: Currency,
    pub order_ttl: Duration,
    pub topup_ttl: Duration,
    pub idempotency_ttl: Duration,
    pub sweep_interval: Duration,
    pub max_pending_orders: u32,
    pub max_batch: usize,
    pub queue_capacity: usize,
    pub request_timeout: Duration,
    pub max_inflight: usize,
    pub shutdown_timeout: Duration,
}

impl Config {
    pub fn from_args(args: &ServeArgs) -> Result<Config, String> {
        if args.peers.is_some() {
            return Err("--peers: replication across nodes is not part of this build yet; run without --peers".into());
        }
        let currency = Currency::new(&args.currency, args.currency_decimals)?;
        Ok(Config {
            data_dir: args.data_dir.clone(),
            listen: args.listen,
            shards: args.shards,
            currency,
            order_ttl: args.order_ttl,
            topup_ttl: args.topup_ttl,
            idempotency_ttl: args.idempotency_ttl,
            sweep_interval: args.sweep_interval,
            max_pending_orders: args.max_pending_orders,
            max_batch: args.max_batch as usize,
            queue_capacity: args.queue_capacity as usize,
            request_timeout: args.request_timeout,
            max_inflight: args.max_inflight as usize,
            shutdown_timeout: args.shutdown_timeout,
        })
    }
}
