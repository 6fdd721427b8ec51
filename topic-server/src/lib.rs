//! ringcast topic server: owns topics, orders their messages, fans out one batch per gateway.
//!
//! `registry` and `log` are the pure core (topics, offsets, subscribers by gateway, recent
//! messages); `service` runs
//! gateway streams around it; `server` puts it on the network; `config` reads the environment.

pub mod config;
pub mod log;
pub mod ownership;
mod peers;
pub mod process;
pub mod registry;
pub mod server;
pub mod service;

pub use config::Config;
pub use log::LogLimits;
pub use server::run;
pub use service::{Ownership, ServiceLimits, StatusSnapshot, TopicService};
