//! The gateway <-> topic-server gRPC contract: generated types and small constructors.
//!
//! `proto/ringcast.proto` is the source of truth; this crate adds nothing but helpers that
//! keep call sites short.

#![allow(clippy::all)]

pub mod auth;
pub mod batch;

/// Generated protobuf types and the `TopicServer` client and server.
pub mod v1 {
    tonic::include_proto!("ringcast.v1");
}

/// Largest presence meta (a JSON object, compact), in bytes.
pub const MAX_PRESENCE_META_BYTES: usize = 1024;
/// Longest presence key, in bytes.
pub const MAX_PRESENCE_KEY_BYTES: usize = 256;

pub use v1::{
    Ack, Delivery, Disconnect, DisconnectUser, Down, DownBatch, Hello, History, Inspect, LogEntry,
    Move, Moved, Position, PresenceDiff, PresenceEntry, PresenceJoin, Publish, Rejected, Replay,
    Subscribe, TakeReply, TakeRequest, TopicInfo, Track, Unsubscribe, Up, UpBatch, WrongOwner,
    down, take_reply,
    topic_server_client::TopicServerClient,
    topic_server_server::{TopicServer, TopicServerServer},
    up,
};

impl Down {
    pub fn ack(request_id: u64, epoch: u64, offset: u64) -> Down {
        Down {
            kind: Some(down::Kind::Ack(Ack {
                request_id,
                position: Some(Position { epoch, offset }),
                recovered: false,
                ..Default::default()
            })),
        }
    }

    /// The Ack of a Subscribe whose recovery was served (its Replay items went first).
    pub fn recovered_ack(request_id: u64, epoch: u64, offset: u64) -> Down {
        Down {
            kind: Some(down::Kind::Ack(Ack {
                request_id,
                position: Some(Position { epoch, offset }),
                recovered: true,
                ..Default::default()
            })),
        }
    }

    /// An Ack that also carries presence for the joiner (`event`, JSON `payload`).
    pub fn with_presence(mut self, presence: Option<(&str, bytes::Bytes)>) -> Down {
        if let (Some((event, payload)), Some(down::Kind::Ack(ack))) = (presence, &mut self.kind) {
            ack.presence_event = event.to_owned();
            ack.presence = payload;
        }
        self
    }

    /// Presence news of `topic`: `presence_diff`, `presence_state` or `presence_stats`.
    pub fn presence(topic: String, event: &str, payload: bytes::Bytes) -> Down {
        Down {
            kind: Some(down::Kind::Presence(PresenceDiff {
                topic,
                event: event.to_owned(),
                payload,
            })),
        }
    }

    pub fn replay(request_id: u64, event: String, payload: bytes::Bytes, offset: u64) -> Down {
        Down {
            kind: Some(down::Kind::Replay(Replay {
                request_id,
                event,
                payload,
                offset,
            })),
        }
    }

    pub fn wrong_owner(request_id: u64, topic: String, ring_version: u64) -> Down {
        Down {
            kind: Some(down::Kind::WrongOwner(WrongOwner {
                request_id,
                topic,
                ring_version,
            })),
        }
    }

    pub fn rejected(request_id: u64, reason: impl Into<String>) -> Down {
        Down {
            kind: Some(down::Kind::Rejected(Rejected {
                request_id,
                reason: reason.into(),
            })),
        }
    }

    pub fn moved(topic: String, ring_version: u64) -> Down {
        Down {
            kind: Some(down::Kind::Moved(Moved {
                topic,
                ring_version,
            })),
        }
    }

    pub fn info(info: TopicInfo) -> Down {
        Down {
            kind: Some(down::Kind::Info(info)),
        }
    }

    pub fn disconnect_user(sub: String) -> Down {
        Down {
            kind: Some(down::Kind::Disconnect(DisconnectUser { sub })),
        }
    }

    pub fn delivery(delivery: Delivery) -> Down {
        Down {
            kind: Some(down::Kind::Delivery(delivery)),
        }
    }
}

/// Now, in microseconds since the Unix epoch: how an owner stamps a delivery's accept time
/// (`accepted_unix_micros`) and how a gateway measures the delivery latency against it.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Up {
    pub fn hello(gateway_id: String, instance: u64, ring_version: u64) -> Up {
        Up {
            kind: Some(up::Kind::Hello(Hello {
                gateway_id,
                instance,
                ring_version,
            })),
        }
    }

    pub fn subscribe(
        request_id: u64,
        topic: String,
        subscriber: u64,
        recover: Option<Position>,
    ) -> Up {
        Up {
            kind: Some(up::Kind::Subscribe(Subscribe {
                request_id,
                topic,
                subscriber,
                recover,
                previous_owner: String::new(),
                presence: None,
            })),
        }
    }

    pub fn move_here(request_id: u64, topic: String, subscribers: Vec<u64>, from: Position) -> Up {
        Up {
            kind: Some(up::Kind::Move(Move {
                request_id,
                topic,
                subscribers,
                from: Some(from),
                previous_owner: String::new(),
            })),
        }
    }

    pub fn unsubscribe(request_id: u64, topic: String, subscriber: u64) -> Up {
        Up {
            kind: Some(up::Kind::Unsubscribe(Unsubscribe {
                request_id,
                topic,
                subscriber,
            })),
        }
    }

    pub fn publish(request_id: u64, topic: String, event: String, payload: bytes::Bytes) -> Up {
        Up {
            kind: Some(up::Kind::Publish(Publish {
                request_id,
                topic,
                event,
                payload,
                previous_owner: String::new(),
                idempotency_key: String::new(),
            })),
        }
    }

    pub fn history(request_id: u64, topic: String, since: Option<Position>, limit: u32) -> Up {
        Up {
            kind: Some(up::Kind::History(History {
                request_id,
                topic,
                since,
                limit,
            })),
        }
    }

    pub fn inspect(request_id: u64, topic: String, presence: bool) -> Up {
        Up {
            kind: Some(up::Kind::Inspect(Inspect {
                request_id,
                topic,
                presence,
            })),
        }
    }

    pub fn track(request_id: u64, topic: String, subscriber: u64, meta: bytes::Bytes) -> Up {
        Up {
            kind: Some(up::Kind::Track(Track {
                request_id,
                topic,
                subscriber,
                meta,
            })),
        }
    }

    /// A subscribe that tracks (or watches) presence.
    pub fn with_presence(mut self, presence: Option<PresenceJoin>) -> Up {
        if let Some(up::Kind::Subscribe(s)) = &mut self.kind {
            s.presence = presence;
        }
        self
    }

    pub fn disconnect(request_id: u64, sub: String) -> Up {
        Up {
            kind: Some(up::Kind::Disconnect(Disconnect { request_id, sub })),
        }
    }

    /// A publish the owner orders once per `key` (within its window).
    pub fn with_idempotency_key(mut self, key: Option<String>) -> Up {
        if let (Some(key), Some(up::Kind::Publish(p))) = (key, &mut self.kind) {
            p.idempotency_key = key;
        }
        self
    }

    /// Names where the topic may still be if it moved (the owner under the sender's
    /// previous ring).
    pub fn with_previous_owner(mut self, addr: Option<String>) -> Up {
        let Some(addr) = addr else { return self };
        match &mut self.kind {
            Some(up::Kind::Subscribe(r)) => r.previous_owner = addr,
            Some(up::Kind::Publish(r)) => r.previous_owner = addr,
            Some(up::Kind::Move(r)) => r.previous_owner = addr,
            _ => {}
        }
        self
    }
}
