//! The `conns` workload: C joined idle connections, held; the connect+join rate, the CPU
//! time the connect phase cost (generator and watched processes) and the RSS of watched
//! processes. More connections than one process may hold (20,000 files)
//! are spread over worker processes.

use crate::cpu::{self, Watched};
use crate::{ConnsArgs, fanout};
use serde_json::json;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Resident and peak resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub async fn run(args: ConnsArgs) -> anyhow::Result<()> {
    if let Some(first) = args.worker {
        return worker(&args, first).await;
    }
    let watch = &args.common.watch;
    let before: Vec<Option<(u64, u64)>> = watch.iter().map(|w| rss_kib(w.pid)).collect();
    let procs = args.procs.max(1);
    let share = args.connections.div_ceil(procs);
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for w in 0..procs {
        let count = share.min(args.connections - (w * share).min(args.connections));
        let mut child = tokio::process::Command::new(&exe)
            .arg("conns")
            .arg("--gateways")
            .arg(args.common.gateways.join(","))
            .arg("--connections")
            .arg(count.to_string())
            .arg("--hold-secs")
            .arg(args.hold_secs.to_string())
            .arg("--connect-concurrency")
            .arg(args.common.connect_concurrency.to_string())
            .arg("--source-addrs")
            .arg(args.common.source_addrs.to_string())
            .arg("--receiver-threads")
            .arg("1")
            .arg("--client")
            .arg(args.common.client.name())
            .arg("--worker")
            .arg((w * share).to_string())
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        readers.push(BufReader::new(child.stdout.take().expect("stdout")).lines());
        children.push(child);
    }
    // The workers have only just started: their CPU time from here on is the connect phase.
    let mut procs_cpu = cpu::with_generator(watch);
    for (w, child) in children.iter().enumerate() {
        if let Some(pid) = child.id() {
            procs_cpu.push(Watched {
                name: format!("generator worker {w}"),
                pid,
            });
        }
    }
    let cpu_before = cpu::sample(&procs_cpu);
    let mut joined = 0usize;
    for lines in &mut readers {
        while let Some(line) = lines.next_line().await? {
            if let Some(n) = line.strip_prefix("JOINED ") {
                joined += n.trim().parse::<usize>()?;
                break;
            }
            if let Some(e) = line.strip_prefix("FAILED ") {
                anyhow::bail!("worker failed: {e}");
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rate = joined as f64 / elapsed;
    let cpu_used = cpu::used(&cpu_before, &cpu::sample(&procs_cpu));
    let (user_us, kernel_us) = cpu_used.micros_per(joined as u64);
    // Let the processes settle, then sample while every connection is held.
    tokio::time::sleep(Duration::from_secs_f64((args.hold_secs / 2.0).min(2.0))).await;
    let during: Vec<Option<(u64, u64)>> = watch.iter().map(|w| rss_kib(w.pid)).collect();
    println!("{joined} connections joined in {elapsed:.2} s: {rate:.0} connect+join/s");
    println!(
        "CPU per connect+join (generator and watched processes): {user_us:.0} us user, {kernel_us:.0} us kernel"
    );
    let mut rss = Vec::new();
    for ((Watched { name, pid }, b), d) in watch.iter().zip(&before).zip(&during) {
        let (Some((b, _)), Some((d, peak))) = (b, d) else {
            continue;
        };
        println!("{name} (pid {pid}): RSS {b} KiB -> {d} KiB (peak {peak} KiB)");
        rss.push(json!({"name": name, "pid": pid, "rss_before_kib": b, "rss_held_kib": d, "peak_kib": peak}));
    }
    for child in &mut children {
        drop(child.stdin.take());
        child.wait().await?;
    }
    let summary = json!({
        "workload": "conns", "connections": joined, "procs": procs, "seconds": elapsed,
        "connect_join_per_s": rate, "rss": rss, "cpu": cpu_used.json(),
        "user_us_per_connection": user_us, "kernel_us_per_connection": kernel_us,
    });
    println!("SUMMARY {summary}");
    Ok(())
}

/// A worker: opens its share of connections, reports, holds them, exits.
async fn worker(args: &ConnsArgs, first: usize) -> anyhow::Result<()> {
    let topics_of = move |i: usize| vec![format!("idle:{}", (first + i) % 1000)];
    let result = fanout::connect_many(&args.common, args.connections, topics_of).await;
    let conns = match result {
        Ok((conns, _)) => conns,
        Err(e) => {
            println!("FAILED {e:#}");
            return Ok(());
        }
    };
    println!("JOINED {}", conns.len());
    fanout::start_subscribers(&args.common, conns)?;
    // Hold until the parent closes stdin or the hold time (plus a margin) passes.
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let hold = Duration::from_secs_f64(args.hold_secs + 30.0);
    let _ = tokio::time::timeout(hold, async {
        while let Ok(Some(_)) = stdin.next_line().await {}
    })
    .await;
    Ok(())
}
