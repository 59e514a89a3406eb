//! The names the embedded resolver answers for, per network, built from the cluster state:
//! a service's name and aliases (its VIP, or its tasks' addresses in dnsrr mode),
//! `tasks.SERVICE` (the addresses of its tasks that can take traffic), each such task's own
//! names (`web.2`, `web.2.<task-id>`), and reverse names for all of those addresses. A task
//! only ever sees the names of the networks it is attached to.

use crate::services::serving_by_service;
use protocol::api::TaskStatus;
use protocol::control::NodeHealth;
use protocol::state::{ClusterState, EndpointMode};
use protocol::types::NodeName;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

/// One network's names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetNames {
    /// Lower-case name (no trailing dot) -> addresses, in a stable order.
    pub a: HashMap<String, Vec<Ipv4Addr>>,
    /// Address -> the name its PTR record gives.
    pub ptr: HashMap<Ipv4Addr, String>,
}

/// Every network's names, by network name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsView {
    pub networks: HashMap<String, NetNames>,
}

impl DnsView {
    pub fn build(
        state: &ClusterState,
        statuses: &BTreeMap<String, (String, TaskStatus)>,
        health: &BTreeMap<NodeName, NodeHealth>,
    ) -> DnsView {
        let mut view = DnsView::default();
        // By service, in one walk of the tasks: filtering them per service would make this
        // quadratic (120 ms at 1 000 services of 10 tasks, on every look of the agent).
        let serving = serving_by_service(state, statuses, health);
        let none = Vec::new();
        for svc in state.services.values() {
            let mine = serving.get(&svc.name).unwrap_or(&none);
            for net in &svc.networks {
                let names = view.networks.entry(net.to_string()).or_default();
                let tasks: Vec<Ipv4Addr> = mine
                    .iter()
                    .flat_map(|t| t.attachments.iter().filter(|a| &a.network == net))
                    .map(|a| a.address)
                    .collect();
                let service_addrs = match svc.endpoint_mode {
                    EndpointMode::Vip => svc.vips.get(net).map(|v| vec![*v]).unwrap_or_default(),
                    EndpointMode::Dnsrr => tasks.clone(),
                };
                if let Some(vip) = svc.vips.get(net) {
                    names.ptr.insert(*vip, format!("{}.{net}", svc.name));
                }
                let aliases = svc.aliases.get(net).into_iter().flatten();
                for name in std::iter::once(svc.name.as_str()).chain(aliases.map(String::as_str)) {
                    names
                        .a
                        .insert(name.to_ascii_lowercase(), service_addrs.clone());
                }
                names
                    .a
                    .insert(format!("tasks.{}", svc.name).to_ascii_lowercase(), tasks);
            }
        }
        for t in serving.values().flatten() {
            for a in &t.attachments {
                let names = view.networks.entry(a.network.to_string()).or_default();
                let long = format!("{}.{}", t.name, t.id).to_ascii_lowercase();
                names.a.insert(t.name.to_ascii_lowercase(), vec![a.address]);
                names.a.insert(long.clone(), vec![a.address]);
                names.ptr.insert(a.address, format!("{long}.{}", a.network));
            }
        }
        view
    }

    /// The addresses of `name` on the first of `networks` that knows it (None: not a cluster
    /// name there; Some(empty): a cluster name with no address right now).
    pub fn lookup(&self, networks: &[String], name: &str) -> Option<&[Ipv4Addr]> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        networks
            .iter()
            .filter_map(|n| self.networks.get(n))
            .find_map(|n| n.a.get(&name))
            .map(Vec::as_slice)
    }

    /// The name of `ip` on one of `networks`.
    pub fn reverse(&self, networks: &[String], ip: Ipv4Addr) -> Option<&str> {
        networks
            .iter()
            .filter_map(|n| self.networks.get(n))
            .find_map(|n| n.ptr.get(&ip))
            .map(String::as_str)
    }
}
