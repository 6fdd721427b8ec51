//! The gateway's configuration: typed, documented, read from the environment here only.
//!
//! `Config` is plain data so tests build it directly; `Config::from_env` parses the
//! environment (and `--help`) with clap, and every error names the variable at fault.

use crate::auth::list;
use clap::Parser;
use ringcast_ring::{Ring, RingSource};
use std::net::SocketAddr;
use std::time::Duration;

/// Everything a gateway needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name of this gateway in topic-server logs and status (`GATEWAY_ID`).
    pub gateway_id: String,
    /// The ring of topic servers; `None` runs the topic-server core in-process.
    pub ring: Option<(Ring, RingSource)>,
    /// Open websocket connections at most; more get HTTP 503.
    pub max_connections: usize,
    /// Channels (joined topics) per connection at most.
    pub max_channels: usize,
    /// Frames a connection may fall behind on one of its topics, and events queued for it,
    /// before it is cut as a slow consumer (close 1013).
    pub client_queue: usize,
    /// Largest websocket message (and frame) accepted from a client.
    pub max_frame_bytes: usize,
    /// A connection that sends nothing for this long is closed (1001).
    pub idle_timeout: Duration,
    /// Allowed topic patterns (`room:*` prefix or exact); empty allows every topic.
    pub topic_patterns: Vec<String>,
    /// Requests queued per upstream link.
    pub upstream_queue: usize,
    /// HTTP/2 keepalive towards topic servers (interval and timeout).
    pub keepalive: Duration,
    /// Threads of a runtime of their own for the upstream links and their fan-out
    /// (`GATEWAY_LINK_THREADS`); 0 runs them on the connections' runtime.
    pub link_threads: usize,
    /// Time given to connections to close at shutdown.
    pub shutdown_grace: Duration,
    /// Refused frames (malformed, answered with an error, or over the rate) tolerated per
    /// 10 s before the socket is closed (1008).
    pub max_malformed: u32,
    /// A socket with frames waiting that has taken none of them for this long is closed
    /// (1013), whatever else it does.
    pub write_timeout: Duration,
    /// Bytes queued for one socket and not yet written, at most; more closes it (1013).
    pub max_outbound_bytes: usize,
    /// Client frames per second a socket may send (sustained), and in a burst; 0: no limit.
    pub client_rate: Rate,
    /// Joins (and rejoins) and leaves per second a socket may send, and in a burst.
    pub join_rate: Rate,
    /// Longest topic name, in bytes.
    pub max_topic_bytes: usize,
    /// The admin listener: `/status`, `/ring` (loopback by default).
    pub admin_listen: SocketAddr,
    /// Connections accepted that have not become websockets yet, at most.
    pub max_pending_http: usize,
    /// Time an HTTP connection gets to send its request (and be upgraded).
    pub http_timeout: Duration,
    /// Open connections per client IP address at most (0: no limit).
    pub max_connections_per_ip: usize,
    /// How clients prove who they are (`GATEWAY_AUTH`, keys).
    pub auth: crate::auth::Auth,
    /// Browser origins allowed to open websockets (empty: any).
    pub allowed_origins: Vec<String>,
    /// The cluster's shared secret, sent on every call to a topic server (`CLUSTER_SECRET`).
    pub cluster_secret: ringcast_proto::auth::ClusterSecret,
    /// The backend API listener (`GATEWAY_API_LISTEN`); `None`: no API.
    pub api_listen: Option<SocketAddr>,
    /// Keys a backend API call may carry (`Authorization: Bearer <key>`); empty: every call
    /// is refused (401).
    pub api_keys: Vec<String>,
    /// At SIGTERM, connections are closed (1012) evenly over this long (`GATEWAY_DRAIN_SECS`).
    pub drain: Duration,
}

/// A token bucket's settings: `per_sec` sustained, `burst` at once (`per_sec` 0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

/// Longest event name a client may publish, in bytes.
pub const MAX_EVENT_BYTES: usize = 128;

impl Config {
    /// A config with every default: embedded mode unless a ring is set; the admin listener on
    /// an ephemeral loopback port.
    pub fn new(gateway_id: impl Into<String>, ring: Option<(Ring, RingSource)>) -> Self {
        Config {
            gateway_id: gateway_id.into(),
            ring,
            max_connections: 100_000,
            max_channels: 100,
            client_queue: 1024,
            max_frame_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
            topic_patterns: Vec::new(),
            upstream_queue: 65_536,
            keepalive: Duration::from_secs(2),
            link_threads: 0,
            shutdown_grace: Duration::from_secs(5),
            max_malformed: 100,
            write_timeout: Duration::from_secs(10),
            max_outbound_bytes: 8 << 20,
            client_rate: Rate {
                per_sec: 1000,
                burst: 2000,
            },
            join_rate: Rate {
                per_sec: 50,
                burst: 200,
            },
            max_topic_bytes: 256,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_pending_http: 1024,
            http_timeout: Duration::from_secs(10),
            max_connections_per_ip: 0,
            auth: crate::auth::Auth::Open,
            allowed_origins: Vec::new(),
            cluster_secret: Default::default(),
            api_listen: None,
            api_keys: Vec::new(),
            drain: Duration::from_secs(10),
        }
    }

    /// Reads the environment (and command line); the error names the bad variable.
    pub fn from_env() -> Result<(SocketAddr, Config), String> {
        Cli::parse().into_config()
    }

    /// Whether clients may join `topic` under the configured patterns.
    pub fn topic_allowed(&self, topic: &str) -> bool {
        self.topic_patterns.is_empty()
            || (self.topic_patterns.iter()).any(|p| crate::auth::topic_matches(p, topic))
    }
}

/// ringcast gateway: Phoenix Channels over websocket at `/socket/websocket`, each topic
/// routed to its owner on the ring. With no ring configured it is a complete single-node
/// server.
///
/// Every setting is an environment variable (a flag of the same meaning exists for each).
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about, long_about = None)]
struct Cli {
    /// Address for websocket clients and `GET /status`.
    #[arg(
        long,
        env = "GATEWAY_LISTEN",
        value_name = "GATEWAY_LISTEN",
        default_value = "127.0.0.1:4000"
    )]
    listen: SocketAddr,
    /// Name of this gateway (default: gateway-<port>).
    #[arg(long, env = "GATEWAY_ID", value_name = "GATEWAY_ID")]
    id: Option<String>,
    #[command(flatten)]
    ring: ringcast_ring::RingArgs,
    /// Open websocket connections at most (more are refused with HTTP 503).
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", value_name = "GATEWAY_MAX_CONNECTIONS", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Channels per connection at most.
    #[arg(long, env = "GATEWAY_MAX_CHANNELS", value_name = "GATEWAY_MAX_CHANNELS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_channels: u32,
    /// Frames a connection may fall behind on one of its topics (and events queued for it)
    /// before it is closed as too slow (1013).
    #[arg(long, env = "GATEWAY_CLIENT_QUEUE", value_name = "GATEWAY_CLIENT_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(8..))]
    client_queue: u32,
    /// Largest client websocket message in bytes (larger: close 1009); at most 8 MiB, so that
    /// a publish fits one gRPC message to the topic server.
    #[arg(long, env = "GATEWAY_MAX_FRAME_BYTES", value_name = "GATEWAY_MAX_FRAME_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(256..=ringcast_proto::batch::MAX_ITEM_BYTES as i64))]
    max_frame_bytes: u32,
    /// Seconds without any client frame before the socket is closed (1001).
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT_SECS", value_name = "GATEWAY_IDLE_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout_secs: u64,
    /// Comma-separated allowed topics: `room:*` (prefix) or exact names. Default: any.
    #[arg(long, env = "GATEWAY_TOPICS", value_name = "GATEWAY_TOPICS")]
    topics: Option<String>,
    /// Seconds between HTTP/2 keepalive pings to topic servers (also the ping timeout).
    #[arg(long, env = "GATEWAY_KEEPALIVE_SECS", value_name = "GATEWAY_KEEPALIVE_SECS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    keepalive_secs: u64,
    /// Threads of their own for the links to topic servers and their fan-out (0: none, they
    /// run with the connections).
    #[arg(long, env = "GATEWAY_LINK_THREADS", value_name = "GATEWAY_LINK_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    link_threads: u16,
    /// Address of the admin listener (`/status`, `/ring`); default: loopback, the websocket
    /// port + 100.
    #[arg(
        long,
        env = "GATEWAY_ADMIN_LISTEN",
        value_name = "GATEWAY_ADMIN_LISTEN"
    )]
    admin_listen: Option<SocketAddr>,
    /// Seconds a socket with frames waiting may take none of them before it is closed (1013).
    #[arg(long, env = "GATEWAY_WRITE_TIMEOUT_SECS", value_name = "GATEWAY_WRITE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    write_timeout_secs: u64,
    /// Bytes queued for one socket and not yet written, at most (more: close 1013).
    #[arg(long, env = "GATEWAY_MAX_OUTBOUND_BYTES", value_name = "GATEWAY_MAX_OUTBOUND_BYTES", default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(65_536..=1 << 32))]
    max_outbound_bytes: u64,
    /// Client frames per second a socket may send, sustained (0: no limit).
    #[arg(
        long,
        env = "GATEWAY_CLIENT_RATE",
        value_name = "GATEWAY_CLIENT_RATE",
        default_value_t = 1000
    )]
    client_rate: u32,
    /// Client frames a socket may send in a burst.
    #[arg(long, env = "GATEWAY_CLIENT_BURST", value_name = "GATEWAY_CLIENT_BURST", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    client_burst: u32,
    /// Joins and leaves per second a socket may send, sustained (0: no limit).
    #[arg(
        long,
        env = "GATEWAY_JOIN_RATE",
        value_name = "GATEWAY_JOIN_RATE",
        default_value_t = 50
    )]
    join_rate: u32,
    /// Joins and leaves a socket may send in a burst (phoenix.js rejoins every channel at once
    /// after a reconnect: keep it above GATEWAY_MAX_CHANNELS).
    #[arg(long, env = "GATEWAY_JOIN_BURST", value_name = "GATEWAY_JOIN_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    join_burst: u32,
    /// Longest topic name in bytes.
    #[arg(long, env = "GATEWAY_MAX_TOPIC_BYTES", value_name = "GATEWAY_MAX_TOPIC_BYTES", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_topic_bytes: u32,
    /// Connections accepted that have not become websockets yet, at most (more are closed).
    #[arg(long, env = "GATEWAY_MAX_PENDING_HTTP", value_name = "GATEWAY_MAX_PENDING_HTTP", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_pending_http: u32,
    /// Seconds an HTTP connection gets to send its request and be upgraded.
    #[arg(long, env = "GATEWAY_HTTP_TIMEOUT_SECS", value_name = "GATEWAY_HTTP_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_timeout_secs: u64,
    /// Open connections per client IP address at most (0: no limit).
    #[arg(
        long,
        env = "GATEWAY_MAX_CONNECTIONS_PER_IP",
        value_name = "GATEWAY_MAX_CONNECTIONS_PER_IP",
        default_value_t = 0
    )]
    max_connections_per_ip: u32,
    /// `jwt`: clients need a connection token signed by one of the keys; `none`: anyone may
    /// connect, join and publish. Default: `jwt` when keys are set, else `none` on a loopback
    /// address (a gateway listening beyond loopback with no keys refuses to start).
    #[arg(long, env = "GATEWAY_AUTH", value_name = "GATEWAY_AUTH")]
    auth: Option<AuthMode>,
    /// HS256 secrets tokens may be signed with: `kid:secret,...` (a kid is optional; each
    /// secret at least 32 bytes).
    #[arg(
        long,
        env = "GATEWAY_JWT_SECRETS",
        value_name = "GATEWAY_JWT_SECRETS",
        hide_env_values = true
    )]
    jwt_secrets: Option<String>,
    /// RS256 or ES256 public keys (PEM files): `kid:/path/key.pem,...`.
    #[arg(
        long,
        env = "GATEWAY_JWT_PUBLIC_KEYS",
        value_name = "GATEWAY_JWT_PUBLIC_KEYS"
    )]
    jwt_public_keys: Option<String>,
    /// Seconds of clock skew allowed when checking a token's `exp`.
    #[arg(long, env = "GATEWAY_JWT_LEEWAY_SECS", value_name = "GATEWAY_JWT_LEEWAY_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    jwt_leeway_secs: u64,
    /// Browser origins allowed to open websockets, comma-separated: exact
    /// (`https://app.example.com`) or `*.example.com`. Default: any.
    #[arg(
        long,
        env = "GATEWAY_ALLOWED_ORIGINS",
        value_name = "GATEWAY_ALLOWED_ORIGINS"
    )]
    allowed_origins: Option<String>,
    /// The cluster's shared secret, sent on every call to a topic server (set the same on
    /// every gateway and topic server).
    #[arg(
        long,
        env = "CLUSTER_SECRET",
        value_name = "CLUSTER_SECRET",
        hide_env_values = true
    )]
    cluster_secret: Option<String>,
    /// Address of the backend API listener (`/api/...`): unset, no API. Needs GATEWAY_API_KEYS.
    #[arg(long, env = "GATEWAY_API_LISTEN", value_name = "GATEWAY_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// Keys for the backend API, comma-separated (each at least 16 bytes; several at once
    /// while one is rotated): `Authorization: Bearer <key>`.
    #[arg(
        long,
        env = "GATEWAY_API_KEYS",
        value_name = "GATEWAY_API_KEYS",
        hide_env_values = true
    )]
    api_keys: Option<String>,
    /// Seconds over which a draining gateway (SIGTERM) closes its connections, evenly; a
    /// second SIGTERM closes the rest at once.
    #[arg(long, env = "GATEWAY_DRAIN_SECS", value_name = "GATEWAY_DRAIN_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    drain_secs: u64,
}

/// Shortest backend API key, in bytes.
pub const MIN_API_KEY_BYTES: usize = 16;

/// `GATEWAY_AUTH`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum AuthMode {
    None,
    Jwt,
}

impl Cli {
    fn into_config(self) -> Result<(SocketAddr, Config), String> {
        let ring = match self.ring.source() {
            Some(source) => Some((source.load()?, source)),
            None => None,
        };
        let id = self
            .id
            .unwrap_or_else(|| format!("gateway-{}", self.listen.port()));
        if id.is_empty() || id.len() > 128 {
            return Err("GATEWAY_ID must be 1 to 128 bytes".into());
        }
        let mut config = Config::new(id, ring);
        config.max_connections = self.max_connections as usize;
        config.max_channels = self.max_channels as usize;
        config.client_queue = self.client_queue as usize;
        config.max_frame_bytes = self.max_frame_bytes as usize;
        config.idle_timeout = Duration::from_secs(self.idle_timeout_secs);
        config.keepalive = Duration::from_secs(self.keepalive_secs);
        config.link_threads = self.link_threads.into();
        config.admin_listen =
            ringcast_topic_server::config::admin_listen(self.admin_listen, self.listen, "GATEWAY")?;
        config.write_timeout = Duration::from_secs(self.write_timeout_secs);
        config.max_outbound_bytes = self.max_outbound_bytes as usize;
        config.client_rate = Rate {
            per_sec: self.client_rate,
            burst: self.client_burst,
        };
        config.join_rate = Rate {
            per_sec: self.join_rate,
            burst: self.join_burst,
        };
        config.max_topic_bytes = self.max_topic_bytes as usize;
        config.max_pending_http = self.max_pending_http as usize;
        config.http_timeout = Duration::from_secs(self.http_timeout_secs);
        config.max_connections_per_ip = self.max_connections_per_ip as usize;
        let keys =
            crate::auth::keys_from(self.jwt_secrets.as_deref(), self.jwt_public_keys.as_deref())?;
        let leeway = Duration::from_secs(self.jwt_leeway_secs);
        config.auth = match (self.auth, keys.is_empty()) {
            (Some(AuthMode::None), _) => crate::auth::Auth::Open,
            (Some(AuthMode::Jwt), true) => {
                return Err(
                    "GATEWAY_AUTH=jwt needs GATEWAY_JWT_SECRETS or GATEWAY_JWT_PUBLIC_KEYS".into(),
                );
            }
            (_, false) => crate::auth::Auth::Jwt { keys, leeway },
            (None, true) if self.listen.ip().is_loopback() => crate::auth::Auth::Open,
            (None, true) => {
                return Err(format!(
                    "GATEWAY_LISTEN {} is reachable beyond this machine and no token keys are set \
                     (protected mode): set GATEWAY_JWT_SECRETS or GATEWAY_JWT_PUBLIC_KEYS, or \
                     GATEWAY_AUTH=none to run open on purpose",
                    self.listen
                ));
            }
        };
        config.cluster_secret =
            ringcast_proto::auth::ClusterSecret::parse(self.cluster_secret.as_deref())?;
        if let Some(origins) = self.allowed_origins {
            config.allowed_origins = list(Some(&origins)).map(str::to_owned).collect();
        }
        config.drain = Duration::from_secs(self.drain_secs);
        config.api_keys = api_keys(self.api_keys.as_deref())?;
        config.api_listen = self.api_listen;
        if config.api_listen.is_some() && config.api_keys.is_empty() {
            return Err("GATEWAY_API_LISTEN is set but GATEWAY_API_KEYS is not: set the keys backends use (Authorization: Bearer <key>)".into());
        }
        if let Some(topics) = self.topics {
            config.topic_patterns = list(Some(&topics)).map(str::to_owned).collect();
            if config.topic_patterns.is_empty() {
                return Err("GATEWAY_TOPICS is set but names no topic pattern".into());
            }
        }
        Ok((self.listen, config))
    }
}

/// `GATEWAY_API_KEYS`: comma-separated, each long enough.
fn api_keys(keys: Option<&str>) -> Result<Vec<String>, String> {
    let keys: Vec<String> = list(keys).map(str::to_owned).collect();
    match keys.iter().position(|k| k.len() < MIN_API_KEY_BYTES) {
        Some(i) => Err(format!(
            "GATEWAY_API_KEYS: key {} is shorter than {MIN_API_KEY_BYTES} bytes",
            i + 1
        )),
        None => Ok(keys),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_listed_and_checked() {
        assert_eq!(api_keys(None).unwrap(), Vec::<String>::new());
        let keys = api_keys(Some(" 0123456789abcdef , fedcba9876543210 ,")).unwrap();
        assert_eq!(keys, ["0123456789abcdef", "fedcba9876543210"]);
        let error = api_keys(Some("0123456789abcdef,short")).unwrap_err();
        assert!(error.contains("GATEWAY_API_KEYS: key 2"), "{error}");
    }

    #[test]
    fn topic_patterns() {
        let mut c = Config::new("g", None);
        assert!(c.topic_allowed("anything"));
        c.topic_patterns = vec!["room:*".into(), "lobby".into()];
        assert!(c.topic_allowed("room:1"));
        assert!(c.topic_allowed("lobby"));
        assert!(!c.topic_allowed("lobby2"));
        assert!(!c.topic_allowed("user:1"));
    }

    #[test]
    fn a_bad_setting_is_named() {
        let parsed = |args: &[&str]| {
            let args = ["gateway"].iter().chain(args);
            Cli::try_parse_from(args).map(|cli| cli.link_threads)
        };
        assert_eq!(parsed(&[]).unwrap(), 0);
        assert_eq!(parsed(&["--link-threads", "4"]).unwrap(), 4);
        let error = parsed(&["--link-threads", "300"]).unwrap_err().to_string();
        assert!(error.contains("GATEWAY_LINK_THREADS"), "{error}");
        // A publish must fit one gRPC message to the topic server.
        let frame = |v: &str| {
            Cli::try_parse_from(["gateway", "--max-frame-bytes", v]).map(|c| c.max_frame_bytes)
        };
        assert_eq!(frame("8388608").unwrap(), 8 << 20);
        let error = frame("16777216").unwrap_err().to_string();
        assert!(error.contains("GATEWAY_MAX_FRAME_BYTES"), "{error}");
    }
}
