//! Image tasks (`service create --image`): the node's part of running a task as a container
//! of its Docker Engine. The agent makes the task's TAPs in its own namespace (one per
//! network attachment, with the task's MAC and the network's MTU) and hands them to the
//! datapath, as for a process task; the container's supervisor ([`crate::container`])
//! creates the container on Docker networks of driver `overlayd` with the task's addresses,
//! and the plugin (`docker.rs`) gives Docker these TAPs at the endpoints' join, so Docker
//! moves them into the container, names them eth0, eth1, ... and sets their addresses
//! before the container's process starts. The container's resolver is Docker's, forwarding
//! to the first network's gateway, where the router answers the cluster's names.

use super::tasks::{bindings_of, LocalTask};
use super::Agent;
use crate::container::{self, ContainerTask, NetAttach};
use crate::engine::{Engine, Events};
use crate::naming;
use crate::sys::iface::{self, IfaceSpec};
use crate::task;
use protocol::state::{ClusterState, Task, DEFAULT_STOP_GRACE_S};
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
        let bindings = bindings_of(state, task)?;
        let mut networks = Vec::new();
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
            let made = iface::create_detached(&spec, self.datapath.workers())
                .await
                .map_err(|e| format!("making {}: {e}", spec.name))?;
            fds.push(made);
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
        let ports = self.add_ports(fds, bindings);
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
        let stop = task::Stop::default();
        let supervisor = tokio::spawn(container::supervise(
            c,
            engine,
            events,
            self.statuses.clone(),
            stop.clone(),
        ));
        info!(task = %task.name, "image task set up");
        Ok(LocalTask {
            id: task.id.clone(),
            container: true,
            netns: PathBuf::new(),
            mntns: PathBuf::new(),
            files: PathBuf::new(),
            ports,
            resolver: CancellationToken::new(),
            stop,
            supervisor,
        })
    }

    /// Removes the containers a previous run of this node left that no task here wants
    /// any more (those still wanted are replaced when their task starts).
    pub(super) async fn remove_leftover_containers(&self, state: &ClusterState) {
        let Some((engine, _)) = &self.engine else {
            return;
        };
        let wanted: Vec<String> = state
            .tasks_on(&self.node)
            .filter(|t| t.spec.image.is_some())
            .map(|t| container::container_name(t.service.as_str(), t.slot, &t.id))
            .collect();
        match engine.labelled(self.node.as_str()).await {
            Ok(names) => {
                for name in names.into_iter().filter(|n| !wanted.contains(n)) {
                    match engine.remove(&name).await {
                        Ok(()) => info!(container = %name, "removed a leftover container"),
                        Err(e) => {
                            warn!(container = %name, error = %e, "cannot remove a leftover container")
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list this node's containers"),
        }
    }
}

/// The engine on `docker_host` and its events stream for `node`'s containers.
pub fn engine_of(docker_host: &std::path::Path, node: &str) -> (Engine, Events) {
    let engine = Engine::new(docker_host);
    let events = Events::start(engine.clone(), node.to_string());
    (engine, events)
}
