//! shopkeep: the backend of a digital game shop. See ARCHITECTURE.md for the map.

pub mod cli;
pub mod config;
pub mod datadir;
pub mod domain;
pub mod engine;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod secrets;
pub mod server;
pub mod state;
