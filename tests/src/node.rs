//! The phoenix.js driver (`tests/js/driver.mjs`) under Node, as a test client.

use crate::EVENT_TIMEOUT;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Installs phoenix.js and ws for the driver (`npm ci`) once per test process if missing.
pub fn ensure_npm_packages() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| ensure_npm_packages_in(&js_dir()));
}

/// Runs `npm ci` in `dir` unless its phoenix and ws packages are already installed.
pub fn ensure_npm_packages_in(dir: &std::path::Path) {
    if dir.join("node_modules/phoenix").exists() && dir.join("node_modules/ws").exists() {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .expect("run npm (is Node.js installed?)");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// A phoenix.js client in a Node process, killed on drop.
pub struct NodeClient {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl NodeClient {
    /// Starts the driver against `socket_url` (`ws://host:port/socket`) and waits until the
    /// socket is open.
    pub async fn connect(socket_url: &str) -> NodeClient {
        Self::connect_with(socket_url, Value::Null).await
    }

    /// As [`NodeClient::connect`], with phoenix.js Socket options (`{"params": {"token":
    /// ...}}`, `{"authToken": ...}`).
    pub async fn connect_with(socket_url: &str, options: Value) -> NodeClient {
        let mut client = Self::start(socket_url, options).await;
        client.expect("open").await;
        client
    }

    /// Starts the driver without waiting for the socket to open (it may be refused).
    pub async fn start(socket_url: &str, options: Value) -> NodeClient {
        Self::start_in(None, socket_url, options).await
    }

    /// As [`NodeClient::start`], inside network namespace `netns` (`ip netns exec`).
    pub async fn start_in(netns: Option<&str>, socket_url: &str, options: Value) -> NodeClient {
        ensure_npm_packages();
        let options = if options.is_null() {
            "{}".to_owned()
        } else {
            options.to_string()
        };
        let mut command = match netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, "node"]);
                command
            }
            None => Command::new("node"),
        };
        let mut child = command
            .arg(js_dir().join("driver.mjs"))
            .arg(socket_url)
            .arg(options)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start node");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        NodeClient {
            child,
            stdin,
            lines,
        }
    }

    pub async fn send(&mut self, command: Value) {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to node");
    }

    /// The next event the driver reports.
    pub async fn next_event(&mut self) -> Value {
        let line = tokio::time::timeout(EVENT_TIMEOUT, self.lines.next_line())
            .await
            .expect("timed out waiting for the phoenix.js client")
            .expect("read from node")
            .expect("node exited");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("driver printed non-JSON ({e}): {line}"))
    }

    /// The next event, which must be `ev`.
    pub async fn expect(&mut self, ev: &str) -> Value {
        let event = self.next_event().await;
        assert_eq!(event["ev"], ev, "expected {ev}, got {event}");
        event
    }

    pub async fn join(&mut self, topic: &str, params: Value) -> Value {
        self.send(json!({"op": "join", "topic": topic, "params": params}))
            .await;
        self.next_event().await
    }

    /// Joins with the recovery pattern: every rejoin sends the position reached.
    pub async fn join_recovering(&mut self, topic: &str, params: Value) -> Value {
        self.send(json!({"op": "join", "topic": topic, "params": params, "recover": true}))
            .await;
        self.next_event().await
    }

    /// The next event that is not one of `skip`.
    pub async fn next_event_skipping(&mut self, skip: &[&str]) -> Value {
        loop {
            let event = self.next_event().await;
            if !skip.iter().any(|s| event["ev"] == *s) {
                return event;
            }
        }
    }

    pub async fn push(&mut self, topic: &str, event: &str, payload: Value) {
        self.send(json!({"op": "push", "topic": topic, "event": event, "payload": payload}))
            .await;
    }

    pub async fn leave(&mut self, topic: &str) {
        self.send(json!({"op": "leave", "topic": topic})).await;
    }
}

impl Drop for NodeClient {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
