//! A websocket connection as the rest of the gateway sees it: a bounded inbox of events.
//!
//! Upstream links and the local index push into the inbox without waiting; a full inbox
//! means the client reads too slowly, and the connection is cut (close 1013), never waited on.
//! A cut is a flag and a wake-up through the inbox, so the connection's task checks it with
//! one load per wake-up; [`Registry`] cuts every connection when the gateway shuts down.

use crate::feed::Reader;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::OnceLock;
use tokio::sync::Notify;

/// What the connection's task is told by the rest of the gateway, in order.
#[derive(Debug)]
pub enum ConnEvent {
    /// A subscription's feed has frames after the reader, which had read everything.
    Feed(Arc<Reader>),
    /// News about one of the connection's channels, boxed so that the queue's slots (32
    /// allocated per idle connection) stay small.
    Channel(Box<ChannelEvent>),
}

impl From<ChannelEvent> for ConnEvent {
    fn from(event: ChannelEvent) -> Self {
        ConnEvent::Channel(Box::new(event))
    }
}

/// What happened to one of a connection's channels.
#[derive(Debug)]
pub enum ChannelEvent {
    /// The owner accepted the subscription `sub` of `topic`; live deliveries follow
    /// `offset`. `replay`: the join asked to recover and the owner had every missed
    /// message, here in order (`None`: not recovered).
    Joined {
        topic: String,
        sub: u64,
        node: Arc<str>,
        epoch: u64,
        offset: u64,
        replay: Option<Vec<Replayed>>,
        /// The topic's presence for a join that asked: the event (`presence_state` or
        /// `presence_stats`) and its JSON payload.
        presence: Option<(String, Bytes)>,
        /// Where the live deliveries are read from.
        reader: Arc<Reader>,
    },
    /// The subscription `sub` of `topic` was not made.
    JoinFailed {
        topic: String,
        sub: u64,
        reason: String,
    },
    /// The owner answered publish `token` (sent by this connection): where the message
    /// went, or why it was refused.
    Published {
        token: u64,
        result: Result<crate::index::Position, String>,
    },
    /// The subscription `sub` of `topic` is gone (owner lost): the channel must error.
    Interrupted {
        topic: String,
        sub: u64,
        reason: &'static str,
    },
}

/// A message replayed to one recovering subscriber.
#[derive(Debug)]
pub struct Replayed {
    pub offset: u64,
    pub event: String,
    pub payload: bytes::Bytes,
}

/// Why the gateway cut a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    SlowConsumer,
    /// The gateway is shutting down, or draining.
    Shutdown,
    /// The backend disconnected the connection's user (`POST /api/disconnect`).
    Disconnected,
}

/// The queue behind a connection's inbox.
#[derive(Debug, Default)]
struct Queue {
    /// Bounded by the capacity.
    events: VecDeque<ConnEvent>,
    /// The connection's task stopped reading: nothing is queued any more.
    closed: bool,
}

#[derive(Debug)]
struct Inner {
    id: u64,
    capacity: usize,
    queue: Mutex<Queue>,
    /// Wakes the connection's task when its queue goes from empty to non-empty, or when it
    /// is cut.
    ready: Notify,
    /// Set once, when the connection is cut.
    cut: OnceLock<Cut>,
}

/// Cheap handle to a connection's inbox.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<Inner>);

/// The receiving end of a connection's inbox, owned by the connection's task.
#[derive(Debug)]
pub struct Inbox(Arc<Inner>);

impl ConnHandle {
    pub fn new(id: u64, capacity: usize) -> (ConnHandle, Inbox) {
        let inner = Arc::new(Inner {
            id,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            cut: OnceLock::new(),
        });
        (ConnHandle(inner.clone()), Inbox(inner))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Frames the connection may fall behind before it is cut.
    pub fn capacity(&self) -> usize {
        self.0.capacity
    }

    /// Queues an event; returns false if the connection is gone or was cut as too slow.
    /// Only a push into an empty queue wakes the connection's task: it drains everything
    /// queued at each wake-up.
    pub fn send(&self, event: ConnEvent) -> bool {
        let mut queue = self.0.queue.lock();
        if queue.closed {
            return false;
        }
        if queue.events.len() >= self.0.capacity {
            drop(queue);
            self.cut(Cut::SlowConsumer);
            return false;
        }
        let was_empty = queue.events.is_empty();
        queue.events.push_back(event);
        drop(queue);
        if was_empty {
            self.0.ready.notify_one();
        }
        true
    }

    /// Whether the connection's task has stopped reading its inbox.
    pub fn is_closed(&self) -> bool {
        self.0.queue.lock().closed
    }

    /// Cuts the connection (the first reason given is kept) and wakes its task; returns
    /// whether this was the first cut.
    pub fn cut(&self, reason: Cut) -> bool {
        let first = self.0.cut.set(reason).is_ok();
        if first {
            self.0.ready.notify_one();
        }
        first
    }

    /// Why the connection was cut, if it was.
    pub fn cut_reason(&self) -> Option<Cut> {
        self.0.cut.get().copied()
    }

    /// Resolves when the connection has been cut. May take a wake-up meant for the inbox,
    /// which is harmless: [`Inbox::recv_many`] looks at the queue before it waits.
    pub async fn cut_requested(&self) -> Cut {
        loop {
            if let Some(reason) = self.cut_reason() {
                return reason;
            }
            self.0.ready.notified().await;
        }
    }
}

impl Inbox {
    /// Waits for events and moves up to `limit` of them into `buffer`; returns how many,
    /// 0 when the connection has been cut. Cancel-safe: events are only taken in the same
    /// poll that returns them.
    pub async fn recv_many(&mut self, buffer: &mut Vec<ConnEvent>, limit: usize) -> usize {
        loop {
            let n = self.try_recv_many(buffer, limit);
            if n > 0 || self.0.cut.get().is_some() {
                return n;
            }
            // A push or a cut between the check and here leaves a permit: this returns at once.
            self.0.ready.notified().await;
        }
    }

    /// Moves up to `limit` queued events into `buffer` without waiting; returns how many.
    pub fn try_recv_many(&mut self, buffer: &mut Vec<ConnEvent>, limit: usize) -> usize {
        let mut queue = self.0.queue.lock();
        let n = queue.events.len().min(limit.max(1));
        buffer.extend(queue.events.drain(..n));
        n
    }

    /// Stops taking events and drops what is queued.
    pub fn close(&mut self) {
        let mut queue = self.0.queue.lock();
        queue.closed = true;
        queue.events.clear();
    }

    /// Takes whatever is queued now, without waiting.
    pub fn drain(&mut self) -> Vec<ConnEvent> {
        self.0.queue.lock().events.drain(..).collect()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.close();
    }
}

/// The gateway's open connections, by id and by user: shutdown and drains cut them (1012),
/// the backend API cuts a user's (during a drain too).
#[derive(Debug, Default)]
pub struct Registry(Mutex<Open>);

#[derive(Debug, Default)]
struct Open {
    conns: HashMap<u64, (ConnHandle, Option<Arc<str>>)>,
    by_user: HashMap<Arc<str>, Vec<u64>>,
    /// Shutting down: a connection registered now is cut at once.
    closed: bool,
}

impl Registry {
    /// Adds a connection of `user`; once the gateway is shutting down, cuts it instead.
    pub fn register(&self, conn: &ConnHandle, user: Option<&str>) {
        let mut open = self.0.lock();
        if open.closed {
            conn.cut(Cut::Shutdown);
            return;
        }
        let user: Option<Arc<str>> = user.map(Arc::from);
        if let Some(user) = &user {
            open.by_user
                .entry(user.clone())
                .or_default()
                .push(conn.id());
        }
        open.conns.insert(conn.id(), (conn.clone(), user));
    }

    pub fn deregister(&self, id: u64) {
        let mut open = self.0.lock();
        let Some((_, Some(user))) = open.conns.remove(&id) else {
            return;
        };
        if let Some(ids) = open.by_user.get_mut(&user) {
            ids.retain(|&other| other != id);
            if ids.is_empty() {
                open.by_user.remove(&user);
            }
        }
    }

    /// Cuts every connection of `user`; returns how many were not cut already.
    pub fn disconnect_user(&self, user: &str) -> usize {
        let open = self.0.lock();
        let ids = open
            .by_user
            .get(user)
            .map(Vec::as_slice)
            .unwrap_or_default();
        ids.iter()
            .filter_map(|id| open.conns.get(id))
            .filter(|(conn, _)| conn.cut(Cut::Disconnected))
            .count()
    }

    /// Closes the registry: every connection registered from now on is cut. Returns the open
    /// ones, for the caller to cut (all at once at shutdown, a few at a time in a drain);
    /// they stay registered until they end.
    pub fn close(&self) -> Vec<ConnHandle> {
        let mut open = self.0.lock();
        open.closed = true;
        let mut conns: Vec<ConnHandle> = open.conns.values().map(|(c, _)| c.clone()).collect();
        conns.sort_by_key(ConnHandle::id);
        conns
    }

    /// Cuts every connection, and every one registered from now on.
    pub fn shut_down(&self) {
        for conn in self.close() {
            conn.cut(Cut::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_wakes_a_waiting_inbox_and_keeps_the_first_reason() {
        let (conn, mut inbox) = ConnHandle::new(1, 4);
        let waiting = tokio::spawn(async move {
            let mut events = Vec::new();
            inbox.recv_many(&mut events, 8).await
        });
        tokio::task::yield_now().await;
        conn.cut(Cut::SlowConsumer);
        conn.cut(Cut::Shutdown);
        assert_eq!(waiting.await.unwrap(), 0);
        assert_eq!(conn.cut_reason(), Some(Cut::SlowConsumer));
        assert_eq!(conn.cut_requested().await, Cut::SlowConsumer);
    }

    #[test]
    fn shutdown_cuts_registered_connections_and_later_ones() {
        let registry = Registry::default();
        let (a, _a_inbox) = ConnHandle::new(1, 4);
        let (b, _b_inbox) = ConnHandle::new(2, 4);
        registry.register(&a, None);
        registry.register(&b, None);
        registry.deregister(2);
        registry.shut_down();
        assert_eq!(a.cut_reason(), Some(Cut::Shutdown));
        assert_eq!(b.cut_reason(), None, "deregistered before shutdown");
        let (c, _c_inbox) = ConnHandle::new(3, 4);
        registry.register(&c, None);
        assert_eq!(c.cut_reason(), Some(Cut::Shutdown));
    }

    #[test]
    fn a_user_is_disconnected_on_every_connection_of_theirs_only() {
        let registry = Registry::default();
        let conns: Vec<_> = (1..=4).map(|id| ConnHandle::new(id, 4)).collect();
        registry.register(&conns[0].0, Some("alice"));
        registry.register(&conns[1].0, Some("bob"));
        registry.register(&conns[2].0, Some("alice"));
        registry.register(&conns[3].0, None);
        registry.deregister(3);
        assert_eq!(
            registry.disconnect_user("alice"),
            1,
            "one left after a deregister"
        );
        assert_eq!(registry.disconnect_user("alice"), 0, "cut already");
        assert_eq!(registry.disconnect_user("carol"), 0);
        let cuts: Vec<_> = conns.iter().map(|(c, _)| c.cut_reason()).collect();
        assert_eq!(cuts, [Some(Cut::Disconnected), None, None, None]);
        assert_eq!(registry.close().len(), 3);
        assert_eq!(registry.disconnect_user("bob"), 1, "during a drain too");
        let late = ConnHandle::new(9, 4).0;
        registry.register(&late, Some("bob"));
        assert_eq!(
            late.cut_reason(),
            Some(Cut::Shutdown),
            "closed: no new ones"
        );
    }
}
