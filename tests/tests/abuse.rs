//! One client must never hurt the others. Each test runs an attack from one client (or a few
//! sockets of one client) against a real cluster while a bystander on the same gateway and
//! topic servers goes on joining and receiving; it checks the attacker is refused or closed,
//! the bound holds (memory, open files, topics), and the bystander received every message
//! with no error.

use futures::{SinkExt, StreamExt};
use ringcast_tests::cluster::{env, status_sum};
use ringcast_tests::ws::Ended;
use ringcast_tests::{Cluster, ClusterSpec, EVENT_TIMEOUT, WsClient, eventually};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

fn spec(gateway_env: &[(&str, &str)], topic_server_env: &[(&str, &str)]) -> ClusterSpec {
    ClusterSpec {
        gateway_env: env(gateway_env),
        topic_server_env: env(topic_server_env),
        ..Default::default()
    }
}

/// A client that stays joined to `topics` and counts what it receives on each.
struct Bystander {
    client: WsClient,
    topics: Vec<String>,
}

impl Bystander {
    async fn join(url: &str, topics: &[String]) -> Bystander {
        let mut client = WsClient::connect(url).await;
        for (i, topic) in topics.iter().enumerate() {
            client.join_ok(topic, &(i + 1).to_string()).await;
        }
        Bystander {
            client,
            topics: topics.to_vec(),
        }
    }

    /// Publishes `n` messages to each of its topics through `publisher` and checks that
    /// every one arrives here, in order, with nothing else (no `phx_error`) in between.
    async fn receives_everything(&mut self, publisher: &mut WsClient, n: usize) {
        for (i, topic) in self.topics.iter().enumerate() {
            let join_ref = format!("p{i}");
            publisher.join_skipping(topic, &join_ref).await;
            for k in 0..n {
                publisher
                    .publish_reply(&join_ref, topic, "m", json!({"k": k}))
                    .await;
            }
        }
        // What arrives for each topic, in order, whatever the interleaving of topics.
        let mut next = vec![0usize; self.topics.len()];
        while next.iter().any(|&k| k < n) {
            let frame = self.client.recv_json().await;
            assert_ne!(
                frame[3], "phx_error",
                "the bystander was interrupted: {frame}"
            );
            let Some(i) = self.topics.iter().position(|t| frame[2] == *t) else {
                continue;
            };
            if frame[3] == "m" {
                assert_eq!(frame[0], (i + 1).to_string(), "{frame}");
                assert_eq!(frame[4]["k"], next[i], "in order, none missing: {frame}");
                next[i] += 1;
            }
        }
        assert!(
            !self.client.sync_or_closed().await,
            "the bystander is still connected"
        );
    }
}

type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw(url: &str) -> RawWs {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0
}

/// A websocket whose socket takes at most about 4 KB before the client reads: a client
/// that stops reading is felt by the server at once, not after megabytes of kernel buffers.
async fn raw_small_window(url: &str, gateway: std::net::SocketAddr) -> RawWs {
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp.connect(gateway).await.unwrap();
    let tcp = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    tokio_tungstenite::client_async(url, tcp)
        .await
        .expect("connect")
        .0
}

/// Reads until the connection ends: its close code, if one came.
async fn end_of(ws: &mut RawWs, within: Duration) -> Option<u16> {
    let read_to_end = async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    };
    tokio::time::timeout(within, read_to_end)
        .await
        .expect("the connection ends")
}

/// What one socket may make the gateway hold, by configuration: its outbound bound plus the
/// replays of the recovering joins it may have in flight at once (8), each at most a topic log.
fn per_socket_bound_kib(max_outbound: u64, log_bytes: u64) -> u64 {
    (max_outbound + 8 * log_bytes) / 1024
}

#[tokio::test]
async fn recovering_clients_that_never_read_are_closed_within_their_bound() {
    let (max_outbound, log_bytes) = (1u64 << 20, 1u64 << 20);
    let cluster = Cluster::start_with(spec(
        &[
            ("GATEWAY_WRITE_TIMEOUT_SECS", "2"),
            ("GATEWAY_MAX_OUTBOUND_BYTES", &max_outbound.to_string()),
            ("GATEWAY_CLIENT_RATE", "0"),
        ],
        &[("TOPIC_SERVER_LOG_BYTES", &log_bytes.to_string())],
    ))
    .await;
    let url = cluster.ws_url(0);
    // 30 topics with about 1 MB (100 messages of 10 KB) in their logs.
    let topics: Vec<String> = (0..30).map(|i| format!("big:{i}")).collect();
    let mut publisher = WsClient::connect(&url).await;
    let mut epochs = Vec::new();
    let body = "x".repeat(10_000);
    for (i, topic) in topics.iter().enumerate() {
        let join_ref = i.to_string();
        let reply = publisher.join_skipping(topic, &join_ref).await;
        epochs.push(reply["epoch"].as_str().unwrap().to_owned());
        for _ in 0..100 {
            publisher
                .publish_reply(&join_ref, topic, "m", json!(body))
                .await;
        }
    }
    let mut bystander = Bystander::join(&url, &["calm:1".into(), "calm:2".into()]).await;
    let gateway = &cluster.gateways[0];
    let before = gateway.peak_rss_kib();

    // 20 sockets join all 30 with `recover` from their start (600 MB asked for in all),
    // then never read.
    let mut attackers = Vec::new();
    for _ in 0..20 {
        let mut ws = raw_small_window(&url, gateway.addr).await;
        for (i, topic) in topics.iter().enumerate() {
            let recover = json!({"recover": {"epoch": epochs[i], "offset": 0}});
            let join = json!([i.to_string(), i.to_string(), topic, "phx_join", recover]);
            ws.send(Message::Text(join.to_string().into()))
                .await
                .unwrap();
        }
        attackers.push(ws);
    }
    // Every one of them is closed: the gateway stops holding anything for them.
    eventually(
        "the non-readers are closed",
        Duration::from_secs(20),
        || async {
            let closed = gateway.status().await["slow_consumers"]
                .as_u64()
                .unwrap_or(0);
            (closed >= 20).then_some(())
        },
    )
    .await;
    let peak = gateway.peak_rss_kib();
    let bound = 20 * per_socket_bound_kib(max_outbound, log_bytes);
    eprintln!(
        "gateway peak RSS {before} KiB before the attack, {peak} KiB at most during it; bound {bound} KiB"
    );
    assert!(
        peak - before <= bound,
        "gateway peak RSS grew {} KiB, past the configured bound {bound} KiB",
        peak - before
    );
    for mut ws in attackers {
        let code = end_of(&mut ws, Duration::from_secs(30)).await;
        assert!(code.is_none_or(|c| c == 1013), "closed with {code:?}");
    }
    let mut fresh = WsClient::connect(&url).await;
    bystander.receives_everything(&mut fresh, 20).await;
}

#[tokio::test]
async fn a_client_is_closed_once_more_is_queued_for_it_than_its_outbound_bound() {
    let cluster = Cluster::start_with(spec(
        &[("GATEWAY_MAX_OUTBOUND_BYTES", "1048576")],
        &[("TOPIC_SERVER_LOG_BYTES", "4194304")],
    ))
    .await;
    let url = cluster.ws_url(0);
    let mut publisher = WsClient::connect(&url).await;
    let reply = publisher.join_ok("log:1", "1").await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    let body = "y".repeat(30_000);
    for _ in 0..100 {
        publisher
            .publish_reply("1", "log:1", "m", json!(body))
            .await;
    }
    let mut bystander = Bystander::join(&url, &["calm:out".into()]).await;
    // Three recoveries of a 3 MB log at once: more than 1 MiB waits for the client.
    let mut attacker = raw_small_window(&url, cluster.gateways[0].addr).await;
    for i in 0..3 {
        let recover = json!({"recover": {"epoch": epoch, "offset": 0}});
        let join = json!([i.to_string(), i.to_string(), "log:1", "phx_join", recover]);
        attacker
            .send(Message::Text(join.to_string().into()))
            .await
            .unwrap();
    }
    let code = end_of(&mut attacker, Duration::from_secs(20)).await;
    assert!(code.is_none_or(|c| c == 1013), "closed with {code:?}");
    let status = cluster.gateways[0].status().await;
    assert!(status["slow_consumers"].as_u64() >= Some(1), "{status}");
    bystander.receives_everything(&mut publisher, 10).await;
}

#[tokio::test]
async fn a_storm_of_recovering_rejoins_is_refused_and_spares_the_shared_stream() {
    let cluster = Cluster::start().await;
    let url = cluster.ws_url(0);
    let mut attacker = raw(&url).await;
    let join = json!(["1", "1", "room:flood", "phx_join", {}]);
    attacker
        .send(Message::Text(join.to_string().into()))
        .await
        .unwrap();
    let reply: Value = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match attacker.next().await {
                Some(Ok(Message::Text(t))) => break serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("the join reply never came: {other:?}"),
            }
        }
    })
    .await
    .expect("the join reply within EVENT_TIMEOUT");
    let epoch = reply[4]["response"]["epoch"].as_str().unwrap().to_owned();
    for k in 0..100 {
        let publish = json!(["1", format!("p{k}"), "room:flood", "publish", ["m", k]]);
        attacker
            .send(Message::Text(publish.to_string().into()))
            .await
            .unwrap();
    }
    // A bystander on the same gateway, on 40 other topics (on both topic servers).
    let calm: Vec<String> = (0..40).map(|i| format!("calm:{i}")).collect();
    let mut bystander = Bystander::join(&url, &calm).await;
    let overflowed = status_sum(&cluster.topic_servers, "links_overflowed").await;

    // 20,000 rejoins asking for the whole log, as fast as the socket takes them.
    let recover = json!({"recover": {"epoch": epoch, "offset": 0}});
    for k in 0..20_000 {
        let rejoin = json!([
            format!("j{k}"),
            format!("j{k}"),
            "room:flood",
            "phx_join",
            recover
        ]);
        if attacker
            .send(Message::Text(rejoin.to_string().into()))
            .await
            .is_err()
        {
            break; // closed already
        }
    }
    assert_eq!(
        end_of(&mut attacker, Duration::from_secs(20)).await,
        Some(1008)
    );
    let gateway = cluster.gateways[0].status().await;
    assert!(gateway["rate_limited"].as_u64() > Some(0), "{gateway}");
    assert_eq!(
        status_sum(&cluster.topic_servers, "links_overflowed").await,
        overflowed,
        "no shared stream was cut"
    );
    let mut publisher = WsClient::connect(&cluster.ws_url(1)).await;
    bystander.receives_everything(&mut publisher, 3).await;
}

#[tokio::test]
async fn a_publish_flood_is_rate_limited_then_closed() {
    let cluster = Cluster::start_with(spec(
        &[
            ("GATEWAY_CLIENT_RATE", "100"),
            ("GATEWAY_CLIENT_BURST", "100"),
        ],
        &[],
    ))
    .await;
    let url = cluster.ws_url(0);
    let mut bystander = Bystander::join(&url, &["shared:1".into()]).await;
    let mut attacker = raw(&url).await;
    let join = json!(["1", "1", "shared:1", "phx_join", {}]);
    attacker
        .send(Message::Text(join.to_string().into()))
        .await
        .unwrap();
    for k in 0..5_000 {
        let publish = json!(["1", format!("p{k}"), "shared:1", "publish", ["spam", k]]);
        if attacker
            .send(Message::Text(publish.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut rate_limited = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(20), attacker.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("rate limited") => {
                rate_limited += 1
            }
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("the flooder is closed with a code, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1008));
    assert!(rate_limited > 0, "refused with a reason first");
    // The bystander got at most the flooder's burst (and what its rate allowed), and
    // everything from a well-behaved publisher after it.
    let spam = bystander.client.sync().await;
    let spam = spam.iter().filter(|f| f[3] == "spam").count();
    assert!(spam <= 150, "{spam} spam messages got through");
    let mut publisher = WsClient::connect(&cluster.ws_url(1)).await;
    bystander.receives_everything(&mut publisher, 20).await;
}

#[tokio::test]
async fn topics_past_a_topic_servers_limit_are_refused_and_others_untouched() {
    let cluster = Cluster::start_with(spec(
        &[("GATEWAY_JOIN_RATE", "0")],
        &[("TOPIC_SERVER_MAX_TOPICS", "40")],
    ))
    .await;
    let url = cluster.ws_url(0);
    let calm: Vec<String> = (0..4).map(|i| format!("calm:{i}")).collect();
    let mut bystander = Bystander::join(&url, &calm).await;
    // One client creates topics as fast as it may: 300 over three sockets, kept open.
    let (mut ok, mut refused) = (0, 0);
    let mut sockets = Vec::new();
    for s in 0..3 {
        let mut client = WsClient::connect(&url).await;
        for i in 0..100 {
            let topic = format!("spawn:{s}:{i}");
            let reply = client.join(&topic, &i.to_string(), json!({})).await;
            match reply["status"].as_str() {
                Some("ok") => ok += 1,
                _ => {
                    assert_eq!(reply["response"]["reason"], "too many topics", "{reply}");
                    refused += 1;
                }
            }
        }
        sockets.push(client);
    }
    assert!(refused > 200, "{ok} created, {refused} refused");
    for ts in &cluster.topic_servers {
        let status = ts.status().await;
        assert!(status["topics"].as_u64() <= Some(40), "{status}");
    }
    assert_eq!(
        status_sum(&cluster.topic_servers, "topics_refused").await,
        refused
    );
    let mut publisher = WsClient::connect(&cluster.ws_url(1)).await;
    bystander.receives_everything(&mut publisher, 5).await;
}

#[tokio::test]
async fn half_open_http_connections_are_bounded_and_timed_out() {
    let _ = rlimit::increase_nofile_limit(8192);
    let cluster = Cluster::start_with(spec(
        &[
            ("GATEWAY_MAX_PENDING_HTTP", "50"),
            ("GATEWAY_HTTP_TIMEOUT_SECS", "1"),
        ],
        &[],
    ))
    .await;
    let url = cluster.ws_url(0);
    let gateway = &cluster.gateways[0];
    let mut bystander = Bystander::join(&url, &["calm:http".into()]).await;
    let files_before = gateway.open_files();
    // 1,000 connections that send half a request and then nothing.
    let mut idle = Vec::new();
    for _ in 0..1_000 {
        let mut tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        let _ = tcp
            .write_all(b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\n")
            .await;
        idle.push(tcp);
    }
    let files_during = gateway.open_files();
    assert!(
        files_during <= files_before + 60,
        "open files {files_before} -> {files_during}"
    );
    eventually(
        "the half-open ones time out",
        Duration::from_secs(10),
        || async { (gateway.open_files() <= files_before + 2).then_some(()) },
    )
    .await;
    eventually("every one counted", Duration::from_secs(10), || async {
        let refused = gateway.status().await["refused_connections"].as_u64()?;
        (refused >= 1000).then_some(())
    })
    .await;
    // New clients get in again, and the bystander lost nothing.
    let mut publisher = WsClient::connect(&url).await;
    bystander.receives_everything(&mut publisher, 10).await;
    drop(idle);
}

#[tokio::test]
async fn connections_per_address_are_bounded_when_asked() {
    let cluster = Cluster::start_with(spec(&[("GATEWAY_MAX_CONNECTIONS_PER_IP", "3")], &[])).await;
    let url = cluster.ws_url(0);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(WsClient::connect(&url).await);
    }
    assert!(
        tokio_tungstenite::connect_async(&url).await.is_err(),
        "a fourth connection from 127.0.0.1 is refused"
    );
    // From another address, and from this one once a connection closed: accepted.
    let from = tokio::net::TcpSocket::new_v4().unwrap();
    from.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = from.connect(cluster.gateways[0].addr).await.unwrap();
    tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .expect("another address");
    held.pop();
    eventually("a slot frees", Duration::from_secs(10), || async {
        tokio_tungstenite::connect_async(&url)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn admin_views_are_not_on_the_public_port() {
    let cluster = Cluster::start().await;
    for gw in &cluster.gateways {
        for path in ["/status", "/ring"] {
            let public = reqwest::get(format!("http://{}{path}", gw.addr))
                .await
                .unwrap();
            assert_eq!(public.status(), 404, "{path} on the public port");
            let admin = reqwest::get(gw.http(path)).await.unwrap();
            assert_eq!(admin.status(), 200, "{path} on the admin port");
        }
        let health = reqwest::get(format!("http://{}/health", gw.addr))
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
    }
    for ts in &cluster.topic_servers {
        let admin = reqwest::get(ts.http("/status")).await.unwrap();
        assert_eq!(admin.status(), 200);
    }
}

#[tokio::test]
async fn an_oversized_frame_is_always_answered_with_1009() {
    let cluster = Cluster::start().await;
    let url = cluster.ws_url(0);
    let big = "x".repeat(2 << 20);
    for _ in 0..20 {
        let mut client = WsClient::connect(&url).await;
        client.send_text(big.clone()).await;
        assert_eq!(
            client.recv_end().await,
            Ended::Closed(Some((1009, "message too big".into())))
        );
    }
}

#[tokio::test]
async fn names_and_in_flight_work_are_bounded_with_a_reason() {
    let cluster = Cluster::start_with(spec(&[("GATEWAY_MAX_TOPIC_BYTES", "32")], &[])).await;
    let mut client = WsClient::connect(&cluster.ws_url(0)).await;
    let long_topic = "t".repeat(33);
    let reply = client.join(&long_topic, "1", json!({})).await;
    assert_eq!(
        reply["response"]["reason"], "topic name too long",
        "{reply}"
    );
    client.join_ok("ok:1", "2").await;
    let event = "e".repeat(129);
    client
        .send_json(json!(["2", "3", "ok:1", "publish", [event, 1]]))
        .await;
    let (_, reply) = client.reply_to("3", "error").await;
    assert_eq!(reply[4]["response"]["reason"], "event name too long");
}
