//! What the load balancer needs to know about services, taken from the desired state and
//! what nodes report: every VIP and, for each, the service's tasks that can take traffic
//! right now (running, healthy if they have a health check, on a node that is not down), in
//! slot order so that round robin goes through them in a stable order on every node; and the
//! tasks on their way out, whose open flows must go on while they finish (see
//! [`draining_tasks`]).

use crate::task::leaving_key;
use protocol::api::{TaskHealth, TaskState, TaskStatus};
use protocol::control::NodeHealth;
use protocol::state::{ClusterState, EndpointMode, Service, Task};
use protocol::types::{MacAddr, NetworkName, NodeName, ServiceName, Vni};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// What nodes report about their tasks: task name → (task id, status).
pub type Statuses = BTreeMap<String, (String, TaskStatus)>;

/// One VIP and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipView {
    pub service: ServiceName,
    /// The service's id: a service created again under the same name is another one.
    pub service_id: String,
    pub vni: Vni,
    pub ip: Ipv4Addr,
    /// Address and MAC of each backend on the VIP's network.
    pub backends: Vec<(Ipv4Addr, MacAddr)>,
    /// Tasks that left the rotation but may still hold flows ([`draining_tasks`]): no new
    /// flow goes to them, the ones they have go on.
    pub draining: Vec<(Ipv4Addr, MacAddr)>,
    /// The service's `--lb-idle-timeout`, if it set one.
    pub idle_secs: Option<u64>,
}

/// The status `task`'s node reported for it, if it was about this very task (its id).
fn status_of<'a>(task: &Task, statuses: &'a Statuses) -> Option<&'a TaskStatus> {
    match statuses.get(&task.name) {
        Some((id, st)) if *id == task.id => Some(st),
        _ => None,
    }
}

/// Whether `task` can take traffic: its node reported it running (under its current id) and,
/// if it has a health check, healthy; and that node is not down. A task with a health check
/// takes no traffic before its first passing check.
pub fn is_serving(
    task: &Task,
    statuses: &Statuses,
    health: &BTreeMap<NodeName, NodeHealth>,
) -> bool {
    let Some(st) = status_of(task, statuses) else {
        return false;
    };
    let ready = task.spec.healthcheck.is_none() || st.health == Some(TaskHealth::Healthy);
    st.state == TaskState::Running && ready && health.get(&task.node) != Some(&NodeHealth::Down)
}

/// The tasks of `service` that can take traffic, in slot order (the order round robin
/// follows on every node).
pub fn serving_tasks<'a>(
    state: &'a ClusterState,
    service: &ServiceName,
    statuses: &Statuses,
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

/// Every task on its way out that may still be serving connections, with the id of its
/// service: those that left the desired state (scaled down, replaced, removed with their
/// service, drained away) while their node still holds them (unreleased past tasks: the node
/// drains their connections before it stops them, and reports them until they are gone), and
/// those still in it whose health check failed (their node drains them before it restarts
/// them). Tasks on a node that is down are not: nothing comes back from there.
///
/// A task its node reports as leaving (under its [`leaving_key`]) is on its way out too,
/// though `state` still lists it: the statuses may be newer than the state they are read
/// with (an agent builds its views from the state it last realised, with the latest
/// statuses, and a worker takes both from one snapshot but sees the statuses first), and
/// in between the task is neither serving nor in the history. Without this it would look
/// gone, and its flows and mesh connections would be reset.
pub fn leaving_tasks<'a>(
    state: &'a ClusterState,
    statuses: &'a Statuses,
    health: &'a BTreeMap<NodeName, NodeHealth>,
) -> impl Iterator<Item = (&'a str, &'a Task)> + 'a {
    let past = state
        .unreleased_tasks()
        .map(|p| (p.service_id.as_str(), &p.task));
    let current = state.tasks.values().filter_map(move |t| {
        let leaving = match status_of(t, statuses) {
            Some(st) => st.state == TaskState::Running && st.health == Some(TaskHealth::Unhealthy),
            None => statuses.contains_key(&leaving_key(&t.name, &t.id)),
        };
        let svc = state.services.get(&t.service)?;
        leaving.then_some((svc.id.as_str(), t))
    });
    past.chain(current)
        .filter(move |(_, t)| health.get(&t.node) != Some(&NodeHealth::Down))
}

/// The [`leaving_tasks`] of the service with id `service_id` (named `service`), in slot
/// order: no new flow goes to them, the ones they have go on.
pub fn draining_tasks<'a>(
    state: &'a ClusterState,
    service: &ServiceName,
    service_id: &str,
    statuses: &'a Statuses,
    health: &'a BTreeMap<NodeName, NodeHealth>,
) -> Vec<&'a Task> {
    let mut tasks: Vec<&Task> = leaving_tasks(state, statuses, health)
        .filter(|(id, t)| *id == service_id && &t.service == service)
        .map(|(_, t)| t)
        .collect();
    tasks.sort_by_key(|t| t.slot);
    tasks
}

/// The serving tasks of every service that has any, each in slot order ([`serving_tasks`]
/// for all services at once: one walk of the state's tasks, not one per service, which at
/// 1 000 services of 10 tasks is the difference between 10 000 and 10 000 000 lookups).
pub fn serving_by_service<'a>(
    state: &'a ClusterState,
    statuses: &Statuses,
    health: &BTreeMap<NodeName, NodeHealth>,
) -> BTreeMap<&'a ServiceName, Vec<&'a Task>> {
    let mut by: BTreeMap<&ServiceName, Vec<&Task>> = BTreeMap::new();
    for t in state.tasks.values() {
        if is_serving(t, statuses, health) {
            by.entry(&t.service).or_default().push(t);
        }
    }
    by.values_mut().for_each(|ts| ts.sort_by_key(|t| t.slot));
    by
}

/// The [`leaving_tasks`] of every service, by its id and name, each in slot order
/// ([`draining_tasks`] for all services at once).
fn draining_by_service<'a>(
    state: &'a ClusterState,
    statuses: &'a Statuses,
    health: &'a BTreeMap<NodeName, NodeHealth>,
) -> BTreeMap<(&'a str, &'a ServiceName), Vec<&'a Task>> {
    let mut by: BTreeMap<(&str, &ServiceName), Vec<&Task>> = BTreeMap::new();
    for (id, t) in leaving_tasks(state, statuses, health) {
        by.entry((id, &t.service)).or_default().push(t);
    }
    by.values_mut().for_each(|ts| ts.sort_by_key(|t| t.slot));
    by
}

/// The addresses and MACs of `tasks` on network `net`.
fn on_network(tasks: &[&Task], net: &NetworkName) -> Vec<(Ipv4Addr, MacAddr)> {
    tasks
        .iter()
        .flat_map(|t| t.attachments.iter().filter(|a| &a.network == net))
        .map(|a| (a.address, a.mac))
        .collect()
}

/// Every VIP of the state, with its serving and draining backends.
pub fn vips(
    state: &ClusterState,
    statuses: &Statuses,
    health: &BTreeMap<NodeName, NodeHealth>,
) -> Vec<VipView> {
    let mut out = Vec::new();
    let serving = serving_by_service(state, statuses, health);
    let leaving = draining_by_service(state, statuses, health);
    let none = Vec::new();
    for svc in state.services.values() {
        if svc.endpoint_mode != EndpointMode::Vip {
            continue;
        }
        let tasks = serving.get(&svc.name).unwrap_or(&none);
        let draining = leaving.get(&(svc.id.as_str(), &svc.name)).unwrap_or(&none);
        for (net_name, vip) in &svc.vips {
            let Some(net) = state.networks.get(net_name) else {
                continue;
            };
            out.push(VipView {
                service: svc.name.clone(),
                service_id: svc.id.clone(),
                vni: net.vni,
                ip: *vip,
                backends: on_network(tasks, net_name),
                draining: on_network(draining, net_name),
                idle_secs: svc.lb_idle_timeout,
            });
        }
    }
    out
}

/// The VIPs of services removed since `previous` was built whose tasks are still draining:
/// each keeps its address for the flows it has (no new one: it has no backends) until the
/// last of those tasks is gone. `service rm` gives the address back to the pool at once, so a
/// VIP whose address something else on its network took since is let go.
pub fn retired_vips(
    state: &ClusterState,
    previous: &[VipView],
    statuses: &Statuses,
    health: &BTreeMap<NodeName, NodeHealth>,
) -> Vec<VipView> {
    let live = |v: &VipView| {
        state
            .services
            .get(&v.service)
            .is_some_and(|s: &Service| s.id == v.service_id)
    };
    let gone: Vec<&VipView> = previous.iter().filter(|v| !live(v)).collect();
    if gone.is_empty() {
        // The common case, on every look: no walk of the whole state for nothing.
        return Vec::new();
    }
    let mut taken: BTreeMap<Vni, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for net in state.networks.values() {
        let ips = taken.entry(net.vni).or_default();
        ips.insert(net.gateway);
        let tasks = state
            .tasks
            .values()
            .chain(state.unreleased_tasks().map(|p| &p.task));
        for a in tasks.flat_map(|t| &t.attachments) {
            if a.network == net.name {
                ips.insert(a.address);
            }
        }
        for e in state.endpoints.values().filter(|e| e.network == net.name) {
            ips.insert(e.address);
        }
        for svc in state.services.values() {
            ips.extend(svc.vips.get(&net.name));
        }
        ips.extend(net.lb_endpoints.values());
    }
    let mut out = Vec::new();
    for v in gone {
        if taken.get(&v.vni).is_some_and(|ips| ips.contains(&v.ip)) {
            continue;
        }
        let Some(net) = state.networks.values().find(|n| n.vni == v.vni) else {
            continue;
        };
        let tasks = draining_tasks(state, &v.service, &v.service_id, statuses, health);
        let draining = on_network(&tasks, &net.name);
        if draining.is_empty() {
            continue;
        }
        out.push(VipView {
            backends: Vec::new(),
            draining,
            ..v.clone()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::state::{Availability, HealthCheck, NetworkRequest, Node, Pool, Role};

    fn status(state: TaskState, health: Option<TaskHealth>) -> TaskStatus {
        TaskStatus {
            state,
            error: None,
            pid: None,
            restarts: 0,
            since: 0,
            health,
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    /// Nodes n1 and n2, network `a` (10.0.0.0/24).
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
        let req = NetworkRequest {
            subnet: Some("10.0.0.0/24".parse().unwrap()),
            ..Default::default()
        };
        let net = NetworkName::new("a").unwrap();
        s.create_network(net, req, Pool::default(), "a".into(), 0)
            .unwrap();
        s
    }

    fn service(name: &str, replicas: u32, check: bool) -> Service {
        Service {
            id: format!("svc-{name}"),
            name: ServiceName::new(name).unwrap(),
            networks: vec![NetworkName::new("a").unwrap()],
            replicas,
            command: vec!["x".into()],
            env: vec![],
            created_at: 0,
            updated_at: 0,
            endpoint_mode: EndpointMode::Vip,
            vips: Default::default(),
            aliases: Default::default(),
            lb_idle_timeout: Some(10),
            ports: vec![],
            healthcheck: check.then(|| HealthCheck {
                command: vec!["CMD-SHELL".into(), "true".into()],
                interval_s: 1,
                timeout_s: 1,
                retries: 2,
                start_period_s: 0,
            }),
            stop_grace_period_s: None,
            deploy: Default::default(),
            mode: Default::default(),
            node_slots: Default::default(),
            image: None,
        }
    }

    fn running(s: &ClusterState, health: Option<TaskHealth>) -> Statuses {
        s.tasks
            .values()
            .map(|t| {
                let st = status(TaskState::Running, health);
                (t.name.clone(), (t.id.clone(), st))
            })
            .collect()
    }

    fn ip_of(s: &ClusterState, task: &str) -> Ipv4Addr {
        s.tasks[task].attachments[0].address
    }

    fn ips(v: &[(Ipv4Addr, MacAddr)]) -> Vec<Ipv4Addr> {
        v.iter().map(|b| b.0).collect()
    }

    #[test]
    fn backends_are_running_tasks_on_live_nodes_in_slot_order() {
        let mut s = cluster();
        let mut gen = ids();
        s.create_service(service("web", 4, false), &mut gen, &|_| true)
            .unwrap();
        let mut statuses = running(&s, None);
        statuses.get_mut("web.4").unwrap().1.state = TaskState::Failed;
        let mut health = BTreeMap::new();
        let v = vips(&s, &statuses, &health);
        let want: Vec<Ipv4Addr> = (1..=3).map(|i| ip_of(&s, &format!("web.{i}"))).collect();
        assert_eq!(ips(&v[0].backends), want);
        assert_eq!(v[0].idle_secs, Some(10));
        assert!(v[0].draining.is_empty());
        let n2 = s.tasks["web.2"].node.clone();
        health.insert(n2.clone(), NodeHealth::Down);
        let v = vips(&s, &statuses, &health);
        let up: Vec<Ipv4Addr> = (1..=3)
            .map(|i| format!("web.{i}"))
            .filter(|t| s.tasks[t].node != n2)
            .map(|t| ip_of(&s, &t))
            .collect();
        assert_eq!(
            ips(&v[0].backends),
            up,
            "a node that is down serves nothing"
        );
        // A status reported for an older task id does not count.
        statuses.insert(
            "web.1".into(),
            ("old".into(), status(TaskState::Running, None)),
        );
        assert!(!vips(&s, &statuses, &health)[0]
            .backends
            .iter()
            .any(|b| b.0 == ip_of(&s, "web.1")));
    }

    #[test]
    fn a_task_with_a_health_check_serves_only_while_healthy() {
        let mut s = cluster();
        let mut gen = ids();
        s.create_service(service("web", 1, true), &mut gen, &|_| true)
            .unwrap();
        let web1 = ip_of(&s, "web.1");
        let health = BTreeMap::new();
        let with = |h| vips(&s, &running(&s, h), &health).remove(0);
        // Reported running, not checked yet (an older node, or the first check not done).
        let v = with(None);
        assert!(v.backends.is_empty() && v.draining.is_empty());
        // Starting: its process runs, no check passed yet: no traffic, nothing to drain.
        let v = with(Some(TaskHealth::Starting));
        assert!(v.backends.is_empty() && v.draining.is_empty());
        let v = with(Some(TaskHealth::Healthy));
        assert_eq!((ips(&v.backends), v.draining.len()), (vec![web1], 0));
        // Unhealthy: out of the rotation, its open flows go on while its node drains it.
        let v = with(Some(TaskHealth::Unhealthy));
        assert_eq!((v.backends.len(), ips(&v.draining)), (0, vec![web1]));
        // The same in every view built from is_serving.
        let t = &s.tasks["web.1"];
        assert!(is_serving(
            t,
            &running(&s, Some(TaskHealth::Healthy)),
            &health
        ));
        assert!(!is_serving(
            t,
            &running(&s, Some(TaskHealth::Unhealthy)),
            &health
        ));
        // Failed (its process exited, or was stopped once drained): nothing to drain.
        let mut statuses = running(&s, Some(TaskHealth::Unhealthy));
        statuses.get_mut("web.1").unwrap().1.state = TaskState::Failed;
        let v = vips(&s, &statuses, &health).remove(0);
        assert!(v.backends.is_empty() && v.draining.is_empty());
    }

    #[test]
    fn a_task_scaled_down_drains_until_its_node_lets_it_go() {
        let mut s = cluster();
        let mut gen = ids();
        s.create_service(service("web", 3, false), &mut gen, &|_| true)
            .unwrap();
        let web3 = s.tasks["web.3"].clone();
        let statuses = running(&s, None);
        s.scale_service("web", 2, &mut gen, &|_| true).unwrap();
        let mut health = BTreeMap::new();
        let v = vips(&s, &statuses, &health).remove(0);
        assert_eq!(v.backends.len(), 2);
        assert_eq!(ips(&v.draining), vec![web3.attachments[0].address]);
        // Its node is down: nothing comes back from there.
        health.insert(web3.node.clone(), NodeHealth::Down);
        assert!(vips(&s, &statuses, &health)[0].draining.is_empty());
        health.clear();
        // Its node no longer reports it: gone.
        let others: BTreeSet<String> = BTreeSet::new();
        s.release_stopped(web3.node.as_str(), &others);
        assert!(vips(&s, &statuses, &health)[0].draining.is_empty());
    }

    #[test]
    fn a_task_its_node_drains_is_draining_before_this_node_has_the_state_it_left_in() {
        let mut s = cluster();
        let mut gen = ids();
        s.create_service(service("web", 3, false), &mut gen, &|_| true)
            .unwrap();
        let web3 = s.tasks["web.3"].clone();
        let health = BTreeMap::new();
        // Statuses from after a scale down, read with the state from before it (the
        // agent's): web.3's node reports it under its leaving key. No new flow goes to it,
        // and its flows go on (gone, they would be reset).
        let mut statuses = running(&s, None);
        let reported = statuses.remove("web.3").unwrap();
        let leaving = leaving_key("web.3", &web3.id);
        statuses.insert(leaving.clone(), reported.clone());
        let v = vips(&s, &statuses, &health).remove(0);
        assert_eq!(v.backends.len(), 2);
        assert_eq!(ips(&v.draining), vec![web3.attachments[0].address]);
        // Then the state arrives: draining as a past task, once.
        let mut after = s.clone();
        after.scale_service("web", 2, &mut gen, &|_| true).unwrap();
        let v = vips(&after, &statuses, &health).remove(0);
        assert_eq!(ips(&v.draining), vec![web3.attachments[0].address]);
        // An older task of the slot draining (stop-first) leaves the current one alone.
        let mut statuses = running(&s, None);
        statuses.insert(leaving_key("web.3", "older"), reported);
        let v = vips(&s, &statuses, &health).remove(0);
        assert_eq!((v.backends.len(), v.draining.len()), (3, 0));
        // Torn down (its node reports it no more): gone.
        let mut statuses = running(&s, None);
        statuses.remove("web.3");
        let v = vips(&s, &statuses, &health).remove(0);
        assert_eq!((v.backends.len(), v.draining.len()), (2, 0));
    }

    #[test]
    fn a_removed_service_keeps_its_vip_while_its_tasks_drain() {
        let mut s = cluster();
        let mut gen = ids();
        s.create_service(service("old", 1, false), &mut gen, &|_| true)
            .unwrap();
        let statuses = running(&s, None);
        let health = BTreeMap::new();
        let before = vips(&s, &statuses, &health);
        let task = s.tasks["old.1"].clone();
        s.remove_service("old").unwrap();
        assert!(vips(&s, &statuses, &health).is_empty());
        let retired = retired_vips(&s, &before, &statuses, &health);
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].ip, before[0].ip);
        assert!(retired[0].backends.is_empty(), "no new flows");
        assert_eq!(ips(&retired[0].draining), vec![task.attachments[0].address]);
        // Still retired a look later (it is fed its own output).
        assert_eq!(retired_vips(&s, &retired, &statuses, &health), retired);
        // A new service under the same name is another one; if it takes the address back,
        // the old VIP is let go.
        let mut s2 = s.clone();
        s2.create_service(service("old", 1, false), &mut gen, &|_| true)
            .unwrap();
        let s2_vip = s2.services["old"].vips.values().next().copied();
        let kept = retired_vips(&s2, &before, &statuses, &health);
        assert_eq!(kept.is_empty(), s2_vip == Some(before[0].ip));
        // Once its node reports the task gone, the VIP goes.
        s.release_stopped(task.node.as_str(), &BTreeSet::new());
        assert!(retired_vips(&s, &before, &statuses, &health).is_empty());
    }
}
