//! The one task that owns the gateway's [`Directory`]: it selects over link events, ring
//! edits and the directory's next deadline, and carries out the actions that come back
//! (requests sent, connections told, channels interrupted, links opened and closed).

use super::Cluster;
use super::directory::{Action, Directory, Feeds, LinkEvent};
use super::link::Link;
use crate::conn::ChannelEvent;
use crate::metrics::Metrics;
use ringcast_ring::Ring;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The directory's owner.
#[derive(Debug)]
pub struct Driver {
    cluster: Arc<Cluster>,
    directory: Directory,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    /// Newer rings from the ring file watcher (ring mode).
    rings: Option<watch::Receiver<Arc<Ring>>>,
    /// Links of nodes that left the ring, open until their topics have moved.
    departed: HashMap<Arc<str>, Arc<Link>>,
}

impl Driver {
    pub fn new(
        cluster: Arc<Cluster>,
        events: mpsc::UnboundedReceiver<LinkEvent>,
        rings: Option<watch::Receiver<Arc<Ring>>>,
    ) -> Driver {
        Driver {
            directory: Directory::new(cluster.ring()),
            cluster,
            events,
            rings,
            departed: HashMap::new(),
        }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(mut self, stop: CancellationToken) {
        let index = self.cluster.index().clone();
        let feeds: &dyn Feeds = &*index;
        loop {
            let deadline = self.directory.next_deadline();
            let actions = tokio::select! {
                _ = stop.cancelled() => break,
                Some(event) = self.events.recv() => {
                    self.directory.on_event(event, Instant::now(), feeds)
                }
                ring = next_ring(&mut self.rings) => match ring {
                    Some(ring) => self.directory.on_ring(ring, Instant::now(), feeds),
                    None => {
                        self.rings = None;
                        continue;
                    }
                },
                _ = sleep_until(deadline) => self.directory.on_tick(Instant::now(), feeds),
            };
            self.execute(actions);
        }
    }

    fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            self.carry_out(action);
        }
        self.cluster.set_moving(self.directory.moving());
    }

    fn carry_out(&mut self, action: Action) {
        match action {
            Action::ApplyRing {
                ring,
                connect,
                remove,
            } => {
                for link in self.cluster.apply_ring(ring, &connect, &remove) {
                    // Still draining from an earlier edit: that older link goes now.
                    if let Some(old) = self.departed.insert(link.node().clone(), link) {
                        old.stop();
                    }
                }
            }
            Action::Send {
                node,
                request,
                retry,
            } => {
                let sent = match self.cluster.link(&node) {
                    Some(link) => link.request(request),
                    None => Err(request),
                };
                if let Err(request) = sent {
                    self.directory
                        .on_send_failed(request, retry, Instant::now());
                }
            }
            Action::InterruptTopic { topic, reason } => {
                if let Some((node, subs)) = self.cluster.index().remove_topic(&topic) {
                    self.carry_out(Action::InterruptSubs {
                        topic,
                        node,
                        subs,
                        reason,
                    });
                }
            }
            Action::InterruptSubs {
                topic,
                node,
                subs,
                reason,
            } => {
                Metrics::add(
                    &self.cluster.metrics().interrupted_channels,
                    subs.len() as u64,
                );
                let link = self.link(&node);
                for entry in subs {
                    if let Some(link) = &link {
                        link.unsubscribe(&topic, entry.sub);
                    }
                    let event = ChannelEvent::Interrupted {
                        topic: topic.clone(),
                        sub: entry.sub,
                        reason,
                    };
                    entry.conn.send(event.into());
                }
            }
            Action::Unsubscribe { node, topic, sub } => {
                if let Some(link) = self.link(&node) {
                    link.unsubscribe(&topic, sub);
                }
            }
            Action::Tell { conn, event } => {
                conn.send(event.into());
            }
            Action::RefusePublish { reply, reason } => reply.refuse(reason),
            Action::RefuseApi { api, reason } => api.refuse(reason),
            Action::Close(node) => {
                if let Some(link) = self.departed.remove(&node) {
                    link.stop();
                }
            }
        }
    }

    /// The link to `node`: in the routing table, or one of a node that is leaving.
    fn link(&self, node: &str) -> Option<Arc<Link>> {
        self.cluster
            .link(node)
            .or_else(|| self.departed.get(node).cloned())
    }
}

/// The next ring the watcher publishes; `None` once it has stopped.
async fn next_ring(rings: &mut Option<watch::Receiver<Arc<Ring>>>) -> Option<Arc<Ring>> {
    match rings {
        Some(rings) => match rings.changed().await {
            Ok(()) => Some(rings.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
