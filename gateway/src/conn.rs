//! A websocket connection as the rest of the gateway sees it: a bounded inbox of events.
//!
//! Upstream links and the local index push into the inbox without waiting; a full inbox
//! means the client reads too slowly, and the connection is cut (close 1013), never waited on.

use axum::extract::ws::Utf8Bytes;
use std::sync::Arc;
use std::sync::OnceLock;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

/// What the connection's task is told by the rest of the gateway, in order.
#[derive(Debug)]
pub enum ConnEvent {
    /// An encoded frame to write as is: a delivery or a reply (bytes shared with others).
    Frame(Utf8Bytes),
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
    /// The owner accepted the subscription `sub` of `topic` at this position.
    Joined {
        topic: String,
        sub: u64,
        node: Arc<str>,
        epoch: u64,
        offset: u64,
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

/// Why the gateway cut a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    SlowConsumer,
    /// The gateway is shutting down.
    Shutdown,
}

#[derive(Debug)]
struct Inner {
    id: u64,
    tx: mpsc::Sender<ConnEvent>,
    cut: CancellationToken,
    reason: OnceLock<Cut>,
}

/// Cheap handle to a connection's inbox.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<Inner>);

impl ConnHandle {
    /// A connection that is also cut when `shutdown` is cancelled.
    pub fn new(
        id: u64,
        capacity: usize,
        shutdown: &CancellationToken,
    ) -> (ConnHandle, mpsc::Receiver<ConnEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let inner = Inner {
            id,
            tx,
            cut: shutdown.child_token(),
            reason: OnceLock::new(),
        };
        (ConnHandle(Arc::new(inner)), rx)
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Queues an event; returns false if the connection is gone or was cut as too slow.
    pub fn send(&self, event: ConnEvent) -> bool {
        match self.0.tx.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.cut(Cut::SlowConsumer);
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Whether the connection's task has stopped reading its inbox.
    pub fn is_closed(&self) -> bool {
        self.0.tx.is_closed()
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
