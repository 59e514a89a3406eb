//! Global services: one task on every eligible node, as Docker's `--mode global`.
//!
//! A global service has no replica count: its tasks follow the nodes. A node that is active
//! (and ready, as the caller's `eligible` says) and holds no task of the service gets one
//! ([`ClusterState::place_global`]): at creation, when the node is set active again
//! (`node.rs`), and on the manager's healing tick for a node that joined or became ready
//! ([`ClusterState::fill_slots`]). A drained or removed node's task goes to the history as
//! any task does and is not placed elsewhere; a node that is merely down keeps its task (the
//! rescheduling of lost nodes, `reschedule.rs`, skips global services) until it comes back.
//!
//! Slots: the rest of the state (rollouts, `service ps`, the history) knows a task by
//! service and slot, and names it `SERVICE.SLOT`. A global service gives each node a slot
//! the first time it places a task there and remembers it in [`Service::node_slots`] for the
//! service's life, so a node's task keeps its name across drains, updates and rejoins, and
//! names stay unique (Swarm names them `SERVICE.NODE-ID`; a slot number keeps the `u32`
//! slot every other part of the state relies on). A slot's task is always placed on its own
//! node, so a rolling update replaces the tasks node by node through the same
//! `place_slot`. The service's `replicas` is its highest slot, so the filters written for
//! replicated services (`slot <= replicas`) hold.

use super::{Availability, ClusterState, ServiceMode, StateError};
use crate::types::{NodeName, ServiceName};

impl ClusterState {
    /// Whether `service` is global.
    pub fn is_global(&self, service: &ServiceName) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| s.mode == ServiceMode::Global)
    }

    /// The node a global service's `slot` belongs to.
    pub(super) fn slot_node(&self, service: &ServiceName, slot: u32) -> Option<&NodeName> {
        self.services
            .get(service)?
            .node_slots
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(n, _)| n)
    }

    /// The active nodes that `eligible` accepts and that hold no task of a global service,
    /// by service: where [`ClusterState::place_global`] would put a task.
    pub fn global_gaps(
        &self,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Vec<(ServiceName, NodeName)> {
        let mut gaps = Vec::new();
        for svc in self.services.values() {
            if svc.mode != ServiceMode::Global {
                continue;
            }
            for node in self.nodes.values() {
                if node.availability == Availability::Active
                    && eligible(&node.name)
                    && !self.tasks_on(&node.name).any(|t| t.service == svc.name)
                {
                    gaps.push((svc.name.clone(), node.name.clone()));
                }
            }
        }
        gaps
    }

    /// Places a task of global `service` on every active node that `eligible` accepts and
    /// that has none. A node that cannot take it (a full network) refuses the whole if
    /// `required` (creation: the caller drops its scratch copy) and is skipped otherwise.
    /// Returns the names of the tasks placed. The caller moves the revision.
    pub(super) fn place_global(
        &mut self,
        service: &ServiceName,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
        required: bool,
    ) -> Result<Vec<String>, StateError> {
        let nodes: Vec<NodeName> = self
            .global_gaps(eligible)
            .into_iter()
            .filter(|(s, _)| s == service)
            .map(|(_, n)| n)
            .collect();
        let mut placed = Vec::new();
        for node in nodes {
            match self.place_on_node(service, &node, new_id) {
                Ok(name) => placed.push(name),
                Err(e) if required => return Err(e),
                Err(_) => {}
            }
        }
        Ok(placed)
    }

    /// Places global `service`'s task on `node` in the node's slot, giving the node the
    /// next slot if it never had one. Changes nothing if it fails.
    fn place_on_node(
        &mut self,
        service: &ServiceName,
        node: &NodeName,
        new_id: &mut dyn FnMut() -> String,
    ) -> Result<String, StateError> {
        let svc = self
            .services
            .get_mut(service)
            .ok_or_else(|| StateError::NoSuchService(service.to_string()))?;
        let known = svc.node_slots.get(node).copied();
        let slot = known.unwrap_or_else(|| svc.node_slots.values().max().map_or(1, |m| m + 1));
        let replicas = svc.replicas;
        svc.node_slots.insert(node.clone(), slot);
        svc.replicas = replicas.max(slot);
        let only = |n: &NodeName| n == node;
        let placed = self.place_slot(service, slot, new_id, &only);
        if placed.is_err() && known.is_none() {
            if let Some(svc) = self.services.get_mut(service) {
                svc.node_slots.remove(node);
                svc.replicas = replicas;
            }
        }
        placed
    }

    /// The tasks a service wants now: its replica count, or for a global service the nodes
    /// that hold its task (a down node's included, as Swarm counts it).
    pub fn desired_tasks(&self, service: &ServiceName) -> u32 {
        match self.services.get(service) {
            Some(s) if s.mode == ServiceMode::Global => {
                let mut nodes: Vec<&NodeName> = self
                    .tasks
                    .values()
                    .filter(|t| &t.service == service)
                    .map(|t| &t.node)
                    .collect();
                nodes.sort();
                nodes.dedup();
                nodes.len() as u32
            }
            Some(s) => s.replicas,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};
    use crate::state::{Node, Role, Service};

    fn add_node(s: &mut ClusterState, name: &str) -> NodeName {
        let name = NodeName::new(name).unwrap();
        s.nodes.insert(
            name.clone(),
            Node {
                name: name.clone(),
                role: Role::Worker,
                availability: Availability::Active,
                advertise_addr: None,
                data_port: 4789,
                joined_at: 0,
                control_addr: None,
            },
        );
        name
    }

    fn global(name: &str) -> Service {
        let mut g = svc(name, &["a"], 0);
        g.mode = ServiceMode::Global;
        g
    }

    /// `(node, task name)` of every task of `web`.
    fn placement(s: &ClusterState) -> Vec<(String, String)> {
        let mut v: Vec<_> = s
            .tasks
            .values()
            .filter(|t| t.service.as_str() == "web")
            .map(|t| (t.node.to_string(), t.name.clone()))
            .collect();
        v.sort();
        v
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn one_task_per_eligible_node_and_a_joining_node_gets_one() {
        let mut s = state();
        add_node(&mut s, "n2");
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        // n2 is not ready: only n1 gets a task; the replica count asked is ignored.
        let mut g = global("web");
        g.replicas = 7;
        s.create_service(g, &mut id, &|n| n.as_str() != "n2")
            .unwrap();
        assert_eq!(placement(&s), pairs(&[("n1", "web.1")]));
        let web = ServiceName::new("web").unwrap();
        assert_eq!(s.desired_tasks(&web), 1);
        // n2 becomes ready, n3 joins: the healing tick places what is missing.
        add_node(&mut s, "n3");
        assert!(s.missing_slots().is_empty(), "global gaps are not slots");
        assert_eq!(s.global_gaps(&|_| true).len(), 2);
        let rev = s.revision;
        assert_eq!(s.fill_slots(&mut id, &|_| true), ["web.2", "web.3"]);
        assert_eq!(s.revision, rev + 1);
        assert_eq!(
            placement(&s),
            pairs(&[("n1", "web.1"), ("n2", "web.2"), ("n3", "web.3")])
        );
        assert!(s.fill_slots(&mut id, &|_| true).is_empty());
        assert_eq!(s.revision, rev + 1, "nothing to place, nothing changes");
        assert_eq!(s.desired_tasks(&web), 3);
        // Scaling means nothing to a global service: Docker's refusal.
        let err = s.scale_service("web", 5, &mut id, &|_| true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scale can only be used with replicated or replicated-job mode"
        );
    }

    #[test]
    fn drain_removes_the_task_without_moving_it_and_activation_brings_it_back() {
        let mut s = state();
        add_node(&mut s, "n2");
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(global("web"), &mut id, &|_| true).unwrap();
        let old = s.tasks["web.2"].clone();
        s.set_availability_at("n2", Availability::Drain, 40, &mut id, &|_| true)
            .unwrap();
        assert_eq!(placement(&s), pairs(&[("n1", "web.1")]));
        let p = &s.history[&old.id];
        assert_eq!((p.reason.as_str(), p.released), ("node drained", false));
        assert!(
            s.global_gaps(&|_| true).is_empty(),
            "a drained node is no gap"
        );
        // Draining every node is allowed: a global service has nowhere else to be.
        s.set_availability_at("n1", Availability::Drain, 41, &mut id, &|_| true)
            .unwrap();
        assert!(placement(&s).is_empty());
        // Back to active: the node's task returns at once, in the node's slot.
        s.set_availability_at("n2", Availability::Active, 50, &mut id, &|_| true)
            .unwrap();
        assert_eq!(placement(&s), pairs(&[("n2", "web.2")]));
        assert_ne!(s.tasks["web.2"].id, old.id);
        // Activated while not ready: the healing tick places it once it is.
        s.set_availability_at("n1", Availability::Active, 51, &mut id, &|n| {
            n.as_str() != "n1"
        })
        .unwrap();
        assert_eq!(placement(&s), pairs(&[("n2", "web.2")]));
        assert_eq!(s.fill_slots(&mut id, &|_| true), ["web.1"]);
    }

    #[test]
    fn a_down_node_keeps_its_task_and_a_removed_one_loses_it() {
        let mut s = state();
        let n2 = add_node(&mut s, "n2");
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(global("web"), &mut id, &|_| true).unwrap();
        // A replicated service beside it, so n2 has something to reschedule.
        s.create_service(svc("api", &["a"], 2), &mut id, &|_| true)
            .unwrap();
        let down = [(n2.clone(), 0)].into_iter().collect();
        assert_eq!(s.nodes_to_reschedule(&down, 100, 10), [n2]);
        let up = |n: &NodeName| n.as_str() != "n2";
        s.reschedule_node("n2", "node n2 down", 100, &mut id, &up)
            .unwrap();
        // The global task stays on n2 (nothing elsewhere); api's moved to n1.
        assert_eq!(placement(&s), pairs(&[("n1", "web.1"), ("n2", "web.2")]));
        assert!(s
            .tasks
            .values()
            .all(|t| t.service.as_str() == "web" || t.node.as_str() == "n1"));
        // Only global tasks left on n2: it is no longer due, every tick.
        assert!(s.nodes_to_reschedule(&down, 200, 10).is_empty());
        assert!(s.global_gaps(&up).is_empty());
        // Removed: its task goes, nothing replaces it, and the slot is no empty slot.
        let on_n2 = s.tasks["web.2"].clone();
        s.remove_node("n2", true, 300).unwrap();
        assert_eq!(placement(&s), pairs(&[("n1", "web.1")]));
        assert!(s.history[&on_n2.id].released);
        assert!(s.missing_slots().is_empty());
        assert!(s.fill_slots(&mut id, &|_| true).is_empty());
        // Rejoining under its name, it gets its slot back.
        add_node(&mut s, "n2");
        assert_eq!(s.fill_slots(&mut id, &|_| true), ["web.2"]);
        // A new node takes the next slot, never a used one.
        add_node(&mut s, "n0");
        assert_eq!(s.fill_slots(&mut id, &|_| true), ["web.3"]);
        assert_eq!(s.tasks["web.3"].node.as_str(), "n0");
    }

    #[test]
    fn an_update_replaces_each_nodes_task_on_its_node() {
        let mut s = state();
        add_node(&mut s, "n2");
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(global("web"), &mut id, &|_| true).unwrap();
        let mut spec = s.services["web"].spec(&s);
        spec.env = vec!["V=2".into()];
        s.update_service("web", spec.clone(), 1000, &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.outdated_slots("web").len(), 2);
        let rollout = s.services["web"].deploy.rollout.clone().unwrap();
        assert_eq!(rollout.slots.keys().copied().collect::<Vec<_>>(), [1, 2]);
        // What the rollout does to a slot (stop-first): out, and a new task on its node,
        // under its name; a slot whose node is not ready waits.
        s.retire("web.2", "task updated", 1);
        let web = ServiceName::new("web").unwrap();
        assert!(matches!(
            s.place_slot(&web, 2, &mut id, &|n| n.as_str() != "n2"),
            Err(StateError::NoActiveNode)
        ));
        assert_eq!(s.place_slot(&web, 2, &mut id, &|_| true).unwrap(), "web.2");
        assert_eq!(s.tasks["web.2"].node.as_str(), "n2");
        assert_eq!(s.tasks["web.2"].spec.env, ["V=2"]);
        // The replica count cannot be set on a global service.
        spec.replicas = 9;
        let err = s
            .update_service("web", spec, 2000, &mut id, &|_| true)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "replicas can only be used with replicated or replicated-job mode"
        );
    }

    #[test]
    fn services_saved_before_modes_load_as_replicated() {
        let mut v = serde_json::to_value(svc("web", &["a"], 2)).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("mode");
        o.remove("node_slots");
        let back: Service = serde_json::from_value(v).unwrap();
        assert_eq!(back.mode, ServiceMode::Replicated);
        assert!(back.node_slots.is_empty());
    }
}
