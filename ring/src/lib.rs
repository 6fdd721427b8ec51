//! The ringcast ring: which topic server owns which topic.
//!
//! Pure data and functions (no IO runtime): parse a versioned ring config, look up
//! `owner(topic)` on a consistent-hash ring of virtual nodes, and diff two rings.

mod config;
mod diff;
mod placement;

pub use config::{ConfigError, NodeSpec, RingConfig, parse_nodes_list};
pub use diff::{NodeShare, RingDiff};
pub use placement::Ring;
