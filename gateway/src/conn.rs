//! A websocket connection as the rest of the gateway sees it: a bounded inbox of events.
//!
//! Upstream links and the local index push into the inbox without waiting; a full inbox
//! means the client reads too slowly, and the connection is cut (close 1013), never waited on.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::OnceLock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the connection's task is told by the rest of the gateway, in order.
#[derive(Debug)]
pub enum ConnEvent {
    /// A websocket frame to write as is ([`crate::ws::text_frame`]): a delivery or a reply
    /// (bytes shared with others).
    Frame(Bytes),
    /// Several deliveries in order, framed, shared by every subscriber of a group.
    Frames(Arc<[Bytes]>),
    /// News about one of the connection's channels, boxed so that the queue's slots (32
    /// allocated per idle connection) stay small.
    Channel(Box<ChannelEvent>),
}

impl ConnEvent {
    /// How many frames the event counts for against the inbox's capacity.
    fn frames(&self) -> usize {
        match self {
            ConnEvent::Frames(frames) => frames.len(),
            ConnEvent::Frame(_) | ConnEvent::Channel(_) => 1,
        }
    }
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
    },
    /// The subscription `sub` of `topic` was not made.
    JoinFailed {
        topic: String,
        sub: u64,
        reason: String,
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
    /// The gateway is shutting down.
    Shutdown,
}

/// The queue behind a connection's inbox.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<ConnEvent>,
    /// Frames in `events`, bounded by the capacity.
    frames: usize,
    /// The connection's task stopped reading: nothing is queued any more.
    closed: bool,
}

#[derive(Debug)]
struct Inner {
    id: u64,
    capacity: usize,
    queue: Mutex<Queue>,
    /// Wakes the connection's task when its queue goes from empty to non-empty.
    ready: Notify,
    cut: CancellationToken,
    reason: OnceLock<Cut>,
}

/// Cheap handle to a connection's inbox.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<Inner>);

/// The receiving end of a connection's inbox, owned by the connection's task.
#[derive(Debug)]
pub struct Inbox(Arc<Inner>);

impl ConnHandle {
    /// A connection that is also cut when `shutdown` is cancelled.
    pub fn new(id: u64, capacity: usize, shutdown: &CancellationToken) -> (ConnHandle, Inbox) {
        let inner = Arc::new(Inner {
            id,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            cut: shutdown.child_token(),
            reason: OnceLock::new(),
        });
        (ConnHandle(inner.clone()), Inbox(inner))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Queues an event; returns false if the connection is gone or was cut as too slow.
    /// Only a push into an empty queue wakes the connection's task: it drains everything
    /// queued at each wake-up.
    pub fn send(&self, event: ConnEvent) -> bool {
        let mut queue = self.0.queue.lock();
        if queue.closed {
            return false;
        }
        let frames = event.frames();
        if queue.frames + frames > self.0.capacity {
            drop(queue);
            self.cut(Cut::SlowConsumer);
            return false;
        }
        let was_empty = queue.events.is_empty();
        queue.frames += frames;
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

    pub fn cut(&self, reason: Cut) {
        let _ = self.0.reason.set(reason);
        self.0.cut.cancel();
    }

    /// Resolves when the connection has been cut (or the gateway is shutting down). Create
    /// it once per connection and keep it pinned: it registers its waker only once.
    pub async fn cut_requested(&self) -> Cut {
        self.0.cut.cancelled().await;
        *self.0.reason.get().unwrap_or(&Cut::Shutdown)
    }
}

impl Inbox {
    /// Waits for events and moves up to `limit` of them into `buffer`; returns how many.
    /// Cancel-safe: events are only taken in the same poll that returns them.
    pub async fn recv_many(&mut self, buffer: &mut Vec<ConnEvent>, limit: usize) -> usize {
        loop {
            {
                let mut guard = self.0.queue.lock();
                let queue = &mut *guard;
                if !queue.events.is_empty() {
                    let n = queue.events.len().min(limit.max(1));
                    for event in queue.events.drain(..n) {
                        queue.frames -= event.frames();
                        buffer.push(event);
                    }
                    return n;
                }
            }
            // A push between the check and here leaves a permit: this returns at once.
            self.0.ready.notified().await;
        }
    }

    /// Stops taking events and drops what is queued.
    pub fn close(&mut self) {
        let mut queue = self.0.queue.lock();
        queue.closed = true;
        queue.events.clear();
        queue.frames = 0;
    }

    /// Takes whatever is queued now, without waiting.
    pub fn drain(&mut self) -> Vec<ConnEvent> {
        let mut queue = self.0.queue.lock();
        queue.frames = 0;
        queue.events.drain(..).collect()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.close();
    }
}
