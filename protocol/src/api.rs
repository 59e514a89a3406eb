//! Bodies of the node API: HTTP/1.1 + JSON on a Unix socket, shaped after the Docker Engine
//! API so that `curl --unix-socket` users and `docker` muscle memory both work.
//!
//! | method and path                 | body in                 | body out               |
//! |---------------------------------|-------------------------|------------------------|
//! | `GET /info`                     |                         | [`Info`]               |
//! | `GET /networks`                 |                         | `[NetworkInspect]`     |
//! | `POST /networks/create`         | [`NetworkCreate`]       | [`NetworkInspect`]     |
//! | `GET /networks/{name}`          |                         | [`NetworkInspect`]     |
//! | `DELETE /networks/{name}`       |                         |                        |
//! | `POST /networks/{name}/rotate-key` |                      |                        |
//! | `GET /services`                 |                         | `[ServiceInspect]`     |
//! | `POST /services/create`         | [`ServiceCreate`]       | [`ServiceInspect`]     |
//! | `GET /services/{name}`          |                         | [`ServiceInspect`]     |
//! | `POST /services/{name}/scale`   | [`ServiceScale`]        | [`ServiceInspect`]     |
//! | `POST /services/{name}/update`  | [`ServiceUpdate`]       | [`ServiceInspect`]     |
//! | `POST /services/{name}/rollback`|                         | [`ServiceInspect`]     |
//! | `DELETE /services/{name}`       |                         |                        |
//! | `GET /tasks?service=NAME`       |                         | `[TaskView]`           |
//! | `GET /tasks/{name}`             |                         | [`TaskView`]           |
//! | `GET /datapath/stats`           |                         | [`DatapathStats`]      |
//! | `GET /nodes`, `GET /nodes/{name}`|                        | `[NodeView]`, [`NodeView`] |
//! | `POST /nodes/{name}/update`     | [`NodeUpdate`]          | [`NodeView`]           |
//! | `GET /cluster/join-token`       |                         | [`JoinToken`]          |
//! | `GET /networks/{name}/vteps`    |                         | `[Vtep]`               |
//! | `POST /networks/{name}/vteps`   | [`VtepAdd`]             | `[Vtep]`               |
//! | `DELETE /networks/{name}/vteps/{mac}` |                   |                        |
//!
//! Errors come back as a non-2xx status with an [`ErrorBody`] (from an [`OpError`]).

use crate::state::{
    Attachment, EndpointMode, HealthCheck, PortConfig, PortProtocol, ProxyProtocol, PublishMode,
    StateError, UpdateConfig, UpdateConfigChange, UpdateStatus,
};
use crate::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The API's version, reported by `/info`; clients compare it with their own.
pub const API_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}

/// Why an operation was refused: an HTTP status and one clear line. The API answers it as
/// an [`ErrorBody`] with that status; the control plane carries it back to the node that
/// forwarded the operation (`control::ToNode::Response`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub status: u16,
    pub message: String,
}

impl OpError {
    pub fn bad_request(message: impl Into<String>) -> OpError {
        OpError {
            status: 400,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> OpError {
        OpError {
            status: 404,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> OpError {
        OpError {
            status: 500,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> OpError {
        OpError {
            status: 503,
            message: message.into(),
        }
    }

    /// The body the API sends with the status.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            message: self.message.clone(),
        }
    }
}

/// A refused state change: 404 for what does not exist, 409 for a conflict with what does,
/// 503 for an exhausted resource, 400 for a bad request.
impl From<StateError> for OpError {
    fn from(e: StateError) -> OpError {
        use StateError::*;
        let status = match &e {
            NoSuchNetwork(_)
            | NoSuchService(_)
            | NoSuchNode(_)
            | NoSuchVtep { .. }
            | NoSuchEndpoint(_) => 404,
            NetworkExists(_)
            | ServiceExists(_)
            | NetworkInUse { .. }
            | NetworkHasEndpoints { .. }
            | EndpointExists { .. }
            | SubnetOverlap { .. }
            | SubnetReserved { .. }
            | VniInUse { .. }
            | PortInUse { .. }
            | NodeInUse { .. }
            | NoIngressNetwork => 409,
            NoSuchPort { .. } => 404,
            PoolExhausted { .. }
            | NetworkFull { .. }
            | VniExhausted
            | NoActiveNode
            | NoFreePort { .. } => 503,
            BadAlias { .. } | AliasWithoutNetwork(_) => 400,
            _ => 400,
        };
        OpError {
            status,
            message: e.to_string(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkCreate {
    pub name: String,
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Make it the routing mesh's network, replacing the current one.
    #[serde(default)]
    pub ingress: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamConfig {
    pub subnet: String,
    pub gateway: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Ipam {
    pub driver: String,
    pub config: Vec<IpamConfig>,
}

/// One task endpoint on a network, as `docker network inspect` lists containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointView {
    pub name: String,
    pub mac_address: String,
    #[serde(rename = "IPv4Address")]
    pub ipv4_address: String,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkInspect {
    pub name: String,
    pub id: String,
    pub created: Timestamp,
    pub scope: String,
    pub driver: String,
    #[serde(rename = "IPAM")]
    pub ipam: Ipam,
    #[serde(rename = "VNI")]
    pub vni: u32,
    /// Keyed by task id, as Docker keys them by container id; on the ingress network also
    /// each node's router endpoint (`ingress-endpoint-NODE`).
    pub containers: BTreeMap<String, EndpointView>,
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub ingress: bool,
    /// An encrypted network's keys as this node holds them (never the secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionView>,
}

/// The keys of an encrypted network, without their secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EncryptionView {
    /// "esp-aes256-gcm".
    pub cipher: String,
    /// The key id nodes send with now (None: this node has no key yet).
    pub sending: Option<u8>,
    pub keys: Vec<KeyInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyInfo {
    pub id: u8,
    /// The SPI on the wire, hex.
    #[serde(rename = "SPI")]
    pub spi: String,
    pub active_from: Timestamp,
    pub retire_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCreate {
    pub name: String,
    /// In order: the task's eth0, eth1, ... (in JSON a plain name is accepted too).
    pub networks: Vec<NetworkTarget>,
    #[serde(default)]
    pub replicas: Option<u32>,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// `vip` (the default) or `dnsrr`.
    #[serde(default)]
    pub endpoint_mode: Option<EndpointMode>,
    /// Idle timeout of load-balanced flows, seconds.
    #[serde(default)]
    pub lb_idle_timeout: Option<u64>,
    /// Published ports (`--publish`).
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// `--health-cmd` and friends.
    #[serde(default)]
    pub healthcheck: Option<crate::state::HealthCheck>,
    /// `--stop-grace-period`, seconds.
    #[serde(default)]
    pub stop_grace_period_s: Option<u64>,
    /// `--update-*`: changes to Docker's default update policy.
    #[serde(default)]
    pub update_config: UpdateConfigChange,
    /// `--rollback-*`: changes to Docker's default rollback policy.
    #[serde(default)]
    pub rollback_config: UpdateConfigChange,
    /// `--mode`: replicated (the default) or global (one task per eligible node; `replicas`
    /// is then ignored).
    #[serde(default)]
    pub mode: Option<crate::state::ServiceMode>,
    /// `--image` and the container options: tasks are containers run by each node's
    /// Docker Engine (`command` is then the container's arguments, and may be empty).
    #[serde(default)]
    pub image: Option<crate::state::ContainerImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceScale {
    pub replicas: u32,
}

/// `service update`: what changes; anything absent or empty stays as it is. What needs new
/// tasks (command, environment, networks, the ingress attachment, health check, grace
/// period, `force`) is rolled out under the update policy; the rest applies at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceUpdate {
    /// Ports to publish (`--publish-add`).
    #[serde(default)]
    pub publish_add: Vec<PortSpec>,
    /// Published ports to close: `PORT` or `PORT/PROTOCOL` (`--publish-rm`).
    #[serde(default)]
    pub publish_rm: Vec<String>,
    /// The command and its arguments (`--args`).
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// `KEY=VALUE`, replacing KEY's value if set (`--env-add`).
    #[serde(default)]
    pub env_add: Vec<String>,
    /// Variables to unset, by KEY (`--env-rm`).
    #[serde(default)]
    pub env_rm: Vec<String>,
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Networks to attach, after the others (`--network-add`).
    #[serde(default)]
    pub network_add: Vec<NetworkTarget>,
    /// Networks to detach, by name (`--network-rm`).
    #[serde(default)]
    pub network_rm: Vec<String>,
    #[serde(default)]
    pub endpoint_mode: Option<EndpointMode>,
    /// Seconds.
    #[serde(default)]
    pub lb_idle_timeout: Option<u64>,
    /// `--health-*`, `--no-healthcheck`.
    #[serde(default)]
    pub health: HealthUpdate,
    /// Seconds.
    #[serde(default)]
    pub stop_grace_period_s: Option<u64>,
    #[serde(default)]
    pub update_config: UpdateConfigChange,
    #[serde(default)]
    pub rollback_config: UpdateConfigChange,
    /// Replace every task even if nothing else changes (`--force`).
    #[serde(default)]
    pub force: bool,
    /// Return to the previous spec instead (`service rollback`, `service update
    /// --rollback`); nothing else may be given with it.
    #[serde(default)]
    pub rollback: bool,
    /// A new image reference for an image service (`--image`), its options kept.
    #[serde(default)]
    pub image: Option<String>,
}

/// What `service update` changes in the health check: each field given replaces the
/// current one (a service without a check needs `command`); `disable` removes the check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthUpdate {
    /// The check's argv (`--health-cmd CMD` is `["sh", "-c", CMD]`).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub interval_s: Option<u64>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default)]
    pub start_period_s: Option<u64>,
    /// `--no-healthcheck`.
    #[serde(default)]
    pub disable: bool,
}

/// Docker's defaults for what `--health-cmd` leaves unsaid.
pub const DEFAULT_HEALTH_INTERVAL_S: u64 = 30;
pub const DEFAULT_HEALTH_TIMEOUT_S: u64 = 30;
pub const DEFAULT_HEALTH_RETRIES: u32 = 3;

impl HealthUpdate {
    pub fn is_empty(&self) -> bool {
        *self == HealthUpdate::default()
    }

    /// The health check `current` becomes. Changing a field of a service without a check
    /// needs a command; `disable` with anything else is refused.
    pub fn applied_to(&self, current: Option<HealthCheck>) -> Result<Option<HealthCheck>, String> {
        if self.disable {
            if *self
                != (HealthUpdate {
                    disable: true,
                    ..Default::default()
                })
            {
                return Err("--no-healthcheck conflicts with the other --health-* flags".into());
            }
            return Ok(None);
        }
        if self.is_empty() {
            return Ok(current);
        }
        let mut h = match (current, &self.command) {
            (Some(h), _) => h,
            (None, Some(_)) => HealthCheck {
                command: Vec::new(),
                interval_s: DEFAULT_HEALTH_INTERVAL_S,
                timeout_s: DEFAULT_HEALTH_TIMEOUT_S,
                retries: DEFAULT_HEALTH_RETRIES,
                start_period_s: 0,
            },
            (None, None) => return Err("the service has no health check: give --health-cmd".into()),
        };
        if let Some(c) = &self.command {
            h.command = c.clone();
        }
        h.interval_s = self.interval_s.unwrap_or(h.interval_s);
        h.timeout_s = self.timeout_s.unwrap_or(h.timeout_s);
        h.retries = self.retries.unwrap_or(h.retries);
        h.start_period_s = self.start_period_s.unwrap_or(h.start_period_s);
        Ok(Some(h))
    }
}

/// A published port as Docker's API shows it (`Endpoint.Ports[]`). Its JSON leaves `Proxy`
/// out when there is none, as Docker's has no such key; the control plane's postcard, which
/// cannot tell a field left out, always carries it (see the `Serialize` impl below).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortSpec {
    #[serde(default)]
    pub protocol: PortProtocol,
    pub target_port: u16,
    /// Absent or 0: a free port from 30000-32767.
    #[serde(default)]
    pub published_port: u16,
    #[serde(default)]
    pub publish_mode: PublishMode,
    /// `v2`: send a PROXY protocol v2 header with the client's address first.
    #[serde(default)]
    pub proxy: Option<ProxyProtocol>,
}

/// `skip_serializing_if` would leave `Proxy` out of postcard too, and a worker's forwarded
/// `service create --publish` or `service update --publish-add` would then not decode on the
/// manager (found by the control fuzz target). So the field is skipped in JSON only.
impl Serialize for PortSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let skip_proxy = s.is_human_readable() && self.proxy.is_none();
        let mut st = s.serialize_struct("PortSpec", if skip_proxy { 4 } else { 5 })?;
        st.serialize_field("Protocol", &self.protocol)?;
        st.serialize_field("TargetPort", &self.target_port)?;
        st.serialize_field("PublishedPort", &self.published_port)?;
        st.serialize_field("PublishMode", &self.publish_mode)?;
        if skip_proxy {
            st.skip_field("Proxy")?;
        } else {
            st.serialize_field("Proxy", &self.proxy)?;
        }
        st.end()
    }
}

impl From<PortSpec> for PortConfig {
    fn from(p: PortSpec) -> PortConfig {
        PortConfig {
            protocol: p.protocol,
            target: p.target_port,
            published: p.published_port,
            mode: p.publish_mode,
            proxy: p.proxy,
        }
    }
}

impl From<&PortConfig> for PortSpec {
    fn from(p: &PortConfig) -> PortSpec {
        PortSpec {
            protocol: p.protocol,
            target_port: p.target,
            published_port: p.published,
            publish_mode: p.mode,
            proxy: p.proxy,
        }
    }
}

fn parse_port(s: &str, what: &str) -> Result<u16, String> {
    s.parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("invalid {what} {s:?}: expected 1-65535"))
}

/// Parses `--publish` as Docker does: the short form `[PUBLISHED:]TARGET[/PROTOCOL]`, or the
/// long form `published=P,target=T[,protocol=tcp|udp][,mode=ingress|host][,proxy=v2]`.
pub fn parse_publish(s: &str) -> Result<PortSpec, String> {
    let bad_value = |k: &str, v: &str| format!("invalid --publish {s:?}: bad {k} {v:?}");
    let mut spec = PortSpec {
        protocol: PortProtocol::Tcp,
        target_port: 0,
        published_port: 0,
        publish_mode: PublishMode::Ingress,
        proxy: None,
    };
    if s.contains('=') {
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("invalid --publish {s:?}: {part:?} is not KEY=VALUE"))?;
            match k {
                "published" => spec.published_port = parse_port(v, "published port")?,
                "target" => spec.target_port = parse_port(v, "target port")?,
                "protocol" => {
                    spec.protocol = match v {
                        "tcp" => PortProtocol::Tcp,
                        "udp" => PortProtocol::Udp,
                        _ => return Err(bad_value(k, v)),
                    }
                }
                "mode" => {
                    spec.publish_mode = match v {
                        "ingress" => PublishMode::Ingress,
                        "host" => PublishMode::Host,
                        _ => return Err(bad_value(k, v)),
                    }
                }
                "proxy" => {
                    spec.proxy = match v {
                        "v2" => Some(ProxyProtocol::V2),
                        "none" => None,
                        _ => return Err(bad_value(k, v)),
                    }
                }
                _ => {
                    return Err(format!(
                        "invalid --publish {s:?}: unknown key {k:?} (published, target, protocol, mode, proxy)"
                    ))
                }
            }
        }
        if spec.target_port == 0 {
            return Err(format!("invalid --publish {s:?}: target=PORT is missing"));
        }
        return Ok(spec);
    }
    let (ports, proto) = match s.split_once('/') {
        Some((p, "tcp")) => (p, PortProtocol::Tcp),
        Some((p, "udp")) => (p, PortProtocol::Udp),
        Some((_, x)) => return Err(bad_value("protocol", x)),
        None => (s, PortProtocol::Tcp),
    };
    spec.protocol = proto;
    match ports.split_once(':') {
        Some((p, t)) => {
            spec.published_port = parse_port(p, "published port")?;
            spec.target_port = parse_port(t, "target port")?;
        }
        None => spec.target_port = parse_port(ports, "target port")?,
    }
    Ok(spec)
}

/// Parses a `--publish-rm` argument: `PORT` or `PORT/PROTOCOL`.
pub fn parse_publish_rm(s: &str) -> Result<(u16, Option<PortProtocol>), String> {
    let (p, proto) = match s.split_once('/') {
        Some((p, "tcp")) => (p, Some(PortProtocol::Tcp)),
        Some((p, "udp")) => (p, Some(PortProtocol::Udp)),
        Some(_) => {
            return Err(format!(
                "invalid --publish-rm {s:?}: expected PORT[/tcp|udp]"
            ))
        }
        None => (s, None),
    };
    Ok((parse_port(p, "port")?, proto))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerSpec {
    /// The image, for a service whose tasks are containers (`--image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub command: Vec<String>,
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthcheckView>,
    /// Nanoseconds, as Docker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period: Option<u64>,
}

const NS_PER_S: u64 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// A health check as Docker shows it: `Test` is `["CMD-SHELL", CMD]` for a shell command
/// (`--health-cmd`) or `["CMD", ARGV...]`; durations in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthcheckView {
    pub test: Vec<String>,
    pub interval: u64,
    pub timeout: u64,
    pub retries: u32,
    pub start_period: u64,
}

impl From<&HealthCheck> for HealthcheckView {
    fn from(h: &HealthCheck) -> HealthcheckView {
        let test = match h.command.as_slice() {
            [sh, c, cmd] if sh == "sh" && c == "-c" => vec!["CMD-SHELL".into(), cmd.clone()],
            argv => std::iter::once("CMD".to_string())
                .chain(argv.iter().cloned())
                .collect(),
        };
        HealthcheckView {
            test,
            interval: h.interval_s * NS_PER_S,
            timeout: h.timeout_s * NS_PER_S,
            retries: h.retries,
            start_period: h.start_period_s * NS_PER_S,
        }
    }
}

/// An update or rollback policy as Docker shows it (durations in nanoseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateConfigView {
    pub parallelism: u32,
    pub delay: u64,
    pub failure_action: String,
    pub monitor: u64,
    pub max_failure_ratio: f64,
    pub order: String,
}

impl From<&UpdateConfig> for UpdateConfigView {
    fn from(c: &UpdateConfig) -> UpdateConfigView {
        UpdateConfigView {
            parallelism: c.parallelism,
            delay: c.delay_ms * NS_PER_MS,
            failure_action: c.failure_action.to_string(),
            monitor: c.monitor_ms * NS_PER_MS,
            max_failure_ratio: c.max_failure_ratio.as_f64(),
            order: c.order.to_string(),
        }
    }
}

/// How the last update or rollback went, as Docker shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateStatusView {
    /// updating, paused, completed, rollback_started, rollback_paused, rollback_completed.
    pub state: String,
    pub started_at: Timestamp,
    #[serde(default)]
    pub completed_at: Option<Timestamp>,
    pub message: String,
}

impl From<&UpdateStatus> for UpdateStatusView {
    fn from(u: &UpdateStatus) -> UpdateStatusView {
        UpdateStatusView {
            state: u.state.to_string(),
            started_at: Timestamp::from_unix_secs(u.started_at),
            completed_at: u.completed_at.map(Timestamp::from_unix_secs),
            message: u.message.clone(),
        }
    }
}

/// Docker's object version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VersionView {
    pub index: u64,
}

/// A network a service attaches to, with the service's extra DNS names on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkTarget {
    pub target: String,
    pub aliases: Vec<String>,
}

impl From<&str> for NetworkTarget {
    fn from(name: &str) -> NetworkTarget {
        NetworkTarget {
            target: name.to_string(),
            aliases: Vec::new(),
        }
    }
}

/// JSON takes Docker's `{"Target": ..., "Aliases": [...]}` or a bare network name; binary
/// encodings (the control plane's postcard, which cannot guess a shape) take the struct only.
impl<'de> Deserialize<'de> for NetworkTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Full {
            target: String,
            #[serde(default)]
            aliases: Vec<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Loose {
            Name(String),
            Full(Full),
        }
        let full = if d.is_human_readable() {
            match Loose::deserialize(d)? {
                Loose::Name(target) => Full {
                    target,
                    aliases: Vec::new(),
                },
                Loose::Full(f) => f,
            }
        } else {
            Full::deserialize(d)?
        };
        Ok(NetworkTarget {
            target: full.target,
            aliases: full.aliases,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointSpec {
    /// "vip" or "dnsrr".
    pub mode: EndpointMode,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceSpec {
    pub name: String,
    pub container_spec: ContainerSpec,
    pub networks: Vec<NetworkTarget>,
    pub replicas: u32,
    pub endpoint_spec: EndpointSpec,
    /// Idle timeout of load-balanced flows, seconds (the node's default when absent).
    #[serde(default)]
    pub lb_idle_timeout: Option<u64>,
    pub update_config: UpdateConfigView,
    pub rollback_config: UpdateConfigView,
    /// Docker's `Mode`: `{"Replicated": {"Replicas": N}}` or `{"Global": {}}` (for a global
    /// service `Replicas` above is the number of nodes it has a task on).
    #[serde(default)]
    pub mode: ModeView,
}

/// A service's mode as `docker service inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModeView {
    Replicated {
        #[serde(rename = "Replicas")]
        replicas: u32,
    },
    Global {},
}

impl Default for ModeView {
    fn default() -> Self {
        ModeView::Replicated { replicas: 0 }
    }
}

impl ModeView {
    /// `service ls`'s MODE column.
    pub fn name(&self) -> &'static str {
        match self {
            ModeView::Replicated { .. } => "replicated",
            ModeView::Global {} => "global",
        }
    }
}

/// One of a service's virtual IPs, as `docker service inspect` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualIp {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Address with the network's prefix length, e.g. `10.0.0.2/24`.
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Endpoint {
    pub spec: EndpointSpec,
    /// The published ports, with the ports chosen for those that asked for any.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(rename = "VirtualIPs")]
    pub virtual_ips: Vec<VirtualIp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceInspect {
    #[serde(rename = "ID")]
    pub id: String,
    /// Bumped by every change of the spec.
    #[serde(default)]
    pub version: VersionView,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub spec: ServiceSpec,
    /// What `service rollback` returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_spec: Option<ServiceSpec>,
    pub endpoint: Endpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatusView>,
    /// Tasks reported running right now.
    pub running: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Placed on a node that has not reported on it yet.
    Pending,
    /// Namespace and interfaces being made, or the process being (re)started.
    Starting,
    Running,
    /// The last start failed or the process exited; it is retried with back-off.
    Failed,
    /// Being removed.
    Shutdown,
    /// Its node is down: the last report is stale.
    Unknown,
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            TaskState::Pending => "pending",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Failed => "failed",
            TaskState::Shutdown => "shutdown",
            TaskState::Unknown => "unknown",
        };
        f.write_str(s)
    }
}

/// What the node running a task reports about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: TaskState,
    /// Why the task is not running (the last start or exit), if it is not.
    pub error: Option<String>,
    pub pid: Option<u32>,
    /// How many times the process has been restarted.
    pub restarts: u32,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// What its health check says, if it has one (`None`: no check).
    #[serde(default)]
    pub health: Option<TaskHealth>,
}

/// A task's health, as Docker shows it: `Running (healthy)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskHealth {
    /// Checked, not yet healthy, still in its start period or first interval.
    Starting,
    Healthy,
    /// `retries` checks in a row failed.
    Unhealthy,
}

impl std::fmt::Display for TaskHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskHealth::Starting => "starting",
            TaskHealth::Healthy => "healthy",
            TaskHealth::Unhealthy => "unhealthy",
        })
    }
}

impl TaskStatus {
    pub fn pending(now: u64) -> TaskStatus {
        TaskStatus {
            state: TaskState::Pending,
            error: None,
            pid: None,
            restarts: 0,
            since: now,
            health: None,
        }
    }
}

/// A task's status as the API shows it: [`TaskStatus`], its time in RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatusView {
    pub state: TaskState,
    pub error: Option<String>,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// The last state change.
    pub since: Timestamp,
    #[serde(default)]
    pub health: Option<TaskHealth>,
}

impl From<TaskStatus> for TaskStatusView {
    fn from(s: TaskStatus) -> TaskStatusView {
        TaskStatusView {
            state: s.state,
            error: s.error,
            pid: s.pid,
            restarts: s.restarts,
            since: Timestamp::from_unix_secs(s.since),
            health: s.health,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    pub name: String,
    pub service: String,
    pub slot: u32,
    pub node: String,
    pub desired_state: String,
    pub status: TaskStatusView,
    pub attachments: Vec<Attachment>,
    /// Path of the task's network namespace (`/run/netns/...`), for `overlayctl exec`.
    pub netns: String,
    /// Path of the task's mount namespace (its resolv.conf, hosts and /sys), entered by
    /// `overlayctl exec` too.
    #[serde(default)]
    pub mountns: Option<String>,
    /// Whether it runs its service's current spec (false: an update or rollback under way
    /// replaces it). Docker's `_up-to-date` task filter.
    #[serde(default)]
    pub up_to_date: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_without_proxy_crosses_the_control_plane_and_stays_out_of_json() {
        let update = ServiceUpdate {
            publish_add: vec![parse_publish("8080:80").unwrap()],
            publish_rm: vec!["53/udp".into()],
            ..Default::default()
        };
        let bytes = postcard::to_stdvec(&update).unwrap();
        assert_eq!(
            postcard::from_bytes::<ServiceUpdate>(&bytes).unwrap(),
            update
        );
        let json = serde_json::to_string(&update.publish_add[0]).unwrap();
        assert!(!json.contains("Proxy"), "{json}");
        assert_eq!(
            serde_json::from_str::<PortSpec>(&json).unwrap(),
            update.publish_add[0]
        );
        let v2 = parse_publish("published=8080,target=80,proxy=v2").unwrap();
        let json = serde_json::to_string(&v2).unwrap();
        assert!(json.contains("\"Proxy\":\"v2\""), "{json}");
        assert_eq!(serde_json::from_str::<PortSpec>(&json).unwrap(), v2);
        let bytes = postcard::to_stdvec(&v2).unwrap();
        assert_eq!(postcard::from_bytes::<PortSpec>(&bytes).unwrap(), v2);
    }

    #[test]
    fn refused_state_changes_carry_a_status() {
        use crate::types::NetworkName;
        let net = || NetworkName::new("front").unwrap();
        let e = OpError::from(StateError::NoSuchNetwork("front".into()));
        assert_eq!(
            (e.status, e.message.as_str()),
            (404, "network front not found")
        );
        assert_eq!(OpError::from(StateError::NetworkExists(net())).status, 409);
        assert_eq!(OpError::from(StateError::VniExhausted).status, 503);
        assert_eq!(e.body().message, e.to_string());
    }

    #[test]
    fn publish_flags_short_and_long() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.published_port, p.target_port, p.protocol),
            (8080, 80, PortProtocol::Tcp)
        );
        let p = parse_publish("53:5353/udp").unwrap();
        assert_eq!(
            (p.published_port, p.target_port, p.protocol),
            (53, 5353, PortProtocol::Udp)
        );
        assert_eq!(parse_publish("80").unwrap().published_port, 0);
        let p = parse_publish("published=9000,target=80,mode=host,proxy=v2").unwrap();
        assert_eq!(p.publish_mode, PublishMode::Host);
        assert_eq!(p.proxy, Some(ProxyProtocol::V2));
        for bad in [
            "",
            "0:80",
            "8080:",
            "x:80",
            "80/sctp",
            "published=1",
            "target=80,color=red",
            "target=80,mode=global",
            "70000:80",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_publish_rm("8080/udp").unwrap(),
            (8080, Some(PortProtocol::Udp))
        );
        assert_eq!(parse_publish_rm("8080").unwrap(), (8080, None));
        assert!(parse_publish_rm("http").is_err());
        // Docker's JSON shape.
        let j: PortSpec =
            serde_json::from_str(r#"{"TargetPort":80,"PublishedPort":8080}"#).unwrap();
        assert_eq!(j, parse_publish("8080:80").unwrap());
    }

    #[test]
    fn service_updates_in_json_and_postcard() {
        let body = r#"{"env_add":["V=2"],"network_add":["b"],"replicas":3,
            "update_config":{"parallelism":2,"max_failure_ratio":0.5,"order":"start-first"},
            "health":{"command":["sh","-c","true"]},"force":true}"#;
        let u: ServiceUpdate = serde_json::from_str(body).unwrap();
        assert_eq!(u.network_add[0], NetworkTarget::from("b"));
        assert_eq!(
            u.update_config.max_failure_ratio.unwrap().to_string(),
            "0.5"
        );
        let bytes = postcard::to_stdvec(&u).unwrap();
        assert_eq!(postcard::from_bytes::<ServiceUpdate>(&bytes).unwrap(), u);
        // The health check it makes: Docker's defaults for what is not given, shown as
        // Docker shows a CMD-SHELL check.
        let h = u.health.applied_to(None).unwrap().unwrap();
        let view = HealthcheckView::from(&h);
        assert_eq!(view.test, ["CMD-SHELL", "true"]);
        assert_eq!((view.interval, view.retries), (30_000_000_000, 3));
        let keep = HealthUpdate::default().applied_to(Some(h.clone())).unwrap();
        assert_eq!(keep, Some(h));
    }

    #[test]
    fn network_targets_in_json_and_postcard() {
        let body =
            r#"{"name":"web","networks":["a",{"Target":"b","Aliases":["x"]}],"command":["true"]}"#;
        let req: ServiceCreate = serde_json::from_str(body).unwrap();
        assert_eq!(req.networks[0], NetworkTarget::from("a"));
        assert_eq!(req.networks[1].aliases, ["x"]);
        let bytes = postcard::to_stdvec(&req).unwrap();
        let back: ServiceCreate = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// The same per datapath worker (up to the last one that moved a frame).
    #[serde(default)]
    pub workers: Vec<WorkerStats>,
    pub replies: u64,
    pub flooded: u64,
    /// ESP receiving states (a sender's key and replay window) forgotten to keep each
    /// worker's map within its bound (`datapath::crypto::RX_MAX`), least recently used first.
    #[serde(default)]
    pub esp_evicted: u64,
    /// ESP datagrams sealed and opened by this node (those that failed to open are drops,
    /// by reason).
    #[serde(default)]
    pub esp_sealed: u64,
    #[serde(default)]
    pub esp_opened: u64,
    /// Dropped frames by reason (a reason that never happened is absent).
    pub drops: BTreeMap<String, u64>,
    /// Load balancing done by this node, per service (flows of this node's clients).
    #[serde(default)]
    pub services: BTreeMap<String, ServiceLbStats>,
    /// Frames and bytes to and from each network's local ports, per worker (by network
    /// name).
    #[serde(default)]
    pub networks: BTreeMap<String, Vec<NetworkLaneStats>>,
    /// The routing mesh on this node, per published port (`8080/tcp`).
    #[serde(default)]
    pub ingress: BTreeMap<String, IngressPortStats>,
}

/// `POST /endpoints`: a container's interface on a network, on this node (what a CNI plugin
/// or Docker's network plugin asks for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointCreate {
    pub container: String,
    pub ifname: String,
    /// The container's network namespace, a path on this node.
    pub netns: String,
    pub network: String,
    /// "cni" (the default) or "docker".
    #[serde(default)]
    pub runtime: Option<String>,
}

/// A container's interface as made: everything a runtime reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub container: String,
    pub ifname: String,
    pub netns: String,
    pub node: String,
    pub network: String,
    pub runtime: String,
    /// Address with prefix length (`10.0.9.5/24`).
    pub address: String,
    pub gateway: String,
    pub mac: String,
    pub mtu: u16,
    /// The embedded resolver's address inside the container.
    pub dns: String,
}

/// One datapath worker's frames.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Datagrams and their bytes (VXLAN or ESP, without the IP/UDP headers) from and to the
    /// underlay.
    #[serde(default)]
    pub underlay_rx: u64,
    #[serde(default)]
    pub underlay_rx_bytes: u64,
    #[serde(default)]
    pub underlay_tx: u64,
    #[serde(default)]
    pub underlay_tx_bytes: u64,
    /// Datagrams per underlay send (UDP GSO).
    #[serde(default)]
    pub gso: BatchStats,
    /// Segments per frame the userspace GRO wrote to a TAP.
    #[serde(default)]
    pub gro: BatchStats,
}

/// A histogram of batch sizes: batches per bucket (at most 1, 2, 4, 8, 16, 32, 64 items, and
/// more), and the items in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    pub buckets: Vec<u64>,
    pub items: u64,
}

/// One network's frames and bytes to and from its local ports, for one datapath worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkLaneStats {
    /// Read from the network's local ports (its tasks', containers' and the ingress
    /// endpoint's interfaces).
    pub from_ports: u64,
    pub from_ports_bytes: u64,
    /// Written to them.
    pub to_ports: u64,
    pub to_ports_bytes: u64,
}

/// `GET /flows`: one load-balanced flow of this node's clients, as the connection table
/// holds it (`overlayctl flows`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub service: String,
    /// "tcp", "udp" or "icmp".
    pub proto: String,
    /// The client's address and port (its task's, on the service's network).
    pub client: String,
    /// The VIP and port it asked for.
    pub vip: String,
    /// The task it was given, and where that task is: "local" or its node's underlay
    /// address.
    pub backend: String,
    pub backend_at: String,
    /// The node the backend task runs on.
    #[serde(default)]
    pub backend_node: String,
    /// TCP: syn_sent, established, fin_client, fin_backend, closed, reset; otherwise
    /// active.
    pub state: String,
    pub age_ms: u64,
    /// Since its last packet, to within a second.
    pub idle_ms: u64,
    /// Frames and bytes client to backend, and back (a super-frame counts once; bytes are
    /// whole Ethernet frames).
    #[serde(default)]
    pub frames_out: u64,
    #[serde(default)]
    pub bytes_out: u64,
    #[serde(default)]
    pub frames_back: u64,
    #[serde(default)]
    pub bytes_back: u64,
}

/// One published port on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressPortStats {
    pub service: String,
    /// "ingress" or "host".
    pub mode: String,
    /// Whether the node listens on it (false: see `error`).
    pub listening: bool,
    pub error: Option<String>,
    /// TCP connections accepted, or UDP client mappings made, since the node started.
    pub accepted: u64,
    /// Connections (or UDP mappings) open now.
    pub active: u64,
    /// Refused: no task to send to, or too many open connections.
    pub refused: u64,
    /// Connections ended by a reset (from either side, or because their task left).
    pub reset: u64,
    /// UDP datagrams that could not be queued (buffer full).
    pub dropped: u64,
    /// Payload bytes from clients to tasks, and back.
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    /// UDP mappings ended to make room for a new client: the one idle the longest, when the
    /// port holds its most (4 096) or the node its `--ingress-max-connections`.
    #[serde(default)]
    pub evicted: u64,
}

/// One service's load-balanced flows on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLbStats {
    /// Flows in the connection table now.
    pub active_flows: u64,
    /// Flows created since the node started.
    pub new_flows: u64,
    /// New flows refused because the connection table was full.
    pub refused_flows: u64,
    /// Active flows per backend address.
    pub backends: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub api_version: u32,
    pub version: String,
    pub node: String,
    /// "standalone", "manager" or "worker".
    pub role: String,
    pub manager_reachable: bool,
    pub state_dir: String,
    pub networks: usize,
    pub services: usize,
    pub tasks: usize,
    pub tasks_running: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    /// "manager" or "worker".
    pub role: String,
    /// "active" or "drain".
    pub availability: String,
    /// "ready" or "down" (no heartbeat for a few seconds).
    pub state: String,
    pub address: Option<String>,
    pub data_port: u16,
    pub joined_at: Timestamp,
    /// Whether this is the node that answered.
    pub this_node: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
    pub manager_addr: String,
    /// The command to run on a new node (its name and address to fill in).
    pub command: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtepAdd {
    pub address: String,
    pub mac: String,
    #[serde(default)]
    pub ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUpdate {
    /// "active" or "drain".
    pub availability: String,
}
