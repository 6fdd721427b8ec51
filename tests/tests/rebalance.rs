//! Rebalancing by editing the ring file while clients publish and receive continuously on
//! many topics, with subscribers on both gateways. Every scenario asserts that every
//! subscriber received every message exactly once, in the owner's order, with the numbering
//! continued across the move (one epoch, no interruption, no rejoin).

use ringcast_ring::Ring;
use ringcast_tests::cluster::status_sum;
use ringcast_tests::traffic::{Report, Traffic};
use ringcast_tests::{Cluster, ClusterSpec, NodeClient, RingTarget, WsClient, eventually};
use serde_json::json;
use std::time::Duration;

const TOPICS: usize = 12;

async fn start(split_rings: bool) -> (Cluster, Traffic) {
    let cluster = Cluster::start_with(ClusterSpec {
        split_rings,
        topic_server_env: vec![("TOPIC_SERVER_LOG_MESSAGES".into(), "10000".into())],
        ..Default::default()
    })
    .await;
    let topics = (0..TOPICS).map(|i| format!("move:{i}")).collect();
    let traffic = Traffic::start(&cluster, topics, 1, Duration::from_millis(5)).await;
    (cluster, traffic)
}

/// Lets some traffic flow (a few hundred more accepted messages).
async fn publish_a_while(traffic: &Traffic) {
    let before = traffic.published();
    eventually("publishing goes on", Duration::from_secs(10), || async {
        (traffic.published() >= before + 300).then_some(())
    })
    .await;
}

fn ring_of(text: &str) -> Ring {
    Ring::from_toml(text).expect("test ring")
}

/// Waits until every process is on `ring` and every gateway's topics sit at their owner.
async fn settled(cluster: &Cluster, ring: &Ring) {
    let version = ring.version();
    for ts in &cluster.topic_servers {
        if ring.node(&ts.name).is_some() {
            ts.wait_status("on the new ring", |s| s["ring_version"] == version)
                .await;
        }
    }
    for gw in &cluster.gateways {
        gw.wait_get("/ring", "every topic at its new owner", |r| {
            r["version"] == version
                && r["moving"] == 0
                && r["topics"].as_object().is_some_and(|by_node| {
                    by_node.iter().all(|(node, topics)| {
                        topics.as_array().is_some_and(|ts| {
                            ts.iter()
                                .all(|t| ring.owner(t.as_str().unwrap()).id == *node)
                        })
                    })
                })
        })
        .await;
    }
}

/// Nothing was lost, duplicated, reordered or renumbered, and nobody was interrupted.
fn assert_seamless(report: &Report) {
    let channels = 2 * TOPICS; // one subscriber per gateway, every topic
    assert_eq!(report.interruptions, 0, "{report:?}");
    assert_eq!(report.joins, channels, "no rejoin: {report:?}");
    assert_eq!(report.max_epochs, 1, "the numbering continued: {report:?}");
    assert!(report.checked > 500, "{report:?}");
}

fn with_weight(text: &str, id: &str, weight: u32) -> String {
    text.replace(
        &format!("id = \"{id}\"\n"),
        &format!("id = \"{id}\"\nweight = {weight}\n"),
    )
}

#[tokio::test]
async fn adding_a_topic_server_moves_topics_without_a_client_noticing() {
    let (mut cluster, traffic) = start(false).await;
    let c = cluster.add_topic_server("ts-c", 2).await;
    let text = ringcast_tests::cluster::ring_text(2, &cluster.nodes(&[0, 1, c]));
    let ring = ring_of(&text);
    let moving = traffic
        .topics
        .iter()
        .find(|t| ring.owner(t).id == "ts-c")
        .expect("some topic moves to ts-c")
        .clone();
    let mut js = NodeClient::connect(&cluster.socket_url(1)).await;
    assert_eq!(
        js.join_recovering(&moving, json!({})).await["ev"],
        "join_ok"
    );
    publish_a_while(&traffic).await;

    cluster.write_ring_for(RingTarget::All, 2, &cluster.nodes(&[0, 1, c]));
    settled(&cluster, &ring).await;
    publish_a_while(&traffic).await;
    let report = traffic.finish().await;
    assert_seamless(&report);
    assert!(cluster.topic_servers[c].status().await["handoffs_in"].as_u64() > Some(0));
    let mut gateway_moves = 0;
    for g in &cluster.gateways {
        gateway_moves += g.status().await["moves"]
            .as_u64()
            .expect("moves on /status");
    }
    assert!(gateway_moves > 0, "the gateways moved their topics");

    // The phoenix.js client stayed joined: every message, numbered without a hole, no error.
    let mut last = 0;
    loop {
        let event = js.next_event().await;
        assert_eq!(event["ev"], "message", "phoenix.js saw {event}");
        let offset = event["offset"].as_u64().unwrap();
        assert!(last == 0 || offset == last + 1, "{last} then {event}");
        last = offset;
        if event["payload"] == json!(0) {
            break; // the last message of the run
        }
    }
}

#[tokio::test]
async fn removing_a_topic_server_gracefully_hands_its_topics_over() {
    let (mut cluster, traffic) = start(false).await;
    publish_a_while(&traffic).await;
    let text = ringcast_tests::cluster::ring_text(2, &cluster.nodes(&[0]));
    cluster.write_ring_for(RingTarget::All, 2, &cluster.nodes(&[0]));
    settled(&cluster, &ring_of(&text)).await;
    cluster.topic_servers[1]
        .wait_status("ts-b holds nothing", |s| {
            s["subscriptions"] == 0 && s["owned_topics"] == 0
        })
        .await;
    for gw in 0..2 {
        cluster.gateways[gw]
            .wait_get("/ring", "ts-b's link closed", |r| {
                r["nodes"].as_array().is_some_and(|n| n.len() == 1)
            })
            .await;
    }
    // Now it can go.
    let status = cluster.topic_servers[1].terminate();
    assert!(status.is_some_and(|s| s.success()));
    publish_a_while(&traffic).await;
    assert_seamless(&traffic.finish().await);
}

#[tokio::test]
async fn changing_a_weight_moves_a_share_of_the_topics() {
    let (cluster, traffic) = start(false).await;
    publish_a_while(&traffic).await;
    let text = with_weight(
        &ringcast_tests::cluster::ring_text(2, &cluster.nodes(&[0, 1])),
        "ts-a",
        3,
    );
    cluster.write_ring_toml(RingTarget::All, &text);
    settled(&cluster, &ring_of(&text)).await;
    publish_a_while(&traffic).await;
    assert_seamless(&traffic.finish().await);
    assert!(
        status_sum(
            cluster.topic_servers.iter().chain(&cluster.gateways),
            "handoffs_in"
        )
        .await
            > 0,
        "something moved"
    );
}

#[tokio::test]
async fn two_edits_in_quick_succession() {
    let (mut cluster, traffic) = start(false).await;
    let c = cluster.add_topic_server("ts-c", 2).await;
    publish_a_while(&traffic).await;
    cluster.write_ring_for(RingTarget::All, 2, &cluster.nodes(&[0, 1, c]));
    let text = with_weight(
        &ringcast_tests::cluster::ring_text(3, &cluster.nodes(&[0, 1, c])),
        "ts-b",
        4,
    );
    cluster.write_ring_toml(RingTarget::All, &text);
    settled(&cluster, &ring_of(&text)).await;
    publish_a_while(&traffic).await;
    assert_seamless(&traffic.finish().await);
}

#[tokio::test]
async fn the_new_ring_reaching_gateways_before_topic_servers() {
    let (cluster, traffic) = start(true).await;
    publish_a_while(&traffic).await;
    let text = with_weight(
        &ringcast_tests::cluster::ring_text(2, &cluster.nodes(&[0, 1])),
        "ts-b",
        3,
    );
    cluster.write_ring_toml(RingTarget::Gateways, &text);
    for gw in &cluster.gateways {
        gw.wait_status("gateway on ring 2", |s| s["ring_version"] == 2)
            .await;
    }
    publish_a_while(&traffic).await;
    cluster.write_ring_toml(RingTarget::TopicServers, &text);
    settled(&cluster, &ring_of(&text)).await;
    publish_a_while(&traffic).await;
    assert_seamless(&traffic.finish().await);
}

#[tokio::test]
async fn the_new_ring_reaching_topic_servers_before_gateways() {
    let (cluster, traffic) = start(true).await;
    publish_a_while(&traffic).await;
    let text = with_weight(
        &ringcast_tests::cluster::ring_text(2, &cluster.nodes(&[0, 1])),
        "ts-a",
        3,
    );
    cluster.write_ring_toml(RingTarget::TopicServers, &text);
    for ts in &cluster.topic_servers {
        ts.wait_status("topic server on ring 2", |s| s["ring_version"] == 2)
            .await;
    }
    // Gateways still route by ring 1: requests the topic servers refuse are retried.
    let before = traffic.published();
    cluster.write_ring_toml(RingTarget::Gateways, &text);
    settled(&cluster, &ring_of(&text)).await;
    publish_a_while(&traffic).await;
    assert!(traffic.published() > before);
    assert_seamless(&traffic.finish().await);
}

/// Makes a join of a topic wait at ts-b: ts-a holds the topic (one logged message, no
/// subscriber), ring 2 gives everything to ts-b, and ts-a is paused so ts-b's fetch waits.
/// Returns the topic and the joining client (on gw-1) once its join is parked.
async fn park_a_join(cluster: &Cluster) -> (String, WsClient) {
    let topic = cluster.topic_on(0, "parked");
    let mut first = WsClient::connect(&cluster.ws_url(0)).await;
    first.join_ok(&topic, "1").await;
    first.publish("1", &topic, "e", json!(1)).await;
    drop(first);
    cluster.topic_servers[0]
        .wait_status("the topic held with no subscriber", |s| {
            s["subscriptions"] == 0 && s["topics"] == 1
        })
        .await;
    cluster.topic_servers[0].pause();
    cluster.write_ring_for(RingTarget::All, 2, &cluster.nodes(&[1]));
    cluster.topic_servers[1]
        .wait_status("ts-b on ring 2", |s| s["ring_version"] == 2)
        .await;
    cluster.gateways[1]
        .wait_status("gw-1 on ring 2", |s| s["ring_version"] == 2)
        .await;
    let mut joiner = WsClient::connect(&cluster.ws_url(1)).await;
    joiner
        .send_text(format!(r#"["1","1","{topic}","phx_join",{{}}]"#))
        .await;
    cluster.topic_servers[1]
        .wait_status("the join parked at ts-b", |s| s["parked"] == 1)
        .await;
    (topic, joiner)
}

/// Resumes ts-a; once ts-b has fetched the topic and served what waited, returns its status.
async fn fetched(cluster: &Cluster) -> serde_json::Value {
    cluster.topic_servers[0].resume();
    // Fetched, or given up after ts-a's 2 s `Take` timeout on a slow machine: either way
    // what waited is served now.
    cluster.topic_servers[1]
        .wait_status("the fetch ended", |s| s["fetching"] == 0)
        .await
}

#[tokio::test]
async fn a_gateway_that_dies_while_its_join_waits_for_a_handoff_leaves_no_subscription() {
    let mut cluster = Cluster::start().await;
    let (_, _joiner) = park_a_join(&cluster).await;
    cluster.gateways[1].kill();
    cluster.topic_servers[1]
        .wait_status("gw-1's stream ended", |s| {
            s["gateways"].as_array().is_some_and(|g| g.len() == 1)
        })
        .await;
    let status = fetched(&cluster).await;
    assert_eq!(
        status["subscriptions"], 0,
        "no subscription for a dead stream: {status}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_while_its_join_waits_for_a_handoff_leaves_no_subscription() {
    let cluster = Cluster::start().await;
    let (_, joiner) = park_a_join(&cluster).await;
    drop(joiner);
    cluster.topic_servers[1]
        .wait_status("the leave waits behind the join", |s| s["parked"] == 2)
        .await;
    let status = fetched(&cluster).await;
    assert_eq!(
        status["subscriptions"], 0,
        "the leave came after the join: {status}"
    );
    cluster.gateways[1]
        .wait_status("gw-1 holds nothing", |s| s["subscriptions"] == 0)
        .await;
}

#[tokio::test]
async fn requests_waiting_for_a_handoff_are_bounded() {
    let cluster = Cluster::start_with(ClusterSpec {
        topic_server_env: vec![
            ("TOPIC_SERVER_STREAM_QUEUE".into(), "64".into()),
            ("TOPIC_SERVER_LOG_MESSAGES".into(), "10".into()),
        ],
        ..Default::default()
    })
    .await;
    let (topic, mut joiner) = park_a_join(&cluster).await;
    // 1 join + 16 publishes: a quarter of a stream's queue (16) may wait; the last is refused.
    for i in 0..16 {
        joiner
            .send_text(format!(r#"["1","p{i}","{topic}","publish",["e",{i}]]"#))
            .await;
    }
    let refused = joiner.recv_json().await;
    assert_eq!(refused[1], "p15", "{refused}");
    assert_eq!(
        refused[4],
        json!({"status": "error", "response": {"reason": "unavailable"}})
    );
    let status = cluster.topic_servers[1].status().await;
    assert_eq!(
        (status["parked"].as_u64(), status["parked_refused"].as_u64()),
        (Some(16), Some(1)),
        "{status}"
    );
    // The ones that waited are served once the topic is fetched: the join, then 15 messages.
    fetched(&cluster).await;
    let frames = joiner.recv_n(1 + 15 + 15).await;
    assert_eq!(frames[0][1], "1", "the join reply first: {frames:?}");
    let delivered = frames.iter().filter(|f| f[3] == "e").count();
    assert_eq!(delivered, 15, "{frames:?}");
}
