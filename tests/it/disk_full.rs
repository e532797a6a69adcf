//! A full disk: a node whose data directory is on a small tmpfs that a write load fills. Writes are then
//! refused with 503 `unavailable` (Retry-After, "disk full at …"), `/readyz` says 503, reads go on, nothing
//! is half-applied; once space is freed, writes succeed again without a restart.
//!
//! The test mounts the tmpfs itself (it needs root, as in CI); if it cannot, it fails and says why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster_harness::{ClusterOpts, READY_TIMEOUT, TestCluster, post_until_definite};
use crate::harness::{Auth, Opts, Resp, Server, tail, uniq};

/// A tmpfs of `size` mounted on a fresh directory; unmounted (and the directory removed) on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let path = std::env::temp_dir().join(format!("shopkeep-tmpfs-{}", uniq("m")));
        std::fs::create_dir_all(&path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {} ({status}): this test needs root (CI runs as root)",
            path.display()
        );
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Writes `path` until the file system is full; returns how many bytes it holds.
pub fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    written
}

/// A purchase of one penny by `user`.
async fn buy(srv: &Server, user: &str) -> Resp {
    srv.create_order(user, &[("penny", 1)], true).await
}

fn is_disk_full_refusal(r: &Resp) -> bool {
    r.status == 503
        && r.code().as_deref() == Some("unavailable")
        && r.text().contains("disk full at")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_keeps_reads_and_resumes_when_space_is_freed() {
    let tmpfs = Tmpfs::mount("24m");
    let srv = Server::start_prepared(Opts::new().shards(2), |data| {
        // The data directory is a link to the tmpfs: the server's temporary directory goes first on drop,
        // then the mount.
        std::fs::remove_dir(data).expect("empty data dir");
        std::os::unix::fs::symlink(&tmpfs.path, data).expect("link the data dir");
    })
    .await;
    let pid = srv.pid();
    srv.create_item("penny", "currency", "0.01").await;
    let users: Vec<String> = (0..16).map(|_| uniq("disk")).collect();
    for user in &users {
        srv.funded_user(user, "10000.00").await;
    }

    // Leave 6 MiB free: the write load fills that down to the log's reserve (3 MiB of 24), or to nothing.
    let filler = tmpfs.path.join("filler");
    let held = fill(&filler);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .expect("filler");
    file.set_len(held.saturating_sub(6 << 20))
        .expect("free 6 MiB");
    drop(file);

    // 6 MiB free is under four reserves (12 MiB): every apply commits durably, so that no burst of pages
    // held back for the next durable commit can land on the log's reserve at once. (A shard looks at the
    // free space every 100 ms.)
    tokio::time::sleep(Duration::from_millis(250)).await;
    let before = durable_commits(&srv).await;
    let purchases = 20;
    for _ in 0..purchases {
        buy(&srv, &users[0]).await.expect(201);
    }
    let durable = durable_commits(&srv).await - before;
    assert!(
        durable >= purchases as f64,
        "near a full disk each apply commits durably: {durable} durable commits for {purchases} purchases"
    );

    // Load until writes are refused because the disk is full.
    let started = Instant::now();
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let refusal = std::sync::Arc::new(std::sync::Mutex::new(None::<Resp>));
    let mut workers = Vec::new();
    for user in users.clone() {
        let (api, acknowledged, refusal) = (srv.api(), acknowledged.clone(), refusal.clone());
        workers.push(tokio::spawn(async move {
            while started.elapsed() < Duration::from_secs(120) {
                if refusal.lock().unwrap().is_some() {
                    return;
                }
                let r = api.create_order(&user, &[("penny", 1)], true).await;
                if r.status == 201 {
                    let id = r.json()["order_id"].as_str().unwrap_or_default().to_owned();
                    acknowledged.lock().unwrap().push((user.clone(), id));
                } else if is_disk_full_refusal(&r) {
                    *refusal.lock().unwrap() = Some(r);
                    return;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let detected = started.elapsed();
    let refused = refusal
        .lock()
        .unwrap()
        .take()
        .unwrap_or_else(|| panic!("no write was refused for a full disk within 120 s"));
    let acknowledged = acknowledged.lock().unwrap().clone();
    eprintln!(
        "disk full: first refusal after {detected:?} of load, {} purchases acknowledged; {}",
        acknowledged.len(),
        refused.text()
    );
    assert!(
        refused.header("retry-after").is_some(),
        "503 without Retry-After"
    );

    // While full: writes refused fast, /readyz 503 with the reason, reads served.
    let refusal_started = Instant::now();
    let again = buy(&srv, &users[0]).await;
    assert!(
        is_disk_full_refusal(&again),
        "{} {}",
        again.status,
        again.text()
    );
    assert!(
        refusal_started.elapsed() < Duration::from_secs(1),
        "a refusal should be fast, took {:?}",
        refusal_started.elapsed()
    );
    let ready = srv.get("/readyz", Auth::None).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("disk full at"), "{}", ready.text());
    let gauges = storage_full_gauges(&srv).await;
    assert!(
        gauges.contains(&1.0),
        "no shopkeep_storage_full at 1: {gauges:?}"
    );
    for user in &users {
        let wallet = srv
            .get(&format!("/v1/users/{user}/wallet"), Auth::Service)
            .await;
        assert_eq!(
            wallet.status,
            200,
            "wallet read while full: {}",
            wallet.text()
        );
    }
    let audit = srv.get("/v1/admin/audit", Auth::Admin).await.expect(200);
    assert_eq!(audit["ok"], Value::Bool(true), "audit while full: {audit}");

    // Free the space: writes resume by themselves.
    std::fs::remove_file(&filler).expect("remove the filler");
    let freed = Instant::now();
    let resumed = loop {
        let r = buy(&srv, &users[1]).await;
        if r.status == 201 {
            break freed.elapsed();
        }
        assert!(
            freed.elapsed() < Duration::from_secs(20),
            "writes did not resume within 20 s of freeing space: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ready = srv.get("/readyz", Auth::None).await;
    eprintln!(
        "disk freed: writes resumed after {resumed:?}; /readyz {}",
        ready.status
    );
    assert_eq!(ready.status, 200, "{}", ready.text());
    let gauges = storage_full_gauges(&srv).await;
    assert!(
        !gauges.is_empty() && gauges.iter().all(|g| *g == 0.0),
        "shopkeep_storage_full once writes resumed: {gauges:?}"
    );
    assert_eq!(srv.pid(), pid, "the process was not restarted");

    // Nothing half-applied, nothing acknowledged lost.
    let audit = srv.get("/v1/admin/audit", Auth::Admin).await.expect(200);
    assert_eq!(audit["ok"], Value::Bool(true), "audit after: {audit}");
    for (user, order) in &acknowledged {
        let r = srv
            .get(&format!("/v1/users/{user}/orders/{order}"), Auth::Service)
            .await;
        assert_eq!(r.status, 200, "acknowledged order {order}: {}", r.text());
    }
    let logs = srv.logs();
    let started_lines = logs.matches("disk full: writes are refused").count();
    let cleared_lines = logs.matches("disk no longer full").count();
    eprintln!("log lines: {started_lines} 'disk full', {cleared_lines} 'no longer full'");
    assert!(
        (1..=4).contains(&started_lines),
        "one line per full file, not a flood: {started_lines}"
    );
    assert_eq!(
        started_lines, cleared_lines,
        "every full file is reported cleared"
    );
    drop(srv);
    drop(tmpfs);
}

/// `shopkeep_shard_durable_commits_total`, summed over the shards.
async fn durable_commits(srv: &Server) -> f64 {
    crate::metrics::scrape(&srv.api().base)
        .await
        .sum("shopkeep_shard_durable_commits_total")
}

/// The values of every `shopkeep_storage_full{file}` series in a scrape of `srv`.
async fn storage_full_gauges(srv: &Server) -> Vec<f64> {
    srv.get("/metrics", Auth::None)
        .await
        .text()
        .lines()
        .filter(|line| line.starts_with("shopkeep_storage_full{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_leader_hands_its_shards_to_a_healthy_member_and_writes_go_on() {
    let disks: Vec<Tmpfs> = (0..3).map(|_| Tmpfs::mount("64m")).collect();
    let mut opts = ClusterOpts::new().nodes(3).shards(1);
    for (id, disk) in (1u64..).zip(&disks) {
        opts = opts.data_dir_on(id, &disk.path);
    }
    let c = TestCluster::start_with(opts).await;
    let full = c.leader_of_shard(0).await;
    let healthy: Vec<u64> = c.ids().into_iter().filter(|&id| id != full).collect();
    let api = c.api(healthy[0]);
    let user = uniq("full");
    api.funded_user(&user, "10.00").await;

    // The leader's file system drops below the log's reserve (8 MiB of 64): its disk counts as full.
    let filler = disks[(full - 1) as usize].path.join("filler");
    let held = fill(&filler);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .expect("filler");
    file.set_len(held.saturating_sub(2 << 20))
        .expect("free 2 MiB");
    drop(file);
    let filled = Instant::now();

    let deadline = filled + Duration::from_secs(20);
    let leader = loop {
        let leader = c.leader_of_shard(0).await;
        if leader != full {
            break leader;
        }
        assert!(
            Instant::now() < deadline,
            "node {full}, full, still leads the shard after 20 s\n{}",
            tail(&c.logs(full), 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let moved = filled.elapsed();
    assert!(healthy.contains(&leader));
    let body = serde_json::json!({"amount": "1.00", "external_ref": uniq("ext"), "source": "card"});
    let path = format!("/v1/users/{user}/credits");
    let key = uniq("key");
    let credited = post_until_definite(&api, &path, &key, &body, Duration::from_secs(10)).await;
    eprintln!(
        "a full leader: leadership moved to node {leader} in {moved:?}; a write then: {credited:?}"
    );
    credited.expect(201);
    assert_eq!(api.wallet(&user).await.balance, 1100);
    let logs = c.logs(full);
    assert!(
        logs.contains("handed the shard's leadership over"),
        "{}",
        tail(&logs, 40)
    );

    // Space comes back: the member stands again and holds what the others hold.
    std::fs::remove_file(&filler).expect("free the space");
    c.wait_ready(&[full], READY_TIMEOUT).await;
    c.wait_converged(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_whose_disk_fills_to_the_last_byte_does_not_stop_the_shop_and_catches_up() {
    let disks: Vec<Tmpfs> = (0..3).map(|_| Tmpfs::mount("64m")).collect();
    let mut opts = ClusterOpts::new().nodes(3).shards(1);
    for (id, disk) in (1u64..).zip(&disks) {
        opts = opts.data_dir_on(id, &disk.path);
    }
    let c = TestCluster::start_with(opts).await;
    let leader = c.leader_of_shard(0).await;
    let follower = c
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    let api = c.api(leader);
    let user = uniq("full");
    api.funded_user(&user, "10.00").await;

    // Not a byte left: the follower's log writer meets ENOSPC on the entries the leader sends.
    let filler = disks[(follower - 1) as usize].path.join("filler");
    fill(&filler);
    let mut credits = 0;
    while !c.logs(follower).contains("raft-log.redb error=") {
        assert!(credits < 500, "the follower's log never met a full disk");
        api.credit(&user, "1.00").await;
        credits += 1;
    }
    c.wait_unready(follower, Duration::from_secs(10), "its disk is full")
        .await;

    std::fs::remove_file(&filler).expect("free the space");
    let freed = Instant::now();
    c.wait_ready(&[follower], READY_TIMEOUT).await;
    c.wait_converged(Duration::from_secs(30)).await;
    eprintln!(
        "a follower's full disk: ready again {:?} after space was freed",
        freed.elapsed()
    );
    let want = 1000 + 100 * credits;
    assert_eq!(c.node(follower).local_wallet(&user).await.balance, want);
}
