//! Events: what a change tells the game servers, and the webhooks that are told.
//!
//! `apply` writes an [`Event`] for every change a game server must react to, in the same transaction as the
//! change (the transactional outbox), numbered by a per-shard `seq`. An event holds a copy of the record as
//! it stood right after the change (the API renders it as it renders that record), never a pointer to
//! state that may have moved on. A [`Webhook`] row lives on every shard: the endpoint (the same on every
//! shard) and how far this shard's events were delivered to it.
//!
//! Both are stored as postcard bytes: the rules of the persisted format (`crate::domain`) hold here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::model::{Credit, Entitlement, Freeze, Order, Refund, Topup, User, WalletView};
use super::money::Money;
use super::reversal::{Dispute, Reversal};
use super::time::Timestamp;

/// The types of events, named in the API as [`EventType::as_str`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventType {
    UserCreated,
    WalletCredited,
    TopupCompleted,
    TopupFailed,
    TopupExpired,
    OrderCreated,
    OrderCompleted,
    OrderCancelled,
    RefundCreated,
    EntitlementGranted,
    EntitlementRevoked,
    EntitlementConsumed,
    PaymentReversed,
    DisputeOpened,
    DisputeClosed,
    AccountFrozen,
    AccountUnfrozen,
    // New variants only at the end (postcard is positional; events are stored).
}

impl EventType {
    /// Every type, in the API's order.
    pub const ALL: [EventType; 17] = [
        EventType::UserCreated,
        EventType::WalletCredited,
        EventType::TopupCompleted,
        EventType::TopupFailed,
        EventType::TopupExpired,
        EventType::OrderCreated,
        EventType::OrderCompleted,
        EventType::OrderCancelled,
        EventType::RefundCreated,
        EventType::EntitlementGranted,
        EventType::EntitlementRevoked,
        EventType::EntitlementConsumed,
        EventType::PaymentReversed,
        EventType::DisputeOpened,
        EventType::DisputeClosed,
        EventType::AccountFrozen,
        EventType::AccountUnfrozen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::UserCreated => "user.created",
            EventType::WalletCredited => "wallet.credited",
            EventType::TopupCompleted => "topup.completed",
            EventType::TopupFailed => "topup.failed",
            EventType::TopupExpired => "topup.expired",
            EventType::OrderCreated => "order.created",
            EventType::OrderCompleted => "order.completed",
            EventType::OrderCancelled => "order.cancelled",
            EventType::RefundCreated => "refund.created",
            EventType::EntitlementGranted => "entitlement.granted",
            EventType::EntitlementRevoked => "entitlement.revoked",
            EventType::EntitlementConsumed => "entitlement.consumed",
            EventType::PaymentReversed => "payment.reversed",
            EventType::DisputeOpened => "dispute.opened",
            EventType::DisputeClosed => "dispute.closed",
            EventType::AccountFrozen => "account.frozen",
            EventType::AccountUnfrozen => "account.unfrozen",
        }
    }

    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// The record an event carries, as it stood right after the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventData {
    User(User),
    /// A direct credit and the wallet right after it.
    Credit {
        credit: Credit,
        wallet: WalletView,
    },
    Topup(Topup),
    /// A completed top-up and the wallet right after it credited.
    TopupCredit {
        topup: Topup,
        wallet: WalletView,
    },
    Order(Order),
    Refund {
        refund: Refund,
        wallet: WalletView,
    },
    Entitlement(Entitlement),
    /// A user and its freeze (`account.frozen`, `account.unfrozen`).
    Account {
        user: User,
        frozen: Option<Freeze>,
    },
    /// A reversal (`payment.reversed`) and the wallet and debt right after it.
    Reversal {
        reversal: Reversal,
        wallet: WalletView,
        debt: Money,
    },
    /// A dispute (`dispute.opened`, `dispute.closed`) and the wallet and debt right after it.
    Dispute {
        dispute: Dispute,
        wallet: WalletView,
        debt: Money,
    },
    // New variants only at the end.
}

/// One event of a shard's outbox (its `seq` is the row's key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Uuid,
    pub event_type: EventType,
    pub occurred_at: Timestamp,
    pub user_id: String,
    pub data: EventData,
}

/// The outbox's bookkeeping in one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLog {
    /// The seq of the newest event (0: none yet). Never goes back, not even when events are purged.
    pub last_seq: u64,
    /// Every event up to this seq was purged (0: none).
    pub purged_through: u64,
    /// Events purged although a webhook had not acknowledged them (past the longest retention).
    pub dropped: u64,
}

/// Most webhooks a shop may have (deleted ones that were not re-created count until purged).
pub const MAX_WEBHOOKS: u32 = 32;

/// A webhook as one shard knows it: the endpoint, and the delivery of this shard's events to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    /// The types delivered; empty: every type.
    pub types: Vec<EventType>,
    /// Decided by the webhook's home shard, one more at every PUT or DELETE; a shard takes a change only
    /// if it is newer than its copy. The signing secret is derived from the name and the generation.
    pub generation: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// A deleted webhook is kept (with its generation) so that a late, older PUT cannot revive it.
    pub deleted: bool,
    /// Every event of this shard up to this seq was delivered (or is not of the webhook's types).
    pub position: u64,
    /// Failed attempts at the event after `position`.
    pub attempts: u32,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<Timestamp>,
    pub next_attempt_at: Option<Timestamp>,
    /// Since when the event after `position` has been failing (None while deliveries succeed).
    pub failing_since: Option<Timestamp>,
    /// Events of this shard purged before this webhook acknowledged them.
    pub dropped: u64,
}

impl Webhook {
    /// A new webhook that starts delivering after seq `position`, with nothing tried yet.
    pub fn new(
        name: &str,
        url: &str,
        types: &[EventType],
        generation: u64,
        now: Timestamp,
        position: u64,
    ) -> Webhook {
        Webhook {
            name: name.to_owned(),
            url: url.to_owned(),
            types: types.to_vec(),
            generation,
            created_at: now,
            updated_at: now,
            deleted: false,
            position,
            attempts: 0,
            last_error: None,
            last_attempt_at: None,
            next_attempt_at: None,
            failing_since: None,
            dropped: 0,
        }
    }

    /// Delivery goes on after seq `position`, from a clean slate: no attempt of the next event failed yet.
    pub fn move_to(&mut self, position: u64) {
        self.position = position;
        self.attempts = 0;
        self.next_attempt_at = None;
        self.failing_since = None;
    }

    /// Does the webhook want events of this type?
    pub fn wants(&self, event_type: EventType) -> bool {
        self.types.is_empty() || self.types.contains(&event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_parses_back_from_its_name() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("order.shipped"), None);
    }
}
