//! What moves between two ring versions: the share of the keyspace per node.
//!
//! Computed exactly from the rings' arcs, not by sampling.

use crate::placement::Ring;
use std::collections::BTreeMap;

/// Keyspace shares of one node before and after an edit (fractions of 1.0).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeShare {
    pub id: String,
    pub before: f64,
    pub after: f64,
    /// Share of the whole keyspace that this node gains from others.
    pub gained: f64,
    /// Share of the whole keyspace that this node hands to others.
    pub lost: f64,
}

/// The difference between two rings.
#[derive(Debug, Clone, PartialEq)]
pub struct RingDiff {
    pub from_version: u64,
    pub to_version: u64,
    /// Share of the keyspace whose owner changes.
    pub moved: f64,
    /// Every node of either ring, by id.
    pub nodes: Vec<NodeShare>,
}

impl RingDiff {
    /// Measures how ownership of the hash space changes from `old` to `new`.
    pub fn between(old: &Ring, new: &Ring) -> RingDiff {
        let old_points = old.points();
        let new_points = new.points();
        let mut bounds: Vec<u64> = old_points
            .iter()
            .chain(new_points.iter())
            .map(|(h, _)| *h)
            .collect();
        bounds.sort_unstable();
        bounds.dedup();

        let mut shares: BTreeMap<String, NodeShare> = BTreeMap::new();
        let entry = |shares: &mut BTreeMap<String, NodeShare>, id: &str| {
            shares.entry(id.to_owned()).or_insert_with(|| NodeShare {
                id: id.to_owned(),
                before: 0.0,
                after: 0.0,
                gained: 0.0,
                lost: 0.0,
            });
        };
        let mut moved = 0.0;
        // Segment i covers (bounds[i-1], bounds[i]]; segment 0 also covers the wrap-around
        // from the last bound through u64::MAX to 0.
        for (i, &end) in bounds.iter().enumerate() {
            let len = if i == 0 {
                (end as f64) + (u64::MAX - bounds[bounds.len() - 1]) as f64 + 1.0
            } else {
                (end - bounds[i - 1]) as f64
            };
            let share = len / (u64::MAX as f64 + 1.0);
            let before = &old.nodes()[owner_at(&old_points, end)].id;
            let after = &new.nodes()[owner_at(&new_points, end)].id;
            entry(&mut shares, before);
            entry(&mut shares, after);
            shares.get_mut(before).expect("inserted").before += share;
            shares.get_mut(after).expect("inserted").after += share;
            if before != after {
                moved += share;
                shares.get_mut(before).expect("inserted").lost += share;
                shares.get_mut(after).expect("inserted").gained += share;
            }
        }
        RingDiff {
            from_version: old.version(),
            to_version: new.version(),
            moved,
            nodes: shares.into_values().collect(),
        }
    }
}

/// Index of the node owning hash `h`: the first point at or after it, wrapping around.
fn owner_at(points: &[(u64, usize)], h: u64) -> usize {
    let i = points.partition_point(|(p, _)| *p < h);
    points[i % points.len()].1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::test_ring as ring;

    #[test]
    fn identical_rings_move_nothing() {
        let a = ring(1, &[("a", 1), ("b", 1)]);
        let d = RingDiff::between(&a, &a);
        assert_eq!(d.moved, 0.0);
        let total: f64 = d.nodes.iter().map(|n| n.before).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }

    #[test]
    fn adding_a_third_node_moves_about_a_third_to_it() {
        let d = RingDiff::between(
            &ring(1, &[("a", 1), ("b", 1)]),
            &ring(2, &[("a", 1), ("b", 1), ("c", 1)]),
        );
        assert!((d.moved - 1.0 / 3.0).abs() < 0.06, "{d:?}");
        let c = d.nodes.iter().find(|n| n.id == "c").unwrap();
        assert_eq!(c.before, 0.0);
        assert!((c.gained - d.moved).abs() < 1e-9);
        for n in &d.nodes {
            assert!(
                (n.before - n.lost + n.gained - n.after).abs() < 1e-9,
                "{n:?}"
            );
        }
    }

    #[test]
    fn diff_agrees_with_sampled_topics() {
        let old = ring(1, &[("a", 1), ("b", 1), ("c", 1)]);
        let new = ring(2, &[("a", 1), ("b", 2)]);
        let d = RingDiff::between(&old, &new);
        let total = 40_000;
        let moved = (0..total)
            .filter(|i| {
                let t = format!("x:{i}");
                old.owner(&t).id != new.owner(&t).id
            })
            .count();
        assert!(
            (moved as f64 / total as f64 - d.moved).abs() < 0.02,
            "{d:?} vs {moved}"
        );
    }
}
