//! The admin listener (`GATEWAY_ADMIN_LISTEN`, loopback by default): what operators and
//! monitoring read, kept off the public port: `/status` (counters, links) and `/ring` (the
//! ring in force, which local topics sit on which node).

use crate::Gateway;
use crate::cluster::directory::EMBEDDED_NODE;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// The admin endpoints.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/ring", get(ring_view))
        .with_state(gateway)
}

async fn status(State(g): State<Arc<Gateway>>) -> impl IntoResponse {
    let m = &g.metrics;
    let links: Vec<_> = g
        .cluster
        .links()
        .iter()
        .map(|l| json!({ "node": &**l.node(), "addr": l.addr(), "connected": l.is_connected() }))
        .collect();
    Json(json!({
        "gateway_id": g.config.gateway_id,
        "mode": if g.config.ring.is_some() { "ring" } else { "embedded" },
        "ring_version": g.cluster.version(),
        "ring_refused": g.ring_watch.as_ref().and_then(|w| w.refused()),
        "links": links,
        "connections": m.connections.load(Relaxed),
        "connections_total": m.connections_total.load(Relaxed),
        "subscriptions": g.index.subscription_count(),
        "topics": g.index.topic_count(),
        "joins": m.joins.load(Relaxed),
        "publishes": m.publishes.load(Relaxed),
        "deliveries_in": m.deliveries_in.load(Relaxed),
        "encodes": m.encodes.load(Relaxed),
        "frames_out": m.frames_out.load(Relaxed),
        "malformed_frames": m.malformed_frames.load(Relaxed),
        "refused_frames": m.refused_frames.load(Relaxed),
        "rate_limited": m.rate_limited.load(Relaxed),
        "oversized_frames": m.oversized_frames.load(Relaxed),
        "refused_connections": m.refused_connections.load(Relaxed),
        "slow_consumers": m.slow_consumers.load(Relaxed),
        "interrupted_channels": m.interrupted_channels.load(Relaxed),
        "gaps": m.gaps.load(Relaxed),
        "moves": m.moves.load(Relaxed),
    }))
}

/// `GET /ring`: the ring in force, the links, and which local topics sit on which node.
async fn ring_view(State(g): State<Arc<Gateway>>) -> impl IntoResponse {
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
