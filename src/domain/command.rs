//! Commands: every change to the shop's state is one `Command` inside an `Envelope`.
//!
//! The envelope carries everything non-deterministic — the time, the randomness for new ids, the
//! idempotency key with its request fingerprint and retention — so that applying it is a pure function
//! of (state, envelope) and every replica reaches the same state.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ids::IdSeed;
use super::model::ItemSpec;
use super::money::Money;
use super::outcome::Outcome;
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
    CreateUser {
        user_id: String,
        display_name: Option<String>,
    },
    /// Records that a token was minted for the user (tokens themselves are never stored).
    IssueToken {
        user_id: String,
        expires_at: Timestamp,
    },
    /// Step 1 of a global-scope request, on the key's home shard: claim the key for `inner`, or learn the
    /// outcome (or the still pending command) of an earlier request with that key.
    ClaimGlobalKey {
        key: String,
        fingerprint: Fingerprint,
        expires_at: Timestamp,
        inner: Box<Envelope>,
    },
    /// Step 3 of a global-scope request: record the outcome that step 2 produced on the user's shard.
    SettleGlobalKey {
        key: String,
        fingerprint: Fingerprint,
        outcome: Box<Outcome>,
    },
    /// Reserve an external reference (unique across the whole shop) on its home shard.
    ClaimExternalRef {
        reference: String,
        claim: RefClaim,
    },
    Credit {
        user_id: String,
        amount: Money,
        external_ref: String,
        source: Option<String>,
        /// Did the reference's home shard accept the claim? If not, the credit is `external_ref_conflict`.
        ref_accepted: bool,
    },
    CreateTopup {
        user_id: String,
        amount: Money,
        expires_at: Timestamp,
    },
    PspPayment {
        event_id: String,
        succeeded: bool,
        topup_id: Uuid,
        user_id: String,
        amount: Money,
        psp_payment_id: String,
        ref_accepted: bool,
    },
    /// Create or replace an item. `version: None` on the catalog's home shard (which decides the version);
    /// `Some(v)` on every other shard (which takes the item if `v` is newer than its copy).
    PutItem {
        spec: ItemSpec,
        version: Option<u64>,
    },
    CreateOrder {
        user_id: String,
        lines: Vec<LineRequest>,
        expected_total: Option<Money>,
        complete: bool,
        expires_at: Timestamp,
        max_pending_orders: u32,
    },
    CompleteOrder {
        user_id: String,
        order_id: Uuid,
    },
    CancelOrder {
        user_id: String,
        order_id: Uuid,
    },
    Refund {
        user_id: String,
        order_id: Uuid,
        /// `None`: everything not yet refunded.
        lines: Option<Vec<LineRequest>>,
        reason: Option<String>,
        force: bool,
    },
    Consume {
        user_id: String,
        item_id: String,
        quantity: u32,
    },
    /// Background work due at `now`: expire pending orders and top-ups, purge idempotency outcomes past
    /// their retention. At most `limit` of each per command.
    Sweep {
        limit: u32,
    },
    // Postcard is positional: new variants go at the end, existing ones never change (entries already in
    // a log must decode and apply as they did).
    /// `CreateTopup` under a per-user cap: refused with `limit_exceeded` when the user already has
    /// `max_pending_topups` PENDING, unexpired top-ups. What the HTTP layer sends (`--max-pending-topups`).
    CreateTopupCapped {
        user_id: String,
        amount: Money,
        expires_at: Timestamp,
        max_pending_topups: u32,
    },
    /// `Sweep`, and also purge EXPIRED and FAILED top-ups that became final more than
    /// `topup_retention_seconds` before `now` (at most `limit` of them). What the sweeper sends.
    SweepAndPurge {
        limit: u32,
        topup_retention_seconds: u64,
    },
}

impl Command {
    /// The user whose shard this command must run on, if it is a per-user command.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Command::CreateUser { user_id, .. }
            | Command::IssueToken { user_id, .. }
            | Command::Credit { user_id, .. }
            | Command::CreateTopup { user_id, .. }
            | Command::CreateTopupCapped { user_id, .. }
            | Command::PspPayment { user_id, .. }
            | Command::CreateOrder { user_id, .. }
            | Command::CompleteOrder { user_id, .. }
            | Command::CancelOrder { user_id, .. }
            | Command::Refund { user_id, .. }
            | Command::Consume { user_id, .. } => Some(user_id),
            Command::ClaimGlobalKey { .. }
            | Command::SettleGlobalKey { .. }
            | Command::ClaimExternalRef { .. }
            | Command::PutItem { .. }
            | Command::Sweep { .. }
            | Command::SweepAndPurge { .. } => None,
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::CreateUser { .. } => "create_user",
            Command::IssueToken { .. } => "issue_token",
            Command::ClaimGlobalKey { .. } => "claim_global_key",
            Command::SettleGlobalKey { .. } => "settle_global_key",
            Command::ClaimExternalRef { .. } => "claim_external_ref",
            Command::Credit { .. } => "credit",
            Command::CreateTopup { .. } => "create_topup",
            Command::PspPayment { .. } => "psp_payment",
            Command::PutItem { .. } => "put_item",
            Command::CreateOrder { .. } => "create_order",
            Command::CompleteOrder { .. } => "complete_order",
            Command::CancelOrder { .. } => "cancel_order",
            Command::Refund { .. } => "refund",
            Command::Consume { .. } => "consume",
            Command::Sweep { .. } => "sweep",
            Command::CreateTopupCapped { .. } => "create_topup",
            Command::SweepAndPurge { .. } => "sweep",
        }
    }
}
