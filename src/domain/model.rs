//! The shop's records — users with their wallets, catalog items, orders, entitlements, credits, top-ups,
//! refunds and ledger postings — and the pure rules that belong to a single record (status transitions,
//! quantities, expiry). Storage and transport know these types; these types know neither.
//!
//! Records are stored as postcard bytes in redb rows: the rules of the persisted format (`crate::domain`)
//! hold for every type here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::money::Money;
use super::time::Timestamp;

/// The longest display name, item name, reason or source text accepted.
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;
pub const MAX_ITEM_NAME_CHARS: usize = 200;
pub const MAX_REASON_CHARS: usize = 200;
pub const MAX_SOURCE_CHARS: usize = 64;
/// External references (`external_ref`, `psp_payment_id`, `event_id`) are 1–255 printable ASCII chars.
pub const MAX_EXTERNAL_REF_LEN: usize = 255;
/// 1–50 lines per order and per refund, quantity 1–1000 per line.
pub const MAX_LINES: usize = 50;
pub const MAX_QUANTITY: u32 = 1000;
/// Longest refund window an item may have (ten years).
pub const MAX_REFUND_WINDOW_DAYS: u32 = 3650;
/// Refunds one order may receive; each adds a history entry, so this bounds an order's size.
pub const MAX_REFUNDS_PER_ORDER: u32 = 100;
/// Items the catalog may hold: the catalog is copied into every shard and listed whole.
pub const MAX_CATALOG_ITEMS: u64 = 10_000;

/// `true` for 1–255 printable ASCII chars (no spaces at all, which PSP ids never contain).
pub fn is_valid_external_ref(text: &str) -> bool {
    (1..=MAX_EXTERNAL_REF_LEN).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic())
}

/// A player and the cache of their wallet. `balance` and `held` always equal the sums of the user's
/// postings; `0 ≤ held ≤ balance`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub user_id: String,
    pub display_name: Option<String>,
    pub created_at: Timestamp,
    pub balance: Money,
    pub held: Money,
    /// How many ledger entries the user has (the `seq` of the newest one).
    pub ledger_seq: u64,
}

/// Why and since when an account is frozen (a row of its own: `User` never changes shape). A frozen
/// account cannot spend, top up, consume or get tokens; it can still be read, refunded and credited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    pub reason: String,
    pub at: Timestamp,
}

/// Longest freeze reason.
pub const MAX_FREEZE_REASON_CHARS: usize = 500;

/// What a wallet shows at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletView {
    pub balance: Money,
    pub held: Money,
}

impl WalletView {
    /// `balance - held`. Exact for every wallet `apply` writes (`0 ≤ held ≤ balance`); a corrupt row
    /// saturates instead of wrapping, and the audit reports it.
    pub fn available(&self) -> Money {
        self.balance.saturating_sub(self.held)
    }
}

impl User {
    pub fn wallet(&self) -> WalletView {
        WalletView {
            balance: self.balance,
            held: self.held,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ItemKind {
    /// Non-consumable: at most one per user, refund revokes it.
    Game,
    /// Non-consumable: at most one per user, refund revokes it.
    Skin,
    /// Consumable and stackable: quantity n grants n units; a refund needs the units unspent.
    Currency,
}

impl ItemKind {
    pub fn is_consumable(self) -> bool {
        matches!(self, ItemKind::Currency)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::Game => "game",
            ItemKind::Skin => "skin",
            ItemKind::Currency => "currency",
        }
    }

    pub fn parse(text: &str) -> Option<ItemKind> {
        match text {
            "game" => Some(ItemKind::Game),
            "skin" => Some(ItemKind::Skin),
            "currency" => Some(ItemKind::Currency),
            _ => None,
        }
    }

    /// The most one order line may ask for.
    pub fn max_quantity(self) -> u32 {
        if self.is_consumable() {
            MAX_QUANTITY
        } else {
            1
        }
    }
}

/// What an admin says an item is; the catalog adds the version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemSpec {
    pub item_id: String,
    pub name: String,
    pub kind: ItemKind,
    pub price: Money,
    pub active: bool,
    pub refund_window_days: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub spec: ItemSpec,
    /// 1 on creation, +1 on every change; the same on every shard.
    pub version: u64,
    pub updated_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    Pending,
    Completed,
    Cancelled,
    PartiallyRefunded,
    Refunded,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Completed => "COMPLETED",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::PartiallyRefunded => "PARTIALLY_REFUNDED",
            OrderStatus::Refunded => "REFUNDED",
        }
    }

    pub fn parse(text: &str) -> Option<OrderStatus> {
        [
            OrderStatus::Pending,
            OrderStatus::Completed,
            OrderStatus::Cancelled,
            OrderStatus::PartiallyRefunded,
            OrderStatus::Refunded,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Was the order paid for (debited and granted)? Refunds are possible only then.
    pub fn was_completed(self) -> bool {
        matches!(
            self,
            OrderStatus::Completed | OrderStatus::PartiallyRefunded | OrderStatus::Refunded
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelReason {
    Expired,
    CancelledByClient,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Expired => "expired",
            CancelReason::CancelledByClient => "cancelled_by_client",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub status: OrderStatus,
    pub at: Timestamp,
    pub reason: Option<CancelReason>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub item_id: String,
    pub kind: ItemKind,
    pub quantity: u32,
    /// The price when the order was created: later catalog changes never touch it.
    pub unit_price: Money,
    pub refunded_quantity: u32,
    /// The item's refund window when the order was created.
    pub refund_window_days: u32,
}

impl OrderLine {
    /// `unit_price × quantity`. `apply` accepts a line only if this fits (checked there); a corrupt row
    /// saturates instead of wrapping, so the audit's sums show it.
    pub fn line_total(&self) -> Money {
        self.unit_price.saturating_mul(self.quantity)
    }

    pub fn refundable_quantity(&self) -> u32 {
        self.quantity.saturating_sub(self.refunded_quantity)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: Uuid,
    pub user_id: String,
    pub status: OrderStatus,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub refunded_total: Money,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub completed_at: Option<Timestamp>,
    pub refund_count: u32,
    pub history: Vec<HistoryEntry>,
}

impl Order {
    /// `true` if the order is PENDING and its deadline has passed at `now`: it is expired, whether or not
    /// the sweeper has written that down yet.
    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        self.status == OrderStatus::Pending && self.expires_at <= now
    }

    /// Cancels a pending order at its deadline. The cancellation is dated `expires_at`, not the time the
    /// sweeper got to it, so an order read before and after the sweep looks the same.
    pub fn cancel_as_expired(&mut self) {
        debug_assert_eq!(self.status, OrderStatus::Pending);
        self.transition(
            OrderStatus::Cancelled,
            self.expires_at,
            Some(CancelReason::Expired),
        );
    }

    /// The order as a reader at `now` must see it: an expired pending order is shown cancelled.
    pub fn as_of(&self, now: Timestamp) -> Order {
        let mut order = self.clone();
        if order.is_expired_at(now) {
            order.cancel_as_expired();
        }
        order
    }

    pub fn transition(&mut self, status: OrderStatus, at: Timestamp, reason: Option<CancelReason>) {
        self.status = status;
        self.history.push(HistoryEntry { status, at, reason });
    }

    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.history.last().and_then(|h| h.reason)
    }

    /// Status after refunds: REFUNDED once every unit is refunded, otherwise PARTIALLY_REFUNDED.
    pub fn status_after_refund(&self) -> OrderStatus {
        if self.lines.iter().all(|l| l.refunded_quantity == l.quantity) {
            OrderStatus::Refunded
        } else {
            OrderStatus::PartiallyRefunded
        }
    }
}

/// A user's holding of one item. `quantity = granted - revoked - consumed`, never negative; at most 1 for
/// games and skins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlement {
    pub item_id: String,
    pub kind: ItemKind,
    pub granted: u64,
    pub revoked: u64,
    pub consumed: u64,
    pub granted_at: Timestamp,
}

impl Entitlement {
    pub fn quantity(&self) -> u64 {
        self.granted
            .saturating_sub(self.revoked)
            .saturating_sub(self.consumed)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub credit_id: Uuid,
    pub user_id: String,
    pub amount: Money,
    pub external_ref: String,
    pub source: Option<String>,
    pub created_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopupStatus {
    Pending,
    Completed,
    Failed,
    Expired,
}

impl TopupStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TopupStatus::Pending => "PENDING",
            TopupStatus::Completed => "COMPLETED",
            TopupStatus::Failed => "FAILED",
            TopupStatus::Expired => "EXPIRED",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topup {
    pub topup_id: Uuid,
    pub user_id: String,
    pub amount: Money,
    pub status: TopupStatus,
    pub psp_payment_id: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub finished_at: Option<Timestamp>,
}

impl Topup {
    /// The top-up as a reader at `now` sees it: a pending top-up past its deadline is EXPIRED.
    pub fn as_of(&self, now: Timestamp) -> Topup {
        let mut topup = self.clone();
        if topup.status == TopupStatus::Pending && topup.expires_at <= now {
            topup.status = TopupStatus::Expired;
            topup.finished_at = Some(topup.expires_at);
        }
        topup
    }
}

/// Top-ups that became final (EXPIRED, FAILED) strictly before this time are purged by a sweep at `now`
/// with a retention of `retention_seconds`. Saturates: a retention longer than the epoch purges nothing.
pub fn topup_purge_bound(now: Timestamp, retention_seconds: u64) -> i64 {
    now.minus(std::time::Duration::from_secs(retention_seconds))
        .micros()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundLine {
    pub item_id: String,
    pub quantity: u32,
    pub amount: Money,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub refund_id: Uuid,
    pub order_id: Uuid,
    pub user_id: String,
    pub lines: Vec<RefundLine>,
    pub amount: Money,
    pub reason: Option<String>,
    pub forced: bool,
    pub created_at: Timestamp,
}

/// The accounts of the double-entry ledger. A wallet is two accounts: what the player can spend and what
/// pending orders hold. Money enters through `PspClearing` and leaves through `Revenue`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Account {
    Available(String),
    Held(String),
    PspClearing,
    Revenue,
    /// What players owe the shop (their debt, summed): money a reversal took back that their wallets no
    /// longer had.
    Receivable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PostingKind {
    /// psp_clearing → available (direct credit or completed top-up)
    Credit,
    /// available → held (order created)
    Hold,
    /// held → available (order cancelled or expired)
    Release,
    /// held → revenue (order completed)
    Debit,
    /// revenue → available (refund)
    Refund,
    /// available → psp_clearing (the money of a credit or top-up goes back: PSP refund, chargeback)
    Reversal,
    /// receivable → available (the part of a reversal the wallet did not have: now owed)
    Debt,
    /// available → receivable (a later credit pays the debt back)
    DebtRepaid,
}

impl PostingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PostingKind::Credit => "credit",
            PostingKind::Hold => "hold",
            PostingKind::Release => "release",
            PostingKind::Debit => "debit",
            PostingKind::Refund => "refund",
            PostingKind::Reversal => "reversal",
            PostingKind::Debt => "debt",
            PostingKind::DebtRepaid => "debt_repaid",
        }
    }

    /// The (debit, credit) accounts of a posting of this kind on `user`'s wallet.
    pub fn accounts(self, user: &str) -> (Account, Account) {
        let available = Account::Available(user.to_owned());
        let held = Account::Held(user.to_owned());
        match self {
            PostingKind::Credit => (Account::PspClearing, available),
            PostingKind::Hold => (available, held),
            PostingKind::Release => (held, available),
            PostingKind::Debit => (held, Account::Revenue),
            PostingKind::Refund => (Account::Revenue, available),
            PostingKind::Reversal => (available, Account::PspClearing),
            PostingKind::Debt => (Account::Receivable, available),
            PostingKind::DebtRepaid => (available, Account::Receivable),
        }
    }

    /// How a posting of this kind changes the system accounts' balances. In `i128`, where negating and
    /// adding any `i64` amount is exact; the caller narrows with a check.
    pub fn system_delta(self, amount: Money) -> SystemDelta {
        let a = i128::from(amount.minor());
        let (psp_clearing, revenue, receivable) = match self {
            PostingKind::Credit => (-a, 0, 0),
            PostingKind::Debit => (0, a, 0),
            PostingKind::Refund => (0, -a, 0),
            PostingKind::Hold | PostingKind::Release => (0, 0, 0),
            PostingKind::Reversal => (a, 0, 0),
            PostingKind::Debt => (0, 0, -a),
            PostingKind::DebtRepaid => (0, 0, a),
        };
        SystemDelta {
            psp_clearing,
            revenue,
            receivable,
        }
    }

    /// How a posting of this kind changes the wallet's (balance, held), in `i128` like `system_delta`.
    pub fn wallet_delta(self, amount: Money) -> (i128, i128) {
        let a = i128::from(amount.minor());
        match self {
            PostingKind::Credit | PostingKind::Refund | PostingKind::Debt => (a, 0),
            PostingKind::Hold => (0, a),
            PostingKind::Release => (0, -a),
            PostingKind::Debit => (-a, -a),
            PostingKind::Reversal | PostingKind::DebtRepaid => (-a, 0),
        }
    }

    /// How a posting of this kind changes the wallet's debt (what the player owes the shop).
    pub fn debt_delta(self, amount: Money) -> i128 {
        let a = i128::from(amount.minor());
        match self {
            PostingKind::Debt => a,
            PostingKind::DebtRepaid => -a,
            _ => 0,
        }
    }
}

/// How one posting changes the shard's system accounts (see [`PostingKind::system_delta`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemDelta {
    pub psp_clearing: i128,
    pub revenue: i128,
    pub receivable: i128,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PostingRef {
    Credit(Uuid),
    Topup(Uuid),
    Order(Uuid),
    Refund(Uuid),
    Reversal(Uuid),
    /// A dispute's hold and its release (the dispute's `record_id`).
    Dispute(Uuid),
}

impl PostingRef {
    pub fn kind_str(self) -> &'static str {
        match self {
            PostingRef::Credit(_) => "credit",
            PostingRef::Topup(_) => "topup",
            PostingRef::Order(_) => "order",
            PostingRef::Refund(_) => "refund",
            PostingRef::Reversal(_) => "reversal",
            PostingRef::Dispute(_) => "dispute",
        }
    }

    pub fn id(self) -> Uuid {
        match self {
            PostingRef::Credit(id)
            | PostingRef::Topup(id)
            | PostingRef::Order(id)
            | PostingRef::Refund(id)
            | PostingRef::Reversal(id)
            | PostingRef::Dispute(id) => id,
        }
    }
}

/// One money movement: `amount` leaves `debit` and enters `credit`. Every posting touches exactly one
/// user's wallet, and is also that user's ledger entry number `user_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    /// Position in the shard's chain of postings, from 1.
    pub seq: u64,
    pub entry_id: Uuid,
    pub user_id: String,
    pub user_seq: u64,
    pub kind: PostingKind,
    pub debit: Account,
    pub credit: Account,
    pub amount: Money,
    pub reference: PostingRef,
    pub at: Timestamp,
    pub balance_after: Money,
    pub held_after: Money,
    /// SHA-256 of the previous posting's stored bytes (zeros for the first): tampering breaks the chain.
    pub prev_hash: [u8; 32],
}
