//! The gateway <-> topic-server contract over real gRPC, driven directly: ownership
//! (`WrongOwner`), acks, and coalesced delivery batches.

use bytes::Bytes;
use futures::StreamExt;
use ringcast_proto::{DownBatch, TopicServerClient, Up, UpBatch, batch, down};
use ringcast_ring::Ring;
use ringcast_tests::{Cluster, EVENT_TIMEOUT};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

struct Link {
    up: mpsc::Sender<UpBatch>,
    down: tonic::Streaming<DownBatch>,
}

async fn attach(addr: std::net::SocketAddr) -> Link {
    attach_as(addr, Up::hello("test-gateway".into(), 7, 1)).await
}

/// Opens a stream whose first message is `hello`.
async fn attach_as(addr: std::net::SocketAddr, hello: Up) -> Link {
    // The limits a gateway sets.
    let mut client = TopicServerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(batch::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(batch::MAX_MESSAGE_BYTES);
    let (up, rx) = mpsc::channel(16);
    up.send(UpBatch {
        ring_version: 1,
        items: vec![hello],
    })
    .await
    .unwrap();
    let down = client
        .attach(ReceiverStream::new(rx))
        .await
        .expect("attach")
        .into_inner();
    Link { up, down }
}

impl Link {
    async fn send(&self, items: Vec<Up>) {
        self.up
            .send(UpBatch {
                ring_version: 1,
                items,
            })
            .await
            .unwrap();
    }

    async fn next(&mut self) -> DownBatch {
        tokio::time::timeout(EVENT_TIMEOUT, self.down.next())
            .await
            .expect("timed out")
            .expect("stream ended")
            .expect("stream error")
    }
}

/// Two topics, one owned by each of the cluster's two topic servers.
fn topics_by_owner(cluster: &Cluster) -> (Ring, String, String) {
    let ring = Ring::from_toml(&std::fs::read_to_string(&cluster.ring_path).unwrap()).unwrap();
    let owned_by = |id: &str| {
        (0..)
            .map(|i| format!("grpc:{i}"))
            .find(|t| ring.owner(t).id == id)
            .unwrap()
    };
    let (a, b) = (owned_by("ts-a"), owned_by("ts-b"));
    (ring, a, b)
}

#[tokio::test]
async fn a_topic_server_refuses_topics_it_does_not_own() {
    let cluster = Cluster::start_with(ringcast_tests::ClusterSpec {
        gateways: 0,
        ..Default::default()
    })
    .await;
    let (_, mine, theirs) = topics_by_owner(&cluster);
    let mut link = attach(cluster.topic_servers[0].addr).await;
    link.send(vec![
        Up::subscribe(1, theirs.clone(), 10, None),
        Up::subscribe(2, mine.clone(), 11, None),
    ])
    .await;
    let mut items = Vec::new();
    while items.len() < 2 {
        items.extend(link.next().await.items);
    }
    match &items[0].kind {
        Some(down::Kind::WrongOwner(w)) => {
            assert_eq!(
                (w.request_id, w.topic.as_str(), w.ring_version),
                (1, theirs.as_str(), 1)
            );
        }
        other => panic!("expected WrongOwner, got {other:?}"),
    }
    match &items[1].kind {
        Some(down::Kind::Ack(ack)) => {
            assert_eq!(ack.request_id, 2);
            assert_eq!(ack.position.unwrap().offset, 0);
        }
        other => panic!("expected an ack, got {other:?}"),
    }
    let status = cluster.topic_servers[0].status().await;
    assert_eq!(status["wrong_owner"], 1);
    assert_eq!(status["subscriptions"], 1);
}

#[tokio::test]
async fn busy_streams_coalesce_deliveries_and_keep_one_order() {
    let cluster = Cluster::start_with(ringcast_tests::ClusterSpec {
        gateways: 0,
        ..Default::default()
    })
    .await;
    let (_, topic, _) = topics_by_owner(&cluster);
    let mut subscriber = attach(cluster.topic_servers[0].addr).await;
    // Many subscribers on one gateway stream: still one delivery per message.
    subscriber
        .send(
            (0..50)
                .map(|s| Up::subscribe(s + 1, topic.clone(), s, None))
                .collect(),
        )
        .await;
    let mut acked = 0;
    while acked < 50 {
        acked += subscriber.next().await.items.len();
    }
    let publisher = attach(cluster.topic_servers[0].addr).await;
    const MESSAGES: u64 = 2000;
    let publishes: Vec<Up> = (0..MESSAGES)
        .map(|n| {
            Up::publish(
                1000 + n,
                topic.clone(),
                "e".into(),
                Bytes::from(format!("{n}")),
            )
        })
        .collect();
    publisher.send(publishes).await;

    let (mut offsets, mut batches, mut largest) = (Vec::new(), 0, 0);
    while (offsets.len() as u64) < MESSAGES {
        let batch = subscriber.next().await;
        batches += 1;
        largest = largest.max(batch.items.len());
        for item in batch.items {
            match item.kind {
                Some(down::Kind::Delivery(d)) => {
                    assert_eq!(
                        d.payload,
                        Bytes::from(format!("{}", d.offset - 1)),
                        "payload matches its offset"
                    );
                    offsets.push(d.offset);
                }
                other => panic!("expected deliveries only, got {other:?}"),
            }
        }
    }
    assert_eq!(
        offsets,
        (1..=MESSAGES).collect::<Vec<_>>(),
        "one delivery per message, in order"
    );
    assert!(
        largest > 1,
        "a busy stream carries many deliveries per message ({batches} batches)"
    );
    let status = cluster.topic_servers[0].status().await;
    assert_eq!(
        status["deliveries"], MESSAGES,
        "one delivery per message for the one subscribed gateway"
    );
}

#[tokio::test]
async fn replays_queued_together_go_in_batches_that_fit_a_message() {
    let cluster = Cluster::start_with(ringcast_tests::ClusterSpec {
        gateways: 0,
        topic_server_env: vec![
            ("TOPIC_SERVER_LOG_BYTES".into(), (8 << 20).to_string()),
            ("TOPIC_SERVER_LOG_MESSAGES".into(), "1000".into()),
        ],
        ..Default::default()
    })
    .await;
    let (_, topic, _) = topics_by_owner(&cluster);
    // A full log: 140 messages of 56 KiB, 7.7 MiB.
    const MESSAGES: u64 = 140;
    let mut publisher = attach(cluster.topic_servers[0].addr).await;
    publisher
        .send(
            (0..MESSAGES)
                .map(|n| {
                    Up::publish(
                        n + 1,
                        topic.clone(),
                        "e".into(),
                        Bytes::from(vec![b'x'; 56 << 10]),
                    )
                })
                .collect(),
        )
        .await;
    let mut epoch = 0;
    let mut acked = 0;
    while acked < MESSAGES {
        for item in publisher.next().await.items {
            let Some(down::Kind::Ack(ack)) = item.kind else {
                panic!("expected an ack, got {:?}", item.kind);
            };
            epoch = ack.position.unwrap().epoch;
            acked += 1;
        }
    }
    // Three subscribers recover the whole log in one go: 23 MiB of replay queued at once on
    // one stream, more than one gRPC message may carry.
    let mut subscriber = attach(cluster.topic_servers[0].addr).await;
    let from = Some(ringcast_proto::Position { epoch, offset: 0 });
    subscriber
        .send(
            (1..=3)
                .map(|s| Up::subscribe(s, topic.clone(), s, from))
                .collect(),
        )
        .await;
    let (mut replayed, mut acks) = (0, 0);
    while acks < 3 {
        for item in subscriber.next().await.items {
            match item.kind {
                Some(down::Kind::Replay(_)) => replayed += 1,
                Some(down::Kind::Ack(ack)) => {
                    assert!(ack.recovered, "the whole log was there");
                    acks += 1;
                }
                other => panic!("expected replays and acks, got {other:?}"),
            }
        }
    }
    assert_eq!(replayed, 3 * MESSAGES);
}

#[tokio::test]
async fn a_hello_with_an_oversized_gateway_id_ends_the_stream_with_a_reason() {
    let cluster = Cluster::start_with(ringcast_tests::ClusterSpec {
        gateways: 0,
        ..Default::default()
    })
    .await;
    let addr = cluster.topic_servers[0].addr;
    let mut bad = attach_as(addr, Up::hello("g".repeat(129), 7, 1)).await;
    let ended = tokio::time::timeout(EVENT_TIMEOUT, bad.down.next())
        .await
        .expect("timed out");
    let status = ended.expect("a status, not a silent end").unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("gateway id"), "{status:?}");
    // The server serves others as before.
    let mut fine = attach(addr).await;
    fine.send(vec![Up::subscribe(1, "grpc:ok".into(), 1, None)])
        .await;
    let batch = fine.next().await;
    assert!(!batch.items.is_empty());
}
