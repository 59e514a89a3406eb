//! The API's membership routes: join tokens per role and their rotation (on the manager),
//! `node promote|demote|rm` (changes, forwarded like any other), and `node inspect` in
//! Docker's shape, with the node's certificate.

use super::{ApiResult, ApiState, HttpError};
use crate::cluster::Mode;
use axum::extract::{Path, Query, State};
use axum::Json;
use protocol::api::{self, OpError};
use protocol::control::{NodeHealth, Op};
use protocol::state::{ClusterState, Node, Role};
use protocol::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Debug, Default, Deserialize)]
pub(super) struct RoleQuery {
    /// "worker" (the default) or "manager".
    #[serde(default)]
    role: Option<String>,
}

fn role_of(q: &RoleQuery) -> Result<Role, OpError> {
    match q.role.as_deref() {
        None | Some("worker") => Ok(Role::Worker),
        Some("manager") => Ok(Role::Manager),
        Some(other) => Err(OpError::bad_request(format!(
            "invalid role {other:?}: expected \"worker\" or \"manager\""
        ))),
    }
}

fn join_token_view(token: String, addr: SocketAddr) -> api::JoinToken {
    api::JoinToken {
        command: format!(
            "overlayd --node NODE --advertise-addr NODE_IP --join {addr} --token {token}"
        ),
        token,
        manager_addr: addr.to_string(),
    }
}

/// `GET /cluster/join-token?role=worker|manager`.
pub(super) async fn join_token(
    State(st): State<ApiState>,
    Query(q): Query<RoleQuery>,
) -> ApiResult<api::JoinToken> {
    let role = role_of(&q)?;
    let j = st.cluster.join_info()?;
    let token = j.tokens.token(role).map_err(OpError::from)?;
    Ok(Json(join_token_view(token.render(), j.addr)))
}

/// `POST /cluster/join-token/rotate?role=worker|manager`: a new secret for that role; the
/// old token is refused for joins from now on.
pub(super) async fn rotate_join_token(
    State(st): State<ApiState>,
    Query(q): Query<RoleQuery>,
) -> ApiResult<api::JoinToken> {
    let role = role_of(&q)?;
    let j = st.cluster.join_info()?;
    let token = j.tokens.rotate(role).map_err(OpError::from)?;
    tracing::info!(?role, "rotated the join token");
    Ok(Json(join_token_view(token.render(), j.addr)))
}

/// `POST /nodes/{name}/promote`.
pub(super) async fn node_promote(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<NodeInspect> {
    set_role(st, name, Role::Manager).await
}

/// `POST /nodes/{name}/demote`.
pub(super) async fn node_demote(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<NodeInspect> {
    set_role(st, name, Role::Worker).await
}

async fn set_role(st: ApiState, name: String, role: Role) -> ApiResult<NodeInspect> {
    st.cluster
        .apply(Op::SetRole {
            node: name.clone(),
            role,
        })
        .await?;
    node_inspect(State(st), Path(name)).await
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RmQuery {
    #[serde(default)]
    force: bool,
}

/// `DELETE /nodes/{name}?force=true`.
pub(super) async fn node_rm(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<RmQuery>,
) -> Result<Json<serde_json::Value>, HttpError> {
    st.cluster
        .apply(Op::RemoveNode {
            node: name,
            force: q.force,
        })
        .await?;
    Ok(Json(serde_json::json!({})))
}

/// `node inspect`, shaped like Docker's (`docker node inspect`), with the certificate the
/// node holds.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeInspect {
    #[serde(rename = "ID")]
    id: String,
    created_at: Timestamp,
    description: Description,
    spec: Spec,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    manager_status: Option<ManagerStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate: Option<Certificate>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Description {
    hostname: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Spec {
    role: String,
    availability: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Status {
    state: String,
    addr: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ManagerStatus {
    /// The manager that holds the state and serves the control endpoint.
    leader: bool,
    reachability: String,
    addr: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Certificate {
    serial: String,
    role: String,
    not_after: Timestamp,
}

fn role_name(role: Role) -> String {
    match role {
        Role::Manager => "manager".into(),
        Role::Worker => "worker".into(),
    }
}

/// The control endpoint this node knows: its own (manager) or its manager's (worker).
fn control_addr(st: &ApiState) -> Option<SocketAddr> {
    match st.cluster.mode() {
        Mode::Manager { join, .. } => join.map(|j| j.addr),
        Mode::Worker(link) => link.manager(),
    }
}

fn inspect_view(st: &ApiState, state: &ClusterState, ready: bool, n: &Node) -> NodeInspect {
    let control = control_addr(st);
    let leader = match (st.cluster.mode(), control, n.advertise_addr) {
        (Mode::Manager { .. }, _, _) => n.name == st.node,
        (_, Some(c), Some(ip)) => c.ip() == std::net::IpAddr::V4(ip),
        _ => false,
    };
    let reachability = if ready { "reachable" } else { "unreachable" };
    let addr = n.advertise_addr.map(|a| a.to_string()).unwrap_or_default();
    NodeInspect {
        id: n.name.to_string(),
        created_at: Timestamp::from_unix_secs(n.joined_at),
        description: Description {
            hostname: n.name.to_string(),
        },
        spec: Spec {
            role: role_name(n.role),
            availability: format!("{:?}", n.availability).to_lowercase(),
        },
        status: Status {
            state: if ready { "ready" } else { "down" }.into(),
            addr: addr.clone(),
        },
        manager_status: (n.role == Role::Manager).then(|| ManagerStatus {
            leader,
            reachability: reachability.into(),
            addr: match control {
                Some(c) if leader => c.to_string(),
                _ => addr,
            },
        }),
        certificate: state.current_cert(&n.name).map(|c| Certificate {
            serial: c.serial.clone(),
            role: role_name(c.role),
            not_after: Timestamp::from_unix_secs(c.not_after),
        }),
    }
}

/// `GET /nodes/{name}/inspect`.
pub(super) async fn node_inspect(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<NodeInspect> {
    let snap = st.cluster.snapshot();
    let n = snap
        .state
        .nodes
        .get(name.as_str())
        .ok_or_else(|| OpError::not_found(format!("node {name} not found")))?;
    let ready = match snap.health.get(&n.name) {
        Some(h) => *h == NodeHealth::Ready,
        None => n.name == st.node,
    };
    Ok(Json(inspect_view(&st, &snap.state, ready, n)))
}
