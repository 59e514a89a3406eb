//! Nodes: the cluster's members, with their role, underlay address and availability.
//!
//! A node joins, or rejoins under its name with a new address, through `upsert_node`, which
//! also gives it its router's address on the ingress network (`ingress.rs`). Draining a node
//! moves its tasks to others with the same spread placement as scaling (`task.rs`), the old
//! ones to the history (`history.rs`). A node that is lost rather than drained is handled in
//! `reschedule.rs`; `remove_node` takes one out of the cluster.

use super::{ClusterState, StateError};
use crate::types::{NodeName, ServiceName};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};

/// Whether a node takes tasks, as Docker's `node update --availability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Drain,
}

/// Whether a node is a manager or a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

/// A member of the cluster.
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
    /// Where this node serves the control endpoint, as a manager candidate says in its
    /// `Hello` (absent for a worker, and in state saved before version 5). Written even when
    /// absent: snapshots carry the state in postcard, which has no field names, so a skipped
    /// field would shift every byte after it.
    #[serde(default)]
    pub control_addr: Option<SocketAddr>,
}

fn default_data_port() -> u16 {
    crate::vxlan::UDP_PORT
}

impl ClusterState {
    /// Adds a node, or refreshes the addresses of a node that rejoins under its own name: its
    /// underlay address, and its control address when the new entry has one. Only a manager
    /// candidate's `Hello` knows that one (a join, or a manager recording itself at start,
    /// does not), and an address left behind by a demoted node is harmless: only managers'
    /// are used.
    pub fn upsert_node(&mut self, node: Node) {
        match self.nodes.get_mut(&node.name) {
            Some(n) => {
                let control_addr = node.control_addr.or(n.control_addr);
                if n.advertise_addr == node.advertise_addr && n.control_addr == control_addr {
                    return;
                }
                n.advertise_addr = node.advertise_addr;
                n.control_addr = control_addr;
            }
            None => {
                self.nodes.insert(node.name.clone(), node);
            }
        }
        self.revision += 1;
        // A node without a router address on ingress publishes nothing; a /16 is not full.
        let _ = self.ensure_lb_endpoints();
    }

    /// Sets a node's availability; draining records `ended_at` 0 (not known): prefer
    /// [`ClusterState::set_availability_at`].
    pub fn set_availability(
        &mut self,
        node: &str,
        availability: Availability,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        self.set_availability_at(node, availability, 0, new_id, eligible)
    }

    /// Sets a node's availability at `now` (unix seconds). Draining moves every task on it
    /// to other eligible active nodes, as `docker node update --availability drain` does:
    /// the old task goes to the history ("node drained"), keeping its addresses until the
    /// node reports it stopped, and its slot gets a new task (new id, new addresses). It is
    /// refused, changing nothing, if a task has nowhere to go. A global service's task
    /// leaves the drained node and is not replaced; setting a node active gives it its
    /// global services' tasks (`global.rs`).
    pub fn set_availability_at(
        &mut self,
        node: &str,
        availability: Availability,
        now: u64,
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
            let moving: Vec<(ServiceName, u32, String)> = next
                .tasks_on(&name)
                .map(|t| (t.service.clone(), t.slot, t.name.clone()))
                .collect();
            for (_, _, task) in &moving {
                next.retire(task, "node drained", now);
            }
            // A global service's task leaves with its node and goes nowhere else.
            for (service, slot, _) in &moving {
                if !next.is_global(service) {
                    next.place_missing(service, [*slot], new_id, eligible, true)?;
                }
            }
            next.prune_history();
        } else {
            // Active (again): the node takes its global services' tasks, if it is ready;
            // otherwise the healing tick places them once it is.
            let globals: Vec<ServiceName> = next
                .services
                .values()
                .filter(|s| s.mode == super::ServiceMode::Global)
                .map(|s| s.name.clone())
                .collect();
            let here = |n: &NodeName| n == &name && eligible(n);
            for service in &globals {
                next.place_global(service, new_id, &here, false)?;
            }
        }
        next.revision += 1;
        *self = next;
        Ok(())
    }

    /// Removes a node from the cluster (`docker node rm`). Refused while tasks or
    /// containers' endpoints are placed on it, unless `force`: then its tasks go to the
    /// history (released, "node NAME removed": the node is gone) leaving their slots empty
    /// for [`ClusterState::fill_slots`], and its endpoints are dropped. Its past tasks are
    /// released, so their addresses are free again; its router address on the ingress
    /// network and its Docker bookkeeping go too.
    pub fn remove_node(&mut self, node: &str, force: bool, now: u64) -> Result<Node, StateError> {
        let mut next = self.clone();
        let removed = next
            .nodes
            .remove(node)
            .ok_or_else(|| StateError::NoSuchNode(node.to_string()))?;
        let tasks: Vec<String> = next
            .tasks_on(&removed.name)
            .map(|t| t.name.clone())
            .collect();
        let endpoints: Vec<String> = next
            .endpoints
            .iter()
            .filter(|(_, e)| e.node == removed.name)
            .map(|(k, _)| k.clone())
            .collect();
        let in_use = !tasks.is_empty() || !endpoints.is_empty();
        if in_use && !force {
            let mut users = Vec::new();
            if !tasks.is_empty() {
                users.push(format!("task(s) {}", tasks.join(", ")));
            }
            if !endpoints.is_empty() {
                users.push(format!("container endpoint(s) {}", endpoints.join(", ")));
            }
            return Err(StateError::NodeInUse {
                node: removed.name,
                users: users.join(" and "),
            });
        }
        let reason = format!("node {} removed", removed.name);
        for task in &tasks {
            next.retire(task, &reason, now);
        }
        for key in &endpoints {
            next.endpoints.remove(key);
        }
        next.release_node(node);
        for net in next.networks.values_mut() {
            net.lb_endpoints.remove(&removed.name);
            net.docker_nodes.remove(&removed.name);
        }
        next.prune_history();
        next.revision += 1;
        *self = next;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};
    use crate::state::{EndpointRequest, Task};

    fn add_worker(s: &mut ClusterState, name: &str) -> NodeName {
        let name = NodeName::new(name).unwrap();
        s.upsert_node(Node {
            name: name.clone(),
            role: Role::Worker,
            availability: Availability::Active,
            advertise_addr: Some(Ipv4Addr::new(192, 168, 0, 2)),
            data_port: 4789,
            joined_at: 0,
            control_addr: None,
        });
        name
    }

    #[test]
    fn a_rejoining_node_refreshes_its_addresses_and_keeps_a_known_control_address() {
        let mut s = state();
        let n2 = add_worker(&mut s, "n2");
        let rev = s.revision;
        let control: SocketAddr = "192.168.0.2:2377".parse().unwrap();
        let entry = |ip: [u8; 4], control_addr| Node {
            name: n2.clone(),
            role: Role::Worker,
            availability: Availability::Drain,
            advertise_addr: Some(ip.into()),
            data_port: 4789,
            joined_at: 9,
            control_addr,
        };
        // The same addresses: nothing changes, not even the revision.
        s.upsert_node(entry([192, 168, 0, 2], None));
        assert_eq!(s.revision, rev);
        s.upsert_node(entry([192, 168, 0, 2], Some(control)));
        assert_eq!(
            (s.revision, s.nodes[&n2].control_addr),
            (rev + 1, Some(control))
        );
        // A new underlay address; an entry without a control address keeps the known one.
        s.upsert_node(entry([192, 168, 0, 7], None));
        let n = &s.nodes[&n2];
        assert_eq!(n.advertise_addr, Some(Ipv4Addr::new(192, 168, 0, 7)));
        assert_eq!(n.control_addr, Some(control));
        // The rest of the entry is the state's, not the newcomer's.
        assert_eq!((n.availability, n.joined_at), (Availability::Active, 0));
        assert_eq!(s.revision, rev + 2);
    }

    #[test]
    fn a_node_saved_before_control_addresses_loads() {
        let old = r#"{"name": "n1", "role": "manager", "availability": "active",
                      "advertise_addr": "198.18.0.1", "data_port": 4789, "joined_at": 0}"#;
        let n: Node = serde_json::from_str(old).unwrap();
        assert_eq!(n.control_addr, None);
        let json = serde_json::to_string(&Node {
            control_addr: Some("198.18.0.1:2377".parse().unwrap()),
            ..n
        })
        .unwrap();
        assert!(
            json.contains(r#""control_addr":"198.18.0.1:2377""#),
            "{json}"
        );
    }

    #[test]
    fn removing_a_node_refuses_while_in_use_unless_forced() {
        let mut s = state();
        s.ensure_ingress("ing".into(), 0).unwrap();
        let n2 = add_worker(&mut s, "n2");
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 4), &mut id, &|_| true)
            .unwrap();
        s.add_endpoint(EndpointRequest {
            container: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/c1".into(),
            network: "a".into(),
            node: n2.clone(),
            runtime: "cni".into(),
            address: None,
        })
        .unwrap();
        // A task scaled down earlier, still unreleased on n2.
        s.scale_service_at("web", 3, 10, &mut id, &|_| true)
            .unwrap();
        let earlier = s.history.values().next().unwrap().task.clone();
        assert_eq!(earlier.node, n2);
        let before = s.clone();
        let err = s.remove_node("n2", false, 20).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node n2 still holds task(s) web.2 and container endpoint(s) c1/eth0: \
             drain it first, or force its removal"
        );
        assert_eq!(s, before);
        // Forced: its task goes to the history released, its slot empty until filled; its
        // endpoint, its ingress address and its past tasks' reservations go.
        let on_n2 = s.tasks_on(&n2).next().unwrap().clone();
        let removed = s.remove_node("n2", true, 20).unwrap();
        assert_eq!(removed.name, n2);
        assert!(!s.nodes.contains_key(&n2));
        assert!(s.endpoints.is_empty());
        assert!(!s.ingress_network().unwrap().lb_endpoints.contains_key(&n2));
        let p = &s.history[&on_n2.id];
        assert_eq!((p.reason.as_str(), p.released), ("node n2 removed", true));
        assert!(s.history[&earlier.id].released);
        assert!(s.unreleased_tasks().next().is_none());
        assert_eq!(s.missing_slots().len(), 1);
        assert_eq!(s.fill_slots(&mut id, &|_| true), [on_n2.name.as_str()]);
        assert_eq!(s.tasks[&on_n2.name].node.as_str(), "n1");
        // Without tasks, no force is needed.
        add_worker(&mut s, "n3");
        s.remove_node("n3", false, 30).unwrap();
        assert!(matches!(
            s.remove_node("n3", false, 30),
            Err(StateError::NoSuchNode(_))
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
                control_addr: None,
            },
        );
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 4), &mut id, &|_| true)
            .unwrap();
        let drained: Vec<Task> = s.tasks_on(&n2).cloned().collect();
        assert_eq!(drained.len(), 2);
        s.set_availability_at("n2", Availability::Drain, 70, &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.tasks_on(&n2).count(), 0);
        assert_eq!(s.tasks.len(), 4);
        // The drained tasks are in the history, their addresses held until n2 reports.
        let used = s.used_addresses(&"a".parse().unwrap());
        for old in &drained {
            let p = &s.history[&old.id];
            assert_eq!(
                (p.reason.as_str(), p.ended_at, p.released),
                ("node drained", 70, false)
            );
            assert!(used.contains(&old.attachments[0].address));
            assert_ne!(s.tasks[&old.name].attachments, old.attachments);
        }
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
}
