//! The JSON shapes of the API (requests and responses) and their OpenAPI schemas.
//!
//! Requests reject unknown fields. Money travels as decimal strings; money fields are read as raw JSON
//! values so that a number or a malformed string is `invalid_amount` (422), not a parse error (400).
//! Responses are built from domain records by the `from_*` functions, always with the same field order,
//! so a stored outcome renders to the same bytes every time.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

use crate::domain::limits::Usage;
use crate::domain::{
    Credit, Currency, Dispute, Entitlement, Event, EventData, Freeze, Item, LimitSet,
    LimitsInForce, Money, Order, Posting, Refund, Reversal, Setting, Timestamp, Topup, User,
    WalletView,
};

// ----- requests ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// 1–64 chars of `[A-Za-z0-9_.-]`; the server makes a UUIDv7 when absent.
    pub user_id: Option<String>,
    /// Up to 100 characters.
    pub display_name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Lifetime of the token, 1–2592000 seconds (30 days). Default 3600.
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditRequest {
    #[schema(value_type = String, example = "20.00")]
    pub amount: Value,
    /// Unique across the shop: the PSP's payment id. 1–255 printable ASCII characters.
    pub external_ref: String,
    /// Free text such as `card`, up to 64 characters.
    pub source: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReversalRequest {
    /// At most what the credit brought in and was not reversed yet.
    #[schema(value_type = String, example = "20.00")]
    pub amount: Value,
    /// `psp_refund` or `chargeback`.
    pub reason: String,
    /// Unique per credit: the same reference again is the same reversal. 1–255 printable ASCII characters.
    pub external_ref: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopupRequest {
    #[schema(value_type = String, example = "20.00")]
    pub amount: Value,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// Unique per event: replays of an event are answered from its stored outcome.
    pub event_id: String,
    /// `payment.succeeded`, `payment.failed`, `payment.refunded`, `dispute.opened` or `dispute.closed`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The top-up; `payment.refunded` and `dispute.*` may name the `psp_payment_id` instead.
    pub topup_id: Option<String>,
    pub user_id: String,
    /// Required, except in `dispute.closed` (where it names the amount lost if the dispute was never
    /// opened here).
    #[schema(value_type = Option<String>, example = "20.00")]
    pub amount: Option<Value>,
    /// Required for `payment.succeeded`; unique across the shop.
    pub psp_payment_id: Option<String>,
    /// `dispute.opened` and `dispute.closed`: the PSP's dispute id.
    pub dispute_id: Option<String>,
    /// `dispute.closed`: `won` or `lost`.
    pub outcome: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutItemRequest {
    /// 1–200 characters.
    pub name: String,
    /// `game`, `skin` or `currency`. Cannot change once the item exists.
    pub kind: String,
    /// 0.00 (free) up to 1000000.00.
    #[schema(value_type = String, example = "4.99")]
    pub price: Value,
    /// Default true.
    pub active: Option<bool>,
    /// Days after completion a refund is allowed (0 = not refundable, default 14, at most 3650).
    pub refund_window_days: Option<u32>,
}

/// One order or refund line. Must be a JSON object: serde's derive would also take `["gems", 1]`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(try_from = "serde_json::Map<String, Value>")]
pub struct LineInput {
    pub item_id: String,
    /// 1–1000 (1 for `game` and `skin`).
    pub quantity: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineFields {
    item_id: String,
    quantity: u32,
}

impl TryFrom<serde_json::Map<String, Value>> for LineInput {
    type Error = serde_json::Error;

    fn try_from(object: serde_json::Map<String, Value>) -> Result<LineInput, serde_json::Error> {
        let fields: LineFields = serde_json::from_value(Value::Object(object))?;
        Ok(LineInput {
            item_id: fields.item_id,
            quantity: fields.quantity,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    /// 1–50 lines with distinct items.
    pub lines: Vec<LineInput>,
    /// The total the player was shown; the order is refused with `price_changed` if it differs.
    #[schema(value_type = Option<String>, example = "19.96")]
    pub expected_total: Option<Value>,
    /// Create and complete in one atomic step. Default false.
    pub complete: Option<bool>,
}

/// The body of `complete` and `cancel`: empty, or `{}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// What to refund; everything not yet refunded when absent.
    pub lines: Option<Vec<LineInput>>,
    /// Up to 200 characters.
    pub reason: Option<String>,
    /// Refund even after the refund window closed (admin only).
    pub force: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumeRequest {
    /// 1–1000000 units.
    pub quantity: u32,
}

// ----- responses --------------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct WalletResponse {
    pub currency: String,
    #[schema(example = "20.00")]
    pub balance: String,
    #[schema(example = "4.99")]
    pub held: String,
    /// `balance - held`
    #[schema(example = "15.01")]
    pub available: String,
    /// What the player owes the shop (a reversal took back money already spent); later credits repay it
    /// first. Shown by wallet and user reads, a new user, reversals and disputes; absent from the wallet a
    /// credit, top-up, refund, freeze or unfreeze answers with.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "0.00")]
    pub debt: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserResponse {
    pub user_id: String,
    pub display_name: Option<String>,
    pub created_at: String,
    pub wallet: WalletResponse,
    /// Why and since when the account is frozen; `null` when it is not.
    pub frozen: Option<FrozenResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FrozenResponse {
    pub reason: String,
    pub at: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    /// 1–500 characters (not only blanks, no control characters), shown in the user and in refusals.
    pub reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnfreezeRequest {
    /// Admin only: unfreeze even with debt outstanding.
    pub force: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    pub token: String,
    pub expires_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreditResponse {
    pub credit_id: String,
    pub user_id: String,
    pub amount: String,
    pub external_ref: String,
    pub source: Option<String>,
    /// Always `COMPLETED`.
    pub status: String,
    pub wallet: WalletResponse,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReversalSourceResponse {
    /// `credit` or `topup`.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReversalResponse {
    pub reversal_id: String,
    pub user_id: String,
    pub source: ReversalSourceResponse,
    pub amount: String,
    /// `psp_refund` or `chargeback`.
    pub reason: String,
    pub external_ref: String,
    /// Taken from the lost dispute's hold.
    pub from_hold: String,
    /// Taken from the wallet's available credit (including what `revoked_refunds` brought back).
    pub from_wallet: String,
    /// What the wallet could not give: added to the wallet's debt.
    pub debt: String,
    /// Refunds made first by `--on-reversal revoke`, newest purchase first.
    pub revoked_refunds: Vec<String>,
    pub revoked_amount: String,
    /// Always `COMPLETED`.
    pub status: String,
    pub wallet: WalletResponse,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DisputeResponse {
    pub dispute_id: String,
    pub user_id: String,
    pub topup_id: String,
    pub amount: String,
    /// Held while the dispute is open: `min(amount, available)` when it opened.
    pub held: String,
    /// `OPEN`, `WON` or `LOST`.
    pub status: String,
    pub opened_at: String,
    pub closed_at: Option<String>,
    /// The reversal a lost dispute became.
    pub reversal: Option<ReversalResponse>,
    pub wallet: WalletResponse,
}

/// What the PSP webhook answers: the top-up (`payment.succeeded`, `payment.failed`), the reversal
/// (`payment.refunded`) or the dispute (`dispute.*`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PspWebhookResponse {
    Topup(TopupResponse),
    Reversal(Box<ReversalResponse>),
    Dispute(Box<DisputeResponse>),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopupResponse {
    pub topup_id: String,
    pub user_id: String,
    /// `PENDING`, `COMPLETED`, `FAILED` or `EXPIRED`.
    pub status: String,
    pub amount: String,
    pub psp_payment_id: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ItemResponse {
    pub item_id: String,
    pub name: String,
    pub kind: String,
    pub price: String,
    pub active: bool,
    pub refund_window_days: u32,
    pub version: u64,
    pub updated_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ItemsResponse {
    pub items: Vec<ItemResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderLineResponse {
    pub item_id: String,
    pub kind: String,
    pub quantity: u32,
    pub unit_price: String,
    pub line_total: String,
    pub refunded_quantity: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryResponse {
    pub status: String,
    pub at: String,
    /// For `CANCELLED`: `expired` or `cancelled_by_client`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderResponse {
    pub order_id: String,
    pub user_id: String,
    /// `PENDING`, `COMPLETED`, `CANCELLED`, `PARTIALLY_REFUNDED` or `REFUNDED`.
    pub status: String,
    pub currency: String,
    pub lines: Vec<OrderLineResponse>,
    pub total: String,
    pub refunded_total: String,
    pub created_at: String,
    pub expires_at: String,
    pub completed_at: Option<String>,
    pub history: Vec<HistoryResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrdersPage {
    pub orders: Vec<OrderResponse>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RefundLineResponse {
    pub item_id: String,
    pub quantity: u32,
    pub amount: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RefundResponse {
    pub refund_id: String,
    pub order_id: String,
    pub user_id: String,
    pub amount: String,
    pub lines: Vec<RefundLineResponse>,
    pub reason: Option<String>,
    pub forced: bool,
    /// Always `COMPLETED`.
    pub status: String,
    pub wallet: WalletResponse,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementResponse {
    pub item_id: String,
    pub kind: String,
    pub quantity: u64,
    pub granted_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementsResponse {
    pub entitlements: Vec<EntitlementResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntryRef {
    /// `credit`, `topup`, `order` or `refund`.
    #[serde(rename = "type")]
    pub ref_type: String,
    pub id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerEntry {
    pub entry_id: String,
    pub seq: u64,
    /// `credit`, `hold`, `release`, `debit` or `refund`.
    pub kind: String,
    pub amount: String,
    pub balance_after: String,
    pub held_after: String,
    /// The double-entry accounts: `debit` loses the amount, `credit` gains it.
    pub debit_account: String,
    pub credit_account: String,
    #[serde(rename = "ref")]
    pub reference: EntryRef,
    pub at: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutWebhookRequest {
    /// `http://` only; its host must be allowed by `--webhook-allow-hosts`. At most 2048 bytes.
    #[schema(pattern = "^http://[^/?#@]+", max_length = 2048)]
    pub url: String,
    /// Event types to deliver; absent or empty: every type.
    pub types: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayWebhookRequest {
    /// A feed cursor (`next_cursor` of `GET /v1/events`): events after it are delivered again.
    #[schema(pattern = "^e1\\.[A-Za-z0-9_-]{1,8192}$")]
    pub after: String,
}

/// A webhook and how its delivery stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookResponse {
    pub name: String,
    pub url: String,
    /// Empty: every type.
    pub types: Vec<String>,
    /// `whsec_…`: only in the answer to a PUT (a PUT makes a new one; the old one stops working).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// `active` (delivering, or nothing to deliver), `retrying` (a delivery failed; it is retried with
    /// back-off), `failing` (a delivery has failed for 3 days or more; still retried hourly).
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
    /// Events not yet acknowledged, over every shard.
    pub lag: u64,
    /// The feed cursor up to which every shard's events were delivered (for `replay`).
    pub position: String,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<String>,
    pub next_attempt_at: Option<String>,
    /// Events purged (past 30 days) before this webhook acknowledged them.
    pub dropped: u64,
    pub shards: Vec<WebhookShardResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookShardResponse {
    pub shard: u32,
    /// The seq up to which this shard's events were delivered.
    pub position: u64,
    /// The shard's newest event.
    pub last_seq: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<String>,
    pub failing_since: Option<String>,
}

/// One event of the feed (and the body of a webhook delivery).
#[derive(Debug, Serialize, ToSchema)]
pub struct EventResponse {
    /// `evt_` and 32 hex digits; the same on every replica and at every delivery (`webhook-id`).
    pub event_id: String,
    /// `user.created`, `wallet.credited`, `topup.completed`, `topup.failed`, `topup.expired`,
    /// `order.created`, `order.completed`, `order.cancelled`, `refund.created`, `entitlement.granted`,
    /// `entitlement.revoked`, `entitlement.consumed`, `account.frozen`, `account.unfrozen` (and, once built,
    /// `payment.reversed`, `dispute.opened`, `dispute.closed`).
    #[serde(rename = "type")]
    pub event_type: String,
    pub occurred_at: String,
    pub user_id: String,
    pub shard: u32,
    /// Increases strictly per shard.
    pub seq: u64,
    /// The resource as the API returns it, as it stood right after the change.
    #[schema(value_type = Object)]
    pub data: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<EventResponse>,
    /// Pass as `after` for the next page (also when `events` is empty).
    pub next_cursor: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntry>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IdempotencyResponse {
    pub key: String,
    pub status: u16,
    #[schema(value_type = Object)]
    pub body: Value,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ShardAuditResponse {
    pub shard: u32,
    pub last_applied: u64,
    pub users: u64,
    pub orders: u64,
    pub postings: u64,
    pub state_hash: String,
    /// At most 1,000 violations of the shard, then (when there are more) a last line counting the rest.
    #[schema(max_items = 1001)]
    pub violations: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditResponse {
    pub ok: bool,
    pub shards: Vec<ShardAuditResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterNode {
    pub node_id: u64,
    /// How this node reaches it.
    pub address: String,
    pub this_node: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterShard {
    pub shard: u32,
    /// This node's role in the shard's group: `leader`, `follower`, `candidate`, `learner`, `shutdown`.
    pub role: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The last log index covered by this node's newest snapshot.
    pub snapshot_index: Option<u64>,
    /// Bytes of commands logged since this node's newest snapshot (a restart starts the count at
    /// `snapshot_at_log_bytes`: the log it did not count may hold that much).
    pub snapshot_log_bytes: u64,
    /// The bytes the next snapshot waits for (`--snapshot-log-percent` of the newest snapshot's size),
    /// besides `--snapshot-every` entries.
    pub snapshot_at_log_bytes: u64,
    /// On the shard's leader: entries each other replica is behind (null: not known yet).
    #[schema(value_type = Object)]
    pub lag: BTreeMap<String, Option<u64>>,
    /// Whether the shard has a leader.
    pub healthy: bool,
    /// `none`, or how far this node is in rebuilding the shard's data after losing it (a wiped data
    /// dir): `awaiting_leader` (takes part in nothing yet) or `catching_up` (follows the leader, does
    /// not vote yet).
    pub recovery: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterResponse {
    pub node_id: u64,
    /// `single` (one node, one-voter groups) or `cluster`.
    pub mode: String,
    pub nodes: Vec<ClusterNode>,
    pub shards: Vec<ClusterShard>,
}

/// What a backup of this node holds: every shard's export (`GET /v1/admin/backup/shards/{shard}`), and
/// the settings a data directory restored from them must be created with.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackupPlan {
    /// The node the shards are exported from.
    pub node_id: u64,
    /// The shards, numbered 0 to `shards - 1`.
    pub shards: u32,
    /// ISO code of the deployment's currency.
    pub currency: String,
    pub currency_decimals: u32,
    /// The version of the server (a restore needs the same schema).
    pub version: String,
}

/// One shard's leadership moved by a rebalance.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaderMoveResponse {
    pub shard: u32,
    /// The node that led it.
    pub from: u64,
    /// The node that leads it now.
    pub to: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RebalanceResponse {
    /// The leaderships that moved (empty when the leaders were already spread).
    pub moved: Vec<LeaderMoveResponse>,
    /// How many shards each healthy voter (by node id) leads after the moves, as the answering node sees it.
    pub leaders: std::collections::BTreeMap<String, u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteResponse {
    pub user_id: String,
    pub shard: u32,
    pub leader: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNodeRequest {
    pub node_id: u64,
    /// host:port where the members reach the new node.
    pub address: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusResponse {
    pub status: String,
}

// ----- rendering domain records -------------------------------------------------------------------------

fn time(t: Timestamp) -> String {
    t.to_rfc3339()
}

pub fn wallet(currency: &Currency, wallet: &WalletView) -> WalletResponse {
    WalletResponse {
        currency: currency.code().to_owned(),
        balance: currency.format(wallet.balance),
        held: currency.format(wallet.held),
        available: currency.format(wallet.available()),
        debt: None,
    }
}

/// A wallet with its debt shown.
pub fn wallet_owing(currency: &Currency, view: &WalletView, debt: Money) -> WalletResponse {
    WalletResponse {
        debt: Some(currency.format(debt)),
        ..wallet(currency, view)
    }
}

pub fn user(
    currency: &Currency,
    user: &User,
    view: &WalletView,
    frozen: Option<&Freeze>,
    debt: Option<Money>,
) -> UserResponse {
    UserResponse {
        user_id: user.user_id.clone(),
        display_name: user.display_name.clone(),
        created_at: time(user.created_at),
        wallet: match debt {
            Some(debt) => wallet_owing(currency, view, debt),
            None => wallet(currency, view),
        },
        frozen: frozen.map(|f| FrozenResponse {
            reason: f.reason.clone(),
            at: time(f.at),
        }),
    }
}

pub fn credit(currency: &Currency, credit: &Credit, view: &WalletView) -> CreditResponse {
    CreditResponse {
        credit_id: credit.credit_id.to_string(),
        user_id: credit.user_id.clone(),
        amount: currency.format(credit.amount),
        external_ref: credit.external_ref.clone(),
        source: credit.source.clone(),
        status: "COMPLETED".to_owned(),
        wallet: wallet(currency, view),
        created_at: time(credit.created_at),
    }
}

pub fn topup(currency: &Currency, topup: &Topup) -> TopupResponse {
    TopupResponse {
        topup_id: topup.topup_id.to_string(),
        user_id: topup.user_id.clone(),
        status: topup.status.as_str().to_owned(),
        amount: currency.format(topup.amount),
        psp_payment_id: topup.psp_payment_id.clone(),
        created_at: time(topup.created_at),
        expires_at: time(topup.expires_at),
        finished_at: topup.finished_at.map(time),
    }
}

pub fn item(currency: &Currency, item: &Item) -> ItemResponse {
    ItemResponse {
        item_id: item.spec.item_id.clone(),
        name: item.spec.name.clone(),
        kind: item.spec.kind.as_str().to_owned(),
        price: currency.format(item.spec.price),
        active: item.spec.active,
        refund_window_days: item.spec.refund_window_days,
        version: item.version,
        updated_at: time(item.updated_at),
    }
}

pub fn order(currency: &Currency, order: &Order) -> OrderResponse {
    OrderResponse {
        order_id: order.order_id.to_string(),
        user_id: order.user_id.clone(),
        status: order.status.as_str().to_owned(),
        currency: currency.code().to_owned(),
        lines: order
            .lines
            .iter()
            .map(|l| OrderLineResponse {
                item_id: l.item_id.clone(),
                kind: l.kind.as_str().to_owned(),
                quantity: l.quantity,
                unit_price: currency.format(l.unit_price),
                line_total: currency.format(l.line_total()),
                refunded_quantity: l.refunded_quantity,
            })
            .collect(),
        total: currency.format(order.total),
        refunded_total: currency.format(order.refunded_total),
        created_at: time(order.created_at),
        expires_at: time(order.expires_at),
        completed_at: order.completed_at.map(time),
        history: order
            .history
            .iter()
            .map(|h| HistoryResponse {
                status: h.status.as_str().to_owned(),
                at: time(h.at),
                reason: h.reason.map(|r| r.as_str().to_owned()),
            })
            .collect(),
    }
}

pub fn refund(currency: &Currency, refund: &Refund, view: &WalletView) -> RefundResponse {
    RefundResponse {
        refund_id: refund.refund_id.to_string(),
        order_id: refund.order_id.to_string(),
        user_id: refund.user_id.clone(),
        amount: currency.format(refund.amount),
        lines: refund
            .lines
            .iter()
            .map(|l| RefundLineResponse {
                item_id: l.item_id.clone(),
                quantity: l.quantity,
                amount: currency.format(l.amount),
            })
            .collect(),
        reason: refund.reason.clone(),
        forced: refund.forced,
        status: "COMPLETED".to_owned(),
        wallet: wallet(currency, view),
        created_at: time(refund.created_at),
    }
}

pub fn reversal(
    currency: &Currency,
    reversal: &Reversal,
    view: &WalletView,
    debt: Money,
) -> ReversalResponse {
    ReversalResponse {
        reversal_id: reversal.reversal_id.to_string(),
        user_id: reversal.user_id.clone(),
        source: ReversalSourceResponse {
            kind: reversal.source.kind_str().to_owned(),
            id: reversal.source.id().to_string(),
        },
        amount: currency.format(reversal.amount),
        reason: reversal.reason.as_str().to_owned(),
        external_ref: reversal.external_ref.clone(),
        from_hold: currency.format(reversal.from_hold),
        from_wallet: currency.format(reversal.from_wallet),
        debt: currency.format(reversal.debt),
        revoked_refunds: reversal
            .revoked_refunds
            .iter()
            .map(|id| id.to_string())
            .collect(),
        revoked_amount: currency.format(reversal.revoked_amount),
        status: "COMPLETED".to_owned(),
        wallet: wallet_owing(currency, view, debt),
        created_at: time(reversal.created_at),
    }
}

pub fn dispute(
    currency: &Currency,
    dispute: &Dispute,
    reversal_of: Option<&Reversal>,
    view: &WalletView,
    debt: Money,
) -> DisputeResponse {
    DisputeResponse {
        dispute_id: dispute.dispute_id.clone(),
        user_id: dispute.user_id.clone(),
        topup_id: dispute.topup_id.to_string(),
        amount: currency.format(dispute.amount),
        held: currency.format(dispute.held),
        status: dispute.status.as_str().to_owned(),
        opened_at: time(dispute.opened_at),
        closed_at: dispute.closed_at.map(time),
        reversal: reversal_of.map(|r| reversal(currency, r, view, debt)),
        wallet: wallet_owing(currency, view, debt),
    }
}

/// An event as the feed and webhooks show it: its `data` rendered as the API renders that resource.
pub fn event(currency: &Currency, shard: u32, seq: u64, event: &Event) -> EventResponse {
    let data = match &event.data {
        EventData::User(user) => to_value(user_response(currency, user)),
        EventData::Credit { credit: c, wallet } => to_value(credit(currency, c, wallet)),
        EventData::Topup(t) => to_value(topup(currency, t)),
        EventData::TopupCredit {
            topup: t,
            wallet: w,
        } => to_value(TopupCreditResponse {
            topup: topup(currency, t),
            wallet: wallet(currency, w),
        }),
        EventData::Order(o) => to_value(order(currency, o)),
        EventData::Refund { refund: r, wallet } => to_value(refund(currency, r, wallet)),
        EventData::Entitlement(e) => to_value(entitlement(e)),
        EventData::Account { user: u, frozen } => {
            to_value(user(currency, u, &u.wallet(), frozen.as_ref(), None))
        }
        EventData::Reversal {
            reversal: r,
            wallet,
            debt,
        } => to_value(reversal(currency, r, wallet, *debt)),
        EventData::Dispute {
            dispute: d,
            wallet,
            debt,
        } => to_value(dispute(currency, d, None, wallet, *debt)),
    };
    EventResponse {
        event_id: format!("evt_{}", event.event_id.simple()),
        event_type: event.event_type.as_str().to_owned(),
        occurred_at: time(event.occurred_at),
        user_id: event.user_id.clone(),
        shard,
        seq,
        data,
    }
}

/// `wallet.credited` by a top-up: the top-up and the wallet right after it.
#[derive(Debug, Serialize)]
struct TopupCreditResponse {
    #[serde(flatten)]
    topup: TopupResponse,
    wallet: WalletResponse,
}

/// A new user (`user.created`): it owes nothing, as `POST /v1/users` answers.
fn user_response(currency: &Currency, u: &User) -> UserResponse {
    user(currency, u, &u.wallet(), None, Some(Money::ZERO))
}

fn to_value(response: impl Serialize) -> Value {
    serde_json::to_value(response).unwrap_or(Value::Null)
}

pub fn entitlement(entitlement: &Entitlement) -> EntitlementResponse {
    EntitlementResponse {
        item_id: entitlement.item_id.clone(),
        kind: entitlement.kind.as_str().to_owned(),
        quantity: entitlement.quantity(),
        granted_at: time(entitlement.granted_at),
    }
}

fn account_name(account: &crate::domain::Account) -> String {
    use crate::domain::Account;
    match account {
        Account::Available(user) => format!("wallet:{user}:available"),
        Account::Held(user) => format!("wallet:{user}:held"),
        Account::PspClearing => "psp_clearing".to_owned(),
        Account::Revenue => "revenue".to_owned(),
        Account::Receivable => "receivable".to_owned(),
    }
}

pub fn ledger_entry(currency: &Currency, posting: &Posting) -> LedgerEntry {
    LedgerEntry {
        entry_id: posting.entry_id.to_string(),
        seq: posting.user_seq,
        kind: posting.kind.as_str().to_owned(),
        amount: currency.format(posting.amount),
        balance_after: currency.format(posting.balance_after),
        held_after: currency.format(posting.held_after),
        debit_account: account_name(&posting.debit),
        credit_account: account_name(&posting.credit),
        reference: EntryRef {
            ref_type: posting.reference.kind_str().to_owned(),
            id: posting.reference.id().to_string(),
        },
        at: time(posting.at),
    }
}

// ----- limits -----------------------------------------------------------------------------------------

/// A field that may be present with the value `null`: `Some(Value::Null)`, while an absent field is
/// `None` (with `#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// `PUT /v1/admin/limits` and `PUT /v1/users/{user_id}/limits`: the limits to change. An absent field
/// is left as it is; `null` is no limit; `"default"` is the level below (for a user: the shop-wide
/// value; for the shop: the built-in default, `--max-pending-topups` for `max_pending_topups`, none for
/// the rest).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// Most money debited by completed orders per UTC day: a decimal string (`"200.00"`), `null` or
    /// `"default"`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Value)]
    pub max_spend_per_day: Option<Value>,
    /// Most orders created per UTC clock hour: 0–1000000, `null` or `"default"`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Value)]
    pub max_orders_per_hour: Option<Value>,
    /// Most PENDING, unexpired top-ups at once: 0–1000000, `null` or `"default"`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Value)]
    pub max_pending_topups: Option<Value>,
    /// Most refunds created in the last 30 UTC days (today and the 29 before): 0–1000000, `null` or
    /// `"default"`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Value)]
    pub max_refunds_per_30_days: Option<Value>,
}

/// Limits in force: `null` is no limit.
#[derive(Debug, Serialize, ToSchema)]
pub struct LimitsResponse {
    #[schema(example = "200.00")]
    pub max_spend_per_day: Option<String>,
    pub max_orders_per_hour: Option<u32>,
    pub max_pending_topups: Option<u32>,
    pub max_refunds_per_30_days: Option<u32>,
}

/// Limits as one level sets them, in the request's terms: a value, `null` (no limit) or `"default"`
/// (the level below decides).
#[derive(Debug, Serialize, ToSchema)]
pub struct LimitSettingsResponse {
    #[schema(value_type = Value)]
    pub max_spend_per_day: Value,
    #[schema(value_type = Value)]
    pub max_orders_per_hour: Value,
    #[schema(value_type = Value)]
    pub max_pending_topups: Value,
    #[schema(value_type = Value)]
    pub max_refunds_per_30_days: Value,
}

/// The shop-wide limits: in force (after the built-in defaults), and as set.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShopLimitsResponse {
    pub limits: LimitsResponse,
    pub settings: LimitSettingsResponse,
}

/// What a user's limits count now.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageResponse {
    /// Debited today (UTC) by completed orders.
    #[schema(example = "42.50")]
    pub spent_today: String,
    /// Orders created in this UTC clock hour.
    pub orders_this_hour: u64,
    /// Refunds created today and in the 29 UTC days before.
    pub refunds_last_30_days: u64,
    /// PENDING top-ups that have not expired.
    pub pending_topups: u64,
}

/// A user's limits: in force (its overrides, else the shop's), its overrides, and what they count.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserLimitsResponse {
    pub user_id: String,
    pub limits: LimitsResponse,
    pub overrides: LimitSettingsResponse,
    pub usage: UsageResponse,
}

pub fn limits_in_force(currency: &Currency, limits: &LimitsInForce) -> LimitsResponse {
    LimitsResponse {
        max_spend_per_day: limits.max_spend_per_day.map(|m| currency.format(m)),
        max_orders_per_hour: limits.max_orders_per_hour,
        max_pending_topups: limits.max_pending_topups,
        max_refunds_per_30_days: limits.max_refunds_per_30_days,
    }
}

pub fn limit_settings(currency: &Currency, set: &LimitSet) -> LimitSettingsResponse {
    fn setting<T>(setting: Setting<T>, value: impl FnOnce(T) -> Value) -> Value {
        match setting {
            Setting::Default => Value::String("default".to_owned()),
            Setting::Unlimited => Value::Null,
            Setting::Max(max) => value(max),
        }
    }
    LimitSettingsResponse {
        max_spend_per_day: setting(set.max_spend_per_day, |m| Value::String(currency.format(m))),
        max_orders_per_hour: setting(set.max_orders_per_hour, Value::from),
        max_pending_topups: setting(set.max_pending_topups, Value::from),
        max_refunds_per_30_days: setting(set.max_refunds_per_30_days, Value::from),
    }
}

pub fn usage(currency: &Currency, usage: &Usage) -> UsageResponse {
    UsageResponse {
        spent_today: currency.format(usage.spent_today),
        orders_this_hour: usage.orders_this_hour,
        refunds_last_30_days: usage.refunds_in_window,
        pending_topups: usage.pending_topups,
    }
}
