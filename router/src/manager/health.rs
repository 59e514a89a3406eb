//! Which nodes are alive: the manager records each node's last heartbeat; a node silent for
//! longer than [`DOWN_AFTER`] is down. The manager's own node is always ready.

use protocol::control::NodeHealth;
use protocol::state::ClusterState;
use protocol::types::NodeName;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Heartbeats come every second; three missed ones mark a node down.
pub const DOWN_AFTER: Duration = Duration::from_secs(3);

pub struct Health {
    me: NodeName,
    last: Mutex<HashMap<NodeName, Instant>>,
}

impl Health {
    pub fn new(me: NodeName) -> Health {
        Health {
            me,
            last: Mutex::new(HashMap::new()),
        }
    }

    pub fn beat(&self, node: &NodeName) {
        if let Ok(mut m) = self.last.lock() {
            m.insert(node.clone(), Instant::now());
        }
    }

    pub fn is_ready(&self, node: &NodeName) -> bool {
        if *node == self.me {
            return true;
        }
        self.last
            .lock()
            .ok()
            .and_then(|m| m.get(node).copied())
            .is_some_and(|t| t.elapsed() < DOWN_AFTER)
    }

    pub fn report(&self, state: &ClusterState) -> BTreeMap<NodeName, NodeHealth> {
        state
            .nodes
            .keys()
            .map(|n| {
                let h = if self.is_ready(n) {
                    NodeHealth::Ready
                } else {
                    NodeHealth::Down
                };
                (n.clone(), h)
            })
            .collect()
    }
}
