//! The cluster map in the browser, at `/` on the metrics address: one HTML page (`map.html`,
//! plain HTML and JavaScript inside the binary: no build step, nothing fetched from outside)
//! that draws the cluster as this node sees it — nodes with their tasks, services with their
//! VIPs and published ports — and this node's live rates, from `/map.json`, which it reads
//! again every two seconds. The rates are made here, by a [`Sampler`] that reads this node's
//! counters every [`SAMPLE_EVERY`] and keeps the last reading: a page shows them from its
//! first read, and a headless screenshot needs no waiting in the page.

use super::Sources;
use protocol::control::NodeHealth;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the [`Sampler`] reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// This node's counters at one moment.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    frames: u64,
    /// Bytes read from and written to the node's local interfaces (every network's).
    bytes: u64,
    drops: u64,
    dns: u64,
    /// Bytes of load-balanced flows per service (both ways, to every backend).
    service_bytes: BTreeMap<String, u64>,
    /// New load-balanced flows per service.
    flows: BTreeMap<String, u64>,
    /// Routing-mesh connections accepted per service (its ports summed).
    mesh: BTreeMap<String, u64>,
}

impl Sample {
    fn read(sources: &Sources) -> Sample {
        let stats = sources.counters.snapshot();
        let mut mesh: BTreeMap<String, u64> = BTreeMap::new();
        for p in sources.ingress.snapshot().into_values() {
            *mesh.entry(p.service).or_default() += p.accepted;
        }
        let mut service_bytes: BTreeMap<String, u64> = BTreeMap::new();
        for ((service, _), (_, bytes)) in super::backend_moved(&sources.counters, &sources.flows) {
            *service_bytes.entry(service).or_default() += bytes;
        }
        Sample {
            at: Instant::now(),
            frames: stats.rx_frames + stats.tx_frames,
            bytes: stats
                .networks
                .values()
                .flatten()
                .map(|l| l.from_ports_bytes + l.to_ports_bytes)
                .sum(),
            service_bytes,
            drops: stats.drops.values().sum(),
            dns: sources.dns.stats.queries().map(|(_, _, n)| n).sum(),
            flows: stats
                .services
                .into_iter()
                .map(|(name, s)| (name, s.new_flows))
                .collect(),
            mesh,
        }
    }
}

/// Per-second rates between two samples (a counter that went back, as after a restart of
/// its owner, counts from zero).
fn rates(before: &Sample, now: &Sample) -> Value {
    let secs = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let r = |a: u64, b: u64| ((b.saturating_sub(a)) as f64 / secs * 10.0).round() / 10.0;
    let each = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
        b.iter()
            .map(|(k, v)| (k.clone(), r(a.get(k).copied().unwrap_or(0), *v)))
            .collect::<BTreeMap<_, _>>()
    };
    json!({
        "seconds": secs,
        "frames": r(before.frames, now.frames),
        "bytes": r(before.bytes, now.bytes),
        "service_bytes": each(&before.service_bytes, &now.service_bytes),
        "drops": r(before.drops, now.drops),
        "dns": r(before.dns, now.dns),
        "flows": each(&before.flows, &now.flows),
        "mesh": each(&before.mesh, &now.mesh),
    })
}

/// Reads the counters every [`SAMPLE_EVERY`] and keeps the rates since the reading before.
#[derive(Debug, Default)]
pub struct Sampler {
    last: Mutex<Option<Sample>>,
    rates: Mutex<Option<Value>>,
}

impl Sampler {
    /// Takes a reading: the rates since the last one replace the previous rates.
    pub fn sample(&self, sources: &Sources) {
        let now = Sample::read(sources);
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if let Some(before) = last.as_ref() {
            if let Ok(mut r) = self.rates.lock() {
                *r = Some(rates(before, &now));
            }
        }
        *last = Some(now);
    }

    fn rates(&self) -> Value {
        self.rates
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or(Value::Null)
    }
}

/// The page.
pub const PAGE: &str = include_str!("map.html");

/// What the page draws: the desired state with the tasks' last reported states, and this
/// node's rates from `sampler`.
pub fn view(sources: &Sources, sampler: &Sampler) -> Value {
    let snapshot = sources.cluster.snapshot();
    let state = &snapshot.state;
    let nodes: Vec<Value> = state
        .nodes
        .values()
        .map(|n| {
            let health = match snapshot.health.get(&n.name) {
                Some(NodeHealth::Ready) => "ready",
                Some(NodeHealth::Down) => "down",
                None => "unknown",
            };
            json!({
                "name": n.name.to_string(),
                "role": n.role,
                "availability": n.availability,
                "addr": n.advertise_addr.map(|a| a.to_string()),
                "health": health,
            })
        })
        .collect();
    let services: Vec<Value> = state
        .services
        .values()
        .map(|s| {
            json!({
                "name": s.name.to_string(),
                "mode": s.endpoint_mode.to_string(),
                "replicas": s.replicas,
                "vips": s.vips.iter().map(|(n, ip)| (n.to_string(), ip.to_string())).collect::<BTreeMap<_, _>>(),
                "ports": s.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let tasks: Vec<Value> = state
        .tasks
        .values()
        .map(|t| {
            let status = snapshot
                .statuses
                .get(&t.name)
                .filter(|(id, _)| *id == t.id)
                .map(|(_, s)| s);
            json!({
                "name": t.name,
                "service": t.service.to_string(),
                "node": t.node.to_string(),
                "addrs": t.attachments.iter().map(|a| a.address.to_string()).collect::<Vec<_>>(),
                "state": status.map_or("pending".to_string(), |s| s.state.to_string()),
                "health": status.and_then(|s| s.health).map(|h| h.to_string()),
            })
        })
        .collect();
    json!({
        "node": sources.node.to_string(),
        "revision": state.revision,
        "nodes": nodes,
        "services": services,
        "tasks": tasks,
        "rates": sampler.rates(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, frames: u64, web: u64) -> Sample {
        Sample {
            at,
            frames,
            bytes: 0,
            service_bytes: BTreeMap::new(),
            drops: 0,
            dns: 0,
            flows: [("web".to_string(), web)].into(),
            mesh: BTreeMap::new(),
        }
    }

    #[test]
    fn rates_are_per_second_and_survive_a_counter_going_back() {
        let t = Instant::now();
        let r = rates(
            &sample(t, 100, 10),
            &sample(t + Duration::from_secs(2), 300, 4),
        );
        assert_eq!(r["frames"], 100.0);
        assert_eq!(r["flows"]["web"], 0.0);
    }
}
