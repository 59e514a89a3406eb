//! The flow an Ethernet frame belongs to, as a 32-bit hash.
//!
//! RFC 7348 section 5 asks a VTEP to derive the outer UDP source port from a hash of the inner
//! frame, so that the underlay's ECMP and the receiver's socket steering spread flows across
//! paths and cores while every packet of one flow takes the same one (no reordering). The
//! datapath uses this hash to pick the socket a frame leaves from, which is what gives it its
//! source port.
//!
//! What counts as "the flow": for IPv4 and IPv6, the addresses and the protocol, plus the
//! ports for TCP, UDP, UDP-Lite and SCTP. The hash is symmetric: both directions of a
//! connection hash alike (as the kernel's `__skb_get_hash_symmetric`, which a multi-queue TAP
//! steers by), so a connection's data and its acknowledgements take the same worker on
//! every node. Fragments of IPv4 datagrams hash without ports,
//! first fragment included, so a fragmented datagram's pieces stay together. Anything else
//! (ARP, an IPv6 extension header chain, another EtherType) hashes by its MAC addresses and
//! EtherType. A frame too short for the header it announces falls back the same way. The
//! function never fails and reads nothing past the frame.

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;

/// Whether protocol number `p` carries 16-bit source and destination ports first.
fn has_ports(p: u8) -> bool {
    matches!(p, 6 | 17 | 132 | 136)
}

/// A 64-bit mixer (the finaliser of SplitMix64): every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

/// The hash of the flow `frame` (an Ethernet frame) belongs to.
pub fn hash(frame: &[u8]) -> u32 {
    let h = ip_flow(frame).unwrap_or_else(|| l2_flow(frame));
    (h ^ (h >> 32)) as u32
}

fn l2_flow(frame: &[u8]) -> u64 {
    let mut acc = 0u64;
    for (i, b) in frame.iter().take(ETH_HLEN).enumerate() {
        acc = acc.rotate_left(8) ^ u64::from(*b) ^ (i as u64) << 56;
        if i % 7 == 6 {
            acc = mix(acc);
        }
    }
    mix(acc)
}

/// The two endpoints of a flow, lower first.
fn ordered<T: Ord>(x: T, y: T) -> (T, T) {
    if x <= y {
        (x, y)
    } else {
        (y, x)
    }
}

fn ip_flow(frame: &[u8]) -> Option<u64> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(ETH_HLEN..)?;
    match ethertype {
        ETHERTYPE_IPV4 => {
            if ip.len() < 20 || ip[0] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let proto = ip[9];
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            let (src, dst) = (word(ip, 12), word(ip, 16));
            let (sport, dport) = match ip.get(ihl..ihl + 4) {
                Some(p) if ihl >= 20 && has_ports(proto) && !fragment => (
                    u64::from(u16::from_be_bytes([p[0], p[1]])),
                    u64::from(u16::from_be_bytes([p[2], p[3]])),
                ),
                _ => (0, 0),
            };
            // Ordered by endpoint, so that both directions see the same pair.
            let (a, b) = ordered((src, sport), (dst, dport));
            let addrs = a.0 << 32 | b.0;
            let ports = a.1 << 16 | b.1;
            Some(mix(mix(addrs) ^ (ports << 8 | u64::from(proto))))
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < 40 || ip[0] >> 4 != 6 {
                return None;
            }
            let proto = ip[6];
            let (sport, dport) = match ip.get(40..44) {
                Some(p) if has_ports(proto) => (
                    u16::from_be_bytes([p[0], p[1]]),
                    u16::from_be_bytes([p[2], p[3]]),
                ),
                _ => (0, 0),
            };
            let (a, b) = ordered((&ip[8..24], sport), (&ip[24..40], dport));
            let mut acc = u64::from(proto);
            for half in [&a.0[..8], &a.0[8..], &b.0[..8], &b.0[8..]] {
                acc = mix(acc ^ (word(half, 0) << 32 | word(half, 4)));
            }
            Some(mix(acc ^ (u64::from(a.1) << 16 | u64::from(b.1))))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .udp(sport, dport);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn tcp6(sport: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv6([1; 16], [2; 16], 64)
            .tcp(sport, 80, 1, 1000);
        let mut v = Vec::new();
        b.write(&mut v, b"x").unwrap();
        v
    }

    #[test]
    fn one_flow_one_hash_whatever_the_payload() {
        let a = udp4([10, 0, 0, 2], [10, 0, 0, 3], 5000, 53, b"one");
        let b = udp4([10, 0, 0, 2], [10, 0, 0, 3], 5000, 53, &[7u8; 900]);
        assert_eq!(hash(&a), hash(&b));
        assert_eq!(hash(&tcp6(1000)), hash(&tcp6(1000)));
    }

    #[test]
    fn both_directions_hash_alike() {
        let out = udp4([10, 0, 0, 2], [10, 0, 0, 3], 40000, 5201, b"");
        let back = udp4([10, 0, 0, 3], [10, 0, 0, 2], 5201, 40000, b"");
        assert_eq!(hash(&out), hash(&back));
        // Same addresses, ports swapped on one side only: another flow.
        let other = udp4([10, 0, 0, 2], [10, 0, 0, 3], 5201, 40000, b"");
        assert_ne!(hash(&out), hash(&other));
    }

    #[test]
    fn flows_differ_by_ports_addresses_and_family() {
        let base = hash(&udp4([10, 0, 0, 2], [10, 0, 0, 3], 5000, 53, b""));
        assert_ne!(
            base,
            hash(&udp4([10, 0, 0, 2], [10, 0, 0, 3], 5001, 53, b""))
        );
        assert_ne!(
            base,
            hash(&udp4([10, 0, 0, 2], [10, 0, 0, 4], 5000, 53, b""))
        );
        assert_ne!(hash(&tcp6(1000)), hash(&tcp6(1001)));
    }

    /// The pieces of a fragmented datagram hash alike, the first (with ports) included.
    #[test]
    fn fragments_hash_without_ports() {
        let mut first = udp4([10, 0, 0, 2], [10, 0, 0, 3], 5000, 53, &[0u8; 64]);
        first[14 + 6] = 0x20; // more fragments
        let mut later = first.clone();
        later[14 + 6] = 0x00;
        later[14 + 7] = 0x08; // offset 64
        later[14 + 20..14 + 24].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(hash(&first), hash(&later));
    }

    /// Sixteen flows that differ only in the client port spread over 2 and 4 buckets.
    #[test]
    fn spreads_client_ports() {
        for buckets in [2u32, 4] {
            let mut seen = vec![0; buckets as usize];
            for p in 40000..40016 {
                let f = udp4([10, 0, 0, 2], [10, 0, 0, 3], p, 5201, b"");
                seen[(hash(&f) % buckets) as usize] += 1;
            }
            assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
        }
    }

    proptest! {
        /// Any bytes at all: no panic (and a frame cut short still hashes).
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = hash(&bytes);
            let mut v4 = bytes.clone();
            if v4.len() > 14 { v4[12] = 0x08; v4[13] = 0; v4[14] = 0x4f; }
            let _ = hash(&v4);
            let mut v6 = bytes;
            if v6.len() > 14 { v6[12] = 0x86; v6[13] = 0xdd; v6[14] = 0x60; }
            let _ = hash(&v6);
        }
    }
}
