//! Editing the ring file while the cluster runs: every process picks up a newer version,
//! refuses anything else (naming the problem, keeping its ring), survives SIGHUP, and the
//! gateways route by the new ring.

use ringcast_tests::cluster::{Proc, write_ring};
use ringcast_tests::{Cluster, NodeClient, WsClient};
use serde_json::{Value, json};
use std::net::SocketAddr;

fn nodes(cluster: &Cluster, which: &[usize]) -> Vec<(String, SocketAddr)> {
    which
        .iter()
        .map(|&i| {
            let ts = &cluster.topic_servers[i];
            (ts.name.clone(), ts.addr)
        })
        .collect()
}

fn all(cluster: &Cluster) -> impl Iterator<Item = &Proc> {
    cluster.topic_servers.iter().chain(cluster.gateways.iter())
}

async fn wait_all(cluster: &Cluster, what: &str, check: impl Fn(&Value) -> bool + Copy) {
    for p in all(cluster) {
        p.wait_status(what, check).await;
    }
}

#[tokio::test]
async fn only_a_newer_valid_ring_is_applied() {
    let cluster = Cluster::start().await;
    let path = &cluster.ring_path;

    std::fs::write(path, "version = 2\n[[nodes]]\nid = \"ts-a\"\n").unwrap();
    wait_all(&cluster, "an invalid ring is refused", |s| {
        s["ring_version"] == 1
            && s["ring_refused"]
                .as_str()
                .is_some_and(|r| r.contains("addr"))
    })
    .await;

    write_ring(path, 1, &nodes(&cluster, &[0]));
    wait_all(&cluster, "an edit without a version bump is refused", |s| {
        s["ring_version"] == 1
            && s["ring_refused"]
                .as_str()
                .is_some_and(|r| r.contains("raise `version`"))
    })
    .await;

    write_ring(path, 2, &nodes(&cluster, &[0, 1]));
    wait_all(&cluster, "version 2 applied", |s| {
        s["ring_version"] == 2 && s["ring_refused"].is_null()
    })
    .await;

    write_ring(path, 1, &nodes(&cluster, &[1, 0]));
    wait_all(&cluster, "an older version is refused", |s| {
        s["ring_version"] == 2
            && s["ring_refused"]
                .as_str()
                .is_some_and(|r| r.contains("older than version 2"))
    })
    .await;

    assert_eq!(
        ring_refused_gauges(&cluster).await,
        [1; 4],
        "/metrics says so too"
    );

    // SIGHUP re-reads the file; it never stops a process.
    write_ring(path, 3, &nodes(&cluster, &[0, 1]));
    for p in all(&cluster) {
        p.signal("HUP");
    }
    wait_all(&cluster, "version 3 applied, still running", |s| {
        s["ring_version"] == 3
    })
    .await;
    assert_eq!(ring_refused_gauges(&cluster).await, [0; 4]);
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    c.join_ok("room:after-reload", "1").await;
}

/// Each process's `ring_refused` gauge, from `/metrics`.
async fn ring_refused_gauges(cluster: &Cluster) -> Vec<u8> {
    let mut gauges = Vec::new();
    for p in all(cluster) {
        let text = reqwest::get(p.http("/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("ringcast_") && l.contains("_ring_refused "))
            .unwrap_or_else(|| panic!("{}: no ring_refused gauge in\n{text}", p.name));
        gauges.push(line.ends_with(" 1").into());
    }
    gauges
}

#[tokio::test]
async fn a_dead_topic_server_removed_from_the_ring_hands_its_topics_to_the_rest() {
    let mut cluster = Cluster::start().await;
    let ta = cluster.topic_on(0, "room:dead");
    let mut c = WsClient::connect(&cluster.ws_url(0)).await;
    let mut js = NodeClient::connect(&cluster.socket_url(1)).await;
    c.join_ok(&ta, "1").await;
    assert_eq!(js.join_recovering(&ta, json!({})).await["ev"], "join_ok");

    cluster.topic_servers[0].kill();
    let error = c.recv_json().await;
    assert_eq!(error[3], "phx_error", "{error}");
    assert_eq!(js.expect("channel_error").await["topic"], ta.as_str());

    // The operator removes the dead node: its topics now belong to ts-b.
    write_ring(&cluster.ring_path, 2, &nodes(&cluster, &[1]));
    for gw in &cluster.gateways {
        gw.wait_status("on ring 2 with one link", |s| {
            s["ring_version"] == 2 && s["links"].as_array().is_some_and(|l| l.len() == 1)
        })
        .await;
    }
    cluster.topic_servers[1]
        .wait_status("on ring 2", |s| s["ring_version"] == 2)
        .await;
    let reply = c.join(&ta, "2", json!({})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    // phoenix.js keeps retrying its join by itself and lands on the new owner.
    let rejoined = js.next_event_skipping(&["join_error"]).await;
    assert_eq!(rejoined["ev"], "join_ok", "{rejoined}");
    assert_eq!(rejoined["response"]["recovered"], false, "{rejoined}");
    cluster.topic_servers[1]
        .wait_status("ts-b serves the dead node's topic", |s| {
            s["subscriptions"] == 2
        })
        .await;
    c.publish("2", &ta, "m", json!("served by ts-b")).await;
    assert_eq!(js.expect("message").await["payload"], "served by ts-b");
}
