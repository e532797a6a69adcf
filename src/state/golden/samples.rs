//! The sample values whose bytes `golden` pins: one of every command, reply and rejection variant, and
//! of every stored record. Changing a sample changes its bytes: add samples, never edit one.

use serde_json::json;
use uuid::Uuid;

use crate::domain::{
    Account, CancelReason, Command, Credit, Dispute, DisputeStatus, Entitlement, Envelope, Event,
    EventData, EventType, Freeze, GlobalClaim, HistoryEntry, IdSeed, IdempotencyTag, Item,
    ItemKind, ItemSpec, LimitSet, Money, Order, OrderLine, OrderStatus, Outcome, Posting,
    PostingKind, PostingRef, Refund, RefundLine, Rejection, Reply, Reversal, ReversalReason,
    ReversalSource, Setting, ShopLimits, Timestamp, Topup, TopupStatus, User, WalletView, Webhook,
};

pub(super) const NOW: Timestamp = Timestamp(1_700_000_000_000_000);
pub(super) const LATER: Timestamp = Timestamp(1_700_000_900_000_000);
pub(super) const FINGERPRINT: [u8; 32] = [0xAB; 32];

pub(super) fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

pub(super) fn money(minor: i64) -> Money {
    Money::from_minor(minor)
}
fn command(value: serde_json::Value) -> Command {
    serde_json::from_value(value).expect("a command in JSON")
}

pub(super) fn create_user() -> Command {
    command(json!({"CreateUser": {"user_id": "u1", "display_name": "Ann"}}))
}

pub(super) fn envelope(command: Command) -> Envelope {
    Envelope {
        now: NOW,
        seed: IdSeed {
            unix_millis: 1_700_000_000_000,
            entropy: 0x0102_0304,
        },
        idempotency: Some(IdempotencyTag {
            scope: "u1".to_owned(),
            key: "k1".to_owned(),
            fingerprint: FINGERPRINT,
            expires_at: LATER,
        }),
        command,
    }
}

pub(super) fn commands() -> Vec<Command> {
    let spec = json!({"item_id": "gems", "name": "Gems", "kind": "Currency", "price": 100,
        "active": true, "refund_window_days": 14});
    let lines = json!([{"item_id": "gems", "quantity": 3}, {"item_id": "sword", "quantity": 1}]);
    let inner = serde_json::to_value(envelope(create_user())).expect("an envelope in JSON");
    let outcome = serde_json::to_value(Outcome::Err(Rejection::UserExists)).expect("JSON");
    let claim = json!({"user_id": "u1", "amount": 1250, "topup_id": id(7)});
    [
        create_user(),
        command(json!({"IssueToken": {"user_id": "u1", "expires_at": LATER}})),
        command(
            json!({"ClaimGlobalKey": {"key": "g1", "fingerprint": FINGERPRINT,
            "expires_at": LATER, "inner": inner}}),
        ),
        command(
            json!({"SettleGlobalKey": {"key": "g1", "fingerprint": FINGERPRINT,
            "outcome": outcome}}),
        ),
        command(json!({"ClaimExternalRef": {"reference": "credit:r1", "claim": claim}})),
        command(
            json!({"Credit": {"user_id": "u1", "amount": 1250, "external_ref": "r1",
            "source": "promo", "ref_accepted": true}}),
        ),
        command(json!({"CreateTopup": {"user_id": "u1", "amount": 500, "expires_at": LATER}})),
        command(
            json!({"PspPayment": {"event_id": "ev1", "succeeded": true, "topup_id": id(7),
            "user_id": "u1", "amount": 500, "psp_payment_id": "pi1", "ref_accepted": true}}),
        ),
        command(json!({"PutItem": {"spec": spec, "version": 3}})),
        command(
            json!({"CreateOrder": {"user_id": "u1", "lines": lines, "expected_total": 400,
            "complete": false, "expires_at": LATER, "max_pending_orders": 100}}),
        ),
        command(json!({"CompleteOrder": {"user_id": "u1", "order_id": id(2)}})),
        command(json!({"CancelOrder": {"user_id": "u1", "order_id": id(2)}})),
        command(json!({"Refund": {"user_id": "u1", "order_id": id(2),
            "lines": [{"item_id": "gems", "quantity": 2}], "reason": "oops", "force": false}})),
        command(json!({"Consume": {"user_id": "u1", "item_id": "gems", "quantity": 2}})),
        command(json!({"Sweep": {"limit": 500}})),
        command(
            json!({"CreateTopupCapped": {"user_id": "u1", "amount": 500, "expires_at": LATER,
            "max_pending_topups": 10}}),
        ),
        command(json!({"SweepAndPurge": {"limit": 500, "topup_retention_seconds": 604_800}})),
        command(
            json!({"PutWebhook": {"name": "gs", "url": "http://10.0.0.5/e",
            "types": ["OrderCompleted", "RefundCreated"], "generation": 2}}),
        ),
        command(json!({"DeleteWebhook": {"name": "gs", "generation": null}})),
        command(json!({"AckWebhook": {"name": "gs", "generation": 2, "position": 300}})),
        command(
            json!({"WebhookFailed": {"name": "gs", "generation": 2, "position": 300,
            "error": "HTTP 500", "next_attempt_at": LATER}}),
        ),
        command(json!({"ReplayWebhook": {"name": "gs", "position": 7}})),
        command(json!({"PurgeEvents": {"retention_seconds": 604_800,
            "max_retention_seconds": 2_592_000, "limit": 500}})),
        command(json!({"FreezeUser": {"user_id": "u1", "reason": "chargeback"}})),
        command(json!({"UnfreezeUser": {"user_id": "u1", "force": true}})),
        command(
            json!({"AckWebhookFrom": {"name": "gs", "generation": 2, "from": 200, "position": 300}}),
        ),
        command(
            json!({"Reverse": {"user_id": "u1", "source": {"Credit": {"credit_id": id(3),
            "external_ref": "r1"}}, "amount": 500, "reason": "Chargeback",
            "external_ref": "cb1", "revoke": true}}),
        ),
        command(
            json!({"OpenDispute": {"user_id": "u1", "topup_id": id(7), "dispute_id": "dp1",
            "amount": 500}}),
        ),
        command(
            json!({"CloseDispute": {"user_id": "u1", "topup_id": id(7), "dispute_id": "dp1",
            "won": false, "amount": 500, "revoke": false}}),
        ),
        command(json!({"PutShopLimits": {"changes": {"max_spend_per_day": {"Max": 20000},
            "max_orders_per_hour": "Unlimited", "max_pending_topups": null,
            "max_refunds_per_30_days": "Default"}, "generation": 3}})),
        command(json!({"PutUserLimits": {"user_id": "u1", "changes": {"max_spend_per_day": null,
            "max_orders_per_hour": {"Max": 60}, "max_pending_topups": "Default",
            "max_refunds_per_30_days": {"Max": 5}}}})),
        command(json!({"PurgeIdempotency": {"from_scope": "u1", "from_key": "k1", "scan": 4000,
            "limit": 500}})),
    ]
    .into()
}
pub(super) fn limit_set() -> LimitSet {
    LimitSet {
        max_spend_per_day: Setting::Max(money(20_000)),
        max_orders_per_hour: Setting::Unlimited,
        max_pending_topups: Setting::Default,
        max_refunds_per_30_days: Setting::Max(5),
    }
}

pub(super) fn shop_limits() -> ShopLimits {
    ShopLimits {
        limits: limit_set(),
        generation: 3,
        updated_at: NOW,
    }
}

pub(super) fn freeze() -> Freeze {
    Freeze {
        reason: "chargeback".to_owned(),
        at: NOW,
    }
}

pub(super) fn webhook() -> Webhook {
    Webhook {
        name: "gs".to_owned(),
        url: "http://10.0.0.5/e".to_owned(),
        types: vec![EventType::OrderCompleted],
        generation: 2,
        created_at: NOW,
        updated_at: LATER,
        deleted: false,
        position: 300,
        attempts: 1,
        last_error: Some("HTTP 500".to_owned()),
        last_attempt_at: Some(NOW),
        next_attempt_at: Some(LATER),
        failing_since: Some(NOW),
        dropped: 0,
    }
}

/// One event of every kind of data.
pub(super) fn events() -> Vec<Event> {
    let event = |event_type, data| Event {
        event_id: id(9),
        event_type,
        occurred_at: NOW,
        user_id: "u1".to_owned(),
        data,
    };
    vec![
        event(EventType::UserCreated, EventData::User(user())),
        event(
            EventType::WalletCredited,
            EventData::Credit {
                credit: credit(),
                wallet: wallet(),
            },
        ),
        event(EventType::TopupFailed, EventData::Topup(topup())),
        event(
            EventType::WalletCredited,
            EventData::TopupCredit {
                topup: topup(),
                wallet: wallet(),
            },
        ),
        event(EventType::OrderCompleted, EventData::Order(order())),
        event(
            EventType::RefundCreated,
            EventData::Refund {
                refund: refund(),
                wallet: wallet(),
            },
        ),
        event(
            EventType::EntitlementGranted,
            EventData::Entitlement(entitlement()),
        ),
        event(
            EventType::AccountFrozen,
            EventData::Account {
                user: user(),
                frozen: Some(freeze()),
            },
        ),
        event(
            EventType::PaymentReversed,
            EventData::Reversal {
                reversal: reversal(),
                wallet: wallet(),
                debt: money(300),
            },
        ),
        event(
            EventType::DisputeClosed,
            EventData::Dispute {
                dispute: dispute(),
                wallet: wallet(),
                debt: money(300),
            },
        ),
    ]
}

pub(super) fn reversal() -> Reversal {
    Reversal {
        reversal_id: id(11),
        user_id: "u1".to_owned(),
        source: ReversalSource::Topup { topup_id: id(7) },
        amount: money(500),
        reason: ReversalReason::Chargeback,
        external_ref: "dispute:dp1".to_owned(),
        from_hold: money(100),
        from_wallet: money(100),
        debt: money(300),
        revoked_refunds: vec![id(4)],
        revoked_amount: money(50),
        created_at: NOW,
    }
}

pub(super) fn dispute() -> Dispute {
    Dispute {
        record_id: id(12),
        dispute_id: "dp1".to_owned(),
        user_id: "u1".to_owned(),
        topup_id: id(7),
        amount: money(500),
        held: money(0),
        status: DisputeStatus::Lost,
        opened_at: NOW,
        closed_at: Some(LATER),
        reversal_id: Some(id(11)),
    }
}

pub(super) fn user() -> User {
    User {
        user_id: "u1".to_owned(),
        display_name: Some("Ann".to_owned()),
        created_at: NOW,
        balance: money(10_000),
        held: money(400),
        ledger_seq: 3,
    }
}

fn wallet() -> WalletView {
    user().wallet()
}

pub(super) fn item() -> Item {
    Item {
        spec: ItemSpec {
            item_id: "sword".to_owned(),
            name: "Sword".to_owned(),
            kind: ItemKind::Game,
            price: money(100),
            active: true,
            refund_window_days: 14,
        },
        version: 2,
        updated_at: NOW,
    }
}

pub(super) fn order() -> Order {
    Order {
        order_id: id(2),
        user_id: "u1".to_owned(),
        status: OrderStatus::PartiallyRefunded,
        lines: vec![OrderLine {
            item_id: "gems".to_owned(),
            kind: ItemKind::Currency,
            quantity: 3,
            unit_price: money(100),
            refunded_quantity: 1,
            refund_window_days: 14,
        }],
        total: money(300),
        refunded_total: money(100),
        created_at: NOW,
        expires_at: LATER,
        completed_at: Some(NOW),
        refund_count: 1,
        history: vec![
            HistoryEntry {
                status: OrderStatus::Pending,
                at: NOW,
                reason: None,
            },
            HistoryEntry {
                status: OrderStatus::Cancelled,
                at: LATER,
                reason: Some(CancelReason::Expired),
            },
        ],
    }
}

pub(super) fn entitlement() -> Entitlement {
    Entitlement {
        item_id: "gems".to_owned(),
        kind: ItemKind::Currency,
        granted: 3,
        revoked: 1,
        consumed: 1,
        granted_at: NOW,
    }
}

pub(super) fn credit() -> Credit {
    Credit {
        credit_id: id(3),
        user_id: "u1".to_owned(),
        amount: money(1250),
        external_ref: "r1".to_owned(),
        source: Some("promo".to_owned()),
        created_at: NOW,
    }
}

pub(super) fn topup() -> Topup {
    Topup {
        topup_id: id(7),
        user_id: "u1".to_owned(),
        amount: money(500),
        status: TopupStatus::Completed,
        psp_payment_id: Some("pi1".to_owned()),
        created_at: NOW,
        expires_at: LATER,
        finished_at: Some(NOW),
    }
}

pub(super) fn refund() -> Refund {
    Refund {
        refund_id: id(4),
        order_id: id(2),
        user_id: "u1".to_owned(),
        lines: vec![RefundLine {
            item_id: "gems".to_owned(),
            quantity: 1,
            amount: money(100),
        }],
        amount: money(100),
        reason: Some("oops".to_owned()),
        forced: true,
        created_at: NOW,
    }
}

pub(super) fn posting() -> Posting {
    Posting {
        seq: 9,
        entry_id: id(5),
        user_id: "u1".to_owned(),
        user_seq: 3,
        kind: PostingKind::Hold,
        debit: Account::Available("u1".to_owned()),
        credit: Account::Held("u1".to_owned()),
        amount: money(300),
        reference: PostingRef::Order(id(2)),
        at: NOW,
        balance_after: money(10_000),
        held_after: money(400),
        prev_hash: [0x11; 32],
    }
}

pub(super) fn replies() -> Vec<Reply> {
    [
        Reply::UserCreated(user()),
        Reply::TokenIssued {
            user_id: "u1".to_owned(),
            expires_at: LATER,
        },
        Reply::Credited {
            credit: credit(),
            wallet: wallet(),
            fresh: true,
        },
        Reply::TopupCreated(topup()),
        Reply::TopupUpdated(topup()),
        Reply::Item(item()),
        Reply::OrderCreated(order()),
        Reply::OrderUpdated(order()),
        Reply::Refunded {
            refund: refund(),
            wallet: wallet(),
        },
        Reply::Entitlement(entitlement()),
        Reply::GlobalClaim(GlobalClaim::Run(Box::new(envelope(create_user())))),
        Reply::RefClaimed { accepted: true },
        Reply::Swept {
            orders: 1,
            topups: 2,
            idempotency_records: 300,
        },
        Reply::SweptAndPurged {
            orders: 1,
            topups: 2,
            idempotency_records: 3,
            purged_topups: 4,
        },
        Reply::Webhook(webhook()),
        Reply::EventsPurged {
            purged: 5,
            dropped: 1,
        },
        Reply::Account {
            user: user(),
            frozen: Some(freeze()),
        },
        Reply::Reversed {
            reversal: Box::new(reversal()),
            wallet: wallet(),
            debt: money(300),
            fresh: true,
        },
        Reply::Disputed {
            dispute: Box::new(dispute()),
            wallet: wallet(),
            debt: money(300),
            reversal: Some(Box::new(reversal())),
        },
        Reply::ShopLimits(shop_limits()),
        Reply::UserLimits {
            user_id: "u1".to_owned(),
            overrides: limit_set(),
        },
        Reply::IdempotencyPurged {
            purged: 3,
            next: Some(("u1".to_owned(), "k2".to_owned())),
        },
    ]
    .into()
}
pub(super) fn rejections() -> Vec<Rejection> {
    let item_id = || "gems".to_owned();
    [
        Rejection::UserNotFound,
        Rejection::UserExists,
        Rejection::ItemNotFound { item_id: item_id() },
        Rejection::OrderNotFound,
        Rejection::TopupNotFound,
        Rejection::InsufficientFunds {
            available: money(100),
            required: money(300),
        },
        Rejection::PriceChanged {
            expected: money(300),
            current: money(400),
        },
        Rejection::AlreadyOwned { item_id: item_id() },
        Rejection::ItemInactive { item_id: item_id() },
        Rejection::InvalidState {
            status: "PENDING".to_owned(),
        },
        Rejection::RefundExceedsPurchase {
            item_id: item_id(),
            requested: 5,
            refundable: 2,
        },
        Rejection::AlreadyConsumed {
            item_id: item_id(),
            requested: 5,
            unspent: 2,
        },
        Rejection::InsufficientEntitlement {
            item_id: item_id(),
            requested: 5,
            owned: 2,
        },
        Rejection::ExternalRefConflict {
            external_ref: "r1".to_owned(),
        },
        Rejection::AmountMismatch {
            expected: money(500),
            received: money(501),
        },
        Rejection::OrderExpired { expires_at: LATER },
        Rejection::RefundWindowClosed {
            item_id: item_id(),
            closed_at: LATER,
        },
        Rejection::TooManyPendingOrders { limit: 100 },
        Rejection::TooManyRefunds { limit: 100 },
        Rejection::CatalogFull { limit: 10_000 },
        Rejection::BalanceLimitExceeded {
            max: crate::domain::money::MAX_WALLET_BALANCE,
        },
        Rejection::invalid("bad"),
        Rejection::IdempotencyKeyReused,
        Rejection::LimitExceeded {
            limit: "max_pending_topups".to_owned(),
            max: 10,
            retry_after: Some(LATER),
        },
        Rejection::ItemKindFixed {
            item_id: item_id(),
            kind: "currency".to_owned(),
        },
        Rejection::WebhookNotFound {
            name: "gs".to_owned(),
        },
        Rejection::AccountFrozen {
            reason: "chargeback".to_owned(),
        },
        Rejection::NotFound {
            what: "dispute".to_owned(),
            id: "dp1".to_owned(),
        },
        Rejection::ReversalExceedsCredit {
            requested: money(600),
            reversible: money(500),
        },
        Rejection::DebtOutstanding { debt: money(300) },
        Rejection::MoneyLimitExceeded {
            limit: "max_spend_per_day".to_owned(),
            max: money(20_000),
            retry_after: Some(LATER),
        },
    ]
    .into()
}
