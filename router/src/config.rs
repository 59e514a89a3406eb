//! `overlayd`'s configuration: one typed struct built from command-line flags, with defaults
//! that mirror Swarm's.

use clap::Parser;
use ipnet::Ipv4Net;
use protocol::types::NodeName;
use std::path::PathBuf;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "overlayd",
    version,
    about = "Userspace overlay network router: one per node.",
    long_about = "overlayd runs one node of an overlay cluster. It terminates the TAP interfaces \
                  of the tasks on this node, switches their frames in userspace, answers ARP and \
                  gateway pings itself, runs the tasks' processes, and serves an HTTP+JSON API \
                  on a Unix socket for overlayctl. Needs root (namespaces, TAP devices)."
)]
pub struct Config {
    /// This node's name, unique in the cluster (letters, digits, '-' and '_').
    #[arg(long, value_parser = parse_node)]
    pub node: NodeName,

    /// Directory for the persisted state and task logs [default: /var/lib/overlay/NODE].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,

    /// Unix socket the API listens on [default: /run/overlay/NODE.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,

    /// Pool that networks without --subnet get their subnet from.
    #[arg(long, default_value = protocol::ipam::DEFAULT_POOL)]
    pub default_addr_pool: Ipv4Net,

    /// Prefix length of the subnets carved from --default-addr-pool.
    #[arg(long, default_value_t = protocol::ipam::DEFAULT_POOL_PREFIX, value_parser = clap::value_parser!(u8).range(8..=30))]
    pub default_addr_pool_mask_length: u8,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

fn parse_node(s: &str) -> Result<NodeName, String> {
    NodeName::new(s).map_err(|e| e.to_string())
}

impl Config {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/overlay").join(self.node.as_str()))
    }

    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/overlay").join(format!("{}.sock", self.node)))
    }
}
