//! Tasks: a service's replicas, one per slot, each with an address on every network of its
//! service, spread over the eligible active nodes.
//!
//! `place_missing` is where tasks are made: scaling (and so creating a service), draining a
//! node (`node.rs`), attaching to or detaching from the ingress network (`ports.rs`) and
//! rescheduling a lost node's tasks (`reschedule.rs`) all go through it. Tasks that leave
//! go to the history (`history.rs`), never straight away.

use super::{Availability, ClusterState, ServiceMode, StateError, TaskSpec, MAX_REPLICAS};
use crate::types::{MacAddr, NetworkName, NodeName, ServiceName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// One endpoint of a task on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: NetworkName,
    pub address: Ipv4Addr,
    pub mac: MacAddr,
}

/// The name of a service's task in `slot`: `<service>.<slot>`, the same for every task
/// that ever fills the slot, but for a start-first replacement placed while the slot's old
/// task holds that name (see [`successor_name`]).
pub fn task_name(service: &ServiceName, slot: u32) -> String {
    format!("{service}.{slot}")
}

/// The name of a task placed in `slot` while another task of the slot holds
/// [`task_name`] (a start-first update): `<service>.<slot>.<id>`, Docker's container name.
/// It keeps this name for its life; the slot's next task takes `<service>.<slot>` again.
pub fn successor_name(service: &ServiceName, slot: u32, id: &str) -> String {
    format!("{service}.{slot}.{id}")
}

/// One replica of a service, placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    /// `<service>.<slot>` (or, for a start-first replacement, `<service>.<slot>.<id>`),
    /// unique in the cluster: the key of `ClusterState::tasks`.
    pub name: String,
    pub service: ServiceName,
    pub slot: u32,
    pub node: NodeName,
    pub attachments: Vec<Attachment>,
    /// What it runs (its service's spec when it was made; empty in state saved before tasks
    /// carried it: [`ClusterState::ensure_task_specs`] fills it).
    #[serde(default)]
    pub spec: TaskSpec,
}

impl ClusterState {
    /// Gives tasks saved before tasks carried their spec their service's; says whether it
    /// changed anything.
    pub fn ensure_task_specs(&mut self) -> bool {
        let mut changed = false;
        for task in self.tasks.values_mut() {
            if task.spec.command.is_empty() && task.spec.image.is_none() {
                if let Some(svc) = self.services.get(&task.service) {
                    task.spec = svc.task_spec();
                    changed = true;
                }
            }
        }
        if changed {
            self.revision += 1;
        }
        changed
    }

    /// Sets a service's replica count, adding or removing tasks (highest slots go first).
    /// Removed tasks go to the history (`history.rs`) with `ended_at` 0 (not known): prefer
    /// [`ClusterState::scale_service_at`].
    pub fn scale_service(
        &mut self,
        name: &str,
        replicas: u32,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        self.scale_service_at(name, replicas, 0, new_id, eligible)
    }

    /// Sets a service's replica count at `now` (unix seconds). Tasks above the new count go
    /// to the history ("scaled down"), their addresses reserved until their node reports
    /// them stopped. New slots go to active nodes that `eligible` accepts, and must all find
    /// a node and addresses or the request is refused, changing nothing; a slot the service
    /// already ran short of (its node lost with nowhere to go) is filled if it can be.
    pub fn scale_service_at(
        &mut self,
        name: &str,
        replicas: u32,
        now: u64,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        if replicas > MAX_REPLICAS {
            return Err(StateError::TooManyReplicas(replicas));
        }
        if self
            .services
            .get(name)
            .is_some_and(|s| s.mode == ServiceMode::Global)
        {
            return Err(StateError::NotReplicated("scale"));
        }
        let svc = self
            .services
            .get(name)
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))?
            .clone();
        let mut next = self.clone();
        let gone: Vec<String> = next
            .tasks
            .values()
            .filter(|t| t.service == svc.name && t.slot > replicas)
            .map(|t| t.name.clone())
            .collect();
        for task in gone.iter().rev() {
            next.retire(task, "scaled down", now);
        }
        let kept = svc.replicas.min(replicas);
        next.place_missing(&svc.name, 1..=kept, new_id, eligible, false)?;
        next.place_missing(&svc.name, kept + 1..=replicas, new_id, eligible, true)?;
        if let Some(s) = next.services.get_mut(name) {
            s.replicas = replicas;
        }
        next.prune_history();
        next.revision += 1;
        *self = next;
        Ok(())
    }

    /// Places the slots among `slots` of `service` that have no task, in order. A slot that
    /// cannot be placed (no eligible node, a full network) refuses the whole if `required`
    /// (the caller drops its scratch copy), and is left empty otherwise. Returns the names of
    /// the tasks placed.
    pub(super) fn place_missing(
        &mut self,
        service: &ServiceName,
        slots: impl IntoIterator<Item = u32>,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
        required: bool,
    ) -> Result<Vec<String>, StateError> {
        let mut placed = Vec::new();
        for slot in slots {
            if self.slot_filled(service, slot) {
                continue;
            }
            match self.place_slot(service, slot, new_id, eligible) {
                Ok(name) => placed.push(name),
                Err(e) if required => return Err(e),
                Err(_) => {}
            }
        }
        Ok(placed)
    }

    /// Whether `slot` of `service` has a task (under either of its names).
    pub fn slot_filled(&self, service: &ServiceName, slot: u32) -> bool {
        let prefix = format!("{}.", task_name(service, slot));
        self.tasks.contains_key(&task_name(service, slot))
            || self
                .tasks
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .any(|(_, t)| &t.service == service && t.slot == slot)
    }

    /// The tasks of `slot` of `service` (two while a start-first update replaces it).
    pub fn slot_tasks<'a>(
        &'a self,
        service: &'a ServiceName,
        slot: u32,
    ) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks
            .values()
            .filter(move |t| &t.service == service && t.slot == slot)
    }

    /// Makes a task for one slot: a node by spread placement, an address on each of the
    /// service's networks, the slot's name (or, if a task of the slot holds it, a
    /// successor's name). Changes nothing if it fails.
    pub(super) fn place_slot(
        &mut self,
        service: &ServiceName,
        slot: u32,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<String, StateError> {
        let svc = self
            .services
            .get(service)
            .ok_or_else(|| StateError::NoSuchService(service.to_string()))?;
        let (networks, spec) = (svc.networks.clone(), svc.task_spec());
        let node = self.place(service, slot, eligible)?;
        let mut attachments = Vec::new();
        for net_name in &networks {
            let address = self.free_address(net_name)?;
            attachments.push(Attachment {
                network: net_name.clone(),
                address,
                mac: MacAddr::from_ipv4(address),
            });
        }
        // Inserted before the next slot is placed, so its addresses count as used.
        let id = new_id();
        let mut name = task_name(service, slot);
        if self.tasks.contains_key(&name) {
            name = successor_name(service, slot, &id);
        }
        self.tasks.insert(
            name.clone(),
            Task {
                id,
                name: name.clone(),
                service: service.clone(),
                slot,
                node,
                attachments,
                spec,
            },
        );
        Ok(name)
    }

    /// Spread placement: the eligible active node with the fewest tasks of this service, then
    /// the fewest tasks overall, then by name (deterministic). A global service's slot goes
    /// to its own node, if that is eligible and active (`global.rs`).
    fn place(
        &self,
        service: &ServiceName,
        slot: u32,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<NodeName, StateError> {
        if self.is_global(service) {
            return self
                .slot_node(service, slot)
                .filter(|n| {
                    eligible(n)
                        && self
                            .nodes
                            .get(*n)
                            .is_some_and(|n| n.availability == Availability::Active)
                })
                .cloned()
                .ok_or(StateError::NoActiveNode);
        }
        let load = self.load_by_node(service);
        self.nodes
            .values()
            .filter(|n| n.availability == Availability::Active && eligible(&n.name))
            .min_by_key(|n| (load.get(&n.name).copied().unwrap_or_default(), &n.name))
            .map(|n| n.name.clone())
            .ok_or(StateError::NoActiveNode)
    }

    /// Per node, (its tasks of `service`, all its tasks): one walk of the tasks, not one
    /// per node (at 10 000 tasks over 50 nodes, a million comparisons per task placed).
    fn load_by_node(&self, service: &ServiceName) -> BTreeMap<&NodeName, (usize, usize)> {
        let mut load: BTreeMap<&NodeName, (usize, usize)> = BTreeMap::new();
        for t in self.tasks.values() {
            let (mine, all) = load.entry(&t.node).or_default();
            *mine += usize::from(&t.service == service);
            *all += 1;
        }
        load
    }

    /// Tasks placed on `node`.
    pub fn tasks_on<'a>(&'a self, node: &'a NodeName) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks.values().filter(move |t| &t.node == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};
    use crate::state::{Node, Role};

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
        // The scaled-down tasks may still run: their addresses stay reserved (`history.rs`).
        s.scale_service("web", 2, &mut id, &|_| true).unwrap();
        assert_eq!(
            s.tasks["web.2"].attachments[0].address.to_string(),
            "10.0.2.6"
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
                    control_addr: None,
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
}
