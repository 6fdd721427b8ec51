//! One websocket connection: the Phoenix channel protocol for one client.
//!
//! `Session` holds the connection's channels and turns client frames and upstream events
//! into replies and upstream requests (no IO of its own); `serve` is the connection's one
//! task: it reads frames, drains the inbox, and writes everything queued with `writev`.

use crate::Gateway;
use crate::auth::{Identity, TokenError};
use crate::cluster::request::{Join, Pending, Publish, Reply};
use crate::codec::{self, InFrame, Vsn};
use crate::config::{MAX_EVENT_BYTES, Rate};
use crate::conn::{ChannelEvent, ConnEvent, ConnHandle, Cut};
use crate::feed::{Attached, Lagged, Reader};
use crate::index::{GroupKey, Position};
use crate::limits::TokenBucket;
use crate::metrics::{Metrics, seconds_since};
use crate::ws::Outbox;
use bytes::BytesMut;
use futures::task::AtomicWaker;
use futures::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// A client's websocket: tungstenite reads it, the connection writes its own frames.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Inbox events handled per wake-up at most (then the socket is written).
const INBOX_BATCH: usize = 256;
/// Window over which refused frames are counted.
const REFUSED_WINDOW: Duration = Duration::from_secs(10);
/// Joins with a recovery position waiting for their owner at once, per socket: each may bring
/// a whole topic log back.
const MAX_RECOVERING: usize = 8;
/// The inbox is polled first: a wake-up for a delivery takes it without touching the socket
/// or the idle timer (their wakers stay registered from the last poll that reached them).
/// After this many inbox turns in a row the idle timer and the socket are looked at first
/// once, so that a busy connection still reads its client's frames and times out.
const INBOX_TURNS: u32 = 8;

/// Lets a connection's task poll its socket only when there may be something to read: the
/// socket has woken it, or the last poll returned a message (more may be buffered). A
/// wake-up for a delivery then skips tungstenite's read attempt.
struct ReadInterest {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ReadInterest {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Release);
        self.task.wake();
    }
}

/// Polls `socket` for its next message through `interest` (see [`ReadInterest`]).
fn poll_read(
    socket: &mut Socket,
    interest: &ReadInterest,
    read_waker: &Waker,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Message, WsError>>> {
    // Registered before the flag is taken: a wake in between sets it again.
    interest.task.register(cx.waker());
    if !interest.woken.swap(false, AcqRel) {
        return Poll::Pending;
    }
    let polled = socket.poll_next_unpin(&mut Context::from_waker(read_waker));
    if polled.is_ready() {
        interest.woken.store(true, Release);
    }
    polled
}

/// What woke a connection's task.
enum Step {
    Inbox,
    Idle,
    /// The connection token expired.
    Expired,
    Read(Option<Result<Message, WsError>>),
}

/// Close codes used by the gateway (never 1000: phoenix.js would not reconnect).
mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

#[derive(Debug)]
enum ChannelState {
    /// Waiting for the owner; the join's ref for the reply, and the position the client
    /// asked to recover from.
    Joining {
        msg_ref: Option<Box<str>>,
        recover: Option<Position>,
        /// When the join frame arrived (join latency).
        since: Instant,
    },
    /// Live deliveries are read from the reader.
    Joined(Attached),
}

#[derive(Debug)]
struct Channel {
    join_ref: Option<Arc<str>>,
    sub: u64,
    /// The node the subscription was requested at.
    node: Arc<str>,
    state: ChannelState,
    /// A previous join of the same topic, closed once this one is answered.
    replaces: Option<Box<Channel>>,
    /// Whether the client may publish to the topic (its connection token, or its join token).
    may_publish: bool,
    /// Whether the join tracks the client's presence (a `presence_update` may change it).
    tracked: bool,
}

/// A publish waiting for its owner's answer: what the reply to the client needs.
#[derive(Debug)]
struct PublishReply {
    join_ref: Option<Box<str>>,
    msg_ref: Option<Box<str>>,
    topic: String,
    /// When the publish frame arrived (publish latency).
    since: Instant,
    /// A `presence_update`: answered `{}`, and not a publish.
    presence: bool,
}

/// The protocol state of one connection.
pub struct Session {
    vsn: Vsn,
    conn: ConnHandle,
    gateway: Arc<Gateway>,
    channels: HashMap<String, Channel>,
    /// Publishes sent and not answered yet, by token; at most `GATEWAY_CLIENT_QUEUE`.
    publishes: HashMap<u64, PublishReply>,
    next_token: u64,
    /// Refused frames in the current window, from when.
    refused: (Instant, u32),
    /// More refused frames than allowed: the socket is closed (1008).
    flooding: bool,
    frames: TokenBucket,
    joins: TokenBucket,
    /// Who the client is (its connection token), and what it may do.
    identity: Identity,
}

impl Session {
    pub fn new(vsn: Vsn, conn: ConnHandle, gateway: Arc<Gateway>, identity: Identity) -> Self {
        let (frames, joins) = gateway_rate(&gateway);
        let now = Instant::now();
        Session {
            vsn,
            conn,
            gateway,
            channels: HashMap::new(),
            publishes: HashMap::new(),
            next_token: 0,
            refused: (Instant::now(), 0),
            flooding: false,
            frames: TokenBucket::new(frames, now),
            joins: TokenBucket::new(joins, now),
            identity,
        }
    }

    /// Handles one client text frame received at `now`. A client that sends too many
    /// frames that are refused is then [`Session::flooding`].
    pub fn on_text(&mut self, text: &str, now: Instant, out: &mut Vec<String>) {
        let frame = match codec::decode(self.vsn, text) {
            Ok(frame) => frame,
            Err(malformed) => {
                if let Some(reply) = codec::malformed_reply(self.vsn, &malformed) {
                    out.push(reply);
                }
                return self.count_malformed(now);
            }
        };
        if !self.frames.take(now) {
            Metrics::inc(&self.gateway.metrics.rate_limited);
            return self.refuse(&frame, "rate limited", now, out);
        }
        if frame.topic.len() > self.gateway.config.max_topic_bytes {
            return self.refuse(&frame, "topic name too long", now, out);
        }
        self.on_frame(frame, now, out);
    }

    /// Whether the client sent more refused frames than allowed (close it: 1008).
    pub fn flooding(&self) -> bool {
        self.flooding
    }

    /// Counts a frame that could not be read at all.
    pub fn count_malformed(&mut self, now: Instant) {
        Metrics::inc(&self.gateway.metrics.malformed_frames);
        self.count_refused(now);
    }

    /// Counts a refused frame against the flood limit.
    fn count_refused(&mut self, now: Instant) {
        Metrics::inc(&self.gateway.metrics.refused_frames);
        if now.duration_since(self.refused.0) > REFUSED_WINDOW {
            self.refused = (now, 0);
        }
        self.refused.1 += 1;
        if self.refused.1 > self.gateway.config.max_malformed {
            self.flooding = true;
        }
    }

    /// Refuses a frame the client should not have sent: an error reply, counted.
    fn refuse(&mut self, f: &InFrame<'_>, reason: &str, now: Instant, out: &mut Vec<String>) {
        let join_ref = if reason == "unmatched topic" {
            None
        } else {
            f.join_ref
        };
        self.reply_error(join_ref, f.msg_ref, &f.topic, reason, out);
        self.count_refused(now);
    }

    /// An error reply that is not the client's fault (`unavailable`): not counted.
    fn reply_error(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        reason: &str,
        out: &mut Vec<String>,
    ) {
        out.push(codec::error_reply(
            self.vsn, join_ref, msg_ref, topic, reason,
        ));
    }

    fn on_frame(&mut self, f: InFrame<'_>, now: Instant, out: &mut Vec<String>) {
        match (f.topic.as_str(), f.event.as_str()) {
            // As Phoenix: the reply's join_ref is null, whatever the heartbeat carried.
            ("phoenix", "heartbeat") => out.push(codec::reply(
                self.vsn, None, f.msg_ref, "phoenix", "ok", "{}",
            )),
            (_, "phx_join" | "phx_leave") if !self.joins.take(now) => {
                Metrics::inc(&self.gateway.metrics.rate_limited);
                self.refuse(&f, "rate limited", now, out)
            }
            (_, "phx_join") => self.join(f, now, out),
            (_, "phx_leave") => self.leave(f, now, out),
            _ => self.push(f, now, out),
        }
    }

    fn join(&mut self, f: InFrame<'_>, now: Instant, out: &mut Vec<String>) {
        let gateway = self.gateway.clone();
        let topic = f.topic.clone();
        if topic == "phoenix" || !gateway.config.topic_allowed(&topic) {
            return self.refuse(&f, "unmatched topic", now, out);
        }
        if !self.channels.contains_key(&topic) && self.channels.len() >= gateway.config.max_channels
        {
            return self.refuse(&f, "too many channels joined", now, out);
        }
        // Authorized by the connection token's patterns, or by a join token for this topic.
        let may_publish = match self.authorize_join(&f) {
            Ok(may_publish) => may_publish,
            Err(e) => {
                self.security("join refused", &topic, &e.to_string());
                return self.refuse(&f, "unauthorized", now, out);
            }
        };
        let sent = self.send_join(&f, now).map(|mut channel| {
            channel.may_publish = may_publish;
            channel
        });
        // Only the newest earlier join is closed; anything it replaced goes now.
        let old = self.channels.remove(&topic).map(|mut old| {
            if let Some(older) = old.replaces.take() {
                self.release(&topic, &older);
            }
            old
        });
        match sent {
            Ok(mut channel) => {
                channel.replaces = old.map(Box::new);
                self.channels.insert(topic, channel);
            }
            Err(reason) => {
                if reason == "unavailable" {
                    self.reply_error(f.join_ref, f.msg_ref, &topic, reason, out);
                } else {
                    self.refuse(&f, reason, now, out);
                }
                // As when the owner refuses it: the earlier join is closed all the same.
                if let Some(old) = old {
                    out.push(codec::close(self.vsn, old.join_ref.as_deref(), &topic));
                    self.release(&topic, &old);
                }
            }
        }
    }

    /// Sends a join of `f.topic` on its way (to the topic's feed here, or its owner); the
    /// channel that waits for the answer, or why it could not be sent.
    fn send_join(&self, f: &InFrame<'_>, now: Instant) -> Result<Channel, &'static str> {
        let gateway = &self.gateway;
        let topic = &f.topic;
        let recover = parse_recover(f.payload)?;
        if recover.is_some() && self.recovering() >= MAX_RECOVERING {
            return Err("too many recoveries at once");
        }
        let client_key = gateway.config.auth.is_open();
        let presence = parse_presence(f.payload, self.identity.sub.as_deref(), client_key)?;
        let tracked = presence.as_ref().is_some_and(|p| p.meta.is_some());
        let sub = gateway.next_sub.fetch_add(1, Relaxed);
        let join_ref: Option<Arc<str>> = f.join_ref.map(Arc::from);
        let join = Join {
            conn: self.conn.clone(),
            topic: topic.clone(),
            sub,
            key: GroupKey::new(self.vsn, join_ref.clone()),
            recover,
            replay: Vec::new(),
            presence,
        };
        // At the topic's feed if other local subscribers have one, else at its owner.
        let node = gateway.cluster.join(join).map_err(|_| "unavailable")?;
        Metrics::inc(&gateway.metrics.joins);
        Ok(Channel {
            join_ref,
            sub,
            node,
            state: ChannelState::Joining {
                msg_ref: f.msg_ref.map(Box::from),
                recover,
                since: now,
            },
            replaces: None,
            may_publish: false,
            tracked,
        })
    }

    /// Whether this connection may join `f.topic`, and then publish to it: by its connection
    /// token's patterns, or by a join token (`{"token": ...}` in the join's params) naming
    /// this user and this topic.
    fn authorize_join(&self, f: &InFrame<'_>) -> Result<bool, TokenError> {
        let auth = &self.gateway.config.auth;
        let (topic, identity) = (&f.topic, &self.identity);
        let by_connection = identity.may_subscribe(topic);
        if auth.is_open() {
            return Ok(true);
        }
        match join_token(f.payload) {
            Some(token) => match auth.join(identity, topic, &token) {
                Ok(grant) => Ok(grant.publish || identity.may_publish(topic)),
                Err(_) if by_connection => Ok(identity.may_publish(topic)),
                Err(e) => Err(e),
            },
            None if by_connection => Ok(identity.may_publish(topic)),
            None => Err(TokenError::Missing),
        }
    }

    /// Logs a refusal for what the client sent, at most a few times a second.
    fn security(&self, what: &str, topic: &str, reason: &str) {
        if let Some(suppressed) = self.gateway.security_log.allow(Instant::now()) {
            let sub = self.identity.sub.as_deref().unwrap_or_default();
            tracing::warn!(%topic, sub, reason, suppressed, "{what}");
        }
    }

    /// Joins with a recovery position still waiting for their owner.
    fn recovering(&self) -> usize {
        self.channels
            .values()
            .filter(|c| {
                matches!(
                    c.state,
                    ChannelState::Joining {
                        recover: Some(_),
                        ..
                    }
                )
            })
            .count()
    }

    fn leave(&mut self, f: InFrame<'_>, now: Instant, out: &mut Vec<String>) {
        let Some(channel) = self.channels.remove(&f.topic) else {
            return self.refuse(&f, "unmatched topic", now, out);
        };
        out.push(codec::reply(
            self.vsn, f.join_ref, f.msg_ref, &f.topic, "ok", "{}",
        ));
        out.push(codec::close(
            self.vsn,
            channel.join_ref.as_deref(),
            &f.topic,
        ));
        self.release(&f.topic, &channel);
        if let Some(old) = &channel.replaces {
            self.release(&f.topic, old);
        }
    }

    fn push(&mut self, f: InFrame<'_>, now: Instant, out: &mut Vec<String>) {
        // A join on its way counts: as in Phoenix, which answers a join before it reads the
        // next frame, a push right behind a join is taken (it follows the join to the owner).
        let Some(channel) = self.channels.get(&f.topic) else {
            return self.refuse(&f, "unmatched topic", now, out);
        };
        if f.event == "presence_update" {
            return self.presence_update(f, now, out);
        }
        if !channel.may_publish {
            self.security("publish refused", &f.topic, "not allowed by its tokens");
            return self.refuse(&f, "unauthorized", now, out);
        }
        let (event, payload) = match broadcast_of(&f.event, f.payload) {
            Ok(parts) => parts,
            Err(reason) => return self.refuse(&f, reason, now, out),
        };
        // Every answer must fit the connection's inbox with room to spare.
        if self.publishes.len() >= self.gateway.config.client_queue / 2 {
            return self.refuse(&f, "too many publishes in flight", now, out);
        }
        // To the topic's owner under the ring in force (which orders it).
        let token = self.next_token;
        self.next_token += 1;
        let publish = Publish {
            reply: Reply::Channel {
                conn: self.conn.clone(),
                token,
            },
            topic: f.topic.clone(),
            event,
            payload: bytes::Bytes::from(codec::compact(payload).into_owned()),
            idempotency_key: None,
        };
        if self.gateway.cluster.publish(publish).is_err() {
            return self.reply_error(f.join_ref, f.msg_ref, &f.topic, "unavailable", out);
        }
        self.await_answer(token, &f, now, false);
        Metrics::inc(&self.gateway.metrics.publishes);
    }

    /// Keeps what the reply to push `f` (sent under `token`) needs until its owner answers.
    fn await_answer(&mut self, token: u64, f: &InFrame<'_>, now: Instant, presence: bool) {
        let reply = PublishReply {
            join_ref: f.join_ref.map(Box::from),
            msg_ref: f.msg_ref.map(Box::from),
            topic: f.topic.clone(),
            since: now,
            presence,
        };
        self.publishes.insert(token, reply);
    }

    /// A new presence meta for a joined channel that tracks it: `{"meta": {...}}`.
    fn presence_update(&mut self, f: InFrame<'_>, now: Instant, out: &mut Vec<String>) {
        let Some(channel) = self.channels.get(&f.topic) else {
            return self.refuse(&f, "unmatched topic", now, out);
        };
        if !channel.tracked {
            return self.refuse(&f, "presence not tracked", now, out);
        }
        let meta = match presence_meta(f.payload) {
            Ok(meta) => meta,
            Err(reason) => return self.refuse(&f, reason, now, out),
        };
        if self.publishes.len() >= self.gateway.config.client_queue / 2 {
            return self.refuse(&f, "too many publishes in flight", now, out);
        }
        // Where the subscription is now: the topic's feed (moved with a ring edit), else
        // where it was joined.
        let node = match self.gateway.index.feed(&f.topic) {
            Some((node, _)) => node,
            None => channel.node.clone(),
        };
        let (token, sub) = (self.next_token, channel.sub);
        self.next_token += 1;
        let track = Pending::Track {
            reply: Reply::Channel {
                conn: self.conn.clone(),
                token,
            },
            topic: f.topic.clone(),
            sub,
            meta,
        };
        if self.gateway.cluster.send_to(&node, track).is_err() {
            return self.reply_error(f.join_ref, f.msg_ref, &f.topic, "unavailable", out);
        }
        self.await_answer(token, &f, now, true);
    }

    /// Applies one inbox event.
    pub fn on_event(&mut self, event: ConnEvent, out: &mut Outbox) {
        match event {
            ConnEvent::Feed(reader) => self.read_feed(&reader, out),
            ConnEvent::Channel(event) => self.on_channel_event(*event, out),
        }
    }

    /// Writes what a subscription's feed has gathered, if the subscription is still one
    /// of the connection's channels (or the one a rejoin replaces).
    fn read_feed(&self, reader: &Reader, out: &mut Outbox) {
        if !reader.is_detached() {
            self.drain_feed(reader, out);
        }
    }

    /// Queues everything the reader has not read yet (one buffer), or cuts the connection
    /// if some of it was dropped because the client reads too slowly.
    fn drain_feed(&self, reader: &Reader, out: &mut Outbox) {
        let mut frames = BytesMut::new();
        match reader.read(&mut frames) {
            Ok(read) => {
                out.stamp(read.oldest);
                out.push(frames.freeze());
            }
            Err(Lagged) => {
                self.conn.cut(Cut::SlowConsumer);
            }
        }
    }

    /// Queues what a joined channel's feed had gathered (nothing for one still joining).
    fn drain_channel(&self, channel: &Channel, out: &mut Outbox) {
        if let ChannelState::Joined(attached) = &channel.state {
            self.drain_feed(&attached.0, out);
        }
    }

    fn on_channel_event(&mut self, event: ChannelEvent, out: &mut Outbox) {
        match event {
            ChannelEvent::Joined {
                topic,
                sub,
                node,
                epoch,
                offset,
                replay,
                presence,
                reader,
            } => {
                let Some(channel) = self.channels.get_mut(&topic).filter(|c| c.sub == sub) else {
                    // A join that was left or replaced while in flight.
                    return self.release_sub(&topic, sub, &node);
                };
                let ChannelState::Joining {
                    msg_ref,
                    recover,
                    since,
                } = std::mem::replace(
                    &mut channel.state,
                    ChannelState::Joined(Attached(reader.clone())),
                )
                else {
                    return;
                };
                // Where it was accepted (a retry after a ring change may land elsewhere).
                channel.node = node;
                // A recovery is all or nothing: the missed messages follow the reply, before
                // any live one, or the reply says `recovered: false` with the current position
                // and the client reloads from its source of truth.
                // Payloads are JSON text; a replay that is not would be delivered with holes.
                let replay =
                    replay.filter(|r| r.iter().all(|m| std::str::from_utf8(&m.payload).is_ok()));
                let metrics = &self.gateway.metrics;
                metrics.join_latency.observe(seconds_since(since));
                if let (Some(_), Some(replay)) = (recover, &replay) {
                    metrics.replay_messages.observe(replay.len() as f64);
                }
                let response = match (recover, &replay) {
                    (Some(from), Some(_)) => codec::position(epoch, from.offset, Some(true)),
                    (Some(_), None) => codec::position(epoch, offset, Some(false)),
                    (None, _) => codec::position(epoch, offset, None),
                };
                let join_ref = channel.join_ref.clone();
                out.push_text(codec::reply(
                    self.vsn,
                    join_ref.as_deref(),
                    msg_ref.as_deref(),
                    &topic,
                    "ok",
                    &response,
                ));
                // Presence first (as Phoenix pushes it right after the join), then what the
                // joiner missed; neither is numbered with the topic's messages.
                if let Some((event, state)) = presence {
                    let state = std::str::from_utf8(&state).unwrap_or("{}");
                    let frame = codec::DeliveryFrame::new(&topic, &event, state);
                    out.push_text(frame.encode(self.vsn, join_ref.as_deref()));
                }
                for m in replay.into_iter().flatten() {
                    let payload = std::str::from_utf8(&m.payload).unwrap_or_default();
                    let frame = codec::DeliveryFrame::new(&topic, &m.event, payload);
                    out.push_text(frame.encode(self.vsn, join_ref.as_deref()));
                }
                if let Some(old) = channel.replaces.take() {
                    self.close_channel(&topic, &old, out);
                }
                // Live deliveries since the subscription was indexed, after the reply and
                // the replay; from here on the feed wakes the connection.
                self.drain_feed(&reader, out);
            }
            ChannelEvent::JoinFailed { topic, sub, reason } => {
                if self.channels.get(&topic).is_none_or(|c| c.sub != sub) {
                    return;
                }
                let channel = self.channels.remove(&topic).expect("checked above");
                if let ChannelState::Joining { msg_ref, since, .. } = &channel.state {
                    let latency = seconds_since(*since);
                    self.gateway.metrics.join_latency.observe(latency);
                    let reply = codec::error_reply(
                        self.vsn,
                        channel.join_ref.as_deref(),
                        msg_ref.as_deref(),
                        &topic,
                        &reason,
                    );
                    out.push_text(reply);
                }
                if let Some(old) = channel.replaces {
                    self.close_channel(&topic, &old, out);
                }
            }
            ChannelEvent::Published { token, result } => {
                let Some(reply) = self.publishes.remove(&token) else {
                    return;
                };
                if !reply.presence {
                    let latency = seconds_since(reply.since);
                    self.gateway.metrics.publish_latency.observe(latency);
                }
                let (join_ref, msg_ref) = (reply.join_ref.as_deref(), reply.msg_ref.as_deref());
                let frame = match result {
                    Ok(_) if reply.presence => {
                        codec::reply(self.vsn, join_ref, msg_ref, &reply.topic, "ok", "{}")
                    }
                    Ok(at) => codec::reply(
                        self.vsn,
                        join_ref,
                        msg_ref,
                        &reply.topic,
                        "ok",
                        &codec::position(at.epoch, at.offset, None),
                    ),
                    Err(reason) => {
                        codec::error_reply(self.vsn, join_ref, msg_ref, &reply.topic, &reason)
                    }
                };
                out.push_text(frame);
            }
            ChannelEvent::Interrupted { topic, sub, reason } => {
                let Some(channel) = self.channels.get_mut(&topic) else {
                    return;
                };
                if channel.replaces.as_ref().is_some_and(|old| old.sub == sub) {
                    channel.replaces = None;
                    return;
                }
                if channel.sub != sub {
                    return;
                }
                let channel = self.channels.remove(&topic).expect("checked above");
                // What was delivered before the interruption goes first.
                self.drain_channel(&channel, out);
                out.push_text(codec::channel_error(
                    self.vsn,
                    channel.join_ref.as_deref(),
                    &topic,
                    reason,
                ));
            }
        }
    }

    /// Closes a channel that a rejoin replaced, after what it had been delivered.
    fn close_channel(&self, topic: &str, old: &Channel, out: &mut Outbox) {
        self.drain_channel(old, out);
        out.push_text(codec::close(self.vsn, old.join_ref.as_deref(), topic));
        self.release(topic, old);
    }

    fn release(&self, topic: &str, channel: &Channel) {
        self.release_sub(topic, channel.sub, &channel.node);
    }

    /// Drops a subscription here and at its topic server (where its topic's feed is
    /// attached now, or where the join was sent while it is in flight).
    fn release_sub(&self, topic: &str, sub: u64, node: &str) {
        let at = self.gateway.index.remove(topic, sub);
        let node = at.as_deref().unwrap_or(node);
        self.gateway.cluster.unsubscribe(node, topic, sub);
    }

    /// Releases every subscription of the connection (it is closing).
    pub fn release_all(&mut self) {
        for (topic, channel) in std::mem::take(&mut self.channels) {
            self.release(&topic, &channel);
            if let Some(old) = &channel.replaces {
                self.release(&topic, old);
            }
        }
    }
}

/// What a client's push broadcasts: `publish` with `[event, payload]` broadcasts `event`,
/// any other event itself with the frame's payload. Refused (with the reason to answer):
/// a `publish` payload of another shape, Phoenix's control and reply events, event names
/// over [`MAX_EVENT_BYTES`].
pub fn broadcast_of<'a>(event: &str, payload: &'a str) -> Result<(String, &'a str), &'static str> {
    let (event, payload) = if event == "publish" {
        match serde_json::from_str::<(String, &RawValue)>(payload) {
            Ok((event, payload)) => (event, payload.get()),
            Err(_) => return Err("publish payload must be [event, payload]"),
        }
    } else {
        (event.to_owned(), payload)
    };
    if reserved_event(&event) {
        return Err("unsupported event");
    }
    if event.len() > MAX_EVENT_BYTES {
        return Err("event name too long");
    }
    Ok((event, payload))
}

/// The frame and join rates of a gateway's sockets.
fn gateway_rate(gateway: &Gateway) -> (Rate, Rate) {
    (gateway.config.client_rate, gateway.config.join_rate)
}

/// The join token in a join's params (`{"token": "..."}`), if it has one.
pub fn join_token(payload: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Params {
        token: Option<String>,
    }
    serde_json::from_str::<Params>(payload).ok()?.token
}

/// Reads `{"presence": {"meta": {...}, "key": "..."}}` from a join payload: `None` without
/// presence; with a `meta` the join tracks it, without one it only watches. The key is the
/// connection token's `sub` when there is one; the client's `key` only when `client_key`
/// (authentication off).
pub fn parse_presence(
    payload: &str,
    sub: Option<&str>,
    client_key: bool,
) -> Result<Option<ringcast_proto::PresenceJoin>, &'static str> {
    let Ok(serde_json::Value::Object(params)) = serde_json::from_str(payload) else {
        return Ok(None);
    };
    let presence = match params.get("presence") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Object(presence)) => presence,
        Some(_) => return Err("invalid presence"),
    };
    let meta = match presence.get("meta") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Object(meta)) => Some(checked_meta(meta)?),
        Some(_) => return Err("invalid presence"),
    };
    let key = match (sub, presence.get("key")) {
        (Some(sub), _) => sub.to_owned(),
        (None, Some(serde_json::Value::String(key))) if client_key => key.clone(),
        (None, _) if meta.is_none() => String::new(),
        (None, _) => return Err("presence key required"),
    };
    if key.len() > ringcast_proto::MAX_PRESENCE_KEY_BYTES || (meta.is_some() && key.is_empty()) {
        return Err("invalid presence key");
    }
    Ok(Some(ringcast_proto::PresenceJoin { key, meta }))
}

/// A `presence_update`'s `{"meta": {...}}`.
fn presence_meta(payload: &str) -> Result<bytes::Bytes, &'static str> {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(p)) => match p.get("meta") {
            Some(serde_json::Value::Object(meta)) => checked_meta(meta),
            _ => Err("invalid presence"),
        },
        _ => Err("invalid presence"),
    }
}

/// A presence meta as sent on: compact, small, without a `phx_ref` of its own.
fn checked_meta(
    meta: &serde_json::Map<String, serde_json::Value>,
) -> Result<bytes::Bytes, &'static str> {
    if meta.contains_key("phx_ref") {
        return Err("invalid presence");
    }
    let text = serde_json::to_string(meta).map_err(|_| "invalid presence")?;
    if text.len() > ringcast_proto::MAX_PRESENCE_META_BYTES {
        return Err("presence meta too big");
    }
    Ok(bytes::Bytes::from(text))
}

/// Reads `{"recover": {"epoch": "<hex>", "offset": N}}` from a join payload.
pub fn parse_recover(payload: &str) -> Result<Option<Position>, &'static str> {
    #[derive(serde::Deserialize)]
    struct Recover {
        epoch: String,
        offset: u64,
    }
    #[derive(serde::Deserialize)]
    struct JoinPayload {
        recover: Option<Recover>,
    }
    // Any payload is accepted for a plain join; only a present `recover` must be well formed.
    let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else {
        return Ok(None);
    };
    if value.get("recover").is_none_or(|r| r.is_null()) {
        return Ok(None);
    }
    let parsed: JoinPayload =
        serde_json::from_value(value).map_err(|_| "invalid recover position")?;
    let recover = parsed.recover.expect("checked above");
    let epoch = u64::from_str_radix(&recover.epoch, 16).map_err(|_| "invalid recover position")?;
    Ok(Some(Position {
        epoch,
        offset: recover.offset,
    }))
}

/// Runs one websocket connection until the client leaves, is cut, or the gateway stops.
pub async fn serve(
    mut socket: Socket,
    vsn: Vsn,
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    identity: Identity,
) {
    let id = gateway.next_conn.fetch_add(1, Relaxed);
    let (conn, mut inbox) = ConnHandle::new(id, gateway.config.client_queue);
    gateway.conns.register(&conn, identity.sub.as_deref());
    // A connection token's expiry (and the leeway tokens get) closes the socket.
    let leeway = match &gateway.config.auth {
        crate::auth::Auth::Jwt { leeway, .. } => *leeway,
        crate::auth::Auth::Open => Duration::ZERO,
    };
    let expiry = identity
        .expires_in(std::time::SystemTime::now())
        .map(|left| Instant::now() + left + leeway);
    let expired = sleep_until(expiry);
    tokio::pin!(expired);
    let mut session = Session::new(vsn, conn.clone(), gateway.clone(), identity);
    let idle_timeout = gateway.config.idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let mut replies: Vec<String> = Vec::new();
    let mut out = Outbox::default();
    // tungstenite may hold a pong (it answers pings itself) to write before our frames.
    let mut pong_queued = false;
    let mut events = Vec::new(); // grows on demand: idle connections keep it empty
    // Inbox turns in a row without a look at the socket (see INBOX_TURNS).
    let mut inbox_turns = 0;
    let interest = Arc::new(ReadInterest {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let read_waker = Waker::from(interest.clone());
    let metrics = &gateway.metrics;

    let close: Option<(u16, &'static str)> = loop {
        if let Some(reason) = conn.cut_reason() {
            break Some(close_for(reason, metrics));
        }
        let mut step = None;
        if inbox_turns >= INBOX_TURNS {
            inbox_turns = 0;
            if idle.is_elapsed() {
                step = Some(Step::Idle);
            } else if let Poll::Ready(message) =
                poll_fn(|cx| Poll::Ready(poll_read(&mut socket, &interest, &read_waker, cx))).await
            {
                step = Some(Step::Read(message));
            }
        }
        let step = match step {
            Some(step) => step,
            None => tokio::select! {
                biased;
                // 0: cut, seen at the top of the loop.
                _ = inbox.recv_many(&mut events, INBOX_BATCH) => Step::Inbox,
                _ = &mut idle => Step::Idle,
                _ = &mut expired => Step::Expired,
                message = poll_fn(|cx| poll_read(&mut socket, &interest, &read_waker, cx)) => Step::Read(message),
            },
        };
        match step {
            Step::Inbox => inbox_turns += 1,
            Step::Idle => break Some((close::GOING_AWAY, "idle timeout")),
            Step::Expired => break Some((close::POLICY, "token expired")),
            Step::Read(message) => {
                let now = Instant::now();
                idle.as_mut().reset(now + idle_timeout);
                match message {
                    Some(Ok(Message::Text(text))) => {
                        session.on_text(text.as_str(), now, &mut replies)
                    }
                    Some(Ok(Message::Binary(_))) => session.count_malformed(now),
                    Some(Ok(Message::Ping(_))) => pong_queued = true,
                    Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(e)) => break read_error(e, metrics),
                };
                if session.flooding() {
                    break Some((close::POLICY, "too many refused frames"));
                }
                for reply in replies.drain(..) {
                    out.push_text(reply);
                }
            }
        }
        for event in events.drain(..) {
            session.on_event(event, &mut out);
        }
        if out.is_empty() {
            continue;
        }
        if out.len() > gateway.config.max_outbound_bytes {
            // Queued faster than the client takes it: replies, replays and deliveries alike.
            Metrics::inc(&metrics.slow_consumers);
            break Some((close::TRY_AGAIN_LATER, "slow consumer"));
        }
        let written = tokio::select! {
            biased;
            written = write_out(&mut socket, &mut out, &mut pong_queued, gateway.config.write_timeout) => written,
            reason = conn.cut_requested() => break Some(close_for(reason, metrics)),
        };
        match written {
            Ok(()) => {
                let stamp = out.take_stamp();
                if stamp != 0 {
                    let micros = ringcast_proto::unix_micros().saturating_sub(stamp);
                    metrics.delivery_latency.observe(micros as f64 / 1e6);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                Metrics::inc(&metrics.slow_consumers);
                break Some((close::TRY_AGAIN_LATER, "write timeout"));
            }
            Err(_) => break None,
        }
    };

    // Stop taking events before releasing, so nothing new is indexed for this connection.
    inbox.close();
    drop(inbox);
    gateway.conns.deregister(id);
    session.release_all();
    if let Some((code, reason)) = close {
        if code != close::RESTART && code != close::GOING_AWAY {
            security_event(&gateway, peer, code, reason);
        } else {
            tracing::debug!(conn = id, %peer, code, reason, "closing connection");
        }
        let frame = Message::Close(Some(CloseFrame {
            code: code.into(),
            reason: reason.into(),
        }));
        // What was queued goes first (a frame cut in the middle must be finished anyway);
        // then the close frame, and the client's data is read and dropped until it closes
        // too, so that our close is not overtaken by a reset (RFC 6455, 7.1.1).
        let _ = tokio::time::timeout(CLOSE_WRITE, async {
            write_out(&mut socket, &mut out, &mut pong_queued, CLOSE_WRITE).await?;
            socket.send(frame).await.map_err(std::io::Error::other)
        })
        .await;
        let _ = tokio::time::timeout(CLOSE_DRAIN, drain_reads(socket.get_mut())).await;
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Time given to what was queued and the close frame when the gateway closes a socket.
const CLOSE_WRITE: Duration = Duration::from_secs(1);
/// Time given to the client to read the close frame and close too.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);

/// Reads and drops whatever the client still sends, up to 16 MiB, until it closes.
async fn drain_reads(io: &mut TokioIo<Upgraded>) {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 8192];
    let mut left = 16usize << 20;
    while left > 0 {
        match io.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Logs a socket closed for its own behaviour, with its address, at most a few times a
/// second (floods of bad clients cannot fill the disk); the counters count every one.
fn security_event(gateway: &Gateway, peer: SocketAddr, code: u16, reason: &str) {
    if let Some(suppressed) = gateway.security_log.allow(Instant::now()) {
        tracing::warn!(%peer, code, reason, suppressed, "closing a client connection");
    }
}

/// Writes the outbox, after anything tungstenite holds (a pong) so frames never interleave.
/// Fails with `TimedOut` when the client has taken nothing for `timeout`.
async fn write_out(
    socket: &mut Socket,
    out: &mut Outbox,
    pong_queued: &mut bool,
    timeout: Duration,
) -> std::io::Result<()> {
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    if *pong_queued {
        tokio::time::timeout(timeout, socket.flush())
            .await
            .map_err(|_| timed_out())?
            .map_err(std::io::Error::other)?;
        *pong_queued = false;
    }
    loop {
        let before = out.written();
        let write = poll_fn(|cx| out.poll_write(cx, Pin::new(socket.get_mut())));
        match tokio::time::timeout(timeout, write).await {
            Ok(result) => return result,
            // Some of it went: the client reads, slowly.
            Err(_) if out.written() != before => continue,
            Err(_) => return Err(timed_out()),
        }
    }
}

/// The close code and reason for a connection the gateway cuts.
fn close_for(cut: Cut, metrics: &Metrics) -> (u16, &'static str) {
    match cut {
        Cut::SlowConsumer => {
            Metrics::inc(&metrics.slow_consumers);
            (close::TRY_AGAIN_LATER, "slow consumer")
        }
        Cut::Shutdown => (close::RESTART, "server restart"),
        Cut::Disconnected => (close::POLICY, "disconnected"),
    }
}

/// Maps a read error to a close: an oversized message gets 1009, a text frame that is not
/// UTF-8 1007, a broken websocket frame 1002; a dropped connection just ends.
fn read_error(e: WsError, metrics: &Metrics) -> Option<(u16, &'static str)> {
    match e {
        WsError::Capacity(_) => {
            Metrics::inc(&metrics.oversized_frames);
            Some((close::TOO_BIG, "message too big"))
        }
        WsError::Utf8(_) => Some((close::INVALID_DATA, "invalid utf-8")),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((close::PROTOCOL, "protocol error")),
        _ => None,
    }
}

/// Events a client may not broadcast, directly or inside a `publish`: Phoenix's control
/// events (`phx_close` would close every subscriber's channel, `phx_error` make them all
/// rejoin) and phoenix.js's reply events (`chan_reply_<ref>` resolves a pending push).
pub(crate) fn reserved_event(event: &str) -> bool {
    event.starts_with("phx_") || event.starts_with("chan_reply_") || event.starts_with("presence_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_params() {
        let parsed = |payload: &str, sub: Option<&str>, open: bool| {
            parse_presence(payload, sub, open).map(|p| p.map(|p| (p.key, p.meta)))
        };
        assert_eq!(parsed("{}", None, true), Ok(None));
        assert_eq!(parsed(r#"{"presence":null}"#, None, true), Ok(None));
        assert_eq!(
            parsed(r#"{"presence":{}}"#, None, true),
            Ok(Some((String::new(), None))),
            "watching"
        );
        assert_eq!(
            parsed(r#"{"presence":{"key":"k","meta":{ "a" : 1 }}}"#, None, true),
            Ok(Some(("k".into(), Some(bytes::Bytes::from(r#"{"a":1}"#)))))
        );
        // With tokens, the key is the token's user, whatever the client says.
        assert_eq!(
            parsed(
                r#"{"presence":{"key":"alice","meta":{}}}"#,
                Some("bob"),
                false
            ),
            Ok(Some(("bob".into(), Some(bytes::Bytes::from("{}")))))
        );
        for bad in [
            r#"{"presence":{"meta":{}}}"#,
            r#"{"presence":{"key":"k","meta":[]}}"#,
            r#"{"presence":{"key":"k","meta":{"phx_ref":"x"}}}"#,
            r#"{"presence":"on"}"#,
            r#"{"presence":{"key":"","meta":{}}}"#,
        ] {
            assert!(parsed(bad, None, true).is_err(), "{bad}");
        }
        let big = format!(
            r#"{{"presence":{{"key":"k","meta":{{"x":"{}"}}}}}}"#,
            "y".repeat(2000)
        );
        assert_eq!(parsed(&big, None, true), Err("presence meta too big"));
        assert_eq!(
            parsed(r#"{"presence":{"key":"k","meta":{}}}"#, None, false),
            Err("presence key required"),
            "a client key only with authentication off"
        );
    }

    #[test]
    fn recover_positions() {
        assert_eq!(parse_recover("{}"), Ok(None));
        assert_eq!(parse_recover("[1,2]"), Ok(None));
        assert_eq!(parse_recover(r#""text""#), Ok(None));
        assert_eq!(parse_recover(r#"{"recover":null}"#), Ok(None));
        assert_eq!(
            parse_recover(r#"{"recover":{"epoch":"00000000000000ff","offset":7}}"#),
            Ok(Some(Position {
                epoch: 255,
                offset: 7
            }))
        );
        assert!(parse_recover(r#"{"recover":{"epoch":"zz","offset":7}}"#).is_err());
        assert!(parse_recover(r#"{"recover":{"offset":7}}"#).is_err());
        assert!(parse_recover(r#"{"recover":5}"#).is_err());
    }
}
