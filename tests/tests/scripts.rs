//! `scripts/cluster.sh` and the phoenix.js example, run as a user would run them.

use ringcast_tests::cluster::{bin_path, free_port};
use ringcast_tests::{EVENT_TIMEOUT, WsClient};
use std::path::PathBuf;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

#[tokio::test]
async fn cluster_script_runs_the_transcript_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let gateways = [free_port(), free_port()];
    let topic_servers = [free_port(), free_port()];
    let bin_dir = bin_path("gateway").parent().unwrap().to_path_buf();
    let api = [free_port(), free_port()];
    let mut script = Command::new("bash")
        .arg(repo().join("scripts/cluster.sh"))
        .env("GATEWAY_PORTS", format!("{},{}", gateways[0], gateways[1]))
        .env(
            "TOPIC_SERVER_PORTS",
            format!("{},{}", topic_servers[0], topic_servers[1]),
        )
        .env(
            "GATEWAY_ADMIN_PORTS",
            format!("{},{}", free_port(), free_port()),
        )
        .env(
            "TOPIC_SERVER_ADMIN_PORTS",
            format!("{},{}", free_port(), free_port()),
        )
        .env("GATEWAY_API_PORTS", format!("{},{}", api[0], api[1]))
        .env("RING_FILE", dir.path().join("ring.toml"))
        .env("RINGCAST_BIN_DIR", &bin_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run scripts/cluster.sh");
    let mut lines = BufReader::new(script.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == "READY" {
                return;
            }
            printed.push(line);
        }
        panic!("cluster.sh ended before READY: {printed:?}");
    })
    .await
    .expect("cluster.sh did not become ready");
    let url0 = format!("ws://127.0.0.1:{}/socket/websocket?vsn=2.0.0", gateways[0]);
    assert!(
        printed.iter().any(|l| l.contains(&url0)),
        "prints the gateway URLs: {printed:?}"
    );

    let ring = std::fs::read_to_string(dir.path().join("ring.toml")).unwrap();
    assert!(
        ring.contains(&format!("127.0.0.1:{}", topic_servers[1])),
        "{ring}"
    );

    let mut a = WsClient::connect(&url0).await;
    let mut b = WsClient::connect(&format!(
        "ws://127.0.0.1:{}/socket/websocket?vsn=2.0.0",
        gateways[1]
    ))
    .await;
    a.join_ok("topics:matrix", "1").await;
    b.join_ok("topics:matrix", "1").await;
    b.send_text(r#"["1", "1", "topics:matrix", "publish", ["event", { "message": "red pill or blue pill?"}]]"#).await;
    let event = r#"["1",null,"topics:matrix","event",{"message":"red pill or blue pill?"}]"#;
    assert_eq!(a.recv_text().await, event);

    // The phoenix.js example publishes and sees its message come back through the cluster.
    ringcast_tests::node::ensure_npm_packages_in(&repo().join("scripts"));
    let example = Command::new("node")
        .arg(repo().join("scripts/phoenix-client.mjs"))
        .arg(format!("ws://127.0.0.1:{}/socket", gateways[1]))
        .arg("topics:matrix")
        .arg("hello from the example")
        .output();
    let example = tokio::time::timeout(EVENT_TIMEOUT, example)
        .await
        .expect("example finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&example.stdout);
    assert!(
        example.status.success(),
        "example failed: {stdout} {}",
        String::from_utf8_lossy(&example.stderr)
    );
    assert!(stdout.contains("joined topics:matrix"), "{stdout}");
    assert!(
        stdout.contains(r#"event {"message":"hello from the example"}"#),
        "{stdout}"
    );
    assert_eq!(
        a.recv_text().await,
        r#"["1",null,"topics:matrix","event",{"message":"hello from the example"}]"#
    );

    // The backend API, with the development key the script prints.
    assert!(
        printed
            .iter()
            .any(|l| l.contains("Bearer dev-api-key-change-me")),
        "prints the API key and a curl example: {printed:?}"
    );
    let published = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/publish", api[1]))
        .bearer_auth("dev-api-key-change-me")
        .json(&serde_json::json!({"topic": "topics:matrix", "event": "news", "payload": {"from": "backend"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 200);
    assert_eq!(
        a.recv_text().await,
        r#"["1",null,"topics:matrix","news",{"from":"backend"}]"#
    );

    let pid = script.id().unwrap();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(EVENT_TIMEOUT, script.wait())
        .await
        .expect("cluster.sh stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        a.sync_or_closed().await,
        "gateways are gone after cluster.sh exits"
    );
    for port in gateways.iter().chain(&topic_servers) {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_err(),
            "port {port} still open"
        );
    }
}

#[tokio::test]
async fn cluster_script_names_a_bad_port_variable() {
    let out = Command::new("bash")
        .arg(repo().join("scripts/cluster.sh"))
        .env("GATEWAY_PORTS", "4000,http")
        .env("RINGCAST_BIN_DIR", "/nonexistent")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("GATEWAY_PORTS") && stderr.contains("http"),
        "{stderr}"
    );
}
