//! The service load balancer's per-frame decisions, sans-IO, called by the switch. It runs on
//! the client's node: a client's frame to a VIP is given a backend (round-robin over the
//! service's running tasks on every node, for the first packet of a flow; the connection
//! table's choice for the rest) and its destination rewritten; a backend's reply on its way
//! to the client gets the VIP back as its source, so the client only ever sees the VIP.
//! Any port of the VIP maps to the same port of the task, as in Swarm. After a restart of
//! the router, an established flow of the previous run is rebuilt to the backend it had
//! when its first segment (either way) finds no flow (`conntrack::Resumable`).

use crate::answer;
use crate::conntrack::{ConnTable, Dir, Flow, FlowKey, Resumable};
use crate::nat::{self, L4Csum, Side, TcpEnd, PROTO_ICMP, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_SYN};
use crate::table::{NetTable, Vip};
use crate::vocab::{DropReason, Location, PortId, Verdict};
use protocol::types::{MacAddr, Vni};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

/// The VIP a frame is addressed to, if its destination MAC is one of this network's VIPs.
pub fn vip_for(net: &NetTable, dst: MacAddr) -> Option<&Vip> {
    if net.vips.is_empty() || dst.0[..2] != [0x02, 0x42] {
        return None;
    }
    let ip = Ipv4Addr::new(dst.0[2], dst.0[3], dst.0[4], dst.0[5]);
    net.vips.get(&ip).filter(|v| v.mac == dst)
}

/// The connection-table key of a frame as it travels.
fn key_of(vni: Vni, l4: &nat::L4) -> FlowKey {
    FlowKey {
        vni: vni.get(),
        proto: l4.proto,
        src: l4.src,
        sport: l4.sport,
        dst: l4.dst,
        dport: l4.dport,
    }
}

/// A frame from local port `in_port` (a client, whose MAC is `client_mac`) to `vip`, at
/// `now_ms`; a new flow goes into `flows`.
#[allow(clippy::too_many_arguments)]
pub fn to_vip(
    flows: &ConnTable,
    now_ms: u64,
    vni: Vni,
    in_port: PortId,
    client_mac: MacAddr,
    vip: &Vip,
    frame: &mut [u8],
    csum: L4Csum,
    reply: &mut [u8],
) -> Verdict {
    let Some(l4) = nat::parse(frame) else {
        return Verdict::Drop(DropReason::LbUnsupported);
    };
    if l4.dst != vip.ip {
        return Verdict::Drop(DropReason::LbUnsupported);
    }
    if l4.proto == PROTO_ICMP {
        // `ping whoami` answers from the VIP itself, as in Swarm.
        return match answer::echo(vip.ip, vip.mac, frame, reply) {
            Ok(n) => Verdict::Reply(n),
            Err(DropReason::NoRoute) => Verdict::Drop(DropReason::LbUnsupported),
            Err(r) => Verdict::Drop(r),
        };
    }
    let tcp = l4.proto == PROTO_TCP;
    let key = key_of(vni, &l4);
    let len = frame.len();
    let known = flows.with(&key, |slot| {
        let f = &slot.flow;
        f.touch(now_ms);
        f.count(Dir::ToBackend, len);
        if tcp {
            f.track_tcp(Dir::ToBackend, l4.flags, 0);
        }
        (f.backend_ip, f.backend_mac, f.backend_at, f.is_closed())
    });
    let opens = !tcp || l4.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let (ip, mac, at) = match known {
        // A SYN on a closed flow's 5-tuple is a new connection: it is balanced afresh.
        Some((ip, mac, at, closed)) if !(closed && opens && tcp) => (ip, mac, at),
        _ if !opens => {
            let resumed = flows
                .resumable(&key)
                .and_then(|r| resume(flows, now_ms, vip, &r, client_mac, in_port));
            match resumed {
                Some(b) => b,
                None => return Verdict::Drop(DropReason::LbNoFlow),
            }
        }
        _ if vip.backends.is_empty() => {
            // No task runs: refuse the connection at once rather than let it time out.
            let client = TcpEnd {
                mac: client_mac,
                ip: l4.src,
                port: l4.sport,
            };
            let from = TcpEnd {
                mac: vip.mac,
                ip: vip.ip,
                port: l4.dport,
            };
            return match tcp.then(|| refuse(reply, from, client, l4.seq)).flatten() {
                Some(n) => Verdict::Reply(n),
                None => Verdict::Drop(DropReason::LbNoBackend),
            };
        }
        _ => {
            let n = vip.service.rr.fetch_add(1, Ordering::Relaxed) as usize;
            let mut b = &vip.backends[n % vip.backends.len()];
            // A replica calling its own service gets another replica, if there is one: its
            // own packets could not come back to it from itself.
            if b.at == Location::Local(in_port) && vip.backends.len() > 1 {
                let n = vip.service.rr.fetch_add(1, Ordering::Relaxed) as usize;
                b = &vip.backends[n % vip.backends.len()];
            }
            let idle = if tcp {
                vip.tcp_idle_ms
            } else {
                vip.udp_idle_ms
            };
            let flow = Flow::new(
                key,
                vip.mac,
                client_mac,
                in_port,
                (b.ip, b.mac, b.at),
                idle,
                vip.service.clone(),
                b.flows.clone(),
                now_ms,
            );
            match flows.insert(flow) {
                Ok(flow) => flow.count(Dir::ToBackend, len),
                Err(_) => return Verdict::Drop(DropReason::LbTableFull),
            }
            (b.ip, b.mac, b.at)
        }
    };
    nat::rewrite(frame, &l4, Side::Destination, ip, mac, csum);
    match at {
        Location::Local(p) if p == in_port => Verdict::Drop(DropReason::Hairpin),
        Location::Local(p) => Verdict::Forward(p),
        Location::Remote(vtep) => Verdict::Encap { vni, vtep },
    }
}

/// Rebuilds a previous run's flow `r` to its backend, if that backend still serves `vip`:
/// the flow goes on as if the restart had not happened. Returns the backend.
fn resume(
    flows: &ConnTable,
    now_ms: u64,
    vip: &Vip,
    r: &Resumable,
    client_mac: MacAddr,
    client_port: PortId,
) -> Option<(Ipv4Addr, MacAddr, Location)> {
    let b = vip
        .backends
        .iter()
        .chain(&vip.draining)
        .find(|b| b.ip == r.backend_ip)?;
    let flow = Flow::new(
        r.key,
        vip.mac,
        client_mac,
        client_port,
        (b.ip, b.mac, b.at),
        vip.tcp_idle_ms,
        vip.service.clone(),
        b.flows.clone(),
        now_ms,
    );
    flow.resume_established();
    flows.insert(flow).ok()?;
    flows.resumed(r);
    Some((b.ip, b.mac, b.at))
}

/// A backend's reply on a previous run's flow `r` (the client spoke not yet since the
/// restart): the flow is rebuilt from this node's tables, its client local to this node.
fn resume_from_reply(flows: &ConnTable, now_ms: u64, net: &NetTable, r: &Resumable) {
    let Some(vip) = net.vips.get(&r.key.dst) else {
        return;
    };
    let Some(client_mac) = net.arp.get(&r.key.src).copied() else {
        return;
    };
    let Some(Location::Local(client_port)) = net.macs.get(&client_mac).copied() else {
        return;
    };
    let _ = resume(flows, now_ms, vip, r, client_mac, client_port);
}

/// A reset with ACK answering a SYN (sequence `syn_seq`): "connection refused".
fn refuse(out: &mut [u8], from: TcpEnd, to: TcpEnd, syn_seq: u32) -> Option<usize> {
    let builder = etherparse::PacketBuilder::ethernet2(from.mac.0, to.mac.0)
        .ipv4(from.ip.octets(), to.ip.octets(), 64)
        .tcp(from.port, to.port, 0, 0)
        .rst()
        .ack(syn_seq.wrapping_add(1));
    let len = builder.size(0);
    builder.write_to_slice(out, &[]).ok()?;
    Some(len)
}

/// A frame about to be delivered to a local port at `now_ms`: if it is a backend's reply on
/// a load-balanced flow of `flows`, its source becomes the VIP again.
///
/// Inlined into the switch: most frames between tasks are not replies through a VIP, and
/// with no load-balanced flow at all there is nothing to look up, so the cheap checks stay
/// in the caller and only a possible reply pays for a call.
#[inline]
pub fn to_client(
    flows: &ConnTable,
    now_ms: u64,
    net: &NetTable,
    vni: Vni,
    frame: &mut [u8],
    csum: L4Csum,
) {
    if net.backend_ips.is_empty()
        || (flows.is_empty() && !flows.is_resuming())
        || frame.len() < 34
        || frame[12..14] != [0x08, 0x00]
    {
        return;
    }
    reply_to_client(flows, now_ms, net, vni, frame, csum);
}

/// [`to_client`] past its cheap checks: a frame from a backend address.
fn reply_to_client(
    flows: &ConnTable,
    now_ms: u64,
    net: &NetTable,
    vni: Vni,
    frame: &mut [u8],
    csum: L4Csum,
) {
    let src = Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    if !net.backend_ips.contains(&src) {
        return;
    }
    let Some(l4) = nat::parse(frame) else {
        return;
    };
    if l4.proto == PROTO_ICMP {
        return;
    }
    let key = key_of(vni, &l4);
    if l4.proto == PROTO_TCP && flows.is_resuming() && flows.with(&key, |_| ()).is_none() {
        if let Some(r) = flows.resumable(&key) {
            resume_from_reply(flows, now_ms, net, &r);
        }
    }
    let len = frame.len();
    let vip = flows.with(&key, |slot| {
        if slot.dir != Dir::ToClient {
            return None;
        }
        let f = &slot.flow;
        f.touch(now_ms);
        f.count(Dir::ToClient, len);
        if l4.proto == PROTO_TCP {
            let occupies = u32::from(l4.flags & TCP_SYN != 0) + u32::from(l4.flags & TCP_FIN != 0);
            let next = l4
                .seq
                .wrapping_add(l4.payload as u32)
                .wrapping_add(occupies);
            f.track_tcp(Dir::ToClient, l4.flags, next);
        }
        Some((f.key.dst, f.vip_mac))
    });
    if let Some(Some((ip, mac))) = vip {
        nat::rewrite(frame, &l4, Side::Source, ip, mac, csum);
    }
}

/// The reset that tells a client its flow's backend is gone, written into `out`.
pub fn reset_for(flow: &Flow, out: &mut [u8]) -> Option<usize> {
    let vip = TcpEnd {
        mac: flow.vip_mac,
        ip: flow.key.dst,
        port: flow.key.dport,
    };
    let client = TcpEnd {
        mac: flow.client_mac,
        ip: flow.key.src,
        port: flow.key.sport,
    };
    nat::tcp_reset(out, vip, client, flow.client_next())
}
