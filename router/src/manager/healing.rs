//! Healing: what the manager does on its own, without an operator's request, so that the
//! cluster keeps its services whole when nodes come and go.
//!
//! - A node down for longer than `--reschedule-after` has its tasks replaced on other
//!   nodes (`ClusterState::reschedule_node`); a node back within that grace keeps them.
//! - Slots left empty (no node could take them) are placed once a node can, and a global
//!   service's task is placed on every ready, active node that lacks it (a node that joined).
//! - A task that left the desired state (rescheduled, drained, scaled down, removed) keeps
//!   its addresses reserved until its node no longer reports it
//!   (`ClusterState::release_stopped`), so a healed partition never shows two live
//!   endpoints with one address.
//!
//! The decisions are `protocol::state`'s pure operations; this file only feeds them the
//! clock, the nodes' health and their reports, and is driven by the daemon's tick
//! ([`HEAL_TICK`]) and by the control plane's reports.

use super::{statuses, Manager};
use crate::ids::new_id;
use protocol::types::NodeName;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often the manager looks for lost nodes and empty slots.
pub const HEAL_TICK: Duration = Duration::from_secs(1);

impl Manager {
    /// Sets `--reschedule-after`: how long a node may be down before its tasks are replaced.
    pub fn set_reschedule_after(&self, after: Duration) {
        self.reschedule_after_s
            .store(after.as_secs(), Ordering::Relaxed);
    }

    /// `--reschedule-after`.
    pub fn reschedule_after(&self) -> Duration {
        Duration::from_secs(self.reschedule_after_s.load(Ordering::Relaxed))
    }

    /// Sets `--task-history-limit` (past tasks kept per slot), persisted with the state.
    pub fn set_task_history_limit(&self, limit: u32) -> Result<(), protocol::api::OpError> {
        if self.snapshot().task_history_limit == limit {
            return Ok(());
        }
        self.change(|s| {
            s.set_task_history_limit(limit);
            Ok(())
        })
    }

    /// One round of healing at `now` (Unix seconds): replaces the tasks of nodes down past
    /// the grace, releases the addresses of this node's own stopped tasks, and fills empty
    /// slots where a node can take them. Persists only what changed.
    pub fn heal(&self, now: u64) {
        let state = self.snapshot();
        let after = self.reschedule_after_s.load(Ordering::Relaxed);
        let down = self.health.down_since(&state, now);
        for node in state.nodes_to_reschedule(&down, now, after) {
            let reason = format!("node {node} down");
            let health = self.health.clone();
            match self.change(|s| {
                s.reschedule_node(node.as_str(), &reason, now, &mut new_id, &|n| {
                    health.is_ready(n)
                })
            }) {
                Ok(moved) => {
                    info!(node = %node, tasks = ?moved, "node down: its tasks rescheduled")
                }
                Err(e) => {
                    warn!(node = %node, error = %e, "cannot reschedule the tasks of a lost node")
                }
            }
        }
        // Other nodes' last reports; this node's own tasks are on its board, written
        // directly by its agent.
        let mut reported = self.reported.lock().map(|r| r.clone()).unwrap_or_default();
        let mine: BTreeSet<String> = self
            .statuses
            .read()
            .map(|b| b.values().map(|e| e.id.clone()).collect())
            .unwrap_or_default();
        reported.insert(self.health.me().clone(), mine);
        for (node, running) in &reported {
            self.release_stopped(node, running);
        }
        self.prune_statuses();
        let snap = self.snapshot();
        let ready = |n: &NodeName| self.health.is_ready(n);
        // Empty slots, and nodes (new, ready again or active again) without their global
        // services' task.
        if !snap.missing_slots().is_empty() || !snap.global_gaps(&ready).is_empty() {
            let health = self.health.clone();
            let mut placed = Vec::new();
            let filled = self.change_if(|s| {
                placed = s.fill_slots(&mut new_id, &|n| health.is_ready(n));
                !placed.is_empty()
            });
            match filled {
                Ok(true) => info!(tasks = ?placed, "empty slots placed"),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot place empty slots"),
            }
        }
    }

    /// Forgets the statuses of tasks that are gone ([`statuses::prune`]), and the last
    /// reports of nodes that are no longer members, so neither grows with the cluster's
    /// history.
    fn prune_statuses(&self) {
        if let Ok(mut board) = self.statuses.write() {
            // Read under the lock: a report recorded meanwhile was checked against this
            // state or an older one, so what it wrote is kept.
            let state = self.snapshot();
            let gone = statuses::prune(&mut board, &state);
            if gone > 0 {
                debug!(
                    gone,
                    left = board.len(),
                    "statuses of tasks that are gone dropped"
                );
            }
        }
        let state = self.snapshot();
        if let Ok(mut r) = self.reported.lock() {
            r.retain(|node, _| state.nodes.contains_key(node));
        }
    }

    /// Records the ids of the tasks `node` just reported (its heartbeat), in any state: the
    /// next [`Manager::heal`] releases the addresses of its past tasks that are not among
    /// them.
    pub fn note_reported(&self, node: &NodeName, ids: BTreeSet<String>) {
        if let Ok(mut r) = self.reported.lock() {
            r.insert(node.clone(), ids);
        }
    }

    /// Releases the addresses of `node`'s past tasks that it no longer reports (`running`:
    /// the ids of every task it reported, in any state). Changes nothing, and persists
    /// nothing, while it still holds all of them.
    pub fn release_stopped(&self, node: &NodeName, running: &BTreeSet<String>) {
        let due = self
            .snapshot()
            .unreleased_tasks()
            .any(|p| p.task.node == *node && !running.contains(&p.task.id));
        if !due {
            return;
        }
        match self.change_if(|s| s.release_stopped(node.as_str(), running)) {
            Ok(true) => {
                info!(node = %node, "stopped tasks confirmed: their addresses are free again")
            }
            Ok(false) => {}
            Err(e) => warn!(node = %node, error = %e, "cannot release stopped tasks' addresses"),
        }
    }
}
