//! Gateway counters and histograms: `GET /status` (JSON) and `GET /metrics` (Prometheus) on
//! the admin listener read the same values ([`Metrics::values`]).

use prometheus_client::metrics::histogram::Histogram;
use ringcast_topic_server::prom::{self, Value};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Debug)]
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
    /// Backend API calls answered, and refused (401, 400, 404, 503 ...).
    pub api_requests: AtomicU64,
    pub api_refused: AtomicU64,
    /// Connections closed by `POST /api/disconnect`, and by a drain.
    pub disconnected: AtomicU64,
    pub drained: AtomicU64,
    /// A join frame to its reply (ok or error).
    pub join_latency: Histogram,
    /// A client's publish frame to the owner's answer.
    pub publish_latency: Histogram,
    /// The owner's accept of a message to the socket write that carried it (the oldest
    /// message of each write; the owner's clock against this one's).
    pub delivery_latency: Histogram,
    /// Messages replayed to a recovering join.
    pub replay_messages: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: Default::default(),
            connections_total: Default::default(),
            joins: Default::default(),
            publishes: Default::default(),
            deliveries_in: Default::default(),
            frames_out: Default::default(),
            encodes: Default::default(),
            malformed_frames: Default::default(),
            refused_frames: Default::default(),
            rate_limited: Default::default(),
            oversized_frames: Default::default(),
            refused_connections: Default::default(),
            slow_consumers: Default::default(),
            interrupted_channels: Default::default(),
            gaps: Default::default(),
            moves: Default::default(),
            api_requests: Default::default(),
            api_refused: Default::default(),
            disconnected: Default::default(),
            drained: Default::default(),
            join_latency: prom::seconds_histogram(),
            publish_latency: prom::seconds_histogram(),
            delivery_latency: prom::seconds_histogram(),
            replay_messages: prom::count_histogram(),
        }
    }
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Every counter, and the connection gauge, as `/status` and `/metrics` show them.
    pub fn values(&self) -> Vec<Value> {
        let c = |name, help, counter: &AtomicU64| Value::Counter(name, help, counter.load(Relaxed));
        vec![
            Value::Gauge(
                "connections",
                "Websocket connections open now.",
                self.connections.load(Relaxed),
            ),
            c(
                "connections_accepted",
                "Websocket connections accepted.",
                &self.connections_total,
            ),
            c("joins", "Join frames received.", &self.joins),
            c(
                "publishes",
                "Client publishes sent to their topic's owner.",
                &self.publishes,
            ),
            c(
                "deliveries_in",
                "Deliveries received from topic servers (one per message per gateway).",
                &self.deliveries_in,
            ),
            c("encodes", "Delivery frames encoded.", &self.encodes),
            c("frames_out", "Frames queued to clients.", &self.frames_out),
            c(
                "malformed_frames",
                "Client frames that were not Phoenix messages.",
                &self.malformed_frames,
            ),
            c(
                "refused_frames",
                "Client frames refused with an error reply, or dropped.",
                &self.refused_frames,
            ),
            c(
                "rate_limited",
                "Client frames over their socket's frame or join rate.",
                &self.rate_limited,
            ),
            c(
                "oversized_frames",
                "Client messages over GATEWAY_MAX_FRAME_BYTES (closed 1009).",
                &self.oversized_frames,
            ),
            c(
                "refused_connections",
                "Connections refused before they became websockets.",
                &self.refused_connections,
            ),
            c(
                "slow_consumers",
                "Connections cut for reading too slowly (closed 1013).",
                &self.slow_consumers,
            ),
            c(
                "interrupted_channels",
                "Channels errored because their topic's stream was lost.",
                &self.interrupted_channels,
            ),
            c("gaps", "Gaps detected in a topic's stream.", &self.gaps),
            c(
                "moves",
                "Topics moved to a new owner without interrupting their channels.",
                &self.moves,
            ),
            c(
                "api_requests",
                "Backend API calls answered with success.",
                &self.api_requests,
            ),
            c(
                "api_refused",
                "Backend API calls answered with an error.",
                &self.api_refused,
            ),
            c(
                "disconnected",
                "Connections closed by POST /api/disconnect.",
                &self.disconnected,
            ),
            c(
                "drained",
                "Connections closed by a drain (SIGTERM).",
                &self.drained,
            ),
        ]
    }

    /// Registers the histograms in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let histograms = [
            (
                "join_latency_seconds",
                "A join frame to its reply.",
                &self.join_latency,
            ),
            (
                "publish_latency_seconds",
                "A client's publish frame to the owner's answer.",
                &self.publish_latency,
            ),
            (
                "delivery_latency_seconds",
                "The owner's accept of a message to the socket write that carried it.",
                &self.delivery_latency,
            ),
            (
                "replay_messages",
                "Messages replayed to a recovering join.",
                &self.replay_messages,
            ),
        ];
        for (name, help, histogram) in histograms {
            prom::register_histogram(registry, name, help, histogram);
        }
    }
}

/// Seconds since `since` (an `Instant`), for a histogram.
pub fn seconds_since(since: tokio::time::Instant) -> f64 {
    since.elapsed().as_secs_f64()
}
