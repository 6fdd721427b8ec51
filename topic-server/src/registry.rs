//! The topic registry: every owned topic's epoch, offset, recent messages and subscribers
//! grouped by gateway.
//!
//! Plain data, no IO (callers pass the time): the service wraps shards of it in locks and
//! turns what it returns into stream messages. A topic exists while it has subscribers or
//! messages in its log; when it is created again it gets a new epoch.

use crate::log::{Dropped, LogLimits, Message, TopicLog};
use crate::presence::{self, Entry, Full, HandedOver, Presence, PresenceLimits};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// A gateway-local subscriber id, chosen by the gateway.
pub type SubscriberId = u64;

/// Where a topic's message stream stands: its epoch and the offset of its last message.
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

/// Makes a fresh epoch for every topic state created, so that a recreated topic (after a
/// restart, or after its log expired) is never mistaken for the old one.
#[derive(Debug, Clone)]
pub struct EpochSource {
    seed: u64,
    counter: u64,
}

impl EpochSource {
    pub fn new(seed: u64) -> Self {
        EpochSource { seed, counter: 0 }
    }

    fn next(&mut self) -> u64 {
        self.counter += 1;
        // splitmix64 of seed + counter: distinct per topic state, never zero in practice.
        let mut z = self
            .seed
            .wrapping_add(self.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).max(1)
    }
}

#[derive(Debug)]
struct Topic<G> {
    epoch: u64,
    offset: u64,
    /// Subscribers grouped by the gateway that holds them: fan-out is one delivery per entry.
    gateways: Vec<(G, HashSet<SubscriberId>)>,
    log: TopicLog,
    /// Idempotency keys of recent publishes, oldest first, with where each message went.
    keys: VecDeque<(Box<str>, Position, Instant)>,
    presence: Presence<G>,
}

/// Idempotency keys remembered per topic, at most, and for how long.
const KEYS_MAX: usize = 256;
const KEYS_FOR: Duration = Duration::from_secs(300);

/// Bytes counted for a remembered idempotency key.
fn key_bytes(key: &str) -> usize {
    key.len() + 48
}

impl<G: PartialEq + Clone> Topic<G> {
    fn keys_bytes(&self) -> usize {
        self.keys.iter().map(|(k, _, _)| key_bytes(k)).sum()
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.offset,
        }
    }

    /// Nothing left to keep: no subscriber, no message to recover, no presence waiting for
    /// its gateway.
    fn is_idle(&self) -> bool {
        self.gateways.is_empty() && self.log.is_empty() && self.presence.is_empty()
    }
}

/// A message accepted by [`TopicRegistry::publish`]: its position and the gateways to send
/// it to, one delivery each.
#[derive(Debug)]
pub struct Published<'a, G> {
    pub position: Position,
    pub gateways: Vec<&'a G>,
    /// The key was seen within the window: nothing was ordered, `position` is the first's.
    pub repeated: bool,
}

/// What [`TopicRegistry::history`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct History {
    /// The topic's position now (`epoch` 0 when it does not exist).
    pub position: Position,
    /// Every message after the position asked for, oldest first, at most the limit; `None`
    /// when the log no longer holds all of them (or the epoch is another).
    pub messages: Option<Vec<Message>>,
}

/// What [`TopicRegistry::info`] says of a topic.
#[derive(Debug, PartialEq, Eq)]
pub struct Info {
    pub position: Position,
    pub subscribers: usize,
    pub gateways: usize,
    pub log_messages: usize,
}

/// A subscription made by [`TopicRegistry::subscribe`].
#[derive(Debug, PartialEq, Eq)]
pub struct Subscribed {
    /// The topic's position: the subscriber's live deliveries start after it.
    pub position: Position,
    /// When recovery was asked for and the log covers it: every message after the
    /// subscriber's position, to send before the live ones. `None`: not recovered.
    pub replay: Option<Vec<Message>>,
}

/// A topic this node handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The ring version the new owner had.
    pub version: u64,
    /// The new owner's address.
    pub to: Option<String>,
    /// When it was handed over.
    pub at: Instant,
}

/// What a topic's old owner hands to the new one.
#[derive(Debug)]
pub struct Handoff<G> {
    pub epoch: u64,
    pub offset: u64,
    pub log: Vec<(Duration, Message)>,
    /// The gateways that had subscribers here (to be told the topic moved).
    pub gateways: Vec<G>,
    /// The presence changes not sent yet (to send to `gateways` before the topic goes), and
    /// the presence, by gateway id.
    pub presence_flush: Option<(&'static str, String)>,
    /// The presence was counted, not listed.
    pub presence_counted: bool,
    pub presence: Vec<HandedOver>,
}

/// What a topic's presence has to say to its subscribers (a flush): the topic, the event
/// and its JSON payload, and the gateways to send it to.
pub type PresenceNews<'a, G> = (String, &'static str, String, Vec<&'a G>);

/// The topics of one shard. `G` identifies a gateway's stream (cheap to clone and compare).
#[derive(Debug)]
pub struct TopicRegistry<G> {
    topics: HashMap<String, Topic<G>>,
    /// Topics handed over, and to whom: refused while this node's ring is older than the
    /// one they moved under, and a lead to follow if the ring gives one back here.
    moved: HashMap<String, Moved>,
    epochs: EpochSource,
    limits: LogLimits,
    subscriptions: usize,
    logged: Dropped,
    /// Bytes of the names of the topics held.
    names: usize,
    presence_limits: PresenceLimits,
    /// Bytes held for presence, every topic together.
    presence_bytes: usize,
    /// Bytes held for idempotency keys, every topic together.
    key_bytes: usize,
    /// Topics whose presence has something to flush.
    dirty: HashSet<String>,
}

/// Handed-over topics remembered, at most, per registry: the oldest are forgotten first.
const MOVED_MAX: usize = 16_384;
/// How long a handover is remembered.
const MOVED_FOR: Duration = Duration::from_secs(600);

impl<G: PartialEq + Clone> TopicRegistry<G> {
    pub fn new(epochs: EpochSource, limits: LogLimits) -> Self {
        TopicRegistry {
            topics: HashMap::new(),
            moved: HashMap::new(),
            epochs,
            limits,
            subscriptions: 0,
            logged: Dropped::default(),
            names: 0,
            presence_limits: PresenceLimits::default(),
            presence_bytes: 0,
            key_bytes: 0,
            dirty: HashSet::new(),
        }
    }

    pub fn with_presence_limits(mut self, limits: PresenceLimits) -> Self {
        self.presence_limits = limits;
        self
    }

    /// Runs `change` on `topic`'s presence and keeps the byte count and the dirty set.
    fn presence_change<R>(
        &mut self,
        topic: &str,
        change: impl FnOnce(&mut Presence<G>, &PresenceLimits) -> R,
    ) -> Option<R> {
        let limits = self.presence_limits;
        let state = self.topics.get_mut(topic)?;
        let before = state.presence.bytes();
        let result = change(&mut state.presence, &limits);
        let after = state.presence.bytes();
        self.presence_bytes = self.presence_bytes + after - before;
        if state.presence.is_dirty() && !self.dirty.contains(topic) {
            self.dirty.insert(topic.to_owned());
        }
        Some(result)
    }

    /// Tracks `subscriber` (subscribed already) in `topic`'s presence as `key` with `meta` (a
    /// compact JSON object), under a fresh `phx_ref`.
    pub fn track(
        &mut self,
        topic: &str,
        gateway: &G,
        subscriber: SubscriberId,
        key: &str,
        meta: Box<str>,
    ) -> Result<(), Full> {
        let phx_ref = self.next_ref();
        let entry = Entry {
            key: key.into(),
            phx_ref,
            meta,
        };
        self.presence_change(topic, |p, limits| {
            p.track(gateway, subscriber, entry, limits)
        })
        .unwrap_or(Err(Full))
    }

    /// Replaces a tracked subscriber's meta; `Ok(false)` if it is not tracked.
    pub fn update_presence(
        &mut self,
        topic: &str,
        gateway: &G,
        subscriber: SubscriberId,
        meta: Box<str>,
    ) -> Result<bool, Full> {
        let phx_ref = self.next_ref();
        self.presence_change(topic, |p, limits| {
            p.update(gateway, subscriber, meta, phx_ref, limits)
        })
        .unwrap_or(Ok(false))
    }

    /// A gateway (`gateway_id`) moved `subscriber` here: its handed-over presence is its own
    /// again, unchanged.
    pub fn adopt(&mut self, topic: &str, gateway: &G, gateway_id: &str, subscriber: SubscriberId) {
        self.presence_change(topic, |p, _| p.adopt(gateway, gateway_id, subscriber));
    }

    /// What a joiner of `topic` gets: `presence_state` or `presence_stats`, and the JSON.
    pub fn presence_snapshot(&mut self, topic: &str) -> (&'static str, Bytes) {
        // Through `presence_change`: the copy joiners share counts as held.
        self.presence_change(topic, |p, _| p.snapshot())
            .unwrap_or(("presence_state", Bytes::from_static(b"{}")))
    }

    /// `topic`'s members and keys, and its whole presence now (JSON) if `listed` is asked
    /// and it is listed, not counted.
    pub fn presence_state(
        &self,
        topic: &str,
        listed: bool,
    ) -> Option<(Option<String>, (usize, usize))> {
        let state = self.topics.get(topic)?;
        let listing = listed.then(|| state.presence.state()).flatten();
        Some((listing, state.presence.counts()))
    }

    /// The presence news of every topic that changed since the last call.
    pub fn flush_presence(&mut self, now: Instant) -> Vec<PresenceNews<'_, G>> {
        let mut news = Vec::new();
        for topic in std::mem::take(&mut self.dirty) {
            // Counts held back for a while leave the topic dirty: asked again next time.
            let flushed = self.presence_change(&topic, |p, limits| p.flush(limits, now));
            if let Some(Some((event, payload))) = flushed {
                news.push((topic, event, payload));
            }
        }
        news.into_iter()
            .filter_map(|(topic, event, payload)| {
                let state = self.topics.get(&topic)?;
                let gateways: Vec<&G> = state.gateways.iter().map(|(g, _)| g).collect();
                Some((topic, event, payload, gateways))
            })
            .collect()
    }

    /// A `phx_ref` no other presence of this server has had.
    fn next_ref(&mut self) -> Box<str> {
        format!("{:x}", self.epochs.next()).into()
    }

    fn topic_mut(&mut self, topic: &str) -> &mut Topic<G> {
        if !self.topics.contains_key(topic) {
            self.names += topic.len();
            let epoch = self.epochs.next();
            self.topics.insert(
                topic.to_owned(),
                Topic {
                    epoch,
                    offset: 0,
                    gateways: Vec::new(),
                    log: TopicLog::default(),
                    keys: VecDeque::new(),
                    presence: Presence::default(),
                },
            );
        }
        self.topics.get_mut(topic).expect("just inserted")
    }

    /// Adds `subscriber` of `gateway` to `topic`, creating the topic with a new epoch if
    /// needed. With `recover`, the messages after that position are returned when the log
    /// still holds every one of them (same epoch). Subscribing twice is harmless.
    pub fn subscribe(
        &mut self,
        topic: &str,
        gateway: &G,
        subscriber: SubscriberId,
        recover: Option<Position>,
        now: Instant,
    ) -> Subscribed {
        let limits = self.limits;
        let state = self.topic_mut(topic);
        let expired = state.log.expire(now, &limits);
        let set = match state.gateways.iter_mut().position(|(g, _)| g == gateway) {
            Some(i) => &mut state.gateways[i].1,
            None => {
                state.gateways.push((gateway.clone(), HashSet::new()));
                &mut state.gateways.last_mut().expect("just pushed").1
            }
        };
        let added = set.insert(subscriber);
        let replay = recover
            .filter(|r| r.epoch == state.epoch)
            .and_then(|r| state.log.since(r.offset, state.offset));
        let position = state.position();
        self.forget(expired);
        if added {
            self.subscriptions += 1;
        }
        Subscribed { position, replay }
    }

    /// Removes one subscriber. Returns whether it was subscribed.
    pub fn unsubscribe(&mut self, topic: &str, gateway: &G, subscriber: SubscriberId) -> bool {
        let Some(state) = self.topics.get_mut(topic) else {
            return false;
        };
        let Some(i) = state.gateways.iter().position(|(g, _)| g == gateway) else {
            return false;
        };
        let removed = state.gateways[i].1.remove(&subscriber);
        if state.gateways[i].1.is_empty() {
            state.gateways.swap_remove(i);
        }
        if removed {
            self.subscriptions -= 1;
        }
        self.presence_change(topic, |p, _| p.untrack(gateway, subscriber));
        self.remove_if_idle(topic);
        removed
    }

    /// Appends a message to `topic` (created if needed): the next offset, kept in the log,
    /// and the gateways with subscribers, one delivery each. With an idempotency `key` seen
    /// for the topic within 5 minutes, nothing is appended: the first message's position
    /// comes back, marked repeated.
    pub fn publish(
        &mut self,
        topic: &str,
        event: &str,
        payload: &Bytes,
        key: Option<&str>,
        now: Instant,
    ) -> Published<'_, G> {
        if let Some(key) = key
            && let Some(state) = self.topics.get_mut(topic)
        {
            while state
                .keys
                .front()
                .is_some_and(|(_, _, at)| now.saturating_duration_since(*at) > KEYS_FOR)
            {
                let (old, _, _) = state.keys.pop_front().expect("checked");
                self.key_bytes -= key_bytes(&old);
            }
            if let Some((_, position, _)) = state.keys.iter().find(|(k, _, _)| &**k == key) {
                return Published {
                    position: *position,
                    gateways: Vec::new(),
                    repeated: true,
                };
            }
        }
        let limits = self.limits;
        let mut key_change = 0isize;
        let state = self.topic_mut(topic);
        state.offset += 1;
        let message = Message {
            offset: state.offset,
            event: event.to_owned(),
            payload: payload.clone(),
        };
        let size = message.event.len() + message.payload.len();
        let dropped = state.log.push(message, now, &limits);
        let position = state.position();
        if let Some(key) = key {
            if state.keys.len() >= KEYS_MAX
                && let Some((old, _, _)) = state.keys.pop_front()
            {
                key_change -= key_bytes(&old) as isize;
            }
            key_change += key_bytes(key) as isize;
            state.keys.push_back((key.into(), position, now));
        }
        let idle = state.is_idle();
        self.key_bytes = self.key_bytes.saturating_add_signed(key_change);
        self.logged.messages += 1;
        self.logged.bytes += size;
        self.forget(dropped);
        if idle {
            // Not kept and nobody to deliver to: like Phoenix PubSub, it reaches no one.
            self.remove_if_idle(topic);
            return Published {
                position,
                gateways: Vec::new(),
                repeated: false,
            };
        }
        let state = &self.topics[topic];
        Published {
            position,
            gateways: state.gateways.iter().map(|(g, _)| g).collect(),
            repeated: false,
        }
    }

    /// The messages of `topic` after `since` (the whole log without it), at most `limit`,
    /// all or nothing as a recovery: `None` if the log no longer holds every one.
    pub fn history(&self, topic: &str, since: Option<Position>, limit: usize) -> History {
        let Some(state) = self.topics.get(topic) else {
            let position = Position {
                epoch: 0,
                offset: 0,
            };
            let messages = since.is_none().then(Vec::new);
            return History { position, messages };
        };
        let from = match since {
            None => state.log.first_offset().map_or(state.offset, |o| o - 1),
            Some(since) if since.epoch == state.epoch => since.offset,
            Some(_) => {
                return History {
                    position: state.position(),
                    messages: None,
                };
            }
        };
        History {
            position: state.position(),
            messages: state.log.since_at_most(from, state.offset, limit),
        }
    }

    /// What is held of `topic`, if it exists here.
    pub fn info(&self, topic: &str) -> Option<Info> {
        let state = self.topics.get(topic)?;
        Some(Info {
            position: state.position(),
            subscribers: state.gateways.iter().map(|(_, s)| s.len()).sum(),
            gateways: state.gateways.len(),
            log_messages: state.log.len(),
        })
    }

    /// Drops every subscription held by `gateway` (its stream ended), and its presence (the
    /// leaves go in the next flush). Returns how many subscriptions.
    pub fn drop_gateway(&mut self, gateway: &G) -> usize {
        let held: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, state)| state.gateways.iter().any(|(g, _)| g == gateway))
            .map(|(topic, _)| topic.clone())
            .collect();
        let mut dropped = 0;
        for topic in held {
            let Some(state) = self.topics.get_mut(&topic) else {
                continue;
            };
            if let Some(i) = state.gateways.iter().position(|(g, _)| g == gateway) {
                dropped += state.gateways.swap_remove(i).1.len();
            }
            self.presence_change(&topic, |p, _| p.drop_gateway(gateway));
            self.remove_if_idle(&topic);
        }
        self.subscriptions -= dropped;
        dropped
    }

    /// Forgets `topic` if it has nothing left to keep.
    fn remove_if_idle(&mut self, topic: &str) {
        if self.topics.get(topic).is_some_and(Topic::is_idle) {
            self.remove_topic(topic);
        }
    }

    /// Removes `topic` and the bytes counted for its name, presence and keys.
    fn remove_topic(&mut self, topic: &str) -> Option<Topic<G>> {
        let state = self.topics.remove(topic)?;
        self.names -= topic.len();
        self.presence_bytes -= state.presence.bytes();
        self.key_bytes -= state.keys_bytes();
        self.dirty.remove(topic);
        Some(state)
    }

    /// Drops messages past the age limit, then topics left with neither subscribers nor
    /// messages. Returns how many topics went.
    pub fn expire(&mut self, now: Instant) -> usize {
        let (limits, before) = (self.limits, self.topics.len());
        let (mut expired, mut names) = (Dropped::default(), 0);
        let (mut presence_bytes, mut key_bytes) = (0, 0);
        let dirty = &mut self.dirty;
        self.topics.retain(|topic, state| {
            let dropped = state.log.expire(now, &limits);
            expired.messages += dropped.messages;
            expired.bytes += dropped.bytes;
            state.presence.expire(now);
            if state.presence.is_dirty() && !dirty.contains(topic) {
                dirty.insert(topic.clone());
            }
            let keep = !state.is_idle();
            if keep {
                presence_bytes += state.presence.bytes();
                key_bytes += state.keys_bytes();
            } else {
                names += topic.len();
                dirty.remove(topic);
            }
            keep
        });
        self.forget(expired);
        self.names -= names;
        (self.presence_bytes, self.key_bytes) = (presence_bytes, key_bytes);
        // Handovers are remembered for a while, and only so many.
        self.moved
            .retain(|_, m| now.saturating_duration_since(m.at) < MOVED_FOR);
        if self.moved.len() > MOVED_MAX {
            let mut ages: Vec<(Instant, String)> =
                self.moved.iter().map(|(t, m)| (m.at, t.clone())).collect();
            ages.sort();
            for (_, topic) in ages.into_iter().take(self.moved.len() - MOVED_MAX) {
                self.moved.remove(&topic);
            }
        }
        before - self.topics.len()
    }

    fn forget(&mut self, dropped: Dropped) {
        self.logged.messages -= dropped.messages;
        self.logged.bytes -= dropped.bytes;
    }

    /// Removes `topic` for a handoff: its position, log and the gateways subscribed to it.
    pub fn take(
        &mut self,
        topic: &str,
        now: Instant,
        gateway_id: impl Fn(&G) -> String,
    ) -> Option<Handoff<G>> {
        let limits = self.presence_limits;
        let mut state = self.remove_topic(topic)?;
        let presence_flush = state.presence.flush(&limits, now);
        let subscribers: usize = state.gateways.iter().map(|(_, s)| s.len()).sum();
        self.subscriptions -= subscribers;
        self.forget(Dropped {
            messages: state.log.len(),
            bytes: state.log.bytes(),
        });
        Some(Handoff {
            epoch: state.epoch,
            offset: state.offset,
            log: state.log.snapshot(now),
            gateways: state.gateways.into_iter().map(|(g, _)| g).collect(),
            presence_flush,
            presence_counted: state.presence.is_counted(),
            presence: state.presence.hand_over(gateway_id),
        })
    }

    /// Takes over a topic handed off by its previous owner: the numbering continues in the
    /// same epoch; the presence (entries, and whether it was counted) waits to be adopted.
    /// Refused (false) if the topic already exists here.
    pub fn install(
        &mut self,
        topic: &str,
        epoch: u64,
        offset: u64,
        log: Vec<(Duration, Message)>,
        (presence, presence_counted): (Vec<HandedOver>, bool),
        now: Instant,
    ) -> bool {
        if self.topics.contains_key(topic) {
            return false;
        }
        let mut topic_presence = Presence::default();
        topic_presence.install(
            presence,
            now + presence::ADOPT_WITHIN,
            presence_counted,
            &self.presence_limits,
        );
        self.presence_bytes += topic_presence.bytes();
        let (log, held) = TopicLog::restore(log, offset, now, &self.limits);
        self.names += topic.len();
        self.logged.messages += held.messages;
        self.logged.bytes += held.bytes;
        let topic_state = Topic {
            epoch,
            offset,
            gateways: Vec::new(),
            log,
            keys: VecDeque::new(),
            presence: topic_presence,
        };
        if topic_state.presence.is_dirty() {
            self.dirty.insert(topic.to_owned());
        }
        self.topics.insert(topic.to_owned(), topic_state);
        true
    }

    pub fn topic_names(&self) -> impl Iterator<Item = &str> {
        self.topics.keys().map(String::as_str)
    }

    pub fn contains(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// Remembers that `topic` went to its owner under ring `version`, at address `to`.
    pub fn mark_moved(&mut self, topic: &str, version: u64, to: Option<String>, now: Instant) {
        let at = now;
        self.moved
            .insert(topic.to_owned(), Moved { version, to, at });
    }

    /// Where and under which ring `topic` was handed over, if it was.
    pub fn moved(&self, topic: &str) -> Option<&Moved> {
        self.moved.get(topic)
    }

    /// Forgets a handover (the topic came back, or is known to be nowhere).
    pub fn clear_moved(&mut self, topic: &str) {
        self.moved.remove(topic);
    }

    /// The current position of a topic, if it exists.
    pub fn position(&self, topic: &str) -> Option<Position> {
        self.topics.get(topic).map(Topic::position)
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    /// Messages held in the logs of this shard, and their payload + event bytes.
    pub fn logged(&self) -> (usize, usize) {
        (self.logged.messages, self.logged.bytes)
    }

    /// Every byte this shard holds for its topics: logged payloads and events, names,
    /// presence and idempotency keys.
    pub fn held_bytes(&self) -> usize {
        self.logged.bytes + self.names + self.presence_bytes + self.key_bytes
    }

    /// Handovers remembered.
    pub fn moved_count(&self) -> usize {
        self.moved.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn registry() -> TopicRegistry<&'static str> {
        TopicRegistry::new(EpochSource::new(7), LogLimits::default())
    }

    fn sub(
        r: &mut TopicRegistry<&'static str>,
        topic: &str,
        gw: &'static str,
        id: u64,
    ) -> Position {
        r.subscribe(topic, &gw, id, None, Instant::now()).position
    }

    fn publish(r: &mut TopicRegistry<&'static str>, topic: &str) -> (Position, Vec<&'static str>) {
        let p = r.publish(topic, "e", &Bytes::from_static(b"{}"), None, Instant::now());
        let mut gateways: Vec<&str> = p.gateways.iter().map(|g| **g).collect();
        gateways.sort();
        (p.position, gateways)
    }

    #[test]
    fn fan_out_is_one_entry_per_gateway_not_per_subscriber() {
        let mut r = registry();
        sub(&mut r, "t", "gw1", 1);
        for id in 0..500 {
            sub(&mut r, "t", "gw2", 100 + id);
        }
        assert_eq!(publish(&mut r, "t").1, ["gw1", "gw2"]);
        assert_eq!(r.subscription_count(), 501);
    }

    #[test]
    fn offsets_are_one_total_order_per_topic() {
        let mut r = registry();
        let joined = sub(&mut r, "a", "gw1", 1);
        assert_eq!(joined.offset, 0);
        sub(&mut r, "b", "gw1", 2);
        let offsets: Vec<u64> = (0..5).map(|_| publish(&mut r, "a").0.offset).collect();
        assert_eq!(offsets, [1, 2, 3, 4, 5]);
        assert_eq!(
            publish(&mut r, "b").0.offset,
            1,
            "topics count independently"
        );
        let later = sub(&mut r, "a", "gw2", 3);
        assert_eq!(
            later,
            Position {
                epoch: joined.epoch,
                offset: 5
            }
        );
    }

    #[test]
    fn a_topic_without_subscribers_keeps_its_log_then_expires() {
        let mut r = registry();
        let t0 = Instant::now();
        let p = r.publish("t", "e", &Bytes::from_static(b"1"), None, t0);
        assert!(p.gateways.is_empty());
        let p = p.position;
        assert_eq!(p.offset, 1);
        assert_eq!((r.topic_count(), r.logged()), (1, (1, 2)));
        let recovered = r.subscribe(
            "t",
            &"gw",
            1,
            Some(Position {
                epoch: p.epoch,
                offset: 0,
            }),
            t0,
        );
        assert_eq!(recovered.replay.unwrap().len(), 1);
        r.unsubscribe("t", &"gw", 1);
        assert_eq!(r.expire(t0 + Duration::from_secs(10)), 0, "log still young");
        assert_eq!(r.expire(t0 + Duration::from_secs(301)), 1);
        assert_eq!((r.topic_count(), r.logged()), (0, (0, 0)));
    }

    #[test]
    fn without_a_log_a_topic_with_no_subscribers_keeps_nothing() {
        let mut r = TopicRegistry::<&str>::new(
            EpochSource::new(1),
            LogLimits {
                messages: 0,
                ..LogLimits::default()
            },
        );
        assert!(publish(&mut r, "nobody").1.is_empty());
        assert_eq!(r.topic_count(), 0);
    }

    #[test]
    fn recovery_is_all_or_nothing_within_the_epoch() {
        let mut r = TopicRegistry::<&str>::new(
            EpochSource::new(3),
            LogLimits {
                messages: 3,
                ..LogLimits::default()
            },
        );
        let start = sub(&mut r, "t", "gw", 1);
        for _ in 0..5 {
            publish(&mut r, "t");
        }
        let now = Instant::now();
        let at = |offset| {
            Some(Position {
                epoch: start.epoch,
                offset,
            })
        };
        let replayed = |s: Subscribed| {
            s.replay
                .map(|m| m.iter().map(|m| m.offset).collect::<Vec<_>>())
        };
        assert_eq!(
            replayed(r.subscribe("t", &"gw", 2, at(2), now)),
            Some(vec![3, 4, 5])
        );
        assert_eq!(
            replayed(r.subscribe("t", &"gw", 3, at(1), now)),
            None,
            "offset 2 fell out"
        );
        assert_eq!(
            replayed(r.subscribe("t", &"gw", 4, at(5), now)),
            Some(vec![])
        );
        assert_eq!(
            replayed(r.subscribe("t", &"gw", 5, at(9), now)),
            None,
            "ahead"
        );
        let other_epoch = Some(Position {
            epoch: start.epoch ^ 1,
            offset: 4,
        });
        let s = r.subscribe("t", &"gw", 6, other_epoch, now);
        assert_eq!((s.replay, s.position.offset), (None, 5));
    }

    #[test]
    fn recreated_topics_get_a_new_epoch() {
        let mut r = registry();
        let first = sub(&mut r, "t", "gw1", 1);
        publish(&mut r, "t");
        assert!(r.unsubscribe("t", &"gw1", 1));
        let t = Instant::now() + Duration::from_secs(301);
        r.expire(t);
        assert_eq!(r.topic_count(), 0);
        let second = r.subscribe("t", &"gw1", 1, None, t).position;
        assert_ne!(first.epoch, second.epoch);
        assert_eq!(second.offset, 0);
    }

    #[test]
    fn unsubscribe_keeps_other_gateways() {
        let mut r = registry();
        sub(&mut r, "t", "gw1", 1);
        sub(&mut r, "t", "gw2", 2);
        assert!(r.unsubscribe("t", &"gw1", 1));
        assert!(
            !r.unsubscribe("t", &"gw1", 1),
            "second unsubscribe is a no-op"
        );
        assert_eq!(publish(&mut r, "t").1, ["gw2"]);
    }

    #[test]
    fn dropping_a_gateway_removes_all_its_subscriptions() {
        let mut r = registry();
        for topic in ["a", "b", "c"] {
            sub(&mut r, topic, "gone", 1);
            sub(&mut r, topic, "gone", 2);
        }
        sub(&mut r, "b", "stays", 9);
        assert_eq!(r.drop_gateway(&"gone"), 6);
        assert_eq!(r.topic_count(), 1);
        assert_eq!(r.subscription_count(), 1);
        assert_eq!(publish(&mut r, "b").1, ["stays"]);
    }

    #[test]
    fn duplicate_subscribe_counts_once() {
        let mut r = registry();
        sub(&mut r, "t", "gw", 1);
        sub(&mut r, "t", "gw", 1);
        assert_eq!(r.subscription_count(), 1);
    }

    #[test]
    fn a_handoff_continues_the_numbering_in_the_same_epoch() {
        let mut old = registry();
        let start = sub(&mut old, "t", "gw", 1);
        for _ in 0..3 {
            publish(&mut old, "t");
        }
        let now = Instant::now();
        let handed = old.take("t", now, |g| g.to_string()).unwrap();
        assert_eq!(
            (handed.offset, handed.log.len(), handed.gateways),
            (3, 3, vec!["gw"])
        );
        assert_eq!(
            (old.topic_count(), old.subscription_count(), old.logged()),
            (0, 0, (0, 0))
        );

        let mut new = TopicRegistry::<&str>::new(EpochSource::new(99), LogLimits::default());
        assert!(new.install(
            "t",
            handed.epoch,
            handed.offset,
            handed.log,
            (Vec::new(), false),
            now
        ));
        let from = Some(Position {
            epoch: start.epoch,
            offset: 1,
        });
        let s = new.subscribe("t", &"gw", 1, from, now);
        let replayed: Vec<u64> = s.replay.unwrap().iter().map(|m| m.offset).collect();
        assert_eq!(replayed, [2, 3]);
        assert_eq!(
            publish(&mut new, "t").0,
            Position {
                epoch: start.epoch,
                offset: 4
            }
        );
        assert!(
            !new.install("t", 1, 1, Vec::new(), (Vec::new(), false), now),
            "never over an existing topic"
        );
    }

    #[test]
    fn presence_follows_subscriptions_streams_and_handoffs() {
        let now = Instant::now();
        let mut old = registry();
        let empty = old.held_bytes();
        sub(&mut old, "t", "gw-a", 1);
        sub(&mut old, "t", "gw-b", 2);
        old.track("t", &"gw-a", 1, "alice", "{}".into()).unwrap();
        old.track("t", &"gw-b", 2, "bob", r#"{"x":1}"#.into())
            .unwrap();
        assert!(old.held_bytes() > empty);
        let news = old.flush_presence(now);
        assert_eq!(news.len(), 1);
        let (topic, event, _, gateways) = &news[0];
        assert_eq!(
            (topic.as_str(), *event, gateways.len()),
            ("t", "presence_diff", 2)
        );
        assert!(old.flush_presence(now).is_empty(), "flushed");
        // A stream's end: its entries leave.
        old.drop_gateway(&"gw-b");
        let news = old.flush_presence(now);
        assert!(news[0].2.contains(r#""leaves":{"bob""#), "{}", news[0].2);
        // Handed over with the topic, adopted by the gateway's move: no news.
        sub(&mut old, "t", "gw-b", 3);
        old.track("t", &"gw-b", 3, "carol", "{}".into()).unwrap();
        let handed = old.take("t", now, |g| g.to_string()).unwrap();
        assert!(
            handed.presence_flush.is_some(),
            "carol's join goes out first"
        );
        assert_eq!(handed.presence.len(), 2);
        assert_eq!(old.held_bytes(), empty);
        let mut new = TopicRegistry::<&str>::new(EpochSource::new(99), LogLimits::default());
        assert!(new.install(
            "t",
            handed.epoch,
            handed.offset,
            handed.log,
            (handed.presence, handed.presence_counted),
            now
        ));
        assert!(new.flush_presence(now).is_empty());
        new.subscribe("t", &"link-7", 1, None, now);
        new.adopt("t", &"link-7", "gw-a", 1);
        assert!(String::from_utf8_lossy(&new.presence_snapshot("t").1).contains("alice"));
        // Carol's gateway never moves her: she leaves once the wait is over.
        new.expire(now + crate::presence::ADOPT_WITHIN);
        let news = new.flush_presence(now);
        assert!(news[0].2.contains(r#""leaves":{"carol""#), "{}", news[0].2);
        // Alice leaves with her subscription; the topic goes, and its bytes with it.
        new.unsubscribe("t", &"link-7", 1);
        assert_eq!(new.topic_count(), 0);
        assert_eq!(new.held_bytes(), 0);
    }

    #[test]
    fn an_idempotency_key_orders_a_message_once_within_its_window() {
        let mut r: TopicRegistry<u8> =
            TopicRegistry::new(EpochSource::new(1), LogLimits::default());
        let t0 = Instant::now();
        let body = Bytes::from_static(b"1");
        let first = r.publish("t", "e", &body, Some("k"), t0).position;
        let again = r.publish("t", "e", &body, Some("k"), t0 + Duration::from_secs(60));
        assert!(again.repeated);
        assert_eq!(again.position, first);
        let other = r.publish("t", "e", &body, Some("k2"), t0).position;
        assert_eq!(other.offset, first.offset + 1);
        let later = r.publish("t", "e", &body, Some("k"), t0 + Duration::from_secs(301));
        assert!(!later.repeated, "the window passed");
        assert_eq!(later.position.offset, other.offset + 1);
    }

    #[test]
    fn idempotency_keys_count_as_held_bytes_and_go_with_their_topic() {
        let mut r: TopicRegistry<u8> =
            TopicRegistry::new(EpochSource::new(1), LogLimits::default());
        let t0 = Instant::now();
        let body = Bytes::from_static(b"1");
        // The same messages without keys, side by side.
        let mut plain: TopicRegistry<u8> =
            TopicRegistry::new(EpochSource::new(1), LogLimits::default());
        for r in [&mut r, &mut plain] {
            r.subscribe("t", &1, 1, None, t0);
        }
        for i in 0..KEYS_MAX + 10 {
            r.publish("t", "e", &body, Some(&format!("key-{i:04}")), t0);
            plain.publish("t", "e", &body, None, t0);
        }
        let keys = r.held_bytes() - plain.held_bytes();
        assert_eq!(
            keys,
            KEYS_MAX * key_bytes("key-0000"),
            "only the last KEYS_MAX"
        );
        r.unsubscribe("t", &1, 1);
        r.expire(t0 + Duration::from_secs(3600));
        assert_eq!(r.topic_count(), 0);
        assert_eq!(r.held_bytes(), 0, "gone with the topic");
    }

    #[test]
    fn history_is_all_or_nothing_and_bounded() {
        let limits = LogLimits {
            messages: 3,
            ..LogLimits::default()
        };
        let mut r: TopicRegistry<u8> = TopicRegistry::new(EpochSource::new(1), limits);
        let t0 = Instant::now();
        for n in 1..=5u8 {
            r.publish("t", "e", &Bytes::from(vec![b'0' + n]), None, t0);
        }
        let epoch = r.position("t").unwrap().epoch;
        let at = |offset| Some(Position { epoch, offset });
        let offsets = |h: History| {
            h.messages
                .map(|m| m.iter().map(|m| m.offset).collect::<Vec<_>>())
        };
        assert_eq!(
            offsets(r.history("t", None, 10)),
            Some(vec![3, 4, 5]),
            "the whole log"
        );
        assert_eq!(offsets(r.history("t", at(2), 10)), Some(vec![3, 4, 5]));
        assert_eq!(offsets(r.history("t", at(3), 1)), Some(vec![4]), "limited");
        assert_eq!(offsets(r.history("t", at(1), 10)), None, "offset 2 is gone");
        assert_eq!(offsets(r.history("t", at(5), 10)), Some(vec![]));
        let other_epoch = Some(Position {
            epoch: epoch + 1,
            offset: 4,
        });
        assert_eq!(offsets(r.history("t", other_epoch, 10)), None);
        let absent = r.history("nope", None, 10);
        assert_eq!((absent.position.epoch, absent.messages), (0, Some(vec![])));
        let info = r.info("t").unwrap();
        assert_eq!(
            (info.position.offset, info.log_messages, info.subscribers),
            (5, 3, 0)
        );
        assert!(r.info("nope").is_none());
    }
}
