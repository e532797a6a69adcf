//! Webhook delivery's building blocks, free of the shop's state: which targets are allowed
//! (`allow`, `--webhook-allow-hosts`), how requests are signed (`sign`, Standard Webhooks), one POST
//! attempt pinned to the checked addresses (`deliver`), and the retry schedule (`backoff`).
//!
//! The outbox (which events a webhook has not acknowledged, the replicated position) lives in `state`;
//! the delivery loop on each shard's leader strings these together: resolve and check the URL, sign,
//! post, and on failure wait `backoff::next_delay` before trying the same event again.

pub mod allow;
pub mod backoff;
pub mod deliver;
pub mod sign;
