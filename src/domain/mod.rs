//! The domain: money, identifiers, time, the shop's records, commands and their outcomes.
//!
//! Nothing here knows about HTTP, redb or replication. `state` applies these commands to storage; `http`
//! turns requests into commands and outcomes into responses.
//!
//! # The persisted format
//!
//! `Envelope` with its `Command`, `Reply`, `Rejection` (an `Outcome`) and the records of `model` are
//! stored as their postcard bytes: they are the rows of every shard's redb file, the idempotency outcomes
//! stored there, and the entries of the Raft log, which replicas apply (and re-apply after a restart)
//! long after they were written. Postcard is positional and carries no names: an enum is its variant's
//! index, then the variant's fields in declaration order; a struct is its fields in order. So:
//!
//! - **New enum variants go at the end**; existing variants are never reordered, removed or changed.
//! - **Fields are never reordered, removed, retyped or added**, not even at the end: a row written before
//!   the field existed would no longer decode. A new field is a new variant (or a new record type).
//! - Anything else is a new format: bump `state::SCHEMA_VERSION` (a node then refuses files of the old
//!   one) and migrate.
//!
//! A new variant is understood only by nodes built with it: every node must run it before one proposes
//! the variant. `state::golden` pins the bytes of one value of every type and variant; a change that
//! moves them fails there.

pub mod command;
pub mod event;
pub mod ids;
pub mod limits;
pub mod model;
pub mod money;
pub mod outcome;
pub mod reversal;
pub mod time;

pub use command::{Command, Envelope, Fingerprint, IdempotencyTag, LineRequest, RefClaim};
pub use event::{Event, EventData, EventLog, EventType, Webhook};
pub use ids::{IdSeed, IdSequence};
pub use limits::{LimitChanges, LimitSet, LimitsInForce, Setting, ShopLimits};
pub use model::*;
pub use money::{AmountError, Currency, Money};
pub use outcome::{GlobalClaim, Outcome, Rejection, Reply};
pub use reversal::{Dispute, DisputeStatus, Reversal, ReversalReason, ReversalSource};
pub use time::Timestamp;
