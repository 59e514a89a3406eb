//! The forwarding tables the datapath reads: which port belongs to which network, where every
//! MAC of a network lives (a local port or a remote node), and which MAC owns which IPv4
//! address. The control side builds a new [`Tables`] value whenever the cluster state changes
//! and publishes it whole; the I/O thread reads a snapshot per batch and never takes a lock.
//! A snapshot is immutable: what changes per frame (the connection table, the clock) is
//! handed to the decision beside it.

use crate::conntrack::{BackendCounters, Flow, ServiceCounters};
use crate::keys::NetCrypto;
use crate::vocab::{FastHash, Location, PortBinding, PortId};
use protocol::state::ClusterState;
use protocol::types::{MacAddr, NodeName, Vni};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

/// A task a VIP balances over, and where it is.
#[derive(Debug, Clone)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub at: Location,
    /// Its flows from this node, and what they moved (kept across table rebuilds).
    pub flows: Arc<BackendCounters>,
}

/// A service's virtual IP on one network: the router answers for it and balances its flows
/// round-robin over `backends` (the service's running tasks, on every node).
#[derive(Debug, Clone)]
pub struct Vip {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub service: Arc<ServiceCounters>,
    pub backends: Vec<Backend>,
    /// Tasks on their way out (stopping, or unhealthy): no new flow goes to them, but the
    /// flows they already have keep them until they close or the task is gone.
    pub draining: Vec<Backend>,
    pub tcp_idle_ms: u64,
    pub udp_idle_ms: u64,
}

impl Vip {
    /// Whether flows to `backend` may go on: it is in the rotation or draining.
    pub fn holds(&self, backend: Ipv4Addr) -> bool {
        self.backends
            .iter()
            .chain(&self.draining)
            .any(|b| b.ip == backend)
    }
}

/// One network's switching table.
#[derive(Debug, Clone, Default)]
pub struct NetTable {
    pub gateway_ip: Option<Ipv4Addr>,
    pub gateway_mac: MacAddr,
    pub macs: HashMap<MacAddr, Location, FastHash>,
    pub arp: HashMap<Ipv4Addr, MacAddr, FastHash>,
    /// Local ports of this network, for flooding.
    pub local_ports: Vec<PortId>,
    /// Service VIPs on this network, by address.
    pub vips: HashMap<Ipv4Addr, Vip, FastHash>,
    /// Every backend address of those VIPs: only frames from these can be replies to
    /// translate back (looked up for every frame delivered to a local port).
    pub backend_ips: HashSet<Ipv4Addr, FastHash>,
    /// Keys of an encrypted network (None: a plain network).
    pub crypto: Option<Arc<NetCrypto>>,
    /// Whether the router answers DNS at the gateway's port 53, and from which networks'
    /// names (this one's; None: no DNS there). The answer itself is the router's
    /// ([`crate::vocab::Punt::GatewayDns`]).
    pub dns: Option<Arc<[String]>>,
}

/// All tables of one node.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub ports: HashMap<PortId, PortBinding, FastHash>,
    pub networks: HashMap<Vni, NetTable, FastHash>,
    /// Other nodes by underlay address: whose key opens an ESP datagram from there.
    pub senders: HashMap<Ipv4Addr, String, FastHash>,
}

/// What the control side knows of a backend before the table says where it lives.
#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub flows: Arc<BackendCounters>,
}

impl Tables {
    /// Adds a local port and its addresses.
    pub fn add_port(&mut self, port: PortId, binding: PortBinding) {
        self.ports.insert(port, binding);
        let net = self.networks.entry(binding.vni).or_default();
        net.macs.insert(binding.mac, Location::Local(port));
        net.arp.insert(binding.ip, binding.mac);
        net.local_ports.push(port);
        net.local_ports.sort();
    }

    /// Declares an endpoint behind another VTEP.
    pub fn add_remote(&mut self, vni: Vni, mac: MacAddr, ip: Option<Ipv4Addr>, vtep: SocketAddrV4) {
        let net = self.networks.entry(vni).or_default();
        net.macs.insert(mac, Location::Remote(vtep));
        if let Some(ip) = ip {
            net.arp.insert(ip, mac);
        }
    }

    /// Sets a network's gateway, which the router itself answers for.
    pub fn set_gateway(&mut self, vni: Vni, ip: Ipv4Addr) {
        let net = self.networks.entry(vni).or_default();
        net.gateway_ip = Some(ip);
        net.gateway_mac = MacAddr::from_ipv4(ip);
        net.arp.insert(ip, net.gateway_mac);
    }

    /// Adds a VIP on network `vni` (if the network exists on this node). Backends whose MAC
    /// the table cannot place (a node without a known address) are left out.
    pub fn add_vip(
        &mut self,
        vni: Vni,
        ip: Ipv4Addr,
        service: Arc<ServiceCounters>,
        backends: &[BackendSpec],
        idle_ms: (u64, u64),
    ) {
        let Some(net) = self.networks.get_mut(&vni) else {
            return;
        };
        let mac = MacAddr::from_ipv4(ip);
        let backends: Vec<Backend> = backends
            .iter()
            .filter_map(|b| {
                Some(Backend {
                    ip: b.ip,
                    mac: b.mac,
                    at: *net.macs.get(&b.mac)?,
                    flows: b.flows.clone(),
                })
            })
            .collect();
        net.backend_ips.extend(backends.iter().map(|b| b.ip));
        net.arp.insert(ip, mac);
        net.vips.insert(
            ip,
            Vip {
                ip,
                mac,
                service,
                backends,
                draining: Vec::new(),
                tcp_idle_ms: idle_ms.0,
                udp_idle_ms: idle_ms.1,
            },
        );
    }

    /// Adds the draining tasks of the VIP `ip` on network `vni` (added before with
    /// [`Tables::add_vip`]): their flows go on, their replies are translated back, and no
    /// new flow is given to them. Tasks whose MAC the table cannot place are left out.
    pub fn add_draining(&mut self, vni: Vni, ip: Ipv4Addr, backends: &[BackendSpec]) {
        let Some(net) = self.networks.get_mut(&vni) else {
            return;
        };
        let Some(vip) = net.vips.get_mut(&ip) else {
            return;
        };
        for b in backends {
            if let Some(at) = net.macs.get(&b.mac) {
                vip.draining.push(Backend {
                    ip: b.ip,
                    mac: b.mac,
                    at: *at,
                    flows: b.flows.clone(),
                });
                net.backend_ips.insert(b.ip);
            }
        }
    }

    /// Whether `flow` may go on under these tables: its VIP is still here and its backend is
    /// in the rotation or draining. The sweeper retires (and resets) the others.
    pub fn holds_flow(&self, flow: &Flow) -> bool {
        Vni::new(flow.key.vni)
            .ok()
            .and_then(|v| self.networks.get(&v))
            .and_then(|net| net.vips.get(&flow.key.dst))
            .is_some_and(|vip| vip.holds(flow.backend_ip))
    }

    /// Builds the tables of `node` from the cluster state and the node's local ports.
    /// `vtep_of` gives the underlay address of another node, if known; external VTEPs are
    /// reached on `external_port`.
    pub fn from_state(
        state: &ClusterState,
        node: &NodeName,
        ports: &[(PortId, PortBinding)],
        vtep_of: &dyn Fn(&NodeName) -> Option<SocketAddrV4>,
        external_port: u16,
    ) -> Tables {
        let mut t = Tables::default();
        for (port, binding) in ports {
            t.add_port(*port, *binding);
        }
        for net in state.networks.values() {
            // Only networks with a local endpoint exist on this node (lazy, as in Swarm).
            if t.networks.contains_key(&net.vni) {
                t.set_gateway(net.vni, net.gateway);
                // Other nodes' router endpoints (the ingress network).
                for (n, ip) in net.lb_endpoints.iter().filter(|(n, _)| *n != node) {
                    if let Some(vtep) = vtep_of(n) {
                        t.add_remote(net.vni, MacAddr::from_ipv4(*ip), Some(*ip), vtep);
                    }
                }
                for v in &net.vteps {
                    t.add_remote(
                        net.vni,
                        v.mac,
                        v.ip,
                        SocketAddrV4::new(v.address, external_port),
                    );
                }
            }
        }
        for n in state.nodes.values().filter(|n| &n.name != node) {
            if let Some(addr) = n.advertise_addr {
                t.senders.insert(addr, n.name.to_string());
            }
        }
        for e in state.endpoints.values().filter(|e| &e.node != node) {
            let (Some(vtep), Some(net)) = (vtep_of(&e.node), state.networks.get(&e.network)) else {
                continue;
            };
            if t.networks.contains_key(&net.vni) {
                t.add_remote(net.vni, e.mac, Some(e.address), vtep);
            }
        }
        // Tasks on other nodes, and those that left the desired state but may still run
        // there (unreleased past tasks: draining their connections, or not yet confirmed
        // stopped), whose replies must still be accepted from their node.
        let past = state.unreleased_tasks().map(|p| &p.task);
        for task in state.tasks.values().chain(past).filter(|t| &t.node != node) {
            let Some(vtep) = vtep_of(&task.node) else {
                continue;
            };
            for a in &task.attachments {
                let Some(net) = state.networks.get(&a.network) else {
                    continue;
                };
                if t.networks.contains_key(&net.vni) {
                    t.add_remote(net.vni, a.mac, Some(a.address), vtep);
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::state::{Attachment, Availability, Network, Node, PastTask, Role, Task};
    use protocol::types::{NetworkName, ServiceName};

    fn task(name: &str, node: &str, ip: &str) -> Task {
        let address: Ipv4Addr = ip.parse().unwrap();
        Task {
            id: format!("id-{name}"),
            name: name.into(),
            service: ServiceName::new("web").unwrap(),
            slot: 1,
            node: NodeName::new(node).unwrap(),
            attachments: vec![Attachment {
                network: NetworkName::new("a").unwrap(),
                address,
                mac: MacAddr::from_ipv4(address),
            }],
            spec: Default::default(),
        }
    }

    #[test]
    fn tasks_that_left_but_still_run_elsewhere_stay_placed() {
        let mut s = ClusterState::default();
        for (n, addr) in [("n1", "198.18.0.1"), ("n2", "198.18.0.2")] {
            let name = NodeName::new(n).unwrap();
            s.nodes.insert(
                name.clone(),
                Node {
                    name,
                    role: Role::Worker,
                    availability: Availability::Active,
                    advertise_addr: Some(addr.parse().unwrap()),
                    data_port: 4789,
                    joined_at: 0,
                    control_addr: None,
                },
            );
        }
        let vni = Vni::new(4097).unwrap();
        let net = NetworkName::new("a").unwrap();
        s.networks.insert(
            net.clone(),
            Network {
                id: "a".into(),
                name: net,
                driver: "overlay".into(),
                subnet: "10.0.0.0/24".parse().unwrap(),
                gateway: "10.0.0.1".parse().unwrap(),
                vni,
                options: Default::default(),
                created_at: 0,
                vteps: vec![],
                ingress: false,
                lb_endpoints: Default::default(),
                docker_nodes: Default::default(),
            },
        );
        s.tasks
            .insert("web.1".into(), task("web.1", "n2", "10.0.0.3"));
        for (old, released) in [("10.0.0.4", false), ("10.0.0.5", true)] {
            let t = task("web.2", "n2", old);
            s.history.insert(
                t.id.clone() + old,
                PastTask {
                    task: t,
                    service_id: "s".into(),
                    reason: "scaled down".into(),
                    ended_at: 0,
                    ended_revision: 0,
                    released,
                },
            );
        }
        let n1 = NodeName::new("n1").unwrap();
        let local = PortBinding {
            vni,
            mac: MacAddr::from_ipv4("10.0.0.9".parse().unwrap()),
            ip: "10.0.0.9".parse().unwrap(),
        };
        let vtep_of = |n: &NodeName| {
            let addr = s.nodes.get(n)?.advertise_addr?;
            Some(SocketAddrV4::new(addr, 4789))
        };
        let t = Tables::from_state(&s, &n1, &[(PortId(1), local)], &vtep_of, 4789);
        let net = &t.networks[&vni];
        let at = |ip: &str| {
            let mac = MacAddr::from_ipv4(ip.parse().unwrap());
            net.macs.get(&mac).copied()
        };
        let n2 = Location::Remote("198.18.0.2:4789".parse().unwrap());
        assert_eq!(at("10.0.0.3"), Some(n2));
        // Left the desired state, its node still holds it (draining): still placed, so its
        // replies are accepted from n2.
        assert_eq!(at("10.0.0.4"), Some(n2));
        // Confirmed stopped: gone.
        assert_eq!(at("10.0.0.5"), None);
    }
}
