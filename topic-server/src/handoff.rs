//! Handing topics between topic servers, as plain decisions: where a request for a topic goes
//! (served, parked behind a fetch, refused as not ours), which previous owners a moved topic
//! is fetched from and in what order, what a `Take` answers, and what is done with the
//! requests that waited. No IO and no clock: `service` asks, acts and sleeps.

use crate::registry::Moved;
use ringcast_proto::TakeReply;
use ringcast_proto::take_reply::Outcome;
use ringcast_ring::NodeSpec;
use std::time::Duration;

/// The highest offset a handed-over topic may have (far beyond any real topic): above it,
/// counting on would overflow.
pub const MAX_OFFSET: u64 = u64::MAX / 2;
/// `Take`s asked of one previous owner that answers "busy" before the next one is asked:
/// 3 s, longer than a ring file takes to reach a process that missed its change (2 s).
pub const BUSY_TRIES: u32 = 150;
/// Between two `Take`s of a previous owner that answered "busy" (it is fetching the topic
/// itself).
pub const BUSY_WAIT: Duration = Duration::from_millis(20);

/// What this node knows about a topic when a request for it arrives.
#[derive(Debug, Clone, Default)]
pub struct TopicFacts<'a> {
    /// The ring in force gives this node the topic.
    pub owns: bool,
    /// This node's ring version.
    pub version: u64,
    /// The topic is held here.
    pub held: bool,
    /// Requests already waiting for the topic's fetch (`None`: it is not being fetched).
    pub parked: Option<usize>,
    /// This node handed the topic over, and under which ring, and to whom.
    pub moved: Option<&'a Moved>,
    /// Where the request's sender says the topic may still be (its previous ring's owner).
    pub hint: Option<&'a str>,
    /// The topic's owners under this node's previous rings (other nodes).
    pub previous_owners: Vec<NodeSpec>,
}

/// Where a request for a topic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not this node's topic under its ring, or handed over under a newer ring than it has
    /// read: `WrongOwner` with that version.
    WrongOwner(u64),
    /// Held here, or new: serve it now.
    Serve,
    /// The topic is being fetched: wait behind the requests already waiting for it.
    Park,
    /// As many requests as allowed already wait for the topic: refused (`unavailable`).
    Refuse,
    /// Absent here but it may live at a previous owner: fetch it from these nodes in turn
    /// (then serve the request, and any that waited behind it).
    Fetch(Vec<NodeSpec>),
}

/// Decides where a request (a join, a publish or a move) for a topic goes. `others` lists
/// the other nodes of the ring but those given, asked last when the topic may have moved;
/// `member` says whether an address is a node of this node's rings: a lead that is not is
/// ignored (never dial where a request says).
pub fn route(
    facts: TopicFacts<'_>,
    park_limit: usize,
    others: impl FnOnce(&[NodeSpec]) -> Vec<NodeSpec>,
    member: impl Fn(&str) -> bool,
) -> Route {
    if !facts.owns {
        return Route::WrongOwner(facts.version);
    }
    if let Some(waiting) = facts.parked {
        return if waiting >= park_limit {
            Route::Refuse
        } else {
            Route::Park
        };
    }
    // A topic held here is served at once (a handover removes it); only an absent one may
    // have been handed away, or may have to be fetched.
    if facts.held {
        return Route::Serve;
    }
    if let Some(version) = refused_version(facts.moved, facts.version) {
        return Route::WrongOwner(version);
    }
    // Where it may be now: where this node handed it, where the sender's previous ring put
    // it, its owners under this node's previous rings, and then anyone else in the ring.
    let mut candidates: Vec<NodeSpec> = Vec::new();
    let leads = [
        facts.moved.and_then(|m| m.to.clone()),
        facts.hint.map(str::to_owned),
    ];
    for addr in leads.into_iter().flatten().filter(|a| member(a)) {
        push_node(&mut candidates, node_at(addr));
    }
    for node in facts.previous_owners {
        push_node(&mut candidates, node);
    }
    if candidates.is_empty() {
        return Route::Serve;
    }
    let rest = others(&candidates);
    candidates.extend(rest);
    Route::Fetch(candidates)
}

/// The ring version to refuse a topic with, if it was handed to its owner under a newer ring
/// than this node (at `version`) has read.
pub fn refused_version(moved: Option<&Moved>, version: u64) -> Option<u64> {
    moved.map(|m| m.version).filter(|v| *v > version)
}

/// What a `Take` (a new owner asking for a topic) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeVerdict {
    /// This node owns the topic under a ring at least as new as the asker's.
    Owned,
    /// This node is fetching the topic itself, or the asker names a ring newer than any this
    /// node has heard of (obeying it would make the topic unreachable here on a peer's word):
    /// ask again shortly.
    Busy,
    /// Hand over whatever is held (maybe nothing). `mark_moved`: refuse the topic from now on
    /// until this node reads the asker's ring (and remember where it went).
    HandOver { mark_moved: bool },
}

/// Decides a `Take` of a topic asked under ring `wanted`: `heard` is the newest ring version
/// any gateway or peer mentioned before; `held` says whether the topic is held here.
pub fn take_verdict(
    owns: bool,
    version: u64,
    heard: u64,
    wanted: u64,
    fetching: bool,
    held: bool,
) -> TakeVerdict {
    if wanted > version.max(heard) {
        TakeVerdict::Busy
    } else if owns && version >= wanted {
        TakeVerdict::Owned
    } else if fetching {
        TakeVerdict::Busy
    } else {
        TakeVerdict::HandOver {
            mark_moved: held || version < wanted,
        }
    }
}

/// Asking a moved topic's previous owners, one after the other.
#[derive(Debug)]
pub struct Fetch {
    candidates: Vec<NodeSpec>,
    /// The candidate being asked.
    current: usize,
    /// `Take`s asked of it so far.
    tries: u32,
}

/// What a fetch does next.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchStep {
    /// Ask this node (`Take`), after waiting this long.
    Ask(NodeSpec, Duration),
    /// Over: the answer that carried the topic (found, or owned elsewhere under a newer
    /// ring), or none (nobody had it).
    Done(Option<TakeReply>),
}

/// A previous owner's answer to a `Take`.
pub type Answer = Result<TakeReply, ()>;

impl Fetch {
    /// A fetch from `candidates` in order; returns it and its first step.
    pub fn start(candidates: Vec<NodeSpec>) -> (Fetch, FetchStep) {
        let mut fetch = Fetch {
            candidates,
            current: 0,
            tries: 0,
        };
        let step = fetch.ask_current(Duration::ZERO);
        (fetch, step)
    }

    /// Candidates known so far (more are added when one says where the topic went).
    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }

    /// Takes the answer of the node being asked; a lead it gives is followed only if
    /// `member` knows the address.
    pub fn on_answer(&mut self, answer: Answer, member: impl Fn(&str) -> bool) -> FetchStep {
        let Ok(reply) = answer else {
            return self.next();
        };
        match reply.outcome() {
            Outcome::Found | Outcome::Owned => FetchStep::Done(Some(reply)),
            Outcome::Absent => {
                if !reply.moved_to.is_empty() && member(&reply.moved_to) {
                    // It went on from there: follow it.
                    push_node(&mut self.candidates, node_at(reply.moved_to));
                }
                self.next()
            }
            Outcome::Busy if self.tries < BUSY_TRIES => self.ask_current(BUSY_WAIT),
            Outcome::Busy => self.next(),
        }
    }

    fn next(&mut self) -> FetchStep {
        self.current += 1;
        self.tries = 0;
        self.ask_current(Duration::ZERO)
    }

    fn ask_current(&mut self, after: Duration) -> FetchStep {
        match self.candidates.get(self.current) {
            Some(node) => {
                self.tries += 1;
                FetchStep::Ask(node.clone(), after)
            }
            None => FetchStep::Done(None),
        }
    }
}

/// What a fetched topic becomes here.
#[derive(Debug, PartialEq)]
pub enum Install {
    /// Continue the topic: this epoch and offset, and its log.
    Continue(TakeReply),
    /// A newer ring gives the topic elsewhere: refuse it under that version.
    OwnedElsewhere(u64),
    /// Nobody had it (or a broken peer sent an impossible offset): it starts afresh.
    Afresh,
}

/// Decides what to install from a fetch's result.
pub fn install(found: Option<TakeReply>) -> Install {
    match found {
        Some(reply) if reply.outcome() == Outcome::Owned => {
            Install::OwnedElsewhere(reply.ring_version)
        }
        // No topic gets there by publishing: a broken peer. Start a new epoch.
        Some(reply) if reply.offset > MAX_OFFSET => Install::Afresh,
        Some(reply) => Install::Continue(reply),
        None => Install::Afresh,
    }
}

/// What is done with a request that waited for its topic's fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    Serve,
    WrongOwner(u64),
    /// Its gateway's stream ended while the topic was fetched: a subscription would outlive
    /// the stream (its subscriptions were dropped already), so it is dropped.
    Drop,
}

/// Decides for one waiting request, after the fetch: `stream_ended` (its gateway's stream is
/// gone), what kind of request it is, whether this node still owns the topic (its ring may
/// have changed meanwhile), and the version the topic is refused under, if any.
pub fn parked(
    stream_ended: bool,
    kind: RequestKind,
    owns: bool,
    version: u64,
    refused: Option<u64>,
) -> Parked {
    if stream_ended && !matches!(kind, RequestKind::Publish | RequestKind::Read) {
        return Parked::Drop;
    }
    match (kind, refused) {
        // An unsubscribe is served whoever owns the topic.
        (RequestKind::Unsubscribe, _) => Parked::Serve,
        _ if !owns => Parked::WrongOwner(version),
        (_, Some(version)) => Parked::WrongOwner(version),
        (_, None) => Parked::Serve,
    }
}

/// The kinds of request that may wait for a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Subscribe,
    Publish,
    Move,
    /// A history or an inspection (the backend API): answered like a publish.
    Read,
    Unsubscribe,
}

/// A node known only by its address (a lead from a gateway or a peer).
fn node_at(addr: String) -> NodeSpec {
    NodeSpec {
        id: format!("node at {addr}"),
        addr,
        weight: 1,
    }
}

/// Adds `node` to the nodes to ask, unless one at the same address is there already.
fn push_node(nodes: &mut Vec<NodeSpec>, node: NodeSpec) {
    if !nodes.iter().any(|n| n.addr == node.addr) {
        nodes.push(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            addr: format!("{id}:1"),
            weight: 1,
        }
    }

    fn reply(outcome: Outcome) -> Answer {
        Ok(TakeReply {
            outcome: outcome as i32,
            ..Default::default()
        })
    }

    fn absent_gone_to(addr: &str) -> Answer {
        Ok(TakeReply {
            outcome: Outcome::Absent as i32,
            moved_to: addr.into(),
            ..Default::default()
        })
    }

    fn asked(step: &FetchStep) -> String {
        match step {
            FetchStep::Ask(node, after) => {
                format!("ask {} after {}ms", node.addr, after.as_millis())
            }
            FetchStep::Done(Some(r)) => format!("done {:?}", r.outcome()),
            FetchStep::Done(None) => "done: nobody had it".into(),
        }
    }

    /// Runs a fetch from `candidates` through `answers`, one per step; the steps written out.
    fn fetch(candidates: &[&str], answers: Vec<Answer>) -> Vec<String> {
        let (mut fetch, mut step) = Fetch::start(candidates.iter().map(|c| node(c)).collect());
        let mut log = vec![asked(&step)];
        for answer in answers {
            step = fetch.on_answer(answer, |_| true);
            log.push(asked(&step));
        }
        log
    }

    #[test]
    fn requests_are_served_parked_refused_or_sent_to_fetch_their_topic() {
        let others = |_: &[NodeSpec]| vec![node("z")];
        let facts = || TopicFacts {
            owns: true,
            version: 3,
            ..Default::default()
        };
        let route = |facts: TopicFacts<'_>| super::route(facts, 2, others, |_| true);
        assert_eq!(
            route(TopicFacts {
                owns: false,
                ..facts()
            }),
            Route::WrongOwner(3)
        );
        assert_eq!(
            route(TopicFacts {
                held: true,
                ..facts()
            }),
            Route::Serve
        );
        assert_eq!(route(facts()), Route::Serve, "new, never elsewhere");
        assert_eq!(
            route(TopicFacts {
                parked: Some(1),
                ..facts()
            }),
            Route::Park
        );
        assert_eq!(
            route(TopicFacts {
                parked: Some(2),
                ..facts()
            }),
            Route::Refuse
        );
        let at = std::time::Instant::now();
        let newer = Moved {
            version: 5,
            to: Some("n:1".into()),
            at,
        };
        assert_eq!(
            route(TopicFacts {
                moved: Some(&newer),
                ..facts()
            }),
            Route::WrongOwner(5)
        );
        let older = Moved {
            version: 2,
            to: Some("n:1".into()),
            at,
        };
        let fetched = route(TopicFacts {
            moved: Some(&older),
            hint: Some("h:1"),
            previous_owners: vec![node("p"), node("h")],
            ..facts()
        });
        let Route::Fetch(nodes) = fetched else {
            panic!("{fetched:?}")
        };
        let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
        assert_eq!(
            addrs,
            ["n:1", "h:1", "p:1", "z:1"],
            "leads first, no address twice"
        );
    }

    #[test]
    fn a_fetch_waits_on_a_busy_owner_follows_a_lead_and_skips_the_unreachable() {
        assert_eq!(
            fetch(
                &["a", "b"],
                vec![
                    reply(Outcome::Busy),
                    reply(Outcome::Busy),
                    reply(Outcome::Found)
                ]
            ),
            [
                "ask a:1 after 0ms",
                "ask a:1 after 20ms",
                "ask a:1 after 20ms",
                "done Found"
            ]
        );
        assert_eq!(
            fetch(
                &["a", "b"],
                vec![Err(()), absent_gone_to("c:1"), reply(Outcome::Owned)]
            ),
            [
                "ask a:1 after 0ms",
                "ask b:1 after 0ms",
                "ask c:1 after 0ms",
                "done Owned"
            ]
        );
        assert_eq!(
            fetch(&["a"], vec![absent_gone_to("a:1")]),
            ["ask a:1 after 0ms", "done: nobody had it"],
            "a lead already asked is not asked again"
        );
        assert_eq!(fetch(&[], vec![]), ["done: nobody had it"]);
    }

    #[test]
    fn a_previous_owner_busy_for_too_long_is_passed_over() {
        let busy = (0..BUSY_TRIES).map(|_| reply(Outcome::Busy)).collect();
        let log = fetch(&["a", "b"], busy);
        assert_eq!(log.len(), BUSY_TRIES as usize + 1);
        assert_eq!(log[BUSY_TRIES as usize - 1], "ask a:1 after 20ms");
        assert_eq!(log.last().unwrap(), "ask b:1 after 0ms");
    }

    #[test]
    fn a_take_is_owned_busy_or_handed_over() {
        assert_eq!(take_verdict(true, 4, 0, 4, false, true), TakeVerdict::Owned);
        assert_eq!(
            take_verdict(true, 4, 5, 5, false, true),
            TakeVerdict::HandOver { mark_moved: true },
            "the asker has a newer ring, which a gateway mentioned"
        );
        assert_eq!(take_verdict(false, 4, 0, 4, true, false), TakeVerdict::Busy);
        assert_eq!(
            take_verdict(false, 4, 0, 4, false, false),
            TakeVerdict::HandOver { mark_moved: false },
            "nothing held, same ring: nothing to remember"
        );
        assert_eq!(
            take_verdict(false, 4, 9, 9, false, false),
            TakeVerdict::HandOver { mark_moved: true },
            "refused here until this node reads ring 9"
        );
    }

    #[test]
    fn a_take_under_a_ring_nobody_mentioned_is_not_obeyed() {
        // A peer's word alone would leave a tombstone every later request is refused with.
        assert_eq!(
            take_verdict(true, 4, 4, u64::MAX, false, true),
            TakeVerdict::Busy
        );
        assert_eq!(take_verdict(false, 4, 6, 7, false, true), TakeVerdict::Busy);
        assert_eq!(
            take_verdict(false, 4, 7, 7, false, true),
            TakeVerdict::HandOver { mark_moved: true }
        );
    }

    #[test]
    fn leads_outside_the_rings_are_not_followed() {
        let facts = TopicFacts {
            owns: true,
            version: 3,
            hint: Some("evil:1"),
            previous_owners: vec![node("p")],
            ..Default::default()
        };
        let member = |a: &str| a != "evil:1";
        let Route::Fetch(nodes) = route(facts, 8, |_| vec![], member) else {
            panic!("fetches from the previous owner")
        };
        let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
        assert_eq!(addrs, ["p:1"]);
        let only_evil = TopicFacts {
            owns: true,
            version: 3,
            hint: Some("evil:1"),
            ..Default::default()
        };
        assert_eq!(
            route(only_evil, 8, |_| vec![], member),
            Route::Serve,
            "starts afresh"
        );
        let (mut fetch, _) = Fetch::start(vec![node("a")]);
        assert_eq!(
            fetch.on_answer(absent_gone_to("evil:1"), member),
            FetchStep::Done(None)
        );
    }

    #[test]
    fn a_fetched_topic_continues_or_starts_afresh() {
        let found = |offset| TakeReply {
            outcome: Outcome::Found as i32,
            offset,
            ..Default::default()
        };
        assert_eq!(install(Some(found(7))), Install::Continue(found(7)));
        assert_eq!(install(Some(found(MAX_OFFSET + 1))), Install::Afresh);
        assert_eq!(install(None), Install::Afresh);
        let owned = TakeReply {
            outcome: Outcome::Owned as i32,
            ring_version: 8,
            ..Default::default()
        };
        assert_eq!(install(Some(owned)), Install::OwnedElsewhere(8));
    }

    #[test]
    fn requests_that_waited_are_served_refused_or_dropped() {
        use RequestKind::*;
        assert_eq!(parked(false, Subscribe, true, 3, None), Parked::Serve);
        assert_eq!(parked(true, Subscribe, true, 3, None), Parked::Drop);
        assert_eq!(parked(true, Move, true, 3, None), Parked::Drop);
        assert_eq!(
            parked(true, Publish, true, 3, None),
            Parked::Serve,
            "ordered all the same"
        );
        assert_eq!(
            parked(false, Publish, false, 3, None),
            Parked::WrongOwner(3)
        );
        assert_eq!(
            parked(false, Subscribe, true, 3, Some(6)),
            Parked::WrongOwner(6)
        );
        assert_eq!(parked(false, Unsubscribe, false, 3, Some(6)), Parked::Serve);
    }
}
