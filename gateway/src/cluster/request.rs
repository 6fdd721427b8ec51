//! The requests a gateway sends its topic servers, as they wait for an answer: what is needed
//! to send them again (at another node, after a ring change) and to tell their client.

use crate::conn::{ConnHandle, Replayed};
use crate::index::{GroupKey, Position};
use ringcast_proto::Up;
use std::sync::Arc;

/// A request waiting for its topic server's answer.
#[derive(Debug)]
pub enum Pending {
    Join(Join),
    Publish(Publish),
    Move(Move),
    Unsubscribe { topic: String, sub: u64 },
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
}

/// A client's publish; the answer goes back to its connection under `token`.
#[derive(Debug)]
pub struct Publish {
    pub conn: ConnHandle,
    pub token: u64,
    pub topic: String,
    pub event: String,
    pub payload: bytes::Bytes,
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
        }
    }

    /// The request on the wire, with request id `id`.
    pub fn up(&self, id: u64) -> Up {
        match self {
            Pending::Join(j) => {
                Up::subscribe(id, j.topic.clone(), j.sub, j.recover.map(Into::into))
            }
            Pending::Publish(p) => {
                Up::publish(id, p.topic.clone(), p.event.clone(), p.payload.clone())
            }
            Pending::Move(m) => Up::move_here(id, m.topic.clone(), m.subs.clone(), m.from.into()),
            Pending::Unsubscribe { topic, sub } => Up::unsubscribe(id, topic.clone(), *sub),
        }
    }

    /// Keeps a replayed message for the answer (a recovering join, a move).
    pub fn replayed(&mut self, message: Replayed) {
        match self {
            Pending::Join(j) => j.replay.push(message),
            Pending::Move(m) => m.replay.push(message),
            Pending::Publish(_) | Pending::Unsubscribe { .. } => {}
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
