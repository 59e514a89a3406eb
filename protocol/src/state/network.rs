//! Overlay networks: what one is, how a create request becomes one, and when it may go.
//!
//! A network is a subnet, a gateway and a VNI, plus Docker's driver options (`vxlanid_list`,
//! `mtu`, `encrypted`), which this file checks and interprets. Networks without `--subnet`
//! are carved from a [`Pool`]; the default ingress subnet stays reserved for the routing mesh
//! while it lives elsewhere (`ingress.rs`). Addresses inside a network are handed out by
//! `addresses.rs`.

use super::ingress::{ingress_subnet, INGRESS_VNI};
use super::{ClusterState, StateError, Vtep};
use crate::ipam;
use crate::types::{MacAddr, NetworkName, NodeName, Vni};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Docker's option that chooses a network's VXLAN id.
pub const OPT_VXLANID: &str = "com.docker.network.driver.overlay.vxlanid_list";
/// Docker's option that sets the MTU of a network's interfaces (for underlays whose MTU is
/// below 1500: the overlay MTU must leave 50 bytes for VXLAN).
pub const OPT_MTU: &str = "com.docker.network.driver.mtu";
/// MTU of overlay interfaces on a 1500-byte underlay.
pub const DEFAULT_MTU: u16 = 1450;
/// Docker's option that encrypts a network's traffic between nodes (`--opt encrypted`).
pub const OPT_ENCRYPTED: &str = "encrypted";
/// Largest MTU of an encrypted network's interfaces on a 1500-byte underlay: ESP adds up to
/// `esp::MAX_OVERHEAD` bytes to the VXLAN datagram.
pub const MAX_ENCRYPTED_MTU: u16 = 1405;
/// The default MTU of an encrypted network.
pub const ENCRYPTED_MTU: u16 = 1400;
/// Smallest MTU an IPv4 interface may have.
const MIN_MTU: u16 = 68;

/// An overlay network: a subnet, its gateway, and the VNI its frames carry between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: NetworkName,
    pub driver: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: Vni,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    pub created_at: u64,
    /// Endpoints behind standard VXLAN devices that are not overlayd nodes.
    #[serde(default)]
    pub vteps: Vec<Vtep>,
    /// The routing mesh's network (`network create --ingress`): services that publish ports
    /// are attached to it, and every node's router has an endpoint on it.
    #[serde(default)]
    pub ingress: bool,
    /// The address of each node's router endpoint on this (ingress) network.
    #[serde(default)]
    pub lb_endpoints: BTreeMap<NodeName, Ipv4Addr>,
    /// Nodes whose Docker has a network for this one (the Docker plugin's bookkeeping: the
    /// last of them to remove it releases a network the plugin made).
    #[serde(default)]
    pub docker_nodes: BTreeSet<NodeName>,
}

impl Network {
    /// The MTU of this network's interfaces.
    pub fn mtu(&self) -> u16 {
        let default = if self.encrypted() {
            ENCRYPTED_MTU
        } else {
            DEFAULT_MTU
        };
        self.options
            .get(OPT_MTU)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    }

    /// Whether frames of this network cross the underlay sealed (`--opt encrypted`).
    pub fn encrypted(&self) -> bool {
        is_encrypted(&self.options)
    }

    /// The MAC the router answers with for the gateway address.
    pub fn gateway_mac(&self) -> MacAddr {
        MacAddr::from_ipv4(self.gateway)
    }
}

fn is_encrypted(options: &BTreeMap<String, String>) -> bool {
    options
        .get(OPT_ENCRYPTED)
        .is_some_and(|v| !matches!(v.trim(), "false" | "0" | "no"))
}

/// What a network create request asks for, already parsed.
#[derive(Debug, Clone, Default)]
pub struct NetworkRequest {
    pub driver: Option<String>,
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub options: BTreeMap<String, String>,
    /// Make this the routing mesh's network, replacing the current one (which no service
    /// may be publishing through).
    pub ingress: bool,
}

/// The address pool networks without `--subnet` are carved from.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    pub pool: Ipv4Net,
    pub prefix: u8,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            pool: ipam::DEFAULT_POOL.parse().expect("constant pool parses"),
            prefix: ipam::DEFAULT_POOL_PREFIX,
        }
    }
}

impl ClusterState {
    /// Creates a network. Checks name, driver, subnet overlap, gateway and VNI first.
    pub fn create_network(
        &mut self,
        name: NetworkName,
        req: NetworkRequest,
        pool: Pool,
        id: String,
        now: u64,
    ) -> Result<&Network, StateError> {
        // Work on a copy: replacing the ingress network removes the old one first.
        let mut next = self.clone();
        if req.ingress {
            if let Some(old) = next.ingress_network().map(|n| n.name.clone()) {
                next.remove_network(old.as_str())?;
            }
        }
        next.add_network(name.clone(), req, pool, id, now)?;
        if next.networks.get(&name).is_some_and(|n| n.ingress) {
            next.ensure_lb_endpoints()?;
        }
        next.revision += 1;
        *self = next;
        self.networks
            .get(&name)
            .ok_or_else(|| StateError::NoSuchNetwork(name.to_string()))
    }

    /// Adds a network after checking name, driver, subnet overlap, gateway and VNI.
    fn add_network(
        &mut self,
        name: NetworkName,
        req: NetworkRequest,
        pool: Pool,
        id: String,
        now: u64,
    ) -> Result<(), StateError> {
        if self.networks.contains_key(&name) {
            return Err(StateError::NetworkExists(name));
        }
        // The default ingress subnet stays free for the routing mesh while there is no
        // ingress network elsewhere.
        let reserved = match self.ingress_network() {
            Some(_) => None,
            None if req.ingress => None,
            None => Some(ingress_subnet()),
        };
        let driver = req.driver.unwrap_or_else(|| "overlay".to_string());
        if driver != "overlay" {
            return Err(StateError::BadDriver(driver));
        }
        let used: Vec<Ipv4Net> = self.networks.values().map(|n| n.subnet).collect();
        let subnet = match req.subnet {
            Some(s) => {
                let s = s.trunc();
                if let Some(other) = self
                    .networks
                    .values()
                    .find(|n| ipam::overlaps(&s, &n.subnet))
                {
                    return Err(StateError::SubnetOverlap {
                        subnet: s,
                        other: other.name.clone(),
                        other_subnet: other.subnet,
                    });
                }
                if let Some(reserved) = reserved.filter(|r| ipam::overlaps(&s, r)) {
                    return Err(StateError::SubnetReserved {
                        subnet: s,
                        reserved,
                    });
                }
                s
            }
            None if req.ingress && !used.iter().any(|u| ipam::overlaps(u, &ingress_subnet())) => {
                ingress_subnet()
            }
            None => {
                let mut taken = used.clone();
                taken.extend(reserved);
                ipam::next_subnet(pool.pool, pool.prefix, &taken).ok_or(
                    StateError::PoolExhausted {
                        pool: pool.pool,
                        prefix: pool.prefix,
                    },
                )?
            }
        };
        if subnet.prefix_len() > 30 {
            return Err(StateError::SubnetTooSmall { subnet });
        }
        let gateway = match req.gateway {
            Some(g) => g,
            None => ipam::default_gateway(&subnet).ok_or(StateError::SubnetTooSmall { subnet })?,
        };
        if !ipam::is_host_address(&subnet, gateway) {
            return Err(StateError::BadGateway { gateway, subnet });
        }
        let mut options = req.options;
        let vni = match options.get(OPT_VXLANID) {
            Some(v) => {
                let bad = |why: &str| StateError::BadOption {
                    key: OPT_VXLANID.to_string(),
                    value: v.clone(),
                    why: why.to_string(),
                };
                let n: u32 = v.trim().parse().map_err(|_| bad("not a number"))?;
                let vni = Vni::new(n).map_err(|e| bad(&e.to_string()))?;
                if let Some(other) = self.networks.values().find(|n| n.vni == vni) {
                    return Err(StateError::VniInUse {
                        vni,
                        other: other.name.clone(),
                    });
                }
                vni
            }
            None => {
                let taken: BTreeSet<u32> = self.networks.values().map(|n| n.vni.get()).collect();
                let first = if req.ingress && !taken.contains(&INGRESS_VNI) {
                    INGRESS_VNI
                } else {
                    Vni::FIRST_USER
                };
                let v = (first..=Vni::MAX)
                    .find(|v| !taken.contains(v))
                    .ok_or(StateError::VniExhausted)?;
                Vni::new(v).map_err(|_| StateError::VniExhausted)?
            }
        };
        if let Some(v) = options.get(OPT_MTU) {
            let max = if is_encrypted(&options) {
                MAX_ENCRYPTED_MTU
            } else {
                DEFAULT_MTU
            };
            let ok = v
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|m| (MIN_MTU..=max).contains(m));
            if ok.is_none() {
                return Err(StateError::BadOption {
                    key: OPT_MTU.to_string(),
                    value: v.clone(),
                    why: format!("expected {MIN_MTU}..={max} (VXLAN needs 50 bytes of a 1500-byte underlay, and ESP 45 more on an encrypted network)"),
                });
            }
        }
        options.insert(OPT_VXLANID.to_string(), vni.to_string());
        let net = Network {
            id,
            name: name.clone(),
            driver,
            subnet,
            gateway,
            vni,
            options,
            created_at: now,
            vteps: Vec::new(),
            ingress: req.ingress,
            lb_endpoints: BTreeMap::new(),
            docker_nodes: BTreeSet::new(),
        };
        self.networks.insert(name, net);
        Ok(())
    }

    /// Removes a network; refused while a service uses it.
    pub fn remove_network(&mut self, name: &str) -> Result<Network, StateError> {
        let net = self
            .networks
            .get(name)
            .ok_or_else(|| StateError::NoSuchNetwork(name.to_string()))?;
        // A service detached from it by an update may still run tasks on it until its
        // rollout replaces them.
        let users: Vec<&str> = self
            .services
            .values()
            .filter(|s| {
                s.networks.iter().any(|n| n == &net.name)
                    || self.tasks.values().any(|t| {
                        t.service == s.name && t.attachments.iter().any(|a| a.network == net.name)
                    })
            })
            .map(|s| s.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(StateError::NetworkInUse {
                network: net.name.clone(),
                services: users.join(", "),
            });
        }
        let containers: Vec<&str> = self
            .endpoints
            .values()
            .filter(|e| e.network == net.name)
            .map(|e| e.container.as_str())
            .collect();
        if !containers.is_empty() {
            return Err(StateError::NetworkHasEndpoints {
                network: net.name.clone(),
                containers: containers.join(", "),
            });
        }
        self.revision += 1;
        self.networks
            .remove(name)
            .ok_or_else(|| StateError::NoSuchNetwork(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{net, state};

    #[test]
    fn encrypted_networks_have_room_for_esp_and_no_plain_vteps() {
        let mut s = state();
        let req = |opts: &[(&str, &str)]| NetworkRequest {
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let name = |n: &str| NetworkName::new(n).unwrap();
        let n = s
            .create_network(
                name("sec"),
                req(&[(OPT_ENCRYPTED, "")]),
                Pool::default(),
                "1".into(),
                0,
            )
            .unwrap();
        assert!(n.encrypted());
        assert_eq!(n.mtu(), ENCRYPTED_MTU);
        let too_big = req(&[(OPT_ENCRYPTED, ""), (OPT_MTU, "1450")]);
        assert!(matches!(
            s.create_network(name("big"), too_big, Pool::default(), "2".into(), 0),
            Err(StateError::BadOption { .. })
        ));
        let off = s
            .create_network(
                name("off"),
                req(&[(OPT_ENCRYPTED, "false")]),
                Pool::default(),
                "3".into(),
                0,
            )
            .unwrap();
        assert!(!off.encrypted());
        let vtep = Vtep {
            address: "198.18.0.9".parse().unwrap(),
            mac: MacAddr([2, 0x42, 10, 0, 0, 9]),
            ip: None,
        };
        assert!(matches!(
            s.add_vtep("sec", vtep),
            Err(StateError::BadOption { .. })
        ));
    }

    #[test]
    fn networks_get_pools_gateways_and_vnis_in_order() {
        let mut s = state();
        let a = net(&mut s, "a", None).unwrap();
        let b = net(&mut s, "b", None).unwrap();
        assert_eq!(a.subnet.to_string(), "10.0.0.0/24");
        assert_eq!(a.gateway.to_string(), "10.0.0.1");
        assert_eq!(a.vni.get(), 4097);
        assert_eq!(b.subnet.to_string(), "10.0.1.0/24");
        assert_eq!(b.vni.get(), 4098);
        assert_eq!(b.options[OPT_VXLANID], "4098");
    }

    #[test]
    fn refusals_change_nothing() {
        let mut s = state();
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let before = s.clone();
        assert!(matches!(
            net(&mut s, "a", None),
            Err(StateError::NetworkExists(_))
        ));
        assert!(matches!(
            net(&mut s, "b", Some("10.0.2.128/25")),
            Err(StateError::SubnetOverlap { .. })
        ));
        assert!(matches!(
            net(&mut s, "b", Some("10.255.3.0/24")),
            Err(StateError::SubnetReserved { .. })
        ));
        assert!(matches!(
            net(&mut s, "b", Some("10.9.0.0/31")),
            Err(StateError::SubnetTooSmall { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn mtu_option() {
        let mut s = state();
        let mut req = NetworkRequest::default();
        let n = s
            .create_network(
                NetworkName::new("a").unwrap(),
                req.clone(),
                Pool::default(),
                "a".into(),
                0,
            )
            .unwrap();
        assert_eq!(n.mtu(), 1450);
        req.options.insert(OPT_MTU.into(), "1400".into());
        let n = s
            .create_network(
                NetworkName::new("b").unwrap(),
                req.clone(),
                Pool::default(),
                "b".into(),
                0,
            )
            .unwrap();
        assert_eq!(n.mtu(), 1400);
        for bad in ["1500", "9000", "10", "big"] {
            req.options.insert(OPT_MTU.into(), bad.into());
            let e = s.create_network(
                NetworkName::new("c").unwrap(),
                req.clone(),
                Pool::default(),
                "c".into(),
                0,
            );
            assert!(matches!(e, Err(StateError::BadOption { .. })), "{bad}");
        }
    }

    #[test]
    fn explicit_vni_and_gateway() {
        let mut s = state();
        let mut req = NetworkRequest {
            subnet: Some("10.7.0.0/24".parse().unwrap()),
            gateway: Some("10.7.0.254".parse().unwrap()),
            ..Default::default()
        };
        req.options.insert(OPT_VXLANID.into(), "5000".into());
        let n = s
            .create_network(
                NetworkName::new("x").unwrap(),
                req.clone(),
                Pool::default(),
                "x".into(),
                0,
            )
            .unwrap();
        assert_eq!(n.vni.get(), 5000);
        assert_eq!(n.gateway.to_string(), "10.7.0.254");
        req.subnet = Some("10.8.0.0/24".parse().unwrap());
        req.gateway = None;
        let e = s
            .create_network(
                NetworkName::new("y").unwrap(),
                req.clone(),
                Pool::default(),
                "y".into(),
                0,
            )
            .unwrap_err();
        assert!(matches!(e, StateError::VniInUse { .. }));
        req.options.insert(OPT_VXLANID.into(), "0".into());
        assert!(s
            .create_network(
                NetworkName::new("y").unwrap(),
                req.clone(),
                Pool::default(),
                "y".into(),
                0
            )
            .is_err());
        req.options.clear();
        req.gateway = Some("10.9.0.1".parse().unwrap());
        assert!(matches!(
            s.create_network(
                NetworkName::new("y").unwrap(),
                req,
                Pool::default(),
                "y".into(),
                0
            ),
            Err(StateError::BadGateway { .. })
        ));
    }
}
