//! The cluster control plane: PKI and join tokens ([`pki`]), the framed message stream over
//! QUIC ([`wire`]), the manager's endpoint ([`server`]) and the pushes it sends every
//! session ([`feed`]), a member node's link to it
//! ([`worker`]), the join tokens of both roles ([`tokens`]), and [`Cluster`], the one handle
//! the API and the agent use whatever this node's role is.

pub mod candidate;
pub mod feed;
pub mod logs;
pub mod pki;
pub mod server;
pub mod session;
pub mod tokens;
pub mod wire;
pub mod worker;

use crate::manager::{Manager, StatusBoard};
use protocol::api::OpError;
use protocol::control::{Op, Snapshot};
use protocol::state::ClusterState;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;
use worker::Link;

/// How a manager lets others join: the tokens and the address to join at.
#[derive(Clone)]
pub struct JoinInfo {
    pub tokens: Arc<tokens::JoinTokens>,
    pub addr: SocketAddr,
}

/// What this node follows the desired state through, whoever feeds it: the manager on this
/// node, or the link to one. The agent subscribes once and keeps its subscription when a
/// manager on etcd takes over or steps down, because both feed the same channel and board.
#[derive(Clone)]
pub struct View {
    /// The desired state this node realises.
    pub state: watch::Sender<Arc<ClusterState>>,
    /// Task statuses: this node's own (written by the agent) and, while this node leads,
    /// every other node's as reported.
    pub board: StatusBoard,
    /// `service logs` questions in flight, and where this node's own lines are.
    pub logs: Arc<logs::LogsHub>,
}

impl View {
    /// A view that starts from `state`.
    pub fn new(state: ClusterState) -> View {
        View {
            state: watch::channel(Arc::new(state)).0,
            board: StatusBoard::default(),
            logs: Arc::default(),
        }
    }
}

/// How this node takes part right now: it holds the desired state (a manager that leads, or
/// runs alone), or it follows a manager over its link (a worker, or a manager on etcd that
/// does not lead).
#[derive(Clone)]
pub enum Mode {
    Manager {
        manager: Arc<Manager>,
        join: Option<JoinInfo>,
    },
    Worker(Arc<Link>),
}

/// The cluster as this node sees it: the one handle the API, the agent and the Docker
/// plugin use, whatever this node's part is and however often it changes.
#[derive(Clone)]
pub struct Cluster(Arc<Shared>);

struct Shared {
    mode: RwLock<Mode>,
    view: View,
}

impl Cluster {
    pub fn new(mode: Mode, view: View) -> Cluster {
        Cluster(Arc::new(Shared {
            mode: RwLock::new(mode),
            view,
        }))
    }

    /// This node's part now (a copy: it may change right after).
    pub fn mode(&self) -> Mode {
        self.0
            .mode
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes this node's part (a manager on etcd taking over, or stepping down).
    pub fn set_mode(&self, mode: Mode) {
        *self.0.mode.write().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    pub fn view(&self) -> &View {
        &self.0.view
    }

    /// Applies a change here (manager) or forwards it (worker); returns the revision.
    pub async fn apply(&self, op: Op) -> Result<u64, OpError> {
        match self.mode() {
            Mode::Manager { manager, .. } => tokio::task::spawn_blocking(move || manager.apply(op))
                .await
                .map_err(|e| OpError::internal(e.to_string()))?,
            Mode::Worker(link) => link.apply(op).await,
        }
    }

    /// Desired state, task statuses and node health; a worker's own tasks as it sees them.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.mode() {
            Mode::Manager { manager, .. } => Arc::new(server::snapshot(&manager)),
            Mode::Worker(link) => {
                let mut s = (*link.snapshot()).clone();
                if let Ok(local) = self.0.view.board.read() {
                    s.statuses
                        .extend(crate::manager::statuses::to_snapshot(&local));
                }
                Arc::new(s)
            }
        }
    }

    /// `service logs`: the lines of `q.service`'s tasks on `q.node`, from here or over the
    /// control plane (through the leader).
    pub async fn fetch_logs(&self, q: protocol::control::LogsQuery) -> logs::LogsResult {
        let hub = self.0.view.logs.clone();
        match self.mode() {
            Mode::Manager { manager, .. } => hub.fetch_as_leader(&manager, q).await,
            Mode::Worker(link) if q.node == link.node => {
                hub.local_answer(&link.snapshot().state, &q).await
            }
            Mode::Worker(link) => link.fetch_logs(q).await,
        }
    }

    pub fn subscribe_state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.0.view.state.subscribe()
    }

    /// Where this node's agent reports its tasks.
    pub fn local_board(&self) -> StatusBoard {
        self.0.view.board.clone()
    }

    /// Whether this node can reach the manager right now (a manager always can).
    pub fn manager_reachable(&self) -> bool {
        match self.mode() {
            Mode::Manager { .. } => true,
            Mode::Worker(link) => link.is_connected(),
        }
    }

    pub fn join_info(&self) -> Result<JoinInfo, OpError> {
        match self.mode() {
            Mode::Manager { join: Some(j), .. } => Ok(j),
            Mode::Manager { join: None, .. } => Err(OpError::bad_request(
                "this node runs standalone: start it with --init --advertise-addr IP to make a cluster",
            )),
            Mode::Worker(_) => Err(OpError::bad_request("join tokens are only available on the manager")),
        }
    }
}
