//! Gateway counters, exposed on `GET /status`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicI64,
    pub connections_total: AtomicU64,
    pub joins: AtomicU64,
    pub publishes: AtomicU64,
    /// Deliveries received from topic servers (one per message per gateway).
    pub deliveries_in: AtomicU64,
    /// Frames queued to clients.
    pub frames_out: AtomicU64,
    /// Delivery frames encoded (once per distinct join_ref per message).
    pub encodes: AtomicU64,
    pub malformed_frames: AtomicU64,
    /// Client frames refused with an error reply (malformed ones included) or dropped.
    pub refused_frames: AtomicU64,
    /// Client frames over the socket's frame or join rate.
    pub rate_limited: AtomicU64,
    /// Client messages over `GATEWAY_MAX_FRAME_BYTES` (the socket was closed, 1009).
    pub oversized_frames: AtomicU64,
    /// Connections closed before they became websockets: too many pending, too many from
    /// one address, or no request in time.
    pub refused_connections: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub interrupted_channels: AtomicU64,
    /// Gaps detected in a topic's stream (an offset jump or a new epoch).
    pub gaps: AtomicU64,
    /// Topics moved to a new owner without interrupting their channels.
    pub moves: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}
