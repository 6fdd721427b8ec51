//! The requests a gateway sends its topic servers, as they wait for an answer: what is needed
//! to send them again (at another node, after a ring change) and to tell their client.

use crate::conn::{ChannelEvent, ConnHandle, Replayed};
use crate::index::{GroupKey, Position};
use ringcast_proto::{TopicInfo, Up};
use std::sync::Arc;
use tokio::sync::oneshot;

/// A request waiting for its topic server's answer.
#[derive(Debug)]
pub enum Pending {
    Join(Join),
    Publish(Publish),
    Move(Move),
    Unsubscribe {
        topic: String,
        sub: u64,
    },
    /// A backend API call (`api`) other than a publish.
    Api(Api),
    /// A client's new presence meta for its subscription `sub` of `topic`; answered like a
    /// publish.
    Track {
        reply: Reply,
        topic: String,
        sub: u64,
        meta: bytes::Bytes,
    },
}

/// A client's join of `topic` as subscription `sub`.
#[derive(Debug)]
pub struct Join {
    pub conn: ConnHandle,
    pub topic: String,
    pub sub: u64,
    pub key: GroupKey,
    pub recover: Option<Position>,
    /// Missed messages replayed so far (a recovering join), delivered with the answer.
    pub replay: Vec<Replayed>,
    /// Presence to track (with a meta) or watch: the answer then carries the topic's.
    pub presence: Option<ringcast_proto::PresenceJoin>,
}

/// A publish, from a client or the backend API.
#[derive(Debug)]
pub struct Publish {
    pub reply: Reply,
    pub topic: String,
    pub event: String,
    pub payload: bytes::Bytes,
    /// The owner orders a publish once per key (within its window) and answers a repeat
    /// with the first one's position.
    pub idempotency_key: Option<String>,
}

/// Where a publish's answer goes.
#[derive(Debug)]
pub enum Reply {
    /// The client's connection, under the publish's `token`.
    Channel { conn: ConnHandle, token: u64 },
    /// The API call waiting for it.
    Api(ApiReply),
}

/// How an API call is answered: what the owner said, or why it could not be asked.
pub type ApiReply = oneshot::Sender<Result<Answer, String>>;

/// A topic server's answer to an API call.
#[derive(Debug)]
pub enum Answer {
    Published(Position),
    /// The topic's messages after the position asked for, if the log still held every one
    /// (`complete`); none otherwise. `at`: the topic's position now.
    History {
        at: Position,
        complete: bool,
        messages: Vec<Replayed>,
    },
    /// What the owner holds of a topic, and which node answered.
    Info {
        info: TopicInfo,
        node: Arc<str>,
    },
    /// The topic server told every gateway attached to it.
    Disconnected,
}

/// A backend API call for `topic` (a read), or for a user (a disconnect, sent to each node).
#[derive(Debug)]
pub struct Api {
    pub topic: String,
    pub ask: Ask,
    pub reply: ApiReply,
    /// History replayed so far, answered with the ack.
    pub replay: Vec<Replayed>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    History {
        since: Option<Position>,
        limit: u32,
    },
    /// With the presence state, or only its counts.
    Inspect {
        presence: bool,
    },
    Disconnect {
        sub: String,
    },
}

impl Reply {
    /// Answers the publish: where the owner ordered it.
    pub fn published(self, at: Position) {
        match self {
            Reply::Channel { conn, token } => {
                conn.send(
                    ChannelEvent::Published {
                        token,
                        result: Ok(at),
                    }
                    .into(),
                );
            }
            Reply::Api(reply) => {
                let _ = reply.send(Ok(Answer::Published(at)));
            }
        }
    }

    /// Tells the publisher why its publish was not ordered.
    pub fn refuse(self, reason: String) {
        match self {
            Reply::Channel { conn, token } => {
                let event = ChannelEvent::Published {
                    token,
                    result: Err(reason),
                };
                conn.send(event.into());
            }
            Reply::Api(reply) => {
                let _ = reply.send(Err(reason));
            }
        }
    }
}

impl Api {
    pub fn new(topic: String, ask: Ask, reply: ApiReply) -> Api {
        Api {
            topic,
            ask,
            reply,
            replay: Vec::new(),
        }
    }

    /// The owner's ack: the history (with `recovered`: all of it) or the disconnect done.
    pub fn acked(self, at: Position, recovered: bool) {
        let answer = match self.ask {
            Ask::History { .. } => Answer::History {
                at,
                complete: recovered,
                messages: self.replay,
            },
            Ask::Disconnect { .. } => Answer::Disconnected,
            Ask::Inspect { .. } => return self.refuse("unexpected answer".into()),
        };
        let _ = self.reply.send(Ok(answer));
    }

    pub fn refuse(self, reason: String) {
        let _ = self.reply.send(Err(reason));
    }
}

/// This gateway's subscribers of `topic`, attached at `from_node`, moving to the node the
/// request is sent to (the topic's new owner).
#[derive(Debug)]
pub struct Move {
    pub topic: String,
    pub subs: Vec<u64>,
    pub from_node: Arc<str>,
    /// The position of the last message the topic's feed delivered.
    pub from: Position,
    /// Subscribers that joined the feed at its old node while the feed moved: subscribed at
    /// the node the feed is attached at now, which stays where it is.
    pub top_up: bool,
    /// Messages after `from`, replayed by the new owner before its ack.
    pub replay: Vec<Replayed>,
}

impl Pending {
    pub fn topic(&self) -> &str {
        match self {
            Pending::Join(j) => &j.topic,
            Pending::Publish(p) => &p.topic,
            Pending::Move(m) => &m.topic,
            Pending::Unsubscribe { topic, .. } => topic,
            Pending::Api(a) => &a.topic,
            Pending::Track { topic, .. } => topic,
        }
    }

    /// The request on the wire, with request id `id`.
    pub fn up(&self, id: u64) -> Up {
        match self {
            Pending::Join(j) => {
                Up::subscribe(id, j.topic.clone(), j.sub, j.recover.map(Into::into))
                    .with_presence(j.presence.clone())
            }
            Pending::Publish(p) => {
                Up::publish(id, p.topic.clone(), p.event.clone(), p.payload.clone())
                    .with_idempotency_key(p.idempotency_key.clone())
            }
            Pending::Move(m) => Up::move_here(id, m.topic.clone(), m.subs.clone(), m.from.into()),
            Pending::Unsubscribe { topic, sub } => Up::unsubscribe(id, topic.clone(), *sub),
            Pending::Api(a) => match &a.ask {
                Ask::History { since, limit } => {
                    Up::history(id, a.topic.clone(), since.map(Into::into), *limit)
                }
                Ask::Inspect { presence } => Up::inspect(id, a.topic.clone(), *presence),
                Ask::Disconnect { sub } => Up::disconnect(id, sub.clone()),
            },
            Pending::Track {
                topic, sub, meta, ..
            } => Up::track(id, topic.clone(), *sub, meta.clone()),
        }
    }

    /// Keeps a replayed message for the answer (a recovering join, a move).
    pub fn replayed(&mut self, message: Replayed) {
        match self {
            Pending::Join(j) => j.replay.push(message),
            Pending::Move(m) => m.replay.push(message),
            Pending::Api(a) => a.replay.push(message),
            Pending::Publish(_) | Pending::Unsubscribe { .. } | Pending::Track { .. } => {}
        }
    }
}

/// Whether `replay` is exactly every message after `from` up to `at`: only then does a
/// recovery count (all or nothing).
pub fn replay_is_complete(from: Position, at: Position, replay: &[Replayed]) -> bool {
    replay.last().map_or(from.offset, |m| m.offset) == at.offset
        && replay
            .iter()
            .enumerate()
            .all(|(i, m)| from.offset.checked_add(1 + i as u64) == Some(m.offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(offsets: &[u64]) -> Vec<Replayed> {
        offsets
            .iter()
            .map(|&offset| Replayed {
                offset,
                event: "e".into(),
                payload: bytes::Bytes::from_static(b"1"),
            })
            .collect()
    }

    #[test]
    fn a_recovery_counts_only_with_every_missed_message() {
        let at = |offset| Position { epoch: 1, offset };
        assert!(replay_is_complete(at(3), at(5), &replayed(&[4, 5])));
        assert!(replay_is_complete(at(5), at(5), &[]));
        assert!(
            !replay_is_complete(at(3), at(5), &replayed(&[4])),
            "one short"
        );
        assert!(!replay_is_complete(at(3), at(5), &replayed(&[5])), "a hole");
        assert!(!replay_is_complete(at(3), at(6), &replayed(&[4, 6, 5])));
        assert!(!replay_is_complete(at(u64::MAX), at(0), &replayed(&[0])));
    }
}
