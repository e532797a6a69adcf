//! The operator's client: every subcommand but `serve` (`shopkeep status`, `items`, `users`, `credit`,
//! `orders`, `refund`, `audit`, `nodes`, `leaders`, `backup`, `verify-backup`, `restore`). Each is one file here with its clap arguments and an
//! async `run`, and one variant of [`Command`]; they reach the server only through its HTTP API
//! ([`client::Client`]), print through [`output::Output`] and fail with [`error::CliError`], whose kind
//! decides the exit status. Nothing here uses the server's own modules (this is a client, like any
//! other) except the offline backup commands: `verify-backup` and `restore` work on files without a
//! server, through `engine::backup` (the export format, and writing a data directory).
//!
//! Tokens come only from the environment (`SHOPKEEP_ADMIN_TOKEN`, `SHOPKEEP_SERVICE_TOKEN`), never from
//! flags, which `ps` shows.

pub mod client;
pub mod error;
pub mod manifest;
pub mod output;
pub mod progress;

mod audit;
mod backup;
mod credit;
mod items;
mod leaders;
mod nodes;
mod orders;
mod refund;
mod restore;
mod status;
mod users;
mod verify_backup;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::Url;

use client::Client;
use error::CliError;
use output::Output;

pub const ADMIN_TOKEN_VAR: &str = "SHOPKEEP_ADMIN_TOKEN";
pub const SERVICE_TOKEN_VAR: &str = "SHOPKEEP_SERVICE_TOKEN";

/// The operator's commands (`shopkeep <command> …`); `config::CliCommand` flattens them beside `serve`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Nodes, shards, leaders, lag, readiness and the audit's summary in one view (exit 4 when not
    /// ready or the audit is not ok).
    Status(Op<status::Args>),
    /// The catalog: list, get, put (create or replace) items.
    Items(Op<items::Args>),
    /// Create or show a user and its wallet.
    Users(Op<users::Args>),
    /// Credit a user's wallet with a payment the PSP already settled (direct credit).
    Credit(Op<credit::Args>),
    /// A user's orders.
    Orders(Op<orders::Args>),
    /// Refund an order, whole or some lines.
    Refund(Op<refund::Args>),
    /// Recompute every invariant on every shard (exit 4 when the audit is not ok).
    Audit(Op<audit::Args>),
    /// Cluster membership: add a node as a learner, promote it to voter, remove it.
    Nodes(Op<nodes::Args>),
    /// Shard leadership across the nodes.
    Leaders(Op<leaders::Args>),
    /// Back up every shard into a new directory while the shop keeps serving (online, consistent).
    Backup(Op<backup::Args>),
    /// Check a backup without a server: every file's digest and every shard's state_hash against the
    /// manifest (exit 4 when anything differs).
    VerifyBackup(verify_backup::Args),
    /// Turn a verified backup into a new data directory (no server needed).
    Restore(restore::Args),
}

impl Command {
    async fn run(self) -> Result<(), CliError> {
        match self {
            Command::Status(op) => status::run(op.args, &op.common.context()?).await,
            Command::Items(op) => items::run(op.args, &op.common.context()?).await,
            Command::Users(op) => users::run(op.args, &op.common.context()?).await,
            Command::Credit(op) => credit::run(op.args, &op.common.context()?).await,
            Command::Orders(op) => orders::run(op.args, &op.common.context()?).await,
            Command::Refund(op) => refund::run(op.args, &op.common.context()?).await,
            Command::Audit(op) => audit::run(op.args, &op.common.context()?).await,
            Command::Nodes(op) => nodes::run(op.args, &op.common.context()?).await,
            Command::Leaders(op) => leaders::run(op.args, &op.common.context()?).await,
            Command::Backup(op) => backup::run(op.args, &op.common.context()?).await,
            Command::VerifyBackup(args) => verify_backup::run(&args),
            Command::Restore(args) => restore::run(args).await,
        }
    }
}

/// One command's own arguments beside the flags every command takes.
#[derive(Debug, Args)]
pub struct Op<A: Args> {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub args: A,
}

/// The flags of every operator command (accepted before or after its subcommand).
#[derive(Debug, Args)]
pub struct Common {
    /// The server (any node of a cluster).
    #[arg(
        long,
        env = "SHOPKEEP_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Print the server's JSON as it came (one document on stdout) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Longest wait for the server's answer to each request [default: 60s; 15m for each shard's audit
    /// in `audit` and `status`, which reads all of the shard's rows].
    #[arg(long, value_parser = humantime::parse_duration, global = true)]
    pub timeout: Option<Duration>,
}

/// A request's longest wait when `--timeout` is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// One shard's audit's longest wait when `--timeout` is not given: the audit reads every row of the
/// shard, 90 s for a shard of 3,300,000 orders under load on two cores (docs/BENCHMARKS.md, the
/// twenty-eighth session's scale run).
const DEFAULT_AUDIT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

impl Common {
    fn context(&self) -> Result<Context, CliError> {
        let bad = |reason: &str| CliError::BadUrl {
            url: self.url.clone(),
            reason: reason.to_owned(),
        };
        let url = Url::parse(&self.url).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "http" {
            return Err(bad(
                "shopkeep speaks plain http:// (put a TLS proxy in front of it)",
            ));
        }
        Ok(Context {
            url,
            out: Output { json: self.json },
            timeout: self.timeout.unwrap_or(DEFAULT_TIMEOUT),
            audit_timeout: self.timeout.unwrap_or(DEFAULT_AUDIT_TIMEOUT),
        })
    }
}

/// What a command runs with: where the server is, how to print, clients with the right token.
pub struct Context {
    url: Url,
    pub out: Output,
    timeout: Duration,
    audit_timeout: Duration,
}

impl Context {
    /// The longest wait for one shard's audit.
    pub fn audit_timeout(&self) -> Duration {
        self.audit_timeout
    }

    /// A client with `SHOPKEEP_ADMIN_TOKEN` (catalog writes, cluster, audit, forced refunds).
    pub fn admin(&self) -> Result<Client, CliError> {
        let token = token_from_env(ADMIN_TOKEN_VAR).ok_or(CliError::MissingToken {
            variable: ADMIN_TOKEN_VAR,
        })?;
        Client::new(self.url.clone(), token, self.timeout)
    }

    /// A client for service-level commands: `SHOPKEEP_SERVICE_TOKEN`, else `SHOPKEEP_ADMIN_TOKEN`
    /// (an admin may do everything a service may).
    pub fn service(&self) -> Result<Client, CliError> {
        let token = token_from_env(SERVICE_TOKEN_VAR)
            .or_else(|| token_from_env(ADMIN_TOKEN_VAR))
            .ok_or(CliError::MissingToken {
                variable: SERVICE_TOKEN_VAR,
            })?;
        Client::new(self.url.clone(), token, self.timeout)
    }
}

fn token_from_env(variable: &str) -> Option<String> {
    std::env::var(variable).ok().filter(|t| !t.is_empty())
}

/// The `Idempotency-Key` of a write: `--idempotency-key`, or a new UUIDv7 for this invocation.
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Reuse the key of an earlier attempt, to retry it without a second effect (default: a new key).
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

impl WriteArgs {
    pub fn key(&self) -> String {
        self.idempotency_key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
    }
}

/// Runs an operator command on a runtime of its own: its exit status (see [`error`]), with
/// `shopkeep: <code>: <message>` on stderr when it fails.
pub fn main(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("shopkeep: cannot start the runtime: {e}");
            return ExitCode::from(error::EXIT_NO_ANSWER);
        }
    };
    match runtime.block_on(command.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shopkeep: {}: {e}", e.code());
            ExitCode::from(e.exit_status())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        common: Common,
    }

    fn context(args: &[&str]) -> Context {
        let flags = Flags::try_parse_from(std::iter::once("shopkeep").chain(args.iter().copied()))
            .expect("parses");
        flags.common.context().expect("a context")
    }

    #[test]
    fn a_shard_audit_waits_fifteen_minutes_and_other_requests_a_minute_unless_timeout_is_named() {
        let default = context(&[]);
        assert_eq!(default.timeout, Duration::from_secs(60));
        assert_eq!(default.audit_timeout(), Duration::from_secs(15 * 60));

        let named = context(&["--timeout", "5s"]);
        assert_eq!(named.timeout, Duration::from_secs(5));
        assert_eq!(named.audit_timeout(), Duration::from_secs(5));
    }
}
