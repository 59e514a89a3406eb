//! The status board: what nodes report about their tasks, by task name. On the manager it
//! holds every node's reports (and the local agent's); on a worker, the node's own tasks.
//! Snapshots carry it to every node as [`Snapshot::statuses`](protocol::control::Snapshot).
//! The manager's healing tick [`prune`]s it, so it holds no more than the tasks that exist.

use protocol::api::TaskStatus;
use protocol::state::ClusterState;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
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

/// Drops the entries of tasks that are gone: an entry stays while its task is in `state`
/// (under that name, with that id) or is a past task whose addresses are not released yet,
/// which its node may still run (the manager's own agent reports those under
/// `task::leaving_key` while they drain, and the healing tick reads its board to know what
/// it still runs). Anything else (a removed, scaled-down or replaced task whose node has
/// let it go, or a report about a task the state never held) goes. Returns how many went.
pub fn prune(board: &mut BTreeMap<String, StatusEntry>, state: &ClusterState) -> usize {
    let unreleased: BTreeSet<&str> = state
        .unreleased_tasks()
        .map(|p| p.task.id.as_str())
        .collect();
    let before = board.len();
    board.retain(|name, e| {
        state.tasks.get(name).is_some_and(|t| t.id == e.id) || unreleased.contains(e.id.as_str())
    });
    before - board.len()
}
