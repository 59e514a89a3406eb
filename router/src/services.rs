//! What the load balancer needs to know about services, taken from the desired state and
//! what nodes report: every VIP and, for each, the service's tasks that can take traffic
//! right now (running, on a node that is not down), in slot order so that round robin goes
//! through them in a stable order on every node.

use protocol::api::{TaskState, TaskStatus};
use protocol::control::NodeHealth;
use protocol::state::{ClusterState, EndpointMode, Task};
use protocol::types::{MacAddr, NodeName, ServiceName, Vni};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// One VIP and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipView {
    pub service: ServiceName,
    pub vni: Vni,
    pub ip: Ipv4Addr,
    /// Address and MAC of each backend on the VIP's network.
    pub backends: Vec<(Ipv4Addr, MacAddr)>,
    /// The service's `--lb-idle-timeout`, if it set one.
    pub idle_secs: Option<u64>,
}

/// Whether `task` can take traffic: its node reported it running (under its current id) and
/// that node is not down.
pub fn is_serving(
    task: &Task,
    statuses: &BTreeMap<String, (String, TaskStatus)>,
    health: &BTreeMap<NodeName, NodeHealth>,
) -> bool {
    let running = matches!(statuses.get(&task.name),
        Some((id, st)) if *id == task.id && st.state == TaskState::Running);
    running && health.get(&task.node) != Some(&NodeHealth::Down)
}

/// The tasks of `service` that can take traffic, in slot order (the order round robin
/// follows on every node).
pub fn serving_tasks<'a>(
    state: &'a ClusterState,
    service: &ServiceName,
    statuses: &BTreeMap<String, (String, TaskStatus)>,
    health: &BTreeMap<NodeName, NodeHealth>,
) -> Vec<&'a Task> {
    let mut tasks: Vec<&Task> = state
        .tasks
        .values()
        .filter(|t| &t.service == service && is_serving(t, statuses, health))
        .collect();
    tasks.sort_by_key(|t| t.slot);
    tasks
}

/// Every VIP of the state, with its serving backends.
pub fn vips(
    state: &ClusterState,
    statuses: &BTreeMap<String, (String, TaskStatus)>,
    health: &BTreeMap<NodeName, NodeHealth>,
) -> Vec<VipView> {
    let mut out = Vec::new();
    for svc in state.services.values() {
        if svc.endpoint_mode != EndpointMode::Vip {
            continue;
        }
        let tasks = serving_tasks(state, &svc.name, statuses, health);
        for (net_name, vip) in &svc.vips {
            let Some(net) = state.networks.get(net_name) else {
                continue;
            };
            let backends = tasks
                .iter()
                .flat_map(|t| t.attachments.iter().filter(|a| &a.network == net_name))
                .map(|a| (a.address, a.mac))
                .collect();
            out.push(VipView {
                service: svc.name.clone(),
                vni: net.vni,
                ip: *vip,
                backends,
                idle_secs: svc.lb_idle_timeout,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::state::{Availability, Network, Node, Role, Service};
    use protocol::types::NetworkName;

    fn status(state: TaskState) -> TaskStatus {
        TaskStatus {
            state,
            error: None,
            pid: None,
            restarts: 0,
            since: 0,
            health: None,
        }
    }

    #[test]
    fn backends_are_running_tasks_on_live_nodes_in_slot_order() {
        let mut s = ClusterState::default();
        for n in ["n1", "n2"] {
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
                    control_addr: None,
                },
            );
        }
        let net = NetworkName::new("a").unwrap();
        s.networks.insert(
            net.clone(),
            Network {
                id: "a".into(),
                name: net.clone(),
                driver: "overlay".into(),
                subnet: "10.0.0.0/24".parse().unwrap(),
                gateway: "10.0.0.1".parse().unwrap(),
                vni: Vni::new(4097).unwrap(),
                options: Default::default(),
                created_at: 0,
                vteps: vec![],
                ingress: false,
                lb_endpoints: Default::default(),
                docker_nodes: Default::default(),
            },
        );
        let svc = ServiceName::new("web").unwrap();
        s.services.insert(
            svc.clone(),
            Service {
                id: "s".into(),
                name: svc.clone(),
                networks: vec![net.clone()],
                replicas: 3,
                command: vec!["x".into()],
                env: vec![],
                created_at: 0,
                updated_at: 0,
                endpoint_mode: EndpointMode::Vip,
                vips: [(net.clone(), "10.0.0.2".parse().unwrap())].into(),
                aliases: Default::default(),
                lb_idle_timeout: Some(10),
                ports: vec![],
                healthcheck: None,
                stop_grace_period_s: None,
                deploy: Default::default(),
            },
        );
        let mut statuses = BTreeMap::new();
        for (slot, node, st) in [
            (3, "n1", TaskState::Running),
            (1, "n1", TaskState::Running),
            (2, "n2", TaskState::Running),
            (4, "n1", TaskState::Failed),
        ] {
            let ip: Ipv4Addr = format!("10.0.0.{}", 2 + slot).parse().unwrap();
            let name = format!("web.{slot}");
            s.tasks.insert(
                name.clone(),
                Task {
                    id: format!("id{slot}"),
                    name: name.clone(),
                    service: svc.clone(),
                    slot,
                    node: NodeName::new(node).unwrap(),
                    attachments: vec![protocol::state::Attachment {
                        network: net.clone(),
                        address: ip,
                        mac: MacAddr::from_ipv4(ip),
                    }],
                    spec: Default::default(),
                },
            );
            statuses.insert(name, (format!("id{slot}"), status(st)));
        }
        let mut health = BTreeMap::new();
        let v = vips(&s, &statuses, &health);
        let ips: Vec<String> = v[0].backends.iter().map(|b| b.0.to_string()).collect();
        assert_eq!(ips, ["10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        assert_eq!(v[0].idle_secs, Some(10));
        health.insert(NodeName::new("n2").unwrap(), NodeHealth::Down);
        let v = vips(&s, &statuses, &health);
        let ips: Vec<String> = v[0].backends.iter().map(|b| b.0.to_string()).collect();
        assert_eq!(ips, ["10.0.0.3", "10.0.0.5"], "n2 is down");
        // A status reported for an older task id does not count.
        statuses.insert("web.1".into(), ("old".into(), status(TaskState::Running)));
        assert_eq!(vips(&s, &statuses, &health)[0].backends.len(), 1);
    }
}
