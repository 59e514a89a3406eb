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

use crate::services::{self, serving_by_service, Statuses};
use protocol::control::NodeHealth;
use protocol::state::{ClusterState, PortProtocol, ProxyProtocol, PublishMode, Task};
use protocol::types::{MacAddr, NodeName, ServiceName, Vni};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

#[doc(hidden)]
pub use proxy::endpoint;
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
    /// Ingress addresses of the tasks on their way out ([`services::leaving_tasks`]): the
    /// connections they already serve go on, even once their port is closed (`service
    /// rm`), until the task is gone; no new one goes to them.
    pub draining: BTreeSet<Ipv4Addr>,
}

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
    /// to that task. Beside them, the tasks whose connections are draining.
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
        let serving = serving_by_service(state, statuses, health);
        let none = Vec::new();
        for svc in state.services.values().filter(|s| !s.ports.is_empty()) {
            let tasks = serving.get(&svc.name).unwrap_or(&none);
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
        let draining = services::leaving_tasks(state, statuses, health)
            .filter_map(|(_, t)| ingress_address(state, t))
            .collect();
        IngressView {
            endpoint: Some(endpoint),
            listeners,
            draining,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::api::{TaskHealth, TaskState, TaskStatus};
    use protocol::state::{Availability, Node, Pool, PortConfig, Role};
    use protocol::state::{NetworkRequest, Service};
    use protocol::types::NetworkName;

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        for n in ["n1", "n2"] {
            s.upsert_node(Node {
                name: NodeName::new(n).unwrap(),
                role: Role::Worker,
                availability: Availability::Active,
                advertise_addr: None,
                data_port: 4789,
                joined_at: 0,
                control_addr: None,
            });
        }
        s.ensure_ingress("ing".into(), 0).unwrap();
        let req = NetworkRequest::default();
        s.create_network(
            NetworkName::new("a").unwrap(),
            req,
            Pool::default(),
            "a".into(),
            0,
        )
        .unwrap();
        s
    }

    fn service(name: &str, replicas: u32, ports: Vec<PortConfig>) -> Service {
        Service {
            id: name.into(),
            name: ServiceName::new(name).unwrap(),
            networks: vec![NetworkName::new("a").unwrap()],
            replicas,
            command: vec!["x".into()],
            env: vec![],
            created_at: 0,
            updated_at: 0,
            endpoint_mode: Default::default(),
            vips: Default::default(),
            aliases: Default::default(),
            lb_idle_timeout: None,
            ports,
            healthcheck: None,
            stop_grace_period_s: None,
            deploy: Default::default(),
            mode: Default::default(),
            node_slots: Default::default(),
            image: None,
        }
    }

    fn all_running(s: &ClusterState) -> Statuses {
        s.tasks
            .values()
            .map(|t| {
                let st = TaskStatus {
                    state: TaskState::Running,
                    error: None,
                    pid: None,
                    restarts: 0,
                    since: 0,
                    health: None,
                };
                (t.name.clone(), (t.id.clone(), st))
            })
            .collect()
    }

    #[test]
    fn every_node_publishes_ingress_ports_and_host_ports_stay_local() {
        let mut s = cluster();
        let mut gen = ids();
        let port = |published, mode| PortConfig {
            protocol: PortProtocol::Tcp,
            target: 80,
            published,
            mode,
            proxy: None,
        };
        s.create_service(
            service("web", 2, vec![port(8080, PublishMode::Ingress)]),
            &mut gen,
            &|_| true,
        )
        .unwrap();
        s.create_service(
            service("hm", 3, vec![port(9000, PublishMode::Host)]),
            &mut gen,
            &|_| true,
        )
        .unwrap();
        let statuses = all_running(&s);
        let health = BTreeMap::new();
        let n1 = NodeName::new("n1").unwrap();
        let v = IngressView::build(&s, &statuses, &health, &n1);
        let ep = v.endpoint.unwrap();
        assert_eq!(ep.vni.get(), protocol::state::INGRESS_VNI);
        assert_eq!(ep.mac, MacAddr::from_ipv4(ep.ip));
        let web = v.listeners.iter().find(|l| l.port == 8080).unwrap();
        assert_eq!(web.backends.len(), 2, "both replicas, wherever they run");
        // hm has 3 tasks on 2 nodes: n1 holds two of them; the second waits, said so.
        let hm = v.listeners.iter().find(|l| l.port == 9000).unwrap();
        assert_eq!(hm.backends.len(), 1);
        let on_n1: Vec<&Task> = s
            .tasks_on(&n1)
            .filter(|t| t.service.as_str() == "hm")
            .collect();
        assert_eq!(on_n1.len(), 2);
        assert!(host_port_holder(&s, &n1, on_n1[0]).is_none());
        let (holder, p, _) = host_port_holder(&s, &n1, on_n1[1]).unwrap();
        assert_eq!((holder.name.as_str(), p), (on_n1[0].name.as_str(), 9000));
        assert_eq!(hm.backends[0], ingress_address(&s, on_n1[0]).unwrap());
        // Nothing runs: the ingress port stays open (and refuses), the host port closes.
        let v = IngressView::build(&s, &BTreeMap::new(), &health, &n1);
        assert!(v
            .listeners
            .iter()
            .any(|l| l.port == 8080 && l.backends.is_empty()));
        assert!(!v.listeners.iter().any(|l| l.port == 9000));
    }

    #[test]
    fn tasks_on_their_way_out_keep_their_connections_but_get_no_new_ones() {
        let mut s = cluster();
        let mut gen = ids();
        let port = PortConfig {
            protocol: PortProtocol::Tcp,
            target: 80,
            published: 8080,
            mode: PublishMode::Ingress,
            proxy: None,
        };
        s.create_service(service("web", 3, vec![port]), &mut gen, &|_| true)
            .unwrap();
        let mut statuses = all_running(&s);
        let addr = |s: &ClusterState, t: &str| ingress_address(s, &s.tasks[t]).unwrap();
        let (web2, web3) = (addr(&s, "web.2"), addr(&s, "web.3"));
        // web.2's health check failed: out of the rotation, draining.
        let e = &mut statuses.get_mut("web.2").unwrap().1;
        e.health = Some(TaskHealth::Unhealthy);
        let mut svc = s.services["web"].clone();
        svc.healthcheck = Some(protocol::state::HealthCheck {
            command: vec!["true".into()],
            interval_s: 1,
            timeout_s: 1,
            retries: 1,
            start_period_s: 0,
        });
        s.tasks.get_mut("web.2").unwrap().spec = svc.task_spec();
        // web.3 scaled down: its node still holds it.
        s.scale_service("web", 2, &mut gen, &|_| true).unwrap();
        let n1 = NodeName::new("n1").unwrap();
        let v = IngressView::build(&s, &statuses, &BTreeMap::new(), &n1);
        let web = v.listeners.iter().find(|l| l.port == 8080).unwrap();
        assert_eq!(web.backends, vec![addr(&s, "web.1")]);
        assert_eq!(v.draining, [web2, web3].into_iter().collect());
        // Its node lets web.3 go: its connections may be reset now.
        let web3_node = s.history.values().next().unwrap().task.node.clone();
        s.release_stopped(web3_node.as_str(), &Default::default());
        let v = IngressView::build(&s, &statuses, &BTreeMap::new(), &n1);
        assert!(!v.draining.contains(&web3));
    }
}
