//! Address translation for the service load balancer, in place: a client's frame to a VIP
//! gets the backend's address (destination NAT), a backend's reply gets the VIP's back
//! (source NAT), and both keep valid checksums by incremental update (RFC 1624) instead of a
//! full recomputation, so a 64 KiB TCP super-frame costs the same as a 64-byte frame. A frame
//! whose TCP/UDP checksum is still partial (the task's kernel left it to "hardware", virtio-net
//! `NEEDS_CSUM`) holds only the pseudo-header sum in its checksum field; that sum is updated
//! the same way, uncomplemented. Also builds the TCP reset sent to a client whose backend went
//! away. Pure functions over Ethernet/IPv4 frames.

use etherparse::PacketBuilder;
use protocol::types::MacAddr;
use std::net::Ipv4Addr;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ETH: usize = 14;
const IP_CSUM: usize = ETH + 10;
const IP_SRC: usize = ETH + 12;
const IP_DST: usize = ETH + 16;

/// What the load balancer reads from an IPv4 frame's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4 {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Ports (TCP, UDP); 0 for other protocols.
    pub sport: u16,
    pub dport: u16,
    /// Offset of the transport header in the frame.
    pub l4: usize,
    /// TCP flags, sequence and acknowledgement numbers (0 for UDP).
    pub flags: u8,
    pub seq: u32,
    /// Transport payload bytes (what a TCP segment advances the sequence by, besides SYN/FIN).
    pub payload: usize,
}

/// Which end of a frame a translation rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Whether a frame's TCP/UDP checksum field is final or a partial (pseudo-header) sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Csum {
    Complete,
    Partial,
}

/// Reads the IPv4 and TCP/UDP headers of an Ethernet frame. None for anything else, and for
/// non-first fragments (they carry no ports).
pub fn parse(frame: &[u8]) -> Option<L4> {
    if frame.len() < ETH + 20 || frame[12..14] != [0x08, 0x00] || frame[ETH] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]));
    let frag_offset = u16::from_be_bytes([frame[ETH + 6], frame[ETH + 7]]) & 0x1fff;
    if ihl < 20 || total < ihl || ETH + total > frame.len() || frag_offset != 0 {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let l4 = ETH + ihl;
    let end = ETH + total;
    let mut out = L4 {
        proto: frame[ETH + 9],
        src: ip(IP_SRC),
        dst: ip(IP_DST),
        sport: 0,
        dport: 0,
        l4,
        flags: 0,
        seq: 0,
        payload: 0,
    };
    match out.proto {
        PROTO_TCP => {
            if end < l4 + 20 {
                return None;
            }
            let thl = usize::from(frame[l4 + 12] >> 4) * 4;
            if thl < 20 || end < l4 + thl {
                return None;
            }
            out.sport = be16(l4);
            out.dport = be16(l4 + 2);
            out.seq =
                u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
            out.flags = frame[l4 + 13];
            out.payload = end - l4 - thl;
        }
        PROTO_UDP => {
            if end < l4 + 8 {
                return None;
            }
            out.sport = be16(l4);
            out.dport = be16(l4 + 2);
            out.payload = end - l4 - 8;
        }
        PROTO_ICMP => {}
        _ => return None,
    }
    Some(out)
}

/// Adds `new - old` to an uncomplemented ones'-complement sum (RFC 1624, eqn. 3 without the
/// outer complements).
fn adjust(sum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let mut acc = u32::from(sum);
    for i in [0, 2] {
        acc += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        acc += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn field(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn set_field(frame: &mut [u8], at: usize, v: u16) {
    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrites one end of a frame parsed as `l4`: the IPv4 address to `ip` and the MAC of that
/// end to `mac`, patching the IPv4 header checksum and the TCP/UDP checksum (whose
/// pseudo-header covers the address). `frame` must be the one `l4` was parsed from.
pub fn rewrite(frame: &mut [u8], l4: &L4, side: Side, ip: Ipv4Addr, mac: MacAddr, csum: L4Csum) {
    let (mac_at, ip_at, old) = match side {
        Side::Destination => (0, IP_DST, l4.dst),
        Side::Source => (6, IP_SRC, l4.src),
    };
    let (old, new) = (old.octets(), ip.octets());
    frame[mac_at..mac_at + 6].copy_from_slice(mac.as_bytes());
    frame[ip_at..ip_at + 4].copy_from_slice(&new);
    set_field(frame, IP_CSUM, !adjust(!field(frame, IP_CSUM), old, new));
    let at = match l4.proto {
        PROTO_TCP => l4.l4 + 16,
        PROTO_UDP => l4.l4 + 6,
        _ => return,
    };
    let check = field(frame, at);
    let updated = match csum {
        L4Csum::Partial => adjust(check, old, new),
        // A UDP datagram sent without a checksum stays without one.
        L4Csum::Complete if l4.proto == PROTO_UDP && check == 0 => return,
        L4Csum::Complete => match !adjust(!check, old, new) {
            // UDP sends a computed zero as all ones (RFC 768).
            0 if l4.proto == PROTO_UDP => 0xffff,
            c => c,
        },
    };
    set_field(frame, at, updated);
}

/// One end of a TCP connection, as the reset names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEnd {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Writes into `out` a TCP reset from `from` to `to` with sequence number `seq` (the next
/// sequence number `to` expects, so that it accepts the reset); returns its length.
pub fn tcp_reset(out: &mut [u8], from: TcpEnd, to: TcpEnd, seq: u32) -> Option<usize> {
    let builder = PacketBuilder::ethernet2(from.mac.0, to.mac.0)
        .ipv4(from.ip.octets(), to.ip.octets(), 64)
        .tcp(from.port, to.port, seq, 0)
        .rst();
    let len = builder.size(0);
    builder.write_to_slice(out, &[]).ok()?;
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn tcp(src: &str, dst: &str, payload: &[u8], flags: u8) -> Vec<u8> {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 3], [2, 0x42, 10, 0, 0, 2])
            .ipv4(ip(src).octets(), ip(dst).octets(), 64)
            .tcp(40000, 8000, 7, 65000);
        let b = if flags & TCP_SYN != 0 {
            b.syn()
        } else {
            b.ack(99)
        };
        b.write(&mut v, payload).unwrap();
        v
    }

    fn udp(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 3], [2, 0x42, 10, 0, 0, 2])
            .ipv4(ip(src).octets(), ip(dst).octets(), 64)
            .udp(5353, 53)
            .write(&mut v, payload)
            .unwrap();
        v
    }

    /// Checksums as an independent implementation (etherparse) computes them.
    fn checksums_valid(frame: &[u8]) -> bool {
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(NetSlice::Ipv4(ipv4)) = &p.net else {
            return false;
        };
        let h = ipv4.header().to_header();
        if h.calc_header_checksum() != h.header_checksum {
            return false;
        }
        match &p.transport {
            Some(TransportSlice::Tcp(t)) => {
                t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap() == t.checksum()
            }
            Some(TransportSlice::Udp(u)) => {
                u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap() == u.checksum()
            }
            _ => false,
        }
    }

    #[test]
    fn parses_tcp_and_udp() {
        let f = tcp("10.0.0.3", "10.0.0.2", b"hello", TCP_SYN);
        let l = parse(&f).unwrap();
        assert_eq!((l.proto, l.sport, l.dport), (PROTO_TCP, 40000, 8000));
        assert_eq!((l.src, l.dst), (ip("10.0.0.3"), ip("10.0.0.2")));
        assert_eq!((l.flags & TCP_SYN, l.seq, l.payload), (TCP_SYN, 7, 5));
        let u = parse(&udp("10.0.0.3", "10.0.0.2", b"q")).unwrap();
        assert_eq!(
            (u.proto, u.sport, u.dport, u.payload),
            (PROTO_UDP, 5353, 53, 1)
        );
        // Truncated, not IPv4, or a later fragment: nothing to translate.
        assert!(parse(&f[..40]).is_none());
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(parse(&arp).is_none());
        let mut frag = f.clone();
        frag[ETH + 7] = 1;
        assert!(parse(&frag).is_none());
    }

    #[test]
    fn destination_and_source_nat_keep_checksums_valid() {
        let mut f = tcp("10.0.0.3", "10.0.0.2", b"GET / HTTP/1.1\r\n\r\n", 0);
        let l = parse(&f).unwrap();
        let backend = MacAddr::from_ipv4(ip("10.0.0.9"));
        rewrite(
            &mut f,
            &l,
            Side::Destination,
            ip("10.0.0.9"),
            backend,
            L4Csum::Complete,
        );
        assert!(checksums_valid(&f));
        assert_eq!(&f[0..6], backend.as_bytes());
        assert_eq!(parse(&f).unwrap().dst, ip("10.0.0.9"));
        let l = parse(&f).unwrap();
        rewrite(
            &mut f,
            &l,
            Side::Source,
            ip("10.0.0.77"),
            MacAddr::from_ipv4(ip("10.0.0.77")),
            L4Csum::Complete,
        );
        assert!(checksums_valid(&f));
        let mut u = udp("10.0.0.3", "10.0.0.2", b"x");
        let l = parse(&u).unwrap();
        rewrite(
            &mut u,
            &l,
            Side::Destination,
            ip("10.0.0.9"),
            backend,
            L4Csum::Complete,
        );
        assert!(checksums_valid(&u));
        // No checksum stays no checksum.
        let mut z = udp("10.0.0.3", "10.0.0.2", b"x");
        z[ETH + 20 + 6..ETH + 20 + 8].fill(0);
        let l = parse(&z).unwrap();
        rewrite(
            &mut z,
            &l,
            Side::Destination,
            ip("10.0.0.9"),
            backend,
            L4Csum::Complete,
        );
        assert_eq!(&z[ETH + 26..ETH + 28], &[0, 0]);
    }

    #[test]
    fn partial_checksum_is_completed_correctly_after_nat() {
        // What a TAP hands over with NEEDS_CSUM: the field holds the pseudo-header sum.
        let mut f = tcp("10.0.0.3", "10.0.0.2", &[7u8; 3000], 0);
        let l = parse(&f).unwrap();
        let pseudo = etherparse::checksum::Sum16BitWords::new()
            .add_4bytes(l.src.octets())
            .add_4bytes(l.dst.octets())
            .add_2bytes([0, PROTO_TCP])
            .add_2bytes(((f.len() - l.l4) as u16).to_be_bytes())
            .ones_complement()
            .to_be();
        set_field(&mut f, l.l4 + 16, !pseudo);
        rewrite(
            &mut f,
            &l,
            Side::Destination,
            ip("10.0.0.9"),
            MacAddr::from_ipv4(ip("10.0.0.9")),
            L4Csum::Partial,
        );
        let h = crate::vnet::VnetHdr {
            flags: crate::vnet::F_NEEDS_CSUM,
            csum_start: l.l4 as u16,
            csum_offset: 16,
            ..Default::default()
        };
        crate::vnet::complete_checksum(&mut f, &h).unwrap();
        assert!(checksums_valid(&f));
    }

    #[test]
    fn reset_is_a_valid_rst() {
        let mut out = [0u8; 128];
        let vip = TcpEnd {
            mac: MacAddr::from_ipv4(ip("10.0.0.2")),
            ip: ip("10.0.0.2"),
            port: 8000,
        };
        let client = TcpEnd {
            mac: MacAddr::from_ipv4(ip("10.0.0.3")),
            ip: ip("10.0.0.3"),
            port: 40000,
        };
        let n = tcp_reset(&mut out, vip, client, 12345).unwrap();
        let l = parse(&out[..n]).unwrap();
        assert_eq!(l.flags & TCP_RST, TCP_RST);
        assert_eq!((l.seq, l.sport, l.dport), (12345, 8000, 40000));
        assert!(checksums_valid(&out[..n]));
    }

    proptest! {
        #[test]
        fn any_translation_keeps_checksums(
            a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), c in any::<[u8; 4]>(),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            is_tcp in any::<bool>(), dst in any::<bool>(),
        ) {
            let (a, b, c) = (Ipv4Addr::from(a), Ipv4Addr::from(b), Ipv4Addr::from(c));
            let mut f = if is_tcp {
                tcp(&a.to_string(), &b.to_string(), &payload, 0)
            } else {
                udp(&a.to_string(), &b.to_string(), &payload)
            };
            let l = parse(&f).unwrap();
            let side = if dst { Side::Destination } else { Side::Source };
            rewrite(&mut f, &l, side, c, MacAddr::from_ipv4(c), L4Csum::Complete);
            prop_assert!(checksums_valid(&f));
        }
    }
}
