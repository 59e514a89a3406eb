//! Task history: the tasks that were stopped or replaced, and the addresses they still hold.
//!
//! A task leaves `ClusterState.tasks` when its node is drained or lost, its service is scaled
//! down, updated or removed. It then becomes a [`PastTask`] here, keyed by its id, with the
//! reason (what `service ps` shows beside `\_ web.2 ... Shutdown`). Its node may still be
//! running it (a partition, a slow stop), so until that node reports it stopped
//! ([`ClusterState::release_stopped`]) or is removed, the past task is *unreleased* and its
//! addresses count as used (`addresses.rs`): no new task or endpoint gets them, and a healed
//! partition never shows two live endpoints with one IP.
//!
//! History is bounded as Swarm's "Task History Retention Limit": at most
//! [`ClusterState::task_history_limit`] past tasks per slot of a service; the oldest released
//! ones go first, and unreleased ones are never dropped.

use super::{ClusterState, Task};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Past tasks kept per slot of a service unless set otherwise (Swarm's default).
pub const DEFAULT_TASK_HISTORY_LIMIT: u32 = 5;

pub(super) fn default_task_history_limit() -> u32 {
    DEFAULT_TASK_HISTORY_LIMIT
}

/// A task that was stopped or replaced: what `service ps` lists under its slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PastTask {
    /// The task as it was last placed (its node and addresses).
    pub task: Task,
    /// The id of its service: a service created again under the same name does not show
    /// the old one's tasks.
    pub service_id: String,
    /// Why it ended: "node n3 down", "node drained", "scaled down", "service removed", ...
    pub reason: String,
    /// Unix seconds when it ended, as the caller passed it (0: not known).
    pub ended_at: u64,
    /// The state's revision when it ended: orders a slot's past tasks (revisions only grow,
    /// and several tasks of one slot never end in one change).
    pub ended_revision: u64,
    /// Its node confirmed it stopped, or was removed: its addresses are free again.
    pub released: bool,
}

impl PastTask {
    /// Newest first within a slot.
    fn age_key(&self) -> (u64, u64) {
        (self.ended_revision, self.ended_at)
    }
}

impl ClusterState {
    /// Moves task `name` out of the desired state into the history, unreleased (its node
    /// may still run it). Returns whether there was such a task.
    pub(super) fn retire(&mut self, name: &str, reason: &str, now: u64) -> bool {
        let Some(task) = self.tasks.remove(name) else {
            return false;
        };
        let service_id = self
            .services
            .get(&task.service)
            .map(|s| s.id.clone())
            .unwrap_or_default();
        self.history.insert(
            task.id.clone(),
            PastTask {
                task,
                service_id,
                reason: reason.to_string(),
                ended_at: now,
                ended_revision: self.revision,
                released: false,
            },
        );
        true
    }

    /// Marks released every unreleased past task on `node` whose id is not in
    /// `still_running` (the ids the node reports running): their addresses are free again.
    /// Returns whether anything changed (the revision is bumped then).
    ///
    /// Call it with a report made after the node saw the change that ended those tasks: a
    /// node that had not yet started a task would report it absent and start it later.
    pub fn release_stopped(&mut self, node: &str, still_running: &BTreeSet<String>) -> bool {
        let mut changed = false;
        for p in self.history.values_mut() {
            if !p.released && p.task.node.as_str() == node && !still_running.contains(&p.task.id) {
                p.released = true;
                changed = true;
            }
        }
        if changed {
            self.prune_history();
            self.revision += 1;
        }
        changed
    }

    /// Marks every past task on `node` released (the node is gone). Returns whether any was
    /// not released yet.
    pub(super) fn release_node(&mut self, node: &str) -> bool {
        let mut changed = false;
        for p in self.history.values_mut() {
            if !p.released && p.task.node.as_str() == node {
                p.released = true;
                changed = true;
            }
        }
        changed
    }

    /// Sets how many past tasks each slot keeps (`--task-history-limit`) and prunes to it.
    /// Unreleased past tasks are kept whatever the limit. Returns whether anything changed.
    pub fn set_task_history_limit(&mut self, limit: u32) -> bool {
        let before = self.history.len();
        let changed = self.task_history_limit != limit;
        self.task_history_limit = limit;
        self.prune_history();
        let changed = changed || self.history.len() != before;
        if changed {
            self.revision += 1;
        }
        changed
    }

    /// The past tasks of service `name`, for `service ps`: by slot, newest first within a
    /// slot. Empty if there is no such service.
    pub fn past_tasks(&self, name: &str) -> Vec<&PastTask> {
        let Some(svc) = self.services.get(name) else {
            return Vec::new();
        };
        let mut out: Vec<&PastTask> = self
            .history
            .values()
            .filter(|p| p.service_id == svc.id && p.task.service == svc.name)
            .collect();
        out.sort_by(|a, b| {
            a.task
                .slot
                .cmp(&b.task.slot)
                .then(b.age_key().cmp(&a.age_key()))
        });
        out
    }

    /// Unreleased past tasks: those whose addresses are still reserved.
    pub fn unreleased_tasks(&self) -> impl Iterator<Item = &PastTask> + '_ {
        self.history.values().filter(|p| !p.released)
    }

    /// Drops released past tasks of services that no longer exist, and the oldest released
    /// ones of every slot holding more than the limit.
    pub(super) fn prune_history(&mut self) {
        let live: BTreeSet<&str> = self.services.values().map(|s| s.id.as_str()).collect();
        let mut slots: BTreeMap<(&str, u32), Vec<&PastTask>> = BTreeMap::new();
        for p in self.history.values() {
            slots
                .entry((p.service_id.as_str(), p.task.slot))
                .or_default()
                .push(p);
        }
        let limit = self.task_history_limit as usize;
        let mut drop: Vec<String> = Vec::new();
        for ((service_id, _), mut past) in slots {
            if !live.contains(service_id) {
                drop.extend(
                    past.iter()
                        .filter(|p| p.released)
                        .map(|p| p.task.id.clone()),
                );
                continue;
            }
            // Oldest first: drop released ones until the slot fits (or none is left).
            past.sort_by_key(|p| p.age_key());
            let mut excess = past.len().saturating_sub(limit);
            for p in past {
                if excess == 0 {
                    break;
                }
                if p.released {
                    drop.push(p.task.id.clone());
                    excess -= 1;
                }
            }
        }
        for id in drop {
            self.history.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};
    use crate::types::NodeName;

    fn addr(s: &ClusterState, task: &str) -> String {
        s.tasks[task].attachments[0].address.to_string()
    }

    #[test]
    fn scaled_down_addresses_stay_reserved_until_released() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 2), &mut id, &|_| true)
            .unwrap();
        let old = s.tasks["web.2"].clone();
        s.scale_service_at("web", 1, 100, &mut id, &|_| true)
            .unwrap();
        let p = &s.history[&old.id];
        assert_eq!(
            (p.reason.as_str(), p.ended_at, p.released),
            ("scaled down", 100, false)
        );
        // Scaling up again: the old web.2 may still run, so the new one gets a new address.
        s.scale_service("web", 2, &mut id, &|_| true).unwrap();
        assert_eq!(addr(&s, "web.2"), "10.0.2.5");
        assert!(s
            .used_addresses(&"a".parse().unwrap())
            .contains(&old.attachments[0].address));
        // n1 reports only the running tasks: the old one is released, its address free.
        let running: BTreeSet<String> = s.tasks.values().map(|t| t.id.clone()).collect();
        let rev = s.revision;
        assert!(s.release_stopped("n1", &running));
        assert_eq!(s.revision, rev + 1);
        assert!(s.history[&old.id].released);
        assert!(
            !s.release_stopped("n1", &running),
            "nothing left to release"
        );
        s.scale_service("web", 3, &mut id, &|_| true).unwrap();
        assert_eq!(
            addr(&s, "web.3"),
            "10.0.2.4",
            "the released address is reused"
        );
    }

    #[test]
    fn release_needs_the_task_gone_from_its_own_node() {
        let mut s = state();
        net(&mut s, "a", None).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 1), &mut id, &|_| true)
            .unwrap();
        let old = s.tasks["web.1"].id.clone();
        s.remove_service_at("web", 5).unwrap();
        assert_eq!(s.history[&old].reason, "service removed");
        // Another node's report says nothing about n1's tasks; n1 still running it keeps it.
        assert!(!s.release_stopped("n2", &BTreeSet::new()));
        assert!(!s.release_stopped("n1", &[old.clone()].into()));
        assert!(!s.history[&old].released);
        // Released, the past task of a removed service is dropped.
        assert!(s.release_stopped("n1", &BTreeSet::new()));
        assert!(s.history.is_empty());
    }

    #[test]
    fn history_is_bounded_per_slot_keeping_unreleased() {
        let mut s = state();
        net(&mut s, "a", None).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 2), &mut id, &|_| true)
            .unwrap();
        s.set_task_history_limit(2);
        let n1 = NodeName::new("n1").unwrap();
        // Web.2 replaced four times, never reported stopped: all four kept.
        for t in 0..4 {
            s.scale_service_at("web", 1, t, &mut id, &|_| true).unwrap();
            s.scale_service_at("web", 2, t, &mut id, &|_| true).unwrap();
        }
        assert_eq!(s.history.len(), 4);
        // Released, only the newest two of slot 2 stay.
        let running: BTreeSet<String> = s.tasks_on(&n1).map(|t| t.id.clone()).collect();
        s.release_stopped("n1", &running);
        let past = s.past_tasks("web");
        assert_eq!(past.len(), 2);
        assert!(past.iter().all(|p| p.task.slot == 2 && p.released));
        assert_eq!(past.iter().map(|p| p.ended_at).collect::<Vec<_>>(), [3, 2]);
        // Scaled to 0: slot 1 has a count of its own; slot 2, one over, loses its oldest
        // released task.
        s.scale_service_at("web", 0, 9, &mut id, &|_| true).unwrap();
        let past: Vec<(u32, u64, bool)> = s
            .past_tasks("web")
            .iter()
            .map(|p| (p.task.slot, p.ended_at, p.released))
            .collect();
        assert_eq!(past, [(1, 9, false), (2, 9, false), (2, 3, true)]);
        // A lower limit prunes at once.
        assert!(s.set_task_history_limit(0));
        // Released ones go; the two unreleased (web.1, web.2 just scaled down) stay.
        assert_eq!(s.history.len(), 2);
        assert!(s.history.values().all(|p| !p.released));
        assert!(!s.set_task_history_limit(0));
    }

    /// A state file written before the history existed (format 1, no `history` or
    /// `task_history_limit`) loads, with an empty history and the default limit.
    #[test]
    fn state_saved_without_history_loads() {
        let old = r#"{
          "format": 1,
          "revision": 7,
          "networks": {},
          "services": {
            "web": {
              "id": "s1", "name": "web", "networks": ["a"], "replicas": 1,
              "command": ["sleep", "1000"], "created_at": 1, "updated_at": 1
            }
          },
          "tasks": {
            "web.1": {
              "id": "t1", "name": "web.1", "service": "web", "slot": 1, "node": "n1",
              "attachments": [
                {"network": "a", "address": "10.0.2.3", "mac": "02:42:0a:00:02:03"}
              ]
            }
          },
          "nodes": {
            "n1": {
              "name": "n1", "role": "manager", "availability": "active",
              "advertise_addr": null, "joined_at": 0
            }
          }
        }"#;
        let s: ClusterState = serde_json::from_str(old).unwrap();
        assert_eq!(s.format, crate::state::FORMAT);
        assert!(s.history.is_empty());
        assert_eq!(s.task_history_limit, DEFAULT_TASK_HISTORY_LIMIT);
        assert_eq!(
            s.tasks["web.1"].attachments[0].address.to_string(),
            "10.0.2.3"
        );
        // And what is saved now reads back the same, history included.
        let mut s = s;
        s.remove_service_at("web", 3).unwrap();
        let again: ClusterState =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
        assert_eq!(again.history["t1"].reason, "service removed");
    }
}
