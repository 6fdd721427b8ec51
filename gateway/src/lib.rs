//! ringcast gateway: Phoenix Channels over websocket, each topic routed to its owner.
//!
//! Client side: `codec` is the pure wire format; `ws` the websocket upgrade and the frames
//! the gateway writes; `session` runs one connection; `conn` is its inbox; `index` is the
//! local `topic -> subscribers` fan-out and `feed` the frames each subscriber reads.
//! Cluster side (`cluster`): the directory of decisions (pure), the links to topic servers,
//! the driver task that owns the directory. `server` puts it all on the network: `http` the
//! public listener, `admin` the admin one; `limits` is what one client may cost; `config`
//! reads the environment.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod conn;
pub mod drain;
pub mod feed;
pub mod http;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod session;
pub mod ws;

pub use config::Config;

impl Gateway {
    pub fn is_draining(&self) -> bool {
        // The drain starts as soon as the shutdown is asked for.
        self.shutdown.is_cancelled()
    }
}
pub use server::{Listeners, run};

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

/// State shared by every connection of one gateway process.
#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    /// The topic servers: joins, publishes and unsubscribes go through it.
    pub cluster: Arc<cluster::Cluster>,
    /// The ring file watcher (ring mode): the ring in force and the last refused edit.
    pub ring_watch: Option<ringcast_ring::watcher::RingWatch>,
    pub index: Arc<index::LocalIndex>,
    pub metrics: Arc<metrics::Metrics>,
    pub next_sub: AtomicU64,
    pub next_conn: AtomicU64,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// Open connections: cut (1012) by a drain, or a user's by the backend API.
    pub conns: Arc<conn::Registry>,
    /// How often security events (clients closed for what they did) are logged.
    pub security_log: limits::LogLimit,
}
