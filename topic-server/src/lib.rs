//! ringcast topic server: owns topics, orders their messages, fans out one batch per gateway.
//!
//! `registry` and `log` are the pure core (topics, offsets, subscribers by gateway, recent
//! messages), `handoff` the pure decisions of moving topics between servers, `ownership` the
//! rings in force; `service` runs gateway streams and handoffs around them; `server` puts it
//! on the network; `config` reads the environment.

pub mod config;
pub mod handoff;
pub mod log;
pub mod ownership;
mod peers;
pub mod presence;
pub mod process;
pub mod prom;
pub mod registry;
pub mod server;
pub mod service;
pub mod shards;

pub use config::Config;
pub use log::LogLimits;
pub use server::{Listeners, run};
pub use service::{Ownership, ServiceLimits, StatusSnapshot, TopicService};
