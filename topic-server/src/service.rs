//! The topic-server service: gateway streams in, ordered deliveries out.
//!
//! Each gateway stream is a [`Link`]: a reader task applies its requests to the sharded
//! [`TopicRegistry`], and everything sent back to that gateway (acks, deliveries) goes
//! through the link's bounded queue, which the outbound stream drains into batches.

use crate::log::LogLimits;
use crate::registry::{EpochSource, Position, TopicRegistry};
use arc_swap::ArcSwap;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use ringcast_proto::{Delivery, Down, DownBatch, Up, UpBatch, up};
use ringcast_ring::Ring;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// Most stream messages drained into one outbound batch.
const MAX_BATCH: usize = 1024;
const SHARDS: usize = 64;

/// Which topics this server owns.
#[derive(Debug)]
pub enum Ownership {
    /// Every topic: a single-node setup (the gateway's embedded core).
    All,
    /// The topics the ring places on `node_id`.
    Ring {
        node_id: String,
        ring: ArcSwap<Ring>,
    },
}

impl Ownership {
    pub fn ring(node_id: String, ring: Ring) -> Self {
        Ownership::Ring {
            node_id,
            ring: ArcSwap::from_pointee(ring),
        }
    }

    fn owns(&self, topic: &str) -> bool {
        match self {
            Ownership::All => true,
            Ownership::Ring { node_id, ring } => ring.load().owner(topic).id == *node_id,
        }
    }

    /// Swaps in a newer ring: from now on, only the topics it places on this node are
    /// accepted (no-op without a ring).
    pub fn set_ring(&self, new: Arc<Ring>) {
        if let Ownership::Ring { node_id, ring } = self {
            if new.node(node_id).is_none() {
                tracing::warn!(node = %node_id, version = new.version(), "this node is not in the new ring: it owns no topics");
            }
            tracing::info!(
                from = ring.load().version(),
                to = new.version(),
                "topic server on new ring"
            );
            ring.store(new);
        }
    }

    /// The ring version in force (0 when there is no ring).
    pub fn version(&self) -> u64 {
        match self {
            Ownership::All => 0,
            Ownership::Ring { ring, .. } => ring.load().version(),
        }
    }
}

/// How often topic logs are checked for messages past their age limit.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// Limits of the service.
#[derive(Debug, Clone)]
pub struct ServiceLimits {
    /// Stream messages queued per gateway before that gateway is cut off as too slow.
    pub stream_queue: usize,
    /// How much history each topic keeps for recovery.
    pub log: LogLimits,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            stream_queue: 65_536,
            log: LogLimits::default(),
        }
    }
}

/// Why a link was closed by this side.
#[derive(Debug, Clone, Copy)]
enum CloseReason {
    Overflow,
    Shutdown,
}

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
    /// Why the last edit of the ring file was refused, while the file in place is not the
    /// ring in force.
    pub ring_refused: Option<String>,
    pub topics: usize,
    pub subscriptions: usize,
    /// Messages held in topic logs, and their bytes (payload + event).
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
}

struct Shared {
    shards: Box<[Mutex<TopicRegistry<LinkRef>>]>,
    hasher: RandomState,
    ownership: Ownership,
    limits: ServiceLimits,
    next_link: AtomicU64,
    links: Mutex<Vec<Arc<Link>>>,
    stats: Stats,
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
        let shards = (0..SHARDS)
            .map(|i| {
                Mutex::new(TopicRegistry::new(
                    EpochSource::new(seed ^ ((i as u64) << 56)),
                    limits.log,
                ))
            })
            .collect();
        let service = TopicService {
            shared: Arc::new(Shared {
                shards,
                hasher: RandomState::new(),
                ownership,
                limits,
                next_link: AtomicU64::new(1),
                links: Mutex::new(Vec::new()),
                stats: Stats::default(),
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
                        Some(CloseReason::Shutdown) | None if st.shared.shutdown.is_cancelled() => Status::unavailable("topic server shutting down"),
                        _ => return None,
                    };
                    Some((Err(status), None))
                }
                n = st.rx.recv_many(&mut items, MAX_BATCH) => {
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

    /// Closes every link (shutdown) and waits for their tasks.
    pub async fn close_all(&self) {
        for link in self.shared.links.lock().iter() {
            link.close(CloseReason::Shutdown);
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    pub fn status(&self) -> StatusSnapshot {
        let s = &self.shared;
        let (mut topics, mut subscriptions, mut log_messages, mut log_bytes) = (0, 0, 0, 0);
        for shard in s.shards.iter() {
            let shard = shard.lock();
            topics += shard.topic_count();
            subscriptions += shard.subscription_count();
            let (messages, bytes) = shard.logged();
            log_messages += messages;
            log_bytes += bytes;
        }
        let gateways = s
            .links
            .lock()
            .iter()
            .map(|l| {
                l.gateway_id
                    .get()
                    .cloned()
                    .unwrap_or_else(|| format!("link-{}", l.id))
            })
            .collect();
        StatusSnapshot {
            node_id: match &s.ownership {
                Ownership::All => None,
                Ownership::Ring { node_id, .. } => Some(node_id.clone()),
            },
            ring_version: s.ownership.version(),
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
            dropped += shard.lock().drop_gateway(&link);
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
            shard.lock().expire(now);
        }
    }

    fn shard(&self, topic: &str) -> &Mutex<TopicRegistry<LinkRef>> {
        &self.shards[(self.hasher.hash_one(topic) as usize) % self.shards.len()]
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

    fn handle(&self, link: &LinkRef, up: Up) {
        let Some(kind) = up.kind else { return };
        match kind {
            up::Kind::Hello(hello) => {
                tracing::info!(link = link.0.id, gateway = %hello.gateway_id, ring_version = hello.ring_version, "gateway attached");
                let _ = link.0.gateway_id.set(hello.gateway_id);
            }
            up::Kind::Subscribe(sub) => {
                if !self.ownership.owns(&sub.topic) {
                    return self.wrong_owner(link, sub.request_id, sub.topic);
                }
                let recover = sub.recover.map(|p| Position {
                    epoch: p.epoch,
                    offset: p.offset,
                });
                let mut shard = self.shard(&sub.topic).lock();
                let subscribed =
                    shard.subscribe(&sub.topic, link, sub.subscriber, recover, Instant::now());
                let Position { epoch, offset } = subscribed.position;
                // Sent under the shard lock: replay and ack are ordered with the topic's
                // deliveries, so the subscriber's messages continue with no gap.
                let ack = match (recover, subscribed.replay) {
                    (Some(_), Some(replay)) => {
                        self.stats.recoveries.fetch_add(1, Relaxed);
                        self.stats.replayed.fetch_add(replay.len() as u64, Relaxed);
                        for m in replay {
                            self.send(
                                &link.0,
                                Down::replay(sub.request_id, m.event, m.payload, m.offset),
                            );
                        }
                        Down::recovered_ack(sub.request_id, epoch, offset)
                    }
                    (Some(_), None) => {
                        self.stats.recoveries.fetch_add(1, Relaxed);
                        self.stats.recoveries_refused.fetch_add(1, Relaxed);
                        Down::ack(sub.request_id, epoch, offset)
                    }
                    (None, _) => Down::ack(sub.request_id, epoch, offset),
                };
                self.send(&link.0, ack);
            }
            up::Kind::Unsubscribe(unsub) => {
                let mut shard = self.shard(&unsub.topic).lock();
                shard.unsubscribe(&unsub.topic, link, unsub.subscriber);
                let Position { epoch, offset } = shard.position(&unsub.topic).unwrap_or(Position {
                    epoch: 0,
                    offset: 0,
                });
                self.send(&link.0, Down::ack(unsub.request_id, epoch, offset));
            }
            up::Kind::Publish(publish) => {
                if !self.ownership.owns(&publish.topic) {
                    return self.wrong_owner(link, publish.request_id, publish.topic);
                }
                self.stats.publishes.fetch_add(1, Relaxed);
                let mut shard = self.shard(&publish.topic).lock();
                let published = shard.publish(
                    &publish.topic,
                    &publish.event,
                    &publish.payload,
                    Instant::now(),
                );
                let Position { epoch, offset } = published.position;
                // The publisher's ack goes first, so its reply precedes its own delivery.
                self.send(&link.0, Down::ack(publish.request_id, epoch, offset));
                self.stats
                    .deliveries
                    .fetch_add(published.gateways.len() as u64, Relaxed);
                for gateway in published.gateways {
                    let delivery = Delivery {
                        topic: publish.topic.clone(),
                        event: publish.event.clone(),
                        payload: publish.payload.clone(),
                        epoch,
                        offset,
                    };
                    self.send(&gateway.0, Down::delivery(delivery));
                }
            }
        }
    }

    fn wrong_owner(&self, link: &LinkRef, request_id: u64, topic: String) {
        self.stats.wrong_owner.fetch_add(1, Relaxed);
        self.send(
            &link.0,
            Down::wrong_owner(request_id, topic, self.ownership.version()),
        );
    }
}
