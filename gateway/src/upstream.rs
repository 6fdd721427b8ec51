//! Upstream links: one long-lived stream from this gateway to each topic server.
//!
//! A link sends batched requests up and applies what comes down in order: acks complete
//! pending requests (a join's subscriber enters the local index before its reply is
//! queued), deliveries fan out through the index. When the stream breaks, pending requests
//! fail, the node's subscriptions are interrupted (`phx_error`), and the link reconnects
//! with jittered exponential backoff.

use crate::Gateway;
use crate::codec::{self, Vsn};
use crate::conn::{ChannelEvent, ConnEvent, ConnHandle, Replayed};
use crate::index::{Delivered, GroupKey, Incoming, Inserted, LocalIndex, LocalSub, Position};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use ringcast_proto::{Delivery, Down, DownBatch, TopicServerClient, Up, UpBatch, batch, down};
use ringcast_ring::Ring;
use ringcast_topic_server::TopicService;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
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
    pub fn ok(&self, at: Position) {
        let frame = codec::reply(
            self.vsn,
            self.join_ref.as_deref(),
            self.msg_ref.as_deref(),
            &self.topic,
            "ok",
            &codec::position(at.epoch, at.offset, None),
        );
        self.conn
            .send(ConnEvent::Frame(crate::ws::text_frame(&frame)));
    }

    pub fn error(&self, reason: &str) {
        let frame = codec::error_reply(
            self.vsn,
            self.join_ref.as_deref(),
            self.msg_ref.as_deref(),
            &self.topic,
            reason,
        );
        self.conn
            .send(ConnEvent::Frame(crate::ws::text_frame(&frame)));
    }
}

/// A request waiting for the owner's answer; it carries what is needed to send it again
/// (at another node, after a ring change).
#[derive(Debug)]
pub enum Pending {
    Join {
        conn: ConnHandle,
        topic: String,
        sub: u64,
        key: GroupKey,
        recover: Option<ringcast_proto::Position>,
        /// Missed messages replayed so far (a recovering join), delivered with the reply.
        replay: Vec<Replayed>,
    },
    Publish {
        reply: ReplyTo,
        event: String,
        payload: bytes::Bytes,
    },
    /// This gateway's subscribers of `topic`, attached at `from_node`, moving to the link's
    /// node (the topic's new owner).
    Move {
        topic: String,
        subs: Vec<u64>,
        from_node: Arc<str>,
        from: Position,
        /// Messages after `from`, replayed by the new owner before its ack.
        replay: Vec<(u64, Replayed)>,
    },
    Unsubscribe {
        topic: String,
        sub: u64,
    },
}

impl Pending {
    pub fn topic(&self) -> &str {
        match self {
            Pending::Join { topic, .. }
            | Pending::Move { topic, .. }
            | Pending::Unsubscribe { topic, .. } => topic,
            Pending::Publish { reply, .. } => &reply.topic,
        }
    }

    fn up(&self, id: u64) -> Up {
        match self {
            Pending::Join {
                topic,
                sub,
                recover,
                ..
            } => Up::subscribe(id, topic.clone(), *sub, *recover),
            Pending::Publish {
                reply,
                event,
                payload,
            } => Up::publish(id, reply.topic.clone(), event.clone(), payload.clone()),
            Pending::Move {
                topic, subs, from, ..
            } => Up::move_here(
                id,
                topic.clone(),
                subs.clone(),
                ringcast_proto::Position {
                    epoch: from.epoch,
                    offset: from.offset,
                },
            ),
            Pending::Unsubscribe { topic, sub } => Up::unsubscribe(id, topic.clone(), *sub),
        }
    }

    /// Gives up on the request: the client is told.
    pub fn fail(self, ctx: &LinkContext, reason: &str) {
        match self {
            Pending::Join {
                conn, topic, sub, ..
            } => {
                let failed = ChannelEvent::JoinFailed {
                    topic,
                    sub,
                    reason: reason.to_owned(),
                };
                conn.send(failed.into());
            }
            Pending::Publish { reply, .. } => reply.error(reason),
            Pending::Move {
                topic, from_node, ..
            } => {
                // The subscribers stay where they were, which is not the owner any more:
                // interrupt them (they rejoin at the owner) rather than starve them.
                if let Some((node, subs)) = ctx.index.remove_topic(&topic) {
                    if node != from_node {
                        tracing::debug!(%topic, "feed moved on meanwhile");
                    }
                    ctx.interrupt(&topic, node, subs, "topic moved");
                }
            }
            Pending::Unsubscribe { .. } => {}
        }
    }
}
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
    /// owns its topic is undone and sent again to the owner.
    pub ring: Option<Arc<ArcSwap<Ring>>>,
    /// The ring before the one in force: where a topic that moved may still be.
    pub previous_ring: arc_swap::ArcSwapOption<Ring>,
    /// The gateway, for what needs its routing (retries, moves, releases at other nodes).
    pub gateway: OnceLock<Weak<Gateway>>,
    /// The newest ring version a topic server mentioned (to say so once per version).
    pub newest_seen: AtomicU64,
}

impl LinkContext {
    /// Where `topic` may still be if it moved to `node`: its owner under the previous ring.
    fn previous_owner(&self, topic: &str, node: &str) -> Option<String> {
        let previous = self.previous_ring.load();
        let owner = previous.as_ref()?.owner(topic);
        (owner.id != node).then(|| owner.addr.clone())
    }

    /// The address of node `id` under the ring in force or the previous one.
    fn addr_of(&self, id: &str) -> Option<String> {
        let current = self.ring.as_ref()?.load();
        if let Some(node) = current.node(id) {
            return Some(node.addr.clone());
        }
        let previous = self.previous_ring.load();
        previous.as_ref()?.node(id).map(|n| n.addr.clone())
    }

    pub fn gateway(&self) -> Option<Arc<Gateway>> {
        self.gateway.get().and_then(Weak::upgrade)
    }

    /// Errors the channels of `subs` (their `topic` was interrupted) and releases them at
    /// `node`.
    pub fn interrupt(
        &self,
        topic: &str,
        node: Arc<str>,
        subs: Vec<LocalSub>,
        reason: &'static str,
    ) {
        Metrics::add(&self.metrics.interrupted_channels, subs.len() as u64);
        let link = self.gateway().and_then(|g| g.routing.link(&node));
        for entry in subs {
            if let Some(link) = &link {
                link.unsubscribe(topic, entry.sub);
            }
            let event = ChannelEvent::Interrupted {
                topic: topic.to_owned(),
                sub: entry.sub,
                reason,
            };
            entry.conn.send(event.into());
        }
    }
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

    /// Sends `pending`'s request with a fresh request id; it is completed when the owner
    /// answers (or fails if the stream breaks first). Handed back when the link cannot take
    /// it (the topic server is not reachable right now).
    #[allow(clippy::result_large_err)] // the request is handed back to be retried, not boxed
    pub fn request(&self, pending: Pending) -> Result<(), Pending> {
        let id = self.next_request.fetch_add(1, Relaxed);
        let mut state = self.state.lock();
        let Some(tx) = state.tx.as_ref() else {
            return Err(pending);
        };
        let hint = match &pending {
            Pending::Move { from_node, .. } => self.ctx.addr_of(from_node),
            Pending::Unsubscribe { .. } => None,
            other => self.ctx.previous_owner(other.topic(), &self.node),
        };
        if tx
            .try_send(pending.up(id).with_previous_owner(hint))
            .is_err()
        {
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
                    if batch::recv(&mut rx, &mut items, batch::MAX_ITEMS, batch::MAX_BYTES).await
                        == 0
                    {
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
        let ours = self.ctx.ring_version.load(Relaxed);
        if version > ours && self.ctx.newest_seen.fetch_max(version, Relaxed) < version {
            tracing::warn!(node = %self.node, ours, theirs = version, "a newer ring version is in use: this gateway has not read it yet");
        }
    }

    /// Fails pending requests (moves are tried again) and interrupts every subscription
    /// held at this node.
    fn disconnect(&self, reason: &str) {
        let pending = {
            let mut state = self.state.lock();
            state.tx = None;
            std::mem::take(&mut state.pending)
        };
        let was_connected = self.connected.swap(false, Relaxed);
        for (_, p) in pending {
            match (p, self.ctx.gateway()) {
                (p @ Pending::Move { .. }, Some(gateway)) if !self.stop.is_cancelled() => {
                    crate::rebalance::retry(gateway, p, 0)
                }
                (p, _) => p.fail(&self.ctx, "unavailable"),
            }
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
    fn interrupt_gap(&self, topic: &str, at: Position, node: Arc<str>, subs: Vec<LocalSub>) {
        if subs.is_empty() {
            return;
        }
        tracing::warn!(node = %self.node, %topic, epoch = at.epoch, offset = at.offset, channels = subs.len(), "gap in a topic's stream: interrupting its channels");
        Metrics::inc(&self.ctx.metrics.gaps);
        self.ctx.interrupt(topic, node, subs, "gap detected");
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

    /// Sends `pending` again wherever the topic goes now, once the ring allows; or fails it.
    fn retry(&self, pending: Pending, wanted_version: u64) {
        match self.ctx.gateway() {
            Some(gateway) => crate::rebalance::retry(gateway, pending, wanted_version),
            None => pending.fail(&self.ctx, "unavailable"),
        }
    }

    /// Delivers consecutive messages of `topic` (a run from one batch).
    fn deliver<'a>(
        &self,
        topic: &str,
        run: impl IntoIterator<Item = (Position, &'a str, &'a [u8])>,
    ) {
        let mut messages = Vec::new();
        let mut unreadable = None;
        for (at, event, payload) in run {
            match std::str::from_utf8(payload) {
                Ok(payload) => messages.push(Incoming { at, event, payload }),
                Err(_) => {
                    unreadable = Some(at);
                    break;
                }
            }
        }
        let mut delivered = self.ctx.index.deliver(topic, &messages, &self.ctx.metrics);
        if let (Some(at), Delivered::Queued(_)) = (unreadable, &delivered) {
            // Cannot be delivered, so the subscribers would miss it: a gap too.
            tracing::error!(%topic, "delivery payload is not UTF-8");
            if let Some((node, subs)) = self.ctx.index.remove_topic(topic) {
                delivered = Delivered::Gap(at, node, subs);
            }
        }
        if let Delivered::Gap(at, node, subs) = delivered {
            self.interrupt_gap(topic, at, node, subs);
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
        Metrics::add(&self.ctx.metrics.deliveries_in, run.len() as u64);
        self.deliver(
            topic,
            run.iter().map(|d| {
                let at = Position {
                    epoch: d.epoch,
                    offset: d.offset,
                };
                (at, d.event.as_str(), &d.payload[..])
            }),
        );
    }

    fn apply(&self, item: Down) {
        let Some(kind) = item.kind else { return };
        match kind {
            down::Kind::Delivery(d) => self.deliver_run(&d.topic, std::slice::from_ref(&d)),
            down::Kind::Replay(r) => {
                let replayed = Replayed {
                    offset: r.offset,
                    event: r.event,
                    payload: r.payload,
                };
                match self.state.lock().pending.get_mut(&r.request_id) {
                    Some(Pending::Join { replay, .. }) => replay.push(replayed),
                    Some(Pending::Move { replay, .. }) => replay.push((r.offset, replayed)),
                    _ => {}
                }
            }
            down::Kind::Ack(ack) => {
                let position = ack.position.unwrap_or_default();
                let at = Position {
                    epoch: position.epoch,
                    offset: position.offset,
                };
                match self.take_pending(ack.request_id) {
                    Some(join @ Pending::Join { .. }) => self.joined(join, at, ack.recovered),
                    Some(mv @ Pending::Move { .. }) => self.moved_here(mv, at, ack.recovered),
                    Some(Pending::Publish { reply, .. }) => reply.ok(at),
                    Some(Pending::Unsubscribe { .. }) | None => {}
                }
            }
            down::Kind::WrongOwner(wrong) => {
                tracing::debug!(node = %self.node, topic = %wrong.topic, their_version = wrong.ring_version, "topic server is not the owner");
                self.heard_of(wrong.ring_version);
                if let Some(p) = self.take_pending(wrong.request_id) {
                    self.retry(p, wrong.ring_version);
                }
            }
            down::Kind::Rejected(rejected) => {
                if let Some(p) = self.take_pending(rejected.request_id) {
                    p.fail(&self.ctx, &rejected.reason);
                }
            }
            down::Kind::Moved(moved) => {
                self.heard_of(moved.ring_version);
                if let Some(gateway) = self.ctx.gateway() {
                    crate::rebalance::handed_off(
                        &gateway,
                        &self.node,
                        moved.topic,
                        moved.ring_version,
                    );
                }
            }
        }
    }

    /// The owner accepted a join: index the subscriber and tell its connection.
    fn joined(&self, join: Pending, at: Position, recovered: bool) {
        let Pending::Join {
            conn,
            topic,
            sub,
            key,
            recover,
            replay,
        } = join
        else {
            return;
        };
        let feed_here = self
            .ctx
            .index
            .feed(&topic)
            .is_some_and(|(node, _)| node == self.node);
        let retry = |this: &Self| {
            // The ring or the topic's feed moved while the join was in flight: undo it
            // here and send it where the topic lives now.
            this.unsubscribe(&topic, sub);
            let again = Pending::Join {
                conn: conn.clone(),
                topic: topic.clone(),
                sub,
                key: key.clone(),
                recover,
                replay: Vec::new(),
            };
            this.retry(again, 0);
        };
        if !self.owns(&topic) && !feed_here {
            return retry(self);
        }
        let entry = LocalSub {
            sub,
            conn: conn.clone(),
        };
        // A recovery counts only if the replay is exactly every message after the position.
        let recovered = recovered
            && recover.is_some_and(|from| {
                replay.last().map_or(from.offset, |m| m.offset) == at.offset
                    && replay
                        .iter()
                        .enumerate()
                        .all(|(i, m)| from.offset.checked_add(1 + i as u64) == Some(m.offset))
            });
        match self
            .ctx
            .index
            .insert_if_open(&topic, key.clone(), entry, &self.node, at)
        {
            Inserted::Added(reader) => {
                if !self.owns(&topic)
                    && let Some(gateway) = self.ctx.gateway()
                {
                    // The ring changed while the join was in flight and its sweep missed
                    // this new feed: move it now.
                    let subs = self.ctx.index.subs(&topic);
                    crate::rebalance::start_move(&gateway, &topic, &self.node, subs);
                }
                let joined = ChannelEvent::Joined {
                    topic,
                    sub,
                    node: self.node.clone(),
                    epoch: at.epoch,
                    offset: at.offset,
                    replay: recovered.then_some(replay),
                    reader,
                };
                conn.send(joined.into());
            }
            // The connection left while the join was in flight.
            Inserted::Closed => self.unsubscribe(&topic, sub),
            Inserted::ElsewhereNow => retry(self),
        }
    }

    /// A move of this gateway's subscribers of a topic to this node was accepted.
    fn moved_here(&self, mv: Pending, at: Position, recovered: bool) {
        let Pending::Move {
            topic,
            subs,
            from_node,
            replay,
            ..
        } = mv
        else {
            return;
        };
        if let Some(gateway) = self.ctx.gateway() {
            gateway.moves.lock().remove(&topic);
        }
        if !recovered {
            // The new owner could not continue the topic's numbering (its previous owner
            // was lost): the subscribers are told and rejoin.
            tracing::warn!(%topic, from = %from_node, to = %self.node, "moved topic could not be continued");
            if let Some((node, local)) = self.ctx.index.remove_topic(&topic) {
                self.ctx.interrupt(&topic, node, local, "topic moved");
            }
            for sub in subs {
                self.unsubscribe(&topic, sub);
            }
            return;
        }
        let epoch = at.epoch;
        self.deliver(
            &topic,
            replay.iter().map(|(offset, r)| {
                let at = Position {
                    epoch,
                    offset: *offset,
                };
                (at, r.event.as_str(), &r.payload[..])
            }),
        );
        let Some(attached) = self.ctx.index.rehome(&topic, &from_node, &self.node) else {
            // Everyone left meanwhile (or the feed was interrupted): nothing to keep here.
            for sub in subs {
                self.unsubscribe(&topic, sub);
            }
            return;
        };
        let stragglers: Vec<u64> = attached
            .iter()
            .copied()
            .filter(|s| !subs.contains(s))
            .collect();
        for sub in subs.iter().filter(|s| !attached.contains(s)) {
            self.unsubscribe(&topic, *sub);
        }
        Metrics::inc(&self.ctx.metrics.moves);
        if let Some(gateway) = self.ctx.gateway() {
            crate::rebalance::release(&gateway, &topic, &from_node, &self.node, &attached);
            if !stragglers.is_empty() {
                // Joined at the old node after the move was sent: bring them along.
                crate::rebalance::start_move(&gateway, &topic, &from_node, stragglers);
            }
        }
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
