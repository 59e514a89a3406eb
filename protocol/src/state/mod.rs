//! The cluster's desired state and the pure operations that change it.
//!
//! The manager holds one [`ClusterState`], applies operator requests to it with the methods
//! here (which check every invariant before touching anything: a refused request changes
//! nothing), persists it, and publishes it to the agents that realise it. Identifiers and
//! timestamps come in from the caller, so these functions stay deterministic.

use crate::ipam;
use crate::types::{MacAddr, NetworkName, NodeName, ServiceName, Vni};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Version of the on-disk / on-wire layout of [`ClusterState`].
pub const FORMAT: u32 = 1;
/// Docker's option that chooses a network's VXLAN id.
pub const OPT_VXLANID: &str = "com.docker.network.driver.overlay.vxlanid_list";
/// Docker's option that sets the MTU of a network's interfaces (for underlays whose MTU is
/// below 1500: the overlay MTU must leave 50 bytes for VXLAN).
pub const OPT_MTU: &str = "com.docker.network.driver.mtu";
/// MTU of overlay interfaces on a 1500-byte underlay.
pub const DEFAULT_MTU: u16 = 1450;
/// Docker's option that encrypts a network's traffic between nodes (`--opt encrypted`).
pub const OPT_ENCRYPTED: &str = "encrypted";
/// Largest MTU of an encrypted network's interfaces on a 1500-byte underlay: ESP adds up to
/// `esp::MAX_OVERHEAD` bytes to the VXLAN datagram.
pub const MAX_ENCRYPTED_MTU: u16 = 1405;
/// The default MTU of an encrypted network.
pub const ENCRYPTED_MTU: u16 = 1400;
/// Smallest MTU an IPv4 interface may have.
const MIN_MTU: u16 = 68;
/// Most replicas one service may ask for (bounds memory and namespaces per request).
pub const MAX_REPLICAS: u32 = 1000;
/// Name of the routing mesh's network, made when the cluster starts.
pub const INGRESS_NETWORK: &str = "ingress";
/// Swarm's VNI for `ingress` (user networks start at the next one).
pub const INGRESS_VNI: u32 = 4096;
/// Published ports given to services that do not choose one (Swarm's range).
pub const DYNAMIC_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: NetworkName,
    pub driver: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: Vni,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    pub created_at: u64,
    /// Endpoints behind standard VXLAN devices that are not overlayd nodes.
    #[serde(default)]
    pub vteps: Vec<Vtep>,
    /// The routing mesh's network (`network create --ingress`): services that publish ports
    /// are attached to it, and every node's router has an endpoint on it.
    #[serde(default)]
    pub ingress: bool,
    /// The address of each node's router endpoint on this (ingress) network.
    #[serde(default)]
    pub lb_endpoints: BTreeMap<NodeName, Ipv4Addr>,
    /// Nodes whose Docker has a network for this one (the Docker plugin's bookkeeping: the
    /// last of them to remove it releases a network the plugin made).
    #[serde(default)]
    pub docker_nodes: BTreeSet<NodeName>,
}

/// An external VTEP endpoint: a MAC (and optionally its IPv4 address) reachable at an
/// underlay address through plain VXLAN (a Linux vxlan device, a hardware switch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vtep {
    pub address: Ipv4Addr,
    pub mac: MacAddr,
    pub ip: Option<Ipv4Addr>,
}

impl Network {
    /// The MTU of this network's interfaces.
    pub fn mtu(&self) -> u16 {
        let default = if self.encrypted() {
            ENCRYPTED_MTU
        } else {
            DEFAULT_MTU
        };
        self.options
            .get(OPT_MTU)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    }

    /// Whether frames of this network cross the underlay sealed (`--opt encrypted`).
    pub fn encrypted(&self) -> bool {
        is_encrypted(&self.options)
    }

    /// The MAC the router answers with for the gateway address.
    pub fn gateway_mac(&self) -> MacAddr {
        MacAddr::from_ipv4(self.gateway)
    }
}

fn is_encrypted(options: &BTreeMap<String, String>) -> bool {
    options
        .get(OPT_ENCRYPTED)
        .is_some_and(|v| !matches!(v.trim(), "false" | "0" | "no"))
}

/// How a service is reached by name, as Docker's `--endpoint-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// One virtual IP per network, load-balanced by the client's node.
    #[default]
    Vip,
    /// No VIP: DNS answers the service's name with its tasks' addresses.
    Dnsrr,
}

/// Transport of a published port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

impl std::fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        })
    }
}

/// Where a published port opens, as Docker's `mode=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every node, balanced over all of the service's tasks (the routing mesh).
    #[default]
    Ingress,
    /// Only on nodes running a task, straight to that task.
    Host,
}

impl std::fmt::Display for PublishMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        })
    }
}

/// A header sent to the backend ahead of a connection's data, carrying the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// HAProxy's PROXY protocol, version 2 (binary).
    V2,
}

/// A published port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortConfig {
    pub protocol: PortProtocol,
    /// The port the service's tasks listen on.
    pub target: u16,
    /// The port opened on the nodes. In a request, 0 asks for a free one from
    /// [`DYNAMIC_PORTS`].
    pub published: u16,
    pub mode: PublishMode,
    #[serde(default)]
    pub proxy: Option<ProxyProtocol>,
}

impl std::fmt::Display for PortConfig {
    /// Docker's `service ls` form: `*:8080->80/tcp`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "*:{}->{}/{}", self.published, self.target, self.protocol)
    }
}

impl std::fmt::Display for EndpointMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndpointMode::Vip => "vip",
            EndpointMode::Dnsrr => "dnsrr",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: ServiceName,
    pub networks: Vec<NetworkName>,
    pub replicas: u32,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// The service's virtual IP on each of its networks (VIP mode): allocated from the
    /// network's IPAM when the service is created, kept until it is removed.
    #[serde(default)]
    pub vips: BTreeMap<NetworkName, Ipv4Addr>,
    /// Extra DNS names of the service, per network (`--network name=N,alias=A`).
    #[serde(default)]
    pub aliases: BTreeMap<NetworkName, Vec<String>>,
    /// Idle timeout of the service's load-balanced flows, in seconds (None: the node's
    /// default, far above IPVS's 900 s).
    #[serde(default)]
    pub lb_idle_timeout: Option<u64>,
    /// Published ports. A service with any is attached to the ingress network as well (its
    /// last entry in `networks`), through which every node's router reaches its tasks.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
}

impl Service {
    /// The networks the operator attached the service to (without the ingress network the
    /// routing mesh adds).
    pub fn user_networks<'a>(
        &'a self,
        state: &'a ClusterState,
    ) -> impl Iterator<Item = &'a NetworkName> + 'a {
        self.networks
            .iter()
            .filter(move |n| !state.networks.get(*n).is_some_and(|net| net.ingress))
    }
}

/// One endpoint of a task on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: NetworkName,
    pub address: Ipv4Addr,
    pub mac: MacAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    /// `<service>.<slot>`, unique in the cluster.
    pub name: String,
    pub service: ServiceName,
    pub slot: u32,
    pub node: NodeName,
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: NodeName,
    pub role: Role,
    pub availability: Availability,
    /// The underlay address other nodes send VXLAN to (`--advertise-addr`).
    pub advertise_addr: Option<Ipv4Addr>,
    /// The UDP port this node receives VXLAN on (`--data-path-port`).
    #[serde(default = "default_data_port")]
    pub data_port: u16,
    pub joined_at: u64,
}

fn default_data_port() -> u16 {
    crate::vxlan::UDP_PORT
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub format: u32,
    /// Bumped on every change; agents apply only newer revisions.
    pub revision: u64,
    pub networks: BTreeMap<NetworkName, Network>,
    pub services: BTreeMap<ServiceName, Service>,
    pub tasks: BTreeMap<String, Task>,
    pub nodes: BTreeMap<NodeName, Node>,
    /// Containers' interfaces made for a runtime (CNI, Docker), by [`Endpoint::key`].
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
}

/// A container's interface on a network, made by the node the container runs on for its
/// runtime (a CNI plugin call, or Docker's network plugin): a TAP in the container's network
/// namespace, an address from the network's pool, switched like a task's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The runtime's container id.
    pub container: String,
    /// The interface's name inside the container.
    pub ifname: String,
    /// The container's network namespace (a path on `node`); empty while a Docker endpoint
    /// waits for its container (Docker creates an endpoint before it joins a sandbox).
    pub netns: String,
    pub node: NodeName,
    pub network: NetworkName,
    pub address: Ipv4Addr,
    pub mac: MacAddr,
    /// Who asked for it: "cni" or "docker".
    pub runtime: String,
}

impl Endpoint {
    /// The key of a container's interface: a container has one endpoint per interface name.
    pub fn key(container: &str, ifname: &str) -> String {
        format!("{container}/{ifname}")
    }
}

/// A request for an endpoint (see [`ClusterState::add_endpoint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRequest {
    pub container: String,
    pub ifname: String,
    pub netns: String,
    pub node: NodeName,
    pub network: String,
    pub runtime: String,
    /// The address to give (Docker's IPAM chose it); otherwise the lowest free one.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            format: FORMAT,
            revision: 0,
            networks: BTreeMap::new(),
            services: BTreeMap::new(),
            tasks: BTreeMap::new(),
            nodes: BTreeMap::new(),
            endpoints: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("network {0} already exists")]
    NetworkExists(NetworkName),
    #[error("network {0} not found")]
    NoSuchNetwork(String),
    #[error("network {network} is in use by service(s) {services}")]
    NetworkInUse {
        network: NetworkName,
        services: String,
    },
    #[error("unsupported network driver {0:?}: only \"overlay\" is supported")]
    BadDriver(String),
    #[error("subnet {subnet} overlaps network {other} ({other_subnet})")]
    SubnetOverlap {
        subnet: Ipv4Net,
        other: NetworkName,
        other_subnet: Ipv4Net,
    },
    #[error("subnet {subnet} overlaps the ingress network's {reserved}")]
    SubnetReserved { subnet: Ipv4Net, reserved: Ipv4Net },
    #[error("no free subnet left in the address pool {pool} (/{prefix} networks)")]
    PoolExhausted { pool: Ipv4Net, prefix: u8 },
    #[error("gateway {gateway} is not a host address of subnet {subnet}")]
    BadGateway { gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error("subnet {subnet} is too small: it needs room for a gateway and at least one task")]
    SubnetTooSmall { subnet: Ipv4Net },
    #[error("no free address left in network {network} ({subnet})")]
    NetworkFull {
        network: NetworkName,
        subnet: Ipv4Net,
    },
    #[error("invalid option {key}={value}: {why}")]
    BadOption {
        key: String,
        value: String,
        why: String,
    },
    #[error("VNI {vni} is already used by network {other}")]
    VniInUse { vni: Vni, other: NetworkName },
    #[error("no free VNI left")]
    VniExhausted,
    #[error("service {0} already exists")]
    ServiceExists(ServiceName),
    #[error("service {0} not found")]
    NoSuchService(String),
    #[error("a service needs a command to run")]
    EmptyCommand,
    #[error("a service needs at least one network")]
    NoNetwork,
    #[error("network {0} is listed twice")]
    DuplicateNetwork(NetworkName),
    #[error("{0} replicas is more than the limit of {MAX_REPLICAS}")]
    TooManyReplicas(u32),
    #[error("no active node to place tasks on")]
    NoActiveNode,
    #[error("MAC {mac} is already used in network {network}")]
    MacInUse { mac: MacAddr, network: NetworkName },
    #[error("address {ip} is not free in network {network} ({subnet})")]
    AddressTaken {
        ip: Ipv4Addr,
        network: NetworkName,
        subnet: Ipv4Net,
    },
    #[error("no VTEP with MAC {mac} in network {network}")]
    NoSuchVtep { mac: MacAddr, network: NetworkName },
    #[error("node {0} not found")]
    NoSuchNode(String),
    #[error("invalid alias {alias:?}: {why}")]
    BadAlias { alias: String, why: String },
    #[error("aliases given for network {0}, which the service is not attached to")]
    AliasWithoutNetwork(NetworkName),
    #[error("port {published}/{protocol} is already published by service {service}")]
    PortInUse {
        published: u16,
        protocol: PortProtocol,
        service: ServiceName,
    },
    #[error("invalid published port {port}: {why}")]
    BadPort { port: String, why: String },
    #[error("no free port left in {first}-{last} for {protocol}", first = DYNAMIC_PORTS.start(), last = DYNAMIC_PORTS.end())]
    NoFreePort { protocol: PortProtocol },
    #[error("there is no ingress network: create one with `network create --ingress`")]
    NoIngressNetwork,
    #[error(
        "network {0} is the routing mesh's: publish a port (--publish) instead of attaching to it"
    )]
    IngressAttach(NetworkName),
    #[error("service {service} publishes no port {port}")]
    NoSuchPort { service: ServiceName, port: String },
    #[error("network {network} is in use by container(s) {containers}")]
    NetworkHasEndpoints {
        network: NetworkName,
        containers: String,
    },
    #[error("container {container} already has interface {ifname} (on network {network}, namespace {netns})")]
    EndpointExists {
        container: String,
        ifname: String,
        network: NetworkName,
        netns: String,
    },
    #[error("invalid endpoint: {0}")]
    BadEndpoint(String),
    #[error("no endpoint {0}")]
    NoSuchEndpoint(String),
}

/// What a network create request asks for, already parsed.
#[derive(Debug, Clone, Default)]
pub struct NetworkRequest {
    pub driver: Option<String>,
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub options: BTreeMap<String, String>,
    /// Make this the routing mesh's network, replacing the current one (which no service
    /// may be publishing through).
    pub ingress: bool,
}

/// The address pool networks without `--subnet` are carved from.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    pub pool: Ipv4Net,
    pub prefix: u8,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            pool: ipam::DEFAULT_POOL.parse().expect("constant pool parses"),
            prefix: ipam::DEFAULT_POOL_PREFIX,
        }
    }
}

/// A DNS alias is one or more dot-separated labels of letters, digits, '-' and '_'.
fn check_alias(alias: &str) -> Result<(), StateError> {
    let bad = |why: &str| StateError::BadAlias {
        alias: alias.to_string(),
        why: why.to_string(),
    };
    if alias.is_empty() || alias.len() > 253 {
        return Err(bad("expected 1 to 253 characters"));
    }
    for label in alias.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each dot-separated label must have 1 to 63 characters"));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad("only letters, digits, '-', '_' and '.' are allowed"));
        }
    }
    Ok(())
}

fn ingress_subnet() -> Ipv4Net {
    ipam::INGRESS_SUBNET
        .parse()
        .expect("constant subnet parses")
}

impl ClusterState {
    /// Creates a network. Checks name, driver, subnet overlap, gateway and VNI first.
    pub fn create_network(
        &mut self,
        name: NetworkName,
        req: NetworkRequest,
        pool: Pool,
        id: String,
        now: u64,
    ) -> Result<&Network, StateError> {
        // Work on a copy: replacing the ingress network removes the old one first.
        let mut next = self.clone();
        if req.ingress {
            if let Some(old) = next.ingress_network().map(|n| n.name.clone()) {
                next.remove_network(old.as_str())?;
            }
        }
        next.add_network(name.clone(), req, pool, id, now)?;
        if next.networks.get(&name).is_some_and(|n| n.ingress) {
            next.ensure_lb_endpoints()?;
        }
        next.revision += 1;
        *self = next;
        self.networks
            .get(&name)
            .ok_or_else(|| StateError::NoSuchNetwork(name.to_string()))
    }

    /// The routing mesh's network, if there is one.
    pub fn ingress_network(&self) -> Option<&Network> {
        self.networks.values().find(|n| n.ingress)
    }

    /// Makes the default ingress network (`ingress`, 10.255.0.0/16, VNI 4096) if the cluster
    /// has none and the name is free: at cluster start, and for state saved before it existed.
    pub fn ensure_ingress(&mut self, id: String, now: u64) -> Result<(), StateError> {
        if self.ingress_network().is_none() && !self.networks.contains_key(INGRESS_NETWORK) {
            let name =
                NetworkName::new(INGRESS_NETWORK).map_err(|_| StateError::NoIngressNetwork)?;
            let req = NetworkRequest {
                ingress: true,
                ..NetworkRequest::default()
            };
            self.create_network(name, req, Pool::default(), id, now)?;
        }
        self.ensure_lb_endpoints()
    }

    /// Gives every node an address for its router's endpoint on the ingress network.
    fn ensure_lb_endpoints(&mut self) -> Result<(), StateError> {
        let Some(net) = self.ingress_network() else {
            return Ok(());
        };
        let name = net.name.clone();
        let missing: Vec<NodeName> = self
            .nodes
            .keys()
            .filter(|n| !net.lb_endpoints.contains_key(*n))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut next = self.clone();
        for node in missing {
            let ip = next.free_address(&name)?;
            if let Some(net) = next.networks.get_mut(&name) {
                net.lb_endpoints.insert(node, ip);
            }
        }
        next.revision += 1;
        *self = next;
        Ok(())
    }

    /// Adds a network after checking name, driver, subnet overlap, gateway and VNI.
    fn add_network(
        &mut self,
        name: NetworkName,
        req: NetworkRequest,
        pool: Pool,
        id: String,
        now: u64,
    ) -> Result<(), StateError> {
        if self.networks.contains_key(&name) {
            return Err(StateError::NetworkExists(name));
        }
        // The default ingress subnet stays free for the routing mesh while there is no
        // ingress network elsewhere.
        let reserved = match self.ingress_network() {
            Some(_) => None,
            None if req.ingress => None,
            None => Some(ingress_subnet()),
        };
        let driver = req.driver.unwrap_or_else(|| "overlay".to_string());
        if driver != "overlay" {
            return Err(StateError::BadDriver(driver));
        }
        let used: Vec<Ipv4Net> = self.networks.values().map(|n| n.subnet).collect();
        let subnet = match req.subnet {
            Some(s) => {
                let s = s.trunc();
                if let Some(other) = self
                    .networks
                    .values()
                    .find(|n| ipam::overlaps(&s, &n.subnet))
                {
                    return Err(StateError::SubnetOverlap {
                        subnet: s,
                        other: other.name.clone(),
                        other_subnet: other.subnet,
                    });
                }
                if let Some(reserved) = reserved.filter(|r| ipam::overlaps(&s, r)) {
                    return Err(StateError::SubnetReserved {
                        subnet: s,
                        reserved,
                    });
                }
                s
            }
            None if req.ingress && !used.iter().any(|u| ipam::overlaps(u, &ingress_subnet())) => {
                ingress_subnet()
            }
            None => {
                let mut taken = used.clone();
                taken.extend(reserved);
                ipam::next_subnet(pool.pool, pool.prefix, &taken).ok_or(
                    StateError::PoolExhausted {
                        pool: pool.pool,
                        prefix: pool.prefix,
                    },
                )?
            }
        };
        if subnet.prefix_len() > 30 {
            return Err(StateError::SubnetTooSmall { subnet });
        }
        let gateway = match req.gateway {
            Some(g) => g,
            None => ipam::default_gateway(&subnet).ok_or(StateError::SubnetTooSmall { subnet })?,
        };
        if !ipam::is_host_address(&subnet, gateway) {
            return Err(StateError::BadGateway { gateway, subnet });
        }
        let mut options = req.options;
        let vni = match options.get(OPT_VXLANID) {
            Some(v) => {
                let bad = |why: &str| StateError::BadOption {
                    key: OPT_VXLANID.to_string(),
                    value: v.clone(),
                    why: why.to_string(),
                };
                let n: u32 = v.trim().parse().map_err(|_| bad("not a number"))?;
                let vni = Vni::new(n).map_err(|e| bad(&e.to_string()))?;
                if let Some(other) = self.networks.values().find(|n| n.vni == vni) {
                    return Err(StateError::VniInUse {
                        vni,
                        other: other.name.clone(),
                    });
                }
                vni
            }
            None => {
                let taken: BTreeSet<u32> = self.networks.values().map(|n| n.vni.get()).collect();
                let first = if req.ingress && !taken.contains(&INGRESS_VNI) {
                    INGRESS_VNI
                } else {
                    Vni::FIRST_USER
                };
                let v = (first..=Vni::MAX)
                    .find(|v| !taken.contains(v))
                    .ok_or(StateError::VniExhausted)?;
                Vni::new(v).map_err(|_| StateError::VniExhausted)?
            }
        };
        if let Some(v) = options.get(OPT_MTU) {
            let max = if is_encrypted(&options) {
                MAX_ENCRYPTED_MTU
            } else {
                DEFAULT_MTU
            };
            let ok = v
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|m| (MIN_MTU..=max).contains(m));
            if ok.is_none() {
                return Err(StateError::BadOption {
                    key: OPT_MTU.to_string(),
                    value: v.clone(),
                    why: format!("expected {MIN_MTU}..={max} (VXLAN needs 50 bytes of a 1500-byte underlay, and ESP 45 more on an encrypted network)"),
                });
            }
        }
        options.insert(OPT_VXLANID.to_string(), vni.to_string());
        let net = Network {
            id,
            name: name.clone(),
            driver,
            subnet,
            gateway,
            vni,
            options,
            created_at: now,
            vteps: Vec::new(),
            ingress: req.ingress,
            lb_endpoints: BTreeMap::new(),
            docker_nodes: BTreeSet::new(),
        };
        self.networks.insert(name, net);
        Ok(())
    }

    /// Removes a network; refused while a service uses it.
    pub fn remove_network(&mut self, name: &str) -> Result<Network, StateError> {
        let net = self
            .networks
            .get(name)
            .ok_or_else(|| StateError::NoSuchNetwork(name.to_string()))?;
        let users: Vec<&str> = self
            .services
            .values()
            .filter(|s| s.networks.iter().any(|n| n == &net.name))
            .map(|s| s.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(StateError::NetworkInUse {
                network: net.name.clone(),
                services: users.join(", "),
            });
        }
        let containers: Vec<&str> = self
            .endpoints
            .values()
            .filter(|e| e.network == net.name)
            .map(|e| e.container.as_str())
            .collect();
        if !containers.is_empty() {
            return Err(StateError::NetworkHasEndpoints {
                network: net.name.clone(),
                containers: containers.join(", "),
            });
        }
        self.revision += 1;
        self.networks
            .remove(name)
            .ok_or_else(|| StateError::NoSuchNetwork(name.to_string()))
    }

    /// Creates a service and places its tasks on active nodes that `eligible` accepts (the
    /// manager passes "is heartbeating"). `new_id` yields fresh random ids.
    pub fn create_service(
        &mut self,
        mut svc: Service,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<&Service, StateError> {
        if self.services.contains_key(&svc.name) {
            return Err(StateError::ServiceExists(svc.name));
        }
        if svc.command.is_empty() || svc.command[0].is_empty() {
            return Err(StateError::EmptyCommand);
        }
        if svc.networks.is_empty() {
            return Err(StateError::NoNetwork);
        }
        if svc.replicas > MAX_REPLICAS {
            return Err(StateError::TooManyReplicas(svc.replicas));
        }
        let mut seen = BTreeSet::new();
        for n in &svc.networks {
            if !self.networks.contains_key(n) {
                return Err(StateError::NoSuchNetwork(n.to_string()));
            }
            if !seen.insert(n) {
                return Err(StateError::DuplicateNetwork(n.clone()));
            }
        }
        for (net, aliases) in &svc.aliases {
            if !svc.networks.contains(net) {
                return Err(StateError::AliasWithoutNetwork(net.clone()));
            }
            for a in aliases {
                check_alias(a)?;
            }
        }
        if let Some(n) = svc.networks.iter().find(|n| self.is_ingress(n)) {
            return Err(StateError::IngressAttach(n.clone()));
        }
        self.settle_ports(&mut svc)?;
        let replicas = svc.replicas;
        svc.replicas = 0;
        svc.vips.clear();
        let name = svc.name.clone();
        // Place on a scratch copy so that a failure (full subnet, no node) changes nothing.
        let mut next = self.clone();
        next.services.insert(name.clone(), svc);
        // The VIPs first: they are the service's for its whole life.
        next.ensure_vips()?;
        next.scale_service(name.as_str(), replicas, new_id, eligible)?;
        *self = next;
        self.services
            .get(&name)
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))
    }

    /// Sets a service's replica count, adding or removing tasks (highest slots go first).
    /// New tasks go to active nodes that `eligible` accepts.
    pub fn scale_service(
        &mut self,
        name: &str,
        replicas: u32,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        if replicas > MAX_REPLICAS {
            return Err(StateError::TooManyReplicas(replicas));
        }
        let svc = self
            .services
            .get(name)
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))?
            .clone();
        let mut next = self.clone();
        next.tasks
            .retain(|_, t| t.service != svc.name || t.slot <= replicas);
        for slot in 1..=replicas {
            let task_name = format!("{}.{}", svc.name, slot);
            if next.tasks.contains_key(&task_name) {
                continue;
            }
            let node = next.place(&svc.name, eligible)?;
            let mut attachments = Vec::new();
            for net_name in &svc.networks {
                let address = next.free_address(net_name)?;
                attachments.push(Attachment {
                    network: net_name.clone(),
                    address,
                    mac: MacAddr::from_ipv4(address),
                });
            }
            // Inserted before the next slot is placed, so its addresses count as used.
            next.tasks.insert(
                task_name.clone(),
                Task {
                    id: new_id(),
                    name: task_name,
                    service: svc.name.clone(),
                    slot,
                    node,
                    attachments,
                },
            );
        }
        if let Some(s) = next.services.get_mut(name) {
            s.replicas = replicas;
        }
        next.revision += 1;
        *self = next;
        Ok(())
    }

    fn is_ingress(&self, network: &NetworkName) -> bool {
        self.networks.get(network).is_some_and(|n| n.ingress)
    }

    /// Checks a service's published ports against each other and against every other
    /// service's, gives those without a published port a free one from [`DYNAMIC_PORTS`],
    /// and attaches the service to the ingress network if it publishes any port (detaching
    /// it if none). An ingress-mode port is open on every node, so it clashes with the same
    /// port of any other service; two host-mode ports only clash on a node running both
    /// (reported by that node's agent).
    fn settle_ports(&self, svc: &mut Service) -> Result<(), StateError> {
        let bad = |p: &PortConfig, why: &str| StateError::BadPort {
            port: format!("{}:{}/{}", p.published, p.target, p.protocol),
            why: why.to_string(),
        };
        let others: Vec<(&ServiceName, &PortConfig)> = self
            .services
            .values()
            .filter(|o| o.name != svc.name)
            .flat_map(|o| o.ports.iter().map(move |p| (&o.name, p)))
            .collect();
        let mut mine = BTreeSet::new();
        for p in &svc.ports {
            if p.target == 0 {
                return Err(bad(p, "the target port must be 1-65535"));
            }
            if p.proxy.is_some() && p.protocol != PortProtocol::Tcp {
                return Err(bad(p, "the PROXY protocol header is for TCP ports only"));
            }
            if p.published == 0 {
                continue;
            }
            if !mine.insert((p.protocol, p.published)) {
                return Err(bad(p, "published twice by this service"));
            }
            let clash = others.iter().find(|(_, o)| {
                o.protocol == p.protocol
                    && o.published == p.published
                    && (o.mode == PublishMode::Ingress || p.mode == PublishMode::Ingress)
            });
            if let Some((service, _)) = clash {
                return Err(StateError::PortInUse {
                    published: p.published,
                    protocol: p.protocol,
                    service: (*service).clone(),
                });
            }
        }
        for p in svc.ports.iter_mut().filter(|p| p.published == 0) {
            let free = DYNAMIC_PORTS.clone().find(|port| {
                !mine.contains(&(p.protocol, *port))
                    && !others
                        .iter()
                        .any(|(_, o)| o.protocol == p.protocol && o.published == *port)
            });
            p.published = free.ok_or(StateError::NoFreePort {
                protocol: p.protocol,
            })?;
            mine.insert((p.protocol, p.published));
        }
        svc.networks.retain(|n| !self.is_ingress(n));
        if !svc.ports.is_empty() {
            let ingress = self.ingress_network().ok_or(StateError::NoIngressNetwork)?;
            svc.networks.push(ingress.name.clone());
        }
        Ok(())
    }

    /// `service update --publish-rm ... --publish-add ...`: removes published ports (by
    /// published port, and protocol if given), adds new ones. A service that starts or stops
    /// publishing gains or loses its ingress attachment, which replaces its tasks (new
    /// interfaces), as a rolling update would.
    pub fn update_ports(
        &mut self,
        name: &str,
        add: Vec<PortConfig>,
        remove: &[(u16, Option<PortProtocol>)],
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        let mut next = self.clone();
        let mut svc = next
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))?;
        for (port, protocol) in remove {
            let before = svc.ports.len();
            svc.ports
                .retain(|p| !(p.published == *port && protocol.is_none_or(|x| x == p.protocol)));
            if svc.ports.len() == before {
                return Err(StateError::NoSuchPort {
                    service: svc.name.clone(),
                    port: match protocol {
                        Some(x) => format!("{port}/{x}"),
                        None => port.to_string(),
                    },
                });
            }
        }
        svc.ports.extend(add);
        let attached = svc.networks.clone();
        next.settle_ports(&mut svc)?;
        let reattach = svc.networks != attached;
        let networks = svc.networks.clone();
        svc.vips.retain(|n, _| networks.contains(n));
        let replicas = svc.replicas;
        next.services.insert(svc.name.clone(), svc);
        if reattach {
            next.tasks.retain(|_, t| t.service.as_str() != name);
            next.ensure_vips()?;
            next.scale_service(name, replicas, new_id, eligible)?;
        }
        next.revision += 1;
        *self = next;
        Ok(())
    }

    /// Removes a service and all its tasks; their addresses return to the pools.
    pub fn remove_service(&mut self, name: &str) -> Result<Service, StateError> {
        let svc = self
            .services
            .remove(name)
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))?;
        self.tasks.retain(|_, t| t.service != svc.name);
        self.revision += 1;
        Ok(svc)
    }

    /// Declares an external VTEP endpoint on a network.
    pub fn add_vtep(&mut self, network: &str, vtep: Vtep) -> Result<(), StateError> {
        let used_ips = self.used_addresses(
            &NetworkName::new(network)
                .map_err(|_| StateError::NoSuchNetwork(network.to_string()))?,
        );
        let task_macs: BTreeSet<MacAddr> = self
            .tasks
            .values()
            .flat_map(|t| {
                t.attachments
                    .iter()
                    .filter(|a| a.network.as_str() == network)
                    .map(|a| a.mac)
            })
            .chain(
                self.endpoints
                    .values()
                    .filter(|e| e.network.as_str() == network)
                    .map(|e| e.mac),
            )
            .collect();
        let net = self
            .networks
            .get_mut(network)
            .ok_or_else(|| StateError::NoSuchNetwork(network.to_string()))?;
        if net.encrypted() {
            return Err(StateError::BadOption {
                key: OPT_ENCRYPTED.to_string(),
                value: net.name.to_string(),
                why: "an external VTEP speaks plain VXLAN; an encrypted network carries only ESP"
                    .to_string(),
            });
        }
        if vtep.mac.is_multicast()
            || task_macs.contains(&vtep.mac)
            || net.vteps.iter().any(|v| v.mac == vtep.mac)
        {
            return Err(StateError::MacInUse {
                mac: vtep.mac,
                network: net.name.clone(),
            });
        }
        if let Some(ip) = vtep.ip {
            if !ipam::is_host_address(&net.subnet, ip) || used_ips.contains(&ip) {
                return Err(StateError::AddressTaken {
                    ip,
                    network: net.name.clone(),
                    subnet: net.subnet,
                });
            }
        }
        net.vteps.push(vtep);
        self.revision += 1;
        Ok(())
    }

    pub fn remove_vtep(&mut self, network: &str, mac: MacAddr) -> Result<(), StateError> {
        let net = self
            .networks
            .get_mut(network)
            .ok_or_else(|| StateError::NoSuchNetwork(network.to_string()))?;
        let before = net.vteps.len();
        net.vteps.retain(|v| v.mac != mac);
        if net.vteps.len() == before {
            return Err(StateError::NoSuchVtep {
                mac,
                network: net.name.clone(),
            });
        }
        self.revision += 1;
        Ok(())
    }

    /// Adds a node, or refreshes the address of a node that rejoins under its own name.
    pub fn upsert_node(&mut self, node: Node) {
        match self.nodes.get_mut(&node.name) {
            Some(n) if n.advertise_addr == node.advertise_addr => return,
            Some(n) => n.advertise_addr = node.advertise_addr,
            None => {
                self.nodes.insert(node.name.clone(), node);
            }
        }
        self.revision += 1;
        // A node without a router address on ingress publishes nothing; a /16 is not full.
        let _ = self.ensure_lb_endpoints();
    }

    /// Sets a node's availability. Draining moves every task on it to other eligible active
    /// nodes (new task ids, same slots; addresses come from the pool again, so a task usually
    /// gets back the one it just freed), as `docker node update --availability drain` does.
    /// It is refused, changing nothing, if a task has nowhere to go.
    pub fn set_availability(
        &mut self,
        node: &str,
        availability: Availability,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        let mut next = self.clone();
        let n = next
            .nodes
            .get_mut(node)
            .ok_or_else(|| StateError::NoSuchNode(node.to_string()))?;
        n.availability = availability;
        let name = n.name.clone();
        if availability == Availability::Drain {
            let moving: Vec<Task> = next
                .tasks
                .values()
                .filter(|t| t.node == name)
                .cloned()
                .collect();
            for t in &moving {
                next.tasks.remove(&t.name);
            }
            let services: BTreeSet<ServiceName> =
                moving.iter().map(|t| t.service.clone()).collect();
            for svc in services {
                let replicas = next.services.get(&svc).map_or(0, |s| s.replicas);
                next.scale_service(svc.as_str(), replicas, new_id, eligible)?;
            }
        }
        next.revision += 1;
        *self = next;
        Ok(())
    }

    /// Gives every VIP-mode service a virtual IP on each of its networks that lacks one
    /// (at creation, and for services saved before VIPs existed). Refused, changing nothing,
    /// if a network is full.
    pub fn ensure_vips(&mut self) -> Result<(), StateError> {
        let mut next = self.clone();
        let mut changed = false;
        let names: Vec<ServiceName> = next.services.keys().cloned().collect();
        for name in names {
            let Some(svc) = next.services.get(&name) else {
                continue;
            };
            if svc.endpoint_mode != EndpointMode::Vip {
                continue;
            }
            // The ingress network carries published ports to tasks directly: no VIP there.
            let missing: Vec<NetworkName> = svc
                .networks
                .iter()
                .filter(|n| !svc.vips.contains_key(*n) && !next.is_ingress(n))
                .cloned()
                .collect();
            for net_name in missing {
                let vip = next.free_address(&net_name)?;
                if let Some(s) = next.services.get_mut(&name) {
                    s.vips.insert(net_name, vip);
                    changed = true;
                }
            }
        }
        if changed {
            next.revision += 1;
            *self = next;
        }
        Ok(())
    }

    /// The lowest address of `network` nobody holds.
    fn free_address(&self, network: &NetworkName) -> Result<Ipv4Addr, StateError> {
        let net = self
            .networks
            .get(network)
            .ok_or_else(|| StateError::NoSuchNetwork(network.to_string()))?;
        ipam::next_address(&net.subnet, &self.used_addresses(network)).ok_or_else(|| {
            StateError::NetworkFull {
                network: network.clone(),
                subnet: net.subnet,
            }
        })
    }

    /// Every address of `network` that is taken: the gateway, each service's VIP, each
    /// task's endpoint and each external VTEP's address.
    pub fn used_addresses(&self, network: &NetworkName) -> BTreeSet<Ipv4Addr> {
        let mut used = BTreeSet::new();
        if let Some(n) = self.networks.get(network) {
            used.insert(n.gateway);
            used.extend(n.vteps.iter().filter_map(|v| v.ip));
            used.extend(n.lb_endpoints.values());
        }
        for s in self.services.values() {
            used.extend(s.vips.get(network));
        }
        for t in self.tasks.values() {
            for a in &t.attachments {
                if &a.network == network {
                    used.insert(a.address);
                }
            }
        }
        used.extend(
            self.endpoints
                .values()
                .filter(|e| &e.network == network)
                .map(|e| e.address),
        );
        used
    }

    /// Gives a container an interface on a network: an address from the network's pool and
    /// the MAC derived from it, on the node that asked. Asking again for the same container
    /// and interface with the same network and namespace returns the endpoint it has (a
    /// runtime retrying an ADD); anything else for a taken (container, interface) is refused.
    pub fn add_endpoint(&mut self, req: EndpointRequest) -> Result<Endpoint, StateError> {
        let bad = |why: &str| Err(StateError::BadEndpoint(why.to_string()));
        let printable =
            |v: &str| !v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_control);
        if !printable(&req.container) || req.container.contains('/') {
            return bad("the container id must be 1-256 printable characters without '/'");
        }
        if req.ifname.is_empty()
            || req.ifname.len() > 15
            || req.ifname.contains('/')
            || !req.ifname.chars().all(|c| c.is_ascii_graphic())
        {
            return bad("the interface name must be 1-15 characters, no '/' or spaces");
        }
        let pending = req.netns.is_empty() && req.runtime == "docker";
        if !pending && (!printable(&req.netns) || !req.netns.starts_with('/')) {
            return bad("the network namespace must be an absolute path");
        }
        if !self.nodes.contains_key(&req.node) {
            return Err(StateError::NoSuchNode(req.node.to_string()));
        }
        let net = self
            .networks
            .get(req.network.as_str())
            .ok_or_else(|| StateError::NoSuchNetwork(req.network.clone()))?;
        if net.ingress {
            return Err(StateError::IngressAttach(net.name.clone()));
        }
        let key = Endpoint::key(&req.container, &req.ifname);
        if let Some(e) = self.endpoints.get(&key) {
            if e.network == net.name && e.netns == req.netns && e.node == req.node {
                return Ok(e.clone());
            }
            return Err(StateError::EndpointExists {
                container: req.container,
                ifname: req.ifname,
                network: e.network.clone(),
                netns: e.netns.clone(),
            });
        }
        let network = net.name.clone();
        let address = match req.address {
            Some(ip) => {
                if !ipam::is_host_address(&net.subnet, ip)
                    || ip == net.gateway
                    || self.used_addresses(&network).contains(&ip)
                {
                    return Err(StateError::AddressTaken {
                        ip,
                        network,
                        subnet: net.subnet,
                    });
                }
                ip
            }
            None => self.free_address(&network)?,
        };
        let e = Endpoint {
            container: req.container,
            ifname: req.ifname,
            netns: req.netns,
            node: req.node,
            network,
            address,
            mac: MacAddr::from_ipv4(address),
            runtime: req.runtime,
        };
        self.endpoints.insert(key, e.clone());
        self.revision += 1;
        Ok(e)
    }

    /// Records that `node`'s Docker has (`attached`) or no longer has a network for `network`;
    /// returns the nodes whose Docker still has one.
    pub fn docker_attach(
        &mut self,
        network: &str,
        node: &NodeName,
        attached: bool,
    ) -> Result<BTreeSet<NodeName>, StateError> {
        let net = self
            .networks
            .get_mut(network)
            .ok_or_else(|| StateError::NoSuchNetwork(network.to_string()))?;
        let changed = if attached {
            net.docker_nodes.insert(node.clone())
        } else {
            net.docker_nodes.remove(node)
        };
        if changed {
            self.revision += 1;
        }
        Ok(net.docker_nodes.clone())
    }

    /// Gives a waiting endpoint its container's namespace (Docker's join).
    pub fn bind_endpoint(
        &mut self,
        container: &str,
        ifname: &str,
        netns: &str,
    ) -> Result<(), StateError> {
        if !netns.starts_with('/') {
            return Err(StateError::BadEndpoint(
                "the network namespace must be an absolute path".into(),
            ));
        }
        let e = self
            .endpoints
            .get_mut(&Endpoint::key(container, ifname))
            .ok_or_else(|| StateError::NoSuchEndpoint(Endpoint::key(container, ifname)))?;
        if e.netns != netns {
            e.netns = netns.to_string();
            self.revision += 1;
        }
        Ok(())
    }

    /// Removes a container's interface; removing one that is not there changes nothing
    /// (runtimes repeat their DELs).
    pub fn remove_endpoint(&mut self, container: &str, ifname: &str) -> Option<Endpoint> {
        let e = self.endpoints.remove(&Endpoint::key(container, ifname))?;
        self.revision += 1;
        Some(e)
    }

    /// Spread placement: the eligible active node with the fewest tasks of this service, then
    /// the fewest tasks overall, then by name (deterministic).
    fn place(
        &self,
        service: &ServiceName,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<NodeName, StateError> {
        self.nodes
            .values()
            .filter(|n| n.availability == Availability::Active && eligible(&n.name))
            .min_by_key(|n| {
                let mine = self
                    .tasks
                    .values()
                    .filter(|t| t.node == n.name && &t.service == service)
                    .count();
                let all = self.tasks.values().filter(|t| t.node == n.name).count();
                (mine, all, n.name.clone())
            })
            .map(|n| n.name.clone())
            .ok_or(StateError::NoActiveNode)
    }

    /// Tasks placed on `node`.
    pub fn tasks_on<'a>(&'a self, node: &'a NodeName) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks.values().filter(move |t| &t.node == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        let n1 = NodeName::new("n1").unwrap();
        s.nodes.insert(
            n1.clone(),
            Node {
                name: n1,
                role: Role::Manager,
                availability: Availability::Active,
                advertise_addr: None,
                data_port: 4789,
                joined_at: 0,
            },
        );
        s
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    fn net(s: &mut ClusterState, name: &str, subnet: Option<&str>) -> Result<Network, StateError> {
        let req = NetworkRequest {
            subnet: subnet.map(|x| x.parse().unwrap()),
            ..Default::default()
        };
        s.create_network(
            NetworkName::new(name).unwrap(),
            req,
            Pool::default(),
            name.into(),
            0,
        )
        .cloned()
    }

    fn svc(name: &str, nets: &[&str], replicas: u32) -> Service {
        Service {
            id: name.into(),
            name: ServiceName::new(name).unwrap(),
            networks: nets.iter().map(|n| NetworkName::new(*n).unwrap()).collect(),
            replicas,
            command: vec!["sleep".into(), "1000".into()],
            env: vec![],
            created_at: 0,
            updated_at: 0,
            endpoint_mode: EndpointMode::Vip,
            vips: BTreeMap::new(),
            aliases: BTreeMap::new(),
            lb_idle_timeout: None,
            ports: vec![],
        }
    }

    fn port(published: u16, target: u16, protocol: PortProtocol, mode: PublishMode) -> PortConfig {
        PortConfig {
            protocol,
            target,
            published,
            mode,
            proxy: None,
        }
    }

    fn meshed() -> ClusterState {
        let mut s = state();
        s.ensure_ingress("ing".into(), 0).unwrap();
        net(&mut s, "a", None).unwrap();
        s
    }

    #[test]
    fn encrypted_networks_have_room_for_esp_and_no_plain_vteps() {
        let mut s = state();
        let req = |opts: &[(&str, &str)]| NetworkRequest {
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let name = |n: &str| NetworkName::new(n).unwrap();
        let n = s
            .create_network(
                name("sec"),
                req(&[(OPT_ENCRYPTED, "")]),
                Pool::default(),
                "1".into(),
                0,
            )
            .unwrap();
        assert!(n.encrypted());
        assert_eq!(n.mtu(), ENCRYPTED_MTU);
        let too_big = req(&[(OPT_ENCRYPTED, ""), (OPT_MTU, "1450")]);
        assert!(matches!(
            s.create_network(name("big"), too_big, Pool::default(), "2".into(), 0),
            Err(StateError::BadOption { .. })
        ));
        let off = s
            .create_network(
                name("off"),
                req(&[(OPT_ENCRYPTED, "false")]),
                Pool::default(),
                "3".into(),
                0,
            )
            .unwrap();
        assert!(!off.encrypted());
        let vtep = Vtep {
            address: "198.18.0.9".parse().unwrap(),
            mac: MacAddr([2, 0x42, 10, 0, 0, 9]),
            ip: None,
        };
        assert!(matches!(
            s.add_vtep("sec", vtep),
            Err(StateError::BadOption { .. })
        ));
    }

    #[test]
    fn ingress_network_exists_from_the_start_with_an_endpoint_per_node() {
        let mut s = meshed();
        let ing = s.ingress_network().unwrap().clone();
        assert_eq!(ing.name.as_str(), INGRESS_NETWORK);
        assert_eq!(ing.subnet.to_string(), "10.255.0.0/16");
        assert_eq!(ing.vni.get(), INGRESS_VNI);
        assert_eq!(ing.lb_endpoints.len(), 1);
        assert_eq!(s.networks["a"].vni.get(), Vni::FIRST_USER);
        // Twice is a no-op; a node that joins gets its endpoint address.
        let rev = s.revision;
        s.ensure_ingress("x".into(), 0).unwrap();
        assert_eq!(s.revision, rev);
        let n2 = NodeName::new("n2").unwrap();
        s.upsert_node(Node {
            name: n2.clone(),
            role: Role::Worker,
            availability: Availability::Active,
            advertise_addr: None,
            data_port: 4789,
            joined_at: 0,
        });
        let eps = &s.ingress_network().unwrap().lb_endpoints;
        assert_eq!(eps.len(), 2);
        assert_ne!(eps[&n2], eps[&NodeName::new("n1").unwrap()]);
        assert!(s.used_addresses(&ing.name).contains(&eps[&n2]));
    }

    #[test]
    fn publishing_attaches_to_ingress_and_picks_free_ports() {
        let mut s = meshed();
        let mut web = svc("web", &["a"], 2);
        web.ports = vec![
            port(8080, 80, PortProtocol::Tcp, PublishMode::Ingress),
            port(0, 53, PortProtocol::Udp, PublishMode::Ingress),
        ];
        s.create_service(web, &mut ids(), &|_| true).unwrap();
        let web = s.services["web"].clone();
        assert_eq!(
            web.networks.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["a", "ingress"]
        );
        assert_eq!(web.user_networks(&s).count(), 1);
        assert_eq!(web.ports[1].published, *DYNAMIC_PORTS.start());
        assert!(web.vips.contains_key("a") && !web.vips.contains_key("ingress"));
        assert!(s.tasks.values().all(|t| t.attachments.len() == 2));
        // The same port and protocol is refused, naming its holder; another protocol is not.
        let mut other = svc("other", &["a"], 1);
        other.ports = vec![port(8080, 81, PortProtocol::Tcp, PublishMode::Host)];
        let err = s
            .create_service(other.clone(), &mut ids(), &|_| true)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "port 8080/tcp is already published by service web"
        );
        other.ports = vec![port(8080, 81, PortProtocol::Udp, PublishMode::Ingress)];
        s.create_service(other, &mut ids(), &|_| true).unwrap();
        // Host-mode ports of two services may share a number (placement keeps them apart).
        for name in ["h1", "h2"] {
            let mut h = svc(name, &["a"], 1);
            h.ports = vec![port(9000, 80, PortProtocol::Tcp, PublishMode::Host)];
            s.create_service(h, &mut ids(), &|_| true).unwrap();
        }
        // Attaching to ingress by hand, a PROXY header on UDP, target 0: refused.
        let mut bad = svc("bad", &["ingress"], 1);
        assert!(matches!(
            s.create_service(bad.clone(), &mut ids(), &|_| true),
            Err(StateError::IngressAttach(_))
        ));
        bad.networks = vec![NetworkName::new("a").unwrap()];
        bad.ports = vec![PortConfig {
            proxy: Some(ProxyProtocol::V2),
            ..port(7000, 80, PortProtocol::Udp, PublishMode::Ingress)
        }];
        assert!(matches!(
            s.create_service(bad.clone(), &mut ids(), &|_| true),
            Err(StateError::BadPort { .. })
        ));
        bad.ports = vec![port(7000, 0, PortProtocol::Tcp, PublishMode::Ingress)];
        assert!(s.create_service(bad, &mut ids(), &|_| true).is_err());
        // The ingress network cannot be removed or replaced while services publish.
        assert!(matches!(
            s.remove_network("ingress"),
            Err(StateError::NetworkInUse { .. })
        ));
    }

    #[test]
    fn publish_add_and_rm_follow_the_ingress_attachment() {
        let mut s = meshed();
        let mut gen = ids();
        s.create_service(svc("web", &["a"], 2), &mut gen, &|_| true)
            .unwrap();
        let before: Vec<String> = s.tasks.values().map(|t| t.id.clone()).collect();
        let p = port(8080, 80, PortProtocol::Tcp, PublishMode::Ingress);
        s.update_ports("web", vec![p], &[], &mut gen, &|_| true)
            .unwrap();
        assert_eq!(s.services["web"].networks.len(), 2);
        let after: Vec<&Task> = s.tasks.values().collect();
        assert_eq!(after.len(), 2);
        assert!(after
            .iter()
            .all(|t| t.attachments.len() == 2 && !before.contains(&t.id)));
        // Adding a second port keeps the tasks.
        let q = port(8443, 443, PortProtocol::Tcp, PublishMode::Ingress);
        let ids_now: Vec<String> = s.tasks.values().map(|t| t.id.clone()).collect();
        s.update_ports("web", vec![q], &[], &mut gen, &|_| true)
            .unwrap();
        assert_eq!(
            ids_now,
            s.tasks.values().map(|t| t.id.clone()).collect::<Vec<_>>()
        );
        assert!(matches!(
            s.update_ports("web", vec![], &[(9999, None)], &mut gen, &|_| true),
            Err(StateError::NoSuchPort { .. })
        ));
        s.update_ports(
            "web",
            vec![],
            &[(8080, Some(PortProtocol::Tcp)), (8443, None)],
            &mut gen,
            &|_| true,
        )
        .unwrap();
        assert!(s.services["web"].ports.is_empty());
        assert_eq!(s.services["web"].networks.len(), 1);
        assert!(s.tasks.values().all(|t| t.attachments.len() == 1));
        // Now nothing publishes: the ingress network can be replaced.
        let req = NetworkRequest {
            ingress: true,
            subnet: Some("10.254.0.0/16".parse().unwrap()),
            ..Default::default()
        };
        let n = s
            .create_network(
                NetworkName::new("mesh").unwrap(),
                req,
                Pool::default(),
                "m".into(),
                0,
            )
            .unwrap();
        assert!(n.ingress && n.vni.get() == INGRESS_VNI && n.lb_endpoints.len() == 1);
        assert!(!s.networks.contains_key("ingress"));
        // With the mesh elsewhere, 10.255.0.0/16 is an ordinary subnet.
        net(&mut s, "b", Some("10.255.1.0/24")).unwrap();
    }

    #[test]
    fn networks_get_pools_gateways_and_vnis_in_order() {
        let mut s = state();
        let a = net(&mut s, "a", None).unwrap();
        let b = net(&mut s, "b", None).unwrap();
        assert_eq!(a.subnet.to_string(), "10.0.0.0/24");
        assert_eq!(a.gateway.to_string(), "10.0.0.1");
        assert_eq!(a.vni.get(), 4097);
        assert_eq!(b.subnet.to_string(), "10.0.1.0/24");
        assert_eq!(b.vni.get(), 4098);
        assert_eq!(b.options[OPT_VXLANID], "4098");
    }

    #[test]
    fn refusals_change_nothing() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let before = s.clone();
        assert!(matches!(
            net(&mut s, "a", None),
            Err(StateError::NetworkExists(_))
        ));
        assert!(matches!(
            net(&mut s, "b", Some("10.0.2.128/25")),
            Err(StateError::SubnetOverlap { .. })
        ));
        assert!(matches!(
            net(&mut s, "b", Some("10.255.3.0/24")),
            Err(StateError::SubnetReserved { .. })
        ));
        assert!(matches!(
            net(&mut s, "b", Some("10.9.0.0/31")),
            Err(StateError::SubnetTooSmall { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn mtu_option() {
        let mut s = state();
        let mut req = NetworkRequest::default();
        let n = s
            .create_network(
                NetworkName::new("a").unwrap(),
                req.clone(),
                Pool::default(),
                "a".into(),
                0,
            )
            .unwrap();
        assert_eq!(n.mtu(), 1450);
        req.options.insert(OPT_MTU.into(), "1400".into());
        let n = s
            .create_network(
                NetworkName::new("b").unwrap(),
                req.clone(),
                Pool::default(),
                "b".into(),
                0,
            )
            .unwrap();
        assert_eq!(n.mtu(), 1400);
        for bad in ["1500", "9000", "10", "big"] {
            req.options.insert(OPT_MTU.into(), bad.into());
            let e = s.create_network(
                NetworkName::new("c").unwrap(),
                req.clone(),
                Pool::default(),
                "c".into(),
                0,
            );
            assert!(matches!(e, Err(StateError::BadOption { .. })), "{bad}");
        }
    }

    #[test]
    fn explicit_vni_and_gateway() {
        let mut s = state();
        let mut req = NetworkRequest {
            subnet: Some("10.7.0.0/24".parse().unwrap()),
            gateway: Some("10.7.0.254".parse().unwrap()),
            ..Default::default()
        };
        req.options.insert(OPT_VXLANID.into(), "5000".into());
        let n = s
            .create_network(
                NetworkName::new("x").unwrap(),
                req.clone(),
                Pool::default(),
                "x".into(),
                0,
            )
            .unwrap();
        assert_eq!(n.vni.get(), 5000);
        assert_eq!(n.gateway.to_string(), "10.7.0.254");
        req.subnet = Some("10.8.0.0/24".parse().unwrap());
        req.gateway = None;
        let e = s
            .create_network(
                NetworkName::new("y").unwrap(),
                req.clone(),
                Pool::default(),
                "y".into(),
                0,
            )
            .unwrap_err();
        assert!(matches!(e, StateError::VniInUse { .. }));
        req.options.insert(OPT_VXLANID.into(), "0".into());
        assert!(s
            .create_network(
                NetworkName::new("y").unwrap(),
                req.clone(),
                Pool::default(),
                "y".into(),
                0
            )
            .is_err());
        req.options.clear();
        req.gateway = Some("10.9.0.1".parse().unwrap());
        assert!(matches!(
            s.create_network(
                NetworkName::new("y").unwrap(),
                req,
                Pool::default(),
                "y".into(),
                0
            ),
            Err(StateError::BadGateway { .. })
        ));
    }

    #[test]
    fn service_tasks_addresses_scale_and_rm() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 3), &mut id, &|_| true)
            .unwrap();
        let addrs: Vec<String> = s
            .tasks
            .values()
            .map(|t| t.attachments[0].address.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.2.3", "10.0.2.4", "10.0.2.5"]);
        assert_eq!(
            s.services["web"].vips[&NetworkName::new("a").unwrap()].to_string(),
            "10.0.2.2"
        );
        assert_eq!(
            s.tasks["web.1"].attachments[0].mac.to_string(),
            "02:42:0a:00:02:03"
        );
        s.scale_service("web", 1, &mut id, &|_| true).unwrap();
        assert_eq!(s.tasks.keys().collect::<Vec<_>>(), ["web.1"]);
        s.scale_service("web", 2, &mut id, &|_| true).unwrap();
        assert_eq!(
            s.tasks["web.2"].attachments[0].address.to_string(),
            "10.0.2.4"
        );
        assert!(matches!(
            s.remove_network("a"),
            Err(StateError::NetworkInUse { .. })
        ));
        s.remove_service("web").unwrap();
        assert!(s.tasks.is_empty());
        s.remove_network("a").unwrap();
    }

    #[test]
    fn full_network_refuses_whole_request() {
        let mut s = state();
        net(&mut s, "small", Some("10.3.0.0/29")).unwrap();
        let mut id = ids();
        let before = s.clone();
        assert!(matches!(
            s.create_service(svc("web", &["small"], 5), &mut id, &|_| true),
            Err(StateError::NetworkFull { .. })
        ));
        assert_eq!(s, before);
        // A /29 holds the gateway, the VIP and four tasks.
        s.create_service(svc("web", &["small"], 4), &mut id, &|_| true)
            .unwrap();
        let before = s.clone();
        assert!(s.scale_service("web", 5, &mut id, &|_| true).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn service_validation() {
        let mut s = state();
        net(&mut s, "a", None).unwrap();
        let mut id = ids();
        assert!(matches!(
            s.create_service(svc("x", &["nope"], 1), &mut id, &|_| true),
            Err(StateError::NoSuchNetwork(_))
        ));
        assert!(matches!(
            s.create_service(svc("x", &["a", "a"], 1), &mut id, &|_| true),
            Err(StateError::DuplicateNetwork(_))
        ));
        let mut empty = svc("x", &["a"], 1);
        empty.command.clear();
        assert!(matches!(
            s.create_service(empty, &mut id, &|_| true),
            Err(StateError::EmptyCommand)
        ));
        assert!(matches!(
            s.create_service(svc("x", &["a"], MAX_REPLICAS + 1), &mut id, &|_| true),
            Err(StateError::TooManyReplicas(_))
        ));
        s.create_service(svc("x", &["a"], 0), &mut id, &|_| true)
            .unwrap();
        assert!(matches!(
            s.create_service(svc("x", &["a"], 1), &mut id, &|_| true),
            Err(StateError::ServiceExists(_))
        ));
    }

    #[test]
    fn two_networks_per_task() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        net(&mut s, "b", Some("10.0.3.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a", "b"], 2), &mut id, &|_| true)
            .unwrap();
        let t = &s.tasks["web.2"];
        assert_eq!(t.attachments.len(), 2);
        assert_eq!(t.attachments[1].address.to_string(), "10.0.3.4");
        assert_ne!(s.tasks["web.1"].id, s.tasks["web.2"].id);
    }

    #[test]
    fn vteps_reserve_addresses_and_macs() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.5.0/24")).unwrap();
        let mac: MacAddr = "02:42:0a:00:05:09".parse().unwrap();
        let v = Vtep {
            address: "198.18.0.9".parse().unwrap(),
            mac,
            ip: Some("10.0.5.2".parse().unwrap()),
        };
        s.add_vtep("a", v.clone()).unwrap();
        assert!(matches!(
            s.add_vtep("a", v.clone()),
            Err(StateError::MacInUse { .. })
        ));
        let mut other = v.clone();
        other.mac = "02:42:0a:00:05:0a".parse().unwrap();
        assert!(matches!(
            s.add_vtep("a", other.clone()),
            Err(StateError::AddressTaken { .. })
        ));
        other.ip = Some("10.0.6.1".parse().unwrap());
        assert!(matches!(
            s.add_vtep("a", other),
            Err(StateError::AddressTaken { .. })
        ));
        // Tasks skip the VTEP's address.
        let mut id = ids();
        s.create_service(svc("web", &["a"], 1), &mut id, &|_| true)
            .unwrap();
        assert_eq!(
            s.tasks["web.1"].attachments[0].address.to_string(),
            "10.0.5.4"
        );
        s.remove_vtep("a", mac).unwrap();
        assert!(matches!(
            s.remove_vtep("a", mac),
            Err(StateError::NoSuchVtep { .. })
        ));
    }

    #[test]
    fn drain_moves_tasks_and_refuses_when_nowhere_to_go() {
        let mut s = state();
        let n2 = NodeName::new("n2").unwrap();
        s.nodes.insert(
            n2.clone(),
            Node {
                name: n2.clone(),
                role: Role::Worker,
                availability: Availability::Active,
                advertise_addr: None,
                data_port: 4789,
                joined_at: 0,
            },
        );
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 4), &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.tasks_on(&n2).count(), 2);
        s.set_availability("n2", Availability::Drain, &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.tasks_on(&n2).count(), 0);
        assert_eq!(s.tasks.len(), 4);
        assert_eq!(s.nodes[&n2].availability, Availability::Drain);
        // New tasks go elsewhere while drained; back to active, it is eligible again.
        s.scale_service("web", 5, &mut id, &|_| true).unwrap();
        assert_eq!(s.tasks_on(&n2).count(), 0);
        s.set_availability("n2", Availability::Active, &mut id, &|_| true)
            .unwrap();
        s.scale_service("web", 6, &mut id, &|_| true).unwrap();
        assert_eq!(s.tasks_on(&n2).count(), 1);
        // Draining the only other node would strand its tasks: refused, nothing changes.
        s.set_availability("n2", Availability::Drain, &mut id, &|_| true)
            .unwrap();
        let before = s.clone();
        assert!(matches!(
            s.set_availability("n1", Availability::Drain, &mut id, &|_| true),
            Err(StateError::NoActiveNode)
        ));
        assert_eq!(s, before);
        assert!(matches!(
            s.set_availability("nope", Availability::Drain, &mut id, &|_| true),
            Err(StateError::NoSuchNode(_))
        ));
    }

    #[test]
    fn vips_are_stable_and_freed() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        net(&mut s, "b", Some("10.0.3.0/24")).unwrap();
        let a = NetworkName::new("a").unwrap();
        let b = NetworkName::new("b").unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a", "b"], 2), &mut id, &|_| true)
            .unwrap();
        let vips = s.services["web"].vips.clone();
        assert_eq!(vips[&a].to_string(), "10.0.2.2");
        assert_eq!(vips[&b].to_string(), "10.0.3.2");
        s.scale_service("web", 0, &mut id, &|_| true).unwrap();
        s.scale_service("web", 5, &mut id, &|_| true).unwrap();
        assert_eq!(s.services["web"].vips, vips, "scaling keeps the VIPs");
        assert!(s
            .tasks
            .values()
            .all(|t| t.attachments[0].address != vips[&a]));
        // dnsrr: no VIP, the first task takes the next free address.
        let mut rr = svc("rr", &["a"], 1);
        rr.endpoint_mode = EndpointMode::Dnsrr;
        s.create_service(rr, &mut id, &|_| true).unwrap();
        assert!(s.services["rr"].vips.is_empty());
        // rm frees the VIP for the next user of the network.
        s.remove_service("web").unwrap();
        s.create_service(svc("api", &["a"], 0), &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.services["api"].vips[&a].to_string(), "10.0.2.2");
    }

    #[test]
    fn services_saved_without_vips_get_them() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 2), &mut id, &|_| true)
            .unwrap();
        s.services.get_mut("web").unwrap().vips.clear();
        let rev = s.revision;
        s.ensure_vips().unwrap();
        assert_eq!(s.revision, rev + 1);
        // The tasks keep theirs; the VIP takes the lowest free one.
        assert_eq!(
            s.services["web"].vips[&NetworkName::new("a").unwrap()].to_string(),
            "10.0.2.2"
        );
        s.ensure_vips().unwrap();
        assert_eq!(s.revision, rev + 1, "nothing missing, nothing changes");
    }

    #[test]
    fn aliases_are_checked() {
        let mut s = state();
        net(&mut s, "a", None).unwrap();
        let mut id = ids();
        let mut x = svc("x", &["a"], 0);
        x.aliases
            .insert(NetworkName::new("a").unwrap(), vec!["db.internal".into()]);
        s.create_service(x.clone(), &mut id, &|_| true).unwrap();
        for bad in ["", "a..b", "sp ace", "x/y"] {
            let mut y = svc("y", &["a"], 0);
            y.aliases
                .insert(NetworkName::new("a").unwrap(), vec![bad.into()]);
            assert!(
                matches!(
                    s.create_service(y, &mut id, &|_| true),
                    Err(StateError::BadAlias { .. })
                ),
                "{bad:?}"
            );
        }
        let mut z = svc("z", &["a"], 0);
        z.aliases
            .insert(NetworkName::new("other").unwrap(), vec!["ok".into()]);
        assert!(matches!(
            s.create_service(z, &mut id, &|_| true),
            Err(StateError::AliasWithoutNetwork(_))
        ));
    }

    #[test]
    fn spread_placement() {
        let mut s = state();
        for n in ["n2", "n3"] {
            let name = NodeName::new(n).unwrap();
            s.nodes.insert(
                name.clone(),
                Node {
                    name,
                    role: Role::Worker,
                    availability: Availability::Active,
                    advertise_addr: None,
                    data_port: 4789,
                    joined_at: 0,
                },
            );
        }
        net(&mut s, "a", None).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 6), &mut id, &|_| true)
            .unwrap();
        for n in ["n1", "n2", "n3"] {
            let node = NodeName::new(n).unwrap();
            assert_eq!(s.tasks_on(&node).count(), 2, "{n}");
        }
        // A node that is not eligible (down) gets no new task.
        s.scale_service("web", 9, &mut id, &|n| n.as_str() != "n2")
            .unwrap();
        assert_eq!(s.tasks_on(&NodeName::new("n2").unwrap()).count(), 2);
        assert!(matches!(
            s.scale_service("web", 10, &mut id, &|_| false),
            Err(StateError::NoActiveNode)
        ));
    }

    fn ep(container: &str, netns: &str, network: &str) -> EndpointRequest {
        EndpointRequest {
            container: container.into(),
            ifname: "eth0".into(),
            netns: netns.into(),
            node: NodeName::new("n1").unwrap(),
            network: network.into(),
            runtime: "cni".into(),
            address: None,
        }
    }

    /// Containers' endpoints take addresses from the network's pool like tasks, are keyed by
    /// (container, interface), repeat an ADD idempotently, refuse a clash, keep the network
    /// alive, and go away once (a repeated removal changes nothing).
    #[test]
    fn endpoints_share_the_pool_and_hold_their_network() {
        let mut s = state();
        net(&mut s, "app", Some("10.0.9.0/29")).unwrap();
        let a = s.add_endpoint(ep("c1", "/run/netns/c1", "app")).unwrap();
        assert_eq!(a.address, Ipv4Addr::new(10, 0, 9, 2));
        assert_eq!(a.mac, MacAddr::from_ipv4(a.address));
        let rev = s.revision;
        assert_eq!(s.add_endpoint(ep("c1", "/run/netns/c1", "app")).unwrap(), a);
        assert_eq!(s.revision, rev, "a repeated ADD changes nothing");
        assert!(matches!(
            s.add_endpoint(ep("c1", "/run/netns/other", "app")),
            Err(StateError::EndpointExists { .. })
        ));
        s.create_service(svc("web", &["app"], 1), &mut ids(), &|_| true)
            .unwrap();
        let task = s.tasks.values().next().unwrap().attachments[0].address;
        assert_ne!(
            task, a.address,
            "tasks and containers never share an address"
        );
        assert!(matches!(
            s.remove_network("app"),
            Err(StateError::NetworkInUse { .. })
        ));
        s.remove_service("web").unwrap();
        let err = s.remove_network("app").unwrap_err();
        assert_eq!(err.to_string(), "network app is in use by container(s) c1");
        // A /29 has six host addresses: the gateway, c1, then four more.
        for c in ["c2", "c3", "c4", "c5"] {
            s.add_endpoint(ep(c, "/run/netns/x", "app")).unwrap();
        }
        assert!(matches!(
            s.add_endpoint(ep("c6", "/run/netns/x", "app")),
            Err(StateError::NetworkFull { .. })
        ));
        assert!(s.remove_endpoint("c1", "eth0").is_some());
        assert!(s.remove_endpoint("c1", "eth0").is_none());
        assert_eq!(
            s.add_endpoint(ep("c6", "/run/netns/x", "app"))
                .unwrap()
                .address,
            a.address,
            "a freed address is given again"
        );
    }

    #[test]
    fn bad_endpoint_requests_are_refused() {
        let mut s = state();
        net(&mut s, "app", None).unwrap();
        for (c, netns, network) in [
            ("", "/run/netns/c", "app"),
            ("a/b", "/run/netns/c", "app"),
            ("c", "relative", "app"),
            ("c", "/run/netns/c", "nonet"),
        ] {
            assert!(
                s.add_endpoint(ep(c, netns, network)).is_err(),
                "{c} {netns} {network}"
            );
        }
        let mut long = ep("c", "/run/netns/c", "app");
        long.ifname = "a-very-long-interface".into();
        assert!(matches!(
            s.add_endpoint(long),
            Err(StateError::BadEndpoint(_))
        ));
        let mut elsewhere = ep("c", "/run/netns/c", "app");
        elsewhere.node = NodeName::new("n9").unwrap();
        assert!(matches!(
            s.add_endpoint(elsewhere),
            Err(StateError::NoSuchNode(_))
        ));
        s.ensure_ingress("ing".into(), 0).unwrap();
        assert!(matches!(
            s.add_endpoint(ep("c", "/run/netns/c", "ingress")),
            Err(StateError::IngressAttach(_))
        ));
        assert!(s.endpoints.is_empty());
    }

    #[test]
    fn docker_attachments_are_counted_per_node() {
        let mut s = state();
        net(&mut s, "app", None).unwrap();
        let n1 = NodeName::new("n1").unwrap();
        let n2 = NodeName::new("n2").unwrap();
        assert_eq!(s.docker_attach("app", &n1, true).unwrap().len(), 1);
        let rev = s.revision;
        assert_eq!(s.docker_attach("app", &n1, true).unwrap().len(), 1);
        assert_eq!(s.revision, rev, "attaching twice changes nothing");
        assert_eq!(s.docker_attach("app", &n2, true).unwrap().len(), 2);
        assert_eq!(
            s.docker_attach("app", &n1, false).unwrap(),
            [n2.clone()].into()
        );
        assert!(s.docker_attach("app", &n2, false).unwrap().is_empty());
        assert!(matches!(
            s.docker_attach("nonet", &n1, true),
            Err(StateError::NoSuchNetwork(_))
        ));
    }
}
