//! The manager's control endpoint (QUIC + TLS 1.3, mutual where it matters).
//!
//! A connection without a client certificate may only `Join`: it must show the join token's
//! secret, and gets a certificate for its CSR signed by the cluster CA. A connection with a
//! client certificate (verified against the CA by rustls) opens a member session with
//! `Hello`; the node name it claims must be the certificate's. In a session the manager
//! pushes a [`Snapshot`] whenever the state changes and every second (statuses, health), takes
//! `Report`s (heartbeats) and answers forwarded `Request`s. Anything else is refused with a
//! log line, and changes nothing.

use super::pki::{self, Ca};
use super::wire;
use crate::manager::{statuses, Manager, StatusEntry};
use protocol::api::TaskState;
use protocol::control::{NodeHealth, Snapshot, ToManager, ToNode, VERSION};
use protocol::types::NodeName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
const PUSH_EVERY: Duration = Duration::from_secs(1);

pub struct ServerCtx {
    pub manager: Arc<Manager>,
    pub ca: Ca,
    pub join_secret: String,
}

/// Builds the snapshot the manager pushes: desired state, reported statuses, node health.
pub fn snapshot(manager: &Manager) -> Snapshot {
    let state = (*manager.snapshot()).clone();
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

/// Accepts control connections until `shutdown`.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<ServerCtx>, shutdown: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = shutdown.cancelled() => break,
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => handle(conn, remote, ctx, shutdown).await,
                Err(e) => {
                    warn!(%remote, error = %e, "refused control connection: handshake failed")
                }
            }
        });
    }
    endpoint.close(0u32.into(), b"manager shutting down");
}

async fn refuse(send: &mut quinn::SendStream, remote: SocketAddr, reason: String) {
    warn!(%remote, %reason, "refused control session");
    let _ = wire::send(send, &ToNode::Refused { reason }).await;
    let _ = send.finish();
    tokio::time::sleep(Duration::from_millis(200)).await;
}

fn check_version(version: u32) -> Result<(), String> {
    if version == VERSION {
        Ok(())
    } else {
        Err(format!(
            "control protocol version {version} is not this manager's {VERSION}"
        ))
    }
}

fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    pki::common_name(certs.first()?.as_ref())
}

async fn handle(
    conn: quinn::Connection,
    remote: SocketAddr,
    ctx: Arc<ServerCtx>,
    shutdown: CancellationToken,
) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let first =
        tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, wire::recv::<ToManager>(&mut recv)).await;
    let first = match first {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            return refuse(&mut send, remote, format!("unreadable first message: {e}")).await
        }
        Err(_) => return refuse(&mut send, remote, "no message within 10 s".into()).await,
    };
    match first {
        ToManager::Join {
            version,
            node,
            advertise_addr,
            data_port,
            secret,
            csr_pem,
        } => {
            if let Err(reason) = check_version(version) {
                return refuse(&mut send, remote, reason).await;
            }
            if !pki::secret_matches(&secret, &ctx.join_secret) {
                return refuse(&mut send, remote, "invalid join token".into()).await;
            }
            if ctx.manager.health().is_ready(&node)
                && ctx.manager.snapshot().nodes.contains_key(&node)
            {
                return refuse(
                    &mut send,
                    remote,
                    format!("node name {node} is in use by a live member"),
                )
                .await;
            }
            let cert_pem = match ctx.ca.sign_node_csr(node.as_str(), &csr_pem) {
                Ok(c) => c,
                Err(e) => return refuse(&mut send, remote, e.to_string()).await,
            };
            if let Err(e) = ctx.manager.upsert_node(&node, advertise_addr, data_port) {
                return refuse(&mut send, remote, e.message).await;
            }
            info!(%remote, %node, %advertise_addr, "node joined the cluster");
            let _ = wire::send(
                &mut send,
                &ToNode::Joined {
                    cert_pem,
                    ca_pem: ctx.ca.cert_pem.clone(),
                },
            )
            .await;
            let _ = send.finish();
            let _ = conn.closed().await;
        }
        ToManager::Hello {
            version,
            node,
            advertise_addr,
            data_port,
        } => {
            if let Err(reason) = check_version(version) {
                return refuse(&mut send, remote, reason).await;
            }
            match peer_name(&conn) {
                Some(cn) if cn == node.as_str() => {}
                Some(cn) => {
                    return refuse(
                        &mut send,
                        remote,
                        format!("certificate is for {cn}, not {node}"),
                    )
                    .await
                }
                None => {
                    return refuse(
                        &mut send,
                        remote,
                        "a member session needs a cluster certificate".into(),
                    )
                    .await
                }
            }
            if !ctx.manager.snapshot().nodes.contains_key(&node) {
                return refuse(
                    &mut send,
                    remote,
                    format!("{node} is not a member of this cluster"),
                )
                .await;
            }
            if let Err(e) = ctx.manager.upsert_node(&node, advertise_addr, data_port) {
                return refuse(&mut send, remote, e.message).await;
            }
            if wire::send(&mut send, &ToNode::Welcome { version: VERSION })
                .await
                .is_err()
            {
                return;
            }
            info!(%remote, %node, "node session up");
            ctx.manager.health().beat(&node);
            session(node.clone(), send, recv, ctx, shutdown).await;
            info!(%remote, %node, "node session ended");
        }
        _ => refuse(&mut send, remote, "expected Join or Hello first".into()).await,
    }
}

async fn session(
    node: NodeName,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: Arc<ServerCtx>,
    shutdown: CancellationToken,
) {
    let (tx, mut responses) = mpsc::channel::<ToNode>(64);
    let reader_ctx = ctx.clone();
    let reader_node = node.clone();
    let mut reader = tokio::spawn(async move {
        loop {
            let msg = match wire::recv::<ToManager>(&mut recv).await {
                Ok(m) => m,
                Err(e) => {
                    warn!(node = %reader_node, error = %e, "control session read failed");
                    return;
                }
            };
            match msg {
                ToManager::Report { statuses } => {
                    reader_ctx.manager.health().beat(&reader_node);
                    let state = reader_ctx.manager.snapshot();
                    if let Ok(mut board) = reader_ctx.manager.statuses().write() {
                        for r in statuses {
                            // A node reports only on tasks placed on it.
                            if state
                                .tasks
                                .get(&r.name)
                                .is_some_and(|t| t.node == reader_node && t.id == r.id)
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
                ToManager::Request { id, op } => {
                    let manager = reader_ctx.manager.clone();
                    let result = tokio::task::spawn_blocking(move || manager.apply(op))
                        .await
                        .unwrap_or_else(|e| Err(protocol::api::OpError::internal(e.to_string())));
                    if tx.send(ToNode::Response { id, result }).await.is_err() {
                        return;
                    }
                }
                other => {
                    warn!(node = %reader_node, message = ?std::mem::discriminant(&other), "unexpected control message; ignored");
                }
            }
        }
    });
    let mut changes = ctx.manager.subscribe();
    let mut tick = tokio::time::interval(PUSH_EVERY);
    loop {
        let msg = tokio::select! {
            _ = &mut reader => break,
            _ = shutdown.cancelled() => break,
            r = responses.recv() => match r { Some(m) => m, None => break },
            c = changes.changed() => {
                if c.is_err() { break }
                ToNode::Snapshot(Box::new(snapshot(&ctx.manager)))
            }
            _ = tick.tick() => ToNode::Snapshot(Box::new(snapshot(&ctx.manager))),
        };
        if let Err(e) = wire::send(&mut send, &msg).await {
            warn!(%node, error = %e, "control session write failed");
            break;
        }
    }
    reader.abort();
}
