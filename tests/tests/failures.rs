//! Crashes, silent peers and partitions with real processes: the affected channels get
//! `phx_error`, nothing else is disturbed, nothing leaks, and clients recover after healing.

use ringcast_tests::cluster::status_sum;
use ringcast_tests::{Cluster, ClusterSpec, EVENT_TIMEOUT, NodeClient, WsClient};
use serde_json::{Value, json};
use std::time::Instant;

/// 1 s HTTP/2 keepalive on both sides: a silent peer is noticed within about 2 s. The
/// gateways run their links on a thread of their own, so that mode meets these failures too.
fn fast_keepalive() -> ClusterSpec {
    ClusterSpec {
        gateway_env: vec![
            ("GATEWAY_KEEPALIVE_SECS".into(), "1".into()),
            ("GATEWAY_LINK_THREADS".into(), "1".into()),
        ],
        topic_server_env: vec![("TOPIC_SERVER_KEEPALIVE_SECS".into(), "1".into())],
        ..Default::default()
    }
}

fn recover(epoch: &Value, offset: u64) -> Value {
    json!({"recover": {"epoch": epoch, "offset": offset}})
}

/// Reads frames until the `phx_error` of `topic`, which must name `join_ref`; returns how
/// long it took. Deliveries of other topics may come first.
async fn expect_channel_error(c: &mut WsClient, topic: &str, join_ref: &str) -> f64 {
    let started = Instant::now();
    loop {
        let frame = c.recv_json().await;
        if frame[2] == topic && frame[3] == "phx_error" {
            assert_eq!(frame[0], join_ref, "{frame}");
            assert_eq!(frame[1], join_ref, "{frame}");
            assert!(frame[4]["reason"].is_string(), "{frame}");
            return started.elapsed().as_secs_f64();
        }
        assert_ne!(
            frame[2], topic,
            "unexpected frame before the error: {frame}"
        );
    }
}

#[tokio::test]
async fn a_killed_topic_server_errors_only_its_channels_and_a_restart_heals() {
    let mut cluster = Cluster::start().await;
    let (ta, tb) = (cluster.topic_on(0, "room:a"), cluster.topic_on(1, "room:b"));
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    let epoch = c.join_ok(&ta, "1").await["epoch"].clone();
    c.join_ok(&tb, "2").await;
    c.publish("1", &ta, "m", json!(1)).await;
    assert_eq!(c.recv_json().await[4], 1);

    cluster.topic_servers[0].kill();
    expect_channel_error(&mut c, &ta, "1").await;
    // The channel on the other topic server is untouched.
    c.publish("2", &tb, "m", json!("still here")).await;
    assert_eq!(c.recv_json().await[4], "still here");
    // While the owner is down, a join is refused as unavailable (phoenix.js retries it).
    let refused = c.join(&ta, "3", recover(&epoch, 1)).await;
    assert_eq!(
        refused,
        json!({"status": "error", "response": {"reason": "unavailable"}})
    );

    cluster.topic_servers[0].restart();
    cluster.wait_links(0).await;
    let reply = c.join(&ta, "4", recover(&epoch, 1)).await;
    let response = &reply["response"];
    assert_eq!(response["recovered"], false, "{reply}");
    assert_eq!(response["offset"], 0, "{reply}");
    assert_ne!(
        response["epoch"], epoch,
        "a restarted owner starts a new epoch"
    );
    c.publish("4", &ta, "m", json!(2)).await;
    assert_eq!(c.recv_json().await[4], 2);
    let status = cluster.gateways[0].status().await;
    assert_eq!(status["interrupted_channels"], 1, "{status}");
}

#[tokio::test]
async fn a_silent_topic_server_is_noticed_by_keepalive_and_recovery_fills_the_gap() {
    let cluster = Cluster::start_with(fast_keepalive()).await;
    let ta = cluster.topic_on(0, "room:s");
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    let mut p = WsClient::connect(&cluster.ws_url(1)).await;
    let epoch = c.join_ok(&ta, "1").await["epoch"].clone();
    p.join_ok(&ta, "1").await;
    p.publish("1", &ta, "m", json!(1)).await;
    assert_eq!(p.recv_json().await[4], 1, "the publisher's own copy");
    assert_eq!(c.recv_json().await[4], 1);

    cluster.topic_servers[0].pause();
    let took = expect_channel_error(&mut c, &ta, "1").await;
    eprintln!("silent topic server noticed after {took:.1} s");
    assert!(took < EVENT_TIMEOUT.as_secs_f64());
    expect_channel_error(&mut p, &ta, "1").await;
    cluster.topic_servers[0].resume();
    cluster.wait_links(0).await;
    cluster.wait_links(1).await;

    // The owner kept its log: the publisher goes on, the subscriber recovers the gap.
    p.join_ok(&ta, "2").await;
    p.publish("2", &ta, "m", json!(2)).await;
    let reply = c.join(&ta, "3", recover(&epoch, 1)).await;
    assert_eq!(
        reply["response"],
        json!({"epoch": epoch, "offset": 1, "recovered": true})
    );
    assert_eq!(c.recv_json().await[4], 2);
}

#[tokio::test]
async fn a_crashed_gateway_leaves_no_subscription_behind() {
    let mut cluster = Cluster::start().await;
    let topics = [cluster.topic_on(0, "room:g"), cluster.topic_on(1, "room:g")];
    let mut doomed = Vec::new();
    for i in 0..3 {
        let mut c = WsClient::connect(&cluster.ws_url(0)).await;
        for t in &topics {
            c.join_ok(t, &i.to_string()).await;
        }
        doomed.push(c);
    }
    let mut survivor = WsClient::connect(&cluster.ws_url(1)).await;
    survivor.join_ok(&topics[0], "1").await;
    assert_eq!(status_sum(&cluster.topic_servers, "subscriptions").await, 7);

    cluster.gateways[0].kill();
    for ts in &cluster.topic_servers {
        ts.wait_status("the crashed gateway's subscriptions are dropped", |s| {
            s["links_open"] == 1
        })
        .await;
    }
    assert_eq!(status_sum(&cluster.topic_servers, "subscriptions").await, 1);
    assert_eq!(
        status_sum(&cluster.topic_servers, "subscriptions_dropped").await,
        6
    );
    survivor.publish("1", &topics[0], "m", json!("alive")).await;
    assert_eq!(survivor.recv_json().await[4], "alive");
}

#[tokio::test]
async fn a_silent_gateway_is_dropped_by_keepalive() {
    let cluster = Cluster::start_with(fast_keepalive()).await;
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    c.join_ok(&cluster.topic_on(0, "room:z"), "1").await;
    c.join_ok(&cluster.topic_on(1, "room:z"), "2").await;
    assert_eq!(status_sum(&cluster.topic_servers, "subscriptions").await, 2);

    cluster.gateways[0].pause();
    let started = Instant::now();
    for ts in &cluster.topic_servers {
        ts.wait_status("the silent gateway is dropped", |s| {
            s["subscriptions"] == 0 && s["links_open"] == 1
        })
        .await;
    }
    eprintln!(
        "silent gateway dropped after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        status_sum(&cluster.topic_servers, "subscriptions_dropped").await,
        2
    );
    cluster.gateways[0].resume();
    // Its channels were cut at the owners, so the gateway errors them, and heals by itself.
    expect_channel_error(&mut c, &cluster.topic_on(0, "room:z"), "1").await;
    cluster.wait_links(0).await;
}

#[tokio::test]
async fn a_partition_is_noticed_and_after_healing_clients_recover() {
    let cluster = Cluster::start_with(ClusterSpec {
        proxied_gateways: vec![0],
        ..fast_keepalive()
    })
    .await;
    let (ta, tb) = (cluster.topic_on(0, "room:p"), cluster.topic_on(1, "room:p"));
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    let mut p = WsClient::connect(&cluster.ws_url(1)).await;
    let epoch = c.join_ok(&ta, "1").await["epoch"].clone();
    c.join_ok(&tb, "2").await;
    p.join_ok(&ta, "1").await;
    p.publish("1", &ta, "m", json!(1)).await;
    assert_eq!(c.recv_json().await[4], 1);

    // Cut gateway 0 off from topic server 0 only.
    let proxy = &cluster.proxies[&(0, 0)];
    proxy.blackhole();
    let took = expect_channel_error(&mut c, &ta, "1").await;
    eprintln!("partition noticed after {took:.1} s");
    // The other side of the partition goes on; so does gateway 0's other topic server.
    for n in 2..=4 {
        p.publish("1", &ta, "m", json!(n)).await;
    }
    c.publish("2", &tb, "m", json!("other node")).await;
    assert_eq!(c.recv_json().await[4], "other node");
    let refused = c.join(&ta, "3", recover(&epoch, 1)).await;
    assert_eq!(refused["response"]["reason"], "unavailable", "{refused}");
    cluster.topic_servers[0]
        .wait_status("the owner dropped the cut-off gateway", |s| {
            s["links_open"] == 1
        })
        .await;

    proxy.heal();
    cluster.wait_links(0).await;
    let reply = c.join(&ta, "4", recover(&epoch, 1)).await;
    assert_eq!(
        reply["response"],
        json!({"epoch": epoch, "offset": 1, "recovered": true})
    );
    p.publish("1", &ta, "m", json!(5)).await;
    let got: Vec<Value> = c.recv_n(4).await.iter().map(|f| f[4].clone()).collect();
    assert_eq!(got, [json!(2), json!(3), json!(4), json!(5)]);
    assert!(c.sync().await.is_empty());
}

#[tokio::test]
async fn phoenix_js_rejoins_by_itself_after_a_topic_server_restart() {
    let mut cluster = Cluster::start().await;
    let ta = cluster.topic_on(0, "room:js");
    let mut js = NodeClient::connect(&cluster.socket_url(0)).await;
    let joined = js.join_recovering(&ta, json!({})).await;
    let epoch = joined["response"]["epoch"].clone();
    let mut p = WsClient::connect(&cluster.ws_url(1)).await;
    p.join_ok(&ta, "1").await;
    p.publish("1", &ta, "m", json!(1)).await;
    assert_eq!(p.recv_json().await[4], 1, "the publisher's own copy");
    assert_eq!(js.expect("message").await["offset"], 1);

    cluster.topic_servers[0].kill();
    assert_eq!(js.expect("channel_error").await["topic"], ta.as_str());
    expect_channel_error(&mut p, &ta, "1").await;
    cluster.topic_servers[0].restart();

    // phoenix.js retries the join by itself (refused as unavailable until the owner is
    // back); the restarted owner has a new epoch, so nothing is claimed recovered.
    let rejoined = js.next_event_skipping(&["join_error"]).await;
    assert_eq!(rejoined["ev"], "join_ok", "{rejoined}");
    let response = &rejoined["response"];
    assert_eq!(response["recovered"], false, "{rejoined}");
    assert_ne!(response["epoch"], epoch);
    cluster.wait_links(1).await;
    p.join_ok(&ta, "2").await;
    p.publish("2", &ta, "m", json!("after restart")).await;
    let message = js.expect("message").await;
    assert_eq!(
        (message["payload"].clone(), message["offset"].clone()),
        (json!("after restart"), json!(1))
    );
}
