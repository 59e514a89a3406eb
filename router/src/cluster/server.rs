//! The manager's control endpoint (QUIC + TLS 1.3, mutual where it matters).
//!
//! A connection without a client certificate may only `Join`: it must show the join token's
//! secret, and gets a certificate for its CSR signed by the cluster CA. A connection with a
//! client certificate (verified against the CA by rustls) opens a member session with
//! `Hello`; the node name it claims must be the certificate's. In a session the manager
//! pushes a [`Snapshot`], then what changed whenever the state changes and every second
//! (statuses, health: the leader's one [`Feed`] builds each push once for all sessions), takes
//! `Report`s (heartbeats), answers forwarded `Request`s (a worker's changes are refused:
//! only managers change the cluster) and signs renewed certificates. Anything else is
//! refused with a log line, and changes nothing.
//!
//! Those decisions are [`MemberSession`]'s (`session/manager.rs`); this file is its driver:
//! it reads frames from the stream, feeds them in with the time, does what the session asks
//! (write, push a snapshot, sign, record, apply) and sleeps until the session's next timeout.

use super::feed::{Feed, Push, ToSend};
use super::pki::{self, Ca};
use super::session::manager::{Action, MemberSession, PeerCert, Roster, FIRST_MESSAGE_TIMEOUT};
use super::tokens::JoinTokens;
use super::wire;
use super::worker::AbortOnDrop;
use crate::manager::{statuses, Manager, StatusEntry};
use protocol::api::TaskState;
use protocol::control::{NodeHealth, Op, OpError, Snapshot, TaskReport, ToManager, ToNode};
use protocol::state::{ClusterState, NodeCert, Role};
use protocol::types::NodeName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a refused peer's stream stays open so the refusal reaches it.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);
/// Forwarded changes waiting to be applied, per session (the reader waits beyond that).
const APPLY_QUEUE: usize = 64;
/// A member's logs questions the leader works on at once (each for up to 5 s); more are
/// answered with an error at once.
const LOGS_IN_FLIGHT: usize = 64;

pub struct ServerCtx {
    pub manager: Arc<Manager>,
    pub ca: Ca,
    /// The join tokens of both roles.
    pub tokens: Arc<JoinTokens>,
    /// How long the node certificates it signs last (`--cert-expiry`).
    pub cert_expiry: Duration,
    /// Where this endpoint listens (named in refusals).
    pub control: SocketAddr,
    /// This leadership's pushes.
    pub feed: Feed,
    /// Push the whole snapshot every time, never a delta (`--control-full-snapshots`: the
    /// control-plane bench's baseline).
    pub full_snapshots: bool,
}

impl ServerCtx {
    /// The context of one leadership of `manager`; starts its feed (needs a tokio runtime).
    pub fn new(
        manager: Arc<Manager>,
        ca: Ca,
        tokens: Arc<JoinTokens>,
        cert_expiry: Duration,
        control: SocketAddr,
        full_snapshots: bool,
    ) -> ServerCtx {
        ServerCtx {
            feed: Feed::spawn(manager.clone()),
            manager,
            ca,
            tokens,
            cert_expiry,
            control,
            full_snapshots,
        }
    }

    /// Signs `csr_pem` for `node` with `role`; returns the certificate and what the state
    /// records of it.
    pub(super) fn sign(
        &self,
        node: &NodeName,
        role: Role,
        csr_pem: &str,
    ) -> Result<(String, NodeCert), String> {
        let cert = self
            .ca
            .sign_node_csr(node.as_str(), role, self.cert_expiry, csr_pem)
            .map_err(|e| e.to_string())?;
        let info = pki::cert_info_pem(&cert).ok_or("cannot read the certificate just signed")?;
        let record = NodeCert {
            serial: info.serial,
            not_after: info.not_after,
            role,
        };
        Ok((cert, record))
    }
}

/// Builds the snapshot the manager pushes: desired state, reported statuses, node health.
pub fn snapshot(manager: &Manager) -> Snapshot {
    let state = manager.snapshot();
    let statuses = manager
        .statuses()
        .read()
        .map(|b| statuses::to_snapshot(&b))
        .unwrap_or_default();
    let health = manager.health().report(&state);
    // What a down node last said about its tasks is no longer known to be true.
    let mut statuses = statuses;
    for t in state.tasks.values() {
        if health.get(&t.node) == Some(&NodeHealth::Down) {
            if let Some((_, st)) = statuses.get_mut(&t.name) {
                st.state = TaskState::Unknown;
                st.error = Some(format!("node {} is down", t.node));
                st.pid = None;
            }
        }
    }
    Snapshot {
        state,
        statuses,
        health,
        keys: manager.keys(),
    }
}

/// What this control endpoint does now. A manager on etcd switches between the two as it
/// takes over and steps down; a manager on the file store always leads.
#[derive(Clone)]
pub enum Serving {
    /// This manager leads: it admits nodes and runs their sessions.
    Leader(Arc<ServerCtx>),
    /// This manager follows: every connection is sent to the leader's control address
    /// (when known), so a node may join or connect at any manager.
    Follower { leader: Option<SocketAddr> },
}

impl Serving {
    /// Whether a session run for `ctx` may go on under this.
    fn serves(&self, ctx: &Arc<ServerCtx>) -> bool {
        matches!(self, Serving::Leader(c) if Arc::ptr_eq(c, ctx))
    }
}

/// Accepts control connections until `shutdown`; each is served as `serving` says when it
/// arrives, and a session ends when this manager stops leading.
pub async fn serve(
    endpoint: quinn::Endpoint,
    serving: watch::Receiver<Serving>,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = shutdown.cancelled() => break,
        };
        let serving = serving.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(%remote, error = %e, "refused control connection: handshake failed");
                    return;
                }
            };
            let now = serving.borrow().clone();
            match now {
                Serving::Leader(ctx) => handle(conn, remote, ctx, serving, shutdown).await,
                Serving::Follower { leader } => redirect(conn, remote, leader).await,
            }
        });
    }
    endpoint.close(0u32.into(), b"manager shutting down");
}

/// A follower's answer to whatever a node says first (`Join` or `Hello`): the leader is
/// elsewhere.
async fn redirect(conn: quinn::Connection, remote: SocketAddr, leader: Option<SocketAddr>) {
    let first = async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        wire::recv_first::<ToManager>(&mut recv).await.ok()?;
        Some(send)
    };
    let Ok(Some(mut send)) = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, first).await else {
        return;
    };
    tracing::debug!(%remote, ?leader, "redirected a control connection to the leader");
    send_redirect(&mut send, leader).await;
}

/// Tells a node that this manager does not lead (any more), and where the leader is.
async fn send_redirect(send: &mut quinn::SendStream, leader: Option<SocketAddr>) {
    let reason = match leader {
        Some(a) => format!("this manager does not lead the cluster; the leader is at {a}"),
        None => "this manager does not lead the cluster and knows of no leader now (is etcd \
                 reachable?)"
            .to_string(),
    };
    let _ = wire::send(send, &ToNode::Redirect { leader, reason }).await;
    let _ = send.finish();
    tokio::time::sleep(REFUSAL_LINGER).await;
}

/// The client certificate the peer showed (verified by TLS against the cluster CA).
fn peer_cert(conn: &quinn::Connection) -> Option<PeerCert> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let info = pki::cert_info(certs.first()?.as_ref())?;
    Some(PeerCert {
        name: info.name,
        role: info.role,
        serial: info.serial,
    })
}

/// Whom the manager admits, answered from its state.
struct ManagerRoster<'a>(&'a ServerCtx);

impl Roster for ManagerRoster<'_> {
    fn join_role(&self, secret: &str) -> Option<Role> {
        self.0.tokens.role_of(secret)
    }

    fn is_member(&self, node: &NodeName) -> bool {
        self.0.manager.snapshot().nodes.contains_key(node)
    }

    fn member_down_for(&self, node: &NodeName) -> Option<Duration> {
        self.is_member(node)
            .then(|| self.0.manager.health().down_for(node))
    }

    fn reschedule_after(&self) -> Duration {
        self.0.manager.reschedule_after()
    }

    fn cert_allowed(&self, node: &NodeName, serial: &str) -> bool {
        self.0
            .manager
            .snapshot()
            .cert_allowed(node, serial, crate::clock::now())
    }

    fn state(&self) -> Arc<ClusterState> {
        self.0.manager.snapshot()
    }

    fn control_addr(&self) -> SocketAddr {
        self.0.control
    }
}

/// Records a heartbeat and what a node says of its own tasks (only of tasks placed on it).
fn record_report(manager: &Manager, node: &NodeName, statuses: Vec<TaskReport>) {
    manager.health().beat(node);
    manager.note_reported(node, statuses.iter().map(|r| r.id.clone()).collect());
    let state = manager.snapshot();
    if let Ok(mut board) = manager.statuses().write() {
        for r in statuses {
            if state
                .tasks
                .get(&r.name)
                .is_some_and(|t| t.node == *node && t.id == r.id)
            {
                board.insert(
                    r.name,
                    StatusEntry {
                        id: r.id,
                        status: r.status,
                    },
                );
            }
        }
    }
}

/// Applies a session's forwarded changes one after another, in the order they came.
struct Applier {
    ops: mpsc::Sender<(u64, Op)>,
    results: mpsc::UnboundedReceiver<(u64, Result<u64, OpError>)>,
    _task: AbortOnDrop,
}

impl Applier {
    fn spawn(manager: Arc<Manager>) -> Applier {
        let (ops, mut queue) = mpsc::channel::<(u64, Op)>(APPLY_QUEUE);
        // Unbounded, but never longer than the bounded queue feeding it: the driver cannot
        // block the applier while the applier blocks it.
        let (results_tx, results) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some((id, op)) = queue.recv().await {
                let m = manager.clone();
                let result = tokio::task::spawn_blocking(move || m.apply(op))
                    .await
                    .unwrap_or_else(|e| Err(OpError::internal(e.to_string())));
                if results_tx.send((id, result)).is_err() {
                    return;
                }
            }
        });
        Applier {
            ops,
            results,
            _task: AbortOnDrop(task),
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the feed has a new push (`false`: the feed is gone); never before the
/// session is open.
async fn changed(rx: &mut Option<watch::Receiver<Arc<Push>>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Drives one control connection's [`MemberSession`] until it ends or `shutdown`.
async fn handle(
    conn: quinn::Connection,
    remote: SocketAddr,
    ctx: Arc<ServerCtx>,
    mut serving: watch::Receiver<Serving>,
    shutdown: CancellationToken,
) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let mut session = MemberSession::new(Instant::now(), peer_cert(&conn));
    // Frames are read by their own task: a read cancelled half-way by the select below
    // would lose bytes and desynchronise the stream. The first (Join or Hello) is capped
    // small, and nothing more is read until the session is open: a peer not admitted
    // (joining, refused) makes the manager allocate at most `FIRST_FRAME_MAX`.
    let (frames_tx, mut frames) = mpsc::channel::<Result<ToManager, String>>(16);
    let (open_tx, open_rx) = tokio::sync::oneshot::channel::<()>();
    let mut open_tx = Some(open_tx);
    let _reader = AbortOnDrop(tokio::spawn(async move {
        let first = wire::recv_first::<ToManager>(&mut recv)
            .await
            .map_err(|e| e.to_string());
        let failed = first.is_err();
        if frames_tx.send(first).await.is_err() || failed || open_rx.await.is_err() {
            return;
        }
        loop {
            let msg = wire::recv::<ToManager>(&mut recv)
                .await
                .map_err(|e| e.to_string());
            let failed = msg.is_err();
            if frames_tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    }));
    let mut applier = Applier::spawn(ctx.manager.clone());
    // What else this session writes to its node: logs questions the leader relays to it,
    // and answers to its own (registered with the hub once the session is up).
    let hub = ctx.manager.logs().clone();
    let (outbox_tx, mut outbox) = mpsc::channel::<ToNode>(16);
    let mut detach = Detach(hub.clone(), None, outbox_tx.clone());
    let logs_in_flight = Arc::new(tokio::sync::Semaphore::new(LOGS_IN_FLIGHT));
    let mut changes = None;
    let roster = ManagerRoster(&ctx);
    // The member, once its session is up (for the log line when it ends).
    let mut up: Option<NodeName> = None;
    // The push the node holds (`None`: none yet, or it asked for a full one).
    let mut held: Option<u64> = None;
    loop {
        while let Some(action) = session.poll() {
            let msg = match action {
                Action::Send(msg) => msg,
                Action::Resync | Action::PushSnapshot => {
                    if action == Action::Resync {
                        tracing::debug!(node = ?session.node(), "node asked for a full snapshot");
                        held = None;
                    }
                    let push = ctx.feed.current();
                    let frame = match push.frame_for(held, ctx.full_snapshots) {
                        Ok(ToSend::Nothing) => continue,
                        Ok(ToSend::Delta(f) | ToSend::Full(f)) => f,
                        Err(e) => {
                            warn!(node = ?session.node(), error = %e, "cannot encode a snapshot push");
                            continue;
                        }
                    };
                    if let Err(e) = wire::send_frame(&mut send, &frame).await {
                        warn!(%remote, node = ?session.node(), error = %e, "control session write failed");
                        return ended(remote, up);
                    }
                    held = Some(push.number);
                    continue;
                }
                Action::Join {
                    node,
                    role,
                    advertise_addr,
                    data_port,
                    csr_pem,
                } => {
                    let signed = ctx.sign(&node, role, &csr_pem).and_then(|(cert, record)| {
                        ctx.manager
                            .admit_joined(&node, advertise_addr, data_port, role, record)
                            .map(|()| cert)
                            .map_err(|e| e.message)
                    });
                    match signed {
                        Ok(cert_pem) => {
                            info!(%remote, %node, %advertise_addr, ?role, "node joined the cluster");
                            session.joined(cert_pem, ctx.ca.cert_pem.clone());
                        }
                        Err(reason) => session.refuse(reason),
                    }
                    continue;
                }
                Action::Admit {
                    node,
                    advertise_addr,
                    data_port,
                    control_addr,
                } => {
                    match ctx
                        .manager
                        .upsert_node(&node, advertise_addr, data_port, control_addr)
                    {
                        Ok(()) => {
                            // Pushes from here on are sent as they come; the first one (which
                            // may predate this node's record) follows at once, and the next one
                            // holds the record.
                            changes = Some(ctx.feed.subscribe());
                            session.admitted(Instant::now());
                            // A member now: its reader goes on to the session's frames.
                            if let Some(open) = open_tx.take() {
                                let _ = open.send(());
                            }
                        }
                        Err(e) => session.refuse(e.message),
                    }
                    continue;
                }
                Action::Up { node } => {
                    info!(%remote, %node, "node session up");
                    ctx.manager.health().beat(&node);
                    hub.attach(node.clone(), outbox_tx.clone());
                    detach.1 = Some(node.clone());
                    up = Some(node);
                    continue;
                }
                Action::Renew { node, csr_pem } => {
                    let role = ctx.manager.role_of(&node).unwrap_or(Role::Worker);
                    let renewed = ctx.sign(&node, role, &csr_pem).and_then(|(cert, record)| {
                        ctx.manager
                            .record_renewal(&node, record)
                            .map(|()| cert)
                            .map_err(|e| e.message)
                    });
                    match renewed {
                        Ok(cert_pem) => {
                            info!(%node, ?role, "renewed the node's certificate");
                            session.renewed(cert_pem);
                        }
                        // The node asks again later.
                        Err(error) => warn!(%node, %error, "cannot renew the node's certificate"),
                    }
                    continue;
                }
                Action::Heartbeat { node, statuses } => {
                    record_report(&ctx.manager, &node, statuses);
                    continue;
                }
                Action::Apply { id, op } => {
                    if applier.ops.send((id, op)).await.is_err() {
                        return ended(remote, up);
                    }
                    continue;
                }
                Action::Logs { id, query } => {
                    let (hub, manager, out) = (hub.clone(), ctx.manager.clone(), outbox_tx.clone());
                    let Ok(permit) = logs_in_flight.clone().try_acquire_owned() else {
                        let answer = Err(format!(
                            "more than {LOGS_IN_FLIGHT} logs questions of this node under way"
                        ));
                        let _ = out.try_send(ToNode::LogsLines { id, answer });
                        continue;
                    };
                    tokio::spawn(async move {
                        let answer = hub.fetch_as_leader(&manager, query).await;
                        let _ = out.send(ToNode::LogsLines { id, answer }).await;
                        drop(permit);
                    });
                    continue;
                }
                Action::LogsLines { node, id, answer } => {
                    hub.complete(id, Some(&node), answer);
                    continue;
                }
                Action::Ignored { what } => {
                    warn!(node = ?session.node(), message = what, "unexpected control message; ignored");
                    continue;
                }
                Action::Refuse { reason } => {
                    warn!(%remote, %reason, "refused control session");
                    let _ = wire::send(&mut send, &ToNode::Refused { reason }).await;
                    let _ = send.finish();
                    tokio::time::sleep(REFUSAL_LINGER).await;
                    return;
                }
                Action::Close { reason } => {
                    warn!(node = ?session.node(), error = %reason, "control session read failed");
                    return ended(remote, up);
                }
            };
            if let Err(e) = wire::send(&mut send, &msg).await {
                warn!(%remote, node = ?session.node(), error = %e, "control session write failed");
                return ended(remote, up);
            }
            if matches!(msg, ToNode::Joined { .. }) {
                let _ = send.finish();
                let _ = conn.closed().await;
                return;
            }
        }
        tokio::select! {
            f = frames.recv() => match f {
                Some(Ok(msg)) => session.handle_message(msg, &roster),
                Some(Err(e)) => session.stream_failed(e),
                None => session.stream_failed("control stream reader ended".into()),
            },
            r = applier.results.recv() => if let Some((id, result)) = r {
                session.applied(id, result);
            },
            Some(msg) = outbox.recv() => {
                if let Err(e) = wire::send(&mut send, &msg).await {
                    warn!(%remote, node = ?session.node(), error = %e, "control session write failed");
                    return ended(remote, up);
                }
            }
            c = changed(&mut changes) => {
                if !c {
                    break;
                }
                session.state_changed(&roster);
            }
            _ = sleep_until(session.poll_timeout()) => session.handle_timeout(Instant::now()),
            // Stepped down: the node is sent to the new leader.
            r = serving.changed() => {
                let now = serving.borrow().clone();
                if r.is_err() || !now.serves(&ctx) {
                    if let Serving::Follower { leader } = now {
                        send_redirect(&mut send, leader).await;
                    }
                    break;
                }
            }
            _ = shutdown.cancelled() => break,
        }
    }
    ended(remote, up)
}

/// Takes a session's outbox out of the logs hub when the session ends, however it ends.
struct Detach(
    Arc<super::logs::LogsHub>,
    Option<NodeName>,
    mpsc::Sender<ToNode>,
);

impl Drop for Detach {
    fn drop(&mut self) {
        if let Some(node) = &self.1 {
            self.0.detach(node, &self.2);
        }
    }
}

fn ended(remote: SocketAddr, up: Option<NodeName>) {
    if let Some(node) = up {
        info!(%remote, %node, "node session ended");
    }
}
