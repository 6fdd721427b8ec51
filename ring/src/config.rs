//! The ring config file (TOML) and the quick-start `id=host:port,...` list.
//!
//! Parsing and validation only: every error names the field or entry that is wrong.

use serde::Deserialize;
use std::collections::HashSet;

/// Virtual nodes per unit of weight when the config does not say.
pub const DEFAULT_VNODES: u32 = 256;
/// Upper bounds that keep a typo from allocating a ring of billions of points.
const MAX_VNODES: u32 = 4096;
const MAX_WEIGHT: u32 = 1000;

/// A ring config as written by the operator.
///
/// ```toml
/// version = 3
/// vnodes = 128
/// [[nodes]]
/// id = "ts-a"
/// addr = "127.0.0.1:7001"
/// weight = 1
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingConfig {
    /// Must increase with every edit; processes never go back to an older ring.
    pub version: u64,
    /// Virtual nodes per unit of weight.
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    /// The topic servers, in any order (placement does not depend on the order).
    pub nodes: Vec<NodeSpec>,
}

/// One topic server of the ring.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Stable name of the node; placement hashes it, so renaming a node moves its topics.
    pub id: String,
    /// `host:port` of the node's gRPC listener.
    pub addr: String,
    /// Share of the keyspace relative to the other nodes (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_vnodes() -> u32 {
    DEFAULT_VNODES
}

fn default_weight() -> u32 {
    1
}

/// Why a ring config was refused. Each message names the bad field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("ring config is not valid TOML: {0}")]
    Toml(String),
    #[error("ring config: `nodes` is empty; a ring needs at least one node")]
    NoNodes,
    #[error("ring config: `vnodes` must be between 1 and {MAX_VNODES}, got {0}")]
    Vnodes(u32),
    #[error("ring config: nodes[{index}].id is empty")]
    EmptyId { index: usize },
    #[error("ring config: nodes[{index}].id `{id}` appears twice")]
    DuplicateId { index: usize, id: String },
    #[error("ring config: nodes[{index}].id `{id}` may only use letters, digits, `-`, `_` and `.`")]
    BadId { index: usize, id: String },
    #[error(
        "ring config: nodes[{index}].addr `{addr}` is not host:port (a host name, an IPv4 address or a bracketed IPv6 address, and a port)"
    )]
    BadAddr { index: usize, addr: String },
    #[error("ring config: nodes[{index}].addr `{addr}` appears twice (each node needs its own)")]
    DuplicateAddr { index: usize, addr: String },
    #[error("ring config: nodes[{index}].weight must be between 1 and {MAX_WEIGHT}, got {weight}")]
    BadWeight { index: usize, weight: u32 },
    #[error("ring node list: entry `{0}` is not id=host:port")]
    BadListEntry(String),
}

impl RingConfig {
    /// Parses and validates a TOML ring config.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: RingConfig =
            toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string().trim().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants the ring relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nodes.is_empty() {
            return Err(ConfigError::NoNodes);
        }
        if self.vnodes == 0 || self.vnodes > MAX_VNODES {
            return Err(ConfigError::Vnodes(self.vnodes));
        }
        let (mut seen, mut addrs) = (HashSet::new(), HashSet::new());
        for (index, node) in self.nodes.iter().enumerate() {
            if node.id.is_empty() {
                return Err(ConfigError::EmptyId { index });
            }
            if !node
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(ConfigError::BadId {
                    index,
                    id: node.id.clone(),
                });
            }
            if !seen.insert(node.id.as_str()) {
                return Err(ConfigError::DuplicateId {
                    index,
                    id: node.id.clone(),
                });
            }
            if !is_host_port(&node.addr) {
                return Err(ConfigError::BadAddr {
                    index,
                    addr: node.addr.clone(),
                });
            }
            if !addrs.insert(node.addr.to_ascii_lowercase()) {
                return Err(ConfigError::DuplicateAddr {
                    index,
                    addr: node.addr.clone(),
                });
            }
            if node.weight == 0 || node.weight > MAX_WEIGHT {
                return Err(ConfigError::BadWeight {
                    index,
                    weight: node.weight,
                });
            }
        }
        Ok(())
    }
}

/// Parses the quick-start form `id=host:port,id=host:port` into a version-1 config.
pub fn parse_nodes_list(list: &str) -> Result<RingConfig, ConfigError> {
    let nodes = list
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (id, addr) = entry
                .split_once('=')
                .ok_or_else(|| ConfigError::BadListEntry(entry.to_owned()))?;
            Ok(NodeSpec {
                id: id.trim().to_owned(),
                addr: addr.trim().to_owned(),
                weight: 1,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = RingConfig {
        version: 1,
        vnodes: DEFAULT_VNODES,
        nodes,
    };
    config.validate()?;
    Ok(config)
}

/// `host:port` as a gRPC address (`http://{addr}`) takes it: a host name or IPv4 address
/// (dot-separated labels of letters, digits and `-`), or an IPv6 address in brackets, and a
/// port other than 0.
fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        }
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version = 7
vnodes = 64
[[nodes]]
id = "ts-a"
addr = "127.0.0.1:7001"
[[nodes]]
id = "ts-b"
addr = "localhost:7002"
weight = 2
"#;

    #[test]
    fn parses_a_full_config() {
        let config = RingConfig::from_toml(GOOD).unwrap();
        assert_eq!(config.version, 7);
        assert_eq!(config.vnodes, 64);
        assert_eq!(config.nodes.len(), 2);
        assert_eq!(config.nodes[0].weight, 1);
        assert_eq!(config.nodes[1].weight, 2);
    }

    #[test]
    fn addresses_take_host_names_ipv4_and_bracketed_ipv6() {
        for addr in [
            "h:1",
            "ts-1.internal:7001",
            "10.0.0.7:7001",
            "[::1]:7001",
            "[fe80::1]:9",
        ] {
            assert!(is_host_port(addr), "{addr}");
        }
    }

    #[test]
    fn vnodes_default() {
        let config =
            RingConfig::from_toml("version = 1\n[[nodes]]\nid = \"a\"\naddr = \"h:1\"\n").unwrap();
        assert_eq!(config.vnodes, DEFAULT_VNODES);
    }

    #[test]
    fn errors_name_the_bad_field() {
        let cases: &[(&str, &str)] = &[
            ("vnodes = 3\n[[nodes]]\nid=\"a\"\naddr=\"h:1\"", "version"),
            ("version = 1\nnodes = []", "`nodes` is empty"),
            ("version = 1\n[[nodes]]\nid=\"a\"", "addr"),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\"nope\"",
                "nodes[0].addr",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\"h:0\"",
                "nodes[0].addr",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\"::1:7001\"",
                "nodes[0].addr `::1:7001` is not host:port",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\"http://h:7001\"",
                "nodes[0].addr",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\" h:1\"",
                "nodes[0].addr",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\"h:1\"\n[[nodes]]\nid=\"b\"\naddr=\"H:1\"",
                "nodes[1].addr `H:1` appears twice",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"\"\naddr=\"h:1\"",
                "nodes[0].id",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a b\"\naddr=\"h:1\"",
                "nodes[0].id",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\"h:1\"\n[[nodes]]\nid=\"a\"\naddr=\"h:2\"",
                "nodes[1].id `a` appears twice",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\"h:1\"\nweight=0",
                "nodes[0].weight",
            ),
            (
                "version = 1\nvnodes = 0\n[[nodes]]\nid=\"a\"\naddr=\"h:1\"",
                "vnodes",
            ),
            ("version = -1\n[[nodes]]\nid=\"a\"\naddr=\"h:1\"", "version"),
            (
                "version = 1\ncolour = 2\n[[nodes]]\nid=\"a\"\naddr=\"h:1\"",
                "colour",
            ),
            (
                "version = 1\n[[nodes]]\nid=\"a\"\naddr=\"h:1\"\nport=3",
                "port",
            ),
        ];
        for (text, needle) in cases {
            let err = RingConfig::from_toml(text).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "error for {text:?} should mention {needle:?}: {err}"
            );
        }
    }

    #[test]
    fn parses_the_node_list() {
        let config = parse_nodes_list("ts-a=127.0.0.1:7001, ts-b=127.0.0.1:7002").unwrap();
        assert_eq!(config.nodes[1].id, "ts-b");
        assert_eq!(config.nodes[1].addr, "127.0.0.1:7002");
        assert!(matches!(
            parse_nodes_list("ts-a"),
            Err(ConfigError::BadListEntry(_))
        ));
        assert_eq!(parse_nodes_list(""), Err(ConfigError::NoNodes));
    }
}
