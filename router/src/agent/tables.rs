//! The datapath's tables, built from the state being realised and published when they
//! change: local ports (tasks, draining tasks, container endpoints, the ingress endpoint),
//! remote locations, VIPs with their serving and draining backends (and removed services'
//! VIPs while their tasks drain), the gateway's resolver, and encrypted networks' keys
//! ([`KeyView`]). The same look refreshes the resolvers' names and the routing mesh's view,
//! and asks the manager for new keys when sequence numbers wear out.
//!
//! The two halves without I/O, [`Views::build`] (what the state and statuses say) and
//! [`build`] (the tables from those views), are public for `benches/benches/tables.rs`,
//! which measures them at 10 000 endpoints.

use super::{Agent, INGRESS_PORT};
use crate::clock::now_ms;
use crate::dns::names::DnsView;
use crate::ingress::IngressView;
use crate::services::{self, Statuses, VipView};
use datapath::conntrack::{TCP_IDLE_MS, UDP_IDLE_MS};
use datapath::keys::{lane_epoch, NetCrypto, TxSa};
use datapath::stats::LbRegistry;
use datapath::table::{BackendSpec, Tables};
use datapath::vocab::{PortBinding, PortId};
use protocol::control::{send_key, Keyring, NodeHealth, Op};
use protocol::esp::SenderKey;
use protocol::state::ClusterState;
use protocol::types::{NetworkName, NodeName, Vni};
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::Arc;
use tracing::{info, warn};

/// An encrypted network's keys as this node holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NetKeys {
    /// Every live key, (id, secret), oldest first: all are accepted.
    live: Vec<(u8, [u8; protocol::esp::SECRET_LEN])>,
    /// The id this node sends with now, once a key is active.
    sending: Option<u8>,
}

/// Per encrypted network, its [`NetKeys`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KeyView(BTreeMap<NetworkName, NetKeys>);

impl KeyView {
    fn of(ring: &Keyring, now_ms: u64) -> KeyView {
        KeyView(
            ring.iter()
                .map(|(n, keys)| {
                    let live = keys.iter().map(|k| (k.id, k.secret)).collect();
                    {
                        let sending = send_key(keys, now_ms).map(|k| k.id);
                        (n.clone(), NetKeys { live, sending })
                    }
                })
                .collect(),
        )
    }
}

/// What the agent derives from the state and what nodes report, on every look: the VIPs
/// with their backends (for the tables), the resolvers' names and the routing mesh's view.
#[derive(Debug, Clone)]
pub struct Views {
    pub vips: Vec<VipView>,
    pub names: DnsView,
    pub mesh: IngressView,
}

impl Views {
    /// The views of `node` over `state`; `previous` are the VIPs the tables were last built
    /// with, of which a removed service's stays while its tasks drain.
    pub fn build(
        state: &ClusterState,
        statuses: &Statuses,
        health: &BTreeMap<NodeName, NodeHealth>,
        node: &NodeName,
        previous: &[VipView],
    ) -> Views {
        let mut vips = services::vips(state, statuses, health);
        vips.extend(services::retired_vips(state, previous, statuses, health));
        Views {
            vips,
            // Names follow the same view; resolvers read it without a lock.
            names: DnsView::build(state, statuses, health),
            mesh: IngressView::build(state, statuses, health, node),
        }
    }
}

impl Agent {
    /// Rebuilds and publishes the tables if the tasks here (`force`), the state revision or a
    /// VIP's running backends changed.
    pub(super) fn publish_if_changed(&mut self, state: &ClusterState, force: bool) {
        let snap = self.cluster.snapshot();
        // The views follow from the state, the statuses and the nodes' health alone: when
        // none changed since the last look (most looks), they are what was published.
        let unchanged = self
            .looked
            .as_ref()
            .is_some_and(|(revision, statuses, health)| {
                *revision == state.revision && *statuses == snap.statuses && *health == snap.health
            });
        let vips = match (&self.published, unchanged) {
            (Some((_, vips, _)), true) => vips.clone(),
            _ => {
                // The snapshot may be a little ahead of `state`; VIPs follow the state being
                // realised.
                let previous = self.published.as_ref().map_or(&[][..], |p| &p.1[..]);
                let Views { vips, names, mesh } =
                    Views::build(state, &snap.statuses, &snap.health, &self.node, previous);
                if **self.dns.view.load() != names {
                    self.dns.view.store(Arc::new(names));
                }
                if self.published_ingress.as_ref() != Some(&mesh) {
                    self.ingress.update(mesh.clone());
                    self.published_ingress = Some(mesh);
                }
                self.looked = Some((state.revision, snap.statuses.clone(), snap.health.clone()));
                vips
            }
        };
        let keys = KeyView::of(&snap.keys, now_ms());
        self.request_rekeys(state);
        let same = self
            .published
            .as_ref()
            .is_some_and(|(rev, v, k)| *rev == state.revision && *v == vips && *k == keys);
        if force || !same {
            self.publish(state, &vips, &keys);
            self.published = Some((state.revision, vips, keys));
        }
    }

    /// Asks the manager for a new key of each encrypted network whose sequence numbers
    /// under the current key passed the rekey mark.
    fn request_rekeys(&self, state: &ClusterState) {
        for spi in self.datapath.take_worn_keys() {
            let (vni, _) = protocol::esp::parse_spi(spi);
            let Some(net) = state.networks.values().find(|n| n.vni.get() == vni) else {
                continue;
            };
            let (cluster, name) = (self.cluster.clone(), net.name.to_string());
            tokio::spawn(async move {
                match cluster.apply(Op::RotateKey(name.clone())).await {
                    Ok(_) => {
                        info!(network = %name, "asked for a new key: sequence numbers wearing out")
                    }
                    Err(e) => warn!(network = %name, error = %e, "cannot ask for a new key"),
                }
            });
        }
    }

    /// The keys of an encrypted network as the datapath holds them: every live secret for
    /// receiving, and this node's own key (its name and epoch) under the one in use.
    fn crypto_for(&mut self, name: &NetworkName, vni: Vni, keys: &KeyView) -> NetCrypto {
        let mut c = NetCrypto::default();
        let Some(NetKeys { live, sending }) = keys.0.get(name) else {
            return c;
        };
        self.secrets.retain(|(n, id), s| {
            n != name || live.iter().any(|(i, secret)| i == id && **s == *secret)
        });
        for (id, secret) in live {
            let s = self
                .secrets
                .entry((name.clone(), *id))
                .or_insert_with(|| Arc::new(*secret))
                .clone();
            if Some(*id) == *sending {
                let keys = (0..self.datapath.workers())
                    .map(|lane| {
                        let epoch = lane_epoch(self.datapath.esp_epoch, lane as u8);
                        SenderKey::derive(&s, self.node.as_str(), epoch)
                    })
                    .collect();
                c.tx = Some(TxSa {
                    spi: protocol::esp::spi(vni.get(), *id),
                    keys,
                });
            }
            c.rx.insert(*id, s);
        }
        c
    }

    fn publish(&mut self, state: &ClusterState, vips: &[VipView], keys: &KeyView) {
        self.counters.nets.name(
            state
                .networks
                .values()
                .map(|n| (n.vni.get(), n.name.to_string())),
        );
        let leaving = self.leaving.values().map(|l| &l.task);
        let ports: Vec<(PortId, PortBinding)> = self
            .tasks
            .values()
            .chain(leaving)
            .flat_map(|t| t.ports.iter().copied())
            .chain(self.endpoints.values().map(|e| e.port))
            .collect();
        let mut tables = build(
            state,
            &self.node,
            ports,
            vips,
            &self.counters.lb,
            self.data_port,
        );
        for net in state.networks.values().filter(|n| n.encrypted()) {
            if tables.networks.contains_key(&net.vni) {
                let c = self.crypto_for(&net.name, net.vni, keys);
                if let Some(t) = tables.networks.get_mut(&net.vni) {
                    t.crypto = Some(Arc::new(c));
                }
            }
        }
        self.datapath.publish(tables);
    }
}

/// The tables of `node` (without encrypted networks' keys, which the agent adds): its
/// local `ports` (tasks' and endpoints'; the ingress endpoint is added here), every remote
/// endpoint of its networks, and `vips` with their backends, counting into `lb`'s counters
/// (kept across rebuilds; services and backends no longer in `vips` are forgotten).
pub fn build(
    state: &ClusterState,
    node: &NodeName,
    mut ports: Vec<(PortId, PortBinding)>,
    vips: &[VipView],
    lb: &LbRegistry,
    data_port: u16,
) -> Tables {
    if let Some(ip) = state
        .ingress_network()
        .and_then(|n| Some((n.vni, *n.lb_endpoints.get(node)?)))
    {
        ports.push((
            INGRESS_PORT,
            PortBinding {
                vni: ip.0,
                mac: protocol::types::MacAddr::from_ipv4(ip.1),
                ip: ip.1,
            },
        ));
    }
    let vtep_of = |n: &NodeName| {
        let node = state.nodes.get(n)?;
        Some(SocketAddrV4::new(node.advertise_addr?, node.data_port))
    };
    let mut tables = Tables::from_state(state, node, &ports, &vtep_of, data_port);
    let mut live: BTreeMap<String, Vec<std::net::Ipv4Addr>> = BTreeMap::new();
    for v in vips {
        let name = v.service.as_str();
        let specs = |list: &[(std::net::Ipv4Addr, protocol::types::MacAddr)]| {
            list.iter()
                .map(|(ip, mac)| BackendSpec {
                    ip: *ip,
                    mac: *mac,
                    flows: lb.backend(name, *ip),
                })
                .collect::<Vec<_>>()
        };
        let idle = match v.idle_secs {
            Some(s) => (s.saturating_mul(1000), s.saturating_mul(1000)),
            None => (TCP_IDLE_MS, UDP_IDLE_MS),
        };
        tables.add_vip(v.vni, v.ip, lb.service(name), &specs(&v.backends), idle);
        tables.add_draining(v.vni, v.ip, &specs(&v.draining));
        live.entry(name.to_string())
            .or_default()
            .extend(v.backends.iter().chain(&v.draining).map(|b| b.0));
    }
    lb.retain(&live);
    for net in state.networks.values() {
        if let Some(t) = tables.networks.get_mut(&net.vni) {
            // The router answers at the gateway from this network's names.
            t.dns = Some(Arc::from([net.name.to_string()]));
        }
    }
    tables
}
