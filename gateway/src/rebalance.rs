//! What a gateway does when the ring changes: it moves its topics to their new owners.
//!
//! Every local topic is one feed attached at one topic server. When a new ring gives a topic
//! to another node, the gateway sends that node one `Move` with the topic's local subscribers
//! and the position of the last message it delivered; the new owner fetches the topic from
//! the old one (same epoch, numbering continued), replays whatever came after that position,
//! and from then on delivers here. Then the gateway releases the subscribers at the old node.
//! Clients see nothing. Only if the numbering cannot continue (the old owner was lost) are
//! the channels interrupted (`phx_error`), and they rejoin.
//!
//! Requests a topic server refuses as not its own (`WrongOwner`, ring versions out of step)
//! are sent again once the ring catches up, with backoff, for up to [`RETRY_FOR`].

use crate::Gateway;
use crate::routing::Routing;
use crate::upstream::{Pending, UpstreamLink};
use ringcast_ring::Ring;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a refused or undeliverable request is tried again before the client is told.
pub const RETRY_FOR: Duration = Duration::from_secs(10);

/// Applies every ring the watcher publishes until it stops.
pub async fn follow(gateway: Arc<Gateway>, mut rings: watch::Receiver<Arc<Ring>>) {
    while rings.changed().await.is_ok() {
        let ring = rings.borrow_and_update().clone();
        apply(&gateway, ring);
    }
}

/// Swaps in `ring`, moves every local topic whose owner changed, and closes the links of
/// departed nodes once nothing is attached there any more.
pub fn apply(gateway: &Arc<Gateway>, ring: Arc<Ring>) {
    let Routing::Ring(routing) = &gateway.routing else {
        return;
    };
    let (old, departed) = routing.apply(ring.clone());
    let mut moving = 0;
    for (topic, node, subs) in gateway.index.feeds() {
        if ring.owner(&topic).id != *node {
            moving += 1;
            start_move(gateway, &topic, &node, subs);
        }
    }
    tracing::info!(
        from = old.version(),
        to = ring.version(),
        moving,
        "gateway on new ring"
    );
    for link in departed {
        tokio::spawn(drain(gateway.clone(), link));
    }
}

/// Moves `subs` of `topic` (attached at `from_node`) to the topic's owner, unless a move of
/// the topic is already under way.
pub fn start_move(gateway: &Arc<Gateway>, topic: &str, from_node: &Arc<str>, subs: Vec<u64>) {
    let Some((node, from)) = gateway.index.feed(topic) else {
        return;
    };
    if node != *from_node || !gateway.moves.lock().insert(topic.to_owned()) {
        return;
    }
    let pending = Pending::Move {
        topic: topic.to_owned(),
        subs,
        from_node: from_node.clone(),
        from,
        replay: Vec::new(),
    };
    if let Err(pending) = dispatch(gateway, pending) {
        retry(gateway.clone(), pending, 0);
    }
}

/// Releases the subscribers of a moved topic at the node they came from.
pub fn release(gateway: &Gateway, topic: &str, from: &str, to: &str, subs: &[u64]) {
    if from == to {
        return;
    }
    if let Some(link) = gateway.routing.link(from) {
        for sub in subs {
            link.unsubscribe(topic, *sub);
        }
    }
}

/// Node `node` handed `topic` to its owner under ring `version`: the subscriptions there are
/// gone. If this gateway's ring already places the topic elsewhere, its own move covers it;
/// otherwise the feed follows the topic as soon as the ring allows, or is interrupted.
pub fn handed_off(gateway: &Arc<Gateway>, node: &Arc<str>, topic: String, version: u64) {
    let feed_there = || {
        gateway
            .index
            .feed(&topic)
            .is_some_and(|(at, _)| at == *node)
    };
    if !feed_there() {
        return;
    }
    let gateway = gateway.clone();
    let node = node.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + RETRY_FOR;
        // Wait for the ring that moved it (a no-op when this gateway already has it).
        while gateway.routing.version() < version && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some((at, _)) = gateway.index.feed(&topic) else {
            return;
        };
        if at != node || gateway.moves.lock().contains(&topic) {
            return;
        }
        if gateway.routing.version() >= version {
            // Re-attach the feed wherever the ring puts the topic now (even the same node:
            // it fetches the topic back and continues the numbering).
            let subs = gateway.index.subs(&topic);
            start_move(&gateway, &topic, &node, subs);
        } else if let Some((node, subs)) = gateway.index.remove_topic(&topic) {
            tracing::warn!(%topic, version, "topic moved under a ring this gateway has not read: interrupting its channels");
            gateway
                .link_context
                .interrupt(&topic, node, subs, "topic moved");
        }
    });
}

/// Sends `pending` to the node its topic goes to now: the topic's feed for a join (so that
/// all of a topic's subscribers here share one stream), the ring's owner otherwise.
#[allow(clippy::result_large_err)] // the request is handed back to be retried, not boxed
pub fn dispatch(gateway: &Gateway, pending: Pending) -> Result<(), Pending> {
    let topic = pending.topic();
    let target = match &pending {
        Pending::Join { .. } => match gateway.index.feed(topic) {
            Some((node, _)) => gateway.routing.link(&node),
            None => gateway.routing.route(topic),
        },
        _ => gateway.routing.route(topic),
    };
    let pending = match pending {
        Pending::Move {
            topic,
            subs,
            from_node,
            replay,
            ..
        } => {
            // From wherever the feed is now.
            let Some((node, from)) = gateway.index.feed(&topic) else {
                gateway.moves.lock().remove(&topic);
                return Ok(());
            };
            if node != from_node {
                gateway.moves.lock().remove(&topic);
                return Ok(());
            }
            Pending::Move {
                topic,
                subs,
                from_node,
                from,
                replay,
            }
        }
        other => other,
    };
    match target {
        Some(link) => link.request(pending),
        None => Err(pending),
    }
}

/// Tries `pending` again with backoff once this gateway's ring is at least `wanted_version`,
/// for up to [`RETRY_FOR`]; then the client is told `unavailable`.
pub fn retry(gateway: Arc<Gateway>, pending: Pending, wanted_version: u64) {
    tokio::spawn(async move {
        let deadline = Instant::now() + RETRY_FOR;
        let mut pending = pending;
        for attempt in 0u32.. {
            tokio::time::sleep(backoff(attempt)).await;
            let expired = Instant::now() >= deadline || gateway.shutdown.is_cancelled();
            if expired {
                break;
            }
            if gateway.routing.version() < wanted_version {
                continue;
            }
            match dispatch(&gateway, pending) {
                Ok(()) => return,
                Err(p) => pending = p,
            }
        }
        if let Pending::Move { topic, .. } = &pending {
            gateway.moves.lock().remove(topic);
        }
        pending.fail(&gateway.link_context, "unavailable");
    });
}

/// Closes a departed node's link once no feed is attached there (all moved), or after
/// [`RETRY_FOR`].
async fn drain(gateway: Arc<Gateway>, link: Arc<UpstreamLink>) {
    let deadline = Instant::now() + RETRY_FOR;
    while gateway.index.has_node(link.node()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(node = %link.node(), "node left the ring: link closed");
    link.stop();
}

/// 50 ms doubling to 1 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(1000))
}
