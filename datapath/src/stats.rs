//! Datapath counters. Every frame the datapath does not deliver is dropped for a reason from
//! [`DropReason`] and counted; nothing is dropped silently and nothing is logged per frame.
//! Workers write, the API reads: relaxed atomics are enough. The frame counts, added per
//! batch, are kept per worker on cache lines of their own, so that workers on different cores
//! do not bounce one line between them; the API sums them. (The routing mesh's counters are
//! the router's: [`Counters::snapshot`] leaves `ingress` empty for it to fill.)

use crate::conntrack::{BackendCounters, ServiceCounters};
use crate::vocab::DropReason;
use protocol::api::{DatapathStats, ServiceLbStats, WorkerStats};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Most datapath workers a node runs (`--datapath-workers`).
pub const MAX_WORKERS: usize = 64;

/// One worker's frame counts, alone on its cache line (and the next, which the prefetcher
/// pairs with it).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerCounters {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Datagrams and bytes (VXLAN or ESP payload, without IP/UDP headers) received from and
    /// sent to the underlay.
    pub underlay_rx: AtomicU64,
    pub underlay_rx_bytes: AtomicU64,
    pub underlay_tx: AtomicU64,
    pub underlay_tx_bytes: AtomicU64,
    /// Datagrams per underlay send (UDP GSO), by [`Batches`] bucket.
    pub gso: Batches,
    /// Segments per frame written to a TAP by the userspace GRO, by bucket.
    pub gro: Batches,
}

/// A histogram of batch sizes: how many batches had 1, 2, 3–4, 5–8, ... 33–64 and more than
/// 64 items, and how many items in all. Written by one worker only, read by the API.
#[derive(Debug, Default)]
pub struct Batches {
    buckets: [AtomicU64; BATCH_BUCKETS],
    items: AtomicU64,
}

/// Upper bounds of [`Batches`]' buckets (the last is everything above 64).
pub const BATCH_BOUNDS: [u64; BATCH_BUCKETS - 1] = [1, 2, 4, 8, 16, 32, 64];
const BATCH_BUCKETS: usize = 8;

impl Batches {
    /// Counts one batch of `n` items (single writer: its worker).
    pub fn record(&self, n: u64) {
        let bucket = BATCH_BOUNDS
            .iter()
            .position(|b| n <= *b)
            .unwrap_or(BATCH_BUCKETS - 1);
        bump(&self.buckets[bucket], 1);
        bump(&self.items, n);
    }

    pub fn snapshot(&self) -> protocol::api::BatchStats {
        protocol::api::BatchStats {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            items: self.items.load(Ordering::Relaxed),
        }
    }
}

/// Adds `n` to a counter that only the calling thread writes: a plain load and store, no
/// locked instruction on the hot path. Readers see each value whole (an aligned `u64`).
#[inline]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// One network's frames and bytes to and from its local ports (tasks, containers, the
/// ingress endpoint), per worker, each worker on cache lines of its own.
#[derive(Debug)]
pub struct NetCounters {
    lanes: [NetLane; MAX_WORKERS],
}

#[derive(Debug, Default)]
#[repr(align(128))]
pub struct NetLane {
    /// Read from the network's local ports.
    pub from_ports: AtomicU64,
    pub from_ports_bytes: AtomicU64,
    /// Written to them.
    pub to_ports: AtomicU64,
    pub to_ports_bytes: AtomicU64,
}

impl Default for NetCounters {
    fn default() -> Self {
        NetCounters {
            lanes: std::array::from_fn(|_| NetLane::default()),
        }
    }
}

impl NetCounters {
    /// The counters of the worker at `lane` (written by that worker only: [`bump`]).
    pub fn lane(&self, lane: usize) -> &NetLane {
        &self.lanes[lane % MAX_WORKERS]
    }
}

/// Every network's [`NetCounters`], by VNI, and the networks' names. A port is handed its
/// network's counters when it is added, so the datapath never looks them up; the lock is
/// taken when a port is added, when the tables are published (names) and when the API reads.
#[derive(Debug, Default)]
pub struct NetRegistry {
    nets: Mutex<BTreeMap<u32, NamedNet>>,
}

/// A network's counters, and its name once the tables named it.
type NamedNet = (Option<String>, Arc<NetCounters>);

impl NetRegistry {
    /// The counters of network `vni`, made on first use.
    pub fn network(&self, vni: u32) -> Arc<NetCounters> {
        let mut m = self.nets.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(vni).or_default().1.clone()
    }

    /// Names the networks that exist (VNI and name), and forgets the counters of those that
    /// no longer do (a port still counting keeps its own until it goes).
    pub fn name(&self, live: impl IntoIterator<Item = (u32, String)>) {
        let live: BTreeMap<u32, String> = live.into_iter().collect();
        let mut m = self.nets.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|vni, _| live.contains_key(vni));
        for (vni, name) in live {
            m.entry(vni).or_default().0 = Some(name);
        }
    }

    /// Per network: its per-worker counts, up to the last worker that counted.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<protocol::api::NetworkLaneStats>> {
        let m = self.nets.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(vni, (name, c))| {
                let lanes: Vec<_> = c
                    .lanes
                    .iter()
                    .map(|l| protocol::api::NetworkLaneStats {
                        from_ports: l.from_ports.load(Ordering::Relaxed),
                        from_ports_bytes: l.from_ports_bytes.load(Ordering::Relaxed),
                        to_ports: l.to_ports.load(Ordering::Relaxed),
                        to_ports_bytes: l.to_ports_bytes.load(Ordering::Relaxed),
                    })
                    .collect();
                let last = lanes
                    .iter()
                    .rposition(|l| l.from_ports + l.to_ports > 0)
                    .map_or(0, |i| i + 1);
                let name = name.clone().unwrap_or_else(|| format!("vni-{vni}"));
                (name, lanes[..last].to_vec())
            })
            .collect()
    }
}

/// Shared counters of one node's datapath.
#[derive(Debug)]
pub struct Counters {
    workers: [WorkerCounters; MAX_WORKERS],
    pub replies: AtomicU64,
    pub flooded: AtomicU64,
    /// ESP receiving states (a sender's key and replay window) evicted to stay within
    /// `crypto::RX_MAX`: not a dropped frame, so not a [`DropReason`].
    pub esp_evicted: AtomicU64,
    /// ESP datagrams sealed and opened (a failed one is a drop, by its reason).
    pub esp_sealed: AtomicU64,
    pub esp_opened: AtomicU64,
    drops: [AtomicU64; 32],
    pub lb: LbRegistry,
    pub nets: NetRegistry,
}

/// One service's load-balancer counters and its per-backend flow counts.
#[derive(Debug, Default)]
struct ServiceEntry {
    counters: Arc<ServiceCounters>,
    /// Per backend address: its flows now and what its ended flows moved.
    backends: BTreeMap<Ipv4Addr, Arc<BackendCounters>>,
}

/// The load balancer's counters per service, kept across table rebuilds: the agent hands
/// the same counters to every `Tables` it builds, the datapath counts into them without a
/// lock, and the API reads them. The lock here is taken only by those two, never per frame.
#[derive(Debug, Default)]
pub struct LbRegistry {
    services: Mutex<BTreeMap<String, ServiceEntry>>,
}

impl LbRegistry {
    /// The counters of `service`, made on first use.
    pub fn service(&self, service: &str) -> Arc<ServiceCounters> {
        let mut m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(service.to_string()).or_default().counters.clone()
    }

    /// Every service's name with its counters (to name a flow's service by its counters).
    pub fn names(&self) -> Vec<(String, Arc<ServiceCounters>)> {
        let m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(name, e)| (name.clone(), e.counters.clone()))
            .collect()
    }

    /// The counters of one backend of `service`.
    pub fn backend(&self, service: &str, ip: Ipv4Addr) -> Arc<BackendCounters> {
        let mut m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(service.to_string())
            .or_default()
            .backends
            .entry(ip)
            .or_default()
            .clone()
    }

    /// Forgets services that no longer exist, and backends that carry no flow and are not
    /// in `live` any more.
    pub fn retain(&self, live: &BTreeMap<String, Vec<Ipv4Addr>>) {
        let mut m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|name, _| live.contains_key(name));
        for (name, entry) in m.iter_mut() {
            let now = live.get(name).map(Vec::as_slice).unwrap_or_default();
            entry
                .backends
                .retain(|ip, n| now.contains(ip) || n.active.load(Ordering::Relaxed) > 0);
        }
    }

    /// Every backend: its service, address and counters.
    pub fn backends(&self) -> Vec<(String, Ipv4Addr, Arc<BackendCounters>)> {
        let m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .flat_map(|(name, e)| {
                e.backends
                    .iter()
                    .map(move |(ip, c)| (name.clone(), *ip, c.clone()))
            })
            .collect()
    }

    pub fn snapshot(&self) -> BTreeMap<String, ServiceLbStats> {
        let m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(
                |(
                    name,
                    ServiceEntry {
                        counters: c,
                        backends,
                    },
                )| {
                    let stats = ServiceLbStats {
                        active_flows: c.active.load(Ordering::Relaxed),
                        new_flows: c.new_flows.load(Ordering::Relaxed),
                        refused_flows: c.refused.load(Ordering::Relaxed),
                        backends: backends
                            .iter()
                            .map(|(ip, n)| (ip.to_string(), n.active.load(Ordering::Relaxed)))
                            .collect(),
                    };
                    (name.clone(), stats)
                },
            )
            .collect()
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            workers: std::array::from_fn(|_| WorkerCounters::default()),
            replies: AtomicU64::default(),
            flooded: AtomicU64::default(),
            esp_evicted: AtomicU64::default(),
            esp_sealed: AtomicU64::default(),
            esp_opened: AtomicU64::default(),
            drops: Default::default(),
            lb: LbRegistry::default(),
            nets: NetRegistry::default(),
        }
    }
}

impl Counters {
    /// The frame counts of the worker at `lane`.
    pub fn worker(&self, lane: usize) -> &WorkerCounters {
        &self.workers[lane % MAX_WORKERS]
    }

    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> DatapathStats {
        let drops: BTreeMap<String, u64> = DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), self.dropped(*r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let per_worker: Vec<WorkerStats> = self
            .workers
            .iter()
            .map(|w| WorkerStats {
                rx_frames: w.rx_frames.load(Ordering::Relaxed),
                tx_frames: w.tx_frames.load(Ordering::Relaxed),
                underlay_rx: w.underlay_rx.load(Ordering::Relaxed),
                underlay_rx_bytes: w.underlay_rx_bytes.load(Ordering::Relaxed),
                underlay_tx: w.underlay_tx.load(Ordering::Relaxed),
                underlay_tx_bytes: w.underlay_tx_bytes.load(Ordering::Relaxed),
                gso: w.gso.snapshot(),
                gro: w.gro.snapshot(),
            })
            .collect();
        let last = per_worker
            .iter()
            .rposition(|w| w.rx_frames + w.tx_frames > 0)
            .map_or(0, |i| i + 1);
        DatapathStats {
            rx_frames: per_worker.iter().map(|w| w.rx_frames).sum(),
            tx_frames: per_worker.iter().map(|w| w.tx_frames).sum(),
            workers: per_worker[..last].to_vec(),
            replies: self.replies.load(Ordering::Relaxed),
            flooded: self.flooded.load(Ordering::Relaxed),
            esp_evicted: self.esp_evicted.load(Ordering::Relaxed),
            esp_sealed: self.esp_sealed.load(Ordering::Relaxed),
            esp_opened: self.esp_opened.load(Ordering::Relaxed),
            drops,
            services: self.lb.snapshot(),
            networks: self.nets.snapshot(),
            ingress: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_slot() {
        let c = Counters::default();
        assert!(DropReason::ALL.len() <= c.drops.len());
        for r in DropReason::ALL {
            c.count_drop(*r);
        }
        assert_eq!(c.snapshot().drops.len(), DropReason::ALL.len());
    }
}
