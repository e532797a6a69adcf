//! Webhooks: their management (`admin`: PUT, DELETE, replay, status over every shard) and their delivery
//! by each shard's leader (`worker`), built from blocks free of the shop's state: which targets are
//! allowed (`allow`, `--webhook-allow-hosts`), how requests are signed (`sign`, Standard Webhooks), one
//! POST attempt pinned to the checked addresses (`deliver`), and the retry schedule (`backoff`).
//!
//! The outbox and each webhook's replicated position live in `state` (`state/apply/events.rs`,
//! `state/apply/webhooks.rs`).

pub mod admin;
pub mod allow;
pub mod backoff;
pub mod deliver;
pub mod sign;
pub mod worker;
