//! External VTEP endpoints: MACs (and optionally addresses) of a network that sit behind a
//! plain VXLAN device rather than an overlayd node (`overlayctl network vtep add`).
//!
//! A VTEP's MAC and address must not clash with what the network already holds, and plain
//! VXLAN cannot join an encrypted network, which carries only ESP between nodes.

use super::{ClusterState, StateError, OPT_ENCRYPTED};
use crate::ipam;
use crate::types::{MacAddr, NetworkName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// An external VTEP endpoint: a MAC (and optionally its IPv4 address) reachable at an
/// underlay address through plain VXLAN (a Linux vxlan device, a hardware switch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vtep {
    pub address: Ipv4Addr,
    pub mac: MacAddr,
    pub ip: Option<Ipv4Addr>,
}

impl ClusterState {
    /// Declares an external VTEP endpoint on a network.
    pub fn add_vtep(&mut self, network: &str, vtep: Vtep) -> Result<(), StateError> {
        let used_ips = self.used_addresses(
            &NetworkName::new(network)
                .map_err(|_| StateError::NoSuchNetwork(network.to_string()))?,
        );
        let task_macs: BTreeSet<MacAddr> = self
            .tasks
            .values()
            .flat_map(|t| {
                t.attachments
                    .iter()
                    .filter(|a| a.network.as_str() == network)
                    .map(|a| a.mac)
            })
            .chain(
                self.endpoints
                    .values()
                    .filter(|e| e.network.as_str() == network)
                    .map(|e| e.mac),
            )
            .collect();
        let net = self
            .networks
            .get_mut(network)
            .ok_or_else(|| StateError::NoSuchNetwork(network.to_string()))?;
        if net.encrypted() {
            return Err(StateError::BadOption {
                key: OPT_ENCRYPTED.to_string(),
                value: net.name.to_string(),
                why: "an external VTEP speaks plain VXLAN; an encrypted network carries only ESP"
                    .to_string(),
            });
        }
        if vtep.mac.is_multicast()
            || task_macs.contains(&vtep.mac)
            || net.vteps.iter().any(|v| v.mac == vtep.mac)
        {
            return Err(StateError::MacInUse {
                mac: vtep.mac,
                network: net.name.clone(),
            });
        }
        if let Some(ip) = vtep.ip {
            if !ipam::is_host_address(&net.subnet, ip) || used_ips.contains(&ip) {
                return Err(StateError::AddressTaken {
                    ip,
                    network: net.name.clone(),
                    subnet: net.subnet,
                });
            }
        }
        net.vteps.push(vtep);
        self.revision += 1;
        Ok(())
    }

    pub fn remove_vtep(&mut self, network: &str, mac: MacAddr) -> Result<(), StateError> {
        let net = self
            .networks
            .get_mut(network)
            .ok_or_else(|| StateError::NoSuchNetwork(network.to_string()))?;
        let before = net.vteps.len();
        net.vteps.retain(|v| v.mac != mac);
        if net.vteps.len() == before {
            return Err(StateError::NoSuchVtep {
                mac,
                network: net.name.clone(),
            });
        }
        self.revision += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};

    #[test]
    fn vteps_reserve_addresses_and_macs() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.5.0/24")).unwrap();
        let mac: MacAddr = "02:42:0a:00:05:09".parse().unwrap();
        let v = Vtep {
            address: "198.18.0.9".parse().unwrap(),
            mac,
            ip: Some("10.0.5.2".parse().unwrap()),
        };
        s.add_vtep("a", v.clone()).unwrap();
        assert!(matches!(
            s.add_vtep("a", v.clone()),
            Err(StateError::MacInUse { .. })
        ));
        let mut other = v.clone();
        other.mac = "02:42:0a:00:05:0a".parse().unwrap();
        assert!(matches!(
            s.add_vtep("a", other.clone()),
            Err(StateError::AddressTaken { .. })
        ));
        other.ip = Some("10.0.6.1".parse().unwrap());
        assert!(matches!(
            s.add_vtep("a", other),
            Err(StateError::AddressTaken { .. })
        ));
        // Tasks skip the VTEP's address.
        let mut id = ids();
        s.create_service(svc("web", &["a"], 1), &mut id, &|_| true)
            .unwrap();
        assert_eq!(
            s.tasks["web.1"].attachments[0].address.to_string(),
            "10.0.5.4"
        );
        s.remove_vtep("a", mac).unwrap();
        assert!(matches!(
            s.remove_vtep("a", mac),
            Err(StateError::NoSuchVtep { .. })
        ));
    }
}
