//! Running ringcast in production: the backend API (publish, broadcast, history, topic,
//! disconnect; keys, errors, idempotency), Prometheus metrics (scraped and parsed, values
//! that move with traffic), health checks (readiness through start, ring edits and drain),
//! and the drain itself (connections leave evenly and recover at another gateway).

use futures::{SinkExt, StreamExt};
use ringcast_tests::cluster::{Proc, env, free_port, write_ring, ws_url};
use ringcast_tests::jwt::{now_secs, sign};
use ringcast_tests::ws::Ended;
use ringcast_tests::{Cluster, ClusterSpec, EVENT_TIMEOUT, WsClient, eventually};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// `POST /api/publish` of `{"n": n}` as event `news`; returns the answer.
async fn publish(gw: &Proc, topic: &str, n: u64, key: Option<&str>) -> (u16, Value) {
    let mut body = json!({"topic": topic, "event": "news", "payload": {"n": n}});
    if let Some(key) = key {
        body["idempotency_key"] = json!(key);
    }
    gw.api("/api/publish", Some(body)).await
}

/// A raw API call: method, path, headers, body; the status and the body as JSON.
async fn raw(
    gw: &Proc,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, gw.api_url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.expect("API call");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, value)
}

#[tokio::test]
async fn a_backend_publishes_to_subscribers_on_every_gateway_and_a_retry_is_not_a_duplicate() {
    let cluster = Cluster::start().await;
    let (gw0, gw1) = (&cluster.gateways[0], &cluster.gateways[1]);
    let mut a = WsClient::connect(&ws_url(gw0.addr)).await;
    let mut b = WsClient::connect(&ws_url(gw1.addr)).await;
    let joined = a.join_ok("room:api", "1").await;
    b.join_ok("room:api", "1").await;

    let (status, first) = publish(gw1, "room:api", 1, Some("order-17")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["epoch"], joined["epoch"], "{first}");
    assert_eq!(first["offset"], 1, "{first}");
    // The backend's retry (a lost answer): the same answer, no second message.
    let (status, again) = publish(gw0, "room:api", 1, Some("order-17")).await;
    assert_eq!((status, &again), (200, &first));
    let (_, second) = publish(gw0, "room:api", 2, None).await;
    assert_eq!(second["offset"], 2, "{second}");
    for client in [&mut a, &mut b] {
        let frames = client.recv_n(2).await;
        assert_eq!(frames[0][3], "news");
        assert_eq!(frames[0][4], json!({"n": 1}));
        assert_eq!(frames[1][4], json!({"n": 2}), "the retry was not delivered");
    }
    // A broadcast: each topic answered; subscribers of each get it.
    let mut c = WsClient::connect(&ws_url(gw1.addr)).await;
    c.join_ok("room:other", "1").await;
    let (status, answer) = gw0
        .api(
            "/api/broadcast",
            Some(json!({"topics": ["room:api", "room:other", "room:nobody"], "event": "all", "payload": [1, "two"]})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["topic"], "room:api");
    assert_eq!(results[0]["offset"], 3, "{answer}");
    assert_eq!(results[1]["offset"], 1, "{answer}");
    assert!(results[2]["epoch"].is_string(), "{answer}");
    assert_eq!(a.recv_json().await[4], json!([1, "two"]));
    let got = c.recv_json().await;
    assert_eq!((&got[2], &got[3]), (&json!("room:other"), &json!("all")));

    let (status, info) = gw1.api("/api/topic?topic=room:api", None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["subscribers"], 2, "{info}");
    assert_eq!(info["gateways"], 2, "{info}");
    assert_eq!(info["offset"], 3, "{info}");
    assert_eq!(info["epoch"], first["epoch"], "{info}");
    let owners: Vec<String> = cluster
        .topic_servers
        .iter()
        .map(|t| t.name.clone())
        .collect();
    assert!(
        owners.contains(&info["owner"].as_str().unwrap().to_owned()),
        "{info}"
    );
}

/// An API call that must fail: status, error code, method, path, key, body.
type BadCall<'a> = (
    u16,
    &'a str,
    &'a reqwest::Method,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
);

#[tokio::test]
async fn bad_calls_get_a_clear_status_and_a_json_error() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateways: 1,
        gateway_env: env(&[("GATEWAY_MAX_FRAME_BYTES", "1024")]),
        ..Default::default()
    })
    .await;
    let gw = &cluster.gateways[0];
    let key = Some(ringcast_tests::cluster::TEST_API_KEY);
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let ok_body = r#"{"topic":"room:x","event":"e","payload":{}}"#;
    let big_payload = format!(
        r#"{{"topic":"room:x","event":"e","payload":"{}"}}"#,
        "x".repeat(2000)
    );
    let big_body = "x".repeat(2 << 20);
    let cases: Vec<BadCall<'_>> = vec![
        (
            401,
            "unauthorized",
            &post,
            "/api/publish",
            None,
            Some(ok_body),
        ),
        (
            401,
            "unauthorized",
            &post,
            "/api/publish",
            Some("not-a-key-of-ours-0000"),
            Some(ok_body),
        ),
        (
            400,
            "bad_request",
            &post,
            "/api/publish",
            key,
            Some("{not json"),
        ),
        (
            400,
            "bad_request",
            &post,
            "/api/publish",
            key,
            Some(r#"{"topic":"room:x","event":"e","payload":{},"color":"red"}"#),
        ),
        (
            400,
            "bad_request",
            &post,
            "/api/publish",
            key,
            Some(r#"{"topic":"room:x","event":"phx_close","payload":{}}"#),
        ),
        (
            400,
            "bad_request",
            &post,
            "/api/publish",
            key,
            Some(r#"{"topic":"","event":"e","payload":{}}"#),
        ),
        (
            413,
            "too_large",
            &post,
            "/api/publish",
            key,
            Some(&big_payload),
        ),
        (
            413,
            "too_large",
            &post,
            "/api/publish",
            key,
            Some(&big_body),
        ),
        (404, "not_found", &get, "/api/nothing", key, None),
        (405, "method_not_allowed", &get, "/api/publish", key, None),
        (
            404,
            "not_found",
            &get,
            "/api/topic?topic=room:never",
            key,
            None,
        ),
        (
            404,
            "not_found",
            &get,
            "/api/history?topic=room:never",
            key,
            None,
        ),
        (400, "bad_request", &get, "/api/topic", key, None),
        (
            400,
            "bad_request",
            &get,
            "/api/history?topic=room:x&since_offset=3",
            key,
            None,
        ),
        (
            400,
            "bad_request",
            &get,
            "/api/history?topic=room:x&limit=0",
            key,
            None,
        ),
        (
            400,
            "bad_request",
            &post,
            "/api/disconnect",
            key,
            Some(r#"{"sub":""}"#),
        ),
        (
            400,
            "bad_request",
            &post,
            "/api/broadcast",
            key,
            Some(r#"{"topics":[],"event":"e","payload":1}"#),
        ),
    ];
    for (i, (status, code, method, path, key, body)) in cases.into_iter().enumerate() {
        let (got_status, body) = raw(gw, method.clone(), path, key, body).await;
        assert_eq!(got_status, status, "case {i}: {body}");
        assert_eq!(body["error"]["code"], code, "case {i}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "case {i}: {body}"
        );
    }
    let (_, unknown) = raw(
        gw,
        post,
        "/api/publish",
        key,
        Some(r#"{"topic":"room:x","event":"e","payload":{},"color":"red"}"#),
    )
    .await;
    assert!(
        unknown["error"]["message"]
            .as_str()
            .unwrap()
            .contains("color"),
        "{unknown}"
    );
    let status = gw.status().await;
    assert!(status["api_refused"].as_u64().unwrap() >= 17, "{status}");
}

#[tokio::test]
async fn history_is_all_or_nothing_like_a_recovery() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateways: 1,
        topic_server_env: env(&[("TOPIC_SERVER_LOG_MESSAGES", "3")]),
        ..Default::default()
    })
    .await;
    let gw = &cluster.gateways[0];
    let mut epoch = String::new();
    for n in 1..=5 {
        let (status, answer) = publish(gw, "room:h", n, None).await;
        assert_eq!(
            (status, answer["offset"].as_u64()),
            (200, Some(n)),
            "{answer}"
        );
        epoch = answer["epoch"].as_str().unwrap().to_owned();
    }
    let history = |query: String| async move {
        gw.api(&format!("/api/history?topic=room:h{query}"), None)
            .await
    };
    let offsets = |v: &Value| -> Vec<u64> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect()
    };
    // The log holds 3, 4, 5.
    let (status, all) = history(String::new()).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(offsets(&all), [3, 4, 5]);
    assert_eq!(all["messages"][0]["payload"], json!({"n": 3}));
    assert_eq!(all["messages"][0]["event"], "news");
    assert_eq!(
        (all["epoch"].as_str(), &all["offset"]),
        (Some(epoch.as_str()), &json!(5))
    );
    let (status, after) = history(format!("&epoch={epoch}&since_offset=2")).await;
    assert_eq!((status, offsets(&after)), (200, vec![3, 4, 5]));
    let (status, page) = history(format!("&epoch={epoch}&since_offset=2&limit=2")).await;
    assert_eq!((status, offsets(&page)), (200, vec![3, 4]));
    let (status, none) = history(format!("&epoch={epoch}&since_offset=5")).await;
    assert_eq!((status, offsets(&none)), (200, vec![]));
    // Message 2 is gone: nothing rather than a partial answer, and where the topic is now.
    let (status, gone) = history(format!("&epoch={epoch}&since_offset=1")).await;
    assert_eq!(status, 409, "{gone}");
    assert_eq!(gone["error"]["code"], "unrecoverable_position");
    assert_eq!(
        (gone["error"]["epoch"].as_str(), &gone["error"]["offset"]),
        (Some(epoch.as_str()), &json!(5))
    );
    let (status, other) = history("&epoch=00000000000000ff&since_offset=4".into()).await;
    assert_eq!(status, 409, "another epoch: {other}");
}

fn user_token(sub: &str) -> String {
    let claims = json!({"sub": sub, "subscribe": ["room:*"], "exp": now_secs() + 300});
    sign(None, b"an-hs256-secret-of-at-least-32-bytes", &claims)
}

#[tokio::test]
async fn disconnect_closes_a_users_sockets_on_every_gateway_and_no_one_elses() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateway_env: env(&[(
            "GATEWAY_JWT_SECRETS",
            "an-hs256-secret-of-at-least-32-bytes",
        )]),
        ..Default::default()
    })
    .await;
    let (gw0, gw1) = (&cluster.gateways[0], &cluster.gateways[1]);
    let url = |gw: &Proc, sub: &str| format!("{}&token={}", ws_url(gw.addr), user_token(sub));
    let mut alice0 = WsClient::connect(&url(gw0, "alice")).await;
    let mut alice1 = WsClient::connect(&url(gw1, "alice")).await;
    let mut bob = WsClient::connect(&url(gw1, "bob")).await;
    for client in [&mut alice0, &mut alice1, &mut bob] {
        client.join_ok("room:d", "1").await;
    }
    let (status, answer) = gw0
        .api("/api/disconnect", Some(json!({"sub": "alice"})))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["topic_servers"], 2, "{answer}");
    for alice in [&mut alice0, &mut alice1] {
        assert_eq!(
            alice.recv_end().await,
            Ended::Closed(Some((1008, "disconnected".into())))
        );
    }
    // Bob stays, and still gets messages.
    publish(gw0, "room:d", 1, None).await;
    assert_eq!(bob.recv_json().await[4], json!({"n": 1}));
    assert!(!bob.sync_or_closed().await);
    let disconnected: u64 = [gw0, gw1]
        .iter()
        .map(|gw| async { gw.status().await["disconnected"].as_u64().unwrap() })
        .collect::<futures::future::JoinAll<_>>()
        .await
        .into_iter()
        .sum();
    assert!(disconnected >= 1, "{disconnected}");
}

/// Every sample of a `/metrics` scrape without labels (and histogram counts), by name.
async fn scrape(proc: &Proc) -> HashMap<String, f64> {
    let response = reqwest::get(proc.http("/metrics")).await.expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text scrape");
    let mut values = HashMap::new();
    for sample in scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        if sample.labels.is_empty() {
            values.insert(sample.metric, value);
        }
    }
    values
}

/// Every number `/status` shows has its metric: a counter `<prefix>_<key>_total` or a gauge
/// `<prefix>_<key>`, with the same value when nothing moves.
fn status_in_metrics(
    status: &Value,
    metrics: &HashMap<String, f64>,
    prefix: &str,
    renamed: &[(&str, &str)],
) {
    for (key, value) in status.as_object().unwrap() {
        let Some(value) = value.as_f64() else {
            continue;
        };
        let key = renamed
            .iter()
            .find(|(from, _)| from == key)
            .map_or(key.as_str(), |(_, to)| to);
        let counter = metrics.get(&format!("{prefix}_{key}_total"));
        let gauge = metrics.get(&format!("{prefix}_{key}"));
        let Some(metric) = counter.or(gauge) else {
            panic!("/status {key} has no metric {prefix}_{key}(_total)");
        };
        assert_eq!(*metric, value, "{key}");
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_move_with_traffic() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateways: 1,
        topic_servers: 1,
        ..Default::default()
    })
    .await;
    let (gw, ts) = (&cluster.gateways[0], &cluster.topic_servers[0]);
    let before = scrape(gw).await;
    assert_eq!(before["ringcast_gateway_links_up"], 1.0);
    assert_eq!(before["ringcast_gateway_joins_total"], 0.0);
    let mut a = WsClient::connect(&ws_url(gw.addr)).await;
    let mut b = WsClient::connect(&ws_url(gw.addr)).await;
    a.join_ok("room:m", "1").await;
    b.join_ok("room:m", "1").await;
    for n in 0..5 {
        a.publish("1", "room:m", "e", json!({"n": n})).await;
    }
    b.recv_n(5).await;
    // Nothing moves while the numbers are read twice.
    assert!(!b.sync_or_closed().await);
    let after = scrape(gw).await;
    let g = |name: &str| after[&format!("ringcast_gateway_{name}")];
    assert_eq!(g("joins_total"), 2.0);
    assert_eq!(g("publishes_total"), 5.0);
    assert_eq!(g("connections"), 2.0);
    assert_eq!(g("subscriptions"), 2.0);
    assert_eq!(g("join_latency_seconds_count"), 2.0);
    assert_eq!(g("publish_latency_seconds_count"), 5.0);
    assert!(
        g("delivery_latency_seconds_count") >= 1.0,
        "at least one write carried a delivery"
    );
    assert!(g("publish_latency_seconds_sum") > 0.0);
    status_in_metrics(
        &gw.status().await,
        &scrape(gw).await,
        "ringcast_gateway",
        &[],
    );

    let ts_metrics = scrape(ts).await;
    assert_eq!(ts_metrics["ringcast_topic_server_publishes_total"], 5.0);
    assert_eq!(ts_metrics["ringcast_topic_server_subscriptions"], 2.0);
    assert_eq!(ts_metrics["ringcast_topic_server_topics"], 1.0);
    assert_eq!(ts_metrics["ringcast_topic_server_gateways"], 1.0);
    status_in_metrics(
        &ts.status().await,
        &scrape(ts).await,
        "ringcast_topic_server",
        &[("links_total", "links")],
    );

    // The Grafana dashboard in the repository asks only for metrics that exist.
    let mut known = scrape(gw).await;
    known.extend(scrape(ts).await);
    let dashboard =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/ringcast.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                let base = name.strip_suffix("_bucket").unwrap_or(&name);
                assert!(
                    known.contains_key(base) || known.contains_key(&format!("{base}_count")),
                    "the dashboard asks for {name}, which no process exports"
                );
                asked += 1;
            }
        }
    }
    assert!(asked > 30, "{asked}");

    // A recovering join's replay size is observed: two missed messages.
    let mut p = WsClient::connect(&ws_url(gw.addr)).await;
    let epoch = p.join_ok("room:n", "1").await["epoch"].clone();
    p.publish("1", "room:n", "e", json!({})).await;
    p.publish("1", "room:n", "e", json!({})).await;
    let mut d = WsClient::connect(&ws_url(gw.addr)).await;
    let reply = d
        .join(
            "room:n",
            "1",
            json!({"recover": {"epoch": epoch, "offset": 0}}),
        )
        .await;
    assert_eq!(reply["response"]["recovered"], true, "{reply}");
    let after = scrape(gw).await;
    assert_eq!(after["ringcast_gateway_replay_messages_count"], 1.0);
    assert_eq!(after["ringcast_gateway_replay_messages_sum"], 2.0);
}

/// The `ringcast_...` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("ringcast_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

async fn ready(proc: &Proc) -> (u16, Value) {
    match reqwest::get(proc.http("/health/ready")).await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

async fn wait_ready(proc: &Proc, want: u16) -> Value {
    eventually(
        &format!("{} ready {want}", proc.name),
        EVENT_TIMEOUT,
        || async {
            let (status, body) = ready(proc).await;
            (status == want).then_some(body)
        },
    )
    .await
}

#[tokio::test]
async fn readiness_follows_start_ring_edits_and_drain() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("ring.toml");
    let addrs: Vec<SocketAddr> = (0..2)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let nodes: Vec<(String, SocketAddr)> =
        vec![("ts-0".into(), addrs[0]), ("ts-1".into(), addrs[1])];
    write_ring(&ring, 1, &nodes[..1]);
    let ring_env = ring.display().to_string();
    let topic_server = |i: usize| {
        Proc::spawn(
            &nodes[i].0,
            "topic-server",
            addrs[i],
            &[
                ("TOPIC_SERVER_LISTEN", addrs[i].to_string()),
                ("TOPIC_SERVER_ID", nodes[i].0.clone()),
                ("RING_CONFIG", ring_env.clone()),
            ],
        )
    };
    // A gateway whose topic server is not up yet is live but not ready.
    let gw_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gw = Proc::spawn(
        "gw",
        "gateway",
        gw_addr,
        &[
            ("GATEWAY_LISTEN", gw_addr.to_string()),
            ("RING_CONFIG", ring_env.clone()),
        ],
    );
    let not_ready = wait_ready(&gw, 503).await;
    assert!(
        not_ready["reason"].as_str().unwrap().contains("ts-0"),
        "{not_ready}"
    );
    let live = reqwest::get(gw.http("/health/live")).await.unwrap();
    assert_eq!(live.status(), 200);
    let ts0 = topic_server(0);
    wait_ready(&ts0, 200).await;
    wait_ready(&gw, 200).await;
    // A ring edit names a node that is not up yet: not ready until it is linked.
    write_ring(&ring, 2, &nodes);
    let not_ready = wait_ready(&gw, 503).await;
    assert!(
        not_ready["reason"].as_str().unwrap().contains("ts-1"),
        "{not_ready}"
    );
    let ts1 = topic_server(1);
    wait_ready(&ts1, 200).await;
    wait_ready(&gw, 200).await;
    // Removed from the ring: not ready (its topics belong elsewhere); the gateway is.
    write_ring(&ring, 3, &nodes[1..]);
    let out = wait_ready(&ts0, 503).await;
    assert!(
        out["reason"].as_str().unwrap().contains("not in the ring"),
        "{out}"
    );
    wait_ready(&ts1, 200).await;
    wait_ready(&gw, 200).await;
    // A draining gateway says so at once, while it still closes its connections.
    let mut client = WsClient::connect(&ws_url(gw.addr)).await;
    client.join_ok("room:r", "1").await;
    gw.signal("TERM");
    let draining = wait_ready(&gw, 503).await;
    assert_eq!(draining["reason"], "draining");
    assert_eq!(
        client.recv_end().await,
        Ended::Closed(Some((1012, "server restart".into())))
    );
}

/// A phoenix.js-like client: one task, one socket; on a close it reconnects (phoenix.js's
/// backoff: 10, 50, 100 ms ...) to `fallback` and rejoins with its position.
struct Report {
    /// When the rejoin at the fallback gateway was answered, and whether it recovered.
    rejoined: Option<(Instant, bool)>,
    close: Option<u16>,
}

async fn phoenix_like(
    first: String,
    fallback: String,
    topic: String,
    joined: tokio::sync::mpsc::Sender<()>,
) -> Report {
    let (mut ws, _) = tokio_tungstenite::connect_async(&first)
        .await
        .expect("connect");
    let join = json!(["1", "1", topic, "phx_join", {}]).to_string();
    ws.send(Message::Text(join.into())).await.unwrap();
    let (mut epoch, mut offset) = (Value::Null, 0u64);
    let mut close = None;
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                if frame[3] == "phx_reply" {
                    epoch = frame[4]["response"]["epoch"].clone();
                    offset = frame[4]["response"]["offset"].as_u64().unwrap();
                    joined.send(()).await.unwrap();
                } else {
                    // Deliveries follow the position with no gap.
                    offset += 1;
                }
            }
            Message::Close(frame) => {
                close = frame.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    drop(ws);
    let mut report = Report {
        rejoined: None,
        close,
    };
    for backoff in [10u64, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000] {
        tokio::time::sleep(Duration::from_millis(backoff)).await;
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&fallback).await else {
            continue;
        };
        let rejoin =
            json!(["2", "2", topic, "phx_join", {"recover": {"epoch": epoch, "offset": offset}}]);
        ws.send(Message::Text(rejoin.to_string().into()))
            .await
            .unwrap();
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(text) = message {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                if frame[3] == "phx_reply" {
                    let recovered = frame[4]["response"]["recovered"] == true;
                    report.rejoined = Some((Instant::now(), recovered));
                    return report;
                }
            }
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_gateways_clients_leave_evenly_and_recover_at_another() {
    const CLIENTS: usize = 2000;
    const TOPICS: usize = 50;
    const DRAIN_SECS: u64 = 4;
    let _ = rlimit::increase_nofile_limit(16_384);
    let mut cluster = Cluster::start_with(ClusterSpec {
        gateway_env: env(&[
            ("GATEWAY_DRAIN_SECS", "4"),
            ("GATEWAY_MAX_PENDING_HTTP", "4096"),
        ]),
        ..Default::default()
    })
    .await;
    let mut drained = cluster.gateways.remove(0);
    let other = &cluster.gateways[0];
    let (first, fallback) = (ws_url(drained.addr), ws_url(other.addr));
    let (joined_tx, mut joined_rx) = tokio::sync::mpsc::channel(CLIENTS);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let topic = format!("room:drain-{}", i % TOPICS);
            tokio::spawn(phoenix_like(
                first.clone(),
                fallback.clone(),
                topic,
                joined_tx.clone(),
            ))
        })
        .collect();
    for _ in 0..CLIENTS {
        tokio::time::timeout(Duration::from_secs(60), joined_rx.recv())
            .await
            .expect("every client joined");
    }
    // Messages keep coming while the clients move: they must miss none of them.
    let publishing = {
        let url = other.api_url("/api/publish");
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 0u64.. {
                let topic = format!("room:drain-{}", n as usize % TOPICS);
                let body = json!({"topic": topic, "event": "news", "payload": {"n": n}});
                let sent = client
                    .post(&url)
                    .bearer_auth(ringcast_tests::cluster::TEST_API_KEY)
                    .json(&body)
                    .send()
                    .await;
                assert_eq!(sent.expect("publish").status(), 200);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let start = Instant::now();
    drained.signal("TERM");
    let mut reports = Vec::with_capacity(CLIENTS);
    for client in clients {
        let report = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .expect("client ended")
            .unwrap();
        reports.push(report);
    }
    publishing.abort();
    let closes: Vec<Option<u16>> = reports.iter().map(|r| r.close).collect();
    assert!(
        closes.iter().all(|c| *c == Some(1012)),
        "{:?}",
        &closes[..10]
    );
    let rejoined: Vec<(Duration, bool)> = reports
        .iter()
        .map(|r| {
            let (at, recovered) = r
                .rejoined
                .expect("every client rejoined at the other gateway");
            (at - start, recovered)
        })
        .collect();
    let recovered = rejoined.iter().filter(|(_, r)| *r).count();
    assert_eq!(recovered, CLIENTS, "rejoins with recovered: true");
    // Arrivals at the other gateway, per 250 ms: spread over the drain, never all at once.
    let mut buckets = vec![0usize; 64];
    for (at, _) in &rejoined {
        buckets[(at.as_millis() / 250).min(63) as usize] += 1;
    }
    let busiest = *buckets.iter().max().unwrap();
    let last = rejoined.iter().map(|(at, _)| *at).max().unwrap();
    let even = CLIENTS as f64 / (DRAIN_SECS as f64 * 4.0);
    eprintln!(
        "drain of {CLIENTS} over {DRAIN_SECS} s: rejoins per 250 ms {:?}; busiest {busiest} (even: {even:.0}); last at {last:?}",
        &buckets[..24]
    );
    assert!(
        busiest as f64 <= even * 2.0,
        "a burst of {busiest} rejoins in 250 ms (even: {even})"
    );
    assert!(
        last >= Duration::from_secs(DRAIN_SECS) * 3 / 4,
        "the drain took {last:?}"
    );
    assert!(
        last <= Duration::from_secs(DRAIN_SECS + 5),
        "the drain took {last:?}"
    );
    let status = tokio::task::spawn_blocking(move || drained.terminate())
        .await
        .unwrap()
        .expect("the drained gateway exited");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_second_sigterm_closes_the_rest_at_once() {
    let cluster = Cluster::start_with(ClusterSpec {
        gateways: 1,
        topic_servers: 1,
        gateway_env: env(&[("GATEWAY_DRAIN_SECS", "600")]),
        ..Default::default()
    })
    .await;
    let gw = &cluster.gateways[0];
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut c = WsClient::connect(&ws_url(gw.addr)).await;
        c.join_ok("room:t", "1").await;
        clients.push(c);
    }
    gw.signal("TERM");
    // One connection per tick of a 600 s drain: the first goes now, the rest would take ten
    // minutes; a second SIGTERM ends it.
    assert_eq!(
        clients[0].recv_end().await,
        Ended::Closed(Some((1012, "server restart".into())))
    );
    wait_ready(gw, 503).await;
    gw.signal("TERM");
    let started = Instant::now();
    for c in &mut clients[1..] {
        assert_eq!(
            c.recv_end().await,
            Ended::Closed(Some((1012, "server restart".into())))
        );
    }
    assert!(started.elapsed() < EVENT_TIMEOUT);
}
