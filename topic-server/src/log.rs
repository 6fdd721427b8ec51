//! A topic's log: its most recent messages, bounded by count, bytes and age.
//!
//! Plain data, no IO: callers pass the current time. The log is what a rejoining client
//! recovers from, all or nothing: either every message after its position is still here,
//! or none is replayed.

use bytes::Bytes;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How much of each topic's history a topic server keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Most messages kept per topic (0 keeps none: recovery only from the current offset).
    pub messages: usize,
    /// Most payload + event bytes kept per topic.
    pub bytes: usize,
    /// Messages older than this are dropped.
    pub age: Duration,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            messages: 100,
            bytes: 1024 * 1024,
            age: Duration::from_secs(300),
        }
    }
}

/// One message of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub offset: u64,
    pub event: String,
    pub payload: Bytes,
}

impl Message {
    fn size(&self) -> usize {
        self.event.len() + self.payload.len()
    }
}

/// The recent messages of one topic, oldest first, offsets consecutive.
#[derive(Debug, Default)]
pub struct TopicLog {
    entries: VecDeque<(Instant, Message)>,
    bytes: usize,
}

/// What a change to a log did to its size, for the owner's totals.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub messages: usize,
    pub bytes: usize,
}

impl TopicLog {
    /// Appends `message` (its offset must follow the last one) and drops what no longer
    /// fits the limits, oldest first.
    pub fn push(&mut self, message: Message, now: Instant, limits: &LogLimits) -> Dropped {
        debug_assert!(self.last_offset().is_none_or(|o| o + 1 == message.offset));
        let size = message.size();
        if limits.messages == 0 || size > limits.bytes {
            // Never kept: the log restarts after this message.
            let dropped = self.clear();
            return Dropped {
                messages: dropped.messages + 1,
                bytes: dropped.bytes + size,
            };
        }
        self.bytes += size;
        self.entries.push_back((now, message));
        let mut dropped = Dropped::default();
        while self.entries.len() > limits.messages || self.bytes > limits.bytes {
            dropped = dropped.plus(self.pop_front());
        }
        dropped.plus(self.expire(now, limits))
    }

    /// Drops messages older than the age limit.
    pub fn expire(&mut self, now: Instant, limits: &LogLimits) -> Dropped {
        let mut dropped = Dropped::default();
        while let Some((at, _)) = self.entries.front() {
            if now.saturating_duration_since(*at) <= limits.age {
                break;
            }
            dropped = dropped.plus(self.pop_front());
        }
        dropped
    }

    fn pop_front(&mut self) -> Dropped {
        match self.entries.pop_front() {
            Some((_, m)) => {
                self.bytes -= m.size();
                Dropped {
                    messages: 1,
                    bytes: m.size(),
                }
            }
            None => Dropped::default(),
        }
    }

    fn clear(&mut self) -> Dropped {
        let dropped = Dropped {
            messages: self.entries.len(),
            bytes: self.bytes,
        };
        self.entries.clear();
        self.bytes = 0;
        dropped
    }

    /// Every message after `offset` when the log still holds all of them, given that the
    /// topic's last offset is `last`. `None` when some are gone (or `offset` is ahead of
    /// `last`): recovery is all or nothing.
    pub fn since(&self, offset: u64, last: u64) -> Option<Vec<Message>> {
        self.since_at_most(offset, last, usize::MAX)
    }

    /// [`TopicLog::since`], the first `limit` of them only (the rest are not copied).
    pub fn since_at_most(&self, offset: u64, last: u64, limit: usize) -> Option<Vec<Message>> {
        if offset > last {
            return None;
        }
        if offset == last {
            return Some(Vec::new());
        }
        let first = self.entries.front()?.1.offset;
        if first > offset + 1 {
            return None;
        }
        let skip = (offset + 1 - first) as usize;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(limit)
                .map(|(_, m)| m.clone())
                .collect(),
        )
    }

    /// The messages with their ages, oldest first: what a handoff carries.
    pub fn snapshot(&self, now: Instant) -> Vec<(Duration, Message)> {
        self.entries
            .iter()
            .map(|(at, m)| (now.saturating_duration_since(*at), m.clone()))
            .collect()
    }

    /// A log rebuilt from a handoff, for a topic whose last offset is `last`. Only the run of
    /// consecutive offsets that ends at `last` is kept (the rest could not be replayed
    /// without a hole), within `limits`. Also returns what the log holds, for the totals.
    pub fn restore(
        entries: Vec<(Duration, Message)>,
        last: u64,
        now: Instant,
        limits: &LogLimits,
    ) -> (TopicLog, Dropped) {
        let mut run: Vec<(Duration, Message)> = Vec::new();
        for (age, m) in entries {
            if run
                .last()
                .is_some_and(|(_, prev)| prev.offset.checked_add(1) != Some(m.offset))
            {
                run.clear();
            }
            run.push((age, m));
        }
        if run.last().is_none_or(|(_, m)| m.offset != last) {
            run.clear();
        }
        let mut log = TopicLog::default();
        for (age, m) in run {
            let at = now.checked_sub(age).unwrap_or(now);
            log.bytes += m.size();
            log.entries.push_back((at, m));
        }
        while log.entries.len() > limits.messages || log.bytes > limits.bytes {
            log.pop_front();
        }
        log.expire(now, limits);
        let held = Dropped {
            messages: log.entries.len(),
            bytes: log.bytes,
        };
        (log, held)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The offset of the oldest message held.
    pub fn first_offset(&self) -> Option<u64> {
        self.entries.front().map(|(_, m)| m.offset)
    }

    fn last_offset(&self) -> Option<u64> {
        self.entries.back().map(|(_, m)| m.offset)
    }
}

impl Dropped {
    fn plus(self, other: Dropped) -> Dropped {
        Dropped {
            messages: self.messages + other.messages,
            bytes: self.bytes + other.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(offset: u64, payload: &str) -> Message {
        Message {
            offset,
            event: "e".into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    fn limits(messages: usize, bytes: usize, age_secs: u64) -> LogLimits {
        LogLimits {
            messages,
            bytes,
            age: Duration::from_secs(age_secs),
        }
    }

    fn offsets(messages: Option<Vec<Message>>) -> Option<Vec<u64>> {
        messages.map(|m| m.iter().map(|m| m.offset).collect())
    }

    #[test]
    fn keeps_the_newest_by_count() {
        let (mut log, now, l) = (TopicLog::default(), Instant::now(), limits(3, 1 << 20, 60));
        for offset in 1..=5 {
            log.push(msg(offset, "x"), now, &l);
        }
        assert_eq!(log.len(), 3);
        assert_eq!(offsets(log.since(2, 5)), Some(vec![3, 4, 5]));
        assert_eq!(offsets(log.since(1, 5)), None, "offset 2 is gone: nothing");
        assert_eq!(offsets(log.since(5, 5)), Some(vec![]), "up to date");
        assert_eq!(offsets(log.since(6, 5)), None, "ahead of the topic");
    }

    #[test]
    fn keeps_within_bytes_and_refuses_oversized_messages() {
        let (mut log, now, l) = (TopicLog::default(), Instant::now(), limits(100, 10, 60));
        log.push(msg(1, "abcd"), now, &l); // 5 bytes with the event
        log.push(msg(2, "abcd"), now, &l);
        assert_eq!((log.len(), log.bytes()), (2, 10));
        let dropped = log.push(msg(3, "abcd"), now, &l);
        assert_eq!(
            dropped,
            Dropped {
                messages: 1,
                bytes: 5
            }
        );
        let dropped = log.push(msg(4, "far too long for the log"), now, &l);
        assert_eq!(
            dropped.messages, 3,
            "the log restarts after a message it cannot hold"
        );
        assert!(log.is_empty());
        assert_eq!(offsets(log.since(3, 4)), None);
        assert_eq!(offsets(log.since(4, 4)), Some(vec![]));
    }

    #[test]
    fn expires_by_age() {
        let (mut log, t0, l) = (
            TopicLog::default(),
            Instant::now(),
            limits(100, 1 << 20, 10),
        );
        log.push(msg(1, "a"), t0, &l);
        log.push(msg(2, "b"), t0 + Duration::from_secs(6), &l);
        assert_eq!(log.expire(t0 + Duration::from_secs(11), &l).messages, 1);
        assert_eq!(offsets(log.since(1, 2)), Some(vec![2]));
        assert_eq!(log.expire(t0 + Duration::from_secs(17), &l).messages, 1);
        assert!(log.is_empty());
        assert_eq!(offsets(log.since(1, 2)), None);
    }

    #[test]
    fn no_log_recovers_only_the_current_offset() {
        let (mut log, now, l) = (TopicLog::default(), Instant::now(), limits(0, 1 << 20, 60));
        log.push(msg(1, "a"), now, &l);
        assert!(log.is_empty());
        assert_eq!(offsets(log.since(1, 1)), Some(vec![]));
        assert_eq!(offsets(log.since(0, 1)), None);
    }

    #[test]
    fn restore_keeps_the_consecutive_run_ending_at_the_topic_offset() {
        let (now, l) = (Instant::now(), limits(100, 1 << 20, 60));
        let aged = |offsets: &[u64]| -> Vec<(Duration, Message)> {
            offsets
                .iter()
                .map(|o| (Duration::from_secs(1), msg(*o, "x")))
                .collect()
        };
        let (log, held) = TopicLog::restore(aged(&[3, 4, 6, 7, 8]), 8, now, &l);
        assert_eq!(offsets(log.since(5, 8)), Some(vec![6, 7, 8]));
        assert_eq!(
            held,
            Dropped {
                messages: 3,
                bytes: 6
            }
        );
        let (log, _) = TopicLog::restore(aged(&[3, 4]), 9, now, &l);
        assert!(
            log.is_empty(),
            "a log that does not reach the topic's offset is useless"
        );
        let old = vec![
            (Duration::from_secs(61), msg(1, "x")),
            (Duration::ZERO, msg(2, "y")),
        ];
        let (log, _) = TopicLog::restore(old, 2, now, &l);
        assert_eq!(offsets(log.since(1, 2)), Some(vec![2]), "ages carry over");
        // A peer's offsets at the end of the range do not overflow.
        let (log, _) = TopicLog::restore(aged(&[u64::MAX, 1]), 1, now, &l);
        assert_eq!(offsets(log.since(0, 1)), Some(vec![1]));
    }

    proptest! {
        /// Whatever is pushed, the log stays within its limits, its offsets are
        /// consecutive, and a recovery returns exactly the messages after the position.
        #[test]
        fn bounded_and_all_or_nothing(
            sizes in proptest::collection::vec(0usize..40, 1..200),
            max_messages in 0usize..20,
            max_bytes in 1usize..200,
            from in 0u64..220,
        ) {
            let (mut log, now, l) = (TopicLog::default(), Instant::now(), limits(max_messages, max_bytes, 60));
            let mut total = (0usize, 0usize);
            for (i, size) in sizes.iter().enumerate() {
                let dropped = log.push(msg(i as u64 + 1, &"p".repeat(*size)), now, &l);
                total = (total.0 + 1 - dropped.messages, total.1 + size + 1 - dropped.bytes);
            }
            prop_assert!(log.len() <= max_messages && log.bytes() <= max_bytes);
            prop_assert_eq!(total, (log.len(), log.bytes()));
            let last = sizes.len() as u64;
            match log.since(from, last) {
                Some(replay) => {
                    let got: Vec<u64> = replay.iter().map(|m| m.offset).collect();
                    let want: Vec<u64> = (from + 1..=last).collect();
                    prop_assert_eq!(got, want);
                }
                None => prop_assert!(from > last || (from < last && log.entries.front().is_none_or(|e| e.1.offset > from + 1))),
            }
        }
    }
}
