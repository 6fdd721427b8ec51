//! Placement: the consistent-hash ring built from a [`RingConfig`].
//!
//! Every process, on every machine and toolchain, computes the same owner for the same
//! topic: the ring hashes explicitly defined bytes with SipHash-2-4 (zero keys, the
//! `hashring` crate's default), never std's unspecified `Hash` encodings of `str`/`usize`.

use crate::config::{ConfigError, NodeSpec, RingConfig};
use hashring::HashRing;
use std::hash::{Hash, Hasher};

/// One virtual node: `weight * vnodes` of these per topic server.
#[derive(Debug, Clone)]
struct VirtualNode {
    /// Index into [`Ring::nodes`].
    node: usize,
    /// The node id, copied so that hashing needs no access to the ring.
    id: String,
    replica: u32,
}

impl Hash for VirtualNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Defined bytes: id, a separator no id may contain, replica as little-endian u32.
        state.write(self.id.as_bytes());
        state.write(&[0xff]);
        state.write(&self.replica.to_le_bytes());
    }
}

/// A topic name as the ring hashes it: its UTF-8 bytes, nothing else.
struct TopicKey<'a>(&'a str);

impl Hash for TopicKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// The ring of one config version: `owner(topic)` for every topic.
#[derive(Clone)]
pub struct Ring {
    config: RingConfig,
    ring: HashRing<VirtualNode>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("version", &self.config.version)
            .field("nodes", &self.config.nodes)
            .finish()
    }
}

impl Ring {
    /// Builds the ring of a validated config.
    pub fn new(config: RingConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut ring = HashRing::new();
        ring.batch_add(virtual_nodes(&config).collect());
        Ok(Ring { config, ring })
    }

    /// Parses a TOML ring config and builds its ring.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ring::new(RingConfig::from_toml(text)?)
    }

    /// The config version this ring was built from.
    pub fn version(&self) -> u64 {
        self.config.version
    }

    /// The config this ring was built from.
    pub fn config(&self) -> &RingConfig {
        &self.config
    }

    /// The topic servers of this ring, in config order.
    pub fn nodes(&self) -> &[NodeSpec] {
        &self.config.nodes
    }

    /// The node with this id, if it is part of the ring.
    pub fn node(&self, id: &str) -> Option<&NodeSpec> {
        self.config.nodes.iter().find(|n| n.id == id)
    }

    /// The topic server that owns `topic`.
    pub fn owner(&self, topic: &str) -> &NodeSpec {
        let vnode = self
            .ring
            .get(&TopicKey(topic))
            .expect("a validated ring has nodes");
        &self.config.nodes[vnode.node]
    }

    /// Every point of the ring as (hash, node index), sorted: the arcs that [`crate::RingDiff`]
    /// measures. A point owns the keys from the previous point (exclusive) up to itself.
    pub(crate) fn points(&self) -> Vec<(u64, usize)> {
        let builder = hashring::DefaultHashBuilder;
        let mut points: Vec<(u64, usize)> = virtual_nodes(&self.config)
            .map(|v| (std::hash::BuildHasher::hash_one(&builder, &v), v.node))
            .collect();
        points.sort_unstable();
        points
    }
}

fn virtual_nodes(config: &RingConfig) -> impl Iterator<Item = VirtualNode> + '_ {
    config
        .nodes
        .iter()
        .enumerate()
        .flat_map(move |(index, node)| {
            (0..node.weight * config.vnodes).map(move |replica| VirtualNode {
                node: index,
                id: node.id.clone(),
                replica,
            })
        })
}

/// A ring of `(id, weight)` nodes with the default vnodes, for tests.
#[cfg(test)]
pub(crate) fn test_ring(version: u64, nodes: &[(&str, u32)]) -> Ring {
    let nodes = nodes
        .iter()
        .enumerate()
        .map(|(i, (id, weight))| NodeSpec {
            id: (*id).to_owned(),
            addr: format!("127.0.0.1:{}", 7001 + i),
            weight: *weight,
        })
        .collect();
    let vnodes = crate::config::DEFAULT_VNODES;
    Ring::new(RingConfig {
        version,
        vnodes,
        nodes,
    })
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::test_ring as ring;
    use super::*;
    use std::collections::HashMap;

    /// Pinned placements: if this test fails, placement changed and every deployed
    /// cluster would move topics on upgrade. Never update these vectors casually.
    #[test]
    fn known_topic_owner_vectors() {
        let r = ring(1, &[("ts-a", 1), ("ts-b", 1), ("ts-c", 1)]);
        let owners: Vec<(&str, &str)> = [
            "topics:matrix",
            "room:lobby",
            "room:1",
            "room:2",
            "user:42",
            "",
            "ünïcödé",
            "a-very-long-topic-name-with-many-segments:and:colons:1234567890",
        ]
        .iter()
        .map(|t| (*t, r.owner(t).id.as_str()))
        .collect();
        assert_eq!(owners, PINNED);
    }

    const PINNED: &[(&str, &str)] = &[
        ("topics:matrix", "ts-c"),
        ("room:lobby", "ts-c"),
        ("room:1", "ts-a"),
        ("room:2", "ts-b"),
        ("user:42", "ts-c"),
        ("", "ts-c"),
        ("ünïcödé", "ts-c"),
        (
            "a-very-long-topic-name-with-many-segments:and:colons:1234567890",
            "ts-a",
        ),
    ];

    #[test]
    fn placement_ignores_node_order_and_addresses() {
        let a = ring(1, &[("ts-a", 1), ("ts-b", 1), ("ts-c", 1)]);
        let mut config = a.config().clone();
        config.nodes.reverse();
        for (i, n) in config.nodes.iter_mut().enumerate() {
            n.addr = format!("10.0.0.9:{}", 9000 + i);
        }
        let b = Ring::new(config).unwrap();
        for i in 0..2000 {
            let t = format!("topic:{i}");
            assert_eq!(a.owner(&t).id, b.owner(&t).id);
        }
    }

    #[test]
    fn keys_spread_by_weight() {
        let r = ring(1, &[("ts-a", 1), ("ts-b", 1), ("ts-c", 2)]);
        let mut counts: HashMap<String, usize> = HashMap::new();
        let total = 40_000;
        for i in 0..total {
            *counts
                .entry(r.owner(&format!("room:{i}")).id.clone())
                .or_default() += 1;
        }
        let share = |id: &str| counts[id] as f64 / total as f64;
        assert!((share("ts-a") - 0.25).abs() < 0.06, "{counts:?}");
        assert!((share("ts-b") - 0.25).abs() < 0.06, "{counts:?}");
        assert!((share("ts-c") - 0.5).abs() < 0.06, "{counts:?}");
    }

    #[test]
    fn adding_a_node_moves_keys_only_to_it() {
        let before = ring(1, &[("ts-a", 1), ("ts-b", 1)]);
        let after = ring(2, &[("ts-a", 1), ("ts-b", 1), ("ts-c", 1)]);
        let total = 20_000;
        let mut moved = 0;
        for i in 0..total {
            let t = format!("room:{i}");
            let (old, new) = (&before.owner(&t).id, &after.owner(&t).id);
            if old != new {
                assert_eq!(
                    new, "ts-c",
                    "{t} moved from {old} to {new}, not to the new node"
                );
                moved += 1;
            }
        }
        let share = moved as f64 / total as f64;
        assert!((share - 1.0 / 3.0).abs() < 0.07, "moved share {share}");
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let before = ring(1, &[("ts-a", 1), ("ts-b", 1), ("ts-c", 1)]);
        let after = ring(2, &[("ts-a", 1), ("ts-c", 1)]);
        for i in 0..10_000 {
            let t = format!("room:{i}");
            if before.owner(&t).id != "ts-b" {
                assert_eq!(
                    before.owner(&t).id,
                    after.owner(&t).id,
                    "{t} moved needlessly"
                );
            }
        }
    }

    #[test]
    fn points_agree_with_lookup() {
        let r = ring(1, &[("ts-a", 1), ("ts-b", 3)]);
        let points = r.points();
        let builder = hashring::DefaultHashBuilder;
        for i in 0..5000 {
            let t = format!("t{i}");
            let h = std::hash::BuildHasher::hash_one(&builder, TopicKey(&t));
            let idx = points.partition_point(|(p, _)| *p < h) % points.len();
            assert_eq!(r.nodes()[points[idx].1].id, r.owner(&t).id);
        }
    }
}
