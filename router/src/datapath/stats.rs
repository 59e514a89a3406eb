//! Datapath counters. Every frame the datapath does not deliver is dropped for a reason from
//! [`DropReason`] and counted; nothing is dropped silently and nothing is logged per frame.
//! The I/O thread is the only writer, the API reads: relaxed atomics are enough.

use protocol::api::DatapathStats;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

/// Shared counters of one node's datapath.
#[derive(Debug, Default)]
pub struct Counters {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    pub replies: AtomicU64,
    pub flooded: AtomicU64,
    drops: [AtomicU64; 16],
}

impl Counters {
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
        DatapathStats {
            rx_frames: self.rx_frames.load(Ordering::Relaxed),
            tx_frames: self.tx_frames.load(Ordering::Relaxed),
            replies: self.replies.load(Ordering::Relaxed),
            flooded: self.flooded.load(Ordering::Relaxed),
            drops,
            services: BTreeMap::new(),
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
