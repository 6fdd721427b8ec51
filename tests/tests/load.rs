//! The benchmark's tools, run as `scripts/bench.sh` runs them (small and short): the load
//! generator's workloads against a real cluster, and against the bare broadcaster that the
//! benchmark measures ringcast against. Figures are not checked here, only that every
//! delivery arrives and is counted.

use ringcast_tests::Cluster;
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `ringcast-load ARGS` to its end; returns its SUMMARY line's JSON.
async fn load(args: &[&str]) -> Value {
    let run = Command::new(env!("CARGO_BIN_EXE_ringcast-load"))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .expect("ringcast-load did not finish")
        .expect("run ringcast-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ringcast-load {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SUMMARY "))
        .unwrap_or_else(|| panic!("no SUMMARY line in:\n{stdout}"));
    serde_json::from_str(line).expect("SUMMARY is JSON")
}

fn gateways(cluster: &Cluster) -> String {
    cluster
        .gateways
        .iter()
        .map(|g| format!("ws://{}", g.addr))
        .collect::<Vec<_>>()
        .join(",")
}

/// The one step of a `--fixed` run: every message sent reached all `fanout` receivers.
fn assert_no_loss(summary: &Value, fanout: u64) {
    let step = &summary["steps"][0];
    let sent = step["sent"].as_u64().expect("sent");
    assert!(sent > 0, "nothing published: {summary}");
    assert_eq!(step["lost"], 0, "{summary}");
    assert_eq!(step["delivered"].as_u64(), Some(sent * fanout), "{summary}");
    assert_eq!(summary["closed_subscribers"], 0, "{summary}");
    assert_eq!(step["pass"], true, "{summary}");
}

/// A fixed step that any machine keeps up with, with a latency bound that only a lost or
/// stuck delivery could miss.
const FIXED: [&str; 7] = [
    "--start-rate",
    "20",
    "--fixed",
    "--step-secs",
    "1",
    "--p99-ms",
    "5000",
];

#[tokio::test]
async fn fanout_over_both_gateways_counts_every_delivery_with_both_clients() {
    let cluster = Cluster::start().await;
    let gateways = gateways(&cluster);
    for client in ["tasks", "epoll"] {
        let mut args = vec!["fanout", "--gateways", &gateways, "--subscribers", "40"];
        args.extend(["--client", client]);
        args.extend(FIXED);
        let summary = load(&args).await;
        assert_no_loss(&summary, 40);
        assert_eq!(summary["client"], client);
        assert!(summary["connect_join_per_s"].as_f64().unwrap() > 0.0);
    }
}

/// A ramp runs every step while they pass (no refinement without a failure), and stops at
/// a first step that fails with nothing passed before it (nothing to refine from).
#[tokio::test]
async fn a_ramp_runs_its_passing_steps_and_stops_at_a_first_failure() {
    let cluster = Cluster::start().await;
    let gateways = gateways(&cluster);
    let args = [
        "fanout",
        "--gateways",
        &gateways,
        "--subscribers",
        "4",
        "--start-rate",
        "20",
        "--max-rate",
        "45",
        "--step-secs",
        "0.5",
        "--p99-ms",
        "5000",
    ];
    let summary = load(&args).await;
    let rates: Vec<f64> = summary["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rate"].as_f64().unwrap())
        .collect();
    assert_eq!(
        rates,
        [20.0, 30.0, 45.0],
        "every step passes: no refinement"
    );
    let args = [
        "fanout",
        "--gateways",
        &gateways,
        "--subscribers",
        "4",
        "--start-rate",
        "20",
        "--step-secs",
        "0.5",
        "--p99-ms",
        "0",
    ];
    let summary = load(&args).await;
    assert_eq!(summary["steps"].as_array().unwrap().len(), 1, "{summary}");
    assert!(summary["best"].is_null());
}

#[tokio::test]
async fn topics_workload_counts_every_delivery() {
    let cluster = Cluster::start().await;
    let gateways = gateways(&cluster);
    let mut args = vec![
        "topics",
        "--gateways",
        &gateways,
        "--topics",
        "20",
        "--subscribers",
        "3",
        "--topics-per-conn",
        "5",
    ];
    args.extend(FIXED);
    let summary = load(&args).await;
    assert_eq!(summary["connections"], 12, "{summary}");
    assert_no_loss(&summary, 3);
}

/// Runs the conns workload (with `extra` arguments); checks it held all `connections` and
/// measured a rate; returns the summary.
async fn assert_conns_held(gateways: &str, connections: u32, procs: u32, extra: &[&str]) -> Value {
    let (n, procs) = (connections.to_string(), procs.to_string());
    let mut args = vec![
        "conns",
        "--gateways",
        gateways,
        "--connections",
        &n,
        "--procs",
        &procs,
        "--hold-secs",
        "1",
    ];
    args.extend(extra);
    let summary = load(&args).await;
    assert_eq!(summary["connections"], connections, "{summary}");
    assert!(summary["connect_join_per_s"].as_f64().unwrap() > 0.0);
    summary
}

/// The names of the processes whose CPU time `cpu` (a summary's or a step's) reports.
fn cpu_names(cpu: &Value) -> Vec<&str> {
    let procs = cpu["procs"]
        .as_array()
        .unwrap_or_else(|| panic!("no procs in {cpu}"));
    procs.iter().map(|p| p["name"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn conns_workload_holds_its_connections() {
    let cluster = Cluster::start().await;
    assert_conns_held(&gateways(&cluster), 60, 2, &[]).await;
}

/// `ringcast-bare` on an ephemeral port; the address it printed.
async fn start_bare() -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast-bare"))
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ringcast-bare");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(ringcast_tests::EVENT_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.strip_prefix("ringcast-bare: listening on ") {
                return addr.to_owned();
            }
        }
        panic!("ringcast-bare ended before listening");
    })
    .await
    .expect("ringcast-bare did not start");
    (child, format!("ws://{addr}"))
}

#[tokio::test]
async fn the_bare_broadcaster_serves_the_fanout_workload() {
    let (bare, url) = start_bare().await;
    let watch = format!("bare={}", bare.id().unwrap());
    let mut args = vec![
        "fanout",
        "--gateways",
        &url,
        "--subscribers",
        "40",
        "--watch",
        &watch,
    ];
    args.extend(FIXED);
    let summary = load(&args).await;
    assert_no_loss(&summary, 40);
    let step = &summary["steps"][0];
    assert_eq!(cpu_names(&step["cpu"]), ["generator", "bare"], "{step}");
    assert!(
        step["kernel_us_per_delivery"].as_f64().unwrap() >= 0.0,
        "{step}"
    );
}

/// Two bare broadcasters with the subscribers split over them, every message published
/// through both (`--publish-each`): each subscriber gets each message once.
#[tokio::test]
async fn two_bare_broadcasters_serve_a_split_fanout() {
    let ((_a, a), (_b, b)) = (start_bare().await, start_bare().await);
    let both = format!("{a},{b}");
    let mut args = vec![
        "fanout",
        "--gateways",
        &both,
        "--subscribers",
        "40",
        "--publish-each",
    ];
    args.extend(FIXED);
    let summary = load(&args).await;
    assert_no_loss(&summary, 40);
}

#[tokio::test]
async fn the_bare_broadcaster_serves_the_conns_workload() {
    let (bare, url) = start_bare().await;
    let watch = format!("bare={}", bare.id().unwrap());
    let summary = assert_conns_held(&url, 30, 1, &["--watch", &watch]).await;
    assert_eq!(
        cpu_names(&summary["cpu"]),
        ["generator", "bare", "generator worker 0"],
        "{summary}"
    );
    assert!(summary["kernel_us_per_connection"].as_f64().unwrap() >= 0.0);
    assert!(
        summary["rss"][0]["rss_held_kib"].as_u64().unwrap() > 0,
        "{summary}"
    );
}
