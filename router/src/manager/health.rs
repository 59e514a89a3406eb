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
    /// When this manager started: a node it has not heard from since counts as silent from
    /// then (a restarted manager does not declare every node long lost).
    started: Instant,
    last: Mutex<HashMap<NodeName, Instant>>,
}

impl Health {
    pub fn new(me: NodeName) -> Health {
        Health {
            me,
            started: Instant::now(),
            last: Mutex::new(HashMap::new()),
        }
    }

    /// The node this manager runs on (always ready).
    pub fn me(&self) -> &NodeName {
        &self.me
    }

    /// Counts `nodes` as heard from until `grace` from now (at least a heartbeat's worth): a manager taking over gives the
    /// nodes its predecessor saw alive the time to reconnect before it calls them down (and
    /// moves their tasks), as Swarm's new leader does.
    pub fn seed(&self, nodes: impl IntoIterator<Item = NodeName>, grace: Duration) {
        let until = Instant::now() + grace.saturating_sub(DOWN_AFTER);
        if let Ok(mut m) = self.last.lock() {
            for n in nodes {
                m.insert(n, until);
            }
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
            // `elapsed` of a moment still ahead (a seeded grace) is zero.
            .is_some_and(|t| t.elapsed() < DOWN_AFTER)
    }

    /// The nodes of `state` that are down, with the moment (Unix seconds, `now` being the
    /// present) each went down: [`DOWN_AFTER`] after its last heartbeat.
    pub fn down_since(&self, state: &ClusterState, now: u64) -> BTreeMap<NodeName, u64> {
        let Ok(last) = self.last.lock() else {
            return BTreeMap::new();
        };
        state
            .nodes
            .keys()
            .filter(|n| **n != self.me)
            .filter_map(|n| {
                let down_for = self.silent(&last, n).checked_sub(DOWN_AFTER)?;
                Some((n.clone(), now.saturating_sub(down_for.as_secs())))
            })
            .collect()
    }

    /// How long `node` has been down: zero while it is ready (this manager's own node
    /// always is), else the time since it went down ([`DOWN_AFTER`] after its last
    /// heartbeat, or after this manager started if it has not heard from it since).
    pub fn down_for(&self, node: &NodeName) -> Duration {
        if *node == self.me {
            return Duration::ZERO;
        }
        let Ok(last) = self.last.lock() else {
            return Duration::ZERO;
        };
        self.silent(&last, node).saturating_sub(DOWN_AFTER)
    }

    /// How long `node` has been silent (zero during a seeded grace).
    fn silent(&self, last: &HashMap<NodeName, Instant>, node: &NodeName) -> Duration {
        last.get(node).copied().unwrap_or(self.started).elapsed()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_nodes_are_ready_for_the_grace_only() {
        let h = Health::new(NodeName::new("m2").unwrap());
        let (w1, w2) = (NodeName::new("w1").unwrap(), NodeName::new("w2").unwrap());
        assert!(!h.is_ready(&w1), "never heard from");
        h.seed([w1.clone()], Duration::from_secs(60));
        assert!(h.is_ready(&w1));
        assert!(!h.is_ready(&w2), "only the nodes seeded");
        let mut state = ClusterState::default();
        for n in [&w1, &w2] {
            state.upsert_node(protocol::state::Node {
                name: n.clone(),
                role: protocol::state::Role::Worker,
                availability: protocol::state::Availability::Active,
                advertise_addr: None,
                data_port: 4789,
                joined_at: 0,
                control_addr: None,
            });
        }
        let down = h.down_since(&state, 1_000);
        assert!(!down.contains_key(&w1), "not down while its grace lasts");
        assert_eq!(h.down_for(&w1), Duration::ZERO);
        assert_eq!(
            h.down_for(h.me()),
            Duration::ZERO,
            "this manager is never down"
        );
    }
}
