//! The local index: `topic -> local subscribers`, grouped by how their frames are encoded.
//!
//! A delivery is encoded once per group (serializer + receiver join_ref) and appended to the
//! group's [`Feed`], which every subscriber of the group reads at its own pace. Each topic
//! is attached as a whole: all its local subscribers are attached at one topic server
//! (`node`), and the topic remembers the position of the last message it delivered. A
//! message at or before that position is a duplicate (during a move, the old and the new
//! owner may both send it) and is dropped; one that does not follow it (an offset jump,
//! another epoch) is a gap, and the topic's subscribers are handed back to be interrupted
//! instead of being delivered past it. Sharded `parking_lot` locks, never held across
//! `.await`.

use crate::codec::{DeliveryFrame, Vsn};
use crate::conn::{ConnEvent, ConnHandle, Cut};
use crate::feed::{Feed, Nudge, Reader};
use crate::metrics::Metrics;
use crate::ws;
use parking_lot::{Mutex, RwLock};
use ringcast_topic_server::shards::Shards;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

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
}

/// A position in a topic's message stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

impl From<ringcast_proto::Position> for Position {
    fn from(p: ringcast_proto::Position) -> Self {
        Position {
            epoch: p.epoch,
            offset: p.offset,
        }
    }
}

impl From<Position> for ringcast_proto::Position {
    fn from(p: Position) -> Self {
        ringcast_proto::Position {
            epoch: p.epoch,
            offset: p.offset,
        }
    }
}

/// One message of a topic as its owner sent it.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub at: Position,
    pub event: &'a str,
    pub payload: &'a str,
    /// When the owner accepted it (microseconds since the Unix epoch; 0: unknown).
    pub accepted: u64,
}

/// What [`LocalIndex::deliver`] did with a run of messages.
#[derive(Debug)]
pub enum Delivered {
    /// Frames queued in all (0 when the topic has no subscribers here, or the messages
    /// were delivered already).
    Queued(usize),
    /// The message at this position does not follow the last one: the topic's
    /// subscribers, removed from the index, to be interrupted (at the node they were
    /// attached at).
    Gap(Position, Arc<str>, Vec<LocalSub>),
}

/// What [`LocalIndex::insert_if_open`] did.
#[derive(Debug)]
pub enum Inserted {
    /// Indexed; the subscription reads its deliveries from this reader.
    Added(Arc<Reader>),
    /// The connection has gone.
    Closed,
    /// The topic's feed is attached at another node now (it moved while the join was in
    /// flight): the subscription made at the old node is stale.
    ElsewhereNow,
}

/// Subscribers whose frames are the same bytes, and the feed they read them from.
#[derive(Debug, Default)]
struct Group {
    feed: Arc<Feed>,
    subs: Vec<(LocalSub, Arc<Reader>)>,
}

#[derive(Debug)]
struct TopicSubs {
    groups: HashMap<GroupKey, Group>,
    /// The topic server every subscriber of the topic is attached at.
    node: Arc<str>,
    epoch: u64,
    /// Offset of the last message delivered; held while a message is fanned out, so that
    /// two links delivering the same topic during a move never reorder it.
    last: Mutex<u64>,
}

impl TopicSubs {
    fn len(&self) -> usize {
        self.groups.values().map(|g| g.subs.len()).sum()
    }

    fn subs(&self) -> impl Iterator<Item = &LocalSub> {
        self.groups
            .values()
            .flat_map(|g| g.subs.iter().map(|(s, _)| s))
    }
}

/// `topic -> local subscribers` for one gateway.
#[derive(Debug)]
pub struct LocalIndex {
    shards: Shards<RwLock<HashMap<String, TopicSubs>>>,
}

impl Default for LocalIndex {
    fn default() -> Self {
        LocalIndex {
            shards: Shards::new(SHARDS, |_| RwLock::new(HashMap::new())),
        }
    }
}

impl LocalIndex {
    fn shard(&self, topic: &str) -> &RwLock<HashMap<String, TopicSubs>> {
        self.shards.of(topic)
    }

    /// Adds a subscriber accepted by `node` at position `at`, unless its connection has
    /// already gone (checked under the lock, so a connection that is cleaning up never leaves
    /// an entry behind) or the topic's feed is attached elsewhere. The first local subscriber
    /// starts the feed at `node` and `at`. The reader starts after the last frame delivered.
    pub fn insert_if_open(
        &self,
        topic: &str,
        key: GroupKey,
        entry: LocalSub,
        node: &Arc<str>,
        at: Position,
    ) -> Inserted {
        let mut shard = self.shard(topic).write();
        if entry.conn.is_closed() {
            return Inserted::Closed;
        }
        let subs = match shard.get_mut(topic) {
            // Another node, or a position the feed is not at: the new subscriber would count
            // from the wrong place.
            Some(subs)
                if subs.node != *node
                    || subs.epoch != at.epoch
                    || *subs.last.lock() != at.offset =>
            {
                return Inserted::ElsewhereNow;
            }
            Some(subs) => subs,
            None => shard.entry(topic.to_owned()).or_insert_with(|| TopicSubs {
                groups: HashMap::new(),
                node: node.clone(),
                epoch: at.epoch,
                last: Mutex::new(at.offset),
            }),
        };
        let group = subs.groups.entry(key).or_default();
        let reader = group.feed.reader(entry.conn.capacity());
        group.subs.push((entry, reader.clone()));
        Inserted::Added(reader)
    }

    /// Removes subscriber `sub` of `topic`; returns the node it was attached at.
    pub fn remove(&self, topic: &str, sub: u64) -> Option<Arc<str>> {
        let mut shard = self.shard(topic).write();
        let subs = shard.get_mut(topic)?;
        let node = subs.node.clone();
        let mut found = false;
        subs.groups.retain(|_, group| {
            if let Some(i) = group.subs.iter().position(|(s, _)| s.sub == sub) {
                group.subs.swap_remove(i);
                found = true;
            }
            !group.subs.is_empty()
        });
        if subs.groups.is_empty() {
            shard.remove(topic);
        }
        found.then_some(node)
    }

    /// Removes every feed attached at `node`; returns their subscribers with their topics.
    pub fn remove_node(&self, node: &str) -> Vec<(String, LocalSub)> {
        self.remove_where(|_, at| at == node)
    }

    /// Removes every feed for which `remove(topic, node)` holds; returns their subscribers
    /// with their topics.
    pub fn remove_where(&self, remove: impl Fn(&str, &str) -> bool) -> Vec<(String, LocalSub)> {
        let mut removed = Vec::new();
        for shard in self.shards.iter() {
            shard.write().retain(|topic, subs| {
                if !remove(topic, &subs.node) {
                    return true;
                }
                removed.extend(subs.subs().map(|s| (topic.clone(), s.clone())));
                false
            });
        }
        removed
    }

    /// Removes every local subscriber of `topic`; returns the node they were attached at
    /// and the subscribers.
    pub fn remove_topic(&self, topic: &str) -> Option<(Arc<str>, Vec<LocalSub>)> {
        let removed = self.shard(topic).write().remove(topic)?;
        let subs = removed.subs().cloned().collect();
        Some((removed.node, subs))
    }

    /// Where `topic`'s feed is attached and the last position it delivered.
    pub fn feed(&self, topic: &str) -> Option<(Arc<str>, Position)> {
        let shard = self.shard(topic).read();
        let subs = shard.get(topic)?;
        let at = Position {
            epoch: subs.epoch,
            offset: *subs.last.lock(),
        };
        Some((subs.node.clone(), at))
    }

    /// The subscriber ids of `topic`'s feed.
    pub fn subs(&self, topic: &str) -> Vec<u64> {
        let shard = self.shard(topic).read();
        shard
            .get(topic)
            .map(|subs| subs.subs().map(|s| s.sub).collect())
            .unwrap_or_default()
    }

    /// Every feed: topic, node, subscriber ids.
    pub fn feeds(&self) -> Vec<(String, Arc<str>, Vec<u64>)> {
        let mut feeds = Vec::new();
        for shard in self.shards.iter() {
            for (topic, subs) in shard.read().iter() {
                let ids = subs.subs().map(|s| s.sub).collect();
                feeds.push((topic.clone(), subs.node.clone(), ids));
            }
        }
        feeds
    }

    /// Re-attaches `topic`'s feed from node `from` to node `to` (a completed move). Returns
    /// the ids of its subscribers, or `None` if the feed is not at `from` any more.
    pub fn rehome(&self, topic: &str, from: &str, to: &Arc<str>) -> Option<Vec<u64>> {
        let mut shard = self.shard(topic).write();
        let subs = shard.get_mut(topic).filter(|s| &*s.node == from)?;
        subs.node = to.clone();
        Some(subs.subs().map(|s| s.sub).collect())
    }

    /// Queues `messages` (consecutive messages of `topic` from one batch) to every local
    /// subscriber: each message is encoded once per group and appended to the group's feed;
    /// a subscriber is woken only if it had read everything before. A message at or before
    /// the last one delivered is dropped; one that does not follow it ends the run: the
    /// topic's subscribers are removed and returned ([`Delivered::Gap`]) after the messages
    /// before it were queued.
    pub fn deliver(&self, topic: &str, messages: &[Incoming<'_>], metrics: &Metrics) -> Delivered {
        let gap = {
            let shard = self.shard(topic).read();
            let Some(subs) = shard.get(topic) else {
                return Delivered::Queued(0);
            };
            let mut last = subs.last.lock();
            let mut fresh = Vec::with_capacity(messages.len());
            let mut gap = None;
            for m in messages {
                if subs.epoch == m.at.epoch && m.at.offset <= *last {
                    continue;
                }
                if subs.epoch == m.at.epoch && last.checked_add(1) == Some(m.at.offset) {
                    *last = m.at.offset;
                    fresh.push(m);
                    continue;
                }
                gap = Some(m.at);
                break;
            }
            let queued = Self::fan_out(subs, topic, &fresh, metrics);
            match gap {
                None => return Delivered::Queued(queued),
                Some(at) => at,
            }
        };
        match self.remove_topic(topic) {
            Some((node, subs)) => Delivered::Gap(gap, node, subs),
            None => Delivered::Queued(0),
        }
    }

    /// Queues a topic event that is not one of its numbered messages (presence news) from
    /// `node` to every local subscriber of `topic`, in order with its deliveries; returns the
    /// frames queued. Only the node the feed is attached at speaks for the topic (news from a
    /// previous owner after a move is dropped).
    pub fn deliver_event(
        &self,
        topic: &str,
        node: &str,
        event: &str,
        payload: &str,
        metrics: &Metrics,
    ) -> usize {
        let shard = self.shard(topic).read();
        let Some(subs) = shard.get(topic).filter(|subs| &*subs.node == node) else {
            return 0;
        };
        // Under the topic's delivery lock, as deliveries are appended.
        let _order = subs.last.lock();
        Self::append_frames(
            subs,
            &[DeliveryFrame::new(topic, event, payload)],
            0,
            metrics,
        )
    }

    /// Queues `messages` to every subscriber of `subs`; returns the frames queued.
    fn fan_out(
        subs: &TopicSubs,
        topic: &str,
        messages: &[&Incoming<'_>],
        metrics: &Metrics,
    ) -> usize {
        if messages.is_empty() {
            return 0;
        }
        let frames: Vec<DeliveryFrame> = messages
            .iter()
            .map(|m| DeliveryFrame::new(topic, m.event, m.payload))
            .collect();
        Self::append_frames(subs, &frames, messages[0].accepted, metrics)
    }

    /// Appends `frames` (stamped `stamp`) to every group's feed of `subs`, waking or cutting
    /// readers; returns the frames queued.
    fn append_frames(
        subs: &TopicSubs,
        frames: &[DeliveryFrame],
        stamp: u64,
        metrics: &Metrics,
    ) -> usize {
        let mut queued = 0;
        for (key, group) in &subs.groups {
            let head = group.feed.append(
                frames
                    .iter()
                    .map(|f| ws::text_frame(&f.encode(key.vsn, key.join_ref.as_deref()))),
                stamp,
            );
            Metrics::add(&metrics.encodes, frames.len() as u64);
            let mut passed = head;
            for (s, reader) in &group.subs {
                match reader.nudge(head) {
                    Nudge::Cut => {
                        s.conn.cut(Cut::SlowConsumer);
                        continue;
                    }
                    Nudge::Wake => {
                        s.conn.send(ConnEvent::Feed(reader.clone()));
                    }
                    Nudge::None => {}
                }
                passed = passed.min(reader.cursor());
                queued += frames.len();
            }
            group.feed.passed(passed);
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

    /// Whether any feed is attached at `node`.
    pub fn has_node(&self, node: &str) -> bool {
        self.shards
            .iter()
            .any(|s| s.read().values().any(|subs| &*subs.node == node))
    }

    /// Local topics by the node their feed is attached at.
    pub fn topics_by_node(&self) -> BTreeMap<String, Vec<String>> {
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for shard in self.shards.iter() {
            for (topic, subs) in shard.read().iter() {
                by_node
                    .entry(subs.node.to_string())
                    .or_default()
                    .push(topic.clone());
            }
        }
        for topics in by_node.values_mut() {
            topics.sort();
        }
        by_node
    }
}

impl crate::cluster::directory::Feeds for LocalIndex {
    fn feed(&self, topic: &str) -> Option<(Arc<str>, Position)> {
        LocalIndex::feed(self, topic)
    }

    fn subs(&self, topic: &str) -> Vec<u64> {
        LocalIndex::subs(self, topic)
    }

    fn feeds(&self) -> Vec<(String, Arc<str>, Vec<u64>)> {
        LocalIndex::feeds(self)
    }

    fn has_node(&self, node: &str) -> bool {
        LocalIndex::has_node(self, node)
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

    fn msg<'a>(at: Position, event: &'a str, payload: &'a str) -> Incoming<'a> {
        Incoming {
            at,
            event,
            payload,
            accepted: 0,
        }
    }

    /// Waits (a second at most) for `conn` to be cut.
    fn assert_cut(conn: &ConnHandle, why: &str) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), conn.cut_requested())
                .await
                .expect(why);
        });
    }

    /// Messages `(offset, payload)` of event "e".
    fn run_of(messages: &[(u64, &'static str)]) -> Vec<Incoming<'static>> {
        messages
            .iter()
            .map(|&(offset, payload)| msg(next(offset), "e", payload))
            .collect()
    }

    fn node(id: &str) -> Arc<str> {
        id.into()
    }

    /// Reads everything after the reader's cursor: the texts of the frames.
    fn frames(reader: &Reader) -> Vec<String> {
        let mut buf = bytes::BytesMut::new();
        reader.read(&mut buf).expect("not lagged");
        ws::frame_texts(&buf)
    }

    /// The reader of an added subscription.
    fn added(inserted: Inserted) -> Arc<Reader> {
        match inserted {
            Inserted::Added(reader) => reader,
            other => panic!("not added: {other:?}"),
        }
    }

    /// Whether the fan-out woke the connection for its feed.
    fn woken(inbox: &mut crate::conn::Inbox) -> usize {
        inbox
            .drain()
            .iter()
            .filter(|e| matches!(e, ConnEvent::Feed(_)))
            .count()
    }

    #[test]
    fn encodes_once_per_join_ref_and_shares_bytes() {
        let index = LocalIndex::default();
        let metrics = Metrics::default();
        let mut readers = Vec::new();
        for i in 0..10u64 {
            let (conn, _rx) = ConnHandle::new(i, 8);
            let join_ref: Arc<str> = if i % 2 == 0 {
                "\"1\"".into()
            } else {
                "\"3\"".into()
            };
            let key = GroupKey::new(Vsn::V2, Some(join_ref));
            let entry = LocalSub { sub: i, conn };
            readers.push(added(index.insert_if_open("t", key, entry, &node("a"), AT)));
        }
        assert!(matches!(
            index.deliver("t", &[msg(next(1), "e", "{}")], &metrics),
            Delivered::Queued(10)
        ));
        assert_eq!(
            metrics.encodes.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        for (i, reader) in readers.iter().enumerate() {
            let expected = if i % 2 == 0 {
                r#"["1",null,"t","e",{}]"#
            } else {
                r#"["3",null,"t","e",{}]"#
            };
            assert_eq!(frames(reader), [expected]);
        }
    }

    #[test]
    fn closed_connections_and_stale_nodes_are_never_indexed() {
        let index = LocalIndex::default();
        let (conn, rx) = ConnHandle::new(1, 8);
        let key = GroupKey::new(Vsn::V2, None);
        let entry = LocalSub {
            sub: 1,
            conn: conn.clone(),
        };
        added(index.insert_if_open("t", key.clone(), entry, &node("a"), AT));
        let entry = LocalSub {
            sub: 2,
            conn: conn.clone(),
        };
        assert!(matches!(
            index.insert_if_open("t", key.clone(), entry, &node("b"), AT),
            Inserted::ElsewhereNow
        ));
        drop(rx);
        let entry = LocalSub { sub: 3, conn };
        assert!(matches!(
            index.insert_if_open("u", key, entry, &node("a"), AT),
            Inserted::Closed
        ));
        assert_eq!(index.topic_count(), 1);
    }

    #[test]
    fn feeds_move_between_nodes_as_a_whole() {
        let index = LocalIndex::default();
        let (conn, _rx) = ConnHandle::new(1, 8);
        let key = GroupKey::new(Vsn::V2, None);
        for (sub, topic, at) in [(1, "a", "x"), (2, "b", "y"), (3, "a", "x")] {
            let entry = LocalSub {
                sub,
                conn: conn.clone(),
            };
            index.insert_if_open(topic, key.clone(), entry, &node(at), AT);
        }
        assert_eq!(index.rehome("a", "y", &node("z")), None, "a is not at y");
        let mut moved = index.rehome("a", "x", &node("y")).unwrap();
        moved.sort();
        assert_eq!(moved, [1, 3]);
        assert_eq!(index.feed("a").unwrap().0, node("y"));
        let removed = index.remove_node("y");
        assert_eq!(removed.len(), 3);
        assert!(!index.has_node("y"));
        assert_eq!(index.remove("a", 1), None);
    }

    #[test]
    fn a_subscriber_too_far_behind_cuts_only_that_connection() {
        let index = LocalIndex::default();
        let metrics = Metrics::default();
        let (slow, _slow_rx) = ConnHandle::new(1, 1);
        let (fast, mut fast_rx) = ConnHandle::new(2, 16);
        let key = GroupKey::new(Vsn::V2, None);
        let n = node("n");
        let slow_sub = LocalSub {
            sub: 1,
            conn: slow.clone(),
        };
        added(index.insert_if_open("t", key.clone(), slow_sub, &n, AT));
        let fast_sub = LocalSub { sub: 2, conn: fast };
        let fast_reader = added(index.insert_if_open("t", key, fast_sub, &n, AT));
        // The fast subscriber has read everything: each message wakes it once.
        assert!(frames(&fast_reader).is_empty());
        for offset in 1..=3 {
            index.deliver("t", &[msg(next(offset), "e", "1")], &metrics);
        }
        assert_eq!(woken(&mut fast_rx), 1, "woken once, until it reads");
        assert_eq!(frames(&fast_reader).len(), 3);
        assert_cut(&slow, "slow connection is cut");
    }

    #[test]
    fn duplicates_are_dropped_and_a_jump_or_a_new_epoch_is_a_gap() {
        let index = LocalIndex::default();
        let metrics = Metrics::default();
        let (conn, _rx) = ConnHandle::new(1, 16);
        let add = |topic: &str, sub| {
            let entry = LocalSub {
                sub,
                conn: conn.clone(),
            };
            added(index.insert_if_open(topic, GroupKey::new(Vsn::V2, None), entry, &node("n"), AT))
        };
        let reader = add("a", 1);
        add("a", 2);
        add("b", 3);
        let queued = |d: Delivered| match d {
            Delivered::Queued(n) => n,
            Delivered::Gap(..) => usize::MAX,
        };
        assert_eq!(
            queued(index.deliver("a", &[msg(next(1), "e", "1")], &metrics)),
            2
        );
        assert_eq!(
            queued(index.deliver("a", &[msg(next(1), "e", "1")], &metrics)),
            0,
            "a duplicate"
        );
        match index.deliver("a", &[msg(next(3), "e", "3")], &metrics) {
            Delivered::Gap(at, node, subs) => {
                assert_eq!((at, &*node, subs.len()), (next(3), "n", 2))
            }
            other => panic!("offset 2 was skipped: {other:?}"),
        }
        assert_eq!(
            index.topic_count(),
            1,
            "the gap removed the topic's subscribers"
        );
        assert_eq!(
            queued(index.deliver("a", &[msg(next(4), "e", "4")], &metrics)),
            0
        );
        let other_epoch = Position {
            epoch: 10,
            offset: 1,
        };
        assert!(matches!(
            index.deliver("b", &[msg(other_epoch, "e", "1")], &metrics),
            Delivered::Gap(..)
        ));
        assert_eq!(
            frames(&reader).len(),
            1,
            "only the message before the gap was queued"
        );
    }

    #[test]
    fn a_run_is_one_wake_up_per_subscriber_and_stops_at_a_gap() {
        let index = LocalIndex::default();
        let metrics = Metrics::default();
        let (a, mut a_rx) = ConnHandle::new(1, 16);
        let (b, mut b_rx) = ConnHandle::new(2, 16);
        let key = GroupKey::new(Vsn::V2, Some("\"1\"".into()));
        let mut readers = Vec::new();
        for (sub, conn) in [(1, a), (2, b)] {
            let entry = LocalSub { sub, conn };
            let reader = added(index.insert_if_open("t", key.clone(), entry, &node("n"), AT));
            assert!(frames(&reader).is_empty(), "parks");
            readers.push(reader);
        }
        let run = run_of(&[(1, "1"), (2, "2"), (3, "3")]);
        assert!(matches!(
            index.deliver("t", &run, &metrics),
            Delivered::Queued(6)
        ));
        assert_eq!(
            metrics.encodes.load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        for (rx, reader) in [&mut a_rx, &mut b_rx].into_iter().zip(&readers) {
            assert_eq!(woken(rx), 1, "one wake-up for the run");
            assert_eq!(
                frames(reader),
                [1, 2, 3].map(|n| format!(r#"["1",null,"t","e",{n}]"#))
            );
        }
        // A duplicate is skipped, the next message queued, and the jump after it is a gap.
        let run = run_of(&[(3, "3"), (4, "4"), (6, "6")]);
        match index.deliver("t", &run, &metrics) {
            Delivered::Gap(at, _, subs) => assert_eq!((at, subs.len()), (next(6), 2)),
            other => panic!("offset 5 was skipped: {other:?}"),
        }
        assert_eq!(frames(&readers[0]), [r#"["1",null,"t","e",4]"#]);
    }

    #[test]
    fn the_bound_counts_frames_not_runs() {
        let index = LocalIndex::default();
        let metrics = Metrics::default();
        let (conn, _rx) = ConnHandle::new(1, 2);
        let sub = LocalSub {
            sub: 1,
            conn: conn.clone(),
        };
        index.insert_if_open("t", GroupKey::new(Vsn::V2, None), sub, &node("n"), AT);
        let run = run_of(&[(1, "1"), (2, "2"), (3, "3")]);
        assert!(matches!(
            index.deliver("t", &run, &metrics),
            Delivered::Queued(0)
        ));
        assert_cut(&conn, "a run larger than the inbox cuts the connection");
    }
}
