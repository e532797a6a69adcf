//! Golden bytes of the persisted format: one postcard encoding of every command, reply, rejection and
//! stored record, written down as hex. These bytes are redb rows, stored idempotency outcomes and Raft
//! log entries already on disk; a change to a type that moves them fails here (the rules of the
//! persisted format are in `crate::domain`). A test that fails here is not fixed by pasting the new
//! bytes: make the change a new variant at the end of its enum instead, or bump `SCHEMA_VERSION`.
//!
//! The commands in `samples` are written as JSON, so that these tests do not depend on their Rust shape
//! (a struct variant and a newtype variant holding a struct of the same fields are the same JSON and the
//! same postcard): only the bytes are the contract. Each `golden_*` function matches exhaustively, so a
//! new variant does not compile until its bytes are pinned here.

use serde::Serialize;
use serde::de::DeserializeOwned;

mod samples;

use samples::{
    FINGERPRINT, LATER, NOW, commands, create_user, credit, dispute, entitlement, envelope, events,
    freeze, id, item, limit_set, money, order, posting, refund, rejections, replies, reversal,
    shop_limits, topup, user, webhook,
};

use super::apply::Applied;
use super::{IdempotencyRecord, IdempotencyState, MetaState};
use crate::domain::{
    Account, CancelReason, Command, DisputeStatus, GlobalClaim, ItemKind, OrderStatus, Outcome,
    PostingKind, PostingRef, RefClaim, Rejection, Reply, ReversalReason, ReversalSource, Setting,
    TopupStatus,
};

/// The postcard bytes of `value` as hex, after checking that they decode back to `value`.
fn encoded<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) -> String {
    let bytes = postcard::to_stdvec(value).expect("encodes");
    let decoded: T = postcard::from_bytes(&bytes).expect("decodes");
    assert_eq!(&decoded, value, "postcard round trip");
    hex::encode(bytes)
}

/// Checks every `(name, value, expected hex)` and reports all differences at once.
fn assert_golden<N, T>(cases: &[(N, T, &str)])
where
    N: std::fmt::Display,
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(name, value, expected)| {
            let actual = encoded(value);
            (actual != *expected).then(|| format!("{name}: expected {expected}, got {actual}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "the persisted format changed:\n{}",
        wrong.join("\n")
    );
}

/// The pinned bytes of each command above. Exhaustive: a new variant needs its bytes here.
fn golden_command(command: &Command) -> &'static str {
    match command {
        Command::CreateUser { .. } => "000275310103416e6e",
        Command::IssueToken { .. } => "0102753180a499dc89898506",
        Command::ClaimGlobalKey { .. } => {
            "02026731abababababababababababababababababababababababababababababababab80a499dc898985068080f2818389850680d095ffbc318486880801027531026b31abababababababababababababababababababababababababababababababab80a499dc89898506000275310103416e6e"
        }
        Command::SettleGlobalKey { .. } => {
            "03026731abababababababababababababababababababababababababababababababab0101"
        }
        Command::ClaimExternalRef { .. } => {
            "04096372656469743a7231027531c413011001900000000070008000000000000007"
        }
        Command::Credit { .. } => "05027531c413027231010570726f6d6f01",
        Command::CreateTopup { .. } => "06027531e80780a499dc89898506",
        Command::PspPayment { .. } => {
            "0703657631011001900000000070008000000000000007027531e8070370693101"
        }
        Command::PutItem { .. } => "080467656d730447656d7302c801010e0103",
        Command::CreateOrder { .. } => {
            "09027531020467656d73030573776f72640101a0060080a499dc8989850664"
        }
        Command::CompleteOrder { .. } => "0a0275311001900000000070008000000000000002",
        Command::CancelOrder { .. } => "0b0275311001900000000070008000000000000002",
        Command::Refund { .. } => {
            "0c027531100190000000007000800000000000000201010467656d730201046f6f707300"
        }
        Command::Consume { .. } => "0d0275310467656d7302",
        Command::Sweep { .. } => "0ef403",
        Command::CreateTopupCapped { .. } => "0f027531e80780a499dc898985060a",
        Command::SweepAndPurge { .. } => "10f40380f524",
        Command::PutWebhook { .. } => "1102677311687474703a2f2f31302e302e302e352f650206080102",
        Command::DeleteWebhook { .. } => "1202677300",
        Command::AckWebhook { .. } => "1302677302ac02",
        Command::WebhookFailed { .. } => "1402677302ac0208485454502035303080a499dc89898506",
        Command::ReplayWebhook { .. } => "1502677307",
        Command::PurgeEvents { .. } => "1680f524809a9e01f403",
        Command::FreezeUser { .. } => "170275310a6368617267656261636b",
        Command::UnfreezeUser { .. } => "1802753101",
        Command::AckWebhookFrom { .. } => "1902677302c801ac02",
        Command::Reverse { .. } => {
            "1a027531001001900000000070008000000000000003027231e807010363623101"
        }
        Command::OpenDispute { .. } => "1b027531100190000000007000800000000000000703647031e807",
        Command::CloseDispute { .. } => {
            "1c0275311001900000000070008000000000000007036470310001e80700"
        }
        Command::PutShopLimits { .. } => "1d0102c0b80201010001000103",
        Command::PutUserLimits { .. } => "1e0275310001023c0100010205",
        Command::PurgeIdempotency { .. } => "1f027531026b31a01ff403",
    }
}

/// `(name, value, pinned hex)` of every sample, after checking that sample `i` is variant `i`: one
/// sample per variant, in declaration order (postcard starts an enum with its variant's index).
fn variant_cases<T: Serialize + std::fmt::Debug>(
    samples: Vec<T>,
    golden: fn(&T) -> &'static str,
) -> Vec<(String, T, &'static str)> {
    samples
        .into_iter()
        .enumerate()
        .map(|(index, sample)| {
            let bytes = postcard::to_stdvec(&sample).expect("encodes");
            assert_eq!(usize::from(bytes[0]), index, "sample {index} is {sample:?}");
            let debug = format!("{sample:?}");
            let name = debug
                .split([' ', '(', '{'])
                .next()
                .unwrap_or_default()
                .to_owned();
            let hex = golden(&sample);
            (name, sample, hex)
        })
        .collect()
}

#[test]
fn commands_encode_as_pinned() {
    assert_golden(&variant_cases(commands(), golden_command));
}

/// `Command::NAMES` (the `command` label values the metrics register at 0) is exactly the names of the
/// variants, every one of which has a sample here.
#[test]
fn command_names_are_the_names_of_every_variant() {
    let named: std::collections::BTreeSet<&str> = commands().iter().map(Command::name).collect();
    let listed: std::collections::BTreeSet<&str> = Command::NAMES.into_iter().collect();
    assert_eq!(named, listed);
}

#[test]
fn envelopes_encode_as_pinned() {
    let mut bare = envelope(create_user());
    bare.idempotency = None;
    assert_golden(&[
        (
            "tagged",
            envelope(create_user()),
            "8080f2818389850680d095ffbc318486880801027531026b31abababababababababababababababababababababababababababababababab80a499dc89898506000275310103416e6e",
        ),
        (
            "untagged",
            bare,
            "8080f2818389850680d095ffbc318486880800000275310103416e6e",
        ),
    ]);
}

/// The pinned bytes of each reply above. Exhaustive: a new variant needs its bytes here.
fn golden_reply(reply: &Reply) -> &'static str {
    match reply {
        Reply::UserCreated(_) => "000275310103416e6e8080f28183898506a09c01a00603",
        Reply::TokenIssued { .. } => "0102753180a499dc89898506",
        Reply::Credited { .. } => {
            "021001900000000070008000000000000003027531c413027231010570726f6d6f8080f28183898506a09c01a00601"
        }
        Reply::TopupCreated(_) => {
            "031001900000000070008000000000000007027531e8070101037069318080f2818389850680a499dc89898506018080f28183898506"
        }
        Reply::TopupUpdated(_) => {
            "041001900000000070008000000000000007027531e8070101037069318080f2818389850680a499dc89898506018080f28183898506"
        }
        Reply::Item(_) => "050573776f72640553776f726400c801010e028080f28183898506",
        Reply::OrderCreated(_) => {
            "06100190000000007000800000000000000202753103010467656d730203c801010ed804c8018080f2818389850680a499dc89898506018080f281838985060102008080f28183898506000280a499dc898985060100"
        }
        Reply::OrderUpdated(_) => {
            "07100190000000007000800000000000000202753103010467656d730203c801010ed804c8018080f2818389850680a499dc89898506018080f281838985060102008080f28183898506000280a499dc898985060100"
        }
        Reply::Refunded { .. } => {
            "0810019000000000700080000000000000041001900000000070008000000000000002027531010467656d7301c801c80101046f6f7073018080f28183898506a09c01a006"
        }
        Reply::Entitlement(_) => "090467656d73020301018080f28183898506",
        Reply::GlobalClaim(_) => {
            "0a008080f2818389850680d095ffbc318486880801027531026b31abababababababababababababababababababababababababababababababab80a499dc89898506000275310103416e6e"
        }
        Reply::RefClaimed { .. } => "0b01",
        Reply::Swept { .. } => "0c0102ac02",
        Reply::SweptAndPurged { .. } => "0d01020304",
        Reply::Webhook(_) => {
            "0e02677311687474703a2f2f31302e302e302e352f650106028080f2818389850680a499dc8989850600ac020101084854545020353030018080f281838985060180a499dc89898506018080f2818389850600"
        }
        Reply::EventsPurged { .. } => "0f0501",
        Reply::Account { .. } => {
            "100275310103416e6e8080f28183898506a09c01a00603010a6368617267656261636b8080f28183898506"
        }
        Reply::Reversed { .. } => {
            "11100190000000007000800000000000000b027531011001900000000070008000000000000007e807010b646973707574653a647031c801c801d804011001900000000070008000000000000004648080f28183898506a09c01a006d80401"
        }
        Reply::Disputed { .. } => {
            "12100190000000007000800000000000000c036470310275311001900000000070008000000000000007e80700028080f281838985060180a499dc8989850601100190000000007000800000000000000ba09c01a006d80401100190000000007000800000000000000b027531011001900000000070008000000000000007e807010b646973707574653a647031c801c801d804011001900000000070008000000000000004648080f28183898506"
        }
        Reply::ShopLimits(_) => "1302c0b80201000205038080f28183898506",
        Reply::UserLimits { .. } => "1402753102c0b80201000205",
        Reply::IdempotencyPurged { .. } => "150301027531026b32",
    }
}

#[test]
fn replies_encode_as_pinned() {
    assert_golden(&variant_cases(replies(), golden_reply));
}

/// The pinned bytes of each rejection above. Exhaustive: a new variant needs its bytes here.
fn golden_rejection(rejection: &Rejection) -> &'static str {
    match rejection {
        Rejection::UserNotFound => "00",
        Rejection::UserExists => "01",
        Rejection::ItemNotFound { .. } => "020467656d73",
        Rejection::OrderNotFound => "03",
        Rejection::TopupNotFound => "04",
        Rejection::InsufficientFunds { .. } => "05c801d804",
        Rejection::PriceChanged { .. } => "06d804a006",
        Rejection::AlreadyOwned { .. } => "070467656d73",
        Rejection::ItemInactive { .. } => "080467656d73",
        Rejection::InvalidState { .. } => "090750454e44494e47",
        Rejection::RefundExceedsPurchase { .. } => "0a0467656d730502",
        Rejection::AlreadyConsumed { .. } => "0b0467656d730502",
        Rejection::InsufficientEntitlement { .. } => "0c0467656d730502",
        Rejection::ExternalRefConflict { .. } => "0d027231",
        Rejection::AmountMismatch { .. } => "0ee807ea07",
        Rejection::OrderExpired { .. } => "0f80a499dc89898506",
        Rejection::RefundWindowClosed { .. } => "100467656d7380a499dc89898506",
        Rejection::TooManyPendingOrders { .. } => "1164",
        Rejection::TooManyRefunds { .. } => "1264",
        Rejection::CatalogFull { .. } => "13904e",
        Rejection::BalanceLimitExceeded { .. } => "148080b4ccd4dfc603",
        Rejection::InvalidRequest { .. } => "1503626164",
        Rejection::IdempotencyKeyReused => "16",
        Rejection::LimitExceeded { .. } => {
            "17126d61785f70656e64696e675f746f707570730a0180a499dc89898506"
        }
        Rejection::ItemKindFixed { .. } => "180467656d730863757272656e6379",
        Rejection::WebhookNotFound { .. } => "19026773",
        Rejection::AccountFrozen { .. } => "1a0a6368617267656261636b",
        Rejection::NotFound { .. } => "1b076469737075746503647031",
        Rejection::ReversalExceedsCredit { .. } => "1cb009e807",
        Rejection::DebtOutstanding { .. } => "1dd804",
        Rejection::MoneyLimitExceeded { .. } => {
            "1e116d61785f7370656e645f7065725f646179c0b8020180a499dc89898506"
        }
    }
}

#[test]
fn rejections_encode_as_pinned() {
    assert_golden(&variant_cases(rejections(), golden_rejection));
}

#[test]
fn outcomes_encode_as_pinned() {
    let ok: Outcome = Ok(Reply::RefClaimed { accepted: false });
    let err: Outcome = Err(Rejection::OrderNotFound);
    assert_golden(&[("ok", ok, "000b00"), ("err", err, "0103")]);
}

/// What a replica answers for a command (`engine::replica::ApplyReply`): an `Applied` or an error text.
#[test]
fn apply_replies_encode_as_pinned() {
    let applied = Applied {
        outcome: Err(Rejection::UserExists),
        replayed: true,
    };
    let cases: [(&str, Result<Applied, String>, &str); 2] = [
        ("applied", Ok(applied), "00010101"),
        (
            "not applied",
            Err("cannot decode".to_owned()),
            "010d63616e6e6f74206465636f6465",
        ),
    ];
    assert_golden(&cases);
}

#[test]
fn stored_records_encode_as_pinned() {
    let meta = MetaState {
        schema_version: 2,
        shard: 3,
        last_applied: 1234,
        posting_seq: 9,
        posting_head: [0x22; 32],
        psp_clearing: -10_000,
        revenue: 300,
    };
    assert_golden(&[(
        "meta",
        meta,
        "0203d2090922222222222222222222222222222222222222222222222222222222222222229f9c01d804",
    )]);
    assert_golden(&[("clock", NOW, "8080f28183898506")]);
    assert_golden(&[(
        "user",
        user(),
        "0275310103416e6e8080f28183898506a09c01a00603",
    )]);
    assert_golden(&[(
        "item",
        item(),
        "0573776f72640553776f726400c801010e028080f28183898506",
    )]);
    assert_golden(&[(
        "order",
        order(),
        "100190000000007000800000000000000202753103010467656d730203c801010ed804c8018080f2818389850680a499dc89898506018080f281838985060102008080f28183898506000280a499dc898985060100",
    )]);
    assert_golden(&[(
        "posting",
        posting(),
        "09100190000000007000800000000000000502753103010002753101027531d8040210019000000000700080000000000000028080f28183898506a09c01a0061111111111111111111111111111111111111111111111111111111111111111",
    )]);
    assert_golden(&[(
        "entitlement",
        entitlement(),
        "0467656d73020301018080f28183898506",
    )]);
    assert_golden(&[(
        "credit",
        credit(),
        "1001900000000070008000000000000003027531c413027231010570726f6d6f8080f28183898506",
    )]);
    let claim = RefClaim {
        user_id: "u1".to_owned(),
        amount: money(500),
        topup_id: Some(id(7)),
    };
    assert_golden(&[(
        "external ref claim",
        claim,
        "027531e807011001900000000070008000000000000007",
    )]);
    assert_golden(&[(
        "topup",
        topup(),
        "1001900000000070008000000000000007027531e8070101037069318080f2818389850680a499dc89898506018080f28183898506",
    )]);
    assert_golden(&[(
        "webhook",
        webhook(),
        "02677311687474703a2f2f31302e302e302e352f650106028080f2818389850680a499dc8989850600ac020101084854545020353030018080f281838985060180a499dc89898506018080f2818389850600",
    )]);
    let log = crate::domain::EventLog {
        last_seq: 1234,
        purged_through: 1000,
        dropped: 2,
    };
    assert_golden(&[("event log", log, "d209e80702")]);
    assert_golden(&[("freeze", freeze(), "0a6368617267656261636b8080f28183898506")]);
    assert_golden(&[(
        "reversal",
        reversal(),
        "100190000000007000800000000000000b027531011001900000000070008000000000000007e807010b646973707574653a647031c801c801d804011001900000000070008000000000000004648080f28183898506",
    )]);
    assert_golden(&[(
        "dispute",
        dispute(),
        "100190000000007000800000000000000c036470310275311001900000000070008000000000000007e80700028080f281838985060180a499dc8989850601100190000000007000800000000000000b",
    )]);
    assert_golden(&[(
        "shop limits",
        shop_limits(),
        "02c0b80201000205038080f28183898506",
    )]);
    assert_golden(&[("user limits", limit_set(), "02c0b80201000205")]);
    let pinned = [
        "1001900000000070008000000000000009008080f28183898506027531000275310103416e6e8080f28183898506a09c01a00603",
        "1001900000000070008000000000000009018080f28183898506027531011001900000000070008000000000000003027531c413027231010570726f6d6f8080f28183898506a09c01a006",
        "1001900000000070008000000000000009038080f28183898506027531021001900000000070008000000000000007027531e8070101037069318080f2818389850680a499dc89898506018080f28183898506",
        "1001900000000070008000000000000009018080f28183898506027531031001900000000070008000000000000007027531e8070101037069318080f2818389850680a499dc89898506018080f28183898506a09c01a006",
        "1001900000000070008000000000000009068080f2818389850602753104100190000000007000800000000000000202753103010467656d730203c801010ed804c8018080f2818389850680a499dc89898506018080f281838985060102008080f28183898506000280a499dc898985060100",
        "1001900000000070008000000000000009088080f281838985060275310510019000000000700080000000000000041001900000000070008000000000000002027531010467656d7301c801c80101046f6f7073018080f28183898506a09c01a006",
        "1001900000000070008000000000000009098080f28183898506027531060467656d73020301018080f28183898506",
        "10019000000000700080000000000000090f8080f28183898506027531070275310103416e6e8080f28183898506a09c01a00603010a6368617267656261636b8080f28183898506",
        "10019000000000700080000000000000090c8080f2818389850602753108100190000000007000800000000000000b027531011001900000000070008000000000000007e807010b646973707574653a647031c801c801d804011001900000000070008000000000000004648080f28183898506a09c01a006d804",
        "10019000000000700080000000000000090e8080f2818389850602753109100190000000007000800000000000000c036470310275311001900000000070008000000000000007e80700028080f281838985060180a499dc8989850601100190000000007000800000000000000ba09c01a006d804",
    ];
    let cases: Vec<(String, crate::domain::Event, &str)> = events()
        .into_iter()
        .zip(pinned)
        .enumerate()
        .map(|(i, (event, hex))| (format!("event {i}"), event, hex))
        .collect();
    assert_golden(&cases);
    assert_golden(&[(
        "refund",
        refund(),
        "10019000000000700080000000000000041001900000000070008000000000000002027531010467656d7301c801c80101046f6f7073018080f28183898506",
    )]);
}

#[test]
fn idempotency_records_encode_as_pinned() {
    let record = |state| IdempotencyRecord {
        fingerprint: FINGERPRINT,
        created_at: NOW,
        expires_at: LATER,
        state,
    };
    assert_golden(&[
        (
            "pending",
            record(IdempotencyState::Pending(Box::new(envelope(create_user())))),
            "abababababababababababababababababababababababababababababababab8080f2818389850680a499dc89898506008080f2818389850680d095ffbc318486880801027531026b31abababababababababababababababababababababababababababababababab80a499dc89898506000275310103416e6e",
        ),
        (
            "done",
            record(IdempotencyState::Done(Ok(Reply::RefClaimed {
                accepted: true,
            }))),
            "abababababababababababababababababababababababababababababababab8080f2818389850680a499dc8989850601000b01",
        ),
    ]);
}

/// The walk reads a record's retention from its leading fields only: the same `expires_at` the whole
/// record decodes to, whatever its state.
#[test]
fn the_head_of_an_idempotency_record_reads_its_retention() {
    for state in [
        IdempotencyState::Pending(Box::new(envelope(create_user()))),
        IdempotencyState::Done(Err(Rejection::UserNotFound)),
    ] {
        let record = IdempotencyRecord {
            fingerprint: FINGERPRINT,
            created_at: NOW,
            expires_at: LATER,
            state,
        };
        let bytes = postcard::to_stdvec(&record).expect("encodes");
        assert_eq!(
            crate::state::idempotency_expiry(&bytes).expect("reads"),
            LATER
        );
    }
}

/// The small enums inside records, every variant: one byte each, in declaration order.
#[test]
fn record_enums_encode_as_pinned() {
    let statuses = [
        OrderStatus::Pending,
        OrderStatus::Completed,
        OrderStatus::Cancelled,
        OrderStatus::PartiallyRefunded,
        OrderStatus::Refunded,
    ];
    assert_golden(&[("order statuses", statuses.to_vec(), "050001020304")]);
    let kinds = [ItemKind::Game, ItemKind::Skin, ItemKind::Currency];
    assert_golden(&[("item kinds", kinds.to_vec(), "03000102")]);
    let reasons = [CancelReason::Expired, CancelReason::CancelledByClient];
    assert_golden(&[("cancel reasons", reasons.to_vec(), "020001")]);
    let topups = [
        TopupStatus::Pending,
        TopupStatus::Completed,
        TopupStatus::Failed,
        TopupStatus::Expired,
    ];
    assert_golden(&[("topup statuses", topups.to_vec(), "0400010203")]);
    let postings = [
        PostingKind::Credit,
        PostingKind::Hold,
        PostingKind::Release,
        PostingKind::Debit,
        PostingKind::Refund,
        PostingKind::Reversal,
        PostingKind::Debt,
        PostingKind::DebtRepaid,
    ];
    assert_golden(&[("posting kinds", postings.to_vec(), "080001020304050607")]);
    let accounts = vec![
        Account::Available("u1".to_owned()),
        Account::Held("u1".to_owned()),
        Account::PspClearing,
        Account::Revenue,
        Account::Receivable,
    ];
    assert_golden(&[("accounts", accounts, "050002753101027531020304")]);
    let references = vec![
        PostingRef::Credit(id(1)),
        PostingRef::Topup(id(1)),
        PostingRef::Order(id(1)),
        PostingRef::Refund(id(1)),
        PostingRef::Reversal(id(1)),
        PostingRef::Dispute(id(1)),
    ];
    assert_golden(&[(
        "posting refs",
        references,
        "06001001900000000070008000000000000001011001900000000070008000000000000001021001900000000070008000000000000001031001900000000070008000000000000001041001900000000070008000000000000001051001900000000070008000000000000001",
    )]);
    let sources = vec![
        ReversalSource::Credit {
            credit_id: id(1),
            external_ref: "r1".to_owned(),
        },
        ReversalSource::Topup { topup_id: id(1) },
    ];
    assert_golden(&[(
        "reversal sources",
        sources,
        "02001001900000000070008000000000000001027231011001900000000070008000000000000001",
    )]);
    let reasons = [ReversalReason::PspRefund, ReversalReason::Chargeback];
    assert_golden(&[("reversal reasons", reasons.to_vec(), "020001")]);
    let statuses = [DisputeStatus::Open, DisputeStatus::Won, DisputeStatus::Lost];
    assert_golden(&[("dispute statuses", statuses.to_vec(), "03000102")]);
    let settings = vec![Setting::Default, Setting::Unlimited, Setting::Max(7u32)];
    assert_golden(&[("limit settings", settings, "0300010207")]);
    let claims = vec![
        GlobalClaim::Run(Box::new(envelope(create_user()))),
        GlobalClaim::Settled(Box::new(Err(Rejection::UserExists))),
    ];
    assert_golden(&[(
        "global claims",
        claims,
        "02008080f2818389850680d095ffbc318486880801027531026b31abababababababababababababababababababababababababababababababab80a499dc89898506000275310103416e6e010101",
    )]);
}

/// Why a field is never added, even at the end: a row written before it existed no longer decodes
/// (postcard has no field names, so serde's `default` never applies).
#[test]
fn an_added_field_does_not_decode_old_bytes() {
    #[derive(Serialize)]
    struct Before {
        a: u32,
    }
    #[derive(Serialize, serde::Deserialize)]
    struct After {
        a: u32,
        #[serde(default)]
        b: u32,
    }
    let new = postcard::to_stdvec(&After { a: 7, b: 1 }).expect("encodes");
    let after: After = postcard::from_bytes(&new).expect("its own bytes decode");
    assert_eq!((after.a, after.b), (7, 1));
    let old = postcard::to_stdvec(&Before { a: 7 }).expect("encodes");
    assert!(postcard::from_bytes::<After>(&old).is_err());
}
