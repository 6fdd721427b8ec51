//! The README's websocat session, byte for byte, on a real 2 + 2 cluster.

use ringcast_tests::{Cluster, WsClient};

#[tokio::test]
async fn the_seed_transcript_byte_for_byte() {
    let cluster = Cluster::start().await;
    let mut a = WsClient::connect(&cluster.ws_url(0)).await;
    let mut b = WsClient::connect(&cluster.ws_url(1)).await;

    a.send_text(r#"["1", "1", "topics:matrix", "phx_join", {}]"#)
        .await;
    let reply_a = a.recv_text().await;
    let epoch: String = {
        let v: serde_json::Value = serde_json::from_str(&reply_a).unwrap();
        v[4]["response"]["epoch"]
            .as_str()
            .expect("epoch in join reply")
            .to_owned()
    };
    assert_eq!(
        reply_a,
        format!(
            r#"["1","1","topics:matrix","phx_reply",{{"status":"ok","response":{{"epoch":"{epoch}","offset":0}}}}]"#
        )
    );

    b.send_text(r#"["1", "1", "topics:matrix", "phx_join", {}]"#)
        .await;
    assert_eq!(
        b.recv_text().await,
        format!(
            r#"["1","1","topics:matrix","phx_reply",{{"status":"ok","response":{{"epoch":"{epoch}","offset":0}}}}]"#
        ),
        "both gateways see the same topic state at its owner"
    );

    b.send_text(r#"["1", "1", "topics:matrix", "publish", ["event", { "message": "red pill or blue pill?"}]]"#).await;
    assert_eq!(
        b.recv_text().await,
        format!(
            r#"["1","1","topics:matrix","phx_reply",{{"status":"ok","response":{{"epoch":"{epoch}","offset":1}}}}]"#
        ),
        "the publisher's reply says where its message went"
    );
    let event = r#"["1",null,"topics:matrix","event",{"message":"red pill or blue pill?"}]"#;
    assert_eq!(
        b.recv_text().await,
        event,
        "the sender receives its own message"
    );
    assert_eq!(a.recv_text().await, event);

    a.send_text(r#"[null,"3","phoenix","heartbeat",{}]"#).await;
    assert_eq!(
        a.recv_text().await,
        r#"[null,"3","phoenix","phx_reply",{"status":"ok","response":{}}]"#
    );
    // A heartbeat's reply carries a null join_ref whatever the client put there.
    a.send_text(r#"["9","5","phoenix","heartbeat",{}]"#).await;
    assert_eq!(
        a.recv_text().await,
        r#"[null,"5","phoenix","phx_reply",{"status":"ok","response":{}}]"#
    );

    a.send_text(r#"["1","4","topics:matrix","phx_leave",{}]"#)
        .await;
    assert_eq!(
        a.recv_text().await,
        r#"["1","4","topics:matrix","phx_reply",{"status":"ok","response":{}}]"#
    );
    assert_eq!(
        a.recv_text().await,
        r#"["1","1","topics:matrix","phx_close",{}]"#
    );

    // After leaving, a's messages no longer arrive there.
    b.send_text(r#"["1","5","topics:matrix","publish",["event",{"n":2}]]"#)
        .await;
    assert_eq!(
        b.recv_text().await,
        format!(
            r#"["1","5","topics:matrix","phx_reply",{{"status":"ok","response":{{"epoch":"{epoch}","offset":2}}}}]"#
        )
    );
    assert_eq!(
        b.recv_text().await,
        r#"["1",null,"topics:matrix","event",{"n":2}]"#
    );
    assert!(
        a.sync().await.is_empty(),
        "a left the topic and must receive nothing"
    );
}
