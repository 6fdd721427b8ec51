//! What a gateway does when a new ring version arrives.
//!
//! Links follow the ring (new nodes connected, departed nodes dropped, their channels
//! interrupted as the links close). A local channel whose topic now belongs to another node
//! is interrupted too (`phx_error`, reason `topic moved`) and released at its old owner: its
//! client rejoins, at the new owner, with its position. Nothing is moved silently, so no
//! subscriber can miss a message without being told.

use crate::Gateway;
use crate::conn::ChannelEvent;
use crate::metrics::Metrics;
use crate::routing::Routing;
use ringcast_ring::Ring;
use std::sync::Arc;
use tokio::sync::watch;

/// Applies every ring the watcher publishes until it stops.
pub async fn follow(gateway: Arc<Gateway>, mut rings: watch::Receiver<Arc<Ring>>) {
    while rings.changed().await.is_ok() {
        let ring = rings.borrow_and_update().clone();
        apply(&gateway, ring);
    }
}

/// Swaps in `ring` and interrupts the channels whose topic changed owner.
pub fn apply(gateway: &Gateway, ring: Arc<Ring>) {
    let Routing::Ring(routing) = &gateway.routing else {
        return;
    };
    let old = routing.apply(ring.clone());
    let moved = gateway
        .index
        .remove_where(|topic, node| ring.node(node).is_some() && ring.owner(topic).id != node);
    tracing::info!(
        from = old.version(),
        to = ring.version(),
        moved_channels = moved.len(),
        "gateway on new ring"
    );
    Metrics::add(&gateway.metrics.interrupted_channels, moved.len() as u64);
    for (topic, entry) in moved {
        if let Some(link) = gateway.routing.link(&entry.node) {
            link.unsubscribe(&topic, entry.sub);
        }
        entry.conn.send(
            ChannelEvent::Interrupted {
                topic,
                sub: entry.sub,
                reason: "topic moved",
            }
            .into(),
        );
    }
}
