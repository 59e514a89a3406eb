//! Services: the operator's request for N replicas of one command on some networks.
//!
//! Creating one checks it (command, networks, aliases, published ports), gives it a virtual
//! IP on each of its networks in VIP mode, and places its tasks (`task.rs`), all on a scratch
//! copy so that a refusal changes nothing. Removing it returns its VIPs to the networks'
//! pools; its tasks' addresses follow once their nodes report them stopped (`history.rs`).

use super::{ClusterState, ContainerImage, Deploy, FailureAction, PortConfig, StateError};
use crate::types::{NetworkName, NodeName, ServiceName};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Most replicas one service may ask for (bounds memory and namespaces per request).
pub const MAX_REPLICAS: u32 = 1000;

/// How a service's tasks are counted, as Docker's `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// `replicas` tasks, spread over the eligible nodes.
    #[default]
    Replicated,
    /// One task on every eligible node (active, and ready when placed), following nodes as
    /// they join, drain, come back and leave (`global.rs`).
    Global,
}

impl std::fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServiceMode::Replicated => "replicated",
            ServiceMode::Global => "global",
        })
    }
}

/// How a service is reached by name, as Docker's `--endpoint-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// One virtual IP per network, load-balanced by the client's node.
    #[default]
    Vip,
    /// No VIP: DNS answers the service's name with its tasks' addresses.
    Dnsrr,
}

impl std::fmt::Display for EndpointMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndpointMode::Vip => "vip",
            EndpointMode::Dnsrr => "dnsrr",
        })
    }
}

/// A service: `replicas` tasks running one command, attached to some networks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: ServiceName,
    pub networks: Vec<NetworkName>,
    pub replicas: u32,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// The service's virtual IP on each of its networks (VIP mode): allocated from the
    /// network's IPAM when the service is created, kept until it is removed.
    #[serde(default)]
    pub vips: BTreeMap<NetworkName, Ipv4Addr>,
    /// Extra DNS names of the service, per network (`--network name=N,alias=A`).
    #[serde(default)]
    pub aliases: BTreeMap<NetworkName, Vec<String>>,
    /// Idle timeout of the service's load-balanced flows, in seconds (None: the node's
    /// default, far above IPVS's 900 s).
    #[serde(default)]
    pub lb_idle_timeout: Option<u64>,
    /// Published ports. A service with any is attached to the ingress network as well (its
    /// last entry in `networks`), through which every node's router reaches its tasks.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// The health check its tasks run (`--health-cmd` and friends); `None`: none.
    #[serde(default)]
    pub healthcheck: Option<HealthCheck>,
    /// How long a stopping task's open connections may take to finish, then how long it
    /// has between SIGTERM and SIGKILL (`--stop-grace-period`; `None`: 10 s, as Docker).
    #[serde(default)]
    pub stop_grace_period_s: Option<u64>,
    /// Its spec's version, update and rollback policies, previous spec and rollout
    /// (`update.rs`).
    #[serde(default)]
    pub deploy: Deploy,
    /// Replicated (the default, and what services saved before modes were) or global.
    #[serde(default)]
    pub mode: ServiceMode,
    /// The image its tasks' containers run (`--image`), by each node's Docker Engine;
    /// `None`: its tasks are processes in namespaces of overlayd's (the default).
    #[serde(default)]
    pub image: Option<ContainerImage>,
    /// A global service's slot on each node it has placed a task on, kept for the service's
    /// life so that the node's task is always `SERVICE.SLOT` with the same slot
    /// (`global.rs`). Empty for a replicated service.
    #[serde(default)]
    pub node_slots: BTreeMap<NodeName, u32>,
}

/// Docker's default `--stop-grace-period`.
pub const DEFAULT_STOP_GRACE_S: u64 = 10;

/// A task's health check, as Docker's `HEALTHCHECK` / `--health-*`: `command` runs inside the
/// task's namespaces every `interval_s` (the first after `start_period_s` at most); it must
/// exit 0 within `timeout_s`; `retries` failures in a row make the task unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub command: Vec<String>,
    pub interval_s: u64,
    pub timeout_s: u64,
    pub retries: u32,
    pub start_period_s: u64,
}

/// What one task runs: copied from its service when the task is made, so that tasks made
/// from an earlier version of the service (a rolling update under way) keep running what
/// they were made with.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskSpec {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub healthcheck: Option<HealthCheck>,
    #[serde(default)]
    pub stop_grace_period_s: Option<u64>,
    /// The service's `--force` count when the task was made: a task made before a forced
    /// update is outdated though it runs the same command.
    #[serde(default)]
    pub force_update: u64,
    /// The container image and options, for a task its node's Docker Engine runs.
    #[serde(default)]
    pub image: Option<ContainerImage>,
}

impl Service {
    /// What a task made now runs.
    pub fn task_spec(&self) -> TaskSpec {
        TaskSpec {
            command: self.command.clone(),
            env: self.env.clone(),
            healthcheck: self.healthcheck.clone(),
            stop_grace_period_s: self.stop_grace_period_s,
            force_update: self.deploy.force_update,
            image: self.image.clone(),
        }
    }
}

impl Service {
    /// The networks the operator attached the service to (without the ingress network the
    /// routing mesh adds).
    pub fn user_networks<'a>(
        &'a self,
        state: &'a ClusterState,
    ) -> impl Iterator<Item = &'a NetworkName> + 'a {
        self.networks
            .iter()
            .filter(move |n| !state.networks.get(*n).is_some_and(|net| net.ingress))
    }
}

/// A DNS alias is one or more dot-separated labels of letters, digits, '-' and '_'.
fn check_alias(alias: &str) -> Result<(), StateError> {
    let bad = |why: &str| StateError::BadAlias {
        alias: alias.to_string(),
        why: why.to_string(),
    };
    if alias.is_empty() || alias.len() > 253 {
        return Err(bad("expected 1 to 253 characters"));
    }
    for label in alias.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each dot-separated label must have 1 to 63 characters"));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad("only letters, digits, '-', '_' and '.' are allowed"));
        }
    }
    Ok(())
}

impl ClusterState {
    /// Creates a service and places its tasks on active nodes that `eligible` accepts (the
    /// manager passes "is heartbeating"). `new_id` yields fresh random ids.
    pub fn create_service(
        &mut self,
        mut svc: Service,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<&Service, StateError> {
        if self.services.contains_key(&svc.name) {
            return Err(StateError::ServiceExists(svc.name));
        }
        if svc.replicas > MAX_REPLICAS {
            return Err(StateError::TooManyReplicas(svc.replicas));
        }
        self.check_service(&svc)?;
        let global = svc.mode == ServiceMode::Global;
        svc.node_slots.clear();
        svc.deploy.version = svc.deploy.version.max(1);
        self.settle_ports(&mut svc)?;
        let replicas = svc.replicas;
        svc.replicas = 0;
        svc.vips.clear();
        let name = svc.name.clone();
        // Place on a scratch copy so that a failure (full subnet, no node) changes nothing.
        let mut next = self.clone();
        next.services.insert(name.clone(), svc);
        // The VIPs first: they are the service's for its whole life.
        next.ensure_vips()?;
        if global {
            next.place_global(&name, new_id, eligible, true)?;
            next.revision += 1;
        } else {
            next.scale_service(name.as_str(), replicas, new_id, eligible)?;
        }
        *self = next;
        self.services
            .get(&name)
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))
    }

    /// Checks what a service asks (by create or update): a command, networks that exist,
    /// each once and none the routing mesh's, aliases on those networks, a sound health
    /// check and policies. Its ports are checked by `settle_ports`.
    pub(super) fn check_service(&self, svc: &Service) -> Result<(), StateError> {
        // An image brings its own command; a process task needs one.
        let no_command = svc.command.first().is_none_or(String::is_empty);
        if no_command && svc.image.is_none()
            || svc
                .image
                .as_ref()
                .is_some_and(|i| i.image.trim().is_empty())
            || svc.image.is_some() && svc.command.first().is_some_and(String::is_empty)
        {
            return Err(StateError::EmptyCommand);
        }
        if svc.networks.is_empty() {
            return Err(StateError::NoNetwork);
        }
        let mut seen = BTreeSet::new();
        for n in &svc.networks {
            if !self.networks.contains_key(n) {
                return Err(StateError::NoSuchNetwork(n.to_string()));
            }
            if !seen.insert(n) {
                return Err(StateError::DuplicateNetwork(n.clone()));
            }
        }
        for (net, aliases) in &svc.aliases {
            if !svc.networks.contains(net) {
                return Err(StateError::AliasWithoutNetwork(net.clone()));
            }
            for a in aliases {
                check_alias(a)?;
            }
        }
        if let Some(n) = svc.networks.iter().find(|n| self.is_ingress(n)) {
            return Err(StateError::IngressAttach(n.clone()));
        }
        if let Some(h) = &svc.healthcheck {
            let bad = |why: &str| Err(StateError::BadHealthCheck(why.to_string()));
            if h.command.is_empty() || h.command[0].is_empty() {
                return bad("it needs a command (--health-cmd)");
            }
            if h.interval_s == 0 || h.timeout_s == 0 {
                return bad("its interval and timeout must be at least 1s");
            }
            if h.retries == 0 {
                return bad("its retries must be at least 1");
            }
        }
        if svc.deploy.rollback_config.failure_action == FailureAction::Rollback {
            return Err(StateError::BadPolicy(
                "a rollback cannot roll back: --rollback-failure-action is pause or continue"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Removes a service and all its tasks, recording `ended_at` 0 (not known): prefer
    /// [`ClusterState::remove_service_at`].
    pub fn remove_service(&mut self, name: &str) -> Result<Service, StateError> {
        self.remove_service_at(name, 0)
    }

    /// Removes a service at `now` (unix seconds). Its VIPs return to the pools at once; its
    /// tasks go to the history ("service removed"), their addresses reserved until their
    /// nodes report them stopped. Its past tasks already released are dropped.
    pub fn remove_service_at(&mut self, name: &str, now: u64) -> Result<Service, StateError> {
        let svc = self
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))?;
        let tasks: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.service == svc.name)
            .map(|t| t.name.clone())
            .collect();
        for task in &tasks {
            self.retire(task, "service removed", now);
        }
        self.services.remove(name);
        self.prune_history();
        self.revision += 1;
        Ok(svc)
    }

    /// Gives every VIP-mode service a virtual IP on each of its networks that lacks one
    /// (at creation, and for services saved before VIPs existed). Refused, changing nothing,
    /// if a network is full.
    pub fn ensure_vips(&mut self) -> Result<(), StateError> {
        let mut next = self.clone();
        let mut changed = false;
        let names: Vec<ServiceName> = next.services.keys().cloned().collect();
        for name in names {
            let Some(svc) = next.services.get(&name) else {
                continue;
            };
            if svc.endpoint_mode != EndpointMode::Vip {
                continue;
            }
            // The ingress network carries published ports to tasks directly: no VIP there.
            let missing: Vec<NetworkName> = svc
                .networks
                .iter()
                .filter(|n| !svc.vips.contains_key(*n) && !next.is_ingress(n))
                .cloned()
                .collect();
            for net_name in missing {
                let vip = next.free_address(&net_name)?;
                if let Some(s) = next.services.get_mut(&name) {
                    s.vips.insert(net_name, vip);
                    changed = true;
                }
            }
        }
        if changed {
            next.revision += 1;
            *self = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};

    #[test]
    fn service_validation() {
        let mut s = state();
        net(&mut s, "a", None).unwrap();
        let mut id = ids();
        assert!(matches!(
            s.create_service(svc("x", &["nope"], 1), &mut id, &|_| true),
            Err(StateError::NoSuchNetwork(_))
        ));
        assert!(matches!(
            s.create_service(svc("x", &["a", "a"], 1), &mut id, &|_| true),
            Err(StateError::DuplicateNetwork(_))
        ));
        let mut empty = svc("x", &["a"], 1);
        empty.command.clear();
        assert!(matches!(
            s.create_service(empty, &mut id, &|_| true),
            Err(StateError::EmptyCommand)
        ));
        assert!(matches!(
            s.create_service(svc("x", &["a"], MAX_REPLICAS + 1), &mut id, &|_| true),
            Err(StateError::TooManyReplicas(_))
        ));
        s.create_service(svc("x", &["a"], 0), &mut id, &|_| true)
            .unwrap();
        assert!(matches!(
            s.create_service(svc("x", &["a"], 1), &mut id, &|_| true),
            Err(StateError::ServiceExists(_))
        ));
    }

    #[test]
    fn vips_are_stable_and_freed() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        net(&mut s, "b", Some("10.0.3.0/24")).unwrap();
        let a = NetworkName::new("a").unwrap();
        let b = NetworkName::new("b").unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a", "b"], 2), &mut id, &|_| true)
            .unwrap();
        let vips = s.services["web"].vips.clone();
        assert_eq!(vips[&a].to_string(), "10.0.2.2");
        assert_eq!(vips[&b].to_string(), "10.0.3.2");
        s.scale_service("web", 0, &mut id, &|_| true).unwrap();
        s.scale_service("web", 5, &mut id, &|_| true).unwrap();
        assert_eq!(s.services["web"].vips, vips, "scaling keeps the VIPs");
        assert!(s
            .tasks
            .values()
            .all(|t| t.attachments[0].address != vips[&a]));
        // dnsrr: no VIP, the first task takes the next free address.
        let mut rr = svc("rr", &["a"], 1);
        rr.endpoint_mode = EndpointMode::Dnsrr;
        s.create_service(rr, &mut id, &|_| true).unwrap();
        assert!(s.services["rr"].vips.is_empty());
        // rm frees the VIP for the next user of the network.
        s.remove_service("web").unwrap();
        s.create_service(svc("api", &["a"], 0), &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.services["api"].vips[&a].to_string(), "10.0.2.2");
    }

    #[test]
    fn services_saved_without_vips_get_them() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 2), &mut id, &|_| true)
            .unwrap();
        s.services.get_mut("web").unwrap().vips.clear();
        let rev = s.revision;
        s.ensure_vips().unwrap();
        assert_eq!(s.revision, rev + 1);
        // The tasks keep theirs; the VIP takes the lowest free one.
        assert_eq!(
            s.services["web"].vips[&NetworkName::new("a").unwrap()].to_string(),
            "10.0.2.2"
        );
        s.ensure_vips().unwrap();
        assert_eq!(s.revision, rev + 1, "nothing missing, nothing changes");
    }

    #[test]
    fn aliases_are_checked() {
        let mut s = state();
        net(&mut s, "a", None).unwrap();
        let mut id = ids();
        let mut x = svc("x", &["a"], 0);
        x.aliases
            .insert(NetworkName::new("a").unwrap(), vec!["db.internal".into()]);
        s.create_service(x.clone(), &mut id, &|_| true).unwrap();
        for bad in ["", "a..b", "sp ace", "x/y"] {
            let mut y = svc("y", &["a"], 0);
            y.aliases
                .insert(NetworkName::new("a").unwrap(), vec![bad.into()]);
            assert!(
                matches!(
                    s.create_service(y, &mut id, &|_| true),
                    Err(StateError::BadAlias { .. })
                ),
                "{bad:?}"
            );
        }
        let mut z = svc("z", &["a"], 0);
        z.aliases
            .insert(NetworkName::new("other").unwrap(), vec!["ok".into()]);
        assert!(matches!(
            s.create_service(z, &mut id, &|_| true),
            Err(StateError::AliasWithoutNetwork(_))
        ));
    }
}
