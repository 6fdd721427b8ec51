//! A topic's presence (Phoenix Presence), held by its owner: who is in the topic, by key (the
//! user), each tracked subscriber with its meta and a `phx_ref`; and what changed since the
//! last diff.
//!
//! Plain data, no IO (callers pass the time). Entries hang off the gateway stream that holds
//! their subscriber, so the end of a stream takes exactly its entries (their leaves go in the
//! next diff). A handed-over topic's entries wait as they were for their gateway to move its
//! subscribers here (they are adopted: nobody sees a leave or a join), and leave if it does
//! not within [`ADOPT_WITHIN`].
//!
//! Diffs are batched: changes gather until [`Presence::flush`] (the service calls it every
//! `TOPIC_SERVER_PRESENCE_INTERVAL_MS`). A joiner's state is the state as of the last flush,
//! so that the next diff brings it exactly what changed since. Above `listed_max` members a
//! topic's presence is counted, not listed: joiners get `presence_stats`, and a
//! `presence_stats` replaces each diff (when the counts changed); at half that it is listed
//! again, announced with a whole `presence_state`.

use bytes::Bytes;
use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How long a handed-over topic's entries wait for their gateway to move its subscribers.
pub const ADOPT_WITHIN: Duration = Duration::from_secs(10);
/// How often counts go out while a topic's presence is counted, at most.
pub const STATS_EVERY: Duration = Duration::from_secs(1);
/// Bytes counted per entry beyond its strings (maps, the diff lists).
const ENTRY_OVERHEAD: usize = 96;

/// One tracked subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Box<str>,
    pub phx_ref: Box<str>,
    /// A JSON object, compact.
    pub meta: Box<str>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.key.len() + self.phx_ref.len() + self.meta.len() + ENTRY_OVERHEAD
    }

    /// The meta as Phoenix shows it: the meta's fields and `phx_ref`.
    fn meta_json(&self, out: &mut String) {
        out.push_str(r#"{"phx_ref":"#);
        out.push_str(&json_string(&self.phx_ref));
        if self.meta.len() > 2 {
            out.push(',');
            out.push_str(&self.meta[1..]);
        } else {
            out.push('}');
        }
    }
}

/// How much presence a topic may hold and list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceLimits {
    /// Members above which the presence is counted, not listed.
    pub listed_max: usize,
    /// Members at most; a track beyond is refused.
    pub max_members: usize,
    /// Bytes at most (entries and the changes waiting for the next diff); a track beyond is
    /// refused. Keeps a diff and a handover well inside a gRPC message.
    pub max_bytes: usize,
}

/// The default [`PresenceLimits::max_bytes`]: 4 MiB per topic.
pub const MAX_BYTES: usize = 4 << 20;

impl Default for PresenceLimits {
    fn default() -> Self {
        PresenceLimits {
            listed_max: 1000,
            max_members: 100_000,
            max_bytes: MAX_BYTES,
        }
    }
}

/// A track refused: the topic has `max_members` or `max_bytes` already.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// An entry handed over, waiting for its gateway (under the gateway's id and its
/// subscriber).
#[derive(Debug)]
struct Orphan {
    entry: Entry,
    until: Instant,
}

/// An entry handed over with its topic: the gateway that holds it, its subscriber, itself.
pub type HandedOver = (String, u64, Entry);

/// The presence of one topic. `G` identifies a gateway's stream.
#[derive(Debug)]
pub struct Presence<G> {
    members: Vec<(G, HashMap<u64, Entry>)>,
    /// Handed-over entries by gateway id, then subscriber.
    orphans: HashMap<Box<str>, HashMap<u64, Orphan>>,
    /// Changes since the last flush (listed only: a counted presence keeps no list). A join
    /// is by `phx_ref`, so that a leave within the same flush cancels it.
    joins: HashMap<Box<str>, Entry>,
    leaves: Vec<Entry>,
    /// Members per key.
    keys: HashMap<Box<str>, usize>,
    count: usize,
    bytes: usize,
    /// Counted, not listed.
    stats: bool,
    /// The counts last sent while counted, and when.
    sent: (usize, usize),
    sent_at: Option<Instant>,
    /// Something to flush (a change, or a switch between listed and counted).
    dirty: bool,
    /// The listed state as of the last flush, once a joiner asked: the same until the next
    /// flush, so a burst of joiners shares one copy. Counted in [`Presence::bytes`].
    flushed_state: OnceCell<Bytes>,
    /// Handed over, and something was said since to the gateways that had moved here: a
    /// gateway that moves later missed it, so its adoption makes the next flush say the whole
    /// presence (state or counts) again.
    said_since_handover: bool,
    /// The next flush says the whole presence again.
    resend: bool,
}

/// Counts never sent: the next flush says them.
const UNSENT: (usize, usize) = (usize::MAX, usize::MAX);

impl<G> Default for Presence<G> {
    fn default() -> Self {
        Presence {
            members: Vec::new(),
            orphans: HashMap::new(),
            joins: HashMap::new(),
            leaves: Vec::new(),
            keys: HashMap::new(),
            count: 0,
            bytes: 0,
            stats: false,
            sent: UNSENT,
            sent_at: None,
            dirty: false,
            flushed_state: OnceCell::new(),
            said_since_handover: false,
            resend: false,
        }
    }
}

impl<G: PartialEq + Clone> Presence<G> {
    /// No member and none waiting to be adopted.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes held (entries, the changes waiting for the next diff, the state joiners share).
    pub fn bytes(&self) -> usize {
        self.bytes + self.flushed_state.get().map_or(0, Bytes::len)
    }

    /// Members (tracked subscribers, adopted or not) and distinct keys.
    pub fn counts(&self) -> (usize, usize) {
        (self.count, self.keys.len())
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Counted, not listed: its subscribers were told `presence_stats`.
    pub fn is_counted(&self) -> bool {
        self.stats
    }

    /// Tracks `subscriber` of `gateway` as `entry` (replacing its earlier entry, if any).
    pub fn track(
        &mut self,
        gateway: &G,
        subscriber: u64,
        entry: Entry,
        limits: &PresenceLimits,
    ) -> Result<(), Full> {
        let i = match self.members.iter().position(|(g, _)| g == gateway) {
            Some(i) => i,
            None => {
                self.members.push((gateway.clone(), HashMap::new()));
                self.members.len() - 1
            }
        };
        let replaced = self.members[i].1.contains_key(&subscriber);
        let too_many = !replaced && self.count >= limits.max_members;
        if too_many || self.bytes + 2 * entry.bytes() > limits.max_bytes {
            if self.members[i].1.is_empty() {
                self.members.swap_remove(i);
            }
            return Err(Full);
        }
        if let Some(old) = self.members[i].1.insert(subscriber, entry.clone()) {
            self.removed(old);
        }
        self.added(entry);
        Ok(())
    }

    /// Replaces a tracked subscriber's meta (a leave of the old, a join of the new; within
    /// one flush, only the last meta is seen); `Ok(false)` if it is not tracked.
    pub fn update(
        &mut self,
        gateway: &G,
        subscriber: u64,
        meta: Box<str>,
        phx_ref: Box<str>,
        limits: &PresenceLimits,
    ) -> Result<bool, Full> {
        let Some(old) = self
            .members
            .iter()
            .find(|(g, _)| g == gateway)
            .and_then(|(_, m)| m.get(&subscriber))
        else {
            return Ok(false);
        };
        let entry = Entry {
            key: old.key.clone(),
            phx_ref,
            meta,
        };
        self.track(gateway, subscriber, entry, limits)
            .map(|()| true)
    }

    /// Stops tracking a subscriber (it left); false if it was not tracked.
    pub fn untrack(&mut self, gateway: &G, subscriber: u64) -> bool {
        let Some(i) = self.members.iter().position(|(g, _)| g == gateway) else {
            return false;
        };
        let Some(old) = self.members[i].1.remove(&subscriber) else {
            return false;
        };
        if self.members[i].1.is_empty() {
            self.members.swap_remove(i);
        }
        self.removed(old);
        true
    }

    /// Every entry of a gateway's stream leaves (the stream ended). Returns how many.
    pub fn drop_gateway(&mut self, gateway: &G) -> usize {
        let Some(i) = self.members.iter().position(|(g, _)| g == gateway) else {
            return 0;
        };
        let (_, entries) = self.members.swap_remove(i);
        let n = entries.len();
        for (_, old) in entries {
            self.removed(old);
        }
        n
    }

    /// A gateway moved `subscriber` here: its handed-over entry becomes a member as it was,
    /// with no change to anyone. False if there was none.
    pub fn adopt(&mut self, gateway: &G, gateway_id: &str, subscriber: u64) -> bool {
        let Some(waiting) = self.orphans.get_mut(gateway_id) else {
            return false;
        };
        let Some(orphan) = waiting.remove(&subscriber) else {
            return false;
        };
        if waiting.is_empty() {
            self.orphans.remove(gateway_id);
        }
        let replaced = match self.members.iter_mut().find(|(g, _)| g == gateway) {
            Some((_, entries)) => entries.insert(subscriber, orphan.entry),
            None => {
                let entries = HashMap::from([(subscriber, orphan.entry)]);
                self.members.push((gateway.clone(), entries));
                None
            }
        };
        if let Some(old) = replaced {
            self.removed(old);
        }
        if self.said_since_handover {
            (self.resend, self.dirty) = (true, true);
        }
        true
    }

    /// Handed-over entries not adopted in time leave.
    pub fn expire(&mut self, now: Instant) {
        let mut gone = Vec::new();
        self.orphans.retain(|_, waiting| {
            waiting.retain(|_, o| {
                let keep = o.until > now;
                if !keep {
                    gone.push(o.entry.clone());
                }
                keep
            });
            !waiting.is_empty()
        });
        for entry in gone {
            self.removed(entry);
        }
    }

    /// Everything, for the topic's new owner (the changes not flushed yet were flushed by the
    /// caller first): entries by the id of the gateway that holds them.
    pub fn hand_over(self, gateway_id: impl Fn(&G) -> String) -> Vec<HandedOver> {
        let mut all = Vec::with_capacity(self.count);
        for (g, entries) in self.members {
            let id = gateway_id(&g);
            all.extend(entries.into_iter().map(|(s, e)| (id.clone(), s, e)));
        }
        for (id, waiting) in self.orphans {
            all.extend(
                waiting
                    .into_iter()
                    .map(|(s, o)| (id.to_string(), s, o.entry)),
            );
        }
        all
    }

    /// Takes over entries handed over by the previous owner, to be adopted until `until`;
    /// `counted` as the previous owner had it (its subscribers hear counts again at the next
    /// flush). Entries beyond the limits are dropped.
    pub fn install(
        &mut self,
        entries: Vec<HandedOver>,
        until: Instant,
        counted: bool,
        limits: &PresenceLimits,
    ) {
        for (gateway_id, subscriber, entry) in entries {
            if self.count >= limits.max_members || self.bytes + entry.bytes() > limits.max_bytes {
                break;
            }
            let waiting = self.orphans.entry(gateway_id.into()).or_default();
            if waiting.contains_key(&subscriber) {
                continue;
            }
            self.count += 1;
            self.bytes += entry.bytes();
            *self.keys.entry(entry.key.clone()).or_default() += 1;
            waiting.insert(subscriber, Orphan { entry, until });
        }
        self.stats = counted;
        (self.sent, self.sent_at) = (UNSENT, None);
        self.dirty = counted;
        self.flushed_state.take();
    }

    /// What a joiner gets: the state as of the last flush (`presence_state`), or the counts
    /// (`presence_stats`) when there are too many members to list.
    pub fn snapshot(&self) -> (&'static str, Bytes) {
        if self.stats {
            return ("presence_stats", Bytes::from(self.stats_json()));
        }
        // The entries now, less the joins not sent yet, plus the leaves not sent yet: what
        // changes between two flushes does not change this.
        let state = self.flushed_state.get_or_init(|| {
            let flushed = self
                .entries()
                .filter(|e| !self.joins.contains_key(&e.phx_ref))
                .chain(&self.leaves);
            Bytes::from(state_json(flushed))
        });
        ("presence_state", state.clone())
    }

    /// The whole state now (the backend API); `None` while counted.
    pub fn state(&self) -> Option<String> {
        (!self.stats).then(|| state_json(self.entries()))
    }

    /// What changed since the last flush, for every subscriber of the topic: a
    /// `presence_diff`, a `presence_stats` (counted; at most once per [`STATS_EVERY`]) or a
    /// whole `presence_state` (listed again). `None`: nothing to say (yet).
    pub fn flush(
        &mut self,
        limits: &PresenceLimits,
        now: Instant,
    ) -> Option<(&'static str, String)> {
        if !self.dirty {
            return None;
        }
        let said = self.flush_changes(limits, now);
        if said.is_some() && !self.orphans.is_empty() {
            self.said_since_handover = true;
        }
        said
    }

    fn flush_changes(
        &mut self,
        limits: &PresenceLimits,
        now: Instant,
    ) -> Option<(&'static str, String)> {
        self.dirty = false;
        self.flushed_state.take();
        let (joins, leaves) = (
            std::mem::take(&mut self.joins),
            std::mem::take(&mut self.leaves),
        );
        self.bytes -= joins
            .values()
            .chain(&leaves)
            .map(Entry::bytes)
            .sum::<usize>();
        if std::mem::take(&mut self.resend) {
            // A late adopter's subscribers missed what was said: everything again.
            if self.stats {
                self.sent = UNSENT;
            } else if self.count <= limits.listed_max {
                return Some(("presence_state", state_json(self.entries())));
            }
        }
        if !self.stats && self.count > limits.listed_max {
            // Counted from now on: the counts go out at once.
            self.stats = true;
            (self.sent, self.sent_at) = (UNSENT, None);
        } else if self.stats && self.count <= limits.listed_max / 2 {
            self.stats = false;
            return Some(("presence_state", state_json(self.entries())));
        }
        if self.stats {
            let counts = self.counts();
            if counts == self.sent {
                return None;
            }
            if self
                .sent_at
                .is_some_and(|at| now.saturating_duration_since(at) < STATS_EVERY)
            {
                // Said at the next flush after the second is up.
                self.dirty = true;
                return None;
            }
            (self.sent, self.sent_at) = (counts, Some(now));
            return Some(("presence_stats", self.stats_json()));
        }
        if joins.is_empty() && leaves.is_empty() {
            return None;
        }
        let mut diff = String::from(r#"{"joins":"#);
        diff.push_str(&state_json(joins.values()));
        diff.push_str(r#","leaves":"#);
        diff.push_str(&state_json(leaves.iter()));
        diff.push('}');
        Some(("presence_diff", diff))
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.members.iter().flat_map(|(_, m)| m.values()).chain(
            self.orphans
                .values()
                .flat_map(|waiting| waiting.values().map(|o| &o.entry)),
        )
    }

    fn stats_json(&self) -> String {
        let (members, keys) = self.counts();
        format!(r#"{{"members":{members},"keys":{keys}}}"#)
    }

    fn added(&mut self, entry: Entry) {
        self.count += 1;
        self.bytes += entry.bytes();
        *self.keys.entry(entry.key.clone()).or_default() += 1;
        if !self.stats {
            self.bytes += entry.bytes();
            self.joins.insert(entry.phx_ref.clone(), entry);
        }
        self.dirty = true;
    }

    fn removed(&mut self, entry: Entry) {
        self.count -= 1;
        if let Some(n) = self.keys.get_mut(&entry.key) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(&entry.key);
            }
        }
        self.dirty = true;
        if self.stats {
            self.bytes -= entry.bytes();
        } else if let Some(joined) = self.joins.remove(&entry.phx_ref) {
            // Came and went since the last flush: nobody hears of it.
            self.bytes -= joined.bytes() + entry.bytes();
        } else {
            // Its bytes stay counted in the pending leaves until the flush.
            self.leaves.push(entry);
        }
    }
}

/// `{"<key>": {"metas": [{"phx_ref": ..., ...meta}, ...]}, ...}`, keys and metas in order.
fn state_json<'a>(entries: impl Iterator<Item = &'a Entry>) -> String {
    let mut by_key: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        by_key.entry(&e.key).or_default().push(e);
    }
    let mut out = String::from("{");
    for (i, (key, mut entries)) in by_key.into_iter().enumerate() {
        // The same text for everyone, whatever order the entries are held in.
        entries.sort_unstable_by(|a, b| a.phx_ref.cmp(&b.phx_ref));
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(key));
        out.push_str(r#":{"metas":["#);
        for (j, e) in entries.into_iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            e.meta_json(&mut out);
        }
        out.push_str("]}");
    }
    out.push('}');
    out
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A presence key as a gateway or a peer may send it: 1 to
/// [`ringcast_proto::MAX_PRESENCE_KEY_BYTES`] bytes.
pub fn key_ok(key: &str) -> bool {
    !key.is_empty() && key.len() <= ringcast_proto::MAX_PRESENCE_KEY_BYTES
}

/// Checks a presence meta from a gateway: a JSON object of at most
/// [`ringcast_proto::MAX_PRESENCE_META_BYTES`]; returns it compact.
pub fn meta_of(meta: &[u8]) -> Option<Box<str>> {
    if meta.len() > 4 * ringcast_proto::MAX_PRESENCE_META_BYTES {
        return None;
    }
    let value: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(meta).ok()?;
    let compact = serde_json::to_string(&value).ok()?;
    (compact.len() <= ringcast_proto::MAX_PRESENCE_META_BYTES && !value.contains_key("phx_ref"))
        .then(|| compact.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn entry(key: &str, phx_ref: &str, meta: &str) -> Entry {
        Entry {
            key: key.into(),
            phx_ref: phx_ref.into(),
            meta: meta.into(),
        }
    }

    fn limits(listed_max: usize) -> PresenceLimits {
        PresenceLimits {
            listed_max,
            max_members: 100,
            max_bytes: MAX_BYTES,
        }
    }

    /// A fixed instant: counts are throttled per second (`counts_go_out_at_most_once_a_second`).
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    fn parse(text: impl AsRef<[u8]>) -> Value {
        serde_json::from_slice(text.as_ref()).unwrap()
    }

    /// A phoenix.js client's state: `presence_state` then each diff (joins, then leaves).
    #[derive(Default)]
    struct Client(serde_json::Map<String, Value>);

    impl Client {
        fn apply(&mut self, event: &str, payload: impl AsRef<[u8]>) {
            let payload = parse(payload);
            match event {
                "presence_state" => self.0 = payload.as_object().unwrap().clone(),
                "presence_diff" => {
                    for (key, joined) in payload["joins"].as_object().unwrap() {
                        let metas = self.0.entry(key.clone()).or_insert(json!({"metas": []}));
                        let list = metas["metas"].as_array_mut().unwrap();
                        for m in joined["metas"].as_array().unwrap() {
                            if !list.iter().any(|x| x["phx_ref"] == m["phx_ref"]) {
                                list.push(m.clone());
                            }
                        }
                    }
                    for (key, left) in payload["leaves"].as_object().unwrap() {
                        if let Some(metas) = self.0.get_mut(key) {
                            let refs: Vec<&Value> = left["metas"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|m| &m["phx_ref"])
                                .collect();
                            metas["metas"]
                                .as_array_mut()
                                .unwrap()
                                .retain(|m| !refs.contains(&&m["phx_ref"]));
                            if metas["metas"].as_array().unwrap().is_empty() {
                                self.0.remove(key);
                            }
                        }
                    }
                }
                _ => {}
            }
        }

        /// Keys to sorted refs.
        fn refs(&self) -> BTreeMap<String, Vec<String>> {
            self.0
                .iter()
                .map(|(k, v)| {
                    let mut refs: Vec<String> = v["metas"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|m| m["phx_ref"].as_str().unwrap().to_owned())
                        .collect();
                    refs.sort();
                    (k.clone(), refs)
                })
                .collect()
        }
    }

    fn owner_refs(p: &Presence<u8>) -> BTreeMap<String, Vec<String>> {
        let mut c = Client::default();
        c.apply("presence_state", p.state().unwrap());
        c.refs()
    }

    #[test]
    fn joiners_and_watchers_end_up_with_the_owners_state() {
        let mut p = Presence::<u8>::default();
        let l = limits(10);
        let mut early = Client::default();
        let (event, state) = p.snapshot();
        early.apply(event, &state);
        p.track(&1, 1, entry("alice", "r1", r#"{"tab":1}"#), &l)
            .unwrap();
        p.track(&2, 7, entry("alice", "r2", r#"{"tab":2}"#), &l)
            .unwrap();
        // A joiner in the middle of an interval: the state as of the last flush.
        let mut middle = Client::default();
        let (event, state) = p.snapshot();
        assert_eq!(parse(&state), json!({}));
        middle.apply(event, &state);
        p.track(&1, 2, entry("bob", "r3", "{}"), &l).unwrap();
        let (event, diff) = p.flush(&l, t0()).unwrap();
        assert_eq!(event, "presence_diff");
        for c in [&mut early, &mut middle] {
            c.apply(event, &diff);
        }
        assert_eq!(
            parse(&diff)["joins"]["alice"]["metas"][0],
            json!({"phx_ref": "r1", "tab": 1})
        );
        assert_eq!(early.refs(), owner_refs(&p));
        // A meta update, a leave, a stream that ends: one diff.
        assert_eq!(
            p.update(&1, 1, r#"{"tab":9}"#.into(), "r4".into(), &l),
            Ok(true)
        );
        assert_eq!(p.update(&1, 99, "{}".into(), "r5".into(), &l), Ok(false));
        assert!(p.untrack(&1, 2));
        assert!(!p.untrack(&1, 2), "once");
        assert_eq!(p.drop_gateway(&2), 1);
        let mut late = Client::default();
        let (event, state) = p.snapshot();
        late.apply(event, &state);
        let (event, diff) = p.flush(&l, t0()).unwrap();
        for c in [&mut early, &mut middle, &mut late] {
            c.apply(event, &diff);
            assert_eq!(c.refs(), owner_refs(&p));
        }
        assert_eq!(
            owner_refs(&p),
            BTreeMap::from([("alice".into(), vec!["r4".into()])])
        );
        assert_eq!(p.flush(&l, t0()), None, "nothing new");
    }

    #[test]
    fn a_join_and_leave_in_one_interval_leave_no_trace() {
        let mut p = Presence::<u8>::default();
        let l = limits(10);
        p.track(&1, 1, entry("a", "r1", "{}"), &l).unwrap();
        let (_, before) = p.snapshot();
        p.untrack(&1, 1);
        assert_eq!(parse(&before), json!({}), "as of the last flush");
        assert_eq!(p.flush(&l, t0()), None, "nothing to say");
        assert!(p.is_empty());
        assert_eq!(p.bytes(), 0, "nothing held once flushed");
    }

    #[test]
    fn handed_over_entries_are_adopted_silently_or_leave_in_time() {
        let now = Instant::now();
        let l = limits(10);
        let mut old = Presence::<u8>::default();
        old.track(&1, 1, entry("a", "r1", "{}"), &l).unwrap();
        old.track(&2, 5, entry("b", "r2", "{}"), &l).unwrap();
        old.flush(&l, t0());
        let handed = old.hand_over(|g| format!("gw-{g}"));
        let mut new = Presence::<u8>::default();
        new.install(handed, now + ADOPT_WITHIN, false, &l);
        assert_eq!(new.counts(), (2, 2));
        assert_eq!(parse(&new.snapshot().1).as_object().unwrap().len(), 2);
        assert!(new.adopt(&9, "gw-1", 1));
        assert!(!new.adopt(&9, "gw-1", 1), "once");
        assert_eq!(new.flush(&l, t0()), None, "no diff for a move");
        new.expire(now + ADOPT_WITHIN);
        let (_, diff) = new.flush(&l, t0()).unwrap();
        assert_eq!(parse(&diff)["leaves"]["b"]["metas"][0]["phx_ref"], "r2");
        assert_eq!(new.counts(), (1, 1));
        // The adopted one belongs to its new stream now.
        assert_eq!(new.drop_gateway(&9), 1);
    }

    #[test]
    fn a_crowd_is_counted_not_listed_and_listed_again_when_it_thins() {
        let l = limits(4);
        let mut p = Presence::<u8>::default();
        for s in 0..5 {
            p.track(
                &1,
                s,
                entry(&format!("u{}", s % 3), &format!("r{s}"), "{}"),
                &l,
            )
            .unwrap();
        }
        let (event, stats) = p.flush(&l, t0()).unwrap();
        assert_eq!(
            (event, parse(&stats)),
            ("presence_stats", json!({"members": 5, "keys": 3}))
        );
        assert_eq!(p.snapshot().0, "presence_stats");
        // Counts go out at most once a second: the change waits for the next one.
        p.untrack(&1, 4);
        let soon = t0() + STATS_EVERY / 2;
        assert_eq!(p.flush(&l, soon), None);
        let (event, stats) = p.flush(&l, t0() + STATS_EVERY).unwrap();
        assert_eq!(
            (event, parse(&stats)["members"].as_u64()),
            ("presence_stats", Some(4))
        );
        p.untrack(&1, 3);
        p.untrack(&1, 2);
        let (event, state) = p.flush(&l, t0()).unwrap();
        assert_eq!(event, "presence_state", "listed again, whole");
        assert_eq!(parse(&state).as_object().unwrap().len(), 2);
        assert_eq!(p.snapshot().0, "presence_state");
    }

    #[test]
    fn tracks_are_bounded_and_metas_checked() {
        let l = PresenceLimits {
            listed_max: 10,
            max_members: 2,
            max_bytes: MAX_BYTES,
        };
        let mut p = Presence::<u8>::default();
        p.track(&1, 1, entry("a", "r1", "{}"), &l).unwrap();
        p.track(&2, 1, entry("a", "r2", "{}"), &l).unwrap();
        assert_eq!(p.track(&3, 1, entry("a", "r3", "{}"), &l), Err(Full));
        assert!(
            p.track(&2, 1, entry("a", "r4", "{}"), &l).is_ok(),
            "a replacement"
        );
        assert_eq!(
            meta_of(br#"{ "a" : [1, 2] }"#).as_deref(),
            Some(r#"{"a":[1,2]}"#)
        );
        assert_eq!(meta_of(b"[1]"), None);
        assert_eq!(meta_of(b"{"), None);
        assert_eq!(meta_of(br#"{"phx_ref":"forged"}"#), None);
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(2000));
        assert_eq!(meta_of(big.as_bytes()), None);
    }

    #[test]
    fn updates_within_one_interval_are_one_change() {
        let l = limits(10);
        let mut p = Presence::<u8>::default();
        p.track(&1, 1, entry("a", "r1", r#"{"n":1}"#), &l).unwrap();
        p.flush(&l, t0()).unwrap();
        let held = p.bytes();
        for n in 2..=50 {
            let meta = format!(r#"{{"n":{n}}}"#);
            assert_eq!(
                p.update(&1, 1, meta.into(), format!("r{n}").into(), &l),
                Ok(true)
            );
        }
        let (_, diff) = p.flush(&l, t0()).unwrap();
        assert_eq!(
            parse(&diff),
            json!({
                "joins": {"a": {"metas": [{"phx_ref": "r50", "n": 50}]}},
                "leaves": {"a": {"metas": [{"phx_ref": "r1", "n": 1}]}},
            })
        );
        assert!(p.bytes() <= held + 8, "no pile of pending updates");
    }

    #[test]
    fn a_topics_presence_is_bounded_in_bytes() {
        let l = PresenceLimits {
            listed_max: 10,
            max_members: 1000,
            max_bytes: 4096,
        };
        let mut p = Presence::<u8>::default();
        let meta = format!(r#"{{"a":"{}"}}"#, "x".repeat(500));
        let tracked = (0..100)
            .take_while(|&s| {
                let e = entry("k", &format!("r{s}"), &meta);
                p.track(&1, s, e, &l).is_ok()
            })
            .count();
        assert!((1..10).contains(&tracked), "{tracked} tracked");
        assert!(p.bytes() <= l.max_bytes);
        p.flush(&l, t0());
        assert!(p.bytes() <= l.max_bytes);
    }

    #[test]
    fn a_counted_presence_keeps_no_lists_and_says_counts_at_once_when_it_becomes_counted() {
        let l = limits(2);
        let mut p = Presence::<u8>::default();
        p.track(&1, 1, entry("a", "r1", "{}"), &l).unwrap();
        p.track(&1, 2, entry("b", "r2", "{}"), &l).unwrap();
        p.flush(&l, t0()).unwrap();
        p.track(&1, 3, entry("c", "r3", "{}"), &l).unwrap();
        let (event, _) = p.flush(&l, t0()).unwrap();
        assert_eq!(event, "presence_stats");
        let one = p.bytes();
        for s in 4..20 {
            p.track(&1, s, entry("d", &format!("r{s}"), "{}"), &l)
                .unwrap();
        }
        let added: usize = (4..20)
            .map(|s| entry("d", &format!("r{s}"), "{}").bytes())
            .sum();
        assert_eq!(p.bytes(), one + added, "entries only, no pending joins");
        assert_eq!(p.state(), None, "not listed while counted");
        for s in 4..20 {
            p.untrack(&1, s);
        }
        p.untrack(&1, 3);
        p.untrack(&1, 2);
        let (event, state) = p.flush(&l, t0() + STATS_EVERY).unwrap();
        assert_eq!(event, "presence_state", "listed again");
        assert_eq!(parse(&state).as_object().unwrap().len(), 1);
        // Counted again soon after: the counts go out at once, not a second later.
        p.track(&1, 30, entry("e", "r30", "{}"), &l).unwrap();
        p.track(&1, 31, entry("e", "r31", "{}"), &l).unwrap();
        let (event, _) = p.flush(&l, t0() + STATS_EVERY).unwrap();
        assert_eq!(event, "presence_stats");
    }

    #[test]
    fn a_counted_presence_stays_counted_with_its_new_owner() {
        let l = limits(4);
        let mut old = Presence::<u8>::default();
        for s in 0..6 {
            old.track(&1, s, entry("a", &format!("r{s}"), "{}"), &l)
                .unwrap();
        }
        old.flush(&l, t0()).unwrap();
        old.untrack(&1, 5);
        old.untrack(&1, 4);
        assert_eq!(
            old.flush(&l, t0()),
            None,
            "throttled: 4 members not said yet"
        );
        assert!(old.is_counted());
        let counted = old.is_counted();
        let handed = old.hand_over(|g| format!("gw-{g}"));
        let mut new = Presence::<u8>::default();
        new.install(handed, t0() + ADOPT_WITHIN, counted, &l);
        assert_eq!(new.snapshot().0, "presence_stats", "4 members, but counted");
        let (event, stats) = new.flush(&l, t0()).unwrap();
        assert_eq!(
            (event, parse(&stats)),
            ("presence_stats", json!({"members": 4, "keys": 1}))
        );
    }

    #[test]
    fn an_adoption_over_a_tracked_subscriber_replaces_it() {
        let l = limits(10);
        let mut old = Presence::<u8>::default();
        old.track(&1, 1, entry("a", "r1", "{}"), &l).unwrap();
        let handed = old.hand_over(|g| format!("gw-{g}"));
        let mut new = Presence::<u8>::default();
        new.install(handed, t0() + ADOPT_WITHIN, false, &l);
        new.track(&9, 1, entry("z", "r9", "{}"), &l).unwrap();
        new.flush(&l, t0()).unwrap();
        assert!(new.adopt(&9, "gw-1", 1));
        assert_eq!(new.counts(), (1, 1));
        // z's join was said since the handover: the whole state again, without z.
        let (event, state) = new.flush(&l, t0()).unwrap();
        assert_eq!(
            (event, parse(&state)),
            (
                "presence_state",
                json!({"a": {"metas": [{"phx_ref": "r1"}]}})
            )
        );
        assert!(!new.adopt(&9, "gw-2", 1), "another gateway's subscriber 1");
    }

    #[test]
    fn joiners_between_two_flushes_share_one_state() {
        let l = limits(10);
        let mut p = Presence::<u8>::default();
        p.track(&1, 1, entry("a", "r1", "{}"), &l).unwrap();
        p.flush(&l, t0()).unwrap();
        let (_, first) = p.snapshot();
        // Changes since the flush do not show, and the text is not built again.
        p.track(&1, 2, entry("b", "r2", "{}"), &l).unwrap();
        p.untrack(&1, 1);
        let (_, second) = p.snapshot();
        assert_eq!(first.as_ptr(), second.as_ptr(), "one copy");
        assert_eq!(parse(&second), json!({"a": {"metas": [{"phx_ref": "r1"}]}}));
        p.flush(&l, t0()).unwrap();
        let (_, third) = p.snapshot();
        assert_eq!(parse(&third), json!({"b": {"metas": [{"phx_ref": "r2"}]}}));
    }

    #[test]
    fn a_gateway_that_moves_late_hears_everything_again_if_it_missed_something() {
        let l = limits(10);
        let mut old = Presence::<u8>::default();
        old.track(&1, 1, entry("a", "r1", "{}"), &l).unwrap();
        old.track(&1, 2, entry("b", "r2", "{}"), &l).unwrap();
        old.track(&2, 1, entry("c", "r3", "{}"), &l).unwrap();
        old.flush(&l, t0());
        let handed = old.hand_over(|g| format!("gw-{g}"));
        let mut new = Presence::<u8>::default();
        new.install(handed, t0() + ADOPT_WITHIN, false, &l);
        // Gateway 1 moves; one of its members leaves: said to gateway 1 only.
        assert!(new.adopt(&8, "gw-1", 1) && new.adopt(&8, "gw-1", 2));
        assert_eq!(new.flush(&l, t0()), None, "a move says nothing");
        new.untrack(&8, 2);
        let (event, _) = new.flush(&l, t0()).unwrap();
        assert_eq!(event, "presence_diff");
        // Gateway 2 moves after that: everyone gets the whole state once.
        assert!(new.adopt(&9, "gw-2", 1));
        let (event, state) = new.flush(&l, t0()).unwrap();
        assert_eq!(event, "presence_state");
        assert_eq!(
            parse(&state)
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(new.flush(&l, t0()), None, "once");
    }

    #[test]
    fn a_counted_topic_says_its_counts_again_to_a_late_adopter() {
        let l = limits(2);
        let mut old = Presence::<u8>::default();
        for s in 0..3 {
            old.track(&(s as u8), s, entry("k", &format!("r{s}"), "{}"), &l)
                .unwrap();
        }
        old.flush(&l, t0()).unwrap();
        assert!(old.is_counted());
        let handed = old.hand_over(|g| format!("gw-{g}"));
        let mut new = Presence::<u8>::default();
        new.install(handed, t0() + ADOPT_WITHIN, true, &l);
        assert!(new.adopt(&7, "gw-0", 0));
        assert_eq!(new.flush(&l, t0()).unwrap().0, "presence_stats");
        assert!(new.adopt(&8, "gw-1", 1));
        assert_eq!(new.flush(&l, t0()), None, "within the second");
        let (event, stats) = new.flush(&l, t0() + STATS_EVERY).unwrap();
        assert_eq!(
            (event, parse(&stats)),
            ("presence_stats", json!({"members": 3, "keys": 1}))
        );
    }

    #[test]
    fn the_shared_state_counts_as_held() {
        let l = limits(10);
        let mut p = Presence::<u8>::default();
        p.track(&1, 1, entry("a", "r1", "{}"), &l).unwrap();
        p.flush(&l, t0()).unwrap();
        let entries = p.bytes();
        let (_, state) = p.snapshot();
        assert_eq!(p.bytes(), entries + state.len());
        p.untrack(&1, 1);
        p.flush(&l, t0()).unwrap();
        assert_eq!(p.bytes(), 0);
    }
}
