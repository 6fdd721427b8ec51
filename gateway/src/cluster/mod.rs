//! The gateway's cluster side: which topic server serves each topic, the streams to them, and
//! what changes when the ring does.
//!
//! - [`directory`]: the decisions, as plain data (rings, moves and retries in flight,
//!   deadlines): events in, actions out; unit-tested by lists of operations.
//! - [`link`]: one stream per topic server (transport, request ids, in-order application of
//!   what comes down into the local index).
//! - [`driver`]: the one task that owns the directory, feeds it link events, ring edits and
//!   deadlines, and carries out its actions.
//! - [`Cluster`]: the narrow handle sessions use to send joins, publishes and unsubscribes.
//!
//! Imports go one way: sessions -> `Cluster` -> links; the driver -> directory and links.

pub mod directory;
pub mod driver;
pub mod link;
pub mod request;
pub mod rings;
pub mod runtime;

use crate::index::LocalIndex;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use directory::{EMBEDDED_NODE, Feeds};
use link::{Connector, Link, LinkShared};
use request::{Api, Join, Pending, Publish};
use ringcast_ring::{NodeSpec, Ring};
pub use rings::Rings;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a gateway reaches its topic servers.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub gateway_id: String,
    /// `None`: the topic-server core runs in this process and owns every topic.
    pub ring: Option<Ring>,
    /// Requests queued per link.
    pub queue: usize,
    pub keepalive: Duration,
    pub max_message_bytes: usize,
    /// Threads of the links' own runtime (0: the current runtime).
    pub link_threads: usize,
    /// Sent on every call to a topic server.
    pub secret: ringcast_proto::auth::ClusterSecret,
}

/// The handle sessions and the status endpoints use.
#[derive(Debug)]
pub struct Cluster {
    shared: Arc<LinkShared>,
    /// The links to the nodes of the ring in force (or the embedded core), by node id.
    links: ArcSwap<HashMap<Arc<str>, Arc<Link>>>,
    /// Topics moving to a new owner now (kept by the driver).
    moving: AtomicUsize,
    keepalive: Duration,
    max_message_bytes: usize,
    secret: ringcast_proto::auth::ClusterSecret,
    /// Parent of every link's stop token.
    stop: CancellationToken,
    tasks: TaskTracker,
    runtime: runtime::LinkRuntime,
}

impl Cluster {
    /// Starts the links (one to the embedded core without a ring); returns the handle and
    /// the events the links report, for the driver. Links stop when `stop` is cancelled.
    pub fn start(
        config: ClusterConfig,
        index: Arc<LocalIndex>,
        metrics: Arc<Metrics>,
        conns: Arc<crate::conn::Registry>,
        stop: CancellationToken,
        tasks: TaskTracker,
        embedded_core: Option<ringcast_topic_server::TopicService>,
    ) -> std::io::Result<(Arc<Cluster>, mpsc::UnboundedReceiver<directory::LinkEvent>)> {
        let (events, events_rx) = mpsc::unbounded_channel();
        let ring = config.ring.map(Arc::new);
        let shared = Arc::new(LinkShared {
            gateway_id: config.gateway_id,
            instance: rand::random(),
            index,
            metrics,
            conns,
            queue: config.queue,
            rings: Arc::new(ArcSwap::from_pointee(Rings {
                current: ring.clone(),
                previous: None,
            })),
            events,
            newest_seen: Default::default(),
        });
        let cluster = Arc::new(Cluster {
            shared,
            links: Default::default(),
            moving: AtomicUsize::new(0),
            keepalive: config.keepalive,
            max_message_bytes: config.max_message_bytes,
            secret: config.secret,
            stop,
            tasks,
            runtime: runtime::LinkRuntime::start(config.link_threads)?,
        });
        let links = match (&ring, embedded_core) {
            (Some(ring), _) => ring
                .nodes()
                .iter()
                .map(|node| (node.id.as_str().into(), cluster.start_link(node)))
                .collect(),
            (None, core) => {
                let core = core.expect("a gateway with no ring embeds the topic-server core");
                let node: Arc<str> = EMBEDDED_NODE.into();
                let link = cluster.spawn_link(node.clone(), Connector::InProcess(core));
                HashMap::from([(node, link)])
            }
        };
        cluster.links.store(Arc::new(links));
        Ok((cluster, events_rx))
    }

    fn start_link(&self, node: &NodeSpec) -> Arc<Link> {
        let connector = Connector::Grpc {
            addr: node.addr.clone(),
            keepalive: self.keepalive,
            max_message_bytes: self.max_message_bytes,
            secret: self.secret.clone(),
        };
        self.spawn_link(node.id.as_str().into(), connector)
    }

    fn spawn_link(&self, node: Arc<str>, connector: Connector) -> Arc<Link> {
        let link = Link::new(
            node,
            connector,
            self.shared.clone(),
            self.stop.child_token(),
        );
        self.tasks
            .spawn_on(link.clone().run(), self.runtime.handle());
        link
    }

    /// Installs `ring`: connects `connect`, takes the links of `remove` out of the routing
    /// table (returned, for the caller to close once their topics moved), then makes `ring`
    /// the ring in force, so a topic routed by the new ring always finds its node's link.
    pub(crate) fn apply_ring(
        &self,
        ring: Arc<Ring>,
        connect: &[NodeSpec],
        remove: &[String],
    ) -> Vec<Arc<Link>> {
        let mut links = HashMap::clone(&self.links.load());
        let removed = remove
            .iter()
            .filter_map(|id| links.remove(id.as_str()))
            .collect();
        for node in connect {
            links.insert(node.id.as_str().into(), self.start_link(node));
        }
        self.links.store(Arc::new(links));
        let previous = self.shared.rings.load().current.clone();
        self.shared.rings.store(Arc::new(Rings {
            current: Some(ring),
            previous,
        }));
        removed
    }

    /// Sends a join to the node its topic's feed is attached at here, or its owner; returns
    /// that node. Handed back if that node's link cannot take it.
    #[allow(clippy::result_large_err)] // handed back to be answered, not boxed
    pub fn join(&self, join: Join) -> Result<Arc<str>, Join> {
        let rings = self.shared.rings.load();
        let node = directory::join_target(
            rings.current.as_deref(),
            &join.topic,
            &*self.shared.index as &dyn Feeds,
        );
        match self.send_to(&node, Pending::Join(join)) {
            Ok(()) => Ok(node),
            Err(Pending::Join(join)) => Err(join),
            Err(_) => unreachable!("a link hands back the request it was given"),
        }
    }

    /// Sends a publish to its topic's owner (which orders it); handed back if the owner's
    /// link cannot take it.
    #[allow(clippy::result_large_err)] // handed back to be answered, not boxed
    pub fn publish(&self, publish: Publish) -> Result<(), Publish> {
        let rings = self.shared.rings.load();
        let node = directory::owner(rings.current.as_deref(), &publish.topic);
        self.send_to(&node, Pending::Publish(publish))
            .map_err(|p| match p {
                Pending::Publish(p) => p,
                _ => unreachable!("a link hands back the request it was given"),
            })
    }

    /// Sends an API read to its topic's owner; handed back if the owner's link cannot take it.
    #[allow(clippy::result_large_err)] // handed back to be answered, not boxed
    pub fn ask(&self, api: Api) -> Result<(), Api> {
        let node = self.owner(&api.topic);
        self.send_to(&node, Pending::Api(api)).map_err(api_back)
    }

    /// Sends an API call on `link`; handed back if the link cannot take it.
    #[allow(clippy::result_large_err)] // handed back to be answered, not boxed
    pub fn ask_at(&self, link: &Link, api: Api) -> Result<(), Api> {
        link.request(Pending::Api(api)).map_err(api_back)
    }

    /// The node that owns `topic` under the ring in force.
    pub fn owner(&self, topic: &str) -> Arc<str> {
        directory::owner(self.shared.rings.load().current.as_deref(), topic)
    }

    /// Sends `request` on the link to `node` (where a subscription is); handed back if that
    /// link cannot take it.
    #[allow(clippy::result_large_err)] // handed back to be answered, not boxed
    pub fn send_to(&self, node: &str, request: Pending) -> Result<(), Pending> {
        match self.link(node) {
            Some(link) => link.request(request),
            None => Err(request),
        }
    }

    /// Drops subscription `sub` of `topic` at `node` (fire and forget).
    pub fn unsubscribe(&self, node: &str, topic: &str, sub: u64) {
        if let Some(link) = self.link(node) {
            link.unsubscribe(topic, sub);
        }
    }

    /// The link to `node` in the routing table.
    pub(crate) fn link(&self, node: &str) -> Option<Arc<Link>> {
        self.links.load().get(node).cloned()
    }

    /// Every link of the routing table, by node id.
    pub fn links(&self) -> Vec<Arc<Link>> {
        let mut all: Vec<_> = self.links.load().values().cloned().collect();
        all.sort_by(|a, b| a.node().cmp(b.node()));
        all
    }

    /// The ring in force (`None` in embedded mode).
    pub fn ring(&self) -> Option<Arc<Ring>> {
        self.shared.rings.load().current.clone()
    }

    /// The ring version in force (0 in embedded mode).
    pub fn version(&self) -> u64 {
        self.shared.rings.load().version()
    }

    /// Topics whose feed is moving to a new owner now.
    pub fn moving(&self) -> usize {
        self.moving.load(Relaxed)
    }

    pub(crate) fn set_moving(&self, n: usize) {
        self.moving.store(n, Relaxed);
    }

    pub(crate) fn index(&self) -> &Arc<LocalIndex> {
        &self.shared.index
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }
}
/// The API call a link handed back.
fn api_back(pending: Pending) -> Api {
    match pending {
        Pending::Api(api) => api,
        _ => unreachable!("a link hands back the request it was given"),
    }
}
