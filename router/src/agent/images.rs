//! Image tasks (`service create --image`): the node's part of running a task as a container
//! of its Docker Engine. The agent makes the task's TAPs in its own namespace (one per
//! network attachment, with the task's MAC and the network's MTU) and hands them to the
//! datapath, as for a process task; the container's supervisor ([`crate::container`])
//! creates the container on Docker networks of driver `overlayd` with the task's addresses,
//! and the plugin (`docker.rs`) gives Docker these TAPs at the endpoints' join, so Docker
//! moves them into the container, names them eth0, eth1, ... and sets their addresses
//! before the container's process starts. The container's resolver is Docker's, forwarding
//! to the first network's gateway, where the router answers the cluster's names.
//!
//! The TAPs are persistent, so a container keeps its interfaces while no router runs; the
//! next run adopts the containers it finds running for tasks still desired here (their
//! TAPs attached again inside them, found by MAC) and removes the rest with their TAPs
//! ([`Agent::settle_leftover_containers`]). A torn-down task's TAPs are made non-persistent,
//! so they go with their last fd.

use super::tasks::{bindings_of, LocalTask};
use super::Agent;
use crate::container::{self, Adopted, ContainerTask, NetAttach};
use crate::engine::{Engine, Events};
use crate::naming;
use crate::sys::iface::{self, IfaceSpec, Lifetime};
use crate::task;
use datapath::vocab::PortBinding;
use protocol::state::{ClusterState, Task, DEFAULT_STOP_GRACE_S};
use protocol::types::MacAddr;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

impl Agent {
    pub(super) async fn start_image_task(
        &mut self,
        state: &ClusterState,
        task: &Task,
    ) -> Result<LocalTask, String> {
        let (c, engine, events) = self.container_task(state, task)?;
        let bindings = bindings_of(state, task)?;
        let mut fds = Vec::new();
        for (i, a) in task.attachments.iter().enumerate() {
            let net = state
                .networks
                .get(&a.network)
                .ok_or_else(|| format!("network {} not in state", a.network))?;
            let spec = IfaceSpec {
                name: naming::image_tap_name(&task.id, i),
                mac: a.mac,
                address: a.address,
                prefix_len: net.subnet.prefix_len(),
                mtu: net.mtu(),
                gateway: None,
            };
            let made = iface::create_detached(&spec, self.datapath.workers(), Lifetime::Persistent)
                .await
                .map_err(|e| format!("making {}: {e}", spec.name))?;
            fds.push(made);
        }
        let lt = self.supervise_container(task, c, engine, events, fds, bindings, None)?;
        info!(task = %task.name, "image task set up");
        Ok(lt)
    }

    /// What running `task`'s container needs, and the node's engine.
    fn container_task(
        &self,
        state: &ClusterState,
        task: &Task,
    ) -> Result<(ContainerTask, Engine, Events), String> {
        let Some(image) = task.spec.image.clone() else {
            return Err("not an image task".into());
        };
        let Some((engine, events)) = self.engine.clone() else {
            return Err(
                "image tasks need this node's overlayd to run with --docker-plugin (and \
                 --docker-host)"
                    .into(),
            );
        };
        let mut networks = Vec::new();
        for a in &task.attachments {
            let net = state
                .networks
                .get(&a.network)
                .ok_or_else(|| format!("network {} not in state", a.network))?;
            networks.push(NetAttach {
                network: a.network.to_string(),
                subnet: net.subnet.to_string(),
                address: a.address.to_string(),
            });
        }
        let dns = task
            .attachments
            .first()
            .and_then(|a| state.networks.get(&a.network))
            .map(|n| n.gateway.to_string())
            .ok_or("an image task needs a network")?;
        let c = ContainerTask {
            name: task.name.clone(),
            id: task.id.clone(),
            service: task.service.to_string(),
            slot: task.slot,
            node: self.node.to_string(),
            image,
            args: task.spec.command.clone(),
            env: task.spec.env.clone(),
            networks,
            dns,
            stop_grace: Duration::from_secs(
                task.spec
                    .stop_grace_period_s
                    .unwrap_or(DEFAULT_STOP_GRACE_S),
            ),
        };
        Ok((c, engine, events))
    }

    /// Hands the task's TAPs to the datapath and starts supervising its container (the
    /// adopted one first, if any).
    #[allow(clippy::too_many_arguments)]
    fn supervise_container(
        &mut self,
        task: &Task,
        c: ContainerTask,
        engine: Engine,
        events: Events,
        fds: Vec<Vec<OwnedFd>>,
        bindings: Vec<PortBinding>,
        adopted: Option<Adopted>,
    ) -> Result<LocalTask, String> {
        let taps = fds
            .iter()
            .filter_map(|queues| queues.first())
            .map(OwnedFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("holding the task's TAPs: {e}"))?;
        let ports = self.add_ports(fds, bindings);
        let stop = task::Stop::default();
        let supervisor = tokio::spawn(container::supervise(
            c,
            engine,
            events,
            self.statuses.clone(),
            stop.clone(),
            adopted,
        ));
        Ok(LocalTask {
            id: task.id.clone(),
            container: true,
            netns: PathBuf::new(),
            mntns: PathBuf::new(),
            files: PathBuf::new(),
            ports,
            taps,
            resolver: CancellationToken::new(),
            stop,
            supervisor,
        })
    }

    /// Deals with the containers a previous run of this node left (labelled with it), given
    /// the first real state: adopts each that runs and whose task is still desired here
    /// with the same id (its TAPs, inside it, attached again; its supervision resumed);
    /// removes the rest, and the persistent TAPs of the tasks not adopted (a task still
    /// desired is then started afresh by [`Agent::reconcile`]).
    pub(super) async fn settle_leftover_containers(&mut self, state: &ClusterState) {
        let Some((engine, _)) = self.engine.clone() else {
            return;
        };
        let node = self.node.clone();
        let wanted: BTreeMap<String, &Task> = state
            .tasks_on(&node)
            .filter(|t| t.spec.image.is_some())
            .map(|t| {
                (
                    container::container_name(t.service.as_str(), t.slot, &t.id),
                    t,
                )
            })
            .collect();
        let listed = match engine.labelled(node.as_str()).await {
            Ok(listed) => listed,
            Err(e) => {
                warn!(error = %e, "cannot list this node's containers");
                Vec::new()
            }
        };
        let mut adopted = BTreeSet::new();
        for l in listed {
            let task = wanted
                .get(&l.name)
                .filter(|t| l.running && l.task_id.as_deref() == Some(t.id.as_str()));
            if let Some(task) = task {
                if self.tasks.contains_key(&task.name) {
                    // A process task of that name was adopted: the state says it is not.
                } else {
                    match self.adopt_image_task(state, task, &engine, &l.id).await {
                        Ok(lt) => {
                            info!(task = %task.name, container = %l.name, "adopted the container a previous run left");
                            self.tasks.insert(task.name.clone(), lt);
                            adopted.insert(task.id.clone());
                            continue;
                        }
                        Err(error) => {
                            warn!(task = %task.name, %error, "cannot adopt the container: starting it afresh")
                        }
                    }
                }
            }
            match engine.remove(&l.id).await {
                Ok(()) => info!(container = %l.name, "removed a leftover container"),
                Err(e) => {
                    warn!(container = %l.name, error = %e, "cannot remove a leftover container")
                }
            }
            if let Some(id) = l.task_id {
                self.forget_image_taps(&id, &adopted).await;
            }
        }
        // The TAPs of desired tasks whose container was gone: made afresh with the task.
        let ids: Vec<String> = wanted.values().map(|t| t.id.clone()).collect();
        for id in ids {
            self.forget_image_taps(&id, &adopted).await;
        }
    }

    /// Deletes task `id`'s persistent TAPs left in overlayd's namespace (a container that
    /// ended or was removed gives them back to it), unless the task was adopted.
    async fn forget_image_taps(&self, id: &str, adopted: &BTreeSet<String>) {
        if adopted.contains(id) {
            return;
        }
        let prefix = naming::image_tap_prefix(id);
        match iface::delete_own(&[prefix]).await {
            Ok(names) if names.is_empty() => {}
            Ok(names) => {
                info!(task_id = %id, taps = ?names, "removed the TAPs a previous run left")
            }
            Err(e) => {
                warn!(task_id = %id, error = %e, "cannot remove the TAPs a previous run left")
            }
        }
    }

    /// Takes over the running container `id` of `task` a previous run left: its TAPs
    /// (inside it, found by their MACs, as Docker renamed them) are attached again and
    /// handed to the datapath with the task's bindings, and its supervision resumes on the
    /// same container and pid.
    async fn adopt_image_task(
        &mut self,
        state: &ClusterState,
        task: &Task,
        engine: &Engine,
        id: &str,
    ) -> Result<LocalTask, String> {
        let (c, engine, events) = {
            let (c, _, events) = self.container_task(state, task)?;
            (c, engine.clone(), events)
        };
        let pid = container::running_pid(&engine, id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("its container is not running")?;
        let bindings = bindings_of(state, task)?;
        let macs: Vec<MacAddr> = task.attachments.iter().map(|a| a.mac).collect();
        let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let queues = self.datapath.workers();
        let fds = tokio::task::spawn_blocking(move || iface::reopen_by_mac(&ns, macs, queues))
            .await
            .map_err(|e| format!("reopen thread failed: {e}"))?
            .map_err(|e| format!("attaching to its interfaces in container pid {pid}: {e}"))?;
        let adopted = Adopted {
            id: id.to_string(),
            pid,
        };
        self.supervise_container(task, c, engine, events, fds, bindings, Some(adopted))
    }
}

/// The engine on `docker_host` and its events stream for `node`'s containers.
pub fn engine_of(docker_host: &std::path::Path, node: &str) -> (Engine, Events) {
    let engine = Engine::new(docker_host);
    let events = Events::start(engine.clone(), node.to_string());
    (engine, events)
}
