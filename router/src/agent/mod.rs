//! The agent: realises this node's share of the cluster state. For every task placed here it
//! makes a network namespace, one TAP per network attachment (held by the datapath), and a
//! supervised process; for every task that goes away it undoes all of that. After each
//! change it rebuilds the forwarding tables and publishes them to the datapath. Service VIPs
//! follow task statuses and node health as well as the desired state: the agent looks at
//! the cluster snapshot four times a second and republishes when a VIP's set of running
//! backends changed, so a task that stops or a node that goes down leaves the rotation within
//! a second of the manager knowing it. The same look hands the routing mesh's proxy its view
//! (published ports and their tasks) and puts encrypted networks' keys into the tables when
//! they change (a new key, or the moment a new key starts being used for sending).
//!
//! Tasks outlive the daemon: when it stops (without `--stop-tasks`) or crashes, their
//! processes, namespaces and TAPs stay, and the next run adopts them once it has the first
//! real state (revision > 0; until then it removes nothing): see [`adopt`].
//!
//! A task that leaves the desired state is not stopped at once: it drains ([`drain`]) while
//! the agent keeps its namespace and interfaces, and is torn down once its process stopped.
//!
//! The work is split by what it realises: [`tasks`] (a task's namespaces, TAPs, resolver and
//! supervised process), [`images`] (image tasks: their TAPs, handed to Docker, their
//! supervised container, and the containers a previous run left), [`adopt`] (the tasks a previous run left), [`endpoints`] (other
//! runtimes' containers: CNI and Docker), and [`tables`] (the datapath's tables, encrypted
//! networks' keys in them, and the views the resolvers and the routing mesh's proxy read); [`health`] and [`drain`] hold the rules of
//! health checks and of the stop sequence, without I/O. This file holds the agent itself and
//! its reconcile loop.

mod adopt;
pub(crate) mod drain;
mod endpoints;
pub(crate) mod health;
mod images;
pub mod tables;
mod tasks;

use crate::clock::now;
use crate::cluster::Cluster;
use crate::dns::server::Shared as DnsShared;
use crate::forward::io::Datapath;
use crate::ingress::{self, Ingress, IngressView};
use crate::manager::{StatusBoard, StatusEntry};
use crate::services::{Statuses, VipView};
use datapath::keys::Secret;
use datapath::stats::Counters;
use datapath::vocab::PortId;
use endpoints::LocalEndpoint;
use protocol::api::{TaskState, TaskStatus};
use protocol::control::NodeHealth;
use protocol::state::{ClusterState, Task};
use protocol::types::{NetworkName, NodeName};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tables::KeyView;
use tasks::{Leaving, LocalTask};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often the agent retries tasks whose namespace or interfaces could not be made.
const RESYNC: Duration = Duration::from_secs(5);
/// How often the agent checks whether a VIP's running backends changed.
const BACKENDS_EVERY: Duration = Duration::from_millis(250);

/// The datapath port of this node's router endpoint on the ingress network (task ports
/// start at 1).
pub const INGRESS_PORT: PortId = PortId(0);

/// The node's two forwarding planes: the datapath (frames) and the routing mesh's proxy
/// (connections), joined by the ingress endpoint's link on [`INGRESS_PORT`].
pub struct Planes {
    pub datapath: Datapath,
    pub ingress: Ingress,
}

impl Planes {
    /// Wires a new ingress proxy to `datapath` through a fresh link.
    pub fn new(
        datapath: Datapath,
        counters: Arc<Counters>,
        ports: Arc<ingress::stats::Registry>,
        max_connections: usize,
    ) -> std::io::Result<Planes> {
        let (datapath_end, endpoint_end) = ingress::link::pair()?;
        // Counted under the default ingress network's VNI (`network create --ingress` may
        // replace it; the link stays).
        let vni = protocol::types::Vni::INGRESS;
        datapath.add_port(INGRESS_PORT, vec![datapath_end], false, vni);
        let ingress = Ingress::start(endpoint_end, counters, ports, max_connections)?;
        Ok(Planes { datapath, ingress })
    }
}

pub struct Agent {
    node: NodeName,
    datapath: Datapath,
    ingress: Ingress,
    cluster: Cluster,
    counters: Arc<Counters>,
    statuses: StatusBoard,
    /// Where task logs and per-task files (resolv.conf, hosts) go ([`naming`]).
    state_dir: PathBuf,
    dns: Arc<DnsShared>,
    tasks: BTreeMap<String, LocalTask>,
    /// Tasks that left the desired state and are draining, by id.
    leaving: BTreeMap<String, Leaving>,
    endpoints: BTreeMap<String, LocalEndpoint>,
    next_port: u32,
    /// This node's VXLAN port; external VTEPs are sent to on it too.
    data_port: u16,
    /// The state revision, VIP backends and keys the datapath's tables were last built from.
    published: Option<(u64, Vec<VipView>, KeyView)>,
    /// Encrypted networks' secrets, kept as the same `Arc` while unchanged (the datapath
    /// keeps its senders' windows while the `Arc` is the same).
    secrets: BTreeMap<(NetworkName, u8), Secret>,
    /// What the ingress proxy was last given.
    published_ingress: Option<IngressView>,
    /// What the views were last built from (state revision, statuses, node health): a look
    /// that finds the same builds nothing.
    looked: Option<(u64, Statuses, BTreeMap<NodeName, NodeHealth>)>,
    /// Whether what a previous run left was adopted or removed yet (done with the first real
    /// state).
    leftovers_settled: bool,
    /// Whether shutting down stops the tasks (`--stop-tasks`) or leaves them running.
    stop_tasks: bool,
    /// The node's Docker Engine and its events, for image tasks (with `--docker-plugin`).
    engine: Option<(crate::engine::Engine, crate::engine::Events)>,
    /// Told once the leftovers were adopted and the tables published (an upgrade's
    /// successor then lets its predecessor stop forwarding).
    on_settled: Option<tokio::sync::oneshot::Sender<()>>,
    /// Where shutting down leaves the datapath running instead of stopping it, when set
    /// (an upgrade: it forwards until the successor's datapath is up).
    keep_datapath: Option<KeptDatapath>,
}

/// A datapath (and the mesh's proxy, leaving: its established connections drain) an agent
/// left running when it shut down, for its daemon to stop later.
pub type KeptDatapath = Arc<std::sync::Mutex<(bool, Option<Datapath>, Option<Ingress>)>>;

impl Agent {
    pub fn new(
        node: NodeName,
        planes: Planes,
        cluster: Cluster,
        counters: Arc<Counters>,
        state_dir: &std::path::Path,
        dns: Arc<DnsShared>,
        data_port: u16,
    ) -> Agent {
        Agent {
            node,
            datapath: planes.datapath,
            ingress: planes.ingress,
            statuses: cluster.local_board(),
            cluster,
            counters,
            state_dir: state_dir.to_path_buf(),
            dns,
            tasks: BTreeMap::new(),
            leaving: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            next_port: 1,
            data_port,
            published: None,
            published_ingress: None,
            looked: None,
            secrets: BTreeMap::new(),
            leftovers_settled: false,
            stop_tasks: false,
            engine: None,
            on_settled: None,
            keep_datapath: None,
        }
    }

    /// Runs image tasks through the Docker Engine on `docker_host` (`--docker-plugin`
    /// makes overlayd that engine's network plugin, which they need).
    pub fn with_engine(mut self, docker_host: Option<&std::path::Path>) -> Agent {
        self.engine = docker_host.map(|h| images::engine_of(h, self.node.as_str()));
        self
    }

    /// Tells `tx` once the first real state was realised: leftovers adopted, tables
    /// published.
    pub fn on_settled(mut self, tx: tokio::sync::oneshot::Sender<()>) -> Agent {
        self.on_settled = Some(tx);
        self
    }

    /// If `keep`'s flag is set when the agent shuts down, it leaves its datapath running
    /// in `keep` instead of stopping it.
    pub fn keep_datapath(mut self, keep: KeptDatapath) -> Agent {
        self.keep_datapath = Some(keep);
        self
    }

    /// Makes shutting down stop every task (`overlayd --stop-tasks`) instead of leaving them
    /// running for the next run.
    pub fn stop_tasks_on_shutdown(mut self, yes: bool) -> Agent {
        self.stop_tasks = yes;
        self
    }

    /// Follows the published state until `shutdown`, then leaves the local tasks running
    /// (or stops them, with `--stop-tasks`).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut rx: watch::Receiver<Arc<ClusterState>> = self.cluster.subscribe_state();
        let mut tick = tokio::time::interval(RESYNC);
        let mut backends = tokio::time::interval(BACKENDS_EVERY);
        backends.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let state = rx.borrow_and_update().clone();
            self.reconcile(&state).await;
            if self.leftovers_settled {
                if let Some(tx) = self.on_settled.take() {
                    // An upgrade's successor: its tables are up, it reads the underlay now.
                    self.datapath.read_underlay();
                    let _ = tx.send(());
                }
            }
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return self.shut_down().await } else { break },
                    _ = tick.tick() => break,
                    _ = backends.tick() => {
                        if self.reap_left().await {
                            // Its ports are gone; and a task of the same name may start now.
                            self.publish_if_changed(&state, true);
                            break;
                        }
                        self.publish_if_changed(&state, false)
                    }
                    _ = shutdown.cancelled() => return self.shut_down().await,
                }
            }
        }
    }

    async fn shut_down(mut self) {
        let keeping = self
            .keep_datapath
            .as_ref()
            .is_some_and(|k| k.lock().is_ok_and(|k| k.0));
        if keeping {
            // An upgrade: the mesh's established connections drain on this process.
            self.ingress.leave();
        } else {
            self.ingress.stop();
        }
        self.stop_all().await;
        if let Some(keep) = self.keep_datapath.take() {
            if let Ok(mut k) = keep.lock() {
                if k.0 {
                    k.1 = Some(self.datapath);
                    k.2 = Some(self.ingress);
                    return;
                }
            }
        }
        self.datapath.stop();
    }

    fn report(&self, task: &Task, state: TaskState, error: Option<String>) {
        if let Ok(mut b) = self.statuses.write() {
            let status = TaskStatus {
                state,
                error,
                pid: None,
                restarts: 0,
                since: now(),
                health: None,
            };
            b.insert(
                task.name.clone(),
                StatusEntry {
                    id: task.id.clone(),
                    status,
                },
            );
        }
    }

    async fn reconcile(&mut self, state: &ClusterState) {
        if !self.leftovers_settled && state.revision > 0 {
            self.settle_leftovers(state).await;
            self.settle_leftover_containers(state).await;
            self.leftovers_settled = true;
        }
        let node = self.node.clone();
        let wanted: BTreeMap<&str, &Task> = state
            .tasks_on(&node)
            .map(|t| (t.name.as_str(), t))
            .collect();
        let gone: Vec<String> = self
            .tasks
            .iter()
            .filter(|(name, lt)| wanted.get(name.as_str()).is_none_or(|t| t.id != lt.id))
            .map(|(name, _)| name.clone())
            .collect();
        let mut changed = !gone.is_empty();
        for name in gone {
            if let Some(lt) = self.tasks.remove(&name) {
                self.begin_leave(name, lt);
            }
        }
        for (name, task) in wanted {
            if self.tasks.contains_key(name) {
                continue;
            }
            // Its namespaces are named after it: a task of the same name still draining here
            // (stop-first, on this node) goes first.
            if self.leaving.values().any(|l| l.name == name) {
                continue;
            }
            if let Some((holder, port, proto)) = ingress::host_port_holder(state, &node, task) {
                let error = format!(
                    "host-mode port {port}/{proto} is already taken on this node by {}",
                    holder.name
                );
                self.report(task, TaskState::Failed, Some(error));
                continue;
            }
            match self.start_task(state, task).await {
                Ok(lt) => {
                    self.tasks.insert(name.to_string(), lt);
                    changed = true;
                }
                Err(error) => {
                    warn!(task = %name, %error, "cannot set up task");
                    self.report(task, TaskState::Failed, Some(error));
                }
            }
        }
        changed |= self.reconcile_endpoints(state).await;
        self.publish_if_changed(state, changed);
    }

    async fn stop_all(&mut self) {
        // Containers keep running; their interfaces go with the datapath and are made again
        // by the next run.
        for le in std::mem::take(&mut self.endpoints).into_values() {
            le.cancel.cancel();
        }
        let leaving = std::mem::take(&mut self.leaving).into_values();
        let mut tasks = std::mem::take(&mut self.tasks);
        if !self.stop_tasks && !tasks.is_empty() {
            tracing::info!(
                tasks = tasks.len(),
                "leaving the tasks running for the next run to adopt (--stop-tasks stops them)"
            );
            for lt in std::mem::take(&mut tasks).into_values() {
                self.detach_task(lt).await;
            }
        }
        // Tasks on their way out are stopped either way: nobody wants them any more.
        let all: Vec<(String, LocalTask)> = tasks
            .into_iter()
            .chain(leaving.map(|l| (l.name, l.task)))
            .collect();
        // Stop every process at once (draining ones too), then tear down.
        for (_, lt) in &all {
            lt.stop.now.cancel();
        }
        for (name, lt) in all {
            self.stop_task(&name, lt).await;
        }
    }
}
