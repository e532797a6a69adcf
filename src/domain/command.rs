//! Commands: every change to the shop's state is one `Command` inside an `Envelope`.
//!
//! The envelope carries everything non-deterministic — the time, the randomness for new ids, the
//! idempotency key with its request fingerprint and retention — so that applying it is a pure function
//! of (state, envelope) and every replica reaches the same state.
//!
//! Envelopes are Raft log entries and stored idempotency records, as postcard bytes: the rules of the
//! persisted format (`crate::domain`) hold for every type here. Each variant holds a struct of its own
//! name; postcard encodes `V(S { a, b })` exactly as it encoded the struct variant `V { a, b }`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::event::EventType;
use super::ids::IdSeed;
use super::limits::LimitChanges;
use super::model::ItemSpec;
use super::money::Money;
use super::outcome::Outcome;
use super::reversal::{ReversalReason, ReversalSource};
use super::time::Timestamp;

/// Scope of the idempotency keys of requests without a user in their path (`POST /v1/users`). The `@`
/// keeps every system scope apart from user ids, which cannot contain it.
pub const GLOBAL_SCOPE: &str = "@global";
/// Scope under which the user's shard records the outcome of a global-scope request it executed.
pub const GLOBAL_INNER_SCOPE: &str = "@global-inner";
/// Scope of PSP webhook events, keyed by `event_id`.
pub const PSP_EVENT_SCOPE: &str = "@psp";

/// A SHA-256 digest of method, path and canonical body.
pub type Fingerprint = [u8; 32];

/// The idempotency key a command was sent with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyTag {
    pub scope: String,
    pub key: String,
    pub fingerprint: Fingerprint,
    /// When the stored outcome may be purged.
    pub expires_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub now: Timestamp,
    pub seed: IdSeed,
    pub idempotency: Option<IdempotencyTag>,
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineRequest {
    pub item_id: String,
    pub quantity: u32,
}

/// Who an external reference (a direct credit's `external_ref`, a PSP payment id) belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefClaim {
    pub user_id: String,
    pub amount: Money,
    /// The top-up a PSP payment completes; `None` for direct credits.
    pub topup_id: Option<Uuid>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateUser(CreateUser),
    IssueToken(IssueToken),
    ClaimGlobalKey(ClaimGlobalKey),
    SettleGlobalKey(SettleGlobalKey),
    ClaimExternalRef(ClaimExternalRef),
    Credit(Credit),
    CreateTopup(CreateTopup),
    PspPayment(PspPayment),
    PutItem(PutItem),
    CreateOrder(CreateOrder),
    CompleteOrder(CompleteOrder),
    CancelOrder(CancelOrder),
    Refund(Refund),
    Consume(Consume),
    Sweep(Sweep),
    // Postcard is positional: new variants go at the end, existing ones and their structs never change
    // (entries already in a log must decode and apply as they did; see `crate::domain`).
    CreateTopupCapped(CreateTopupCapped),
    SweepAndPurge(SweepAndPurge),
    PutWebhook(PutWebhook),
    DeleteWebhook(DeleteWebhook),
    AckWebhook(AckWebhook),
    WebhookFailed(WebhookFailed),
    ReplayWebhook(ReplayWebhook),
    PurgeEvents(PurgeEvents),
    FreezeUser(FreezeUser),
    UnfreezeUser(UnfreezeUser),
    AckWebhookFrom(AckWebhookFrom),
    Reverse(Reverse),
    OpenDispute(OpenDispute),
    CloseDispute(CloseDispute),
    PutShopLimits(PutShopLimits),
    PutUserLimits(PutUserLimits),
    PurgeIdempotency(PurgeIdempotency),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateUser {
    pub user_id: String,
    pub display_name: Option<String>,
}

/// Records that a token was minted for the user (tokens themselves are never stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueToken {
    pub user_id: String,
    pub expires_at: Timestamp,
}

/// Step 1 of a global-scope request, on the key's home shard: claim the key for `inner`, or learn the
/// outcome (or the still pending command) of an earlier request with that key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimGlobalKey {
    pub key: String,
    pub fingerprint: Fingerprint,
    pub expires_at: Timestamp,
    pub inner: Box<Envelope>,
}

/// Step 3 of a global-scope request: record the outcome that step 2 produced on the user's shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleGlobalKey {
    pub key: String,
    pub fingerprint: Fingerprint,
    pub outcome: Box<Outcome>,
}

/// Reserve an external reference (unique across the whole shop) on its home shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimExternalRef {
    pub reference: String,
    pub claim: RefClaim,
}

/// A direct credit of the user's wallet (not the stored `model::Credit` it creates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub user_id: String,
    pub amount: Money,
    pub external_ref: String,
    pub source: Option<String>,
    /// Did the reference's home shard accept the claim? If not, the credit is `external_ref_conflict`.
    pub ref_accepted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTopup {
    pub user_id: String,
    pub amount: Money,
    pub expires_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PspPayment {
    pub event_id: String,
    pub succeeded: bool,
    pub topup_id: Uuid,
    pub user_id: String,
    pub amount: Money,
    pub psp_payment_id: String,
    pub ref_accepted: bool,
}

/// Create or replace an item. `version: None` on the catalog's home shard (which decides the version);
/// `Some(v)` on every other shard (which takes the item if `v` is newer than its copy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutItem {
    pub spec: ItemSpec,
    pub version: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrder {
    pub user_id: String,
    pub lines: Vec<LineRequest>,
    pub expected_total: Option<Money>,
    pub complete: bool,
    pub expires_at: Timestamp,
    pub max_pending_orders: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteOrder {
    pub user_id: String,
    pub order_id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOrder {
    pub user_id: String,
    pub order_id: Uuid,
}

/// A refund of an order's lines (not the stored `model::Refund` it creates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub user_id: String,
    pub order_id: Uuid,
    /// `None`: everything not yet refunded.
    pub lines: Option<Vec<LineRequest>>,
    pub reason: Option<String>,
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consume {
    pub user_id: String,
    pub item_id: String,
    pub quantity: u32,
}

/// Background work due at `now`: expire pending orders and top-ups, purge idempotency outcomes past
/// their retention. At most `limit` of each per command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sweep {
    pub limit: u32,
}

/// `CreateTopup` under a per-user cap: refused with `limit_exceeded` when the user already has
/// `max_pending_topups` PENDING, unexpired top-ups. What the HTTP layer sends (`--max-pending-topups`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTopupCapped {
    pub user_id: String,
    pub amount: Money,
    pub expires_at: Timestamp,
    pub max_pending_topups: u32,
}

/// `Sweep`, and also purge EXPIRED and FAILED top-ups that became final more than
/// `topup_retention_seconds` before `now` (at most `limit` of them). What the sweeper sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepAndPurge {
    pub limit: u32,
    pub topup_retention_seconds: u64,
}

/// Create or change a webhook on one shard. `generation: None` on the webhook's home shard (which decides
/// the generation: one more than its copy's); `Some(g)` on every other shard (which takes the change if
/// `g` is newer than its copy). A new webhook (or one re-created after a delete) starts after the shard's
/// newest event; a changed one keeps its position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutWebhook {
    pub name: String,
    pub url: String,
    pub types: Vec<EventType>,
    pub generation: Option<u64>,
}

/// Delete a webhook on one shard (`generation` as in [`PutWebhook`]). The row stays, marked deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteWebhook {
    pub name: String,
    pub generation: Option<u64>,
}

/// The shard's leader delivered every event up to `position` to the webhook (at `generation`; an ack
/// for another generation, or behind the webhook's position, changes nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckWebhook {
    pub name: String,
    pub generation: u64,
    pub position: u64,
}

/// The shard's leader failed to deliver the event after `position`; it tries again at `next_attempt_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookFailed {
    pub name: String,
    pub generation: u64,
    pub position: u64,
    pub error: String,
    pub next_attempt_at: Timestamp,
}

/// Move a webhook's position on one shard back (or forward) to `position`, at most the newest event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayWebhook {
    pub name: String,
    pub position: u64,
}

/// Purge the shard's oldest events: those older than `retention_seconds` that every webhook has
/// acknowledged, and those older than `max_retention_seconds` whatever the webhooks (counted as dropped
/// for each webhook that had not acknowledged them). At most `limit` events per command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeEvents {
    pub retention_seconds: u64,
    pub max_retention_seconds: u64,
    pub limit: u32,
}

/// Purge idempotency outcomes past their retention by walking the shard's records in key order from
/// (`from_scope`, `from_key`) on: at most `scan` records looked at, at most `limit` removed. The first one
/// applied on a shard also turns its retention index off for the records stored after it (the walk finds
/// them instead: one table fewer in every keyed command's transaction); the records already indexed are
/// still purged through the index by `SweepAndPurge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeIdempotency {
    pub from_scope: String,
    pub from_key: String,
    pub scan: u32,
    pub limit: u32,
}

impl PurgeIdempotency {
    /// A walk from the shard's first record.
    pub fn from_first(scan: u32, limit: u32) -> PurgeIdempotency {
        PurgeIdempotency {
            from_scope: String::new(),
            from_key: String::new(),
            scan,
            limit,
        }
    }
}

/// `AckWebhook` that takes effect only if the webhook is still at `from`, where the delivered batch
/// started: a replay that moved the position meanwhile wins, and the leader resumes from it. What the
/// delivery worker sends (`AckWebhook` stays for entries already in logs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckWebhookFrom {
    pub name: String,
    pub generation: u64,
    pub from: u64,
    pub position: u64,
}

/// Freeze an account (nothing changes if it is frozen already).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeUser {
    pub user_id: String,
    pub reason: String,
}

/// Unfreeze an account (nothing changes if it is not frozen). `force`: even with debt outstanding (an
/// admin's decision; debt arrives with payment reversals).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnfreezeUser {
    pub user_id: String,
    pub force: bool,
}

/// Take back (part of) a credit or top-up: a PSP refund or a chargeback. From the wallet's available
/// credit first; with `revoke`, then by refunding the newest unconsumed purchases made since; the rest
/// becomes debt, and the account is frozen. A second reversal with the same `external_ref` on the same
/// source is the first one (a different amount: `external_ref_conflict`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reverse {
    pub user_id: String,
    pub source: ReversalSource,
    pub amount: Money,
    pub reason: ReversalReason,
    pub external_ref: String,
    /// `--on-reversal revoke`.
    pub revoke: bool,
}

/// The PSP reports a dispute of a completed top-up: hold `min(amount, available)`. A dispute already
/// known (open or closed) changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenDispute {
    pub user_id: String,
    pub topup_id: Uuid,
    pub dispute_id: String,
    pub amount: Money,
}

/// The PSP reports a dispute's end: `won` releases its hold; lost reverses its amount (or `amount`, if
/// the dispute was never opened here), taking the hold first. A closed dispute changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseDispute {
    pub user_id: String,
    pub topup_id: Uuid,
    pub dispute_id: String,
    pub won: bool,
    pub amount: Option<Money>,
    /// `--on-reversal revoke`, for a lost dispute.
    pub revoke: bool,
}

/// Change the shop-wide limits on one shard. `generation: None` on the limits' home shard (which makes
/// the changes to its copy and decides the generation: one more than its copy's); `Some(g)` on every
/// other shard, with every limit in `changes` (the home's whole set), taken if `g` is newer than its copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutShopLimits {
    pub changes: LimitChanges,
    pub generation: Option<u64>,
}

/// Change a user's overrides of the shop-wide limits (on the user's shard).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutUserLimits {
    pub user_id: String,
    pub changes: LimitChanges,
}

impl Command {
    /// The user whose shard this command must run on, if it is a per-user command.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Command::CreateUser(CreateUser { user_id, .. })
            | Command::IssueToken(IssueToken { user_id, .. })
            | Command::Credit(Credit { user_id, .. })
            | Command::CreateTopup(CreateTopup { user_id, .. })
            | Command::CreateTopupCapped(CreateTopupCapped { user_id, .. })
            | Command::PspPayment(PspPayment { user_id, .. })
            | Command::CreateOrder(CreateOrder { user_id, .. })
            | Command::CompleteOrder(CompleteOrder { user_id, .. })
            | Command::CancelOrder(CancelOrder { user_id, .. })
            | Command::Refund(Refund { user_id, .. })
            | Command::Consume(Consume { user_id, .. })
            | Command::FreezeUser(FreezeUser { user_id, .. })
            | Command::UnfreezeUser(UnfreezeUser { user_id, .. })
            | Command::Reverse(Reverse { user_id, .. })
            | Command::OpenDispute(OpenDispute { user_id, .. })
            | Command::CloseDispute(CloseDispute { user_id, .. })
            | Command::PutUserLimits(PutUserLimits { user_id, .. }) => Some(user_id),
            Command::ClaimGlobalKey(_)
            | Command::SettleGlobalKey(_)
            | Command::ClaimExternalRef(_)
            | Command::PutItem(_)
            | Command::Sweep(_)
            | Command::SweepAndPurge(_)
            | Command::PutWebhook(_)
            | Command::DeleteWebhook(_)
            | Command::AckWebhook(_)
            | Command::WebhookFailed(_)
            | Command::ReplayWebhook(_)
            | Command::PurgeEvents(_)
            | Command::AckWebhookFrom(_)
            | Command::PutShopLimits(_)
            | Command::PurgeIdempotency(_) => None,
        }
    }

    /// Every [`Command::name`] (metrics register each at start).
    pub const NAMES: [&'static str; 29] = [
        "create_user",
        "issue_token",
        "claim_global_key",
        "settle_global_key",
        "claim_external_ref",
        "credit",
        "create_topup",
        "psp_payment",
        "put_item",
        "create_order",
        "complete_order",
        "cancel_order",
        "refund",
        "consume",
        "sweep",
        "put_webhook",
        "delete_webhook",
        "ack_webhook",
        "webhook_failed",
        "replay_webhook",
        "purge_events",
        "freeze_user",
        "unfreeze_user",
        "reverse",
        "open_dispute",
        "close_dispute",
        "put_shop_limits",
        "put_user_limits",
        "purge_idempotency",
    ];

    /// A short name for logs and metrics (one of [`Command::NAMES`]).
    pub fn name(&self) -> &'static str {
        match self {
            Command::CreateUser(_) => "create_user",
            Command::IssueToken(_) => "issue_token",
            Command::ClaimGlobalKey(_) => "claim_global_key",
            Command::SettleGlobalKey(_) => "settle_global_key",
            Command::ClaimExternalRef(_) => "claim_external_ref",
            Command::Credit(_) => "credit",
            Command::CreateTopup(_) => "create_topup",
            Command::PspPayment(_) => "psp_payment",
            Command::PutItem(_) => "put_item",
            Command::CreateOrder(_) => "create_order",
            Command::CompleteOrder(_) => "complete_order",
            Command::CancelOrder(_) => "cancel_order",
            Command::Refund(_) => "refund",
            Command::Consume(_) => "consume",
            Command::Sweep(_) => "sweep",
            Command::CreateTopupCapped(_) => "create_topup",
            Command::SweepAndPurge(_) => "sweep",
            Command::PutWebhook(_) => "put_webhook",
            Command::DeleteWebhook(_) => "delete_webhook",
            Command::AckWebhook(_) => "ack_webhook",
            Command::WebhookFailed(_) => "webhook_failed",
            Command::ReplayWebhook(_) => "replay_webhook",
            Command::PurgeEvents(_) => "purge_events",
            Command::FreezeUser(_) => "freeze_user",
            Command::UnfreezeUser(_) => "unfreeze_user",
            Command::AckWebhookFrom(_) => "ack_webhook",
            Command::Reverse(_) => "reverse",
            Command::OpenDispute(_) => "open_dispute",
            Command::CloseDispute(_) => "close_dispute",
            Command::PutShopLimits(_) => "put_shop_limits",
            Command::PutUserLimits(_) => "put_user_limits",
            Command::PurgeIdempotency(_) => "purge_idempotency",
        }
    }
}
