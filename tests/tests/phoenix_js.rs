//! The official Phoenix JavaScript client (npm `phoenix` 1.8, `ws` transport under Node)
//! against a real 2 + 2 cluster: join, publish, receive, leave, errors.

use ringcast_tests::{Cluster, NodeClient, WsClient};
use serde_json::json;

#[tokio::test]
async fn phoenix_js_joins_publishes_and_receives_across_gateways() {
    let cluster = Cluster::start().await;
    let mut js_a = NodeClient::connect(&cluster.socket_url(0)).await;
    let mut js_b = NodeClient::connect(&cluster.socket_url(1)).await;
    let mut raw = WsClient::connect(&cluster.ws_url(1)).await;

    let joined = js_a.join("topics:matrix", json!({})).await;
    assert_eq!(joined["ev"], "join_ok", "{joined}");
    assert_eq!(joined["response"]["offset"], 0);
    assert!(joined["response"]["epoch"].is_string());
    assert_eq!(js_b.join("topics:matrix", json!({})).await["ev"], "join_ok");
    raw.join_ok("topics:matrix", "1").await;

    // A chat client's channel.push("new_msg", {body}) reaches everyone.
    js_a.push(
        "topics:matrix",
        "new_msg",
        json!({"body": "hello from phoenix.js"}),
    )
    .await;
    let reply = js_a.next_event().await;
    let own = js_a.next_event().await;
    assert_eq!(reply["ev"], "push_ok", "{reply}");
    assert_eq!(
        own,
        json!({"ev": "message", "topic": "topics:matrix", "event": "new_msg", "payload": {"body": "hello from phoenix.js"}})
    );
    assert_eq!(js_b.next_event().await, own);
    assert_eq!(
        raw.recv_text().await,
        r#"["1",null,"topics:matrix","new_msg",{"body":"hello from phoenix.js"}]"#
    );

    // publish with [event, payload] from a raw client reaches phoenix.js with its join_ref.
    raw.publish(
        "1",
        "topics:matrix",
        "event",
        json!({"message": "red pill or blue pill?"}),
    )
    .await;
    let expected = json!({"ev": "message", "topic": "topics:matrix", "event": "event", "payload": {"message": "red pill or blue pill?"}});
    assert_eq!(js_a.next_event().await, expected);
    assert_eq!(js_b.next_event().await, expected);

    // Non-object payloads do not break phoenix.js.
    js_b.push("topics:matrix", "publish", json!(["list", [1, 2, 3]]))
        .await;
    assert_eq!(js_b.next_event().await["ev"], "push_ok");
    assert_eq!(js_b.next_event().await["payload"], json!([1, 2, 3]));
    assert_eq!(js_a.next_event().await["payload"], json!([1, 2, 3]));

    js_a.leave("topics:matrix").await;
    let mut events = vec![js_a.next_event().await, js_a.next_event().await];
    events.sort_by_key(|e| e["ev"].as_str().unwrap_or_default().to_owned());
    assert_eq!(events[0]["ev"], "channel_close", "{events:?}");
    assert_eq!(events[1]["ev"], "leave_ok", "{events:?}");
    cluster.gateways[0]
        .wait_status("phoenix.js subscription released", |s| {
            s["subscriptions"] == 0
        })
        .await;
}

#[tokio::test]
async fn phoenix_js_sees_join_errors() {
    let cluster = Cluster::start_with(ringcast_tests::ClusterSpec {
        gateway_env: vec![("GATEWAY_TOPICS".into(), "room:*".into())],
        ..Default::default()
    })
    .await;
    let mut js = NodeClient::connect(&cluster.socket_url(0)).await;
    let denied = js.join("secret:1", json!({})).await;
    assert_eq!(
        denied,
        json!({"ev": "join_error", "topic": "secret:1", "response": {"reason": "unmatched topic"}})
    );
    assert_eq!(js.join("room:1", json!({})).await["ev"], "join_ok");
}
