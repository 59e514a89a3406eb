//! A service's spec: what the operator asked of it, without what the cluster gave it (id,
//! virtual IPs, timestamps, the rollout under way). `service update` edits a copy of the
//! current spec and hands it to `ClusterState::update_service` (`update.rs`); the spec it
//! replaces is kept as the previous one, which `service rollback` returns to.

use super::{
    ClusterState, ContainerImage, EndpointMode, HealthCheck, PortConfig, PortProtocol, Service,
    ServiceMode, StateError, UpdateConfig,
};
use crate::types::NetworkName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the operator asked of a service (Docker's `ServiceSpec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The networks it is attached to, in order (without the ingress network, which
    /// follows from `ports`).
    pub networks: Vec<NetworkName>,
    #[serde(default)]
    pub aliases: BTreeMap<NetworkName, Vec<String>>,
    pub replicas: u32,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    #[serde(default)]
    pub lb_idle_timeout: Option<u64>,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    #[serde(default)]
    pub healthcheck: Option<HealthCheck>,
    #[serde(default)]
    pub stop_grace_period_s: Option<u64>,
    /// Bumped by `service update --force`: a different value makes every task outdated.
    #[serde(default)]
    pub force_update: u64,
    #[serde(default)]
    pub update_config: UpdateConfig,
    #[serde(default)]
    pub rollback_config: UpdateConfig,
    /// Replicated or global: set at creation, never changed by an update (as Docker).
    #[serde(default)]
    pub mode: ServiceMode,
    /// The container image and its options (`--image`); `None`: process tasks.
    #[serde(default)]
    pub image: Option<ContainerImage>,
}

impl Service {
    /// The service's current spec.
    pub fn spec(&self, state: &ClusterState) -> Spec {
        Spec {
            networks: self.user_networks(state).cloned().collect(),
            aliases: self.aliases.clone(),
            replicas: self.replicas,
            command: self.command.clone(),
            env: self.env.clone(),
            endpoint_mode: self.endpoint_mode,
            lb_idle_timeout: self.lb_idle_timeout,
            ports: self.ports.clone(),
            healthcheck: self.healthcheck.clone(),
            stop_grace_period_s: self.stop_grace_period_s,
            force_update: self.deploy.force_update,
            update_config: self.deploy.update_config,
            rollback_config: self.deploy.rollback_config,
            mode: self.mode,
            image: self.image.clone(),
        }
    }
}

impl Spec {
    /// Writes everything but the replica count and the mode into `svc` (whose networks are then the
    /// user's: the ingress attachment is settled after, from the ports).
    pub(super) fn install(self, svc: &mut Service) {
        svc.networks = self.networks;
        svc.aliases = self.aliases;
        svc.command = self.command;
        svc.env = self.env;
        svc.endpoint_mode = self.endpoint_mode;
        svc.lb_idle_timeout = self.lb_idle_timeout;
        svc.ports = self.ports;
        svc.healthcheck = self.healthcheck;
        svc.stop_grace_period_s = self.stop_grace_period_s;
        svc.image = self.image;
        svc.deploy.force_update = self.force_update;
        svc.deploy.update_config = self.update_config;
        svc.deploy.rollback_config = self.rollback_config;
    }

    /// `--env-add KEY=VALUE` (replacing KEY's value if set) and `--env-rm KEY`.
    pub fn edit_env(&mut self, add: &[String], rm: &[String]) -> Result<(), StateError> {
        let key = |e: &str| e.split_once('=').map_or(e, |(k, _)| k).to_string();
        for e in add {
            if !e.contains('=') || e.starts_with('=') {
                return Err(StateError::BadEnv(e.clone()));
            }
        }
        self.env.retain(|e| !rm.contains(&key(e)));
        for e in add {
            let k = key(e);
            match self.env.iter_mut().find(|x| key(x) == k) {
                Some(x) => *x = e.clone(),
                None => self.env.push(e.clone()),
            }
        }
        Ok(())
    }

    /// `--network-rm NAME` and `--network-add NAME` (with its aliases): added networks
    /// come last, in order. Removing one the service is not attached to is refused.
    pub fn edit_networks(
        &mut self,
        add: Vec<(NetworkName, Vec<String>)>,
        rm: &[NetworkName],
    ) -> Result<(), StateError> {
        for n in rm {
            if !self.networks.contains(n) {
                return Err(StateError::NotAttached(n.clone()));
            }
            self.networks.retain(|x| x != n);
            self.aliases.remove(n);
        }
        for (n, aliases) in add {
            if self.networks.contains(&n) {
                return Err(StateError::DuplicateNetwork(n));
            }
            if !aliases.is_empty() {
                self.aliases.insert(n.clone(), aliases);
            }
            self.networks.push(n);
        }
        Ok(())
    }

    /// `--publish-rm PORT[/PROTOCOL]` (by published port) and `--publish-add`. Removing a
    /// port the service does not publish is refused.
    pub fn edit_ports(
        &mut self,
        add: Vec<PortConfig>,
        rm: &[(u16, Option<PortProtocol>)],
        service: &str,
    ) -> Result<(), StateError> {
        for (port, protocol) in rm {
            let before = self.ports.len();
            self.ports
                .retain(|p| !(p.published == *port && protocol.is_none_or(|x| x == p.protocol)));
            if self.ports.len() == before {
                return Err(StateError::NoSuchPort {
                    service: crate::types::ServiceName::new(service)
                        .map_err(|_| StateError::NoSuchService(service.to_string()))?,
                    port: match protocol {
                        Some(x) => format!("{port}/{x}"),
                        None => port.to_string(),
                    },
                });
            }
        }
        self.ports.extend(add);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, meshed, svc};
    use crate::state::PublishMode;

    #[test]
    fn a_service_gives_back_its_spec() {
        let mut s = meshed();
        let mut web = svc("web", &["a"], 2);
        web.ports = vec![PortConfig {
            protocol: PortProtocol::Tcp,
            target: 80,
            published: 0,
            mode: PublishMode::Ingress,
            proxy: None,
        }];
        s.create_service(web, &mut ids(), &|_| true).unwrap();
        let spec = s.services["web"].spec(&s);
        assert_eq!(
            spec.networks,
            [NetworkName::new("a").unwrap()],
            "no ingress"
        );
        assert_eq!(spec.ports[0].published, 30000, "as settled");
        assert_eq!((spec.replicas, spec.force_update), (2, 0));
    }

    #[test]
    fn env_networks_and_ports_edits() {
        let mut s = meshed();
        s.create_service(svc("web", &["a"], 1), &mut ids(), &|_| true)
            .unwrap();
        let mut spec = s.services["web"].spec(&s);
        spec.env = vec!["A=1".into(), "B=2".into(), "C".into()];
        spec.edit_env(&["B=3".into(), "D=4".into()], &["A".into(), "C".into()])
            .unwrap();
        assert_eq!(spec.env, ["B=3", "D=4"]);
        assert!(matches!(
            spec.edit_env(&["novalue".into()], &[]),
            Err(StateError::BadEnv(_))
        ));
        let (a, b) = (
            NetworkName::new("a").unwrap(),
            NetworkName::new("b").unwrap(),
        );
        spec.edit_networks(vec![(b.clone(), vec!["db".into()])], &[])
            .unwrap();
        assert_eq!(spec.networks, [a.clone(), b.clone()]);
        assert_eq!(spec.aliases[&b], ["db"]);
        assert!(matches!(
            spec.edit_networks(vec![(a.clone(), vec![])], &[]),
            Err(StateError::DuplicateNetwork(_))
        ));
        spec.edit_networks(vec![], std::slice::from_ref(&a))
            .unwrap();
        assert_eq!(spec.networks, std::slice::from_ref(&b));
        assert!(matches!(
            spec.edit_networks(vec![], &[a]),
            Err(StateError::NotAttached(_))
        ));
        let p = |published, protocol| PortConfig {
            protocol,
            target: 80,
            published,
            mode: PublishMode::Ingress,
            proxy: None,
        };
        spec.edit_ports(
            vec![p(8080, PortProtocol::Tcp), p(8080, PortProtocol::Udp)],
            &[],
            "web",
        )
        .unwrap();
        spec.edit_ports(vec![], &[(8080, Some(PortProtocol::Udp))], "web")
            .unwrap();
        assert_eq!(spec.ports, [p(8080, PortProtocol::Tcp)]);
        assert!(matches!(
            spec.edit_ports(vec![], &[(9999, None)], "web"),
            Err(StateError::NoSuchPort { .. })
        ));
    }
}
