//! Switch decisions over real frames: frames built with etherparse (an independent encoder)
//! and one ARP request as captured from a Linux task's `ping`.

use super::*;
use crate::vocab::PortBinding;
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Type, NetSlice, PacketBuilder,
    SlicedPacket, TransportSlice,
};
use proptest::prelude::*;
use std::net::Ipv4Addr;

fn vni(v: u32) -> Vni {
    Vni::new(v).unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Net 4097 (10.0.2.0/24): ports 1 (.2) and 2 (.3), and .4 on a remote node.
/// Net 4098 (10.0.3.0/24): port 3 (.2).
fn tables() -> Tables {
    let mut t = Tables::default();
    for (port, v, addr) in [
        (1, 4097, "10.0.2.2"),
        (2, 4097, "10.0.2.3"),
        (3, 4098, "10.0.3.2"),
    ] {
        t.add_port(
            PortId(port),
            PortBinding {
                vni: vni(v),
                mac: MacAddr::from_ipv4(ip(addr)),
                ip: ip(addr),
            },
        );
    }
    t.set_gateway(vni(4097), ip("10.0.2.1"));
    t.set_gateway(vni(4098), ip("10.0.3.1"));
    t.add_remote(
        vni(4097),
        MacAddr::from_ipv4(ip("10.0.2.4")),
        Some(ip("10.0.2.4")),
        "198.18.0.3:4789".parse().unwrap(),
    );
    t
}

/// Runs `f` with the decision's context over [`tables`], an empty connection table and
/// the clock at zero.
fn with_tables<R>(f: impl FnOnce(&Context<'_>) -> R) -> R {
    let (tables, flows) = (tables(), ConnTable::new(16));
    f(&Context {
        tables: &tables,
        flows: &flows,
        now_ms: 0,
    })
}

fn mac(s: &str) -> [u8; 6] {
    MacAddr::from_ipv4(ip(s)).0
}

fn udp(src: &str, dst_mac: [u8; 6], dst: &str) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(mac(src), dst_mac)
        .ipv4(ip(src).octets(), ip(dst).octets(), 64)
        .udp(1000, 2000)
        .write(&mut v, b"hello")
        .unwrap();
    v
}

fn arp(src: &str, op: ArpOperation, target: &str) -> Vec<u8> {
    let pkt = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        op,
        &mac(src),
        &ip(src).octets(),
        &[0; 6],
        &ip(target).octets(),
    )
    .unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(mac(src), [0xff; 6])
        .arp(pkt)
        .write(&mut v)
        .unwrap();
    v
}

fn decide(port: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let mut reply = vec![0u8; MAX_FRAME];
    let mut frame = frame.to_vec();
    let v = with_tables(|cx| from_port(cx, PortId(port), &mut frame, L4Csum::Complete, &mut reply));
    if let Verdict::Reply(n) = v {
        reply.truncate(n);
    }
    (v, reply)
}

#[test]
fn unicast_is_switched_to_the_owning_port() {
    let f = udp("10.0.2.2", mac("10.0.2.3"), "10.0.2.3");
    assert_eq!(decide(1, &f).0, Verdict::Forward(PortId(2)));
}

#[test]
fn unicast_to_a_remote_mac_is_encapsulated() {
    let f = udp("10.0.2.2", mac("10.0.2.4"), "10.0.2.4");
    assert_eq!(
        decide(1, &f).0,
        Verdict::Encap {
            vni: vni(4097),
            vtep: "198.18.0.3:4789".parse().unwrap()
        }
    );
}

#[test]
fn networks_are_isolated() {
    // Port 3 (net 4098) addressing the MAC of a task on net 4097.
    let f = udp("10.0.3.2", mac("10.0.2.2"), "10.0.2.2");
    assert_eq!(
        decide(3, &f).0,
        Verdict::Drop(DropReason::UnknownDestination)
    );
    // Nor does the router answer ARP for another network's addresses.
    let a = arp("10.0.3.2", ArpOperation::REQUEST, "10.0.2.2");
    assert_eq!(decide(3, &a).0, Verdict::Drop(DropReason::ArpUnknownTarget));
}

#[test]
fn bad_frames_are_dropped_with_reasons() {
    let f = udp("10.0.2.2", mac("10.0.2.3"), "10.0.2.3");
    assert_eq!(decide(1, &f[..13]).0, Verdict::Drop(DropReason::Runt));
    assert_eq!(decide(1, &[]).0, Verdict::Drop(DropReason::Runt));
    // From a TAP a TCP super-frame may be up to 64 KiB; from the underlay, one wire frame.
    assert_eq!(
        decide(1, &vec![0u8; 70_000]).0,
        Verdict::Drop(DropReason::Oversize)
    );
    assert_eq!(
        remote(&vec![0u8; 1519], "198.18.0.3", 4097).0,
        Verdict::Drop(DropReason::Oversize)
    );
    assert_eq!(decide(9, &f).0, Verdict::Drop(DropReason::UnknownPort));
    // Port 2 sending with port 1's MAC.
    assert_eq!(decide(2, &f).0, Verdict::Drop(DropReason::SpoofedSource));
    let to_self = udp("10.0.2.2", mac("10.0.2.2"), "10.0.2.2");
    assert_eq!(decide(1, &to_self).0, Verdict::Drop(DropReason::Hairpin));
    let to_nobody = udp("10.0.2.2", mac("10.0.2.99"), "10.0.2.99");
    assert_eq!(
        decide(1, &to_nobody).0,
        Verdict::Drop(DropReason::UnknownDestination)
    );
}

#[test]
fn broadcast_other_than_arp_floods_its_network() {
    let f = udp("10.0.2.2", [0xff; 6], "10.0.2.255");
    assert_eq!(decide(1, &f).0, Verdict::Flood(vni(4097)));
    let mut v6mc = udp("10.0.2.2", [0x33, 0x33, 0, 0, 0, 1], "10.0.2.255");
    v6mc[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(decide(1, &v6mc).0, Verdict::Flood(vni(4097)));
}

/// An ARP request as a Linux task sends it (`ping 10.0.2.3` from 10.0.2.2), captured with
/// `tcpdump -XX` on the TAP: no Ethernet padding, 42 bytes.
const CAPTURED_ARP_REQUEST: [u8; 42] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x42, 0x0a, 0x00, 0x02, 0x02, 0x08, 0x06, // eth
    0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // htype, ptype, sizes, op=request
    0x02, 0x42, 0x0a, 0x00, 0x02, 0x02, 0x0a, 0x00, 0x02, 0x02, // sender MAC, IP
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x02, 0x03, // target MAC, IP
];

fn parse_arp_reply(reply: &[u8]) -> ArpPacket {
    let p = SlicedPacket::from_ethernet(reply).unwrap();
    match p.net {
        Some(NetSlice::Arp(a)) => a.to_packet(),
        other => panic!("not ARP: {other:?}"),
    }
}

#[test]
fn arp_for_a_local_task_is_answered_by_the_router() {
    let (v, reply) = decide(1, &CAPTURED_ARP_REQUEST);
    assert!(matches!(v, Verdict::Reply(42)), "{v:?}");
    assert_eq!(&reply[..6], &mac("10.0.2.2"));
    assert_eq!(&reply[6..12], &mac("10.0.2.3"));
    let a = parse_arp_reply(&reply);
    assert_eq!(a.operation, ArpOperation::REPLY);
    assert_eq!(a.sender_hw_addr(), &mac("10.0.2.3"));
    assert_eq!(a.sender_protocol_addr(), &[10, 0, 2, 3]);
    assert_eq!(a.target_hw_addr(), &mac("10.0.2.2"));
    assert_eq!(a.target_protocol_addr(), &[10, 0, 2, 2]);
}

#[test]
fn arp_for_gateway_and_remote_tasks_is_answered() {
    for (target, owner) in [("10.0.2.1", "10.0.2.1"), ("10.0.2.4", "10.0.2.4")] {
        let (v, reply) = decide(1, &arp("10.0.2.2", ArpOperation::REQUEST, target));
        assert!(matches!(v, Verdict::Reply(_)), "{target}: {v:?}");
        assert_eq!(parse_arp_reply(&reply).sender_hw_addr(), &mac(owner));
    }
}

#[test]
fn arp_that_is_not_a_plain_request_is_dropped() {
    let (v, _) = decide(1, &arp("10.0.2.2", ArpOperation::REPLY, "10.0.2.3"));
    assert_eq!(v, Verdict::Drop(DropReason::ArpNotRequest));
    let (v, _) = decide(1, &arp("10.0.2.2", ArpOperation::REQUEST, "10.0.2.2"));
    assert_eq!(v, Verdict::Drop(DropReason::ArpUnknownTarget));
    let (v, _) = decide(1, &CAPTURED_ARP_REQUEST[..30]);
    assert_eq!(v, Verdict::Drop(DropReason::ArpMalformed));
    let mut wrong_sizes = CAPTURED_ARP_REQUEST;
    wrong_sizes[18] = 8;
    assert_eq!(
        decide(1, &wrong_sizes).0,
        Verdict::Drop(DropReason::ArpMalformed)
    );
}

fn echo_request(to: &str) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(mac("10.0.2.2"), mac("10.0.2.1"))
        .ipv4(ip("10.0.2.2").octets(), ip(to).octets(), 64)
        .icmpv4_echo_request(0x1234, 7)
        .write(&mut v, b"abcdefgh0123456789")
        .unwrap();
    v
}

#[test]
fn gateway_answers_ping_with_valid_checksums() {
    let (v, reply) = decide(1, &echo_request("10.0.2.1"));
    assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(NetSlice::Ipv4(ipv4)) = &p.net else {
        panic!()
    };
    let h = ipv4.header();
    assert_eq!(h.source_addr(), ip("10.0.2.1"));
    assert_eq!(h.destination_addr(), ip("10.0.2.2"));
    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!()
    };
    let Icmpv4Type::EchoReply(e) = icmp.icmp_type() else {
        panic!()
    };
    assert_eq!((e.id, e.seq), (0x1234, 7));
    assert_eq!(icmp.payload(), b"abcdefgh0123456789");
    let expect = icmp.header().icmp_type.calc_checksum(icmp.payload());
    assert_eq!(icmp.checksum(), expect);
    assert_eq!(&reply[..6], &mac("10.0.2.2"));
}

#[test]
fn gateway_routes_nothing_else_yet() {
    let (v, _) = decide(1, &echo_request("8.8.8.8"));
    assert_eq!(v, Verdict::Drop(DropReason::NoRoute));
    let f = udp("10.0.2.2", mac("10.0.2.1"), "10.0.2.1");
    assert_eq!(decide(1, &f).0, Verdict::Drop(DropReason::NoRoute));
    let mut garbage = echo_request("10.0.2.1");
    garbage[14] = 0x4f; // IHL larger than the frame
    garbage.truncate(40);
    assert_eq!(
        decide(1, &garbage).0,
        Verdict::Drop(DropReason::MalformedIp)
    );
}

#[test]
fn dns_at_a_gateway_with_dns_is_punted_to_the_router() {
    let query = |dport: u16| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(mac("10.0.2.2"), mac("10.0.2.1"))
            .ipv4(ip("10.0.2.2").octets(), ip("10.0.2.1").octets(), 64)
            .udp(40000, dport)
            .write(&mut v, &[0u8; 12])
            .unwrap();
        v
    };
    // Without DNS at the gateway a query is one more thing the gateway does not route.
    assert_eq!(decide(1, &query(53)).0, Verdict::Drop(DropReason::NoRoute));
    let mut t = tables();
    t.networks.get_mut(&vni(4097)).unwrap().dns = Some(std::sync::Arc::from(["front".into()]));
    let flows = ConnTable::new(16);
    let cx = Context {
        tables: &t,
        flows: &flows,
        now_ms: 0,
    };
    let mut reply = vec![0u8; MAX_FRAME];
    let mut run = |mut f: Vec<u8>| from_port(&cx, PortId(1), &mut f, L4Csum::Complete, &mut reply);
    assert_eq!(
        run(query(53)),
        Verdict::Punt(Punt::GatewayDns { vni: vni(4097) })
    );
    // Anything else to the gateway is answered (or not) as before.
    assert_eq!(run(query(54)), Verdict::Drop(DropReason::NoRoute));
    assert!(matches!(run(echo_request("10.0.2.1")), Verdict::Reply(_)));
}

fn remote(frame: &[u8], from: &str, v: u32) -> (Verdict, Vec<u8>) {
    let mut reply = vec![0u8; MAX_FRAME];
    let mut frame = frame.to_vec();
    let verdict = with_tables(|cx| {
        from_underlay(
            cx,
            vni(v),
            ip(from),
            &mut frame,
            L4Csum::Complete,
            &mut reply,
        )
    });
    if let Verdict::ReplyRemote { len, .. } = verdict {
        reply.truncate(len);
    }
    (verdict, reply)
}

#[test]
fn underlay_frames_are_delivered_to_local_ports() {
    let f = udp("10.0.2.4", mac("10.0.2.2"), "10.0.2.2");
    assert_eq!(
        remote(&f, "198.18.0.3", 4097).0,
        Verdict::Forward(PortId(1))
    );
    let b = udp("10.0.2.4", [0xff; 6], "10.0.2.255");
    assert_eq!(remote(&b, "198.18.0.3", 4097).0, Verdict::Flood(vni(4097)));
}

#[test]
fn underlay_frames_from_the_wrong_place_are_dropped() {
    let f = udp("10.0.2.4", mac("10.0.2.2"), "10.0.2.2");
    // Right MAC, wrong sender address.
    assert_eq!(
        remote(&f, "198.18.0.66", 4097).0,
        Verdict::Drop(DropReason::VxlanSourceMismatch)
    );
    // A source MAC that lives on this node.
    let local_src = udp("10.0.2.3", mac("10.0.2.2"), "10.0.2.2");
    assert_eq!(
        remote(&local_src, "198.18.0.3", 4097).0,
        Verdict::Drop(DropReason::VxlanSourceMismatch)
    );
    // A VNI this node has no network for.
    assert_eq!(
        remote(&f, "198.18.0.3", 5555).0,
        Verdict::Drop(DropReason::VxlanUnknownVni)
    );
    // The right network but another network's task: unknown there.
    let cross = udp("10.0.2.4", mac("10.0.3.2"), "10.0.3.2");
    assert_eq!(
        remote(&cross, "198.18.0.3", 4097).0,
        Verdict::Drop(DropReason::UnknownDestination)
    );
    // Never bounced back to the underlay.
    let bounce = udp("10.0.2.4", mac("10.0.2.4"), "10.0.2.4");
    assert_eq!(
        remote(&bounce, "198.18.0.3", 4097).0,
        Verdict::Drop(DropReason::Hairpin)
    );
    assert_eq!(
        remote(&f[..10], "198.18.0.3", 4097).0,
        Verdict::Drop(DropReason::Runt)
    );
}

#[test]
fn arp_from_a_remote_vtep_is_answered_back_to_it() {
    let (v, reply) = remote(
        &arp("10.0.2.4", ArpOperation::REQUEST, "10.0.2.2"),
        "198.18.0.3",
        4097,
    );
    assert_eq!(
        v,
        Verdict::ReplyRemote {
            vni: vni(4097),
            vtep: "198.18.0.3:4789".parse().unwrap(),
            len: 42
        }
    );
    assert_eq!(parse_arp_reply(&reply).sender_hw_addr(), &mac("10.0.2.2"));
}

proptest! {
    #[test]
    fn any_bytes_from_the_underlay_never_panic(
        v in 4096u32..4100,
        mut frame in proptest::collection::vec(any::<u8>(), 0..1600),
    ) {
        let mut reply = vec![0u8; MAX_FRAME];
        let _ = with_tables(|cx| from_underlay(cx, vni(v), ip("198.18.0.3"), &mut frame, L4Csum::Complete, &mut reply));
    }

    #[test]
    fn any_bytes_from_any_port_never_panic(
        port in 0u32..5,
        mut frame in proptest::collection::vec(any::<u8>(), 0..1600),
    ) {
        let mut reply = vec![0u8; MAX_FRAME];
        let _ = with_tables(|cx| from_port(cx, PortId(port), &mut frame, L4Csum::Complete, &mut reply));
    }

    #[test]
    fn any_arp_payload_from_a_valid_source_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut frame = CAPTURED_ARP_REQUEST[..14].to_vec();
        frame.extend_from_slice(&body);
        let mut reply = vec![0u8; MAX_FRAME];
        let _ = with_tables(|cx| from_port(cx, PortId(1), &mut frame, L4Csum::Complete, &mut reply));
    }
}
