//! Continuous traffic for end-to-end scenarios, checked against the owner's sequence.
//!
//! Subscribers stay joined to their topics through anything (they reconnect, and rejoin
//! after `phx_error` with the position they reached) and record everything they see;
//! publishers publish continuously and learn the owner's sequence from their replies
//! (`(topic, epoch, offset) -> message id`). [`check`] then proves, for every subscriber and
//! topic, that what it counted is the owner's sequence: no silent gap, no duplicate.

use crate::{Cluster, WsClient, eventually};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What one subscriber saw on one topic, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Joined {
        epoch: String,
        offset: u64,
        recovered: Option<bool>,
    },
    /// A message, at the offset the subscriber counted.
    Message { epoch: String, offset: u64, id: u64 },
    /// `phx_error`, or the socket was lost: the subscriber was told.
    Interrupted,
}

#[derive(Debug, Default)]
pub struct Channel {
    pub join_ref: String,
    pub joined: bool,
    joining: bool,
    retry_at: Option<Instant>,
    pub position: Option<(String, u64)>,
    pub seen: Vec<Seen>,
}

pub type Channels = Arc<Mutex<HashMap<String, Channel>>>;

/// The owner's sequence as the publishers learned it from their replies:
/// (topic, epoch, offset) -> message id.
pub type OwnerLog = Arc<Mutex<HashMap<(String, String, u64), u64>>>;

/// A client that stays joined to `topics` through anything: it reconnects, rejoins after
/// `phx_error` with its position, and records everything it sees. With `owner` set it also
/// publishes to its topics every `publish_every` while `publishing` holds.
pub struct Client {
    url: String,
    pub channels: Channels,
    publish: Option<Publishing>,
}

pub struct Publishing {
    pub every: Duration,
    pub owner: OwnerLog,
    pub next_id: Arc<AtomicU64>,
    pub on: watch::Receiver<bool>,
}

impl Client {
    pub fn new(url: String, topics: &[String], publish: Option<Publishing>) -> Client {
        let channels = topics
            .iter()
            .map(|t| (t.clone(), Channel::default()))
            .collect();
        Client {
            url,
            channels: Arc::new(Mutex::new(channels)),
            publish,
        }
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Channels {
        let mut refs = 0u64;
        while !*stop.borrow() {
            let Ok((ws, _)) = tokio_tungstenite::connect_async(&self.url).await else {
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            };
            let (mut tx, mut rx) = ws.split();
            for c in self.channels.lock().values_mut() {
                (c.joined, c.joining, c.retry_at) = (false, false, Some(Instant::now()));
            }
            let mut joins: HashMap<String, String> = HashMap::new();
            let mut publishes: HashMap<String, (String, u64)> = HashMap::new();
            let mut tick = tokio::time::interval(
                self.publish
                    .as_ref()
                    .map_or(Duration::from_millis(20), |p| p.every),
            );
            let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
            let mut topic_turn = 0usize;
            loop {
                let mut out = Vec::new();
                tokio::select! {
                    _ = stop.changed() => return self.channels,
                    _ = heartbeat.tick() => out.push(json!([null, "hb", "phoenix", "heartbeat", {}])),
                    _ = tick.tick() => {
                        let now = Instant::now();
                        let mut channels = self.channels.lock();
                        for (topic, c) in channels.iter_mut() {
                            if c.joined || c.joining || c.retry_at.is_none_or(|at| at > now) {
                                continue;
                            }
                            refs += 1;
                            let r = refs.to_string();
                            let params = match (&c.position, &self.publish) {
                                (Some((epoch, offset)), None) => json!({"recover": {"epoch": epoch, "offset": offset}}),
                                _ => json!({}),
                            };
                            (c.joining, c.join_ref) = (true, r.clone());
                            joins.insert(r.clone(), topic.clone());
                            out.push(json!([r, r, topic, "phx_join", params]));
                        }
                        if let Some(p) = self.publish.as_ref().filter(|p| *p.on.borrow()) {
                            let mut joined: Vec<(&String, &Channel)> = channels.iter().filter(|(_, c)| c.joined).collect();
                            joined.sort_by_key(|(t, _)| t.as_str());
                            if !joined.is_empty() {
                                let (topic, c) = joined[topic_turn % joined.len()];
                                topic_turn += 1;
                                refs += 1;
                                let id = p.next_id.fetch_add(1, Relaxed);
                                publishes.insert(refs.to_string(), (topic.clone(), id));
                                out.push(json!([c.join_ref, refs.to_string(), topic, "publish", ["m", id]]));
                            }
                        }
                    }
                    frame = rx.next() => match frame {
                        Some(Ok(Message::Text(text))) => {
                            let frame: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                            self.on_frame(&frame, &mut joins, &mut publishes);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                }
                for frame in out {
                    if tx
                        .send(Message::Text(frame.to_string().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            // The socket is gone: every joined channel was interrupted, and the client knows.
            for c in self.channels.lock().values_mut() {
                if c.joined {
                    c.seen.push(Seen::Interrupted);
                }
            }
        }
        self.channels
    }

    fn on_frame(
        &self,
        frame: &Value,
        joins: &mut HashMap<String, String>,
        publishes: &mut HashMap<String, (String, u64)>,
    ) {
        let (join_ref, msg_ref, topic, event, payload) =
            (&frame[0], &frame[1], &frame[2], &frame[3], &frame[4]);
        let topic = topic.as_str().unwrap_or_default();
        let mut channels = self.channels.lock();
        match event.as_str().unwrap_or_default() {
            "phx_reply" => {
                let msg_ref = msg_ref.as_str().unwrap_or_default();
                let response = &payload["response"];
                if let Some(topic) = joins.remove(msg_ref) {
                    let c = channels.get_mut(&topic).expect("joined topic");
                    c.joining = false;
                    if payload["status"] == "ok" {
                        let epoch = response["epoch"].as_str().expect("epoch").to_owned();
                        let offset = response["offset"].as_u64().expect("offset");
                        c.seen.push(Seen::Joined {
                            epoch: epoch.clone(),
                            offset,
                            recovered: response["recovered"].as_bool(),
                        });
                        (c.joined, c.position) = (true, Some((epoch, offset)));
                    } else {
                        c.retry_at = Some(Instant::now() + Duration::from_millis(200));
                    }
                } else if let Some((topic, id)) = publishes.remove(msg_ref)
                    && payload["status"] == "ok"
                    && let Some(p) = &self.publish
                {
                    let epoch = response["epoch"].as_str().expect("epoch").to_owned();
                    let offset = response["offset"].as_u64().expect("offset");
                    p.owner.lock().insert((topic, epoch, offset), id);
                }
            }
            "phx_error" => {
                if let Some(c) = channels.get_mut(topic)
                    && c.joined
                    && join_ref == &json!(c.join_ref)
                {
                    c.joined = false;
                    c.retry_at = Some(Instant::now() + Duration::from_millis(100));
                    c.seen.push(Seen::Interrupted);
                }
            }
            "m" => {
                let Some(c) = channels.get_mut(topic) else {
                    return;
                };
                if !c.joined || join_ref != &json!(c.join_ref) {
                    return;
                }
                let (epoch, offset) = c.position.as_mut().expect("joined has a position");
                *offset += 1;
                let seen = Seen::Message {
                    epoch: epoch.clone(),
                    offset: *offset,
                    id: payload.as_u64().expect("message id"),
                };
                c.seen.push(seen);
            }
            _ => {}
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub messages: usize,
    pub checked: usize,
    pub interruptions: usize,
    pub recovered: usize,
    pub not_recovered: usize,
    /// Successful joins (first joins and rejoins).
    pub joins: usize,
    /// Epochs seen per subscriber and topic, at most.
    pub max_epochs: usize,
}

/// Checks one subscriber's view of one topic against the owner's sequence.
pub fn check(
    topic: &str,
    seen: &[Seen],
    owner: &HashMap<(String, String, u64), u64>,
    report: &mut Report,
) {
    let mut epochs: Vec<&str> = Vec::new();
    for s in seen {
        if let Seen::Joined { epoch, .. } = s {
            report.joins += 1;
            if !epochs.contains(&epoch.as_str()) {
                epochs.push(epoch);
            }
        }
        match s {
            Seen::Message { epoch, offset, id } => {
                report.messages += 1;
                if let Some(owned) = owner.get(&(topic.to_owned(), epoch.clone(), *offset)) {
                    assert_eq!(
                        owned, id,
                        "silent gap on {topic}: at epoch {epoch} offset {offset} the subscriber counted message {id}, the owner's is {owned}"
                    );
                    report.checked += 1;
                }
            }
            Seen::Interrupted => report.interruptions += 1,
            Seen::Joined {
                recovered: Some(true),
                ..
            } => report.recovered += 1,
            Seen::Joined {
                recovered: Some(false),
                ..
            } => report.not_recovered += 1,
            Seen::Joined { .. } => {}
        }
    }
    report.max_epochs = report.max_epochs.max(epochs.len());
}

/// Subscribers and publishers on both gateways of a cluster, on `topics`.
pub struct Traffic {
    pub topics: Vec<String>,
    /// The gateways' websocket URLs; the last message of each topic goes through the first.
    urls: Vec<String>,
    subscribers: Vec<(Channels, tokio::task::JoinHandle<Channels>)>,
    publishers: Vec<tokio::task::JoinHandle<Channels>>,
    stop: watch::Sender<bool>,
    publishing: watch::Sender<bool>,
    owner: OwnerLog,
}

impl Traffic {
    /// `subscribers` clients per gateway joined to every topic, and one publisher per
    /// gateway publishing to its topics in turn every `every`.
    pub async fn start(
        cluster: &Cluster,
        topics: Vec<String>,
        subscribers: usize,
        every: Duration,
    ) -> Traffic {
        let urls = (0..cluster.gateways.len())
            .map(|gw| cluster.ws_url(gw))
            .collect();
        Traffic::start_at(urls, topics, subscribers, every).await
    }

    /// As [`Traffic::start`], on the gateways at `urls` (websocket URLs).
    pub async fn start_at(
        urls: Vec<String>,
        topics: Vec<String>,
        subscribers: usize,
        every: Duration,
    ) -> Traffic {
        let (stop, stopped) = watch::channel(false);
        let (publishing, on) = watch::channel(true);
        let owner: OwnerLog = Arc::default();
        let next_id = Arc::new(AtomicU64::new(1));
        let mut traffic = Traffic {
            topics,
            urls: urls.clone(),
            subscribers: Vec::new(),
            publishers: Vec::new(),
            stop,
            publishing,
            owner: owner.clone(),
        };
        for url in &urls {
            for _ in 0..subscribers {
                let client = Client::new(url.clone(), &traffic.topics, None);
                let channels = client.channels.clone();
                traffic
                    .subscribers
                    .push((channels, tokio::spawn(client.run(stopped.clone()))));
            }
            let publish = Publishing {
                every,
                owner: owner.clone(),
                next_id: next_id.clone(),
                on: on.clone(),
            };
            let client = Client::new(url.clone(), &traffic.topics, Some(publish));
            traffic
                .publishers
                .push(tokio::spawn(client.run(stopped.clone())));
        }
        traffic.wait_joined().await;
        traffic
    }

    /// Waits until every subscriber is joined to every topic.
    pub async fn wait_joined(&self) {
        eventually(
            "every subscriber joined",
            Duration::from_secs(30),
            || async {
                self.subscribers
                    .iter()
                    .all(|(c, _)| c.lock().values().all(|c| c.joined))
                    .then_some(())
            },
        )
        .await;
    }

    /// Messages the publishers have had accepted so far.
    pub fn published(&self) -> usize {
        self.owner.lock().len()
    }

    /// Stops publishing, waits for every subscriber to be back on every topic, publishes a
    /// last message per topic (through gateway 0) that every subscriber must reach at exactly
    /// the owner's offset, then checks everything every subscriber saw.
    pub async fn finish(self) -> Report {
        self.publishing.send_replace(false);
        self.wait_joined().await;
        for topic in &self.topics {
            let mut last = WsClient::connect(&self.urls[0]).await;
            last.join_ok(topic, "1").await;
            let reply = last.publish_reply("1", topic, "m", json!(0)).await;
            let at = (
                reply["epoch"].as_str().unwrap().to_owned(),
                reply["offset"].as_u64().unwrap(),
            );
            self.owner
                .lock()
                .insert((topic.clone(), at.0.clone(), at.1), 0);
            eventually(
                &format!("every subscriber reached {topic} {at:?}"),
                Duration::from_secs(10),
                || async {
                    self.subscribers
                        .iter()
                        .all(|(c, _)| c.lock()[topic].position.as_ref() == Some(&at))
                        .then_some(())
                },
            )
            .await;
        }
        self.stop.send_replace(true);
        for p in self.publishers {
            p.await.expect("publisher");
        }
        let mut views = Vec::new();
        for (_, task) in self.subscribers {
            views.push(task.await.expect("subscriber"));
        }
        let owner = self.owner.lock();
        let mut report = Report::default();
        for channels in views {
            for (topic, c) in channels.lock().iter() {
                check(topic, &c.seen, &owner, &mut report);
            }
        }
        eprintln!(
            "owner's sequence known for {} messages; subscribers saw {} messages, checked {} against the owner; {} joins, {} interruptions, {} rejoins recovered, {} told not recovered, at most {} epoch(s) per subscriber and topic; 0 silent gaps",
            owner.len(),
            report.messages,
            report.checked,
            report.joins,
            report.interruptions,
            report.recovered,
            report.not_recovered,
            report.max_epochs,
        );
        report
    }
}
