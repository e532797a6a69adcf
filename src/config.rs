//! The command line (`shopkeep serve …`, and the operator's commands of `crate::cli`) and the
//! configuration `serve` yields.
//!
//! Every flag has an environment variable twin (`SHOPKEEP_*`); secrets come only from the environment or
//! from files in the data directory, never from flags (flags show up in `ps`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::domain::Currency;
use crate::engine::webhooks::allow::AllowHosts;

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
    /// Run the shop's HTTP server (with no flags: one node, ./shopkeep-data on 127.0.0.1:8080; with
    /// --node-id and --peers: one member of a cluster).
    Serve(Box<ServeArgs>),
    /// The operator's commands: clients of a running server's HTTP API (`src/cli/`).
    #[command(flatten)]
    Operator(crate::cli::Command),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory of the node's data (one redb file per shard, generated secrets). Created if missing.
    #[arg(long, env = "SHOPKEEP_DATA_DIR", default_value = "./shopkeep-data")]
    pub data_dir: PathBuf,

    /// Address the HTTP server listens on. Port 0 picks a free port (printed on stdout).
    #[arg(long, env = "SHOPKEEP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Number of shards users are spread over, fixed when the data directory is created [default: 3 for a
    /// new directory; an existing one keeps its own, and naming another number is refused].
    #[arg(long, env = "SHOPKEEP_SHARDS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: Option<u32>,

    /// This node's id in a cluster. Never reuse the id of a node that was removed.
    #[arg(long, env = "SHOPKEEP_NODE_ID", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub node_id: u64,

    /// The cluster's initial members as id=host:port,… including this node (its entry is the address the
    /// others reach it at). Without it the node is a cluster of one. Needs SHOPKEEP_CLUSTER_SECRET.
    #[arg(long, env = "SHOPKEEP_PEERS")]
    pub peers: Option<String>,

    /// Interval of the shard leaders' heartbeats to their followers.
    #[arg(long, env = "SHOPKEEP_RAFT_HEARTBEAT", default_value = "100ms", value_parser = parse_duration)]
    pub raft_heartbeat: Duration,

    /// How long a follower waits without hearing from its leader before it stands for election (1–2×
    /// this, at random). At least 3× the heartbeat. A dead leader is replaced in about 2–4× this.
    #[arg(long, env = "SHOPKEEP_RAFT_ELECTION_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub raft_election_timeout: Duration,

    /// Only when restoring the cluster from one member's backup (README, Backups): this node's data dir
    /// was emptied on purpose, so it takes part in elections at once instead of first rebuilding from a
    /// leader confirmed without it. Never for a node that lost its disk while the others kept serving.
    #[arg(long, env = "SHOPKEEP_RESTORING_FROM_BACKUP")]
    pub restoring_from_backup: bool,

    /// Log entries between two snapshots of a shard; the log before a snapshot is then purged.
    #[arg(long, env = "SHOPKEEP_SNAPSHOT_EVERY", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(10..=100_000_000))]
    pub snapshot_every: u64,

    /// A shard's next snapshot also waits until the log since its last one holds this share (in
    /// percent) of that snapshot's bytes, so that a large shop does not rewrite its whole state every
    /// `--snapshot-every` entries. 0: by entries alone.
    #[arg(long, env = "SHOPKEEP_SNAPSHOT_LOG_PERCENT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub snapshot_log_percent: u32,

    /// redb's page cache of this node, in MiB, split evenly among its shards (32 with the default 3
    /// shards: 10.7 MiB each). At least 1 MiB per shard. More makes a shop of millions of orders faster
    /// for memory: at 3,000,000 orders, 64 made purchases 44 % faster than 32 for 48 MiB more peak RSS
    /// (docs/BENCHMARKS.md). The OS caches the files anyway; `shopkeep_shard_cache_reads_total` says
    /// how often a read misses.
    #[arg(long, env = "SHOPKEEP_CACHE_MIB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub cache_mib: u64,

    /// Longest time between two durable commits (fsyncs) of a shard file, 100ms to 60s. Every write is
    /// durable in the Raft log before it is applied, so this bounds what a restart re-applies and how
    /// long a failing disk under a shard file goes unnoticed (the node stops within it). Shorter costs
    /// throughput on a big shop (at 3,000,000 orders 100ms made 30 % fewer purchases/s than 500ms);
    /// longer lengthens each durable commit's pause (5s doubled one node's p99.9 at half its peak) and
    /// was not reliably faster (docs/BENCHMARKS.md).
    #[arg(long, env = "SHOPKEEP_DURABLE_EVERY", default_value = "2s", value_parser = parse_durable_every)]
    pub durable_every: Duration,

    /// Threads that run the node's requests, Raft and applies [default: one per core this process may use,
    /// or tokio's `TOKIO_WORKER_THREADS`]. Nodes sharing one machine each do better with their share of its
    /// cores than with all of them: three nodes on 2 cores with 1 each made 3–18 % more purchases/s at one
    /// client in 10 of 11 paired rounds, while one node alone with 1 instead of 2 lost 15–28 % at 16 and 64
    /// clients (docs/BENCHMARKS.md). Blocking work (durable commits, snapshots, the audit's reads) runs on
    /// threads of its own either way.
    #[arg(long, env = "SHOPKEEP_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

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

    /// How long EXPIRED and FAILED top-ups are kept before the sweeper purges them. A late PSP success
    /// still credits an EXPIRED top-up until then, so keep it well above the PSP's longest delay.
    #[arg(long, env = "SHOPKEEP_TOPUP_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub topup_retention: Duration,

    /// How long events are kept for the feed and webhooks. A webhook that has not acknowledged an event
    /// keeps it longer, at most 30 days (then it is dropped, counted in /metrics, and the webhook is
    /// marked failing). At least 1 hour, at most 30 days.
    #[arg(long, env = "SHOPKEEP_EVENT_RETENTION", default_value = "7d", value_parser = parse_event_retention)]
    pub event_retention: Duration,

    /// How long idempotency outcomes are kept (at least 7 days is the contract).
    #[arg(long, env = "SHOPKEEP_IDEMPOTENCY_TTL", default_value = "7d", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,

    /// How often the background sweeper looks for expired orders, top-ups and outcomes.
    #[arg(long, env = "SHOPKEEP_SWEEP_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// Most PENDING orders one user may have at once.
    #[arg(long, env = "SHOPKEEP_MAX_PENDING_ORDERS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_pending_orders: u32,

    /// Most PENDING, unexpired top-ups one user may have at once; beyond it 409 limit_exceeded.
    #[arg(long, env = "SHOPKEEP_MAX_PENDING_TOPUPS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_pending_topups: u32,

    /// What a reversal (PSP refund, lost chargeback) does when the wallet no longer has the money:
    /// `debt` records what is missing as debt; `revoke` first refunds the player's newest unconsumed
    /// purchases made since that credit (past refund windows), and records debt only for the rest.
    #[arg(long, env = "SHOPKEEP_ON_REVERSAL", value_enum, default_value_t = OnReversal::Debt)]
    pub on_reversal: OnReversal,

    /// Most commands proposed together in one log entry (one fsync, one replication, one apply).
    #[arg(long, env = "SHOPKEEP_MAX_BATCH", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_batch: u32,

    /// Most commands waiting per shard on a node (and entries in flight on its leader); beyond it
    /// requests get 429 rate_limited.
    #[arg(long, env = "SHOPKEEP_QUEUE_CAPACITY", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub queue_capacity: u32,

    /// Longest a request waits for its command to be applied before it answers 503 (retry with the same key).
    #[arg(long, env = "SHOPKEEP_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Most requests handled at once; beyond it requests get 429 rate_limited (health endpoints excepted).
    #[arg(long, env = "SHOPKEEP_MAX_INFLIGHT", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_inflight: u32,

    /// Address for node-to-node traffic only (`/_node/…`), e.g. a private interface. Without it, node
    /// traffic shares --listen. With it, --peers must name these addresses, and --listen serves no node
    /// traffic at all.
    #[arg(long, env = "SHOPKEEP_NODE_LISTEN")]
    pub node_listen: Option<SocketAddr>,

    /// A second address serving only `GET /metrics` (and `/healthz`), e.g. for a scraper on a private
    /// interface; `/metrics` stays on --listen as well.
    #[arg(long, env = "SHOPKEEP_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Most client connections open at once (clamped to what the open-file limit allows); more are
    /// closed at once.
    #[arg(long, env = "SHOPKEEP_MAX_CONNECTIONS", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Most connections open at once from one IP address; more are closed at once.
    #[arg(long, env = "SHOPKEEP_MAX_CONNECTIONS_PER_PEER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_peer: u32,

    /// A connection must send a complete request head within this of connecting or of its previous
    /// response (bounds slow headers and idle keep-alive connections), else it is closed.
    #[arg(long, env = "SHOPKEEP_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A request body must arrive whole within this of its head (408 request_timeout otherwise).
    #[arg(long, env = "SHOPKEEP_BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// Most PSP webhook requests handled at once (they come before any authentication, so they have
    /// their own limit and never use up --max-inflight); beyond it they get 429 rate_limited.
    #[arg(long, env = "SHOPKEEP_MAX_WEBHOOK_INFLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_webhook_inflight: u32,

    /// Where event webhooks (`PUT /v1/webhooks/…`) may POST to, comma-separated: CIDRs (10.0.0.0/8, fd00::/8), IP addresses, exact
    /// host names (game-server.internal), `loopback`, `private` (10/8, 172.16/12, 192.168/16, 100.64/10,
    /// fc00::/7; not link-local) or `*` (anywhere). A host name not listed is allowed only if every
    /// address it resolves to is.
    #[arg(long, env = "SHOPKEEP_WEBHOOK_ALLOW_HOSTS", default_value = "loopback,private", value_parser = AllowHosts::parse)]
    pub webhook_allow_hosts: AllowHosts,

    /// How log lines are written on stderr: `text` (for people) or `json` (one object a line, for
    /// collectors). What is logged: RUST_LOG, else `info` without openraft's chatter (README, Logs).
    #[arg(long, env = "SHOPKEEP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Longest the server waits for in-flight requests on SIGTERM.
    #[arg(long, env = "SHOPKEEP_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

/// What a reversal does about money already spent (`--on-reversal`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnReversal {
    #[default]
    Debt,
    Revoke,
}

/// The format of the log lines (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Cli {
    /// The log format the chosen command asked for (text for commands without the flag).
    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            CliCommand::Serve(args) => args.log_format,
            // The operator's commands (added beside `serve`) log little, as text.
            #[allow(unreachable_patterns)]
            _ => LogFormat::Text,
        }
    }
}

/// `--event-retention`: a duration from 1 hour to the longest retention (30 days).
fn parse_event_retention(text: &str) -> Result<Duration, String> {
    let retention = parse_duration(text)?;
    let (least, most) = (
        Duration::from_secs(3600),
        crate::engine::sweeper::MAX_EVENT_RETENTION,
    );
    if retention < least || retention > most {
        return Err("the event retention must be from 1h to 30d".to_owned());
    }
    Ok(retention)
}

fn parse_durable_every(text: &str) -> Result<Duration, String> {
    let every = parse_duration(text)?;
    let (least, most) = (
        crate::state::MIN_DURABLE_EVERY,
        crate::state::MAX_DURABLE_EVERY,
    );
    if every < least || every > most {
        return Err(format!(
            "a shard's durable commits must be from {} to {} apart",
            humantime::format_duration(least),
            humantime::format_duration(most)
        ));
    }
    Ok(every)
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
    /// Authenticates node-to-node traffic; required in a cluster.
    pub cluster_secret: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |s: &Option<String>| if s.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("Secrets")
            .field("admin_token", &shown(&self.admin_token))
            .field("service_token", &shown(&self.service_token))
            .field("psp_secret", &shown(&self.psp_secret))
            .field("token_secret", &shown(&self.token_secret))
            .field("cluster_secret", &shown(&self.cluster_secret))
            .finish()
    }
}

impl Secrets {
    /// Refuses any configured token or secret that is too short or an example's placeholder
    /// (generated ones are 32 random bytes and always pass).
    pub fn check_strength(&self) -> Result<(), String> {
        let configured = [
            ("SHOPKEEP_ADMIN_TOKEN", &self.admin_token),
            ("SHOPKEEP_SERVICE_TOKEN", &self.service_token),
            ("SHOPKEEP_PSP_SECRET", &self.psp_secret),
            ("SHOPKEEP_TOKEN_SECRET", &self.token_secret),
            ("SHOPKEEP_CLUSTER_SECRET", &self.cluster_secret),
        ];
        for (name, value) in configured {
            if let Some(value) = value {
                crate::secrets::check_strength(name, value)?;
            }
        }
        Ok(())
    }

    pub fn from_env() -> Secrets {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Secrets {
            admin_token: var("SHOPKEEP_ADMIN_TOKEN"),
            service_token: var("SHOPKEEP_SERVICE_TOKEN"),
            psp_secret: var("SHOPKEEP_PSP_SECRET"),
            token_secret: var("SHOPKEEP_TOKEN_SECRET"),
            cluster_secret: var("SHOPKEEP_CLUSTER_SECRET"),
        }
    }
}

/// The settings the running service uses (validated).
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// As named (`--shards`); `None`: the data directory's own, or `datadir::DEFAULT_SHARDS` for a new one
    /// (`datadir::settings_for`).
    pub shards: Option<u32>,
    pub currency: Currency,
    pub order_ttl: Duration,
    pub topup_ttl: Duration,
    pub topup_retention: Duration,
    pub event_retention: Duration,
    pub idempotency_ttl: Duration,
    pub sweep_interval: Duration,
    pub max_pending_orders: u32,
    pub max_pending_topups: u32,
    /// `--on-reversal revoke`.
    pub revoke_on_reversal: bool,
    pub max_batch: usize,
    pub queue_capacity: usize,
    pub request_timeout: Duration,
    pub max_inflight: usize,
    pub shutdown_timeout: Duration,
    /// See `ServeArgs::node_listen`.
    pub node_listen: Option<SocketAddr>,
    /// See `ServeArgs::metrics_listen`.
    pub metrics_listen: Option<SocketAddr>,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_webhook_inflight: usize,
    /// See `ServeArgs::webhook_allow_hosts`.
    pub webhook_allow_hosts: AllowHosts,
    pub node_id: u64,
    /// The initial members (this node included); `None` for a single node.
    pub peers: Option<BTreeMap<u64, String>>,
    pub raft_heartbeat: Duration,
    pub raft_election_timeout: Duration,
    pub snapshot_every: u64,
    pub snapshot_log_percent: u32,
    /// See `ServeArgs::cache_mib` (split among the shards by [`cache_bytes_per_shard`]).
    pub cache_mib: u64,
    /// See `ServeArgs::durable_every`.
    pub durable_every: Duration,
    /// See `ServeArgs::workers` (`None`: tokio's default).
    pub workers: Option<usize>,
    /// See `ServeArgs::restoring_from_backup`.
    pub restoring_from_backup: bool,
}

/// `--cache-mib` split evenly among `shards`; at least 1 MiB each.
pub fn cache_bytes_per_shard(cache_mib: u64, shards: u32) -> Result<usize, String> {
    if cache_mib < u64::from(shards) {
        return Err(format!(
            "--cache-mib {cache_mib} is less than 1 MiB for each of the {shards} shards: give at least {shards}"
        ));
    }
    let bytes = cache_mib
        .checked_mul(1024 * 1024)
        .and_then(|total| usize::try_from(total / u64::from(shards)).ok())
        .ok_or_else(|| format!("--cache-mib {cache_mib} is more than this machine can address"))?;
    Ok(bytes)
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, address) = part
            .split_once('=')
            .ok_or_else(|| format!("--peers: `{part}` is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| format!("--peers: `{id}` is not a node id (a positive integer)"))?;
        let address = address.trim();
        let port_ok = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            return Err(format!("--peers: `{address}` is not host:port"));
        }
        if peers.insert(id, address.to_owned()).is_some() {
            return Err(format!("--peers: node {id} is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("--peers: no members".into());
    }
    Ok(peers)
}

impl Config {
    pub fn from_args(args: &ServeArgs) -> Result<Config, String> {
        let peers = match &args.peers {
            None => None,
            Some(text) => {
                let peers = parse_peers(text)?;
                if !peers.contains_key(&args.node_id) {
                    return Err(format!(
                        "--peers must include this node (--node-id {})",
                        args.node_id
                    ));
                }
                Some(peers)
            }
        };
        if args.raft_election_timeout < args.raft_heartbeat * 3 {
            return Err("--raft-election-timeout must be at least 3× --raft-heartbeat".into());
        }
        let currency = Currency::new(&args.currency, args.currency_decimals)?;
        Ok(Config {
            data_dir: args.data_dir.clone(),
            listen: args.listen,
            shards: args.shards,
            currency,
            order_ttl: args.order_ttl,
            topup_ttl: args.topup_ttl,
            topup_retention: args.topup_retention,
            event_retention: args.event_retention,
            idempotency_ttl: args.idempotency_ttl,
            sweep_interval: args.sweep_interval,
            max_pending_orders: args.max_pending_orders,
            max_pending_topups: args.max_pending_topups,
            revoke_on_reversal: args.on_reversal == OnReversal::Revoke,
            max_batch: args.max_batch as usize,
            queue_capacity: args.queue_capacity as usize,
            request_timeout: args.request_timeout,
            max_inflight: args.max_inflight as usize,
            shutdown_timeout: args.shutdown_timeout,
            node_listen: args.node_listen,
            metrics_listen: args.metrics_listen,
            max_connections: args.max_connections as usize,
            max_connections_per_peer: args.max_connections_per_peer as usize,
            header_read_timeout: args.header_read_timeout,
            body_read_timeout: args.body_read_timeout,
            max_webhook_inflight: args.max_webhook_inflight as usize,
            webhook_allow_hosts: args.webhook_allow_hosts.clone(),
            node_id: args.node_id,
            peers,
            raft_heartbeat: args.raft_heartbeat,
            raft_election_timeout: args.raft_election_timeout,
            snapshot_every: args.snapshot_every,
            snapshot_log_percent: args.snapshot_log_percent,
            cache_mib: args.cache_mib,
            durable_every: args.durable_every,
            workers: args.workers.map(usize::from),
            restoring_from_backup: args.restoring_from_backup,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from(["shopkeep", "serve"].iter().chain(args))?;
        match cli.command {
            CliCommand::Serve(args) => Ok(*args),
            CliCommand::Operator(_) => unreachable!("serve was asked for"),
        }
    }

    #[test]
    fn durable_every_is_two_seconds_unless_set_and_refused_outside_100ms_to_60s() {
        assert_eq!(serve(&[]).unwrap().durable_every, Duration::from_secs(2));
        let set = serve(&["--durable-every", "5s"]).unwrap();
        assert_eq!(set.durable_every, Duration::from_secs(5));
        for refused in ["50ms", "61s", "0s", "soon"] {
            let error = serve(&["--durable-every", refused])
                .unwrap_err()
                .to_string();
            assert!(error.contains("durable-every"), "{refused}: {error}");
        }
        let error = serve(&["--durable-every", "61s"]).unwrap_err().to_string();
        assert!(error.contains("from 100ms to 1m apart"), "{error}");
    }

    #[test]
    fn workers_default_to_the_runtimes_choice_and_are_refused_outside_1_to_1024() {
        assert_eq!(serve(&[]).unwrap().workers, None);
        let args = serve(&["--workers", "1"]).unwrap();
        assert_eq!(Config::from_args(&args).unwrap().workers, Some(1));
        for refused in ["0", "1025", "65536", "many"] {
            let error = serve(&["--workers", refused]).unwrap_err().to_string();
            assert!(error.contains("--workers"), "{refused}: {error}");
        }
    }

    #[test]
    fn cache_mib_is_split_evenly_among_the_shards_with_at_least_one_mib_each() {
        assert_eq!(serve(&[]).unwrap().cache_mib, 32);
        assert_eq!(cache_bytes_per_shard(32, 8), Ok(4 * 1024 * 1024));
        assert_eq!(cache_bytes_per_shard(3, 2), Ok(3 * 1024 * 1024 / 2));
        assert_eq!(cache_bytes_per_shard(1, 1), Ok(1024 * 1024));
        let refused = cache_bytes_per_shard(7, 8).unwrap_err();
        assert!(refused.contains("at least 8"), "{refused}");
        assert!(serve(&["--cache-mib", "0"]).is_err());
    }

    #[test]
    fn webhook_allow_hosts_defaults_to_loopback_and_private() {
        let args = serve(&[]).unwrap();
        assert_eq!(args.webhook_allow_hosts, AllowHosts::default());
        let args = serve(&["--webhook-allow-hosts", "10.0.0.0/8,hooks.internal"]).unwrap();
        assert_eq!(
            args.webhook_allow_hosts.to_string(),
            "10.0.0.0/8,hooks.internal"
        );
        let config = Config::from_args(&args).unwrap();
        assert_eq!(config.webhook_allow_hosts, args.webhook_allow_hosts);
        assert!(serve(&["--webhook-allow-hosts", "10.0.0.1/8"]).is_err());
        assert!(serve(&["--webhook-allow-hosts", ""]).is_err());
    }
}
