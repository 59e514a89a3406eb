//! A task's share of the node: its network namespace with one TAP per network attachment
//! (handed to the datapath), its mount namespace with its own resolv.conf and hosts, the
//! embedded resolver's sockets inside it, and its supervised process ([`crate::task`]); and
//! their removal: after its process drained and stopped when the task left the desired
//! state ([`super::drain`]), or at once when the daemon shuts down with `--stop-tasks`.
//!
//! Without `--stop-tasks` a daemon that stops (or crashes) leaves its tasks as they are, for
//! the next run to adopt ([`super::adopt`]).

use super::Agent;
use crate::dns::server as dns;
use crate::naming;
use crate::sys::iface::{self, IfaceSpec};
use crate::sys::{mntns, netns, tap};
use crate::task::{self, TaskProcess};
use crate::task_log;
use datapath::vocab::{PortBinding, PortId};
use protocol::api::TaskState;
use protocol::state::{ClusterState, Task, DEFAULT_STOP_GRACE_S};
use std::path::PathBuf;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What this node made for one of its tasks.
pub(super) struct LocalTask {
    pub(super) id: String,
    /// An image task: its container is the engine's, and it has no namespaces of ours
    /// (`netns`, `mntns` and `files` are empty).
    pub(super) container: bool,
    pub(super) netns: PathBuf,
    pub(super) mntns: PathBuf,
    /// The task's resolv.conf and hosts.
    pub(super) files: PathBuf,
    pub(super) ports: Vec<(PortId, PortBinding)>,
    /// An image task's hold on each of its persistent TAPs (a queue fd's duplicate), to make
    /// them non-persistent once the task is torn down: they live in its container, not in a
    /// namespace of ours that would take them along. Empty for a process task.
    pub(super) taps: Vec<std::os::fd::OwnedFd>,
    /// Ends its resolver, once the task is torn down.
    pub(super) resolver: CancellationToken,
    /// Ends its process: drained ([`Agent::begin_leave`]) or at once.
    pub(super) stop: task::Stop,
    pub(super) supervisor: JoinHandle<()>,
}

/// A task that left the desired state and is draining ([`crate::agent::drain`]): its
/// namespace, interfaces and resolver stay until its process is stopped.
pub(super) struct Leaving {
    pub(super) name: String,
    pub(super) task: LocalTask,
}

impl Agent {
    /// Serves the embedded resolver on a task's sockets until the returned token fires.
    pub(super) fn serve_resolver(
        &self,
        task: &Task,
        (udp, tcp): (std::net::UdpSocket, std::net::TcpListener),
    ) -> CancellationToken {
        let stop = CancellationToken::new();
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
                    stop.clone(),
                ));
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!(task = %task.name, error = %e, "resolver not served")
            }
        }
        stop
    }

    /// Hands a task's TAPs to the datapath, each as a new port with its binding.
    pub(super) fn add_ports(
        &mut self,
        fds: Vec<Vec<std::os::fd::OwnedFd>>,
        bindings: Vec<PortBinding>,
    ) -> Vec<(PortId, PortBinding)> {
        let mut ports = Vec::new();
        for (fd, binding) in fds.into_iter().zip(bindings) {
            let port = PortId(self.next_port);
            self.next_port += 1;
            self.datapath
                .add_port(port, fd, tap::udp_offload(), binding.vni);
            ports.push((port, binding));
        }
        ports
    }

    /// What supervising a task's process needs.
    pub(super) fn process_of(
        &self,
        task: &Task,
        netns: &std::path::Path,
        mntns: &std::path::Path,
    ) -> TaskProcess {
        TaskProcess {
            name: task.name.clone(),
            id: task.id.clone(),
            service: task.service.to_string(),
            slot: task.slot,
            node: self.node.to_string(),
            command: task.spec.command.clone(),
            env: task.spec.env.clone(),
            netns: netns.to_path_buf(),
            mntns: Some(mntns.to_path_buf()),
            log: naming::task_log(&self.state_dir, &task.name),
            exit_file: naming::task_exit_file(&self.state_dir, &task.name),
            record: naming::task_process_record(&self.state_dir, &task.name),
            healthcheck: task.spec.healthcheck.clone(),
            stop_grace: Duration::from_secs(
                task.spec
                    .stop_grace_period_s
                    .unwrap_or(DEFAULT_STOP_GRACE_S),
            ),
        }
    }

    pub(super) async fn start_task(
        &mut self,
        state: &ClusterState,
        task: &Task,
    ) -> Result<LocalTask, String> {
        self.report(task, TaskState::Starting, None);
        if task.spec.image.is_some() {
            return self.start_image_task(state, task).await;
        }
        let bindings = bindings_of(state, task)?;
        let mut specs = Vec::new();
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
        }
        let ns_name = naming::netns_name(&self.node, &task.name);
        let ns_path = netns::path_of(&ns_name);
        let made = {
            let path = ns_path.clone();
            let queues = self.datapath.workers();
            tokio::task::spawn_blocking(move || {
                netns::create(&ns_name)?;
                iface::create_task_ifaces(&path, specs, queues, iface::Lifetime::Persistent)
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
        let sockets = match resolver {
            Ok(socks) => socks,
            Err(e) => {
                drop(fds);
                let _ = mntns::remove(&mnt_path);
                let _ = std::fs::remove_dir_all(&files);
                let _ = netns::remove(&ns_path);
                return Err(format!("setting up the task's resolver and mounts: {e}"));
            }
        };
        let resolver_stop = self.serve_resolver(task, sockets);
        let ports = self.add_ports(fds, bindings);
        let proc = self.process_of(task, &ns_path, &mnt_path);
        let stop = task::Stop::default();
        let supervisor = tokio::spawn(task::supervise(
            proc,
            self.statuses.clone(),
            stop.clone(),
            None,
        ));
        info!(task = %task.name, netns = %ns_path.display(), "task set up");
        Ok(LocalTask {
            id: task.id.clone(),
            container: false,
            netns: ns_path,
            mntns: mnt_path,
            files,
            ports,
            taps: Vec::new(),
            resolver: resolver_stop,
            stop,
            supervisor,
        })
    }

    /// Starts the stop of a task that left the desired state: its process drains and stops
    /// on its own; [`Agent::reap_left`] tears the rest down once it has.
    pub(super) fn begin_leave(&mut self, name: String, lt: LocalTask) {
        info!(task = %name, "left the desired state: draining");
        lt.stop.leave.cancel();
        self.leaving
            .insert(lt.id.clone(), Leaving { name, task: lt });
    }

    /// Tears down the tasks whose drain has ended; returns whether there were any.
    pub(super) async fn reap_left(&mut self) -> bool {
        let done: Vec<String> = self
            .leaving
            .iter()
            .filter(|(_, l)| l.task.supervisor.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &done {
            if let Some(l) = self.leaving.remove(id) {
                self.tear_down(&l.name, l.task).await;
            }
        }
        if !done.is_empty() {
            self.prune_logs();
        }
        !done.is_empty()
    }

    /// Keeps the logs of the tasks that left last ([`task_log::KEEP_DEPARTED`]), so the task
    /// names this node ever ran do not fill its disk.
    fn prune_logs(&self) {
        let live = self
            .tasks
            .keys()
            .chain(self.leaving.values().map(|l| &l.name))
            .map(String::as_str)
            .collect();
        let dir = naming::logs_dir(&self.state_dir);
        match task_log::prune_departed(&dir, &live, task_log::KEEP_DEPARTED) {
            Ok(0) => {}
            Ok(n) => info!(tasks = n, "removed the logs of tasks that left long ago"),
            Err(e) => warn!(dir = %dir.display(), error = %e, "cannot prune task logs"),
        }
    }

    /// Ends the supervision of a task the daemon leaves running when it stops: its process,
    /// namespaces and TAPs stay for the next run to adopt; its resolver stops (with the
    /// daemon) and its TAPs' fds go with the datapath.
    pub(super) async fn detach_task(&mut self, lt: LocalTask) {
        lt.stop.detach.cancel();
        let _ = lt.supervisor.await;
        lt.resolver.cancel();
    }

    /// Stops a task's process at once (the daemon shuts down) and tears it down.
    pub(super) async fn stop_task(&mut self, name: &str, lt: LocalTask) {
        lt.stop.now.cancel();
        self.tear_down(name, lt).await;
    }

    /// Waits for the task's process to be stopped, then removes its interfaces, resolver,
    /// namespaces and files, and its status: its node no longer reports it.
    async fn tear_down(&mut self, name: &str, lt: LocalTask) {
        let _ = lt.supervisor.await;
        lt.resolver.cancel();
        for (port, _) in &lt.ports {
            self.datapath.remove_port(*port);
        }
        if lt.container {
            // The last of its queues' fds closes with the port: then the TAP goes too.
            for fd in &lt.taps {
                if let Err(e) = tap::unpersist(fd) {
                    warn!(task = %name, error = %e, "cannot release the task's TAP");
                }
            }
            info!(task = %name, "task removed");
            self.forget_status(name, &lt.id);
            return;
        }
        let _ = mntns::remove(&lt.mntns);
        let _ = std::fs::remove_dir_all(&lt.files);
        let path = lt.netns.clone();
        match tokio::task::spawn_blocking(move || netns::remove(&path)).await {
            Ok(Ok(())) => info!(task = %name, "task removed"),
            Ok(Err(e)) => warn!(task = %name, error = %e, "cannot remove namespace"),
            Err(e) => warn!(task = %name, error = %e, "namespace removal thread failed"),
        }
        self.forget_status(name, &lt.id);
    }

    /// This node no longer reports the task.
    fn forget_status(&self, name: &str, id: &str) {
        if let Ok(mut b) = self.statuses.write() {
            b.remove(&task::leaving_key(name, id));
            if b.get(name).is_some_and(|e| e.id == id) {
                b.remove(name);
            }
        }
    }
}

/// The datapath binding of each of a task's network attachments, in order.
pub(super) fn bindings_of(state: &ClusterState, task: &Task) -> Result<Vec<PortBinding>, String> {
    task.attachments
        .iter()
        .map(|a| {
            let net = state
                .networks
                .get(&a.network)
                .ok_or_else(|| format!("network {} not in state", a.network))?;
            Ok(PortBinding {
                vni: net.vni,
                mac: a.mac,
                ip: a.address,
            })
        })
        .collect()
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
pub(super) fn resolver_sockets(
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
