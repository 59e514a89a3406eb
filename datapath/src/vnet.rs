//! The virtio-net header a TAP with IFF_VNET_HDR puts in front of every frame (and expects in
//! front of every frame written to it), and the two things the datapath must do for a frame
//! that leaves through the underlay instead of another TAP: complete a checksum the sender
//! left to "hardware", and cut a super-frame into the frames it stands for: TCP over IPv4 or
//! IPv6 (TSO) into MSS-sized segments, UDP over IPv4 or IPv6 (USO, from a task that sends
//! with `UDP_SEGMENT`) into datagrams. Pure functions over byte slices.

use crate::csum::Sum;

/// Size of `struct virtio_net_hdr` (the TAP default, no `num_buffers`).
pub const HDR_LEN: usize = 10;
/// The frame's checksum is partial: complete it from `csum_start` to the end.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation (`VIRTIO_NET_HDR_GSO_UDP_L4`), IPv4 or IPv6; Linux 6.2 and later.
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;
/// The most datagrams one UDP super-frame may stand for (the kernel's `UDP_MAX_SEGMENTS`
/// was 64 before Linux 6.9).
pub const UDP_MAX_SEGMENTS: usize = 64;

const ETH: usize = 14;
const UDP_HDR: usize = 8;

/// The meaning of a virtio-net header (little-endian fields, as on the TAP of an x86 host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8; HDR_LEN]) -> VnetHdr {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    /// Parses the first [`HDR_LEN`] bytes of `b`, if there are that many.
    pub fn from_slice(b: &[u8]) -> Option<VnetHdr> {
        b.get(..HDR_LEN)?.try_into().ok().map(VnetHdr::parse)
    }

    pub fn emit(&self, b: &mut [u8; HDR_LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("checksum offsets outside the frame")]
    BadChecksumOffsets,
    #[error("GSO type {0} is not supported")]
    UnsupportedGso(u8),
    #[error("GSO frame is not a well-formed TCP or UDP frame of its GSO type")]
    MalformedGso,
}

/// The final (inverted, folded) checksum as a number to write big-endian (`Sum` adds in
/// native byte order, hence the `to_be`). Zero when summed over data with a valid checksum.
pub fn fold(sum: Sum) -> u16 {
    sum.ones_complement().to_be()
}

/// The pseudo-header sum of a TCP/UDP checksum: the addresses (IPv4 or IPv6, source then
/// destination, as they lie in the header), the protocol and the L4 length.
#[inline]
pub fn pseudo_header(addrs: &[u8], proto: u8, l4_len: usize) -> Sum {
    Sum::new()
        .add_slice(addrs)
        .add_2bytes([0, proto])
        .add_2bytes((l4_len as u16).to_be_bytes())
}

/// The pseudo-header sum of an IPv4 or IPv6 frame's TCP/UDP checksum, its addresses read
/// where they lie. One branch per version, so that each sums a slice of known length
/// (per segment on the hot paths: a slice of either length costs a generic loop).
#[inline(always)]
pub fn ip_pseudo_header(frame: &[u8], v6: bool, proto: u8, l4_len: usize) -> Sum {
    if v6 {
        pseudo_header(&frame[ETH + 8..ETH + 40], proto, l4_len)
    } else {
        pseudo_header(&frame[ETH + 12..ETH + 20], proto, l4_len)
    }
}

/// What a partial checksum field holds: the folded pseudo-header sum, not inverted.
pub fn partial_field(pseudo: Sum) -> u16 {
    !fold(pseudo)
}

/// The header that asks the receiving kernel to complete (or trust) a TCP (`proto` 6) or UDP
/// checksum whose header starts at `csum_start`.
pub fn needs_csum(csum_start: usize, proto: u8) -> VnetHdr {
    VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: csum_start as u16,
        csum_offset: if proto == 6 { 16 } else { 6 },
        ..VnetHdr::default()
    }
}

/// Completes a partial checksum in place: the field at `csum_start + csum_offset` holds the
/// pseudo-header sum; the checksum covers `csum_start..` to the end of the frame.
pub fn complete_checksum(frame: &mut [u8], h: &VnetHdr) -> Result<(), OffloadError> {
    let start = h.csum_start as usize;
    let at = start + h.csum_offset as usize;
    if start >= frame.len() || at + 2 > frame.len() {
        return Err(OffloadError::BadChecksumOffsets);
    }
    let sum = fold(Sum::new().add_slice(&frame[start..]));
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Cuts a TCP super-frame (IPv4 or IPv6) into segments of at most `h.gso_size` payload
/// bytes, each a complete frame with correct IP and TCP headers and checksums, written into
/// `scratch` and handed to `emit` one at a time.
pub fn segment_tcp(
    frame: &[u8],
    h: &VnetHdr,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let segs = Segments::Tcp(TcpSegments::new(frame, h, scratch.len())?);
    for i in 0..segs.count() {
        let out = &mut scratch[..segs.len(i)];
        segs.write(i, out);
        emit(out);
    }
    Ok(segs.count())
}

/// What every kind of super-frame shares: one run of headers, then payloads of `mss` bytes
/// each (the last maybe shorter), and the IPv4 id the frames are numbered from.
struct Cut<'a> {
    frame: &'a [u8],
    headers: usize,
    mss: usize,
    chunks: usize,
    id: u16,
    /// IPv6 (without extension headers) rather than IPv4.
    v6: bool,
    /// Leave each frame's checksum partial (the pseudo-header sum) instead of whole.
    partial: bool,
}

impl<'a> Cut<'a> {
    fn new(frame: &'a [u8], headers: usize, mss: usize, v6: bool) -> Cut<'a> {
        Cut {
            frame,
            headers,
            mss,
            chunks: (frame.len() - headers).div_ceil(mss).max(1),
            id: u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]),
            v6,
            partial: false,
        }
    }

    fn payload(&self, i: usize) -> std::ops::Range<usize> {
        let (h, len) = (self.headers, self.frame.len());
        (h + i * self.mss).min(len)..(h + (i + 1) * self.mss).min(len)
    }

    fn chunk(&self, i: usize) -> &'a [u8] {
        &self.frame[self.payload(i)]
    }

    /// Copies the headers into `out` and fixes frame `i`'s IPv4 total length, id and header
    /// checksum (the IPv4 header ends at `l4`, the frame's L4 part is `l4_len` bytes).
    fn ipv4_head(&self, i: usize, out: &mut [u8], l4: usize, l4_len: usize) {
        out[..self.headers].copy_from_slice(&self.frame[..self.headers]);
        out[ETH + 2..ETH + 4].copy_from_slice(&((l4 - ETH + l4_len) as u16).to_be_bytes());
        out[ETH + 4..ETH + 6].copy_from_slice(&self.id.wrapping_add(i as u16).to_be_bytes());
        out[ETH + 10..ETH + 12].fill(0);
        let ip_sum = fold(Sum::new().add_slice(&out[ETH..l4]));
        out[ETH + 10..ETH + 12].copy_from_slice(&ip_sum.to_be_bytes());
    }

    /// Copies the headers into `out` and fixes frame `i`'s IP header for an L4 part of
    /// `l4_len` bytes starting at `l4`: IPv4 as [`Self::ipv4_head`]; IPv6 only its payload
    /// length (no extension headers; no header checksum, no per-frame id). Returns the
    /// pseudo-header sum of `proto`'s checksum.
    fn ip_head(&self, i: usize, out: &mut [u8], l4: usize, l4_len: usize, proto: u8) -> Sum {
        if self.v6 {
            out[..self.headers].copy_from_slice(&self.frame[..self.headers]);
            out[ETH + 4..ETH + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            self.ipv4_head(i, out, l4, l4_len);
        }
        ip_pseudo_header(self.frame, self.v6, proto, l4_len)
    }

    /// The TCP/UDP checksum of frame `i` whose headers are in `out` (checksum field zero):
    /// partial (the folded pseudo-header sum) or whole.
    fn l4_checksum(&self, i: usize, out: &[u8], l4: usize, pseudo: Sum) -> u16 {
        if self.partial {
            partial_field(pseudo)
        } else {
            fold(
                pseudo
                    .add_slice(&out[l4..self.headers])
                    .add_slice(self.chunk(i)),
            )
        }
    }
}

/// A TCP super-frame (IPv4, or IPv6 without extension headers), checked once.
pub struct TcpSegments<'a> {
    cut: Cut<'a>,
    tcp: usize,
    seq: u32,
}

impl<'a> TcpSegments<'a> {
    /// Checks `frame` and its header; no segment may exceed `max_len` bytes.
    pub fn new(frame: &'a [u8], h: &VnetHdr, max_len: usize) -> Result<Self, OffloadError> {
        let bad = OffloadError::MalformedGso;
        let v6 = match h.gso_type & !GSO_ECN {
            GSO_TCPV4 => false,
            GSO_TCPV6 => true,
            t => return Err(OffloadError::UnsupportedGso(t)),
        };
        let tcp = match (v6, frame.get(12..14), frame.get(ETH).map(|b| b >> 4)) {
            (false, Some([0x08, 0x00]), Some(4)) if frame.len() >= ETH + 20 => {
                let ihl = ((frame[ETH] & 0x0f) as usize) * 4;
                if ihl < 20 || frame[ETH + 9] != 6 {
                    return Err(bad);
                }
                ETH + ihl
            }
            (true, Some([0x86, 0xdd]), Some(6)) if frame.len() >= ETH + 40 => {
                if frame[ETH + 6] != 6 {
                    return Err(bad);
                }
                ETH + 40
            }
            _ => return Err(bad),
        };
        if frame.len() < tcp + 20 {
            return Err(bad);
        }
        let thl = ((frame[tcp + 12] >> 4) as usize) * 4;
        let headers = tcp + thl;
        let mss = h.gso_size as usize;
        if thl < 20 || frame.len() < headers || mss == 0 || headers + mss > max_len {
            return Err(bad);
        }
        let word = |at: usize| [frame[at], frame[at + 1], frame[at + 2], frame[at + 3]];
        Ok(TcpSegments {
            cut: Cut::new(frame, headers, mss, v6),
            tcp,
            seq: u32::from_be_bytes(word(tcp + 4)),
        })
    }

    fn write_head(&self, i: usize, out: &mut [u8]) {
        let (c, tcp) = (&self.cut, self.tcp);
        let tcp_len = c.headers - tcp + c.chunk(i).len();
        let pseudo = c.ip_head(i, out, tcp, tcp_len, 6);
        // TCP: sequence number; FIN and PSH only on the last segment, CWR only on the first.
        let seq = self.seq.wrapping_add((i * c.mss) as u32);
        out[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        if i + 1 < c.chunks {
            out[tcp + 13] &= !(0x01 | 0x08);
        }
        if i > 0 {
            out[tcp + 13] &= !0x80;
        }
        out[tcp + 16..tcp + 18].fill(0);
        let check = c.l4_checksum(i, out, tcp, pseudo);
        out[tcp + 16..tcp + 18].copy_from_slice(&check.to_be_bytes());
    }
}

/// A UDP super-frame (IPv4 without fragments, or IPv6 without extension headers): one
/// header, then the payloads of datagrams of `gso_size` bytes each, the last maybe shorter.
pub struct UdpSegments<'a> {
    cut: Cut<'a>,
    /// Offset of the UDP header (after the IPv4 header with options, or the IPv6 header).
    udp: usize,
}

impl<'a> UdpSegments<'a> {
    pub fn new(frame: &'a [u8], h: &VnetHdr, max_len: usize) -> Result<Self, OffloadError> {
        if h.gso_type & !GSO_ECN != GSO_UDP_L4 {
            return Err(OffloadError::UnsupportedGso(h.gso_type));
        }
        let bad = OffloadError::MalformedGso;
        if frame.len() < ETH + 40 {
            return Err(bad);
        }
        let (udp, v6) = match (frame[12], frame[13], frame[ETH] >> 4) {
            (0x08, 0x00, 4) => {
                let ihl = usize::from(frame[ETH] & 0x0f) * 4;
                let frag = u16::from_be_bytes([frame[ETH + 6], frame[ETH + 7]]);
                if ihl < 20 || frame[ETH + 9] != 17 || frag & 0x3fff != 0 {
                    return Err(bad);
                }
                (ETH + ihl, false)
            }
            (0x86, 0xdd, 6) if frame[ETH + 6] == 17 => (ETH + 40, true),
            _ => return Err(bad),
        };
        let headers = udp + UDP_HDR;
        let mss = usize::from(h.gso_size);
        if frame.len() <= headers || mss == 0 || headers + mss > max_len {
            return Err(bad);
        }
        let cut = Cut::new(frame, headers, mss, v6);
        if cut.chunks > UDP_MAX_SEGMENTS {
            return Err(bad);
        }
        Ok(UdpSegments { cut, udp })
    }

    fn write_head(&self, i: usize, out: &mut [u8]) {
        let (c, udp) = (&self.cut, self.udp);
        let udp_len = UDP_HDR + c.chunk(i).len();
        let pseudo = c.ip_head(i, out, udp, udp_len, 17);
        out[udp + 4..udp + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        out[udp + 6..udp + 8].fill(0);
        // A whole sum of zero goes out as all ones: zero means "no checksum" in UDP.
        let check = match c.l4_checksum(i, out, udp, pseudo) {
            0 if !c.partial => 0xffff,
            s => s,
        };
        out[udp + 6..udp + 8].copy_from_slice(&check.to_be_bytes());
    }
}

/// The frames a super-frame stands for, whichever its kind: written on demand into buffers
/// the caller gives, each complete (lengths, IPv4 id and checksums), so that a frame is
/// copied once on its way out, or not at all when only its headers are written and its
/// payload is gathered from where it lies.
pub enum Segments<'a> {
    Tcp(TcpSegments<'a>),
    Udp(UdpSegments<'a>),
}

impl<'a> Segments<'a> {
    /// Checks `frame` against its GSO header; no frame may exceed `max_len` bytes.
    pub fn new(frame: &'a [u8], h: &VnetHdr, max_len: usize) -> Result<Self, OffloadError> {
        match h.gso_type & !GSO_ECN {
            GSO_UDP_L4 => UdpSegments::new(frame, h, max_len).map(Segments::Udp),
            _ => TcpSegments::new(frame, h, max_len).map(Segments::Tcp),
        }
    }

    fn cut(&self) -> &Cut<'a> {
        match self {
            Segments::Tcp(s) => &s.cut,
            Segments::Udp(s) => &s.cut,
        }
    }

    /// Makes every frame's TCP/UDP checksum partial (the pseudo-header sum, as a TAP hands
    /// over with `NEEDS_CSUM`) instead of whole: for a receiver that completes or trusts it
    /// (another overlayd node), the payload need not be summed here. IPv4 only (what
    /// [`partial_header`] recognises at the receiver); IPv6 frames stay whole.
    pub fn partial(mut self) -> Self {
        let cut = match &mut self {
            Segments::Tcp(s) => &mut s.cut,
            Segments::Udp(s) => &mut s.cut,
        };
        cut.partial = !cut.v6;
        self
    }

    pub fn count(&self) -> usize {
        self.cut().chunks
    }

    /// The length of frame `i`.
    pub fn len(&self, i: usize) -> usize {
        self.head_len() + self.cut().payload(i).len()
    }

    /// The length of every frame's headers (all frames of a super-frame share them).
    pub fn head_len(&self) -> usize {
        self.cut().headers
    }

    /// Where frame `i`'s payload lies in the super-frame.
    pub fn payload(&self, i: usize) -> std::ops::Range<usize> {
        self.cut().payload(i)
    }

    /// Writes frame `i` into `out`, which must be [`Self::len`]`(i)` bytes long.
    pub fn write(&self, i: usize, out: &mut [u8]) {
        let h = self.head_len();
        out[h..].copy_from_slice(self.cut().chunk(i));
        self.write_head(i, &mut out[..h]);
    }

    /// Writes only frame `i`'s headers, checksums included, into `out` ([`Self::head_len`]
    /// bytes); its payload is [`Self::payload`]`(i)` of the super-frame, unchanged.
    pub fn write_head(&self, i: usize, out: &mut [u8]) {
        match self {
            Segments::Tcp(s) => s.write_head(i, out),
            Segments::Udp(s) => s.write_head(i, out),
        }
    }
}

/// The TCP or UDP header of an unfragmented IPv4 frame: (protocol, where the L4 header
/// starts, where its checksum field is within it, the L4 length).
fn l4_of(frame: &[u8]) -> Option<(u8, usize, u16, usize)> {
    if frame.len() < ETH + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    let (proto, csum_offset, min_len) = match ip[9] {
        6 => (6u8, 16u16, 20usize),
        17 => (17, 6, 8),
        _ => return None,
    };
    if ip[0] >> 4 != 4
        || ihl < 20
        || fragmented
        || total < ihl + min_len
        || ETH + total > frame.len()
    {
        return None;
    }
    Some((proto, ETH + ihl, csum_offset, total - ihl))
}

/// Readies a frame made by a TCP/IP stack that left its TCP/UDP checksum to "hardware" (the
/// router's ingress endpoint; or any frame bound for another overlayd node, which receives
/// partial checksums) the way a TAP's kernel hands one over: the checksum field gets the
/// pseudo-header sum and the returned header asks for completion; a TCP super-segment is
/// marked for segmentation at `gso_size`. Anything but TCP or UDP over unfragmented IPv4
/// gets a plain header (ARP and ICMP come out complete).
pub fn offload_partial(frame: &mut [u8], gso_size: Option<u16>) -> VnetHdr {
    let Some((proto, start, csum_offset, l4_len)) = l4_of(frame) else {
        return VnetHdr::default();
    };
    let partial = partial_field(ip_pseudo_header(frame, false, proto, l4_len));
    let at = start + usize::from(csum_offset);
    frame[at..at + 2].copy_from_slice(&partial.to_be_bytes());
    let mut h = partial_header(frame);
    if let (6, Some(mss)) = (proto, gso_size) {
        let tcp_hdr = usize::from(frame[start + 12] >> 4) * 4;
        h.gso_type = GSO_TCPV4;
        h.gso_size = mss;
        h.hdr_len = (start + tcp_hdr) as u16;
    }
    h
}

/// The header to write a frame whose TCP/UDP checksum field already holds the pseudo-header
/// sum with (`NEEDS_CSUM`): what a frame from another overlayd node carries. Plain for
/// anything but TCP or UDP over unfragmented IPv4.
pub fn partial_header(frame: &[u8]) -> VnetHdr {
    match l4_of(frame) {
        Some((proto, start, _, _)) => needs_csum(start, proto),
        None => VnetHdr::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    #[test]
    fn offloaded_frames_complete_or_segment_to_valid_ones() {
        let small = tcp_frame(b"from the ingress endpoint", false);
        let mut f = small.clone();
        f[50..52].copy_from_slice(&[0, 0]);
        let h = offload_partial(&mut f, None);
        assert!(!h.is_gso() && h.flags == F_NEEDS_CSUM);
        complete_checksum(&mut f, &h).unwrap();
        assert_eq!(f, small);
        // UDP too.
        let mut u = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
            .udp(5000, 53)
            .write(&mut u, b"datagram")
            .unwrap();
        let mut g = u.clone();
        g[40..42].copy_from_slice(&[0, 0]);
        let h = offload_partial(&mut g, None);
        complete_checksum(&mut g, &h).unwrap();
        assert_eq!(g, u);
        // A super-segment: cut into whole segments.
        let payload = vec![7u8; 4000];
        let mut big = tcp_frame(&payload, false);
        big[50..52].copy_from_slice(&[0, 0]);
        let h = offload_partial(&mut big, Some(1398));
        assert!(h.is_gso() && h.hdr_len == 54);
        let mut scratch = vec![0u8; 1600];
        let n = segment_tcp(&big, &h, &mut scratch, |_| {}).unwrap();
        assert_eq!(n, 3);
        // ARP and garbage: plain.
        assert_eq!(offload_partial(&mut [0u8; 60], None), VnetHdr::default());
        let mut trunc = small[..40].to_vec();
        assert_eq!(offload_partial(&mut trunc, None), VnetHdr::default());
    }

    fn tcp_frame(payload: &[u8], fin_psh: bool) -> Vec<u8> {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 2], [2, 0x42, 10, 0, 0, 3])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
            .tcp(40000, 5201, 1_000_000, 65000)
            .ack(77);
        let b = if fin_psh { b.psh().fin().cwr() } else { b };
        b.write(&mut v, payload).unwrap();
        v
    }

    #[test]
    fn header_roundtrip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1398,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut b = [0u8; HDR_LEN];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), h);
        assert!(h.is_gso());
        assert!(!VnetHdr::default().is_gso());
    }

    #[test]
    fn super_frame_is_cut_into_valid_segments() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let frame = tcp_frame(&payload, true);
        let h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1398,
            ..Default::default()
        };
        let mut scratch = vec![0u8; 1600];
        let mut segs: Vec<Vec<u8>> = Vec::new();
        let n = segment_tcp(&frame, &h, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, 4);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(s.len() <= 14 + 20 + 20 + 1398);
            let p = SlicedPacket::from_ethernet(s).unwrap();
            let Some(NetSlice::Ipv4(ip)) = &p.net else {
                panic!()
            };
            let ih = ip.header().to_header();
            assert_eq!(ih.header_checksum, ih.calc_header_checksum(), "ip csum {i}");
            assert_eq!(ih.identification, i as u16 + ih.identification - i as u16);
            let Some(TransportSlice::Tcp(t)) = &p.transport else {
                panic!()
            };
            let th = t.to_header();
            assert_eq!(
                th.checksum,
                th.calc_checksum_ipv4(&ih, t.payload()).unwrap(),
                "tcp csum {i}"
            );
            assert_eq!(th.sequence_number, 1_000_000 + (i as u32) * 1398);
            let last = i == 3;
            assert_eq!(th.fin, last);
            assert_eq!(th.psh, last);
            assert_eq!(th.cwr, i == 0);
            assert!(th.ack);
            joined.extend_from_slice(t.payload());
        }
        assert_eq!(joined, payload);
        // Consecutive IPv4 ids.
        let id = |s: &Vec<u8>| u16::from_be_bytes([s[18], s[19]]);
        assert_eq!(id(&segs[1]), id(&segs[0]).wrapping_add(1));
    }

    #[test]
    fn tcp6_super_frame_is_cut_into_valid_segments() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut frame = Vec::new();
        PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 2], [2, 0x42, 10, 0, 0, 3])
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(40000, 5201, 1_000_000, 65000)
            .ack(77)
            .psh()
            .fin()
            .write(&mut frame, &payload)
            .unwrap();
        let h = VnetHdr {
            gso_type: GSO_TCPV6,
            gso_size: 1378,
            ..Default::default()
        };
        let segs = Segments::new(&frame, &h, 1600).unwrap();
        // Between overlayd nodes an IPv6 frame still leaves whole (partial is IPv4 only).
        let segs = segs.partial();
        assert_eq!(segs.count(), 4);
        let mut joined = Vec::new();
        for i in 0..segs.count() {
            let mut s = vec![0u8; segs.len(i)];
            segs.write(i, &mut s);
            let p = SlicedPacket::from_ethernet(&s).unwrap();
            let Some(NetSlice::Ipv6(ip)) = &p.net else {
                panic!("segment {i} is not IPv6")
            };
            let ih = ip.header().to_header();
            assert_eq!(usize::from(ih.payload_length), s.len() - 14 - 40);
            let Some(TransportSlice::Tcp(t)) = &p.transport else {
                panic!()
            };
            let th = t.to_header();
            assert_eq!(
                th.checksum,
                th.calc_checksum_ipv6(&ih, t.payload()).unwrap(),
                "tcp csum {i}"
            );
            assert_eq!(th.sequence_number, 1_000_000 + (i as u32) * 1378);
            assert_eq!((th.fin, th.psh), (i == 3, i == 3));
            joined.extend_from_slice(t.payload());
        }
        assert_eq!(joined, payload);
        // An extension header (hop-by-hop) before TCP is refused, not misread.
        let mut ext = frame.clone();
        ext[14 + 6] = 0;
        assert_eq!(
            Segments::new(&ext, &h, 1600).err(),
            Some(OffloadError::MalformedGso)
        );
    }

    #[test]
    fn partial_checksum_is_completed() {
        let frame = tcp_frame(b"hello, partial checksum", false);
        let mut partial = frame.clone();
        // What the kernel leaves: the pseudo-header sum, not inverted, in the field.
        let tcp_len = (frame.len() - 34) as u16;
        let pseudo = Sum::new()
            .add_slice(&frame[26..34])
            .add_2bytes([0, 6])
            .add_2bytes(tcp_len.to_be_bytes());
        let folded = !fold(pseudo);
        partial[50..52].copy_from_slice(&folded.to_be_bytes());
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        complete_checksum(&mut partial, &h).unwrap();
        assert_eq!(partial, frame);
        let bad = VnetHdr {
            csum_start: 5000,
            ..h
        };
        assert_eq!(
            complete_checksum(&mut partial, &bad),
            Err(OffloadError::BadChecksumOffsets)
        );
    }

    #[test]
    fn malformed_gso_frames_are_refused() {
        let h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1000,
            ..Default::default()
        };
        let mut scratch = vec![0u8; 1600];
        let frame = tcp_frame(&[0u8; 3000], false);
        assert!(segment_tcp(&frame[..40], &h, &mut scratch, |_| {}).is_err());
        let mut udp = frame.clone();
        udp[23] = 17;
        assert!(segment_tcp(&udp, &h, &mut scratch, |_| {}).is_err());
        let zero = VnetHdr { gso_size: 0, ..h };
        assert!(segment_tcp(&frame, &zero, &mut scratch, |_| {}).is_err());
        // A TCPv6 request for an IPv4 frame, and a GSO type nobody offers (UFO).
        let v6 = VnetHdr {
            gso_type: GSO_TCPV6,
            ..h
        };
        assert_eq!(
            segment_tcp(&frame, &v6, &mut scratch, |_| {}),
            Err(OffloadError::MalformedGso)
        );
        let ufo = VnetHdr { gso_type: 3, ..h };
        assert_eq!(
            segment_tcp(&frame, &ufo, &mut scratch, |_| {}),
            Err(OffloadError::UnsupportedGso(3))
        );
    }

    /// A UDP super-frame as a TAP with USO hands it over: one header whose lengths cover
    /// everything, the UDP checksum field holding the pseudo-header sum.
    fn udp_super(payload: &[u8], v6: bool) -> Vec<u8> {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 2], [2, 0x42, 10, 0, 0, 3]);
        let b = if v6 {
            b.ipv6([0xfd; 16], [0xfe; 16], 64)
        } else {
            b.ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
        };
        b.udp(40000, 4433).write(&mut v, payload).unwrap();
        v
    }

    fn datagrams(frame: &[u8], h: &VnetHdr) -> Vec<Vec<u8>> {
        let segs = Segments::new(frame, h, 1600).unwrap();
        (0..segs.count())
            .map(|i| {
                let mut out = vec![0u8; segs.len(i)];
                segs.write(i, &mut out);
                out
            })
            .collect()
    }

    #[test]
    fn udp_super_frames_are_cut_into_valid_datagrams() {
        let payload: Vec<u8> = (0..4 * 1200 + 77).map(|i| (i % 253) as u8).collect();
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            gso_size: 1200,
            ..Default::default()
        };
        for v6 in [false, true] {
            let out = datagrams(&udp_super(&payload, v6), &h);
            assert_eq!(out.len(), 5, "v6 {v6}");
            let mut joined = Vec::new();
            for (i, d) in out.iter().enumerate() {
                let p = SlicedPacket::from_ethernet(d).unwrap();
                let Some(TransportSlice::Udp(u)) = &p.transport else {
                    panic!("not UDP")
                };
                let want = match &p.net {
                    Some(NetSlice::Ipv4(ip)) => {
                        let ih = ip.header().to_header();
                        assert_eq!(ih.header_checksum, ih.calc_header_checksum(), "ip {i}");
                        u.to_header().calc_checksum_ipv4(&ih, u.payload()).unwrap()
                    }
                    Some(NetSlice::Ipv6(ip)) => {
                        let ih = ip.header().to_header();
                        u.to_header().calc_checksum_ipv6(&ih, u.payload()).unwrap()
                    }
                    _ => panic!("no IP"),
                };
                assert_eq!(u.checksum(), want, "udp checksum {i} v6 {v6}");
                assert_eq!(usize::from(u.length()), 8 + u.payload().len());
                assert_eq!(u.payload().len(), if i < 4 { 1200 } else { 77 });
                joined.extend_from_slice(u.payload());
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn malformed_udp_super_frames_are_refused() {
        let h = VnetHdr {
            gso_type: GSO_UDP_L4,
            gso_size: 100,
            ..Default::default()
        };
        let frame = udp_super(&[7u8; 1000], false);
        assert!(Segments::new(&frame, &h, 1600).is_ok());
        // Not UDP; fragmented; no payload; a segment larger than allowed; too many segments.
        let mut tcp = frame.clone();
        tcp[23] = 6;
        assert!(Segments::new(&tcp, &h, 1600).is_err());
        let mut frag = frame.clone();
        frag[20] = 0x20;
        assert!(Segments::new(&frag, &h, 1600).is_err());
        assert!(Segments::new(&frame[..42], &h, 1600).is_err());
        assert!(Segments::new(&frame, &h, 100).is_err());
        let tiny = VnetHdr { gso_size: 10, ..h };
        assert!(Segments::new(&frame, &tiny, 1600).is_err());
        let zero = VnetHdr { gso_size: 0, ..h };
        assert!(Segments::new(&frame, &zero, 1600).is_err());
    }

    /// A TCP/IPv4 and a UDP/IPv4 super-frame of `len` payload bytes, with their headers.
    fn super_frames(len: u32) -> [(Vec<u8>, VnetHdr); 2] {
        let body: Vec<u8> = (0..len).map(|i| (i * 13 % 256) as u8).collect();
        let tcp = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1398,
            ..Default::default()
        };
        let udp = VnetHdr {
            gso_type: GSO_UDP_L4,
            gso_size: 1200,
            ..Default::default()
        };
        [
            (tcp_frame(&body, true), tcp),
            (udp_super(&body, false), udp),
        ]
    }

    /// Headers written alone, followed by the payload where `payload` says it lies, are the
    /// frame `write` makes whole (what gathering sends), for TCP and UDP super-frames.
    #[test]
    fn headers_and_gathered_payload_equal_the_whole_frame() {
        for (frame, h) in super_frames(5000) {
            let segs = Segments::new(&frame, &h, 1600).unwrap();
            assert!(segs.count() > 3);
            for k in 0..segs.count() {
                let mut whole = vec![0u8; segs.len(k)];
                segs.write(k, &mut whole);
                let mut gathered = vec![0u8; segs.head_len()];
                segs.write_head(k, &mut gathered);
                gathered.extend_from_slice(&frame[segs.payload(k)]);
                assert_eq!(gathered, whole, "segment {k}");
            }
        }
    }

    /// Partial segments (for another overlayd node) carry the pseudo-header sum; completing
    /// them as a receiving kernel would gives exactly the whole segments. IPv6 UDP stays
    /// whole, and a frame's own header says where its partial checksum is.
    #[test]
    fn partial_segments_complete_to_the_whole_ones() {
        let [_, (_, udp)] = super_frames(0);
        for (frame, h) in super_frames(4000) {
            let whole = Segments::new(&frame, &h, 1600).unwrap();
            let partial = Segments::new(&frame, &h, 1600).unwrap().partial();
            for k in 0..whole.count() {
                let mut w = vec![0u8; whole.len(k)];
                whole.write(k, &mut w);
                let mut p = vec![0u8; partial.len(k)];
                partial.write(k, &mut p);
                assert_ne!(p, w, "segment {k} left partial");
                let ph = partial_header(&p);
                assert_eq!(ph.flags, F_NEEDS_CSUM);
                complete_checksum(&mut p, &ph).unwrap();
                assert_eq!(p, w, "segment {k} completes to the whole one");
            }
        }
        let v6 = udp_super(&[7u8; 4000], true);
        let (whole, partial) = (
            Segments::new(&v6, &udp, 1600).unwrap(),
            Segments::new(&v6, &udp, 1600).unwrap().partial(),
        );
        let (mut w, mut p) = (vec![0u8; whole.len(0)], vec![0u8; whole.len(0)]);
        whole.write(0, &mut w);
        partial.write(0, &mut p);
        assert_eq!(p, w, "IPv6 stays whole");
        assert_eq!(partial_header(&p), VnetHdr::default());
    }
}
