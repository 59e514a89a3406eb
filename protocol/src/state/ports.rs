//! Published ports (`--publish`): their types, and the checks that keep services' ports apart.
//!
//! An ingress-mode port opens on every node, so it is unique in the cluster; host-mode ports
//! only clash on a node running both services. Publishing any port attaches a service to the
//! ingress network (`ingress.rs`), so publishing the first port or removing the last one
//! makes the service's tasks outdated: `service update` rolls them out (`update.rs`).

use super::{ClusterState, Service, StateError};
use crate::types::ServiceName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Published ports given to services that do not choose one (Swarm's range).
pub const DYNAMIC_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Transport of a published port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

impl std::fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        })
    }
}

/// Where a published port opens, as Docker's `mode=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every node, balanced over all of the service's tasks (the routing mesh).
    #[default]
    Ingress,
    /// Only on nodes running a task, straight to that task.
    Host,
}

impl std::fmt::Display for PublishMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        })
    }
}

/// A header sent to the backend ahead of a connection's data, carrying the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// HAProxy's PROXY protocol, version 2 (binary).
    V2,
}

/// A published port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortConfig {
    pub protocol: PortProtocol,
    /// The port the service's tasks listen on.
    pub target: u16,
    /// The port opened on the nodes. In a request, 0 asks for a free one from
    /// [`DYNAMIC_PORTS`].
    pub published: u16,
    pub mode: PublishMode,
    #[serde(default)]
    pub proxy: Option<ProxyProtocol>,
}

impl std::fmt::Display for PortConfig {
    /// Docker's `service ls` form: `*:8080->80/tcp`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "*:{}->{}/{}", self.published, self.target, self.protocol)
    }
}

impl ClusterState {
    /// Checks a service's published ports against each other and against every other
    /// service's, gives those without a published port a free one from [`DYNAMIC_PORTS`],
    /// and attaches the service to the ingress network if it publishes any port (detaching
    /// it if none). An ingress-mode port is open on every node, so it clashes with the same
    /// port of any other service; two host-mode ports only clash on a node running both
    /// (reported by that node's agent).
    pub(super) fn settle_ports(&self, svc: &mut Service) -> Result<(), StateError> {
        let bad = |p: &PortConfig, why: &str| StateError::BadPort {
            port: format!("{}:{}/{}", p.published, p.target, p.protocol),
            why: why.to_string(),
        };
        let others: Vec<(&ServiceName, &PortConfig)> = self
            .services
            .values()
            .filter(|o| o.name != svc.name)
            .flat_map(|o| o.ports.iter().map(move |p| (&o.name, p)))
            .collect();
        let mut mine = BTreeSet::new();
        for p in &svc.ports {
            if p.target == 0 {
                return Err(bad(p, "the target port must be 1-65535"));
            }
            if p.proxy.is_some() && p.protocol != PortProtocol::Tcp {
                return Err(bad(p, "the PROXY protocol header is for TCP ports only"));
            }
            if p.published == 0 {
                continue;
            }
            if !mine.insert((p.protocol, p.published)) {
                return Err(bad(p, "published twice by this service"));
            }
            let clash = others.iter().find(|(_, o)| {
                o.protocol == p.protocol
                    && o.published == p.published
                    && (o.mode == PublishMode::Ingress || p.mode == PublishMode::Ingress)
            });
            if let Some((service, _)) = clash {
                return Err(StateError::PortInUse {
                    published: p.published,
                    protocol: p.protocol,
                    service: (*service).clone(),
                });
            }
        }
        for p in svc.ports.iter_mut().filter(|p| p.published == 0) {
            let free = DYNAMIC_PORTS.clone().find(|port| {
                !mine.contains(&(p.protocol, *port))
                    && !others
                        .iter()
                        .any(|(_, o)| o.protocol == p.protocol && o.published == *port)
            });
            p.published = free.ok_or(StateError::NoFreePort {
                protocol: p.protocol,
            })?;
            mine.insert((p.protocol, p.published));
        }
        svc.networks.retain(|n| !self.is_ingress(n));
        if !svc.ports.is_empty() {
            let ingress = self.ingress_network().ok_or(StateError::NoIngressNetwork)?;
            svc.networks.push(ingress.name.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, meshed, net, svc};
    use crate::state::{NetworkRequest, Pool, INGRESS_VNI};
    use crate::types::NetworkName;

    fn port(published: u16, target: u16, protocol: PortProtocol, mode: PublishMode) -> PortConfig {
        PortConfig {
            protocol,
            target,
            published,
            mode,
            proxy: None,
        }
    }

    #[test]
    fn publishing_attaches_to_ingress_and_picks_free_ports() {
        let mut s = meshed();
        let mut web = svc("web", &["a"], 2);
        web.ports = vec![
            port(8080, 80, PortProtocol::Tcp, PublishMode::Ingress),
            port(0, 53, PortProtocol::Udp, PublishMode::Ingress),
        ];
        s.create_service(web, &mut ids(), &|_| true).unwrap();
        let web = s.services["web"].clone();
        assert_eq!(
            web.networks.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["a", "ingress"]
        );
        assert_eq!(web.user_networks(&s).count(), 1);
        assert_eq!(web.ports[1].published, *DYNAMIC_PORTS.start());
        assert!(web.vips.contains_key("a") && !web.vips.contains_key("ingress"));
        assert!(s.tasks.values().all(|t| t.attachments.len() == 2));
        // The same port and protocol is refused, naming its holder; another protocol is not.
        let mut other = svc("other", &["a"], 1);
        other.ports = vec![port(8080, 81, PortProtocol::Tcp, PublishMode::Host)];
        let err = s
            .create_service(other.clone(), &mut ids(), &|_| true)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "port 8080/tcp is already published by service web"
        );
        other.ports = vec![port(8080, 81, PortProtocol::Udp, PublishMode::Ingress)];
        s.create_service(other, &mut ids(), &|_| true).unwrap();
        // Host-mode ports of two services may share a number (placement keeps them apart).
        for name in ["h1", "h2"] {
            let mut h = svc(name, &["a"], 1);
            h.ports = vec![port(9000, 80, PortProtocol::Tcp, PublishMode::Host)];
            s.create_service(h, &mut ids(), &|_| true).unwrap();
        }
        // Attaching to ingress by hand, a PROXY header on UDP, target 0: refused.
        let mut bad = svc("bad", &["ingress"], 1);
        assert!(matches!(
            s.create_service(bad.clone(), &mut ids(), &|_| true),
            Err(StateError::IngressAttach(_))
        ));
        bad.networks = vec![NetworkName::new("a").unwrap()];
        bad.ports = vec![PortConfig {
            proxy: Some(ProxyProtocol::V2),
            ..port(7000, 80, PortProtocol::Udp, PublishMode::Ingress)
        }];
        assert!(matches!(
            s.create_service(bad.clone(), &mut ids(), &|_| true),
            Err(StateError::BadPort { .. })
        ));
        bad.ports = vec![port(7000, 0, PortProtocol::Tcp, PublishMode::Ingress)];
        assert!(s.create_service(bad, &mut ids(), &|_| true).is_err());
        // The ingress network cannot be removed or replaced while services publish.
        assert!(matches!(
            s.remove_network("ingress"),
            Err(StateError::NetworkInUse { .. })
        ));
    }

    #[test]
    fn publish_add_and_rm_follow_the_ingress_attachment() {
        let mut s = meshed();
        let mut gen = ids();
        s.create_service(svc("web", &["a"], 2), &mut gen, &|_| true)
            .unwrap();
        let update = |s: &mut ClusterState, gen: &mut dyn FnMut() -> String, add, rm: &[_]| {
            let mut spec = s.services["web"].spec(s);
            spec.edit_ports(add, rm, "web")?;
            s.update_service("web", spec, 0, gen, &|_| true)
        };
        let p = port(8080, 80, PortProtocol::Tcp, PublishMode::Ingress);
        update(&mut s, &mut gen, vec![p], &[]).unwrap();
        assert_eq!(s.services["web"].networks.len(), 2);
        // The tasks lack the ingress attachment: outdated, for the rollout to replace.
        assert_eq!(s.outdated_slots("web").len(), 2);
        assert!(s.services["web"].deploy.rollout.is_some());
        // Adding a second port changes no task.
        let q = port(8443, 443, PortProtocol::Tcp, PublishMode::Ingress);
        update(&mut s, &mut gen, vec![q], &[]).unwrap();
        assert_eq!(s.services["web"].ports.len(), 2);
        assert!(matches!(
            update(&mut s, &mut gen, vec![], &[(9999, None)]),
            Err(StateError::NoSuchPort { .. })
        ));
        update(
            &mut s,
            &mut gen,
            vec![],
            &[(8080, Some(PortProtocol::Tcp)), (8443, None)],
        )
        .unwrap();
        assert!(s.services["web"].ports.is_empty());
        assert_eq!(s.services["web"].networks.len(), 1);
        assert!(s.outdated_slots("web").is_empty(), "back to what they run");
        assert!(s.tasks.values().all(|t| t.attachments.len() == 1));
        // Now nothing publishes: the ingress network can be replaced.
        let req = NetworkRequest {
            ingress: true,
            subnet: Some("10.254.0.0/16".parse().unwrap()),
            ..Default::default()
        };
        let n = s
            .create_network(
                NetworkName::new("mesh").unwrap(),
                req,
                Pool::default(),
                "m".into(),
                0,
            )
            .unwrap();
        assert!(n.ingress && n.vni.get() == INGRESS_VNI && n.lb_endpoints.len() == 1);
        assert!(!s.networks.contains_key("ingress"));
        // With the mesh elsewhere, 10.255.0.0/16 is an ordinary subnet.
        net(&mut s, "b", Some("10.255.1.0/24")).unwrap();
    }
}
