//! ringcast's cluster harness: real processes on ephemeral ports, real websocket clients,
//! and the phoenix.js driver, for the end-to-end tests in `tests/tests/`.
//!
//! Processes are the binaries cargo built (`target/<profile>/gateway`, `topic-server`),
//! killed when their handle drops. Everything waits on events with timeouts, never sleeps.

pub mod cluster;
pub mod jwt;
pub mod node;
pub mod proxy;
pub mod traffic;
pub mod ws;

pub use cluster::{Cluster, ClusterSpec, Proc, RingTarget};
pub use node::NodeClient;
pub use proxy::TcpProxy;
pub use ws::WsClient;

use std::future::Future;
use std::time::Duration;

/// How long any single expected event may take before a test fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Runs a command to completion, but kills it and fails the test if it still runs after
/// 10 s (say, a config that should have been refused started a server).
pub fn run_bounded(mut command: std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "still running after 10 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}
