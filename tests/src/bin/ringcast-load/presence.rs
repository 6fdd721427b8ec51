//! The `presence` workload: M members join one topic with presence (spread over the
//! gateways, a task per socket, as phoenix.js clients would), then churn: C members a second
//! leave and join again. Reports the join rate and the presence traffic every member
//! receives (`presence_state`, `presence_diff`, `presence_stats`): frames and bytes, while
//! joining and per second of churn.

use crate::Common;
use crate::client::{self, Ws};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;

const TOPIC: &str = "presence:bench";

/// Presence frames and bytes received by every member together.
#[derive(Default)]
struct Received {
    frames: AtomicU64,
    bytes: AtomicU64,
    joined: AtomicU64,
}

impl Received {
    fn snapshot(&self) -> (u64, u64) {
        (self.frames.load(Relaxed), self.bytes.load(Relaxed))
    }
}

/// One member: joins, counts presence frames, leaves and joins again when told.
async fn member(i: usize, mut ws: Ws, received: Arc<Received>, mut rejoin: mpsc::Receiver<()>) {
    let join = |r: u64| {
        let params = json!({"presence": {"key": format!("user-{i}"), "meta": {"i": i}}});
        Message::Text(
            json!([r.to_string(), r.to_string(), TOPIC, "phx_join", params])
                .to_string()
                .into(),
        )
    };
    let mut join_ref = 1u64;
    if ws.send(join(join_ref)).await.is_err() {
        return;
    }
    let mut first_reply = true;
    loop {
        tokio::select! {
            message = ws.next() => {
                let Some(Ok(Message::Text(text))) = message else {
                    if matches!(message, Some(Ok(_))) { continue }
                    return;
                };
                if text.contains(r#","presence_"#) {
                    received.frames.fetch_add(1, Relaxed);
                    received.bytes.fetch_add(text.len() as u64, Relaxed);
                } else if first_reply && text.contains("phx_reply") {
                    first_reply = false;
                    received.joined.fetch_add(1, Relaxed);
                }
            }
            Some(()) = rejoin.recv() => {
                let leave = json!([join_ref.to_string(), "l", TOPIC, "phx_leave", {}]).to_string();
                join_ref += 1;
                if ws.send(Message::Text(leave.into())).await.is_err()
                    || ws.send(join(join_ref)).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

pub async fn run(
    common: Common,
    members: usize,
    churn_per_sec: f64,
    churn_secs: f64,
) -> anyhow::Result<()> {
    let received = Arc::new(Received::default());
    let limit = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let start = Instant::now();
    let mut rejoins = Vec::with_capacity(members);
    let mut connecting = Vec::with_capacity(members);
    for i in 0..members {
        let gateway = common.gateways[i % common.gateways.len()].clone();
        let source = client::source_addr(i, common.source_addrs);
        let limit = limit.clone();
        connecting.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            client::connect(&gateway, source).await
        }));
    }
    for (i, connecting) in connecting.into_iter().enumerate() {
        let ws = connecting.await??;
        let (tx, rx) = mpsc::channel(4);
        rejoins.push(tx);
        tokio::spawn(member(i, ws, received.clone(), rx));
    }
    // Every join answered.
    let deadline = Instant::now() + Duration::from_secs(120);
    while (received.joined.load(Relaxed) as usize) < members {
        anyhow::ensure!(Instant::now() < deadline, "joins not answered within 120 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let join_secs = start.elapsed().as_secs_f64();
    let join_rate = members as f64 / join_secs;
    // The presence news of the last joins arrive within an interval or two (counts: a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (join_frames, join_bytes) = received.snapshot();
    println!(
        "{members} members joined in {join_secs:.2} s ({join_rate:.0} joins/s, connect included); presence while joining: {join_frames} frames, {:.1} MB",
        join_bytes as f64 / 1e6
    );

    // Churn: members leave and join again at an even pace.
    let before = received.snapshot();
    let churn_start = Instant::now();
    let every = Duration::from_secs_f64(1.0 / churn_per_sec.max(0.001));
    let mut next = tokio::time::Instant::now();
    let mut churned = 0usize;
    while churn_start.elapsed().as_secs_f64() < churn_secs {
        let _ = rejoins[churned % members].try_send(());
        churned += 1;
        next += every;
        tokio::time::sleep_until(next).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = received.snapshot();
    let secs = churn_start.elapsed().as_secs_f64();
    let (frames_per_sec, bytes_per_sec) = (
        (after.0 - before.0) as f64 / secs,
        (after.1 - before.1) as f64 / secs,
    );
    println!(
        "churn {churn_per_sec:.0} leave+join/s for {churn_secs:.0} s: presence {frames_per_sec:.0} frames/s, {:.2} MB/s to all members ({:.2} frames/s per member)",
        bytes_per_sec / 1e6,
        frames_per_sec / members as f64
    );
    let summary = json!({
        "workload": "presence", "client": common.client.name(), "members": members,
        "join_secs": join_secs, "joins_per_s": join_rate,
        "join_presence_frames": join_frames, "join_presence_bytes": join_bytes,
        "churn_per_s": churn_per_sec, "churned": churned,
        "churn_presence_frames_per_s": frames_per_sec, "churn_presence_bytes_per_s": bytes_per_sec,
    });
    println!("SUMMARY {summary}");
    Ok(())
}
