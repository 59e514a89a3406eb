//! Userspace GRO towards a TAP: consecutive segments of one flow that arrive from the
//! underlay for the same local port are merged into one super-frame and written with a GSO
//! virtio-net header, so the task's kernel takes one frame instead of dozens. This mirrors
//! what Linux's own GRO does for a NIC.
//!
//! TCP: a segment is merged only if it is plain bulk data: IPv4 without options or
//! fragments (or IPv6 without extension headers), TCP with only ACK (PSH allowed on the
//! last), the same addresses, ports, ack, window and options as the run, the next sequence
//! number, and a payload of the run's segment size (a shorter one ends the run).
//!
//! UDP, for a port whose TAP takes UDP segmentation offload: datagrams of one flow
//! (addresses, ports, TOS or traffic class and flow label) with the run's payload size (a
//! shorter one ends the run), at most [`UDP_MAX_SEGMENTS`] of them. The task's kernel
//! hands a socket without `UDP_GRO` the original datagrams again, each with its own
//! checksum; one with `UDP_GRO` gets the merged datagram and its segment size, as from a
//! NIC's GRO.
//!
//! Each segment's IPv4 and TCP/UDP checksums are verified before it joins: the merged frame
//! gets fresh checksums, which must never cover corrupted data. The TCP/UDP sum is skipped
//! for frames already covered end to end: from another overlayd node (whose UDP checksum
//! the kernel verified: our sockets always set it, unlike a kernel VTEP's default of none)
//! or opened from ESP (its tag covers every byte).
//! Anything else is written as it came.

use crate::csum::Sum;
use crate::vnet::{
    fold, ip_pseudo_header, needs_csum, partial_field, VnetHdr, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
    HDR_LEN, UDP_MAX_SEGMENTS,
};
use crate::vocab::PortId;
use std::ops::Range;

const ETH: usize = 14;
/// Where the L4 header starts behind an IPv4 header without options, or an IPv6 header.
const L4_V4: usize = ETH + 20;
const L4_V6: usize = ETH + 40;
const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_FLAG_ACK: u8 = 0x10;
const TCP_FLAG_PSH: u8 = 0x08;
/// Largest merged IPv4 packet.
const MAX_IP_LEN: usize = 65_535;
/// Most segments in one run (the kernel's GRO stops at 64 too): a run's `writev` then has at
/// most 66 pieces.
pub const MAX_SEGMENTS: usize = 64;

/// What `push` did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The frame is now part of the run (or started it).
    Taken,
    /// The frame cannot join the run: flush the run, then push again or write it as is.
    Refused,
}

/// The run being built. Payloads are not copied: the run records where each segment's
/// payload lies in the caller's receive buffers (`at`, given with each frame), and the caller
/// writes the run with one `writev` of the merged headers and those ranges. Only the first
/// segment's headers are copied, to be patched.
pub struct Coalescer {
    head: Vec<u8>,
    /// Each segment's payload: (buffer, byte range in it), in order.
    parts: Vec<(usize, Range<usize>)>,
    /// Bytes in `parts`.
    payload: usize,
    port: Option<PortId>,
    proto: u8,
    /// Where the run's L4 header starts: [`L4_V4`] or [`L4_V6`].
    l4: usize,
    /// The run's frames came from another overlayd node: covered end to end; over IPv4
    /// their TCP/UDP checksum fields hold only the pseudo-header sum (IPv6 ones are whole).
    covered: bool,
    mss: usize,
    next_seq: u32,
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            head: Vec::with_capacity(ETH + 60 + 60),
            parts: Vec::with_capacity(MAX_SEGMENTS),
            payload: 0,
            port: None,
            proto: 0,
            l4: L4_V4,
            covered: false,
            mss: 0,
            next_seq: 0,
            closed: false,
        }
    }
}

/// A finished run, for the caller to write: `hdr`, then `head`, then the `parts` from its
/// buffers. A single segment comes with its headers untouched, and a plain header (or,
/// covered, one that leaves its partial checksum to the kernel).
pub struct Run<'a> {
    pub port: PortId,
    pub hdr: [u8; HDR_LEN],
    pub head: &'a [u8],
    pub parts: &'a [(usize, Range<usize>)],
}

/// The parts of a plain TCP or UDP segment (over IPv4, or IPv6 without extension headers)
/// GRO looks at, if `frame` is one with valid checksums (its TCP/UDP checksum only checked
/// when `verify_l4`).
struct Segment {
    proto: u8,
    /// Where the L4 header starts.
    l4: usize,
    /// TCP or UDP header length.
    l4_hdr: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

fn be16(frame: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]))
}

fn parse(frame: &[u8], verify_l4: bool) -> Option<Segment> {
    match frame.get(12..15)? {
        [0x08, 0x00, 0x45] if frame.len() >= L4_V4 + 8 => {
            let frag = be16(frame, ETH + 6);
            if be16(frame, ETH + 2) + ETH != frame.len() || frag & 0x3fff != 0 {
                return None;
            }
            if fold(Sum::new().add_slice(&frame[ETH..L4_V4])) != 0 {
                return None;
            }
            parse_l4::<L4_V4>(frame, frame[ETH + 9], verify_l4)
        }
        [0x86, 0xdd, v] if v >> 4 == 6 && frame.len() >= L4_V6 + 8 => {
            if be16(frame, ETH + 4) + L4_V6 != frame.len() {
                return None;
            }
            parse_l4::<L4_V6>(frame, frame[ETH + 6], verify_l4)
        }
        _ => None,
    }
}

/// The TCP or UDP part of a frame whose L4 header starts at `L4` ([`L4_V4`] or [`L4_V6`]: a
/// constant, so that every offset below is one).
fn parse_l4<const L4: usize>(frame: &[u8], proto: u8, verify_l4: bool) -> Option<Segment> {
    let l4 = L4;
    let l4_len = frame.len() - l4;
    let l4_hdr = match proto {
        TCP if frame.len() >= l4 + 20 => ((frame[l4 + 12] >> 4) as usize) * 4,
        UDP if be16(frame, l4 + 4) == l4_len => 8,
        _ => return None,
    };
    if l4_hdr < 8 || (proto == TCP && l4_hdr < 20) || l4 + l4_hdr > frame.len() {
        return None;
    }
    // A UDP/IPv4 datagram without a checksum (zero) has nothing to verify.
    let unsummed = proto == UDP && l4 == L4_V4 && frame[l4 + 6..l4 + 8] == [0, 0];
    if verify_l4 && !unsummed {
        let pseudo = ip_pseudo_header(frame, l4 == L4_V6, proto, l4_len);
        if fold(pseudo.add_slice(&frame[l4..])) != 0 {
            return None;
        }
    }
    let word = |at: usize| [frame[at], frame[at + 1], frame[at + 2], frame[at + 3]];
    Some(Segment {
        proto,
        l4,
        l4_hdr,
        seq: if proto == TCP {
            u32::from_be_bytes(word(l4 + 4))
        } else {
            0
        },
        flags: if proto == TCP { frame[l4 + 13] } else { 0 },
        payload: l4_len - l4_hdr,
    })
}

impl Coalescer {
    pub fn is_empty(&self) -> bool {
        self.port.is_none()
    }

    /// Offers a frame bound for local port `port`, found in the caller's buffer `at.0` from
    /// byte `at.1` on (the run keeps only that place: the buffer must stay unchanged until
    /// the run is taken). `covered`: the frame comes from another overlayd node, so its
    /// bytes were already checked end to end (a UDP checksum an overlayd node always sets
    /// and the kernel verified, or an ESP tag) and, over IPv4, its TCP/UDP checksum field
    /// holds only the pseudo-header sum (overlayd nodes send partial checksums to each
    /// other): it is neither summed here nor written as whole. `udp_gso`: the port takes UDP
    /// super-frames; without it only TCP is merged.
    pub fn push(
        &mut self,
        port: PortId,
        frame: &[u8],
        at: (usize, usize),
        covered: bool,
        udp_gso: bool,
    ) -> Push {
        let Some(s) = parse(frame, !covered) else {
            return Push::Refused;
        };
        let mergeable = match s.proto {
            TCP => s.flags & !TCP_FLAG_PSH == TCP_FLAG_ACK,
            _ => udp_gso,
        };
        if !mergeable || s.payload == 0 {
            return Push::Refused;
        }
        if s.l4 == L4_V6 {
            self.join::<L4_V6>(port, frame, at, covered, &s)
        } else {
            self.join::<L4_V4>(port, frame, at, covered, &s)
        }
    }

    /// The rest of [`Self::push`], for a segment whose L4 header starts at `L4`.
    fn join<const L4: usize>(
        &mut self,
        port: PortId,
        frame: &[u8],
        at: (usize, usize),
        covered: bool,
        s: &Segment,
    ) -> Push {
        let (l4, h) = (L4, L4 + s.l4_hdr);
        let payload = (at.0, at.1 + h..at.1 + frame.len());
        if self.port.is_none() {
            self.head.clear();
            self.head.extend_from_slice(&frame[..h]);
            self.parts.clear();
            self.parts.push(payload);
            self.payload = s.payload;
            self.port = Some(port);
            self.proto = s.proto;
            self.l4 = l4;
            self.covered = covered;
            self.mss = s.payload;
            self.next_seq = s.seq.wrapping_add(s.payload as u32);
            self.closed = s.flags & TCP_FLAG_PSH != 0;
            return Push::Taken;
        }
        let head = &self.head;
        let same_run = self.port == Some(port)
            && !self.closed
            && s.proto == self.proto
            && l4 == self.l4
            && covered == self.covered
            && h == head.len()
            && self.parts.len() < MAX_SEGMENTS
            // ports; then addresses and TOS (IPv4), or addresses, traffic class, flow label
            // and hop limit (IPv6), each range of a known length.
            && frame[l4..l4 + 4] == head[l4..l4 + 4]
            && if L4 == L4_V6 {
                frame[ETH + 8..ETH + 40] == head[ETH + 8..ETH + 40]
                    && frame[ETH..ETH + 4] == head[ETH..ETH + 4]
                    && frame[ETH + 7] == head[ETH + 7]
            } else {
                frame[ETH + 12..ETH + 20] == head[ETH + 12..ETH + 20]
                    && frame[ETH + 1] == head[ETH + 1]
            }
            && s.payload <= self.mss
            && h - ETH + self.payload + s.payload <= MAX_IP_LEN;
        let same_flow = same_run
            && match s.proto {
                // ack number, header length/flags byte and window; options; the next byte.
                TCP => {
                    frame[l4 + 8..l4 + 12] == head[l4 + 8..l4 + 12]
                        && frame[l4 + 14..l4 + 16] == head[l4 + 14..l4 + 16]
                        && frame[l4 + 20..h] == head[l4 + 20..h]
                        && s.seq == self.next_seq
                }
                _ => self.parts.len() < UDP_MAX_SEGMENTS,
            };
        if !same_flow {
            return Push::Refused;
        }
        self.parts.push(payload);
        self.payload += s.payload;
        self.next_seq = self.next_seq.wrapping_add(s.payload as u32);
        // PSH (carried over), or a short segment, ends the run.
        if s.proto == TCP {
            self.head[l4 + 13] |= s.flags & TCP_FLAG_PSH;
        }
        self.closed = s.payload < self.mss || s.flags & TCP_FLAG_PSH != 0;
        Push::Taken
    }

    /// Finishes the run. A merged run comes back with fixed IP lengths (and IPv4 checksum,
    /// and UDP length), and its TCP/UDP checksum left partial for the kernel, as GSO frames
    /// are.
    pub fn take(&mut self) -> Option<Run<'_>> {
        let port = self.port.take()?;
        let segments = self.parts.len();
        let mut hdr = [0u8; HDR_LEN];
        let (l4, v6) = (self.l4, self.l4 == L4_V6);
        let partial = needs_csum(l4, self.proto);
        // Another node's IPv4 frames come with partial checksums, its IPv6 ones whole.
        if segments == 1 && self.covered && !v6 {
            partial.emit(&mut hdr);
        }
        if segments > 1 {
            let head = &mut self.head;
            let total = head.len() + self.payload;
            let l4_len = (total - l4) as u16;
            if v6 {
                head[ETH + 4..ETH + 6].copy_from_slice(&l4_len.to_be_bytes());
            } else {
                head[ETH + 2..ETH + 4].copy_from_slice(&((total - ETH) as u16).to_be_bytes());
                head[ETH + 10..ETH + 12].fill(0);
                let ip_sum = fold(Sum::new().add_slice(&head[ETH..l4]));
                head[ETH + 10..ETH + 12].copy_from_slice(&ip_sum.to_be_bytes());
            }
            let gso_type = match self.proto {
                TCP if v6 => GSO_TCPV6,
                TCP => GSO_TCPV4,
                _ => {
                    head[l4 + 4..l4 + 6].copy_from_slice(&l4_len.to_be_bytes());
                    GSO_UDP_L4
                }
            };
            let pseudo = ip_pseudo_header(head, v6, self.proto, l4_len.into());
            let at = l4 + usize::from(partial.csum_offset);
            head[at..at + 2].copy_from_slice(&partial_field(pseudo).to_be_bytes());
            VnetHdr {
                gso_type,
                hdr_len: head.len() as u16,
                gso_size: self.mss as u16,
                ..partial
            }
            .emit(&mut hdr);
        }
        // The run is over (no port); its head and parts are cleared when the next starts.
        Some(Run {
            port,
            hdr,
            head: &self.head,
            parts: &self.parts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vnet::{complete_checksum, segment_tcp, Segments, F_NEEDS_CSUM};
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    /// A test's receive buffers: every offered frame is kept in a buffer of its own.
    #[derive(Default)]
    struct Bufs(Vec<Vec<u8>>);

    impl Bufs {
        fn push(
            &mut self,
            g: &mut Coalescer,
            port: PortId,
            f: &[u8],
            cov: bool,
            udp: bool,
        ) -> Push {
            self.0.push(f.to_vec());
            g.push(port, f, (self.0.len() - 1, 0), cov, udp)
        }

        /// The run as it is written: its header, and the frame laid end to end.
        fn take(&self, g: &mut Coalescer) -> Option<(PortId, [u8; HDR_LEN], Vec<u8>, usize)> {
            let run = g.take()?;
            let mut f = run.head.to_vec();
            for (b, r) in run.parts {
                f.extend_from_slice(&self.0[*b][r.clone()]);
            }
            Some((run.port, run.hdr, f, run.parts.len()))
        }
    }

    fn seg(seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 2], [2, 0x42, 10, 0, 0, 3])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
            .tcp(40000, 5201, seq, 65000)
            .ack(99);
        let b = if psh { b.psh() } else { b };
        b.write(&mut v, payload).unwrap();
        v
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Merges, then does what the receiving kernel does with a GSO frame: completes the
    /// checksum and cuts it again. The result must be the original segments.
    #[test]
    fn a_run_merges_and_resegments_to_the_originals() {
        let d = data(1400 * 4 + 300);
        let segs: Vec<Vec<u8>> = d
            .chunks(1400)
            .enumerate()
            .map(|(i, c)| seg(1000 + (i * 1400) as u32, c, i == 4))
            .collect();
        let (mut g, mut b) = (Coalescer::default(), Bufs::default());
        for s in &segs {
            assert_eq!(b.push(&mut g, PortId(7), s, false, true), Push::Taken);
        }
        let (port, hdr, merged, n) = b.take(&mut g).unwrap();
        assert_eq!(n, 5);
        assert_eq!(port, PortId(7));
        let h = VnetHdr::from_slice(&hdr).unwrap();
        assert_eq!((h.gso_type, h.gso_size, h.hdr_len), (GSO_TCPV4, 1400, 54));
        assert_eq!(merged.len(), 54 + d.len());
        let p = SlicedPacket::from_ethernet(&merged).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!()
        };
        let ih = ip.header().to_header();
        assert_eq!(ih.header_checksum, ih.calc_header_checksum());
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            panic!()
        };
        assert_eq!(t.payload(), &d[..]);
        assert!(t.psh());
        let mut whole = merged.to_vec();
        complete_checksum(&mut whole, &h).unwrap();
        let mut again = Vec::new();
        segment_tcp(&whole, &h, &mut vec![0u8; 1600], |s| again.push(s.to_vec())).unwrap();
        assert_eq!(again.len(), 5);
        for (a, b) in again.iter().zip(&segs) {
            // Identical but for the IPv4 id, which resegmenting numbers afresh.
            assert_eq!(a[34..], b[34..]);
        }
    }

    fn seg6(seq: u32, payload: &[u8], psh: bool, flow_label: u32) -> Vec<u8> {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 2], [2, 0x42, 10, 0, 0, 3])
            .ip(etherparse::IpHeaders::Ipv6(
                etherparse::Ipv6Header {
                    flow_label: flow_label.try_into().unwrap(),
                    hop_limit: 64,
                    source: [0xfd; 16],
                    destination: [0xfe; 16],
                    ..Default::default()
                },
                Default::default(),
            ))
            .tcp(40000, 5201, seq, 65000)
            .ack(99);
        let b = if psh { b.psh() } else { b };
        b.write(&mut v, payload).unwrap();
        v
    }

    /// IPv6 as IPv4: merged, checksummed and cut again by the receiving kernel, the
    /// segments come back as they were; a segment of another flow label does not join.
    #[test]
    fn an_ipv6_run_merges_and_resegments_to_the_originals() {
        let d = data(1380 * 3 + 100);
        let segs: Vec<Vec<u8>> = d
            .chunks(1380)
            .enumerate()
            .map(|(i, c)| seg6(1000 + (i * 1380) as u32, c, i == 3, 7))
            .collect();
        let (mut g, mut b) = (Coalescer::default(), Bufs::default());
        for s in &segs[..2] {
            assert_eq!(b.push(&mut g, PortId(7), s, false, true), Push::Taken);
        }
        let other = seg6(1000 + 2 * 1380, &d[2 * 1380..3 * 1380], false, 8);
        assert_eq!(
            b.push(&mut g, PortId(7), &other, false, true),
            Push::Refused
        );
        for s in &segs[2..] {
            assert_eq!(b.push(&mut g, PortId(7), s, false, true), Push::Taken);
        }
        let (_, hdr, merged, n) = b.take(&mut g).unwrap();
        assert_eq!(n, 4);
        let h = VnetHdr::from_slice(&hdr).unwrap();
        let head = 14 + 40 + 20;
        assert_eq!(
            (h.gso_type, h.gso_size, h.hdr_len),
            (GSO_TCPV6, 1380, head as u16)
        );
        assert_eq!(
            (h.flags, h.csum_start, h.csum_offset),
            (F_NEEDS_CSUM, 54, 16)
        );
        assert_eq!(merged.len(), head + d.len());
        let mut whole = merged.to_vec();
        complete_checksum(&mut whole, &h).unwrap();
        let p = SlicedPacket::from_ethernet(&whole).unwrap();
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            panic!()
        };
        assert_eq!(usize::from(ip.header().payload_length()), 20 + d.len());
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            panic!()
        };
        assert_eq!(t.payload(), &d[..]);
        let mut again = Vec::new();
        segment_tcp(&whole, &h, &mut vec![0u8; 1600], |s| again.push(s.to_vec())).unwrap();
        assert_eq!(again, segs);
        // A corrupted segment is refused (verified, not covered), and so is a lone one
        // with a wrong payload length.
        let mut bad = segs[0].clone();
        bad[100] ^= 1;
        assert_eq!(b.push(&mut g, PortId(7), &bad, false, true), Push::Refused);
        let mut short = segs[0].clone();
        short[19] ^= 1;
        assert_eq!(b.push(&mut g, PortId(7), &short, true, true), Push::Refused);
    }

    #[test]
    fn only_in_order_plain_segments_of_one_flow_join() {
        let d = data(1400);
        let (mut g, mut b) = (Coalescer::default(), Bufs::default());
        assert_eq!(
            b.push(&mut g, PortId(1), &seg(0, &d, false), false, false),
            Push::Taken
        );
        assert_eq!(
            b.push(&mut g, PortId(2), &seg(1400, &d, false), false, false),
            Push::Refused,
            "other port"
        );
        assert_eq!(
            b.push(&mut g, PortId(1), &seg(9999, &d, false), false, false),
            Push::Refused,
            "gap"
        );
        assert_eq!(
            b.push(
                &mut g,
                PortId(1),
                &seg(1400, &data(1500), false),
                false,
                false
            ),
            Push::Refused,
            "bigger"
        );
        let mut corrupt = seg(1400, &d, false);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert_eq!(
            b.push(&mut g, PortId(1), &corrupt, false, false),
            Push::Refused,
            "bad checksum"
        );
        let mut other_flow = Vec::new();
        PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 2], [2, 0x42, 10, 0, 0, 3])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
            .tcp(40001, 5201, 1400, 65000)
            .ack(99)
            .write(&mut other_flow, &d)
            .unwrap();
        assert_eq!(
            b.push(&mut g, PortId(1), &other_flow, false, false),
            Push::Refused,
            "other flow"
        );
        let mut syn = Vec::new();
        PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 2], [2, 0x42, 10, 0, 0, 3])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
            .tcp(40000, 5201, 1400, 65000)
            .syn()
            .write(&mut syn, &d)
            .unwrap();
        assert_eq!(
            b.push(&mut g, PortId(1), &syn, false, false),
            Push::Refused,
            "not plain"
        );
        assert_eq!(
            b.push(
                &mut g,
                PortId(1),
                &seg(1400, &data(100), false),
                false,
                false
            ),
            Push::Taken,
            "short last"
        );
        assert_eq!(
            b.push(
                &mut g,
                PortId(1),
                &seg(1500, &data(100), false),
                false,
                false
            ),
            Push::Refused,
            "closed"
        );
        // A lone segment comes back untouched with a plain header.
        let mut lone = Coalescer::default();
        let one = seg(5, &d, false);
        b.push(&mut lone, PortId(3), &one, false, false);
        let (_, hdr, frame, _) = b.take(&mut lone).unwrap();
        assert_eq!(hdr, [0u8; HDR_LEN]);
        assert_eq!(frame, &one[..]);
        assert!(b.take(&mut lone).is_none());
    }

    fn dgram(sport: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [3; 6])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
            .udp(sport, 4433)
            .write(&mut v, payload)
            .unwrap();
        v
    }

    /// Merges datagrams, then cuts the run as the receiving kernel does for a socket
    /// without UDP_GRO: the original datagrams come back.
    #[test]
    fn udp_datagrams_merge_for_a_port_with_uso_and_cut_to_the_originals() {
        let d = data(1200 * 5 + 300);
        let dgrams: Vec<Vec<u8>> = d.chunks(1200).map(|c| dgram(40000, c)).collect();
        let (mut g, mut b) = (Coalescer::default(), Bufs::default());
        for x in &dgrams {
            assert_eq!(b.push(&mut g, PortId(4), x, false, true), Push::Taken);
        }
        assert_eq!(
            b.push(&mut g, PortId(4), &dgrams[0], false, true),
            Push::Refused,
            "closed"
        );
        let (port, hdr, merged, n) = b.take(&mut g).unwrap();
        assert_eq!((port, n), (PortId(4), 6));
        let h = VnetHdr::from_slice(&hdr).unwrap();
        assert_eq!(
            (
                h.flags,
                h.gso_type,
                h.gso_size,
                h.hdr_len,
                h.csum_start,
                h.csum_offset
            ),
            (F_NEEDS_CSUM, GSO_UDP_L4, 1200, 42, 34, 6)
        );
        assert_eq!(merged.len(), 42 + d.len());
        assert_eq!(
            merged[38..40],
            ((8 + d.len()) as u16).to_be_bytes(),
            "UDP length"
        );
        let segs = Segments::new(&merged, &h, 1600).unwrap();
        assert_eq!(segs.count(), 6);
        for (i, orig) in dgrams.iter().enumerate() {
            let mut out = vec![0u8; segs.len(i)];
            segs.write(i, &mut out);
            // Identical but for the IPv4 id and header checksum, numbered afresh.
            assert_eq!(out[34..], orig[34..], "datagram {i}");
            assert_eq!(out[14..18], orig[14..18]);
        }
    }

    #[test]
    fn udp_runs_keep_to_one_flow_size_and_limit() {
        let d = data(1000);
        let (mut g, mut b) = (Coalescer::default(), Bufs::default());
        assert_eq!(
            b.push(&mut g, PortId(1), &dgram(1, &d), false, false),
            Push::Refused,
            "no USO"
        );
        assert_eq!(
            b.push(&mut g, PortId(1), &dgram(1, &d), false, true),
            Push::Taken
        );
        assert_eq!(
            b.push(&mut g, PortId(2), &dgram(1, &d), false, true),
            Push::Refused,
            "port"
        );
        assert_eq!(
            b.push(&mut g, PortId(1), &dgram(2, &d), false, true),
            Push::Refused,
            "flow"
        );
        let bigger = dgram(1, &data(1001));
        assert_eq!(
            b.push(&mut g, PortId(1), &bigger, false, true),
            Push::Refused,
            "bigger"
        );
        let mut corrupt = dgram(1, &d);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert_eq!(
            b.push(&mut g, PortId(1), &corrupt, false, true),
            Push::Refused,
            "checksum"
        );
        // From another overlayd node (covered) nothing is summed; such frames never join a
        // run of others, and a lone one is written with its checksum left partial.
        assert_eq!(
            b.push(&mut g, PortId(1), &corrupt, true, true),
            Push::Refused,
            "covered after uncovered"
        );
        for _ in 1..UDP_MAX_SEGMENTS {
            assert_eq!(
                b.push(&mut g, PortId(1), &dgram(1, &d), false, true),
                Push::Taken
            );
        }
        assert_eq!(
            b.push(&mut g, PortId(1), &dgram(1, &d), false, true),
            Push::Refused,
            "limit"
        );
        assert_eq!(b.take(&mut g).unwrap().3, UDP_MAX_SEGMENTS);
        assert_eq!(
            b.push(&mut g, PortId(1), &corrupt, true, true),
            Push::Taken,
            "covered"
        );
        let (_, hdr, _, n) = b.take(&mut g).unwrap();
        let h = VnetHdr::from_slice(&hdr).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            (h.flags, h.gso_type, h.csum_start, h.csum_offset),
            (F_NEEDS_CSUM, 0, 34, 6)
        );
        // No checksum (zero) is nothing to verify; an empty datagram never merges.
        let mut unsummed = dgram(1, &d);
        unsummed[40..42].fill(0);
        assert_eq!(
            b.push(&mut g, PortId(1), &unsummed, false, true),
            Push::Taken
        );
        b.take(&mut g);
        assert_eq!(
            b.push(&mut g, PortId(1), &dgram(1, b""), false, true),
            Push::Refused
        );
        assert_eq!(
            b.push(&mut g, PortId(1), &[0u8; 10], false, true),
            Push::Refused
        );
        assert!(g.is_empty());
    }
}
