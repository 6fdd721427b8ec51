//! Recovery on join: `{"recover": {"epoch": E, "offset": N}}` replays every message after N
//! while the owner's log still holds them, all or nothing.

use ringcast_tests::{Cluster, ClusterSpec, NodeClient, WsClient};
use serde_json::{Value, json};

fn spec(topic_server_env: &[(&str, &str)]) -> ClusterSpec {
    ClusterSpec {
        topic_server_env: ringcast_tests::cluster::env(topic_server_env),
        ..Default::default()
    }
}

fn recover(epoch: &Value, offset: u64) -> Value {
    json!({"recover": {"epoch": epoch, "offset": offset}})
}

/// The payloads of delivery frames (`[join_ref, null, topic, event, payload]`).
fn payloads(frames: &[Value]) -> Vec<Value> {
    frames.iter().map(|f| f[4].clone()).collect()
}

#[tokio::test]
async fn a_rejoin_gets_the_missed_messages_in_order_before_live_ones() {
    let cluster = Cluster::start().await;
    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    let mut b = WsClient::connect(&cluster.ws_url(1)).await;
    let joined = a.join_ok("room:r", "1").await;
    let epoch = joined["epoch"].clone();
    b.join_ok("room:r", "1").await;
    b.publish("1", "room:r", "m", json!(1)).await;
    assert_eq!(a.recv_json().await[4], 1);
    drop(a); // the client loses its connection at offset 1

    for n in 2..=4 {
        b.publish("1", "room:r", "m", json!(n)).await;
    }
    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    let reply = a.join("room:r", "7", recover(&epoch, 1)).await;
    assert_eq!(
        reply,
        json!({"status": "ok", "response": {"epoch": epoch, "offset": 1, "recovered": true}})
    );
    b.publish("1", "room:r", "m", json!(5)).await;
    let frames = a.recv_n(4).await;
    assert_eq!(payloads(&frames), [json!(2), json!(3), json!(4), json!(5)]);
    assert!(
        frames.iter().all(|f| f[0] == "7" && f[3] == "m"),
        "replayed frames carry the new join_ref: {frames:?}"
    );
    assert!(a.sync().await.is_empty(), "nothing twice");
    let status = cluster.topic_servers[0].status().await;
    let other = cluster.topic_servers[1].status().await;
    let replayed = status["replayed"].as_u64().unwrap() + other["replayed"].as_u64().unwrap();
    assert_eq!(replayed, 3, "{status} {other}");
}

#[tokio::test]
async fn the_log_outlives_the_last_subscriber() {
    let cluster = Cluster::start().await;
    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    let epoch = a.join_ok("room:alone", "1").await["epoch"].clone();
    a.publish("1", "room:alone", "m", json!("while here")).await;
    a.recv_json().await;
    drop(a);
    // Nobody is subscribed now; a message published by a client that joins and leaves.
    let mut b = WsClient::connect(&cluster.ws_url(1)).await;
    b.join_ok("room:alone", "1").await;
    b.publish("1", "room:alone", "m", json!("while away")).await;
    b.send_text(r#"["1","9","room:alone","phx_leave",{}]"#)
        .await;
    b.until_reply("9", "ok").await;

    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    let reply = a.join("room:alone", "2", recover(&epoch, 1)).await;
    assert_eq!(reply["response"]["recovered"], true, "{reply}");
    assert_eq!(a.recv_json().await[4], "while away");
}

#[tokio::test]
async fn recovery_is_all_or_nothing() {
    let cluster = Cluster::start_with(spec(&[("TOPIC_SERVER_LOG_MESSAGES", "2")])).await;
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    let epoch = c.join_ok("room:short", "1").await["epoch"].clone();
    let mut own = Vec::new();
    for n in 1..=5 {
        own.extend(c.publish("1", "room:short", "m", json!(n)).await);
    }
    while own.len() < 5 {
        own.push(c.recv_json().await);
    }

    // Offsets 2 and 3 have left the log: nothing is replayed, the current position is given.
    let mut late = WsClient::connect(&cluster.ws_url(1)).await;
    let reply = late.join("room:short", "1", recover(&epoch, 1)).await;
    assert_eq!(
        reply["response"],
        json!({"epoch": epoch, "offset": 5, "recovered": false})
    );
    assert!(late.sync().await.is_empty(), "no partial replay");

    let mut recent = WsClient::connect(&cluster.ws_url(1)).await;
    let reply = recent.join("room:short", "1", recover(&epoch, 3)).await;
    assert_eq!(reply["response"]["recovered"], true, "{reply}");
    assert_eq!(payloads(&recent.recv_n(2).await), [json!(4), json!(5)]);

    // Another epoch (a position from an earlier life of the topic) or a position ahead of
    // the topic cannot be recovered.
    let mut stale = WsClient::connect(&cluster.ws_url(0)).await;
    let reply = stale
        .join("room:short", "1", recover(&json!("00000000000000aa"), 4))
        .await;
    assert_eq!(
        reply["response"],
        json!({"epoch": epoch, "offset": 5, "recovered": false})
    );
    let reply = stale.join("room:short", "2", recover(&epoch, 9)).await;
    assert_eq!(reply["response"]["recovered"], false, "{reply}");
    let statuses = [
        cluster.topic_servers[0].status().await,
        cluster.topic_servers[1].status().await,
    ];
    let log: u64 = statuses
        .iter()
        .map(|s| s["log_messages"].as_u64().unwrap())
        .sum();
    assert_eq!(log, 2, "the log holds at most 2 messages per topic");
}

#[tokio::test]
async fn an_expired_log_is_a_new_epoch() {
    let cluster = Cluster::start_with(spec(&[("TOPIC_SERVER_LOG_SECONDS", "1")])).await;
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    let epoch = c.join_ok("room:old", "1").await["epoch"].clone();
    c.publish("1", "room:old", "m", json!(1)).await;
    c.recv_json().await;
    drop(c);
    for ts in &cluster.topic_servers {
        ts.wait_status("log expired, topic gone", |s| {
            s["log_messages"] == 0 && s["topics"] == 0
        })
        .await;
    }
    let mut c = WsClient::connect(&cluster.ws_url(1)).await;
    let reply = c.join("room:old", "1", recover(&epoch, 1)).await;
    let response = &reply["response"];
    assert_eq!(response["recovered"], false, "{reply}");
    assert_eq!(response["offset"], 0, "{reply}");
    assert_ne!(
        response["epoch"], epoch,
        "a recreated topic is never mistaken for the old one"
    );
}

#[tokio::test]
async fn phoenix_js_rejoins_with_its_position_and_recovers_after_a_gateway_restart() {
    let mut cluster = Cluster::start().await;
    let mut js = NodeClient::connect(&cluster.socket_url(0)).await;
    let mut publisher = WsClient::connect(&cluster.ws_url(1)).await;
    publisher.join_ok("room:js", "1").await;
    let joined = js.join_recovering("room:js", json!({})).await;
    assert_eq!(joined["ev"], "join_ok", "{joined}");
    let epoch = joined["response"]["epoch"].clone();
    publisher.publish("1", "room:js", "m", json!(1)).await;
    assert_eq!(
        js.expect("message").await,
        json!({"ev": "message", "topic": "room:js", "event": "m", "payload": 1, "offset": 1})
    );

    // The gateway holding the phoenix.js socket crashes; messages go on meanwhile.
    cluster.gateways[0].kill();
    let errored = js.next_event_skipping(&["close"]).await;
    assert_eq!(errored["ev"], "channel_error", "{errored}");
    for n in 2..=3 {
        publisher.publish("1", "room:js", "m", json!(n)).await;
    }
    cluster.gateways[0].restart();
    cluster.wait_links(0).await;

    // phoenix.js reconnects and rejoins by itself, sending its position from the params
    // function: the missed messages arrive, in order, then live ones.
    let rejoined = js
        .next_event_skipping(&["open", "close", "channel_error", "join_error"])
        .await;
    assert_eq!(
        rejoined,
        json!({"ev": "join_ok", "topic": "room:js", "response": {"epoch": epoch, "offset": 1, "recovered": true}})
    );
    publisher.publish("1", "room:js", "m", json!(4)).await;
    for n in 2..=4u64 {
        assert_eq!(
            js.expect("message").await,
            json!({"ev": "message", "topic": "room:js", "event": "m", "payload": n, "offset": n})
        );
    }
}
