//! Wiring of one node and its single shutdown mechanism: a `CancellationToken` fired by
//! SIGTERM or SIGINT. On shutdown the API stops accepting, the agent stops every task
//! (processes, namespaces, TAPs), the datapath thread ends and the socket file is removed.
//! The desired state stays on disk, so the next start re-creates everything.

use crate::agent::Agent;
use crate::api::{self, ApiState};
use crate::config::Config;
use crate::datapath::io::Datapath;
use crate::datapath::stats::Counters;
use crate::manager::Manager;
use crate::store::Store;
use anyhow::{bail, Context};
use protocol::state::Pool;
use std::path::Path;
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Binds the API socket, refusing one that a live daemon is serving and replacing a stale one.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "socket {} is in use by another running overlayd",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding API socket {}", path.display()))
}

/// Task namespaces are pinned by bind mounts under /run/netns; made from a private mount
/// namespace (as `ip netns exec` gives), nobody else can see them.
fn warn_if_private_mount_ns() {
    let ours = std::fs::read_link("/proc/self/ns/mnt");
    let init = std::fs::read_link("/proc/1/ns/mnt");
    if let (Ok(a), Ok(b)) = (ours, init) {
        if a != b {
            tracing::warn!(
                "overlayd runs in a private mount namespace: task namespaces under /run/netns \
                 will not be visible to overlayctl exec or ip netns exec. To run overlayd in a \
                 network namespace use `nsenter --net=/run/netns/NAME overlayd ...`, not \
                 `ip netns exec`"
            );
        }
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    warn_if_private_mount_ns();
    let state_dir = cfg.state_dir();
    let socket = cfg.socket();
    let store = Store::open(&state_dir)?;
    let listener = bind_socket(&socket)?;
    let log_dir = state_dir.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;

    let pool = Pool {
        pool: cfg.default_addr_pool.trunc(),
        prefix: cfg.default_addr_pool_mask_length,
    };
    if pool.prefix < pool.pool.prefix_len() {
        bail!(
            "--default-addr-pool-mask-length {} is shorter than the pool {}",
            pool.prefix,
            pool.pool
        );
    }
    let manager = Arc::new(Manager::open(store, pool, &cfg.node)?);
    let counters = Arc::new(Counters::default());
    let datapath =
        Datapath::start(counters.clone(), None).context("starting the datapath thread")?;

    let shutdown = CancellationToken::new();
    let agent = Agent::new(
        cfg.node.clone(),
        datapath,
        manager.statuses().clone(),
        log_dir,
    );
    let agent_task = tokio::spawn(agent.run(manager.subscribe(), shutdown.clone()));

    let app = api::router(ApiState {
        manager: manager.clone(),
        counters,
        node: cfg.node.clone(),
    });
    let api_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(api_shutdown.cancelled_owned())
            .await
    });
    info!(node = %cfg.node, socket = %socket.display(), state_dir = %state_dir.display(), "overlayd ready");

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
    let _ = agent_task.await;
    let _ = server.await;
    let _ = std::fs::remove_file(&socket);
    info!("overlayd stopped");
    Ok(())
}
