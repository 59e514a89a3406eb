//! The cluster's desired state and the pure operations that change it.
//!
//! The manager holds one [`ClusterState`], applies operator requests to it with the methods
//! here (which check every invariant before touching anything: a refused request changes
//! nothing), persists it, and publishes it to the agents that realise it. Identifiers and
//! timestamps come in from the caller, so these functions stay deterministic.
//!
//! This file holds [`ClusterState`] and [`StateError`]. The rest is split by concept, each
//! file holding its types and an `impl ClusterState` block of the operations on them; every
//! public item is re-exported here, so its path is `protocol::state::Item`:
//!
//! - `network.rs`: networks, their Docker options (VNI, MTU, encryption) and address pool.
//! - `ingress.rs`: the routing mesh's network and each node's router address on it.
//! - `ports.rs`: published ports, checked cluster-wide.
//! - `service.rs`: services, their aliases and virtual IPs.
//! - `spec.rs`: a service's spec (what the operator asked) and its edits.
//! - `update.rs`: updates and rollbacks: a new spec applied, its outdated tasks rolled out.
//! - `rollout.rs`: the pure state machine of a rollout (which slots next, failures).
//! - `policy.rs`: update and rollback policies (`--update-*`, `--rollback-*`).
//! - `task.rs`: a service's tasks, their attachments, and their placement on nodes.
//! - `node.rs`: nodes, their availability, draining and removal.
//! - `history.rs`: past tasks (stopped or replaced), whose addresses stay reserved until
//!   their node reports them stopped, bounded per slot.
//! - `reschedule.rs`: replacing a lost node's tasks, filling slots left empty, and which
//!   down nodes are due for it.
//! - `membership.rs`: nodes' accepted certificates, roles, and `node rm`'s checks.
//! - `addresses.rs`: which addresses of a network are taken (IPAM use).
//! - `vtep.rs`: external VTEP endpoints of a network.
//! - `image.rs`: the image and container options of services run by a node's Docker Engine.
//! - `endpoint.rs`: containers' interfaces made for a runtime (CNI, Docker).
//! - `docker.rs`: which nodes' Docker has a network (the Docker plugin's bookkeeping).

mod addresses;
mod docker;
mod endpoint;
#[cfg(test)]
mod fixtures;
mod global;
mod history;
mod image;
mod ingress;
mod membership;
mod network;
mod node;
mod policy;
mod ports;
mod reschedule;
pub mod rollout;
mod service;
mod spec;
mod task;
mod update;
mod vtep;

pub use endpoint::{Endpoint, EndpointRequest};
pub use history::{PastTask, DEFAULT_TASK_HISTORY_LIMIT};
pub use image::{ContainerImage, Mount, MountKind, RestartCondition, RestartPolicy};
pub use ingress::{INGRESS_NETWORK, INGRESS_VNI};
pub use membership::{MembershipError, NodeCert};
pub use network::{
    Network, NetworkRequest, Pool, DEFAULT_MTU, ENCRYPTED_MTU, MAX_ENCRYPTED_MTU, OPT_ENCRYPTED,
    OPT_MTU, OPT_VXLANID,
};
pub use node::{Availability, Node, Role};
pub use policy::{
    FailureAction, FailureRatio, UpdateConfig, UpdateConfigChange, UpdateOrder, DEFAULT_MONITOR_MS,
};
pub use ports::{PortConfig, PortProtocol, ProxyProtocol, PublishMode, DYNAMIC_PORTS};
pub use reschedule::DEFAULT_RESCHEDULE_AFTER_S;
pub use rollout::{Observed, Rollout, RolloutKind};
pub use service::{
    EndpointMode, HealthCheck, Service, ServiceMode, TaskSpec, DEFAULT_STOP_GRACE_S, MAX_REPLICAS,
};
pub use spec::Spec;
pub use task::{successor_name, task_name, Attachment, Task};
pub use update::{Deploy, UpdateState, UpdateStatus};
pub use vtep::Vtep;

use crate::types::{MacAddr, NetworkName, NodeName, ServiceName, Vni};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Version of the on-disk / on-wire layout of [`ClusterState`]. Fields added since
/// (`endpoints`, `history`, `task_history_limit`) have defaults, so a file without them
/// still reads as this format.
pub const FORMAT: u32 = 1;

/// The whole desired state of the cluster: what the manager persists and publishes, and
/// what each node's agent realises.
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
    /// Tasks that were stopped or replaced, by task id (`history.rs`); the unreleased ones
    /// still hold their addresses.
    #[serde(default)]
    pub history: BTreeMap<String, PastTask>,
    /// Most past tasks kept per slot of a service (Swarm's Task History Retention Limit).
    #[serde(default = "history::default_task_history_limit")]
    pub task_history_limit: u32,
    /// The node certificates the manager signed and still accepts (`membership.rs`).
    #[serde(default)]
    pub certs: BTreeMap<NodeName, Vec<NodeCert>>,
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
            history: BTreeMap::new(),
            task_history_limit: DEFAULT_TASK_HISTORY_LIMIT,
            certs: BTreeMap::new(),
        }
    }
}

/// Why an operation on the state was refused (a refused operation changes nothing).
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
    /// An operation that only a replicated service has (`scale`, `replicas`), asked of a
    /// global one; Docker's message.
    #[error("{0} can only be used with replicated or replicated-job mode")]
    NotReplicated(&'static str),
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
    #[error("node {node} still holds {users}: drain it first, or force its removal")]
    NodeInUse { node: NodeName, users: String },
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
    #[error("invalid environment variable {0:?}: expected KEY=VALUE")]
    BadEnv(String),
    #[error("the service is not attached to network {0}")]
    NotAttached(NetworkName),
    #[error("invalid health check: {0}")]
    BadHealthCheck(String),
    #[error("invalid update policy: {0}")]
    BadPolicy(String),
    #[error("service {0} has no previous spec to roll back to")]
    NoPreviousSpec(ServiceName),
}
