//! Control-plane messages between a node and the manager, and their framing.
//!
//! Every message travels on one bidirectional QUIC stream per session, as a frame:
//! a 4-byte big-endian length, then the message in postcard (serde) encoding. The first
//! message of every session carries [`VERSION`], so nodes of different versions are detected
//! and refused with a clear reason instead of misreading each other.
//!
//! Session shapes:
//! - join (no client certificate yet): `ToManager::Join` → `ToNode::Joined` or `Refused`;
//! - member (mutual TLS): `ToManager::Hello` → `ToNode::Welcome` (or `Refused`), then the
//!   manager pushes a full `Snapshot`, then every change and every second a `Delta` against
//!   the push before (the node asks for a full one again with `Resync` if it cannot apply
//!   it), answers `Request`s; the node sends `Report`s, and renews its certificate with
//!   `Renew` → `Renewed`.
//!
//! A manager that does not lead answers either first message with `ToNode::Redirect`, naming
//! the leader's control address if it knows it.

pub use crate::api::OpError;
use crate::api::{NetworkCreate, ServiceCreate, TaskStatus};
use crate::state::ClusterState;
use crate::types::{MacAddr, NodeName};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// Version of the control protocol; both ends must agree. It also stands for what nodes
/// expect of each other's data: since version 2 a node sends other nodes TCP and UDP over
/// IPv4 with the inner checksum partial (the pseudo-header sum, `vnet::offload_partial`),
/// which a version-1 node would drop; so a version-1 node may not join. Version 3: the
/// snapshot's state carries the task history (past tasks whose addresses stay reserved), a
/// field older nodes cannot decode. Version 4 added certificate renewal (`Renew`,
/// `Renewed`), the membership operations (`SetRole`, `RemoveNode`) and the state's record
/// of node certificates. Version 5 added several managers: `Hello` says where a manager
/// candidate serves the control endpoint (`control_addr`, also in the state's `Node`), and a
/// manager that does not lead answers `Join` and `Hello` with `Redirect`. Version 6 added
/// what a rolling update and health checks need: each task carries its spec (`Task.spec`),
/// services a health check and a stop grace period, task statuses a health. Version 7 added
/// rolling updates: a service's `deploy` (spec version, previous spec, update and rollback
/// policies, the rollout under way) and the larger `ServiceCreate`/`ServiceUpdate` in `Op`;
/// and global services (`Service.mode`, `Service.node_slots`). Version 8 pushes deltas: a
/// session starts with a full `Snapshot` and then receives what changed (`Delta`, see
/// [`crate::delta`]), each push numbered; a node that cannot apply one asks for a full
/// snapshot with `Resync`. Version 9 added services from container images: `image` in a
/// service, its spec and its tasks' specs (`state::ContainerImage`). Version 10 carries
/// `service logs` between nodes: `ToManager::Logs` (a member asks the leader for the lines of
/// a service's tasks on one node), `ToNode::LogsFetch` (the leader asks that node),
/// `ToManager::LogsLines` (its answer) and `ToNode::LogsLines` (the answer relayed back).
pub const VERSION: u32 = 10;
/// Largest frame either end accepts (a snapshot of a large cluster fits many times over).
pub const MAX_FRAME: usize = 16 << 20;
/// The name every manager certificate carries, and that nodes verify.
pub const MANAGER_SERVER_NAME: &str = "overlay-manager";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToManager {
    /// Asks to join with a token's secret; the node keeps its private key and sends a CSR.
    Join {
        version: u32,
        node: NodeName,
        advertise_addr: Ipv4Addr,
        data_port: u16,
        secret: String,
        csr_pem: String,
    },
    /// Opens a member session; the node's name must match its certificate.
    Hello {
        version: u32,
        node: NodeName,
        advertise_addr: Ipv4Addr,
        data_port: u16,
        /// Where this node serves the control endpoint, if it is a manager candidate (`None`
        /// for a worker). The manager records it in the node's entry of the state, so every
        /// member learns where the managers are.
        control_addr: Option<SocketAddr>,
    },
    /// Heartbeat: what the node's tasks are doing (also sent when nothing changed).
    Report { statuses: Vec<TaskReport> },
    /// A state change an operator issued on this node, forwarded to the manager.
    Request { id: u64, op: Op },
    /// Asks for a new certificate for a new key (the node keeps the key; this is its CSR).
    /// The manager signs it with the node's role in the desired state.
    Renew { csr_pem: String },
    /// A `Delta` did not apply to what the node holds: send the whole snapshot next.
    Resync,
    /// `service logs` on a member: the lines of `query.service`'s tasks on `query.node`,
    /// answered with `ToNode::LogsLines` of the same `id`.
    Logs { id: u64, query: LogsQuery },
    /// The answer to `ToNode::LogsFetch` `id`: this node's lines, or why there are none.
    LogsLines {
        id: u64,
        answer: Result<LogsAnswer, String>,
    },
}

/// Largest `tail` a logs query may ask for (per task).
pub const MAX_LOGS_TAIL: u64 = 100_000;
/// Most bytes of lines in one logs answer (all its tasks together); the asker asks again
/// from where the answer stopped (`TaskLines::more`).
pub const MAX_LOGS_ANSWER: usize = 512 << 10;

/// What `service logs` asks a node for: the lines of the service's tasks there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsQuery {
    pub service: String,
    /// The node whose tasks are asked for.
    pub node: NodeName,
    /// Only the last `tail` lines of each task (on a task's first answer).
    pub tail: Option<u64>,
    pub timestamps: bool,
    /// Task id → where the next lines start (what the previous answer's `next` said); a
    /// task not listed starts from its tail (or its start).
    pub from: BTreeMap<String, u64>,
}

/// A node's lines for a [`LogsQuery`], one entry per task of the service it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsAnswer {
    pub tasks: Vec<TaskLines>,
}

/// One task's whole lines from one answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLines {
    /// The task's id.
    pub task: String,
    /// Whole lines (each ending in `\n`), unprefixed.
    pub data: Vec<u8>,
    /// Where the lines after these start: the `from` of the next query.
    pub next: u64,
    /// Lines were left out to keep the answer small: ask again from `next` at once.
    pub more: bool,
    /// Why this task's lines cannot be read, if they cannot.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    pub name: String,
    pub id: String,
    pub status: TaskStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToNode {
    Joined {
        cert_pem: String,
        ca_pem: String,
    },
    Welcome {
        version: u32,
    },
    /// The whole view, as push number `push` of this session (the first push, and after a
    /// `Resync`).
    Snapshot {
        push: u64,
        snapshot: Box<Snapshot>,
    },
    /// The answer to a `Request`: the state revision that holds the change, or an error with
    /// an HTTP-like status.
    Response {
        id: u64,
        result: Result<u64, OpError>,
    },
    Refused {
        reason: String,
    },
    /// The answer to `Renew`: the node's new certificate, used from its next connection.
    Renewed {
        cert_pem: String,
    },
    /// The answer of a manager that does not lead to `Join` or `Hello`: the leader's control
    /// address if it knows it, and why.
    Redirect {
        leader: Option<SocketAddr>,
        reason: String,
    },
    /// What changed from push `base` (which the node holds) to push `push`. Also sent when
    /// nothing changed: it tells the node the manager is there.
    Delta {
        base: u64,
        push: u64,
        delta: Box<crate::delta::SnapshotDelta>,
    },
    /// The leader asks this node for its lines (answered with `ToManager::LogsLines`).
    LogsFetch {
        id: u64,
        query: LogsQuery,
    },
    /// The answer to `ToManager::Logs` `id`.
    LogsLines {
        id: u64,
        answer: Result<LogsAnswer, String>,
    },
}

/// The manager's view pushed to every node: the desired state plus what it observes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Shared: the manager's pushes and a node's copies hold one state until it changes.
    pub state: Arc<ClusterState>,
    /// Task name → (task id, status) as last reported by the task's node.
    pub statuses: BTreeMap<String, (String, TaskStatus)>,
    /// Node name → whether it is heartbeating.
    pub health: BTreeMap<NodeName, NodeHealth>,
    /// The keys of encrypted networks. Only ever sent over the control plane's mutual TLS
    /// and held in memory: not part of [`ClusterState`], so never in a state file.
    #[serde(default)]
    pub keys: Keyring,
}

/// Each encrypted network's live keys, oldest first.
pub type Keyring = BTreeMap<crate::types::NetworkName, Vec<NetworkKey>>;

/// One key of an encrypted network (see [`crate::esp`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkKey {
    /// 7 bits, in the SPI.
    pub id: u8,
    pub secret: [u8; crate::esp::SECRET_LEN],
    /// Unix milliseconds from which nodes send with it (received from the moment they
    /// have it: a new key is handed out before any node sends with it).
    pub active_from_ms: u64,
    /// Unix milliseconds after which the manager drops it (set when a newer key arrives).
    pub retire_at_ms: Option<u64>,
}

impl std::fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkKey")
            .field("id", &self.id)
            .field("active_from_ms", &self.active_from_ms)
            .field("retire_at_ms", &self.retire_at_ms)
            .finish_non_exhaustive()
    }
}

/// The key a node sends with at `now_ms`: the newest one already active.
pub fn send_key(keys: &[NetworkKey], now_ms: u64) -> Option<&NetworkKey> {
    keys.iter()
        .filter(|k| k.active_from_ms <= now_ms)
        .max_by_key(|k| k.active_from_ms)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeHealth {
    Ready,
    Down,
}

/// A state-changing operation, as the API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    CreateNetwork(NetworkCreate),
    RemoveNetwork(String),
    CreateService(Box<ServiceCreate>),
    ScaleService {
        name: String,
        replicas: u32,
    },
    RemoveService(String),
    AddVtep {
        network: String,
        vtep: crate::state::Vtep,
    },
    RemoveVtep {
        network: String,
        mac: MacAddr,
    },
    UpdateNode {
        node: String,
        availability: crate::state::Availability,
    },
    UpdateService {
        name: String,
        update: Box<crate::api::ServiceUpdate>,
    },
    /// `network rotate-key NAME`.
    RotateKey(String),
    /// A container's interface, for a runtime on the asking node.
    AddEndpoint(crate::state::EndpointRequest),
    RemoveEndpoint {
        container: String,
        ifname: String,
    },
    /// A node's Docker made (`attached`) or removed its network for `network`.
    DockerAttach {
        network: String,
        node: String,
        attached: bool,
    },
    /// Docker's join: the endpoint's container namespace.
    BindEndpoint {
        container: String,
        ifname: String,
        netns: String,
    },
    /// `node promote` / `node demote`.
    SetRole {
        node: String,
        role: crate::state::Role,
    },
    /// `node rm [--force]`.
    RemoveNode {
        node: String,
        force: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("control frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed control message: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Encodes a message as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a frame's length prefix before the body is read.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame's body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(postcard::from_bytes(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{TaskState, TaskStatus};
    use proptest::prelude::*;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(m: &T) {
        let f = encode(m).unwrap();
        let len = frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, f.len() - 4);
        assert_eq!(&decode::<T>(&f[4..]).unwrap(), m);
    }

    #[test]
    fn messages_roundtrip() {
        roundtrip(&ToManager::Hello {
            version: VERSION,
            node: NodeName::new("n2").unwrap(),
            advertise_addr: Ipv4Addr::new(198, 18, 0, 2),
            data_port: 4789,
            control_addr: None,
        });
        roundtrip(&ToManager::Hello {
            version: VERSION,
            node: NodeName::new("m2").unwrap(),
            advertise_addr: Ipv4Addr::new(198, 18, 0, 3),
            data_port: 4789,
            control_addr: Some("198.18.0.3:2377".parse().unwrap()),
        });
        let query = LogsQuery {
            service: "web".into(),
            node: NodeName::new("n2").unwrap(),
            tail: Some(3),
            timestamps: false,
            from: [("abc".to_string(), 120u64)].into_iter().collect(),
        };
        roundtrip(&ToManager::Logs {
            id: 4,
            query: query.clone(),
        });
        roundtrip(&ToNode::LogsFetch { id: 5, query });
        let answer = LogsAnswer {
            tasks: vec![TaskLines {
                task: "abc".into(),
                data: b"hello\n".to_vec(),
                next: 126,
                more: false,
                error: None,
            }],
        };
        roundtrip(&ToManager::LogsLines {
            id: 5,
            answer: Ok(answer.clone()),
        });
        roundtrip(&ToNode::LogsLines {
            id: 4,
            answer: Err("node n2 is down".into()),
        });
        roundtrip(&ToManager::Report {
            statuses: vec![TaskReport {
                name: "web.1".into(),
                id: "abc".into(),
                status: TaskStatus {
                    state: TaskState::Running,
                    error: None,
                    pid: Some(42),
                    restarts: 1,
                    since: 7,
                    health: Some(crate::api::TaskHealth::Healthy),
                },
            }],
        });
        roundtrip(&ToManager::Request {
            id: 9,
            op: Op::ScaleService {
                name: "web".into(),
                replicas: 3,
            },
        });
        roundtrip(&ToNode::Response {
            id: 9,
            result: Err(OpError {
                status: 404,
                message: "service web not found".into(),
            }),
        });
        let key = NetworkKey {
            id: 3,
            secret: [9; crate::esp::SECRET_LEN],
            active_from_ms: 1,
            retire_at_ms: Some(2),
        };
        let net = crate::types::NetworkName::new("sec").unwrap();
        roundtrip(&ToNode::Snapshot {
            push: 1,
            snapshot: Box::new(Snapshot {
                state: Arc::new(ClusterState::default()),
                statuses: BTreeMap::new(),
                health: BTreeMap::new(),
                keys: [(net, vec![key.clone()])].into(),
            }),
        });
        // The secret never shows in logs.
        assert!(!format!("{key:?}").contains('9'));
        // Nodes with and without a control address, in the binary encoding.
        let mut state = ClusterState::default();
        for (n, control) in [("m1", Some("198.18.0.1:2377")), ("w1", None)] {
            let name = NodeName::new(n).unwrap();
            state.nodes.insert(
                name.clone(),
                crate::state::Node {
                    name,
                    role: crate::state::Role::Manager,
                    availability: crate::state::Availability::Active,
                    advertise_addr: None,
                    data_port: 4789,
                    joined_at: 0,
                    control_addr: control.map(|a| a.parse().unwrap()),
                },
            );
        }
        let snap = Snapshot {
            state: Arc::new(state),
            statuses: BTreeMap::new(),
            health: BTreeMap::new(),
            keys: Keyring::new(),
        };
        roundtrip(&ToNode::Snapshot {
            push: 7,
            snapshot: Box::new(snap.clone()),
        });
        let mut next = snap.clone();
        Arc::make_mut(&mut next.state).revision = 9;
        roundtrip(&ToNode::Delta {
            base: 7,
            push: 8,
            delta: Box::new(crate::delta::SnapshotDelta::between(&snap, &next)),
        });
        roundtrip(&ToManager::Resync);
        roundtrip(&ToManager::Request {
            id: 1,
            op: Op::RotateKey("sec".into()),
        });
        roundtrip(&ToManager::Renew {
            csr_pem: "csr".into(),
        });
        roundtrip(&ToNode::Renewed {
            cert_pem: "cert".into(),
        });
        roundtrip(&ToNode::Redirect {
            leader: Some("[2001:db8::1]:2377".parse().unwrap()),
            reason: "m2 follows m1".into(),
        });
        roundtrip(&ToNode::Redirect {
            leader: None,
            reason: "no leader yet".into(),
        });
        roundtrip(&ToManager::Request {
            id: 2,
            op: Op::RemoveNode {
                node: "n2".into(),
                force: true,
            },
        });
    }

    #[test]
    fn a_refusal_keeps_its_wire_bytes() {
        // Nodes of the same version must read each other's refusals: status and message
        // as postcard lays out a struct of those two fields.
        let f = encode(&ToNode::Response {
            id: 9,
            result: Err(OpError::not_found("service web not found")),
        })
        .unwrap();
        let mut want = vec![3, 9, 1, 0x94, 0x03, 21];
        want.extend_from_slice(b"service web not found");
        assert_eq!(&f[4..], &want[..]);
    }

    #[test]
    fn oversized_frames_are_refused_before_reading() {
        assert!(matches!(
            frame_len([0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(frame_len([0, 0, 0, 5]).unwrap(), 5);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<ToManager>(&body);
            let _ = decode::<ToNode>(&body);
        }
    }
}
