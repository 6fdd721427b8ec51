//! The topic registry: every owned topic's epoch, offset and subscribers grouped by gateway.
//!
//! Plain data, no IO: the service wraps shards of it in locks and turns what it returns
//! into stream messages. A topic exists while it has subscribers.

use std::collections::{HashMap, HashSet};

/// A gateway-local subscriber id, chosen by the gateway.
pub type SubscriberId = u64;

/// Where a topic's message stream stands: its epoch and the offset of its last message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

/// Makes a fresh epoch for every topic state created, so that a recreated topic (after a
/// restart, or after its last subscriber left) is never mistaken for the old one.
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
}

impl<G> Topic<G> {
    fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.offset,
        }
    }

    fn is_empty(&self) -> bool {
        self.gateways.is_empty()
    }
}

/// A message accepted by [`TopicRegistry::publish`]: its position and the gateways to send
/// it to, one delivery each.
#[derive(Debug)]
pub struct Published<'a, G> {
    pub position: Position,
    pub gateways: Vec<&'a G>,
}

/// The topics of one shard. `G` identifies a gateway's stream (cheap to clone and compare).
#[derive(Debug)]
pub struct TopicRegistry<G> {
    topics: HashMap<String, Topic<G>>,
    epochs: EpochSource,
    subscriptions: usize,
}

impl<G: PartialEq + Clone> TopicRegistry<G> {
    pub fn new(epochs: EpochSource) -> Self {
        TopicRegistry {
            topics: HashMap::new(),
            epochs,
            subscriptions: 0,
        }
    }

    /// Adds `subscriber` of `gateway` to `topic`, creating the topic with a new epoch if
    /// needed. Returns the position before the subscriber's first delivery. Subscribing
    /// twice is harmless.
    pub fn subscribe(&mut self, topic: &str, gateway: &G, subscriber: SubscriberId) -> Position {
        let state = match self.topics.get_mut(topic) {
            Some(state) => state,
            None => {
                let epoch = self.epochs.next();
                self.topics.entry(topic.to_owned()).or_insert(Topic {
                    epoch,
                    offset: 0,
                    gateways: Vec::new(),
                })
            }
        };
        let set = match state.gateways.iter_mut().position(|(g, _)| g == gateway) {
            Some(i) => &mut state.gateways[i].1,
            None => {
                state.gateways.push((gateway.clone(), HashSet::new()));
                &mut state.gateways.last_mut().expect("just pushed").1
            }
        };
        if set.insert(subscriber) {
            self.subscriptions += 1;
        }
        state.position()
    }

    /// Removes one subscriber; drops the topic when nobody is left. Returns whether it was
    /// subscribed.
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
        if state.is_empty() {
            self.topics.remove(topic);
        }
        removed
    }

    /// Appends a message to `topic`: the next offset, and the gateways with subscribers.
    /// `None` when the topic has no subscribers (nobody would receive it).
    pub fn publish(&mut self, topic: &str) -> Option<Published<'_, G>> {
        let state = self.topics.get_mut(topic)?;
        state.offset += 1;
        Some(Published {
            position: state.position(),
            gateways: state.gateways.iter().map(|(g, _)| g).collect(),
        })
    }

    /// Drops every subscription held by `gateway` (its stream ended). Returns how many.
    pub fn drop_gateway(&mut self, gateway: &G) -> usize {
        let mut dropped = 0;
        self.topics.retain(|_, state| {
            if let Some(i) = state.gateways.iter().position(|(g, _)| g == gateway) {
                dropped += state.gateways.swap_remove(i).1.len();
            }
            !state.is_empty()
        });
        self.subscriptions -= dropped;
        dropped
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> TopicRegistry<&'static str> {
        TopicRegistry::new(EpochSource::new(7))
    }

    #[test]
    fn fan_out_is_one_entry_per_gateway_not_per_subscriber() {
        let mut r = registry();
        r.subscribe("t", &"gw1", 1);
        for sub in 0..500 {
            r.subscribe("t", &"gw2", 100 + sub);
        }
        let published = r.publish("t").unwrap();
        let mut gateways: Vec<&str> = published.gateways.iter().map(|g| **g).collect();
        gateways.sort();
        assert_eq!(gateways, ["gw1", "gw2"]);
        assert_eq!(r.subscription_count(), 501);
    }

    #[test]
    fn offsets_are_one_total_order_per_topic() {
        let mut r = registry();
        let joined = r.subscribe("a", &"gw1", 1);
        assert_eq!(joined.offset, 0);
        r.subscribe("b", &"gw1", 2);
        let offsets: Vec<u64> = (0..5)
            .map(|_| r.publish("a").unwrap().position.offset)
            .collect();
        assert_eq!(offsets, [1, 2, 3, 4, 5]);
        assert_eq!(
            r.publish("b").unwrap().position.offset,
            1,
            "topics count independently"
        );
        let later = r.subscribe("a", &"gw2", 3);
        assert_eq!(
            later,
            Position {
                epoch: joined.epoch,
                offset: 5
            }
        );
    }

    #[test]
    fn a_topic_with_no_subscribers_takes_no_messages() {
        let mut r = registry();
        assert!(r.publish("nobody").is_none());
        assert_eq!(r.topic_count(), 0);
    }

    #[test]
    fn recreated_topics_get_a_new_epoch() {
        let mut r = registry();
        let first = r.subscribe("t", &"gw1", 1);
        r.publish("t");
        assert!(r.unsubscribe("t", &"gw1", 1));
        assert_eq!(r.topic_count(), 0);
        let second = r.subscribe("t", &"gw1", 1);
        assert_ne!(first.epoch, second.epoch);
        assert_eq!(second.offset, 0);
    }

    #[test]
    fn unsubscribe_keeps_other_gateways() {
        let mut r = registry();
        r.subscribe("t", &"gw1", 1);
        r.subscribe("t", &"gw2", 2);
        assert!(r.unsubscribe("t", &"gw1", 1));
        assert!(
            !r.unsubscribe("t", &"gw1", 1),
            "second unsubscribe is a no-op"
        );
        assert_eq!(r.publish("t").unwrap().gateways, [&"gw2"]);
    }

    #[test]
    fn dropping_a_gateway_removes_all_its_subscriptions() {
        let mut r = registry();
        for topic in ["a", "b", "c"] {
            r.subscribe(topic, &"gone", 1);
            r.subscribe(topic, &"gone", 2);
        }
        r.subscribe("b", &"stays", 9);
        assert_eq!(r.drop_gateway(&"gone"), 6);
        assert_eq!(r.topic_count(), 1);
        assert_eq!(r.subscription_count(), 1);
        assert_eq!(r.publish("b").unwrap().gateways, [&"stays"]);
    }

    #[test]
    fn duplicate_subscribe_counts_once() {
        let mut r = registry();
        r.subscribe("t", &"gw", 1);
        r.subscribe("t", &"gw", 1);
        assert_eq!(r.subscription_count(), 1);
    }
}
