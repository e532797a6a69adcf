//! The 3-node cluster, black-box: real `shopkeep serve` processes replicating every shard through openraft, peer
//! links through cuttable proxies (see `cluster_harness.rs`). Each test proves one behaviour of the cluster.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::cluster_harness::*;
use crate::harness::*;

const CONVERGE: Duration = Duration::from_secs(30);

fn orders_path(user: &str) -> String {
    format!("/v1/users/{user}/orders")
}

fn credits_body(amount: &str) -> Value {
    json!({"amount": amount, "external_ref": format!("ext-{}", new_key()), "source": "card"})
}

/// GET `path` with `?consistency=local` (or `&…`), as the service, asserting 200.
async fn local_get(api: &Api, path: &str) -> Value {
    let sep = if path.contains('?') { '&' } else { '?' };
    api.get(&format!("{path}{sep}consistency=local"), Auth::Service)
        .await
        .expect(200)
}

fn entitlement_qty_of(v: &Value, item: &str) -> i64 {
    v["entitlements"]
        .as_array()
        .expect("entitlements array")
        .iter()
        .find(|e| e["item_id"] == item)
        .map(|e| e["quantity"].as_i64().expect("quantity"))
        .unwrap_or(0)
}

fn others(c: &TestCluster, not: u64) -> Vec<u64> {
    c.ids().into_iter().filter(|&i| i != not).collect()
}

// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purchase_through_a_follower_is_applied_on_every_replica() {
    let c = TestCluster::start(3).await;
    let user = uniq("fol");
    c.api(1).create_item("gems", "currency", "1.25").await;
    let (shard, routed_leader) = c.route(&user).await;
    let leader = c.leader_of_shard(shard).await;
    assert_eq!(
        routed_leader,
        Some(leader),
        "route's leader of shard {shard}"
    );
    let via = others(&c, leader)[0];
    for id in c.ids() {
        let v = c.node(id).view().await;
        assert_eq!(v["node_id"], id, "{v}");
        assert_eq!(v["mode"], "cluster", "{v}");
        let nodes = v["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 3, "{v}");
        let this: Vec<_> = nodes.iter().filter(|n| n["this_node"] == true).collect();
        assert!(
            this.len() == 1 && this[0]["node_id"] == id,
            "this_node: {v}"
        );
        assert_eq!(
            v["shards"].as_array().expect("shards").len(),
            c.opts.shards as usize
        );
        for shard in 0..c.opts.shards as u64 {
            let s = shard_view(&v, shard);
            assert_eq!(ids_of(&s["voters"]), vec![1, 2, 3], "{s}");
            assert!(
                s["leader"].as_u64().is_some() && s["healthy"] == true,
                "{s}"
            );
        }
    }
    let api = c.api(via);

    api.create_user(&user).await;
    api.credit(&user, "20.00").await;
    let order = api.order(&user, &[("gems", 3)], true).await;
    assert_eq!(order["status"], "COMPLETED", "{order}");
    assert_eq!(order["total"], "3.75", "{order}");
    let order_id = order["order_id"].as_str().unwrap().to_string();
    eprintln!("user {user}: shard {shard}, leader node {leader}, written via node {via}");

    let want = Wallet {
        balance: 1625,
        held: 0,
        available: 1625,
    };
    for id in c.ids() {
        let n = c.node(id);
        // read barrier: a linearizable read on this node waits until it applied the leader's commit index
        assert_eq!(
            n.wallet(&user).await,
            want,
            "node {id}: linearizable wallet read"
        );
        assert_eq!(n.local_wallet(&user).await, want, "node {id}: local wallet");
        let o = local_get(&n.api(), &format!("/v1/users/{user}/orders/{order_id}")).await;
        assert_eq!(o, order, "node {id}: local copy of the order");
        let e = local_get(&n.api(), &format!("/v1/users/{user}/entitlements")).await;
        assert_eq!(
            entitlement_qty_of(&e, "gems"),
            3,
            "node {id}: local entitlements {e}"
        );
    }
    // Every node's audit, linearizable, names every shard with the same hash (retried while a background
    // command lands between two nodes' audits).
    let hashes = c.wait_converged(CONVERGE).await;
    assert_eq!(
        hashes.len(),
        c.opts.shards as usize,
        "audit must list every shard: {hashes:#?}"
    );
}

// ------------------------------------------------------------------------------------------------

/// `r` is 503 `unavailable` with `Retry-After`, and came within `limit` of `t0`.
#[track_caller]
fn assert_unavailable_within(r: &Resp, t0: Instant, limit: Duration, what: &str) {
    r.expect_error(503, "unavailable");
    assert!(
        r.header("retry-after").is_some(),
        "{what}: 503 without Retry-After: {r:?}"
    );
    assert!(
        t0.elapsed() <= limit,
        "{what}: 503 after {:?} (limit {limit:?})",
        t0.elapsed()
    );
}

#[derive(Debug)]
struct Attempt {
    key: String,
    body: Value,
    via: u64,
    started: Instant,
    finished: Instant,
    /// Some((status, body)) for a definite answer (< 500); None when unknown (5xx, transport error, timeout).
    answer: Option<(u16, Value)>,
    note: String,
}

/// Complete purchases of 1–3 gems for `user`, one at a time, round-robin over `apis`, until `stop`.
async fn purchase_stream(
    apis: Vec<(u64, Api)>,
    user: String,
    worker: usize,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
) {
    let path = orders_path(&user);
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let (via, api) = &apis[(worker + i) % apis.len()];
        let body = order_body(&[("gems", (i % 3 + 1) as u32)], true);
        let key = new_key();
        let started = Instant::now();
        let call = api
            .call(Method::POST, &path)
            .auth(Auth::Service)
            .key(&key)
            .json(&body);
        let r = tokio::time::timeout(Duration::from_secs(8), call.try_send()).await;
        let finished = Instant::now();
        let (answer, note) = match r {
            Ok(Ok(r)) if r.status < 500 => (Some((r.status, r.json())), String::new()),
            Ok(Ok(r)) => (None, format!("{r:?}")),
            Ok(Err(e)) => (None, format!("transport error: {e}")),
            Err(_) => (None, "no answer within 8 s".into()),
        };
        let ok = matches!(answer, Some((201, _)));
        log.lock().unwrap().push(Attempt {
            key,
            body,
            via: *via,
            started,
            finished,
            answer,
            note,
        });
        if !ok {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        i += 1;
    }
}

/// `n` concurrent purchase streams over `apis`, logging every attempt.
struct PurchaseStreams {
    log: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl PurchaseStreams {
    fn start(apis: Vec<(u64, Api)>, user: &str, n: usize) -> PurchaseStreams {
        let log = Arc::new(Mutex::new(Vec::<Attempt>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..n)
            .map(|w| {
                tokio::spawn(purchase_stream(
                    apis.clone(),
                    user.to_owned(),
                    w,
                    stop.clone(),
                    log.clone(),
                ))
            })
            .collect();
        PurchaseStreams { log, stop, workers }
    }

    /// Stops the streams, waits for them, and returns every attempt.
    async fn finish(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.await.expect("worker");
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// Every acknowledged purchase is there exactly as acknowledged; every attempt retried with its key (via the
/// nodes `via`) until definite gives one order per key; the wallet is charged exactly once per order; audit ok.
/// Returns the wallet.
async fn verify_purchases(
    c: &TestCluster,
    via: &[u64],
    user: &str,
    attempts: &[Attempt],
    credited: i64,
) -> Wallet {
    // Every acknowledged purchase is there, exactly as acknowledged.
    let reader = c.api(via[0]);
    for a in attempts {
        if let Some((_, body)) = &a.answer {
            let id = body["order_id"].as_str().expect("order_id");
            let got = reader
                .get(&format!("/v1/users/{user}/orders/{id}"), Auth::Service)
                .await
                .expect(200);
            assert_eq!(
                &got, body,
                "acknowledged order {id} differs after the fault"
            );
        }
    }

    // Retry every purchase with its key until the answer is definite: one order per key.
    let path = orders_path(user);
    let mut orders = BTreeSet::new();
    let mut total = 0i64;
    let mut gems = 0i64;
    for (n, a) in attempts.iter().enumerate() {
        let api = c.api(via[n % via.len()]);
        let r = post_until_definite(&api, &path, &a.key, &a.body, Duration::from_secs(20)).await;
        assert_eq!(r.status, 201, "retry of key {}: {r:?}", a.key);
        let body = r.json();
        if let Some((_, acked)) = &a.answer {
            assert!(
                r.replayed(),
                "retry of an acknowledged purchase was not a replay: {r:?}"
            );
            assert_eq!(&body, acked, "replay differs from the acknowledged answer");
        }
        assert_eq!(body["status"], "COMPLETED", "{body}");
        let again =
            post_until_definite(&api, &path, &a.key, &a.body, Duration::from_secs(20)).await;
        assert!(again.replayed(), "{again:?}");
        assert_eq!(again.body, r.body, "two replays of key {} differ", a.key);
        let id = body["order_id"].as_str().unwrap().to_string();
        assert!(
            orders.insert(id.clone()),
            "order {id} returned for two keys"
        );
        total += money_of(&body["total"]);
        gems += body["lines"][0]["quantity"].as_i64().unwrap();
    }
    let listed: BTreeSet<String> = reader
        .all_orders(user, "")
        .await
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed.len(),
        orders.len(),
        "orders in the shard vs distinct purchases (extra = applied twice)"
    );
    assert_eq!(listed, orders);
    let want = Wallet {
        balance: credited - total,
        held: 0,
        available: credited - total,
    };
    assert_eq!(
        reader.wallet(user).await,
        want,
        "charged exactly once per order"
    );
    assert_eq!(reader.entitlement_qty(user, "gems").await, gems);
    reader.audit_ok().await;

    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_shard_leader_mid_stream_loses_no_acknowledged_purchase() {
    let mut c = TestCluster::start(3).await;
    let user = uniq("kill");
    c.api(1).create_item("gems", "currency", "1.00").await;
    c.api(1).funded_user(&user, "5000.00").await;
    let credited = 500_000i64;
    let (shard, _) = c.route(&user).await;
    let leader = c.leader_of_shard(shard).await;
    let live = others(&c, leader);
    eprintln!("user {user}: shard {shard}, leader node {leader}; purchases via nodes {live:?}");

    let apis: Vec<(u64, Api)> = live.iter().map(|&i| (i, c.api(i))).collect();
    let streams = PurchaseStreams::start(apis, &user, 6);
    let log = streams.log.clone();
    let acks = |log: &Mutex<Vec<Attempt>>, after: Option<Instant>| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|a| matches!(a.answer, Some((201, _))))
            .filter(|a| after.is_none_or(|t| a.started >= t))
            .count()
    };

    // Some purchases acknowledged before the kill.
    let deadline = Instant::now() + Duration::from_secs(20);
    while acks(&log, None) < 30 {
        assert!(
            Instant::now() < deadline,
            "fewer than 30 purchases acknowledged in 20 s before any fault: {:?}",
            log.lock().unwrap().iter().rev().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // the shard's leader right now (normally the same node; if it moved, kill the current one)
    let leader_now = c.leader_of_shard(shard).await;
    if leader_now != leader {
        eprintln!(
            "note: the leader of shard {shard} moved from node {leader} to {leader_now} without a fault"
        );
    }
    let leader = leader_now;
    let live = others(&c, leader);
    let kill_at = Instant::now();
    c.kill9(leader);
    // Go on until 30 purchases sent after the kill were acknowledged (or 15 s).
    let deadline = kill_at + Duration::from_secs(15);
    while acks(&log, Some(kill_at)) < 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let attempts = streams.finish().await;

    let first_after = attempts
        .iter()
        .filter(|a| a.started >= kill_at && matches!(a.answer, Some((201, _))))
        .map(|a| a.finished)
        .min();
    let Some(first_after) = first_after else {
        panic!(
            "no purchase succeeded within 15 s of killing node {leader}; last attempts: {:#?}",
            attempts.iter().rev().take(6).collect::<Vec<_>>()
        );
    };
    let failover = first_after - kill_at;
    let acked = attempts
        .iter()
        .filter(|a| matches!(a.answer, Some((201, _))))
        .count();
    let unknown = attempts.iter().filter(|a| a.answer.is_none()).count();
    eprintln!(
        "failover: {} ms ({} attempts: {acked} acknowledged, {unknown} unknown)",
        failover.as_millis(),
        attempts.len()
    );
    let mut notes: Vec<&str> = attempts
        .iter()
        .map(|a| a.note.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    notes.dedup();
    for n in notes.iter().take(5) {
        eprintln!("  unknown outcome: {n}");
    }
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    for a in &attempts {
        if let Some((status, body)) = &a.answer {
            assert_eq!(
                *status, 201,
                "a purchase was refused (funds are ample): via node {} {body}",
                a.via
            );
        }
    }

    let want = verify_purchases(&c, &live, &user, &attempts, credited).await;

    // The killed leader comes back and catches up.
    c.restart(leader).await;
    c.wait_ready(&[leader], READY_TIMEOUT).await;
    c.wait_converged(CONVERGE).await;
    assert_eq!(c.node(leader).local_wallet(&user).await, want);
}

// ------------------------------------------------------------------------------------------------

/// Beyond the list: every node SIGKILLed at once under load (no replica survives to hand over its state),
/// then all restarted: nothing acknowledged is lost, retries apply once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_every_node_at_once_loses_no_acknowledged_purchase() {
    let mut c = TestCluster::start(3).await;
    let user = uniq("all");
    c.api(1).create_item("gems", "currency", "1.00").await;
    c.api(1).funded_user(&user, "5000.00").await;
    let ids = c.ids();
    let apis: Vec<(u64, Api)> = ids.iter().map(|&i| (i, c.api(i))).collect();
    let streams = PurchaseStreams::start(apis, &user, 6);
    let log = streams.log.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let acked = log
            .lock()
            .unwrap()
            .iter()
            .filter(|a| matches!(a.answer, Some((201, _))))
            .count();
        if acked >= 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 40 purchases acknowledged in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for &id in &ids {
        c.kill9(id);
    }
    let attempts = streams.finish().await;
    for a in &attempts {
        if let Some((status, body)) = &a.answer {
            assert_eq!(*status, 201, "a purchase was refused: {body}");
        }
    }
    let acked = attempts.iter().filter(|a| a.answer.is_some()).count();
    eprintln!(
        "{} attempts: {acked} acknowledged before every node was killed",
        attempts.len()
    );

    for &id in &ids {
        c.restart(id).await;
    }
    c.wait_ready(&ids, READY_TIMEOUT).await;
    let want = verify_purchases(&c, &ids, &user, &attempts, 500_000).await;
    c.wait_converged(CONVERGE).await;
    for &id in &ids {
        assert_eq!(c.node(id).local_wallet(&user).await, want, "node {id}");
    }
}

// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_catches_up_from_log_and_snapshot() {
    let mut c = TestCluster::start_with(ClusterOpts::new().snapshot_every(50)).await;
    let user = uniq("snap");
    c.api(1).create_user(&user).await;
    let (shard, _) = c.route(&user).await;
    let leader = c.leader_of_shard(shard).await;
    let victim = others(&c, leader)[0];
    let live = others(&c, victim);
    // the victim has the user before it goes down
    assert_eq!(c.node(victim).wallet(&user).await.balance, 0);
    let victim_before = shard_view(&c.node(victim).view().await, shard);
    let applied_before = victim_before["applied_index"].as_u64().unwrap_or(0);
    c.kill9(victim);

    // > 200 writes on the user's shard while the victim is down (one after the other, alternating the nodes)
    const WRITES: usize = 240;
    for i in 0..WRITES {
        c.api(live[i % live.len()]).credit(&user, "0.01").await;
    }
    let want = WRITES as i64;
    assert_eq!(c.node(leader).wallet(&user).await.balance, want);
    let leader_view = shard_view(&c.node(leader).view().await, shard);
    let target = leader_view["applied_index"]
        .as_u64()
        .unwrap_or_else(|| panic!("leader applied_index: {leader_view}"));
    assert!(
        target > applied_before,
        "leader applied index {target} after {WRITES} writes (victim was at {applied_before})"
    );
    assert!(
        leader_view["snapshot_index"].as_u64().is_some(),
        "leader took no snapshot after > 200 entries with --snapshot-every 50: {leader_view}"
    );

    c.restart(victim).await;
    let n = c.node(victim);
    let caught_up = eventually(CONVERGE, move || async move {
        let v = n.try_view().await?;
        let s = shard_view(&v, shard);
        (s["applied_index"].as_u64().unwrap_or(0) >= target).then_some(s)
    })
    .await;
    let Some(s) = caught_up else {
        panic!(
            "node {victim} did not apply index {target} of shard {shard} within {CONVERGE:?}: {:#}",
            n.try_view().await.unwrap_or_default()
        );
    };
    c.wait_converged(CONVERGE).await;
    assert_eq!(c.node(victim).local_wallet(&user).await.balance, want);
    let snap = s["snapshot_index"].as_u64();
    assert!(
        snap.is_some_and(|i| i > applied_before),
        "node {victim}: snapshot_index of shard {shard} should be set past {applied_before} (compacted log): {s}"
    );
    let s = shard_view(&c.node(victim).view().await, shard);
    eprintln!(
        "node {victim} caught up: shard {shard} applied {} snapshot {} (was at {applied_before}; leader at {target})",
        s["applied_index"], s["snapshot_index"]
    );
}

// ------------------------------------------------------------------------------------------------

/// The snapshot after a large one waits until the log since it holds `--snapshot-log-percent` of its
/// bytes: a shop with a large state does not rewrite it every `--snapshot-every` entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_snapshots_again_only_once_its_log_holds_its_share_of_the_last_snapshot() {
    const EVERY: u64 = 10;
    let c = TestCluster::start_with(
        ClusterOpts::new()
            .shards(1)
            .snapshot_every(EVERY)
            .snapshot_log_percent(20),
    )
    .await;
    let leader = c.leader_of_shard(0).await;
    let api = c.api(leader);
    let user = uniq("cadence");
    api.funded_user(&user, "1.00").await;
    // A state much larger than the entries that follow: concurrent credits share entries.
    for _wave in 0..4 {
        let mut credits = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (api, user) = (c.api(leader), user.clone());
            credits.spawn(async move { api.credit_retrying_unavailable(&user, "0.01").await });
        }
        while let Some(credit) = credits.join_next().await {
            credit.expect("a concurrent credit");
        }
    }
    let view = || async { shard_view(&c.node(leader).view().await, 0) };
    // The waves passed --snapshot-every entries: once the builds they asked for are done, credit one
    // at a time until the next snapshot, which holds the waves' state; the log counts from it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = view().await["snapshot_index"].as_u64();
    assert!(
        settled.is_some(),
        "no snapshot after the concurrent credits"
    );
    let mut fresh = None;
    for _ in 0..1000 {
        api.credit_retrying_unavailable(&user, "0.01").await;
        let s = view().await;
        if s["snapshot_index"].as_u64() > settled {
            fresh = Some(s);
            break;
        }
    }
    let fresh = fresh.expect("no snapshot after 1,000 more entries");
    let first = fresh["snapshot_index"].as_u64();
    let needed = fresh["snapshot_at_log_bytes"].as_u64().unwrap_or(0);
    assert!(needed > 0, "the snapshot's share: {fresh}");

    // Three times --snapshot-every entries, one credit each: by entries alone that is three snapshots.
    for _ in 0..(3 * EVERY) {
        api.credit_retrying_unavailable(&user, "0.01").await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = view().await;
    let logged = after["snapshot_log_bytes"].as_u64().unwrap_or(0);
    assert!(
        logged < needed,
        "the test wants entries smaller than the snapshot's share: {after}"
    );
    assert_eq!(
        after["snapshot_index"].as_u64(),
        first,
        "a snapshot came before the log held {needed} bytes: {after}"
    );

    // Once the log holds the bytes, the next one comes. The entries since the snapshot are more than
    // the 3 × EVERY credits above: the credits that waited for it went on while it was being built.
    let since = after["applied_index"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(first.unwrap_or(0));
    let per_entry = logged / since.max(1);
    let more = (needed - logged) / per_entry.max(1) + 2 * EVERY;
    for _ in 0..more {
        api.credit_retrying_unavailable(&user, "0.01").await;
    }
    let next = eventually(Duration::from_secs(10), || async {
        let s = view().await;
        (s["snapshot_index"].as_u64() > first).then_some(s)
    })
    .await
    .unwrap_or_else(|| panic!("no snapshot after the log passed {needed} bytes"));
    assert!(
        next["snapshot_log_bytes"].as_u64().unwrap_or(u64::MAX) < needed,
        "the log counts again from the new snapshot: {next}"
    );
}

// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_is_rebuilt_from_the_others() {
    let mut c = TestCluster::start(3).await;
    let user = uniq("wipe");
    let a2 = c.api(2);
    a2.create_item("gems", "currency", "1.50").await;
    a2.funded_user(&user, "50.00").await;
    let first = a2.order(&user, &[("gems", 2)], true).await;

    // Node 1 is the lowest id (the one that initialises a new cluster): wiped, it must join the existing one.
    let victim = 1;
    c.kill9(victim);
    c.wipe_data_dir(victim);
    // more writes while it is gone (its shards may need a new leader first)
    let path = format!("/v1/users/{user}/credits");
    post_until_definite(
        &a2,
        &path,
        &new_key(),
        &credits_body("5.00"),
        Duration::from_secs(20),
    )
    .await
    .expect(201);
    let second = post_until_definite(
        &a2,
        &orders_path(&user),
        &new_key(),
        &order_body(&[("gems", 1)], true),
        Duration::from_secs(20),
    )
    .await
    .expect(201);

    c.restart(victim).await;
    c.wait_ready(&[victim], READY_TIMEOUT).await;
    c.wait_converged(CONVERGE).await;
    let n = c.node(victim);
    let want = Wallet {
        balance: 5050,
        held: 0,
        available: 5050,
    };
    assert_eq!(n.local_wallet(&user).await, want, "rebuilt node's replica");
    assert_eq!(n.wallet(&user).await, want);
    for o in [&first, &second] {
        let id = o["order_id"].as_str().unwrap();
        let got = local_get(&n.api(), &format!("/v1/users/{user}/orders/{id}")).await;
        assert_eq!(&got, o, "rebuilt node's copy of order {id}");
    }
    let e = local_get(&n.api(), &format!("/v1/users/{user}/entitlements")).await;
    assert_eq!(entitlement_qty_of(&e, "gems"), 3, "{e}");
    let item = local_get(&n.api(), "/v1/items/gems").await;
    assert_eq!(item["price"], "1.50", "{item}");
    // one cluster, not two: the rebuilt node agrees with the others on every shard's leader and term
    for shard in 0..c.opts.shards as u64 {
        let l = c.leader_of_shard(shard).await;
        assert!(c.ids().contains(&l));
    }
}

// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minority_answers_503_and_the_majority_goes_on() {
    let c = TestCluster::start(3).await;
    let user = uniq("part");
    let a1 = c.api(1);
    a1.create_item("gems", "currency", "1.00").await;
    a1.funded_user(&user, "100.00").await;
    let (shard, _) = c.route(&user).await;
    // Isolate the leader of the user's shard: the hard case (a stale leader must not acknowledge anything).
    let isolated = c.leader_of_shard(shard).await;
    let majority = others(&c, isolated);
    let iso = c.node(isolated).api();
    assert_eq!(iso.wallet(&user).await.balance, 10000);
    // and a user on a shard the isolated node only follows
    let mut other_user = None;
    for _ in 0..64 {
        let u = uniq("part2");
        let (s, _) = c.route(&u).await;
        if c.leader_of_shard(s).await != isolated {
            other_user = Some(u);
            break;
        }
    }
    let other_user = other_user.expect("a shard the isolated node does not lead");
    a1.funded_user(&other_user, "1.00").await;
    assert_eq!(iso.wallet(&other_user).await.balance, 100);
    eprintln!("user {user}: shard {shard}; isolating node {isolated} (its leader)");
    c.isolate(isolated);

    // A write sent to the isolated node: 503 unavailable with Retry-After, within the request timeout + margin.
    let limit = c.opts.request_timeout_duration() + Duration::from_secs(3);
    let minority_key = new_key();
    let minority_body = order_body(&[("gems", 7)], true);
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        limit + Duration::from_secs(5),
        iso.call(Method::POST, &orders_path(&user))
            .auth(Auth::Service)
            .key(&minority_key)
            .json(&minority_body)
            .try_send(),
    )
    .await
    .unwrap_or_else(|_| panic!("the isolated node did not answer a write within {limit:?} + 5 s"))
    .expect("transport error on the isolated node");
    let took = t0.elapsed();
    eprintln!(
        "isolated node answered the write in {} ms: {r:?}",
        took.as_millis()
    );
    r.expect_error(503, "unavailable");
    let retry_after = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("503 without Retry-After: {r:?}"));
    assert!(
        retry_after.trim().parse::<u64>().is_ok() || retry_after.contains("GMT"),
        "Retry-After is neither seconds nor an HTTP date: {retry_after:?}"
    );
    assert!(took <= limit, "503 came after {took:?} (limit {limit:?})");

    // A linearizable read there cannot be served either; a local one can (and shows no charge).
    let t0 = Instant::now();
    let r = iso
        .get(&format!("/v1/users/{user}/wallet"), Auth::Service)
        .await;
    assert_unavailable_within(&r, t0, limit, "read barrier 503");
    assert_eq!(c.node(isolated).local_wallet(&user).await.balance, 10000);

    // On a shard it follows, the isolated node cannot forward a write nor pass a read barrier either.
    let refused_credit = (new_key(), credits_body("1.00"));
    let t0 = Instant::now();
    let r = iso
        .post_key(
            &format!("/v1/users/{other_user}/credits"),
            Auth::Service,
            &refused_credit.0,
            &refused_credit.1,
        )
        .await;
    assert_unavailable_within(&r, t0, limit, "forwarded write 503");
    let t0 = Instant::now();
    let r = iso
        .get(&format!("/v1/users/{other_user}/wallet"), Auth::Service)
        .await;
    assert_unavailable_within(&r, t0, limit, "follower read barrier 503");
    // the shard's leader, in the majority, did not even notice
    c.api(majority[0]).credit(&other_user, "2.00").await;
    assert_eq!(c.api(majority[1]).wallet(&other_user).await.balance, 300);

    // The majority goes on (after electing a leader for the shard if needed).
    let mut spent = 0i64;
    let mut keys = vec![];
    for &id in &majority {
        let api = c.api(id);
        let key = new_key();
        let r = post_until_definite(
            &api,
            &orders_path(&user),
            &key,
            &order_body(&[("gems", 2)], true),
            Duration::from_secs(20),
        )
        .await;
        r.expect(201);
        keys.push(key);
        spent += 200;
        // and now without any retry
        api.order(&user, &[("gems", 1)], true).await;
        spent += 100;
    }
    for &id in &majority {
        assert_eq!(c.node(id).wallet(&user).await.balance, 10000 - spent);
    }

    // Readiness tells a load balancer the same: the cut-off node is not ready, the majority is.
    c.wait_unready(
        isolated,
        Duration::from_secs(10),
        "the isolated node still says ready",
    )
    .await;
    c.wait_ready(&majority, Duration::from_secs(10)).await;

    c.heal();
    c.wait_ready(&c.ids(), Duration::from_secs(15)).await;
    // The write the minority refused is still retryable with its key: exactly one outcome.
    let r = post_until_definite(
        &c.api(majority[0]),
        &orders_path(&user),
        &minority_key,
        &minority_body,
        Duration::from_secs(20),
    )
    .await;
    r.expect(201);
    spent += 700;
    let again = post_until_definite(
        &iso,
        &orders_path(&user),
        &minority_key,
        &minority_body,
        Duration::from_secs(20),
    )
    .await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(again.body, r.body);

    // (a 503 promises nothing either way: the retry with its key settles it, once)
    let r = post_until_definite(
        &iso,
        &format!("/v1/users/{other_user}/credits"),
        &refused_credit.0,
        &refused_credit.1,
        Duration::from_secs(20),
    )
    .await;
    r.expect(201);

    c.wait_ready(&[isolated], READY_TIMEOUT).await;
    c.wait_converged(CONVERGE).await;
    let want = Wallet {
        balance: 10000 - spent,
        held: 0,
        available: 10000 - spent,
    };
    for id in c.ids() {
        assert_eq!(c.node(id).local_wallet(&user).await, want, "node {id}");
        assert_eq!(
            c.node(id).local_wallet(&other_user).await.balance,
            400,
            "node {id}: the retried credit applies exactly once"
        );
    }
    assert_eq!(a1.all_orders(&user, "").await.len(), 5);
}

// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_traffic_without_the_cluster_secret_is_refused() {
    let c = TestCluster::start_with(
        ClusterOpts::new()
            .node_env(
                3,
                "SHOPKEEP_CLUSTER_SECRET",
                "not-the-cluster-secret-0f1e2d3c4b5a69788",
            )
            .wait_ready(&[1, 2]),
    )
    .await;
    let body = vec![0x01, 0x02, 0x03, 0xff, 0x00];
    let call = |id: u64, header: Option<(&str, String)>| {
        let mut call = c
            .node(id)
            .call(Method::POST, "/_node/v1/call")
            .header("content-type", "application/octet-stream")
            .body_bytes(body.clone());
        if let Some((name, value)) = header {
            call = call.header(name, &value);
        }
        call.send()
    };
    let signed = |secret: &str| {
        Some((
            "x-shopkeep-node-auth",
            node_auth(secret, "POST", "/_node/v1/call", &body),
        ))
    };
    call(1, None).await.expect_error(401, "unauthenticated");
    call(1, signed("wrong-secret-but-long-enough-0123456789"))
        .await
        .expect_error(401, "unauthenticated");
    call(1, Some(("x-shopkeep-node-auth", String::new())))
        .await
        .expect_error(401, "unauthenticated");
    // The secret itself is no credential on the wire (it never travels any more).
    call(
        1,
        Some(("x-shopkeep-cluster-secret", CLUSTER_SECRET.to_owned())),
    )
    .await
    .expect_error(401, "unauthenticated");
    // Signed for another path, or for another body: refused.
    let other_path = node_auth(CLUSTER_SECRET, "POST", "/_node/v1/other", &body);
    call(1, Some(("x-shopkeep-node-auth", other_path)))
        .await
        .expect_error(401, "unauthenticated");
    let other_body = node_auth(CLUSTER_SECRET, "POST", "/_node/v1/call", b"other");
    call(1, Some(("x-shopkeep-node-auth", other_body)))
        .await
        .expect_error(401, "unauthenticated");
    // node 3 has another secret: the cluster's is wrong there
    call(3, signed(CLUSTER_SECRET))
        .await
        .expect_error(401, "unauthenticated");
    // Signed with the right secret, the request gets past authentication (and the garbage body is
    // refused otherwise); the very same signed request again is a replay.
    let valid = signed(CLUSTER_SECRET);
    let r = call(1, valid.clone()).await;
    assert!(
        r.status != 401 && r.status != 404,
        "the right secret with a garbage body must get past authentication: {r:?}"
    );
    call(1, valid).await.expect_error(401, "unauthenticated");

    // Nodes 1 and 2 serve; node 3 never catches up.
    let user = uniq("sec");
    c.api(1).funded_user(&user, "7.00").await;
    c.api(2).credit(&user, "3.00").await;
    for id in [1, 2] {
        assert_eq!(c.node(id).wallet(&user).await.balance, 1000, "node {id}");
    }
    let (shard, _) = c.route(&user).await;
    let leader = c.leader_of_shard_among(shard, &[1, 2]).await;
    let applied = shard_view(&c.node(leader).view().await, shard)["applied_index"]
        .as_u64()
        .expect("leader applied_index");
    let n3 = c.node(3);
    let until = Instant::now() + Duration::from_secs(3);
    let mut polls = 0;
    while Instant::now() < until {
        polls += 1;
        let ready = n3.readyz().await;
        assert_ne!(ready, Some(200), "node 3 (wrong secret) says it is ready");
        let r = n3
            .get(
                &format!("/v1/users/{user}/wallet?consistency=local"),
                Auth::Service,
            )
            .await;
        assert!(
            !(r.status == 200 && money_of(&r.json()["balance"]) == 1000),
            "node 3 (wrong secret) has the cluster's data: {r:?}"
        );
        if let Some(v) = n3.try_view().await {
            let s = shard_view(&v, shard);
            assert!(
                s["applied_index"].as_u64().unwrap_or(0) < applied,
                "node 3 (wrong secret) applied shard {shard} up to the leader's {applied}: {s}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(polls >= 3);
    // and the two others still serve
    c.api(2).credit(&user, "1.00").await;
    assert_eq!(c.node(1).wallet(&user).await.balance, 1100);
}

// ------------------------------------------------------------------------------------------------

/// Poll the views of nodes 1–3 (≤ 10 s) until each shows `learner` as a learner of every shard and has
/// applied as much of each shard as the others (so it knows the change committed: openraft refuses the next
/// change while one is not); returns node 1's view.
async fn wait_learner_everywhere(c: &TestCluster, learner: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut views = vec![];
        for id in 1..=3 {
            views.push(c.node(id).try_view().await.unwrap_or(Value::Null));
        }
        let applied = |v: &Value, shard| shard_view(v, shard)["applied_index"].as_u64();
        let held = views.iter().all(|v| {
            v.is_object()
                && (0..c.opts.shards as u64).all(|shard| {
                    ids_of(&shard_view(v, shard)["learners"]).contains(&learner)
                        && applied(v, shard) == applied(&views[0], shard)
                })
        });
        if held {
            return views.swap_remove(0);
        }
        assert!(
            Instant::now() < deadline,
            "node {learner} should be a learner of every shard on nodes 1-3: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll the views of `ids` (≤ 10 s) until every shard has exactly `voters` and no learner on each of them.
async fn wait_voters(c: &TestCluster, ids: &[u64], voters: &[u64]) {
    let shards = c.opts.shards as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut ok = true;
        let mut last = vec![];
        for &id in ids {
            let Some(v) = c.node(id).try_view().await else {
                last.push((id, Value::Null));
                ok = false;
                continue;
            };
            for shard in 0..shards {
                let s = shard_view(&v, shard);
                ok &= ids_of(&s["voters"]) == voters && ids_of(&s["learners"]).is_empty();
            }
            last.push((id, v));
        }
        if ok {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "voters of every shard should be {voters:?} (no learners) on nodes {ids:?}: {last:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_add_promote_remove() {
    let mut c = TestCluster::start(3).await;
    let user = uniq("mem");
    c.api(1).funded_user(&user, "10.00").await;

    let n4 = c.start_extra_node().await;
    assert_eq!(n4, 4);
    // it waits to be added: it initialises nothing by itself
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ne!(
        c.node(4).readyz().await,
        Some(200),
        "node 4 is ready before it was added"
    );

    let t0 = Instant::now();
    let view = c.add_node(1, 4).await.expect(200);
    eprintln!("node 4 added in {} ms", t0.elapsed().as_millis());
    for shard in 0..c.opts.shards as u64 {
        let s = shard_view(&view, shard);
        assert!(
            ids_of(&s["learners"]).contains(&4),
            "node 4 should be a learner of shard {shard}: {s}"
        );
        assert_eq!(ids_of(&s["voters"]), vec![1, 2, 3], "{s}");
    }
    assert!(
        view["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .any(|n| n["node_id"] == 4),
        "node 4 missing from the view's nodes: {view:#}"
    );

    let r = c
        .api(2)
        .call(Method::POST, "/v1/admin/cluster/nodes/4/promote")
        .auth(Auth::Admin)
        .fresh_key()
        .json(&json!({}))
        .send()
        .await;
    assert!(r.is_success(), "promote: {r:?}");
    wait_voters(&c, &[1, 2, 3, 4], &[1, 2, 3, 4]).await;
    c.wait_ready(&[4], READY_TIMEOUT).await;

    // write via the new node; it reads it back from its own replica
    let a4 = c.api(4);
    a4.credit(&user, "2.50").await;
    assert_eq!(a4.wallet(&user).await.balance, 1250);
    assert_eq!(c.node(4).local_wallet(&user).await.balance, 1250);

    // remove node 1
    let r = c
        .api(2)
        .call(Method::DELETE, "/v1/admin/cluster/nodes/1")
        .auth(Auth::Admin)
        .send()
        .await;
    assert!(r.is_success(), "{r:?}");
    wait_voters(&c, &[2, 3, 4], &[2, 3, 4]).await;

    // writes still work without node 1...
    c.kill9(1);
    let credits = format!("/v1/users/{user}/credits");
    post_until_definite(
        &c.api(2),
        &credits,
        &new_key(),
        &credits_body("1.00"),
        Duration::from_secs(20),
    )
    .await
    .expect(201);
    // ...and the quorum really is {2,3,4}: with 3 down too, 2 of 3 voters remain (2 of {1,2,3,4} would not do)
    c.kill9(3);
    post_until_definite(
        &c.api(4),
        &credits,
        &new_key(),
        &credits_body("1.00"),
        Duration::from_secs(20),
    )
    .await
    .expect(201);
    for id in [2, 4] {
        assert_eq!(c.node(id).wallet(&user).await.balance, 1450, "node {id}");
    }
    c.wait_converged_among(&[2, 4], CONVERGE).await;
}

/// A membership change answers with the change in place on every shard, also on the shards other nodes lead
/// while this node's replicas of them lag: their leaders commit the change with the other members, and the
/// answer waits until this node holds it. (Regression: the answer was built from this node's replicas at
/// once, so it could show such a shard without the change.) The election timeout is long enough that the
/// lagging node does not stand while its links are cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_membership_change_answers_once_this_nodes_lagging_replicas_hold_it() {
    const LAG: Duration = Duration::from_millis(1500);
    let mut c = TestCluster::start_with(ClusterOpts {
        election_timeout: "3s".into(),
        ..ClusterOpts::new()
    })
    .await;
    let n4 = c.start_extra_node().await;
    c.add_node(1, n4).await.expect(200);
    // Every node has applied the add before the links are cut.
    let view = wait_learner_everywhere(&c, n4).await;
    let led_by_others: Vec<u64> = (0..c.opts.shards as u64)
        .filter(|&shard| shard_view(&view, shard)["leader"].as_u64() != Some(1))
        .collect();
    assert!(
        !led_by_others.is_empty(),
        "every shard is led by node 1: nothing would lag"
    );

    // Node 1's replicas of the shards nodes 2 and 3 lead get no appends; its own calls go on.
    c.cut_link(2, 1);
    c.cut_link(3, 1);
    let api = c.api(1);
    let promote = tokio::spawn(async move {
        let answer = api
            .call(
                Method::POST,
                &format!("/v1/admin/cluster/nodes/{n4}/promote"),
            )
            .auth(Auth::Admin)
            .fresh_key()
            .json(&json!({}))
            .send()
            .await;
        (answer, Instant::now())
    });
    tokio::time::sleep(LAG).await;
    let healed = Instant::now();
    c.heal();
    let (answer, answered) = promote.await.expect("the promote task");
    let view = answer.expect(200);
    for shard in 0..c.opts.shards as u64 {
        let s = shard_view(&view, shard);
        assert_eq!(
            ids_of(&s["voters"]),
            vec![1, 2, 3, n4],
            "the answer shows shard {shard} (others lead {led_by_others:?}) without the change: {s}"
        );
        assert!(ids_of(&s["learners"]).is_empty(), "{s}");
    }
    assert!(
        answered >= healed,
        "node 1 answered while its replicas of {led_by_others:?} could not hold the change"
    );
}

// ------------------------------------------------------------------------------------------------

/// The harness's partition mechanism itself: a proxy forwards, a cut closes live connections and refuses new
/// ones, a heal lets new ones through again (so that the partition tests above fail, or pass, for the right
/// reason). Runs against an in-test echo server, not the product.
#[test]
fn the_partition_proxy_cuts_and_heals_links() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(target);
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    let roundtrip = |s: &mut TcpStream, msg: &[u8]| -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        let mut got = 0;
        while got < msg.len() {
            match s.read(&mut buf[got..])? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => got += n,
            }
        }
        Ok(buf)
    };

    let mut live = connect();
    assert_eq!(roundtrip(&mut live, b"ping").unwrap(), b"ping");
    proxy.cut();
    let after_cut = roundtrip(&mut live, b"again");
    assert!(
        after_cut.is_err(),
        "a live connection survived the cut: {after_cut:?}"
    );
    let mut fresh = connect();
    let through = roundtrip(&mut fresh, b"new");
    assert!(
        through.is_err(),
        "a new connection got through a cut link: {through:?}"
    );
    proxy.heal();
    let mut healed = connect();
    assert_eq!(roundtrip(&mut healed, b"healed").unwrap(), b"healed");
    assert!(
        roundtrip(&mut live, b"x").is_err(),
        "the cut connection came back"
    );
}

#[tokio::test]
async fn a_leader_cut_off_from_its_quorum_stops_saying_ready() {
    // One shard: the leader of shard 0 leads everything, so nothing but the leader's own view of its
    // quorum can make it unready (openraft 0.9 leaders do not step down by themselves).
    let c = TestCluster::start_with(ClusterOpts::new().shards(1)).await;
    let leader = c.leader_of_shard(0).await;
    assert_eq!(c.node(leader).readyz().await, Some(200));
    c.isolate(leader);
    c.wait_unready(
        leader,
        Duration::from_secs(10),
        "a leader without a quorum still says ready",
    )
    .await;
    c.heal();
    c.wait_ready(&c.ids(), Duration::from_secs(15)).await;
}

#[tokio::test]
async fn a_five_node_cluster_survives_losing_two_nodes() {
    let mut c = TestCluster::start(5).await;
    let user = uniq("five");
    c.api(1).create_item("gems", "currency", "1.00").await;
    c.api(1).funded_user(&user, "10.00").await;
    let (shard, _) = c.route(&user).await;
    let leader = c.leader_of_shard(shard).await;
    for shard in 0..c.opts.shards as u64 {
        let s = shard_view(&c.node(1).view().await, shard);
        assert_eq!(ids_of(&s["voters"]), vec![1, 2, 3, 4, 5], "{s}");
    }
    // Lose the user's shard leader and one more node: 3 of 5 remain, a majority.
    let second = c
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("another node");
    c.kill9(leader);
    c.kill9(second);
    let survivors: Vec<u64> = c
        .ids()
        .into_iter()
        .filter(|&id| id != leader && id != second)
        .collect();
    let api = c.api(survivors[0]);
    let key = new_key();
    post_until_definite(
        &api,
        &orders_path(&user),
        &key,
        &order_body(&[("gems", 3)], true),
        Duration::from_secs(20),
    )
    .await
    .expect(201);
    for &id in &survivors {
        assert_eq!(c.node(id).wallet(&user).await.balance, 700, "node {id}");
    }
    c.wait_converged_among(&survivors, Duration::from_secs(20))
        .await;
}

#[tokio::test]
async fn a_wiped_node_takes_no_part_until_a_leader_confirmed_without_it_has_caught_it_up() {
    let mut c = TestCluster::start(3).await;
    let user = uniq("guard");
    let a2 = c.api(2);
    a2.create_item("gems", "currency", "1.00").await;
    a2.funded_user(&user, "10.00").await;
    // Node 3 loses its disk; before it is back, node 1 dies too. Node 2 could only win elections with
    // node 3's vote, but node 3 forgot what it acknowledged: writes committed by nodes 1 and 3 may be
    // missing on node 2. Two of three members are gone, so the shop must stay closed, not lose data.
    c.kill9(3);
    c.wipe_data_dir(3);
    c.kill9(1);
    c.restart(3).await;
    // One purchase is tried again and again with the same key while the shop is closed: never
    // acknowledged, and charged once when it finally is.
    let probe_key = new_key();
    let closed_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < closed_until {
        assert_ne!(c.node(3).readyz().await, Some(200), "node 3 serves");
        let attempt = tokio::time::timeout(
            Duration::from_secs(8),
            a2.call(Method::POST, &orders_path(&user))
                .auth(Auth::Service)
                .key(&probe_key)
                .json(&order_body(&[("gems", 1)], true))
                .try_send(),
        )
        .await;
        if let Ok(Ok(r)) = attempt {
            assert!(
                r.status >= 500,
                "a write succeeded without a majority: {r:?}"
            );
        }
        let view = c.node(3).view().await;
        for shard in view["shards"].as_array().expect("shards") {
            assert_eq!(shard["recovery"], "awaiting_leader", "node 3: {view:#}");
            assert_ne!(shard["role"], "leader", "node 3: {view:#}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        c.logs(3).contains("not voting: rebuilding lost data")
            || c.logs(2).contains("rebuilding shard"),
        "node 3 was asked for nothing: the test proves nothing"
    );
    // Node 1 is back: nodes 1 and 2 elect leaders, node 3 rebuilds from them and counts again.
    c.restart(1).await;
    c.wait_ready(&[1, 2, 3], READY_TIMEOUT).await;
    let order = post_until_definite(
        &a2,
        &orders_path(&user),
        &new_key(),
        &order_body(&[("gems", 2)], true),
        Duration::from_secs(20),
    )
    .await;
    order.expect(201);
    post_until_definite(
        &a2,
        &orders_path(&user),
        &probe_key,
        &order_body(&[("gems", 1)], true),
        Duration::from_secs(20),
    )
    .await
    .expect(201);
    assert_eq!(c.node(3).wallet(&user).await.balance, 700);
    c.wait_converged_among(&[1, 2, 3], CONVERGE).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = c.node(3).view().await;
        let rebuilt = view["shards"]
            .as_array()
            .expect("shards")
            .iter()
            .all(|shard| shard["recovery"] == "none");
        if rebuilt {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 never rebuilt: {view:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Copies a stopped node's data dir (a backup, as README's Backups describes it).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the data dir") {
        let entry = entry.expect("data dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

#[tokio::test]
async fn a_cluster_restored_from_one_members_backup_comes_back_with_the_backups_state() {
    let mut c = TestCluster::start(3).await;
    let user = uniq("restore");
    let a1 = c.api(1);
    a1.create_item("gems", "currency", "1.00").await;
    a1.funded_user(&user, "10.00").await;
    c.wait_converged_among(&[1, 2, 3], CONVERGE).await;
    // The backup: node 1 stopped, its data dir copied, node 1 started again.
    c.kill9(1);
    let backup = std::env::temp_dir().join(format!("{}-backup", uniq("shopkeep")));
    copy_dir(&c.node(1).data_dir(), &backup);
    c.restart(1).await;
    c.wait_ready(&[1, 2, 3], READY_TIMEOUT).await;
    // Written after the backup: the restore gives it up.
    post_until_definite(
        &a1,
        &orders_path(&user),
        &new_key(),
        &order_body(&[("gems", 2)], true),
        Duration::from_secs(20),
    )
    .await
    .expect(201);
    // The restore: every member stopped; node 1 gets the copy, the others empty data dirs and the flag
    // that says they were emptied on purpose.
    for id in [1, 2, 3] {
        c.kill9(id);
    }
    let dir = c.node(1).data_dir();
    std::fs::remove_dir_all(&dir).expect("remove node 1's data dir");
    copy_dir(&backup, &dir);
    for id in [2, 3] {
        c.wipe_data_dir(id);
        c.node_mut(id).set_run_env(vec![(
            "SHOPKEEP_RESTORING_FROM_BACKUP".into(),
            "true".into(),
        )]);
    }
    for id in [1, 2, 3] {
        c.restart(id).await;
    }
    c.wait_ready(&[1, 2, 3], READY_TIMEOUT).await;
    for id in [1, 2, 3] {
        assert_eq!(
            c.node(id).wallet(&user).await.balance,
            1000,
            "node {id} serves the backup's state"
        );
    }
    c.wait_converged_among(&[1, 2, 3], CONVERGE).await;
    for id in [2, 3] {
        let view = c.node(id).view().await;
        for shard in view["shards"].as_array().expect("shards") {
            assert_eq!(shard["recovery"], "none", "node {id}: {view:#}");
        }
    }
    let _ = std::fs::remove_dir_all(&backup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_created_with_another_number_of_shards_is_refused_as_a_member_and_added_to_no_shard()
{
    let mut c = TestCluster::start(3).await;
    let cluster_shards = c.opts.shards;
    c.opts.shards = 2;
    let n4 = c.start_extra_node().await;
    c.opts.shards = cluster_shards;
    let refused = c.add_node(1, n4).await;
    let body = refused.expect_error(409, "invalid_state");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("created with 2 shards")
            && message.contains(&format!("--shards {cluster_shards}")),
        "the refusal does not say why: {body}"
    );
    let view = c.api(1).get("/v1/cluster", Auth::Admin).await.expect(200);
    for shard in 0..u64::from(cluster_shards) {
        let s = shard_view(&view, shard);
        assert!(
            !ids_of(&s["learners"]).contains(&n4) && !ids_of(&s["voters"]).contains(&n4),
            "node {n4} joined shard {shard}: {s}"
        );
    }
}

// ------------------------------------------------------------------------------------------------

/// The mean of histogram `name` since `before` (`None`: no new sample).
fn histogram_mean_since(
    before: &crate::metrics::Scrape,
    after: &crate::metrics::Scrape,
    name: &str,
) -> Option<f64> {
    let delta = |suffix: &str| {
        let name = format!("{name}_{suffix}");
        after.value(&name, &[]).unwrap_or(0.0) - before.value(&name, &[]).unwrap_or(0.0)
    };
    let count = delta("count");
    (count > 0.0).then(|| delta("sum") / count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purchases_sent_together_share_entries_on_the_shards_leader_and_each_gets_its_own_order() {
    let c = TestCluster::start(3).await;
    let user = uniq("together");
    c.api(1).create_item("gems", "currency", "1.00").await;
    let (shard, _) = c.route(&user).await;
    let leader = c.leader_of_shard(shard).await;
    let api = c.api(leader);
    api.funded_user(&user, "500.00").await;
    let before = crate::metrics::scrape(&api.base).await;
    let purchases = 200u32;
    let mut buyers = tokio::task::JoinSet::new();
    for _ in 0..purchases {
        let (api, user) = (api.clone(), user.clone());
        buyers.spawn(async move { api.order(&user, &[("gems", 1)], true).await });
    }
    let mut orders = std::collections::BTreeSet::new();
    while let Some(order) = buyers.join_next().await {
        let order = order.expect("a purchase");
        orders.insert(order["order_id"].as_str().expect("order_id").to_owned());
    }
    assert_eq!(orders.len(), purchases as usize, "one order per purchase");
    let after = crate::metrics::scrape(&api.base).await;
    // One batch in flight on a shard with other members: what arrives meanwhile goes in the next entry.
    let mean = histogram_mean_since(&before, &after, "shopkeep_raft_batch_commands")
        .expect("the leader proposed batches");
    assert!(
        mean > 1.5,
        "node {leader} proposed {mean:.2} commands per entry on average: concurrent purchases were not batched"
    );
    let want = Wallet {
        balance: 30_000,
        held: 0,
        available: 30_000,
    };
    for node in c.ids() {
        assert_eq!(c.node(node).wallet(&user).await, want, "node {node}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_applies_the_leaders_entries_in_groups_and_a_read_on_it_still_sees_every_write()
{
    let c = TestCluster::start(3).await;
    let user = uniq("grp");
    c.api(1).create_item("gems", "currency", "1.00").await;
    let (shard, _) = c.route(&user).await;
    let leader = c.leader_of_shard(shard).await;
    let follower = others(&c, leader)[0];
    let api = c.api(leader);
    api.create_user(&user).await;
    api.credit(&user, "100.00").await;
    let base = c.api(follower).base.clone();
    let before = crate::metrics::scrape(&base).await;
    let purchases = 40u32;
    for _ in 0..purchases {
        api.order(&user, &[("gems", 1)], true).await;
    }
    // Right after the last write: the read barrier asks for what the follower holds back.
    let want = Wallet {
        balance: 6000,
        held: 0,
        available: 6000,
    };
    assert_eq!(c.node(follower).wallet(&user).await, want);
    let after = crate::metrics::scrape(&base).await;
    let mean = histogram_mean_since(&before, &after, "shopkeep_raft_apply_entries")
        .expect("the follower applied entries");
    assert!(
        mean > 1.5,
        "node {follower} applied {mean:.2} entries per transaction on average: not in groups"
    );
    // What it holds back is applied on its own too, without a read: the local copies converge.
    api.order(&user, &[("gems", 1)], true).await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let hashes = c.audit_hashes(&c.ids(), true).await;
        if hashes.values().all(|h| h == &hashes[&leader]) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas differ: {hashes:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
