//! Datapath counters. Every frame the datapath does not deliver is dropped for a reason from
//! [`DropReason`] and counted; nothing is dropped silently and nothing is logged per frame.
//! Workers write, the API reads: relaxed atomics are enough. The frame counts, added per
//! batch, are kept per worker on cache lines of their own, so that workers on different cores
//! do not bounce one line between them; the API sums them. (The routing mesh's counters are
//! the router's: [`Counters::snapshot`] leaves `ingress` empty for it to fill.)

use crate::conntrack::ServiceCounters;
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
}

/// One service's load-balancer counters and its per-backend flow counts.
#[derive(Debug, Default)]
struct ServiceEntry {
    counters: Arc<ServiceCounters>,
    /// Active flows per backend address.
    backends: BTreeMap<Ipv4Addr, Arc<AtomicU64>>,
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

    /// The active-flow count of one backend of `service`.
    pub fn backend(&self, service: &str, ip: Ipv4Addr) -> Arc<AtomicU64> {
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
                .retain(|ip, n| now.contains(ip) || n.load(Ordering::Relaxed) > 0);
        }
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
                            .map(|(ip, n)| (ip.to_string(), n.load(Ordering::Relaxed)))
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
