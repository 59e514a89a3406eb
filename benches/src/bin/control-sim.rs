//! The control plane under a large cluster: many simulated nodes in one process, each a real
//! member session (QUIC, mutual TLS, the real protocol) to a real manager, and a stream of
//! `service create`s through the manager's API.
//!
//! Each simulated node joins with the worker token, opens a member session, applies every
//! push (whole snapshots and deltas, as `overlayd` does), and reports its tasks `Running`
//! every second: an agent without namespaces or processes. The bench then creates
//! `--services` services of `--replicas` tasks, one after another, and for each measures the
//! API's answer (the change committed to the store) and the time until every simulated node
//! holds it; then, the cluster settled, the control plane's bytes per second to the nodes
//! (QUIC's UDP bytes, as each connection counts them). One JSON line of results on stdout.
//!
//! Run by `benches/control-plane.sh`, which starts the manager (file store or etcd, deltas or
//! whole snapshots) in a namespace and runs this beside it.

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use protocol::api::{TaskState, TaskStatus};
use protocol::control::{Snapshot, TaskReport, ToManager, ToNode, MANAGER_SERVER_NAME, VERSION};
use protocol::types::NodeName;
use router::cluster::pki::Token;
use router::cluster::{wire, worker};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

#[derive(Parser)]
struct Args {
    /// The manager's control address.
    #[arg(long)]
    manager: SocketAddr,
    /// The manager's worker join token.
    #[arg(long)]
    token: String,
    /// The manager's API socket.
    #[arg(long)]
    socket: PathBuf,
    /// The address the simulated nodes bind and advertise.
    #[arg(long)]
    bind: Ipv4Addr,
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    #[arg(long, default_value_t = 1000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    replicas: u32,
    /// Seconds of settled cluster over which bytes per second are measured.
    #[arg(long, default_value_t = 10)]
    measure: u64,
    /// A name for this run, copied into the results.
    #[arg(long, default_value = "run")]
    label: String,
}

/// What the bench checks of the snapshot a node holds (the snapshot itself stays with the
/// node's reader: copying it for the bench would cost more than the node's own work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    revision: u64,
    ready_nodes: usize,
    services: usize,
    tasks: usize,
    running: usize,
    /// Its size as a whole snapshot frame.
    bytes: usize,
}

impl Held {
    fn of(s: &Snapshot, bytes: usize) -> Held {
        Held {
            revision: s.state.revision,
            ready_nodes: s
                .health
                .values()
                .filter(|h| **h == protocol::control::NodeHealth::Ready)
                .count(),
            services: s.state.services.len(),
            tasks: s.state.tasks.len(),
            running: s
                .statuses
                .values()
                .filter(|(_, st)| st.state == TaskState::Running)
                .count(),
            bytes,
        }
    }
}

/// One simulated node, as the bench reads it.
struct SimNode {
    name: NodeName,
    /// What it holds.
    held: watch::Receiver<Option<Held>>,
    /// Bytes its connection received (QUIC's UDP payloads).
    rx_bytes: Arc<AtomicU64>,
    /// Pushes it received, whole and deltas, and Resyncs it asked for.
    fulls: Arc<AtomicU64>,
    deltas: Arc<AtomicU64>,
    resyncs: Arc<AtomicU64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = Token::parse(&args.token).map_err(|e| anyhow!("{e}"))?;
    let api = Api {
        socket: args.socket.clone(),
    };
    let changed = Arc::new(Notify::new());

    // Join and connect every node, a few at a time (each join signs a certificate).
    let t = Instant::now();
    let mut nodes = Vec::new();
    for chunk in (0..args.nodes).collect::<Vec<_>>().chunks(10) {
        let mut joins = Vec::new();
        for i in chunk {
            let name = NodeName::new(format!("sim{i}")).map_err(|e| anyhow!("{e}"))?;
            let (manager, token, bind) = (args.manager, token.clone(), args.bind);
            joins.push(tokio::spawn(async move {
                let joined = worker::join(manager, &token, &name, bind, 4789).await;
                joined.map(|(id, ca)| (name, id, ca))
            }));
        }
        for j in joins {
            let (name, identity, ca) = j.await?.map_err(|e| anyhow!("join: {e}"))?;
            nodes.push(start_node(&args, name, identity, ca, changed.clone()).await?);
        }
    }
    eprintln!("{} nodes joined in {:?}", nodes.len(), t.elapsed());
    wait_all(&nodes, &changed, Duration::from_secs(60), |h| {
        h.ready_nodes > args.nodes
    })
    .await
    .context("every node Ready")?;

    // The manager's own node takes no tasks: the simulated nodes get them all.
    let me = api.get("/info").await?;
    let manager_node = me["node"].as_str().unwrap_or_default().to_string();
    api.post(
        &format!("/nodes/{manager_node}/update"),
        json!({"availability": "drain"}),
    )
    .await?;
    api.post(
        "/networks/create",
        json!({"name": "bench", "subnet": "10.128.0.0/16"}),
    )
    .await?;

    // Creates, one at a time.
    let rx_before: u64 = nodes
        .iter()
        .map(|n| n.rx_bytes.load(Ordering::Relaxed))
        .sum();
    let created_at = Instant::now();
    let mut committed = Vec::new();
    let mut everywhere = Vec::new();
    for i in 0..args.services {
        let name = format!("s{i}");
        let t0 = Instant::now();
        api.post(
            "/services/create",
            json!({"name": name, "networks": ["bench"], "replicas": args.replicas,
                   "command": ["sleep", "infinity"]}),
        )
        .await?;
        committed.push(t0.elapsed());
        wait_all(&nodes, &changed, Duration::from_secs(30), |h| {
            h.services > i
        })
        .await
        .with_context(|| format!("every node holds {name}"))?;
        everywhere.push(t0.elapsed());
    }
    let create_secs = created_at.elapsed().as_secs_f64();
    let rx_creating: u64 = nodes
        .iter()
        .map(|n| n.rx_bytes.load(Ordering::Relaxed))
        .sum::<u64>()
        - rx_before;
    let tasks = args.services * args.replicas as usize;
    eprintln!("{} services created in {create_secs:.1} s", args.services);

    // Settled: every task reported Running, as every node sees it.
    wait_all(&nodes, &changed, Duration::from_secs(120), |h| {
        h.tasks == tasks && h.running == tasks
    })
    .await
    .context("every task Running on every node's view")?;
    let fulls_before: u64 = nodes.iter().map(|n| n.fulls.load(Ordering::Relaxed)).sum();
    let deltas_before: u64 = nodes.iter().map(|n| n.deltas.load(Ordering::Relaxed)).sum();
    let rx0: u64 = nodes
        .iter()
        .map(|n| n.rx_bytes.load(Ordering::Relaxed))
        .sum();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.measure)).await;
    let secs = t0.elapsed().as_secs_f64();
    let rx1: u64 = nodes
        .iter()
        .map(|n| n.rx_bytes.load(Ordering::Relaxed))
        .sum();
    let fulls: u64 = nodes
        .iter()
        .map(|n| n.fulls.load(Ordering::Relaxed))
        .sum::<u64>()
        - fulls_before;
    let deltas: u64 = nodes
        .iter()
        .map(|n| n.deltas.load(Ordering::Relaxed))
        .sum::<u64>()
        - deltas_before;
    let resyncs: u64 = nodes
        .iter()
        .map(|n| n.resyncs.load(Ordering::Relaxed))
        .sum();
    let whole = nodes[0].held.borrow().map(|h| h.bytes).unwrap_or(0);

    // Every node holds the manager's state.
    let revisions: Vec<u64> = nodes
        .iter()
        .filter_map(|n| n.held.borrow().map(|h| h.revision))
        .collect();
    let same = revisions.windows(2).all(|w| w[0] == w[1]) && revisions.len() == nodes.len();
    if !same {
        bail!("the nodes hold different revisions: {revisions:?}");
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).take(1).collect();
    let out = json!({
        "label": args.label,
        "nodes": args.nodes,
        "services": args.services,
        "tasks": tasks,
        "snapshot_bytes": whole,
        "create_committed_ms": percentiles(&committed),
        "create_everywhere_ms": percentiles(&everywhere),
        "create_phase_s": create_secs,
        "create_phase_rx_bytes_per_s": rx_creating as f64 / create_secs,
        "settled_rx_bytes_per_s": (rx1 - rx0) as f64 / secs,
        "settled_rx_bytes_per_s_per_node": (rx1 - rx0) as f64 / secs / args.nodes as f64,
        "settled_full_pushes": fulls,
        "settled_delta_pushes": deltas,
        "resyncs": resyncs,
        "first_node": names,
    });
    println!("{out}");
    Ok(())
}

/// p50, p90, p99 and max of `d`, in milliseconds.
fn percentiles(d: &[Duration]) -> serde_json::Value {
    let mut ms: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    json!({"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ms.last()})
}

/// Waits until `ok` holds of every node's snapshot.
async fn wait_all(
    nodes: &[SimNode],
    changed: &Notify,
    limit: Duration,
    ok: impl Fn(&Held) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let notified = changed.notified();
        if nodes
            .iter()
            .all(|n| n.held.borrow().as_ref().is_some_and(&ok))
        {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("not within {limit:?}");
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
    }
}

async fn start_node(
    args: &Args,
    name: NodeName,
    identity: router::cluster::pki::Identity,
    ca: String,
    changed: Arc<Notify>,
) -> anyhow::Result<SimNode> {
    let cfg = worker::member_quic(&ca, &identity).map_err(|e| anyhow!("{e}"))?;
    let endpoint = quinn::Endpoint::client(SocketAddr::new(args.bind.into(), 0))?;
    let conn = endpoint
        .connect_with(cfg, args.manager, MANAGER_SERVER_NAME)?
        .await
        .with_context(|| format!("{name} connecting"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = ToManager::Hello {
        version: VERSION,
        node: name.clone(),
        advertise_addr: args.bind,
        data_port: 4789,
        control_addr: None,
    };
    wire::send(&mut send, &hello).await?;
    match wire::recv::<ToNode>(&mut recv).await? {
        ToNode::Welcome { .. } => {}
        other => bail!("{name}: unexpected answer to Hello: {other:?}"),
    }
    let (held_tx, held) = watch::channel(None::<Held>);
    let reports: Arc<Mutex<Vec<TaskReport>>> = Arc::default();
    let node = SimNode {
        name: name.clone(),
        held,
        rx_bytes: Arc::new(AtomicU64::new(0)),
        fulls: Arc::new(AtomicU64::new(0)),
        deltas: Arc::new(AtomicU64::new(0)),
        resyncs: Arc::new(AtomicU64::new(0)),
    };
    let send = Arc::new(tokio::sync::Mutex::new(send));
    // Reads and applies pushes.
    let (rx_bytes, fulls, deltas, resyncs) = (
        node.rx_bytes.clone(),
        node.fulls.clone(),
        node.deltas.clone(),
        node.resyncs.clone(),
    );
    let writer = send.clone();
    let counted = conn.clone();
    let me = name.clone();
    let mine = reports.clone();
    let first = name.as_str() == "sim0";
    tokio::spawn(async move {
        let mut at: Option<(u64, Snapshot)> = None;
        // sim0 measures the whole snapshot's size, at most once a second.
        let (mut size, mut sized_at) = (0, Instant::now());
        loop {
            let msg = match wire::recv::<ToNode>(&mut recv).await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("{me}: session ended: {e}");
                    return;
                }
            };
            rx_bytes.store(counted.stats().udp_rx.bytes, Ordering::Relaxed);
            match msg {
                ToNode::Snapshot { push, snapshot } => {
                    fulls.fetch_add(1, Ordering::Relaxed);
                    at = Some((push, *snapshot));
                }
                ToNode::Delta { base, push, delta } => {
                    deltas.fetch_add(1, Ordering::Relaxed);
                    match &mut at {
                        Some((n, snap)) if *n == base => {
                            *n = push;
                            if delta.is_empty() {
                                continue;
                            }
                            delta.apply(snap);
                        }
                        _ => {
                            resyncs.fetch_add(1, Ordering::Relaxed);
                            at = None;
                            let _ = wire::send(&mut *writer.lock().await, &ToManager::Resync).await;
                            continue;
                        }
                    }
                }
                _ => continue,
            }
            if let Some((_, snap)) = &at {
                if first && (size == 0 || sized_at.elapsed() > Duration::from_secs(1)) {
                    size = protocol::control::encode(snap)
                        .map(|f| f.len())
                        .unwrap_or(0);
                    sized_at = Instant::now();
                }
                let held = Held::of(snap, size);
                if held_tx.borrow().map(|h| h.revision) != Some(held.revision) {
                    *mine.lock().unwrap() = running(snap, &me);
                }
                held_tx.send_replace(Some(held));
                changed.notify_waiters();
            }
        }
    });
    // Reports this node's tasks Running, every second.
    tokio::spawn(async move {
        let _keep = endpoint;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let statuses = reports.lock().unwrap().clone();
            if wire::send(&mut *send.lock().await, &ToManager::Report { statuses })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok(node)
}

/// This node's tasks in `snap`, reported Running.
fn running(snap: &Snapshot, node: &NodeName) -> Vec<TaskReport> {
    snap.state
        .tasks
        .values()
        .filter(|t| t.node == *node)
        .map(|t| TaskReport {
            name: t.name.clone(),
            id: t.id.clone(),
            status: TaskStatus {
                state: TaskState::Running,
                error: None,
                pid: Some(1),
                restarts: 0,
                since: 1,
                health: None,
            },
        })
        .collect()
}

/// The manager's API on its Unix socket (HTTP/1.1, JSON).
struct Api {
    socket: PathBuf,
}

impl Api {
    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let body = match body {
            Some(v) => Full::new(Bytes::from(serde_json::to_vec(&v)?)),
            None => Full::new(Bytes::new()),
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://overlayd{path}"))
            .header("host", "overlayd")
            .header("content-type", "application/json")
            .body(body)?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{path}: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.call(hyper::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.call(hyper::Method::POST, path, Some(body)).await
    }
}
