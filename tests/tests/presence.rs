//! Presence with phoenix.js's own `Presence` class under Node, on two gateways: users and
//! tabs joining, updating and leaving; a gateway killed; a topic moved by a ring edit; a topic
//! server restarted; a burst of joins; a crowd counted rather than listed. After each step,
//! every client's state is compared with the owner's (`GET /api/presence`).

use ringcast_tests::cluster::ws_url;
use ringcast_tests::ws::WsClient;
use ringcast_tests::{Cluster, ClusterSpec, NodeClient, RingTarget, eventually};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const SECRET: &str = "a-presence-test-secret-of-32-bytes!";

fn token(sub: &str) -> String {
    let exp = ringcast_tests::jwt::now_secs() + 600;
    let claims = json!({"sub": sub, "exp": exp, "subscribe": ["room:*", "move:*"]});
    ringcast_tests::jwt::sign(None, SECRET.as_bytes(), &claims)
}

fn spec(topic_server_env: &[(&str, &str)]) -> ClusterSpec {
    ClusterSpec {
        gateway_env: vec![("GATEWAY_JWT_SECRETS".into(), SECRET.into())],
        topic_server_env: ringcast_tests::cluster::env(topic_server_env),
        ..Default::default()
    }
}

/// A phoenix.js client of user `sub` on gateway `gw`.
async fn user(cluster: &Cluster, gw: usize, sub: &str) -> NodeClient {
    NodeClient::connect_with(
        &cluster.socket_url(gw),
        json!({"params": {"token": token(sub)}}),
    )
    .await
}

/// Joins `topic` with a phoenix.js `Presence` attached, tracking `meta`.
async fn join(client: &mut NodeClient, topic: &str, meta: Value) {
    client
        .send(json!({"op": "join", "topic": topic, "params": {"presence": {"meta": meta}}, "presence": true}))
        .await;
    let joined = client
        .next_event_skipping(&["presence_sync", "presence_diff"])
        .await;
    assert_eq!(joined["ev"], "join_ok", "{joined}");
}

/// Keys to sorted `phx_ref`s.
type Refs = BTreeMap<String, Vec<String>>;

fn refs(state: &Value) -> Refs {
    serde_json::from_value(state.clone()).unwrap()
}

/// Waits for a `presence_sync` of `topic` whose keys have these meta counts; returns its
/// refs and how many `presence_diff`s came on the way.
async fn sees(client: &mut NodeClient, topic: &str, want: &[(&str, usize)]) -> (Refs, usize) {
    let want: BTreeMap<String, usize> = want.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    let mut diffs = 0;
    loop {
        let event = client.next_event().await;
        match event["ev"].as_str() {
            Some("presence_diff") if event["topic"] == topic => diffs += 1,
            Some("presence_sync") if event["topic"] == topic => {
                let state = refs(&event["state"]);
                let counts: BTreeMap<String, usize> =
                    state.iter().map(|(k, v)| (k.clone(), v.len())).collect();
                if counts == want {
                    return (state, diffs);
                }
            }
            _ => {}
        }
    }
}

/// The owner's presence of `topic`, as refs.
async fn owner(cluster: &Cluster, topic: &str) -> Refs {
    let (status, answer) = cluster.gateways[0]
        .api(&format!("/api/presence?topic={topic}"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["presence"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let mut refs: Vec<String> = v["metas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["phx_ref"].as_str().unwrap().to_owned())
                .collect();
            refs.sort();
            (k.clone(), refs)
        })
        .collect()
}

#[tokio::test]
async fn phoenix_js_presence_sees_users_and_tabs_join_update_and_leave() {
    let cluster = Cluster::start_with(spec(&[])).await;
    let topic = "room:presence";
    let mut alice1 = user(&cluster, 0, "alice").await;
    join(&mut alice1, topic, json!({"tab": 1})).await;
    sees(&mut alice1, topic, &[("alice", 1)]).await;

    let mut bob = user(&cluster, 1, "bob").await;
    join(&mut bob, topic, json!({"name": "Bob"})).await;
    let (bob_sees, _) = sees(&mut bob, topic, &[("alice", 1), ("bob", 1)]).await;
    let (alice_sees, _) = sees(&mut alice1, topic, &[("alice", 1), ("bob", 1)]).await;
    assert_eq!(bob_sees, alice_sees);
    assert_eq!(alice_sees, owner(&cluster, topic).await);

    // Alice's second tab, on the other gateway: one key, two metas.
    let mut alice2 = user(&cluster, 1, "alice").await;
    join(&mut alice2, topic, json!({"tab": 2})).await;
    let want = [("alice", 2), ("bob", 1)];
    let (a2, _) = sees(&mut alice2, topic, &want).await;
    let (a1, _) = sees(&mut alice1, topic, &want).await;
    let (b, _) = sees(&mut bob, topic, &want).await;
    assert!(a1 == a2 && a2 == b, "{a1:?} {a2:?} {b:?}");
    assert_eq!(a1, owner(&cluster, topic).await);

    // Bob changes his meta: a new phx_ref, the new meta, for everyone.
    bob.push(
        topic,
        "presence_update",
        json!({"meta": {"name": "Bob", "status": "away"}}),
    )
    .await;
    let pushed = bob
        .next_event_skipping(&["presence_sync", "presence_diff"])
        .await;
    assert_eq!(pushed["ev"], "push_ok", "{pushed}");
    for client in [&mut alice1, &mut alice2, &mut bob] {
        loop {
            let event = client.next_event().await;
            if event["ev"] == "presence_sync" && event["metas"]["bob"][0]["status"] == "away" {
                assert_eq!(
                    event["metas"]["bob"].as_array().unwrap().len(),
                    1,
                    "{event}"
                );
                assert_ne!(refs(&event["state"])["bob"], b["bob"], "a new phx_ref");
                break;
            }
        }
    }

    // Alice closes her second tab: her first one stays.
    alice2.leave(topic).await;
    let want = [("alice", 1), ("bob", 1)];
    let (a1, _) = sees(&mut alice1, topic, &want).await;
    let (b, _) = sees(&mut bob, topic, &want).await;
    assert_eq!(a1, b);
    assert_eq!(a1, owner(&cluster, topic).await);

    // A client cannot claim another key, nor forge presence events.
    let mut mallory = user(&cluster, 0, "mallory").await;
    mallory
        .send(json!({"op": "join", "topic": topic, "params": {"presence": {"key": "alice", "meta": {}}}, "presence": true}))
        .await;
    let (state, _) = sees(
        &mut mallory,
        topic,
        &[("alice", 1), ("bob", 1), ("mallory", 1)],
    )
    .await;
    assert_eq!(state["alice"], a1["alice"], "still only Alice's own tab");
    mallory
        .push(
            topic,
            "presence_diff",
            json!({"joins": {}, "leaves": {"bob": {"metas": []}}}),
        )
        .await;
    let refused = mallory
        .next_event_skipping(&["presence_sync", "presence_diff", "join_ok"])
        .await;
    assert_eq!(refused["ev"], "push_error", "{refused}");
}

#[tokio::test]
async fn a_killed_gateways_users_leave_in_one_diff() {
    let mut cluster = Cluster::start_with(spec(&[])).await;
    let topic = "room:crash";
    let mut alice = user(&cluster, 0, "alice").await;
    join(&mut alice, topic, json!({})).await;
    sees(&mut alice, topic, &[("alice", 1)]).await;
    let mut others = Vec::new();
    for name in ["bob", "carol", "dave"] {
        let mut c = user(&cluster, 1, name).await;
        join(&mut c, topic, json!({})).await;
        others.push(c);
    }
    let everyone = [("alice", 1), ("bob", 1), ("carol", 1), ("dave", 1)];
    sees(&mut alice, topic, &everyone).await;

    cluster.gateways[1].kill();
    let (state, diffs) = sees(&mut alice, topic, &[("alice", 1)]).await;
    assert_eq!(diffs, 1, "their leaves came in one diff");
    assert_eq!(state, owner(&cluster, topic).await);
}

#[tokio::test]
async fn a_topic_moved_by_a_ring_edit_keeps_its_presence_without_a_diff() {
    let mut cluster = Cluster::start_with(spec(&[])).await;
    let c = cluster.add_topic_server("ts-c", 2).await;
    let text = ringcast_tests::cluster::ring_text(2, &cluster.nodes(&[0, 1, c]));
    let ring = ringcast_ring::Ring::from_toml(&text).unwrap();
    let topic = (0..1000)
        .map(|i| format!("move:{i}"))
        .find(|t| ring.owner(t).id == "ts-c")
        .expect("a topic that moves to ts-c");
    let mut alice = user(&cluster, 0, "alice").await;
    let mut bob = user(&cluster, 1, "bob").await;
    join(&mut alice, &topic, json!({"n": 1})).await;
    join(&mut bob, &topic, json!({"n": 2})).await;
    let both = [("alice", 1), ("bob", 1)];
    let (before, _) = sees(&mut alice, &topic, &both).await;
    sees(&mut bob, &topic, &both).await;
    eprintln!("before: {before:?}");
    let (status, _) = cluster.gateways[0]
        .api(
            "/api/publish",
            Some(json!({"topic": topic, "event": "before", "payload": {}})),
        )
        .await;
    assert_eq!(status, 200);
    for client in [&mut alice, &mut bob] {
        let event = client.next_event().await;
        assert_eq!(event["ev"], "message", "before the move: {event}");
    }

    cluster.write_ring_for(RingTarget::All, 2, &cluster.nodes(&[0, 1, c]));
    eventually(
        "the topic's subscribers at ts-c",
        Duration::from_secs(20),
        || async {
            let (status, info) = cluster.gateways[0]
                .api(&format!("/api/topic?topic={topic}"), None)
                .await;
            (status == 200 && info["owner"] == "ts-c" && info["subscribers"] == 2).then_some(())
        },
    )
    .await;
    // The new owner holds the same presence, refs and all.
    assert_eq!(owner(&cluster, &topic).await, before);
    // A message after the move is the barrier: no presence event came before it.
    let (status, _) = cluster.gateways[0]
        .api(
            "/api/publish",
            Some(json!({"topic": topic, "event": "after", "payload": {}})),
        )
        .await;
    assert_eq!(status, 200);
    for client in [&mut alice, &mut bob] {
        let event = client.next_event().await;
        assert_eq!(event["ev"], "message", "nothing but the message: {event}");
    }
    // Someone new sees everyone.
    let mut carol = user(&cluster, 1, "carol").await;
    join(&mut carol, &topic, json!({})).await;
    let (state, _) = sees(
        &mut carol,
        &topic,
        &[("alice", 1), ("bob", 1), ("carol", 1)],
    )
    .await;
    assert_eq!(state["alice"], before["alice"]);
    let (seen, _) = sees(
        &mut alice,
        &topic,
        &[("alice", 1), ("bob", 1), ("carol", 1)],
    )
    .await;
    assert_eq!(seen, owner(&cluster, &topic).await);
    // Bob joined before the move: his update goes to the new owner, and everyone sees it.
    bob.push(&topic, "presence_update", json!({"meta": {"n": 3}}))
        .await;
    let pushed = bob
        .next_event_skipping(&["presence_sync", "presence_diff", "message"])
        .await;
    assert_eq!(pushed["ev"], "push_ok", "{pushed}");
    for client in [&mut alice, &mut carol] {
        loop {
            let event = client.next_event().await;
            if event["ev"] == "presence_sync" && event["metas"]["bob"][0]["n"] == 3 {
                break;
            }
        }
    }
    assert_ne!(owner(&cluster, &topic).await["bob"], before["bob"]);
}

#[tokio::test]
async fn a_restarted_topic_server_rebuilds_presence_from_the_rejoins() {
    let mut cluster = Cluster::start_with(spec(&[])).await;
    let ring = cluster.ring();
    let topic = "room:restart";
    let owner_index = cluster
        .topic_servers
        .iter()
        .position(|t| t.name == ring.owner(topic).id)
        .unwrap();
    let mut alice = user(&cluster, 0, "alice").await;
    let mut bob = user(&cluster, 1, "bob").await;
    join(&mut alice, topic, json!({})).await;
    join(&mut bob, topic, json!({})).await;
    let both = [("alice", 1), ("bob", 1)];
    let (before, _) = sees(&mut alice, topic, &both).await;
    sees(&mut bob, topic, &both).await;

    cluster.topic_servers[owner_index].restart();
    // phoenix.js rejoins with the same params: the state comes back, under new refs, the
    // same for everyone and the owner.
    let mut seen = Vec::new();
    for client in [&mut alice, &mut bob] {
        loop {
            let (state, _) = sees(client, topic, &both).await;
            if state
                .values()
                .all(|refs| before.values().all(|old| old != refs))
            {
                seen.push(state);
                break;
            }
        }
    }
    let now = owner(&cluster, topic).await;
    assert_eq!(seen[0], now);
    assert_eq!(seen[1], now);
}

#[tokio::test]
async fn a_burst_of_a_thousand_joins_makes_a_handful_of_diffs() {
    const JOINS: usize = 1000;
    let cluster = Cluster::start_with(ClusterSpec {
        gateway_env: vec![("GATEWAY_MAX_PENDING_HTTP".into(), "4096".into())],
        topic_server_env: vec![("TOPIC_SERVER_PRESENCE_LIST_MAX".into(), "5000".into())],
        ..Default::default()
    })
    .await;
    let _ = rlimit::increase_nofile_limit(8192);
    let topic = "room:burst";
    let mut watcher = NodeClient::connect(&cluster.socket_url(0)).await;
    watcher
        .send(json!({"op": "join", "topic": topic, "params": {"presence": {}}, "presence": true}))
        .await;
    assert_eq!(
        watcher.next_event_skipping(&["presence_sync"]).await["ev"],
        "join_ok"
    );
    // Connected first, then every join sent at once.
    let mut clients = Vec::with_capacity(JOINS);
    for i in 0..JOINS {
        clients.push(WsClient::connect(&ws_url(cluster.gateways[i % 2].addr)).await);
    }
    let started = std::time::Instant::now();
    let joins = clients.iter_mut().enumerate().map(|(i, c)| {
        let join = json!(["1", "1", topic, "phx_join", {"presence": {"key": format!("u{i}"), "meta": {"i": i}}}]);
        c.send_json(join)
    });
    futures::future::join_all(joins).await;
    let sent = started.elapsed();
    let mut diffs = 0;
    loop {
        let event = watcher.next_event().await;
        match event["ev"].as_str() {
            Some("presence_diff") => diffs += 1,
            Some("presence_sync") if event["state"].as_object().unwrap().len() == JOINS => break,
            _ => {}
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{JOINS} joins sent in {sent:?}, all seen in {elapsed:?}: {diffs} presence_diff events at the watcher"
    );
    // One diff per 50 ms interval at most while the joins arrive, however many they are.
    let intervals = (elapsed.as_millis() / 50) as usize + 1;
    assert!(
        diffs <= intervals.min(20),
        "{diffs} diffs for a burst of {JOINS} joins in {elapsed:?}"
    );
    let (status, stats) = cluster.gateways[1]
        .api(&format!("/api/presence_stats?topic={topic}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (stats["members"].as_u64(), stats["keys"].as_u64()),
        (Some(1000), Some(1000))
    );
}

#[tokio::test]
async fn a_crowd_is_counted_not_listed() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateways: 1,
        topic_servers: 1,
        topic_server_env: vec![("TOPIC_SERVER_PRESENCE_LIST_MAX".into(), "3".into())],
        ..Default::default()
    })
    .await;
    let url = ws_url(cluster.gateways[0].addr);
    let mut crowd = Vec::new();
    for i in 0..4 {
        let mut c = WsClient::connect(&url).await;
        let reply = c
            .join(
                "room:crowd",
                "1",
                json!({"presence": {"key": format!("u{}", i % 2), "meta": {}}}),
            )
            .await;
        assert_eq!(reply["status"], "ok", "{reply}");
        crowd.push(c);
    }
    // Everyone hears the counts once the crowd passes the limit.
    let stats = loop {
        let frame = crowd[0].recv_json().await;
        if frame[3] == "presence_stats" {
            break frame[4].clone();
        }
    };
    assert_eq!(stats, json!({"members": 4, "keys": 2}));
    let mut late = WsClient::connect(&url).await;
    late.join("room:crowd", "1", json!({"presence": {}})).await;
    let first = late.recv_json().await;
    assert_eq!(
        (&first[3], &first[4]),
        (&json!("presence_stats"), &json!({"members": 4, "keys": 2}))
    );
    // Bad presence params get an error reply, not a join.
    let mut bad = WsClient::connect(&url).await;
    for params in [
        json!({"presence": {"meta": {}}}),
        json!({"presence": {"key": "k", "meta": [1]}}),
        json!({"presence": {"key": "k", "meta": {"phx_ref": "forged"}}}),
        json!({"presence": {"key": "k", "meta": {"big": "x".repeat(2000)}}}),
        json!({"presence": "yes"}),
    ] {
        let reply = bad.join("room:bad", "1", params.clone()).await;
        assert_eq!(reply["status"], "error", "{params}: {reply}");
    }
}

#[tokio::test]
async fn a_node_with_all_the_topics_it_may_hold_still_tracks_presence_in_them() {
    // One topic per topic server: the topic exists, so joining it with presence is no new
    // topic and must not be refused.
    let cluster = Cluster::start_with(spec(&[("TOPIC_SERVER_MAX_TOPICS", "1")])).await;
    let topic = "room:full";
    let mut alice = user(&cluster, 0, "alice").await;
    join(&mut alice, topic, json!({})).await;
    let mut bob = user(&cluster, 1, "bob").await;
    join(&mut bob, topic, json!({})).await;
    let both = [("alice", 1), ("bob", 1)];
    let (seen, _) = sees(&mut alice, topic, &both).await;
    sees(&mut bob, topic, &both).await;
    assert_eq!(seen, owner(&cluster, topic).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_update_flood_costs_members_one_diff_per_interval_and_bystanders_nothing() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateways: 1,
        gateway_env: vec![("GATEWAY_CLIENT_RATE".into(), "0".into())],
        ..Default::default()
    })
    .await;
    let url = ws_url(cluster.gateways[0].addr);
    let topic = "room:flooded";
    let mut watcher = WsClient::connect(&url).await;
    let reply = watcher.join(topic, "1", json!({"presence": {}})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let mut flooder = WsClient::connect(&url).await;
    let meta = |n: usize| json!({"n": n, "pad": "x".repeat(900)});
    let reply = flooder
        .join(
            topic,
            "1",
            json!({"presence": {"key": "mallory", "meta": meta(0)}}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");

    // A bystander on the same gateway, on another topic: a message every millisecond.
    let calm = tokio::spawn({
        let url = url.clone();
        async move {
            let mut sub = WsClient::connect(&url).await;
            sub.join_ok("room:calm", "1").await;
            let mut publisher = WsClient::connect(&url).await;
            publisher.join_ok("room:calm", "1").await;
            let started = std::time::Instant::now();
            for n in 0..300 {
                publisher
                    .send_publish("1", "room:calm", "m", json!({"n": n}))
                    .await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let got: Vec<u64> = (sub.recv_n(300).await.iter())
                .map(|f| f[4]["n"].as_u64().unwrap())
                .collect();
            (got, started.elapsed())
        }
    });

    // 2,000 meta updates of about 1 KiB, 100 in flight at a time.
    const UPDATES: usize = 2000;
    let started = std::time::Instant::now();
    for batch in 0..UPDATES / 100 {
        let mut refs = Vec::new();
        for i in 0..100 {
            let n = batch * 100 + i + 1;
            let msg_ref = format!("u{n}");
            let update = json!(["1", msg_ref, topic, "presence_update", {"meta": meta(n)}]);
            flooder.send_json(update).await;
            refs.push(msg_ref);
        }
        for msg_ref in refs {
            flooder.reply_to(&msg_ref, "ok").await;
        }
    }
    // The watcher hears the last meta, in at most one diff per 50 ms interval.
    let mut diffs = 0;
    loop {
        let frame = watcher.recv_json().await;
        if frame[3] != "presence_diff" {
            continue;
        }
        diffs += 1;
        let joins = &frame[4]["joins"]["mallory"]["metas"];
        assert_eq!(
            joins.as_array().map(Vec::len),
            Some(1),
            "one meta a diff: {frame}"
        );
        if joins[0]["n"] == UPDATES {
            break;
        }
    }
    let elapsed = started.elapsed();
    let intervals = (elapsed.as_millis() / 50) as usize + 2;
    eprintln!("{UPDATES} updates in {elapsed:?}: {diffs} diffs at the watcher");
    assert!(diffs <= intervals, "{diffs} diffs in {elapsed:?}");
    assert!(diffs < UPDATES / 4, "updates merged: {diffs} diffs");
    // The owner holds one entry, not a pile of changes.
    let (status, stats) = cluster.gateways[0]
        .api(&format!("/api/presence_stats?topic={topic}"), None)
        .await;
    assert_eq!(
        (status, stats["members"].as_u64()),
        (200, Some(1)),
        "{stats}"
    );
    let held = cluster.topic_servers.iter().map(|t| t.status());
    let mut log_bytes = 0;
    for status in futures::future::join_all(held).await {
        log_bytes += status["log_bytes"].as_u64().unwrap();
    }
    assert!(log_bytes < 64 * 1024, "{log_bytes} bytes held");
    // The bystander got every message, in order.
    let (got, took) = calm.await.unwrap();
    assert_eq!(got, (0..300).collect::<Vec<u64>>());
    eprintln!("bystander: 300 messages in {took:?} during the flood");
}
