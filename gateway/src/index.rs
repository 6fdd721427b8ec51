//! The local index: `topic -> local subscribers`, grouped by how their frames are encoded.
//!
//! A delivery is encoded once per group (serializer + receiver join_ref) and the same bytes
//! are queued to every subscriber of the group. Each topic also remembers the position of
//! the last message it received: a delivery that does not follow it (an offset jump, another
//! epoch) is a gap, and the topic's subscribers are handed back to be interrupted instead of
//! being delivered past it. Sharded `parking_lot` locks, never held across `.await`.

use crate::codec::{DeliveryFrame, Vsn};
use crate::conn::{ConnEvent, ConnHandle};
use crate::metrics::Metrics;
use axum::extract::ws::Utf8Bytes;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SHARDS: usize = 64;

/// Frames for subscribers in one group are byte-identical.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub vsn: Vsn,
    /// Raw JSON of the channel's join_ref (v2 only; v1 frames carry none).
    pub join_ref: Option<Arc<str>>,
}

impl GroupKey {
    pub fn new(vsn: Vsn, join_ref: Option<Arc<str>>) -> Self {
        let join_ref = if vsn == Vsn::V1 { None } else { join_ref };
        GroupKey { vsn, join_ref }
    }
}

/// One local subscription.
#[derive(Debug, Clone)]
pub struct LocalSub {
    pub sub: u64,
    pub conn: ConnHandle,
    /// The topic server the subscription was made at.
    pub node: Arc<str>,
}

/// A position in a topic's message stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

/// What [`LocalIndex::deliver`] did with a message.
#[derive(Debug)]
pub enum Delivered {
    /// Queued to this many local subscribers (0 when the topic has none here).
    Queued(usize),
    /// The message does not follow the last one: the topic's subscribers, removed from the
    /// index, to be interrupted.
    Gap(Vec<LocalSub>),
}

#[derive(Debug)]
struct TopicSubs {
    groups: HashMap<GroupKey, Vec<LocalSub>>,
    epoch: u64,
    /// Offset of the last message received for the topic.
    last: AtomicU64,
}

impl TopicSubs {
    fn len(&self) -> usize {
        self.groups.values().map(Vec::len).sum()
    }
}

/// `topic -> local subscribers` for one gateway.
#[derive(Debug)]
pub struct LocalIndex {
    shards: Box<[RwLock<HashMap<String, TopicSubs>>]>,
    hasher: RandomState,
}

impl Default for LocalIndex {
    fn default() -> Self {
        LocalIndex {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl LocalIndex {
    fn shard(&self, topic: &str) -> &RwLock<HashMap<String, TopicSubs>> {
        &self.shards[(self.hasher.hash_one(topic) as usize) % self.shards.len()]
    }

    /// Adds a subscriber unless its connection has already gone (checked under the lock,
    /// so a connection that is cleaning up never leaves an entry behind). `at` is the
    /// topic's position when the owner accepted it: the first local subscriber starts the
    /// topic's gap tracking there.
    pub fn insert_if_open(
        &self,
        topic: &str,
        key: GroupKey,
        entry: LocalSub,
        at: Position,
    ) -> bool {
        let mut shard = self.shard(topic).write();
        if entry.conn.is_closed() {
            return false;
        }
        let subs = match shard.get_mut(topic) {
            Some(subs) => subs,
            None => shard.entry(topic.to_owned()).or_insert_with(|| TopicSubs {
                groups: HashMap::new(),
                epoch: at.epoch,
                last: AtomicU64::new(at.offset),
            }),
        };
        subs.groups.entry(key).or_default().push(entry);
        true
    }

    /// Removes subscriber `sub` of `topic`; returns whether it was there.
    pub fn remove(&self, topic: &str, sub: u64) -> bool {
        let mut shard = self.shard(topic).write();
        let Some(subs) = shard.get_mut(topic) else {
            return false;
        };
        let mut found = false;
        subs.groups.retain(|_, group| {
            if let Some(i) = group.iter().position(|s| s.sub == sub) {
                group.swap_remove(i);
                found = true;
            }
            !group.is_empty()
        });
        if subs.groups.is_empty() {
            shard.remove(topic);
        }
        found
    }

    /// Removes every subscription made at `node`; returns them with their topics.
    pub fn remove_node(&self, node: &str) -> Vec<(String, LocalSub)> {
        self.remove_where(|_, at| at == node)
    }

    /// Removes every subscription for which `remove(topic, node it was made at)` holds;
    /// returns them with their topics.
    pub fn remove_where(&self, remove: impl Fn(&str, &str) -> bool) -> Vec<(String, LocalSub)> {
        let mut removed = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.write();
            shard.retain(|topic, subs| {
                subs.groups.retain(|_, group| {
                    group.retain(|s| {
                        let keep = !remove(topic, &s.node);
                        if !keep {
                            removed.push((topic.clone(), s.clone()));
                        }
                        keep
                    });
                    !group.is_empty()
                });
                !subs.groups.is_empty()
            });
        }
        removed
    }

    /// Queues message `at` of `topic` to every local subscriber, encoding it once per
    /// group, when it follows the last message received; otherwise removes the topic's
    /// subscribers and returns them ([`Delivered::Gap`]).
    pub fn deliver(
        &self,
        topic: &str,
        at: Position,
        event: &str,
        payload: &str,
        metrics: &Metrics,
    ) -> Delivered {
        {
            let shard = self.shard(topic).read();
            let Some(subs) = shard.get(topic) else {
                return Delivered::Queued(0);
            };
            let follows = subs.epoch == at.epoch
                && subs
                    .last
                    .compare_exchange(at.offset.wrapping_sub(1), at.offset, Relaxed, Relaxed)
                    .is_ok();
            if follows {
                return Delivered::Queued(Self::fan_out(subs, topic, event, payload, metrics));
            }
        }
        Delivered::Gap(self.remove_topic(topic))
    }

    /// Removes every local subscriber of `topic` and returns them.
    pub fn remove_topic(&self, topic: &str) -> Vec<LocalSub> {
        let removed = self.shard(topic).write().remove(topic);
        removed
            .map(|s| s.groups.into_values().flatten().collect())
            .unwrap_or_default()
    }

    fn fan_out(
        subs: &TopicSubs,
        topic: &str,
        event: &str,
        payload: &str,
        metrics: &Metrics,
    ) -> usize {
        let frame = DeliveryFrame::new(topic, event, payload);
        let mut queued = 0;
        for (key, group) in &subs.groups {
            let bytes = Utf8Bytes::from(frame.encode(key.vsn, key.join_ref.as_deref()));
            Metrics::inc(&metrics.encodes);
            for s in group {
                if s.conn.send(ConnEvent::Frame(bytes.clone())) {
                    queued += 1;
                }
            }
        }
        Metrics::add(&metrics.frames_out, queued as u64);
        queued
    }

    /// Number of local subscriptions (all topics).
    pub fn subscription_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().values().map(TopicSubs::len).sum::<usize>())
            .sum()
    }

    /// Number of topics with local subscribers.
    pub fn topic_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Topics with local subscribers at `node`.
    pub fn topics_on(&self, node: &str) -> Vec<String> {
        let mut topics = Vec::new();
        for shard in self.shards.iter() {
            for (topic, subs) in shard.read().iter() {
                if subs.groups.values().flatten().any(|s| &*s.node == node) {
                    topics.push(topic.clone());
                }
            }
        }
        topics
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::ConnEvent;

    const AT: Position = Position {
        epoch: 9,
        offset: 0,
    };

    fn next(offset: u64) -> Position {
        Position { epoch: 9, offset }
    }

    fn frames(inbox: &mut crate::conn::Inbox) -> Vec<String> {
        let mut out = Vec::new();
        for event in inbox.drain() {
            if let ConnEvent::Frame(b) = event {
                out.push(b.as_str().to_owned());
            }
        }
        out
    }

    #[test]
    fn encodes_once_per_join_ref_and_shares_bytes() {
        let index = LocalIndex::default();
        let metrics = Metrics::default();
        let node: Arc<str> = "ts-a".into();
        let mut receivers = Vec::new();
        for i in 0..10u64 {
            let (conn, rx) = ConnHandle::new(i, 8, &Default::default());
            let join_ref: Arc<str> = if i % 2 == 0 {
                "\"1\"".into()
            } else {
                "\"3\"".into()
            };
            let key = GroupKey::new(Vsn::V2, Some(join_ref));
            assert!(index.insert_if_open(
                "t",
                key,
                LocalSub {
                    sub: i,
                    conn,
                    node: node.clone()
                },
                AT
            ));
            receivers.push(rx);
        }
        assert!(matches!(
            index.deliver("t", next(1), "e", "{}", &metrics),
            Delivered::Queued(10)
        ));
        assert_eq!(
            metrics.encodes.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        for (i, rx) in receivers.iter_mut().enumerate() {
            let expected = if i % 2 == 0 {
                r#"["1",null,"t","e",{}]"#
            } else {
                r#"["3",null,"t","e",{}]"#
            };
            assert_eq!(frames(rx), [expected]);
        }
    }

    #[test]
    fn closed_connections_are_never_indexed() {
        let index = LocalIndex::default();
        let (conn, rx) = ConnHandle::new(1, 8, &Default::default());
        drop(rx);
        let key = GroupKey::new(Vsn::V2, None);
        assert!(!index.insert_if_open(
            "t",
            key,
            LocalSub {
                sub: 1,
                conn,
                node: "n".into()
            },
            AT
        ));
        assert_eq!(index.topic_count(), 0);
    }

    #[test]
    fn remove_node_takes_only_that_nodes_subscriptions() {
        let index = LocalIndex::default();
        let (conn, _rx) = ConnHandle::new(1, 8, &Default::default());
        let key = GroupKey::new(Vsn::V2, None);
        for (sub, topic, node) in [(1, "a", "x"), (2, "b", "y"), (3, "a", "y")] {
            index.insert_if_open(
                topic,
                key.clone(),
                LocalSub {
                    sub,
                    conn: conn.clone(),
                    node: node.into(),
                },
                AT,
            );
        }
        let mut removed: Vec<(String, u64)> = index
            .remove_node("y")
            .into_iter()
            .map(|(t, s)| (t, s.sub))
            .collect();
        removed.sort();
        assert_eq!(removed, [("a".to_owned(), 3), ("b".to_owned(), 2)]);
        assert_eq!(index.subscription_count(), 1);
        assert!(index.remove("a", 1));
        assert!(!index.remove("a", 1));
        assert_eq!(index.topic_count(), 0);
    }

    #[test]
    fn a_full_inbox_cuts_only_that_connection() {
        let index = LocalIndex::default();
        let metrics = Metrics::default();
        let (slow, _slow_rx) = ConnHandle::new(1, 1, &Default::default());
        let (fast, mut fast_rx) = ConnHandle::new(2, 16, &Default::default());
        let key = GroupKey::new(Vsn::V2, None);
        index.insert_if_open(
            "t",
            key.clone(),
            LocalSub {
                sub: 1,
                conn: slow.clone(),
                node: "n".into(),
            },
            AT,
        );
        index.insert_if_open(
            "t",
            key,
            LocalSub {
                sub: 2,
                conn: fast,
                node: "n".into(),
            },
            AT,
        );
        for offset in 1..=3 {
            index.deliver("t", next(offset), "e", "1", &metrics);
        }
        assert_eq!(frames(&mut fast_rx).len(), 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), slow.cut_requested())
                .await
                .expect("slow connection is cut");
        });
    }

    #[test]
    fn a_jump_or_a_new_epoch_is_a_gap_not_a_delivery() {
        let index = LocalIndex::default();
        let metrics = Metrics::default();
        let (conn, mut rx) = ConnHandle::new(1, 16, &Default::default());
        let add = |topic: &str, sub| {
            let entry = LocalSub {
                sub,
                conn: conn.clone(),
                node: "n".into(),
            };
            index.insert_if_open(topic, GroupKey::new(Vsn::V2, None), entry, AT)
        };
        add("a", 1);
        add("a", 2);
        add("b", 3);
        assert!(matches!(
            index.deliver("a", next(1), "e", "1", &metrics),
            Delivered::Queued(2)
        ));
        match index.deliver("a", next(3), "e", "3", &metrics) {
            Delivered::Gap(subs) => assert_eq!(subs.len(), 2),
            other => panic!("offset 2 was skipped: {other:?}"),
        }
        assert_eq!(
            index.topic_count(),
            1,
            "the gap removed the topic's subscribers"
        );
        assert!(matches!(
            index.deliver("a", next(4), "e", "4", &metrics),
            Delivered::Queued(0)
        ));
        let other_epoch = Position {
            epoch: 10,
            offset: 1,
        };
        assert!(matches!(
            index.deliver("b", other_epoch, "e", "1", &metrics),
            Delivered::Gap(_)
        ));
        assert_eq!(
            frames(&mut rx).len(),
            2,
            "only the message before the gap was queued"
        );
    }
}
