//! The node API: HTTP/1.1 + JSON on a Unix socket (see `protocol::api` for the routes and
//! bodies). Handlers are thin: parse, call the manager, shape the answer like Docker's.
//! Every error is a JSON `{"message": ...}` with a meaningful status.

use crate::datapath::stats::Counters;
use crate::manager::{ApiError, Manager};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::api::{
    self, ContainerSpec, EndpointView, ErrorBody, Ipam, IpamConfig, NetworkInspect, NetworkTarget,
    ServiceInspect, ServiceSpec, TaskState, TaskView,
};
use protocol::state::{ClusterState, Network, Service, Task};
use protocol::types::NodeName;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Clone)]
pub struct ApiState {
    pub manager: Arc<Manager>,
    pub counters: Arc<Counters>,
    pub node: NodeName,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ErrorBody {
                message: self.message,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/info", get(info))
        .route("/networks", get(network_list))
        .route("/networks/create", post(network_create))
        .route("/networks/{name}", get(network_inspect).delete(network_rm))
        .route("/services", get(service_list))
        .route("/services/create", post(service_create))
        .route("/services/{name}", get(service_inspect).delete(service_rm))
        .route("/services/{name}/scale", post(service_scale))
        .route("/tasks", get(task_list))
        .route("/tasks/{name}", get(task_inspect))
        .route("/datapath/stats", get(stats))
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
        .with_state(state)
}

fn network_view(s: &ClusterState, net: &Network) -> NetworkInspect {
    let prefix = net.subnet.prefix_len();
    let mut containers = BTreeMap::new();
    for t in s.tasks.values() {
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
    NetworkInspect {
        name: net.name.to_string(),
        id: net.id.clone(),
        created: net.created_at,
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
    }
}

fn service_view(st: &ApiState, s: &ClusterState, svc: &Service) -> ServiceInspect {
    let running = s
        .tasks
        .values()
        .filter(|t| t.service == svc.name)
        .filter(|t| st.manager.task_status(&t.name, &t.id).state == TaskState::Running)
        .count() as u32;
    ServiceInspect {
        id: svc.id.clone(),
        created_at: svc.created_at,
        updated_at: svc.updated_at,
        spec: ServiceSpec {
            name: svc.name.to_string(),
            container_spec: ContainerSpec {
                command: svc.command.clone(),
                env: svc.env.clone(),
            },
            networks: svc
                .networks
                .iter()
                .map(|n| NetworkTarget {
                    target: n.to_string(),
                })
                .collect(),
            replicas: svc.replicas,
        },
        running,
    }
}

fn task_view(st: &ApiState, t: &Task) -> TaskView {
    TaskView {
        id: t.id.clone(),
        name: t.name.clone(),
        service: t.service.to_string(),
        slot: t.slot,
        node: t.node.to_string(),
        desired_state: "running".into(),
        status: st.manager.task_status(&t.name, &t.id),
        attachments: t.attachments.clone(),
        netns: crate::sys::netns::path_of(&crate::agent::netns_name(&t.node, &t.name))
            .display()
            .to_string(),
    }
}

async fn info(State(st): State<ApiState>) -> ApiResult<api::Info> {
    let s = st.manager.snapshot();
    let running = s
        .tasks
        .values()
        .filter(|t| st.manager.task_status(&t.name, &t.id).state == TaskState::Running)
        .count();
    Ok(Json(api::Info {
        api_version: api::API_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        node: st.node.to_string(),
        state_dir: st.manager.state_dir().display().to_string(),
        networks: s.networks.len(),
        services: s.services.len(),
        tasks: s.tasks.len(),
        tasks_running: running,
    }))
}

async fn network_list(State(st): State<ApiState>) -> ApiResult<Vec<NetworkInspect>> {
    let s = st.manager.snapshot();
    Ok(Json(
        s.networks.values().map(|n| network_view(&s, n)).collect(),
    ))
}

async fn network_create(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, Json<NetworkInspect>), ApiError> {
    let net = st.manager.create_network(parse(&body)?)?;
    let s = st.manager.snapshot();
    Ok((StatusCode::CREATED, Json(network_view(&s, &net))))
}

async fn network_inspect(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<NetworkInspect> {
    let s = st.manager.snapshot();
    let net = s
        .networks
        .get(name.as_str())
        .ok_or_else(|| ApiError::not_found(format!("network {name} not found")))?;
    Ok(Json(network_view(&s, net)))
}

async fn network_rm(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.manager.remove_network(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn service_list(State(st): State<ApiState>) -> ApiResult<Vec<ServiceInspect>> {
    let s = st.manager.snapshot();
    Ok(Json(
        s.services
            .values()
            .map(|v| service_view(&st, &s, v))
            .collect(),
    ))
}

async fn service_create(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, Json<ServiceInspect>), ApiError> {
    let svc = st.manager.create_service(parse(&body)?)?;
    let s = st.manager.snapshot();
    Ok((StatusCode::CREATED, Json(service_view(&st, &s, &svc))))
}

async fn service_inspect(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<ServiceInspect> {
    let s = st.manager.snapshot();
    let svc = s
        .services
        .get(name.as_str())
        .ok_or_else(|| ApiError::not_found(format!("service {name} not found")))?;
    Ok(Json(service_view(&st, &s, svc)))
}

async fn service_scale(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<ServiceInspect> {
    let req: api::ServiceScale = parse(&body)?;
    let svc = st.manager.scale_service(&name, req.replicas)?;
    let s = st.manager.snapshot();
    Ok(Json(service_view(&st, &s, &svc)))
}

async fn service_rm(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.manager.remove_service(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn task_list(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<TaskView>> {
    let s = st.manager.snapshot();
    if let Some(svc) = q.get("service") {
        if !s.services.contains_key(svc.as_str()) {
            return Err(ApiError::not_found(format!("service {svc} not found")));
        }
    }
    let tasks = s
        .tasks
        .values()
        .filter(|t| q.get("service").is_none_or(|svc| t.service.as_str() == svc))
        .map(|t| task_view(&st, t))
        .collect();
    Ok(Json(tasks))
}

async fn task_inspect(State(st): State<ApiState>, Path(name): Path<String>) -> ApiResult<TaskView> {
    let s = st.manager.snapshot();
    let t = s
        .tasks
        .get(&name)
        .or_else(|| s.tasks.values().find(|t| t.id == name))
        .ok_or_else(|| ApiError::not_found(format!("task {name} not found")))?;
    Ok(Json(task_view(&st, t)))
}

async fn stats(State(st): State<ApiState>) -> ApiResult<api::DatapathStats> {
    Ok(Json(st.counters.snapshot()))
}
