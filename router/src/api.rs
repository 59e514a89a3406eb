//! The node API: HTTP/1.1 + JSON on a Unix socket (see `protocol::api` for the routes and
//! bodies). Handlers are thin: parse, hand the change to the [`Cluster`] (applied here on a
//! manager, forwarded on a worker), and shape the answer like Docker's from the resulting
//! snapshot. Every error is a JSON `{"message": ...}` with a meaningful status.

mod logs;
mod membership;

use crate::cluster::{Cluster, Mode};
use crate::ingress::stats::Registry;
use crate::naming;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use datapath::conntrack::ConnTable;
use datapath::stats::Counters;
use protocol::api::{
    self, ContainerSpec, Endpoint, EndpointSpec, EndpointView, Ipam, IpamConfig, NetworkInspect,
    NetworkTarget, NodeView, OpError, PortSpec, ServiceInspect, ServiceSpec, TaskState, TaskStatus,
    TaskView, VirtualIp,
};
use protocol::control::{NodeHealth, Op, Snapshot};
use protocol::state::{Availability, ClusterState, Network, Role, Service, Spec, Task, Vtep};
use protocol::timestamp::Timestamp;
use protocol::types::{MacAddr, NodeName};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone)]
pub struct ApiState {
    pub cluster: Cluster,
    pub counters: Arc<Counters>,
    /// The load balancer's connection table (`GET /flows`).
    pub flows: Arc<ConnTable>,
    /// The routing mesh's per-port counters, reported with the datapath's.
    pub ingress: Arc<Registry>,
    pub node: NodeName,
    pub state_dir: PathBuf,
    /// The node's Docker Engine, for image tasks' logs (with `--docker-plugin`).
    pub docker_host: Option<PathBuf>,
    /// Asks the daemon to upgrade in place (`POST /node/upgrade`, [`crate::upgrade`]); the
    /// answer is the new process's pid and binary, or why it did not take over.
    pub upgrade: Option<tokio::sync::mpsc::Sender<UpgradeRequest>>,
}

/// A request to upgrade in place, answered once the new process is ready (and this one
/// stops) or has failed (and this one goes on serving).
pub type UpgradeRequest = tokio::sync::oneshot::Sender<Result<(u32, String), String>>;

/// An [`OpError`] as the API answers it: its status, and the message as an
/// [`ErrorBody`](protocol::api::ErrorBody).
#[derive(Debug)]
pub struct HttpError(pub OpError);

impl From<OpError> for HttpError {
    fn from(e: OpError) -> HttpError {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0.body())).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, HttpError>;

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, OpError> {
    serde_json::from_slice(body)
        .map_err(|e| OpError::bad_request(format!("invalid request body: {e}")))
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/info", get(info))
        .route("/networks", get(network_list))
        .route("/networks/create", post(network_create))
        .route("/networks/{name}", get(network_inspect).delete(network_rm))
        .route("/networks/{name}/vteps", get(vtep_list).post(vtep_add))
        .route("/networks/{name}/rotate-key", post(network_rotate_key))
        .route("/networks/{name}/vteps/{mac}", delete(vtep_rm))
        .route("/services", get(service_list))
        .route("/services/create", post(service_create))
        .route("/services/{name}", get(service_inspect).delete(service_rm))
        .route("/services/{name}/scale", post(service_scale))
        .route("/services/{name}/update", post(service_update))
        .route("/services/{name}/rollback", post(service_rollback))
        .route("/services/{name}/logs", get(logs::service_logs))
        .route("/tasks", get(task_list))
        .route("/tasks/{name}", get(task_inspect))
        .route("/nodes", get(node_list))
        .route("/node/upgrade", post(node_upgrade))
        .route(
            "/nodes/{name}",
            get(node_inspect).delete(membership::node_rm),
        )
        .route("/nodes/{name}/update", post(node_update))
        .route("/nodes/{name}/inspect", get(membership::node_inspect))
        .route("/nodes/{name}/promote", post(membership::node_promote))
        .route("/nodes/{name}/demote", post(membership::node_demote))
        .route("/cluster/join-token", get(membership::join_token))
        .route(
            "/cluster/join-token/rotate",
            post(membership::rotate_join_token),
        )
        .route("/datapath/stats", get(stats))
        .route("/flows", get(flows))
        .route("/endpoints", get(endpoint_list).post(endpoint_create))
        .route(
            "/endpoints/{container}/{ifname}",
            get(endpoint_inspect).delete(endpoint_rm),
        )
        .fallback(|| async { HttpError(OpError::not_found("no such API endpoint")) })
        .with_state(state)
}

fn status_of(snap: &Snapshot, t: &Task) -> TaskStatus {
    match snap.statuses.get(&t.name) {
        Some((id, st)) if *id == t.id => st.clone(),
        _ => TaskStatus::pending(crate::clock::now()),
    }
}

fn network_view(snap: &Snapshot, net: &Network) -> NetworkInspect {
    let prefix = net.subnet.prefix_len();
    let mut containers = BTreeMap::new();
    for t in snap.state.tasks.values() {
        for a in t.attachments.iter().filter(|a| a.network == net.name) {
            containers.insert(
                t.id.clone(),
                EndpointView {
                    name: t.name.clone(),
                    mac_address: a.mac.to_string(),
                    ipv4_address: format!("{}/{prefix}", a.address),
                    node: t.node.to_string(),
                },
            );
        }
    }
    for e in snap
        .state
        .endpoints
        .values()
        .filter(|e| e.network == net.name)
    {
        containers.insert(
            protocol::state::Endpoint::key(&e.container, &e.ifname),
            EndpointView {
                name: format!("{}-{}", e.runtime, e.container),
                mac_address: e.mac.to_string(),
                ipv4_address: format!("{}/{prefix}", e.address),
                node: e.node.to_string(),
            },
        );
    }
    for (node, ip) in &net.lb_endpoints {
        containers.insert(
            format!("ingress-endpoint-{node}"),
            EndpointView {
                name: "ingress-endpoint".into(),
                mac_address: protocol::types::MacAddr::from_ipv4(*ip).to_string(),
                ipv4_address: format!("{ip}/{prefix}"),
                node: node.to_string(),
            },
        );
    }
    NetworkInspect {
        name: net.name.to_string(),
        id: net.id.clone(),
        created: Timestamp::from_unix_secs(net.created_at),
        scope: "swarm".into(),
        driver: net.driver.clone(),
        ipam: Ipam {
            driver: "default".into(),
            config: vec![IpamConfig {
                subnet: net.subnet.to_string(),
                gateway: net.gateway.to_string(),
            }],
        },
        vni: net.vni.get(),
        containers,
        options: net.options.clone(),
        ingress: net.ingress,
        encryption: net.encrypted().then(|| {
            let keys = snap.keys.get(&net.name).map(Vec::as_slice).unwrap_or(&[]);
            api::EncryptionView {
                cipher: "esp-aes256-gcm".into(),
                sending: protocol::control::send_key(keys, crate::clock::now_ms()).map(|k| k.id),
                keys: keys
                    .iter()
                    .map(|k| api::KeyInfo {
                        id: k.id,
                        spi: format!("{:#010x}", protocol::esp::spi(net.vni.get(), k.id)),
                        active_from: Timestamp::from_unix_ms(k.active_from_ms),
                        retire_at: k.retire_at_ms.map(Timestamp::from_unix_ms),
                    })
                    .collect(),
            }
        }),
    }
}

fn service_view(snap: &Snapshot, svc: &Service) -> ServiceInspect {
    let running = snap
        .state
        .tasks
        .values()
        .filter(|t| t.service == svc.name && status_of(snap, t).state == TaskState::Running)
        .count() as u32;
    let endpoint_spec = EndpointSpec {
        mode: svc.endpoint_mode,
        ports: svc.ports.iter().map(PortSpec::from).collect(),
    };
    let d = &svc.deploy;
    ServiceInspect {
        id: svc.id.clone(),
        version: api::VersionView { index: d.version },
        created_at: Timestamp::from_unix_secs(svc.created_at),
        updated_at: Timestamp::from_unix_secs(svc.updated_at),
        spec: {
            let mut spec = spec_view(&svc.name, &svc.spec(&snap.state));
            // A global service's count is the nodes it has a task on, not its highest slot.
            spec.replicas = snap.state.desired_tasks(&svc.name);
            spec
        },
        previous_spec: d.previous.as_deref().map(|p| spec_view(&svc.name, p)),
        endpoint: Endpoint {
            spec: endpoint_spec,
            ports: svc.ports.iter().map(PortSpec::from).collect(),
            virtual_ips: svc
                .vips
                .iter()
                .filter_map(|(net, vip)| {
                    let n = snap.state.networks.get(net)?;
                    Some(VirtualIp {
                        network_id: n.id.clone(),
                        addr: format!("{vip}/{}", n.subnet.prefix_len()),
                    })
                })
                .collect(),
        },
        update_status: d.status.as_ref().map(Into::into),
        running,
    }
}

/// A spec (the current or the previous one) as Docker shows it.
fn spec_view(name: &protocol::types::ServiceName, spec: &Spec) -> ServiceSpec {
    ServiceSpec {
        name: name.to_string(),
        container_spec: ContainerSpec {
            image: spec.image.as_ref().map(|i| i.image.clone()),
            command: spec.command.clone(),
            env: spec.env.clone(),
            healthcheck: spec.healthcheck.as_ref().map(Into::into),
            stop_grace_period: Some(
                spec.stop_grace_period_s
                    .unwrap_or(protocol::state::DEFAULT_STOP_GRACE_S)
                    * 1_000_000_000,
            ),
        },
        networks: spec
            .networks
            .iter()
            .map(|n| NetworkTarget {
                target: n.to_string(),
                aliases: spec.aliases.get(n).cloned().unwrap_or_default(),
            })
            .collect(),
        replicas: spec.replicas,
        endpoint_spec: EndpointSpec {
            mode: spec.endpoint_mode,
            ports: spec.ports.iter().map(PortSpec::from).collect(),
        },
        lb_idle_timeout: spec.lb_idle_timeout,
        update_config: (&spec.update_config).into(),
        rollback_config: (&spec.rollback_config).into(),
        mode: match spec.mode {
            protocol::state::ServiceMode::Replicated => api::ModeView::Replicated {
                replicas: spec.replicas,
            },
            protocol::state::ServiceMode::Global => api::ModeView::Global {},
        },
    }
}

fn task_view(snap: &Snapshot, t: &Task) -> TaskView {
    let mut v = view_of(t, "running", status_of(snap, t));
    v.mountns = Some(naming::task_mntns(&t.node, &t.name).display().to_string());
    v.up_to_date = snap
        .state
        .services
        .get(&t.service)
        .is_some_and(|s| s.is_current(t));
    v
}

/// The parts of a task's view that the state alone gives.
fn view_of(t: &Task, desired_state: &str, status: TaskStatus) -> TaskView {
    TaskView {
        id: t.id.clone(),
        name: t.name.clone(),
        service: t.service.to_string(),
        slot: t.slot,
        node: t.node.to_string(),
        desired_state: desired_state.into(),
        status: status.into(),
        attachments: t.attachments.clone(),
        netns: naming::task_netns(&t.node, &t.name).display().to_string(),
        mountns: None,
        up_to_date: false,
    }
}

fn node_view(st: &ApiState, snap: &Snapshot, n: &protocol::state::Node) -> NodeView {
    let ready = match snap.health.get(&n.name) {
        Some(h) => *h == NodeHealth::Ready,
        // A standalone node has no health map: it is itself.
        None => n.name == st.node,
    };
    NodeView {
        name: n.name.to_string(),
        role: match n.role {
            Role::Manager => "manager".into(),
            Role::Worker => "worker".into(),
        },
        availability: format!("{:?}", n.availability).to_lowercase(),
        state: if ready { "ready" } else { "down" }.into(),
        address: n.advertise_addr.map(|a| a.to_string()),
        data_port: n.data_port,
        joined_at: Timestamp::from_unix_secs(n.joined_at),
        this_node: n.name == st.node,
    }
}

fn network_of<'a>(snap: &'a Snapshot, name: &str) -> Result<&'a Network, OpError> {
    snap.state
        .networks
        .get(name)
        .ok_or_else(|| OpError::not_found(format!("network {name} not found")))
}

fn service_of<'a>(snap: &'a Snapshot, name: &str) -> Result<&'a Service, OpError> {
    snap.state
        .services
        .get(name)
        .ok_or_else(|| OpError::not_found(format!("service {name} not found")))
}

async fn info(State(st): State<ApiState>) -> ApiResult<api::Info> {
    let snap = st.cluster.snapshot();
    let running = snap
        .state
        .tasks
        .values()
        .filter(|t| status_of(&snap, t).state == TaskState::Running)
        .count();
    let role = match st.cluster.mode() {
        Mode::Manager { join: None, .. } => "standalone",
        Mode::Manager { .. } => "manager",
        // A manager that follows another (on etcd), or a promoted node, is a manager.
        Mode::Worker(_) => match snap.state.nodes.get(st.node.as_str()) {
            Some(n) if n.role == protocol::state::Role::Manager => "manager",
            _ => "worker",
        },
    };
    Ok(Json(api::Info {
        api_version: api::API_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        node: st.node.to_string(),
        role: role.into(),
        manager_reachable: st.cluster.manager_reachable(),
        state_dir: st.state_dir.display().to_string(),
        networks: snap.state.networks.len(),
        services: snap.state.services.len(),
        tasks: snap.state.tasks.len(),
        tasks_running: running,
    }))
}

async fn network_list(State(st): State<ApiState>) -> ApiResult<Vec<NetworkInspect>> {
    let snap = st.cluster.snapshot();
    Ok(Json(
        snap.state
            .networks
            .values()
            .map(|n| network_view(&snap, n))
            .collect(),
    ))
}

async fn network_create(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, Json<NetworkInspect>), HttpError> {
    let req: api::NetworkCreate = parse(&body)?;
    let name = req.name.clone();
    st.cluster.apply(Op::CreateNetwork(req)).await?;
    let snap = st.cluster.snapshot();
    Ok((
        StatusCode::CREATED,
        Json(network_view(&snap, network_of(&snap, &name)?)),
    ))
}

async fn network_inspect(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<NetworkInspect> {
    let snap = st.cluster.snapshot();
    Ok(Json(network_view(&snap, network_of(&snap, &name)?)))
}

async fn network_rotate_key(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    st.cluster.apply(Op::RotateKey(name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn network_rm(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    st.cluster.apply(Op::RemoveNetwork(name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn endpoint_info(snap: &Snapshot, e: &protocol::state::Endpoint) -> Option<api::EndpointInfo> {
    let net = snap.state.networks.get(&e.network)?;
    Some(api::EndpointInfo {
        container: e.container.clone(),
        ifname: e.ifname.clone(),
        netns: e.netns.clone(),
        node: e.node.to_string(),
        network: e.network.to_string(),
        runtime: e.runtime.clone(),
        address: format!("{}/{}", e.address, net.subnet.prefix_len()),
        gateway: net.gateway.to_string(),
        mac: e.mac.to_string(),
        mtu: net.mtu(),
        dns: crate::dns::server::RESOLVER_ADDR
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string(),
    })
}

async fn endpoint_list(State(st): State<ApiState>) -> ApiResult<Vec<api::EndpointInfo>> {
    let snap = st.cluster.snapshot();
    let all = snap.state.endpoints.values();
    Ok(Json(all.filter_map(|e| endpoint_info(&snap, e)).collect()))
}

fn endpoint_of(
    snap: &Snapshot,
    container: &str,
    ifname: &str,
) -> Result<api::EndpointInfo, OpError> {
    snap.state
        .endpoints
        .get(&protocol::state::Endpoint::key(container, ifname))
        .and_then(|e| endpoint_info(snap, e))
        .ok_or_else(|| {
            OpError::not_found(format!("container {container} has no interface {ifname}"))
        })
}

async fn endpoint_inspect(
    State(st): State<ApiState>,
    Path((container, ifname)): Path<(String, String)>,
) -> ApiResult<api::EndpointInfo> {
    Ok(Json(endpoint_of(
        &st.cluster.snapshot(),
        &container,
        &ifname,
    )?))
}

/// Makes a container's interface on this node and answers once the cluster state has it
/// (the interface itself follows within the agent's next pass; a runtime can wait on
/// `GET /endpoints/C/IF` or on the interface in the namespace).
async fn endpoint_create(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, Json<api::EndpointInfo>), HttpError> {
    let req: api::EndpointCreate = parse(&body)?;
    let runtime = req.runtime.unwrap_or_else(|| "cni".into());
    if !matches!(runtime.as_str(), "cni" | "docker") {
        return Err(OpError::bad_request(format!(
            "unknown runtime {runtime:?}: \"cni\" or \"docker\""
        ))
        .into());
    }
    let (container, ifname) = (req.container.clone(), req.ifname.clone());
    st.cluster
        .apply(Op::AddEndpoint(protocol::state::EndpointRequest {
            container: req.container,
            ifname: req.ifname,
            netns: req.netns,
            node: st.node.clone(),
            network: req.network,
            runtime,
            address: None,
        }))
        .await?;
    let info = endpoint_of(&st.cluster.snapshot(), &container, &ifname)?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn endpoint_rm(
    State(st): State<ApiState>,
    Path((container, ifname)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    st.cluster
        .apply(Op::RemoveEndpoint { container, ifname })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vtep_list(State(st): State<ApiState>, Path(name): Path<String>) -> ApiResult<Vec<Vtep>> {
    let snap = st.cluster.snapshot();
    Ok(Json(network_of(&snap, &name)?.vteps.clone()))
}

fn parse_mac(s: &str) -> Result<MacAddr, OpError> {
    s.parse()
        .map_err(|e: protocol::types::BadMac| OpError::bad_request(e.to_string()))
}

async fn vtep_add(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Vec<Vtep>> {
    let req: api::VtepAdd = parse(&body)?;
    let bad_ip = |s: &str| OpError::bad_request(format!("invalid IPv4 address {s:?}"));
    let vtep = Vtep {
        address: req.address.parse().map_err(|_| bad_ip(&req.address))?,
        mac: parse_mac(&req.mac)?,
        ip: match &req.ip {
            Some(ip) => Some(ip.parse().map_err(|_| bad_ip(ip))?),
            None => None,
        },
    };
    st.cluster
        .apply(Op::AddVtep {
            network: name.clone(),
            vtep,
        })
        .await?;
    let snap = st.cluster.snapshot();
    Ok(Json(network_of(&snap, &name)?.vteps.clone()))
}

async fn vtep_rm(
    State(st): State<ApiState>,
    Path((name, mac)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    let mac = parse_mac(&mac)?;
    st.cluster
        .apply(Op::RemoveVtep { network: name, mac })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn service_list(State(st): State<ApiState>) -> ApiResult<Vec<ServiceInspect>> {
    let snap = st.cluster.snapshot();
    Ok(Json(
        snap.state
            .services
            .values()
            .map(|v| service_view(&snap, v))
            .collect(),
    ))
}

async fn service_create(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, Json<ServiceInspect>), HttpError> {
    let req: api::ServiceCreate = parse(&body)?;
    let name = req.name.clone();
    st.cluster.apply(Op::CreateService(Box::new(req))).await?;
    let snap = st.cluster.snapshot();
    Ok((
        StatusCode::CREATED,
        Json(service_view(&snap, service_of(&snap, &name)?)),
    ))
}

async fn service_inspect(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<ServiceInspect> {
    let snap = st.cluster.snapshot();
    Ok(Json(service_view(&snap, service_of(&snap, &name)?)))
}

async fn service_scale(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<ServiceInspect> {
    let req: api::ServiceScale = parse(&body)?;
    st.cluster
        .apply(Op::ScaleService {
            name: name.clone(),
            replicas: req.replicas,
        })
        .await?;
    let snap = st.cluster.snapshot();
    Ok(Json(service_view(&snap, service_of(&snap, &name)?)))
}

async fn service_update(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<ServiceInspect> {
    let update: Box<api::ServiceUpdate> = parse(&body)?;
    st.cluster
        .apply(Op::UpdateService {
            name: name.clone(),
            update,
        })
        .await?;
    let snap = st.cluster.snapshot();
    Ok(Json(service_view(&snap, service_of(&snap, &name)?)))
}

/// `service rollback`: the previous spec, rolled out under the rollback policy.
async fn service_rollback(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<ServiceInspect> {
    let update = Box::new(api::ServiceUpdate {
        rollback: true,
        ..Default::default()
    });
    st.cluster
        .apply(Op::UpdateService {
            name: name.clone(),
            update,
        })
        .await?;
    let snap = st.cluster.snapshot();
    Ok(Json(service_view(&snap, service_of(&snap, &name)?)))
}

async fn service_rm(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    st.cluster.apply(Op::RemoveService(name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn task_list(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<TaskView>> {
    let snap = st.cluster.snapshot();
    if let Some(svc) = q.get("service") {
        service_of(&snap, svc)?;
    }
    let mut tasks: Vec<TaskView> = snap
        .state
        .tasks
        .values()
        .filter(|t| q.get("service").is_none_or(|svc| t.service.as_str() == svc))
        .map(|t| task_view(&snap, t))
        .collect();
    // `service ps`: each slot's past tasks too (newest first), as Swarm lists them under
    // the slot's current one. Slots the service no longer has are not shown.
    if let (Some(svc), Some("true")) = (q.get("service"), q.get("history").map(String::as_str)) {
        let replicas = snap
            .state
            .services
            .get(svc.as_str())
            .map_or(0, |s| s.replicas);
        tasks.extend(
            snap.state
                .past_tasks(svc)
                .into_iter()
                .filter(|p| p.task.slot <= replicas)
                .map(past_task_view),
        );
    }
    Ok(Json(tasks))
}

/// A task that left the desired state: desired state "shutdown", why, and since when.
fn past_task_view(p: &protocol::state::PastTask) -> TaskView {
    let status = TaskStatus {
        state: TaskState::Shutdown,
        error: Some(p.reason.clone()),
        pid: None,
        restarts: 0,
        since: p.ended_at,
        health: None,
    };
    view_of(&p.task, "shutdown", status)
}

async fn task_inspect(State(st): State<ApiState>, Path(name): Path<String>) -> ApiResult<TaskView> {
    let snap = st.cluster.snapshot();
    let t = find_task(&snap.state, &name)
        .ok_or_else(|| OpError::not_found(format!("task {name} not found")))?;
    Ok(Json(task_view(&snap, t)))
}

/// A task by name (`web.1`, or a start-first replacement's `web.1.ID`), by id, or by its
/// slot's name when a start-first update has renamed the slot's task (`web.1` finds
/// `web.1.ID`; while both run, the older one).
fn find_task<'a>(state: &'a ClusterState, name: &str) -> Option<&'a Task> {
    if let Some(t) = state.tasks.get(name) {
        return Some(t);
    }
    if let Some(t) = state.tasks.values().find(|t| t.id == name) {
        return Some(t);
    }
    let (service, slot) = name.rsplit_once('.')?;
    let (service, slot) = (
        protocol::types::ServiceName::new(service).ok()?,
        slot.parse().ok()?,
    );
    let svc = state.services.get(&service)?;
    let mut tasks: Vec<&Task> = state.slot_tasks(&svc.name, slot).collect();
    // The one that runs the older spec first (the one serving while its successor starts).
    tasks.sort_by_key(|t| svc.is_current(t));
    tasks.first().copied()
}

async fn node_list(State(st): State<ApiState>) -> ApiResult<Vec<NodeView>> {
    let snap = st.cluster.snapshot();
    Ok(Json(
        snap.state
            .nodes
            .values()
            .map(|n| node_view(&st, &snap, n))
            .collect(),
    ))
}

async fn node_inspect(State(st): State<ApiState>, Path(name): Path<String>) -> ApiResult<NodeView> {
    let snap = st.cluster.snapshot();
    let n = snap
        .state
        .nodes
        .get(name.as_str())
        .ok_or_else(|| OpError::not_found(format!("node {name} not found")))?;
    Ok(Json(node_view(&st, &snap, n)))
}

async fn node_update(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<NodeView> {
    let req: api::NodeUpdate = parse(&body)?;
    let availability = match req.availability.as_str() {
        "active" => Availability::Active,
        "drain" => Availability::Drain,
        other => {
            return Err(OpError::bad_request(format!(
                "invalid availability {other:?}: expected \"active\" or \"drain\""
            ))
            .into())
        }
    };
    st.cluster
        .apply(Op::UpdateNode {
            node: name.clone(),
            availability,
        })
        .await?;
    node_inspect(State(st), Path(name)).await
}

/// `POST /node/upgrade`: this node's overlayd starts the binary on disk and hands over to it
/// ([`crate::upgrade`]). Answers `{"pid", "binary"}` of the new process once it has taken the
/// handover (this one then stops), or an error while this one goes on serving.
async fn node_upgrade(State(st): State<ApiState>) -> ApiResult<serde_json::Value> {
    let Some(tx) = st.upgrade.as_ref() else {
        return Err(OpError::unavailable("this overlayd cannot upgrade in place").into());
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx.try_send(reply).is_err() {
        return Err(OpError::unavailable("an upgrade is already under way").into());
    }
    match answer.await {
        Ok(Ok((pid, binary))) => Ok(Json(serde_json::json!({ "pid": pid, "binary": binary }))),
        Ok(Err(e)) => Err(OpError::internal(format!("upgrade failed: {e}")).into()),
        Err(_) => Err(OpError::unavailable("overlayd is shutting down").into()),
    }
}

async fn stats(State(st): State<ApiState>) -> ApiResult<api::DatapathStats> {
    let mut stats = st.counters.snapshot();
    stats.ingress = st.ingress.snapshot();
    Ok(Json(stats))
}

/// `GET /flows[?service=NAME][&node=NODE]`: this node's load-balanced flows (to backends on
/// `NODE`), oldest first.
async fn flows(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<api::FlowInfo>> {
    // A flow names its service by its counters: one lookup per flow, by their address.
    let names: HashMap<*const datapath::conntrack::ServiceCounters, String> = st
        .counters
        .lb
        .names()
        .into_iter()
        .map(|(name, c)| (Arc::as_ptr(&c), name))
        .collect();
    let only = q.get("service");
    let on_node = q.get("node");
    // A remote backend's node by its underlay address.
    let nodes: HashMap<std::net::Ipv4Addr, String> = st
        .cluster
        .snapshot()
        .state
        .nodes
        .iter()
        .filter_map(|(name, n)| Some((n.advertise_addr?, name.to_string())))
        .collect();
    let now = st.flows.now_ms();
    let mut out = Vec::new();
    st.flows.visit(|f| {
        let Some(service) = names.get(&Arc::as_ptr(&f.service)) else {
            return;
        };
        if only.is_some_and(|o| o != service) {
            return;
        }
        let proto = match f.key.proto {
            datapath::nat::PROTO_TCP => "tcp",
            datapath::nat::PROTO_UDP => "udp",
            _ => "icmp",
        };
        let (backend_at, backend_node) = match f.backend_at {
            datapath::vocab::Location::Local(_) => ("local".to_string(), st.node.to_string()),
            datapath::vocab::Location::Remote(a) => (
                a.ip().to_string(),
                nodes.get(a.ip()).cloned().unwrap_or_default(),
            ),
        };
        if on_node.is_some_and(|n| *n != backend_node) {
            return;
        }
        let ((frames_out, bytes_out), (frames_back, bytes_back)) = f.moved();
        out.push(api::FlowInfo {
            service: service.clone(),
            proto: proto.to_string(),
            client: format!("{}:{}", f.key.src, f.key.sport),
            vip: format!("{}:{}", f.key.dst, f.key.dport),
            backend: format!("{}:{}", f.backend_ip, f.key.dport),
            backend_at,
            backend_node,
            state: f.state_name().to_string(),
            age_ms: now.saturating_sub(f.started_ms),
            idle_ms: f.idle_for(now),
            frames_out,
            bytes_out,
            frames_back,
            bytes_back,
        });
    });
    out.sort_by(|a, b| {
        b.age_ms
            .cmp(&a.age_ms)
            .then_with(|| a.client.cmp(&b.client))
    });
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every time in an inspect view is RFC 3339, as Docker's; the state keeps numbers.
    #[test]
    fn inspect_times_are_rfc3339() {
        let (m, _view, dir) = crate::manager::standalone_for_test("api-times");
        let options = [("encrypted".to_string(), String::new())].into();
        m.create_network(api::NetworkCreate {
            name: "a".into(),
            options,
            ..Default::default()
        })
        .unwrap();
        m.create_service(api::ServiceCreate {
            name: "web".into(),
            networks: vec![NetworkTarget {
                target: "a".into(),
                aliases: vec![],
            }],
            replicas: Some(1),
            command: vec!["sleep".into(), "infinity".into()],
            ..Default::default()
        })
        .unwrap();
        let update = api::ServiceUpdate {
            env_add: vec!["V=2".into()],
            ..Default::default()
        };
        m.update_service("web", update).unwrap();
        let snap = crate::cluster::server::snapshot(&m);
        let is_rfc3339 = |v: &serde_json::Value| {
            v.as_str()
                .and_then(protocol::timestamp::Timestamp::parse_rfc3339)
                .is_some_and(|t| t.unix_secs() > 1_700_000_000)
        };

        let net = serde_json::to_value(network_view(&snap, &snap.state.networks["a"])).unwrap();
        assert!(is_rfc3339(&net["Created"]), "{net}");
        let key = &net["Encryption"]["Keys"][0];
        assert!(is_rfc3339(&key["ActiveFrom"]), "{key}");

        let svc = &snap.state.services["web"];
        let v = serde_json::to_value(service_view(&snap, svc)).unwrap();
        for field in ["CreatedAt", "UpdatedAt"] {
            assert!(is_rfc3339(&v[field]), "{field}: {v}");
        }
        assert!(is_rfc3339(&v["UpdateStatus"]["StartedAt"]), "{v}");
        let created =
            protocol::timestamp::Timestamp::parse_rfc3339(v["CreatedAt"].as_str().unwrap());
        assert_eq!(created.map(|t| t.unix_secs()), Some(svc.created_at));

        let t = snap.state.tasks.values().next().unwrap();
        let v = serde_json::to_value(task_view(&snap, t)).unwrap();
        assert!(is_rfc3339(&v["status"]["since"]), "{v}");
        let v = serde_json::to_value(past_task_view(&protocol::state::PastTask {
            task: t.clone(),
            service_id: svc.id.clone(),
            reason: "scaled down".into(),
            ended_at: 1_700_000_001,
            ended_revision: 1,
            released: false,
        }))
        .unwrap();
        assert_eq!(v["status"]["since"], "2023-11-14T22:13:21Z");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
