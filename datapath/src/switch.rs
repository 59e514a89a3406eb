//! The per-frame decision, sans-IO: given the tables, where a frame came from and its bytes,
//! say what to do with it. No device, no socket, no clock, no allocation; the router's I/O
//! loop feeds it batches and carries out the [`Verdict`]s.

use crate::answer;
use crate::conntrack::ConnTable;
use crate::lb;
use crate::nat::L4Csum;
use crate::table::Tables;
use crate::vocab::{DropReason, Location, PortId, Punt, Verdict};
use protocol::types::{MacAddr, Vni};
use std::net::Ipv4Addr;

/// Largest frame handled on the wire: a 1500-byte payload, Ethernet header and one VLAN tag.
pub const MAX_FRAME: usize = 1518;
/// Largest frame a TAP with TCP segmentation offload hands over: a 64 KiB IP packet.
pub const MAX_SUPER_FRAME: usize = 14 + 4 + 65_535;
const ETHERTYPE_ARP: u16 = 0x0806;

/// What a decision reads besides the frame: the published tables (an immutable snapshot),
/// the node's connection table (shared and written by every worker, so never part of a
/// snapshot), and the time, read once per round by the I/O loop (milliseconds on a
/// monotonic scale; the decision reads no clock).
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub tables: &'a Tables,
    pub flows: &'a ConnTable,
    pub now_ms: u64,
}

fn mac_at(frame: &[u8], at: usize) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&frame[at..at + 6]);
    MacAddr(m)
}

/// Decides the fate of a frame read from local port `in_port` (possibly a TCP super-frame
/// of up to [`MAX_SUPER_FRAME`] bytes, whose TCP/UDP checksum may be partial: `csum`).
/// Frames to a service VIP, and replies to a VIP's clients, are translated in place.
/// `reply` must hold at least [`MAX_FRAME`] bytes; it is written only when the verdict is
/// [`Verdict::Reply`]. A DNS query to the gateway is [`Verdict::Punt`]ed, for the router.
pub fn from_port(
    cx: &Context<'_>,
    in_port: PortId,
    frame: &mut [u8],
    csum: L4Csum,
    reply: &mut [u8],
) -> Verdict {
    if frame.len() < 14 {
        return Verdict::Drop(DropReason::Runt);
    }
    if frame.len() > MAX_SUPER_FRAME {
        return Verdict::Drop(DropReason::Oversize);
    }
    let t = cx.tables;
    let Some(binding) = t.ports.get(&in_port) else {
        return Verdict::Drop(DropReason::UnknownPort);
    };
    if mac_at(frame, 6) != binding.mac {
        return Verdict::Drop(DropReason::SpoofedSource);
    }
    let Some(net) = t.networks.get(&binding.vni) else {
        return Verdict::Drop(DropReason::UnknownPort);
    };
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == ETHERTYPE_ARP {
        return match answer::arp(net, frame, reply) {
            Ok(n) => Verdict::Reply(n),
            Err(r) => Verdict::Drop(r),
        };
    }
    let dst = mac_at(frame, 0);
    if dst.is_multicast() {
        return Verdict::Flood(binding.vni);
    }
    // The MAC first: it is one compare, and almost no frame is for the gateway.
    if dst == net.gateway_mac {
        if let Some(gw) = net.gateway_ip {
            if net.dns.is_some() && answer::is_dns_query(gw, frame) {
                return Verdict::Punt(Punt::GatewayDns { vni: binding.vni });
            }
            return match answer::gateway(net, frame, reply) {
                Ok(n) => Verdict::Reply(n),
                Err(r) => Verdict::Drop(r),
            };
        }
    }
    match net.macs.get(&dst) {
        Some(Location::Local(p)) if *p == in_port => Verdict::Drop(DropReason::Hairpin),
        Some(Location::Local(p)) => {
            lb::to_client(cx.flows, cx.now_ms, net, binding.vni, frame, csum);
            Verdict::Forward(*p)
        }
        Some(Location::Remote(vtep)) => Verdict::Encap {
            vni: binding.vni,
            vtep: *vtep,
        },
        None => match lb::vip_for(net, dst) {
            Some(vip) => lb::to_vip(
                cx.flows,
                cx.now_ms,
                binding.vni,
                in_port,
                binding.mac,
                vip,
                frame,
                csum,
                reply,
            ),
            None => Verdict::Drop(DropReason::UnknownDestination),
        },
    }
}

/// Decides the fate of an inner frame that arrived in VXLAN with `vni` from the underlay
/// address `from`. Frames from the underlay are only ever delivered to local ports: nothing
/// is sent back out to the underlay except the router's own answers. `csum`: whether the
/// frame's TCP/UDP checksum is partial (from another overlayd node) or whole.
pub fn from_underlay(
    cx: &Context<'_>,
    vni: Vni,
    from: Ipv4Addr,
    frame: &mut [u8],
    csum: L4Csum,
    reply: &mut [u8],
) -> Verdict {
    if frame.len() < 14 {
        return Verdict::Drop(DropReason::Runt);
    }
    if frame.len() > MAX_FRAME {
        return Verdict::Drop(DropReason::Oversize);
    }
    let Some(net) = cx.tables.networks.get(&vni) else {
        return Verdict::Drop(DropReason::VxlanUnknownVni);
    };
    // The control plane says where every MAC lives; a frame whose source is not behind the
    // sender is spoofed or stale.
    let vtep = match net.macs.get(&mac_at(frame, 6)) {
        Some(Location::Remote(v)) if *v.ip() == from => *v,
        _ => return Verdict::Drop(DropReason::VxlanSourceMismatch),
    };
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == ETHERTYPE_ARP {
        return match answer::arp(net, frame, reply) {
            Ok(len) => Verdict::ReplyRemote { vni, vtep, len },
            Err(r) => Verdict::Drop(r),
        };
    }
    let dst = mac_at(frame, 0);
    if dst.is_multicast() {
        return Verdict::Flood(vni);
    }
    match net.macs.get(&dst) {
        Some(Location::Local(p)) => {
            // A remote backend's reply to a client here.
            lb::to_client(cx.flows, cx.now_ms, net, vni, frame, csum);
            Verdict::Forward(*p)
        }
        Some(Location::Remote(_)) => Verdict::Drop(DropReason::Hairpin),
        None => Verdict::Drop(DropReason::UnknownDestination),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod vip_tests;
