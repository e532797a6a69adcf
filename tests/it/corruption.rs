//! Corrupted files at rest: a byte flipped in a stopped node's shard file, Raft log or snapshot is found
//! when the node starts, before anything is served. A single node refuses to start and says how to
//! restore a backup; a cluster member sets the file aside (`quarantine/`) and rebuilds from its peers,
//! ending with the same state as they have.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster_harness::*;
use crate::harness::*;

const CONVERGE: Duration = Duration::from_secs(45);

/// Flips one bit of every occurrence of `needle` in `path` (the live copy of a row among them, since
/// the row still exists); returns how many it flipped.
pub fn flip_every(path: &Path, needle: &[u8]) -> usize {
    let mut bytes = std::fs::read(path).expect("read the file to corrupt");
    let at: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| *window == needle)
        .map(|(i, _)| i)
        .collect();
    for &i in &at {
        bytes[i] ^= 0x01;
    }
    std::fs::write(path, &bytes).expect("write the corrupted file");
    at.len()
}

/// Flips one bit in the middle of `path`.
pub fn flip_middle(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read the file to corrupt");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, &bytes).expect("write the corrupted file");
}

/// Flips one bit in each of `n` random bytes of `path` past its first page (redb's header); returns
/// their offsets.
pub fn flip_random(path: &Path, n: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
    let mut bytes = std::fs::read(path).expect("read the file to corrupt");
    if bytes.len() <= 4096 {
        return vec![];
    }
    let at: Vec<usize> = (0..n)
        .map(|_| rng.random_range(4096..bytes.len()))
        .collect();
    for &i in &at {
        bytes[i] ^= 0x01;
    }
    std::fs::write(path, &bytes).expect("write the corrupted file");
    at
}

/// Every file set aside under `data_dir/quarantine/*/` (and one level below, for snapshots).
fn quarantined(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let Ok(runs) = std::fs::read_dir(dir.join("quarantine")) else {
        return names;
    };
    for run in runs.flatten() {
        for file in std::fs::read_dir(run.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            names.push(file.file_name().to_string_lossy().to_string());
        }
    }
    names.sort();
    names
}

async fn stopped_single_node(user: &str) -> Server {
    let mut srv = Server::start_with(Opts::new().shards(1)).await;
    srv.funded_user(user, "10.00").await;
    let status = srv.sigterm_and_wait().await;
    assert!(status.success(), "{status}");
    srv
}

#[tokio::test]
async fn a_single_node_refuses_to_start_on_a_corrupt_shard_file_and_says_how_to_restore() {
    let user = uniq("rot");
    let mut srv = stopped_single_node(&user).await;
    let shard = srv.data_dir().join("shard-000.redb");
    assert!(flip_every(&shard, user.as_bytes()) > 0, "the user's row");

    let refused = srv
        .try_start()
        .await
        .expect_err("a node must not serve a corrupt shard file");
    assert!(refused.contains("shard-000.redb is corrupt"), "{refused}");
    assert!(refused.contains("latest backup"), "{refused}");
}

#[tokio::test]
async fn a_single_node_refuses_to_start_on_a_corrupt_raft_log() {
    let user = uniq("rot");
    let mut srv = stopped_single_node(&user).await;
    // The entry may still be in raft-log.wal alone (appends reach the redb file later, and the writer's
    // checkpoint at exit can lose the race with the process's end); opening the log writes its records
    // into the redb file, so one more start and stop puts the entry there.
    srv.restart().await;
    let status = srv.sigterm_and_wait().await;
    assert!(status.success(), "{status}");
    let log = srv.data_dir().join("raft-log.redb");
    assert!(
        flip_every(&log, user.as_bytes()) > 0,
        "the entry creating the user"
    );

    let refused = srv
        .try_start()
        .await
        .expect_err("a node must not trust a corrupt log");
    assert!(refused.contains("raft-log.redb is corrupt"), "{refused}");
    assert!(refused.contains("latest backup"), "{refused}");
}

/// A 3-node, 1-shard cluster holding `user` with 10.00 + 40 × 1.00, past several snapshots (so the
/// logs are purged and a member cannot catch up from its own log alone); node 3 stopped cleanly.
async fn cluster_with_node_3_stopped(user: &str) -> TestCluster {
    let mut c =
        TestCluster::start_with(ClusterOpts::new().nodes(3).shards(1).snapshot_every(10)).await;
    let a1 = c.api(1);
    a1.funded_user(user, "10.00").await;
    for _ in 0..40 {
        a1.credit(user, "1.00").await;
    }
    c.wait_converged(CONVERGE).await;
    // Each member builds its snapshots in the background: node 3's may still be on its way.
    let snapshot = data_dir_of(&c, 3).join("snapshots/shard-000/current.snap");
    let deadline = std::time::Instant::now() + CONVERGE;
    while !snapshot.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 built no snapshot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.node_mut(3).stop().await;
    c
}

/// Node 3 comes back, rebuilds, and holds what the others hold: `user` with 51.00.
async fn node_3_rebuilds(c: &mut TestCluster, user: &str) {
    // node 3 may have led the shard: the write waits out the election among the other two
    let body = serde_json::json!({"amount": "1.00", "external_ref": uniq("ext"), "source": "card"});
    let path = format!("/v1/users/{user}/credits");
    post_until_definite(&c.api(1), &path, &uniq("key"), &body, CONVERGE)
        .await
        .expect(201);
    c.restart(3).await;
    c.wait_ready(&[3], READY_TIMEOUT).await;
    c.wait_converged(CONVERGE).await;
    assert_eq!(c.node(3).local_wallet(user).await.balance, 5100);
}

fn data_dir_of(c: &TestCluster, id: u64) -> PathBuf {
    c.node(id).data_dir()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_sets_a_corrupt_shard_file_aside_and_rebuilds_the_shard_from_its_peers() {
    let user = uniq("rot");
    let mut c = cluster_with_node_3_stopped(&user).await;
    let dir = data_dir_of(&c, 3);
    assert!(flip_every(&dir.join("shard-000.redb"), user.as_bytes()) > 0);

    node_3_rebuilds(&mut c, &user).await;
    assert_eq!(quarantined(&dir), ["shard-000.redb"]);
    let logs = c.logs(3);
    assert!(
        logs.contains("shard-000.redb is corrupt"),
        "{}",
        tail(&logs, 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_sets_a_corrupt_raft_log_aside_with_its_shards_and_rebuilds_everything() {
    let user = uniq("rot");
    let mut c = cluster_with_node_3_stopped(&user).await;
    let dir = data_dir_of(&c, 3);
    flip_middle(&dir.join("raft-log.redb"));
    let flipped = flip_every(&dir.join("raft-log.redb"), b"raft_state");
    assert!(flipped > 0, "the log's table of votes");

    node_3_rebuilds(&mut c, &user).await;
    let aside = quarantined(&dir);
    assert!(
        aside.contains(&"raft-log.redb".to_string())
            && aside.contains(&"raft-log.wal".to_string())
            && aside.contains(&"shard-000.redb".to_string()),
        "{aside:?}"
    );
    let logs = c.logs(3);
    assert!(
        logs.contains("the Raft log is corrupt"),
        "{}",
        tail(&logs, 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_sets_a_corrupt_snapshot_aside_and_builds_it_again() {
    let user = uniq("rot");
    let mut c = cluster_with_node_3_stopped(&user).await;
    let snapshots = data_dir_of(&c, 3).join("snapshots").join("shard-000");
    flip_middle(&snapshots.join("current.snap"));

    node_3_rebuilds(&mut c, &user).await;
    assert_eq!(quarantined(&snapshots), ["current.snap"]);
    assert!(snapshots.join("current.snap").exists(), "built again");
    let logs = c.logs(3);
    assert!(
        logs.contains("the snapshot is corrupt"),
        "{}",
        tail(&logs, 30)
    );
}

/// A user whose rows live on `shard` of 2.
fn user_on_shard(shard: u32) -> String {
    loop {
        let user = uniq("rot");
        if shopkeep::engine::shard_of(&user, 2) == shard {
            return user;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_sets_aside_every_corrupt_shard_file_it_verifies_at_once_and_rebuilds_each() {
    let users = [user_on_shard(0), user_on_shard(1)];
    let mut c =
        TestCluster::start_with(ClusterOpts::new().nodes(3).shards(2).snapshot_every(10)).await;
    let a1 = c.api(1);
    for user in &users {
        a1.funded_user(user, "10.00").await;
        for _ in 0..20 {
            a1.credit(user, "1.00").await;
        }
    }
    c.wait_converged(CONVERGE).await;
    c.node_mut(3).stop().await;
    let dir = data_dir_of(&c, 3);
    for (shard, user) in users.iter().enumerate() {
        let file = dir.join(format!("shard-{shard:03}.redb"));
        assert!(flip_every(&file, user.as_bytes()) > 0, "{user}'s rows");
    }

    c.restart(3).await;
    c.wait_ready(&[3], READY_TIMEOUT).await;
    c.wait_converged(CONVERGE).await;
    for user in &users {
        assert_eq!(c.node(3).local_wallet(user).await.balance, 3000);
    }
    assert_eq!(quarantined(&dir), ["shard-000.redb", "shard-001.redb"]);
    let logs = c.logs(3);
    for shard in ["shard-000.redb is corrupt", "shard-001.redb is corrupt"] {
        assert!(logs.contains(shard), "{}", tail(&logs, 30));
    }
}
