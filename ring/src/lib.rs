//! The ringcast ring: which topic server owns which topic.
//!
//! Pure data and functions (no IO runtime): parse a versioned ring config, look up
//! `owner(topic)` on a consistent-hash ring of virtual nodes, diff two rings, and decide
//! whether a reloaded ring replaces the current one. With the `watch` feature, `watcher`
//! keeps a process's ring current from its file.

mod config;
mod diff;
mod placement;
pub mod reload;
#[cfg(feature = "watch")]
pub mod watcher;

pub use config::{ConfigError, NodeSpec, RingConfig, parse_nodes_list};
pub use diff::{NodeShare, RingDiff};
pub use placement::Ring;
pub use reload::NewestSeen;

/// The ring settings every process takes: `RING_CONFIG` or `RING_NODES`.
#[derive(Debug, Clone, clap::Args)]
pub struct RingArgs {
    /// Path to the ring config (TOML). A gateway with neither RING_CONFIG nor RING_NODES runs
    /// the topic-server core in-process.
    #[arg(
        long,
        env = "RING_CONFIG",
        value_name = "RING_CONFIG",
        conflicts_with = "ring_nodes"
    )]
    pub ring_config: Option<std::path::PathBuf>,
    /// Quick-start ring: `id=host:port,id=host:port` (version 1).
    #[arg(long, env = "RING_NODES", value_name = "RING_NODES")]
    pub ring_nodes: Option<String>,
}

impl RingArgs {
    /// The source named by `RING_CONFIG` (preferred) or `RING_NODES`, if either is set.
    pub fn source(self) -> Option<RingSource> {
        match (self.ring_config, self.ring_nodes) {
            (Some(path), _) => Some(RingSource::File(path)),
            (None, Some(list)) => Some(RingSource::List(list)),
            (None, None) => None,
        }
    }
}

/// Where a process reads its ring from, as configured by `RING_CONFIG` or `RING_NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingSource {
    /// A TOML ring config file (watched for edits by the processes).
    File(std::path::PathBuf),
    /// The quick-start list `id=host:port,...` (version 1, never reloaded).
    List(String),
}

impl RingSource {
    /// Reads and builds the ring. Errors name the source.
    pub fn load(&self) -> Result<Ring, String> {
        match self {
            RingSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("RING_CONFIG {}: cannot read: {e}", path.display()))?;
                Ring::from_toml(&text).map_err(|e| format!("RING_CONFIG {}: {e}", path.display()))
            }
            RingSource::List(list) => parse_nodes_list(list)
                .and_then(Ring::new)
                .map_err(|e| format!("RING_NODES: {e}")),
        }
    }
}
