//! A member node's side of the control plane.
//!
//! [`join`] runs once: it proves the join token to the manager (whose CA it pins by the
//! token's digest) and gets a certificate for a key that never leaves this node; a manager
//! that does not lead redirects it to the leader. [`Link::run`] then keeps a mutual-TLS
//! session to the leading manager: it receives snapshots (the desired state is persisted, so
//! the data plane keeps its last known state when the manager is away), sends a heartbeat
//! report every second, and forwards the state changes operators issue here (a worker
//! refuses an operator's change itself, from its last snapshot, with where changes are made;
//! the manager checks again). It renews the node's certificate over the session (a new key
//! and CSR; the new certificate is saved and used from the next connection). It reconnects
//! with back-off and resynchronises on reconnect.
//!
//! Several managers may serve the control endpoint; one leads. The link tries the managers
//! it was given and those its snapshots list, in turn, follows a redirect to the leader, and
//! keeps the list in the state directory's `manager` file ([`read_managers`],
//! [`write_managers`]) for its next start. A follower manager, which learns the leader from
//! the state store, points its own link there with [`Link::retarget`].
//!
//! Those decisions are [`NodeSession`]'s (`session/node.rs`); [`Link::run`] is its driver:
//! it connects where asked, moves frames between the stream and the session with the time,
//! hands snapshots to the agent and answers to the operators who forwarded changes, keeps
//! the managers' list, and sleeps until the session's next timeout.

use super::logs::{LogsResult, LOGS_TIMEOUT};
use super::pki::{self, Identity, Token};
use super::session::candidates::candidates;
use super::session::node::{Event, NodeSession, RequestError, REQUEST_TIMEOUT};
use super::session::{authz, renewal};
use super::wire;
use super::View;
use crate::store::Store;
use crate::{durable, naming};
use protocol::api::OpError;
use protocol::control::{
    LogsQuery, Op, Snapshot, TaskReport, ToManager, ToNode, MANAGER_SERVER_NAME, VERSION,
};
use protocol::types::NodeName;
use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The session answers every forwarded change within [`REQUEST_TIMEOUT`]; a caller waits
/// this much longer only in case the driver itself is stuck (in a write, say).
const DRIVER_GRACE: Duration = Duration::from_secs(1);

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

/// Joins the cluster at `manager` with `token`; returns this node's identity and the CA. A
/// manager that does not lead redirects the join to the leader: that redirect is followed,
/// a second one is not (the managers disagree on who leads).
pub async fn join(
    manager: SocketAddr,
    token: &Token,
    node: &NodeName,
    advertise: Ipv4Addr,
    data_port: u16,
) -> Result<(Identity, String), String> {
    let (key_pem, csr_pem) = pki::node_key_and_csr(node.as_str()).map_err(|e| e.to_string())?;
    let msg = ToManager::Join {
        version: VERSION,
        node: node.clone(),
        advertise_addr: advertise,
        data_port,
        secret: token.secret.clone(),
        csr_pem,
    };
    let mut at = manager;
    loop {
        let redirected = at != manager;
        match join_at(at, token, &msg, advertise).await? {
            ToNode::Joined { cert_pem, ca_pem } => {
                return Ok((Identity { cert_pem, key_pem }, ca_pem))
            }
            ToNode::Refused { reason } => {
                return Err(format!("the manager refused the join: {reason}"))
            }
            ToNode::Redirect {
                leader: Some(leader),
                ..
            } if !redirected && leader != at => {
                info!(%manager, %leader, "the manager does not lead; joining at the leader");
                at = leader;
            }
            ToNode::Redirect {
                leader: Some(leader),
                reason,
            } if redirected => {
                return Err(format!(
                    "the manager at {manager} redirected the join to the leader at {at}, which \
                     redirected it again, to {leader} ({reason}): the managers disagree on who \
                     leads; try again, or join at the leader"
                ))
            }
            ToNode::Redirect {
                leader: Some(_),
                reason,
            } => {
                return Err(format!(
                    "the manager at {at} does not lead, yet names itself the leader ({reason})"
                ))
            }
            ToNode::Redirect {
                leader: None,
                reason,
            } => {
                return Err(format!(
                    "the manager at {at} does not lead and knows no leader ({reason}); try \
                     again, or join at another manager"
                ))
            }
            _ => return Err("unexpected answer to join".into()),
        }
    }
}

/// Sends `msg` (a `Join`) to the manager at `manager`; returns its answer.
async fn join_at(
    manager: SocketAddr,
    token: &Token,
    msg: &ToManager,
    advertise: Ipv4Addr,
) -> Result<ToNode, String> {
    let cfg = quic_client(pki::join_client_config(token).map_err(|e| e.to_string())?)?;
    let endpoint = client_endpoint(advertise)
        .map_err(|e| format!("binding a QUIC socket on {advertise}: {e}"))?;
    let conn = endpoint
        .connect_with(cfg, manager, MANAGER_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("connecting to the manager at {manager}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    wire::send(&mut send, msg)
        .await
        .map_err(|e| e.to_string())?;
    let answer = wire::recv::<ToNode>(&mut recv)
        .await
        .map_err(|e| format!("reading the join answer: {e}"))?;
    conn.close(0u32.into(), b"joined");
    endpoint.wait_idle().await;
    Ok(answer)
}

/// The managers a member tries, as [`write_managers`] keeps them: one address per line (a
/// file with one address, as nodes wrote before there were several managers, reads the
/// same). A missing or unreadable file holds none; a line that is no address is skipped.
pub fn read_managers(path: &Path) -> Vec<SocketAddr> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(path = %path.display(), error = %e, "cannot read the managers' addresses");
            }
            return Vec::new();
        }
    };
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .filter_map(|line| match line.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                warn!(path = %path.display(), line, "not a manager's address; skipped");
                None
            }
        })
        .collect()
}

/// Replaces the managers' file at `path` with `managers`, one address per line.
pub fn write_managers(path: &Path, managers: &[SocketAddr]) -> Result<(), String> {
    let text: String = managers.iter().map(|a| format!("{a}\n")).collect();
    durable::write_atomic(path, text.as_bytes(), durable::PRIVATE)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The command that shows whether `op` was made, for an operator whose forwarded change
/// went unanswered.
fn how_to_check(op: &Op) -> String {
    let cmd = match op {
        Op::CreateNetwork(c) => format!("network inspect {}", c.name),
        Op::RemoveNetwork(_) => "network ls".into(),
        Op::RotateKey(n) => format!("network inspect {n}"),
        Op::AddVtep { network, .. } | Op::RemoveVtep { network, .. } => {
            format!("network vtep ls {network}")
        }
        Op::CreateService(c) => format!("service inspect {}", c.name),
        Op::ScaleService { name, .. } | Op::UpdateService { name, .. } => {
            format!("service inspect {name}")
        }
        Op::RemoveService(_) => "service ls".into(),
        Op::UpdateNode { node, .. } | Op::SetRole { node, .. } => format!("node inspect {node}"),
        Op::RemoveNode { .. } => "node ls".into(),
        Op::AddEndpoint(e) => format!("network inspect {}", e.network),
        Op::DockerAttach { network, .. } => format!("network inspect {network}"),
        Op::RemoveEndpoint { .. } | Op::BindEndpoint { .. } => {
            return "the API's `GET /endpoints`".into()
        }
    };
    format!("`overlayctl {cmd}`")
}

/// Where a forwarded change's answer goes: the revision that holds it, or why there is none
/// (told to the operator by [`Link::apply`], which knows what to check).
type Reply = oneshot::Sender<Result<u64, RequestError>>;

/// Aborts a spawned task when dropped (when its session ends, however it ends).
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection to the manager: its stream, and the frames its reader task delivers.
/// Dropping it closes the connection.
struct Conn {
    _conn: quinn::Connection,
    send: quinn::SendStream,
    frames: mpsc::Receiver<Result<ToNode, String>>,
    _reader: AbortOnDrop,
}

type Connecting = Pin<Box<dyn Future<Output = Result<Conn, String>> + Send>>;

async fn open(
    endpoint: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    manager: SocketAddr,
) -> Result<Conn, String> {
    let conn = endpoint
        .connect_with(cfg, manager, MANAGER_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let (send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // Frames are read by their own task: a read cancelled half-way by the driver's select
    // would lose bytes and desynchronise the stream.
    let (frames_tx, frames) = mpsc::channel::<Result<ToNode, String>>(16);
    let reader = AbortOnDrop(tokio::spawn(async move {
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
    Ok(Conn {
        _conn: conn,
        send,
        frames,
        _reader: reader,
    })
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

async fn connecting(c: &mut Option<Connecting>) -> Result<Conn, String> {
    match c {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

async fn next_frame(conn: &mut Option<Conn>) -> Option<Result<ToNode, String>> {
    match conn {
        Some(c) => c.frames.recv().await,
        None => std::future::pending().await,
    }
}

/// A member's credentials: its certificate and key (renewed in place, in these files) and
/// the CA it trusts.
pub struct Credentials {
    pub identity: Identity,
    pub ca_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// The QUIC client settings of a member session with `identity`, trusting `ca_pem` (also
/// what the control-plane bench's simulated nodes connect with).
pub fn member_quic(ca_pem: &str, identity: &Identity) -> Result<quinn::ClientConfig, String> {
    quic_client(pki::member_client_config(ca_pem, identity).map_err(|e| e.to_string())?)
}

impl Credentials {
    fn quic(&self) -> Result<quinn::ClientConfig, String> {
        member_quic(&self.ca_pem, &self.identity)
    }

    /// Keeps a renewed certificate for the key made for it: both files, the key first (a
    /// node that stops between the two writes has to join again).
    fn renew(&mut self, node: &NodeName, cert_pem: String, key_pem: String) -> Result<(), String> {
        let info = pki::cert_info_pem(&cert_pem).ok_or("unreadable renewed certificate")?;
        if info.name != node.as_str() || !pki::cert_matches_key(&cert_pem, &key_pem) {
            return Err("the renewed certificate is not for this node's new key".into());
        }
        pki::write_private(&self.key_path, &key_pem).map_err(|e| e.to_string())?;
        pki::write_private(&self.cert_path, &cert_pem).map_err(|e| e.to_string())?;
        self.identity = Identity { cert_pem, key_pem };
        Ok(())
    }

    /// The certificate's role, and when it is due for renewal (Swarm's rule, with jitter).
    fn schedule(&self) -> (Option<protocol::state::Role>, Instant) {
        let now = Instant::now();
        match pki::cert_info_pem(&self.identity.cert_pem) {
            Some(info) => {
                let wait = renewal::renew_in(
                    crate::clock::now(),
                    info.not_before,
                    info.not_after,
                    rand::random::<f64>(),
                );
                (info.role, now + wait)
            }
            None => (None, now),
        }
    }
}

/// The node's live view of the cluster, fed by the manager.
pub struct Link {
    /// This node's name.
    pub node: NodeName,
    /// The managers this link was given, first one first; it learns more from snapshots.
    seeds: Vec<SocketAddr>,
    /// The manager of the current or last attempt (see [`Link::manager`]).
    manager: watch::Sender<Option<SocketAddr>>,
    /// The leader a follower manager was told of ([`Link::retarget`]), for the run loop.
    leader: watch::Sender<Option<SocketAddr>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The node's view: the state it adopts from snapshots, and its own task statuses
    /// (written by the agent), which it reports.
    view: View,
    requests: mpsc::Sender<(Op, Reply)>,
    requests_rx: Mutex<Option<mpsc::Receiver<(Op, Reply)>>>,
    /// Logs questions and answers for the leader (written as they come, when a session is
    /// up).
    logs: mpsc::Sender<ToManager>,
    logs_rx: Mutex<Option<mpsc::Receiver<ToManager>>>,
    connected: AtomicBool,
    /// When the last push from a manager arrived (none yet: `None`).
    last_push: Mutex<Option<std::time::Instant>>,
}

impl Link {
    /// The link of `node` to the managers at `managers` (tried in turn, first one first,
    /// with those its snapshots list), starting from the state in `view` (the last one this
    /// node saved, or followed).
    pub fn new(managers: Vec<SocketAddr>, node: NodeName, view: View) -> Link {
        let (requests, rx) = mpsc::channel(64);
        let (logs, logs_rx) = mpsc::channel(16);
        let last = view.state.borrow().clone();
        let first = candidates(&managers, &last, None).first().copied();
        let snap = Snapshot {
            state: last,
            statuses: Default::default(),
            health: Default::default(),
            keys: Default::default(),
        };
        Link {
            node,
            seeds: managers,
            manager: watch::channel(first).0,
            leader: watch::channel(None).0,
            snapshot: watch::channel(Arc::new(snap)).0,
            view,
            requests,
            requests_rx: Mutex::new(Some(rx)),
            logs,
            logs_rx: Mutex::new(Some(logs_rx)),
            connected: AtomicBool::new(false),
            last_push: Mutex::new(None),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// How long ago the last push from a manager arrived (`None` before the first).
    pub fn since_last_push(&self) -> Option<std::time::Duration> {
        let last = *self.last_push.lock().unwrap_or_else(|p| p.into_inner());
        last.map(|t| t.elapsed())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The manager of the current or last session, or attempt (before the first, the first
    /// candidate); `None` while the link knows none.
    pub fn manager(&self) -> Option<SocketAddr> {
        *self.manager.borrow()
    }

    /// The leader is at `leader`: for a follower manager, which learns it from the state
    /// store. Unless the link is in a session with it (or connecting to it), it drops what
    /// it has and connects there at once. Call it when the leader changes.
    pub fn retarget(&self, leader: SocketAddr) {
        self.leader.send_replace(Some(leader));
    }

    /// What an operator is told when a forwarded change has no revision. A change that was
    /// sent and not answered may have been applied (the answer, or the manager, was lost on
    /// the way back): the operator is told so, and `check` ([`how_to_check`]) says how to
    /// find out before trying again.
    fn request_error(&self, e: RequestError, check: &str) -> OpError {
        let manager = match self.manager() {
            Some(a) => format!("the manager at {a}"),
            None => "a manager (none is known)".into(),
        };
        let unknown = format!(
            "whether the change was made is unknown: check with {check} (here once this \
             node reaches a manager again, or on a manager) before trying again"
        );
        let message = match e {
            RequestError::NotConnected => format!("cannot reach {manager}; nothing was changed"),
            RequestError::TimedOut => format!(
                "{manager} did not answer within {} s; {unknown}",
                REQUEST_TIMEOUT.as_secs()
            ),
            RequestError::Lost => format!("lost {manager} before it answered; {unknown}"),
            RequestError::Refused(e) => return e,
        };
        OpError::unavailable(message)
    }

    /// Forwards a change to the manager and waits until this node has seen it applied.
    pub async fn apply(&self, op: Op) -> Result<u64, OpError> {
        // A worker's operator is told at once where changes are made, manager or not.
        let last = self.snapshot();
        // Without any manager known nothing is sent anyway (the answer below says so).
        if let (Some(me), Some(manager)) = (last.state.nodes.get(&self.node), self.manager()) {
            authz::authorize(&op, &self.node, me.role, &last.state, manager)?;
        }
        let check = how_to_check(&op);
        let failed = |e| self.request_error(e, &check);
        if !self.is_connected() {
            return Err(failed(RequestError::NotConnected));
        }
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((op, tx))
            .await
            .map_err(|_| failed(RequestError::NotConnected))?;
        let rev = match tokio::time::timeout(REQUEST_TIMEOUT + DRIVER_GRACE, rx).await {
            Ok(answer) => answer.unwrap_or(Err(RequestError::Lost)).map_err(failed)?,
            // The driver is stuck: the change may have gone out.
            Err(_) => return Err(failed(RequestError::TimedOut)),
        };
        // Wait on the same view the API answers from, so `create` then `inspect` finds it.
        let mut rx = self.snapshot.subscribe();
        let _ =
            tokio::time::timeout(REQUEST_TIMEOUT, rx.wait_for(|s| s.state.revision >= rev)).await;
        Ok(rev)
    }

    /// `service logs`: asks the leader for `q.node`'s lines (it asks that node).
    pub async fn fetch_logs(&self, q: LogsQuery) -> LogsResult {
        let manager = match self.manager() {
            Some(a) => format!("the manager at {a}"),
            None => "a manager (none is known)".into(),
        };
        if !self.is_connected() {
            return Err(format!("cannot reach {manager}"));
        }
        let hub = self.view.logs.clone();
        let (id, rx) = hub.wait(None);
        if self
            .logs
            .try_send(ToManager::Logs { id, query: q })
            .is_err()
        {
            return Err("too many logs questions under way; try again".into());
        }
        hub.answer_of(id, rx, LOGS_TIMEOUT + DRIVER_GRACE, &manager)
            .await
    }

    fn local_reports(&self) -> Vec<TaskReport> {
        self.view
            .board
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

    /// A push arrived: what this node holds is current now.
    fn pushed(&self) {
        *self.last_push.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }

    fn accept_snapshot(&self, snap: Snapshot, store: &Store) {
        let newer = snap.state.revision != self.view.state.borrow().revision;
        let state = newer.then(|| snap.state.clone());
        // The API's view first: whoever waits for a revision then reads this one.
        self.snapshot.send_replace(Arc::new(snap));
        self.pushed();
        if let Some(state) = state {
            // A manager on etcd keeps no copy: etcd holds the state it follows, and a copy
            // that may lag would be a second truth.
            if !store.on_etcd() {
                if let Err(e) = store.save(&state) {
                    warn!(error = %e, "cannot persist the cluster state");
                }
            }
            self.view.state.send_replace(state);
        }
    }

    /// Keeps a session to the leading manager until `shutdown`: drives a [`NodeSession`].
    pub async fn run(
        self: Arc<Self>,
        mut creds: Credentials,
        bind: Ipv4Addr,
        hello: ToManager,
        store: Store,
        shutdown: CancellationToken,
    ) {
        let mut cfg = match creds.quic() {
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
        let Some(mut logs) = self.logs_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let hub = self.view.logs.clone();
        let mut session = NodeSession::new(Instant::now(), hello, self.seeds.clone());
        session.learn_managers(&self.view.state.borrow());
        let managers_file = naming::manager_addr_file(store.dir());
        let mut leader = self.leader.subscribe();
        if let Some(l) = *leader.borrow_and_update() {
            session.retarget(Instant::now(), l);
        }
        // Why the next attempt goes to another manager, for the line that says so.
        let mut switch: Option<String> = None;
        let (mut cert_role, renew_at) = creds.schedule();
        session.schedule_renewal(renew_at);
        // The key made for a renewal under way.
        let mut next_key: Option<String> = None;
        let mut replies: HashMap<u64, Reply> = HashMap::new();
        let mut conn: Option<Conn> = None;
        let mut pending_connect: Option<Connecting> = None;
        loop {
            while let Some(event) = session.poll() {
                let msg = match event {
                    Event::Connect { to } => {
                        let why = switch.take().unwrap_or_default();
                        if self.manager.send_replace(Some(to)) != Some(to) {
                            info!("control session: trying the manager at {to}{why}");
                        }
                        pending_connect = Some(Box::pin(open(endpoint.clone(), cfg.clone(), to)));
                        continue;
                    }
                    Event::Redirect { leader } => {
                        if let (Some(_), Some(by)) = (leader, self.manager()) {
                            switch = Some(format!(" (redirected by {by})"));
                        }
                        continue;
                    }
                    Event::Managers(list) => {
                        if let Err(e) = write_managers(&managers_file, &list) {
                            warn!(error = %e, "cannot keep the managers' addresses");
                        }
                        continue;
                    }
                    Event::Send(msg) => msg,
                    Event::SendReport => ToManager::Report {
                        statuses: self.local_reports(),
                    },
                    Event::Up => {
                        let manager = self.manager().map(tracing::field::display);
                        info!(manager, "control session up");
                        self.connected.store(true, Ordering::Relaxed);
                        continue;
                    }
                    Event::Current => {
                        self.pushed();
                        continue;
                    }
                    Event::Snapshot(snap) => {
                        // Promoted or demoted: a certificate with the new role, now.
                        let role = snap.state.nodes.get(&self.node).map(|n| n.role);
                        if renewal::role_changed(cert_role, role) && !session.is_renewing() {
                            session.schedule_renewal(Instant::now());
                        }
                        self.accept_snapshot(*snap, &store);
                        continue;
                    }
                    Event::MakeCsr => {
                        match pki::node_key_and_csr(self.node.as_str()) {
                            Ok((key, csr)) => {
                                next_key = Some(key);
                                session.send_renewal(Instant::now(), csr);
                            }
                            Err(e) => {
                                warn!(error = %e, "cannot make a key for the certificate renewal");
                                session.renewal_failed(Instant::now());
                            }
                        }
                        continue;
                    }
                    Event::Renewed { cert_pem } => {
                        let Some(key) = next_key.take() else { continue };
                        let renewed = creds
                            .renew(&self.node, cert_pem, key)
                            .and_then(|()| creds.quic());
                        match renewed {
                            Ok(next) => {
                                cfg = next;
                                let (role, at) = creds.schedule();
                                session.schedule_renewal(at);
                                info!(?role, "renewed this node's certificate; used from the next connection");
                                if role != cert_role {
                                    cert_role = role;
                                    // The manager authorizes by the certificate of the connection.
                                    session.reconnect(
                                        Instant::now(),
                                        "reconnecting with the certificate of this node's new role"
                                            .into(),
                                    );
                                }
                            }
                            Err(e) => {
                                warn!(error = %e, "cannot keep the renewed certificate");
                                session.renewal_failed(Instant::now());
                            }
                        }
                        continue;
                    }
                    Event::Answer { id, result } => {
                        if let Some(tx) = replies.remove(&id) {
                            let _ = tx.send(result);
                        }
                        continue;
                    }
                    Event::LogsFetch { id, query } => {
                        let (hub, link) = (hub.clone(), self.clone());
                        tokio::spawn(async move {
                            let state = link.snapshot().state.clone();
                            let answer = hub.local_answer(&state, &query).await;
                            let _ = link.logs.send(ToManager::LogsLines { id, answer }).await;
                        });
                        continue;
                    }
                    Event::LogsLines { id, answer } => {
                        hub.complete(id, None, answer);
                        continue;
                    }
                    Event::Down { error } => {
                        self.connected.store(false, Ordering::Relaxed);
                        conn = None;
                        pending_connect = None;
                        let manager = self.manager().map(tracing::field::display);
                        if switch.is_some() {
                            // Sent to the leader: the line of the next attempt says where.
                            info!(manager, %error, "control session ended");
                        } else {
                            warn!(manager, %error, "control session down; forwarding continues on the last known state");
                        }
                        continue;
                    }
                };
                let Some(c) = conn.as_mut() else { continue };
                let written = tokio::select! {
                    r = wire::send(&mut c.send, &msg) => r.map_err(|e| e.to_string()),
                    _ = shutdown.cancelled() => break,
                };
                if let Err(e) = written {
                    session.connection_lost(Instant::now(), e);
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = connecting(&mut pending_connect) => {
                    pending_connect = None;
                    match r {
                        Ok(c) => {
                            conn = Some(c);
                            session.connected(Instant::now());
                        }
                        Err(e) => session.connection_lost(Instant::now(), e),
                    }
                }
                f = next_frame(&mut conn) => match f {
                    Some(Ok(msg)) => session.handle_message(Instant::now(), msg),
                    Some(Err(e)) => session.connection_lost(Instant::now(), e),
                    None => session.connection_lost(Instant::now(), "control stream reader ended".into()),
                },
                Ok(()) = leader.changed() => {
                    let named = *leader.borrow_and_update();
                    if let Some(l) = named {
                        if session.manager() != Some(l) {
                            switch = Some(" (named the leader)".into());
                        }
                        session.retarget(Instant::now(), l);
                    }
                }
                Some(msg) = logs.recv() => {
                    // Without a session the asker times out (or the leader does).
                    session.send(msg);
                }
                r = requests.recv() => {
                    let Some((op, tx)) = r else { break };
                    match session.request(Instant::now(), op) {
                        Ok(id) => {
                            replies.insert(id, tx);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                }
                _ = sleep_until(session.poll_timeout()) => session.handle_timeout(Instant::now()),
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        drop(conn);
        endpoint.close(0u32.into(), b"node shutting down");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::control::OpError;
    use protocol::state::ClusterState;

    #[test]
    fn the_managers_file_holds_one_address_a_line_and_reads_the_old_form() {
        let dir = std::env::temp_dir().join(format!("overlay-managers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = naming::manager_addr_file(&dir);
        assert!(read_managers(&path).is_empty(), "no file, no managers");
        // As a node wrote it before there were several managers: one address, no newline.
        std::fs::write(&path, "198.18.0.1:2377").unwrap();
        let one: SocketAddr = "198.18.0.1:2377".parse().unwrap();
        assert_eq!(read_managers(&path), [one]);
        let list: Vec<SocketAddr> = ["198.18.0.1:2377", "[2001:db8::2]:2377"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        write_managers(&path, &list).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "198.18.0.1:2377\n[2001:db8::2]:2377\n"
        );
        assert_eq!(read_managers(&path), list);
        // A line that is no address is skipped, blank lines too.
        std::fs::write(&path, "\n198.18.0.1:2377\nnot an address\n  \n").unwrap();
        assert_eq!(read_managers(&path), [one]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn operators_read_what_became_of_their_change() {
        let link = Link::new(
            vec!["198.18.0.1:2377".parse().unwrap()],
            NodeName::new("n2").unwrap(),
            View::new(ClusterState::default()),
        );
        let check = how_to_check(&Op::ScaleService {
            name: "web".into(),
            replicas: 3,
        });
        assert_eq!(check, "`overlayctl service inspect web`");
        // Not sent: nothing was changed.
        assert_eq!(
            link.request_error(RequestError::NotConnected, &check),
            OpError {
                status: 503,
                message: "cannot reach the manager at 198.18.0.1:2377; nothing was changed".into(),
            }
        );
        // Sent, and unanswered: the manager may have applied it. The operator is told that
        // the outcome is unknown, by whom, and how to find out.
        assert_eq!(
            link.request_error(RequestError::TimedOut, &check),
            OpError {
                status: 503,
                message: "the manager at 198.18.0.1:2377 did not answer within 10 s; whether \
                          the change was made is unknown: check with `overlayctl service \
                          inspect web` (here once this node reaches a manager again, or on a \
                          manager) before trying again"
                    .into(),
            }
        );
        let lost = link.request_error(RequestError::Lost, &check);
        assert_eq!(lost.status, 503);
        assert!(
            lost.message.starts_with(
                "lost the manager at 198.18.0.1:2377 before it answered; whether the change \
                 was made is unknown: check with `overlayctl service inspect web`"
            ),
            "{}",
            lost.message
        );
        let refused = OpError {
            status: 404,
            message: "service web not found".into(),
        };
        assert_eq!(
            link.request_error(RequestError::Refused(refused), &check),
            OpError::not_found("service web not found")
        );
        let none = Link::new(
            vec![],
            NodeName::new("n2").unwrap(),
            View::new(ClusterState::default()),
        );
        assert_eq!(none.manager(), None);
        assert_eq!(
            none.request_error(RequestError::NotConnected, &check)
                .message,
            "cannot reach a manager (none is known); nothing was changed"
        );
    }

    #[test]
    fn each_change_names_what_shows_it() {
        let checks = [
            (Op::RemoveNetwork("a".into()), "`overlayctl network ls`"),
            (
                Op::RotateKey("sec".into()),
                "`overlayctl network inspect sec`",
            ),
            (Op::RemoveService("web".into()), "`overlayctl service ls`"),
            (
                Op::SetRole {
                    node: "n3".into(),
                    role: protocol::state::Role::Manager,
                },
                "`overlayctl node inspect n3`",
            ),
            (
                Op::RemoveNode {
                    node: "n3".into(),
                    force: true,
                },
                "`overlayctl node ls`",
            ),
        ];
        for (op, check) in checks {
            assert_eq!(how_to_check(&op), check, "{op:?}");
        }
    }
}
