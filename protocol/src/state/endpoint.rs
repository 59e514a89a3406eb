//! Containers' endpoints: interfaces a node makes for a runtime (a CNI plugin call, Docker's
//! network plugin) rather than for a task, one per (container, interface name).
//!
//! They take addresses from the same pools as tasks and keep their network alive. Runtimes
//! repeat themselves, so adding the same endpoint again or removing a missing one changes
//! nothing; Docker creates an endpoint before its container exists and binds the namespace
//! later.

use super::{ClusterState, StateError};
use crate::ipam;
use crate::types::{MacAddr, NetworkName, NodeName};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// A container's interface on a network, made by the node the container runs on for its
/// runtime (a CNI plugin call, or Docker's network plugin): a TAP in the container's network
/// namespace, an address from the network's pool, switched like a task's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The runtime's container id.
    pub container: String,
    /// The interface's name inside the container.
    pub ifname: String,
    /// The container's network namespace (a path on `node`); empty while a Docker endpoint
    /// waits for its container (Docker creates an endpoint before it joins a sandbox).
    pub netns: String,
    pub node: NodeName,
    pub network: NetworkName,
    pub address: Ipv4Addr,
    pub mac: MacAddr,
    /// Who asked for it: "cni" or "docker".
    pub runtime: String,
}

impl Endpoint {
    /// The key of a container's interface: a container has one endpoint per interface name.
    pub fn key(container: &str, ifname: &str) -> String {
        format!("{container}/{ifname}")
    }
}

/// A request for an endpoint (see [`ClusterState::add_endpoint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRequest {
    pub container: String,
    pub ifname: String,
    pub netns: String,
    pub node: NodeName,
    pub network: String,
    pub runtime: String,
    /// The address to give (Docker's IPAM chose it); otherwise the lowest free one.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
}

impl ClusterState {
    /// Gives a container an interface on a network: an address from the network's pool and
    /// the MAC derived from it, on the node that asked. Asking again for the same container
    /// and interface with the same network and namespace returns the endpoint it has (a
    /// runtime retrying an ADD); anything else for a taken (container, interface) is refused.
    pub fn add_endpoint(&mut self, req: EndpointRequest) -> Result<Endpoint, StateError> {
        let bad = |why: &str| Err(StateError::BadEndpoint(why.to_string()));
        let printable =
            |v: &str| !v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_control);
        if !printable(&req.container) || req.container.contains('/') {
            return bad("the container id must be 1-256 printable characters without '/'");
        }
        if req.ifname.is_empty()
            || req.ifname.len() > 15
            || req.ifname.contains('/')
            || !req.ifname.chars().all(|c| c.is_ascii_graphic())
        {
            return bad("the interface name must be 1-15 characters, no '/' or spaces");
        }
        let pending = req.netns.is_empty() && req.runtime == "docker";
        if !pending && (!printable(&req.netns) || !req.netns.starts_with('/')) {
            return bad("the network namespace must be an absolute path");
        }
        if !self.nodes.contains_key(&req.node) {
            return Err(StateError::NoSuchNode(req.node.to_string()));
        }
        let net = self
            .networks
            .get(req.network.as_str())
            .ok_or_else(|| StateError::NoSuchNetwork(req.network.clone()))?;
        if net.ingress {
            return Err(StateError::IngressAttach(net.name.clone()));
        }
        let key = Endpoint::key(&req.container, &req.ifname);
        if let Some(e) = self.endpoints.get(&key) {
            if e.network == net.name && e.netns == req.netns && e.node == req.node {
                return Ok(e.clone());
            }
            return Err(StateError::EndpointExists {
                container: req.container,
                ifname: req.ifname,
                network: e.network.clone(),
                netns: e.netns.clone(),
            });
        }
        let network = net.name.clone();
        let address = match req.address {
            Some(ip) => {
                if !ipam::is_host_address(&net.subnet, ip)
                    || ip == net.gateway
                    || self.used_addresses(&network).contains(&ip)
                {
                    return Err(StateError::AddressTaken {
                        ip,
                        network,
                        subnet: net.subnet,
                    });
                }
                ip
            }
            None => self.free_address(&network)?,
        };
        let e = Endpoint {
            container: req.container,
            ifname: req.ifname,
            netns: req.netns,
            node: req.node,
            network,
            address,
            mac: MacAddr::from_ipv4(address),
            runtime: req.runtime,
        };
        self.endpoints.insert(key, e.clone());
        self.revision += 1;
        Ok(e)
    }

    /// Gives a waiting endpoint its container's namespace (Docker's join).
    pub fn bind_endpoint(
        &mut self,
        container: &str,
        ifname: &str,
        netns: &str,
    ) -> Result<(), StateError> {
        if !netns.starts_with('/') {
            return Err(StateError::BadEndpoint(
                "the network namespace must be an absolute path".into(),
            ));
        }
        let e = self
            .endpoints
            .get_mut(&Endpoint::key(container, ifname))
            .ok_or_else(|| StateError::NoSuchEndpoint(Endpoint::key(container, ifname)))?;
        if e.netns != netns {
            e.netns = netns.to_string();
            self.revision += 1;
        }
        Ok(())
    }

    /// Removes a container's interface; removing one that is not there changes nothing
    /// (runtimes repeat their DELs).
    pub fn remove_endpoint(&mut self, container: &str, ifname: &str) -> Option<Endpoint> {
        let e = self.endpoints.remove(&Endpoint::key(container, ifname))?;
        self.revision += 1;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};

    fn ep(container: &str, netns: &str, network: &str) -> EndpointRequest {
        EndpointRequest {
            container: container.into(),
            ifname: "eth0".into(),
            netns: netns.into(),
            node: NodeName::new("n1").unwrap(),
            network: network.into(),
            runtime: "cni".into(),
            address: None,
        }
    }

    /// Containers' endpoints take addresses from the network's pool like tasks, are keyed by
    /// (container, interface), repeat an ADD idempotently, refuse a clash, keep the network
    /// alive, and go away once (a repeated removal changes nothing).
    #[test]
    fn endpoints_share_the_pool_and_hold_their_network() {
        let mut s = state();
        net(&mut s, "app", Some("10.0.9.0/29")).unwrap();
        let a = s.add_endpoint(ep("c1", "/run/netns/c1", "app")).unwrap();
        assert_eq!(a.address, Ipv4Addr::new(10, 0, 9, 2));
        assert_eq!(a.mac, MacAddr::from_ipv4(a.address));
        let rev = s.revision;
        assert_eq!(s.add_endpoint(ep("c1", "/run/netns/c1", "app")).unwrap(), a);
        assert_eq!(s.revision, rev, "a repeated ADD changes nothing");
        assert!(matches!(
            s.add_endpoint(ep("c1", "/run/netns/other", "app")),
            Err(StateError::EndpointExists { .. })
        ));
        s.create_service(svc("web", &["app"], 1), &mut ids(), &|_| true)
            .unwrap();
        let task = s.tasks.values().next().unwrap().attachments[0].address;
        assert_ne!(
            task, a.address,
            "tasks and containers never share an address"
        );
        assert!(matches!(
            s.remove_network("app"),
            Err(StateError::NetworkInUse { .. })
        ));
        s.remove_service("web").unwrap();
        // n1 reports the task stopped: its address is free again (`history.rs`).
        assert!(s.release_stopped("n1", &Default::default()));
        let err = s.remove_network("app").unwrap_err();
        assert_eq!(err.to_string(), "network app is in use by container(s) c1");
        // A /29 has six host addresses: the gateway, c1, then four more.
        for c in ["c2", "c3", "c4", "c5"] {
            s.add_endpoint(ep(c, "/run/netns/x", "app")).unwrap();
        }
        assert!(matches!(
            s.add_endpoint(ep("c6", "/run/netns/x", "app")),
            Err(StateError::NetworkFull { .. })
        ));
        assert!(s.remove_endpoint("c1", "eth0").is_some());
        assert!(s.remove_endpoint("c1", "eth0").is_none());
        assert_eq!(
            s.add_endpoint(ep("c6", "/run/netns/x", "app"))
                .unwrap()
                .address,
            a.address,
            "a freed address is given again"
        );
    }

    #[test]
    fn bad_endpoint_requests_are_refused() {
        let mut s = state();
        net(&mut s, "app", None).unwrap();
        for (c, netns, network) in [
            ("", "/run/netns/c", "app"),
            ("a/b", "/run/netns/c", "app"),
            ("c", "relative", "app"),
            ("c", "/run/netns/c", "nonet"),
        ] {
            assert!(
                s.add_endpoint(ep(c, netns, network)).is_err(),
                "{c} {netns} {network}"
            );
        }
        let mut long = ep("c", "/run/netns/c", "app");
        long.ifname = "a-very-long-interface".into();
        assert!(matches!(
            s.add_endpoint(long),
            Err(StateError::BadEndpoint(_))
        ));
        let mut elsewhere = ep("c", "/run/netns/c", "app");
        elsewhere.node = NodeName::new("n9").unwrap();
        assert!(matches!(
            s.add_endpoint(elsewhere),
            Err(StateError::NoSuchNode(_))
        ));
        s.ensure_ingress("ing".into(), 0).unwrap();
        assert!(matches!(
            s.add_endpoint(ep("c", "/run/netns/c", "ingress")),
            Err(StateError::IngressAttach(_))
        ));
        assert!(s.endpoints.is_empty());
    }
}
