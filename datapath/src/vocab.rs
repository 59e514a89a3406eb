//! The datapath's shared vocabulary: the few types every other module speaks (ports, where a
//! MAC lives, what to do with a frame, why one was dropped). A leaf: it depends on nothing in
//! this crate, so the modules above it (table, conntrack, crypto, lb, switch, stats) only ever
//! depend downward.

use protocol::types::{MacAddr, Vni};
use std::net::{Ipv4Addr, SocketAddrV4};

/// The hasher of the maps the load balancer reads per frame: foldhash, seeded per process
/// (the keys are addresses tasks choose, so not a fixed-seed hash).
pub type FastHash = foldhash::fast::RandomState;

/// A local port: one TAP device of one task on one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

/// What the datapath knows about a local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortBinding {
    pub vni: Vni,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

/// Where a MAC lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Local(PortId),
    /// Behind another VTEP (an overlayd node or an external VXLAN device) at this underlay
    /// address.
    Remote(SocketAddrV4),
}

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it unchanged to this local port.
    Forward(PortId),
    /// Wrap it in VXLAN with this VNI and send it to this VTEP.
    Encap {
        vni: Vni,
        vtep: SocketAddrV4,
    },
    /// Copy it to every local port of this network but the one it came from.
    Flood(Vni),
    /// The router answered; the answer (this many bytes of the reply buffer) goes back out of
    /// the port the frame came from.
    Reply(usize),
    /// The router answered a frame that came over the underlay; the answer (this many bytes
    /// of the reply buffer) goes back to that VTEP in VXLAN with this VNI.
    ReplyRemote {
        vni: Vni,
        vtep: SocketAddrV4,
        len: usize,
    },
    /// The router answers, but not here: the frame (unchanged) is handed to the I/O side,
    /// whose answer goes back out of the port the frame came from.
    Punt(Punt),
    Drop(DropReason),
}

/// A frame the decision hands to the I/O side to answer (work that allocates or needs what
/// only the router has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Punt {
    /// A DNS query over UDP to port 53 of the gateway of network `vni`, which has DNS there
    /// (`NetTable::dns`). A query the router cannot answer is dropped as `MalformedIp`, an
    /// answer too large for a frame as `Oversize`.
    GatewayDns { vni: Vni },
}

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
    EspRateLimited => "esp_rate_limited": "ESP datagram under an epoch of its sender not seen yet, beyond the key derivations allowed per sender and second (forged epochs cost bounded work).",
    EspNoEpoch => "esp_no_epoch": "Frame for an encrypted network while this node could not keep its epoch on disk: never sealed, so no key and nonce are used twice.",
}
