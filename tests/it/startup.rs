//! Starting a node: an unusable cluster configuration is refused, said why, and nothing is served; the
//! settings fixed in a data directory (its shards) are kept across restarts.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Auth, Opts, Server};

/// Runs `shopkeep serve` with `args` and `env`; expects it to exit non-zero within 10 s. Returns stderr.
fn refused_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    refused_start_at(&dir.path().join("data"), args, env)
}

/// [`refused_start`] with the data directory `data`.
fn refused_start_at(data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shopkeep"));
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("SHOPKEEP_CLUSTER_SECRET")
        .env_remove("SHOPKEEP_ADMIN_TOKEN")
        .env_remove("SHOPKEEP_SERVICE_TOKEN")
        .env_remove("SHOPKEEP_PSP_SECRET")
        .env_remove("SHOPKEEP_TOKEN_SECRET")
        .env_remove("SHOPKEEP_PEERS")
        .env_remove("SHOPKEEP_NODE_ID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn shopkeep");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shopkeep {args:?} kept running; it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!status.success(), "{args:?} started: {stdout}");
    assert!(
        !stdout.contains("listening"),
        "{args:?} served before refusing: {stdout}"
    );
    stderr
}

#[test]
fn a_cache_of_less_than_one_mib_per_shard_is_refused_before_the_data_directory_is_made() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let stderr = refused_start_at(&data, &["--shards", "8", "--cache-mib", "7"], &[]);
    assert!(
        stderr.contains("--cache-mib 7") && stderr.contains("at least 8"),
        "{stderr}"
    );
    assert!(!data.exists(), "the refused start made {}", data.display());
    let stderr = refused_start(&["--cache-mib", "0"], &[]);
    assert!(stderr.contains("--cache-mib"), "{stderr}");
}

const PEERS: &str = "1=127.0.0.1:1,2=127.0.0.1:2,3=127.0.0.1:3";
const STRONG_SECRET: &str = "startup-test-cluster-secret-0123456789";
const STRONG_TOKEN: &str = "startup-test-admin-token-0123456789abc";

#[test]
fn a_cluster_member_without_the_cluster_secret_refuses_to_start() {
    let stderr = refused_start(
        &["--node-id", "1", "--peers", PEERS],
        &[("SHOPKEEP_ADMIN_TOKEN", STRONG_TOKEN)],
    );
    assert!(stderr.contains("SHOPKEEP_CLUSTER_SECRET"), "{stderr}");
}

#[test]
fn a_cluster_member_without_an_admin_token_refuses_to_start() {
    let stderr = refused_start(
        &["--node-id", "1", "--peers", PEERS],
        &[("SHOPKEEP_CLUSTER_SECRET", STRONG_SECRET)],
    );
    assert!(stderr.contains("SHOPKEEP_ADMIN_TOKEN"), "{stderr}");
}

#[test]
fn peers_that_leave_out_this_node_or_are_malformed_are_refused() {
    let env = [
        ("SHOPKEEP_CLUSTER_SECRET", STRONG_SECRET),
        ("SHOPKEEP_ADMIN_TOKEN", STRONG_TOKEN),
    ];
    let stderr = refused_start(&["--node-id", "4", "--peers", PEERS], &env);
    assert!(stderr.contains("must include this node"), "{stderr}");
    for bad in [
        "1=127.0.0.1",
        "1=:7001",
        "x=127.0.0.1:7001",
        "0=127.0.0.1:7001",
        "1=a:1,1=b:2",
        "1=127.0.0.1:99999",
        ",",
    ] {
        let stderr = refused_start(&["--node-id", "1", "--peers", bad], &env);
        assert!(stderr.contains("--peers"), "{bad}: {stderr}");
    }
}

#[test]
fn an_election_timeout_shorter_than_three_heartbeats_is_refused() {
    let stderr = refused_start(
        &[
            "--raft-heartbeat",
            "200ms",
            "--raft-election-timeout",
            "500ms",
        ],
        &[],
    );
    assert!(stderr.contains("--raft-election-timeout"), "{stderr}");
}

#[test]
fn a_short_or_placeholder_secret_is_refused_at_startup_whichever_it_is() {
    for name in [
        "SHOPKEEP_ADMIN_TOKEN",
        "SHOPKEEP_SERVICE_TOKEN",
        "SHOPKEEP_PSP_SECRET",
        "SHOPKEEP_TOKEN_SECRET",
        "SHOPKEEP_CLUSTER_SECRET",
    ] {
        let stderr = refused_start(&[], &[(name, "weak")]);
        assert!(
            stderr.contains(name) && stderr.contains("32 characters"),
            "{name}: {stderr}"
        );
        let placeholder = "change-me-but-this-is-long-enough-0123456789";
        let stderr = refused_start(&[], &[(name, placeholder)]);
        assert!(
            stderr.contains(name) && stderr.contains("change-me"),
            "{name}: {stderr}"
        );
    }
}

/// The shards a node serves, as its backup plan states them.
async fn served_shards(srv: &Server) -> u64 {
    let plan = srv.get("/v1/admin/backup", Auth::Admin).await.expect(200);
    plan["shards"].as_u64().expect("the plan's shards")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_data_directory_gets_three_shards_unless_told_otherwise() {
    let srv = Server::start_with(Opts::new()).await;
    assert_eq!(served_shards(&srv).await, 3);
    let named = Server::start_with(Opts::new().shards(5)).await;
    assert_eq!(served_shards(&named).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_keeps_its_shards_when_restarted_without_naming_them() {
    let mut srv = Server::start_with(Opts::new().shards(5)).await;
    let users: Vec<String> = (0..12).map(|i| format!("kept-{i}")).collect();
    for user in &users {
        srv.create_user(user).await;
    }
    srv.opts_mut().shards = None;
    srv.restart().await;
    assert_eq!(served_shards(&srv).await, 5);
    // Every user is found on the shard it was created on: the hash still spreads over five.
    for user in &users {
        srv.get(&format!("/v1/users/{user}"), Auth::Service)
            .await
            .expect(200);
    }
    srv.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_refuses_another_number_of_shards_and_says_which_it_has() {
    let mut srv = Server::start_with(Opts::new().shards(3)).await;
    srv.sigterm_and_wait().await;
    srv.opts_mut().shards = Some(4);
    let refused = srv
        .try_start()
        .await
        .expect_err("started with 4 shards on a 3-shard directory");
    assert!(
        refused.contains("created with 3 shards")
            && refused.contains("cannot be opened with 4 shards"),
        "the refusal does not say why: {refused}"
    );
}

/// `--workers` outside 1–1024 is refused before anything is served.
#[test]
fn workers_outside_1_to_1024_are_refused_before_anything_is_served() {
    for refused in ["0", "1025"] {
        let stderr = refused_start(&["--workers", refused], &[]);
        assert!(stderr.contains("--workers"), "{refused}: {stderr}");
    }
}
