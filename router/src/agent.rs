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

use crate::clock::{now, now_ms};
use crate::cluster::Cluster;
use crate::datapath::conntrack::{TCP_IDLE_MS, UDP_IDLE_MS};
use crate::datapath::crypto::{lane_epoch, NetCrypto, Secret, TxSa};
use crate::datapath::io::Datapath;
use crate::datapath::stats::Counters;
use crate::datapath::table::{BackendSpec, GatewayDns, PortBinding, PortId, Tables};
use crate::dns::names::DnsView;
use crate::dns::server::{self as dns, Shared as DnsShared};
use crate::ingress::{self, Ingress, IngressView};
use crate::manager::{StatusBoard, StatusEntry};
use crate::naming;
use crate::services::{self, VipView};
use crate::sys::iface::{self, IfaceSpec};
use crate::sys::{mntns, netns, tap};
use crate::task::{self, TaskProcess};
use protocol::api::{TaskState, TaskStatus};
use protocol::control::{send_key, Keyring, Op};
use protocol::esp::SenderKey;
use protocol::state::{ClusterState, Task};
use protocol::types::{NetworkName, NodeName, Vni};
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
        max_connections: usize,
    ) -> std::io::Result<Planes> {
        let (datapath_end, endpoint_end) = ingress::link::pair()?;
        datapath.add_port(INGRESS_PORT, vec![datapath_end], false);
        let ingress = Ingress::start(endpoint_end, counters, max_connections)?;
        Ok(Planes { datapath, ingress })
    }
}

/// An encrypted network's live keys (id, secret) and the id to send with now.
type NetKeys = (Vec<(u8, [u8; protocol::esp::SECRET_LEN])>, Option<u8>);

/// Per encrypted network, its [`NetKeys`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct KeyView(BTreeMap<NetworkName, NetKeys>);

impl KeyView {
    fn of(ring: &Keyring, now_ms: u64) -> KeyView {
        KeyView(
            ring.iter()
                .map(|(n, keys)| {
                    let live = keys.iter().map(|k| (k.id, k.secret)).collect();
                    (n.clone(), (live, send_key(keys, now_ms).map(|k| k.id)))
                })
                .collect(),
        )
    }
}

struct LocalTask {
    id: String,
    netns: PathBuf,
    mntns: PathBuf,
    /// The task's resolv.conf and hosts.
    files: PathBuf,
    ports: Vec<(PortId, PortBinding)>,
    cancel: CancellationToken,
    supervisor: JoinHandle<()>,
}

/// A container's interface this node made for a runtime (see [`protocol::state::Endpoint`]).
struct LocalEndpoint {
    /// What it was made from: remade if the state's endpoint under the key differs.
    spec: protocol::state::Endpoint,
    port: (PortId, PortBinding),
    /// Stops the resolver served inside the container's namespace.
    cancel: CancellationToken,
    /// The resolver is served (its sockets need the namespace, which a Docker container
    /// gets only after its join).
    resolver: bool,
    /// The namespace was seen: from then on, its going away means the container is gone.
    seen: bool,
    made: std::time::Instant,
}

/// How long a Docker endpoint may wait for its container's namespace after its join.
const DOCKER_START_WITHIN: Duration = Duration::from_secs(60);

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
}

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
            endpoints: BTreeMap::new(),
            next_port: 1,
            data_port,
            published: None,
            published_ingress: None,
            secrets: BTreeMap::new(),
        }
    }

    /// Removes namespaces a previous run of this node left behind (after a crash).
    pub fn clean_leftovers(&self) {
        let prefix = naming::netns_prefix(&self.node);
        if let Ok(dir) = std::fs::read_dir(mntns::MNTNS_DIR) {
            for e in dir.filter_map(|e| e.ok()) {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = mntns::remove(&e.path());
                }
            }
        }
        for name in netns::list_with_prefix(&prefix) {
            let path = netns::path_of(&name);
            match netns::remove(&path) {
                Ok(()) => info!(netns = %name, "removed leftover namespace"),
                Err(e) => warn!(netns = %name, error = %e, "cannot remove leftover namespace"),
            }
        }
    }

    /// Follows the published state until `shutdown`, then stops every local task.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.clean_leftovers();
        let mut rx: watch::Receiver<Arc<ClusterState>> = self.cluster.subscribe_state();
        let mut tick = tokio::time::interval(RESYNC);
        let mut backends = tokio::time::interval(BACKENDS_EVERY);
        backends.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let state = rx.borrow_and_update().clone();
            self.reconcile(&state).await;
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return self.shut_down().await } else { break },
                    _ = tick.tick() => break,
                    _ = backends.tick() => self.publish_if_changed(&state, false),
                    _ = shutdown.cancelled() => return self.shut_down().await,
                }
            }
        }
    }

    async fn shut_down(mut self) {
        self.ingress.stop();
        self.stop_all().await;
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
                self.stop_task(&name, lt).await;
            }
        }
        for (name, task) in wanted {
            if self.tasks.contains_key(name) {
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

    /// Makes, remakes or removes this node's container endpoints to match the state; returns
    /// whether the local ports changed. An endpoint whose namespace is gone (the container
    /// vanished without its runtime telling us) is removed from the cluster state.
    async fn reconcile_endpoints(&mut self, state: &ClusterState) -> bool {
        let wanted: BTreeMap<&String, &protocol::state::Endpoint> = state
            .endpoints
            .iter()
            // A Docker endpoint waiting for its container has nothing to make yet.
            .filter(|(_, e)| e.node == self.node && !e.netns.is_empty())
            .collect();
        let mut changed = false;
        let exists = |e: &protocol::state::Endpoint| std::path::Path::new(&e.netns).exists();
        // Gone without a word from the runtime: the namespace went away, or a Docker
        // container never started within a minute of its join (or of this run's start).
        let vanished = |le: &LocalEndpoint| {
            if le.seen {
                !exists(&le.spec)
            } else {
                le.made.elapsed() > DOCKER_START_WITHIN && !exists(&le.spec)
            }
        };
        let stale: Vec<(String, bool)> = self
            .endpoints
            .iter()
            .filter_map(|(k, le)| {
                let gone = vanished(le);
                (gone || wanted.get(k).is_none_or(|e| **e != le.spec)).then(|| (k.clone(), gone))
            })
            .collect();
        let mut dropped = Vec::new();
        for (key, gone) in stale {
            if let Some(le) = self.endpoints.remove(&key) {
                le.cancel.cancel();
                self.datapath.remove_port(le.port.0);
                info!(endpoint = %key, "container interface removed");
                changed = true;
                if gone {
                    self.forget_endpoint(&le.spec);
                    dropped.push(key);
                }
            }
        }
        for le in self.endpoints.values_mut() {
            if !le.seen && exists(&le.spec) {
                le.seen = true;
            }
            if le.seen && !le.resolver && le.spec.runtime != "docker" {
                le.resolver = serve_resolver(&le.spec, &self.dns, &le.cancel).await;
            }
        }
        for (key, e) in wanted {
            if self.endpoints.contains_key(key) || dropped.contains(key) {
                continue;
            }
            // A Docker container's namespace exists only once it starts, after its join:
            // its interface is made here and moved there by Docker.
            if !exists(e) && e.runtime == "docker" {
                match self.start_docker_endpoint(state, e).await {
                    Ok(le) => {
                        self.endpoints.insert(key.clone(), le);
                        changed = true;
                    }
                    Err(error) => warn!(endpoint = %key, %error, "cannot make container interface"),
                }
                continue;
            }
            if !exists(e) {
                self.forget_endpoint(e);
                continue;
            }
            match self.start_endpoint(state, e).await {
                Ok(le) => {
                    self.endpoints.insert(key.clone(), le);
                    changed = true;
                }
                Err(error) => warn!(endpoint = %key, %error, "cannot make container interface"),
            }
        }
        changed
    }

    /// Asks the manager to drop the endpoint of a container that is gone.
    fn forget_endpoint(&self, e: &protocol::state::Endpoint) {
        warn!(container = %e.container, netns = %e.netns, "container is gone; removing its endpoint");
        let (cluster, container, ifname) =
            (self.cluster.clone(), e.container.clone(), e.ifname.clone());
        tokio::spawn(async move {
            let _ = cluster
                .apply(Op::RemoveEndpoint { container, ifname })
                .await;
        });
    }

    /// Makes a container's TAP in its namespace (as for a task's interface), hands it to the
    /// datapath and serves the embedded resolver at 127.0.0.11 inside the namespace when that
    /// address is free there.
    async fn start_endpoint(
        &mut self,
        state: &ClusterState,
        e: &protocol::state::Endpoint,
    ) -> Result<LocalEndpoint, String> {
        let (vni, spec) = endpoint_iface(state, e, e.ifname.clone(), true)?;
        let path = PathBuf::from(&e.netns);
        let queues = self.datapath.workers();
        let fds = tokio::task::spawn_blocking(move || {
            iface::create_task_ifaces(&path, vec![spec], queues)
        })
        .await
        .map_err(|e| format!("setup thread failed: {e}"))?
        .map_err(|e| format!("making the interface: {e}"))?;
        let cancel = CancellationToken::new();
        // Docker's containers have Docker's resolver at 127.0.0.11 (theirs reach ours at the
        // gateway, `--dns`); others get ours there.
        let resolver = e.runtime == "docker" || serve_resolver(e, &self.dns, &cancel).await;
        Ok(self.adopt_endpoint(vni, e, fds, cancel, resolver, true))
    }

    /// Makes a Docker endpoint's TAP in overlayd's own namespace, under the name its join
    /// hands to Docker ([`naming::docker_tap_name`]), with the network's MTU and the endpoint's MAC.
    async fn start_docker_endpoint(
        &mut self,
        state: &ClusterState,
        e: &protocol::state::Endpoint,
    ) -> Result<LocalEndpoint, String> {
        let (vni, spec) = endpoint_iface(state, e, naming::docker_tap_name(&e.container), false)?;
        let fds = iface::create_detached(&spec, self.datapath.workers())
            .await
            .map_err(|err| format!("making {}: {err}", spec.name))?;
        Ok(self.adopt_endpoint(vni, e, vec![fds], CancellationToken::new(), false, false))
    }

    /// Hands a container interface's queues to the datapath.
    fn adopt_endpoint(
        &mut self,
        vni: Vni,
        e: &protocol::state::Endpoint,
        fds: Vec<Vec<std::os::fd::OwnedFd>>,
        cancel: CancellationToken,
        resolver: bool,
        seen: bool,
    ) -> LocalEndpoint {
        let port = PortId(self.next_port);
        self.next_port += 1;
        for fd in fds {
            self.datapath.add_port(port, fd, tap::udp_offload());
        }
        info!(container = %e.container, ifname = %e.ifname, address = %e.address, "container interface made");
        LocalEndpoint {
            spec: e.clone(),
            port: (
                port,
                PortBinding {
                    vni,
                    mac: e.mac,
                    ip: e.address,
                },
            ),
            cancel,
            resolver,
            seen,
            made: std::time::Instant::now(),
        }
    }

    /// Rebuilds and publishes the tables if the tasks here (`force`), the state revision or a
    /// VIP's running backends changed.
    fn publish_if_changed(&mut self, state: &ClusterState, force: bool) {
        let snap = self.cluster.snapshot();
        // The snapshot may be a little ahead of `state`; VIPs follow the state being realised.
        let vips = services::vips(state, &snap.statuses, &snap.health);
        // Names follow the same view; resolvers read it without a lock.
        let names = DnsView::build(state, &snap.statuses, &snap.health);
        if **self.dns.view.load() != names {
            self.dns.view.store(Arc::new(names));
        }
        let mesh = IngressView::build(state, &snap.statuses, &snap.health, &self.node);
        if self.published_ingress.as_ref() != Some(&mesh) {
            self.ingress.update(mesh.clone());
            self.published_ingress = Some(mesh);
        }
        let keys = KeyView::of(&snap.keys, now_ms());
        self.request_rekeys(state);
        let same = self
            .published
            .as_ref()
            .is_some_and(|(rev, v, k)| *rev == state.revision && *v == vips && *k == keys);
        if force || !same {
            self.publish(state, &vips, &keys);
            self.published = Some((state.revision, vips, keys));
        }
    }

    /// Asks the manager for a new key of each encrypted network whose sequence numbers
    /// under the current key passed the rekey mark.
    fn request_rekeys(&self, state: &ClusterState) {
        for spi in self.datapath.take_worn_keys() {
            let (vni, _) = protocol::esp::parse_spi(spi);
            let Some(net) = state.networks.values().find(|n| n.vni.get() == vni) else {
                continue;
            };
            let (cluster, name) = (self.cluster.clone(), net.name.to_string());
            tokio::spawn(async move {
                match cluster.apply(Op::RotateKey(name.clone())).await {
                    Ok(_) => {
                        info!(network = %name, "asked for a new key: sequence numbers wearing out")
                    }
                    Err(e) => warn!(network = %name, error = %e, "cannot ask for a new key"),
                }
            });
        }
    }

    /// The keys of an encrypted network as the datapath holds them: every live secret for
    /// receiving, and this node's own key (its name and epoch) under the one in use.
    fn crypto_for(&mut self, name: &NetworkName, vni: Vni, keys: &KeyView) -> NetCrypto {
        let mut c = NetCrypto::default();
        let Some((live, sending)) = keys.0.get(name) else {
            return c;
        };
        self.secrets.retain(|(n, id), s| {
            n != name || live.iter().any(|(i, secret)| i == id && **s == *secret)
        });
        for (id, secret) in live {
            let s = self
                .secrets
                .entry((name.clone(), *id))
                .or_insert_with(|| Arc::new(*secret))
                .clone();
            if Some(*id) == *sending {
                let keys = (0..self.datapath.workers())
                    .map(|lane| {
                        let epoch = lane_epoch(self.datapath.esp_epoch, lane as u8);
                        SenderKey::derive(&s, self.node.as_str(), epoch)
                    })
                    .collect();
                c.tx = Some(TxSa {
                    spi: protocol::esp::spi(vni.get(), *id),
                    keys,
                });
            }
            c.rx.insert(*id, s);
        }
        c
    }

    fn publish(&mut self, state: &ClusterState, vips: &[VipView], keys: &KeyView) {
        let mut ports: Vec<(PortId, PortBinding)> = self
            .tasks
            .values()
            .flat_map(|t| t.ports.iter().copied())
            .chain(self.endpoints.values().map(|e| e.port))
            .collect();
        if let Some(ip) = state
            .ingress_network()
            .and_then(|n| Some((n.vni, *n.lb_endpoints.get(&self.node)?)))
        {
            ports.push((
                INGRESS_PORT,
                PortBinding {
                    vni: ip.0,
                    mac: protocol::types::MacAddr::from_ipv4(ip.1),
                    ip: ip.1,
                },
            ));
        }
        let vtep_of = |n: &NodeName| {
            let node = state.nodes.get(n)?;
            Some(SocketAddrV4::new(node.advertise_addr?, node.data_port))
        };
        let mut tables = Tables::from_state(state, &self.node, &ports, &vtep_of, self.data_port);
        let lb = &self.counters.lb;
        let mut live: BTreeMap<String, Vec<std::net::Ipv4Addr>> = BTreeMap::new();
        for v in vips {
            let name = v.service.as_str();
            let backends: Vec<BackendSpec> = v
                .backends
                .iter()
                .map(|(ip, mac)| BackendSpec {
                    ip: *ip,
                    mac: *mac,
                    flows: lb.backend(name, *ip),
                })
                .collect();
            let idle = match v.idle_secs {
                Some(s) => (s.saturating_mul(1000), s.saturating_mul(1000)),
                None => (TCP_IDLE_MS, UDP_IDLE_MS),
            };
            tables.add_vip(v.vni, v.ip, lb.service(name), &backends, idle);
            live.entry(name.to_string())
                .or_default()
                .extend(v.backends.iter().map(|b| b.0));
        }
        lb.retain(&live);
        for net in state.networks.values() {
            if let Some(t) = tables.networks.get_mut(&net.vni) {
                t.dns = Some(GatewayDns {
                    network: Arc::from([net.name.to_string()]),
                    shared: self.dns.clone(),
                });
            }
        }
        for net in state.networks.values().filter(|n| n.encrypted()) {
            if tables.networks.contains_key(&net.vni) {
                let c = self.crypto_for(&net.name, net.vni, keys);
                if let Some(t) = tables.networks.get_mut(&net.vni) {
                    t.crypto = Some(Arc::new(c));
                }
            }
        }
        self.datapath.publish(tables);
    }

    async fn start_task(&mut self, state: &ClusterState, task: &Task) -> Result<LocalTask, String> {
        let svc = state
            .services
            .get(&task.service)
            .ok_or_else(|| format!("service {} not in state", task.service))?;
        self.report(task, TaskState::Starting, None);
        let mut specs = Vec::new();
        let mut bindings = Vec::new();
        for (i, a) in task.attachments.iter().enumerate() {
            let net = state
                .networks
                .get(&a.network)
                .ok_or_else(|| format!("network {} not in state", a.network))?;
            specs.push(IfaceSpec {
                name: naming::task_iface(i),
                mac: a.mac,
                address: a.address,
                prefix_len: net.subnet.prefix_len(),
                mtu: net.mtu(),
                gateway: (i == 0).then_some(net.gateway),
            });
            bindings.push(PortBinding {
                vni: net.vni,
                mac: a.mac,
                ip: a.address,
            });
        }
        let ns_name = naming::netns_name(&self.node, &task.name);
        let ns_path = netns::path_of(&ns_name);
        let made = {
            let path = ns_path.clone();
            let queues = self.datapath.workers();
            tokio::task::spawn_blocking(move || {
                netns::create(&ns_name)?;
                iface::create_task_ifaces(&path, specs, queues)
            })
            .await
            .map_err(|e| format!("setup thread failed: {e}"))?
        };
        let fds = match made {
            Ok(fds) => fds,
            Err(e) => {
                let _ = netns::remove(&ns_path);
                return Err(format!("creating namespace and interfaces: {e}"));
            }
        };
        let files = naming::task_files(&self.state_dir, &task.name);
        let mnt_path = naming::task_mntns(&self.node, &task.name);
        let resolver = {
            let (files, mnt, ns, task) = (
                files.clone(),
                mnt_path.clone(),
                ns_path.clone(),
                task.clone(),
            );
            tokio::task::spawn_blocking(move || task_environment(&files, &mnt, &ns, &task))
                .await
                .map_err(|e| format!("setup thread failed: {e}"))?
        };
        let (udp, tcp) = match resolver {
            Ok(socks) => socks,
            Err(e) => {
                drop(fds);
                let _ = mntns::remove(&mnt_path);
                let _ = std::fs::remove_dir_all(&files);
                let _ = netns::remove(&ns_path);
                return Err(format!("setting up the task's resolver and mounts: {e}"));
            }
        };
        let cancel = CancellationToken::new();
        let networks = task
            .attachments
            .iter()
            .map(|a| a.network.to_string())
            .collect();
        match (
            tokio::net::UdpSocket::from_std(udp),
            tokio::net::TcpListener::from_std(tcp),
        ) {
            (Ok(udp), Ok(tcp)) => {
                tokio::spawn(dns::serve(
                    udp,
                    tcp,
                    networks,
                    self.dns.clone(),
                    cancel.clone(),
                ));
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!(task = %task.name, error = %e, "resolver not served")
            }
        }
        let mut ports = Vec::new();
        for (fd, binding) in fds.into_iter().zip(bindings) {
            let port = PortId(self.next_port);
            self.next_port += 1;
            self.datapath.add_port(port, fd, tap::udp_offload());
            ports.push((port, binding));
        }
        let proc = TaskProcess {
            name: task.name.clone(),
            id: task.id.clone(),
            service: task.service.to_string(),
            slot: task.slot,
            node: self.node.to_string(),
            command: svc.command.clone(),
            env: svc.env.clone(),
            netns: ns_path.clone(),
            mntns: Some(mnt_path.clone()),
            log: naming::task_log(&self.state_dir, &task.name),
        };
        let supervisor = tokio::spawn(task::supervise(proc, self.statuses.clone(), cancel.clone()));
        info!(task = %task.name, netns = %ns_path.display(), "task set up");
        Ok(LocalTask {
            id: task.id.clone(),
            netns: ns_path,
            mntns: mnt_path,
            files,
            ports,
            cancel,
            supervisor,
        })
    }

    async fn stop_task(&mut self, name: &str, lt: LocalTask) {
        lt.cancel.cancel();
        let _ = lt.supervisor.await;
        for (port, _) in &lt.ports {
            self.datapath.remove_port(*port);
        }
        let _ = mntns::remove(&lt.mntns);
        let _ = std::fs::remove_dir_all(&lt.files);
        let path = lt.netns.clone();
        match tokio::task::spawn_blocking(move || netns::remove(&path)).await {
            Ok(Ok(())) => info!(task = %name, "task removed"),
            Ok(Err(e)) => warn!(task = %name, error = %e, "cannot remove namespace"),
            Err(e) => warn!(task = %name, error = %e, "namespace removal thread failed"),
        }
        if let Ok(mut b) = self.statuses.write() {
            b.remove(name);
        }
    }

    async fn stop_all(&mut self) {
        // Containers keep running; their interfaces go with the datapath and are made again
        // by the next run.
        for le in std::mem::take(&mut self.endpoints).into_values() {
            le.cancel.cancel();
        }
        let all = std::mem::take(&mut self.tasks);
        // Stop every process at once, then tear down.
        for lt in all.values() {
            lt.cancel.cancel();
        }
        for (name, lt) in all {
            self.stop_task(&name, lt).await;
        }
    }
}

/// A container endpoint's interface, named `name`, with the default route via the gateway
/// if `route`; and its network's VNI.
fn endpoint_iface(
    state: &ClusterState,
    e: &protocol::state::Endpoint,
    name: String,
    route: bool,
) -> Result<(Vni, IfaceSpec), String> {
    let net = state
        .networks
        .get(&e.network)
        .ok_or_else(|| format!("network {} not in state", e.network))?;
    let spec = IfaceSpec {
        name,
        mac: e.mac,
        address: e.address,
        prefix_len: net.subnet.prefix_len(),
        mtu: net.mtu(),
        gateway: route.then_some(net.gateway),
    };
    Ok((net.vni, spec))
}

/// Serves the embedded resolver at 127.0.0.11:53 inside a container's namespace, if that
/// address is free there (a runtime's own resolver may hold it); returns whether it does.
async fn serve_resolver(
    e: &protocol::state::Endpoint,
    shared: &Arc<DnsShared>,
    cancel: &CancellationToken,
) -> bool {
    let path = PathBuf::from(&e.netns);
    let made = tokio::task::spawn_blocking(move || resolver_sockets(&path)).await;
    let socks = match made {
        Ok(Ok((u, t))) => tokio::net::UdpSocket::from_std(u)
            .and_then(|u| Ok((u, tokio::net::TcpListener::from_std(t)?))),
        Ok(Err(err)) => Err(err),
        Err(err) => Err(std::io::Error::other(err.to_string())),
    };
    match socks {
        Ok((udp, tcp)) => {
            let networks = vec![e.network.to_string()];
            tokio::spawn(dns::serve(
                udp,
                tcp,
                networks,
                shared.clone(),
                cancel.clone(),
            ));
            true
        }
        Err(err) => {
            info!(container = %e.container, error = %err, "no resolver at 127.0.0.11 in the container");
            false
        }
    }
}

/// What a task sees of the node besides its interfaces: its resolv.conf (the embedded
/// resolver, with Docker's `ndots:0`) and hosts file, its mount namespace with them in place,
/// and the resolver's sockets on 127.0.0.11:53 made inside its network namespace.
fn task_environment(
    files: &std::path::Path,
    mnt: &std::path::Path,
    netns_path: &std::path::Path,
    task: &Task,
) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    std::fs::create_dir_all(files)?;
    let resolv = files.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.11\noptions ndots:0\n")?;
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for a in &task.attachments {
        hosts.push_str(&format!(
            "{}\t{} {}.{}\n",
            a.address, task.name, task.name, task.id
        ));
    }
    let hosts_path = files.join("hosts");
    std::fs::write(&hosts_path, hosts)?;
    mntns::create(mnt, netns_path, &resolv, &hosts_path)?;
    resolver_sockets(netns_path)
}

/// The embedded resolver's sockets on 127.0.0.11:53, made inside the namespace at `netns`.
fn resolver_sockets(
    netns: &std::path::Path,
) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    netns::run_in(netns, || {
        let udp = std::net::UdpSocket::bind(dns::RESOLVER_ADDR)?;
        let tcp = std::net::TcpListener::bind(dns::RESOLVER_ADDR)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    })
}
