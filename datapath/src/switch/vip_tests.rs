//! The load balancer's decisions through the switch, over real frames: a client's frames to
//! a VIP, a backend's replies, and the refusals, as [`super::from_port`] and
//! [`super::from_underlay`] give them.

use super::*;
use crate::conntrack::{FlowKey, ServiceCounters, TCP_IDLE_MS, UDP_IDLE_MS};
use crate::nat::{parse, PROTO_UDP, TCP_RST};
use crate::table::BackendSpec;
use crate::vocab::PortBinding;
use etherparse::PacketBuilder;
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
    Node {
        tables: vip_tables(backends, &[]),
        flows: ConnTable::new(max_flows),
    }
}

fn specs(backends: &[&str]) -> Vec<BackendSpec> {
    backends
        .iter()
        .map(|b| BackendSpec {
            ip: ip(b),
            mac: mac(b),
            flows: Default::default(),
        })
        .collect()
}

/// The tables of [`tables`], with `draining` tasks beside the rotation.
fn vip_tables(backends: &[&str], draining: &[&str]) -> Tables {
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
    t.add_vip(
        vni,
        ip(VIP),
        Arc::new(ServiceCounters::default()),
        &specs(backends),
        (TCP_IDLE_MS, UDP_IDLE_MS),
    );
    t.add_draining(vni, ip(VIP), &specs(draining));
    t
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
    let Verdict::Reply(n) = from_port(&t.cx(), PortId(1), &mut echo, L4Csum::Complete, &mut reply)
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
    let Verdict::Reply(n) = from_port(&t.cx(), PortId(1), &mut syn, L4Csum::Complete, &mut reply)
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

#[test]
fn a_draining_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut t = tables(100, &["10.0.0.3", "10.0.0.4"]);
    let mut syn = tcp("10.0.0.9", mac(VIP), VIP, 1000, true);
    assert_eq!(send(&t, 1, &mut syn), Verdict::Forward(PortId(2)));
    // .3 is stopping: it leaves the rotation but stays a draining backend.
    t.tables = vip_tables(&["10.0.0.4"], &["10.0.0.3"]);
    let key = FlowKey {
        vni: 4097,
        proto: crate::nat::PROTO_TCP,
        src: ip("10.0.0.9"),
        sport: 1000,
        dst: ip(VIP),
        dport: 8000,
    };
    let held = |tables: &Tables| t.flows.with(&key, |s| tables.holds_flow(&s.flow));
    assert_eq!(held(&t.tables), Some(true), "the sweeper keeps the flow");
    // Its flow still reaches it, and its replies still come back from the VIP.
    let mut data = tcp("10.0.0.9", mac(VIP), VIP, 1000, false);
    assert_eq!(send(&t, 1, &mut data), Verdict::Forward(PortId(2)));
    assert_eq!(parse(&data).unwrap().dst, ip("10.0.0.3"));
    let mut back = Vec::new();
    PacketBuilder::ethernet2(mac("10.0.0.3").0, mac("10.0.0.9").0)
        .ipv4(ip("10.0.0.3").octets(), ip("10.0.0.9").octets(), 64)
        .tcp(8000, 1000, 5000, 65000)
        .ack(105)
        .write(&mut back, b"answer")
        .unwrap();
    assert_eq!(send(&t, 2, &mut back), Verdict::Forward(PortId(1)));
    assert_eq!(parse(&back).unwrap().src, ip(VIP));
    // New connections go to the rotation only.
    for sport in 2000..2004 {
        let mut syn = tcp("10.0.0.9", mac(VIP), VIP, sport, true);
        assert!(
            matches!(send(&t, 1, &mut syn), Verdict::Encap { .. }),
            "{sport}"
        );
    }
    // Once the task is gone, its flow is not held any more (the sweeper resets it).
    assert_eq!(held(&vip_tables(&["10.0.0.4"], &[])), Some(false));
    // A draining task whose MAC the table cannot place is left out.
    let t2 = vip_tables(&["10.0.0.4"], &["10.0.0.77"]);
    let net = &t2.networks[&Vni::new(4097).unwrap()];
    assert!(net.vips[&ip(VIP)].draining.is_empty());
    assert!(!net.backend_ips.contains(&ip("10.0.0.77")));
}

/// A backend's frame to the client `.9` on `sport`: a SYN-ACK or an ACK with data.
fn from_backend(backend: &str, sport: u16, syn_ack: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2(mac(backend).0, mac("10.0.0.9").0)
        .ipv4(ip(backend).octets(), ip("10.0.0.9").octets(), 64)
        .tcp(8000, sport, 5000, 65000);
    let b = if syn_ack {
        b.syn().ack(101)
    } else {
        b.ack(101)
    };
    b.write(&mut v, if syn_ack { b"" } else { b"hello" })
        .unwrap();
    v
}

#[test]
fn a_restarted_router_resumes_established_flows_either_way() {
    // The previous run: two established flows to .3, one still in its handshake.
    let before = tables(100, &["10.0.0.3"]);
    for sport in [1000, 1001, 1002] {
        send(&before, 1, &mut tcp("10.0.0.9", mac(VIP), VIP, sport, true));
    }
    for sport in [1000, 1001] {
        let v = send(&before, 2, &mut from_backend("10.0.0.3", sport, true));
        assert_eq!(v, Verdict::Forward(PortId(1)));
    }
    let mut saved = before.flows.established();
    saved.sort_by_key(|r| r.key.sport);
    assert_eq!(
        saved
            .iter()
            .map(|r| (r.key.sport, r.backend_ip))
            .collect::<Vec<_>>(),
        [(1000, ip("10.0.0.3")), (1001, ip("10.0.0.3"))]
    );

    // The next run, whose round robin would pick .4 first.
    let after = tables(100, &["10.0.0.4", "10.0.0.3"]);
    after.flows.offer_resumable(saved);
    assert!(after.flows.is_resuming());
    // The client speaks first: its flow goes on to .3.
    let mut ack = tcp("10.0.0.9", mac(VIP), VIP, 1000, false);
    assert_eq!(send(&after, 1, &mut ack), Verdict::Forward(PortId(2)));
    assert_eq!(parse(&ack).unwrap().dst, ip("10.0.0.3"));
    // The backend speaks first: its reply comes from the VIP, and the client's next
    // segment follows it.
    let mut back = from_backend("10.0.0.3", 1001, false);
    assert_eq!(send(&after, 2, &mut back), Verdict::Forward(PortId(1)));
    assert_eq!(parse(&back).unwrap().src, ip(VIP));
    let mut ack = tcp("10.0.0.9", mac(VIP), VIP, 1001, false);
    assert_eq!(send(&after, 1, &mut ack), Verdict::Forward(PortId(2)));
    assert_eq!(after.flows.len(), 2);
    // A flow that was not established is not resumed.
    let mut ack = tcp("10.0.0.9", mac(VIP), VIP, 1002, false);
    assert_eq!(
        send(&after, 1, &mut ack),
        Verdict::Drop(DropReason::LbNoFlow)
    );
    after.flows.end_resuming();
    assert!(!after.flows.is_resuming());
}

#[test]
fn a_resumable_flow_waits_for_its_backend_to_be_back() {
    let before = tables(100, &["10.0.0.3"]);
    send(&before, 1, &mut tcp("10.0.0.9", mac(VIP), VIP, 1000, true));
    send(&before, 2, &mut from_backend("10.0.0.3", 1000, true));
    let saved = before.flows.established();
    // The restarted node's tables do not hold .3 yet: dropped, and kept for later.
    let early = tables(100, &["10.0.0.4"]);
    early.flows.offer_resumable(saved.clone());
    let mut ack = tcp("10.0.0.9", mac(VIP), VIP, 1000, false);
    assert_eq!(
        send(&early, 1, &mut ack),
        Verdict::Drop(DropReason::LbNoFlow)
    );
    assert_eq!(early.flows.resumable(&saved[0].key), Some(saved[0]));
}
