//! Outcomes: what applying a command produced — a `Reply` or a business `Rejection`.
//!
//! Outcomes are stored under the command's idempotency key and replayed to retries, so a `Reply` is a
//! snapshot of everything the response shows (the wallet as it was right after the command, say), never a
//! pointer to state that may have moved on.
//!
//! Stored outcomes are postcard bytes: the rules of the persisted format (`crate::domain`) hold here.

use serde::{Deserialize, Serialize};

use super::command::Envelope;
use super::event::Webhook;
use super::limits::{LimitSet, ShopLimits};
use super::model::{Credit, Entitlement, Freeze, Item, Order, Refund, Topup, User, WalletView};
use super::money::Money;
use super::reversal::{Dispute, Reversal};
use super::time::Timestamp;

pub type Outcome = Result<Reply, Rejection>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    UserCreated(User),
    TokenIssued {
        user_id: String,
        expires_at: Timestamp,
    },
    /// `fresh: false` when the external reference had already been credited (nothing credited now).
    Credited {
        credit: Credit,
        wallet: WalletView,
        fresh: bool,
    },
    TopupCreated(Topup),
    /// A webhook's answer: the top-up after the event (or unchanged, for a replay or a final top-up).
    TopupUpdated(Topup),
    Item(Item),
    OrderCreated(Order),
    OrderUpdated(Order),
    Refunded {
        refund: Refund,
        wallet: WalletView,
    },
    Entitlement(Entitlement),
    GlobalClaim(GlobalClaim),
    RefClaimed {
        accepted: bool,
    },
    Swept {
        orders: u32,
        topups: u32,
        idempotency_records: u32,
    },
    // New variants only at the end (postcard is positional; outcomes are stored). A `Box` is encoded as
    // what it holds: records are boxed only to keep `Outcome` small.
    /// What `SweepAndPurge` did: `Swept`'s counts and the final top-ups purged.
    SweptAndPurged {
        orders: u32,
        topups: u32,
        idempotency_records: u32,
        purged_topups: u32,
    },
    /// A webhook as the shard that changed it knows it.
    Webhook(Webhook),
    /// What `PurgeEvents` did: the events purged, and how many of them a webhook had not acknowledged.
    EventsPurged {
        purged: u32,
        dropped: u32,
    },
    /// A user with its freeze (after `FreezeUser` or `UnfreezeUser`).
    Account {
        user: User,
        frozen: Option<Freeze>,
    },
    /// A reversal, and the wallet and debt right after it. `fresh: false` when its `external_ref` was
    /// already reversed (nothing taken now).
    Reversed {
        reversal: Box<Reversal>,
        wallet: WalletView,
        debt: Money,
        fresh: bool,
    },
    /// A dispute after a PSP event (or unchanged, for one already known), the wallet and debt right
    /// after, and the reversal a lost dispute became.
    Disputed {
        dispute: Box<Dispute>,
        wallet: WalletView,
        debt: Money,
        reversal: Option<Box<Reversal>>,
    },
    /// The shop-wide limits as the shard that changed them holds them (after `PutShopLimits`).
    ShopLimits(ShopLimits),
    /// A user's overrides of the shop-wide limits (after `PutUserLimits`).
    UserLimits {
        user_id: String,
        overrides: LimitSet,
    },
    /// What `PurgeIdempotency` did: the records purged, and where the walk goes on (`None`: it reached
    /// the shard's last record).
    IdempotencyPurged {
        purged: u32,
        next: Option<(String, String)>,
    },
}

/// What the home shard of a global idempotency key says about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalClaim {
    /// Execute this (the first request's) command on its shard, then settle the key.
    Run(Box<Envelope>),
    /// The key already has this outcome.
    Settled(Box<Outcome>),
}

/// Business rejections. They are outcomes like successes: decided by `apply` in log order and stored
/// under the idempotency key, except `InvalidRequest` and `IdempotencyKeyReused`, which store nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("user not found")]
    UserNotFound,
    #[error("a user with this id already exists")]
    UserExists,
    #[error("item {item_id} not found")]
    ItemNotFound { item_id: String },
    #[error("order not found")]
    OrderNotFound,
    #[error("top-up not found")]
    TopupNotFound,
    #[error("available credit is below the order total")]
    InsufficientFunds { available: Money, required: Money },
    #[error("the order total changed since it was shown")]
    PriceChanged { expected: Money, current: Money },
    #[error("item {item_id} is already owned or in a pending order")]
    AlreadyOwned { item_id: String },
    #[error("item {item_id} is not for sale")]
    ItemInactive { item_id: String },
    #[error("not allowed while it is {status}")]
    InvalidState { status: String },
    #[error("refund of {item_id} exceeds what was purchased and not yet refunded")]
    RefundExceedsPurchase {
        item_id: String,
        requested: u32,
        refundable: u32,
    },
    #[error("units of {item_id} were already consumed")]
    AlreadyConsumed {
        item_id: String,
        requested: u32,
        unspent: u64,
    },
    #[error("not enough units of {item_id}")]
    InsufficientEntitlement {
        item_id: String,
        requested: u32,
        owned: u64,
    },
    #[error("external reference already used with another amount or user")]
    ExternalRefConflict { external_ref: String },
    #[error("amount differs from the top-up's")]
    AmountMismatch { expected: Money, received: Money },
    #[error("the order expired")]
    OrderExpired { expires_at: Timestamp },
    #[error("the refund window of {item_id} closed")]
    RefundWindowClosed {
        item_id: String,
        closed_at: Timestamp,
    },
    #[error("too many pending orders")]
    TooManyPendingOrders { limit: u32 },
    #[error("too many refunds on this order")]
    TooManyRefunds { limit: u32 },
    #[error("the catalog is full")]
    CatalogFull { limit: u64 },
    #[error("the wallet would exceed its maximum balance")]
    BalanceLimitExceeded { max: Money },
    #[error("{message}")]
    InvalidRequest { message: String },
    #[error("this idempotency key was used with a different request")]
    IdempotencyKeyReused,
    // New variants only at the end (postcard is positional; rejections are stored).
    /// A per-user limit is reached. `limit` names it (`max_pending_topups`), `max` is its value, and
    /// `retry_after`, when known, is when the limit frees up (the earliest pending top-up's expiry).
    #[error("the limit {limit} ({max}) is reached")]
    LimitExceeded {
        limit: String,
        max: u32,
        retry_after: Option<Timestamp>,
    },
    /// Appended after `LimitExceeded`: the encoding of the stored rejections above is unchanged.
    #[error("item {item_id} is a {kind}: an item's kind cannot change")]
    ItemKindFixed { item_id: String, kind: String },
    #[error("webhook {name} not found")]
    WebhookNotFound { name: String },
    #[error("the account is frozen: {reason}")]
    AccountFrozen { reason: String },
    /// Something other than the records above is missing: `what` names it (`credit`, `dispute`).
    #[error("{what} {id} not found")]
    NotFound { what: String, id: String },
    /// The reversals of a credit or top-up would sum to more than it brought in.
    #[error("the reversal exceeds what the credit brought in and was not yet reversed")]
    ReversalExceedsCredit { requested: Money, reversible: Money },
    /// The account owes the shop `debt`.
    #[error("the account has debt outstanding")]
    DebtOutstanding { debt: Money },
    /// `LimitExceeded` of a limit on money (`max_spend_per_day`): `max` is an amount.
    #[error("the limit {limit} is reached")]
    MoneyLimitExceeded {
        limit: String,
        max: Money,
        retry_after: Option<Timestamp>,
    },
}

impl Rejection {
    /// The stable, machine-readable code of the contract.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::UserNotFound => "user_not_found",
            Rejection::UserExists => "user_exists",
            Rejection::ItemNotFound { .. } => "item_not_found",
            Rejection::OrderNotFound => "order_not_found",
            Rejection::TopupNotFound => "topup_not_found",
            Rejection::InsufficientFunds { .. } => "insufficient_funds",
            Rejection::PriceChanged { .. } => "price_changed",
            Rejection::AlreadyOwned { .. } => "already_owned",
            Rejection::ItemInactive { .. } => "item_inactive",
            Rejection::InvalidState { .. } => "invalid_state",
            Rejection::RefundExceedsPurchase { .. } => "refund_exceeds_purchase",
            Rejection::AlreadyConsumed { .. } => "already_consumed",
            Rejection::InsufficientEntitlement { .. } => "insufficient_entitlement",
            Rejection::ExternalRefConflict { .. } => "external_ref_conflict",
            Rejection::AmountMismatch { .. } => "amount_mismatch",
            Rejection::OrderExpired { .. } => "order_expired",
            Rejection::RefundWindowClosed { .. } => "refund_window_closed",
            Rejection::TooManyPendingOrders { .. } => "too_many_pending_orders",
            Rejection::TooManyRefunds { .. } => "too_many_refunds",
            Rejection::CatalogFull { .. } => "catalog_full",
            Rejection::BalanceLimitExceeded { .. } => "balance_limit_exceeded",
            Rejection::InvalidRequest { .. } => "invalid_request",
            Rejection::IdempotencyKeyReused => "idempotency_key_reused",
            Rejection::LimitExceeded { .. } => "limit_exceeded",
            Rejection::ItemKindFixed { .. } => "invalid_state",
            Rejection::WebhookNotFound { .. } => "not_found",
            Rejection::AccountFrozen { .. } => "account_frozen",
            Rejection::NotFound { .. } => "not_found",
            Rejection::ReversalExceedsCredit { .. } => "reversal_exceeds_credit",
            Rejection::DebtOutstanding { .. } => "debt_outstanding",
            Rejection::MoneyLimitExceeded { .. } => "limit_exceeded",
        }
    }

    /// Whether this rejection is stored under the idempotency key. A malformed request and a reused key
    /// store nothing: the client may fix the request and send it again with the same key.
    pub fn is_stored(&self) -> bool {
        !matches!(
            self,
            Rejection::InvalidRequest { .. } | Rejection::IdempotencyKeyReused
        )
    }

    pub fn invalid(message: impl Into<String>) -> Rejection {
        Rejection::InvalidRequest {
            message: message.into(),
        }
    }
}
