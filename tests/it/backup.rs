//! Online backup, verification and restore, as an operator runs them: a real server under load, the
//! real binary as the client (`shopkeep backup`, `verify-backup`, `restore`), a real server started on
//! the restored data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::cli::{self, Run, Tokens};
use crate::cluster_harness::{ClusterOpts, TestCluster};
use crate::harness::{Api, Auth, Opts, Server};

/// Runs the real binary with the admin token and `SHOPKEEP_URL` in its environment.
async fn shopkeep(url: &str, args: &[&str]) -> Run {
    cli::shopkeep(url, Tokens::AdminOnly, args).await
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Total bytes of the files in `dir`.
fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("reads the directory")
        .map(|e| e.expect("an entry").metadata().expect("metadata").len())
        .sum()
}

/// Buys one gem for `user` and completes it in the same request; the order id when acknowledged.
async fn buy(api: &Api, user: &str) -> Option<String> {
    let response = api.create_order(user, &[("gem", 1)], true).await;
    (response.status == 201).then(|| response.json()["order_id"].as_str().map(str::to_owned))?
}

/// Orders acknowledged by the load, in the order they were acknowledged.
type Acked = Arc<Mutex<Vec<(String, String)>>>;

/// Purchases in a loop over `users` until `stop`, recording every acknowledged order.
fn start_load(
    api: Api,
    users: Vec<String>,
    stop: Arc<AtomicBool>,
    acked: Acked,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut turn = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let user = &users[turn % users.len()];
            turn += 1;
            if let Some(order) = buy(&api, user).await {
                acked.lock().await.push((user.clone(), order));
            }
        }
    })
}

/// Each shard's Raft term, by shard.
async fn terms(api: &Api) -> Vec<u64> {
    let view = api.get("/v1/cluster", Auth::Admin).await.expect(200);
    view["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["term"].as_u64().expect("a term"))
        .collect()
}

async fn seed_shop(api: &Api, users: usize) -> Vec<String> {
    api.create_item("gem", "currency", "0.10").await;
    let mut ids = Vec::with_capacity(users);
    for n in 0..users {
        let id = format!("player-{n}");
        api.funded_user(&id, "500.00").await;
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_under_load_restores_into_a_node_holding_every_order_acknowledged_before_it()
{
    // Eight shards: the progress and the restore are checked over many.
    let mut server = Server::start_with(Opts::new().shards(8)).await;
    let users = seed_shop(&server.api(), 12).await;
    // A restart elects every shard's leader again: the backup ends in term 2, and the restored node
    // must stand in a later term than that.
    server.restart().await;
    let api = server.api();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let load = start_load(api.clone(), users.clone(), stop.clone(), acked.clone());
    while acked.lock().await.len() < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let before: Vec<(String, String)> = acked.lock().await.clone();
    let terms_before = terms(&api).await;
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let backup_dir = scratch.path().join("backup");
    let started = Instant::now();
    let backup = shopkeep(&api.base, &["backup", "--out", path(&backup_dir)]).await;
    let backup_time = started.elapsed();
    backup.success();
    let during = acked.lock().await.len() - before.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("the load");
    let total = acked.lock().await.len();
    assert!(
        during > 0,
        "the shop kept taking purchases while the backup ran"
    );
    let stderr = &backup.stderr;
    assert!(
        stderr.contains("shard 8/8:"),
        "progress per shard: {stderr}"
    );
    assert!(!backup_dir.join("manifest.json.partial").exists());

    let verify = shopkeep(&api.base, &["verify-backup", path(&backup_dir), "--json"]).await;
    verify.success();
    let report = verify.json();
    assert_eq!(report["ok"], json!(true), "{report:#}");

    let restored = scratch.path().join("restored");
    let started = Instant::now();
    let restore = shopkeep(
        &api.base,
        &[
            "restore",
            "--from",
            path(&backup_dir),
            "--data-dir",
            path(&restored),
        ],
    )
    .await;
    let restore_time = started.elapsed();
    restore.success();
    let stderr = &restore.stderr;
    assert!(
        stderr.contains("shard 8/8: restored"),
        "progress per shard: {stderr}"
    );
    eprintln!(
        "backup of {} acknowledged orders ({during} more during it): {:.2}s, {} bytes; restore {:.2}s; {total} orders in all",
        before.len(),
        backup_time.as_secs_f64(),
        size_of(&backup_dir),
        restore_time.as_secs_f64()
    );

    let copy = Server::start_prepared(Opts::default(), |data| {
        std::fs::remove_dir(data).expect("an empty data dir");
        std::fs::rename(&restored, data).expect("moves the restored data dir in place");
    })
    .await;
    let copy_api = copy.api();
    copy_api.audit_ok().await;
    // The restored log starts past the state it seeds: each shard built its snapshot before serving,
    // since a member joining later would need it.
    for shard in 0..8 {
        let snapshot = copy
            .data_dir()
            .join(format!("snapshots/shard-{shard:03}/current.snap"));
        assert!(snapshot.exists(), "no {}", snapshot.display());
    }
    // Raft's terms never go back: the restored shards stand after the backup's last term.
    for (shard, (was, now)) in terms_before.iter().zip(terms(&copy_api).await).enumerate() {
        assert!(
            now > *was,
            "shard {shard}: term {now} after the restore, {was} before"
        );
    }
    for (user, order) in &before {
        let found = copy_api.get_order(user, order).await;
        assert_eq!(
            found["status"],
            json!("COMPLETED"),
            "{user} {order}: {found:#}"
        );
    }
    let mut restored_orders = 0;
    for user in &users {
        let list = copy_api
            .get(&format!("/v1/users/{user}/orders?limit=100"), Auth::Admin)
            .await
            .expect(200);
        restored_orders += list["orders"].as_array().map_or(0, Vec::len);
    }
    assert!(
        (before.len()..=total).contains(&restored_orders),
        "{restored_orders} orders restored: at least the {} acknowledged before the backup, at most the {total} acknowledged in all",
        before.len()
    );
    // the restored node takes writes
    assert!(buy(&copy_api, &users[0]).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_backup_fails_on_any_changed_byte_and_restore_refuses_a_bad_backup_or_a_used_data_dir()
 {
    let server = Server::start_with(Opts::default().shards(2)).await;
    let api = server.api();
    let users = seed_shop(&api, 3).await;
    for user in &users {
        buy(&api, user).await.expect("a purchase");
    }
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let good = scratch.path().join("good");
    let backup = shopkeep(&api.base, &["backup", "--out", path(&good)]).await;
    backup.success();

    // The same directory again: refused, nothing overwritten.
    let again = shopkeep(&api.base, &["backup", "--out", path(&good)]).await;
    assert_eq!(again.code, Some(5), "{again:?}");
    assert!(again.stderr.contains("backup_dir_not_empty"), "{again:?}");

    let largest = largest_export(&good);
    let length = std::fs::metadata(&largest).expect("metadata").len() as usize;
    for (what, damage) in [
        ("one flipped byte", Damage::Flip(length / 2)),
        ("a cut-off tail", Damage::Truncate(length - 1)),
        ("an appended byte", Damage::Append),
    ] {
        let bad = scratch.path().join(what.replace(' ', "-"));
        copy_dir(&good, &bad);
        damage.apply(&bad.join(largest.file_name().expect("a file name")));
        let verify = shopkeep(&api.base, &["verify-backup", path(&bad)]).await;
        refused_as_invalid(&verify, what);
        let target = scratch
            .path()
            .join(format!("{}-restored", what.replace(' ', "-")));
        let restore = shopkeep(
            &api.base,
            &["restore", "--from", path(&bad), "--data-dir", path(&target)],
        )
        .await;
        refused_as_invalid(&restore, what);
        assert!(!target.exists(), "{what}: a refused restore writes nothing");
    }

    let no_manifest = scratch.path().join("unfinished");
    copy_dir(&good, &no_manifest);
    std::fs::remove_file(no_manifest.join("manifest.json")).expect("removes the manifest");
    let verify = shopkeep(&api.base, &["verify-backup", path(&no_manifest)]).await;
    assert_eq!(verify.code, Some(4), "{verify:?}");

    let used = scratch.path().join("used");
    std::fs::create_dir_all(&used).expect("a directory");
    std::fs::write(used.join("shard-000.redb"), b"a node's data").expect("a file");
    let restore = shopkeep(
        &api.base,
        &["restore", "--from", path(&good), "--data-dir", path(&used)],
    )
    .await;
    assert_eq!(restore.code, Some(5), "{restore:?}");
    assert!(restore.stderr.contains("data_dir_not_empty"), "{restore:?}");
    assert_eq!(
        std::fs::read(used.join("shard-000.redb")).expect("still there"),
        b"a node's data"
    );
}

/// A 3-node cluster's shop (six players, one purchase each) backed up through node 2 and restored into a
/// fresh data directory: the players' orders, the id of the member the backup came from, and the options
/// that start the restored cluster (that member on the restored directory, the others empty with
/// `SHOPKEEP_RESTORING_FROM_BACKUP`). `scratch` holds the backup and the restored directory.
async fn restored_cluster_opts(scratch: &Path) -> (Vec<(String, String)>, u64, ClusterOpts) {
    let cluster = TestCluster::start_with(ClusterOpts::new().nodes(3)).await;
    let api = cluster.node(2).api();
    let users = seed_shop(&api, 6).await;
    let mut orders = Vec::new();
    for user in &users {
        orders.push((user.clone(), buy(&api, user).await.expect("a purchase")));
    }
    let backup_dir = scratch.join("backup");
    // Taken through a member that leads some shards and follows in others.
    let backup = shopkeep(&api.base, &["backup", "--out", path(&backup_dir)]).await;
    backup.success();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(backup_dir.join("manifest.json")).expect("the manifest"),
    )
    .expect("JSON");
    let seed_id = manifest["node_id"].as_u64().expect("node_id");
    drop(cluster);

    let seed_dir = scratch.join("seed");
    let restore = shopkeep(
        &api.base,
        &[
            "restore",
            "--from",
            path(&backup_dir),
            "--data-dir",
            path(&seed_dir),
        ],
    )
    .await;
    restore.success();
    let mut opts = ClusterOpts::new().nodes(3).data_dir_on(seed_id, &seed_dir);
    for other in (1..=3).filter(|&id| id != seed_id) {
        opts = opts.node_env(other, "SHOPKEEP_RESTORING_FROM_BACKUP", "true");
    }
    (orders, seed_id, opts)
}

/// Every backed-up order is there, COMPLETED, read through node 1, and the cluster takes a purchase.
async fn serves_the_backed_up_orders(restored: &TestCluster, orders: &[(String, String)]) {
    let api = restored.node(1).api();
    api.audit_ok().await;
    for (user, order) in orders {
        let found = api.get_order(user, order).await;
        assert_eq!(
            found["status"],
            json!("COMPLETED"),
            "{user} {order}: {found:#}"
        );
    }
    assert!(
        buy(&api, &orders[0].0).await.is_some(),
        "the restored cluster takes writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_restored_from_one_members_backup_serves_the_backed_up_shop() {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let (orders, seed_id, opts) = restored_cluster_opts(scratch.path()).await;
    let restored = TestCluster::start_with(opts).await;
    for id in (1..=3).filter(|&id| id != seed_id) {
        let logs = restored.node(id).logs();
        assert!(
            logs.contains("RESTORING FROM BACKUP"),
            "node {id} says loudly that it restores: {logs}"
        );
    }
    serves_the_backed_up_orders(&restored, &orders).await;
}

/// The empty members of a restore that reach each other but not the restored member form no cluster of
/// their own: once they reach it, the restored shop is what they serve. (They used to form a new, empty
/// cluster after a few seconds without it, and the restored cluster then answered 404 for backed-up
/// players, or worse, as its first terms clashed with the restored log's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restoring_members_that_cannot_reach_the_restored_one_form_no_cluster_of_their_own() {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let (orders, seed_id, opts) = restored_cluster_opts(scratch.path()).await;
    let empties: Vec<u64> = (1..=3).filter(|&id| id != seed_id).collect();
    let restored = TestCluster::start_with(opts.isolated_at_start(seed_id).wait_ready(&[])).await;
    // Formation forms a cluster of a majority after about five rounds of 0.5 s without the rest.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Without the restored member there is no shop to read yet, rather than an empty one.
    let (user, order) = &orders[0];
    let read = restored
        .node(empties[0])
        .api()
        .get(&format!("/v1/users/{user}/orders/{order}"), Auth::Service)
        .await;
    assert_eq!(
        read.status,
        503,
        "a backed-up order read without the restored member: {}",
        read.text()
    );
    restored.heal();
    restored
        .wait_ready(&[1, 2, 3], Duration::from_secs(60))
        .await;
    serves_the_backed_up_orders(&restored, &orders).await;
    for &id in &empties {
        let logs = restored.node(id).logs();
        assert!(
            logs.contains("forms no new cluster"),
            "node {id} does not say it waits for the restored member: {logs}"
        );
    }
}

/// Exit 4 with `shopkeep: backup_invalid: …` last on stderr (after the per-shard progress lines).
#[track_caller]
fn refused_as_invalid(run: &Run, what: &str) {
    assert_eq!(run.code, Some(4), "{what}: {run:?}");
    assert!(
        run.stderr.contains("\nshopkeep: backup_invalid: "),
        "{what}: {run:?}"
    );
}

enum Damage {
    Flip(usize),
    Truncate(usize),
    Append,
}

impl Damage {
    fn apply(&self, file: &Path) {
        let mut bytes = std::fs::read(file).expect("reads the export");
        match *self {
            Damage::Flip(at) => bytes[at] ^= 0x01,
            Damage::Truncate(to) => bytes.truncate(to),
            Damage::Append => bytes.push(0),
        }
        std::fs::write(file, bytes).expect("writes the export");
    }
}

fn largest_export(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("reads the backup")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "export"))
        .max_by_key(|p| std::fs::metadata(p).expect("metadata").len())
        .expect("an export file")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creates the copy");
    for entry in std::fs::read_dir(from).expect("reads the backup") {
        let entry = entry.expect("an entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copies a file");
    }
}
