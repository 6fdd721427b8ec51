//! The admin listener (`GATEWAY_ADMIN_LISTEN`, loopback by default): what operators and
//! monitoring read, kept off the public port: `/status` (counters, links), `/metrics`
//! (the same, and histograms, for Prometheus), `/health/live` and `/health/ready` (for
//! orchestrators), and `/ring` (the ring in force, which local topics sit on which node).

use crate::Gateway;
use crate::cluster::directory::EMBEDDED_NODE;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ringcast_topic_server::prom::{self, Value};
use serde_json::json;
use std::sync::Arc;

#[derive(Clone)]
struct Admin {
    gateway: Arc<Gateway>,
    registry: Arc<prometheus_client::registry::Registry>,
}

/// The admin endpoints.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let mut registry = prom::registry("gateway");
    gateway.metrics.register(&mut registry);
    let values = gateway.clone();
    registry.register_collector(Box::new(prom::Values(move || values.values())));
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route(
            "/health/live",
            get(|| async { Json(json!({"live": true})) }),
        )
        .route("/health/ready", get(ready))
        .route("/ring", get(ring_view))
        .with_state(Admin {
            gateway,
            registry: Arc::new(registry),
        })
}

impl Gateway {
    /// Every number `/status` and `/metrics` show: the counters, and the gauges.
    pub fn values(&self) -> Vec<Value> {
        let links = self.cluster.links();
        let up = links.iter().filter(|l| l.is_connected()).count();
        let mut values = self.metrics.values();
        values.extend([
            Value::Gauge(
                "subscriptions",
                "Channels joined here now.",
                self.index.subscription_count() as i64,
            ),
            Value::Gauge(
                "topics",
                "Topics with a channel here now.",
                self.index.topic_count() as i64,
            ),
            Value::Gauge("links", "Links to topic servers.", links.len() as i64),
            Value::Gauge(
                "links_up",
                "Links to topic servers connected now.",
                up as i64,
            ),
            Value::Gauge(
                "ring_version",
                "The version of the ring in force.",
                self.cluster.version() as i64,
            ),
            Value::Gauge(
                "moving",
                "Topics moving to a new owner now.",
                self.cluster.moving() as i64,
            ),
            Value::Gauge(
                "draining",
                "1 while the gateway drains (after SIGTERM).",
                i64::from(self.is_draining()),
            ),
            prom::ring_refused(
                self.ring_watch
                    .as_ref()
                    .is_some_and(|w| w.refused().is_some()),
            ),
        ]);
        values
    }

    /// Why the gateway should not get traffic now (`None`: ready): draining, or not linked
    /// to every node of its ring.
    pub fn not_ready(&self) -> Option<String> {
        if self.is_draining() {
            return Some("draining".into());
        }
        let down: Vec<String> = self
            .cluster
            .links()
            .iter()
            .filter(|l| !l.is_connected())
            .map(|l| l.node().to_string())
            .collect();
        (!down.is_empty()).then(|| format!("no link to topic servers: {}", down.join(", ")))
    }
}

async fn status(State(a): State<Admin>) -> impl IntoResponse {
    let g = &a.gateway;
    let links: Vec<_> = g
        .cluster
        .links()
        .iter()
        .map(|l| json!({ "node": &**l.node(), "addr": l.addr(), "connected": l.is_connected() }))
        .collect();
    let mut status = json!({
        "gateway_id": g.config.gateway_id,
        "mode": if g.config.ring.is_some() { "ring" } else { "embedded" },
        "ring_refused": g.ring_watch.as_ref().and_then(|w| w.refused()),
        "links": links,
    });
    for value in g.values() {
        let (name, v) = match value {
            Value::Counter(name, _, v) => (name, json!(v)),
            Value::Gauge(name, _, v) => (name, json!(v)),
        };
        // `links` is the list above; its count is a metric only.
        if status.get(name).is_none() {
            status[name] = v;
        }
    }
    Json(status)
}

async fn metrics(State(a): State<Admin>) -> Response {
    prom::render(&a.registry)
}

async fn ready(State(a): State<Admin>) -> Response {
    prom::readiness(a.gateway.not_ready())
}

/// `GET /ring`: the ring in force, the links, and which local topics sit on which node.
async fn ring_view(State(a): State<Admin>) -> impl IntoResponse {
    let g = &a.gateway;
    let links = g.cluster.links();
    let (version, nodes) =
        match g.cluster.ring() {
            Some(ring) => {
                let nodes: Vec<_> = ring
                .nodes()
                .iter()
                .map(|n| {
                    let connected = links.iter().any(|l| **l.node() == *n.id && l.is_connected());
                    json!({"id": n.id, "addr": n.addr, "weight": n.weight, "connected": connected})
                })
                .collect();
                (ring.version(), nodes)
            }
            None => (0, vec![json!({"id": EMBEDDED_NODE, "connected": true})]),
        };
    Json(json!({
        "version": version,
        "refused": g.ring_watch.as_ref().and_then(|w| w.refused()),
        "nodes": nodes,
        "topics": g.index.topics_by_node(),
        "moving": g.cluster.moving(),
    }))
}
