//! The `fanout` workload (S subscribers on one topic) and the ramp shared with `topics`.

use crate::client::{self, Ws};
use crate::{ClientKind, Common, Ramp, cpu, stats};
use futures::SinkExt;
use futures::stream::{SplitSink, StreamExt};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

pub type Sink = SplitSink<Ws, Message>;

/// A connection that publishes on some of its topics (with `--publish-each`, one connection
/// per gateway, every message sent on each).
pub struct Publisher {
    pub sinks: Vec<Sink>,
    /// (join_ref, topic) pairs to publish on, round robin.
    pub topics: Vec<(usize, String)>,
    pub next: usize,
}

/// Opens `n` connections, the i-th joined to `topics_of(i)`, spread over gateways and source
/// addresses. Returns them in order and the connect+join rate (connections/s).
pub async fn connect_many(
    common: &Common,
    n: usize,
    topics_of: impl Fn(usize) -> Vec<String>,
) -> anyhow::Result<(Vec<Ws>, f64)> {
    let start = Instant::now();
    let jobs = (0..n).map(|i| {
        let gateway = common.gateways[i % common.gateways.len()].clone();
        let topics = topics_of(i);
        let source = client::source_addr(i, common.source_addrs);
        async move {
            let mut ws = client::connect(&gateway, source).await?;
            client::join_all(&mut ws, &topics).await?;
            anyhow::Ok((i, ws))
        }
    });
    let mut results: Vec<(usize, Ws)> = futures::stream::iter(jobs)
        .buffer_unordered(common.connect_concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    results.sort_by_key(|(i, _)| *i);
    Ok((results.into_iter().map(|(_, ws)| ws).collect(), rate))
}

/// Starts reading the subscriber connections: they record deliveries and send heartbeats.
/// `tasks`: a task per connection; `epoll`: the receiver threads.
pub fn start_subscribers(common: &Common, conns: Vec<Ws>) -> anyhow::Result<()> {
    match common.client {
        ClientKind::Tasks => {
            for ws in conns {
                tokio::spawn(client::subscriber_task(ws));
            }
            Ok(())
        }
        ClientKind::Epoll => crate::receiver::start(conns, common.receiver_threads),
    }
}

/// Publishes `rate` messages/s for `duration`, spread round robin over publishers and
/// their topics; returns how many were sent. `tasks`: message i is sent at `i / rate` on
/// its own, one frame per write; `epoll`: every 1 ms whatever has fallen due, in one write
/// per publisher.
async fn publish_for(
    client: ClientKind,
    pubs: &mut [Publisher],
    rate: f64,
    duration: Duration,
    step: usize,
    payload: usize,
) -> u64 {
    match client {
        ClientKind::Tasks => publish_paced(pubs, rate, duration, step, payload).await,
        ClientKind::Epoll => publish_bursts(pubs, rate, duration, step, payload).await,
    }
}

/// One publish per frame, each sent (and flushed) at its own instant: `start + i / rate`.
/// When the timer wakes late, those that fell due meanwhile go one after another.
async fn publish_paced(
    pubs: &mut [Publisher],
    rate: f64,
    duration: Duration,
    step: usize,
    payload: usize,
) -> u64 {
    let start = tokio::time::Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    for sent in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / rate)).await;
        if start.elapsed() >= duration {
            // Behind schedule: what was not sent in the step's time counts as not kept up.
            return sent;
        }
        let publisher = &mut pubs[sent as usize % pubs.len()];
        let (join_ref, topic) = &publisher.topics[publisher.next % publisher.topics.len()];
        publisher.next += 1;
        // One message for every socket (a clone shares its bytes).
        let message = Message::Text(client::publish_frame(*join_ref, topic, step, payload).into());
        for sink in &mut publisher.sinks {
            if sink.send(message.clone()).await.is_err() {
                return sent;
            }
        }
    }
    total
}

/// Every 1 ms, what has fallen due, fed to the publishers' sockets and flushed once each.
async fn publish_bursts(
    pubs: &mut [Publisher],
    rate: f64,
    duration: Duration,
    step: usize,
    payload: usize,
) -> u64 {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut p = 0;
    while start.elapsed() < duration {
        tick.tick().await;
        let due = (rate * start.elapsed().as_secs_f64().min(duration.as_secs_f64())) as u64;
        let mut batch = due.saturating_sub(sent);
        let share = batch.div_ceil(pubs.len() as u64);
        while batch > 0 {
            let publisher = &mut pubs[p % pubs.len()];
            p += 1;
            let n = share.min(batch);
            for _ in 0..n {
                let (join_ref, topic) = &publisher.topics[publisher.next % publisher.topics.len()];
                publisher.next += 1;
                let frame = client::publish_frame(*join_ref, topic, step, payload);
                let message = Message::Text(frame.into());
                for sink in &mut publisher.sinks {
                    if sink.feed(message.clone()).await.is_err() {
                        return sent;
                    }
                }
            }
            for sink in &mut publisher.sinks {
                if sink.flush().await.is_err() {
                    return sent;
                }
            }
            sent += n;
            batch -= n;
        }
    }
    sent
}

/// Runs the ramp: one step per rate until a step fails. `fanout` is the number of
/// deliveries each published message should produce. Prints one row per step and returns
/// the JSON of every step (with the CPU time the generator and `watch` used in it) and of
/// the best passing one.
pub async fn run_ramp(
    ramp: &Ramp,
    fanout: u64,
    pubs: &mut [Publisher],
    common: &Common,
) -> (Vec<serde_json::Value>, Option<serde_json::Value>) {
    let procs = cpu::with_generator(&common.watch);
    println!(
        "{:>5} {:>10} {:>12} {:>12} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  result",
        "step",
        "msgs/s",
        "offered/s",
        "achieved/s",
        "delivered",
        "lost",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "user us",
        "kern us"
    );
    let (mut rows, mut best, mut failures) = (Vec::new(), None, 0);
    let duration = ramp.step_duration();
    let mut plan: std::collections::VecDeque<f64> = ramp.rates().into();
    let mut refining = false;
    let mut step = 0;
    while let Some(rate) = plan.pop_front() {
        let closed_before = stats::closed_count();
        let cpu_before = cpu::sample(&procs);
        let start = Instant::now();
        let sent = publish_for(common.client, pubs, rate, duration, step, ramp.payload).await;
        let expected = sent * fanout;
        let (mut last, mut last_change) = (0, Instant::now());
        loop {
            let received = stats::count(step);
            if received >= expected {
                break;
            }
            if received != last {
                (last, last_change) = (received, Instant::now());
            } else if last_change.elapsed() > Duration::from_secs(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu_used = cpu::used(&cpu_before, &cpu::sample(&procs));
        let received = stats::count(step);
        // CPU per delivery, the generator's and the watched processes' together.
        let (user_us, kernel_us) = cpu_used.micros_per(received);
        let hist = stats::merged(step);
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let (p50, p90, p99, max) = (ms(0.5), ms(0.9), ms(0.99), hist.max() as f64 / 1000.0);
        let lost = expected.saturating_sub(received);
        let kept_up = sent as f64 >= 0.97 * rate * duration.as_secs_f64();
        let pass =
            lost == 0 && p99 <= ramp.p99_ms && kept_up && stats::closed_count() == closed_before;
        let achieved = received as f64 / elapsed;
        let offered = rate * fanout as f64;
        let verdict = if pass {
            "ok"
        } else if lost > 0 {
            "LOSS"
        } else if !kept_up {
            "PUBLISHER BEHIND"
        } else if p99 > ramp.p99_ms {
            "SLOW"
        } else {
            "CLOSED"
        };
        println!(
            "{step:>5} {rate:>10.0} {offered:>12.0} {achieved:>12.0} {received:>12} {lost:>8} {p50:>9.2} {p90:>9.2} {p99:>9.2} {max:>9.2} {user_us:>9.2} {kernel_us:>9.2}  {verdict}"
        );
        let row = json!({
            "step": step, "rate": rate, "sent": sent, "offered_per_s": offered, "achieved_per_s": achieved,
            "delivered": received, "lost": lost, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max, "pass": pass,
            "cpu": cpu_used.json(), "user_us_per_delivery": user_us, "kernel_us_per_delivery": kernel_us,
        });
        rows.push(row.clone());
        step += 1;
        if pass {
            best = Some(row);
            failures = 0;
            continue;
        }
        failures += 1;
        if failures < ramp.failures {
            continue;
        }
        // Between the best step that passed and this one, finer steps (--refine); not once
        // subscribers were closed (cut as too slow): they would be missing from every step.
        let passed = best.as_ref().and_then(|b| b["rate"].as_f64());
        let closed = stats::closed_count() != closed_before;
        match passed {
            Some(passed) if !refining && !closed && ramp.refine > 1.0 => {
                refining = true;
                failures = 0;
                plan = ramp.refined(passed, rate).into();
            }
            _ => break,
        }
    }
    (rows, best)
}

pub async fn run(common: Common, ramp: Ramp, subscribers: usize) -> anyhow::Result<()> {
    let topic = format!("bench:fanout:{}", std::process::id());
    eprintln!(
        "fanout: connecting {subscribers} subscribers over {} gateways",
        common.gateways.len()
    );
    let (conns, connect_rate) = connect_many(&common, subscribers, |_| vec![topic.clone()]).await?;
    eprintln!("fanout: {subscribers} joined ({connect_rate:.0} connect+join/s)");
    start_subscribers(&common, conns)?;

    let via: Vec<&str> = if common.publish_each {
        common.gateways.iter().map(String::as_str).collect()
    } else {
        vec![common.publish_gateway()?]
    };
    let mut sinks = Vec::new();
    for gateway in via {
        let mut publisher =
            client::connect(gateway, client::source_addr(usize::MAX / 2, 1)).await?;
        client::join_all(&mut publisher, std::slice::from_ref(&topic)).await?;
        let (sink, stream) = publisher.split();
        tokio::spawn(drain(stream));
        sinks.push(sink);
    }
    // The publisher sends all the time: it needs no heartbeat.
    let mut pubs = [Publisher {
        sinks,
        topics: vec![(1, topic.clone())],
        next: 0,
    }];
    let (rows, best) = run_ramp(&ramp, subscribers as u64, &mut pubs, &common).await;
    let summary = json!({
        "workload": "fanout", "client": common.client.name(), "subscribers": subscribers, "payload": ramp.payload, "p99_bound_ms": ramp.p99_ms,
        "connect_join_per_s": connect_rate, "best": best, "steps": rows, "closed_subscribers": stats::closed_count(),
        "close_codes": stats::close_codes(), "join_retries": client::JOIN_RETRIES.load(std::sync::atomic::Ordering::Relaxed),
    });
    println!("SUMMARY {summary}");
    Ok(())
}

/// Reads a publisher's socket (its replies and own deliveries) without recording.
pub async fn drain(mut stream: futures::stream::SplitStream<Ws>) {
    while let Some(Ok(_)) = stream.next().await {}
}
