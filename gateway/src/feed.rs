//! A group's feed: the framed deliveries of one topic for one group of local subscribers
//! (same encoding), appended once and read by each subscriber's connection at its own pace.
//!
//! The fan-out appends a run of frames, then looks at each subscriber's [`Reader`] with
//! two loads: a reader too far behind (its client reads too slowly) is cut, and a parked
//! reader (it had read everything) is unparked and its connection woken with one inbox
//! event. A reader that has not caught up costs nothing more per message: its connection
//! reads everything that has gathered, as one buffer, when it gets to it. So a busy
//! subscriber's queue is not touched for every message from the fan-out's core, which is
//! where a per-subscriber inbox push spent most of its time (cache lines moving between
//! cores).
//!
//! A feed keeps at most the largest capacity of its readers in frames, and drops at each
//! append what every reader had passed at the previous one.

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};

#[derive(Debug, Default)]
pub struct Feed {
    ring: RwLock<Ring>,
    /// Sequence number of the next frame appended.
    head: AtomicU64,
    /// Frames before this were passed by every reader (as of the last append).
    passed: AtomicU64,
    /// The largest capacity of the feed's readers.
    capacity: AtomicUsize,
}

#[derive(Debug, Default)]
struct Ring {
    /// Sequence number of `frames[0]`.
    first: u64,
    frames: VecDeque<Bytes>,
    /// When the owner accepted each frame's message (microseconds since the Unix epoch; 0:
    /// unknown), beside `frames`.
    stamps: VecDeque<u64>,
}

/// What a reader took: how many frames, and when the owner accepted the oldest of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Read {
    pub frames: usize,
    /// Microseconds since the Unix epoch; 0: unknown or nothing read.
    pub oldest: u64,
}

/// One subscription's place in its group's feed, shared by the fan-out (which wakes or
/// cuts it) and the subscriber's connection (which reads).
#[derive(Debug)]
pub struct Reader {
    feed: Arc<Feed>,
    /// The frames it may fall behind before it is cut.
    capacity: usize,
    /// The next frame to read.
    cursor: AtomicU64,
    /// Set by the connection when it has read everything; cleared by whoever wakes it.
    parked: AtomicBool,
    /// The connection no longer has the subscription's channel: a wake-up still queued
    /// for it is ignored.
    detached: AtomicBool,
}

/// A reader held by a joined channel; dropping the channel detaches it.
#[derive(Debug)]
pub struct Attached(pub Arc<Reader>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.detached.store(true, Relaxed);
    }
}

/// Frames the reader had not read were dropped: its client reads too slowly.
#[derive(Debug, PartialEq, Eq)]
pub struct Lagged;

/// What the fan-out should do about one reader after an append.
#[derive(Debug, PartialEq, Eq)]
pub enum Nudge {
    /// Reading, or already woken: nothing.
    None,
    /// It was parked: wake its connection.
    Wake,
    /// More than its capacity behind: cut its connection.
    Cut,
}

impl Feed {
    /// A reader starting at the current end of the feed. Call where no append can run at
    /// the same time (the index holds its shard's write lock), so that it starts exactly
    /// after the last frame delivered.
    pub fn reader(self: &Arc<Self>, capacity: usize) -> Arc<Reader> {
        let capacity = capacity.max(1);
        self.capacity.fetch_max(capacity, Relaxed);
        Arc::new(Reader {
            feed: self.clone(),
            capacity,
            cursor: AtomicU64::new(self.head.load(SeqCst)),
            parked: AtomicBool::new(false),
            detached: AtomicBool::new(false),
        })
    }

    /// Appends `frames` of messages the owner accepted at `stamp` (one caller at a time: the
    /// index holds the topic's delivery lock); returns the new head.
    pub fn append(&self, frames: impl IntoIterator<Item = Bytes>, stamp: u64) -> u64 {
        let mut ring = self.ring.write();
        ring.frames.extend(frames);
        let added = ring.frames.len() - ring.stamps.len();
        ring.stamps.extend(std::iter::repeat_n(stamp, added));
        let head = ring.first + ring.frames.len() as u64;
        let keep_from = self
            .passed
            .load(Relaxed)
            .max(head.saturating_sub(self.capacity.load(Relaxed) as u64));
        let drop = (keep_from.saturating_sub(ring.first) as usize).min(ring.frames.len());
        ring.frames.drain(..drop);
        ring.stamps.drain(..drop);
        ring.first = ring.first.max(keep_from);
        self.head.store(head, SeqCst);
        head
    }

    /// Records that every reader had passed `seq` (the fan-out's minimum of their cursors),
    /// so the next append drops what is before it.
    pub fn passed(&self, seq: u64) {
        self.passed.fetch_max(seq, Relaxed);
    }

    /// Frames held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.ring.read().frames.len()
    }
}

impl Reader {
    /// The next frame it will read.
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Acquire)
    }

    pub fn is_detached(&self) -> bool {
        self.detached.load(Relaxed)
    }

    /// After an append that ended at `head` (the fan-out's side).
    pub fn nudge(&self, head: u64) -> Nudge {
        if head.saturating_sub(self.cursor()) > self.capacity as u64 {
            Nudge::Cut
        } else if self.parked.load(SeqCst) && self.parked.swap(false, SeqCst) {
            Nudge::Wake
        } else {
            Nudge::None
        }
    }

    /// Copies every frame after the cursor into `out` and moves the cursor past them, then
    /// parks once nothing more has come (the connection's side; one caller at a time).
    /// Returns how many frames it read, and the oldest one's stamp.
    pub fn read(&self, out: &mut BytesMut) -> Result<Read, Lagged> {
        let mut read = Read::default();
        loop {
            let took = self.take(out)?;
            if read.frames == 0 {
                read.oldest = took.oldest;
            }
            read.frames += took.frames;
            self.parked.store(true, SeqCst);
            // Either this sees an append that came after the take, or that append's
            // fan-out sees the reader parked and wakes it.
            if self.feed.head.load(SeqCst) == self.cursor.load(Relaxed) {
                return Ok(read);
            }
            // Something came in between: take it too, unless the fan-out unparked the
            // reader first (its wake-up brings the connection back).
            if !self.parked.swap(false, SeqCst) {
                return Ok(read);
            }
        }
    }

    fn take(&self, out: &mut BytesMut) -> Result<Read, Lagged> {
        let ring = self.feed.ring.read();
        let cursor = self.cursor.load(Relaxed);
        if cursor < ring.first {
            return Err(Lagged);
        }
        let from = (cursor - ring.first) as usize;
        let frames = ring.frames.range(from..);
        let n = frames.len();
        out.reserve(frames.clone().map(Bytes::len).sum());
        for frame in frames {
            out.extend_from_slice(frame);
        }
        self.cursor.store(cursor + n as u64, Release);
        let oldest = if n > 0 { ring.stamps[from] } else { 0 };
        Ok(Read { frames: n, oldest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(texts: &[&'static str]) -> Vec<Bytes> {
        texts
            .iter()
            .map(|t| Bytes::from_static(t.as_bytes()))
            .collect()
    }

    fn read(r: &Reader) -> Result<String, Lagged> {
        let mut out = BytesMut::new();
        r.read(&mut out)?;
        Ok(String::from_utf8(out.to_vec()).unwrap())
    }

    #[test]
    fn a_reader_starts_at_the_end_and_is_woken_only_when_parked() {
        let feed = Arc::new(Feed::default());
        feed.append(frames(&["a"]), 0);
        let r = feed.reader(8);
        // Not parked yet (its join is still being answered): the append does not wake it.
        let head = feed.append(frames(&["b", "c"]), 0);
        assert_eq!(r.nudge(head), Nudge::None);
        assert_eq!(read(&r).unwrap(), "bc");
        let head = feed.append(frames(&["d"]), 0);
        assert_eq!(r.nudge(head), Nudge::Wake);
        assert_eq!(r.nudge(head), Nudge::None, "woken once");
        let head = feed.append(frames(&["e"]), 0);
        assert_eq!(r.nudge(head), Nudge::None, "not parked again yet");
        assert_eq!(read(&r).unwrap(), "de");
        assert_eq!(read(&r).unwrap(), "", "nothing new");
    }

    #[test]
    fn a_reader_too_far_behind_is_cut_and_lags() {
        let feed = Arc::new(Feed::default());
        let slow = feed.reader(2);
        let fast = feed.reader(16);
        let head = feed.append(frames(&["a", "b"]), 0);
        assert_eq!(slow.nudge(head), Nudge::None);
        let head = feed.append(frames(&["c"]), 0);
        assert_eq!(slow.nudge(head), Nudge::Cut);
        assert_eq!(fast.nudge(head), Nudge::None);
        assert_eq!(
            read(&fast).unwrap(),
            "abc",
            "the feed keeps the largest capacity"
        );
        for _ in 0..20 {
            feed.append(frames(&["x"]), 0);
        }
        assert_eq!(read(&slow), Err(Lagged));
        assert_eq!(feed.held(), 16);
    }

    #[test]
    fn a_read_reports_when_its_oldest_frame_was_accepted() {
        let feed = Arc::new(Feed::default());
        let r = feed.reader(8);
        feed.append(frames(&["a"]), 5);
        feed.append(frames(&["b", "c"]), 7);
        let mut out = BytesMut::new();
        assert_eq!(
            r.read(&mut out),
            Ok(Read {
                frames: 3,
                oldest: 5
            })
        );
        feed.append(frames(&["d"]), 9);
        assert_eq!(
            r.read(&mut out),
            Ok(Read {
                frames: 1,
                oldest: 9
            })
        );
        assert_eq!(r.read(&mut out), Ok(Read::default()), "nothing new");
    }

    #[test]
    fn frames_every_reader_passed_are_dropped_at_the_next_append() {
        let feed = Arc::new(Feed::default());
        let a = feed.reader(100);
        let b = feed.reader(100);
        feed.append(frames(&["1", "2", "3"]), 0);
        read(&a).unwrap();
        feed.passed(a.cursor().min(b.cursor()));
        feed.append(frames(&["4"]), 0);
        assert_eq!(feed.held(), 4, "b has read nothing");
        assert_eq!(read(&b).unwrap(), "1234");
        read(&a).unwrap();
        feed.passed(a.cursor().min(b.cursor()));
        feed.append(frames(&["5"]), 0);
        assert_eq!(feed.held(), 1);
        assert_eq!(read(&a).unwrap(), "5");
        assert_eq!(read(&b).unwrap(), "5");
    }

    #[test]
    fn concurrent_appends_and_reads_lose_and_repeat_nothing() {
        // One appender, one reader woken as the fan-out would: every frame arrives once,
        // in order, and the reader never stays parked with frames unread.
        let feed = Arc::new(Feed::default());
        let r = feed.reader(1 << 20);
        let (wake_tx, wake_rx) = std::sync::mpsc::channel::<()>();
        let appender = {
            let (feed, r) = (feed.clone(), r.clone());
            std::thread::spawn(move || {
                for n in 0..20_000u32 {
                    let head = feed.append([Bytes::from(format!("{n},"))], 0);
                    if r.nudge(head) == Nudge::Wake {
                        wake_tx.send(()).unwrap();
                    }
                }
            })
        };
        let mut got = String::new();
        let mut out = BytesMut::new();
        r.read(&mut out).unwrap();
        loop {
            got.push_str(std::str::from_utf8(&out).unwrap());
            out.clear();
            if got.ends_with("19999,") {
                break;
            }
            wake_rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("a parked reader with frames unread is always woken");
            r.read(&mut out).unwrap();
        }
        appender.join().unwrap();
        let want: String = (0..20_000).map(|n| format!("{n},")).collect();
        assert_eq!(got, want);
    }
}
