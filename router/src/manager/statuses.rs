//! The status board: what nodes report about their tasks, by task name. On the manager it
//! holds every node's reports (and the local agent's); on a worker, the node's own tasks.
//! Snapshots carry it to every node as [`Snapshot::statuses`](protocol::control::Snapshot).

use protocol::api::TaskStatus;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// What a node last said about one of its tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEntry {
    /// The task's id: a report about an earlier task of the same name is not this one's.
    pub id: String,
    pub status: TaskStatus,
}

/// Task name → its last report; shared by the agent, the task supervisors and the control
/// plane.
pub type StatusBoard = Arc<RwLock<BTreeMap<String, StatusEntry>>>;

/// The board as a snapshot carries it: task name → (task id, status).
pub fn to_snapshot(
    board: &BTreeMap<String, StatusEntry>,
) -> BTreeMap<String, (String, TaskStatus)> {
    board
        .iter()
        .map(|(name, e)| (name.clone(), (e.id.clone(), e.status.clone())))
        .collect()
}
