//! The service load balancer's per-frame decisions, sans-IO, called by the switch. It runs on
//! the client's node: a client's frame to a VIP is given a backend (round-robin over the
//! service's running tasks on every node, for the first packet of a flow; the connection
//! table's choice for the rest) and its destination rewritten; a backend's reply on its way
//! to the client gets the VIP back as its source, so the client only ever sees the VIP.
//! Any port of the VIP maps to the same port of the task, as in Swarm.

use crate::answer;
use crate::conntrack::{ConnTable, Dir, Flow, FlowKey};
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
    let known = flows.with(&key, |slot| {
        let f = &slot.flow;
        f.touch(now_ms);
        if tcp {
            f.track_tcp(Dir::ToBackend, l4.flags, 0);
        }
        (f.backend_ip, f.backend_mac, f.backend_at, f.is_closed())
    });
    let opens = !tcp || l4.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let (ip, mac, at) = match known {
        // A SYN on a closed flow's 5-tuple is a new connection: it is balanced afresh.
        Some((ip, mac, at, closed)) if !(closed && opens && tcp) => (ip, mac, at),
        _ if !opens => return Verdict::Drop(DropReason::LbNoFlow),
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
            if flows.insert(flow).is_err() {
                return Verdict::Drop(DropReason::LbTableFull);
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
pub fn to_client(
    flows: &ConnTable,
    now_ms: u64,
    net: &NetTable,
    vni: Vni,
    frame: &mut [u8],
    csum: L4Csum,
) {
    // Cheap checks first: most frames between tasks are not replies through a VIP, and
    // with no load-balanced flow at all there is nothing to look up.
    if net.backend_ips.is_empty()
        || flows.is_empty()
        || frame.len() < 34
        || frame[12..14] != [0x08, 0x00]
    {
        return;
    }
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
    let vip = flows.with(&key, |slot| {
        if slot.dir != Dir::ToClient {
            return None;
        }
        let f = &slot.flow;
        f.touch(now_ms);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::{ServiceCounters, TCP_IDLE_MS, UDP_IDLE_MS};
    use crate::nat::{parse, PROTO_UDP, TCP_RST};
    use crate::switch::{from_port, from_underlay, Context, MAX_FRAME};
    use crate::table::{BackendSpec, Tables};
    use crate::vocab::PortBinding;
    use etherparse::PacketBuilder;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn mac(s: &str) -> MacAddr {
        MacAddr::from_ipv4(ip(s))
    }

    const VIP: &str = "10.0.0.2";
    const VTEP: &str = "198.18.0.3:4789";

    /// A node's tables and its connection table, as the decision is handed them.
    struct Node {
        tables: Tables,
        flows: ConnTable,
    }

    impl Node {
        fn cx(&self) -> Context<'_> {
            Context {
                tables: &self.tables,
                flows: &self.flows,
                now_ms: 0,
            }
        }
    }

    /// Client on port 1 (.9); backends .3 (port 2, local) and .4 (remote); VIP .2.
    fn tables(max_flows: usize, backends: &[&str]) -> Node {
        let vni = Vni::new(4097).unwrap();
        let mut t = Tables::default();
        for (port, addr) in [(1, "10.0.0.9"), (2, "10.0.0.3")] {
            t.add_port(
                PortId(port),
                PortBinding {
                    vni,
                    mac: mac(addr),
                    ip: ip(addr),
                },
            );
        }
        t.add_remote(
            vni,
            mac("10.0.0.4"),
            Some(ip("10.0.0.4")),
            VTEP.parse().unwrap(),
        );
        let specs: Vec<BackendSpec> = backends
            .iter()
            .map(|b| BackendSpec {
                ip: ip(b),
                mac: mac(b),
                flows: Arc::new(AtomicU64::new(0)),
            })
            .collect();
        t.add_vip(
            vni,
            ip(VIP),
            Arc::new(ServiceCounters::default()),
            &specs,
            (TCP_IDLE_MS, UDP_IDLE_MS),
        );
        Node {
            tables: t,
            flows: ConnTable::new(max_flows),
        }
    }

    fn tcp(src: &str, dst_mac: MacAddr, dst: &str, sport: u16, syn: bool) -> Vec<u8> {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2(mac(src).0, dst_mac.0)
            .ipv4(ip(src).octets(), ip(dst).octets(), 64)
            .tcp(sport, 8000, 100, 65000);
        let b = if syn { b.syn() } else { b.ack(1) };
        b.write(&mut v, b"data").unwrap();
        v
    }

    fn send(t: &Node, port: u32, frame: &mut [u8]) -> Verdict {
        let mut reply = vec![0u8; MAX_FRAME];
        from_port(&t.cx(), PortId(port), frame, L4Csum::Complete, &mut reply)
    }

    #[test]
    fn new_flows_go_round_robin_and_stick() {
        let t = tables(100, &["10.0.0.3", "10.0.0.4"]);
        let mut got = Vec::new();
        for sport in 1000..1004 {
            let mut f = tcp("10.0.0.9", mac(VIP), VIP, sport, true);
            let v = send(&t, 1, &mut f);
            got.push((v, parse(&f).unwrap().dst));
            assert_eq!(
                &f[0..6],
                mac(&parse(&f).unwrap().dst.to_string()).as_bytes()
            );
        }
        let remote = Verdict::Encap {
            vni: Vni::new(4097).unwrap(),
            vtep: VTEP.parse().unwrap(),
        };
        assert_eq!(
            got,
            [
                (Verdict::Forward(PortId(2)), ip("10.0.0.3")),
                (remote, ip("10.0.0.4")),
                (Verdict::Forward(PortId(2)), ip("10.0.0.3")),
                (remote, ip("10.0.0.4")),
            ]
        );
        // The rest of a flow follows its first packet, whatever the counter says now.
        let mut f = tcp("10.0.0.9", mac(VIP), VIP, 1001, false);
        assert_eq!(send(&t, 1, &mut f), remote);
        // A segment of no known flow is dropped and counted.
        let mut f = tcp("10.0.0.9", mac(VIP), VIP, 2000, false);
        assert_eq!(send(&t, 1, &mut f), Verdict::Drop(DropReason::LbNoFlow));
    }

    #[test]
    fn replies_come_back_from_the_vip() {
        let t = tables(100, &["10.0.0.3", "10.0.0.4"]);
        let mut syn = tcp("10.0.0.9", mac(VIP), VIP, 1000, true);
        send(&t, 1, &mut syn);
        let mut syn = tcp("10.0.0.9", mac(VIP), VIP, 1001, true);
        send(&t, 1, &mut syn);
        // Local backend .3 answers the client.
        let mut back = Vec::new();
        PacketBuilder::ethernet2(mac("10.0.0.3").0, mac("10.0.0.9").0)
            .ipv4(ip("10.0.0.3").octets(), ip("10.0.0.9").octets(), 64)
            .tcp(8000, 1000, 5000, 65000)
            .syn()
            .ack(101)
            .write(&mut back, &[])
            .unwrap();
        assert_eq!(send(&t, 2, &mut back), Verdict::Forward(PortId(1)));
        let l = parse(&back).unwrap();
        assert_eq!((l.src, &back[6..12]), (ip(VIP), &mac(VIP).0[..]));
        // The remote backend .4's answer arrives over VXLAN.
        let mut back = Vec::new();
        PacketBuilder::ethernet2(mac("10.0.0.4").0, mac("10.0.0.9").0)
            .ipv4(ip("10.0.0.4").octets(), ip("10.0.0.9").octets(), 64)
            .tcp(8000, 1001, 5000, 65000)
            .ack(101)
            .write(&mut back, b"hello")
            .unwrap();
        let mut reply = vec![0u8; MAX_FRAME];
        let v = from_underlay(
            &t.cx(),
            Vni::new(4097).unwrap(),
            ip("198.18.0.3"),
            &mut back,
            L4Csum::Complete,
            &mut reply,
        );
        assert_eq!(v, Verdict::Forward(PortId(1)));
        assert_eq!(parse(&back).unwrap().src, ip(VIP));
        // Traffic straight between tasks is left alone.
        let mut direct = tcp("10.0.0.3", mac("10.0.0.9"), "10.0.0.9", 8000, false);
        send(&t, 2, &mut direct);
        assert_eq!(parse(&direct).unwrap().src, ip("10.0.0.3"));
    }

    #[test]
    fn a_replica_calling_its_own_vip_gets_another() {
        // Port 2 (.3) is a backend itself.
        let t = tables(100, &["10.0.0.3", "10.0.0.4"]);
        for sport in 1..5 {
            let mut f = tcp("10.0.0.3", mac(VIP), VIP, sport, true);
            assert!(
                matches!(send(&t, 2, &mut f), Verdict::Encap { .. }),
                "{sport}"
            );
        }
        // Alone in the rotation, it has nowhere else to go.
        let t = tables(100, &["10.0.0.3"]);
        let mut f = tcp("10.0.0.3", mac(VIP), VIP, 1, true);
        assert_eq!(send(&t, 2, &mut f), Verdict::Drop(DropReason::Hairpin));
    }

    #[test]
    fn ping_arp_and_refusals() {
        let t = tables(1, &["10.0.0.3"]);
        let mut reply = vec![0u8; MAX_FRAME];
        // ping the VIP: the router answers from it.
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(mac("10.0.0.9").0, mac(VIP).0)
            .ipv4(ip("10.0.0.9").octets(), ip(VIP).octets(), 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        let Verdict::Reply(n) =
            from_port(&t.cx(), PortId(1), &mut echo, L4Csum::Complete, &mut reply)
        else {
            panic!("no echo reply")
        };
        assert_eq!(&reply[6..12], &mac(VIP).0[..]);
        assert_eq!(&reply[26..30], &ip(VIP).octets()[..]);
        assert!(n > 34);
        // The VIP is in the ARP table the router answers from.
        let net = &t.tables.networks[&Vni::new(4097).unwrap()];
        assert_eq!(net.arp.get(&ip(VIP)), Some(&mac(VIP)));
        // The table holds one flow: the second is refused, the first goes on.
        let mut a = tcp("10.0.0.9", mac(VIP), VIP, 1, true);
        assert_eq!(send(&t, 1, &mut a), Verdict::Forward(PortId(2)));
        let mut b = tcp("10.0.0.9", mac(VIP), VIP, 2, true);
        assert_eq!(send(&t, 1, &mut b), Verdict::Drop(DropReason::LbTableFull));
        let mut a = tcp("10.0.0.9", mac(VIP), VIP, 1, false);
        assert_eq!(send(&t, 1, &mut a), Verdict::Forward(PortId(2)));
        // No backend: TCP is refused with a reset at once, UDP dropped and counted.
        let t = tables(10, &[]);
        let mut syn = tcp("10.0.0.9", mac(VIP), VIP, 1, true);
        let Verdict::Reply(n) =
            from_port(&t.cx(), PortId(1), &mut syn, L4Csum::Complete, &mut reply)
        else {
            panic!("no reset")
        };
        let rst = parse(&reply[..n]).unwrap();
        assert_eq!(rst.flags & TCP_RST, TCP_RST);
        let mut u = Vec::new();
        PacketBuilder::ethernet2(mac("10.0.0.9").0, mac(VIP).0)
            .ipv4(ip("10.0.0.9").octets(), ip(VIP).octets(), 64)
            .udp(5000, 53)
            .write(&mut u, b"q")
            .unwrap();
        assert_eq!(parse(&u).unwrap().proto, PROTO_UDP);
        assert_eq!(send(&t, 1, &mut u), Verdict::Drop(DropReason::LbNoBackend));
    }
}
