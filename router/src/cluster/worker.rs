//! A member node's side of the control plane.
//!
//! [`join`] runs once: it proves the join token to the manager (whose CA it pins by the
//! token's digest) and gets a certificate for a key that never leaves this node. [`Link::run`]
//! then keeps a mutual-TLS session to the manager: it receives snapshots (the desired state is
//! persisted, so the data plane keeps its last known state when the manager is away), sends a
//! heartbeat report every second, and forwards the state changes operators issue here. It
//! reconnects with back-off and resynchronises on reconnect.

use super::pki::{self, Identity, Token};
use super::wire;
use crate::manager::StatusBoard;
use crate::store::Store;
use protocol::api::OpError;
use protocol::control::{
    Op, Snapshot, TaskReport, ToManager, ToNode, MANAGER_SERVER_NAME, VERSION,
};
use protocol::state::ClusterState;
use protocol::types::NodeName;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const REPORT_EVERY: Duration = Duration::from_secs(1);
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn client_endpoint(bind: Ipv4Addr) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::client(SocketAddr::new(bind.into(), 0))
}

fn quic_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, String> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(wire::transport());
    Ok(cfg)
}

/// Joins the cluster at `manager` with `token`; returns this node's identity and the CA.
pub async fn join(
    manager: SocketAddr,
    token: &Token,
    node: &NodeName,
    advertise: Ipv4Addr,
    data_port: u16,
) -> Result<(Identity, String), String> {
    let (key_pem, csr_pem) = pki::node_key_and_csr(node.as_str()).map_err(|e| e.to_string())?;
    let cfg = quic_client(pki::join_client_config(token).map_err(|e| e.to_string())?)?;
    let endpoint = client_endpoint(advertise)
        .map_err(|e| format!("binding a QUIC socket on {advertise}: {e}"))?;
    let conn = endpoint
        .connect_with(cfg, manager, MANAGER_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("connecting to the manager at {manager}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let msg = ToManager::Join {
        version: VERSION,
        node: node.clone(),
        advertise_addr: advertise,
        data_port,
        secret: token.secret.clone(),
        csr_pem,
    };
    wire::send(&mut send, &msg)
        .await
        .map_err(|e| e.to_string())?;
    let answer = wire::recv::<ToNode>(&mut recv)
        .await
        .map_err(|e| format!("reading the join answer: {e}"))?;
    conn.close(0u32.into(), b"joined");
    endpoint.wait_idle().await;
    match answer {
        ToNode::Joined { cert_pem, ca_pem } => Ok((Identity { cert_pem, key_pem }, ca_pem)),
        ToNode::Refused { reason } => Err(format!("the manager refused the join: {reason}")),
        _ => Err("unexpected answer to join".into()),
    }
}

/// Where a forwarded change's answer goes.
type Reply = oneshot::Sender<Result<u64, OpError>>;
type Pending = Arc<Mutex<HashMap<u64, Reply>>>;

/// Aborts a spawned task when dropped (when its session ends, however it ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The node's live view of the cluster, fed by the manager.
pub struct Link {
    pub manager: SocketAddr,
    snapshot: watch::Sender<Arc<Snapshot>>,
    state: watch::Sender<Arc<ClusterState>>,
    requests: mpsc::Sender<(Op, Reply)>,
    requests_rx: Mutex<Option<mpsc::Receiver<(Op, Reply)>>>,
    connected: AtomicBool,
    next_id: AtomicU64,
    /// This node's own task statuses (written by the agent).
    pub local: StatusBoard,
}

impl Link {
    /// A link that starts from the last state this node saved.
    pub fn new(manager: SocketAddr, last: ClusterState) -> Link {
        let (requests, rx) = mpsc::channel(64);
        let snap = Snapshot {
            state: last.clone(),
            statuses: Default::default(),
            health: Default::default(),
            keys: Default::default(),
        };
        Link {
            manager,
            snapshot: watch::channel(Arc::new(snap)).0,
            state: watch::channel(Arc::new(last)).0,
            requests,
            requests_rx: Mutex::new(Some(rx)),
            connected: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            local: StatusBoard::default(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    pub fn subscribe_state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.subscribe()
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Forwards a change to the manager and waits until this node has seen it applied.
    pub async fn apply(&self, op: Op) -> Result<u64, OpError> {
        let unreachable = || OpError {
            status: 503,
            message: format!(
                "cannot reach the manager at {}; nothing was changed",
                self.manager
            ),
        };
        if !self.is_connected() {
            return Err(unreachable());
        }
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((op, tx))
            .await
            .map_err(|_| unreachable())?;
        let rev = match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => r?,
            _ => return Err(unreachable()),
        };
        // Wait on the same view the API answers from, so `create` then `inspect` finds it.
        let mut rx = self.snapshot.subscribe();
        let _ =
            tokio::time::timeout(REQUEST_TIMEOUT, rx.wait_for(|s| s.state.revision >= rev)).await;
        Ok(rev)
    }

    fn local_reports(&self) -> Vec<TaskReport> {
        self.local
            .read()
            .map(|b| {
                b.iter()
                    .map(|(name, e)| TaskReport {
                        name: name.clone(),
                        id: e.id.clone(),
                        status: e.status.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn accept_snapshot(&self, snap: Snapshot, store: &Store) {
        let newer = snap.state.revision != self.state.borrow().revision;
        let state = newer.then(|| snap.state.clone());
        // The API's view first: whoever waits for a revision then reads this one.
        self.snapshot.send_replace(Arc::new(snap));
        if let Some(state) = state {
            if let Err(e) = store.save(&state) {
                warn!(error = %e, "cannot persist the cluster state");
            }
            self.state.send_replace(Arc::new(state));
        }
    }

    /// Keeps a session to the manager until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        tls: rustls::ClientConfig,
        bind: Ipv4Addr,
        hello: ToManager,
        store: Store,
        shutdown: CancellationToken,
    ) {
        let cfg = match quic_client(tls) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "control-plane TLS setup failed; staying on the last known state");
                return;
            }
        };
        let endpoint = match client_endpoint(bind) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot bind the control-plane socket; staying on the last known state");
                return;
            }
        };
        let Some(mut requests) = self.requests_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let pending: Pending = Arc::default();
        let mut backoff = RECONNECT_MIN;
        loop {
            let result = tokio::select! {
                r = self.session(&endpoint, &cfg, &hello, &store, &mut requests, &pending) => r,
                _ = shutdown.cancelled() => break,
            };
            self.connected.store(false, Ordering::Relaxed);
            for (_, tx) in pending
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .unwrap_or_default()
            {
                let _ = tx.send(Err(OpError {
                    status: 503,
                    message: format!("lost the manager at {}", self.manager),
                }));
            }
            match result {
                Ok(()) => backoff = RECONNECT_MIN,
                Err(e) => {
                    warn!(manager = %self.manager, error = %e, "control session down; forwarding continues on the last known state")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
        endpoint.close(0u32.into(), b"node shutting down");
    }

    async fn session(
        &self,
        endpoint: &quinn::Endpoint,
        cfg: &quinn::ClientConfig,
        hello: &ToManager,
        store: &Store,
        requests: &mut mpsc::Receiver<(Op, Reply)>,
        pending: &Pending,
    ) -> Result<(), String> {
        let conn = endpoint
            .connect_with(cfg.clone(), self.manager, MANAGER_SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        wire::send(&mut send, hello)
            .await
            .map_err(|e| e.to_string())?;
        match wire::recv::<ToNode>(&mut recv)
            .await
            .map_err(|e| e.to_string())?
        {
            ToNode::Welcome { .. } => {}
            ToNode::Refused { reason } => return Err(format!("refused: {reason}")),
            _ => return Err("unexpected answer to Hello".into()),
        }
        info!(manager = %self.manager, "control session up");
        self.connected.store(true, Ordering::Relaxed);
        // Frames are read by their own task: a read cancelled half-way by the select below
        // would lose bytes and desynchronise the stream.
        let (frames_tx, mut frames) = mpsc::channel::<Result<ToNode, String>>(16);
        let _reader = AbortOnDrop(tokio::spawn(async move {
            loop {
                let msg = wire::recv::<ToNode>(&mut recv)
                    .await
                    .map_err(|e| e.to_string());
                let failed = msg.is_err();
                if frames_tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        }));
        let mut tick = tokio::time::interval(REPORT_EVERY);
        loop {
            tokio::select! {
                msg = frames.recv() => match msg.ok_or("control stream reader ended")?? {
                    ToNode::Snapshot(snap) => self.accept_snapshot(*snap, store),
                    ToNode::Response { id, result } => {
                        if let Some(tx) = pending.lock().ok().and_then(|mut p| p.remove(&id)) {
                            let _ = tx.send(result);
                        }
                    }
                    ToNode::Refused { reason } => return Err(format!("refused: {reason}")),
                    _ => {}
                },
                _ = tick.tick() => {
                    let report = ToManager::Report { statuses: self.local_reports() };
                    wire::send(&mut send, &report).await.map_err(|e| e.to_string())?;
                }
                r = requests.recv() => {
                    let Some((op, tx)) = r else { return Ok(()) };
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut p) = pending.lock() {
                        p.insert(id, tx);
                    }
                    wire::send(&mut send, &ToManager::Request { id, op }).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
}
