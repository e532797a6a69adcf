//! The scale run's loader: builds a single node's data directory holding `users` users and `orders`
//! completed purchases directly through the state machine, without a server and without HTTP.
//!
//! Every row is written by `apply`, as on a serving node: the loader makes the `Envelope`s the HTTP
//! layer and the engine would make and applies them with `ShardStore::apply_entries`, `BATCH` per
//! redb transaction, each with the replication marker of its last entry. Per shard, in this order:
//!
//! 1. a `PurgeIdempotency` (nothing to purge yet), as a serving node's sweeper proposes one on every shard
//!    it leads: the shard then purges its idempotency outcomes by walking them and indexes none; then the
//!    catalog item `gems` (0.01, a currency), as `Node::put_item` writes it: `PutItem` without a
//!    version on the catalog's home shard (shard 0), with the version it chose on every other shard;
//! 2. the users of the shard (`bench-0`, `bench-1`, … routed by `engine::shard_of`, as the load's users
//!    are named), each followed by a direct credit of 100,000.00 (`Credit` with `ref_accepted`), and
//!    the external references (`ClaimExternalRef`, `credit:scale-{i}`) whose home shard this is, as
//!    `Node::credit` claims them;
//! 3. the orders: `CreateOrder` of one `gems` with `complete: true` (what `POST
//!    /v1/users/{id}/orders {"complete":true}` becomes), each for a user of the shard drawn at random,
//!    with an `Idempotency-Key` tag scoped to the user; after each batch of them, the event purges
//!    the leader's sweeper would have proposed by the batch's time (`PurgeEvents` with the default
//!    `--event-retention` of 7 days, `SWEEP_LIMIT` events each, until one purges fewer);
//! 4. a last round of those purges at the load's end, on every shard, and a check that none is left
//!    holding an event its sweeper would purge.
//!
//! Command times are spread evenly over the `HISTORY` before the load (the users' over its first tenth,
//! the orders' over the rest), so the data looks like history: order ids (UUIDv7) and the orders'
//! time-ordered keys are spread as a live shop's are. A tag is attached only to a command whose outcome
//! is still within the idempotency retention (7 days, the default `--idempotency-ttl`): the state is
//! then what a shop whose sweeper kept up would hold, and the node does not start with a purge of
//! millions of expired outcomes to catch up on. The same holds for the events every command emits: only
//! the last 7 days' are left (without these purges, the loaded node spent its measured phases purging
//! millions of old events: README, Benchmarks).
//!
//! The Raft side is that of `shopkeep restore` (`engine::backup::seed_log`): each shard's marker says
//! it applied entries 1..=n of term 1 led by node 1, in a one-voter membership of node 1 at
//! `address`, and the log is seeded after it. `shopkeep serve --node-id 1 --listen <address>` then
//! starts on the directory as on a restored one (its log is empty, the state is its snapshot).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shopkeep::datadir::{self, FixedSettings};
use shopkeep::domain::command::{
    ClaimExternalRef, CreateOrder, CreateUser, Credit, LineRequest, PurgeIdempotency, PutItem,
};
use shopkeep::domain::{
    Command, Currency, Envelope, IdSeed, IdempotencyTag, ItemKind, ItemSpec, Money, RefClaim,
    Reply, Timestamp,
};
use shopkeep::engine::backup::{seed_log, shard_path};
use shopkeep::engine::sweeper::{MAX_EVENT_RETENTION, SWEEP_LIMIT, purge_events_command};
use shopkeep::engine::{shard_of, shard_of_system_key};
use shopkeep::state::{ShardStore, query};
use shopkeep_raft::StoredMembership;
use shopkeep_raft::openraft::{BasicNode, CommittedLeaderId, LogId, Membership};
use shopkeep_raft::state_machine::offline_marker;

use crate::CREDIT_MINOR;
use crate::seed::user_id;

/// Shards of the loaded node (the server's default `--shards`).
pub(crate) const SHARDS: u32 = shopkeep::datadir::DEFAULT_SHARDS;
/// Envelopes per redb transaction.
const BATCH: usize = 2_000;
/// How far back the loaded history goes.
const HISTORY: Duration = Duration::from_secs(30 * 86_400);
/// The server's default `--idempotency-ttl`, `--order-ttl` and `--max-pending-orders`.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(7 * 86_400);
const ORDER_TTL: Duration = Duration::from_secs(15 * 60);
/// The server's default `--event-retention` (no webhook is registered, so none holds an event back).
const EVENT_RETENTION: Duration = Duration::from_secs(7 * 86_400);
const MAX_PENDING_ORDERS: u32 = 100;
/// Threads that load shards at once.
const THREADS: u32 = 2;

/// What a load took and how big the directory grew at each step.
pub(crate) struct Loaded {
    pub(crate) seconds: f64,
    pub(crate) users_seconds: f64,
    pub(crate) orders_seconds: f64,
    /// The directory's bytes with only the catalog, then with the users, then with the orders too.
    pub(crate) bytes_empty: u64,
    pub(crate) bytes_users: u64,
    pub(crate) bytes_total: u64,
    /// The fewest log entries any shard's state says it applied.
    pub(crate) min_shard_entries: u64,
}

/// One shard being loaded: its store, the next log index, the users routed to it, its clock.
struct ShardLoad {
    shard: u32,
    store: ShardStore,
    next_index: u64,
    users: Vec<u32>,
    refs: Vec<u32>,
    membership: StoredMembership,
    rng: u64,
}

impl ShardLoad {
    fn marker(&self, last: u64) -> Vec<u8> {
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), last);
        offline_marker(log_id, self.membership.clone()).expect("encode a marker")
    }

    /// Applies `envelopes` in batches; every outcome must be a success.
    fn apply(&mut self, envelopes: &[Envelope]) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(envelopes.len());
        for chunk in envelopes.chunks(BATCH) {
            let first = self.next_index;
            let entries: Vec<(u64, Option<&Envelope>)> =
                (first..).zip(chunk.iter().map(Some)).collect();
            let last = first + chunk.len() as u64 - 1;
            let applied = self
                .store
                .apply_entries(&entries, &self.marker(last))
                .unwrap_or_else(|e| panic!("shard {}: apply: {e}", self.shard));
            for (applied, envelope) in applied.into_iter().zip(chunk) {
                let applied = applied.expect("every entry has an envelope");
                match applied.outcome {
                    Ok(reply) => replies.push(reply),
                    Err(rejection) => panic!(
                        "shard {}: {} was rejected: {rejection:?}",
                        self.shard,
                        envelope.command.name()
                    ),
                }
            }
            self.next_index = last + 1;
        }
        replies
    }

    /// The event purges a leader's sweeper proposes at `now` (`sweeper::purge_events`): its command
    /// after another until one purges fewer than `SWEEP_LIMIT`. The events purged.
    fn purge_events(&mut self, now: Timestamp) -> u64 {
        let command = purge_events_command(EVENT_RETENTION);
        let mut total = 0;
        loop {
            let purge = self.envelope(now, None, command.clone());
            match self.apply(&[purge]).pop() {
                Some(Reply::EventsPurged { purged, .. }) => {
                    total += u64::from(purged);
                    if purged < SWEEP_LIMIT {
                        return total;
                    }
                }
                other => panic!("shard {}: PurgeEvents answered {other:?}", self.shard),
            }
        }
    }

    /// Panics if the shard holds an event its sweeper would purge at `now`: the loaded state must be
    /// that of a shop whose sweeper kept up.
    fn assert_no_event_due(&self, now: Timestamp) {
        let txn = self.store.begin_read().expect("a read transaction");
        let due = query::events_purge_due(&txn, now, EVENT_RETENTION, MAX_EVENT_RETENTION)
            .unwrap_or_else(|e| panic!("shard {}: {e}", self.shard));
        assert!(
            !due,
            "shard {}: events past the retention were left",
            self.shard
        );
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn envelope(
        &mut self,
        now: Timestamp,
        tag: Option<IdempotencyTag>,
        command: Command,
    ) -> Envelope {
        let entropy = (u128::from(self.random()) << 64) | u128::from(self.random());
        Envelope {
            now,
            seed: IdSeed {
                unix_millis: now.unix_millis(),
                entropy,
            },
            idempotency: tag,
            command,
        }
    }

    /// A tag as the HTTP layer makes it (scope: the user), if its outcome would still be kept at `end`.
    fn tag(&mut self, user: &str, now: Timestamp, end: Timestamp) -> Option<IdempotencyTag> {
        let expires_at = now.plus(IDEMPOTENCY_TTL);
        if expires_at <= end {
            return None;
        }
        let mut fingerprint = [0u8; 32];
        for chunk in fingerprint.chunks_mut(8) {
            chunk.copy_from_slice(&self.random().to_le_bytes());
        }
        Some(IdempotencyTag {
            scope: user.to_owned(),
            key: uuid::Uuid::from_u128(
                (u128::from(self.random()) << 64) | u128::from(self.random()),
            )
            .to_string(),
            fingerprint,
            expires_at,
        })
    }
}

fn gems() -> ItemSpec {
    ItemSpec {
        item_id: "gems".into(),
        name: "Gems".into(),
        kind: ItemKind::Currency,
        price: Money::from_minor(1),
        active: true,
        refund_window_days: 14,
    }
}

/// `credit:scale-{i}`: the external reference of user `i`'s credit, as `Node::credit` names it.
fn credit_ref(i: u32) -> String {
    format!("credit:scale-{i}")
}

/// Builds `dir` (created; must not hold a node yet) with `users` users and `orders` orders; `address`
/// is the node's `--listen` address recorded in the membership. Prints progress on stderr.
pub(crate) fn load(dir: &Path, address: &str, users: u32, orders: u64) -> Loaded {
    let started = Instant::now();
    datadir::restrict_new_files();
    datadir::prepare(dir, &FixedSettings::new(SHARDS, &Currency::eur()))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let end = Timestamp::now();
    let begin = Timestamp(end.micros() - i64::try_from(HISTORY.as_micros()).unwrap());
    let users_end = Timestamp(begin.micros() + (end.micros() - begin.micros()) / 10);
    let membership = StoredMembership::new(
        Some(LogId::new(CommittedLeaderId::new(1, 1), 1)),
        Membership::new(
            vec![BTreeSet::from([1u64])],
            BTreeMap::from([(1u64, BasicNode::new(address))]),
        ),
    );

    let mut shards: Vec<ShardLoad> = (0..SHARDS)
        .map(|shard| ShardLoad {
            shard,
            store: ShardStore::open_for_import(&shard_path(dir, shard), shard)
                .unwrap_or_else(|e| panic!("shard {shard}: {e}")),
            next_index: 1,
            users: Vec::new(),
            refs: Vec::new(),
            membership: membership.clone(),
            rng: 0x9e37_79b9_7f4a_7c15 ^ (u64::from(shard) + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        })
        .collect();
    for i in 0..users {
        shards[shard_of(&user_id(i as usize), SHARDS) as usize]
            .users
            .push(i);
        shards[shard_of_system_key(&format!("ref/{}", credit_ref(i)), SHARDS) as usize]
            .refs
            .push(i);
    }

    // 1. The walk, then the catalog: the home shard decides the version, the others copy it.
    for shard in shards.iter_mut() {
        let walk = shard.envelope(
            begin,
            None,
            Command::PurgeIdempotency(PurgeIdempotency::from_first(1, 1)),
        );
        shard.apply(&[walk]);
    }
    let spec = gems();
    let put = |version| {
        Command::PutItem(PutItem {
            spec: spec.clone(),
            version,
        })
    };
    let home = shards[0].envelope(begin, None, put(None));
    let version = match shards[0].apply(&[home]).pop() {
        Some(Reply::Item(item)) => item.version,
        other => panic!("PutItem answered {other:?}"),
    };
    for shard in shards.iter_mut().skip(1) {
        let copy = shard.envelope(begin, None, put(Some(version)));
        shard.apply(&[copy]);
    }
    for shard in &shards {
        shard.store.sync().expect("sync");
    }
    let bytes_empty = dir_bytes(dir);

    // 2. Users, their credits, the credits' references (each shard on one of THREADS threads).
    let users_started = Instant::now();
    let amount = Money::from_minor(i64::try_from(CREDIT_MINOR).unwrap());
    let per_user = Duration::from_micros(
        u64::try_from((users_end.micros() - begin.micros()) / i64::from(users.max(1))).unwrap(),
    );
    for_each_shard(&mut shards, |load| {
        let mut envelopes = Vec::with_capacity(BATCH);
        let refs = std::mem::take(&mut load.refs);
        for i in refs {
            let now = begin.plus(per_user * i);
            let claim = Command::ClaimExternalRef(ClaimExternalRef {
                reference: credit_ref(i),
                claim: RefClaim {
                    user_id: user_id(i as usize),
                    amount,
                    topup_id: None,
                },
            });
            envelopes.push(load.envelope(now, None, claim));
            if envelopes.len() == BATCH {
                load.apply(&std::mem::take(&mut envelopes));
            }
        }
        load.apply(&std::mem::take(&mut envelopes));
        for i in load.users.clone() {
            let user = user_id(i as usize);
            let now = begin.plus(per_user * i);
            let create = Command::CreateUser(CreateUser {
                user_id: user.clone(),
                display_name: None,
            });
            let tag = load.tag(&user, now, end);
            envelopes.push(load.envelope(now, tag, create));
            let credit = Command::Credit(Credit {
                user_id: user.clone(),
                amount,
                external_ref: format!("scale-{i}"),
                source: None,
                ref_accepted: true,
            });
            let tag = load.tag(&user, now, end);
            envelopes.push(load.envelope(now, tag, credit));
            if envelopes.len() >= BATCH {
                load.apply(&std::mem::take(&mut envelopes));
            }
        }
        load.apply(&envelopes);
        load.store.sync().expect("sync");
    });
    let users_seconds = users_started.elapsed().as_secs_f64();
    let bytes_users = dir_bytes(dir);
    eprintln!(
        "scale: loaded {users} users in {users_seconds:.1} s ({} MiB)",
        bytes_users / (1 << 20)
    );

    // 3. Orders, spread over the shards as their users are (each shard gets its users' share).
    let orders_started = Instant::now();
    let last_report = std::sync::Mutex::new(Instant::now());
    let order_done = AtomicU64::new(0);
    let events_purged = AtomicU64::new(0);
    for_each_shard(&mut shards, |load| {
        let shard_users = load.users.len() as u64;
        if shard_users == 0 {
            return;
        }
        let count = shard_orders(orders, users, load.shard, shard_users);
        let span = u64::try_from(end.micros() - users_end.micros()).unwrap() - 60_000_000;
        let mut envelopes = Vec::with_capacity(BATCH);
        for k in 0..count {
            let offset = span / count.max(1) * k;
            let now = Timestamp(users_end.micros() + i64::try_from(offset).unwrap());
            let pick = (load.random() % shard_users) as usize;
            let user = user_id(load.users[pick] as usize);
            let tag = load.tag(&user, now, end);
            let order = Command::CreateOrder(CreateOrder {
                user_id: user,
                lines: vec![LineRequest {
                    item_id: "gems".into(),
                    quantity: 1,
                }],
                expected_total: None,
                complete: true,
                expires_at: now.plus(ORDER_TTL),
                max_pending_orders: MAX_PENDING_ORDERS,
            });
            envelopes.push(load.envelope(now, tag, order));
            if envelopes.len() == BATCH {
                load.apply(&std::mem::take(&mut envelopes));
                events_purged.fetch_add(load.purge_events(now), Ordering::Relaxed);
                let so_far = order_done.fetch_add(BATCH as u64, Ordering::Relaxed) + BATCH as u64;
                let mut last = last_report.lock().unwrap();
                if last.elapsed() >= Duration::from_secs(10) {
                    *last = Instant::now();
                    let seconds = orders_started.elapsed().as_secs_f64();
                    eprintln!(
                        "scale: {so_far} / {orders} orders in {seconds:.0} s ({:.0}/s)",
                        so_far as f64 / seconds
                    );
                }
            }
        }
        load.apply(&envelopes);
        load.store.sync().expect("sync");
    });
    // 4. The sweeper's last round of event purges, on every shard (one without users too).
    for_each_shard(&mut shards, |load| {
        events_purged.fetch_add(load.purge_events(end), Ordering::Relaxed);
        load.assert_no_event_due(end);
        load.store.sync().expect("sync");
    });
    let orders_seconds = orders_started.elapsed().as_secs_f64();
    let min_shard_entries = shards
        .iter()
        .map(|load| load.next_index - 1)
        .min()
        .unwrap_or(0);
    let markers: Vec<(u32, Vec<u8>)> = shards
        .iter()
        .map(|load| (load.shard, load.marker(load.next_index - 1)))
        .collect();
    drop(shards);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime
        .block_on(seed_log(dir, markers))
        .unwrap_or_else(|e| panic!("seeding the log: {e}"));
    drop(runtime);
    wait_log_released(dir);
    let bytes_total = dir_bytes(dir);
    let loaded = Loaded {
        seconds: started.elapsed().as_secs_f64(),
        users_seconds,
        orders_seconds,
        bytes_empty,
        bytes_users,
        bytes_total,
        min_shard_entries,
    };
    eprintln!(
        "scale: loaded {orders} orders in {orders_seconds:.1} s ({:.0}/s), purging {} events past \
         the retention on the way; {} MiB in all",
        orders as f64 / orders_seconds.max(1e-9),
        events_purged.into_inner(),
        bytes_total / (1 << 20)
    );
    loaded
}

/// The orders of shard `shard`: the orders split over the shards in proportion to their users, the
/// rounding left to the last shard so that they add up to `orders`.
fn shard_orders(orders: u64, users: u32, shard: u32, shard_users: u64) -> u64 {
    if shard == SHARDS - 1 {
        orders - orders_before(orders, users, shard)
    } else {
        orders * shard_users / u64::from(users.max(1))
    }
}

/// The orders of the shards before `shard`.
fn orders_before(orders: u64, users: u32, shard: u32) -> u64 {
    let mut counts = vec![0u64; SHARDS as usize];
    for i in 0..users {
        counts[shard_of(&user_id(i as usize), SHARDS) as usize] += 1;
    }
    (0..shard)
        .map(|s| orders * counts[s as usize] / u64::from(users.max(1)))
        .sum()
}

/// Runs `work` on every shard, `THREADS` shards at a time.
fn for_each_shard(shards: &mut [ShardLoad], work: impl Fn(&mut ShardLoad) + Sync) {
    let mut groups: Vec<Vec<&mut ShardLoad>> = (0..THREADS).map(|_| Vec::new()).collect();
    for (i, shard) in shards.iter_mut().enumerate() {
        groups[i % THREADS as usize].push(shard);
    }
    std::thread::scope(|scope| {
        for group in groups {
            let work = &work;
            scope.spawn(move || {
                for shard in group {
                    work(shard);
                }
            });
        }
    });
}

/// The log's writer thread lets go of the file once its last handle is dropped: wait for it (the node
/// opens the file next).
fn wait_log_released(dir: &Path) {
    let path = shopkeep_faults::integrity::log_path(dir);
    for _ in 0..250 {
        if redb::Database::open(&path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{}: still held after seeding", path.display());
}

/// Bytes of every file under `dir` (what the data directory takes on disk, by length).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}
