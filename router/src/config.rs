//! `overlayd`'s configuration: one typed struct built from command-line flags, with defaults
//! that mirror Swarm's.

use clap::Parser;
use ipnet::Ipv4Net;
use protocol::types::NodeName;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Swarm's manager port.
pub const CONTROL_PORT: u16 = 2377;

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
    /// The socket of the overlayd this one takes over from (`upgrade`): from the
    /// environment (`OVERLAYD_UPGRADE_FROM`), never a flag.
    #[arg(skip)]
    pub upgrade_from: Option<PathBuf>,

    /// This node's name, unique in the cluster (letters, digits, '-' and '_').
    #[arg(long, value_parser = parse_node)]
    pub node: NodeName,

    /// Directory for the persisted state and task logs [default: /var/lib/overlay/NODE].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,

    /// Unix socket the API listens on [default: /run/overlay/NODE.sock]; mode 0660, owned
    /// by root.
    #[arg(long)]
    pub socket: Option<PathBuf>,

    /// Group given access to the API socket (as Docker's `docker` group: its members can do
    /// anything overlayd can) [default: root's only].
    #[arg(long)]
    pub socket_group: Option<String>,

    /// Pool that networks without --subnet get their subnet from.
    #[arg(long, default_value = protocol::ipam::DEFAULT_POOL)]
    pub default_addr_pool: Ipv4Net,

    /// Prefix length of the subnets carved from --default-addr-pool.
    #[arg(long, default_value_t = protocol::ipam::DEFAULT_POOL_PREFIX, value_parser = clap::value_parser!(u8).range(8..=30))]
    pub default_addr_pool_mask_length: u8,

    /// Underlay address of this node: where other nodes send VXLAN and reach the control plane.
    /// Needed with --init and --join.
    #[arg(long)]
    pub advertise_addr: Option<Ipv4Addr>,

    /// Start a new cluster with this node as its manager (creates the cluster CA and a join
    /// token; on later starts the existing ones are kept).
    #[arg(long, conflicts_with_all = ["join", "token"])]
    pub init: bool,

    /// Join the cluster whose manager listens at ADDR[:PORT] (port 2377 by default). Only
    /// needed the first time: a member remembers its manager.
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_manager_addr)]
    pub join: Option<SocketAddr>,

    /// How long node certificates last (manager) before they must be renewed (nodes renew
    /// theirs between 50% and 80% of it), e.g. 90d, 2160h, 30s [default: 90d, as Swarm;
    /// kept for later starts].
    #[arg(long, value_parser = parse_cert_expiry)]
    pub cert_expiry: Option<std::time::Duration>,

    /// Push nodes the whole state every time instead of what changed (the control-plane
    /// bench's baseline; costs bandwidth, never correctness).
    #[arg(long, hide = true)]
    pub control_full_snapshots: bool,

    /// Join token, as printed by `overlayctl cluster join-token` on the manager.
    #[arg(long, requires = "join")]
    pub token: Option<String>,

    /// Address the manager's control endpoint (QUIC) listens on [default: ADVERTISE_ADDR:2377].
    #[arg(long)]
    pub listen_addr: Option<SocketAddr>,

    /// UDP port VXLAN is received on (and sent to on other nodes that use the default).
    #[arg(long, default_value_t = protocol::vxlan::UDP_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub data_path_port: u16,

    /// Most load-balanced flows this node tracks at once; new flows beyond it are refused
    /// (and counted), existing ones go on.
    #[arg(long, default_value_t = datapath::conntrack::DEFAULT_MAX_FLOWS, value_parser = parse_max_flows)]
    pub lb_max_flows: usize,

    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9323 (dockerd's metrics port). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Serve Docker's network and IPAM plugin protocol on this socket (its file name is the
    /// driver name: `docker network create -d overlayd --ipam-driver overlayd`). Without a
    /// value: /run/docker/plugins/overlayd.sock, where dockerd looks.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "/run/docker/plugins/overlayd.sock")]
    pub docker_plugin: Option<PathBuf>,

    /// dockerd's API socket, which the plugin asks for a new network's name.
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock")]
    pub docker_host: PathBuf,

    /// Datapath worker threads (default: one per core). Each TAP gets a queue per worker
    /// and each worker its own underlay socket; the kernel spreads flows over them.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub datapath_workers: Option<u64>,

    /// Most connections (and, apart, UDP clients) the routing mesh carries at once on this
    /// node; more connections are refused with a reset and counted, a UDP client beyond it
    /// takes the place of its port's client idle the longest (counted as evicted).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub ingress_max_connections: u64,

    /// How often encrypted networks get a new key (manager), e.g. 12h, 30m [default: 12h, as
    /// Swarm]. `network rotate-key NAME` rotates at once.
    #[arg(long, default_value = "12h", value_parser = parse_interval)]
    pub key_rotation_interval: std::time::Duration,

    /// How long a node may be down before the manager replaces its tasks on other nodes,
    /// e.g. 10s, 1m [default: 10s]. A node back sooner keeps its tasks.
    #[arg(long, default_value = "10s", value_parser = parse_grace)]
    pub reschedule_after: std::time::Duration,

    /// Past tasks kept per service slot and shown by `service ps` (Swarm's task history
    /// retention limit) [default: 5].
    #[arg(long, default_value_t = protocol::state::DEFAULT_TASK_HISTORY_LIMIT, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub task_history_limit: u32,

    /// Resolver that names outside the cluster are forwarded to (repeatable) [default: the
    /// nameservers of this node's /etc/resolv.conf].
    #[arg(long = "dns-upstream", value_name = "ADDR[:PORT]", value_parser = parse_upstream)]
    pub dns_upstreams: Vec<SocketAddr>,

    /// Where a manager keeps the desired state: `file` (STATE_DIR/state.json) or `etcd`
    /// (one key per object under --etcd-prefix, every change fenced on this manager's
    /// leader key; an existing state.json is imported into an empty etcd).
    #[arg(long, value_enum, default_value_t = StoreKind::File)]
    pub store: StoreKind,

    /// etcd's client URLs, comma-separated (with --store etcd), e.g.
    /// https://10.0.0.1:2379,https://10.0.0.2:2379.
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// CA certificate (PEM) that etcd's server certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub etcd_cacert: Option<PathBuf>,

    /// Client certificate (PEM) this manager presents to etcd (with --etcd-key).
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// The key prefix of this cluster's state in etcd.
    #[arg(long, default_value = "/overlay")]
    pub etcd_prefix: String,

    /// After an upgrade in place, how long the old process goes on carrying the routing
    /// mesh connections it had established (the new one takes every new one) before it
    /// resets what remains and exits, e.g. 30s, 2m [default: 30s].
    #[arg(long, default_value = "30s", value_parser = parse_grace)]
    pub upgrade_drain_timeout: std::time::Duration,

    /// On this shutdown (SIGTERM, SIGINT), stop every task on this node as well. Without it
    /// the tasks keep running (processes, namespaces, interfaces) and the next start of
    /// this node adopts them.
    #[arg(long)]
    pub stop_tasks: bool,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// `--store`: where the desired state is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    File,
    Etcd,
}

fn parse_manager_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<Ipv4Addr>()
        .map(|ip| SocketAddr::new(ip.into(), CONTROL_PORT))
        .map_err(|_| format!("invalid manager address {s:?}: expected IP or IP:PORT"))
}

fn parse_max_flows(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1 << 26).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid flow bound {s:?}: expected 1 to {}",
            1 << 26
        )),
    }
}

/// A DNS server: IP (port 53) or IP:PORT.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("invalid DNS server {s:?}: expected IP or IP:PORT"))
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

/// An interval of whole seconds, minutes, hours or days: `90s`, `30m`, `12h`, `1d`.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    parse_duration(s, 10)
}

fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    parse_duration(s, 1)
}

/// A duration such as 90s, 30m, 12h or 2d, of at least `min_secs`.
fn parse_duration(s: &str, min_secs: u64) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid interval {s:?}: expected e.g. 90s, 30m, 12h");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(bad()),
    };
    if secs < min_secs {
        return Err(format!("invalid interval {s:?}: at least {min_secs}s"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// A certificate lifetime: as [`parse_interval`], at least 10 s (Swarm's minimum is an hour;
/// shorter ones are for tests).
fn parse_cert_expiry(s: &str) -> Result<std::time::Duration, String> {
    parse_interval(s).map_err(|e| e.replace("interval", "certificate expiry"))
}

impl Config {
    /// `--etcd-*` as the store takes them.
    pub fn etcd(&self) -> crate::store::etcd::EtcdConfig {
        crate::store::etcd::EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            cacert: self.etcd_cacert.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            prefix: self.etcd_prefix.clone(),
        }
    }

    /// How many datapath workers to run: as asked, or one per core the process may use.
    pub fn workers(&self) -> usize {
        match self.datapath_workers {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
        }
    }
}
