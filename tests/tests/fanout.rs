//! Fan-out across nodes: hundreds of subscribers on both gateways, one total order per
//! topic, one delivery per gateway per message, topics isolated from each other, slow
//! clients cut without slowing anyone, and a killed gateway's subscriptions dropped.

use futures::future::join_all;
use ringcast_tests::cluster::ClusterSpec;
use ringcast_tests::ws::Ended;
use ringcast_tests::{Cluster, WsClient};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_subscribers_see_one_total_order() {
    let cluster = Cluster::start().await;
    const SUBSCRIBERS: usize = 300;
    const PER_PUBLISHER: usize = 50;
    let topic = "room:fanout";
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut c = WsClient::connect(&cluster.ws_url(i % 2)).await;
        c.join_ok(topic, "1").await;
        subscribers.push(c);
    }
    // Two publishers, one on each gateway, racing.
    let mut publishers = Vec::new();
    for g in 0..2 {
        let mut p = WsClient::connect(&cluster.ws_url(g)).await;
        p.join_ok(topic, "9").await;
        publishers.push(p);
    }
    let publishing = publishers
        .into_iter()
        .enumerate()
        .map(|(g, mut p)| async move {
            for n in 0..PER_PUBLISHER {
                p.send_json(
                    json!(["9", format!("{n}"), topic, "publish", ["msg", {"from": g, "n": n}]]),
                )
                .await;
            }
            p
        });
    let _publishers = join_all(publishing).await;

    let total = 2 * PER_PUBLISHER;
    let received = join_all(subscribers.iter_mut().map(|c| async move {
        c.recv_n(total)
            .await
            .into_iter()
            .map(|f| f[4].clone())
            .collect::<Vec<Value>>()
    }))
    .await;
    let order = &received[0];
    for (from, per) in [0, 1].map(|g| {
        (
            g,
            order
                .iter()
                .filter(|m| m["from"] == g)
                .map(|m| m["n"].clone())
                .collect::<Vec<_>>(),
        )
    }) {
        let expected: Vec<Value> = (0..PER_PUBLISHER).map(|n| json!(n)).collect();
        assert_eq!(
            per, expected,
            "messages of publisher {from} keep their order"
        );
    }
    for (i, r) in received.iter().enumerate() {
        assert_eq!(r, order, "subscriber {i} saw a different order");
    }

    // One delivery per message per gateway: each gateway received exactly `total`.
    for gw in &cluster.gateways {
        let status = gw
            .wait_status("all deliveries counted", |s| s["deliveries_in"] == total)
            .await;
        // Subscribers joined with "1", publishers with "9": two encodes per message, not 150.
        assert_eq!(
            status["encodes"],
            2 * total,
            "one encode per distinct join_ref per message"
        );
    }
    let mut deliveries = 0;
    for ts in &cluster.topic_servers {
        deliveries += ts.status().await["deliveries"].as_u64().unwrap();
    }
    assert_eq!(
        deliveries,
        2 * total as u64,
        "the owner sent one delivery per gateway per message"
    );
}

#[tokio::test]
async fn topics_are_isolated() {
    let cluster = Cluster::start().await;
    const TOPICS: usize = 40;
    let mut clients = Vec::new();
    for t in 0..TOPICS {
        let mut c = WsClient::connect(&cluster.ws_url(t % 2)).await;
        c.join_ok(&format!("iso:{t}"), "1").await;
        clients.push(c);
    }
    // Both topic servers own some of these topics.
    for ts in &cluster.topic_servers {
        ts.wait_status("owns topics", |s| s["topics"].as_u64() > Some(0))
            .await;
    }
    for (t, c) in clients.iter_mut().enumerate() {
        c.publish("1", &format!("iso:{t}"), "only", json!({"t": t}))
            .await;
    }
    for (t, c) in clients.iter_mut().enumerate() {
        let mut frames = c.sync().await;
        if frames.is_empty() {
            frames.push(c.recv_json().await);
        }
        assert_eq!(
            frames,
            [json!(["1", null, format!("iso:{t}"), "only", {"t": t}])]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_and_does_not_slow_the_others() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateway_env: vec![
            ("GATEWAY_CLIENT_QUEUE".into(), "16".into()),
            ("GATEWAY_MAX_FRAME_BYTES".into(), "1048576".into()),
        ],
        ..Default::default()
    })
    .await;
    let topic = "room:slow";
    let mut slow = WsClient::connect(&cluster.ws_url(0)).await;
    slow.join_ok(topic, "1").await;
    let mut fast = WsClient::connect(&cluster.ws_url(0)).await;
    fast.join_ok(topic, "1").await;
    let mut publisher = WsClient::connect(&cluster.ws_url(1)).await;
    publisher.join_ok(topic, "1").await;

    // ~24 MB through a client that never reads: more than loopback socket buffers hold.
    let chunk = "x".repeat(512 * 1024);
    const MESSAGES: usize = 48;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < MESSAGES {
            let frame = fast.recv_json().await;
            if frame[3] == "big" {
                n += 1;
            }
        }
        n
    });
    for i in 0..MESSAGES {
        publisher
            .send_json(json!([
                "1",
                format!("{i}"),
                topic,
                "publish",
                ["big", chunk]
            ]))
            .await;
        // The publisher reads its reply and its own copy, so only `slow` falls behind.
        publisher.recv_n(2).await;
    }
    assert_eq!(
        reader.await.unwrap(),
        MESSAGES,
        "the fast subscriber got everything"
    );
    cluster.gateways[0]
        .wait_status("slow consumer cut", |s| s["slow_consumers"] == 1)
        .await;
    match slow.recv_end().await {
        Ended::Closed(Some((code, _))) => assert_eq!(code, 1013),
        Ended::Closed(None) => panic!("closed without a code"),
        Ended::Dropped => {} // the close frame could not get past the full socket buffer
    }
}

#[tokio::test]
async fn a_killed_gateways_subscriptions_disappear_from_the_topic_servers() {
    let mut cluster = Cluster::start().await;
    let mut keep = Vec::new();
    let mut doomed = Vec::new();
    for t in 0..20 {
        let topic = format!("kill:{t}");
        let mut a = WsClient::connect(&cluster.ws_url(0)).await;
        a.join_ok(&topic, "1").await;
        keep.push((topic.clone(), a));
        for _ in 0..3 {
            let mut b = WsClient::connect(&cluster.ws_url(1)).await;
            b.join_ok(&topic, "1").await;
            doomed.push(b);
        }
    }
    let total = |statuses: Vec<Value>, key: &str| {
        statuses
            .iter()
            .map(|s| s[key].as_u64().unwrap())
            .sum::<u64>()
    };
    let statuses = join_all(cluster.topic_servers.iter().map(|ts| ts.status())).await;
    assert_eq!(total(statuses, "subscriptions"), 80);

    cluster.gateways[1].kill();
    ringcast_tests::eventually(
        "subscriptions of the killed gateway dropped",
        ringcast_tests::EVENT_TIMEOUT,
        || async {
            let statuses = join_all(cluster.topic_servers.iter().map(|ts| ts.status())).await;
            (total(statuses.clone(), "subscriptions") == 20 && total(statuses, "links_open") == 2)
                .then_some(())
        },
    )
    .await;
    let statuses = join_all(cluster.topic_servers.iter().map(|ts| ts.status())).await;
    assert_eq!(total(statuses, "subscriptions_dropped"), 60);
    // The survivors still work.
    for (topic, c) in &mut keep {
        c.publish("1", topic, "alive", json!(1)).await;
        assert_eq!(c.recv_json().await[3], "alive");
    }
}
