//! The ring in force and the one before it, as the links and sessions read them (the driver
//! writes them): who owns a topic now, and where a topic that moved may still be.

use ringcast_ring::Ring;
use std::sync::Arc;

/// The ring in force and the one before it, as links and sessions read them.
#[derive(Debug, Default)]
pub struct Rings {
    /// `None`: no ring, the embedded core serves every topic.
    pub current: Option<Arc<Ring>>,
    pub previous: Option<Arc<Ring>>,
}

impl Rings {
    /// The version in force (0 without a ring).
    pub fn version(&self) -> u64 {
        self.current.as_ref().map_or(0, |r| r.version())
    }

    /// Whether `node` owns `topic` under the ring in force (always, without a ring).
    pub fn owns(&self, node: &str, topic: &str) -> bool {
        self.current
            .as_ref()
            .is_none_or(|ring| ring.owner(topic).id == node)
    }

    /// Where `topic` may still be if it moved to `node`: its owner under the previous ring,
    /// when that is another node.
    pub fn previous_owner_addr(&self, topic: &str, node: &str) -> Option<String> {
        let owner = self.previous.as_ref()?.owner(topic);
        (owner.id != node).then(|| owner.addr.clone())
    }

    /// The address of node `id` under the ring in force or the previous one.
    pub fn addr_of(&self, id: &str) -> Option<String> {
        [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find_map(|ring| ring.node(id).map(|n| n.addr.clone()))
    }
}
