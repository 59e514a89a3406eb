//! How [`ClusterState`] lies in etcd: one key per object, and what a change writes. Pure (no
//! I/O): the etcd driver (`etcd.rs`) sends what these functions compute.
//!
//! ```text
//! PREFIX/leader                     the manager that may write, as a LeaderInfo (its lease
//!                                   keeps the key)
//! PREFIX/state/meta                 the scalar fields: {"format":1,"revision":42}
//! PREFIX/state/networks/NAME        one network, as JSON
//! PREFIX/state/services/NAME        one service
//! PREFIX/state/tasks/NAME           one task (web.1)
//! PREFIX/state/nodes/NAME           one node
//! PREFIX/state/endpoints/CONTAINER/IFNAME   one runtime endpoint
//! PREFIX/state/history/TASK-ID      one past task (its addresses reserved until released)
//! PREFIX/state/certs/NAME           the certificates accepted for one node
//! PREFIX/secrets/NAME               one secret the managers share (naming::Secret: ca.key,
//!                                   ca.pem, join-secret, join-secret-manager, cert-expiry)
//! ```
//!
//! Every object is its own key so that no request nears etcd's 1.5 MiB limit, and a change
//! writes only the keys whose bytes differ ([`diff`]). The state is taken apart and put back
//! together through its JSON form, so a field added to an object needs nothing here; a new
//! *collection* of `ClusterState` goes into [`COLLECTIONS`] (until then it rides in `meta`,
//! which is correct, only not per object).

use crate::naming::Secret;
use protocol::state::ClusterState;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

/// The fields of [`ClusterState`] that are maps of objects: each entry gets a key.
pub const COLLECTIONS: [&str; 7] = [
    "networks",
    "services",
    "tasks",
    "nodes",
    "endpoints",
    "history",
    "certs",
];

/// Key → value (JSON bytes), as stored under a prefix.
pub type Kvs = BTreeMap<String, Vec<u8>>;

/// Where one cluster's keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// `prefix` as given by `--etcd-prefix` (`/overlay`); a trailing `/` is dropped.
    pub fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The election key: whoever holds it may write the state.
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// Every state key starts with this (a range read or delete of the whole state).
    pub fn state_prefix(&self) -> String {
        format!("{}/state/", self.prefix)
    }

    /// The key of the scalar fields.
    pub fn meta(&self) -> String {
        format!("{}meta", self.state_prefix())
    }

    /// The key of one object of a collection.
    pub fn object(&self, collection: &str, name: &str) -> String {
        format!("{}{collection}/{name}", self.state_prefix())
    }

    /// Every secret's key starts with this; apart from the state's, so that reading the
    /// state never reads a secret.
    pub fn secrets_prefix(&self) -> String {
        format!("{}/secrets/", self.prefix)
    }

    /// The key of one secret the managers share.
    pub fn secret(&self, secret: Secret) -> String {
        format!("{}{}", self.secrets_prefix(), secret.name())
    }
}

/// What the leader key holds: who leads, and where the other managers reach it to pass
/// changes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The leading manager's node name.
    pub node: String,
    /// Its control address (QUIC), if it serves one.
    pub control: Option<SocketAddr>,
}

impl LeaderInfo {
    /// The leader key's value: JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a name and an address always encode")
    }

    /// Reads the leader key's value: JSON, or the bare node name that managers wrote before
    /// there were followers to tell where to reach them.
    pub fn parse(value: &[u8]) -> LeaderInfo {
        serde_json::from_slice(value).unwrap_or_else(|_| LeaderInfo {
            node: String::from_utf8_lossy(value).trim().to_string(),
            control: None,
        })
    }
}

/// As error messages name the holder: `n1`, or `n1 at 198.18.0.1:2377`.
impl fmt::Display for LeaderInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.control {
            Some(addr) => write!(f, "{} at {addr}", self.node),
            None => f.write_str(&self.node),
        }
    }
}

/// What a change writes: the keys that are new or differ, and those that went away.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
}

impl Diff {
    /// How many operations the transaction holds.
    pub fn len(&self) -> usize {
        self.puts.len() + self.deletes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("encoding the state: {0}")]
    Encode(serde_json::Error),
    #[error("{key} is not valid JSON: {why}")]
    BadValue { key: String, why: serde_json::Error },
    #[error("{0} is not a key of this overlayd's state layout (written by a newer version?)")]
    UnknownKey(String),
    #[error("the state keys under {0} have no meta key (an interrupted import?)")]
    NoMeta(String),
    #[error("the state under {prefix} does not fit this overlayd's ClusterState: {why}")]
    Shape {
        prefix: String,
        why: serde_json::Error,
    },
}

/// Takes `state` apart into its keys.
pub fn split(layout: &Layout, state: &ClusterState) -> Result<Kvs, LayoutError> {
    let Value::Object(mut fields) = serde_json::to_value(state).map_err(LayoutError::Encode)?
    else {
        unreachable!("ClusterState serializes as a JSON object");
    };
    let mut kvs = Kvs::new();
    for collection in COLLECTIONS {
        let Some(Value::Object(entries)) = fields.remove(collection) else {
            continue;
        };
        for (name, object) in entries {
            let bytes = serde_json::to_vec(&object).map_err(LayoutError::Encode)?;
            kvs.insert(layout.object(collection, &name), bytes);
        }
    }
    let meta = serde_json::to_vec(&Value::Object(fields)).map_err(LayoutError::Encode)?;
    kvs.insert(layout.meta(), meta);
    Ok(kvs)
}

/// The writes that turn `old` into `new` (puts in key order, then deletes).
pub fn diff(old: &Kvs, new: &Kvs) -> Diff {
    let puts = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let deletes = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    Diff { puts, deletes }
}

/// Puts the state back together from every key under [`Layout::state_prefix`]: `None` if
/// there are none (nothing stored yet).
pub fn assemble(layout: &Layout, kvs: &Kvs) -> Result<Option<ClusterState>, LayoutError> {
    if kvs.is_empty() {
        return Ok(None);
    }
    let parse = |key: &str, bytes: &[u8]| {
        serde_json::from_slice::<Value>(bytes).map_err(|why| LayoutError::BadValue {
            key: key.to_string(),
            why,
        })
    };
    let meta_key = layout.meta();
    let mut fields = match kvs.get(&meta_key) {
        Some(bytes) => match parse(&meta_key, bytes)? {
            Value::Object(m) => m,
            _ => {
                return Err(LayoutError::UnknownKey(format!(
                    "{meta_key} (not a JSON object)"
                )))
            }
        },
        None => return Err(LayoutError::NoMeta(layout.state_prefix())),
    };
    for collection in COLLECTIONS {
        fields.insert(collection.to_string(), Value::Object(Map::new()));
    }
    let state_prefix = layout.state_prefix();
    for (key, bytes) in kvs {
        if *key == meta_key {
            continue;
        }
        let rest = key
            .strip_prefix(&state_prefix)
            .ok_or_else(|| LayoutError::UnknownKey(key.clone()))?;
        let (collection, name) = rest
            .split_once('/')
            .filter(|(c, n)| COLLECTIONS.contains(c) && !n.is_empty())
            .ok_or_else(|| LayoutError::UnknownKey(key.clone()))?;
        if let Some(Value::Object(entries)) = fields.get_mut(collection) {
            entries.insert(name.to_string(), parse(key, bytes)?);
        }
    }
    serde_json::from_value(Value::Object(fields))
        .map(Some)
        .map_err(|why| LayoutError::Shape {
            prefix: layout.prefix.clone(),
            why,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::state::{
        Availability, EndpointMode, EndpointRequest, NetworkRequest, Node, Pool, Role, Service,
    };
    use protocol::types::{NetworkName, NodeName, ServiceName};

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    fn node(name: &str) -> Node {
        Node {
            name: NodeName::new(name).unwrap(),
            role: Role::Manager,
            availability: Availability::Active,
            advertise_addr: Some("198.18.0.1".parse().unwrap()),
            data_port: 4789,
            joined_at: 1,
            control_addr: None,
        }
    }

    fn service(name: &str, net: &str, replicas: u32) -> Service {
        Service {
            id: format!("svc-{name}"),
            name: ServiceName::new(name).unwrap(),
            networks: vec![NetworkName::new(net).unwrap()],
            replicas,
            command: vec!["sleep".into(), "100".into()],
            env: vec!["A=1".into()],
            created_at: 1,
            updated_at: 1,
            endpoint_mode: EndpointMode::default(),
            vips: BTreeMap::new(),
            aliases: BTreeMap::new(),
            lb_idle_timeout: None,
            ports: Vec::new(),
            healthcheck: None,
            stop_grace_period_s: None,
            deploy: Default::default(),
            mode: Default::default(),
            node_slots: Default::default(),
            image: None,
        }
    }

    /// A state made by protocol's own operations: networks, a service with tasks and VIPs,
    /// nodes, and a runtime endpoint whose key holds a `/`.
    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let mut id = ids();
        s.upsert_node(node("n1"));
        s.upsert_node(node("n2"));
        let cert = protocol::state::NodeCert {
            serial: "0a1b".into(),
            not_after: 100,
            role: protocol::state::Role::Worker,
        };
        s.record_cert(&NodeName::new("n2").unwrap(), cert, true, 0);
        for name in ["front", "back"] {
            s.create_network(
                NetworkName::new(name).unwrap(),
                NetworkRequest::default(),
                Pool::default(),
                id(),
                1,
            )
            .unwrap();
        }
        s.create_service(service("web", "front", 3), &mut id, &|_| true)
            .unwrap();
        s.add_endpoint(EndpointRequest {
            container: "c0ffee".into(),
            ifname: "eth0".into(),
            netns: "/proc/1/ns/net".into(),
            node: NodeName::new("n2").unwrap(),
            network: "back".into(),
            runtime: "cni".into(),
            address: None,
        })
        .unwrap();
        s
    }

    #[test]
    fn one_key_per_object_and_a_meta_key() {
        let l = Layout::new("/overlay/");
        let s = cluster();
        let kvs = split(&l, &s).unwrap();
        let keys: Vec<&str> = kvs.keys().map(String::as_str).collect();
        assert!(keys.contains(&"/overlay/state/meta"), "{keys:?}");
        assert!(keys.contains(&"/overlay/state/networks/front"));
        assert!(keys.contains(&"/overlay/state/services/web"));
        assert!(keys.contains(&"/overlay/state/tasks/web.1"));
        assert!(keys.contains(&"/overlay/state/nodes/n2"));
        assert!(keys.contains(&"/overlay/state/endpoints/c0ffee/eth0"));
        assert!(keys.contains(&"/overlay/state/certs/n2"));
        let objects = s.networks.len() + s.services.len() + s.tasks.len() + s.nodes.len();
        let certs = s.certs.len();
        assert_eq!(
            kvs.len(),
            1 + objects + s.endpoints.len() + s.history.len() + certs
        );
        let meta: Value = serde_json::from_slice(&kvs["/overlay/state/meta"]).unwrap();
        assert_eq!(
            meta,
            serde_json::json!({
                "format": s.format,
                "revision": s.revision,
                "task_history_limit": s.task_history_limit,
            })
        );
        assert_eq!(l.leader(), "/overlay/leader");
    }

    #[test]
    fn assemble_is_the_inverse_of_split() {
        let l = Layout::new("/c1");
        let s = cluster();
        assert_eq!(assemble(&l, &split(&l, &s).unwrap()).unwrap(), Some(s));
        let empty = ClusterState::default();
        assert_eq!(
            assemble(&l, &split(&l, &empty).unwrap()).unwrap(),
            Some(empty)
        );
        assert_eq!(assemble(&l, &Kvs::new()).unwrap(), None, "nothing stored");
    }

    #[test]
    fn a_change_writes_only_what_differs() {
        let l = Layout::new("/overlay");
        let before = cluster();
        let old = split(&l, &before).unwrap();
        assert!(diff(&old, &old).is_empty());

        // Scaling 3 → 1 deletes two tasks, keeps them as history (their addresses reserved
        // until their nodes stop them) and rewrites the service and the revision.
        let mut after = before.clone();
        after
            .scale_service("web", 1, &mut ids(), &|_| true)
            .unwrap();
        let d = diff(&old, &split(&l, &after).unwrap());
        let puts: Vec<&str> = d.puts.iter().map(|(k, _)| k.as_str()).collect();
        let past: Vec<String> = after
            .history
            .keys()
            .map(|id| format!("/overlay/state/history/{id}"))
            .collect();
        assert_eq!(past.len(), 2);
        assert_eq!(
            puts,
            [
                past[0].as_str(),
                past[1].as_str(),
                "/overlay/state/meta",
                "/overlay/state/services/web"
            ],
            "{d:?}"
        );
        assert_eq!(
            d.deletes,
            ["/overlay/state/tasks/web.2", "/overlay/state/tasks/web.3"]
        );

        // Applying the diff to the old keys gives the new state.
        let mut applied = old.clone();
        for (k, v) in &d.puts {
            applied.insert(k.clone(), v.clone());
        }
        for k in &d.deletes {
            applied.remove(k);
        }
        assert_eq!(assemble(&l, &applied).unwrap(), Some(after));
    }

    #[test]
    fn the_leader_key_says_who_leads_and_where_old_bare_names_still_read() {
        let info = LeaderInfo {
            node: "m1".into(),
            control: Some("198.18.0.1:2377".parse().unwrap()),
        };
        assert_eq!(
            info.encode(),
            br#"{"node":"m1","control":"198.18.0.1:2377"}"#.to_vec()
        );
        assert_eq!(LeaderInfo::parse(&info.encode()), info);
        assert_eq!(info.to_string(), "m1 at 198.18.0.1:2377");
        let bare = LeaderInfo {
            node: "n1".into(),
            control: None,
        };
        assert_eq!(
            LeaderInfo::parse(b"n1"),
            bare,
            "as earlier versions wrote it"
        );
        assert_eq!(
            LeaderInfo::parse(b"n1\n"),
            bare,
            "as an operator's etcdctl put may"
        );
        assert_eq!(bare.to_string(), "n1");
        assert_eq!(
            LeaderInfo::parse(br#"{"node":"n2","control":null}"#).node,
            "n2"
        );
        // A bare name that happens to be JSON is still a name.
        assert_eq!(LeaderInfo::parse(b"42").node, "42");
    }

    #[test]
    fn secrets_have_their_own_keys_outside_the_state() {
        let l = Layout::new("/overlay/");
        assert_eq!(l.secret(Secret::CaKey), "/overlay/secrets/ca.key");
        assert_eq!(l.secret(Secret::CaCert), "/overlay/secrets/ca.pem");
        assert_eq!(l.secret(Secret::WorkerJoin), "/overlay/secrets/join-secret");
        assert_eq!(
            l.secret(Secret::ManagerJoin),
            "/overlay/secrets/join-secret-manager"
        );
        assert_eq!(l.secret(Secret::CertExpiry), "/overlay/secrets/cert-expiry");
        for s in Secret::ALL {
            assert!(l.secret(s).starts_with(&l.secrets_prefix()));
            assert!(
                !l.secret(s).starts_with(&l.state_prefix()),
                "not read as state"
            );
        }
        // A state with every collection filled holds no key under the secrets' prefix.
        let kvs = split(&l, &cluster()).unwrap();
        assert!(kvs.keys().all(|k| !k.starts_with(&l.secrets_prefix())));
    }

    #[test]
    fn foreign_or_incomplete_keys_are_refused() {
        let l = Layout::new("/overlay");
        let mut kvs = split(&l, &cluster()).unwrap();
        kvs.insert("/overlay/state/volumes/v1".into(), b"{}".to_vec());
        let e = assemble(&l, &kvs).unwrap_err();
        assert!(matches!(e, LayoutError::UnknownKey(_)), "{e}");

        let mut kvs = split(&l, &cluster()).unwrap();
        kvs.insert(
            "/overlay/state/networks/front".into(),
            b"{not json".to_vec(),
        );
        assert!(matches!(
            assemble(&l, &kvs),
            Err(LayoutError::BadValue { .. })
        ));

        let mut kvs = split(&l, &cluster()).unwrap();
        kvs.remove("/overlay/state/meta");
        assert!(matches!(assemble(&l, &kvs), Err(LayoutError::NoMeta(_))));
    }
}
