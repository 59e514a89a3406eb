//! The routing mesh's network (`ingress`): made when the cluster starts, replaceable with
//! `network create --ingress`, and holding one address per node for that node's router.
//!
//! Services reach it only by publishing ports (`ports.rs`), never by attaching to it by name;
//! it carries published ports straight to tasks, so services get no VIP on it (`service.rs`).

use super::{ClusterState, Network, NetworkRequest, Pool, StateError};
use crate::ipam;
use crate::types::{NetworkName, NodeName};
use ipnet::Ipv4Net;

/// Name of the routing mesh's network, made when the cluster starts.
pub const INGRESS_NETWORK: &str = "ingress";
/// Swarm's VNI for `ingress` (user networks start at the next one).
pub const INGRESS_VNI: u32 = crate::types::Vni::INGRESS.get();

/// The default ingress network's subnet (`ipam::INGRESS_SUBNET`).
pub(super) fn ingress_subnet() -> Ipv4Net {
    ipam::INGRESS_SUBNET
        .parse()
        .expect("constant subnet parses")
}

impl ClusterState {
    /// The routing mesh's network, if there is one.
    pub fn ingress_network(&self) -> Option<&Network> {
        self.networks.values().find(|n| n.ingress)
    }

    /// Makes the default ingress network (`ingress`, 10.255.0.0/16, VNI 4096) if the cluster
    /// has none and the name is free: at cluster start, and for state saved before it existed.
    pub fn ensure_ingress(&mut self, id: String, now: u64) -> Result<(), StateError> {
        if self.ingress_network().is_none() && !self.networks.contains_key(INGRESS_NETWORK) {
            let name =
                NetworkName::new(INGRESS_NETWORK).map_err(|_| StateError::NoIngressNetwork)?;
            let req = NetworkRequest {
                ingress: true,
                ..NetworkRequest::default()
            };
            self.create_network(name, req, Pool::default(), id, now)?;
        }
        self.ensure_lb_endpoints()
    }

    /// Gives every node an address for its router's endpoint on the ingress network.
    pub(super) fn ensure_lb_endpoints(&mut self) -> Result<(), StateError> {
        let Some(net) = self.ingress_network() else {
            return Ok(());
        };
        let name = net.name.clone();
        let missing: Vec<NodeName> = self
            .nodes
            .keys()
            .filter(|n| !net.lb_endpoints.contains_key(*n))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut next = self.clone();
        for node in missing {
            let ip = next.free_address(&name)?;
            if let Some(net) = next.networks.get_mut(&name) {
                net.lb_endpoints.insert(node, ip);
            }
        }
        next.revision += 1;
        *self = next;
        Ok(())
    }

    pub(super) fn is_ingress(&self, network: &NetworkName) -> bool {
        self.networks.get(network).is_some_and(|n| n.ingress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::meshed;
    use crate::state::{Availability, Node, Role};
    use crate::types::Vni;

    #[test]
    fn ingress_network_exists_from_the_start_with_an_endpoint_per_node() {
        let mut s = meshed();
        let ing = s.ingress_network().unwrap().clone();
        assert_eq!(ing.name.as_str(), INGRESS_NETWORK);
        assert_eq!(ing.subnet.to_string(), "10.255.0.0/16");
        assert_eq!(ing.vni.get(), INGRESS_VNI);
        assert_eq!(ing.lb_endpoints.len(), 1);
        assert_eq!(s.networks["a"].vni.get(), Vni::FIRST_USER);
        // Twice is a no-op; a node that joins gets its endpoint address.
        let rev = s.revision;
        s.ensure_ingress("x".into(), 0).unwrap();
        assert_eq!(s.revision, rev);
        let n2 = NodeName::new("n2").unwrap();
        s.upsert_node(Node {
            name: n2.clone(),
            role: Role::Worker,
            availability: Availability::Active,
            advertise_addr: None,
            data_port: 4789,
            joined_at: 0,
            control_addr: None,
        });
        let eps = &s.ingress_network().unwrap().lb_endpoints;
        assert_eq!(eps.len(), 2);
        assert_ne!(eps[&n2], eps[&NodeName::new("n1").unwrap()]);
        assert!(s.used_addresses(&ing.name).contains(&eps[&n2]));
    }
}
