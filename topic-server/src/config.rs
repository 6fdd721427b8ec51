//! The topic server's configuration: typed, documented, read from the environment here only.
//!
//! `Config` is plain data so tests build it directly; `Config::from_env` parses the
//! environment (and `--help`) with clap, and every error names the variable at fault.

use crate::log::LogLimits;
use clap::Parser;
use ringcast_ring::{Ring, RingSource};
use std::net::SocketAddr;
use std::time::Duration;

/// Everything a topic server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id in the ring (`TOPIC_SERVER_ID`).
    pub node_id: String,
    /// The ring this node belongs to, and where it was read from.
    pub ring: Ring,
    pub ring_source: RingSource,
    /// Stream messages queued per gateway before that gateway is cut off as too slow.
    pub stream_queue: usize,
    /// HTTP/2 keepalive ping interval; a gateway silent for this long again is dropped.
    pub keepalive: Duration,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// How much history each topic keeps for recovery.
    pub log: LogLimits,
    /// The admin listener (`/status`), loopback by default.
    pub admin_listen: SocketAddr,
    /// Topics held at most; a request that would create another is refused.
    pub max_topics: usize,
    /// Log bytes (payloads, event and topic names) held over every topic, after which new
    /// topics are refused.
    pub max_log_total: usize,
    /// The cluster's shared secret (`CLUSTER_SECRET`): every gRPC call must carry it, and
    /// calls to peers do.
    pub cluster_secret: ringcast_proto::auth::ClusterSecret,
    /// How much presence a topic lists and holds.
    pub presence: crate::presence::PresenceLimits,
    /// Presence changes are gathered this long into one diff per topic.
    pub presence_interval: Duration,
}

impl Config {
    /// A config for tests and embedding: defaults for every limit.
    pub fn new(node_id: impl Into<String>, ring: Ring, ring_source: RingSource) -> Self {
        Config {
            node_id: node_id.into(),
            ring,
            ring_source,
            stream_queue: 65_536,
            keepalive: Duration::from_secs(2),
            max_message_bytes: ringcast_proto::batch::MAX_MESSAGE_BYTES,
            log: LogLimits::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_topics: 1_000_000,
            max_log_total: 1 << 30,
            cluster_secret: Default::default(),
            presence: Default::default(),
            presence_interval: Duration::from_millis(50),
        }
    }

    /// Reads the environment (and command line); exits with a message naming the bad
    /// variable when something is wrong. `--help` lists every variable.
    pub fn from_env() -> Result<(SocketAddr, Config), String> {
        Cli::parse().into_config()
    }
}

/// ringcast topic server: owns the topics the ring places on it, orders their messages and
/// fans each one out as one delivery per gateway.
///
/// Every setting is an environment variable (a flag of the same meaning exists for each).
#[derive(Debug, Parser)]
#[command(name = "topic-server", version, about, long_about = None)]
struct Cli {
    /// Address for gRPC (gateways and other topic servers).
    #[arg(
        long,
        env = "TOPIC_SERVER_LISTEN",
        value_name = "TOPIC_SERVER_LISTEN",
        default_value = "127.0.0.1:7001"
    )]
    listen: SocketAddr,
    /// This node's id; must be one of the ring's node ids.
    #[arg(long, env = "TOPIC_SERVER_ID", value_name = "TOPIC_SERVER_ID")]
    id: String,
    #[command(flatten)]
    ring: ringcast_ring::RingArgs,
    /// Messages queued per gateway stream before the gateway is cut off as too slow.
    #[arg(long, env = "TOPIC_SERVER_STREAM_QUEUE", value_name = "TOPIC_SERVER_STREAM_QUEUE", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(16..))]
    stream_queue: u32,
    /// Seconds between HTTP/2 keepalive pings to gateways (also the ping timeout).
    #[arg(long, env = "TOPIC_SERVER_KEEPALIVE_SECS", value_name = "TOPIC_SERVER_KEEPALIVE_SECS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    keepalive_secs: u64,
    /// Messages kept per topic for recovery after a reconnect (0: none; at most 10000, so that
    /// a replay fits a gateway stream's queue).
    #[arg(long, env = "TOPIC_SERVER_LOG_MESSAGES", value_name = "TOPIC_SERVER_LOG_MESSAGES", default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    log_messages: u32,
    /// Seconds a message stays in its topic's log.
    #[arg(long, env = "TOPIC_SERVER_LOG_SECONDS", value_name = "TOPIC_SERVER_LOG_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    log_seconds: u64,
    /// Bytes (payloads and event names) kept per topic log (at most 8 MiB, so that a topic's
    /// log fits one gRPC message when it is handed to another node).
    #[arg(long, env = "TOPIC_SERVER_LOG_BYTES", value_name = "TOPIC_SERVER_LOG_BYTES", default_value_t = 1_048_576, value_parser = clap::value_parser!(u64).range(1..=ringcast_proto::batch::MAX_ITEM_BYTES as u64))]
    log_bytes: u64,
    /// Address of the admin listener (`GET /status`); default: loopback, the gRPC port + 100.
    #[arg(
        long,
        env = "TOPIC_SERVER_ADMIN_LISTEN",
        value_name = "TOPIC_SERVER_ADMIN_LISTEN"
    )]
    admin_listen: Option<SocketAddr>,
    /// Topics held at most; requests that would create more are refused (`too many topics`).
    #[arg(long, env = "TOPIC_SERVER_MAX_TOPICS", value_name = "TOPIC_SERVER_MAX_TOPICS", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_topics: u64,
    /// Log bytes held over all topics, after which new topics are refused.
    #[arg(long, env = "TOPIC_SERVER_MAX_LOG_TOTAL_BYTES", value_name = "TOPIC_SERVER_MAX_LOG_TOTAL_BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    max_log_total_bytes: u64,
    /// The cluster's shared secret: gateways and topic servers send it on every call and a
    /// topic server refuses calls without it (at least 16 printable bytes).
    #[arg(
        long,
        env = "CLUSTER_SECRET",
        value_name = "CLUSTER_SECRET",
        hide_env_values = true
    )]
    cluster_secret: Option<String>,
    /// `none`: serve gRPC without a cluster secret on an address reachable beyond loopback
    /// (a topic server otherwise refuses to start that way).
    #[arg(long, env = "CLUSTER_AUTH", value_name = "CLUSTER_AUTH")]
    cluster_auth: Option<ClusterAuth>,
    /// Milliseconds presence changes are gathered before one diff per topic goes out.
    #[arg(long, env = "TOPIC_SERVER_PRESENCE_INTERVAL_MS", value_name = "TOPIC_SERVER_PRESENCE_INTERVAL_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    presence_interval_ms: u64,
    /// Members above which a topic's presence is counted (`presence_stats`), not listed.
    #[arg(long, env = "TOPIC_SERVER_PRESENCE_LIST_MAX", value_name = "TOPIC_SERVER_PRESENCE_LIST_MAX", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    presence_list_max: u32,
    /// Presence members per topic at most (and 4 MiB of presence); a join tracking one more
    /// is refused.
    #[arg(long, env = "TOPIC_SERVER_PRESENCE_MAX", value_name = "TOPIC_SERVER_PRESENCE_MAX", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    presence_max: u32,
}

/// `CLUSTER_AUTH`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterAuth {
    None,
    Secret,
}

impl Cli {
    fn into_config(self) -> Result<(SocketAddr, Config), String> {
        let source = self
            .ring
            .source()
            .ok_or("set RING_CONFIG (path to the ring TOML) or RING_NODES (id=host:port,...)")?;
        let ring = source.load()?;
        if ring.node(&self.id).is_none() {
            let ids: Vec<&str> = ring.nodes().iter().map(|n| n.id.as_str()).collect();
            return Err(format!(
                "TOPIC_SERVER_ID `{}` is not a node of the ring (nodes: {})",
                self.id,
                ids.join(", ")
            ));
        }
        if self.stream_queue <= self.log_messages {
            return Err(format!(
                "TOPIC_SERVER_STREAM_QUEUE ({}) must be larger than TOPIC_SERVER_LOG_MESSAGES ({}): \
                 a recovering subscriber's replay is queued on its gateway's stream at once",
                self.stream_queue, self.log_messages
            ));
        }
        let mut config = Config::new(self.id, ring, source);
        config.stream_queue = self.stream_queue as usize;
        config.keepalive = Duration::from_secs(self.keepalive_secs);
        config.log = LogLimits {
            messages: self.log_messages as usize,
            bytes: self.log_bytes as usize,
            age: Duration::from_secs(self.log_seconds),
        };
        config.admin_listen = admin_listen(self.admin_listen, self.listen, "TOPIC_SERVER")?;
        config.max_topics = self.max_topics as usize;
        config.max_log_total = self.max_log_total_bytes as usize;
        config.presence_interval = Duration::from_millis(self.presence_interval_ms);
        config.presence = crate::presence::PresenceLimits {
            listed_max: self.presence_list_max as usize,
            max_members: self.presence_max as usize,
            ..Default::default()
        };
        config.cluster_secret =
            ringcast_proto::auth::ClusterSecret::parse(self.cluster_secret.as_deref())?;
        match (self.cluster_auth, config.cluster_secret.is_set()) {
            (Some(ClusterAuth::Secret), false) => {
                return Err("CLUSTER_AUTH=secret needs CLUSTER_SECRET".into());
            }
            (None, false) if !self.listen.ip().is_loopback() => {
                return Err(format!(
                    "TOPIC_SERVER_LISTEN {} is reachable beyond this machine and CLUSTER_SECRET is \
                     not set (protected mode): set CLUSTER_SECRET on every gateway and topic \
                     server, or CLUSTER_AUTH=none to run open on purpose",
                    self.listen
                ));
            }
            _ => {}
        }
        Ok((self.listen, config))
    }
}
/// The admin listener: `given`, or loopback on the `listen` port + 100 (`prefix` names the
/// settings in the error when there is no such port).
pub fn admin_listen(
    given: Option<SocketAddr>,
    listen: SocketAddr,
    prefix: &str,
) -> Result<SocketAddr, String> {
    if let Some(addr) = given {
        return Ok(addr);
    }
    let port = listen
        .port()
        .checked_add(100)
        .filter(|_| listen.port() != 0);
    let port = port.ok_or_else(|| {
        format!("{prefix}_ADMIN_LISTEN: set it (the default is the {prefix}_LISTEN port + 100)")
    })?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}
