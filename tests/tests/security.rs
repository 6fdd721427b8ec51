//! Who may connect, join and publish, and who may talk to a topic server: tokens signed by
//! the user's backend (connection and join tokens, keys with ids, patterns with `{sub}`,
//! expiry), browser origins, phoenix.js's `params` and `authToken`, and the cluster secret
//! on every gRPC call; a topic server never obeys a peer's word for where to dial or which
//! ring is in force.

use futures::StreamExt;
use ringcast_proto::take_reply::Outcome;
use ringcast_proto::{TakeRequest, TopicServerClient, Up, UpBatch, down};
use ringcast_tests::jwt::now_secs as now;
use ringcast_tests::ws::Ended;
use ringcast_tests::{Cluster, ClusterSpec, EVENT_TIMEOUT, NodeClient, WsClient};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SECRET: &str = "k1:an-hs256-secret-of-at-least-32-bytes";
const KEY: &[u8] = b"an-hs256-secret-of-at-least-32-bytes";
const CLUSTER_SECRET: &str = "the-cluster-secret-0123456789";

fn sign(kid: Option<&str>, key: &[u8], claims: Value) -> String {
    ringcast_tests::jwt::sign(kid, key, &claims)
}

/// A connection token of user 42 for the claims given, valid for a minute.
fn token(claims: Value) -> String {
    let mut claims = claims;
    claims["sub"] = json!("42");
    claims["exp"] = json!(now() + 60);
    sign(Some("k1"), KEY, claims)
}

async fn secured(extra_gateway_env: &[(&str, &str)]) -> Cluster {
    let mut gateway_env = vec![
        ("GATEWAY_JWT_SECRETS".to_owned(), SECRET.to_owned()),
        ("GATEWAY_JWT_LEEWAY_SECS".to_owned(), "0".to_owned()),
        ("CLUSTER_SECRET".to_owned(), CLUSTER_SECRET.to_owned()),
    ];
    gateway_env.extend(ringcast_tests::cluster::env(extra_gateway_env));
    Cluster::start_with(ClusterSpec {
        gateway_env,
        topic_server_env: vec![("CLUSTER_SECRET".into(), CLUSTER_SECRET.into())],
        ..Default::default()
    })
    .await
}

fn with_token(url: &str, token: &str) -> String {
    format!("{url}&token={token}")
}

/// The HTTP status and body a refused websocket upgrade got.
async fn refused(url: &str, origin: Option<&str>) -> (u16, String) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => panic!("{url} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            (
                response.status().as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
            )
        }
        Err(e) => panic!("{url}: {e}"),
    }
}

#[tokio::test]
async fn a_connection_needs_a_valid_token() {
    let cluster = secured(&[]).await;
    let url = cluster.ws_url(0);
    let good = token(json!({"subscribe": ["room:*"]}));
    let mut client = WsClient::connect(&with_token(&url, &good)).await;
    client.join_ok("room:1", "1").await;

    let expired = sign(Some("k1"), KEY, json!({"sub": "42", "exp": now() - 10}));
    let wrong_key = sign(
        Some("k1"),
        b"another-secret-of-at-least-32-bytes!!",
        json!({"sub": "42", "exp": now() + 60}),
    );
    let wrong_kid = sign(Some("k9"), KEY, json!({"sub": "42", "exp": now() + 60}));
    for (url, reason) in [
        (url.clone(), "no token"),
        (with_token(&url, &expired), "token expired"),
        (with_token(&url, &wrong_key), "bad token signature"),
        (with_token(&url, &wrong_kid), "unknown key id"),
        (with_token(&url, "garbage"), "malformed token"),
    ] {
        let (status, body) = refused(&url, None).await;
        assert_eq!(status, 403, "{reason}");
        assert!(body.contains(reason), "{body} says {reason}");
    }
    let status = cluster.gateways[0].status().await;
    assert!(
        status["refused_connections"].as_u64() >= Some(5),
        "{status}"
    );
}

#[tokio::test]
async fn patterns_decide_what_a_user_may_join_and_publish() {
    let cluster = secured(&[]).await;
    let url = cluster.ws_url(0);
    let claims = json!({"subscribe": ["room:*", "user:{sub}"], "publish": ["room:lobby"]});
    let mut alice = WsClient::connect(&with_token(&url, &token(claims))).await;
    let reader = token(json!({"subscribe": ["room:*"]}));
    let mut bob = WsClient::connect(&with_token(&url, &reader)).await;

    alice.join_ok("user:42", "1").await;
    let other = alice.join("user:43", "2", json!({})).await;
    assert_eq!(other["response"]["reason"], "unauthorized", "{other}");
    alice.join_ok("room:1", "3").await;
    bob.join_ok("room:1", "1").await;
    // Subscribing is allowed, publishing is not: refused, and it reaches nobody.
    alice
        .send_json(json!(["3", "p1", "room:1", "publish", ["m", "forged"]]))
        .await;
    let (_, reply) = alice.reply_to("p1", "error").await;
    assert_eq!(reply[4]["response"]["reason"], "unauthorized");
    let seen = bob.sync().await;
    assert!(seen.iter().all(|f| f[3] != "m"), "{seen:?}");
    // Where publishing is allowed, it goes through.
    alice.join_ok("room:lobby", "4").await;
    bob.join_ok("room:lobby", "2").await;
    alice
        .publish_reply("4", "room:lobby", "m", json!("hi"))
        .await;
    assert_eq!(bob.recv_json().await[4], "hi");
}

#[tokio::test]
async fn a_join_token_opens_one_topic_for_one_user() {
    let cluster = secured(&[]).await;
    let url = cluster.ws_url(0);
    let mut client = WsClient::connect(&with_token(&url, &token(json!({})))).await;
    let join_token = |sub: &str, topic: &str, publish: bool| {
        sign(
            Some("k1"),
            KEY,
            json!({"sub": sub, "topic": topic, "publish": publish, "exp": now() + 60}),
        )
    };
    let refused = client.join("vip:1", "1", json!({})).await;
    assert_eq!(refused["response"]["reason"], "unauthorized");
    let someone_else = client
        .join(
            "vip:1",
            "2",
            json!({"token": join_token("7", "vip:1", false)}),
        )
        .await;
    assert_eq!(someone_else["response"]["reason"], "unauthorized");
    let other_topic = client
        .join(
            "vip:1",
            "3",
            json!({"token": join_token("42", "vip:2", false)}),
        )
        .await;
    assert_eq!(other_topic["response"]["reason"], "unauthorized");
    let read_only = client
        .join(
            "vip:1",
            "4",
            json!({"token": join_token("42", "vip:1", false)}),
        )
        .await;
    assert_eq!(read_only["status"], "ok", "{read_only}");
    client
        .send_json(json!(["4", "p", "vip:1", "publish", ["m", 1]]))
        .await;
    let (_, reply) = client.reply_to("p", "error").await;
    assert_eq!(reply[4]["response"]["reason"], "unauthorized");
    let writer = client
        .join(
            "vip:2",
            "5",
            json!({"token": join_token("42", "vip:2", true)}),
        )
        .await;
    assert_eq!(writer["status"], "ok", "{writer}");
    client.publish_reply("5", "vip:2", "m", json!(2)).await;
}

#[tokio::test]
async fn an_expiring_token_closes_its_socket_with_a_reason() {
    let cluster = secured(&[]).await;
    let short = sign(
        Some("k1"),
        KEY,
        json!({"sub": "42", "exp": now() + 2, "subscribe": ["room:*"]}),
    );
    let mut client = WsClient::connect(&with_token(&cluster.ws_url(0), &short)).await;
    client.join_ok("room:1", "1").await;
    assert_eq!(
        client.recv_end().await,
        Ended::Closed(Some((1008, "token expired".into())))
    );
}

#[tokio::test]
async fn browsers_from_other_origins_are_refused() {
    let cluster = secured(&[(
        "GATEWAY_ALLOWED_ORIGINS",
        "https://app.example.com,*.example.org",
    )])
    .await;
    let url = with_token(&cluster.ws_url(0), &token(json!({})));
    let (status, body) = refused(&url, Some("https://evil.example")).await;
    assert_eq!((status, body.as_str()), (403, "origin not allowed"));
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    for origin in [
        Some("https://app.example.com"),
        Some("https://a.example.org"),
        None,
    ] {
        let mut request = url.as_str().into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|e| panic!("{origin:?}: {e}"));
    }
}

#[tokio::test]
async fn phoenix_js_authenticates_with_params_or_auth_token() {
    let cluster = secured(&[]).await;
    let url = cluster.socket_url(0);
    let token = token(json!({"subscribe": ["room:*"]}));
    let mut by_params = NodeClient::connect_with(&url, json!({"params": {"token": token}})).await;
    assert_eq!(by_params.join("room:js", json!({})).await["ev"], "join_ok");
    let mut by_subprotocol = NodeClient::connect_with(&url, json!({"authToken": token})).await;
    assert_eq!(
        by_subprotocol.join("room:js", json!({})).await["ev"],
        "join_ok"
    );
    let refused = by_subprotocol.join("secret:1", json!({})).await;
    assert_eq!(
        refused,
        json!({"ev": "join_error", "topic": "secret:1", "response": {"reason": "unauthorized"}})
    );
    // Without a token the socket never opens.
    let mut anonymous = NodeClient::start(&url, json!({})).await;
    let first = anonymous.next_event().await;
    assert_ne!(first["ev"], "open", "{first}");
}

async fn grpc(addr: std::net::SocketAddr) -> TopicServerClient<tonic::transport::Channel> {
    TopicServerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

fn with_secret<T>(message: T, secret: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(secret) = secret {
        request
            .metadata_mut()
            .insert(ringcast_proto::auth::SECRET_HEADER, secret.parse().unwrap());
    }
    request
}

fn hello_stream() -> (mpsc::Sender<UpBatch>, ReceiverStream<UpBatch>) {
    let (up, rx) = mpsc::channel(16);
    up.try_send(UpBatch {
        ring_version: 1,
        items: vec![Up::hello("intruder".into(), 7, 1)],
    })
    .unwrap();
    (up, ReceiverStream::new(rx))
}

#[tokio::test]
async fn topic_servers_serve_members_of_the_cluster_only() {
    let cluster = secured(&[]).await;
    let addr = cluster.topic_servers[0].addr;
    let take = TakeRequest {
        node_id: "intruder".into(),
        ring_version: 1,
        topic: "room:1".into(),
        addr: String::new(),
    };
    for secret in [None, Some("not-the-cluster-secret-at-all")] {
        let (_up, stream) = hello_stream();
        let attach = grpc(addr).await.attach(with_secret(stream, secret)).await;
        assert_eq!(attach.unwrap_err().code(), tonic::Code::Unauthenticated);
        let taken = grpc(addr)
            .await
            .take(with_secret(take.clone(), secret))
            .await;
        assert_eq!(taken.unwrap_err().code(), tonic::Code::Unauthenticated);
    }
    let (_up, stream) = hello_stream();
    let attached = grpc(addr)
        .await
        .attach(with_secret(stream, Some(CLUSTER_SECRET)))
        .await;
    assert!(attached.is_ok(), "a member is served");
}

/// A topic owned by topic server `ts` (by index) under the cluster's ring.
fn topic_on(cluster: &Cluster, ts: usize) -> String {
    cluster.topic_on(ts, "guarded")
}

#[tokio::test]
async fn a_take_under_a_ring_nobody_mentioned_is_not_obeyed() {
    let cluster = secured(&[]).await;
    let topic = topic_on(&cluster, 0);
    let url = cluster.ws_url(0);
    let mut client = WsClient::connect(&with_token(
        &url,
        &token(json!({"subscribe": ["*"], "publish": ["*"]})),
    ))
    .await;
    client.join_ok(&topic, "1").await;
    client.publish_reply("1", &topic, "m", json!(1)).await;
    let take = TakeRequest {
        node_id: "intruder".into(),
        ring_version: u64::MAX,
        topic: topic.clone(),
        addr: String::new(),
    };
    let reply = grpc(cluster.topic_servers[0].addr)
        .await
        .take(with_secret(take, Some(CLUSTER_SECRET)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.outcome(), Outcome::Busy, "not obeyed: {reply:?}");
    // The topic is still served where it was, numbering continued.
    let at = client.publish_reply("1", &topic, "m", json!(2)).await;
    assert_eq!(at["offset"], 2, "{at}");
    let mut late = WsClient::connect(&with_token(&url, &token(json!({"subscribe": ["*"]})))).await;
    let joined = late.join_ok(&topic, "1").await;
    assert_eq!(joined["offset"], 2);
    let status = cluster.topic_servers[0].status().await;
    assert_eq!(status["handoffs_out"], 0, "{status}");
}

#[tokio::test]
async fn a_previous_owner_outside_the_ring_is_never_dialed() {
    let cluster = secured(&[]).await;
    let topic = topic_on(&cluster, 0);
    // Where a forged request says the topic was: a listener of this test.
    let bait = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (up, stream) = hello_stream();
    let mut down = grpc(cluster.topic_servers[0].addr)
        .await
        .attach(with_secret(stream, Some(CLUSTER_SECRET)))
        .await
        .unwrap()
        .into_inner();
    let subscribe = Up::subscribe(7, topic.clone(), 1, None)
        .with_previous_owner(Some(bait.local_addr().unwrap().to_string()));
    up.send(UpBatch {
        ring_version: 1,
        items: vec![subscribe],
    })
    .await
    .unwrap();
    let acked = tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(Ok(batch)) = down.next().await {
            for item in batch.items {
                if let Some(down::Kind::Ack(ack)) = item.kind
                    && ack.request_id == 7
                {
                    return ack;
                }
            }
        }
        panic!("stream ended");
    })
    .await
    .expect("the subscription is served");
    assert_eq!(acked.position.unwrap().offset, 0, "a fresh topic");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), bait.accept())
            .await
            .is_err(),
        "the topic server dialed the address a request named"
    );
}
