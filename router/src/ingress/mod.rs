//! The routing mesh on one node: published ports open on the node's own addresses, each
//! connection (or UDP client) carried to a task of the service over the `ingress` overlay
//! network by the router's own userspace TCP/IP endpoint (smoltcp).
//!
//! ```text
//!  client ──TCP──► node:P (kernel socket, accepted by the proxy thread)
//!                    │ bytes, with backpressure both ways
//!                    ▼
//!            smoltcp endpoint 10.255.0.x (own MAC) ──frames──► link ──► datapath switch
//!                                                                     │ (a port like a TAP)
//!                                                   task 10.255.0.y:T ◄┘ TAP or VXLAN
//! ```
//!
//! The node is an endpoint on the ingress network like any task: its frames enter the switch
//! through [`link`] as a port's do, and are answered for (ARP), encapsulated and offloaded by
//! the same code. No kernel interface and no kernel NAT are involved; the kernel only sees
//! the client's TCP connection to the node. The agent computes an [`IngressView`] from the
//! cluster state four times a second and hands it to the proxy thread when it changes.

pub mod link;
mod proxy;
pub mod stats;

use crate::services::is_serving;
use protocol::api::TaskStatus;
use protocol::control::NodeHealth;
use protocol::state::{ClusterState, PortProtocol, ProxyProtocol, PublishMode, Task};
use protocol::types::{MacAddr, NodeName, ServiceName, Vni};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

pub use proxy::Ingress;

/// How long a UDP client's mapping lives without traffic, unless the service sets
/// `--lb-idle-timeout`.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// This node's router endpoint on the ingress network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointAddr {
    pub vni: Vni,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: MacAddr,
    pub mtu: u16,
}

/// One published port open on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerView {
    pub protocol: PortProtocol,
    pub port: u16,
    pub service: ServiceName,
    pub target: u16,
    pub mode: PublishMode,
    pub proxy: Option<ProxyProtocol>,
    /// Ingress addresses of the tasks to balance over, in slot order.
    pub backends: Vec<Ipv4Addr>,
    pub udp_idle: Duration,
}

impl ListenerView {
    /// `8080/tcp`: how stats and logs name the port.
    pub fn key(&self) -> String {
        format!("{}/{}", self.port, self.protocol)
    }
}

/// Everything the proxy thread needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngressView {
    pub endpoint: Option<EndpointAddr>,
    pub listeners: Vec<ListenerView>,
}

type Statuses = BTreeMap<String, (String, TaskStatus)>;

/// The task's address on the ingress network.
fn ingress_address(state: &ClusterState, task: &Task) -> Option<Ipv4Addr> {
    let ingress = state.ingress_network()?;
    task.attachments
        .iter()
        .find(|a| a.network == ingress.name)
        .map(|a| a.address)
}

/// For a task on `node` whose service publishes host-mode ports: the task that holds one of
/// those ports on that node first (by service name, then slot), if it is another one. Two
/// tasks cannot open one port on one node; the later one waits, with this reason.
pub fn host_port_holder<'a>(
    state: &'a ClusterState,
    node: &'a NodeName,
    task: &Task,
) -> Option<(&'a Task, u16, PortProtocol)> {
    let host_ports = |t: &Task| -> BTreeSet<(u16, PortProtocol)> {
        state
            .services
            .get(&t.service)
            .map_or_else(BTreeSet::new, |s| {
                s.ports
                    .iter()
                    .filter(|p| p.mode == PublishMode::Host)
                    .map(|p| (p.published, p.protocol))
                    .collect()
            })
    };
    let mine = host_ports(task);
    if mine.is_empty() {
        return None;
    }
    state
        .tasks_on(node)
        .filter(|t| (t.service.as_str(), t.slot) < (task.service.as_str(), task.slot))
        .find_map(|t| {
            host_ports(t)
                .intersection(&mine)
                .next()
                .map(|(port, proto)| (t, *port, *proto))
        })
}

impl IngressView {
    /// What `node` publishes: every ingress-mode port of the cluster, balanced over all of
    /// its service's serving tasks; and each host-mode port of a serving task on this node,
    /// to that task.
    pub fn build(
        state: &ClusterState,
        statuses: &Statuses,
        health: &BTreeMap<NodeName, NodeHealth>,
        node: &NodeName,
    ) -> IngressView {
        let Some(net) = state.ingress_network() else {
            return IngressView::default();
        };
        let Some(ip) = net.lb_endpoints.get(node) else {
            return IngressView::default();
        };
        let endpoint = EndpointAddr {
            vni: net.vni,
            ip: *ip,
            prefix_len: net.subnet.prefix_len(),
            mac: MacAddr::from_ipv4(*ip),
            mtu: net.mtu(),
        };
        let mut listeners = Vec::new();
        for svc in state.services.values() {
            let mut tasks: Vec<&Task> = state
                .tasks
                .values()
                .filter(|t| t.service == svc.name && is_serving(t, statuses, health))
                .collect();
            tasks.sort_by_key(|t| t.slot);
            let udp_idle = svc.lb_idle_timeout.map_or(UDP_IDLE, Duration::from_secs);
            for p in &svc.ports {
                let backends: Vec<Ipv4Addr> = match p.mode {
                    PublishMode::Ingress => tasks
                        .iter()
                        .filter_map(|t| ingress_address(state, t))
                        .collect(),
                    PublishMode::Host => {
                        let local = tasks.iter().find(|t| {
                            &t.node == node && host_port_holder(state, node, t).is_none()
                        });
                        match local.and_then(|t| ingress_address(state, t)) {
                            Some(a) => vec![a],
                            None => continue,
                        }
                    }
                };
                listeners.push(ListenerView {
                    protocol: p.protocol,
                    port: p.published,
                    service: svc.name.clone(),
                    target: p.target,
                    mode: p.mode,
                    proxy: p.proxy,
                    backends,
                    udp_idle,
                });
            }
        }
        IngressView {
            endpoint: Some(endpoint),
            listeners,
        }
    }
}
