//! The domain: money, identifiers, time, the shop's records, commands and their outcomes.
//!
//! Nothing here knows about HTTP, redb or replication. `state` applies these commands to storage; `http`
//! turns requests into commands and outcomes into responses.

pub mod command;
pub mod ids;
pub mod model;
pub mod money;
pub mod outcome;
pub mod time;

pub use command::{Command, Envelope, Fingerprint, IdempotencyTag, LineRequest, RefClaim};
pub use ids::{IdSeed, IdSequence};
pub use model::*;
pub use money::{AmountError, Currency, Money};
pub use outcome::{GlobalClaim, Outcome, Rejection, Reply};
pub use time::Timestamp;
