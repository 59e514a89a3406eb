//! Datapath counters. Every frame the datapath does not deliver is dropped for a reason from
//! [`DropReason`] and counted; nothing is dropped silently and nothing is logged per frame.
//! Workers write, the API reads: relaxed atomics are enough. The frame counts, added per
//! batch, are kept per worker on cache lines of their own, so that workers on different cores
//! do not bounce one line between them; the API sums them.

use super::conntrack::ServiceCounters;
use protocol::api::{DatapathStats, ServiceLbStats, WorkerStats};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal: $doc:literal,)*) => {
        /// Why a frame was not delivered.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason {
            $(#[doc = $doc] $variant,)*
        }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];

            /// The stable name shown by `overlayctl stats` and the API.
            pub fn name(self) -> &'static str {
                match self {
                    $(DropReason::$variant => $name,)*
                }
            }
        }
    };
}

drop_reasons! {
    Runt => "runt": "Shorter than an Ethernet header.",
    Oversize => "oversize": "Longer than the largest frame the datapath handles.",
    UnknownPort => "unknown_port": "Read from a port that no longer has a binding.",
    SpoofedSource => "spoofed_source": "Source MAC is not the one assigned to the port it came from.",
    UnknownDestination => "unknown_destination": "Unicast to a MAC nobody in the network has.",
    Hairpin => "hairpin": "Addressed to the port it came from.",
    ArpUnknownTarget => "arp_unknown_target": "ARP request for an address nobody in the network has.",
    ArpMalformed => "arp_malformed": "ARP that is not Ethernet/IPv4 or is truncated.",
    ArpNotRequest => "arp_not_request": "ARP reply or other operation; the router answers ARP itself.",
    NoRoute => "no_route": "IP to the gateway that is not an echo request (no routing out of the overlay yet).",
    MalformedIp => "malformed_ip": "IPv4 to the gateway whose headers do not parse.",
    VxlanMalformed => "vxlan_malformed": "UDP datagram on the VXLAN port that is not a valid VXLAN frame.",
    VxlanUnknownVni => "vxlan_unknown_vni": "VXLAN frame for a VNI this node has no network for.",
    VxlanSourceMismatch => "vxlan_source_mismatch": "Inner source MAC does not live behind the sending underlay address.",
    WriteFailed => "write_failed": "The output device or socket refused the frame.",
    OffloadMalformed => "offload_malformed": "A super-frame or partial checksum from a TAP that cannot be segmented or completed.",
    LbNoFlow => "lb_no_flow": "TCP to a service VIP that is neither a new connection (SYN) nor part of a known flow.",
    LbNoBackend => "lb_no_backend": "UDP to a service VIP while the service has no running task (TCP gets a reset).",
    LbTableFull => "lb_table_full": "New flow to a VIP refused: the connection table is at its bound (--lb-max-flows).",
    LbUnsupported => "lb_unsupported": "To a VIP but not TCP, UDP or ICMP echo (or an IP fragment, which carries no ports).",
    EspAuthFailed => "esp_auth_failed": "ESP datagram whose integrity check failed (tampered, or sealed with another key).",
    EspReplay => "esp_replay": "ESP datagram whose sequence number was seen before or is too old for the replay window.",
    EspUnknownKey => "esp_unknown_key": "ESP datagram under a key (SPI) or from a sender this node does not have.",
    EspMalformed => "esp_malformed": "ESP datagram too short, with a bad trailer, or whose VXLAN VNI is not its SPI's.",
    EspCleartext => "esp_cleartext": "Plain VXLAN frame for an encrypted network: only ESP is accepted there.",
    EspNoKey => "esp_no_key": "Frame for an encrypted network while this node has no key yet: dropped, never sent in the clear.",
    EspSeqExhausted => "esp_seq_exhausted": "The sender's sequence numbers under this key are used up (it waits for the next key).",
}

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
    drops: [AtomicU64; 32],
    pub lb: LbRegistry,
    /// The routing mesh's per-port counters (kept by the ingress proxy).
    pub ingress: crate::ingress::stats::Registry,
}

/// One service's load-balancer counters and its per-backend flow counts.
type ServiceEntry = (Arc<ServiceCounters>, BTreeMap<Ipv4Addr, Arc<AtomicU64>>);

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
        m.entry(service.to_string()).or_default().0.clone()
    }

    /// The active-flow count of one backend of `service`.
    pub fn backend(&self, service: &str, ip: Ipv4Addr) -> Arc<AtomicU64> {
        let mut m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(service.to_string())
            .or_default()
            .1
            .entry(ip)
            .or_default()
            .clone()
    }

    /// Forgets services that no longer exist, and backends that carry no flow and are not
    /// in `live` any more.
    pub fn retain(&self, live: &BTreeMap<String, Vec<Ipv4Addr>>) {
        let mut m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|name, _| live.contains_key(name));
        for (name, (_, backends)) in m.iter_mut() {
            let now = live.get(name).map(Vec::as_slice).unwrap_or_default();
            backends.retain(|ip, n| now.contains(ip) || n.load(Ordering::Relaxed) > 0);
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, ServiceLbStats> {
        let m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(name, (c, backends))| {
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
            })
            .collect()
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            workers: std::array::from_fn(|_| WorkerCounters::default()),
            replies: AtomicU64::default(),
            flooded: AtomicU64::default(),
            drops: Default::default(),
            lb: LbRegistry::default(),
            ingress: Default::default(),
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
            drops,
            services: self.lb.snapshot(),
            ingress: self.ingress.snapshot(),
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
