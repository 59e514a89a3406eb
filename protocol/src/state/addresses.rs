//! Which addresses of a network are taken, and the lowest one that is free.
//!
//! A network's subnet is shared by its gateway, the services' VIPs, the tasks' attachments
//! (of current tasks, and of past ones whose node has not confirmed them stopped), the
//! routers' ingress endpoints, external VTEPs and containers' endpoints. No free list is
//! kept: the taken set is read off the state when an address is needed (`crate::ipam` picks
//! from it), so it cannot drift from what holds the addresses.

use super::{ClusterState, StateError};
use crate::ipam;
use crate::types::NetworkName;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

impl ClusterState {
    /// The lowest address of `network` nobody holds.
    pub(super) fn free_address(&self, network: &NetworkName) -> Result<Ipv4Addr, StateError> {
        let net = self
            .networks
            .get(network)
            .ok_or_else(|| StateError::NoSuchNetwork(network.to_string()))?;
        ipam::next_address(&net.subnet, &self.used_addresses(network)).ok_or_else(|| {
            StateError::NetworkFull {
                network: network.clone(),
                subnet: net.subnet,
            }
        })
    }

    /// Every address of `network` that is taken: the gateway, each service's VIP, each
    /// task's endpoint (past tasks' too until released: their node may still run them), each
    /// node router's ingress endpoint, each external VTEP's address and each container's
    /// endpoint.
    pub fn used_addresses(&self, network: &NetworkName) -> BTreeSet<Ipv4Addr> {
        let mut used = BTreeSet::new();
        if let Some(n) = self.networks.get(network) {
            used.insert(n.gateway);
            used.extend(n.vteps.iter().filter_map(|v| v.ip));
            used.extend(n.lb_endpoints.values());
        }
        for s in self.services.values() {
            used.extend(s.vips.get(network));
        }
        let past = self.unreleased_tasks().map(|p| &p.task);
        for t in self.tasks.values().chain(past) {
            for a in &t.attachments {
                if &a.network == network {
                    used.insert(a.address);
                }
            }
        }
        used.extend(
            self.endpoints
                .values()
                .filter(|e| &e.network == network)
                .map(|e| e.address),
        );
        used
    }
}
