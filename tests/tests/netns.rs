//! The cluster as on separate machines: each process in a network namespace of its own, with
//! its own address on a private bridge (10.77.0.0/24, in a namespace of its own too: nothing
//! is added to the machine's own network). Off loopback, the protected modes and the cluster
//! secret are exercised for real: a topic server or gateway reachable from other hosts with
//! no credentials refuses to start, a gateway without the cluster secret is refused by the
//! topic servers, and a client on a fourth host connects with a token and is served.
//!
//! Needs root and `ip` (iproute2), as CI has; every namespace made is deleted at the end.

use ringcast_tests::NodeClient;
use ringcast_tests::cluster::bin_path;
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SECRET: &str = "k1:an-hs256-secret-of-at-least-32-bytes";
const CLUSTER_SECRET: &str = "netns-cluster-secret-0123456789";

/// The namespaces of one test run, deleted when dropped.
struct Hosts {
    prefix: String,
    names: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Hosts {
    /// A switch namespace with a bridge, and one namespace per `(name, last octet)` joined to
    /// it by a veth pair, with address 10.77.0.<octet>.
    fn new(hosts: &[(&str, u8)]) -> Hosts {
        let prefix = format!("rc{}", std::process::id());
        let switch = format!("{prefix}-sw");
        let mut made = Hosts {
            prefix: prefix.clone(),
            names: vec![switch.clone()],
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "set", "lo", "up"]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for (name, octet) in hosts {
            let ns = made.ns(name);
            ip(&["netns", "add", &ns]);
            made.names.push(ns.clone());
            let port = format!("v{name}");
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{octet}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        made
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Starts `binary` in host `name`'s namespace with `env`, its log (warn) piped.
    fn spawn(&self, name: &str, binary: &str, env: &[(&str, &str)]) -> Child {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns(name)])
            .arg(bin_path(binary))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        command.spawn().expect("start a process in its namespace")
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
    }
}

/// Waits for `child` to exit by itself; its status and what it printed.
async fn exits(mut child: Child) -> (bool, String) {
    let mut stderr = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            stderr.push_str(&line);
            stderr.push('\n');
        }
        child.wait().await.unwrap()
    })
    .await
    .expect("the process refuses to start and exits");
    (status.success(), stderr)
}

/// Waits until `child` logs a line containing `needle`.
async fn logs(child: &mut Child, needle: &str) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the process ended without logging {needle}");
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with {needle}"));
    // Keep reading so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

/// Joins `topic` until the join is accepted (links may still be connecting).
async fn join_until_ok(client: &mut NodeClient, topic: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let event = client.join(topic, json!({})).await;
            if event["ev"] == "join_ok" {
                return event;
            }
            client.send(json!({"op": "leave", "topic": topic})).await;
            let _ = client.next_event().await;
        }
    })
    .await
    .expect("joined in time")
}

fn token() -> String {
    let exp = ringcast_tests::jwt::now_secs() + 600;
    let claims = json!({"sub": "42", "exp": exp, "subscribe": ["room:*"], "publish": ["room:*"]});
    ringcast_tests::jwt::sign(Some("k1"), b"an-hs256-secret-of-at-least-32-bytes", &claims)
}

#[tokio::test]
async fn a_cluster_over_separate_hosts_trusts_only_its_members() {
    if std::env::var_os("RINGCAST_SKIP_NETNS").is_some() {
        eprintln!("RINGCAST_SKIP_NETNS is set: not run");
        return;
    }
    let hosts = Hosts::new(&[("a", 2), ("b", 3), ("g", 4), ("x", 5), ("c", 9)]);
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("ring.toml");
    std::fs::write(
        &ring,
        "version = 1\n[[nodes]]\nid = \"ts-a\"\naddr = \"10.77.0.2:7001\"\n\
         [[nodes]]\nid = \"ts-b\"\naddr = \"10.77.0.3:7001\"\n",
    )
    .unwrap();
    let ring = ring.to_str().unwrap();

    // Reachable from other hosts without a cluster secret: refused (protected mode).
    let open = hosts.spawn(
        "a",
        "topic-server",
        &[
            ("TOPIC_SERVER_ID", "ts-a"),
            ("TOPIC_SERVER_LISTEN", "10.77.0.2:7001"),
            ("RING_CONFIG", ring),
        ],
    );
    let (ok, said) = exits(open).await;
    assert!(!ok && said.contains("protected mode"), "{said}");
    let topic_server = |host: &str, id: &str, addr: &str| {
        hosts.spawn(
            host,
            "topic-server",
            &[
                ("TOPIC_SERVER_ID", id),
                ("TOPIC_SERVER_LISTEN", addr),
                ("RING_CONFIG", ring),
                ("CLUSTER_SECRET", CLUSTER_SECRET),
            ],
        )
    };
    let _ts_a = topic_server("a", "ts-a", "10.77.0.2:7001");
    let _ts_b = topic_server("b", "ts-b", "10.77.0.3:7001");

    // A gateway reachable from other hosts with no token keys: refused too.
    let open = hosts.spawn(
        "g",
        "gateway",
        &[
            ("GATEWAY_LISTEN", "10.77.0.4:4000"),
            ("RING_CONFIG", ring),
            ("CLUSTER_SECRET", CLUSTER_SECRET),
        ],
    );
    let (ok, said) = exits(open).await;
    assert!(!ok && said.contains("protected mode"), "{said}");

    // A gateway that does not know the cluster secret is refused by the topic servers.
    let mut intruder = hosts.spawn(
        "x",
        "gateway",
        &[
            ("GATEWAY_LISTEN", "10.77.0.5:4000"),
            ("RING_CONFIG", ring),
            ("GATEWAY_JWT_SECRETS", SECRET),
        ],
    );
    let refusal = logs(&mut intruder, "upstream link cannot connect").await;
    assert!(
        refusal.contains("not from a member of the cluster"),
        "{refusal}"
    );

    // The real gateway: tokens required, the cluster secret sent.
    let _gateway = hosts.spawn(
        "g",
        "gateway",
        &[
            ("GATEWAY_LISTEN", "10.77.0.4:4000"),
            ("RING_CONFIG", ring),
            ("GATEWAY_JWT_SECRETS", SECRET),
            ("CLUSTER_SECRET", CLUSTER_SECRET),
        ],
    );
    let client_ns = hosts.ns("c");
    let url = "ws://10.77.0.4:4000/socket";
    let mut client =
        NodeClient::start_in(Some(&client_ns), url, json!({"params": {"token": token()}})).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if client.next_event().await["ev"] == "open" {
                return;
            }
        }
    })
    .await
    .expect("the client on its own host connects");
    for topic in ["room:1", "room:2", "room:3"] {
        join_until_ok(&mut client, topic).await;
        client
            .send(
                json!({"op": "push", "topic": topic, "event": "new_msg", "payload": {"from": "c"}}),
            )
            .await;
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(client.next_event().await["ev"].clone());
        }
        assert!(
            got.contains(&json!("push_ok")) && got.contains(&json!("message")),
            "{got:?}"
        );
    }
    // Without a token, the socket never opens.
    let mut anonymous = NodeClient::start_in(Some(&client_ns), url, json!({})).await;
    let first = anonymous.next_event().await;
    assert_ne!(first["ev"], "open", "{first}");
    drop(hosts);
}
