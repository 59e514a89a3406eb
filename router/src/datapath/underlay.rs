//! The underlay UDP socket, batched: received datagrams come in with recvmmsg and UDP GRO
//! (several same-sized datagrams of one flow coalesced into one buffer, split by stride), and
//! encapsulated frames go out as runs of equal-sized datagrams to one VTEP in a single
//! sendmsg with UDP GSO. Both through quinn-udp, which owns the platform details.

use super::crypto::TxSa;
use super::stats::{Counters, DropReason};
use super::switch::MAX_FRAME;
use protocol::esp;
use protocol::types::Vni;
use protocol::vxlan;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

/// Receive buffers per recvmmsg call.
const RX_BUFS: usize = 16;
/// Largest datagram we send: VXLAN header + the largest frame, in ESP.
const MAX_DGRAM: usize = vxlan::HEADER_LEN + MAX_FRAME + esp::MAX_OVERHEAD;
/// A GSO send is one UDP message to the kernel before segmentation: it must fit the 64 KiB
/// UDP length limit (65535 minus IP and UDP headers), whatever the segment count.
const MAX_GSO_BYTES: usize = 65_507;

pub struct Underlay {
    sock: UdpSocket,
    state: UdpSocketState,
    port: u16,
}

impl Underlay {
    pub fn new(sock: UdpSocket) -> io::Result<Underlay> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&sock).into())?;
        let port = sock.local_addr()?.port();
        Ok(Underlay { sock, state, port })
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// The local (VXLAN) port, which sealed datagrams name in their inner UDP header.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn send(&self, dest: SocketAddrV4, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        let t = Transmit {
            destination: SocketAddr::V4(dest),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        self.state.try_send((&self.sock).into(), &t)
    }
}

/// A run of VXLAN datagrams to one VTEP, all `seg` bytes but possibly the last, laid end to
/// end so that one GSO send carries them.
pub struct TxBatch {
    arena: Vec<u8>,
    dest: Option<SocketAddrV4>,
    seg: usize,
    count: usize,
    /// The last datagram was shorter than `seg`: nothing may follow it in this run.
    closed: bool,
}

impl Default for TxBatch {
    fn default() -> Self {
        TxBatch {
            arena: Vec::with_capacity(MAX_GSO_BYTES),
            dest: None,
            seg: 0,
            count: 0,
            closed: false,
        }
    }
}

/// Sealing for an encrypted network: the key and the datagram's sequence number.
pub struct Seal<'a> {
    pub sa: &'a TxSa,
    pub seq: u32,
}

impl TxBatch {
    /// Queues `frame` for `vtep` in VXLAN with `vni` — sealed in ESP when `seal` is given;
    /// returns how many datagrams went out now (a run is sent when the next frame cannot
    /// join it). Sealed datagrams of equal frames are of equal length, so they form GSO
    /// runs like plain ones.
    pub fn queue(
        &mut self,
        u: &Underlay,
        counters: &Counters,
        vni: Vni,
        vtep: SocketAddrV4,
        frame: &[u8],
        seal: Option<Seal<'_>>,
    ) -> u64 {
        let vxlan_len = vxlan::HEADER_LEN + frame.len();
        let len = match &seal {
            Some(_) => esp::sealed_len(vxlan_len),
            None => vxlan_len,
        };
        let fits = self.dest == Some(vtep)
            && !self.closed
            && len <= self.seg
            && self.count < u.state.max_gso_segments()
            && self.arena.len() + len <= MAX_GSO_BYTES;
        let sent = if fits || self.count == 0 {
            0
        } else {
            self.flush(u, counters)
        };
        if self.count == 0 {
            self.dest = Some(vtep);
            self.seg = len;
        }
        // Appended, not zero-filled first: one pass over the frame.
        let start = self.arena.len();
        if seal.is_some() {
            self.arena
                .extend_from_slice(&[0u8; esp::HEADER_LEN + esp::INNER_UDP_LEN]);
        }
        let inner = self.arena.len();
        self.arena.extend_from_slice(&[0u8; vxlan::HEADER_LEN]);
        vxlan::Repr { vni }.emit(&mut vxlan::Packet::new_unchecked(&mut self.arena[inner..]));
        self.arena.extend_from_slice(frame);
        if let Some(Seal { sa, seq }) = seal {
            // Room for padding, trailer and tag (at most 21 bytes).
            self.arena.resize(start + len, 0);
            let port = u.port();
            if esp::seal_in_place(
                &mut self.arena[start..],
                vxlan_len,
                sa.spi,
                seq,
                &sa.key,
                port,
            )
            .is_err()
            {
                // Cannot happen (the room was made above); never send the clear text.
                self.arena.truncate(start);
                counters.count_drop(DropReason::EspNoKey);
                return sent;
            }
        }
        self.count += 1;
        self.closed = len < self.seg;
        sent
    }

    /// Sends the queued run; returns how many datagrams it held (0 on failure, counted).
    pub fn flush(&mut self, u: &Underlay, counters: &Counters) -> u64 {
        let (Some(dest), n) = (self.dest, self.count) else {
            return 0;
        };
        if n == 0 {
            return 0;
        }
        let segment = (n > 1).then_some(self.seg);
        let sent = match u.send(dest, &self.arena, segment) {
            Ok(()) => n as u64,
            Err(_) => {
                for _ in 0..n {
                    counters.count_drop(DropReason::WriteFailed);
                }
                0
            }
        };
        self.arena.clear();
        self.count = 0;
        self.dest = None;
        self.closed = false;
        sent
    }
}

/// Buffers for one recvmmsg call.
pub struct RxBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    filled: usize,
}

impl RxBatch {
    pub fn new(u: &Underlay) -> RxBatch {
        let per_buf = u.state.gro_segments().max(1) * MAX_DGRAM;
        RxBatch {
            bufs: (0..RX_BUFS).map(|_| vec![0u8; per_buf]).collect(),
            meta: vec![RecvMeta::default(); RX_BUFS],
            filled: 0,
        }
    }

    /// Receives what is waiting (one recvmmsg); returns whether more may be.
    pub fn recv(&mut self, u: &Underlay) -> io::Result<bool> {
        self.filled = 0;
        let mut slices = self.bufs.iter_mut().map(|b| IoSliceMut::new(b));
        let mut iovs: [IoSliceMut<'_>; RX_BUFS] =
            std::array::from_fn(|_| slices.next().unwrap_or_else(|| IoSliceMut::new(&mut [])));
        match u.state.recv((&u.sock).into(), &mut iovs, &mut self.meta) {
            Ok(n) => {
                self.filled = n;
                Ok(n == RX_BUFS)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Every received datagram (GRO-coalesced ones split by their stride), with its sender,
    /// writable in place.
    pub fn datagrams_mut(&mut self) -> impl Iterator<Item = (SocketAddr, &mut [u8])> + '_ {
        self.meta[..self.filled]
            .iter()
            .zip(self.bufs.iter_mut())
            .flat_map(|(m, buf)| {
                let stride = m.stride.max(1);
                let len = m.len.min(buf.len());
                buf[..len].chunks_mut(stride).map(move |d| (m.addr, d))
            })
    }
}

/// The IPv4 sender of a datagram, if it has one.
pub fn ipv4_of(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn pair() -> (Underlay, Underlay, SocketAddrV4) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(to) = b.local_addr().unwrap() else {
            panic!("v4")
        };
        (Underlay::new(a).unwrap(), Underlay::new(b).unwrap(), to)
    }

    fn receive(u: &Underlay, want: usize) -> Vec<Vec<u8>> {
        let mut rx = RxBatch::new(u);
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < end {
            rx.recv(u).unwrap();
            got.extend(rx.datagrams_mut().map(|(_, d)| d.to_vec()));
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    /// Real sends over loopback: a long run of full-size frames to one VTEP goes out in GSO
    /// runs that respect the 64 KiB limit, arrives intact and in order, each datagram with
    /// its VXLAN header.
    #[test]
    fn runs_of_frames_arrive_intact_and_in_order() {
        let (a, b, to) = pair();
        let counters = Counters::default();
        let vni = Vni::new(4097).unwrap();
        let mut tx = TxBatch::default();
        let mut sent = 0;
        let frames: Vec<Vec<u8>> = (0..100u8)
            .map(|i| vec![i; if i == 99 { 100 } else { 1464 }])
            .collect();
        for f in &frames {
            sent += tx.queue(&a, &counters, vni, to, f, None);
        }
        sent += tx.flush(&a, &counters);
        assert_eq!(sent, 100);
        assert_eq!(counters.dropped(DropReason::WriteFailed), 0);
        let got = receive(&b, 100);
        assert_eq!(got.len(), 100);
        for (d, f) in got.iter().zip(&frames) {
            let p = vxlan::Packet::new_checked(&d[..]).unwrap();
            assert_eq!(vxlan::Repr::parse(&p).unwrap().vni, vni);
            assert_eq!(p.payload(), &f[..]);
        }
    }

    /// A shorter frame ends a run; a different destination starts a new one.
    #[test]
    fn mixed_sizes_and_destinations() {
        let (a, b, to_b) = pair();
        let c = Underlay::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let SocketAddr::V4(to_c) = c.socket().local_addr().unwrap() else {
            panic!("v4")
        };
        let counters = Counters::default();
        let vni = Vni::new(7).unwrap();
        let mut tx = TxBatch::default();
        let mut sent = 0;
        for (len, to) in [
            (1000, to_b),
            (200, to_b),
            (1000, to_b),
            (1000, to_c),
            (64, to_b),
        ] {
            sent += tx.queue(&a, &counters, vni, to, &vec![0xab; len], None);
        }
        sent += tx.flush(&a, &counters);
        assert_eq!(sent, 5);
        let lens: Vec<usize> = receive(&b, 4).iter().map(|d| d.len() - 8).collect();
        assert_eq!(lens, [1000, 200, 1000, 64]);
        assert_eq!(receive(&c, 1).len(), 1);
    }
}
