//! Events and webhooks on a 3-node cluster, against a real receiver: a SIGKILLed shard leader and a wiped and
//! rebuilt member lose no delivery and break no shard's order; the feed pages the same on every node across a
//! leader change. Also the delivery latency (ignored; run by hand).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use reqwest::Method;
use serde_json::{Value, json};

use crate::cluster_harness::*;
use crate::harness::*;
use crate::webhook_receiver::{Received, WebhookReceiver};
use crate::webhooks::{assert_in_order_without_gaps, seqs_by_shard, wait_for_ids};

/// One page of the feed through `api` (`local`: `?consistency=local`): (events, next_cursor); one attempt
/// of at most 10 s, `Err` with what came back unless 200.
pub async fn feed_page(
    api: &Api,
    after: Option<&str>,
    limit: u32,
    local: bool,
) -> Result<(Vec<Value>, String), String> {
    let mut path = format!("/v1/events?limit={limit}");
    if let Some(c) = after {
        path.push_str(&format!("&after={}", urlenc(c)));
    }
    if local {
        path.push_str("&consistency=local");
    }
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        api.call(Method::GET, &path).auth(Auth::Service).try_send(),
    )
    .await
    .map_err(|_| format!("GET {path}: no answer within 10 s"))?
    .map_err(|e| format!("GET {path}: transport error {e}"))?;
    if r.status != 200 {
        return Err(format!("GET {path}: {r:?}"));
    }
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("GET {path}: {e}"))?;
    let events = v["events"]
        .as_array()
        .cloned()
        .ok_or_else(|| format!("GET {path}: no events in {v}"))?;
    let next = v["next_cursor"]
        .as_str()
        .ok_or_else(|| format!("GET {path}: no next_cursor in {v}"))?
        .to_owned();
    Ok((events, next))
}

/// [`feed_page`], tried on each of `apis` in turn until one answers 200 (≤ `within`).
pub async fn feed_page_retrying(
    apis: &[Api],
    after: Option<&str>,
    limit: u32,
    local: bool,
    within: Duration,
) -> Result<(Vec<Value>, String), String> {
    let deadline = Instant::now() + within;
    let mut i = 0;
    loop {
        match feed_page(&apis[i % apis.len()], after, limit, local).await {
            Ok(page) => return Ok(page),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        i += 1;
    }
}

/// Every event after `after` (pages of 1000 until an empty one) through `apis`, each page retried ≤ `within`;
/// and the cursor after them.
pub async fn drain_feed(
    apis: &[Api],
    after: Option<String>,
    local: bool,
    within: Duration,
) -> Result<(Vec<Value>, String), String> {
    let mut all = Vec::new();
    let mut cursor = after;
    loop {
        let (events, next) =
            feed_page_retrying(apis, cursor.as_deref(), 1000, local, within).await?;
        let done = events.is_empty();
        all.extend(events);
        cursor = Some(next);
        if done {
            return Ok((all, cursor.unwrap()));
        }
    }
}

/// PUTs webhook `name` → `url` through `apis` in turn until one answers 200 (≤ `within`); its answer.
pub async fn put_webhook_retrying(
    apis: &[Api],
    name: &str,
    url: &str,
    within: Duration,
) -> Result<Value, String> {
    let deadline = Instant::now() + within;
    let mut i = 0;
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            apis[i % apis.len()]
                .call(Method::PUT, &format!("/v1/webhooks/{name}"))
                .auth(Auth::Admin)
                .json(&json!({ "url": url }))
                .try_send(),
        )
        .await;
        let last = match r {
            Ok(Ok(r)) if r.status == 200 => return Ok(r.json()),
            Ok(Ok(r)) => format!("{r:?}"),
            Ok(Err(e)) => format!("transport error {e}"),
            Err(_) => "no answer within 10 s".into(),
        };
        if Instant::now() > deadline {
            return Err(format!("PUT /v1/webhooks/{name}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        i += 1;
    }
}

/// The event ids of `events`.
pub fn event_ids(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Per shard, the event ids in seq order, and whether the seqs are exactly 1..=n.
pub fn ids_by_shard(events: &[Value]) -> BTreeMap<u64, Vec<(u64, String)>> {
    let mut out: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    for e in events {
        out.entry(e["shard"].as_u64().unwrap()).or_default().push((
            e["seq"].as_u64().unwrap(),
            e["event_id"].as_str().unwrap().to_owned(),
        ));
    }
    out.values_mut().for_each(|v| v.sort());
    out
}

/// POST `body` with one key, over `apis` in turn, until a definite answer (not 5xx, no transport error) or
/// `within` passes; the status (None: never definite).
async fn post_retrying(
    apis: &[Api],
    start: usize,
    path: &str,
    body: &Value,
    within: Duration,
) -> Option<u16> {
    let key = new_key();
    let deadline = Instant::now() + within;
    let mut i = start;
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            apis[i % apis.len()]
                .call(Method::POST, path)
                .auth(Auth::Service)
                .key(&key)
                .json(body)
                .try_send(),
        )
        .await;
        if let Ok(Ok(r)) = r {
            if r.status < 500 {
                return Some(r.status);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        i += 1;
    }
}

/// Writers creating users (each on whichever shard its id hashes to), crediting them and buying, round-robin
/// over every node (a dead one is skipped by the retries), until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(apis: Vec<Api>, prefix: &str, n: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = (0..n)
            .map(|w| {
                let (apis, stop, done) = (apis.clone(), stop.clone(), done.clone());
                let prefix = format!("{prefix}{w}-");
                tokio::spawn(async move {
                    let mut i = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        let user = format!("{prefix}{i}");
                        let within = Duration::from_secs(20);
                        let steps = [
                            ("/v1/users".to_owned(), json!({ "user_id": user })),
                            (
                                format!("/v1/users/{user}/credits"),
                                json!({"amount": "10.00", "external_ref": format!("x-{user}"), "source": "card"}),
                            ),
                            (
                                format!("/v1/users/{user}/orders"),
                                order_body(&[("gems", 2)], true),
                            ),
                        ];
                        for (path, body) in &steps {
                            if post_retrying(&apis, w + i, path, body, within).await == Some(201) {
                                done.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Writers { stop, done, tasks }
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Asks them to stop (they finish the write at hand).
    fn ask_to_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether every writer has stopped.
    fn all_stopped(&self) -> bool {
        self.tasks.iter().all(tokio::task::JoinHandle::is_finished)
    }

    async fn wait_done(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.done() < n {
            assert!(
                Instant::now() < deadline,
                "only {} writes done within {within:?}, not {n}",
                self.done()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("writer");
        }
        self.done.load(Ordering::SeqCst)
    }
}

/// Every event of `events` arrived (≤ 60 s), every request's signature verified, its body is the feed's
/// event, and per shard the first arrivals are in seq order without a gap. Returns (requests, duplicates).
async fn assert_all_delivered(receiver: &WebhookReceiver, events: &[Value]) -> (usize, usize) {
    let ids = event_ids(events);
    assert_eq!(ids.len(), events.len(), "an event id repeats in the feed");
    wait_for_ids(receiver, &ids, Duration::from_secs(60)).await;
    let received = receiver.received();
    let by_id: BTreeMap<&str, &Value> = events
        .iter()
        .map(|e| (e["event_id"].as_str().unwrap(), e))
        .collect();
    for r in &received {
        assert_eq!(r.verified, Some(true), "signature of {:?}", r.event_id());
        assert_eq!(r.event_id(), r.body["event_id"].as_str());
        if let Some(e) = by_id.get(r.event_id().unwrap()) {
            assert_eq!(&r.body, *e, "the body is the feed's event");
        }
    }
    assert_in_order_without_gaps(&received, &seqs_by_shard(events));
    let distinct: BTreeSet<&str> = received.iter().filter_map(Received::event_id).collect();
    (received.len(), received.len() - distinct.len())
}

/// Per shard, the feed's seqs run without a gap from the first one.
fn assert_feed_has_no_gap(events: &[Value]) {
    for (shard, seqs) in seqs_by_shard(events) {
        let first = seqs[0];
        let want: Vec<u64> = (first..first + seqs.len() as u64).collect();
        assert_eq!(seqs, want, "shard {shard}: the feed's seqs have a gap");
    }
}

async fn setup(c: &TestCluster) -> (WebhookReceiver, String) {
    c.api(1).create_item("gems", "currency", "1.00").await;
    let receiver = WebhookReceiver::start(None).await;
    let apis: Vec<Api> = c.ids().into_iter().map(|i| c.api(i)).collect();
    let hook = put_webhook_retrying(&apis, "game", &receiver.url("/e"), Duration::from_secs(20))
        .await
        .unwrap();
    receiver.set_secret(Some(hook["secret"].as_str().unwrap().to_owned()));
    let (_, start) = drain_feed(&apis, None, false, Duration::from_secs(20))
        .await
        .unwrap();
    (receiver, start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_delivery_survives_a_sigkilled_shard_leader() {
    let mut c = TestCluster::start(3).await;
    let (receiver, start) = setup(&c).await;
    let apis: Vec<Api> = c.ids().into_iter().map(|i| c.api(i)).collect();
    let writers = Writers::start(apis.clone(), "k", 4);
    writers.wait_done(40, Duration::from_secs(30)).await;

    // The leader of shard 0 delivers its events; SIGKILL it mid-stream.
    let victim = c.leader_of_shard(0).await;
    let delivered_before = receiver.received().len();
    c.kill9(victim);
    let killed_at = Instant::now();
    let writes_at_kill = writers.done();
    let live: Vec<u64> = c.ids().into_iter().filter(|&i| i != victim).collect();
    let new_leader = c.leader_of_shard_among(0, &live).await;
    let takeover = killed_at.elapsed();
    writers
        .wait_done(writes_at_kill + 40, Duration::from_secs(30))
        .await;
    c.restart(victim).await;
    c.wait_ready(&[victim], READY_TIMEOUT).await;
    let writes_at_restart = writers.done();
    writers
        .wait_done(writes_at_restart + 20, Duration::from_secs(30))
        .await;
    let writes = writers.finish().await;

    let (events, _) = drain_feed(&apis, Some(start), false, Duration::from_secs(20))
        .await
        .unwrap();
    assert_feed_has_no_gap(&events);
    let shard0_after_kill = receiver
        .received()
        .iter()
        .filter(|r| r.at > killed_at && r.body["shard"] == 0)
        .count();
    let (requests, duplicates) = assert_all_delivered(&receiver, &events).await;
    eprintln!(
        "shard 0: leader node {victim} killed after {delivered_before} deliveries, node {new_leader} leads it \
         {:.1} s later; {writes} writes, {} events, {requests} requests ({duplicates} repeated), \
         {shard0_after_kill} of shard 0 after the kill",
        takeover.as_secs_f64(),
        events.len(),
    );
    assert!(
        events.iter().any(|e| e["shard"] == 0),
        "no event on the killed leader's shard: the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_delivery_continues_after_a_member_is_wiped_and_rebuilt() {
    let mut c = TestCluster::start(3).await;
    let (receiver, start) = setup(&c).await;
    let apis: Vec<Api> = c.ids().into_iter().map(|i| c.api(i)).collect();
    let writers = Writers::start(apis.clone(), "w", 4);
    writers.wait_done(40, Duration::from_secs(30)).await;

    // Node 3 loses its disk mid-stream (it may lead shards: they fail over), comes back empty and is rebuilt.
    let victim = 3;
    let led: Vec<u64> = {
        let v = c.node(victim).view().await;
        (0..c.opts.shards as u64)
            .filter(|&s| shard_view(&v, s)["role"] == "leader")
            .collect()
    };
    c.kill9(victim);
    c.wipe_data_dir(victim);
    let at_wipe = writers.done();
    writers
        .wait_done(at_wipe + 30, Duration::from_secs(30))
        .await;
    c.restart(victim).await;
    c.wait_ready(&[victim], READY_TIMEOUT).await;
    let at_restart = writers.done();
    writers
        .wait_done(at_restart + 30, Duration::from_secs(30))
        .await;
    // Once it is a full member again, node 1 dies: the rebuilt member now leads shards and delivers from
    // the positions it was rebuilt with.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = c.node(victim).try_view().await;
        let rebuilt = view.as_ref().is_some_and(|v| {
            (0..c.opts.shards as u64).all(|s| shard_view(v, s)["recovery"] == "none")
        });
        if rebuilt {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {victim} never finished rebuilding: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.kill9(1);
    // Node 1's shards are elected between node 2 and the rebuilt node; should node 2 win them all, the
    // rebalance spreads them over the two, so that the rebuilt node delivers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leads_after = loop {
        let mut leads = vec![];
        for shard in 0..c.opts.shards as u64 {
            if c.leader_of_shard_among(shard, &[2, victim]).await == victim {
                leads.push(shard);
            }
        }
        if !leads.is_empty() || Instant::now() >= deadline {
            break leads;
        }
        let _ = c
            .api(2)
            .call(reqwest::Method::POST, "/v1/admin/cluster/leaders/rebalance")
            .auth(Auth::Admin)
            .fresh_key()
            .try_send()
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let at_kill = writers.done();
    writers
        .wait_done(at_kill + 30, Duration::from_secs(30))
        .await;
    c.restart(1).await;
    c.wait_ready(&[1], READY_TIMEOUT).await;
    let writes = writers.finish().await;
    assert!(
        !leads_after.is_empty(),
        "the rebuilt node leads no shard with node 1 down: the test proves less than it says"
    );

    let (events, _) = drain_feed(&apis, Some(start), false, Duration::from_secs(20))
        .await
        .unwrap();
    assert_feed_has_no_gap(&events);
    let (requests, duplicates) = assert_all_delivered(&receiver, &events).await;

    // Every member's own feed, the rebuilt one's included, eventually has the events a linearizable full
    // read has (from the beginning).
    let (reference, _) = drain_feed(&apis[..1], None, false, Duration::from_secs(20))
        .await
        .unwrap();
    let reference = ids_by_shard(&reference);
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in c.ids() {
        loop {
            let local = drain_feed(&[c.api(id)], None, true, Duration::from_secs(20)).await;
            let local = local.map(|(e, _)| ids_by_shard(&e));
            if local.as_ref() == Ok(&reference) {
                break;
            }
            let sizes = |m: &BTreeMap<u64, Vec<(u64, String)>>| {
                m.iter()
                    .map(|(s, v)| (*s, v.len()))
                    .collect::<BTreeMap<_, _>>()
            };
            assert!(
                Instant::now() < deadline,
                "node {id}'s own feed differs from a full read (events per shard {:?}): {:?}",
                sizes(&reference),
                local.map(|l| sizes(&l))
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    for (shard, evs) in &reference {
        let seqs: Vec<u64> = evs.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=evs.len() as u64).collect::<Vec<_>>(),
            "shard {shard}: seqs are 1..=n on every replica"
        );
    }
    eprintln!(
        "node {victim} (leading shards {led:?}) wiped and rebuilt, then leading shards {leads_after:?} with node 1 down: {writes} writes, {} events since the webhook, \
         {requests} requests ({duplicates} repeated); every member's own feed: {} events",
        events.len(),
        reference.values().map(Vec::len).sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feed_paging_is_stable_across_a_leader_change() {
    let mut c = TestCluster::start(3).await;
    c.api(1).create_item("gems", "currency", "1.00").await;
    let apis: Vec<Api> = c.ids().into_iter().map(|i| c.api(i)).collect();
    // Some history before paging, then more written while it pages.
    for i in 0..10 {
        let user = format!("pre{i}");
        for (path, body) in [
            ("/v1/users".to_owned(), json!({ "user_id": user })),
            (
                format!("/v1/users/{user}/credits"),
                json!({"amount": "10.00", "external_ref": format!("x-{user}"), "source": "card"}),
            ),
        ] {
            assert_eq!(
                post_retrying(&apis, i, &path, &body, Duration::from_secs(20)).await,
                Some(201)
            );
        }
    }
    let writers = Writers::start(apis.clone(), "p", 2);

    // Phase 1: pages of 5 through every node in turn while the writers go on; a shard leader dies midway.
    let victim = c.leader_of_shard(1).await;
    let mut paged: Vec<Value> = Vec::new();
    let mut cursors: Vec<Option<String>> = vec![None];
    let mut cursor: Option<String> = None;
    let mut pages = 0usize;
    let mut killed = false;
    let began = Instant::now();
    loop {
        if pages == 12 && !killed {
            c.kill9(victim);
            killed = true;
        }
        let live: Vec<Api> = c
            .ids()
            .into_iter()
            .filter(|&i| !killed || i != victim)
            .map(|i| c.api(i))
            .collect();
        let turn: Vec<Api> = live[pages % live.len()..]
            .iter()
            .chain(&live[..pages % live.len()])
            .cloned()
            .collect();
        let (events, next) =
            feed_page_retrying(&turn, cursor.as_deref(), 5, false, Duration::from_secs(20))
                .await
                .unwrap();
        assert!(events.len() <= 5, "a page of {} events", events.len());
        paged.extend(events.iter().cloned());
        pages += 1;
        cursor = Some(next);
        cursors.push(cursor.clone());
        // An empty page once every write is done (and answered) ends the paging.
        let all_written = writers.all_stopped();
        if killed && all_written && events.is_empty() {
            break;
        }
        if killed && began.elapsed() > Duration::from_secs(8) {
            writers.ask_to_stop();
        }
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "paging never reached the end"
        );
    }
    let writes = writers.finish().await;
    c.restart(victim).await;
    c.wait_ready(&[victim], READY_TIMEOUT).await;
    // A write a writer gave up on (its outcome unknown) may still be applied after the empty page: the
    // pages go on from the last cursor to the end, as a consumer's would.
    let (late, _) = drain_feed(&apis, cursor.clone(), false, Duration::from_secs(20))
        .await
        .unwrap();
    paged.extend(late);

    // The union: no duplicate, none missing against a full read.
    let (full, _) = drain_feed(&apis, None, false, Duration::from_secs(20))
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    for e in &paged {
        assert!(
            seen.insert(e["event_id"].as_str().unwrap().to_owned()),
            "event paged twice: {e}"
        );
    }
    assert_eq!(
        seen,
        event_ids(&full),
        "paged events vs a full read ({} paged, {} in the full read)",
        paged.len(),
        full.len()
    );
    // Within a shard, paged in seq order.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for e in &paged {
        let (shard, seq) = (e["shard"].as_u64().unwrap(), e["seq"].as_u64().unwrap());
        let prev = last.insert(shard, seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "shard {shard}: seq {seq} paged after {prev}");
    }

    // Phase 2 (no writes): every cursor of phase 1 read on two different nodes gives the same page, while
    // another leader dies halfway.
    let victim2 = c.leader_of_shard(2).await;
    let mut compared = 0usize;
    let half = cursors.len() / 2;
    for (n, cur) in cursors.iter().enumerate() {
        if n == half {
            c.kill9(victim2);
        }
        let live: Vec<u64> = c
            .ids()
            .into_iter()
            .filter(|&i| n < half || i != victim2)
            .collect();
        let (a, b) = (live[n % live.len()], live[(n + 1) % live.len()]);
        let pa = feed_page_retrying(
            &[c.api(a)],
            cur.as_deref(),
            5,
            false,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        let pb = feed_page_retrying(
            &[c.api(b)],
            cur.as_deref(),
            5,
            false,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert_eq!(
            pa.0, pb.0,
            "cursor #{n} {cur:?}: node {a} and node {b} give different pages"
        );
        assert_eq!(
            pa.1, pb.1,
            "cursor #{n}: node {a} and node {b} give different next cursors"
        );
        compared += 1;
    }
    eprintln!(
        "{pages} pages of ≤ 5 ({} events, {writes} writes while paging) across the kill of node {victim} \
         (leader of shard 1); {compared} cursors read on two nodes alike across the kill of node {victim2}",
        paged.len()
    );
}

// ------------------------------------------------------------------------------------------------
// Delivery latency (a measurement, run by hand)
// ------------------------------------------------------------------------------------------------

/// The wall-clock time `r` arrived at (its `Instant` mapped through the clock now).
fn arrival_wall(r: &Received) -> SystemTime {
    SystemTime::now() - r.at.elapsed()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// 8 writers for 10 s through `apis` (orders of 1 gem each for their own funded user); then the latency
/// from each event's `occurred_at` to its first arrival: (events, p50 ms, p99 ms, max ms).
async fn measure(apis: Vec<Api>, receiver: &WebhookReceiver, tag: &str) -> (usize, f64, f64, f64) {
    let api = apis[0].clone();
    // A new webhook's delivery tasks start within 500 ms (the worker's rescan): measure from then on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    api.create_item("gems", "currency", "0.01").await;
    let mut users = vec![];
    for w in 0..8 {
        let user = format!("{tag}{w}");
        api.funded_user(&user, "1000.00").await;
        users.push(user);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // SHOPKEEP_LATENCY_PAUSE_MS: each writer rests this long after each order (0: as fast as it can,
    // which measures the backlog of a saturated delivery rather than its latency).
    let pause = Duration::from_millis(
        std::env::var("SHOPKEEP_LATENCY_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let tasks: Vec<_> = users
        .into_iter()
        .enumerate()
        .map(|(w, user)| {
            let (apis, stop) = (apis.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    post_retrying(
                        &apis,
                        w + n,
                        &format!("/v1/users/{user}/orders"),
                        &order_body(&[("gems", 1)], true),
                        Duration::from_secs(10),
                    )
                    .await;
                    n += 1;
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    let mut orders = 0;
    for t in tasks {
        orders += t.await.unwrap();
    }
    let (events, _) = drain_feed(&apis, None, false, Duration::from_secs(20))
        .await
        .unwrap();
    wait_for_ids(receiver, &event_ids(&events), Duration::from_secs(60)).await;
    let occurred: BTreeMap<String, SystemTime> = events
        .iter()
        .map(|e| {
            let t = time::OffsetDateTime::parse(
                e["occurred_at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            (
                e["event_id"].as_str().unwrap().to_owned(),
                SystemTime::UNIX_EPOCH + Duration::from_nanos(t.unix_timestamp_nanos() as u64),
            )
        })
        .collect();
    let mut first: BTreeMap<String, SystemTime> = BTreeMap::new();
    for r in receiver.received() {
        if let Some(id) = r.event_id() {
            first
                .entry(id.to_owned())
                .or_insert_with(|| arrival_wall(&r));
        }
    }
    let mut ms: Vec<f64> = occurred
        .iter()
        .map(|(id, at)| {
            first[id]
                .duration_since(*at)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let arrivals: Vec<SystemTime> = first.values().copied().collect();
    let (Some(from), Some(to)) = (arrivals.iter().min(), arrivals.iter().max()) else {
        panic!("nothing arrived");
    };
    let span = to.duration_since(*from).unwrap_or_default().as_secs_f64();
    eprintln!(
        "{tag}: {orders} orders in 10 s by 8 writers; {} events delivered over {span:.1} s ({:.0}/s)",
        first.len(),
        first.len() as f64 / span.max(0.001)
    );
    (
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        *ms.last().unwrap(),
    )
}

/// `cargo test --features failpoints --test it webhook_delivery_latency -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: cargo test --features failpoints --test it webhook_delivery_latency -- --ignored --nocapture"]
async fn webhook_delivery_latency_on_one_and_three_nodes() {
    let one = Server::start_with(Opts::new().shards(4)).await;
    let receiver = WebhookReceiver::start(None).await;
    put_webhook_retrying(
        &[one.api()],
        "lat",
        &receiver.url("/e"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let (n1, p50_1, p99_1, max_1) = measure(vec![one.api()], &receiver, "one").await;
    drop(one);

    let c = TestCluster::start(3).await;
    let receiver = WebhookReceiver::start(None).await;
    let apis: Vec<Api> = c.ids().into_iter().map(|i| c.api(i)).collect();
    put_webhook_retrying(&apis, "lat", &receiver.url("/e"), Duration::from_secs(10))
        .await
        .unwrap();
    let (n3, p50_3, p99_3, max_3) = measure(apis, &receiver, "three").await;
    eprintln!(
        "webhook delivery latency, occurred_at → first arrival (8 writers, 10 s):\n  \
         1 node:  {n1} events, p50 {p50_1:.1} ms, p99 {p99_1:.1} ms, max {max_1:.1} ms\n  \
         3 nodes: {n3} events, p50 {p50_3:.1} ms, p99 {p99_3:.1} ms, max {max_3:.1} ms"
    );
}
