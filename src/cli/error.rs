//! The CLI's one error type and the exit status each kind of failure gives, so that scripts can trust them:
//! 1 the server refused (4xx), 2 usage (clap's own, and a missing token), 3 no answer to trust (the server
//! is unreachable, timed out, answered 5xx or something that is not the API's JSON), 4 the cluster or the
//! audit has a problem (`status`, `audit`), or a backup is not what its manifest says (`verify-backup`,
//! `restore`), 5 a local file could not be read or written.

use thiserror::Error;

/// Exit status: the server refused the request (4xx); its `code` and `message` are on stderr.
pub const EXIT_REFUSED: u8 = 1;
/// Exit status: bad usage (clap's own exit status) or a missing token.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: no answer to trust: unreachable, timed out, 5xx, or not the API's JSON.
pub const EXIT_NO_ANSWER: u8 = 3;
/// Exit status: `status` or `audit` found a problem (not ready, audit not ok), or `verify-backup`
/// (or `restore`) found a backup that is not what its manifest says.
pub const EXIT_PROBLEM: u8 = 4;
/// Exit status: a local file could not be read or written (the backup or the data directory).
pub const EXIT_LOCAL: u8 = 5;

#[derive(Debug, Error)]
pub enum CliError {
    /// The server answered 4xx with the API's error shape.
    #[error("{message} (HTTP {status})")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// The token the command needs is not in the environment.
    #[error("set {variable} in the environment (tokens are never taken from flags)")]
    MissingToken { variable: &'static str },
    /// `--url` is not an http:// URL.
    #[error("--url {url}: {reason}")]
    BadUrl { url: String, reason: String },
    /// Nothing was sent: the connection could not be made.
    #[error("cannot reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The request may or may not have taken effect (timeout, dropped connection, 5xx).
    #[error("{detail}{}", retry_hint(key.as_deref()))]
    NoAnswer {
        code: String,
        detail: String,
        /// The idempotency key of a write, to retry it safely.
        key: Option<String>,
    },
    /// `status` or `audit` found the cluster not ready or the audit not ok.
    #[error("{message}")]
    Problem { code: &'static str, message: String },
    /// A local file or directory could not be read or written, or is not what the command needs.
    #[error("{message}")]
    Local { code: &'static str, message: String },
}

fn retry_hint(key: Option<&str>) -> String {
    match key {
        Some(key) => format!(
            "; the outcome is unknown: retry with --idempotency-key {key} to learn it without a second effect"
        ),
        None => String::new(),
    }
}

impl CliError {
    /// The machine-readable code printed first on stderr (the server's own `code` when it gave one).
    pub fn code(&self) -> &str {
        match self {
            CliError::Refused { code, .. } | CliError::NoAnswer { code, .. } => code,
            CliError::MissingToken { .. } => "missing_token",
            CliError::BadUrl { .. } => "invalid_url",
            CliError::Unreachable { .. } => "unreachable",
            CliError::Problem { code, .. } | CliError::Local { code, .. } => code,
        }
    }

    pub fn exit_status(&self) -> u8 {
        match self {
            CliError::Refused { .. } => EXIT_REFUSED,
            CliError::MissingToken { .. } | CliError::BadUrl { .. } => EXIT_USAGE,
            CliError::Unreachable { .. } | CliError::NoAnswer { .. } => EXIT_NO_ANSWER,
            CliError::Problem { .. } => EXIT_PROBLEM,
            CliError::Local { .. } => EXIT_LOCAL,
        }
    }
}
