//! Rescheduling: a node lost for longer than the grace has its tasks replaced elsewhere.
//!
//! The manager's health tracker knows since when each node is down; on its timer it asks
//! [`ClusterState::nodes_to_reschedule`] which are due and calls
//! [`ClusterState::reschedule_node`] for each. The lost node's tasks go to the history
//! (`history.rs`) unreleased: the node may be cut off rather than dead, so their addresses
//! stay reserved until it comes back and reports them stopped (its agent stops them, since
//! they are no longer in the desired state) or is removed. Each slot gets a new task (new id,
//! new addresses) on another eligible node, or stays empty if there is none; the manager
//! calls [`ClusterState::fill_slots`] when nodes become ready (or periodically) to place
//! what is missing. A node back within the grace is never passed here and keeps its tasks.
//! Global services' tasks are never moved: they wait for their node (`global.rs`).

use super::{ClusterState, StateError};
use crate::types::{NodeName, ServiceName};
use std::collections::BTreeMap;

/// Seconds a node may be down before its tasks are replaced, unless set otherwise
/// (`--reschedule-after`).
pub const DEFAULT_RESCHEDULE_AFTER_S: u64 = 10;

impl ClusterState {
    /// The nodes, among those down since the given unix seconds, that have been down at
    /// least `reschedule_after_s` at `now` and still hold tasks: those due for
    /// [`ClusterState::reschedule_node`]. In name order.
    pub fn nodes_to_reschedule(
        &self,
        down_since: &BTreeMap<NodeName, u64>,
        now: u64,
        reschedule_after_s: u64,
    ) -> Vec<NodeName> {
        down_since
            .iter()
            .filter(|(node, since)| {
                now.saturating_sub(**since) >= reschedule_after_s
                    && self.tasks_on(node).any(|t| !self.is_global(&t.service))
            })
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Replaces every task on `node` (lost: down past the grace) at `now` (unix seconds).
    /// Each goes to the history with `reason` (e.g. "node n3 down"), unreleased, and its
    /// slot gets a new task under the same name, with a new id and new addresses, on an
    /// active node other than `node` that `eligible` accepts. A slot with nowhere to go (no
    /// such node, a network full) stays empty until [`ClusterState::fill_slots`] places it.
    ///
    /// Returns the names of the tasks taken off `node`, in slot order: for each,
    /// `self.tasks.get(name)` is its replacement, or `None` if the slot is empty. Refused,
    /// changing nothing, if there is no such node; a node without tasks changes nothing.
    pub fn reschedule_node(
        &mut self,
        node: &str,
        reason: &str,
        now: u64,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<Vec<String>, StateError> {
        let node = self
            .nodes
            .get(node)
            .map(|n| n.name.clone())
            .ok_or_else(|| StateError::NoSuchNode(node.to_string()))?;
        // A global service's task stays: one per node, it comes back with its node.
        let mut lost: Vec<(ServiceName, u32, String)> = self
            .tasks_on(&node)
            .filter(|t| !self.is_global(&t.service))
            .map(|t| (t.service.clone(), t.slot, t.name.clone()))
            .collect();
        if lost.is_empty() {
            return Ok(Vec::new());
        }
        lost.sort();
        let mut next = self.clone();
        for (_, _, task) in &lost {
            next.retire(task, reason, now);
        }
        let elsewhere = |n: &NodeName| n != &node && eligible(n);
        for (service, slot, _) in &lost {
            next.place_missing(service, [*slot], new_id, &elsewhere, false)?;
        }
        next.prune_history();
        next.revision += 1;
        *self = next;
        Ok(lost.into_iter().map(|(_, _, task)| task).collect())
    }

    /// Places every missing slot of every service (a slot at or below its replica count
    /// with no task: left empty by [`ClusterState::reschedule_node`] or a forced
    /// `remove_node`) on active nodes that `eligible` accepts, as far as nodes and addresses
    /// allow. Returns the names of the tasks placed; the revision moves only if there are
    /// any. For the manager to call when a node becomes ready or active. Global services'
    /// active, eligible nodes without their task get it too (`global.rs`).
    pub fn fill_slots(
        &mut self,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Vec<String> {
        let missing = self.missing_slots();
        let mut globals: Vec<ServiceName> = self
            .global_gaps(eligible)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        globals.dedup();
        if missing.is_empty() && globals.is_empty() {
            return Vec::new();
        }
        // Placement changes nothing when it fails, so it can work on `self` directly.
        let mut placed = Vec::new();
        for (service, slot) in missing {
            if let Ok(names) = self.place_missing(&service, [slot], new_id, eligible, false) {
                placed.extend(names);
            }
        }
        for service in globals {
            if let Ok(names) = self.place_global(&service, new_id, eligible, false) {
                placed.extend(names);
            }
        }
        if !placed.is_empty() {
            self.revision += 1;
        }
        placed
    }

    /// The slots of services that have no task (the service runs short), by service and
    /// slot: what `service ls` counts as missing replicas and `fill_slots` places. Global
    /// services have none: their gaps are nodes ([`ClusterState::global_gaps`]).
    pub fn missing_slots(&self) -> Vec<(ServiceName, u32)> {
        let mut missing = Vec::new();
        for svc in self.services.values() {
            if svc.mode == super::ServiceMode::Global {
                continue;
            }
            for slot in 1..=svc.replicas {
                if !self.slot_filled(&svc.name, slot) {
                    missing.push((svc.name.clone(), slot));
                }
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};
    use crate::state::{Availability, Node, Role};
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

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

    fn addresses(s: &ClusterState) -> BTreeSet<Ipv4Addr> {
        s.tasks.values().map(|t| t.attachments[0].address).collect()
    }

    /// n1, n2, n3 with `web` (6 replicas on network a, 10.0.2.0/24), two tasks on each.
    fn three_nodes() -> ClusterState {
        let mut s = state();
        add_node(&mut s, "n2");
        add_node(&mut s, "n3");
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        s.create_service(svc("web", &["a"], 6), &mut ids(), &|_| true)
            .unwrap();
        s
    }

    #[test]
    fn a_lost_nodes_tasks_are_replaced_with_new_addresses() {
        let mut s = three_nodes();
        let n3 = NodeName::new("n3").unwrap();
        let lost: Vec<_> = s.tasks_on(&n3).cloned().collect();
        assert_eq!(lost.len(), 2);
        let before = addresses(&s);
        let mut id = ids();
        let up = |n: &NodeName| n.as_str() != "n3";
        let moved = s
            .reschedule_node("n3", "node n3 down", 50, &mut id, &up)
            .unwrap();
        assert_eq!(
            moved,
            lost.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
        );
        assert_eq!(s.tasks.len(), 6);
        assert_eq!(s.tasks_on(&n3).count(), 0);
        for old in &lost {
            let new = &s.tasks[&old.name];
            assert_ne!(new.id, old.id);
            assert_ne!(new.node, n3);
            assert!(
                !before.contains(&new.attachments[0].address),
                "a new address"
            );
            let p = &s.history[&old.id];
            assert_eq!(p.task, *old);
            assert_eq!((p.reason.as_str(), p.ended_at), ("node n3 down", 50));
            assert!(!p.released);
        }
        // The old addresses stay taken while n3 may still run the old tasks.
        let used = s.used_addresses(&"a".parse().unwrap());
        assert!(lost
            .iter()
            .all(|t| used.contains(&t.attachments[0].address)));
        // Nothing left on n3: a second call changes nothing.
        let rev = s.revision;
        assert!(s
            .reschedule_node("n3", "node n3 down", 60, &mut id, &up)
            .unwrap()
            .is_empty());
        assert_eq!(s.revision, rev);
        // n3 comes back: its agent stops the superseded tasks, and its report releases them.
        let still: BTreeSet<String> = [lost[0].id.clone()].into();
        assert!(s.release_stopped("n3", &still));
        assert!(!s.history[&lost[0].id].released, "still running: kept");
        assert!(s.history[&lost[1].id].released);
        assert!(s.release_stopped("n3", &BTreeSet::new()));
        // Released, the lowest of them is the next address handed out.
        s.scale_service("web", 7, &mut id, &|_| true).unwrap();
        let lowest = lost.iter().map(|t| t.attachments[0].address).min();
        assert_eq!(Some(s.tasks["web.7"].attachments[0].address), lowest);
        // web ps: slot order, the past tasks under their slots.
        let past: Vec<&str> = s
            .past_tasks("web")
            .iter()
            .map(|p| p.task.name.as_str())
            .collect();
        assert_eq!(past, moved);
    }

    #[test]
    fn a_slot_with_nowhere_to_go_waits_for_fill() {
        let mut s = three_nodes();
        let mut id = ids();
        // n2 and n3 are both lost, n1 is drained (its tasks still there): nowhere to go.
        s.nodes.get_mut("n1").unwrap().availability = Availability::Drain;
        let only_n1 = |n: &NodeName| n.as_str() == "n1";
        let moved = s
            .reschedule_node("n3", "node n3 down", 50, &mut id, &only_n1)
            .unwrap();
        assert_eq!(moved.len(), 2);
        assert!(
            moved.iter().all(|t| !s.tasks.contains_key(t)),
            "slots empty"
        );
        assert_eq!(s.tasks.len(), 4);
        let web = ServiceName::new("web").unwrap();
        let missing = s.missing_slots();
        assert_eq!(missing.len(), 2);
        assert!(missing.iter().all(|(svc, _)| svc == &web));
        // Nothing eligible yet: fill places nothing and changes nothing.
        let rev = s.revision;
        assert!(s.fill_slots(&mut id, &only_n1).is_empty());
        assert_eq!(s.revision, rev);
        // n1 active again: fill places both there.
        s.set_availability("n1", Availability::Active, &mut id, &|_| true)
            .unwrap();
        let placed = s.fill_slots(&mut id, &only_n1);
        assert_eq!(placed, moved);
        assert!(placed.iter().all(|t| s.tasks[t].node.as_str() == "n1"));
        assert!(s.missing_slots().is_empty());
        assert_eq!(s.revision, rev + 2);
    }

    #[test]
    fn rescheduling_an_unknown_node_changes_nothing() {
        let mut s = three_nodes();
        let before = s.clone();
        assert!(matches!(
            s.reschedule_node("n9", "node n9 down", 1, &mut ids(), &|_| true),
            Err(StateError::NoSuchNode(_))
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn scaling_fills_old_empty_slots_only_if_it_can() {
        let mut s = three_nodes();
        let mut id = ids();
        let none = |_: &NodeName| false;
        s.reschedule_node("n3", "node n3 down", 1, &mut id, &none)
            .unwrap();
        assert_eq!(s.missing_slots().len(), 2);
        // Scaling down while short is not refused; new replicas must be placed.
        s.scale_service("web", 5, &mut id, &none).unwrap();
        assert!(matches!(
            s.scale_service("web", 7, &mut id, &none),
            Err(StateError::NoActiveNode)
        ));
        s.scale_service("web", 6, &mut id, &|_| true).unwrap();
        assert!(s.missing_slots().is_empty());
    }

    #[test]
    fn nodes_due_for_rescheduling() {
        let s = three_nodes();
        let node = |n: &str| NodeName::new(n).unwrap();
        let n4 = node("n4");
        let down: BTreeMap<NodeName, u64> = [(node("n2"), 100), (node("n3"), 95), (n4, 80)].into();
        // n4 has no tasks; n2 is down only 9 s at 109.
        assert_eq!(s.nodes_to_reschedule(&down, 109, 10), [node("n3")]);
        assert_eq!(
            s.nodes_to_reschedule(&down, 110, DEFAULT_RESCHEDULE_AFTER_S),
            [node("n2"), node("n3")]
        );
        assert!(
            s.nodes_to_reschedule(&down, 50, 10).is_empty(),
            "clock behind"
        );
    }
}
