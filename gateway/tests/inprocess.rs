//! A whole cluster in this test's process (three topic servers and two gateways, each the
//! library's `run` on a 127.0.0.1:0 listener), so ring edits under traffic can be repeated
//! with many timings quickly: two edits in a row at a different interval each round, a node
//! removed and given back, weights changed. Every round asserts what the real-process
//! rebalance tests assert: every subscriber got every message once, in the owner's order,
//! the numbering continued, nobody was interrupted.

use ringcast_ring::{Ring, RingSource};
use ringcast_tests::eventually;
use ringcast_tests::traffic::Traffic;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const TOPICS: usize = 8;
const ROUNDS: u64 = 40;

/// Three topic servers and two gateways sharing one ring file, stopped when dropped.
struct InProcessCluster {
    ring_path: PathBuf,
    nodes: Vec<(String, SocketAddr)>,
    /// Each topic server's admin address.
    node_admins: Vec<SocketAddr>,
    /// Each gateway's public and admin address.
    gateways: Vec<(SocketAddr, SocketAddr)>,
    stop: CancellationToken,
    tasks: TaskTracker,
    _dir: tempfile::TempDir,
}

fn ring_text(version: u64, nodes: &[(String, SocketAddr, u32)]) -> String {
    let mut text = format!("version = {version}\n");
    for (id, addr, weight) in nodes {
        text.push_str(&format!(
            "[[nodes]]\nid = \"{id}\"\naddr = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    text
}

fn write_ring(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl InProcessCluster {
    async fn start() -> InProcessCluster {
        let dir = tempfile::tempdir().unwrap();
        let ring_path = dir.path().join("ring.toml");
        let mut listeners = Vec::new();
        for id in ["ts-a", "ts-b", "ts-c"] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.push((id.to_owned(), listener));
        }
        let nodes: Vec<(String, SocketAddr)> = listeners
            .iter()
            .map(|(id, l)| (id.clone(), l.local_addr().unwrap()))
            .collect();
        let weighted: Vec<_> = nodes.iter().map(|(i, a)| (i.clone(), *a, 1)).collect();
        write_ring(&ring_path, &ring_text(1, &weighted));
        let source = RingSource::File(ring_path.clone());
        let ring = source.load().unwrap();
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let mut node_admins = Vec::new();
        for (id, listener) in listeners {
            let mut config = ringcast_topic_server::Config::new(id, ring.clone(), source.clone());
            config.log.messages = 10_000;
            let listeners = ringcast_topic_server::Listeners::with_loopback_admin(listener)
                .await
                .unwrap();
            node_admins.push(listeners.admin.local_addr().unwrap());
            tasks.spawn(ringcast_topic_server::run(
                listeners,
                config,
                stop.child_token(),
            ));
        }
        let mut gateways = Vec::new();
        for i in 0..2 {
            let listeners = ringcast_gateway::Listeners::loopback().await.unwrap();
            gateways.push((
                listeners.public.local_addr().unwrap(),
                listeners.admin.local_addr().unwrap(),
            ));
            let config = ringcast_gateway::Config::new(
                format!("gw-{i}"),
                Some((ring.clone(), source.clone())),
            );
            tasks.spawn(ringcast_gateway::run(listeners, config, stop.child_token()));
        }
        let cluster = InProcessCluster {
            ring_path,
            nodes,
            node_admins,
            gateways,
            stop,
            tasks,
            _dir: dir,
        };
        for (_, admin) in &cluster.gateways {
            eventually("links up", Duration::from_secs(10), || async {
                let status = get(*admin, "/status").await?;
                let links = status["links"].as_array()?;
                links.iter().all(|l| l["connected"] == true).then_some(())
            })
            .await;
        }
        cluster
    }

    fn urls(&self) -> Vec<String> {
        self.gateways
            .iter()
            .map(|(a, _)| format!("ws://{a}/socket/websocket?vsn=2.0.0"))
            .collect()
    }

    /// Writes ring `version` with these nodes (indexes into the three) and weights.
    fn edit(&self, version: u64, nodes: &[(usize, u32)]) -> Ring {
        let weighted: Vec<_> = nodes
            .iter()
            .map(|&(i, w)| (self.nodes[i].0.clone(), self.nodes[i].1, w))
            .collect();
        let text = ring_text(version, &weighted);
        write_ring(&self.ring_path, &text);
        Ring::from_toml(&text).unwrap()
    }

    /// Waits until every gateway is on `ring` with every topic at its owner and no move
    /// under way, and every topic server in the ring has read it.
    async fn settled(&self, ring: &Ring) {
        let version = ring.version();
        for ((id, _), admin) in self.nodes.iter().zip(&self.node_admins) {
            if ring.node(id).is_some() {
                eventually(
                    "topic server on the ring",
                    Duration::from_secs(20),
                    || async {
                        let status = get(*admin, "/status").await?;
                        (status["ring_version"] == version).then_some(())
                    },
                )
                .await;
            }
        }
        for (_, admin) in &self.gateways {
            eventually(
                "every topic at its owner",
                Duration::from_secs(20),
                || async {
                    let r = get(*admin, "/ring").await?;
                    let by_node = r["topics"].as_object()?;
                    let placed = by_node.iter().all(|(node, topics)| {
                        topics.as_array().is_some_and(|ts| {
                            ts.iter()
                                .all(|t| ring.owner(t.as_str().unwrap()).id == *node)
                        })
                    });
                    (r["version"] == version && r["moving"] == 0 && placed).then_some(())
                },
            )
            .await;
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(Duration::from_secs(20), self.tasks.wait())
            .await
            .expect("every process of the cluster stops");
    }
}

async fn get(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let url = format!("http://{addr}{path}");
    reqwest::get(url).await.ok()?.json().await.ok()
}

/// Lets `n` more messages be accepted.
async fn publish_a_while(traffic: &Traffic, n: usize) {
    let before = traffic.published();
    eventually("publishing goes on", Duration::from_secs(10), || async {
        (traffic.published() >= before + n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_edits_in_a_row_at_many_intervals_lose_and_repeat_nothing() {
    for round in 0..ROUNDS {
        let cluster = InProcessCluster::start().await;
        let topics = (0..TOPICS).map(|i| format!("round{round}:{i}")).collect();
        let traffic = Traffic::start_at(cluster.urls(), topics, 1, Duration::from_millis(3)).await;
        publish_a_while(&traffic, 50).await;
        // Two edits in a row, the second 0 to 250 ms after the first: c leaves, then c
        // comes back with another weight (or b's weight changes).
        let gap = Duration::from_millis(round * 37 % 251);
        cluster.edit(2, &[(0, 1), (1, 1)]);
        tokio::time::sleep(gap).await;
        let last = if round % 2 == 0 {
            cluster.edit(3, &[(0, 1), (1, 1), (2, 2)])
        } else {
            cluster.edit(3, &[(0, 1), (1, 3)])
        };
        cluster.settled(&last).await;
        publish_a_while(&traffic, 50).await;
        let mut moves = 0;
        for (_, admin) in &cluster.gateways {
            moves += get(*admin, "/status").await.unwrap()["moves"]
                .as_u64()
                .unwrap();
        }
        assert!(moves > 0, "round {round}: topics moved");
        let report = traffic.finish().await;
        assert_eq!(report.interruptions, 0, "round {round}: {report:?}");
        assert_eq!(
            report.joins,
            2 * TOPICS,
            "round {round}, no rejoin: {report:?}"
        );
        assert_eq!(
            report.max_epochs, 1,
            "round {round}, numbering continued: {report:?}"
        );
        assert!(report.checked > 100, "round {round}: {report:?}");
        cluster.stop().await;
    }
}
