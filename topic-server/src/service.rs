//! The topic-server service: gateway streams in, ordered deliveries out.
//!
//! Each gateway stream is a [`Link`]: a reader task applies its requests to the sharded
//! [`TopicRegistry`], and everything sent back to that gateway (acks, deliveries) goes
//! through the link's bounded queue, which the outbound stream drains into batches.
//!
//! When the ring gives this node a topic that lived elsewhere, the first request for it is
//! parked while the topic is fetched from its previous owner (`Take`: epoch, offset, log),
//! so the numbering continues; requests that arrive meanwhile queue behind it, in order.

use crate::handoff::{
    self, Fetch, FetchStep, Install, Parked, RequestKind, Route, TakeVerdict, TopicFacts,
};
use crate::log::{LogLimits, Message};
pub use crate::ownership::Ownership;
use crate::peers::Peers;
use crate::presence::{self, PresenceLimits};
use crate::prom::Value;
use crate::registry::{EpochSource, Position, TopicRegistry};
use crate::shards::Shards;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use ringcast_proto::batch;
use ringcast_proto::take_reply::Outcome;
use ringcast_proto::{
    Delivery, Down, DownBatch, History, Inspect, LogEntry, Move, PresenceEntry, Publish, Subscribe,
    TakeReply, TakeRequest, Track, Unsubscribe, Up, UpBatch, up,
};
use ringcast_ring::{NewestSeen, NodeSpec, Ring};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

const SHARDS: usize = 64;

/// How long a count of the owned topics is shown before it is counted again.
const OWNED_EVERY: Duration = Duration::from_secs(1);

/// How often topic logs are checked for messages past their age limit.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// Limits of the service.
#[derive(Debug, Clone)]
pub struct ServiceLimits {
    /// Stream messages queued per gateway before that gateway is cut off as too slow.
    pub stream_queue: usize,
    /// How much history each topic keeps for recovery.
    pub log: LogLimits,
    /// Topics held at most: a request that would create another is refused.
    pub max_topics: usize,
    /// Bytes held for topics (logs and names) over which new topics are refused.
    pub max_held_bytes: usize,
    /// The cluster secret sent on calls to peers (`Take`).
    pub peer_secret: ringcast_proto::auth::ClusterSecret,
    /// How much presence a topic may list and hold.
    pub presence: PresenceLimits,
    /// Presence changes are gathered this long, then sent as one diff per topic.
    pub presence_interval: Duration,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            stream_queue: 65_536,
            log: LogLimits::default(),
            max_topics: 1_000_000,
            max_held_bytes: 1 << 30,
            peer_secret: Default::default(),
            presence: PresenceLimits::default(),
            presence_interval: Duration::from_millis(50),
        }
    }
}

/// Why a link was closed by this side.
#[derive(Debug, Clone, Copy)]
enum CloseReason {
    Overflow,
    Shutdown,
    /// The Hello named the gateway with more than [`MAX_GATEWAY_ID_BYTES`].
    BadHello,
}

/// The longest gateway id a Hello may carry.
pub const MAX_GATEWAY_ID_BYTES: usize = 128;

/// One gateway's stream.
#[derive(Debug)]
struct Link {
    id: u64,
    gateway_id: OnceLock<String>,
    tx: mpsc::Sender<Down>,
    closed: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl Link {
    /// The gateway's `id#instance` from its Hello, or `link-<n>` before one came.
    fn label(&self) -> String {
        self.gateway_id
            .get()
            .cloned()
            .unwrap_or_else(|| format!("link-{}", self.id))
    }

    fn close(&self, reason: CloseReason) {
        if self.reason.set(reason).is_ok() && matches!(reason, CloseReason::Overflow) {
            tracing::warn!(link = self.id, gateway = ?self.gateway_id.get(), "gateway stream queue full: cutting the stream");
        }
        self.closed.cancel();
    }
}

/// A gateway's stream as the registry sees it: compared by id.
#[derive(Debug, Clone)]
struct LinkRef(Arc<Link>);

impl PartialEq for LinkRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

/// Counters exposed on the status endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    pub publishes: AtomicU64,
    /// Deliveries sent to gateways: one per publish per gateway with subscribers.
    pub deliveries: AtomicU64,
    pub batches: AtomicU64,
    pub links_open: AtomicUsize,
    pub links_total: AtomicU64,
    pub links_overflowed: AtomicU64,
    /// Subscriptions dropped because their gateway's stream ended.
    pub subscriptions_dropped: AtomicU64,
    pub wrong_owner: AtomicU64,
    /// Topics fetched from their previous owner, and handed to a new one.
    pub handoffs_in: AtomicU64,
    pub handoffs_out: AtomicU64,
    /// Topics moved here whose previous owner had nothing (or could not be reached).
    pub handoffs_empty: AtomicU64,
    /// Gateway moves of subscribers to this node.
    pub moves: AtomicU64,
    /// Requests refused because too many already waited for their topic's handoff.
    pub parked_refused: AtomicU64,
    /// Requests refused because they would create a topic past the limits.
    pub topics_refused: AtomicU64,
    /// Publishes with an idempotency key seen before: answered, not ordered again.
    pub publishes_repeated: AtomicU64,
    /// Recovering joins refused (`unavailable`) for want of room on their gateway's stream.
    pub recoveries_deferred: AtomicU64,
    /// Subscriptions made with a recovery position: served from the log, or refused.
    pub recoveries: AtomicU64,
    pub recoveries_refused: AtomicU64,
    pub replayed: AtomicU64,
}

/// A point-in-time view of the service for the status endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusSnapshot {
    pub node_id: Option<String>,
    pub ring_version: u64,
    /// Topics held here that this node owns under its ring.
    pub owned_topics: usize,
    /// Topics being fetched from a previous owner, and the requests waiting for them.
    pub fetching: usize,
    pub parked: usize,
    pub parked_refused: u64,
    /// Requests refused because they would create a topic past `TOPIC_SERVER_MAX_TOPICS` or
    /// `TOPIC_SERVER_MAX_LOG_TOTAL_BYTES`.
    pub topics_refused: u64,
    /// Recovering joins (and history reads) answered `unavailable` for want of room on their
    /// gateway's stream.
    pub recoveries_deferred: u64,
    /// Publishes whose idempotency key was seen before: answered, not ordered again.
    pub publishes_repeated: u64,
    /// Topics handed over and remembered (refused until this node reads their ring; leads).
    pub handed_over_remembered: usize,
    /// Why the last edit of the ring file was refused, while the file in place is not the
    /// ring in force.
    pub ring_refused: Option<String>,
    pub topics: usize,
    pub subscriptions: usize,
    /// Messages held in topic logs, and the bytes held for topics (payloads, event and topic
    /// names).
    pub log_messages: usize,
    pub log_bytes: usize,
    pub gateways: Vec<String>,
    pub links_open: usize,
    pub links_total: u64,
    pub links_overflowed: u64,
    pub subscriptions_dropped: u64,
    pub publishes: u64,
    pub deliveries: u64,
    pub batches: u64,
    pub wrong_owner: u64,
    pub recoveries: u64,
    pub recoveries_refused: u64,
    pub replayed: u64,
    pub handoffs_in: u64,
    pub handoffs_out: u64,
    pub handoffs_empty: u64,
    pub moves: u64,
}

impl StatusSnapshot {
    /// Every number of the snapshot, as `/metrics` shows it (the same meaning as in `/status`).
    pub fn values(&self) -> Vec<Value> {
        let g = |name, help, v: usize| Value::Gauge(name, help, v as i64);
        let c = Value::Counter;
        vec![
            Value::Gauge(
                "ring_version",
                "The version of the ring in force.",
                self.ring_version as i64,
            ),
            g(
                "owned_topics",
                "Topics held here that this node owns under its ring.",
                self.owned_topics,
            ),
            g(
                "fetching",
                "Topics being fetched from their previous owner now.",
                self.fetching,
            ),
            g(
                "parked",
                "Requests waiting for their topic's handoff now.",
                self.parked,
            ),
            g(
                "handed_over_remembered",
                "Topics handed over and remembered.",
                self.handed_over_remembered,
            ),
            g("topics", "Topics held here.", self.topics),
            g(
                "subscriptions",
                "Subscriptions held here.",
                self.subscriptions,
            ),
            g(
                "log_messages",
                "Messages held in topic logs.",
                self.log_messages,
            ),
            g(
                "log_bytes",
                "Bytes held for topics (payloads, event and topic names).",
                self.log_bytes,
            ),
            g("gateways", "Gateways attached now.", self.gateways.len()),
            g("links_open", "Gateway streams open now.", self.links_open),
            c("links", "Gateway streams opened.", self.links_total),
            c(
                "links_overflowed",
                "Gateway streams closed for not reading.",
                self.links_overflowed,
            ),
            c(
                "subscriptions_dropped",
                "Subscriptions dropped because their gateway's stream ended.",
                self.subscriptions_dropped,
            ),
            c("publishes", "Messages ordered.", self.publishes),
            c(
                "publishes_repeated",
                "Publishes with an idempotency key seen before (answered, not ordered again).",
                self.publishes_repeated,
            ),
            c(
                "deliveries",
                "Deliveries sent to gateways (one per message per gateway).",
                self.deliveries,
            ),
            c("batches", "Batches sent to gateways.", self.batches),
            c(
                "wrong_owner",
                "Requests for topics this node does not own.",
                self.wrong_owner,
            ),
            c(
                "recoveries",
                "Subscriptions made with a recovery position.",
                self.recoveries,
            ),
            c(
                "recoveries_refused",
                "Recoveries the log could not serve in full.",
                self.recoveries_refused,
            ),
            c(
                "recoveries_deferred",
                "Recoveries and history reads refused for want of room on their stream.",
                self.recoveries_deferred,
            ),
            c(
                "replayed",
                "Messages replayed to recovering subscribers.",
                self.replayed,
            ),
            c(
                "handoffs_in",
                "Topics fetched from their previous owner.",
                self.handoffs_in,
            ),
            c(
                "handoffs_out",
                "Topics handed to a new owner.",
                self.handoffs_out,
            ),
            c(
                "handoffs_empty",
                "Topics moved here whose previous owner had nothing.",
                self.handoffs_empty,
            ),
            c(
                "moves",
                "Gateway moves of subscribers to this node.",
                self.moves,
            ),
            c(
                "parked_refused",
                "Requests refused because too many waited for their topic's handoff.",
                self.parked_refused,
            ),
            c(
                "topics_refused",
                "Requests refused because they would create a topic past the limits.",
                self.topics_refused,
            ),
        ]
    }
}

/// A request for one topic, as it may wait while the topic is fetched.
#[derive(Debug)]
enum TopicRequest {
    Subscribe(Subscribe),
    Publish(Publish),
    Move(Move),
    History(History),
    Inspect(Inspect),
    Track(Track),
    /// Waits only behind a parked join of the same topic, to stay in order after it.
    Unsubscribe(Unsubscribe),
}

impl TopicRequest {
    fn topic(&self) -> &str {
        match self {
            TopicRequest::Subscribe(r) => &r.topic,
            TopicRequest::Publish(r) => &r.topic,
            TopicRequest::Move(r) => &r.topic,
            TopicRequest::History(r) => &r.topic,
            TopicRequest::Inspect(r) => &r.topic,
            TopicRequest::Track(r) => &r.topic,
            TopicRequest::Unsubscribe(r) => &r.topic,
        }
    }

    /// Where the sender says the topic may still be (its previous ring's owner).
    fn hint(&self) -> Option<&str> {
        let hint = match self {
            TopicRequest::Subscribe(r) => &r.previous_owner,
            TopicRequest::Publish(r) => &r.previous_owner,
            TopicRequest::Move(r) => &r.previous_owner,
            TopicRequest::History(_)
            | TopicRequest::Inspect(_)
            | TopicRequest::Track(_)
            | TopicRequest::Unsubscribe(_) => {
                return None;
            }
        };
        (!hint.is_empty()).then_some(hint.as_str())
    }

    fn kind(&self) -> RequestKind {
        match self {
            TopicRequest::Subscribe(_) => RequestKind::Subscribe,
            TopicRequest::Publish(_) => RequestKind::Publish,
            TopicRequest::Move(_) => RequestKind::Move,
            TopicRequest::History(_) | TopicRequest::Inspect(_) => RequestKind::Read,
            // Like a leave: it concerns a subscription that is here, or nothing.
            TopicRequest::Track(_) => RequestKind::Unsubscribe,
            TopicRequest::Unsubscribe(_) => RequestKind::Unsubscribe,
        }
    }

    fn request_id(&self) -> u64 {
        match self {
            TopicRequest::Subscribe(r) => r.request_id,
            TopicRequest::Publish(r) => r.request_id,
            TopicRequest::Move(r) => r.request_id,
            TopicRequest::History(r) => r.request_id,
            TopicRequest::Inspect(r) => r.request_id,
            TopicRequest::Track(r) => r.request_id,
            TopicRequest::Unsubscribe(r) => r.request_id,
        }
    }
}

/// One shard: its topics, and the requests waiting for topics being fetched.
struct Shard {
    registry: TopicRegistry<LinkRef>,
    parked: HashMap<String, Vec<(LinkRef, TopicRequest)>>,
    /// Its topics and held bytes as last added to the service's totals.
    counted: (usize, usize),
}

impl Shard {
    /// Brings the service's totals up to date with this shard (call after changing it).
    fn sync(&mut self, totals: &Totals) {
        let now = (self.registry.topic_count(), self.registry.held_bytes());
        if now == self.counted {
            return;
        }
        let (topics, bytes) = self.counted;
        totals.topics.fetch_add(now.0.wrapping_sub(topics), Relaxed);
        totals.bytes.fetch_add(now.1.wrapping_sub(bytes), Relaxed);
        self.counted = now;
    }
}

/// Topics held and their bytes (logs and names), over every shard: kept as they change, so
/// that a new topic is admitted in O(1) and `/status` walks nothing.
#[derive(Debug, Default)]
struct Totals {
    topics: AtomicUsize,
    bytes: AtomicUsize,
}

struct Shared {
    shards: Shards<Mutex<Shard>>,
    peers: Peers,
    /// The newest ring version a gateway has mentioned (to say so once per version).
    newest_seen: NewestSeen,
    ownership: Ownership,
    limits: ServiceLimits,
    next_link: AtomicU64,
    links: Mutex<Vec<Arc<Link>>>,
    stats: Stats,
    totals: Totals,
    /// `owned_topics` as last counted: when, the count, and under which ring version.
    owned: Mutex<Option<(Instant, usize, u64)>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// The topic server's core, shared by the gRPC service and the gateway's embedded mode.
#[derive(Clone)]
pub struct TopicService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TopicService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicService")
            .field("ownership", &self.shared.ownership)
            .finish()
    }
}

impl TopicService {
    /// A service whose link tasks stop when `shutdown` is cancelled.
    pub fn new(ownership: Ownership, limits: ServiceLimits, shutdown: CancellationToken) -> Self {
        let seed = rand::random::<u64>();
        let shards = Shards::new(SHARDS, |i| {
            Mutex::new(Shard {
                registry: TopicRegistry::new(
                    EpochSource::new(seed ^ ((i as u64) << 56)),
                    limits.log,
                )
                .with_presence_limits(limits.presence),
                parked: HashMap::new(),
                counted: (0, 0),
            })
        });
        let service = TopicService {
            shared: Arc::new(Shared {
                shards,
                peers: Peers::new(limits.peer_secret.clone()),
                newest_seen: NewestSeen::default(),
                ownership,
                limits,
                next_link: AtomicU64::new(1),
                links: Mutex::new(Vec::new()),
                stats: Stats::default(),
                totals: Totals::default(),
                owned: Mutex::new(None),
                shutdown,
                tasks: TaskTracker::new(),
            }),
        };
        let shared = service.shared.clone();
        service.shared.tasks.spawn(async move {
            let mut tick = tokio::time::interval(EXPIRE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    _ = tick.tick() => shared.expire(Instant::now()),
                }
            }
        });
        let shared = service.shared.clone();
        service.shared.tasks.spawn(async move {
            let mut tick = tokio::time::interval(shared.limits.presence_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    _ = tick.tick() => shared.flush_presence(),
                }
            }
        });
        service
    }

    pub fn ownership(&self) -> &Ownership {
        &self.shared.ownership
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Opens a gateway link: `inbound` is the gateway's request stream, the returned stream
    /// carries everything sent back to it. The link ends when either side ends.
    pub fn open_link<S>(
        &self,
        inbound: S,
    ) -> impl Stream<Item = Result<DownBatch, Status>> + Send + 'static
    where
        S: Stream<Item = Result<UpBatch, Status>> + Send + Unpin + 'static,
    {
        let shared = &self.shared;
        let (tx, rx) = mpsc::channel(shared.limits.stream_queue.max(1));
        let link = Arc::new(Link {
            id: shared.next_link.fetch_add(1, Relaxed),
            gateway_id: OnceLock::new(),
            tx,
            closed: shared.shutdown.child_token(),
            reason: OnceLock::new(),
        });
        shared.links.lock().push(link.clone());
        shared.stats.links_open.fetch_add(1, Relaxed);
        shared.stats.links_total.fetch_add(1, Relaxed);
        shared.tasks.spawn(Shared::serve_link(
            self.shared.clone(),
            LinkRef(link.clone()),
            inbound,
        ));

        let state = Outbound {
            rx,
            _guard: link.closed.clone().drop_guard(),
            link,
            shared: self.shared.clone(),
        };
        futures::stream::unfold(Some(state), |state| async move {
            let mut st = state?;
            let mut items = Vec::new();
            tokio::select! {
                biased;
                _ = st.link.closed.cancelled() => {
                    let status = match st.link.reason.get() {
                        Some(CloseReason::Overflow) => Status::resource_exhausted("gateway stream queue overflow"),
                        Some(CloseReason::BadHello) => Status::invalid_argument(format!("a gateway id is 1 to {MAX_GATEWAY_ID_BYTES} bytes")),
                        Some(CloseReason::Shutdown) | None if st.shared.shutdown.is_cancelled() => Status::unavailable("topic server shutting down"),
                        _ => return None,
                    };
                    Some((Err(status), None))
                }
                n = batch::recv(&mut st.rx, &mut items, batch::MAX_ITEMS, batch::MAX_BYTES) => {
                    if n == 0 {
                        return None;
                    }
                    st.shared.stats.batches.fetch_add(1, Relaxed);
                    let batch = DownBatch { ring_version: st.shared.ownership.version(), items };
                    Some((Ok(batch), Some(st)))
                }
            }
        })
    }

    /// Swaps in a newer ring.
    pub fn set_ring(&self, ring: Arc<Ring>) {
        let version = ring.version();
        if self.shared.ownership.set_ring(ring) {
            tracing::info!(version, "topic server on new ring");
        }
    }

    /// Hands `topic` to the node that owns it under ring `ring_version` (a `Take` from a
    /// peer): its epoch, offset and log; its gateways here are told it moved.
    pub fn take(&self, request: TakeRequest) -> TakeReply {
        let s = &self.shared;
        // What any gateway or peer mentioned before this request: its own word does not count.
        let heard = s.newest_seen.newest();
        let (ours, topic) = (s.ownership.version(), request.topic.as_str());
        if request.ring_version > ours.max(heard) {
            tracing::warn!(%topic, asker = %request.node_id, theirs = request.ring_version, ours, heard, "a Take names a ring nobody has mentioned: not obeyed");
        }
        let mut shard = s.shard(topic).lock();
        let reply = |outcome: Outcome| TakeReply {
            outcome: outcome as i32,
            ring_version: ours,
            ..Default::default()
        };
        let verdict = handoff::take_verdict(
            s.ownership.owns(topic),
            ours,
            heard,
            request.ring_version,
            shard.parked.contains_key(topic),
            shard.registry.contains(topic),
        );
        let mark_moved = match verdict {
            TakeVerdict::Owned => return reply(Outcome::Owned),
            TakeVerdict::Busy => return reply(Outcome::Busy),
            TakeVerdict::HandOver { mark_moved } => mark_moved,
        };
        let handoff = shard.registry.take(topic, Instant::now(), gateway_id_of);
        shard.sync(&s.totals);
        s.heard_of(request.ring_version);
        if mark_moved {
            // Refused here until this node reads that ring; a lead if a ring gives it back
            // (only an address of the rings this node knows).
            let to = (!request.addr.is_empty() && s.ownership.knows_addr(&request.addr))
                .then(|| request.addr.clone());
            shard
                .registry
                .mark_moved(topic, request.ring_version, to, Instant::now());
        }
        let Some(handoff) = handoff else {
            let moved_to = shard.registry.moved(topic).and_then(|m| m.to.clone());
            return TakeReply {
                moved_to: moved_to.unwrap_or_default(),
                ..reply(Outcome::Absent)
            };
        };
        s.stats.handoffs_out.fetch_add(1, Relaxed);
        tracing::debug!(%topic, to = %request.node_id, offset = handoff.offset, "topic handed over");
        let presence_flush = handoff
            .presence_flush
            .map(|(event, payload)| (event, Bytes::from(payload)));
        for gateway in &handoff.gateways {
            // Presence changes not sent yet go first: the new owner starts from this state.
            if let Some((event, payload)) = &presence_flush {
                let news = Down::presence(topic.to_owned(), event, payload.clone());
                s.send(&gateway.0, news);
            }
            s.send(
                &gateway.0,
                Down::moved(topic.to_owned(), request.ring_version),
            );
        }
        TakeReply {
            outcome: Outcome::Found as i32,
            ring_version: ours,
            epoch: handoff.epoch,
            offset: handoff.offset,
            log: handoff
                .log
                .into_iter()
                .map(|(age, m)| LogEntry {
                    offset: m.offset,
                    event: m.event,
                    payload: m.payload,
                    age_ms: age.as_millis() as u64,
                })
                .collect(),
            moved_to: String::new(),
            presence_counted: handoff.presence_counted,
            presence: handoff
                .presence
                .into_iter()
                .map(|(gateway_id, subscriber, e)| PresenceEntry {
                    gateway_id,
                    subscriber,
                    key: e.key.into(),
                    phx_ref: e.phx_ref.into(),
                    meta: Bytes::from(String::from(e.meta)),
                })
                .collect(),
        }
    }

    /// Closes every link (shutdown) and waits for their tasks.
    pub async fn close_all(&self) {
        for link in self.shared.links.lock().iter() {
            link.close(CloseReason::Shutdown);
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// Why this node should not be sent traffic now (`None`: ready): it is not in the ring
    /// in force (not yet, or removed and handing its topics off).
    pub fn not_ready(&self) -> Option<String> {
        let ownership = &self.shared.ownership;
        (!ownership.in_ring()).then(|| {
            format!(
                "not in the ring in force (version {}): its topics belong to other nodes",
                ownership.version()
            )
        })
    }

    /// Whether this node is in the ring in force.
    pub fn in_ring(&self) -> bool {
        self.shared.ownership.in_ring()
    }

    /// The status: counters kept as things happen, and per shard sums of O(1) figures. Only
    /// `owned_topics` (which asks the ring about every topic held) walks the topics, at most
    /// once a second, so that status requests cannot hold the locks publishes take.
    pub fn status(&self) -> StatusSnapshot {
        let s = &self.shared;
        let (mut subscriptions, mut log_messages, mut moved) = (0, 0, 0);
        let (mut fetching, mut parked) = (0, 0);
        for shard in s.shards.iter() {
            let shard = shard.lock();
            fetching += shard.parked.len();
            parked += shard.parked.values().map(Vec::len).sum::<usize>();
            subscriptions += shard.registry.subscription_count();
            log_messages += shard.registry.logged().0;
            moved += shard.registry.moved_count();
        }
        let owned_topics = {
            let mut owned = s.owned.lock();
            match *owned {
                Some((at, count, version))
                    if at.elapsed() < OWNED_EVERY && version == s.ownership.version() =>
                {
                    count
                }
                _ => {
                    let mut count = 0;
                    for shard in s.shards.iter() {
                        let shard = shard.lock();
                        count += s.ownership.count_owned(shard.registry.topic_names());
                    }
                    *owned = Some((Instant::now(), count, s.ownership.version()));
                    count
                }
            }
        };
        let topics = s.totals.topics.load(Relaxed);
        let log_bytes = s.totals.bytes.load(Relaxed);
        let gateways = s.links.lock().iter().map(|l| l.label()).collect();
        StatusSnapshot {
            node_id: s.ownership.node_id().map(str::to_owned),
            ring_version: s.ownership.version(),
            owned_topics,
            fetching,
            parked,
            parked_refused: s.stats.parked_refused.load(Relaxed),
            topics_refused: s.stats.topics_refused.load(Relaxed),
            recoveries_deferred: s.stats.recoveries_deferred.load(Relaxed),
            publishes_repeated: s.stats.publishes_repeated.load(Relaxed),
            handed_over_remembered: moved,
            ring_refused: None,
            topics,
            subscriptions,
            log_messages,
            log_bytes,
            gateways,
            links_open: s.stats.links_open.load(Relaxed),
            links_total: s.stats.links_total.load(Relaxed),
            links_overflowed: s.stats.links_overflowed.load(Relaxed),
            subscriptions_dropped: s.stats.subscriptions_dropped.load(Relaxed),
            publishes: s.stats.publishes.load(Relaxed),
            deliveries: s.stats.deliveries.load(Relaxed),
            batches: s.stats.batches.load(Relaxed),
            wrong_owner: s.stats.wrong_owner.load(Relaxed),
            recoveries: s.stats.recoveries.load(Relaxed),
            recoveries_refused: s.stats.recoveries_refused.load(Relaxed),
            replayed: s.stats.replayed.load(Relaxed),
            handoffs_in: s.stats.handoffs_in.load(Relaxed),
            handoffs_out: s.stats.handoffs_out.load(Relaxed),
            handoffs_empty: s.stats.handoffs_empty.load(Relaxed),
            moves: s.stats.moves.load(Relaxed),
        }
    }
}

/// The outbound half of a link; dropping it (the gateway went away) closes the link.
struct Outbound {
    rx: mpsc::Receiver<Down>,
    link: Arc<Link>,
    shared: Arc<Shared>,
    /// Held only for its drop: closing the link.
    _guard: tokio_util::sync::DropGuard,
}

impl Shared {
    async fn serve_link<S>(self: Arc<Self>, link: LinkRef, mut inbound: S)
    where
        S: Stream<Item = Result<UpBatch, Status>> + Send + Unpin,
    {
        loop {
            tokio::select! {
                _ = link.0.closed.cancelled() => break,
                item = inbound.next() => match item {
                    Some(Ok(batch)) => {
                        self.heard_of(batch.ring_version);
                        for up in batch.items {
                            self.handle(&link, up);
                        }
                    }
                    Some(Err(status)) => {
                        tracing::debug!(link = link.0.id, %status, "gateway stream failed");
                        break;
                    }
                    None => break,
                },
            }
        }
        link.0.closed.cancel();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            dropped += shard.registry.drop_gateway(&link);
            shard.sync(&self.totals);
        }
        self.links.lock().retain(|l| l.id != link.0.id);
        self.stats.links_open.fetch_sub(1, Relaxed);
        self.stats
            .subscriptions_dropped
            .fetch_add(dropped as u64, Relaxed);
        tracing::info!(link = link.0.id, gateway = ?link.0.gateway_id.get(), dropped, "gateway stream ended");
    }

    /// Drops log messages past their age, and topics left with nothing.
    fn expire(&self, now: Instant) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.registry.expire(now);
            shard.sync(&self.totals);
        }
    }

    /// Sends every topic's presence changes since the last flush to its gateways: one
    /// message per topic per gateway, in order with the topic's deliveries.
    fn flush_presence(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            for (topic, event, payload, gateways) in shard.registry.flush_presence(Instant::now()) {
                let payload = Bytes::from(payload);
                for gateway in gateways {
                    self.send(
                        &gateway.0,
                        Down::presence(topic.clone(), event, payload.clone()),
                    );
                }
            }
            shard.sync(&self.totals);
        }
    }

    fn shard(&self, topic: &str) -> &Mutex<Shard> {
        self.shards.of(topic)
    }

    fn send(&self, link: &Link, down: Down) {
        match link.tx.try_send(down) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if link.reason.get().is_none() {
                    self.stats.links_overflowed.fetch_add(1, Relaxed);
                }
                link.close(CloseReason::Overflow);
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    fn handle(self: &Arc<Self>, link: &LinkRef, up: Up) {
        let Some(kind) = up.kind else { return };
        let request = match kind {
            up::Kind::Hello(hello) => {
                if hello.gateway_id.is_empty() || hello.gateway_id.len() > MAX_GATEWAY_ID_BYTES {
                    tracing::warn!(
                        link = link.0.id,
                        bytes = hello.gateway_id.len(),
                        "a gateway id of the wrong size: cutting the stream"
                    );
                    return link.0.close(CloseReason::BadHello);
                }
                tracing::info!(link = link.0.id, gateway = %hello.gateway_id, instance = %format_args!("{:016x}", hello.instance), ring_version = hello.ring_version, "gateway attached");
                // Presence handed over is keyed by it: the instance tells a restarted gateway
                // (whose subscriber ids start again) from its previous self.
                let id = format!("{}#{:016x}", hello.gateway_id, hello.instance);
                let _ = link.0.gateway_id.set(id);
                return self.heard_of(hello.ring_version);
            }
            up::Kind::Unsubscribe(unsub) => {
                // Served whoever owns the topic, but after a join of it still parked here.
                let mut shard = self.shard(&unsub.topic).lock();
                if let Some(queue) = shard.parked.get_mut(&unsub.topic) {
                    return queue.push((link.clone(), TopicRequest::Unsubscribe(unsub)));
                }
                self.unsubscribe(&mut shard.registry, link, unsub);
                return shard.sync(&self.totals);
            }
            up::Kind::Disconnect(d) => {
                // Every gateway attached here closes that user's sockets (the asker too).
                for other in self.links.lock().iter() {
                    self.send(other, Down::disconnect_user(d.sub.clone()));
                }
                return self.send(&link.0, Down::ack(d.request_id, 0, 0));
            }
            up::Kind::Subscribe(r) => TopicRequest::Subscribe(r),
            up::Kind::Publish(r) => TopicRequest::Publish(r),
            up::Kind::Move(r) => TopicRequest::Move(r),
            up::Kind::History(r) => TopicRequest::History(r),
            up::Kind::Inspect(r) => TopicRequest::Inspect(r),
            up::Kind::Track(r) => TopicRequest::Track(r),
        };
        let topic = request.topic().to_owned();
        let mut shard = self.shard(&topic).lock();
        let (owns, held) = (self.ownership.owns(&topic), shard.registry.contains(&topic));
        let parked = shard.parked.get(&topic).map(Vec::len);
        // Read only for a topic of ours neither held nor being fetched (the only case that
        // looks at them): not on every publish.
        let previous_owners = match (owns, held, parked) {
            (true, false, None) => self.ownership.previous_owners(&topic),
            _ => Vec::new(),
        };
        let facts = TopicFacts {
            owns,
            version: self.ownership.version(),
            held,
            parked,
            moved: shard.registry.moved(&topic),
            hint: request.hint(),
            previous_owners,
        };
        // Waiting requests are bounded by a quarter of a stream's queue (served at once, a
        // waiting publish answers with an ack and a delivery): later ones are refused, and
        // the gateway answers `unavailable` (phoenix.js retries a join by itself).
        let park_limit = self.limits.stream_queue / 4;
        let others = |known: &[NodeSpec]| self.ownership.others(known);
        let member = |addr: &str| self.ownership.knows_addr(addr);
        match handoff::route(facts, park_limit, others, member) {
            Route::WrongOwner(version) => self.wrong_owner(link, request, version),
            Route::Serve => self.serve(&mut shard, link, request),
            Route::Park => {
                if let Some(queue) = shard.parked.get_mut(&topic) {
                    queue.push((link.clone(), request));
                }
            }
            Route::Refuse => {
                self.stats.parked_refused.fetch_add(1, Relaxed);
                let refused = Down::rejected(request.request_id(), "unavailable");
                self.send(&link.0, refused);
            }
            Route::Fetch(previous) => {
                // It may live at a previous owner: fetch it first, then serve in order.
                shard
                    .parked
                    .insert(topic.clone(), vec![(link.clone(), request)]);
                self.tasks.spawn(self.clone().fetch(topic, previous));
            }
        }
        shard.sync(&self.totals);
    }

    fn unsubscribe(&self, shard: &mut TopicRegistry<LinkRef>, link: &LinkRef, unsub: Unsubscribe) {
        shard.unsubscribe(&unsub.topic, link, unsub.subscriber);
        let Position { epoch, offset } = shard.position(&unsub.topic).unwrap_or(Position {
            epoch: 0,
            offset: 0,
        });
        self.send(&link.0, Down::ack(unsub.request_id, epoch, offset));
    }

    /// Serves a request for a topic this node owns and holds (or may create, unless it
    /// holds as many topics, or bytes, as it may).
    fn serve(&self, shard: &mut Shard, link: &LinkRef, request: TopicRequest) {
        let shard = &mut shard.registry;
        let now = Instant::now();
        let creates = matches!(
            request,
            TopicRequest::Subscribe(_) | TopicRequest::Publish(_) | TopicRequest::Move(_)
        ) && !shard.contains(request.topic());
        if creates && self.full() {
            self.stats.topics_refused.fetch_add(1, Relaxed);
            let refused = Down::rejected(request.request_id(), "too many topics");
            return self.send(&link.0, refused);
        }
        match request {
            TopicRequest::Subscribe(sub) => {
                let recover = sub.recover.map(Position::from);
                // A recovery may bring the topic's whole log back on the gateway's stream,
                // which its other clients share: only with room for it, else `unavailable`
                // (phoenix.js joins again by itself).
                if recover.is_some() && link.0.tx.capacity() <= self.limits.log.messages + 2 {
                    self.stats.recoveries_deferred.fetch_add(1, Relaxed);
                    let refused = Down::rejected(sub.request_id, "unavailable");
                    return self.send(&link.0, refused);
                }
                let presence = match sub.presence.as_ref().map(presence_join) {
                    Some(Err(reason)) => {
                        return self.send(&link.0, Down::rejected(sub.request_id, reason));
                    }
                    Some(Ok(track)) => Some(track),
                    None => None,
                };
                let subscribed = shard.subscribe(&sub.topic, link, sub.subscriber, recover, now);
                let snapshot = match presence {
                    Some(track) => {
                        if let Some((key, meta)) = track {
                            // A node that holds all the bytes it may takes no new presence
                            // either (the topic exists: its count is not the matter).
                            let tracked = match self.bytes_full() {
                                true => Err(presence::Full),
                                false => shard.track(&sub.topic, link, sub.subscriber, &key, meta),
                            };
                            if tracked.is_err() {
                                shard.unsubscribe(&sub.topic, link, sub.subscriber);
                                let refused = Down::rejected(sub.request_id, "too many presences");
                                return self.send(&link.0, refused);
                            }
                        }
                        Some(shard.presence_snapshot(&sub.topic))
                    }
                    None => None,
                };
                // Sent under the shard lock: replay and ack are ordered with the topic's
                // deliveries, so the subscriber's messages continue with no gap.
                self.answer_subscribe(link, sub.request_id, recover, subscribed, snapshot);
            }
            TopicRequest::Move(mv) => {
                self.stats.moves.fetch_add(1, Relaxed);
                let from = mv.from.map(Position::from);
                let mut subscribed = None;
                let gateway_id = gateway_id_of(link);
                for (i, subscriber) in mv.subscribers.iter().enumerate() {
                    let recover = if i == 0 { from } else { None };
                    let s = shard.subscribe(&mv.topic, link, *subscriber, recover, now);
                    // Its presence, handed over with the topic, is its own again.
                    shard.adopt(&mv.topic, link, &gateway_id, *subscriber);
                    subscribed.get_or_insert(s);
                }
                if let Some(subscribed) = subscribed {
                    self.answer_subscribe(link, mv.request_id, from, subscribed, None);
                } else {
                    self.send(&link.0, Down::ack(mv.request_id, 0, 0));
                }
            }
            TopicRequest::Unsubscribe(unsub) => self.unsubscribe(shard, link, unsub),
            TopicRequest::Publish(publish) => {
                let key =
                    (!publish.idempotency_key.is_empty()).then_some(&*publish.idempotency_key);
                let published =
                    shard.publish(&publish.topic, &publish.event, &publish.payload, key, now);
                let Position { epoch, offset } = published.position;
                // The publisher's ack goes first, so its reply precedes its own delivery.
                self.send(&link.0, Down::ack(publish.request_id, epoch, offset));
                if published.repeated {
                    self.stats.publishes_repeated.fetch_add(1, Relaxed);
                    return;
                }
                self.stats.publishes.fetch_add(1, Relaxed);
                self.stats
                    .deliveries
                    .fetch_add(published.gateways.len() as u64, Relaxed);
                let accepted_unix_micros = ringcast_proto::unix_micros();
                for gateway in published.gateways {
                    let delivery = Delivery {
                        topic: publish.topic.clone(),
                        event: publish.event.clone(),
                        payload: publish.payload.clone(),
                        epoch,
                        offset,
                        accepted_unix_micros,
                    };
                    self.send(&gateway.0, Down::delivery(delivery));
                }
            }
            TopicRequest::History(history) => {
                let limit = (history.limit as usize).min(self.limits.log.messages.max(1));
                // As a recovery: only with room on the gateway's stream for all of it.
                if link.0.tx.capacity() <= limit + 2 {
                    self.stats.recoveries_deferred.fetch_add(1, Relaxed);
                    let refused = Down::rejected(history.request_id, "unavailable");
                    return self.send(&link.0, refused);
                }
                let since = history.since.map(Position::from);
                let found = shard.history(&history.topic, since, limit);
                let Position { epoch, offset } = found.position;
                let ack = match found.messages {
                    Some(messages) => {
                        for m in messages {
                            let replay =
                                Down::replay(history.request_id, m.event, m.payload, m.offset);
                            self.send(&link.0, replay);
                        }
                        Down::recovered_ack(history.request_id, epoch, offset)
                    }
                    None => Down::ack(history.request_id, epoch, offset),
                };
                self.send(&link.0, ack);
            }
            TopicRequest::Track(track) => {
                let Some(meta) = presence::meta_of(&track.meta) else {
                    return self.send(
                        &link.0,
                        Down::rejected(track.request_id, "invalid presence"),
                    );
                };
                let answer = match shard.update_presence(&track.topic, link, track.subscriber, meta)
                {
                    Ok(true) => Down::ack(track.request_id, 0, 0),
                    Ok(false) => Down::rejected(track.request_id, "not tracked"),
                    Err(presence::Full) => Down::rejected(track.request_id, "too many presences"),
                };
                self.send(&link.0, answer);
            }
            TopicRequest::Inspect(inspect) => {
                let info = shard.info(&inspect.topic);
                // The listing only when asked, and only while listed (counted: too many).
                let presence = shard.presence_state(&inspect.topic, inspect.presence);
                let (members, keys) = presence.as_ref().map_or((0, 0), |(_, c)| *c);
                let presence = match presence {
                    Some((Some(state), _)) => Bytes::from(state),
                    _ => Bytes::new(),
                };
                let answer = ringcast_proto::TopicInfo {
                    presence_members: members as u64,
                    presence_keys: keys as u64,
                    presence,
                    request_id: inspect.request_id,
                    exists: info.is_some(),
                    epoch: info.as_ref().map_or(0, |i| i.position.epoch),
                    offset: info.as_ref().map_or(0, |i| i.position.offset),
                    subscribers: info.as_ref().map_or(0, |i| i.subscribers as u64),
                    gateways: info.as_ref().map_or(0, |i| i.gateways as u64),
                    log_messages: info.as_ref().map_or(0, |i| i.log_messages as u64),
                };
                self.send(&link.0, Down::info(answer));
            }
        }
    }

    /// Replay (when recovering and the log has it all), then the ack.
    fn answer_subscribe(
        &self,
        link: &LinkRef,
        request_id: u64,
        recover: Option<Position>,
        subscribed: crate::registry::Subscribed,
        presence: Option<(&'static str, Bytes)>,
    ) {
        let Position { epoch, offset } = subscribed.position;
        let ack = match (recover, subscribed.replay) {
            (Some(_), Some(replay)) => {
                self.stats.recoveries.fetch_add(1, Relaxed);
                self.stats.replayed.fetch_add(replay.len() as u64, Relaxed);
                for m in replay {
                    self.send(
                        &link.0,
                        Down::replay(request_id, m.event, m.payload, m.offset),
                    );
                }
                Down::recovered_ack(request_id, epoch, offset)
            }
            (Some(_), None) => {
                self.stats.recoveries.fetch_add(1, Relaxed);
                self.stats.recoveries_refused.fetch_add(1, Relaxed);
                Down::ack(request_id, epoch, offset)
            }
            (None, _) => Down::ack(request_id, epoch, offset),
        };
        self.send(&link.0, ack.with_presence(presence));
    }

    /// Fetches `topic` from the first of its previous owners that has it, installs it, then
    /// serves the requests parked for it, in order.
    async fn fetch(self: Arc<Self>, topic: String, previous: Vec<NodeSpec>) {
        let request = TakeRequest {
            node_id: self.ownership.node_id().unwrap_or_default().to_owned(),
            ring_version: self.ownership.version(),
            topic: topic.clone(),
            addr: self.ownership.own_addr().unwrap_or_default(),
        };
        let (mut fetch, mut step) = Fetch::start(previous);
        let found = loop {
            let (owner, after) = match step {
                FetchStep::Done(found) => break found,
                FetchStep::Ask(owner, after) => (owner, after),
            };
            if !after.is_zero() {
                // The previous owner is fetching it itself: ask again shortly.
                tokio::time::sleep(after).await;
            }
            let answer = self.peers.take(&owner.addr, request.clone()).await;
            tracing::debug!(%topic, owner = %owner.id, outcome = ?answer.as_ref().map(|r| r.outcome()), "asked for a moved topic");
            if let Err(e) = &answer {
                tracing::warn!(%topic, owner = %owner.id, error = %e, "cannot fetch a moved topic from its previous owner");
            }
            step = fetch.on_answer(answer.map_err(|_| ()), |addr| {
                self.ownership.knows_addr(addr)
            });
        };
        tracing::debug!(%topic, asked = fetch.candidates(), found = found.is_some(), "moved topic fetched");
        let mut shard = self.shard(&topic).lock();
        shard.registry.clear_moved(&topic);
        match handoff::install(found) {
            Install::OwnedElsewhere(version) => {
                tracing::warn!(%topic, their_version = version, "a newer ring gives this topic elsewhere");
                shard
                    .registry
                    .mark_moved(&topic, version, None, Instant::now());
            }
            Install::Continue(reply) => {
                let now = Instant::now();
                let log = reply
                    .log
                    .into_iter()
                    .map(|e| {
                        let message = Message {
                            offset: e.offset,
                            event: e.event,
                            payload: e.payload,
                        };
                        (Duration::from_millis(e.age_ms), message)
                    })
                    .collect();
                // A peer's entries are checked as a gateway's are.
                let presence = reply
                    .presence
                    .into_iter()
                    .filter_map(|e| {
                        if !presence::key_ok(&e.key) || e.phx_ref.len() > 64 {
                            return None;
                        }
                        let entry = presence::Entry {
                            key: e.key.into(),
                            phx_ref: e.phx_ref.into(),
                            meta: presence::meta_of(&e.meta)?,
                        };
                        Some((e.gateway_id, e.subscriber, entry))
                    })
                    .collect();
                shard.registry.install(
                    &topic,
                    reply.epoch,
                    reply.offset,
                    log,
                    (presence, reply.presence_counted),
                    now,
                );
                self.stats.handoffs_in.fetch_add(1, Relaxed);
            }
            Install::Afresh => {
                self.stats.handoffs_empty.fetch_add(1, Relaxed);
            }
        }
        let version = self.ownership.version();
        let refused = handoff::refused_version(shard.registry.moved(&topic), version);
        let owns = self.ownership.owns(&topic);
        for (link, request) in shard.parked.remove(&topic).unwrap_or_default() {
            let ended = link.0.closed.is_cancelled();
            match handoff::parked(ended, request.kind(), owns, version, refused) {
                Parked::Serve => self.serve(&mut shard, &link, request),
                Parked::WrongOwner(version) => self.wrong_owner(&link, request, version),
                Parked::Drop => {}
            }
        }
        shard.sync(&self.totals);
    }

    /// Whether this node holds as many topics, or as many bytes for them, as it may.
    fn full(&self) -> bool {
        self.totals.topics.load(Relaxed) >= self.limits.max_topics || self.bytes_full()
    }

    /// Whether this node holds as many bytes for its topics as it may.
    fn bytes_full(&self) -> bool {
        self.totals.bytes.load(Relaxed) >= self.limits.max_held_bytes
    }

    /// A gateway or peer mentioned ring `version`: say so once if it is newer than ours.
    fn heard_of(&self, version: u64) {
        if self.newest_seen.is_news(self.ownership.version(), version) {
            tracing::warn!(
                ours = self.ownership.version(),
                theirs = version,
                "a newer ring version is in use: this node has not read it yet"
            );
        }
    }

    fn wrong_owner(&self, link: &LinkRef, request: TopicRequest, version: u64) {
        self.stats.wrong_owner.fetch_add(1, Relaxed);
        let id = request.request_id();
        let topic = match request {
            TopicRequest::Subscribe(r) => r.topic,
            TopicRequest::Publish(r) => r.topic,
            TopicRequest::Move(r) => r.topic,
            TopicRequest::Unsubscribe(r) => r.topic,
            TopicRequest::History(r) => r.topic,
            TopicRequest::Inspect(r) => r.topic,
            TopicRequest::Track(r) => r.topic,
        };
        self.send(&link.0, Down::wrong_owner(id, topic, version));
    }
}

/// The id and instance a gateway gave in its Hello (presence handed over is keyed by it).
fn gateway_id_of(link: &LinkRef) -> String {
    link.0.label()
}

/// What a Subscribe's presence asks: to track `(key, meta)` (checked, compact), or only to
/// watch (`None`).
fn presence_join(
    join: &ringcast_proto::PresenceJoin,
) -> Result<Option<(String, Box<str>)>, &'static str> {
    let Some(meta) = &join.meta else {
        return Ok(None);
    };
    if !presence::key_ok(&join.key) {
        return Err("invalid presence");
    }
    let meta = presence::meta_of(meta).ok_or("invalid presence")?;
    Ok(Some((join.key.clone(), meta)))
}
