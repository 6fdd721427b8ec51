//! The `topics` workload: T topics x S subscribers; connection c joins `topics_per_conn`
//! consecutive topics, and the first connection to join a topic publishes on it.

use crate::fanout::{self, Publisher};
use crate::{Common, Ramp, stats};
use futures::StreamExt;
use serde_json::json;

pub async fn run(
    common: Common,
    ramp: Ramp,
    topics: usize,
    subscribers: usize,
    per_conn: usize,
) -> anyhow::Result<()> {
    let per_conn = per_conn.clamp(1, topics);
    let conns = (topics * subscribers).div_ceil(per_conn);
    let prefix = format!("bench:topics:{}", std::process::id());
    let topics_of = |c: usize| -> Vec<String> {
        (0..per_conn)
            .map(|j| format!("{prefix}:{}", (c * per_conn + j) % topics))
            .collect()
    };
    eprintln!("topics: {topics} topics x {subscribers} subscribers over {conns} connections");
    let (all, connect_rate) = fanout::connect_many(&common, conns, topics_of).await?;
    eprintln!("topics: joined ({connect_rate:.0} connect+join/s)");
    // Connections 0 .. topics/per_conn first join every topic once: they publish.
    let publishers = topics.div_ceil(per_conn);
    let mut pubs = Vec::new();
    let mut subscribers_only = Vec::new();
    for (c, ws) in all.into_iter().enumerate() {
        if c < publishers {
            // Publishers also receive: their reader records, their sink publishes.
            let (sink, stream) = ws.split();
            tokio::spawn(crate::client::receive_split(stream));
            let topics = topics_of(c)
                .into_iter()
                .enumerate()
                .map(|(j, t)| (j + 1, t))
                .collect();
            pubs.push(Publisher {
                sinks: vec![sink],
                topics,
                next: 0,
            });
        } else {
            subscribers_only.push(ws);
        }
    }
    fanout::start_subscribers(&common, subscribers_only)?;
    let (rows, best) = fanout::run_ramp(&ramp, subscribers as u64, &mut pubs, &common).await;
    let summary = json!({
        "workload": "topics", "client": common.client.name(), "topics": topics, "subscribers": subscribers, "connections": conns, "payload": ramp.payload,
        "p99_bound_ms": ramp.p99_ms, "connect_join_per_s": connect_rate, "best": best, "steps": rows,
        "closed_subscribers": stats::closed_count(),
        "join_retries": crate::client::JOIN_RETRIES.load(std::sync::atomic::Ordering::Relaxed),
    });
    println!("SUMMARY {summary}");
    Ok(())
}
