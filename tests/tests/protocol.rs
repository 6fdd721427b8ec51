//! Phoenix protocol behaviour of a gateway in a real 2 + 2 cluster: control events, errors,
//! malformed input, payload shapes, serializers and limits.

use ringcast_tests::cluster::{ClusterSpec, start_embedded_gateway};
use ringcast_tests::ws::Ended;
use ringcast_tests::{Cluster, WsClient};
use serde_json::json;

#[tokio::test]
async fn duplicate_join_replies_then_closes_the_old_join() {
    let cluster = Cluster::start().await;
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    c.join_ok("room:dup", "1").await;
    c.send_text(r#"["7","7","room:dup","phx_join",{}]"#).await;
    let reply = c.recv_json().await;
    assert_eq!(
        (reply[0].clone(), reply[1].clone(), reply[3].clone()),
        (json!("7"), json!("7"), json!("phx_reply"))
    );
    assert_eq!(reply[4]["status"], "ok");
    assert_eq!(
        c.recv_text().await,
        r#"["1","1","room:dup","phx_close",{}]"#
    );
    // Exactly one subscription remains: one delivery, carrying the new join_ref.
    let frames = c.publish("7", "room:dup", "e", json!({})).await;
    assert!(frames.is_empty());
    assert_eq!(c.recv_text().await, r#"["7",null,"room:dup","e",{}]"#);
    assert!(
        c.sync().await.is_empty(),
        "no second copy for the replaced join"
    );
    cluster.gateways[0]
        .wait_status("one local subscription", |s| s["subscriptions"] == 1)
        .await;
}

#[tokio::test]
async fn messages_on_unjoined_topics_get_unmatched_topic() {
    let cluster = Cluster::start().await;
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    c.send_text(r#"["1","2","room:nope","publish",["e",{}]]"#)
        .await;
    assert_eq!(
        c.recv_text().await,
        r#"[null,"2","room:nope","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
    );
    c.send_text(r#"["1","3","room:nope","phx_leave",{}]"#).await;
    assert_eq!(
        c.recv_text().await,
        r#"[null,"3","room:nope","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
    );
    c.send_text(r#"[null,"4","phoenix","phx_join",{}]"#).await;
    assert_eq!(
        c.recv_text().await,
        r#"[null,"4","phoenix","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
    );
}

#[tokio::test]
async fn custom_events_broadcast_under_their_own_name() {
    let cluster = Cluster::start().await;
    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    let mut b = WsClient::connect(&cluster.ws_url(1)).await;
    let epoch = a.join_ok("room:chat", "1").await["epoch"].clone();
    b.join_ok("room:chat", "2").await;
    a.send_text(r#"["1","5","room:chat","new_msg",{"body":"hi"}]"#)
        .await;
    assert_eq!(
        a.recv_text().await,
        format!(
            r#"["1","5","room:chat","phx_reply",{{"status":"ok","response":{{"epoch":{epoch},"offset":1}}}}]"#
        )
    );
    assert_eq!(
        a.recv_text().await,
        r#"["1",null,"room:chat","new_msg",{"body":"hi"}]"#
    );
    assert_eq!(
        b.recv_text().await,
        r#"["2",null,"room:chat","new_msg",{"body":"hi"}]"#
    );

    // Control events are not broadcast; a publish must carry [event, payload].
    for (frame, reason) in [
        (
            r#"["1","6","room:chat","phx_reply",{}]"#,
            "unsupported event",
        ),
        (
            r#"["1","7","room:chat","publish",{"not":"an array"}]"#,
            "publish payload must be [event, payload]",
        ),
        (
            r#"["1","8","room:chat","publish",["only-event"]]"#,
            "publish payload must be [event, payload]",
        ),
        (
            r#"["1","9","room:chat","publish",[1,{}]]"#,
            "publish payload must be [event, payload]",
        ),
        // Wrapped in a publish, a control event would close or error every subscriber's
        // channel; a `chan_reply_<ref>` event would resolve their pending pushes.
        (
            r#"["1","10","room:chat","publish",["phx_close",{}]]"#,
            "unsupported event",
        ),
        (
            r#"["1","11","room:chat","publish",["phx_error",{}]]"#,
            "unsupported event",
        ),
        (
            r#"["1","12","room:chat","publish",["chan_reply_3",{"status":"ok"}]]"#,
            "unsupported event",
        ),
        (
            r#"["1","13","room:chat","chan_reply_3",{"status":"ok"}]"#,
            "unsupported event",
        ),
    ] {
        a.send_text(frame).await;
        let reply = a.recv_json().await;
        assert_eq!(
            reply[4],
            json!({"status":"error","response":{"reason":reason}}),
            "{frame}"
        );
    }
    assert!(b.sync().await.is_empty(), "rejected pushes reach nobody");
}

#[tokio::test]
async fn any_json_payload_is_delivered_as_is() {
    let cluster = Cluster::start().await;
    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    let mut b = WsClient::connect(&cluster.ws_url(1)).await;
    a.join_ok("room:shapes", "1").await;
    b.join_ok("room:shapes", "1").await;
    let payloads = [
        r#""a string""#,
        r#"[1,"two",{"three":3}]"#,
        "42",
        "-0.5e10",
        "null",
        "true",
        r#"{"nested":{"deep":[{"x":"\"quoted\" \\ and \u00e9"}]}}"#,
        r#"{"z":1,"a":2}"#,
    ];
    for (i, payload) in payloads.iter().enumerate() {
        a.send_text(format!(
            r#"["1","p{i}","room:shapes","publish",["shape",{payload}]]"#
        ))
        .await;
    }
    for payload in payloads {
        let expected = format!(r#"["1",null,"room:shapes","shape",{payload}]"#);
        assert_eq!(b.recv_text().await, expected);
    }
    // The publisher gets every reply and every delivery, nothing is broken.
    let frames = a.recv_n(payloads.len() * 2).await;
    assert_eq!(
        frames.iter().filter(|f| f[3] == "shape").count(),
        payloads.len()
    );
}

#[tokio::test]
async fn malformed_frames_get_an_answer_and_the_socket_stays_up() {
    let cluster = Cluster::start().await;
    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    let mut b = WsClient::connect(&cluster.ws_url(1)).await;
    a.join_ok("room:bad", "1").await;
    b.join_ok("room:bad", "1").await;
    let with_ref = [
        r#"["1","m1","room:bad","publish"]"#,
        r#"["1","m2",7,"publish",{}]"#,
        r#"["1","m3","room:bad",null,{}]"#,
    ];
    for frame in with_ref {
        a.send_text(frame).await;
        let reply = a.recv_json().await;
        assert_eq!(reply[3], "phx_reply", "{frame}");
        assert_eq!(
            reply[4],
            json!({"status":"error","response":{"reason":"malformed frame"}}),
            "{frame}"
        );
    }
    for frame in ["not json", "{\"topic\":\"room:bad\"}", "[]", "[\"1\"", ""] {
        a.send_text(frame).await;
    }
    // Dropped silently (no ref to answer); the socket and its channel still work.
    assert!(a.sync().await.is_empty());
    a.publish("1", "room:bad", "still", json!({"ok": true}))
        .await;
    assert_eq!(
        b.recv_text().await,
        r#"["1",null,"room:bad","still",{"ok":true}]"#
    );
    let status = cluster.gateways[0].status().await;
    assert_eq!(status["malformed_frames"], 8, "{status}");
}

#[tokio::test]
async fn a_flood_of_malformed_frames_closes_with_1008() {
    let cluster = Cluster::start().await;
    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    for _ in 0..150 {
        a.send_text("garbage").await;
    }
    assert_eq!(
        a.recv_end().await,
        Ended::Closed(Some((1008, "too many refused frames".into())))
    );
}

#[tokio::test]
async fn oversized_frames_close_with_1009_and_spare_others() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateway_env: vec![("GATEWAY_MAX_FRAME_BYTES".into(), "4096".into())],
        ..Default::default()
    })
    .await;
    let mut big = WsClient::connect(&cluster.ws_url(0)).await;
    let mut other = WsClient::connect(&cluster.ws_url(0)).await;
    big.join_ok("room:big", "1").await;
    other.join_ok("room:big", "1").await;
    let payload = "x".repeat(10_000);
    big.send_text(format!(
        r#"["1","2","room:big","publish",["e","{payload}"]]"#
    ))
    .await;
    assert_eq!(
        big.recv_end().await,
        Ended::Closed(Some((1009, "message too big".into())))
    );
    assert!(other.sync().await.is_empty());
    other.publish("1", "room:big", "e", json!("small")).await;
    assert_eq!(
        other.recv_text().await,
        r#"["1",null,"room:big","e","small"]"#
    );
}

#[tokio::test]
async fn broken_websocket_frames_close_with_a_code_and_spare_others() {
    let cluster = Cluster::start().await;
    let mut other = WsClient::connect(&cluster.ws_url(0)).await;
    other.join_ok("room:broken", "1").await;
    for (data, rsv1, code, reason) in [
        (
            &b"[\"1\",\"2\",\"room:broken\",\"e\",\"\xff\xfe\"]"[..],
            false,
            1007,
            "invalid utf-8",
        ),
        (&b"[]"[..], true, 1002, "protocol error"),
    ] {
        let mut bad = WsClient::connect(&cluster.ws_url(0)).await;
        bad.join_ok("room:broken", "1").await;
        bad.send_raw_text(data, rsv1).await;
        assert_eq!(
            bad.recv_end().await,
            Ended::Closed(Some((code, reason.into())))
        );
    }
    assert!(other.sync().await.is_empty());
    other
        .publish("1", "room:broken", "e", json!("still here"))
        .await;
    assert_eq!(
        other.recv_text().await,
        r#"["1",null,"room:broken","e","still here"]"#
    );
}

#[tokio::test]
async fn v1_object_frames() {
    let cluster = Cluster::start().await;
    let v1 = format!("ws://{}/socket/websocket", cluster.gateways[0].addr);
    let mut a = WsClient::connect(&v1).await;
    let mut b = WsClient::connect(&cluster.ws_url(1)).await;
    a.send_text(r#"{"topic":"room:v1","event":"phx_join","payload":{},"ref":"1"}"#)
        .await;
    let reply = a.recv_json().await;
    assert_eq!(reply["event"], "phx_reply");
    assert_eq!(reply["ref"], "1");
    assert_eq!(reply["payload"]["status"], "ok");
    assert_eq!(reply["payload"]["response"]["offset"], 0);
    b.join_ok("room:v1", "1").await;
    b.publish("1", "room:v1", "e", json!({"v": 1})).await;
    assert_eq!(
        a.recv_text().await,
        r#"{"topic":"room:v1","event":"e","payload":{"v":1},"ref":null}"#
    );
    a.send_text(r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"2"}"#)
        .await;
    assert_eq!(
        a.recv_text().await,
        r#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"2"}"#
    );
    a.send_text(r#"{"topic":"room:v1","event":"phx_leave","payload":{},"ref":"3"}"#)
        .await;
    assert_eq!(a.recv_json().await["payload"]["status"], "ok");
    assert_eq!(
        a.recv_text().await,
        r#"{"topic":"room:v1","event":"phx_close","payload":{},"ref":"1"}"#
    );
}

#[tokio::test]
async fn unknown_serializer_versions_get_403() {
    let gw = start_embedded_gateway(&[]).await;
    let response = reqwest::Client::new()
        .get(format!("http://{}/socket/websocket?vsn=3.0.0", gw.addr))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(response.text().await.unwrap().contains("3.0.0"));
}

#[tokio::test]
async fn a_request_without_upgrade_gets_426() {
    let gw = start_embedded_gateway(&[]).await;
    let response = reqwest::get(format!("http://{}/socket/websocket?vsn=2.0.0", gw.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 426);
    assert!(response.text().await.unwrap().contains("upgrade"));
}

/// The gateway writes deliveries itself and leaves pongs to tungstenite: every ping is
/// answered, with its data, and no frame is cut by one.
#[tokio::test]
async fn pings_are_answered_between_deliveries() {
    use tokio_tungstenite::tungstenite::Message;
    let gw = start_embedded_gateway(&[]).await;
    let url = ringcast_tests::cluster::ws_url(gw.addr);
    let (mut a, mut b) = (WsClient::connect(&url).await, WsClient::connect(&url).await);
    a.join_ok("room:ping", "1").await;
    b.join_ok("room:ping", "1").await;
    const MESSAGES: usize = 300;
    for n in 0..MESSAGES {
        b.send_text(format!(r#"["1","{n}","room:ping","e",{{"n":{n}}}]"#))
            .await;
    }
    let (mut next, mut pings, mut pongs) = (0, 0, 0);
    while next < MESSAGES || pongs < pings {
        if next % 25 == 0 && pings * 25 <= next && next < MESSAGES {
            a.send_ping(b"are you there").await;
            pings += 1;
        }
        match a.recv_message().await {
            Message::Text(text) => {
                assert_eq!(
                    text.as_str(),
                    format!(r#"["1",null,"room:ping","e",{{"n":{next}}}]"#)
                );
                next += 1;
            }
            Message::Pong(data) => {
                assert_eq!(&data[..], b"are you there");
                pongs += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((next, pongs), (MESSAGES, pings));
    assert!(pings >= 10, "{pings} pings");
}

#[tokio::test]
async fn the_phoenix_subprotocol_is_selected() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let gw = start_embedded_gateway(&[]).await;
    let mut request = ringcast_tests::cluster::ws_url(gw.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "phoenix, base64url.bearer.phx.dG9rZW4".parse().unwrap(),
    );
    let (_ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("handshake");
    assert_eq!(response.headers()["sec-websocket-protocol"], "phoenix");
}

#[tokio::test]
async fn channel_limit_and_topic_patterns() {
    let gw = start_embedded_gateway(&[
        ("GATEWAY_MAX_CHANNELS", "2".into()),
        ("GATEWAY_TOPICS", "room:*,lobby".into()),
    ])
    .await;
    let mut c = WsClient::connect(&ringcast_tests::cluster::ws_url(gw.addr)).await;
    c.join_ok("lobby", "1").await;
    let denied = c.join("user:1", "2", json!({})).await;
    assert_eq!(
        denied,
        json!({"status":"error","response":{"reason":"unmatched topic"}})
    );
    c.join_ok("room:1", "3").await;
    let too_many = c.join("room:2", "4", json!({})).await;
    assert_eq!(
        too_many,
        json!({"status":"error","response":{"reason":"too many channels joined"}})
    );
    // Rejoining a joined topic is not a new channel.
    c.join_ok("room:1", "5").await;
}

#[tokio::test]
async fn embedded_single_node_serves_join_and_publish() {
    let gw = start_embedded_gateway(&[]).await;
    let url = ringcast_tests::cluster::ws_url(gw.addr);
    let mut a = WsClient::connect(&url).await;
    let mut b = WsClient::connect(&url).await;
    a.join_ok("room:solo", "1").await;
    b.join_ok("room:solo", "1").await;
    a.publish("1", "room:solo", "hello", json!({"n": 1})).await;
    assert_eq!(
        b.recv_text().await,
        r#"["1",null,"room:solo","hello",{"n":1}]"#
    );
    assert_eq!(gw.status().await["mode"], "embedded");
}

#[tokio::test]
async fn invalid_recover_positions_are_refused() {
    let gw = start_embedded_gateway(&[]).await;
    let mut c = WsClient::connect(&ringcast_tests::cluster::ws_url(gw.addr)).await;
    let reply = c
        .join(
            "room:r",
            "1",
            json!({"recover": {"epoch": 12, "offset": "x"}}),
        )
        .await;
    assert_eq!(
        reply,
        json!({"status":"error","response":{"reason":"invalid recover position"}})
    );

    // A failed rejoin of a joined topic closes the earlier join all the same.
    c.join_ok("room:r", "2").await;
    c.send_text(r#"["3","4","room:r","phx_join",{"recover":{"epoch":1,"offset":-1}}]"#)
        .await;
    assert_eq!(
        c.recv_text().await,
        r#"["3","4","room:r","phx_reply",{"status":"error","response":{"reason":"invalid recover position"}}]"#
    );
    assert_eq!(c.recv_text().await, r#"["2","2","room:r","phx_close",{}]"#);
    let mut other = WsClient::connect(&ringcast_tests::cluster::ws_url(gw.addr)).await;
    other.join_ok("room:r", "1").await;
    other.publish("1", "room:r", "e", json!(1)).await;
    assert!(c.sync().await.is_empty(), "the closed join gets nothing");
}

/// As in Phoenix, which answers a join before it reads the next frame: a push sent right
/// behind a join, before its reply, is taken.
#[tokio::test]
async fn a_push_right_behind_a_join_is_taken() {
    let cluster = Cluster::start().await;
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    c.send_text(r#"["1","1","room:eager","phx_join",{}]"#).await;
    c.send_text(r#"["1","2","room:eager","publish",["e",{"n":1}]]"#)
        .await;
    let frames = c.recv_n(3).await;
    assert_eq!(frames[0][1], "1", "the join reply first: {frames:?}");
    assert_eq!(frames[0][4]["status"], "ok", "{frames:?}");
    assert_eq!(frames[1][1], "2", "then the publish reply: {frames:?}");
    assert_eq!(frames[1][4]["status"], "ok", "{frames:?}");
    assert_eq!(frames[2], json!(["1", null, "room:eager", "e", {"n": 1}]));
}

#[tokio::test]
async fn sighup_never_stops_a_single_node_gateway() {
    let gw = start_embedded_gateway(&[]).await;
    gw.signal("HUP");
    let mut c = WsClient::connect(&ringcast_tests::cluster::ws_url(gw.addr)).await;
    c.join_ok("room:hup", "1").await;
    gw.signal("HUP");
    assert!(!c.sync_or_closed().await, "still serving after SIGHUP");
}

#[tokio::test]
async fn idle_sockets_are_closed_with_1001() {
    let gw = start_embedded_gateway(&[("GATEWAY_IDLE_TIMEOUT_SECS", "1".into())]).await;
    let mut c = WsClient::connect(&ringcast_tests::cluster::ws_url(gw.addr)).await;
    assert_eq!(
        c.recv_end().await,
        Ended::Closed(Some((1001, "idle timeout".into())))
    );
}

/// Deliveries do not keep a silent client alive: only its own frames do.
#[tokio::test]
async fn a_silent_subscriber_times_out_while_deliveries_flow() {
    let gw = start_embedded_gateway(&[("GATEWAY_IDLE_TIMEOUT_SECS", "1".into())]).await;
    let url = ringcast_tests::cluster::ws_url(gw.addr);
    let (mut silent, mut publisher) =
        (WsClient::connect(&url).await, WsClient::connect(&url).await);
    silent.join_ok("room:busy", "1").await;
    publisher.join_ok("room:busy", "1").await;
    let publishing = tokio::spawn(async move {
        for n in 0.. {
            publisher
                .send_text(format!(r#"["1","{n}","room:busy","e",{{"n":{n}}}]"#))
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    });
    assert_eq!(
        silent.recv_end().await,
        Ended::Closed(Some((1001, "idle timeout".into())))
    );
    publishing.abort();
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1012() {
    let mut gw = start_embedded_gateway(&[]).await;
    let mut c = WsClient::connect(&ringcast_tests::cluster::ws_url(gw.addr)).await;
    c.join_ok("room:bye", "1").await;
    let stopping = tokio::task::spawn_blocking(move || gw.terminate());
    assert_eq!(
        c.recv_end().await,
        Ended::Closed(Some((1012, "server restart".into())))
    );
    let status = stopping.await.unwrap().expect("gateway exited");
    assert!(
        status.success(),
        "gateway exits cleanly on SIGTERM: {status}"
    );
}
