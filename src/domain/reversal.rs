//! Money going back out: reversals of credits and top-ups (a PSP refund, a lost chargeback) and the
//! disputes that may end in one, with the rules that belong to a single record.
//!
//! A reversal never makes a balance negative: what the wallet cannot give becomes **debt**, a receivable
//! the player owes the shop, repaid first by later credits. These records are stored as postcard bytes:
//! the rules of the persisted format (`crate::domain`) hold for every type here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::money::Money;
use super::time::Timestamp;

/// Most reversals one credit or top-up may receive (each is a row; this bounds the scan of its total).
pub const MAX_REVERSALS_PER_SOURCE: u32 = 100;
/// Most disputes one user may have, open or closed (each is a row on the user's shard).
pub const MAX_DISPUTES_PER_USER: u32 = 100;
/// Most orders one reversal refunds with `--on-reversal revoke`; what they do not cover becomes debt.
pub const MAX_REVOKED_ORDERS: usize = 50;
/// The reason of the freeze a reversal puts on an account it leaves in debt. Only a freeze with this
/// reason is lifted when the debt is repaid; a freeze an operator made stays.
pub const DEBT_FREEZE_REASON: &str = "debt_outstanding";

/// The longest reversal `external_ref`: a client's is at most 255 characters like every external reference,
/// the shop's own add a prefix to a PSP's (`psp:<event_id>`, `dispute:<dispute_id>`).
pub const MAX_REVERSAL_REF_LEN: usize = 300;

/// `true` for 1–300 printable ASCII characters without spaces.
pub fn is_valid_reversal_ref(text: &str) -> bool {
    (1..=MAX_REVERSAL_REF_LEN).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic())
}

/// What money a reversal takes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReversalSource {
    /// A direct credit (stored under its `external_ref`).
    Credit {
        credit_id: Uuid,
        external_ref: String,
    },
    /// A completed top-up.
    Topup { topup_id: Uuid },
}

impl ReversalSource {
    /// The id of the credit or top-up: reversals are indexed under it.
    pub fn id(&self) -> Uuid {
        match self {
            ReversalSource::Credit { credit_id, .. } => *credit_id,
            ReversalSource::Topup { topup_id } => *topup_id,
        }
    }

    pub fn kind_str(&self) -> &'static str {
        match self {
            ReversalSource::Credit { .. } => "credit",
            ReversalSource::Topup { .. } => "topup",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReversalReason {
    PspRefund,
    Chargeback,
}

impl ReversalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReversalReason::PspRefund => "psp_refund",
            ReversalReason::Chargeback => "chargeback",
        }
    }

    pub fn parse(text: &str) -> Option<ReversalReason> {
        [ReversalReason::PspRefund, ReversalReason::Chargeback]
            .into_iter()
            .find(|r| r.as_str() == text)
    }
}

/// One reversal, and how it was covered: `from_hold + from_wallet + debt = amount`, where `from_wallet`
/// includes what the refunds of `revoked_refunds` brought back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reversal {
    pub reversal_id: Uuid,
    pub user_id: String,
    pub source: ReversalSource,
    pub amount: Money,
    pub reason: ReversalReason,
    /// Unique per source: the game backend's reference, or the PSP event (`psp:<event_id>`) or dispute
    /// (`dispute:<dispute_id>`) it came from.
    pub external_ref: String,
    /// Taken from a lost dispute's hold.
    pub from_hold: Money,
    /// Taken from the wallet's available credit.
    pub from_wallet: Money,
    /// What the wallet could not give: now owed.
    pub debt: Money,
    /// The refunds `--on-reversal revoke` made first, newest purchase first, and their total.
    pub revoked_refunds: Vec<Uuid>,
    pub revoked_amount: Money,
    pub created_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisputeStatus {
    Open,
    Won,
    Lost,
}

impl DisputeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DisputeStatus::Open => "OPEN",
            DisputeStatus::Won => "WON",
            DisputeStatus::Lost => "LOST",
        }
    }
}

/// A card holder's dispute of a top-up, as the PSP reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispute {
    /// Ours: what the dispute's hold postings refer to.
    pub record_id: Uuid,
    /// The PSP's.
    pub dispute_id: String,
    pub user_id: String,
    pub topup_id: Uuid,
    pub amount: Money,
    /// What is held now: `min(amount, available)` when opened, 0 once closed.
    pub held: Money,
    pub status: DisputeStatus,
    pub opened_at: Timestamp,
    pub closed_at: Option<Timestamp>,
    /// The reversal a lost dispute became.
    pub reversal_id: Option<Uuid>,
}
