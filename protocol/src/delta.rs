//! What changed between two snapshots, object by object: what the manager pushes to a node
//! that holds the previous one, instead of the whole state every second.
//!
//! A [`SnapshotDelta`] is computed once per push for every session ([`SnapshotDelta::between`])
//! and applied by each node to the snapshot it holds ([`SnapshotDelta::apply`]); both are
//! pure. Each map of the snapshot (every collection of [`ClusterState`], the statuses, the
//! nodes' health) travels as a [`MapDelta`]: the entries that are new or differ, and the keys
//! that went away. The scalar fields of the state travel whole, and so does the keyring when
//! it changed (a handful of keys). An unchanged state costs nothing to compare: the manager
//! shares one `Arc` of it between pushes, so [`SnapshotDelta::between`] sees the same
//! pointer and skips it.
//!
//! Deltas are numbered by the push they lead to and name the push they apply to (`base`, in
//! `ToNode::Delta`); a node that does not hold that push asks for a full snapshot
//! (`ToManager::Resync`) instead of guessing.

use crate::control::{Keyring, Snapshot};
use crate::state::ClusterState;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

/// How one map changed: entries put (new or different) and keys removed, each in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDelta<K, V> {
    pub put: Vec<(K, V)>,
    pub remove: Vec<K>,
}

impl<K, V> Default for MapDelta<K, V> {
    fn default() -> Self {
        MapDelta {
            put: Vec::new(),
            remove: Vec::new(),
        }
    }
}

impl<K: Ord + Clone, V: PartialEq + Clone> MapDelta<K, V> {
    /// What turns `old` into `new`: one walk of both maps in key order.
    pub fn between(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> MapDelta<K, V> {
        let mut delta = MapDelta::default();
        let mut old_it = old.iter().peekable();
        let mut new_it = new.iter().peekable();
        loop {
            match (old_it.peek(), new_it.peek()) {
                (None, None) => break,
                (Some((k, _)), None) => {
                    delta.remove.push((*k).clone());
                    old_it.next();
                }
                (None, Some((k, v))) => {
                    delta.put.push(((*k).clone(), (*v).clone()));
                    new_it.next();
                }
                (Some((ko, vo)), Some((kn, vn))) => match ko.cmp(kn) {
                    Ordering::Less => {
                        delta.remove.push((*ko).clone());
                        old_it.next();
                    }
                    Ordering::Greater => {
                        delta.put.push(((*kn).clone(), (*vn).clone()));
                        new_it.next();
                    }
                    Ordering::Equal => {
                        if vo != vn {
                            delta.put.push(((*kn).clone(), (*vn).clone()));
                        }
                        old_it.next();
                        new_it.next();
                    }
                },
            }
        }
        delta
    }

    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.remove.is_empty()
    }

    /// How many entries it puts or removes.
    pub fn len(&self) -> usize {
        self.put.len() + self.remove.len()
    }

    pub fn apply(&self, map: &mut BTreeMap<K, V>) {
        for k in &self.remove {
            map.remove(k);
        }
        for (k, v) in &self.put {
            map.insert(k.clone(), v.clone());
        }
    }
}

/// How the desired state changed. Destructured field by field on both sides, so a field
/// added to [`ClusterState`] does not compile until it has its place here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDelta {
    pub format: u32,
    pub revision: u64,
    pub task_history_limit: u32,
    pub networks: MapDelta<crate::types::NetworkName, crate::state::Network>,
    pub services: MapDelta<crate::types::ServiceName, crate::state::Service>,
    pub tasks: MapDelta<String, crate::state::Task>,
    pub nodes: MapDelta<crate::types::NodeName, crate::state::Node>,
    pub endpoints: MapDelta<String, crate::state::Endpoint>,
    pub history: MapDelta<String, crate::state::PastTask>,
    pub certs: MapDelta<crate::types::NodeName, Vec<crate::state::NodeCert>>,
}

impl StateDelta {
    pub fn between(old: &ClusterState, new: &ClusterState) -> StateDelta {
        let ClusterState {
            format,
            revision,
            networks,
            services,
            tasks,
            nodes,
            endpoints,
            history,
            task_history_limit,
            certs,
        } = new;
        StateDelta {
            format: *format,
            revision: *revision,
            task_history_limit: *task_history_limit,
            networks: MapDelta::between(&old.networks, networks),
            services: MapDelta::between(&old.services, services),
            tasks: MapDelta::between(&old.tasks, tasks),
            nodes: MapDelta::between(&old.nodes, nodes),
            endpoints: MapDelta::between(&old.endpoints, endpoints),
            history: MapDelta::between(&old.history, history),
            certs: MapDelta::between(&old.certs, certs),
        }
    }

    pub fn apply(&self, state: &mut ClusterState) {
        let ClusterState {
            format,
            revision,
            networks,
            services,
            tasks,
            nodes,
            endpoints,
            history,
            task_history_limit,
            certs,
        } = state;
        *format = self.format;
        *revision = self.revision;
        *task_history_limit = self.task_history_limit;
        self.networks.apply(networks);
        self.services.apply(services);
        self.tasks.apply(tasks);
        self.nodes.apply(nodes);
        self.endpoints.apply(endpoints);
        self.history.apply(history);
        self.certs.apply(certs);
    }

    /// How many objects it puts or removes.
    pub fn objects(&self) -> usize {
        self.networks.len()
            + self.services.len()
            + self.tasks.len()
            + self.nodes.len()
            + self.endpoints.len()
            + self.history.len()
            + self.certs.len()
    }
}

/// How a snapshot changed since the previous push.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDelta {
    /// `None`: the desired state is the one of the previous push.
    pub state: Option<StateDelta>,
    pub statuses: MapDelta<String, (String, crate::api::TaskStatus)>,
    pub health: MapDelta<crate::types::NodeName, crate::control::NodeHealth>,
    /// The whole keyring, when it changed.
    pub keys: Option<Keyring>,
}

impl SnapshotDelta {
    /// What turns `old` into `new`.
    pub fn between(old: &Snapshot, new: &Snapshot) -> SnapshotDelta {
        let Snapshot {
            state,
            statuses,
            health,
            keys,
        } = new;
        let same_state = Arc::ptr_eq(&old.state, state) || *old.state == **state;
        SnapshotDelta {
            state: (!same_state).then(|| StateDelta::between(&old.state, state)),
            statuses: MapDelta::between(&old.statuses, statuses),
            health: MapDelta::between(&old.health, health),
            keys: (old.keys != *keys).then(|| keys.clone()),
        }
    }

    /// Whether it changes nothing (a push that only says the manager is there).
    pub fn is_empty(&self) -> bool {
        self.state.is_none()
            && self.statuses.is_empty()
            && self.health.is_empty()
            && self.keys.is_none()
    }

    /// Turns the snapshot the delta was computed from into the next one. The state is
    /// copied only if someone else holds it too (`Arc::make_mut`).
    pub fn apply(&self, snap: &mut Snapshot) {
        if let Some(state) = &self.state {
            state.apply(Arc::make_mut(&mut snap.state));
        }
        self.statuses.apply(&mut snap.statuses);
        self.health.apply(&mut snap.health);
        if let Some(keys) = &self.keys {
            snap.keys = keys.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{TaskState, TaskStatus};
    use crate::control::NodeHealth;
    use crate::state::{Availability, Node, NodeCert, Role};
    use crate::types::NodeName;
    use proptest::prelude::*;

    fn node(name: &str, port: u16) -> Node {
        Node {
            name: NodeName::new(name).unwrap(),
            role: Role::Worker,
            availability: Availability::Active,
            advertise_addr: Some("198.18.0.1".parse().unwrap()),
            data_port: port,
            joined_at: 1,
            control_addr: None,
        }
    }

    fn status(pid: u32) -> (String, TaskStatus) {
        (
            "id".into(),
            TaskStatus {
                state: TaskState::Running,
                error: None,
                pid: Some(pid),
                restarts: 0,
                since: 1,
                health: None,
            },
        )
    }

    #[test]
    fn a_map_delta_puts_what_differs_and_removes_what_went() {
        let old: BTreeMap<u32, &str> = [(1, "a"), (2, "b"), (4, "d")].into();
        let new: BTreeMap<u32, &str> = [(2, "B"), (3, "c"), (4, "d")].into();
        let d = MapDelta::between(&old, &new);
        assert_eq!(d.put, vec![(2, "B"), (3, "c")]);
        assert_eq!(d.remove, vec![1]);
        let mut m = old.clone();
        d.apply(&mut m);
        assert_eq!(m, new);
        assert!(MapDelta::between(&new, &new).is_empty());
    }

    #[test]
    fn an_unchanged_snapshot_gives_an_empty_delta() {
        let mut state = ClusterState::default();
        state.upsert_node(node("n1", 4789));
        let snap = Snapshot {
            state: Arc::new(state),
            statuses: [("web.1".to_string(), status(7))].into(),
            health: [(NodeName::new("n1").unwrap(), NodeHealth::Ready)].into(),
            keys: Keyring::new(),
        };
        let again = snap.clone();
        let d = SnapshotDelta::between(&snap, &again);
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn a_delta_carries_only_the_objects_that_changed() {
        let mut state = ClusterState::default();
        for i in 0..100 {
            state.upsert_node(node(&format!("n{i}"), 4789));
        }
        let old = Snapshot {
            state: Arc::new(state.clone()),
            statuses: BTreeMap::new(),
            health: BTreeMap::new(),
            keys: Keyring::new(),
        };
        let n7 = NodeName::new("n7").unwrap();
        state.nodes.insert(n7, node("n7", 4790));
        state.revision += 1;
        let mut new = old.clone();
        new.state = Arc::new(state);
        new.statuses.insert("web.1".into(), status(9));
        let d = SnapshotDelta::between(&old, &new);
        let sd = d.state.as_ref().expect("the state changed");
        assert_eq!(sd.objects(), 1);
        assert_eq!(sd.nodes.put[0].0.as_str(), "n7");
        let mut applied = old.clone();
        d.apply(&mut applied);
        assert_eq!(applied, new);
        let full = crate::control::encode(&new).unwrap().len();
        let delta = crate::control::encode(&d).unwrap().len();
        assert!(delta * 20 < full, "delta {delta} bytes, full {full}");
    }

    fn arb_node() -> impl Strategy<Value = (String, u16)> {
        ("n[0-9]{1,2}", 1u16..4)
    }

    proptest! {
        /// Whatever two snapshots, applying the delta between them to the first gives the
        /// second.
        #[test]
        fn applying_the_delta_gives_the_new_snapshot(
            a in proptest::collection::vec(arb_node(), 0..20),
            b in proptest::collection::vec(arb_node(), 0..20),
            sa in proptest::collection::btree_map("web\\.[0-9]", 0u32..3, 0..8),
            sb in proptest::collection::btree_map("web\\.[0-9]", 0u32..3, 0..8),
            certs in proptest::collection::vec("n[0-9]", 0..4),
            rev in 0u64..5,
        ) {
            let build = |nodes: &[(String, u16)], st: &BTreeMap<String, u32>, rev: u64| {
                let mut s = ClusterState::default();
                for (n, p) in nodes {
                    s.upsert_node(node(n, *p));
                }
                for c in &certs {
                    let cert = NodeCert { serial: format!("{rev}"), not_after: 9, role: Role::Worker };
                    s.certs.insert(NodeName::new(c).unwrap(), vec![cert]);
                }
                s.revision = rev;
                Snapshot {
                    state: Arc::new(s),
                    statuses: st.iter().map(|(k, v)| (k.clone(), status(*v))).collect(),
                    health: nodes
                        .iter()
                        .map(|(n, p)| {
                            let h = if *p == 1 { NodeHealth::Down } else { NodeHealth::Ready };
                            (NodeName::new(n).unwrap(), h)
                        })
                        .collect(),
                    keys: Keyring::new(),
                }
            };
            let old = build(&a, &sa, 0);
            let new = build(&b, &sb, rev);
            let d = SnapshotDelta::between(&old, &new);
            let d: SnapshotDelta = crate::control::decode(&crate::control::encode(&d).unwrap()[4..]).unwrap();
            let mut applied = old.clone();
            d.apply(&mut applied);
            prop_assert_eq!(applied, new);
        }
    }
}
