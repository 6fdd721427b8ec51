//! One long-lived stream from this gateway to one topic server: connect, send requests up in
//! batches under request ids, reconnect with jittered backoff.
//!
//! What comes down is applied in stream order, here: deliveries fan out through the local
//! index, and the answers to joins and moves enter the index before any later delivery of
//! their topic on the same stream (so a subscriber misses nothing). Publish answers go to
//! their connection. Everything that needs a decision (a join to send elsewhere, a move to
//! start, a request refused, the stream lost) goes to the driver as a [`LinkEvent`].

use super::directory::LinkEvent;
use super::request::{Answer, Join, Move, Pending, replay_is_complete};
use super::rings::Rings;
use crate::conn::{ChannelEvent, Replayed};
use crate::index::{Delivered, Incoming, Inserted, LocalIndex, Position};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use ringcast_proto::{Delivery, Down, DownBatch, TopicServerClient, Up, UpBatch, batch, down};
use ringcast_ring::NewestSeen;
use ringcast_topic_server::TopicService;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Batches from a topic server applied together when they have all arrived.
const READY_BATCHES: usize = 32;

/// How a link reaches its topic server.
#[derive(Debug, Clone)]
pub enum Connector {
    /// A topic server over gRPC at `host:port`.
    Grpc {
        addr: String,
        keepalive: Duration,
        max_message_bytes: usize,
        /// The cluster secret, sent with the attach.
        secret: ringcast_proto::auth::ClusterSecret,
    },
    /// The topic-server core running in this process (single-node mode).
    InProcess(TopicService),
}

/// Why a link could not attach to its topic server.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("bad address {0}: {1}")]
    Address(String, tonic::transport::Error),
    #[error("connect {0}: {1}")]
    Connect(String, tonic::transport::Error),
    #[error("attach {0}: {1}")]
    Refused(String, Status),
    #[error("attach {0}: no answer within {1:?}")]
    Timeout(String, Duration),
}

type DownStream = BoxStream<'static, Result<DownBatch, Status>>;

impl Connector {
    async fn open<S>(&self, up: S) -> Result<DownStream, AttachError>
    where
        S: Stream<Item = UpBatch> + Send + 'static,
    {
        match self {
            Connector::InProcess(service) => Ok(service.open_link(Box::pin(up.map(Ok))).boxed()),
            Connector::Grpc {
                addr,
                keepalive,
                max_message_bytes,
                secret,
            } => {
                // A peer that accepts the connection but never answers (a partition, a
                // stopped process) must not hold the link: bound the whole attach.
                let limit = Duration::from_secs(2) + *keepalive * 2;
                tokio::time::timeout(
                    limit,
                    Self::attach(addr, *keepalive, *max_message_bytes, secret, up),
                )
                .await
                .map_err(|_| AttachError::Timeout(addr.clone(), limit))?
            }
        }
    }

    async fn attach<S>(
        addr: &str,
        keepalive: Duration,
        max_message_bytes: usize,
        secret: &ringcast_proto::auth::ClusterSecret,
        up: S,
    ) -> Result<DownStream, AttachError>
    where
        S: Stream<Item = UpBatch> + Send + 'static,
    {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| AttachError::Address(addr.to_owned(), e))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(keepalive)
            .keep_alive_timeout(keepalive)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(8 * 1024 * 1024));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| AttachError::Connect(addr.to_owned(), e))?;
        let mut client = TopicServerClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let mut request = tonic::Request::new(up);
        secret.attach(&mut request);
        let response = client
            .attach(request)
            .await
            .map_err(|s| AttachError::Refused(addr.to_owned(), s))?;
        Ok(response.into_inner().boxed())
    }
}

/// What every link of a gateway shares.
#[derive(Debug)]
pub struct LinkShared {
    pub gateway_id: String,
    /// Drawn at random per process: a restarted gateway under the same id is another one.
    pub instance: u64,
    pub index: Arc<LocalIndex>,
    pub metrics: Arc<Metrics>,
    /// The gateway's connections: a topic server may ask to close a user's.
    pub conns: Arc<crate::conn::Registry>,
    /// Requests queued per link before new ones are refused as unavailable.
    pub queue: usize,
    /// The rings in force (written by the driver): ownership checks and previous-owner hints.
    pub rings: Arc<ArcSwap<Rings>>,
    /// To the driver. Unbounded: every event answers a request the link had taken (bounded
    /// by its queue), reports a topic handed away or a gap (at most one per local topic), or
    /// ends a stream.
    pub events: mpsc::UnboundedSender<LinkEvent>,
    /// The newest ring version a topic server mentioned (to say so once per version).
    pub newest_seen: NewestSeen,
}

#[derive(Debug, Default)]
struct LinkState {
    /// Sender of the current stream; `None` while disconnected.
    tx: Option<mpsc::Sender<Up>>,
    pending: HashMap<u64, Pending>,
}

/// The link from this gateway to one topic server.
#[derive(Debug)]
pub struct Link {
    node: Arc<str>,
    connector: Connector,
    shared: Arc<LinkShared>,
    state: Mutex<LinkState>,
    next_request: AtomicU64,
    connected: AtomicBool,
    stop: CancellationToken,
}

impl Link {
    pub fn new(
        node: Arc<str>,
        connector: Connector,
        shared: Arc<LinkShared>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Link {
            node,
            connector,
            shared,
            state: Mutex::new(LinkState::default()),
            next_request: AtomicU64::new(1),
            connected: AtomicBool::new(false),
            stop,
        })
    }

    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// Closes the link for good; its channels are interrupted.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Relaxed)
    }

    pub fn addr(&self) -> Option<&str> {
        match &self.connector {
            Connector::Grpc { addr, .. } => Some(addr),
            Connector::InProcess(_) => None,
        }
    }

    /// Sends `pending`'s request with a fresh request id; it is answered when the topic
    /// server answers (or handed to the driver if the stream breaks first). Handed back when
    /// the link cannot take it (not connected, or its queue is full).
    #[allow(clippy::result_large_err)] // the request is handed back to be retried, not boxed
    pub fn request(&self, pending: Pending) -> Result<(), Pending> {
        let id = self.next_request.fetch_add(1, Relaxed);
        // Built before the lock, which the link's reader takes for every answer.
        let rings = self.shared.rings.load();
        let hint = match &pending {
            Pending::Move(mv) => rings.addr_of(&mv.from_node),
            Pending::Unsubscribe { .. } => None,
            other => rings.previous_owner_addr(other.topic(), &self.node),
        };
        let up = pending.up(id).with_previous_owner(hint);
        let mut state = self.state.lock();
        let Some(tx) = state.tx.as_ref() else {
            return Err(pending);
        };
        if tx.try_send(up).is_err() {
            return Err(pending);
        }
        state.pending.insert(id, pending);
        Ok(())
    }

    /// Fire-and-forget removal of a subscription (the answer is ignored).
    pub fn unsubscribe(&self, topic: &str, sub: u64) {
        let _ = self.request(Pending::Unsubscribe {
            topic: topic.to_owned(),
            sub,
        });
    }

    /// Keeps the link up until it is stopped: connect, serve, reconnect with backoff.
    pub async fn run(self: Arc<Self>) {
        let mut attempt = 0u32;
        while !self.stop.is_cancelled() {
            let (tx, rx) = mpsc::channel(self.shared.queue.max(16));
            let version = self.shared.rings.load().version();
            let _ = tx.try_send(Up::hello(
                self.shared.gateway_id.clone(),
                self.shared.instance,
                version,
            ));
            let rings = self.shared.rings.clone();
            let up = futures::stream::unfold(rx, move |mut rx| {
                let rings = rings.clone();
                async move {
                    let mut items = Vec::new();
                    if batch::recv(&mut rx, &mut items, batch::MAX_ITEMS, batch::MAX_BYTES).await
                        == 0
                    {
                        return None;
                    }
                    let ring_version = rings.load().version();
                    Some((
                        UpBatch {
                            ring_version,
                            items,
                        },
                        rx,
                    ))
                }
            });
            let opened = tokio::select! {
                _ = self.stop.cancelled() => break,
                opened = self.connector.open(up) => opened,
            };
            match opened {
                Ok(down) => {
                    self.state.lock().tx = Some(tx);
                    self.connected.store(true, Relaxed);
                    tracing::info!(node = %self.node, "upstream link up");
                    attempt = 0;
                    let reason = self.serve(down).await;
                    self.disconnect(&reason);
                }
                Err(e) => {
                    if attempt.is_multiple_of(20) {
                        tracing::warn!(node = %self.node, error = %e, "upstream link cannot connect");
                    }
                }
            }
            attempt = attempt.saturating_add(1);
            let delay = reconnect_backoff(attempt);
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.disconnect("gateway stopping");
    }

    async fn serve(&self, down: DownStream) -> String {
        // Every batch that has arrived is applied at once: when the gateway is busy, a
        // topic's messages from several batches are fanned out as one run.
        let mut down = down.ready_chunks(READY_BATCHES);
        loop {
            let batches = tokio::select! {
                _ = self.stop.cancelled() => return "gateway stopping".into(),
                batches = down.next() => batches,
            };
            let Some(batches) = batches else {
                return "stream ended".into();
            };
            let mut items = Vec::new();
            let mut failed = None;
            for batch in batches {
                match batch {
                    Ok(batch) => {
                        self.heard_of(batch.ring_version);
                        items.extend(batch.items);
                    }
                    Err(status) => {
                        failed = Some(format!("stream failed: {status}"));
                        break;
                    }
                }
            }
            self.apply_batch(items);
            if let Some(reason) = failed {
                return reason;
            }
        }
    }

    /// A topic server mentioned ring `version`: say so once if it is newer than ours.
    fn heard_of(&self, version: u64) {
        let ours = self.shared.rings.load().version();
        if self.shared.newest_seen.is_news(ours, version) {
            tracing::warn!(node = %self.node, ours, theirs = version, "a newer ring version is in use: this gateway has not read it yet");
        }
    }

    fn event(&self, event: LinkEvent) {
        // The driver is gone only when the gateway stops.
        let _ = self.shared.events.send(event);
    }

    /// Hands the unanswered requests and the feeds attached here to the driver.
    fn disconnect(&self, reason: &str) {
        let pending: Vec<Pending> = {
            let mut state = self.state.lock();
            state.tx = None;
            std::mem::take(&mut state.pending).into_values().collect()
        };
        let was_connected = self.connected.swap(false, Relaxed);
        let interrupted = self.shared.index.remove_node(&self.node);
        Metrics::add(
            &self.shared.metrics.interrupted_channels,
            interrupted.len() as u64,
        );
        let stopping = self.stop.is_cancelled();
        if !pending.is_empty() || !interrupted.is_empty() {
            self.event(LinkEvent::Down {
                pending,
                interrupted,
                stopping,
            });
        }
        if was_connected && stopping {
            tracing::info!(node = %self.node, %reason, "upstream link closed");
        } else if was_connected {
            tracing::warn!(node = %self.node, %reason, "upstream link down");
        }
    }

    fn take_pending(&self, id: u64) -> Option<Pending> {
        self.state.lock().pending.remove(&id)
    }

    /// Delivers consecutive messages of `topic` (a run from one batch).
    fn deliver<'a>(
        &self,
        topic: &str,
        run: impl IntoIterator<Item = (Position, &'a str, &'a [u8], u64)>,
    ) {
        let index = &self.shared.index;
        let mut messages = Vec::new();
        let mut unreadable = None;
        for (at, event, payload, accepted) in run {
            match std::str::from_utf8(payload) {
                Ok(payload) => messages.push(Incoming {
                    at,
                    event,
                    payload,
                    accepted,
                }),
                Err(_) => {
                    unreadable = Some(at);
                    break;
                }
            }
        }
        let mut delivered = index.deliver(topic, &messages, &self.shared.metrics);
        if let (Some(at), Delivered::Queued(_)) = (unreadable, &delivered) {
            // Cannot be delivered, so the subscribers would miss it: a gap too.
            tracing::error!(%topic, "delivery payload is not UTF-8");
            if let Some((node, subs)) = index.remove_topic(topic) {
                delivered = Delivered::Gap(at, node, subs);
            }
        }
        if let Delivered::Gap(at, node, subs) = delivered
            && !subs.is_empty()
        {
            tracing::warn!(node = %self.node, %topic, epoch = at.epoch, offset = at.offset, channels = subs.len(), "gap in a topic's stream: interrupting its channels");
            Metrics::inc(&self.shared.metrics.gaps);
            self.event(LinkEvent::Gap {
                topic: topic.to_owned(),
                node,
                subs,
            });
        }
    }

    /// Applies a batch from the topic server in order; consecutive deliveries of one topic
    /// are fanned out as one run.
    fn apply_batch(&self, items: Vec<Down>) {
        let mut items = items.into_iter().peekable();
        while let Some(item) = items.next() {
            let Some(down::Kind::Delivery(mut first)) = item.kind else {
                self.apply(item);
                continue;
            };
            let topic = std::mem::take(&mut first.topic);
            let mut run = vec![first];
            while let Some(Down {
                kind: Some(down::Kind::Delivery(next)),
            }) = items
                .next_if(|n| matches!(&n.kind, Some(down::Kind::Delivery(d)) if d.topic == topic))
            {
                run.push(next);
            }
            self.deliver_run(&topic, &run);
        }
    }

    /// Delivers deliveries of `topic` as they came from the topic server.
    fn deliver_run(&self, topic: &str, run: &[Delivery]) {
        Metrics::add(&self.shared.metrics.deliveries_in, run.len() as u64);
        self.deliver(
            topic,
            run.iter().map(|d| {
                let at = Position {
                    epoch: d.epoch,
                    offset: d.offset,
                };
                (at, d.event.as_str(), &d.payload[..], d.accepted_unix_micros)
            }),
        );
    }

    fn apply(&self, item: Down) {
        let Some(kind) = item.kind else { return };
        match kind {
            down::Kind::Delivery(d) => self.deliver_run(&d.topic, std::slice::from_ref(&d)),
            down::Kind::Replay(r) => {
                if let Some(pending) = self.state.lock().pending.get_mut(&r.request_id) {
                    pending.replayed(Replayed {
                        offset: r.offset,
                        event: r.event,
                        payload: r.payload,
                    });
                }
            }
            down::Kind::Ack(ack) => {
                let at: Position = ack.position.unwrap_or_default().into();
                match self.take_pending(ack.request_id) {
                    Some(Pending::Join(join)) => {
                        let presence = (!ack.presence_event.is_empty())
                            .then_some((ack.presence_event, ack.presence));
                        self.joined(join, at, ack.recovered, presence)
                    }
                    Some(Pending::Track { reply, .. }) => reply.published(at),
                    Some(Pending::Move(mv)) => self.moved_here(mv, at, ack.recovered),
                    Some(Pending::Publish(p)) => p.reply.published(at),
                    Some(Pending::Api(api)) => api.acked(at, ack.recovered),
                    Some(Pending::Unsubscribe { .. }) | None => {}
                }
            }
            down::Kind::WrongOwner(wrong) => {
                tracing::debug!(node = %self.node, topic = %wrong.topic, their_version = wrong.ring_version, "topic server is not the owner");
                self.heard_of(wrong.ring_version);
                if let Some(request) = self.take_pending(wrong.request_id) {
                    self.event(LinkEvent::WrongOwner {
                        request,
                        version: wrong.ring_version,
                    });
                }
            }
            down::Kind::Rejected(rejected) => {
                if let Some(request) = self.take_pending(rejected.request_id) {
                    self.event(LinkEvent::Rejected {
                        request,
                        reason: rejected.reason,
                    });
                }
            }
            down::Kind::Info(info) => {
                if let Some(Pending::Api(api)) = self.take_pending(info.request_id) {
                    let node = self.node.clone();
                    let _ = api.reply.send(Ok(Answer::Info { info, node }));
                }
            }
            down::Kind::Presence(news) => match std::str::from_utf8(&news.payload) {
                Ok(payload) => {
                    let index = &self.shared.index;
                    let metrics = &self.shared.metrics;
                    index.deliver_event(&news.topic, &self.node, &news.event, payload, metrics);
                }
                Err(_) => tracing::error!(topic = %news.topic, "presence payload is not UTF-8"),
            },
            down::Kind::Disconnect(user) => {
                let cut = self.shared.conns.disconnect_user(&user.sub);
                Metrics::add(&self.shared.metrics.disconnected, cut as u64);
                if cut > 0 {
                    tracing::info!(node = %self.node, connections = cut, "disconnected a user's connections");
                }
            }
            down::Kind::Moved(moved) => {
                self.heard_of(moved.ring_version);
                self.event(LinkEvent::Moved {
                    node: self.node.clone(),
                    topic: moved.topic,
                    version: moved.ring_version,
                });
            }
        }
    }

    /// The owner accepted a join: index the subscriber and tell its connection, unless the
    /// topic lives elsewhere now.
    fn joined(
        &self,
        mut join: Join,
        at: Position,
        recovered: bool,
        presence: Option<(String, bytes::Bytes)>,
    ) {
        let index = &self.shared.index;
        let topic = join.topic.clone();
        let owns = self.shared.rings.load().owns(&self.node, &topic);
        let feed_here = index
            .feed(&topic)
            .is_some_and(|(node, _)| node == self.node);
        if !owns && !feed_here {
            // The ring moved while the join was in flight: undo it here and send it where
            // the topic lives now.
            return self.stale(join);
        }
        let recovered = recovered
            && join
                .recover
                .is_some_and(|from| replay_is_complete(from, at, &join.replay));
        let entry = crate::index::LocalSub {
            sub: join.sub,
            conn: join.conn.clone(),
        };
        match index.insert_if_open(&topic, join.key.clone(), entry, &self.node, at) {
            Inserted::Added(reader) => {
                if !owns {
                    // The ring changed while the join was in flight and its sweep missed
                    // this new feed: it moves now.
                    self.event(LinkEvent::FeedOffOwner {
                        topic: topic.clone(),
                        node: self.node.clone(),
                    });
                }
                let replay = std::mem::take(&mut join.replay);
                let joined = ChannelEvent::Joined {
                    topic,
                    sub: join.sub,
                    node: self.node.clone(),
                    epoch: at.epoch,
                    offset: at.offset,
                    replay: recovered.then_some(replay),
                    presence,
                    reader,
                };
                join.conn.send(joined.into());
            }
            // The connection left while the join was in flight.
            Inserted::Closed => self.unsubscribe(&topic, join.sub),
            // The topic's feed is attached elsewhere now.
            Inserted::ElsewhereNow => self.stale(join),
        }
    }

    /// Undoes a join made here and hands it to the driver to send where its topic is now.
    fn stale(&self, mut join: Join) {
        self.unsubscribe(&join.topic, join.sub);
        join.replay.clear();
        self.event(LinkEvent::JoinStale { join });
    }

    /// A move of this gateway's subscribers of a topic to this node was accepted: the
    /// messages after the feed's position are delivered and the feed is attached here.
    fn moved_here(&self, mv: Move, at: Position, recovered: bool) {
        let index = &self.shared.index;
        if !recovered {
            // The new owner could not continue the topic's numbering (its previous owner
            // was lost): the subscribers are told, and rejoin.
            let interrupted = index.remove_topic(&mv.topic);
            self.event(LinkEvent::MoveNotContinued {
                mv,
                node: self.node.clone(),
                interrupted,
            });
            return;
        }
        self.deliver(
            &mv.topic,
            mv.replay.iter().map(|r| {
                let at = Position {
                    epoch: at.epoch,
                    offset: r.offset,
                };
                // Replayed: not timed (their latency is the move's, not a delivery's).
                (at, r.event.as_str(), &r.payload[..], 0)
            }),
        );
        let attached = index.rehome(&mv.topic, &mv.from_node, &self.node);
        if attached.is_some() && !mv.top_up {
            Metrics::inc(&self.shared.metrics.moves);
        }
        self.event(LinkEvent::MoveDone {
            mv,
            node: self.node.clone(),
            attached,
        });
    }
}

/// Between reconnects: 100 ms doubling to 5 s, each delay drawn from [d/2, d].
fn reconnect_backoff(attempt: u32) -> Duration {
    let max = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    Duration::from_millis(rand::random_range(max / 2..=max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_with_jitter_and_cap() {
        for attempt in 0..40 {
            let d = reconnect_backoff(attempt).as_millis() as u64;
            let max = (100u64 << attempt.min(6)).min(5_000);
            assert!(d >= max / 2 && d <= max, "attempt {attempt}: {d}");
        }
    }
}
