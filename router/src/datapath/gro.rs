//! Userspace GRO towards a TAP: consecutive in-order segments of one TCP/IPv4 flow that
//! arrive from the underlay for the same local port are merged into one super-frame and
//! written with a GSO virtio-net header, so the task's kernel takes one frame instead of
//! dozens. This mirrors what Linux's own GRO does for a NIC.
//!
//! A segment is merged only if it is plain bulk data: IPv4 without options or fragments,
//! TCP with only ACK (PSH allowed on the last), the same addresses, ports, ack, window and
//! options as the run, the next sequence number, and a payload of the run's segment size
//! (a shorter one ends the run). Each segment's IPv4 and TCP checksums are verified before
//! it joins: the merged frame gets fresh checksums, which must never cover corrupted data.
//! The TCP sum is skipped for frames already covered end to end: from another overlayd
//! node (whose UDP checksum the kernel verified: our sockets always set it, unlike a kernel
//! VTEP's default of none) or opened from ESP (its tag covers every byte).
//! Anything else is written as it came.

use super::table::PortId;
use super::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, HDR_LEN};
use etherparse::checksum::Sum16BitWords;

const ETH: usize = 14;
const IP: usize = 20;
const TCP_FLAG_ACK: u8 = 0x10;
const TCP_FLAG_PSH: u8 = 0x08;
/// Largest merged IPv4 packet.
const MAX_IP_LEN: usize = 65_535;

/// What `push` did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The frame is now part of the run (or started it).
    Taken,
    /// The frame cannot join the run: flush the run, then push again or write it as is.
    Refused,
}

/// The run being built.
pub struct Coalescer {
    buf: Vec<u8>,
    port: Option<PortId>,
    /// Header bytes of the run's first segment (Ethernet + IPv4 + TCP).
    headers: usize,
    mss: usize,
    next_seq: u32,
    segments: usize,
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            buf: Vec::with_capacity(ETH + MAX_IP_LEN),
            port: None,
            headers: 0,
            mss: 0,
            next_seq: 0,
            segments: 0,
            closed: false,
        }
    }
}

fn sum_final(s: Sum16BitWords) -> u16 {
    s.ones_complement().to_be()
}

/// The parts of a plain TCP/IPv4 segment GRO looks at, if `frame` is one with valid
/// checksums (its TCP checksum only checked when `verify_tcp`).
struct Segment {
    thl: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

fn parse(frame: &[u8], verify_tcp: bool) -> Option<Segment> {
    if frame.len() < ETH + IP + 20
        || frame[12..14] != [0x08, 0x00]
        || frame[ETH] != 0x45
        || frame[ETH + 9] != 6
    {
        return None;
    }
    let total = u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]) as usize;
    let frag = u16::from_be_bytes([frame[ETH + 6], frame[ETH + 7]]);
    if total + ETH != frame.len() || frag & 0x3fff != 0 {
        return None;
    }
    let tcp = ETH + IP;
    let thl = ((frame[tcp + 12] >> 4) as usize) * 4;
    if thl < 20 || tcp + thl > frame.len() {
        return None;
    }
    if sum_final(Sum16BitWords::new().add_slice(&frame[ETH..tcp])) != 0 {
        return None;
    }
    if verify_tcp {
        let tcp_len = (frame.len() - tcp) as u16;
        let check = Sum16BitWords::new()
            .add_slice(&frame[ETH + 12..ETH + 20])
            .add_2bytes([0, 6])
            .add_2bytes(tcp_len.to_be_bytes())
            .add_slice(&frame[tcp..]);
        if sum_final(check) != 0 {
            return None;
        }
    }
    Some(Segment {
        thl,
        seq: u32::from_be_bytes([
            frame[tcp + 4],
            frame[tcp + 5],
            frame[tcp + 6],
            frame[tcp + 7],
        ]),
        flags: frame[tcp + 13],
        payload: frame.len() - tcp - thl,
    })
}

impl Coalescer {
    pub fn is_empty(&self) -> bool {
        self.segments == 0
    }

    /// Offers a frame bound for local port `port`. `covered`: the frame's bytes were already
    /// checked end to end (a UDP checksum an overlayd node always sets and the kernel
    /// verified, or an ESP tag), so its TCP checksum need not be summed again.
    pub fn push(&mut self, port: PortId, frame: &[u8], covered: bool) -> Push {
        let Some(s) = parse(frame, !covered) else {
            return Push::Refused;
        };
        let plain = s.flags & !TCP_FLAG_PSH == TCP_FLAG_ACK;
        if !plain || s.payload == 0 {
            return Push::Refused;
        }
        let tcp = ETH + IP;
        if self.segments == 0 {
            self.buf.clear();
            self.buf.extend_from_slice(frame);
            self.port = Some(port);
            self.headers = tcp + s.thl;
            self.mss = s.payload;
            self.next_seq = s.seq.wrapping_add(s.payload as u32);
            self.segments = 1;
            self.closed = s.flags & TCP_FLAG_PSH != 0;
            return Push::Taken;
        }
        let h = self.headers;
        let same_flow = self.port == Some(port)
            && !self.closed
            && tcp + s.thl == h
            // addresses; then ports; then ack number, header length/flags byte and window;
            // then options.
            && frame[ETH + 12..ETH + 20] == self.buf[ETH + 12..ETH + 20]
            && frame[tcp..tcp + 4] == self.buf[tcp..tcp + 4]
            && frame[tcp + 8..tcp + 12] == self.buf[tcp + 8..tcp + 12]
            && frame[tcp + 14..tcp + 16] == self.buf[tcp + 14..tcp + 16]
            && frame[tcp + 20..h] == self.buf[tcp + 20..h]
            && frame[ETH + 1] == self.buf[ETH + 1]
            && s.seq == self.next_seq
            && s.payload <= self.mss
            && self.buf.len() - ETH + s.payload <= MAX_IP_LEN;
        if !same_flow {
            return Push::Refused;
        }
        self.buf.extend_from_slice(&frame[h..]);
        self.next_seq = self.next_seq.wrapping_add(s.payload as u32);
        self.segments += 1;
        // PSH (carried over), or a short segment, ends the run.
        self.buf[tcp + 13] |= s.flags & TCP_FLAG_PSH;
        self.closed = s.payload < self.mss || s.flags & TCP_FLAG_PSH != 0;
        Push::Taken
    }

    /// Finishes the run: the port, the virtio-net header to write, the frame and how many
    /// segments it carries. A single
    /// segment comes back unchanged with a plain header; a merged run comes back with fixed
    /// IPv4 length and checksum, and its TCP checksum left partial for the kernel, as GSO
    /// frames are.
    pub fn take(&mut self) -> Option<(PortId, [u8; HDR_LEN], &[u8], usize)> {
        let port = self.port.take()?;
        let segments = std::mem::take(&mut self.segments);
        let mut hdr = [0u8; HDR_LEN];
        if segments <= 1 {
            return Some((port, hdr, &self.buf, segments));
        }
        let tcp = ETH + IP;
        let ip_len = (self.buf.len() - ETH) as u16;
        self.buf[ETH + 2..ETH + 4].copy_from_slice(&ip_len.to_be_bytes());
        self.buf[ETH + 10..ETH + 12].fill(0);
        let ip_sum = sum_final(Sum16BitWords::new().add_slice(&self.buf[ETH..tcp]));
        self.buf[ETH + 10..ETH + 12].copy_from_slice(&ip_sum.to_be_bytes());
        let tcp_len = (self.buf.len() - tcp) as u16;
        let pseudo = Sum16BitWords::new()
            .add_slice(&self.buf[ETH + 12..ETH + 20])
            .add_2bytes([0, 6])
            .add_2bytes(tcp_len.to_be_bytes());
        // Partial checksum: the folded pseudo-header sum, not inverted.
        self.buf[tcp + 16..tcp + 18].copy_from_slice(&(!sum_final(pseudo)).to_be_bytes());
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: self.headers as u16,
            gso_size: self.mss as u16,
            csum_start: tcp as u16,
            csum_offset: 16,
        }
        .emit(&mut hdr);
        Some((port, hdr, &self.buf, segments))
    }
}

#[cfg(test)]
mod tests {
    use super::super::vnet::{complete_checksum, segment_tcp4};
    use super::*;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

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
        let mut g = Coalescer::default();
        for s in &segs {
            assert_eq!(g.push(PortId(7), s, false), Push::Taken);
        }
        let (port, hdr, merged, n) = g.take().unwrap();
        assert_eq!(n, 5);
        assert_eq!(port, PortId(7));
        let h = VnetHdr::from_slice(&hdr).unwrap();
        assert_eq!((h.gso_type, h.gso_size, h.hdr_len), (GSO_TCPV4, 1400, 54));
        assert_eq!(merged.len(), 54 + d.len());
        let p = SlicedPacket::from_ethernet(merged).unwrap();
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
        segment_tcp4(&whole, &h, &mut vec![0u8; 1600], |s| again.push(s.to_vec())).unwrap();
        assert_eq!(again.len(), 5);
        for (a, b) in again.iter().zip(&segs) {
            // Identical but for the IPv4 id, which resegmenting numbers afresh.
            assert_eq!(a[34..], b[34..]);
        }
    }

    #[test]
    fn only_in_order_plain_segments_of_one_flow_join() {
        let d = data(1400);
        let mut g = Coalescer::default();
        assert_eq!(g.push(PortId(1), &seg(0, &d, false), false), Push::Taken);
        assert_eq!(
            g.push(PortId(2), &seg(1400, &d, false), false),
            Push::Refused,
            "other port"
        );
        assert_eq!(
            g.push(PortId(1), &seg(9999, &d, false), false),
            Push::Refused,
            "gap"
        );
        assert_eq!(
            g.push(PortId(1), &seg(1400, &data(1500), false), false),
            Push::Refused,
            "bigger"
        );
        let mut corrupt = seg(1400, &d, false);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert_eq!(
            g.push(PortId(1), &corrupt, false),
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
            g.push(PortId(1), &other_flow, false),
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
        assert_eq!(g.push(PortId(1), &syn, false), Push::Refused, "not plain");
        assert_eq!(
            g.push(PortId(1), &seg(1400, &data(100), false), false),
            Push::Taken,
            "short last"
        );
        assert_eq!(
            g.push(PortId(1), &seg(1500, &data(100), false), false),
            Push::Refused,
            "closed"
        );
        // A lone segment comes back untouched with a plain header.
        let mut lone = Coalescer::default();
        let one = seg(5, &d, false);
        lone.push(PortId(3), &one, false);
        let (_, hdr, frame, _) = lone.take().unwrap();
        assert_eq!(hdr, [0u8; HDR_LEN]);
        assert_eq!(frame, &one[..]);
        assert!(lone.take().is_none());
    }

    #[test]
    fn non_tcp_is_refused() {
        let mut udp = Vec::new();
        PacketBuilder::ethernet2([2; 6], [3; 6])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
            .udp(1, 2)
            .write(&mut udp, b"x")
            .unwrap();
        let mut g = Coalescer::default();
        assert_eq!(g.push(PortId(1), &udp, false), Push::Refused);
        assert_eq!(g.push(PortId(1), &[0u8; 10], false), Push::Refused);
        assert!(g.is_empty());
    }
}
