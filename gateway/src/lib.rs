//! ringcast gateway: Phoenix Channels over websocket, each topic routed to its owner.
//!
//! `codec` is the pure wire format; `ws` the websocket upgrade and the frames the gateway
//! writes; `session` runs one connection; `conn` is its inbox; `index` is the local
//! `topic -> subscribers` fan-out and `feed` the frames each subscriber reads; `upstream`
//! keeps one stream per topic server (`link_runtime` says on which threads); `routing`
//! picks the link by the ring; `rebalance` follows ring edits; `server` puts it all on the
//! network; `config` reads the environment.

pub mod codec;
pub mod config;
pub mod conn;
pub mod feed;
pub mod index;
pub mod link_runtime;
pub mod metrics;
pub mod rebalance;
pub mod routing;
pub mod server;
pub mod session;
pub mod upstream;
pub mod ws;

pub use config::Config;
pub use server::run;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

/// State shared by every connection and link of one gateway process.
#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    pub routing: routing::Routing,
    /// The ring file watcher (ring mode): the ring in force and the last refused edit.
    pub ring_watch: Option<ringcast_ring::watcher::RingWatch>,
    pub index: Arc<index::LocalIndex>,
    pub metrics: Arc<metrics::Metrics>,
    /// What the upstream links share (index, metrics, ring).
    pub link_context: Arc<upstream::LinkContext>,
    /// Topics with a move to their new owner under way.
    pub moves: parking_lot::Mutex<std::collections::HashSet<String>>,
    pub next_sub: AtomicU64,
    pub next_conn: AtomicU64,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// Open connections, cut (1012) at shutdown.
    pub conns: conn::Registry,
}
