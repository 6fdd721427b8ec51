//! Which topics this server owns: the ring in force, and the rings before it (to know where
//! a topic that moved here was before).

use arc_swap::ArcSwap;
use ringcast_ring::{NodeSpec, Ring};
use std::sync::Arc;

/// Rings kept after they are replaced, to find a moved topic's previous owners.
const HISTORY: usize = 4;

/// Which topics this server owns.
#[derive(Debug)]
pub enum Ownership {
    /// Every topic: a single-node setup (the gateway's embedded core).
    All,
    /// The topics the ring places on `node_id`.
    Ring {
        node_id: String,
        rings: ArcSwap<RingHistory>,
    },
}

/// The ring in force and the ones it replaced, newest first.
#[derive(Debug)]
pub struct RingHistory {
    pub current: Arc<Ring>,
    pub previous: Vec<Arc<Ring>>,
}

impl Ownership {
    pub fn ring(node_id: String, ring: Ring) -> Self {
        Ownership::Ring {
            node_id,
            rings: ArcSwap::from_pointee(RingHistory {
                current: Arc::new(ring),
                previous: Vec::new(),
            }),
        }
    }

    pub fn node_id(&self) -> Option<&str> {
        match self {
            Ownership::All => None,
            Ownership::Ring { node_id, .. } => Some(node_id),
        }
    }

    pub fn owns(&self, topic: &str) -> bool {
        match self {
            Ownership::All => true,
            Ownership::Ring { node_id, rings, .. } => {
                rings.load().current.owner(topic).id == *node_id
            }
        }
    }

    /// Whether this node is in the ring in force (always, without a ring).
    pub fn in_ring(&self) -> bool {
        match self {
            Ownership::All => true,
            Ownership::Ring { node_id, rings } => rings
                .load()
                .current
                .nodes()
                .iter()
                .any(|n| n.id == *node_id),
        }
    }

    /// The ring version in force (0 when there is no ring).
    pub fn version(&self) -> u64 {
        match self {
            Ownership::All => 0,
            Ownership::Ring { rings, .. } => rings.load().current.version(),
        }
    }

    /// Swaps in a newer ring, keeping the replaced one in the history. Returns false (and
    /// changes nothing) unless `new` is newer.
    pub fn set_ring(&self, new: Arc<Ring>) -> bool {
        let Ownership::Ring { node_id, rings, .. } = self else {
            return false;
        };
        let old = rings.load_full();
        if new.version() <= old.current.version() {
            return false;
        }
        if new.node(node_id).is_none() {
            tracing::warn!(node = %node_id, version = new.version(), "this node is not in the new ring: it owns no topics and hands its topics over as their owners ask");
        }
        let mut previous = vec![old.current.clone()];
        previous.extend(old.previous.iter().take(HISTORY - 1).cloned());
        rings.store(Arc::new(RingHistory {
            current: new,
            previous,
        }));
        true
    }

    /// Where `topic` may still be held if it moved here: its distinct owners under the
    /// previous rings, newest first, other than this node. Empty when this node does not own
    /// it now or it never lived elsewhere as far as this node knows (gateways name where it
    /// was under their previous ring, for a node that started after the change).
    pub fn previous_owners(&self, topic: &str) -> Vec<NodeSpec> {
        let Ownership::Ring { node_id, rings } = self else {
            return Vec::new();
        };
        let rings = rings.load();
        if rings.current.owner(topic).id != *node_id {
            return Vec::new();
        }
        let mut owners: Vec<NodeSpec> = Vec::new();
        for ring in &rings.previous {
            let owner = ring.owner(topic);
            if owner.id != *node_id && !owners.iter().any(|o| o.id == owner.id) {
                owners.push(owner.clone());
            }
        }
        owners
    }

    /// This node's address under the ring in force.
    pub fn own_addr(&self) -> Option<String> {
        match self {
            Ownership::All => None,
            Ownership::Ring { node_id, rings, .. } => {
                rings.load().current.node(node_id).map(|n| n.addr.clone())
            }
        }
    }

    /// Whether `addr` is the address of a node of the ring in force or of one this node
    /// remembers: the only addresses it dials (a request's or a peer's word is not enough).
    pub fn knows_addr(&self, addr: &str) -> bool {
        let Ownership::Ring { rings, .. } = self else {
            return false;
        };
        let rings = rings.load();
        std::iter::once(&rings.current)
            .chain(&rings.previous)
            .any(|ring| ring.nodes().iter().any(|n| n.addr == addr))
    }

    /// The other nodes of the ring in force, but those in `except`.
    pub fn others(&self, except: &[NodeSpec]) -> Vec<NodeSpec> {
        let Ownership::Ring { node_id, rings, .. } = self else {
            return Vec::new();
        };
        let rings = rings.load();
        rings
            .current
            .nodes()
            .iter()
            .filter(|n| n.id != *node_id && !except.iter().any(|e| e.addr == n.addr))
            .cloned()
            .collect()
    }

    /// Topics of `topics` this node owns.
    pub fn count_owned<'a>(&self, topics: impl Iterator<Item = &'a str>) -> usize {
        match self {
            Ownership::All => topics.count(),
            Ownership::Ring { node_id, rings, .. } => {
                let ring = &rings.load().current;
                topics.filter(|t| ring.owner(t).id == *node_id).count()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(version: u64, nodes: &[&str]) -> Ring {
        let mut text = format!("version = {version}\n");
        for id in nodes {
            text.push_str(&format!("[[nodes]]\nid = \"{id}\"\naddr = \"{id}:1\"\n"));
        }
        Ring::from_toml(&text).unwrap()
    }

    #[test]
    fn previous_owners_follow_the_history_newest_first() {
        let own = Ownership::ring("c".into(), ring(1, &["a", "b"]));
        // "c" is not in ring 1: it owns nothing yet.
        assert!(!own.owns("t0"));
        assert!(own.set_ring(Arc::new(ring(2, &["a", "b", "c"]))));
        assert!(
            !own.set_ring(Arc::new(ring(2, &["c"]))),
            "never the same version twice"
        );
        let moved = (0..)
            .map(|n| format!("t{n}"))
            .find(|t| own.owns(t))
            .unwrap();
        let before = ring(1, &["a", "b"]).owner(&moved).id.clone();
        let owners: Vec<String> = own
            .previous_owners(&moved)
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(owners, [before]);
        assert!(own.set_ring(Arc::new(ring(3, &["c"]))));
        let owners: Vec<String> = own
            .previous_owners(&moved)
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(
            owners.len(),
            1,
            "ring 2 gave it to c already: only ring 1's owner is asked"
        );
    }
}
