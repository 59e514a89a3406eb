//! Container endpoints: interfaces this node makes for containers that other runtimes run
//! (CNI's ADD, Docker's CreateEndpoint and Join), their resolver, and their removal when the
//! runtime says so or the container's namespace goes away unannounced.

use super::tasks::resolver_sockets;
use super::Agent;
use crate::dns::server::{self as dns, Shared as DnsShared};
use crate::naming;
use crate::sys::iface::{self, IfaceSpec};
use crate::sys::tap;
use datapath::vocab::{PortBinding, PortId};
use protocol::control::Op;
use protocol::state::ClusterState;
use protocol::types::Vni;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A container's interface this node made for a runtime (see [`protocol::state::Endpoint`]).
pub(super) struct LocalEndpoint {
    /// What it was made from: remade if the state's endpoint under the key differs.
    spec: protocol::state::Endpoint,
    pub(super) port: (PortId, PortBinding),
    /// Stops the resolver served inside the container's namespace.
    pub(super) cancel: CancellationToken,
    /// The resolver is served (its sockets need the namespace, which a Docker container
    /// gets only after its join).
    resolver: bool,
    /// The namespace was seen: from then on, its going away means the container is gone.
    seen: bool,
    made: std::time::Instant,
}

/// How long a Docker endpoint may wait for its container's namespace after its join.
const DOCKER_START_WITHIN: Duration = Duration::from_secs(60);

impl Agent {
    /// Makes, remakes or removes this node's container endpoints to match the state; returns
    /// whether the local ports changed. An endpoint whose namespace is gone (the container
    /// vanished without its runtime telling us) is removed from the cluster state.
    pub(super) async fn reconcile_endpoints(&mut self, state: &ClusterState) -> bool {
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
            iface::create_task_ifaces(&path, vec![spec], queues, iface::Lifetime::WithFds)
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
        let fds = iface::create_detached(&spec, self.datapath.workers(), iface::Lifetime::WithFds)
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
            self.datapath.add_port(port, fd, tap::udp_offload(), vni);
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
