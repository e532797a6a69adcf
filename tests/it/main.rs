// Test code may unwrap (a panic is a failed test) and does arithmetic on small counts and timestamps
// where the workspace's cast lints would only add noise; the service's code keeps them.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_lossless
)]

mod apply_untrusted;
mod backpressure;
mod backup;
mod chaos;
mod cli;
mod clock;
mod cluster;
mod cluster_harness;
mod concurrency;
mod corruption;
mod crash;
#[cfg(feature = "failpoints")]
mod crash_points;
mod deploy_script;
mod disk_eio;
mod disk_full;
mod edge;
mod events;
mod examples;
mod harness;
mod http_auth;
mod http_bad_input;
mod http_catalog;
mod http_contract;
mod http_credits;
mod http_entitlements;
mod http_freeze;
mod http_idempotency;
mod http_ledger;
mod http_limits;
mod http_ops;
mod http_orders;
mod http_refunds;
mod http_reversals;
mod http_topups;
mod http_users;
mod launcher;
mod leaders;
mod logs;
mod metrics;
mod node_stream;
mod outcome_unknown;
mod props;
mod raft_conformance;
mod reversals_cluster;
mod shop_model;
mod startup;
mod webhook_receiver;
mod webhooks;
mod webhooks_cluster;
