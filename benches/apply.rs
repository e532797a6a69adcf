//! Micro-benchmark of the state machine: the cost of applying purchase and refund commands to a real
//! redb file, per command, at several batch sizes (commands per write transaction).
//!
//! What it measures: `ShardStore::apply_entries` — the call the Raft state machine makes for each
//! batch of committed entries — on a shard file in a temporary directory, with envelopes built as the
//! HTTP layer builds them (time, id seed, an idempotency tag scoped to the user, so every command also
//! looks up and stores its idempotency outcome). No HTTP, no Raft log, no network. The transaction's
//! durability is the product's: `apply_entries` commits without fsync except once per
//! `DEFAULT_DURABLE_EVERY` (2 s), and each batch size runs longer than that by default, so the
//! occasional fsync is in the figures, as it is in production.
//!
//! How: for each batch size (1, 64, 512), on a fresh shard file (so that the sizes compare): seeds
//! one currency item (`gems`, 0.01) and 512 users with 100,000.00 each, applies one-step purchases
//! (`CreateOrder { complete: true }`, one gem, users round-robin) in batches for `SHOPKEEP_APPLY_SECONDS` (3 s), then
//! as many full refunds of those orders (`Refund`, all lines) in batches of the same size. The
//! envelopes are built before the clock starts. Every outcome must be a success (the run panics
//! otherwise: a benchmark of rejections would be meaningless).
//!
//! Prints, per (command, batch size): commands, batches, ns per command, commands per second, and the
//! p50 / p99 / max time of one batch (one transaction).
//!
//! ```text
//! cargo bench --bench apply
//! SHOPKEEP_APPLY_SECONDS=3 SHOPKEEP_APPLY_BATCHES=1,16,128,512 cargo bench --bench apply
//! ```

// A benchmark converts counts to rates, percentiles and plot coordinates, and a broken setup may panic:
// the workspace's cast and unwrap lints guard the service, not its measuring tools.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_lossless
)]

use std::time::{Duration, Instant};

use shopkeep::domain::{
    Command, Envelope, IdSeed, IdempotencyTag, ItemKind, ItemSpec, LineRequest, Money, Reply,
    Timestamp, command,
};
use shopkeep::engine::sweeper::WALK_WINDOW;
use shopkeep::state::{ShardStore, query};
use uuid::Uuid;

const USERS: usize = 512;
const DEFAULT_BATCHES: &[usize] = &[1, 64, 512];
const DEFAULT_SECONDS: f64 = 3.0;
/// At most this many purchases per case (a bound on the file's growth).
const MAX_COMMANDS: usize = 200_000;
/// A replication marker of the size openraft's is (where the state is in the log).
const MARKER: [u8; 48] = [7; 48];

fn main() {
    let batches = batch_sizes();
    let seconds = std::env::var("SHOPKEEP_APPLY_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0 && s.is_finite())
        .unwrap_or(DEFAULT_SECONDS);
    let budget = Duration::from_secs_f64(seconds);

    eprintln!(
        "per batch size: a fresh shard file with {USERS} users, {seconds:.1} s of purchases, then as many refunds"
    );

    println!();
    println!(
        "{:>8} {:>6} {:>9} {:>8} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "command",
        "batch",
        "commands",
        "batches",
        "ns/command",
        "commands/s",
        "p50 µs",
        "p99 µs",
        "max µs"
    );
    let mut rows = Vec::new();
    let mut files = Vec::new();
    let mut walks = Vec::new();
    for &batch in &batches {
        // A fresh file per batch size, so that the sizes are compared on files of the same history.
        let dir = tempfile::Builder::new()
            .prefix("shopkeep-bench-apply-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let path = dir.path().join("shard-000.redb");
        let store = ShardStore::open(&path, 0).expect("cannot open the shard file");
        let mut shard = Shard {
            store,
            index: 0,
            seq: 0,
        };
        seed(&mut shard);
        // Purchases: batches until the budget is spent.
        let mut orders: Vec<(usize, Uuid)> = Vec::new();
        let mut times = Vec::new();
        let started = Instant::now();
        while started.elapsed() < budget && orders.len() < MAX_COMMANDS {
            let envelopes: Vec<(usize, Envelope)> = (0..batch)
                .map(|i| {
                    let user = (orders.len() + i) % USERS;
                    (user, shard.purchase(user))
                })
                .collect();
            let (elapsed, replies) = shard.apply(envelopes.iter().map(|(_, e)| e));
            times.push(elapsed);
            for ((user, _), reply) in envelopes.iter().zip(replies) {
                match reply {
                    Reply::OrderCreated(order) => orders.push((*user, order.order_id)),
                    other => panic!("a purchase answered {other:?}"),
                }
            }
        }
        rows.push(row("purchase", batch, orders.len(), &times));

        // Refunds of those orders, in batches of the same size.
        let mut times = Vec::new();
        for chunk in orders.chunks(batch) {
            let envelopes: Vec<Envelope> = chunk
                .iter()
                .map(|&(user, order_id)| shard.refund(user, order_id))
                .collect();
            let (elapsed, replies) = shard.apply(envelopes.iter());
            times.push(elapsed);
            for reply in replies {
                assert!(
                    matches!(reply, Reply::Refunded { .. }),
                    "a refund answered {reply:?}"
                );
            }
        }
        rows.push(row("refund", batch, orders.len(), &times));
        walks.push(walk_look(&shard));
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        files.push(format!(
            "batch {batch}: {:.1} MiB after {} commands",
            size as f64 / (1024.0 * 1024.0),
            shard.index
        ));
    }
    println!();
    println!("redb files: {}", files.join("; "));
    println!(
        "the sweeper's look at {WALK_WINDOW} idempotency records: {}",
        walks.join("; ")
    );
    let json: Vec<serde_json::Value> = rows.into_iter().collect();
    println!("{}", serde_json::json!({"bench": "apply", "results": json}));
}

/// The shard under test and the next log position / id counter.
struct Shard {
    store: ShardStore,
    index: u64,
    seq: u64,
}

impl Shard {
    /// An envelope as the HTTP layer makes one: now, a fresh seed, an idempotency tag for `scope`.
    fn envelope(&mut self, scope: Option<&str>, command: Command) -> Envelope {
        self.seq += 1;
        let now = Timestamp::now();
        let mut fingerprint = [0u8; 32];
        fingerprint[..8].copy_from_slice(&self.seq.to_le_bytes());
        Envelope {
            now,
            seed: IdSeed {
                unix_millis: now.unix_millis(),
                entropy: u128::from(self.seq)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
            },
            idempotency: scope.map(|scope| IdempotencyTag {
                scope: scope.to_owned(),
                key: Uuid::now_v7().to_string(),
                fingerprint,
                expires_at: now.plus_days(7),
            }),
            command,
        }
    }

    fn purchase(&mut self, user: usize) -> Envelope {
        let user_id = user_id(user);
        let now = Timestamp::now();
        let command = Command::CreateOrder(command::CreateOrder {
            user_id: user_id.clone(),
            lines: vec![LineRequest {
                item_id: "gems".into(),
                quantity: 1,
            }],
            expected_total: None,
            complete: true,
            expires_at: now.plus(Duration::from_secs(15 * 60)),
            max_pending_orders: 100,
        });
        self.envelope(Some(&user_id), command)
    }

    fn refund(&mut self, user: usize, order_id: Uuid) -> Envelope {
        let user_id = user_id(user);
        let command = Command::Refund(command::Refund {
            user_id: user_id.clone(),
            order_id,
            lines: None,
            reason: None,
            force: false,
        });
        self.envelope(Some(&user_id), command)
    }

    /// Applies `envelopes` as one batch (one write transaction), each at its own log position; the
    /// time it took and the replies (panics on a storage error or a rejection).
    fn apply<'a>(
        &mut self,
        envelopes: impl Iterator<Item = &'a Envelope>,
    ) -> (Duration, Vec<Reply>) {
        let entries: Vec<(u64, Option<&Envelope>)> = envelopes
            .map(|envelope| {
                self.index += 1;
                (self.index, Some(envelope))
            })
            .collect();
        let started = Instant::now();
        let applied = self
            .store
            .apply_entries(&entries, &MARKER)
            .expect("apply_entries failed");
        let elapsed = started.elapsed();
        let replies = applied
            .into_iter()
            .map(|applied| {
                let applied = applied.expect("every entry carries a command");
                match applied.outcome {
                    Ok(reply) => reply,
                    Err(rejection) => panic!("a command was rejected: {rejection:?}"),
                }
            })
            .collect();
        (elapsed, replies)
    }
}

/// One currency item and `USERS` users with 100,000.00 each, in batches of 512; the shard purges its
/// idempotency outcomes by walking them, as every shard of a running node does after its first sweep.
fn seed(shard: &mut Shard) {
    let walk = shard.envelope(
        None,
        Command::PurgeIdempotency(command::PurgeIdempotency::from_first(1, 1)),
    );
    shard.apply([&walk].into_iter());
    let item = shard.envelope(
        None,
        Command::PutItem(command::PutItem {
            spec: ItemSpec {
                item_id: "gems".into(),
                name: "Gems".into(),
                kind: ItemKind::Currency,
                price: Money::from_minor(1),
                active: true,
                refund_window_days: 14,
            },
            version: None,
        }),
    );
    shard.apply([&item].into_iter());
    let users: Vec<Envelope> = (0..USERS)
        .map(|i| {
            shard.envelope(
                None,
                Command::CreateUser(command::CreateUser {
                    user_id: user_id(i),
                    display_name: None,
                }),
            )
        })
        .collect();
    shard.apply(users.iter());
    let credits: Vec<Envelope> = (0..USERS)
        .map(|i| {
            let user = user_id(i);
            shard.envelope(
                Some(&user.clone()),
                Command::Credit(command::Credit {
                    user_id: user,
                    amount: Money::from_minor(10_000_000),
                    external_ref: format!("seed-{i}"),
                    source: None,
                    ref_accepted: true,
                }),
            )
        })
        .collect();
    shard.apply(credits.iter());
}

/// The time of the sweeper's read-only look at a window of the shard's idempotency records (none due
/// yet), as each shard's leader makes one per `--sweep-interval` (the median of 21).
fn walk_look(shard: &Shard) -> String {
    let mut times: Vec<Duration> = (0..21)
        .map(|_| {
            let txn = shard.store.begin_read().expect("read");
            let started = Instant::now();
            let look =
                query::idempotency_walk(&txn, ("", ""), Timestamp(0), |_| WALK_WINDOW as usize)
                    .expect("look");
            let elapsed = started.elapsed();
            assert!(look.walking && look.first_due.is_none());
            elapsed
        })
        .collect();
    times.sort();
    format!("{:.2} ms", times[times.len() / 2].as_secs_f64() * 1e3)
}

fn user_id(i: usize) -> String {
    format!("bench-{i}")
}

/// Prints one row of the table; its JSON.
fn row(command: &str, batch: usize, commands: usize, times: &[Duration]) -> serde_json::Value {
    let total: Duration = times.iter().sum();
    let mut micros: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
    micros.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        if micros.is_empty() {
            return f64::NAN;
        }
        let rank = (q * micros.len() as f64).ceil() as usize;
        micros[rank.clamp(1, micros.len()) - 1]
    };
    let ns_per_command = total.as_secs_f64() * 1e9 / commands.max(1) as f64;
    let per_second = commands as f64 / total.as_secs_f64().max(1e-9);
    let (p50, p99, max) = (pick(0.5), pick(0.99), pick(1.0));
    println!(
        "{:>8} {:>6} {:>9} {:>8} {:>12.0} {:>12.0} {:>10.1} {:>10.1} {:>10.1}",
        command,
        batch,
        commands,
        times.len(),
        ns_per_command,
        per_second,
        p50,
        p99,
        max
    );
    serde_json::json!({
        "command": command,
        "batch": batch,
        "commands": commands,
        "batches": times.len(),
        "ns_per_command": ns_per_command.round(),
        "commands_per_s": per_second.round(),
        "batch_p50_us": (p50 * 10.0).round() / 10.0,
        "batch_p99_us": (p99 * 10.0).round() / 10.0,
        "batch_max_us": (max * 10.0).round() / 10.0,
    })
}

fn batch_sizes() -> Vec<usize> {
    let Ok(text) = std::env::var("SHOPKEEP_APPLY_BATCHES") else {
        return DEFAULT_BATCHES.to_vec();
    };
    let sizes: Vec<usize> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => n,
            _ => panic!("SHOPKEEP_APPLY_BATCHES: {s:?} is not a batch size from 1 to 10000"),
        })
        .collect();
    assert!(!sizes.is_empty(), "SHOPKEEP_APPLY_BATCHES lists no size");
    sizes
}
