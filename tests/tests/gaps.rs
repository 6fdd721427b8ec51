//! Gap detection at the gateway: a real gateway process attached over real gRPC to a
//! scripted topic server (this test), which sends deliveries with an offset jump and with
//! a new epoch. The gateway must error the affected channels, never deliver past a gap.

use futures::StreamExt;
use ringcast_proto::{
    Delivery, Down, DownBatch, TakeReply, TakeRequest, TopicServer, TopicServerServer, Up, UpBatch,
    up,
};
use ringcast_tests::cluster::{Proc, free_port, ws_url};
use ringcast_tests::{EVENT_TIMEOUT, WsClient};
use serde_json::json;
use std::net::SocketAddr;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// A topic server whose every answer the test writes by hand.
struct Scripted {
    /// Requests from the gateway, as they arrive.
    ups: mpsc::UnboundedSender<Up>,
    /// Where the test's answers go: the gateway's current stream.
    downs: mpsc::UnboundedSender<mpsc::Sender<Result<DownBatch, Status>>>,
}

#[tonic::async_trait]
impl TopicServer for Scripted {
    type AttachStream = ReceiverStream<Result<DownBatch, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<UpBatch>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let ups = self.ups.clone();
        tokio::spawn(async move {
            while let Some(Ok(batch)) = inbound.next().await {
                for item in batch.items {
                    let _ = ups.send(item);
                }
            }
        });
        let (tx, rx) = mpsc::channel(64);
        let _ = self.downs.send(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn take(&self, _: Request<TakeRequest>) -> Result<Response<TakeReply>, Status> {
        Err(Status::unimplemented(
            "a single scripted node hands nothing over",
        ))
    }
}

struct Script {
    ups: mpsc::UnboundedReceiver<Up>,
    down: mpsc::Sender<Result<DownBatch, Status>>,
}

impl Script {
    async fn next_up(&mut self) -> up::Kind {
        loop {
            let up = tokio::time::timeout(EVENT_TIMEOUT, self.ups.recv())
                .await
                .expect("timed out waiting for the gateway")
                .expect("scripted server gone");
            match up.kind.expect("request kind") {
                up::Kind::Hello(_) => continue,
                kind => return kind,
            }
        }
    }

    async fn send(&self, item: Down) {
        let batch = DownBatch {
            ring_version: 1,
            items: vec![item],
        };
        self.down
            .send(Ok(batch))
            .await
            .expect("gateway stream open");
    }

    /// Accepts the next subscription at (epoch, offset); returns its subscriber id.
    async fn accept_subscribe(&mut self, epoch: u64, offset: u64) -> u64 {
        let up::Kind::Subscribe(sub) = self.next_up().await else {
            panic!("expected a subscribe");
        };
        self.send(Down::ack(sub.request_id, epoch, offset)).await;
        sub.subscriber
    }

    async fn deliver(&self, topic: &str, epoch: u64, offset: u64, n: u64) {
        self.send(Down::delivery(Delivery {
            topic: topic.into(),
            event: "m".into(),
            payload: n.to_string().into(),
            epoch,
            offset,
            accepted_unix_micros: 0,
        }))
        .await;
    }
}

/// The scripted topic server plus a gateway whose ring is that one node.
async fn start() -> (Script, Proc) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (ups_tx, ups) = mpsc::unbounded_channel();
    let (downs_tx, mut downs) = mpsc::unbounded_channel();
    let service = TopicServerServer::new(Scripted {
        ups: ups_tx,
        downs: downs_tx,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let gw_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gateway = Proc::spawn(
        "gw-gaps",
        "gateway",
        gw_addr,
        &[
            ("GATEWAY_LISTEN", gw_addr.to_string()),
            ("RING_NODES", format!("scripted={addr}")),
        ],
    );
    let down = tokio::time::timeout(EVENT_TIMEOUT, downs.recv())
        .await
        .expect("the gateway attaches")
        .unwrap();
    gateway
        .wait_status("link up", |s| s["links"][0]["connected"] == true)
        .await;
    (Script { ups, down }, gateway)
}

#[tokio::test]
async fn an_offset_jump_errors_the_channels_instead_of_delivering_past_it() {
    let (mut script, gateway) = start().await;
    let mut a = WsClient::connect(&ws_url(gateway.addr)).await;
    let mut b = WsClient::connect(&ws_url(gateway.addr)).await;
    let mut other = WsClient::connect(&ws_url(gateway.addr)).await;
    let (join_a, join_b) = (
        a.join("room:g", "1", json!({})),
        b.join("room:g", "4", json!({})),
    );
    let (reply_a, sub_a) = tokio::join!(join_a, script.accept_subscribe(7, 10));
    assert_eq!(
        reply_a["response"],
        json!({"epoch": "0000000000000007", "offset": 10})
    );
    let (_, sub_b) = tokio::join!(join_b, script.accept_subscribe(7, 10));
    let (_, _) = tokio::join!(
        other.join("room:other", "1", json!({})),
        script.accept_subscribe(3, 0)
    );

    script.deliver("room:g", 7, 11, 11).await;
    assert_eq!(a.recv_json().await, json!(["1", null, "room:g", "m", 11]));
    assert_eq!(b.recv_json().await, json!(["4", null, "room:g", "m", 11]));

    // Offset 12 never came: 13 is not delivered; both channels of the topic error.
    script.deliver("room:g", 7, 13, 13).await;
    assert_eq!(
        a.recv_json().await,
        json!(["1", "1", "room:g", "phx_error", {"reason": "gap detected"}])
    );
    assert_eq!(
        b.recv_json().await,
        json!(["4", "4", "room:g", "phx_error", {"reason": "gap detected"}])
    );
    // ... and the gateway drops their subscriptions at the owner.
    let mut dropped = Vec::new();
    for _ in 0..2 {
        match script.next_up().await {
            up::Kind::Unsubscribe(u) => dropped.push((u.topic, u.subscriber)),
            other => panic!("expected unsubscribes, got {other:?}"),
        }
    }
    dropped.sort();
    let mut expected = vec![("room:g".to_owned(), sub_a), ("room:g".to_owned(), sub_b)];
    expected.sort();
    assert_eq!(dropped, expected);

    // Other topics are untouched.
    script.deliver("room:other", 3, 1, 1).await;
    assert_eq!(
        other.recv_json().await,
        json!(["1", null, "room:other", "m", 1])
    );
    assert!(a.sync().await.is_empty() && b.sync().await.is_empty());
    let status = gateway.status().await;
    assert_eq!(
        (
            status["gaps"].clone(),
            status["interrupted_channels"].clone()
        ),
        (json!(1), json!(2))
    );
}

#[tokio::test]
async fn a_new_epoch_on_the_stream_is_a_gap() {
    let (mut script, gateway) = start().await;
    let mut a = WsClient::connect(&ws_url(gateway.addr)).await;
    let (_, _) = tokio::join!(
        a.join("room:e", "1", json!({})),
        script.accept_subscribe(7, 4)
    );
    script.deliver("room:e", 8, 5, 5).await;
    assert_eq!(
        a.recv_json().await,
        json!(["1", "1", "room:e", "phx_error", {"reason": "gap detected"}])
    );
}
