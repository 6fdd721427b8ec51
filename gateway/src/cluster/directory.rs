//! The gateway's cluster decisions, as plain data: which node a request goes to, which local
//! topics move when the ring changes, what is retried and until when, which links close.
//!
//! No IO and no clock of its own: the driver feeds it events with the time ([`Directory::
//! on_ring`], [`Directory::on_event`], [`Directory::on_send_failed`], [`Directory::on_tick`])
//! and carries out the [`Action`]s it returns. Where a topic's feed is attached is read from
//! the local index through [`Feeds`].

use super::request::{Api, Join, Move, Pending, Reply};
use crate::conn::{ChannelEvent, ConnHandle};
use crate::index::{LocalSub, Position};
use ringcast_ring::{NodeSpec, Ring};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a refused or undeliverable request is tried again before the client is told, and
/// how long a departed node's link stays open for its topics to move away.
pub const RETRY_FOR: Duration = Duration::from_secs(10);
/// How often the feeds of a departed node are looked at while it drains.
const DRAIN_CHECK: Duration = Duration::from_millis(100);
/// The node id of the topic-server core embedded in a gateway with no ring.
pub const EMBEDDED_NODE: &str = "local";

/// Where the local index has each topic's feed (read-only).
pub trait Feeds: Send + Sync {
    /// The node `topic`'s feed is attached at and the last position it delivered.
    fn feed(&self, topic: &str) -> Option<(Arc<str>, Position)>;
    /// The subscriber ids of `topic`'s feed.
    fn subs(&self, topic: &str) -> Vec<u64>;
    /// Every feed: topic, node, subscriber ids.
    fn feeds(&self) -> Vec<(String, Arc<str>, Vec<u64>)>;
    /// Whether any feed is attached at `node`.
    fn has_node(&self, node: &str) -> bool;
}

/// What a link reports that needs a decision.
#[derive(Debug)]
pub enum LinkEvent {
    /// A join could not be completed at `node` (the ring or the topic's feed moved while it
    /// was in flight); its subscription there is undone already.
    JoinStale { join: Join },
    /// A join completed at `node`, which no longer owns the topic: its feed must move.
    FeedOffOwner { topic: String, node: Arc<str> },
    /// A move to `node` was accepted and its feed re-attached there (`attached`: the feed's
    /// subscribers now; `None`: the feed was gone or had moved on).
    MoveDone {
        mv: Move,
        node: Arc<str>,
        attached: Option<Vec<u64>>,
    },
    /// A move to `node` was accepted but the numbering could not continue (the previous
    /// owner was lost): the feed's subscribers, removed from the index (at the node they
    /// were attached at), are to be told.
    MoveNotContinued {
        mv: Move,
        node: Arc<str>,
        interrupted: Option<(Arc<str>, Vec<LocalSub>)>,
    },
    /// `node` answered that it does not own the request's topic under ring `version`.
    WrongOwner { request: Pending, version: u64 },
    /// `node` refused the request.
    Rejected { request: Pending, reason: String },
    /// `node` handed `topic` to its owner under ring `version`: its subscriptions there are gone.
    Moved {
        node: Arc<str>,
        topic: String,
        version: u64,
    },
    /// A gap in `topic`'s stream from `node`: its subscribers, removed from the index.
    Gap {
        topic: String,
        node: Arc<str>,
        subs: Vec<LocalSub>,
    },
    /// A link's stream ended: the requests it had not answered, and the subscribers of
    /// the feeds attached there (removed from the index). `stopping`: the link was closed
    /// for good.
    Down {
        pending: Vec<Pending>,
        interrupted: Vec<(String, LocalSub)>,
        stopping: bool,
    },
}

/// What the driver does for the directory.
#[derive(Debug)]
pub enum Action {
    /// Install a new ring: connect `connect`, drop the links of `remove` from the routing
    /// table (they stay open until closed), then make `ring` the ring in force.
    ApplyRing {
        ring: Arc<Ring>,
        connect: Vec<NodeSpec>,
        remove: Vec<String>,
    },
    /// Send `request` on the link to `node`; if the link cannot take it, hand it back with
    /// `retry` ([`Directory::on_send_failed`]).
    Send {
        node: Arc<str>,
        request: Pending,
        retry: Option<Retry>,
    },
    /// Remove `topic`'s feed from the index and interrupt its subscribers (`InterruptSubs`).
    InterruptTopic { topic: String, reason: &'static str },
    /// Tell each subscriber its channel is interrupted and drop its subscription at `node`.
    InterruptSubs {
        topic: String,
        node: Arc<str>,
        subs: Vec<LocalSub>,
        reason: &'static str,
    },
    /// Drop subscription `sub` of `topic` at `node`.
    Unsubscribe {
        node: Arc<str>,
        topic: String,
        sub: u64,
    },
    /// Tell a connection about one of its channels.
    Tell {
        conn: ConnHandle,
        event: ChannelEvent,
    },
    /// Tell a publisher (a client or an API call) its publish was not ordered.
    RefusePublish { reply: Reply, reason: String },
    /// Tell an API call it could not be answered.
    RefuseApi { api: Api, reason: String },
    /// Close the link to a node that left the ring.
    Close(Arc<str>),
}

/// Where a request being tried again stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    attempt: u32,
    /// Not sent again before the gateway's ring is at least this version.
    wanted_version: u64,
    /// Given up on (the client is told) after this.
    deadline: Instant,
}

/// A request waiting to be tried again at `at`.
#[derive(Debug)]
struct Waiting {
    at: Instant,
    request: Pending,
    retry: Retry,
}

/// A feed whose node handed its topic away under a ring this gateway has not read yet.
#[derive(Debug, Clone)]
struct HandedOff {
    node: Arc<str>,
    version: u64,
    deadline: Instant,
}

/// The ring in force, the moves and retries in flight, the links draining.
#[derive(Debug)]
pub struct Directory {
    /// `None`: no ring, every topic is served by the embedded core.
    ring: Option<Arc<Ring>>,
    /// Topics whose feed is moving to a new node.
    moves: HashSet<String>,
    retries: Vec<Waiting>,
    handed_off: BTreeMap<String, HandedOff>,
    /// Nodes that left the ring, by when their links close at the latest.
    draining: HashMap<Arc<str>, Instant>,
    /// When the draining links are looked at next.
    drain_check: Option<Instant>,
}

/// 50 ms doubling to 1 s: between tries of a request the ring does not place yet.
pub fn retry_backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(1000))
}

impl Directory {
    pub fn new(ring: Option<Arc<Ring>>) -> Directory {
        Directory {
            ring,
            moves: HashSet::new(),
            retries: Vec::new(),
            handed_off: BTreeMap::new(),
            draining: HashMap::new(),
            drain_check: None,
        }
    }

    /// The ring version in force (0 without a ring).
    pub fn version(&self) -> u64 {
        self.ring.as_ref().map_or(0, |r| r.version())
    }

    /// Topics whose feed is moving now.
    pub fn moving(&self) -> usize {
        self.moves.len()
    }

    /// The node that owns `topic` under the ring in force.
    pub fn owner(&self, topic: &str) -> Arc<str> {
        owner(self.ring.as_deref(), topic)
    }

    /// The earliest time [`Directory::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let retries = self.retries.iter().map(|w| w.at);
        let handed_off = self.handed_off.values().map(|h| h.deadline);
        let draining = self.draining.values().copied();
        retries
            .chain(handed_off)
            .chain(draining)
            .chain(self.drain_check)
            .min()
    }

    /// A newer ring: its links are connected, and every local topic whose owner changed
    /// moves to its new owner. Links of nodes that left close once nothing is attached there.
    pub fn on_ring(&mut self, ring: Arc<Ring>, now: Instant, feeds: &dyn Feeds) -> Vec<Action> {
        let Some(old) = self.ring.clone() else {
            return Vec::new();
        };
        if ring.version() <= old.version() {
            return Vec::new();
        }
        let plan = LinkPlan::between(&old, &ring);
        // Links of nodes that left (or changed address) stay open until their topics moved.
        for node in &plan.remove {
            self.draining.insert(node.as_str().into(), now + RETRY_FOR);
        }
        let mut actions = vec![Action::ApplyRing {
            ring: ring.clone(),
            connect: plan.add,
            remove: plan.remove,
        }];
        let from = old.version();
        self.ring = Some(ring.clone());
        let mut moving = 0;
        for (topic, node, subs) in feeds.feeds() {
            if ring.owner(&topic).id != *node {
                moving += 1;
                self.start_move(&topic, &node, subs, false, feeds, &mut actions);
            }
        }
        tracing::info!(from, to = ring.version(), moving, "gateway on new ring");
        // Feeds whose node moved them under this ring (or an older one) follow now.
        let ready: Vec<String> = self
            .handed_off
            .iter()
            .filter(|(_, h)| h.version <= ring.version())
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in ready {
            self.resolve_handoff(&topic, feeds, &mut actions);
        }
        self.check_draining(now, feeds, &mut actions);
        actions
    }

    /// Decides what a link's report means.
    pub fn on_event(&mut self, event: LinkEvent, now: Instant, feeds: &dyn Feeds) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            LinkEvent::JoinStale { join } => self.retry(Pending::Join(join), 0, now),
            LinkEvent::FeedOffOwner { topic, node } => {
                let subs = feeds.subs(&topic);
                self.start_move(&topic, &node, subs, false, feeds, &mut actions);
            }
            LinkEvent::MoveDone { mv, node, attached } => {
                self.moves.remove(&mv.topic);
                self.move_done(mv, node, attached, feeds, &mut actions);
            }
            LinkEvent::MoveNotContinued {
                mv,
                node,
                interrupted,
            } => {
                self.moves.remove(&mv.topic);
                tracing::warn!(topic = %mv.topic, from = %mv.from_node, to = %node, "moved topic could not be continued");
                if let Some((at, subs)) = interrupted {
                    actions.push(Action::InterruptSubs {
                        topic: mv.topic.clone(),
                        node: at,
                        subs,
                        reason: "topic moved",
                    });
                }
                unsubscribe_all(&node, &mv.topic, &mv.subs, &mut actions);
            }
            LinkEvent::WrongOwner { request, version } => self.retry(request, version, now),
            LinkEvent::Rejected { request, reason } => self.fail(request, &reason, &mut actions),
            LinkEvent::Moved {
                node,
                topic,
                version,
            } => {
                if feeds.feed(&topic).is_some_and(|(at, _)| at == node) {
                    self.handed_off.insert(
                        topic.clone(),
                        HandedOff {
                            node,
                            version,
                            deadline: now + RETRY_FOR,
                        },
                    );
                    if version <= self.version() {
                        self.resolve_handoff(&topic, feeds, &mut actions);
                    }
                }
            }
            LinkEvent::Gap { topic, node, subs } => actions.push(Action::InterruptSubs {
                topic,
                node,
                subs,
                reason: "gap detected",
            }),
            LinkEvent::Down {
                pending,
                interrupted,
                stopping,
            } => {
                for request in pending {
                    match request {
                        Pending::Move(mv) if !stopping => self.retry(Pending::Move(mv), 0, now),
                        request => self.fail(request, "unavailable", &mut actions),
                    }
                }
                for (topic, entry) in interrupted {
                    actions.push(Action::Tell {
                        conn: entry.conn,
                        event: ChannelEvent::Interrupted {
                            topic,
                            sub: entry.sub,
                            reason: "topic server unavailable",
                        },
                    });
                }
            }
        }
        self.check_draining(now, feeds, &mut actions);
        actions
    }

    /// A link could not take `request` (its node is not connected, or its queue is full).
    pub fn on_send_failed(&mut self, request: Pending, retry: Option<Retry>, now: Instant) {
        match retry {
            None => self.retry(request, 0, now),
            Some(retry) => self.wait(request, retry, now),
        }
    }

    /// Carries out what is due at `now`: requests tried again, handed-off feeds that waited
    /// long enough for their ring, links that finished draining.
    pub fn on_tick(&mut self, now: Instant, feeds: &dyn Feeds) -> Vec<Action> {
        let mut actions = Vec::new();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|w| w.at <= now);
        self.retries = later;
        for Waiting { request, retry, .. } in due {
            if now >= retry.deadline {
                self.fail(request, "unavailable", &mut actions);
            } else if self.version() < retry.wanted_version {
                self.wait(request, retry, now);
            } else {
                self.dispatch(request, Some(retry), feeds, &mut actions);
            }
        }
        let expired: Vec<String> = self
            .handed_off
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in expired {
            self.resolve_handoff(&topic, feeds, &mut actions);
        }
        self.check_draining(now, feeds, &mut actions);
        actions
    }

    /// Where a new join of `topic` goes ([`join_target`]).
    pub fn join_target(&self, topic: &str, feeds: &dyn Feeds) -> Arc<str> {
        join_target(self.ring.as_deref(), topic, feeds)
    }

    /// Moves `subs` of `topic` (attached at `from_node`) to the topic's owner, unless the feed
    /// is elsewhere now or a move of the topic is already under way.
    fn start_move(
        &mut self,
        topic: &str,
        from_node: &Arc<str>,
        subs: Vec<u64>,
        top_up: bool,
        feeds: &dyn Feeds,
        actions: &mut Vec<Action>,
    ) {
        let Some((node, from)) = feeds.feed(topic) else {
            return;
        };
        if node != *from_node || !self.moves.insert(topic.to_owned()) {
            return;
        }
        let mv = Move {
            topic: topic.to_owned(),
            subs,
            from_node: from_node.clone(),
            from,
            top_up,
            replay: Vec::new(),
        };
        self.dispatch(Pending::Move(mv), None, feeds, actions);
    }

    /// Sends `request` to the node its topic goes to now: the topic's feed for a join, the
    /// owner otherwise; a move only while its feed is still where it was (from the feed's
    /// position now).
    fn dispatch(
        &mut self,
        request: Pending,
        retry: Option<Retry>,
        feeds: &dyn Feeds,
        actions: &mut Vec<Action>,
    ) {
        let node = match &request {
            Pending::Join(j) => self.join_target(&j.topic, feeds),
            Pending::Move(mv) if mv.top_up => mv.from_node.clone(),
            _ => self.owner(request.topic()),
        };
        let request = match request {
            Pending::Move(mut mv) => match feeds.feed(&mv.topic) {
                Some((at, from)) if at == mv.from_node => {
                    mv.from = from;
                    Pending::Move(mv)
                }
                // The feed is gone, or moved on meanwhile: nothing left to move.
                _ => {
                    self.moves.remove(&mv.topic);
                    return;
                }
            },
            other => other,
        };
        actions.push(Action::Send {
            node,
            request,
            retry,
        });
    }

    /// Tries `request` again after a backoff, once the ring is at least `wanted_version`,
    /// for up to [`RETRY_FOR`].
    fn retry(&mut self, request: Pending, wanted_version: u64, now: Instant) {
        let retry = Retry {
            attempt: 0,
            wanted_version,
            deadline: now + RETRY_FOR,
        };
        self.retries.push(Waiting {
            at: now + retry_backoff(0),
            request,
            retry,
        });
    }

    /// Waits one more backoff before trying `request` again.
    fn wait(&mut self, request: Pending, mut retry: Retry, now: Instant) {
        retry.attempt += 1;
        self.retries.push(Waiting {
            at: now + retry_backoff(retry.attempt),
            request,
            retry,
        });
    }

    /// Gives up on `request`: its client is told.
    fn fail(&mut self, request: Pending, reason: &str, actions: &mut Vec<Action>) {
        match request {
            Pending::Join(j) => actions.push(Action::Tell {
                conn: j.conn,
                event: ChannelEvent::JoinFailed {
                    topic: j.topic,
                    sub: j.sub,
                    reason: reason.to_owned(),
                },
            }),
            Pending::Publish(p) => actions.push(Action::RefusePublish {
                reply: p.reply,
                reason: reason.to_owned(),
            }),
            Pending::Api(api) => actions.push(Action::RefuseApi {
                api,
                reason: reason.to_owned(),
            }),
            Pending::Track { reply, .. } => actions.push(Action::RefusePublish {
                reply,
                reason: reason.to_owned(),
            }),
            Pending::Move(mv) => {
                // The subscribers stay where they were, which is not the owner any more:
                // interrupt them (they rejoin at the owner) rather than starve them.
                self.moves.remove(&mv.topic);
                actions.push(Action::InterruptTopic {
                    topic: mv.topic,
                    reason: "topic moved",
                });
            }
            Pending::Unsubscribe { .. } => {}
        }
    }

    /// A move to `node` completed: the subscribers are released where they came from, and
    /// those that joined the feed at its old node meanwhile follow it.
    fn move_done(
        &mut self,
        mv: Move,
        node: Arc<str>,
        attached: Option<Vec<u64>>,
        feeds: &dyn Feeds,
        actions: &mut Vec<Action>,
    ) {
        let Some(attached) = attached else {
            // Everyone left meanwhile (or the feed was interrupted): nothing to keep there.
            unsubscribe_all(&node, &mv.topic, &mv.subs, actions);
            return;
        };
        let gone: Vec<u64> = mv
            .subs
            .iter()
            .copied()
            .filter(|s| !attached.contains(s))
            .collect();
        unsubscribe_all(&node, &mv.topic, &gone, actions);
        if mv.top_up {
            return;
        }
        if mv.from_node != node {
            unsubscribe_all(&mv.from_node, &mv.topic, &attached, actions);
        }
        let stragglers: Vec<u64> = attached
            .into_iter()
            .filter(|s| !mv.subs.contains(s))
            .collect();
        if !stragglers.is_empty() {
            // Joined at the old node after the move was sent: subscribed at the new one too.
            self.start_move(&mv.topic, &node, stragglers, true, feeds, actions);
        }
    }

    /// A feed whose node handed its topic away: it follows the topic if this gateway's ring
    /// has caught up, or is interrupted (`topic moved`) if it did not in time.
    fn resolve_handoff(&mut self, topic: &str, feeds: &dyn Feeds, actions: &mut Vec<Action>) {
        let Some(h) = self.handed_off.remove(topic) else {
            return;
        };
        if feeds.feed(topic).is_none_or(|(at, _)| at != h.node) || self.moves.contains(topic) {
            return;
        }
        if self.version() >= h.version {
            // Re-attach the feed wherever the ring puts the topic now (even the same node:
            // it fetches the topic back and continues the numbering).
            let subs = feeds.subs(topic);
            self.start_move(topic, &h.node, subs, false, feeds, actions);
        } else {
            tracing::warn!(%topic, version = h.version, "topic moved under a ring this gateway has not read: interrupting its channels");
            actions.push(Action::InterruptTopic {
                topic: topic.to_owned(),
                reason: "topic moved",
            });
        }
    }

    /// Closes the links of departed nodes once no feed is attached there, or at their deadline.
    fn check_draining(&mut self, now: Instant, feeds: &dyn Feeds, actions: &mut Vec<Action>) {
        self.draining.retain(|node, deadline| {
            let done = now >= *deadline || !feeds.has_node(node);
            if done {
                tracing::info!(%node, "node left the ring: link closed");
                actions.push(Action::Close(node.clone()));
            }
            !done
        });
        self.drain_check = (!self.draining.is_empty()).then(|| now + DRAIN_CHECK);
    }
}

/// Where a new join of `topic` goes: to the node its local feed is attached at (one ordered
/// stream serves all of a topic's local subscribers, even during a move), else to its owner.
pub fn join_target(ring: Option<&Ring>, topic: &str, feeds: &dyn Feeds) -> Arc<str> {
    feeds
        .feed(topic)
        .map_or_else(|| owner(ring, topic), |(node, _)| node)
}

/// The owner of `topic`: under `ring`, or the embedded core without one.
pub fn owner(ring: Option<&Ring>, topic: &str) -> Arc<str> {
    match ring {
        Some(ring) => ring.owner(topic).id.as_str().into(),
        None => EMBEDDED_NODE.into(),
    }
}

fn unsubscribe_all(node: &Arc<str>, topic: &str, subs: &[u64], actions: &mut Vec<Action>) {
    for &sub in subs {
        actions.push(Action::Unsubscribe {
            node: node.clone(),
            topic: topic.to_owned(),
            sub,
        });
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

#[cfg(test)]
mod tests {
    //! Scenarios as lists of operations against the directory, with a fake index and a
    //! clock: each returns the actions, written out, that the driver would carry out.

    use super::*;
    use crate::index::GroupKey;

    /// The fake index: topic -> (node, offset, subscribers).
    #[derive(Default)]
    struct FakeFeeds(BTreeMap<String, (Arc<str>, u64, Vec<u64>)>);

    impl Feeds for FakeFeeds {
        fn feed(&self, topic: &str) -> Option<(Arc<str>, Position)> {
            let (node, offset, _) = self.0.get(topic)?;
            Some((
                node.clone(),
                Position {
                    epoch: 1,
                    offset: *offset,
                },
            ))
        }
        fn subs(&self, topic: &str) -> Vec<u64> {
            self.0.get(topic).map(|f| f.2.clone()).unwrap_or_default()
        }
        fn feeds(&self) -> Vec<(String, Arc<str>, Vec<u64>)> {
            self.0
                .iter()
                .map(|(t, (n, _, s))| (t.clone(), n.clone(), s.clone()))
                .collect()
        }
        fn has_node(&self, node: &str) -> bool {
            self.0.values().any(|(n, _, _)| &**n == node)
        }
    }

    fn ring(version: u64, nodes: &[&str]) -> Arc<Ring> {
        let mut text = format!("version = {version}\n");
        for id in nodes {
            text.push_str(&format!("[[nodes]]\nid = \"{id}\"\naddr = \"{id}:7000\"\n"));
        }
        Arc::new(Ring::from_toml(&text).unwrap())
    }

    /// A topic that `owner` owns under `ring` and `then` under `next`.
    fn topic_moving(ring: &Ring, owner: &str, next: &Ring, then: &str) -> String {
        (0..10_000)
            .map(|i| format!("t{i}"))
            .find(|t| ring.owner(t).id == owner && next.owner(t).id == then)
            .expect("some topic moves that way")
    }

    /// The directory, the fake index and the clock of one scenario.
    struct Scenario {
        directory: Directory,
        feeds: FakeFeeds,
        start: Instant,
        now: Instant,
        /// Nodes whose links refuse requests (not connected).
        down: HashSet<String>,
        log: Vec<String>,
    }

    impl Scenario {
        fn new(ring: Arc<Ring>) -> Scenario {
            let start = Instant::now();
            Scenario {
                directory: Directory::new(Some(ring)),
                feeds: FakeFeeds::default(),
                start,
                now: start,
                down: HashSet::new(),
                log: Vec::new(),
            }
        }

        fn feed(&mut self, topic: &str, node: &str, offset: u64, subs: &[u64]) {
            self.feeds
                .0
                .insert(topic.into(), (node.into(), offset, subs.to_vec()));
        }

        /// Carries out actions as the driver does: a send to a node that is down goes back.
        fn carry_out(&mut self, actions: Vec<Action>) {
            for action in actions {
                let line = describe(&action);
                if let Action::Send {
                    node,
                    request,
                    retry,
                } = action
                    && self.down.contains(&*node)
                {
                    self.log.push(format!("{line} (refused: link down)"));
                    self.directory.on_send_failed(request, retry, self.now);
                    continue;
                }
                self.log.push(line);
            }
        }

        fn ring(&mut self, ring: Arc<Ring>) {
            let actions = self.directory.on_ring(ring, self.now, &self.feeds);
            self.carry_out(actions);
        }

        fn event(&mut self, event: LinkEvent) {
            let actions = self.directory.on_event(event, self.now, &self.feeds);
            self.carry_out(actions);
        }

        /// Moves the clock to `ms` after the start and ticks if anything is due.
        fn at(&mut self, ms: u64) {
            self.now = self.start + Duration::from_millis(ms);
            if self
                .directory
                .next_deadline()
                .is_some_and(|d| d <= self.now)
            {
                let actions = self.directory.on_tick(self.now, &self.feeds);
                self.carry_out(actions);
            }
        }

        fn take_log(&mut self) -> Vec<String> {
            std::mem::take(&mut self.log)
        }
    }

    fn describe(action: &Action) -> String {
        match action {
            Action::ApplyRing {
                ring,
                connect,
                remove,
            } => {
                let connect: Vec<&str> = connect.iter().map(|n| n.id.as_str()).collect();
                format!(
                    "ring v{} connect {connect:?} remove {remove:?}",
                    ring.version()
                )
            }
            Action::Send { node, request, .. } => {
                format!("send {} to {node}", request_text(request))
            }
            Action::InterruptTopic { topic, reason } => format!("interrupt {topic}: {reason}"),
            Action::InterruptSubs {
                topic,
                node,
                subs,
                reason,
            } => {
                let subs: Vec<u64> = subs.iter().map(|s| s.sub).collect();
                format!("interrupt {topic} {subs:?} at {node}: {reason}")
            }
            Action::Unsubscribe { node, topic, sub } => {
                format!("unsubscribe {topic} {sub} at {node}")
            }
            Action::Tell { event, .. } => match event {
                ChannelEvent::JoinFailed { topic, sub, reason } => {
                    format!("tell join {topic} {sub} failed: {reason}")
                }
                ChannelEvent::Published { token, result } => {
                    format!("tell publish {token}: {result:?}")
                }
                ChannelEvent::Interrupted { topic, sub, reason } => {
                    format!("tell {topic} {sub} interrupted: {reason}")
                }
                ChannelEvent::Joined { topic, .. } => format!("tell joined {topic}"),
            },
            Action::RefusePublish { reply, reason } => match reply {
                Reply::Channel { token, .. } => format!("refuse publish {token}: {reason}"),
                Reply::Api(_) => format!("refuse api publish: {reason}"),
            },
            Action::RefuseApi { api, reason } => {
                format!("refuse api {:?} {}: {reason}", api.ask, api.topic)
            }
            Action::Close(node) => format!("close {node}"),
        }
    }

    fn request_text(request: &Pending) -> String {
        match request {
            Pending::Join(j) => format!("join {} {}", j.topic, j.sub),
            Pending::Publish(p) => format!("publish {}", p.topic),
            Pending::Api(a) => format!("api {:?} {}", a.ask, a.topic),
            Pending::Track { topic, sub, .. } => format!("track {topic} {sub}"),
            Pending::Move(m) => format!(
                "move {} {:?} from {}@{}{}",
                m.topic,
                m.subs,
                m.from_node,
                m.from.offset,
                if m.top_up { " (top-up)" } else { "" }
            ),
            Pending::Unsubscribe { topic, sub } => format!("unsubscribe {topic} {sub}"),
        }
    }

    fn join(topic: &str, sub: u64) -> Join {
        let (conn, _inbox) = ConnHandle::new(sub, 8);
        Join {
            conn,
            topic: topic.into(),
            sub,
            key: GroupKey::new(crate::codec::Vsn::V2, None),
            recover: None,
            replay: Vec::new(),
            presence: None,
        }
    }

    fn moved(topic: &str, subs: &[u64], from: &str, offset: u64) -> Move {
        Move {
            topic: topic.into(),
            subs: subs.to_vec(),
            from_node: from.into(),
            from: Position { epoch: 1, offset },
            top_up: false,
            replay: Vec::new(),
        }
    }

    #[test]
    fn a_ring_edit_moves_the_feeds_whose_owner_changed_and_closes_a_departed_node() {
        let (v1, v2) = (ring(1, &["a", "b"]), ring(2, &["b", "c"]));
        let to_c = topic_moving(&v1, "a", &v2, "c");
        let stays = topic_moving(&v1, "b", &v2, "b");
        let mut s = Scenario::new(v1);
        s.feed(&to_c, "a", 5, &[1, 2]);
        s.feed(&stays, "b", 9, &[3]);
        s.ring(v2.clone());
        assert_eq!(
            s.take_log(),
            [
                r#"ring v2 connect ["c"] remove ["a"]"#.to_owned(),
                format!("send move {to_c} [1, 2] from a@5 to c"),
            ]
        );
        assert_eq!(s.directory.moving(), 1);
        // The same ring again, or an older one, changes nothing.
        s.ring(v2);
        assert!(s.take_log().is_empty());
        // The move completes: the feed is at c now; released at a; a closes (nothing there).
        s.feed(&to_c, "c", 5, &[1, 2]);
        s.event(LinkEvent::MoveDone {
            mv: moved(&to_c, &[1, 2], "a", 5),
            node: "c".into(),
            attached: Some(vec![1, 2]),
        });
        assert_eq!(
            s.take_log(),
            [
                format!("unsubscribe {to_c} 1 at a"),
                format!("unsubscribe {to_c} 2 at a"),
                "close a".to_owned(),
            ]
        );
        assert_eq!(s.directory.moving(), 0);
        assert_eq!(s.directory.next_deadline(), None, "nothing left to do");
    }

    #[test]
    fn two_ring_edits_in_a_row_move_a_topic_once_and_a_departed_link_closes_at_its_deadline() {
        let (v1, v2, v3) = (ring(1, &["a", "b"]), ring(2, &["b"]), ring(3, &["b", "c"]));
        let topic = topic_moving(&v1, "a", &v2, "b");
        let mut s = Scenario::new(v1);
        s.feed(&topic, "a", 3, &[1]);
        s.ring(v2);
        s.ring(v3);
        let log = s.take_log();
        let moves = log.iter().filter(|l| l.starts_with("send move")).count();
        assert_eq!(moves, 1, "one move in flight per topic: {log:?}");
        // The move never completes: a's link closes after RETRY_FOR all the same.
        s.at(RETRY_FOR.as_millis() as u64 - 1);
        assert!(!s.take_log().contains(&"close a".to_owned()));
        s.at(RETRY_FOR.as_millis() as u64);
        assert!(s.take_log().contains(&"close a".to_owned()));
    }

    #[test]
    fn a_wrong_owner_is_sent_again_once_the_ring_catches_up() {
        let (v1, v2) = (ring(1, &["a", "b"]), ring(2, &["a", "b", "c"]));
        let topic = topic_moving(&v1, "a", &v2, "c");
        let mut s = Scenario::new(v1);
        s.event(LinkEvent::WrongOwner {
            request: Pending::Join(join(&topic, 7)),
            version: 2,
        });
        // Backoff, and the ring it needs has not arrived: nothing is sent.
        s.at(50);
        s.at(150);
        assert!(s.take_log().is_empty());
        s.ring(v2);
        s.take_log();
        s.at(400);
        assert_eq!(s.take_log(), [format!("send join {topic} 7 to c")]);
        assert_eq!(s.directory.next_deadline(), None);
    }

    #[test]
    fn a_request_nobody_takes_is_given_up_after_the_retry_window() {
        let v1 = ring(1, &["a"]);
        let mut s = Scenario::new(v1);
        s.down.insert("a".into());
        s.event(LinkEvent::WrongOwner {
            request: Pending::Join(join("room", 7)),
            version: 0,
        });
        let mut ms = 0;
        while ms < RETRY_FOR.as_millis() as u64 + 2_000 {
            ms += 10;
            s.at(ms);
        }
        let log = s.take_log();
        let tries = log
            .iter()
            .filter(|l| l.ends_with("(refused: link down)"))
            .count();
        // 50, 100, 200, 400, 800 ms, then every second.
        assert!((10..=16).contains(&tries), "{tries} tries: {log:?}");
        assert_eq!(log.last().unwrap(), "tell join room 7 failed: unavailable");
        assert_eq!(s.directory.next_deadline(), None);
    }

    #[test]
    fn a_link_lost_during_a_handoff_retries_the_move_and_fails_the_rest() {
        let (v1, v2) = (ring(1, &["a", "b"]), ring(2, &["a", "b", "c"]));
        let topic = topic_moving(&v1, "a", &v2, "c");
        let mut s = Scenario::new(v1);
        s.feed(&topic, "a", 4, &[1]);
        s.ring(v2);
        s.take_log();
        let (conn, _inbox) = ConnHandle::new(9, 8);
        let sub = LocalSub { sub: 9, conn };
        s.event(LinkEvent::Down {
            pending: vec![
                Pending::Move(moved(&topic, &[1], "a", 4)),
                Pending::Join(join("other", 8)),
            ],
            interrupted: vec![("elsewhere".into(), sub)],
            stopping: false,
        });
        assert_eq!(
            s.take_log(),
            [
                "tell join other 8 failed: unavailable",
                "tell elsewhere 9 interrupted: topic server unavailable",
            ]
        );
        // The move is sent again after the backoff.
        s.at(50);
        assert_eq!(
            s.take_log(),
            [format!("send move {topic} [1] from a@4 to c")]
        );
        // A move that cannot be retried (the link was stopped) interrupts the topic.
        s.event(LinkEvent::Down {
            pending: vec![Pending::Move(moved(&topic, &[1], "a", 4))],
            interrupted: Vec::new(),
            stopping: true,
        });
        assert_eq!(s.take_log(), [format!("interrupt {topic}: topic moved")]);
    }

    #[test]
    fn a_topic_handed_off_under_an_unread_ring_follows_it_or_is_interrupted() {
        let (v1, v2) = (ring(1, &["a", "b"]), ring(2, &["a", "b", "c"]));
        let to_c = topic_moving(&v1, "a", &v2, "c");
        let stays = topic_moving(&v1, "a", &v2, "a");
        let mut s = Scenario::new(v1.clone());
        s.feed(&to_c, "a", 2, &[1]);
        s.feed(&stays, "a", 2, &[2]);
        for topic in [to_c.as_str(), stays.as_str()] {
            s.event(LinkEvent::Moved {
                node: "a".into(),
                topic: topic.into(),
                version: 2,
            });
        }
        assert!(s.take_log().is_empty(), "waits for ring 2");
        s.ring(v2);
        let log = s.take_log();
        assert!(
            log.contains(&format!("send move {to_c} [1] from a@2 to c")),
            "{log:?}"
        );
        // This one stays on a under ring 2: it is fetched back there, numbering continued.
        let back = format!("send move {stays} [2] from a@2 to a");
        assert!(log.contains(&back), "{log:?}");

        let mut s = Scenario::new(v1);
        s.feed(&to_c, "a", 2, &[1]);
        s.event(LinkEvent::Moved {
            node: "a".into(),
            topic: to_c.clone(),
            version: 2,
        });
        s.at(RETRY_FOR.as_millis() as u64);
        assert_eq!(s.take_log(), [format!("interrupt {to_c}: topic moved")]);
    }

    #[test]
    fn a_join_during_a_move_goes_to_the_feed_and_stragglers_follow_the_move() {
        let (v1, v2) = (ring(1, &["a", "b"]), ring(2, &["a", "b", "c"]));
        let topic = topic_moving(&v1, "a", &v2, "c");
        let mut s = Scenario::new(v1);
        s.feed(&topic, "a", 6, &[1]);
        s.ring(v2);
        s.take_log();
        // While the move is in flight, a new local subscriber joins the feed's node.
        assert_eq!(&*s.directory.join_target(&topic, &s.feeds), "a");
        s.feed(&topic, "c", 6, &[1, 2]);
        s.event(LinkEvent::MoveDone {
            mv: moved(&topic, &[1], "a", 6),
            node: "c".into(),
            attached: Some(vec![1, 2]),
        });
        assert_eq!(
            s.take_log(),
            [
                format!("unsubscribe {topic} 1 at a"),
                format!("unsubscribe {topic} 2 at a"),
                format!("send move {topic} [2] from c@6 (top-up) to c"),
            ]
        );
        // The top-up completes; a subscriber that left meanwhile is dropped at c.
        let mut top_up = moved(&topic, &[2], "c", 6);
        top_up.top_up = true;
        s.event(LinkEvent::MoveDone {
            mv: top_up,
            node: "c".into(),
            attached: Some(vec![1]),
        });
        assert_eq!(s.take_log(), [format!("unsubscribe {topic} 2 at c")]);
        assert_eq!(s.directory.moving(), 0);
    }

    #[test]
    fn a_move_that_cannot_continue_the_numbering_interrupts_the_feed() {
        let (v1, v2) = (ring(1, &["a", "b"]), ring(2, &["a", "b", "c"]));
        let topic = topic_moving(&v1, "a", &v2, "c");
        let mut s = Scenario::new(v1);
        s.feed(&topic, "a", 6, &[1]);
        s.ring(v2);
        s.take_log();
        let (conn, _inbox) = ConnHandle::new(1, 8);
        s.event(LinkEvent::MoveNotContinued {
            mv: moved(&topic, &[1], "a", 6),
            node: "c".into(),
            interrupted: Some(("a".into(), vec![LocalSub { sub: 1, conn }])),
        });
        assert_eq!(
            s.take_log(),
            [
                format!("interrupt {topic} [1] at a: topic moved"),
                format!("unsubscribe {topic} 1 at c"),
            ]
        );
        assert_eq!(s.directory.moving(), 0);
    }

    #[test]
    fn rejected_and_gap_reports_reach_the_clients() {
        let mut s = Scenario::new(ring(1, &["a"]));
        let (conn, _inbox) = ConnHandle::new(1, 8);
        s.event(LinkEvent::Rejected {
            request: Pending::Publish(super::super::request::Publish {
                reply: Reply::Channel {
                    conn: conn.clone(),
                    token: 4,
                },
                topic: "t".into(),
                event: "e".into(),
                payload: bytes::Bytes::new(),
                idempotency_key: None,
            }),
            reason: "unavailable".into(),
        });
        s.event(LinkEvent::Gap {
            topic: "t".into(),
            node: "a".into(),
            subs: vec![LocalSub { sub: 3, conn }],
        });
        assert_eq!(
            s.take_log(),
            [
                "refuse publish 4: unavailable",
                "interrupt t [3] at a: gap detected",
            ]
        );
    }

    #[test]
    fn without_a_ring_everything_goes_to_the_embedded_core() {
        let d = Directory::new(None);
        let feeds = FakeFeeds::default();
        assert_eq!(&*d.join_target("anything", &feeds), EMBEDDED_NODE);
        assert_eq!(d.version(), 0);
    }

    #[test]
    fn link_plan_connects_new_nodes_and_drops_gone_or_moved_ones() {
        let text = |version, nodes: &[(&str, &str)]| {
            let mut text = format!("version = {version}\n");
            for (id, addr) in nodes {
                text.push_str(&format!("[[nodes]]\nid = \"{id}\"\naddr = \"{addr}\"\n"));
            }
            Ring::from_toml(&text).unwrap()
        };
        let old = text(1, &[("a", "h:1"), ("b", "h:2"), ("c", "h:3")]);
        let new = text(2, &[("a", "h:1"), ("b", "h:9"), ("d", "h:4")]);
        let plan = LinkPlan::between(&old, &new);
        let added: Vec<&str> = plan.add.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(added, ["b", "d"]);
        assert_eq!(plan.remove, ["b", "c"]);
        assert_eq!(LinkPlan::between(&new, &new), LinkPlan::default());
    }
}
