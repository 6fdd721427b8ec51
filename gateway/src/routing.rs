//! Routing: which upstream link serves a topic, by the ring (or the embedded core), and what
//! changes when a new ring version arrives.

use crate::upstream::{Connector, LinkContext, UpstreamLink};
use arc_swap::ArcSwap;
use ringcast_ring::{NodeSpec, Ring};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The gateway's view of the topic servers.
#[derive(Debug)]
pub enum Routing {
    /// No ring: the topic-server core runs in this process and owns every topic.
    Embedded(Arc<UpstreamLink>),
    /// Topics go to their owner under the ring; one link per node.
    Ring(RingRouting),
}

/// Links to the nodes of the ring in force, swapped as a whole when the ring changes.
#[derive(Debug)]
pub struct RingRouting {
    ring: Arc<ArcSwap<Ring>>,
    links: ArcSwap<HashMap<String, Arc<UpstreamLink>>>,
    factory: LinkFactory,
}

/// Starts links to topic servers.
#[derive(Debug)]
pub struct LinkFactory {
    pub ctx: Arc<LinkContext>,
    pub keepalive: Duration,
    pub max_message_bytes: usize,
    /// Parent of every link's stop token.
    pub stop: CancellationToken,
    pub tasks: TaskTracker,
    /// Where link tasks run.
    pub runtime: tokio::runtime::Handle,
}

impl LinkFactory {
    fn start(&self, node: &NodeSpec) -> Arc<UpstreamLink> {
        let connector = Connector::Grpc {
            addr: node.addr.clone(),
            keepalive: self.keepalive,
            max_message_bytes: self.max_message_bytes,
        };
        let link = UpstreamLink::new(
            node.id.as_str().into(),
            connector,
            self.ctx.clone(),
            self.stop.child_token(),
        );
        self.tasks.spawn_on(link.clone().run(), &self.runtime);
        link
    }
}

/// How the links must change between two rings: nodes to connect, and nodes to drop (gone,
/// or moved to another address: those are in both lists).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkPlan {
    pub add: Vec<NodeSpec>,
    pub remove: Vec<String>,
}

impl LinkPlan {
    pub fn between(old: &Ring, new: &Ring) -> LinkPlan {
        let mut plan = LinkPlan::default();
        for node in new.nodes() {
            match old.node(&node.id) {
                Some(was) if was.addr == node.addr => {}
                Some(_) => {
                    plan.remove.push(node.id.clone());
                    plan.add.push(node.clone());
                }
                None => plan.add.push(node.clone()),
            }
        }
        for node in old.nodes() {
            if new.node(&node.id).is_none() {
                plan.remove.push(node.id.clone());
            }
        }
        plan
    }
}

impl RingRouting {
    /// Connects to every node of `ring`. `ring` is shared with the links, which check on
    /// every join they complete that their node still owns the topic.
    pub fn start(ring: Arc<ArcSwap<Ring>>, factory: LinkFactory) -> RingRouting {
        let links = ring
            .load()
            .nodes()
            .iter()
            .map(|node| (node.id.clone(), factory.start(node)))
            .collect();
        RingRouting {
            ring,
            links: ArcSwap::from_pointee(links),
            factory,
        }
    }

    /// Swaps in `ring` and connects new nodes. Returns the ring it replaced and the links of
    /// nodes that left (or changed address), for the caller to close once their topics moved.
    pub fn apply(&self, ring: Arc<Ring>) -> (Arc<Ring>, Vec<Arc<UpstreamLink>>) {
        let old = self.ring.load_full();
        let plan = LinkPlan::between(&old, &ring);
        let mut links = HashMap::clone(&self.links.load());
        let removed: Vec<_> = plan
            .remove
            .iter()
            .filter_map(|id| links.remove(id))
            .collect();
        for node in &plan.add {
            links.insert(node.id.clone(), self.factory.start(node));
        }
        self.factory
            .ctx
            .ring_version
            .store(ring.version(), std::sync::atomic::Ordering::Relaxed);
        // Links first: a topic routed by the new ring always finds its node's link.
        self.links.store(Arc::new(links));
        self.factory.ctx.previous_ring.store(Some(old.clone()));
        self.ring.store(ring);
        (old, removed)
    }

    pub fn ring(&self) -> Arc<Ring> {
        self.ring.load_full()
    }
}

impl Routing {
    /// The link to the owner of `topic`.
    pub fn route(&self, topic: &str) -> Option<Arc<UpstreamLink>> {
        match self {
            Routing::Embedded(link) => Some(link.clone()),
            Routing::Ring(r) => r.links.load().get(&r.ring.load().owner(topic).id).cloned(),
        }
    }

    /// The link to node `node`, if it is known.
    pub fn link(&self, node: &str) -> Option<Arc<UpstreamLink>> {
        match self {
            Routing::Embedded(link) => (**link.node() == *node).then(|| link.clone()),
            Routing::Ring(r) => r.links.load().get(node).cloned(),
        }
    }

    pub fn links(&self) -> Vec<Arc<UpstreamLink>> {
        match self {
            Routing::Embedded(link) => vec![link.clone()],
            Routing::Ring(r) => {
                let mut all: Vec<_> = r.links.load().values().cloned().collect();
                all.sort_by(|a, b| a.node().cmp(b.node()));
                all
            }
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Routing::Embedded(_) => 0,
            Routing::Ring(r) => r.ring.load().version(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(version: u64, nodes: &[(&str, &str)]) -> Ring {
        let mut text = format!("version = {version}\n");
        for (id, addr) in nodes {
            text.push_str(&format!("[[nodes]]\nid = \"{id}\"\naddr = \"{addr}\"\n"));
        }
        Ring::from_toml(&text).unwrap()
    }

    #[test]
    fn link_plan_connects_new_nodes_and_drops_gone_or_moved_ones() {
        let old = ring(1, &[("a", "h:1"), ("b", "h:2"), ("c", "h:3")]);
        let new = ring(2, &[("a", "h:1"), ("b", "h:9"), ("d", "h:4")]);
        let plan = LinkPlan::between(&old, &new);
        let added: Vec<&str> = plan.add.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(added, ["b", "d"]);
        assert_eq!(plan.remove, ["b", "c"]);
        assert_eq!(LinkPlan::between(&new, &new), LinkPlan::default());
    }
}
