//! The one launcher of `shopkeep serve` processes under test, shared by both integration-test harnesses
//! (`harness.rs`: one node; `cluster_harness.rs`: a cluster behind proxies) and the load bench
//! (`benches/load/nodes.rs`). The bench includes this very file, with
//! `#[path = "../../tests/it/launcher.rs"] mod launcher;`, rather than keep a copy: one place decides how
//! a node under test starts, what it inherits, where its output goes and how it stops. Hence std only
//! (no tokio, no test-crate helper): the blocking waits suit a thread (`spawn_blocking` in the tests),
//! [`Process::poll_listening`] suits an async loop.
//!
//! A launch is `shopkeep serve --data-dir <dir> --listen <address> <args…>` (the binary Cargo built for
//! the test or bench target), with
//! - every inherited `SHOPKEEP_*` variable removed (each flag has such a twin, so a developer's shell
//!   must not reach the node), `RUST_LOG=warn`, then the caller's variables in order;
//! - stdin null, stderr to a file, stdout copied line by line to a file and, until the listening line
//!   has been seen, to a channel that [`Process::wait_listening`] (bounded) reads for the URL; a
//!   failure to start is a [`LaunchError`] carrying the tails of both logs;
//! - [`Process::terminate`]: SIGTERM and a bounded wait; [`Process::kill`] (and drop): SIGKILL and reap.
//!
//! What stays with the callers: ports (ephemeral or fixed), peers and proxies, flags and secrets, the
//! names of the log files, `/readyz`, pause and resume, Ctrl-C cleanup, reading `/proc`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// What the server prints on stdout once it serves, followed by its URL (`http://…`).
pub const LISTENING: &str = "shopkeep listening on ";
/// How much of each log an error carries.
const STDOUT_TAIL_LINES: usize = 40;
const STDERR_TAIL_LINES: usize = 60;
/// How often [`Process::terminate`] looks whether the process has exited.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// How to start one `shopkeep serve` process.
#[derive(Debug)]
pub struct Launch {
    data_dir: PathBuf,
    listen: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
}

impl Launch {
    /// Serving `data_dir` on `listen` (`127.0.0.1:0`: a port the kernel picks), stdout and stderr written
    /// to these files (created, or truncated).
    pub fn new(data_dir: &Path, listen: &str, stdout_log: &Path, stderr_log: &Path) -> Launch {
        Launch {
            data_dir: data_dir.to_path_buf(),
            listen: listen.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            stdout_log: stdout_log.to_path_buf(),
            stderr_log: stderr_log.to_path_buf(),
        }
    }

    /// One more flag (or value) after `--listen`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Launch {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Launch {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// One environment variable, set after the inherited `SHOPKEEP_*` ones are removed and after
    /// `RUST_LOG=warn` (so it may override that).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    pub fn envs<I, K, V>(self, vars: I) -> Launch
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        vars.into_iter()
            .fold(self, |launch, (k, v)| launch.env(k, v))
    }

    /// The command line and environment (no stdio yet).
    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shopkeep"));
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.listen)
            .args(&self.args);
        // Nothing from the caller's own environment leaks in (every flag has a SHOPKEEP_* twin).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SHOPKEEP_") {
                command.env_remove(&key);
            }
        }
        command.env("RUST_LOG", "warn");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command
    }

    /// Starts the process; it is not serving yet (see [`Process::wait_listening`]).
    pub fn spawn(&self) -> io::Result<Process> {
        let stderr = File::create(&self.stderr_log)?;
        let mut stdout_log = File::create(&self.stdout_log)?;
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("the child's stdout was not piped"))?;
        // One thread reads stdout for the whole life of the process (so the pipe never fills up): every
        // line to the log, and to the channel while someone listens there.
        let (lines_tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = stdout_log.write_all(line.as_bytes());
                        // Gone once the listening line was seen: keep logging regardless.
                        let _ = lines_tx.send(line.trim_end().to_string());
                    }
                }
            }
        });
        Ok(Process {
            child,
            lines: Some(lines),
            url: None,
            started: Instant::now(),
            stdout_log: self.stdout_log.clone(),
            stderr_log: self.stderr_log.clone(),
        })
    }
}

/// A started `shopkeep serve` process; SIGKILLed and reaped on drop.
pub struct Process {
    child: Child,
    /// Stdout's lines, until the listening line.
    lines: Option<Receiver<String>>,
    /// The URL of the listening line, once seen.
    url: Option<String>,
    started: Instant,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
}

/// Why a process did not start or stop as asked, with the tails of its logs.
#[derive(Debug)]
pub struct LaunchError {
    reason: String,
    stdout_tail: String,
    stderr_tail: String,
}

impl LaunchError {
    /// The reason alone (e.g. `exited before it listened (exit status: 1)`), without the logs.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shopkeep {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.reason, self.stdout_tail, self.stderr_tail
        )
    }
}

impl std::error::Error for LaunchError {}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process prints its listening line, at most until `deadline`: its URL (no trailing
    /// `/`). On an error the process has been killed (if it still ran) and reaped.
    pub fn wait_listening(&mut self, deadline: Instant) -> Result<String, LaunchError> {
        loop {
            if let Some(url) = &self.url {
                return Ok(url.clone());
            }
            let Some(lines) = &self.lines else {
                return Err(self.fail("is not running".into()));
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => self.see(&line)?,
                Err(RecvTimeoutError::Timeout) => {
                    let waited = self.started.elapsed();
                    return Err(self.fail(format!(
                        "printed no `{LISTENING}http://…` line within {waited:.1?} (killed)"
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.stdout_closed()),
            }
        }
    }

    /// The URL if the listening line has been printed by now, `None` if not yet; never blocks. An error
    /// if the process exited first (it has then been reaped).
    pub fn poll_listening(&mut self) -> Result<Option<String>, LaunchError> {
        loop {
            if let Some(url) = &self.url {
                return Ok(Some(url.clone()));
            }
            let Some(lines) = &self.lines else {
                return Err(self.fail("is not running".into()));
            };
            match lines.try_recv() {
                Ok(line) => self.see(&line)?,
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => return Err(self.stdout_closed()),
            }
        }
    }

    /// One stdout line while waiting: the listening line sets the URL (and closes the channel).
    fn see(&mut self, line: &str) -> Result<(), LaunchError> {
        let Some(at) = line.find(LISTENING) else {
            return Ok(());
        };
        let url = line[at + LISTENING.len()..].trim().trim_end_matches('/');
        if !url.starts_with("http://") {
            return Err(self.fail(format!("printed an unexpected listening line: {line}")));
        }
        self.url = Some(url.to_string());
        self.lines = None;
        Ok(())
    }

    /// Stdout ended before the listening line: the process exited (or is about to).
    fn stdout_closed(&mut self) -> LaunchError {
        let reason = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited before it listened ({status})"),
            _ => "closed its stdout before it listened (killed)".to_string(),
        };
        self.fail(reason)
    }

    /// Kills and reaps the process (if it still runs): the error, with the logs' tails.
    fn fail(&mut self, reason: String) -> LaunchError {
        self.kill();
        self.lines = None;
        LaunchError {
            reason,
            stdout_tail: tail_of_file(&self.stdout_log, STDOUT_TAIL_LINES),
            stderr_tail: tail_of_file(&self.stderr_log, STDERR_TAIL_LINES),
        }
    }

    /// The last lines of both logs, for messages.
    pub fn log_tails(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            tail_of_file(&self.stdout_log, STDOUT_TAIL_LINES),
            tail_of_file(&self.stderr_log, STDERR_TAIL_LINES)
        )
    }

    /// Its exit status if it has exited (and is now reaped), without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Sends a signal (`TERM`, `STOP`, `CONT`…) with `kill(1)`.
    pub fn signal(&self, signal: &str) -> io::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "kill -{signal} {}: {status}",
                self.pid()
            )))
        }
    }

    /// SIGTERM, then waits (≤ `within`) for the process to exit: its status. If it does not exit in time
    /// it is SIGKILLed, reaped, and the error says so.
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus, LaunchError> {
        if let Err(e) = self.signal("TERM") {
            return Err(self.fail(format!("could not be sent SIGTERM: {e}")));
        }
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(EXIT_POLL),
                Ok(None) => {
                    return Err(self.fail(format!(
                        "did not exit within {within:?} of SIGTERM (killed)"
                    )));
                }
                Err(e) => return Err(self.fail(format!("cannot be waited for: {e}"))),
            }
        }
    }

    /// SIGKILL (if it still runs) and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a file (empty if it cannot be read).
fn tail_of_file(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
