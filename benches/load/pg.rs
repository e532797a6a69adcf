//! The PostgreSQL baselines: a throwaway PostgreSQL server (`pg`), or a primary with two synchronous
//! streaming standbys (`pg3`), running the same purchase as one stored-procedure transaction, driven by
//! `pgbench` at the same concurrency levels as shopkeep.
//!
//! - `initdb` into a temporary directory (as the `postgres` user, or `nobody`, when the benchmark runs as
//!   root: PostgreSQL refuses to run as root), then `pg_ctl start` with `fsync = on`,
//!   `synchronous_commit = on`, `shared_buffers = 128MB`, enough `max_connections`; pgbench and psql
//!   reach the primary over a Unix socket in that directory (the fastest way in, which errs in
//!   PostgreSQL's favour). The single server listens on that socket only (no TCP port, so nothing can
//!   clash);
//! - `benches/pg/schema.sql` (tables, the plpgsql functions, `seed`), then `SELECT seed(users, credit)`,
//!   `VACUUM ANALYZE`, `CHECKPOINT`;
//! - with standbys (`pg3`): every server also listens on its own loopback port (free ports the kernel
//!   picked); after the seed, each standby is `pg_basebackup -R -X stream -C -S <name>` of the primary
//!   (a physical replication slot each, so a lagging standby cannot lose WAL) into its own data
//!   directory, started with `primary_conninfo` carrying `application_name` `s1` / `s2`; then the
//!   primary gets `synchronous_standby_names = 'ANY 1 (s1, s2)'` (with `synchronous_commit = on`: a
//!   commit returns once its WAL is flushed on the primary and on one standby, the durability of a
//!   3-member Raft majority), and the run starts only when `pg_stat_replication` shows both standbys
//!   `streaming` with `sync_state` `quorum`;
//! - per level, `pgbench -n -M prepared -c C -j min(C, cores) -T warm-up+seconds` with
//!   `benches/pg/purchase.pgbench`, per-transaction logs (`-l`): the percentiles are computed from the
//!   logs over the transactions started after the warm-up, as for shopkeep; `--rate` for the open-loop
//!   phase (pgbench then measures every latency from the transaction's scheduled start, so no
//!   coordinated omission); the five scripts with weights for the mix;
//! - errors: transactions pgbench reports failed, clients it aborted, and business rejections the
//!   functions stored under their idempotency keys (counted by SQL before and after each run);
//! - memory, per server (primary, then each standby): the peak, sampled every 0.5 s, of the sum of the
//!   proportional set size (`Pss`) of its postmaster and all its children: PostgreSQL is one process
//!   per connection sharing its buffers, so a per-process RSS would count the shared buffers once per
//!   backend;
//! - checks: the ledger on the primary; with standbys, each one (once it has replayed the primary's
//!   last WAL) must hold the same orders, postings and balances;
//! - every server is stopped (`pg_ctl stop -m immediate`) and the directory removed on drop, panics
//!   included, and on Ctrl-C.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::progress::Phase;
use crate::stats::{Stats, Tally};

const SCHEMA: &str = include_str!("../pg/schema.sql");
const PURCHASE: &str = include_str!("../pg/purchase.pgbench");
const TWO_STEP: &str = include_str!("../pg/two_step.pgbench");
const CREDIT: &str = include_str!("../pg/credit.pgbench");
const REFUND: &str = include_str!("../pg/refund.pgbench");
const READ: &str = include_str!("../pg/read.pgbench");

/// The mix's scripts: (kind, file name, script, weight). The kinds and weights are the shopkeep mix's.
pub const MIX: [(&str, &str, &str, u32); 5] = [
    ("purchase", "purchase.pgbench", PURCHASE, 60),
    ("two_step", "two_step.pgbench", TWO_STEP, 10),
    ("credit", "credit.pgbench", CREDIT, 10),
    ("refund", "refund.pgbench", REFUND, 10),
    ("read", "read.pgbench", READ, 10),
];

const DB_USER: &str = "bench";
/// The single server's port: only the name of its socket (it listens on no TCP port).
const SOCKET_PORT: u16 = 5432;
/// The standbys' names (their `application_name`, and their replication slots').
const STANDBY_NAMES: [&str; 2] = ["s1", "s2"];
/// How long the standbys get to stream in quorum, and to replay the primary's WAL before the check.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the PostgreSQL programs are.
pub struct PgBins {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    /// Only the standbys need it: without it, `pg` still runs and `pg3` is skipped.
    pg_basebackup: Result<PathBuf, String>,
    pgbench: PathBuf,
    psql: PathBuf,
}

/// Finds `initdb`, `pg_ctl`, `pgbench`, `psql` and (for the standbys) `pg_basebackup`: in `SHOPKEEP_BENCH_PG_BIN` if set,
/// else in `/usr/local/bin`, the newest `/usr/lib/postgresql/<version>/bin`, then `PATH`.
pub fn find_bins() -> Result<PgBins, String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("SHOPKEEP_BENCH_PG_BIN").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(dir));
    } else {
        dirs.push(PathBuf::from("/usr/local/bin"));
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<(u32, PathBuf)> = entries
                .flatten()
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse().ok()?;
                    Some((version, e.path().join("bin")))
                })
                .collect();
            versions.sort();
            dirs.extend(versions.into_iter().rev().map(|(_, dir)| dir));
        }
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
    }
    let find = |name: &str| {
        dirs.iter()
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| format!("no `{name}` in {dirs:?} (set SHOPKEEP_BENCH_PG_BIN)"))
    };
    Ok(PgBins {
        initdb: find("initdb")?,
        pg_ctl: find("pg_ctl")?,
        pg_basebackup: find("pg_basebackup"),
        pgbench: find("pgbench")?,
        psql: find("psql")?,
    })
}

/// One server of the deployment: the primary or a standby.
struct Instance {
    /// `primary`, `s1`, `s2`.
    name: &'static str,
    data: PathBuf,
    port: u16,
    started: bool,
}

/// A running throwaway PostgreSQL deployment, a primary and its standbys (none for `pg`); stopped and
/// removed on drop.
pub struct PgServer {
    bins: PgBins,
    /// (uid, gid) the servers run as when the benchmark runs as root.
    run_as: Option<(u32, u32)>,
    /// The primary first, then the standbys.
    instances: Vec<Instance>,
    /// The Ctrl-C cleanup (stop every server, remove the directory); 0: none.
    interrupt: u64,
    // Dropped after `Drop::drop` has stopped the servers, which removes the directory.
    dir: TempDir,
}

impl PgServer {
    /// initdb + start + schema + seed of `users` users with `credit` minor units each; then, with
    /// `standbys` (0 or up to 2), the standbys, streaming in a synchronous quorum of one.
    pub fn start(
        bins: PgBins,
        standbys: usize,
        max_connections: usize,
        users: usize,
        credit: u64,
    ) -> Result<PgServer, String> {
        assert!(
            standbys <= STANDBY_NAMES.len(),
            "at most {} standbys",
            STANDBY_NAMES.len()
        );
        if let (true, Err(e)) = (standbys > 0, &bins.pg_basebackup) {
            return Err(format!("the standbys need pg_basebackup: {e}"));
        }
        let dir = tempfile::Builder::new()
            .prefix("shopkeep-bench-pg-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let run_as = run_as()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| format!("cannot chown {}: {e}", dir.path().display()))?;
        }
        let ports = if standbys == 0 {
            vec![SOCKET_PORT]
        } else {
            free_ports(1 + standbys)?
        };
        let names = std::iter::once("primary").chain(STANDBY_NAMES.iter().copied().take(standbys));
        let instances = names
            .zip(ports)
            .map(|(name, port)| Instance {
                name,
                data: dir
                    .path()
                    .join(if name == "primary" { "data" } else { name }),
                port,
                started: false,
            })
            .collect();
        let mut server = PgServer {
            bins,
            run_as,
            instances,
            interrupt: 0,
            dir,
        };
        // Registered before anything starts: stopping a server that is not running fails harmlessly.
        let mut stops: Vec<Command> = (0..server.instances.len())
            .map(|i| server.stop_command(i))
            .collect();
        let dir = server.dir.path().to_path_buf();
        server.interrupt = crate::interrupt::on_interrupt(move || {
            for stop in stops.iter_mut().rev() {
                let _ = stop.status();
            }
            let _ = std::fs::remove_dir_all(&dir);
        });

        let mut initdb = server.server_command(&server.bins.initdb);
        initdb
            .arg("-D")
            .arg(&server.instances[0].data)
            .args(["-U", DB_USER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            // Only initdb's own files skip the fsync; the servers below run with fsync on.
            .arg("--no-sync");
        run(initdb, "initdb")?;
        let replication = if standbys == 0 {
            String::new()
        } else {
            // The defaults of PostgreSQL 15, spelled out: what streaming replication needs.
            "wal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\nhot_standby = on\n"
                .to_string()
        };
        let conf = format!(
            "\n# shopkeep load benchmark\nlisten_addresses = '{}'\nunix_socket_directories = '{}'\n\
             port = {}\nfsync = on\nsynchronous_commit = on\nfull_page_writes = on\n\
             shared_buffers = 128MB\nmax_connections = {max_connections}\n{replication}",
            if standbys == 0 { "" } else { "127.0.0.1" },
            server.dir.path().display(),
            server.instances[0].port,
        );
        append(&server.instances[0].data.join("postgresql.conf"), &conf)?;
        server.start_instance(0)?;

        let schema = server.dir.path().join("schema.sql");
        std::fs::write(&schema, SCHEMA).map_err(|e| format!("cannot write the schema: {e}"))?;
        let mut psql = server.psql_command(0);
        psql.arg("-f").arg(&schema);
        run(psql, "psql -f schema.sql")?;
        server.sql(&format!("SELECT seed({users}, {credit})"))?;
        server.sql("VACUUM ANALYZE")?;
        server.sql("CHECKPOINT")?;
        for (_, name, script, _) in MIX {
            std::fs::write(server.dir.path().join(name), script)
                .map_err(|e| format!("cannot write {name}: {e}"))?;
        }

        for i in 1..server.instances.len() {
            server.add_standby(i)?;
        }
        if standbys > 0 {
            let names = STANDBY_NAMES[..standbys].join(", ");
            server.sql(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 ({names})'"
            ))?;
            server.sql("SELECT pg_reload_conf()")?;
            server.wait_for_quorum()?;
        }
        Ok(server)
    }

    /// `pg_ctl start` of instance `i`, waiting until it accepts connections.
    fn start_instance(&mut self, i: usize) -> Result<(), String> {
        let instance = &self.instances[i];
        let log = self.dir.path().join(format!("{}.log", instance.name));
        let mut pg_ctl = self.server_command(&self.bins.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(&instance.data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"]);
        run(pg_ctl, &format!("pg_ctl start ({})", instance.name))?;
        self.instances[i].started = true;
        Ok(())
    }

    /// Instance `i` as a standby of the primary: a base backup over the replication protocol on
    /// loopback (`-R`: `standby.signal` and the connection settings; `-C -S`: its replication slot),
    /// its own port, its `application_name`, started.
    fn add_standby(&mut self, i: usize) -> Result<(), String> {
        let primary_port = self.instances[0].port;
        let (name, data, port) = {
            let s = &self.instances[i];
            (s.name, s.data.clone(), s.port)
        };
        let mut basebackup = self.server_command(self.bins.pg_basebackup.as_ref()?);
        basebackup
            .arg("-D")
            .arg(&data)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port.to_string(),
                "-U",
                DB_USER,
            ])
            .args(["-R", "-X", "stream", "-C", "-S", name, "--checkpoint=fast"])
            // Like initdb's --no-sync: only the copy skips the fsync, the standby runs with fsync on.
            .arg("--no-sync");
        run(basebackup, &format!("pg_basebackup ({name})"))?;
        // The copied postgresql.conf is the primary's; the later lines win.
        append(
            &data.join("postgresql.conf"),
            &format!("\n# standby {name}\nport = {port}\n"),
        )?;
        // -R wrote primary_conninfo to postgresql.auto.conf (read after postgresql.conf); this later
        // line adds the application_name the primary's synchronous_standby_names refers to.
        append(
            &data.join("postgresql.auto.conf"),
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={primary_port} user={DB_USER} application_name={name}'\n"
            ),
        )?;
        self.start_instance(i)
    }

    /// Waits until `pg_stat_replication` on the primary shows every standby streaming, in the quorum.
    fn wait_for_quorum(&self) -> Result<(), String> {
        let wanted: Vec<String> = self.instances[1..]
            .iter()
            .map(|s| format!("{}|streaming|quorum", s.name))
            .collect();
        let deadline = Instant::now() + REPLICATION_TIMEOUT;
        loop {
            let seen = self.sql(
                "SELECT application_name, state, sync_state FROM pg_stat_replication ORDER BY 1",
            )?;
            let rows: Vec<String> = seen
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if rows == wanted {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the standbys are not streaming in quorum after {REPLICATION_TIMEOUT:?}: \
                     pg_stat_replication shows {rows:?}, expected {wanted:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One line on where the servers listen, for the log.
    pub fn describe(&self) -> String {
        if self.instances.len() == 1 {
            return format!("socket {}", self.dir.path().display());
        }
        self.instances
            .iter()
            .map(|s| format!("{} on 127.0.0.1:{}", s.name, s.port))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `program` as the server's user (a no-op when not root), in the deployment's directory.
    fn server_command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// CPU seconds the servers used so far: each postmaster's, its exited children's (the backends of
    /// finished pgbench runs, the WAL senders), and its live children's (checkpointer, WAL writer, …).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let mut total = 0.0;
        for instance in &self.instances {
            let postmaster = postmaster_pid(&instance.data)?;
            total += crate::cpu::process_cpu_seconds(&postmaster.to_string(), true)?;
            for pid in crate::cpu::children_of(postmaster) {
                total += crate::cpu::process_cpu_seconds(&pid.to_string(), false).unwrap_or(0.0);
            }
        }
        Some(total)
    }

    /// `pg_ctl stop -m immediate` of instance `i`: the deployment is thrown away, nothing to flush.
    fn stop_command(&self, i: usize) -> Command {
        let mut command = self.server_command(&self.bins.pg_ctl);
        command
            .arg("-D")
            .arg(&self.instances[i].data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// psql on instance `i`'s socket.
    fn psql_command(&self, i: usize) -> Command {
        let mut command = Command::new(&self.bins.psql);
        command
            .arg("-X")
            .args(["-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.instances[i].port.to_string()])
            .args(["-U", DB_USER, "-d", "postgres"])
            .stdin(Stdio::null());
        command
    }

    /// Runs `sql` with psql on the primary; its unaligned output.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        self.sql_on(0, sql)
    }

    /// Runs `sql` with psql on instance `i`; its unaligned output.
    fn sql_on(&self, i: usize, sql: &str) -> Result<String, String> {
        let mut psql = self.psql_command(i);
        psql.args(["-c", sql]);
        run(psql, "psql")
    }

    /// Business rejections stored so far, by (kind, status): the idempotency rows whose status is not
    /// a success. The kind comes from the key's prefix (see the pgbench scripts).
    pub fn rejections(&self) -> Result<BTreeMap<(String, String), u64>, String> {
        let text = self.sql(
            "SELECT CASE WHEN key ~ '^pg-[0-9]' THEN 'purchase' \
                         WHEN key LIKE 'pg-c-%' OR key LIKE 'pg-d-%' THEN 'two_step' \
                         WHEN key LIKE 'pg-r-%' THEN 'credit' \
                         WHEN key LIKE 'pg-f-%' THEN 'refund' ELSE 'other' END, \
                    status, count(*) \
             FROM idempotency WHERE status NOT IN (200, 201) GROUP BY 1, 2",
        )?;
        let mut counts = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let parts: Vec<&str> = line.split('|').collect();
            if let [kind, status, count] = parts[..] {
                counts.insert(
                    (kind.to_string(), status.to_string()),
                    count.trim().parse().unwrap_or(0),
                );
            }
        }
        Ok(counts)
    }

    /// Checks the ledger on the primary: every wallet's balance and held equal its newest posting's,
    /// and no balance is negative or below what is held; then each standby, once it has replayed the
    /// primary's WAL so far, must hold the same orders, postings and balances. One (line, ok) each.
    pub fn check(&self, label: &str) -> Vec<(String, bool)> {
        let query = "SELECT \
              (SELECT count(*) FROM users u WHERE ROW(u.balance, u.held) IS DISTINCT FROM \
                 (SELECT ROW(p.balance_after, p.held_after) FROM postings p \
                  WHERE p.user_id = u.user_id ORDER BY p.user_seq DESC LIMIT 1)), \
              (SELECT count(*) FROM users WHERE balance < 0 OR held > balance), \
              (SELECT count(*) FROM orders), \
              (SELECT count(*) FROM postings)";
        let ledger = match self.sql(query) {
            Ok(text) => {
                let parts: Vec<u64> = text
                    .trim()
                    .split('|')
                    .map(|p| p.trim().parse().unwrap_or(u64::MAX))
                    .collect();
                match parts[..] {
                    [0, 0, orders, postings] => (
                        format!(
                            "{label}: ledger ok ({orders} orders, {postings} postings; balances equal their last posting)"
                        ),
                        true,
                    ),
                    _ => (format!("{label}: ledger MISMATCH: {}", text.trim()), false),
                }
            }
            Err(e) => (format!("{label}: ledger check failed: {e}"), false),
        };
        let mut checks = vec![ledger];
        if self.instances.len() > 1 {
            checks.push(self.check_standbys(label));
        }
        checks
    }

    /// Every standby, once it has replayed the primary's current WAL position, against the primary:
    /// the same count of orders and postings, the same sum of balances and of held amounts.
    fn check_standbys(&self, label: &str) -> (String, bool) {
        const DIGEST: &str = "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM postings), \
                              (SELECT sum(balance) FROM users), (SELECT sum(held) FROM users)";
        let primary = match self
            .sql("SELECT pg_current_wal_lsn()")
            .and_then(|lsn| Ok((lsn.trim().to_string(), self.sql(DIGEST)?)))
        {
            Ok(found) => found,
            Err(e) => return (format!("{label}: standby check failed: {e}"), false),
        };
        let (lsn, digest) = primary;
        let mut problems = Vec::new();
        for (i, standby) in self.instances.iter().enumerate().skip(1) {
            let deadline = Instant::now() + REPLICATION_TIMEOUT;
            let caught_up = loop {
                let replayed = self.sql_on(
                    i,
                    &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
                );
                match replayed.as_deref().map(str::trim) {
                    Ok("t") => break Ok(()),
                    Ok(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Ok(other) => {
                        break Err(format!(
                            "not at {lsn} after {REPLICATION_TIMEOUT:?} ({other})"
                        ));
                    }
                    Err(e) => break Err(e.clone()),
                }
            };
            let outcome = caught_up.and_then(|()| self.sql_on(i, DIGEST));
            match outcome {
                Ok(theirs) if theirs.trim() == digest.trim() => {}
                Ok(theirs) => problems.push(format!(
                    "{} has {} where the primary has {}",
                    standby.name,
                    theirs.trim(),
                    digest.trim()
                )),
                Err(e) => problems.push(format!("{}: {e}", standby.name)),
            }
        }
        let names: Vec<&str> = self.instances[1..].iter().map(|s| s.name).collect();
        if problems.is_empty() {
            (
                format!(
                    "{label}: standbys {} replayed up to {lsn}: same orders, postings and balance sums as the primary ({})",
                    names.join(", "),
                    digest.trim()
                ),
                true,
            )
        } else {
            (
                format!("{label}: standbys MISMATCH: {}", problems.join("; ")),
                false,
            )
        }
    }

    /// Runs pgbench for `seconds` (rounded up to whole seconds: pgbench's `-T`), clients `clients`,
    /// over the scripts `scripts` (names written by `start`, with weights), optionally at a fixed
    /// `rate`; returns its transactions per script, from its per-transaction logs.
    pub fn pgbench(
        &self,
        run_name: &str,
        clients: usize,
        seconds: f64,
        rate: Option<f64>,
        scripts: &[(&str, u32)],
        phase: &Phase,
    ) -> Result<PgbenchRun, String> {
        let log_dir = self.dir.path().join(format!("log-{run_name}"));
        std::fs::create_dir_all(&log_dir).map_err(|e| format!("cannot create {log_dir:?}: {e}"))?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = clients.min(cores).max(1);
        let mut command = Command::new(&self.bins.pgbench);
        command
            .current_dir(&log_dir)
            .args(["-n", "-M", "prepared", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.instances[0].port.to_string(), "-U", DB_USER])
            .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
            .args(["-T", &(seconds.ceil() as u64).max(1).to_string()])
            .args(["-D", &format!("users={}", crate::USERS)])
            .args(["-D", &format!("nclients={clients}")])
            .args(["-l", "--log-prefix=txn", "--progress=1"]);
        if let Some(rate) = rate {
            command.arg(format!("--rate={rate:.1}"));
        }
        for (name, weight) in scripts {
            command
                .arg("-f")
                .arg(format!("{}@{weight}", self.dir.path().join(name).display()));
        }
        command
            .arg("postgres")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start pgbench: {e}"))?;

        // stderr: progress lines ("progress: 3.0 s, 2810.0 tps, …") feed the progress bar; the rest is
        // kept for the report (e.g. "client 3 aborted in command 2").
        let stderr = child.stderr.take().expect("stderr was piped");
        let ops = phase.ops.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut other = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                match progress_tps(&line) {
                    Some(tps) => {
                        ops.fetch_add(tps.round() as u64, Ordering::Relaxed);
                    }
                    None => other.push(line),
                }
            }
            other
        });
        let mut stdout = child.stdout.take().expect("stdout was piped");
        let stdout_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let sampler = MemorySampler::start(
            &self
                .instances
                .iter()
                .map(|s| s.data.as_path())
                .collect::<Vec<_>>(),
        );
        let status = child
            .wait()
            .map_err(|e| format!("cannot wait for pgbench: {e}"))?;
        let peak_pss_kib = sampler.stop();
        let stderr_lines = stderr_reader.join().unwrap_or_default();
        let summary = stdout_reader.join().unwrap_or_default();

        let mut transactions = Vec::new();
        let mut failed_lines = 0u64;
        for entry in std::fs::read_dir(&log_dir).map_err(|e| format!("{log_dir:?}: {e}"))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{path:?}: {e}"))?;
            for line in text.lines() {
                match parse_log_line(line) {
                    Some(txn) => transactions.push(txn),
                    None => failed_lines += 1,
                }
            }
        }
        let aborted: Vec<String> = stderr_lines
            .iter()
            .filter(|l| l.contains("aborted"))
            .cloned()
            .collect();
        if !status.success() && transactions.is_empty() {
            return Err(format!(
                "pgbench failed ({status}): {}\n{summary}",
                stderr_lines.join("\n")
            ));
        }
        Ok(PgbenchRun {
            transactions,
            failed: failed_lines,
            aborted_clients: aborted.len() as u64,
            problems: if status.success() {
                aborted
            } else {
                let mut lines = aborted;
                lines.push(format!("pgbench exited with {status}"));
                lines
            },
            peak_pss_kib,
        })
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        crate::interrupt::forget_interrupt(self.interrupt);
        // The standbys first: a primary stopped before them would only make them log reconnects.
        for i in (0..self.instances.len()).rev() {
            if self.instances[i].started {
                let _ = self.stop_command(i).status();
            }
        }
    }
}

/// One transaction of a pgbench log: which script, when it started (scheduled start under `--rate`)
/// and how long it took, in microseconds.
pub struct Txn {
    pub script: usize,
    pub start_us: i64,
    pub latency_us: u64,
}

pub struct PgbenchRun {
    pub transactions: Vec<Txn>,
    /// Log lines of failed (or skipped) transactions.
    pub failed: u64,
    pub aborted_clients: u64,
    /// pgbench's complaints, for the report.
    pub problems: Vec<String>,
    /// Per server (the primary, then each standby): the peak Σ Pss over the run, KiB.
    pub peak_pss_kib: Vec<Option<u64>>,
}

impl PgbenchRun {
    /// The transactions started in [warm-up, warm-up + duration) after the first one started, per
    /// script, with the elapsed time of that window (until the last of them ended).
    pub fn measured(
        &self,
        warm_up: Duration,
        duration: Duration,
        scripts: usize,
    ) -> (Vec<Tally>, f64) {
        let mut tallies: Vec<Tally> = (0..scripts).map(|_| Tally::default()).collect();
        let Some(t0) = self.transactions.iter().map(|t| t.start_us).min() else {
            return (tallies, duration.as_secs_f64());
        };
        let from = t0 + warm_up.as_micros() as i64;
        let until = from + duration.as_micros() as i64;
        let mut last_end = from;
        for txn in &self.transactions {
            if txn.start_us >= from && txn.start_us < until {
                if let Some(tally) = tallies.get_mut(txn.script) {
                    tally.latencies_us.push(txn.latency_us);
                }
                last_end = last_end.max(txn.start_us + txn.latency_us as i64);
            }
        }
        let elapsed = ((last_end - from) as f64 / 1e6).max(duration.as_secs_f64() * 0.5);
        (tallies, elapsed)
    }
}

/// `client_id transaction_no time script_no time_epoch time_us [schedule_lag]`; `None` for a failed
/// or skipped transaction (its time is a word). Under `--rate`, pgbench's `time` is measured from the
/// scheduled start (it includes the schedule lag), so the start is `end - time` either way.
fn parse_log_line(line: &str) -> Option<Txn> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 6 {
        return None;
    }
    let latency_us: u64 = fields[2].parse().ok()?;
    let script: usize = fields[3].parse().ok()?;
    let epoch: i64 = fields[4].parse().ok()?;
    let micros: i64 = fields[5].parse().ok()?;
    let end = epoch * 1_000_000 + micros;
    Some(Txn {
        script,
        start_us: end - latency_us as i64,
        latency_us,
    })
}

fn progress_tps(line: &str) -> Option<f64> {
    let rest = line.strip_prefix("progress: ")?;
    let tps = rest.split(", ").nth(1)?.strip_suffix(" tps")?;
    tps.parse().ok()
}

/// Summarises pgbench's view of a run: failures and aborted clients become error buckets.
pub fn add_failures(stats: &mut Stats, run: &PgbenchRun) {
    if run.failed > 0 {
        *stats.by_status.entry("failed".into()).or_default() += run.failed;
        stats.errors += run.failed;
    }
    if run.aborted_clients > 0 {
        *stats.by_status.entry("aborted-client".into()).or_default() += run.aborted_clients;
        stats.errors += run.aborted_clients;
    }
}

/// (uid, gid) to run the server as: `None` unless this process is root (PostgreSQL refuses root); then
/// the `postgres` user, else `nobody`.
fn run_as() -> Result<Option<(u32, u32)>, String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u32>().ok());
    if euid != Some(0) {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == name {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    return Ok(Some((uid, gid)));
                }
            }
        }
    }
    Err("running as root, and there is neither a `postgres` nor a `nobody` user to run PostgreSQL as".into())
}

fn run(mut command: Command, what: &str) -> Result<String, String> {
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(stdout)
}

/// `count` distinct free loopback ports: all bound at once (so they differ), released on return, right
/// before the servers take them.
fn free_ports(count: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot read a bound port: {e}"))
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot append to {}: {e}", path.display()))
}

/// Samples Σ Pss of each server (its postmaster and its children) every 0.5 s; `stop` returns each
/// server's peak (KiB), in the order given.
struct MemorySampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Vec<AtomicU64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemorySampler {
    fn start(data_dirs: &[&Path]) -> MemorySampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Arc<Vec<AtomicU64>> =
            Arc::new(data_dirs.iter().map(|_| AtomicU64::new(0)).collect());
        let pids: Vec<Option<u32>> = data_dirs.iter().map(|d| postmaster_pid(d)).collect();
        let thread = {
            let (stop, peaks) = (stop.clone(), peaks.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (pid, peak) in pids.iter().zip(peaks.iter()) {
                        if let Some(total) = pid.and_then(total_pss_kib) {
                            peak.fetch_max(total, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        };
        MemorySampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<Option<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peaks
            .iter()
            .map(|p| Some(p.load(Ordering::Relaxed)).filter(|&kib| kib > 0))
            .collect()
    }
}

/// Σ Pss (KiB) of `postmaster` and its children (`/proc/<pid>/smaps_rollup`).
fn total_pss_kib(postmaster: u32) -> Option<u64> {
    let mut total = pss_kib(postmaster)?;
    for pid in crate::cpu::children_of(postmaster) {
        total += pss_kib(pid).unwrap_or(0);
    }
    Some(total)
}

fn postmaster_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next()?.trim().parse().ok())
}

fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}
