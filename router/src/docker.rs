//! Docker's network and IPAM plugin (libnetwork's remote driver protocol: JSON over HTTP on
//! a Unix socket whose file name is the driver name), so that `docker network create -d
//! overlayd --ipam-driver overlayd NAME` and `docker run --network NAME` put real containers
//! on the cluster network NAME.
//!
//! How Docker's calls map onto the cluster (Docker 20.10, local scope; each host's Docker
//! keeps its own network object, the cluster network is one):
//! - `RequestPool`: the subnet given with `--subnet`, or else one no cluster network uses.
//! - `CreateNetwork` does not carry the network's name. Once Docker has stored the network,
//!   the plugin reads its name from Docker's API (`--docker-host`) and creates the cluster
//!   network with that name, subnet and `-o` options, or attaches to it if it exists (with
//!   `--subnet`, the subnets must agree; without, the cluster network's wins).
//! - `RequestAddress`: the lowest address of the cluster network nobody holds; `CreateEndpoint`
//!   records the endpoint in the cluster state under Docker's endpoint id with that address
//!   (a race with another host ends in a clear refusal of one `docker run`).
//! - `Join`: the endpoint learns its container's namespace, reached through dockerd's own
//!   mount namespace (`/proc/PID/root` + the sandbox key, PID from the socket's peer
//!   credentials). That namespace exists only once the container starts, so the agent makes
//!   the TAP in overlayd's own namespace (dockerd's too) with the network's MTU and the
//!   endpoint's MAC, and the reply names it for Docker to move in (as `eth0`, with its address
//!   and the gateway). Once the namespace shows up the agent serves the resolver at
//!   127.0.0.11 in it; after an overlayd restart it makes the TAP right in the namespace, as
//!   for a CNI container.
//! - An image task's container (`service create --image`, `container.rs`) asks for the task's
//!   own address on each network (`IPAMConfig.IPv4Address`). `CreateEndpoint` recognises it
//!   (an attachment of an image task on this node with that address and network) and records
//!   nothing in the cluster state: the endpoint is the task's attachment, whose TAP the agent
//!   made already (`naming::image_tap_name`), and `Join` names that TAP, with the gateway
//!   only for the task's first network (its default route).
//! - `DeleteEndpoint` removes it. Each host's Docker network is recorded on the cluster
//!   network (`docker_nodes`); the last host's `DeleteNetwork` releases a cluster network the
//!   plugin made once no endpoint and no service uses it.

use crate::cluster::Cluster;
use crate::durable;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use ipnet::Ipv4Net;
use protocol::api::NetworkCreate;
use protocol::control::Op;
use protocol::docker as request;
use protocol::state::{Endpoint, EndpointRequest};
use protocol::types::NodeName;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UnixListener;
use tracing::{info, warn};

/// The option that marks a cluster network as made by this plugin (released with Docker's).
pub const MADE_BY: &str = "com.overlay.docker-plugin";
/// How long `Join` waits for the agent to make the interface.
const JOIN_WAIT: Duration = Duration::from_secs(15);
/// How long the plugin waits for Docker to have stored a new network.
const NAME_WAIT: Duration = Duration::from_secs(10);

/// The pid of the process at the other end of a plugin connection (dockerd).
#[derive(Debug, Clone, Copy)]
pub struct PeerPid(Option<i32>);

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for PeerPid {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        PeerPid(stream.io().peer_cred().ok().and_then(|c| c.pid()))
    }
}

#[derive(Clone)]
pub struct Plugin {
    pub cluster: Cluster,
    pub node: NodeName,
    /// dockerd's API socket.
    pub docker_host: PathBuf,
    /// What the plugin knows of this host's Docker networks, by Docker's network id; kept in
    /// `names_file` (Docker names no network in its calls, and may have forgotten it by
    /// `DeleteNetwork`).
    known: Arc<Mutex<BTreeMap<String, DockerNet>>>,
    names_file: PathBuf,
    /// Subnets this run handed to `RequestPool` without `--subnet`.
    pools: Arc<Mutex<Vec<Ipv4Net>>>,
    /// Docker endpoints that are image tasks' attachments: endpoint id → (task id, index).
    task_endpoints: Arc<Mutex<BTreeMap<String, (String, usize)>>>,
}

/// One of this host's Docker networks: its pool, and the cluster network's name once read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct DockerNet {
    pool: Ipv4Net,
    name: Option<String>,
}

/// A plugin error as Docker reads it (the network driver's `Err`, the IPAM driver's
/// `Error`).
#[derive(Debug)]
struct PluginError(String);

impl IntoResponse for PluginError {
    fn into_response(self) -> Response {
        let body = json!({ "Err": self.0, "Error": self.0 });
        (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
    }
}

impl<E: std::fmt::Display> From<E> for PluginError {
    fn from(e: E) -> Self {
        PluginError(e.to_string())
    }
}

type Reply = Result<Json<Value>, PluginError>;

impl Plugin {
    /// The plugin of `node`; what it learns of Docker's networks is kept in `state_dir`.
    pub fn new(
        cluster: Cluster,
        node: NodeName,
        docker_host: PathBuf,
        state_dir: &std::path::Path,
    ) -> Plugin {
        let names_file = crate::naming::docker_networks_file(state_dir);
        let known = std::fs::read(&names_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Plugin {
            cluster,
            node,
            docker_host,
            known: Arc::new(Mutex::new(known)),
            names_file,
            pools: Arc::default(),
            task_endpoints: Arc::default(),
        }
    }

    /// Changes what the plugin knows of Docker's networks, and keeps it on disk (replaced
    /// atomically).
    fn update<T>(&self, f: impl FnOnce(&mut BTreeMap<String, DockerNet>) -> T) -> T {
        let mut m = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut m);
        let saved = serde_json::to_vec(&*m)
            .map_err(std::io::Error::other)
            .and_then(|b| durable::write_atomic(&self.names_file, &b, durable::PUBLIC));
        if let Err(e) = saved {
            warn!(error = %e, file = %self.names_file.display(), "cannot keep what the plugin knows of Docker's networks");
        }
        out
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DockerNet>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn router(self) -> Router {
        let ok = |v: Value| move || async move { Json(v) };
        Router::new()
            .route(
                "/Plugin.Activate",
                post(ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] }))),
            )
            .route(
                "/NetworkDriver.GetCapabilities",
                post(ok(
                    json!({ "Scope": "local", "ConnectivityScope": "global" }),
                )),
            )
            .route("/NetworkDriver.CreateNetwork", post(create_network))
            .route("/NetworkDriver.DeleteNetwork", post(delete_network))
            .route("/NetworkDriver.CreateEndpoint", post(create_endpoint))
            .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint))
            .route(
                "/NetworkDriver.EndpointOperInfo",
                post(ok(json!({ "Value": {} }))),
            )
            .route("/NetworkDriver.Join", post(join))
            .route("/NetworkDriver.Leave", post(ok(json!({}))))
            .route("/NetworkDriver.DiscoverNew", post(ok(json!({}))))
            .route("/NetworkDriver.DiscoverDelete", post(ok(json!({}))))
            .route(
                "/NetworkDriver.ProgramExternalConnectivity",
                post(ok(json!({}))),
            )
            .route(
                "/NetworkDriver.RevokeExternalConnectivity",
                post(ok(json!({}))),
            )
            .route(
                "/IpamDriver.GetCapabilities",
                post(ok(json!({ "RequiresMACAddress": false }))),
            )
            .route(
                "/IpamDriver.GetDefaultAddressSpaces",
                post(ok(json!({
                    "LocalDefaultAddressSpace": "overlayd",
                    "GlobalDefaultAddressSpace": "overlayd",
                }))),
            )
            .route("/IpamDriver.RequestPool", post(request_pool))
            .route("/IpamDriver.ReleasePool", post(ok(json!({}))))
            .route("/IpamDriver.RequestAddress", post(request_address))
            .route("/IpamDriver.ReleaseAddress", post(ok(json!({}))))
            .fallback(|| async { PluginError("no such plugin call".into()) })
            .with_state(self)
    }

    /// GET `path` on Docker's API.
    async fn docker_get(&self, path: &str) -> Result<Value, PluginError> {
        let stream = tokio::net::UnixStream::connect(&self.docker_host)
            .await
            .map_err(|e| {
                PluginError(format!(
                    "cannot reach Docker at {} (--docker-host): {e}",
                    self.docker_host.display()
                ))
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://docker{path}"))
            .header("host", "docker")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(PluginError(format!("Docker answered {status} for {path}")));
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// The cluster network behind Docker network `id`: its name from Docker's API (waiting
    /// until Docker has stored the network), remembered.
    async fn name_of(&self, id: &str) -> Result<String, PluginError> {
        if let Some(n) = self.known().get(id).and_then(|d| d.name.clone()) {
            return Ok(n);
        }
        let end = tokio::time::Instant::now() + NAME_WAIT;
        loop {
            match self.docker_get(&format!("/networks/{id}")).await {
                Ok(v) => {
                    let name = request::field(&v, "Name")?.to_string();
                    self.update(|m| {
                        if let Some(d) = m.get_mut(id) {
                            d.name = Some(name.clone());
                        }
                    });
                    return Ok(name);
                }
                Err(e) if tokio::time::Instant::now() >= end => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Records in the cluster state that this node's Docker has (or no longer has) a network
    /// for cluster network `name`.
    async fn attach(&self, name: &str, attached: bool) -> Result<(), PluginError> {
        let op = Op::DockerAttach {
            network: name.to_string(),
            node: self.node.to_string(),
            attached,
        };
        self.cluster
            .apply(op)
            .await
            .map(|_| ())
            .map_err(|e| PluginError(e.message))
    }

    /// Makes the cluster network `name` (subnet `pool`, options `opts`), or checks that the
    /// existing one agrees with a subnet the user chose (`explicit`).
    async fn ensure_network(
        &self,
        name: &str,
        pool: Ipv4Net,
        explicit: bool,
        mut opts: BTreeMap<String, String>,
    ) -> Result<(), PluginError> {
        let snap = self.cluster.snapshot();
        if let Some(net) = snap.state.networks.get(name) {
            if explicit && net.subnet != pool {
                return Err(PluginError(format!(
                    "cluster network {name} is {} but this Docker network was made with \
                     --subnet {pool}: docker network rm {name}, then create it with \
                     --subnet {} (or none)",
                    net.subnet, net.subnet
                )));
            }
            return Ok(());
        }
        opts.insert(MADE_BY.into(), "true".into());
        let req = NetworkCreate {
            name: name.to_string(),
            driver: None,
            subnet: Some(pool.to_string()),
            gateway: None,
            options: opts,
            ingress: false,
        };
        match self.cluster.apply(Op::CreateNetwork(req)).await {
            Ok(_) => {
                info!(network = name, subnet = %pool, "cluster network made for Docker");
                Ok(())
            }
            // Another host made it meanwhile.
            Err(_) if self.cluster.snapshot().state.networks.contains_key(name) => Ok(()),
            Err(e) => Err(PluginError(e.message)),
        }
    }
}

async fn request_pool(State(p): State<Plugin>, body: Bytes) -> Reply {
    let asked = request::request_pool(&body)?;
    let pool: Ipv4Net = if let Some(asked) = asked {
        asked
    } else {
        // A subnet no cluster network and no Docker network here uses, and that this run has
        // not handed out.
        let snap = p.cluster.snapshot();
        let docker: Vec<Ipv4Net> = p.known().values().map(|d| d.pool).collect();
        let mut pools = p.pools.lock().map_err(|_| PluginError("lock".into()))?;
        let overlaps =
            |a: &Ipv4Net, b: &Ipv4Net| a.contains(&b.network()) || b.contains(&a.network());
        let taken = |n: &Ipv4Net| {
            snap.state.networks.values().any(|x| overlaps(&x.subnet, n))
                || docker.iter().chain(pools.iter()).any(|x| overlaps(x, n))
        };
        let base: Ipv4Net = protocol::ipam::DEFAULT_POOL.parse()?;
        let free = base
            .subnets(protocol::ipam::DEFAULT_POOL_PREFIX)?
            .find(|n| !taken(n))
            .ok_or_else(|| PluginError("no free subnet left in the pool".into()))?;
        pools.push(free);
        free
    };
    let id = if asked.is_none() {
        format!("auto:{pool}")
    } else {
        pool.to_string()
    };
    Ok(Json(
        json!({ "PoolID": id, "Pool": pool.to_string(), "Data": {} }),
    ))
}

async fn request_address(State(p): State<Plugin>, body: Bytes) -> Reply {
    let request::AddressRequest {
        pool,
        explicit,
        gateway: gateway_ask,
        address: asked,
    } = request::request_address(&body)?;
    let snap = p.cluster.snapshot();
    // The cluster network behind the pool: by subnet, or (a pool picked without --subnet)
    // through the Docker network that uses it.
    let net = match snap.state.networks.values().find(|n| n.subnet == pool) {
        Some(n) => Some(n.clone()),
        None if !explicit => {
            let id = p
                .known()
                .iter()
                .find(|(_, d)| d.pool == pool)
                .map(|(id, _)| id.clone());
            match id {
                Some(id) => {
                    let name = p.name_of(&id).await?;
                    p.cluster
                        .snapshot()
                        .state
                        .networks
                        .get(name.as_str())
                        .cloned()
                }
                None => None,
            }
        }
        None => None,
    };
    if gateway_ask {
        // At Docker's network creation: the cluster network's gateway, or the first host of
        // the pool (what the cluster network made from it will use).
        let gw = net.as_ref().map_or_else(
            || pool.hosts().next().unwrap_or(pool.network()),
            |n| n.gateway,
        );
        let prefix = net
            .as_ref()
            .map_or(pool.prefix_len(), |n| n.subnet.prefix_len());
        return Ok(Json(
            json!({ "Address": format!("{gw}/{prefix}"), "Data": {} }),
        ));
    }
    let Some(net) = net else {
        // A --subnet that disagrees with the cluster network of the same name: say so.
        let id = p
            .known()
            .iter()
            .find(|(_, d)| d.pool == pool)
            .map(|(id, _)| id.clone());
        if let Some(id) = id {
            let name = p.name_of(&id).await?;
            if let Some(n) = p.cluster.snapshot().state.networks.get(name.as_str()) {
                return Err(PluginError(format!(
                    "cluster network {name} is {} but this Docker network was made with \
                     --subnet {pool}: docker network rm {name}, then create it with \
                     --subnet {} (or none)",
                    n.subnet, n.subnet
                )));
            }
        }
        return Err(PluginError(format!(
            "no cluster network for pool {pool} yet; try again"
        )));
    };
    let ip: Ipv4Addr = match asked {
        Some(ip) => ip,
        None => {
            let used = snap.state.used_addresses(&net.name);
            protocol::ipam::next_address(&net.subnet, &used).ok_or_else(|| {
                PluginError(format!("no free address left in network {}", net.name))
            })?
        }
    };
    Ok(Json(json!({
        "Address": format!("{ip}/{}", net.subnet.prefix_len()),
        "Data": {},
    })))
}

async fn create_network(State(p): State<Plugin>, body: Bytes) -> Reply {
    let request::CreateNetwork {
        network_id: id,
        pool,
        options: opts,
    } = request::create_network(&body)?;
    // Docker picked this pool through our IPAM only if the pool id said so; a pool not made
    // by `--subnet` is the plugin's own choice (see `request_pool`).
    let explicit = !p.pools.lock().map(|v| v.contains(&pool)).unwrap_or(false);
    p.update(|m| m.insert(id.clone(), DockerNet { pool, name: None }));
    // Docker stores the network (and so its name) only after this call returns.
    tokio::spawn(async move {
        let made = async {
            let name = p.name_of(&id).await?;
            p.ensure_network(&name, pool, explicit, opts).await?;
            p.attach(&name, true).await
        };
        if let Err(PluginError(e)) = made.await {
            warn!(docker_network = %id, error = %e, "cannot make the cluster network");
        }
    });
    Ok(Json(json!({})))
}

async fn delete_network(State(p): State<Plugin>, body: Bytes) -> Reply {
    let id = request::delete_network(&body)?;
    let gone = p.update(|m| m.remove(&id));
    if let (Some(d), Ok(mut pools)) = (&gone, p.pools.lock()) {
        pools.retain(|x| *x != d.pool);
    }
    let Some(name) = gone.and_then(|d| d.name) else {
        return Ok(Json(json!({})));
    };
    // The cluster network may be gone already; nothing to record then.
    let _ = p.attach(&name, false).await;
    let snap = p.cluster.snapshot();
    let elsewhere = snap
        .state
        .networks
        .get(name.as_str())
        .is_some_and(|n| !n.docker_nodes.is_empty());
    let ours = snap
        .state
        .networks
        .get(name.as_str())
        .is_some_and(|n| n.options.contains_key(MADE_BY));
    let used = snap
        .state
        .endpoints
        .values()
        .any(|e| e.network.as_str() == name)
        || snap
            .state
            .services
            .values()
            .any(|s| s.networks.iter().any(|n| n.as_str() == name));
    if ours && !used && !elsewhere {
        match p.cluster.apply(Op::RemoveNetwork(name.clone())).await {
            Ok(_) => info!(network = %name, "cluster network released with Docker's"),
            Err(e) => info!(network = %name, error = %e.message, "cluster network kept"),
        }
    }
    Ok(Json(json!({})))
}

/// The image task on this node whose attachment to `network` has `address`: its id, the
/// attachment's index and MAC.
fn image_task_attachment(
    p: &Plugin,
    network: &str,
    address: Ipv4Addr,
) -> Option<(String, usize, protocol::types::MacAddr)> {
    let snap = p.cluster.snapshot();
    let found = snap
        .state
        .tasks_on(&p.node)
        .filter(|t| t.spec.image.is_some())
        .find_map(|t| {
            t.attachments
                .iter()
                .position(|a| a.network.as_str() == network && a.address == address)
                .map(|i| (t.id.clone(), i, t.attachments[i].mac))
        });
    found
}

fn task_endpoints(p: &Plugin) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, usize)>> {
    p.task_endpoints.lock().unwrap_or_else(|e| e.into_inner())
}

async fn create_endpoint(State(p): State<Plugin>, body: Bytes) -> Reply {
    let req = request::create_endpoint(&body)?;
    let endpoint = req.endpoint_id.as_str();
    let name = p.name_of(&req.network_id).await?;
    let task = req
        .address
        .and_then(|a| image_task_attachment(&p, &name, a));
    if let Some((task, index, mac)) = task {
        task_endpoints(&p).insert(endpoint.to_string(), (task, index));
        let mut iface = json!({});
        if !req.has_mac {
            iface["MacAddress"] = json!(mac.to_string());
        }
        return Ok(Json(json!({ "Interface": iface })));
    }
    let e = EndpointRequest {
        container: endpoint.to_string(),
        ifname: "eth0".into(),
        netns: String::new(),
        node: p.node.clone(),
        network: name,
        runtime: "docker".into(),
        address: req.address,
    };
    p.cluster
        .apply(Op::AddEndpoint(e))
        .await
        .map_err(|e| PluginError(e.message))?;
    let snap = p.cluster.snapshot();
    let made = snap
        .state
        .endpoints
        .get(&Endpoint::key(endpoint, "eth0"))
        .ok_or_else(|| PluginError("endpoint not recorded".into()))?;
    let mut iface = json!({});
    if !req.has_mac {
        iface["MacAddress"] = json!(made.mac.to_string());
    }
    Ok(Json(json!({ "Interface": iface })))
}

async fn delete_endpoint(State(p): State<Plugin>, body: Bytes) -> Reply {
    let endpoint = request::delete_endpoint(&body)?;
    if task_endpoints(&p).remove(&endpoint).is_some() {
        return Ok(Json(json!({})));
    }
    // Not recorded: an image task's endpoint joined before this run (its container was
    // adopted), which the state never held either.
    let key = Endpoint::key(&endpoint, "eth0");
    if !p.cluster.snapshot().state.endpoints.contains_key(&key) {
        return Ok(Json(json!({})));
    }
    p.cluster
        .apply(Op::RemoveEndpoint {
            container: endpoint,
            ifname: "eth0".into(),
        })
        .await
        .map_err(|e| PluginError(e.message))?;
    Ok(Json(json!({})))
}

async fn join(
    State(p): State<Plugin>,
    ConnectInfo(PeerPid(pid)): ConnectInfo<PeerPid>,
    body: Bytes,
) -> Reply {
    let request::Join {
        endpoint_id: endpoint,
        sandbox_key: sandbox,
    } = request::join(&body)?;
    let task_endpoint = task_endpoints(&p).get(&endpoint).cloned();
    if let Some((task, index)) = task_endpoint {
        return join_task(&p, &endpoint, &task, index).await;
    }
    // The sandbox key is a path in dockerd's mount namespace; reach it through dockerd's
    // root (which also works when both share one).
    let pid = pid.ok_or_else(|| PluginError("cannot tell dockerd's pid".into()))?;
    let netns = format!("/proc/{pid}/root{sandbox}");
    p.cluster
        .apply(Op::BindEndpoint {
            container: endpoint.clone(),
            ifname: "eth0".into(),
            netns: netns.clone(),
        })
        .await
        .map_err(|e| PluginError(e.message))?;
    // The agent makes the TAP in overlayd's (and dockerd's) namespace; Docker moves it
    // into the container once that starts.
    let tap = crate::naming::docker_tap_name(&endpoint);
    let end = tokio::time::Instant::now() + JOIN_WAIT;
    while nix::net::if_::if_nametoindex(tap.as_str()).is_err() {
        if tokio::time::Instant::now() >= end {
            return Err(PluginError(format!(
                "overlayd did not make the interface of endpoint {endpoint} within {JOIN_WAIT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = p.cluster.snapshot();
    let gateway = snap
        .state
        .endpoints
        .get(&Endpoint::key(&endpoint, "eth0"))
        .and_then(|e| snap.state.networks.get(&e.network))
        .map(|n| n.gateway.to_string())
        .unwrap_or_default();
    info!(endpoint = %endpoint, %gateway, "container joined");
    Ok(Json(json!({
        "InterfaceName": { "SrcName": tap, "DstPrefix": "eth" },
        "Gateway": gateway,
        "DisableGatewayService": true,
    })))
}

/// `Join` of an image task's endpoint: the TAP the agent made for that attachment, and the
/// gateway on the task's first network only (its default route, as for a process task).
async fn join_task(p: &Plugin, endpoint: &str, task: &str, index: usize) -> Reply {
    let tap = crate::naming::image_tap_name(task, index);
    let end = tokio::time::Instant::now() + JOIN_WAIT;
    while nix::net::if_::if_nametoindex(tap.as_str()).is_err() {
        if tokio::time::Instant::now() >= end {
            return Err(PluginError(format!(
                "overlayd has no interface {tap} for task {task} (endpoint {endpoint})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = p.cluster.snapshot();
    let gateway = if index == 0 {
        snap.state
            .tasks
            .values()
            .find(|t| t.id == task)
            .and_then(|t| t.attachments.first())
            .and_then(|a| snap.state.networks.get(&a.network))
            .map(|n| n.gateway.to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    info!(endpoint = %endpoint, %task, index, "image task's container joined");
    Ok(Json(json!({
        "InterfaceName": { "SrcName": tap, "DstPrefix": "eth" },
        "Gateway": gateway,
        "DisableGatewayService": true,
    })))
}
