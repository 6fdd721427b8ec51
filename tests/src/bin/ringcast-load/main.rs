//! `ringcast-load`: a load generator that speaks the Phoenix protocol as any client would.
//!
//! Workloads: `fanout` (S subscribers on one topic, one publisher, a ramp of rates),
//! `topics` (T topics x S subscribers, publishes spread over topics), `conns` (C joined
//! idle connections) and `presence` (M members of one topic with presence, then churn). Each ramp step reports offered and achieved deliveries/s, loss and
//! publish-to-receive latency; the last line is a JSON summary for scripts.
//!
//! Two kinds of client (`--client`): `tasks` (the default) behaves like ordinary clients
//! and load tools: a tokio task per socket reading one frame at a time through
//! tokio-tungstenite, and publishers that send one publish per websocket frame at evenly
//! spaced instants. `epoll` is the fastest client this crate has: subscriber sockets read
//! by a few threads with epoll, 64 KiB at a time, and publishers that send every 1 ms
//! whatever has fallen due, in one write.

mod client;
mod conns;
mod cpu;
mod fanout;
mod presence;
mod receiver;
mod stats;
mod topics;

use clap::{Args, Parser, Subcommand};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ringcast-load",
    version,
    about = "Load generator for ringcast (Phoenix protocol over websocket)"
)]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand)]
enum Workload {
    /// S subscribers on one topic spread over the gateways, a publisher on the first one.
    Fanout(FanoutArgs),
    /// T topics x S subscribers; every connection also publishes on its topics.
    Topics(TopicsArgs),
    /// C joined idle connections, held for a while; reports the connect+join rate.
    Conns(ConnsArgs),
    /// M members of one topic with presence (spread over the gateways), then churn; reports
    /// the join rate and the presence traffic the members receive.
    Presence(PresenceArgs),
}

/// Shared by every workload.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Gateway base URLs (`ws://host:port`), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    gateways: Vec<String>,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Spread client source addresses over 127.0.0.2 .. 127.0.0.(1+N) (more than 60k connections).
    #[arg(long, default_value_t = 8)]
    source_addrs: u8,
    /// How clients read and publish: `tasks` (a task per socket, one frame per read, evenly
    /// paced publishes, one per frame) or `epoll` (reader threads, bursts every 1 ms).
    #[arg(long, value_enum, default_value_t = ClientKind::Tasks)]
    client: ClientKind,
    /// Threads reading the subscriber sockets with `--client epoll`.
    #[arg(long, default_value_t = default_threads())]
    receiver_threads: usize,
    /// The gateway (index into `--gateways`, from 0) the publisher connects to; default the
    /// last, so that with two gateways subscribers are on both and the publisher on the second.
    #[arg(long, conflicts_with = "publish_each")]
    publish_gateway: Option<usize>,
    /// `fanout`: one publisher per gateway, every message sent through each of them. For
    /// broadcasters that do not route between them (several `ringcast-bare` processes with
    /// the subscribers split over them): what any split over processes costs on this machine.
    #[arg(long)]
    publish_each: bool,
    /// Server processes to report on (`name=pid`, comma-separated): their CPU time (user and
    /// kernel) per ramp step or connect phase, next to the generator's own; `conns` also
    /// reports their RSS before and while holding.
    #[arg(long, value_delimiter = ',', value_parser = cpu::parse_watched)]
    watch: Vec<cpu::Watched>,
}

/// How the generator's clients read and publish.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// Like ordinary clients: a task per socket, one frame per read, paced publishes.
    Tasks,
    /// The fastest reader: epoll threads, 64 KiB reads; publishes in 1 ms bursts.
    Epoll,
}

impl ClientKind {
    pub fn name(self) -> &'static str {
        match self {
            ClientKind::Tasks => "tasks",
            ClientKind::Epoll => "epoll",
        }
    }
}

impl Common {
    /// The gateway URL the (fan-out) publisher connects to.
    pub fn publish_gateway(&self) -> anyhow::Result<&str> {
        let last = self.gateways.len() - 1;
        let i = self.publish_gateway.unwrap_or(last);
        match self.gateways.get(i) {
            Some(url) => Ok(url),
            None => anyhow::bail!(
                "--publish-gateway {i}: there are only {} gateways",
                last + 1
            ),
        }
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A ramp of publish rates.
#[derive(Args, Clone, Debug)]
pub struct Ramp {
    /// First step's published messages per second.
    #[arg(long, default_value_t = 50.0)]
    start_rate: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    /// Highest published messages per second tried.
    #[arg(long, default_value_t = 200_000.0)]
    max_rate: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 3.0)]
    step_secs: f64,
    /// Latency bound for a passing step (p99, milliseconds).
    #[arg(long, default_value_t = 100.0)]
    p99_ms: f64,
    /// Stop after this many failing steps in a row.
    #[arg(long, default_value_t = 1)]
    failures: usize,
    /// After the first failing step, try rates between the last passing one and it, each this
    /// factor above the one before (1: no refinement), so that two servers a step apart
    /// compare to within this factor.
    #[arg(long, default_value_t = 1.1)]
    refine: f64,
    /// Run exactly one step at `start_rate` (a fixed-load measurement).
    #[arg(long)]
    fixed: bool,
    /// Payload size in bytes (the JSON payload of each message).
    #[arg(long, default_value_t = 100)]
    payload: usize,
}

impl Ramp {
    fn step_duration(&self) -> Duration {
        Duration::from_secs_f64(self.step_secs)
    }

    /// The finer rates strictly between a passing rate and a failing one.
    fn refined(&self, passed: f64, failed: f64) -> Vec<f64> {
        let mut rates = Vec::new();
        if self.refine <= 1.0 {
            return rates;
        }
        let mut rate = passed * self.refine;
        while rate < failed * 0.999 && rates.len() < 16 {
            rates.push(rate);
            rate *= self.refine;
        }
        rates
    }

    /// The rates of the ramp.
    fn rates(&self) -> Vec<f64> {
        if self.fixed {
            return vec![self.start_rate];
        }
        let mut rates = Vec::new();
        let mut rate = self.start_rate;
        while rate <= self.max_rate && rates.len() < 64 {
            rates.push(rate);
            rate *= self.factor;
        }
        rates
    }
}

#[derive(Args, Clone, Debug)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    ramp: Ramp,
    /// Subscribers on the topic.
    #[arg(long, default_value_t = 2000)]
    subscribers: usize,
}

#[derive(Args, Clone, Debug)]
struct TopicsArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    ramp: Ramp,
    /// Number of topics.
    #[arg(long, default_value_t = 10_000)]
    topics: usize,
    /// Subscribers per topic.
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// Topics joined per connection (at most the gateway's GATEWAY_MAX_CHANNELS).
    #[arg(long, default_value_t = 100)]
    topics_per_conn: usize,
}

#[derive(Args, Clone, Debug)]
struct ConnsArgs {
    #[command(flatten)]
    common: Common,
    /// Connections in all (each joins one topic).
    #[arg(long, default_value_t = 15_000)]
    connections: usize,
    /// Seconds to hold the connections open once all are joined.
    #[arg(long, default_value_t = 5.0)]
    hold_secs: f64,
    /// Worker processes to spread the connections over (a process may hold 20,000 files).
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Internal: run as a worker holding connections [first, first+count).
    #[arg(long, hide = true)]
    worker: Option<usize>,
}

#[derive(Args, Clone, Debug)]
struct PresenceArgs {
    #[command(flatten)]
    common: Common,
    /// Members of the topic (each a connection tracking its presence).
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// Members that leave and join again per second during the churn.
    #[arg(long, default_value_t = 100.0)]
    churn: f64,
    /// Seconds of churn.
    #[arg(long, default_value_t = 5.0)]
    churn_secs: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.workload {
            Workload::Fanout(a) => fanout::run(a.common, a.ramp, a.subscribers).await,
            Workload::Topics(a) => {
                topics::run(a.common, a.ramp, a.topics, a.subscribers, a.topics_per_conn).await
            }
            Workload::Conns(a) => conns::run(a).await,
            Workload::Presence(a) => {
                presence::run(a.common, a.members, a.churn, a.churn_secs).await
            }
        }
    })
}

/// Raises the open-file limit to the hard limit (these machines cap it at 20,000).
fn raise_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => eprintln!("ringcast-load: open-file limit {limit}"),
        Err(e) => eprintln!("ringcast-load: cannot raise the open-file limit: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(args: &[&str]) -> Ramp {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            ramp: Ramp,
        }
        Only::parse_from(std::iter::once("ramp").chain(args.iter().copied())).ramp
    }

    #[test]
    fn a_ramp_multiplies_and_refines_between_a_pass_and_a_failure() {
        let r = ramp(&["--start-rate", "100", "--max-rate", "400"]);
        assert_eq!(r.rates(), [100.0, 150.0, 225.0, 337.5]);
        let fine: Vec<u32> = r
            .refined(100.0, 150.0)
            .iter()
            .map(|x| x.round() as u32)
            .collect();
        assert_eq!(fine, [110, 121, 133, 146]);
        assert!(ramp(&["--refine", "1"]).refined(100.0, 150.0).is_empty());
        assert_eq!(ramp(&["--fixed", "--start-rate", "7"]).rates(), [7.0]);
    }
}
