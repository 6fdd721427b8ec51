//! Routing: which upstream link serves a topic, by the ring (or the embedded core).

use crate::upstream::UpstreamLink;
use arc_swap::ArcSwap;
use ringcast_ring::Ring;
use std::collections::HashMap;
use std::sync::Arc;

/// The gateway's view of the topic servers.
#[derive(Debug)]
pub enum Routing {
    /// No ring: the topic-server core runs in this process and owns every topic.
    Embedded(Arc<UpstreamLink>),
    /// Topics go to their owner under the ring; one link per node.
    Ring {
        ring: ArcSwap<Ring>,
        links: HashMap<String, Arc<UpstreamLink>>,
    },
}

impl Routing {
    /// The link to the owner of `topic`.
    pub fn route(&self, topic: &str) -> Option<Arc<UpstreamLink>> {
        match self {
            Routing::Embedded(link) => Some(link.clone()),
            Routing::Ring { ring, links } => links.get(&ring.load().owner(topic).id).cloned(),
        }
    }

    /// The link to node `node`, if it is known.
    pub fn link(&self, node: &str) -> Option<Arc<UpstreamLink>> {
        match self {
            Routing::Embedded(link) => (**link.node() == *node).then(|| link.clone()),
            Routing::Ring { links, .. } => links.get(node).cloned(),
        }
    }

    pub fn links(&self) -> Vec<Arc<UpstreamLink>> {
        match self {
            Routing::Embedded(link) => vec![link.clone()],
            Routing::Ring { links, .. } => {
                let mut all: Vec<_> = links.values().cloned().collect();
                all.sort_by(|a, b| a.node().cmp(b.node()));
                all
            }
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Routing::Embedded(_) => 0,
            Routing::Ring { ring, .. } => ring.load().version(),
        }
    }
}
