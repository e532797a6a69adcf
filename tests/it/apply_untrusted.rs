//! `apply` does not trust the log: commands a faulty or hostile peer could propose (negative amounts,
//! amounts that overflow the system accounts, negative prices) are fed straight to a real redb shard, and
//! each must be a rejection that changes nothing — never a panic, never wrapped arithmetic.
//!
//! "Changes nothing" is exact: the shard after the rejected command has the same `state_hash` as a twin
//! shard that only advanced past the same log position without a command.

use proptest::prelude::*;
use shopkeep::domain::command;
use shopkeep::domain::money::MAX_WALLET_BALANCE;
use shopkeep::domain::{
    Command, Envelope, IdSeed, ItemKind, ItemSpec, LineRequest, Money, Outcome, Rejection,
    Timestamp,
};
use shopkeep::state::{ShardStore, audit, query};

const T0: i64 = 1_800_000_000_000_000;

/// A shard on a temporary redb file, and the number of commands applied so far (for ids and times).
struct Shard {
    _dir: tempfile::TempDir,
    store: ShardStore,
    counter: u128,
}

impl Shard {
    fn new(name: &str) -> Shard {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ShardStore::open(&dir.path().join(name), 0).expect("open store");
        Shard {
            _dir: dir,
            store,
            counter: 0,
        }
    }

    fn envelope(&mut self, command: Command) -> Envelope {
        self.counter += 1;
        let now = Timestamp(T0 + self.counter as i64);
        Envelope {
            now,
            seed: IdSeed {
                unix_millis: now.unix_millis(),
                entropy: self.counter,
            },
            idempotency: None,
            command,
        }
    }

    fn apply_all(&mut self, commands: Vec<Command>) -> Vec<Outcome> {
        let envelopes: Vec<Envelope> = commands.into_iter().map(|c| self.envelope(c)).collect();
        let mut outcomes = Vec::with_capacity(envelopes.len());
        for chunk in envelopes.chunks(500) {
            let refs: Vec<&Envelope> = chunk.iter().collect();
            let applied = self.store.apply_batch(&refs).expect("apply");
            outcomes.extend(applied.into_iter().map(|a| a.outcome));
        }
        outcomes
    }

    fn apply(&mut self, command: Command) -> Outcome {
        self.apply_all(vec![command]).remove(0)
    }

    /// Advances past the next log position without a command (what a rejection must amount to).
    fn skip_one(&mut self) {
        self.counter += 1;
        let next = query::meta(&self.store.begin_read().expect("read"))
            .expect("meta")
            .last_applied
            + 1;
        self.store
            .apply_entries(&[(next, None)], &[])
            .expect("advance");
    }

    fn hash(&self) -> String {
        audit::state_hash(&self.store.begin_read().expect("read")).expect("hash")
    }

    fn assert_audit_clean(&self) {
        let report = audit::audit(&self.store.begin_read().expect("read"), 0).expect("audit");
        assert!(report.violations.is_empty(), "{:?}", report.violations);
    }
}

fn create_user(user_id: &str) -> Command {
    Command::CreateUser(command::CreateUser {
        user_id: user_id.to_owned(),
        display_name: None,
    })
}

fn credit(user_id: &str, amount: Money, external_ref: &str) -> Command {
    Command::Credit(command::Credit {
        user_id: user_id.to_owned(),
        amount,
        external_ref: external_ref.to_owned(),
        source: None,
        ref_accepted: true,
    })
}

fn item(item_id: &str, price: Money) -> Command {
    Command::PutItem(command::PutItem {
        spec: ItemSpec {
            item_id: item_id.to_owned(),
            name: item_id.to_owned(),
            kind: ItemKind::Currency,
            price,
            active: true,
            refund_window_days: 14,
        },
        version: None,
    })
}

/// Two identical shards with one funded user: `setup` runs on both.
fn twins(setup: &[Command]) -> (Shard, Shard) {
    let mut a = Shard::new("a.redb");
    let mut b = Shard::new("b.redb");
    for shard in [&mut a, &mut b] {
        for outcome in shard.apply_all(setup.to_vec()) {
            assert!(outcome.is_ok(), "{outcome:?}");
        }
    }
    assert_eq!(a.hash(), b.hash());
    (a, b)
}

/// Applies `command` to `a` and only advances `b`: `command` must be an `invalid_request` rejection and
/// leave `a` exactly like `b`.
fn assert_rejected_without_effect(a: &mut Shard, b: &mut Shard, command: Command) {
    let outcome = a.apply(command);
    assert!(
        matches!(outcome, Err(Rejection::InvalidRequest { .. })),
        "{outcome:?}"
    );
    b.skip_one();
    // The shard's applied time (a clock that only moves forward) took the rejected command's time on
    // `a`; one more command, the same on both, brings both clocks to its own later time, so what is left
    // to compare is everything else.
    let probe = create_user(&format!("probe-{}", a.counter));
    assert!(a.apply(probe.clone()).is_ok() && b.apply(probe).is_ok());
    assert_eq!(a.hash(), b.hash(), "the rejected command changed the state");
    a.assert_audit_clean();
}

fn funded() -> Vec<Command> {
    vec![
        create_user("u"),
        credit("u", Money::from_minor(10_000), "ref-0"),
        item("gems", Money::from_minor(100)),
    ]
}

#[test]
fn negative_and_zero_amounts_are_rejected_without_effect() {
    let (mut a, mut b) = twins(&funded());
    for amount in [
        Money::from_minor(-500),
        Money::from_minor(0),
        Money::from_minor(i64::MIN),
    ] {
        assert_rejected_without_effect(&mut a, &mut b, credit("u", amount, "ref-neg"));
        assert_rejected_without_effect(
            &mut a,
            &mut b,
            Command::CreateTopup(command::CreateTopup {
                user_id: "u".to_owned(),
                amount,
                expires_at: Timestamp(T0 + 3_600_000_000),
            }),
        );
        assert_rejected_without_effect(
            &mut a,
            &mut b,
            Command::PspPayment(command::PspPayment {
                event_id: "evt".to_owned(),
                succeeded: true,
                topup_id: uuid::Uuid::nil(),
                user_id: "u".to_owned(),
                amount,
                psp_payment_id: "pi".to_owned(),
                ref_accepted: true,
            }),
        );
    }
}

#[test]
fn a_negative_price_is_rejected_and_cannot_be_bought() {
    let (mut a, mut b) = twins(&funded());
    for price in [Money::from_minor(-1), Money::from_minor(i64::MIN)] {
        assert_rejected_without_effect(&mut a, &mut b, item("bad", price));
        assert_rejected_without_effect(&mut a, &mut b, item("gems", price));
    }
    // The old price still stands, and the never-created item cannot be ordered.
    let order = a.apply(Command::CreateOrder(command::CreateOrder {
        user_id: "u".to_owned(),
        lines: vec![LineRequest {
            item_id: "bad".to_owned(),
            quantity: 1,
        }],
        expected_total: None,
        complete: true,
        expires_at: Timestamp(T0 + 900_000_000),
        max_pending_orders: 100,
    }));
    assert!(
        matches!(order, Err(Rejection::ItemNotFound { .. })),
        "{order:?}"
    );
    a.assert_audit_clean();
}

#[test]
fn a_credit_that_would_overflow_the_psp_clearing_account_is_rejected_without_effect() {
    // Every credit of MAX_WALLET_BALANCE takes psp_clearing that much further below zero; i64 runs out
    // after i64::MAX / MAX_WALLET_BALANCE of them, one user each (a wallet is capped).
    let room = i64::MAX / MAX_WALLET_BALANCE.minor();
    let mut setup = Vec::new();
    for i in 0..=room {
        setup.push(create_user(&format!("u{i}")));
        setup.push(credit(
            &format!("u{i}"),
            MAX_WALLET_BALANCE,
            &format!("ref-{i}"),
        ));
    }
    // The last of those credits is the first that does not fit: it is refused on both twins.
    let last = setup.pop().expect("one credit");
    let (mut a, mut b) = twins(&setup);
    let psp_clearing = |s: &Shard| {
        query::meta(&s.store.begin_read().expect("read"))
            .expect("meta")
            .psp_clearing
    };
    assert_eq!(psp_clearing(&a), -room * MAX_WALLET_BALANCE.minor());
    assert_rejected_without_effect(&mut a, &mut b, last);
    assert_eq!(psp_clearing(&a), -room * MAX_WALLET_BALANCE.minor());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any amount at all: a credit either moves exactly that positive amount or is refused without effect.
    #[test]
    fn any_credit_amount_is_credited_exactly_or_rejected_without_effect(amount in any::<i64>()) {
        let (mut a, mut b) = twins(&funded());
        let outcome = a.apply(credit("u", Money::from_minor(amount), "ref-any"));
        let balance = query::user(&a.store.begin_read().expect("read"), "u")
            .expect("read")
            .expect("user")
            .balance;
        if outcome.is_ok() {
            prop_assert!(amount > 0);
            prop_assert_eq!(balance, Money::from_minor(10_000 + amount));
        } else {
            b.skip_one();
            let probe = create_user("probe");
            prop_assert!(a.apply(probe.clone()).is_ok() && b.apply(probe).is_ok());
            prop_assert_eq!(a.hash(), b.hash());
            prop_assert_eq!(balance, Money::from_minor(10_000));
        }
        a.assert_audit_clean();
    }
}
