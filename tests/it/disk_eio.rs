//! I/O errors and failed fsyncs (EIO) on real processes. An `LD_PRELOAD` shim (`fault_shim/eio.c`, built
//! with `cc` at first use) makes `fsync`/`fdatasync` or the write calls fail with EIO on one file of a
//! running node's data directory, from the moment a trigger file appears. The node must stop at once
//! (SIGABRT, one `FATAL:` line naming the file) without acknowledging the write that met the error, and a
//! restart must find every acknowledged write, each once, and a sound audit.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::harness::*;

/// The shim, compiled once per test process into Cargo's temporary directory for integration tests.
pub fn libeio() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fault_shim/eio.c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault_shim");
        std::fs::create_dir_all(&dir).expect("shim dir");
        // Built under a name of its own, then renamed: another test process may be loading the library.
        let built = dir.join(format!("libeio-{}.so", std::process::id()));
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&built)
            .arg(&source)
            .arg("-ldl")
            .output()
            .expect("run cc (a C compiler is needed to build the fault shim)");
        assert!(
            out.status.success(),
            "cc failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = dir.join("libeio.so");
        std::fs::rename(&built, &lib).expect("install the shim");
        lib
    })
}

/// Which calls fail on which file.
#[derive(Clone, Copy, Debug)]
struct Fault {
    /// A substring of the file's path.
    file: &'static str,
    /// `fsync` (fsync, fdatasync) or `write` (the write calls).
    ops: &'static str,
    /// The operation `fail_stop` names in its line.
    logged_as: &'static str,
}

/// How long after arming a fault the node must have stopped: a shard file is fsynced only once per
/// `DEFAULT_DURABLE_EVERY`, then the write loop's own pace under a loaded CI.
const DETECTED_WITHIN: Duration =
    Duration::from_secs(shopkeep::state::DEFAULT_DURABLE_EVERY.as_secs() + 10);

/// Every append is synced in the log's write-ahead file before it is acknowledged.
const LOG_FSYNC: Fault = Fault {
    file: "raft-log.wal",
    ops: "fsync",
    logged_as: "fsync",
};
/// The log's redb file is synced at its checkpoints (at most a second apart while the log is written).
const LOG_CHECKPOINT_FSYNC: Fault = Fault {
    file: "raft-log.redb",
    ops: "fsync",
    logged_as: "fsync",
};
const SHARD_FSYNC: Fault = Fault {
    file: "shard-000.redb",
    ops: "fsync",
    logged_as: "fsync",
};
const LOG_WRITE: Fault = Fault {
    file: "raft-log.wal",
    ops: "write",
    logged_as: "a write",
};

/// A credit request, kept to be retried with the same key after the restart.
#[derive(Clone, Debug)]
struct Credit {
    user: String,
    cents: i64,
    key: String,
    external_ref: String,
}

impl Credit {
    fn new(user: &str, cents: i64) -> Credit {
        Credit {
            user: user.to_owned(),
            cents,
            key: new_key(),
            external_ref: format!("ext-{}", new_key()),
        }
    }

    async fn send(&self, api: &Api) -> Result<Resp, reqwest::Error> {
        api.call(Method::POST, &format!("/v1/users/{}/credits", self.user))
            .auth(Auth::Service)
            .key(&self.key)
            .json(
                &json!({"amount": money(self.cents), "external_ref": self.external_ref,
                          "source": "card"}),
            )
            .try_send()
            .await
    }
}

/// What one run of [`fail_and_recover`] saw.
struct Outcome {
    /// Writes acknowledged after the trigger appeared (before the node stopped).
    acknowledged_after_arming: usize,
    detect: Duration,
    recover: Duration,
}

/// Starts a single node (one shard: every user on `shard-000.redb`) under the shim for `fault`, makes
/// acknowledged credits, arms the trigger and keeps writing until a write is not acknowledged. The node
/// must then abort with one `FATAL:` line naming the file; restarted (disarmed), it must hold every
/// acknowledged credit once, give the unanswered one a single outcome on retry, and pass the audit.
async fn fail_and_recover(fault: Fault) -> Outcome {
    let trigger_dir = tempfile::tempdir().expect("trigger dir");
    let trigger = trigger_dir.path().join("armed");
    let mut srv = Server::start_with(
        Opts::new()
            .shards(1)
            // No background sweeps: every write to the files is a test request's.
            .sweep_interval("1h")
            .env("LD_PRELOAD", &libeio().display().to_string())
            .env("SHOPKEEP_EIO_PATH", fault.file)
            .env("SHOPKEEP_EIO_TRIGGER", &trigger.display().to_string())
            .env("SHOPKEEP_EIO_OPS", fault.ops),
    )
    .await;
    assert!(
        srv.data_dir().join(fault.file).exists(),
        "no {} in the data dir",
        fault.file
    );
    let users: Vec<String> = (0..3).map(|_| uniq("eio")).collect();
    let mut acknowledged: Vec<Credit> = Vec::new();
    for user in &users {
        srv.create_user(user).await;
        for cents in [1_000, 250, 7] {
            let credit = Credit::new(user, cents);
            credit.send(&srv).await.expect("credit").expect(201);
            acknowledged.push(credit);
        }
    }

    std::fs::write(&trigger, b"").expect("arm");
    let armed = Instant::now();
    let before = acknowledged.len();
    let mut unanswered = None;
    for i in 0..10_000 {
        let credit = Credit::new(&users[i % users.len()], 1 + i as i64);
        match credit.send(&srv).await {
            Ok(r) if r.status == 201 => acknowledged.push(credit),
            other => {
                // Not acknowledged: the connection dropped, or a 5xx.
                if let Ok(r) = &other {
                    assert!(r.status >= 500, "a write met EIO answered {r:?}");
                }
                unanswered = Some((credit, other));
                break;
            }
        }
        assert!(
            armed.elapsed() < DETECTED_WITHIN,
            "{} writes acknowledged within {DETECTED_WITHIN:?} of arming: the fault did not stop the node",
            acknowledged.len() - before
        );
    }
    let (unanswered, answer) = unanswered.expect("a write was not acknowledged");
    let acknowledged_after_arming = acknowledged.len() - before;
    let status = srv.wait_exit(Duration::from_secs(10)).await;
    let detect = armed.elapsed();
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(libc::SIGABRT),
        "the node did not abort: {status:?} (the write: {answer:?})\n{}",
        tail(&srv.logs(), 40)
    );
    let logs = srv.logs();
    let fatal: Vec<&str> = logs.lines().filter(|l| l.contains("FATAL:")).collect();
    assert_eq!(fatal.len(), 1, "one FATAL line: {fatal:#?}");
    let expected = format!("FATAL: {} of ", fault.logged_as);
    assert!(
        fatal[0].contains(&expected)
            && fatal[0].contains(fault.file)
            && fatal[0].contains("Input/output error")
            && fatal[0].contains("stopping the node"),
        "the FATAL line should name the {} of {} and EIO: {}",
        fault.logged_as,
        fault.file,
        fatal[0]
    );

    // Disarmed (the shim stays loaded and passes every call through), the node recovers by a restart.
    std::fs::remove_file(&trigger).expect("disarm");
    let restarted = Instant::now();
    srv.restart().await;
    let probe = Credit::new(&users[0], 1);
    loop {
        match probe.send(&srv).await {
            Ok(r) if r.status == 201 => break,
            other => assert!(
                restarted.elapsed() < Duration::from_secs(20),
                "no write succeeded within 20 s of the restart: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recover = restarted.elapsed();
    acknowledged.push(probe);

    // The unanswered write may or may not have reached the log: its retry gets the one outcome.
    let retry = unanswered.send(&srv).await.expect("retry");
    assert_eq!(
        retry.expect(201)["amount"],
        money(unanswered.cents),
        "{retry:?}"
    );
    let unanswered_was_logged = retry.replayed();
    acknowledged.push(unanswered);

    let mut expected: BTreeMap<&str, (i64, usize)> = BTreeMap::new();
    for credit in &acknowledged {
        let (sum, count) = expected.entry(&credit.user).or_default();
        *sum += credit.cents;
        *count += 1;
    }
    for (user, (sum, count)) in expected {
        assert_eq!(srv.wallet(user).await.balance, sum, "balance of {user}");
        let credits = srv
            .all_ledger(user)
            .await
            .iter()
            .filter(|e| e["kind"] == "credit")
            .count();
        assert_eq!(credits, count, "credits of {user}: each once");
    }
    srv.audit_ok().await;
    let outcome = Outcome {
        acknowledged_after_arming,
        detect,
        recover,
    };
    eprintln!(
        "EIO on {} of {}: detected (armed → exit) in {:?} after {} acknowledged writes; recovered \
         (restart → first acknowledged write) in {:?}; nothing acknowledged lost; the retry of the \
         unanswered write {}",
        fault.ops,
        fault.file,
        outcome.detect,
        outcome.acknowledged_after_arming,
        outcome.recover,
        if unanswered_was_logged {
            "replayed its logged outcome"
        } else {
            "applied it anew"
        }
    );
    outcome
}

#[tokio::test]
async fn a_failed_fsync_of_the_raft_log_stops_the_node_and_a_restart_loses_nothing_acknowledged() {
    let outcome = fail_and_recover(LOG_FSYNC).await;
    // Every append is fsynced before its answer: the first write after the failure is not acknowledged.
    assert_eq!(outcome.acknowledged_after_arming, 0);
}

#[tokio::test]
async fn a_failed_fsync_of_a_raft_log_checkpoint_stops_the_node_and_a_restart_loses_nothing_acknowledged()
 {
    // The writes answered before the checkpoint's failed fsync are durable in the write-ahead file only,
    // and are found after the restart.
    fail_and_recover(LOG_CHECKPOINT_FSYNC).await;
}

#[tokio::test]
async fn a_failed_fsync_of_a_shard_commit_stops_the_node_and_a_restart_loses_nothing_acknowledged()
{
    // A shard commit is fsynced only once `DEFAULT_DURABLE_EVERY` has passed since the last such commit
    // (the log holds the rest): the writes answered before the failed fsync are durable in the log only, and are found
    // after the restart. The failed commit may be the unanswered write's, or another entry's applied
    // before that write was logged (its retry then applies it anew).
    fail_and_recover(SHARD_FSYNC).await;
}

#[tokio::test]
async fn an_io_error_writing_the_raft_log_stops_the_node_and_a_restart_loses_nothing_acknowledged()
{
    let outcome = fail_and_recover(LOG_WRITE).await;
    assert_eq!(outcome.acknowledged_after_arming, 0);
}
