//! The per-frame decision, sans-IO: given the tables, where a frame came from and its bytes,
//! say what to do with it. No device, no socket, no allocation; the I/O loop in
//! [`super::io`] feeds it batches and carries out the verdicts.

use super::answer;
use super::lb;
use super::nat::L4Csum;
use super::stats::DropReason;
use super::table::{Location, PortId, Tables};
use protocol::types::{MacAddr, Vni};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest frame handled on the wire: a 1500-byte payload, Ethernet header and one VLAN tag.
pub const MAX_FRAME: usize = 1518;
/// Largest frame a TAP with TCP segmentation offload hands over: a 64 KiB IP packet.
pub const MAX_SUPER_FRAME: usize = 14 + 4 + 65_535;
const ETHERTYPE_ARP: u16 = 0x0806;

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
    Drop(DropReason),
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
/// [`Verdict::Reply`].
pub fn from_port(
    t: &Tables,
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
    if dst == net.gateway_mac && net.gateway_ip.is_some() {
        return match answer::gateway(net, frame, reply) {
            Ok(n) => Verdict::Reply(n),
            Err(r) => Verdict::Drop(r),
        };
    }
    match net.macs.get(&dst) {
        Some(Location::Local(p)) if *p == in_port => Verdict::Drop(DropReason::Hairpin),
        Some(Location::Local(p)) => {
            lb::to_client(t, net, binding.vni, frame, csum);
            Verdict::Forward(*p)
        }
        Some(Location::Remote(vtep)) => Verdict::Encap {
            vni: binding.vni,
            vtep: *vtep,
        },
        None => match lb::vip_for(net, dst) {
            Some(vip) => lb::to_vip(
                t,
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
    t: &Tables,
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
    let Some(net) = t.networks.get(&vni) else {
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
            lb::to_client(t, net, vni, frame, csum);
            Verdict::Forward(*p)
        }
        Some(Location::Remote(_)) => Verdict::Drop(DropReason::Hairpin),
        None => Verdict::Drop(DropReason::UnknownDestination),
    }
}

#[cfg(test)]
mod tests;
