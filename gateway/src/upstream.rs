//! Upstream links: one long-lived stream from this gateway to each topic server.
//!
//! A link sends batched requests up and applies what comes down in order: acks complete
//! pending requests (a join's subscriber enters the local index before its reply is
//! queued), deliveries fan out through the index. When the stream breaks, pending requests
//! fail, the node's subscriptions are interrupted (`phx_error`), and the link reconnects
//! with jittered exponential backoff.

use crate::codec::{self, Vsn};
use crate::conn::{ChannelEvent, ConnEvent, ConnHandle, Replayed};
use crate::index::{Delivered, GroupKey, LocalIndex, LocalSub, Position};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use ringcast_proto::{Down, DownBatch, TopicServerClient, Up, UpBatch, down};
use ringcast_ring::Ring;
use ringcast_topic_server::TopicService;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Requests drained into one upstream batch at most.
const MAX_BATCH: usize = 1024;

/// How a link reaches its topic server.
#[derive(Debug, Clone)]
pub enum Connector {
    /// A topic server over gRPC at `host:port`.
    Grpc {
        addr: String,
        keepalive: Duration,
        max_message_bytes: usize,
    },
    /// The topic-server core running in this process (single-node mode).
    InProcess(TopicService),
}

type DownStream = BoxStream<'static, Result<DownBatch, Status>>;

impl Connector {
    async fn open<S>(&self, up: S) -> Result<DownStream, String>
    where
        S: Stream<Item = UpBatch> + Send + 'static,
    {
        match self {
            Connector::InProcess(service) => Ok(service.open_link(Box::pin(up.map(Ok))).boxed()),
            Connector::Grpc {
                addr,
                keepalive,
                max_message_bytes,
            } => {
                // A peer that accepts the connection but never answers (a partition, a
                // stopped process) must not hold the link: bound the whole attach.
                let limit = Duration::from_secs(2) + *keepalive * 2;
                tokio::time::timeout(
                    limit,
                    Self::attach(addr, *keepalive, *max_message_bytes, up),
                )
                .await
                .map_err(|_| format!("attach {addr}: no answer within {limit:?}"))?
            }
        }
    }

    async fn attach<S>(
        addr: &str,
        keepalive: Duration,
        max_message_bytes: usize,
        up: S,
    ) -> Result<DownStream, String>
    where
        S: Stream<Item = UpBatch> + Send + 'static,
    {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad address {addr}: {e}"))?
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
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut client = TopicServerClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let response = client
            .attach(up)
            .await
            .map_err(|s| format!("attach {addr}: {s}"))?;
        Ok(response.into_inner().boxed())
    }
}

/// Where a reply to a client request goes once the owner answers.
#[derive(Debug)]
pub struct ReplyTo {
    pub conn: ConnHandle,
    pub vsn: Vsn,
    pub join_ref: Option<Box<str>>,
    pub msg_ref: Option<Box<str>>,
    pub topic: String,
}

impl ReplyTo {
    /// The publish was accepted as message `at` of the topic.
    fn ok(&self, at: Position) {
        let frame = codec::reply(
            self.vsn,
            self.join_ref.as_deref(),
            self.msg_ref.as_deref(),
            &self.topic,
            "ok",
            &codec::position(at.epoch, at.offset, None),
        );
        self.conn.send(ConnEvent::Frame(frame.into()));
    }

    fn error(&self, reason: &str) {
        let frame = codec::error_reply(
            self.vsn,
            self.join_ref.as_deref(),
            self.msg_ref.as_deref(),
            &self.topic,
            reason,
        );
        self.conn.send(ConnEvent::Frame(frame.into()));
    }
}

/// A request waiting for the owner's answer.
#[derive(Debug)]
pub enum Pending {
    Join {
        conn: ConnHandle,
        topic: String,
        sub: u64,
        key: GroupKey,
        /// Missed messages replayed so far (a recovering join), delivered with the reply.
        replay: Vec<Replayed>,
    },
    Publish(ReplyTo),
    Unsubscribe,
}

/// The link could not take the request: the topic server is not reachable right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unavailable")]
pub struct Unavailable;

#[derive(Debug, Default)]
struct LinkState {
    /// Sender of the current stream; `None` while disconnected.
    tx: Option<mpsc::Sender<Up>>,
    pending: HashMap<u64, Pending>,
}

/// Shared by all links of a gateway.
#[derive(Debug)]
pub struct LinkContext {
    pub gateway_id: String,
    pub index: Arc<LocalIndex>,
    pub metrics: Arc<Metrics>,
    /// Requests queued per link before new ones are refused as unavailable.
    pub queue: usize,
    pub ring_version: Arc<AtomicU64>,
    /// The ring in force (none in embedded mode): a join completed at a node that no longer
    /// owns its topic is undone and refused as unavailable, so the client retries at the owner.
    pub ring: Option<Arc<ArcSwap<Ring>>>,
}

/// The link from this gateway to one topic server.
#[derive(Debug)]
pub struct UpstreamLink {
    node: Arc<str>,
    connector: Connector,
    ctx: Arc<LinkContext>,
    state: Mutex<LinkState>,
    next_request: AtomicU64,
    connected: AtomicBool,
    stop: CancellationToken,
}

impl UpstreamLink {
    pub fn new(
        node: Arc<str>,
        connector: Connector,
        ctx: Arc<LinkContext>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(UpstreamLink {
            node,
            connector,
            ctx,
            state: Mutex::new(LinkState::default()),
            next_request: AtomicU64::new(1),
            connected: AtomicBool::new(false),
            stop,
        })
    }

    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// Closes the link for good (its node left the ring); its channels are interrupted.
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

    /// Sends a request built by `make` from a fresh request id; `pending` is completed when
    /// the owner answers (or fails if the stream breaks first).
    pub fn request(
        &self,
        make: impl FnOnce(u64) -> Up,
        pending: Pending,
    ) -> Result<(), Unavailable> {
        let id = self.next_request.fetch_add(1, Relaxed);
        let mut state = self.state.lock();
        let tx = state.tx.as_ref().ok_or(Unavailable)?;
        tx.try_send(make(id)).map_err(|_| Unavailable)?;
        state.pending.insert(id, pending);
        Ok(())
    }

    /// Fire-and-forget removal of a subscription (the answer is ignored).
    pub fn unsubscribe(&self, topic: &str, sub: u64) {
        let _ = self.request(
            |id| Up::unsubscribe(id, topic.to_owned(), sub),
            Pending::Unsubscribe,
        );
    }

    /// Keeps the link up until the gateway stops: connect, serve, reconnect with backoff.
    pub async fn run(self: Arc<Self>) {
        let mut attempt = 0u32;
        while !self.stop.is_cancelled() {
            let (tx, rx) = mpsc::channel(self.ctx.queue.max(16));
            let _ = tx.try_send(Up::hello(
                self.ctx.gateway_id.clone(),
                self.ctx.ring_version.load(Relaxed),
            ));
            let ring_version = self.ctx.ring_version.clone();
            let up = futures::stream::unfold(rx, move |mut rx| {
                let ring_version = ring_version.clone();
                async move {
                    let mut items = Vec::new();
                    if rx.recv_many(&mut items, MAX_BATCH).await == 0 {
                        return None;
                    }
                    Some((
                        UpBatch {
                            ring_version: ring_version.load(Relaxed),
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
            let delay = backoff(attempt);
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.disconnect("gateway stopping");
    }

    async fn serve(&self, mut down: DownStream) -> String {
        loop {
            let batch = tokio::select! {
                _ = self.stop.cancelled() => return "gateway stopping".into(),
                batch = down.next() => batch,
            };
            match batch {
                Some(Ok(batch)) => {
                    for item in batch.items {
                        self.apply(item);
                    }
                }
                Some(Err(status)) => return format!("stream failed: {status}"),
                None => return "stream ended".into(),
            }
        }
    }

    /// Fails pending requests and interrupts every subscription held at this node.
    fn disconnect(&self, reason: &str) {
        let pending = {
            let mut state = self.state.lock();
            state.tx = None;
            std::mem::take(&mut state.pending)
        };
        let was_connected = self.connected.swap(false, Relaxed);
        for (_, p) in pending {
            fail(p, "unavailable");
        }
        let interrupted = self.ctx.index.remove_node(&self.node);
        Metrics::add(
            &self.ctx.metrics.interrupted_channels,
            interrupted.len() as u64,
        );
        for (topic, entry) in interrupted {
            entry.conn.send(
                ChannelEvent::Interrupted {
                    topic,
                    sub: entry.sub,
                    reason: "topic server unavailable",
                }
                .into(),
            );
        }
        if was_connected && self.stop.is_cancelled() {
            tracing::info!(node = %self.node, %reason, "upstream link closed");
        } else if was_connected {
            tracing::warn!(node = %self.node, %reason, "upstream link down");
        }
    }

    /// Errors the channels of a topic whose stream has a gap (they rejoin and recover) and
    /// drops their subscriptions at the owner.
    fn interrupt_gap(&self, topic: &str, at: Position, subs: Vec<LocalSub>) {
        if subs.is_empty() {
            return;
        }
        tracing::warn!(node = %self.node, %topic, epoch = at.epoch, offset = at.offset, channels = subs.len(), "gap in a topic's stream: interrupting its channels");
        Metrics::inc(&self.ctx.metrics.gaps);
        Metrics::add(&self.ctx.metrics.interrupted_channels, subs.len() as u64);
        for entry in subs {
            self.unsubscribe(topic, entry.sub);
            entry.conn.send(
                ChannelEvent::Interrupted {
                    topic: topic.to_owned(),
                    sub: entry.sub,
                    reason: "gap detected",
                }
                .into(),
            );
        }
    }

    /// Whether this link's node owns `topic` under the ring in force.
    fn owns(&self, topic: &str) -> bool {
        self.ctx
            .ring
            .as_ref()
            .is_none_or(|ring| ring.load().owner(topic).id == *self.node)
    }

    fn take_pending(&self, id: u64) -> Option<Pending> {
        self.state.lock().pending.remove(&id)
    }

    fn apply(&self, item: Down) {
        let Some(kind) = item.kind else { return };
        match kind {
            down::Kind::Delivery(d) => {
                Metrics::inc(&self.ctx.metrics.deliveries_in);
                let at = Position {
                    epoch: d.epoch,
                    offset: d.offset,
                };
                let delivered = match std::str::from_utf8(&d.payload) {
                    Ok(payload) => {
                        self.ctx
                            .index
                            .deliver(&d.topic, at, &d.event, payload, &self.ctx.metrics)
                    }
                    Err(_) => {
                        // Cannot be delivered, so the subscribers would miss it: a gap too.
                        tracing::error!(topic = %d.topic, "delivery payload is not UTF-8");
                        Delivered::Gap(self.ctx.index.remove_topic(&d.topic))
                    }
                };
                if let Delivered::Gap(subs) = delivered {
                    self.interrupt_gap(&d.topic, at, subs);
                }
            }
            down::Kind::Replay(r) => {
                if let Some(Pending::Join { replay, .. }) =
                    self.state.lock().pending.get_mut(&r.request_id)
                {
                    replay.push(Replayed {
                        event: r.event,
                        payload: r.payload,
                    });
                }
            }
            down::Kind::Ack(ack) => {
                let position = ack.position.unwrap_or_default();
                let at = Position {
                    epoch: position.epoch,
                    offset: position.offset,
                };
                match self.take_pending(ack.request_id) {
                    Some(Pending::Join {
                        conn,
                        topic,
                        sub,
                        key,
                        replay,
                    }) => {
                        if !self.owns(&topic) {
                            // The ring changed while the join was in flight.
                            self.unsubscribe(&topic, sub);
                            let join = Pending::Join {
                                conn,
                                topic,
                                sub,
                                key,
                                replay,
                            };
                            return fail(join, "unavailable");
                        }
                        let entry = LocalSub {
                            sub,
                            conn: conn.clone(),
                            node: self.node.clone(),
                        };
                        if self.ctx.index.insert_if_open(&topic, key, entry, at) {
                            let joined = ChannelEvent::Joined {
                                topic,
                                sub,
                                node: self.node.clone(),
                                epoch: position.epoch,
                                offset: position.offset,
                                replay: ack.recovered.then_some(replay),
                            };
                            conn.send(joined.into());
                        } else {
                            // The connection left while the join was in flight.
                            self.unsubscribe(&topic, sub);
                        }
                    }
                    Some(Pending::Publish(reply)) => reply.ok(at),
                    Some(Pending::Unsubscribe) | None => {}
                }
            }
            down::Kind::WrongOwner(wrong) => {
                tracing::warn!(node = %self.node, topic = %wrong.topic, their_version = wrong.ring_version, "topic server is not the owner");
                if let Some(p) = self.take_pending(wrong.request_id) {
                    fail(p, "unavailable");
                }
            }
            down::Kind::Rejected(rejected) => {
                if let Some(p) = self.take_pending(rejected.request_id) {
                    fail(p, &rejected.reason);
                }
            }
        }
    }
}

fn fail(pending: Pending, reason: &str) {
    match pending {
        Pending::Join {
            conn, topic, sub, ..
        } => {
            conn.send(
                ChannelEvent::JoinFailed {
                    topic,
                    sub,
                    reason: reason.to_owned(),
                }
                .into(),
            );
        }
        Pending::Publish(reply) => reply.error(reason),
        Pending::Unsubscribe => {}
    }
}

/// Jittered exponential backoff: 100 ms doubling to 5 s, each delay drawn from [d/2, d].
fn backoff(attempt: u32) -> Duration {
    let max = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    Duration::from_millis(rand::random_range(max / 2..=max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for attempt in 0..40 {
            let d = backoff(attempt).as_millis() as u64;
            let max = (100u64 << attempt.min(6)).min(5_000);
            assert!(d >= max / 2 && d <= max, "attempt {attempt}: {d}");
        }
    }
}
