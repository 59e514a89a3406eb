//! The cluster control plane: PKI and join tokens ([`pki`]), the framed message stream over
//! QUIC ([`wire`]), the manager's endpoint ([`server`]) and a member node's link to it
//! ([`worker`]), the join tokens of both roles ([`tokens`]), and [`Cluster`], the one handle
//! the API and the agent use whatever this node's role is.

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
use std::sync::Arc;
use tokio::sync::watch;
use worker::Link;

/// How a manager lets others join: the tokens and the address to join at.
#[derive(Clone)]
pub struct JoinInfo {
    pub tokens: Arc<tokens::JoinTokens>,
    pub addr: SocketAddr,
}

/// The cluster as this node sees it: on a manager, the desired state itself; on a worker,
/// the link to the manager. The API and the agent use only this.
#[derive(Clone)]
pub enum Cluster {
    Manager {
        manager: Arc<Manager>,
        join: Option<JoinInfo>,
    },
    Worker(Arc<Link>),
}

impl Cluster {
    /// Applies a change here (manager) or forwards it (worker); returns the revision.
    pub async fn apply(&self, op: Op) -> Result<u64, OpError> {
        match self {
            Cluster::Manager { manager, .. } => {
                let m = manager.clone();
                tokio::task::spawn_blocking(move || m.apply(op))
                    .await
                    .map_err(|e| OpError::internal(e.to_string()))?
            }
            Cluster::Worker(link) => link.apply(op).await,
        }
    }

    /// Desired state, task statuses and node health; a worker's own tasks as it sees them.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self {
            Cluster::Manager { manager, .. } => Arc::new(server::snapshot(manager)),
            Cluster::Worker(link) => {
                let mut s = (*link.snapshot()).clone();
                if let Ok(local) = link.local.read() {
                    s.statuses
                        .extend(crate::manager::statuses::to_snapshot(&local));
                }
                Arc::new(s)
            }
        }
    }

    pub fn subscribe_state(&self) -> watch::Receiver<Arc<ClusterState>> {
        match self {
            Cluster::Manager { manager, .. } => manager.subscribe(),
            Cluster::Worker(link) => link.subscribe_state(),
        }
    }

    /// Where this node's agent reports its tasks.
    pub fn local_board(&self) -> StatusBoard {
        match self {
            Cluster::Manager { manager, .. } => manager.statuses().clone(),
            Cluster::Worker(link) => link.local.clone(),
        }
    }

    pub fn is_manager(&self) -> bool {
        matches!(self, Cluster::Manager { .. })
    }

    /// Whether this node can reach the manager right now (a manager always can).
    pub fn manager_reachable(&self) -> bool {
        match self {
            Cluster::Manager { .. } => true,
            Cluster::Worker(link) => link.is_connected(),
        }
    }

    pub fn join_info(&self) -> Result<&JoinInfo, OpError> {
        match self {
            Cluster::Manager { join: Some(j), .. } => Ok(j),
            Cluster::Manager { join: None, .. } => Err(OpError::bad_request(
                "this node runs standalone: start it with --init --advertise-addr IP to make a cluster",
            )),
            Cluster::Worker(_) => Err(OpError::bad_request("join tokens are only available on the manager")),
        }
    }
}
