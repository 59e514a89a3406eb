//! The underlay UDP sockets, batched: received datagrams come in with recvmmsg and UDP GRO
//! (several same-sized datagrams of one flow coalesced into one buffer, split by stride), and
//! encapsulated frames go out as runs of equal-sized datagrams to one VTEP in a single
//! sendmsg with UDP GSO. Both through quinn-udp, which owns the platform details, except a
//! run whose payloads are gathered from elsewhere (an iovec): quinn-udp sends contiguous
//! buffers only, so that one goes through nix's `sendmsg` with `UDP_SEGMENT`.
//!
//! A node has one receiving socket per datapath worker, all bound to the VXLAN port in one
//! `SO_REUSEPORT` group whose steering program ([`crate::sys::steer`]) gives each datagram to
//! one worker by its flow; and a pool of sending sockets on consecutive ports, shared by the
//! workers. A frame leaves from the pool socket its inner flow hashes to, so the source port
//! carries the flow's entropy (RFC 7348 section 5) and the receiver's steering keeps a flow on
//! one worker.

use datapath::keys::TxSa;
use datapath::stats::{bump, Counters};
use datapath::switch::MAX_FRAME;
use datapath::vocab::DropReason;
use protocol::esp;
use protocol::types::Vni;
use protocol::vxlan;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// Receive buffers per recvmmsg call.
const RX_BUFS: usize = 16;
/// Largest datagram we send: VXLAN header + the largest frame, in ESP.
const MAX_DGRAM: usize = vxlan::HEADER_LEN + MAX_FRAME + esp::MAX_OVERHEAD;
/// A GSO send is one UDP message to the kernel before segmentation: it must fit the 64 KiB
/// UDP length limit (65535 minus IP and UDP headers), whatever the segment count.
const MAX_GSO_BYTES: usize = 65_507;
/// Sending sockets per node: the source ports flows are spread over. A power of two, so
/// that any power-of-two number of workers at the receiver divides them evenly.
pub const SEND_PORTS: u16 = 16;
/// Socket buffers: room for bursts, a 64-frame batch from each of several ports.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Sockets that send, shared by every worker of a node.
pub struct SendPool {
    socks: Vec<(UdpSocket, UdpSocketState)>,
}

impl SendPool {
    fn new(socks: Vec<UdpSocket>) -> io::Result<SendPool> {
        let socks = socks
            .into_iter()
            .map(|s| {
                s.set_nonblocking(true)?;
                let st = UdpSocketState::new((&s).into())?;
                Ok((s, st))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(SendPool { socks })
    }

    /// The socket a frame of flow `flow` leaves from.
    pub fn pick(&self, flow: u32) -> usize {
        flow as usize % self.socks.len().max(1)
    }

    /// Source ports, in pick order.
    pub fn ports(&self) -> Vec<u16> {
        self.socks
            .iter()
            .filter_map(|(s, _)| s.local_addr().ok().map(|a| a.port()))
            .collect()
    }

    fn max_gso_segments(&self, from: usize) -> usize {
        self.socks
            .get(from)
            .map_or(1, |(_, st)| st.max_gso_segments())
    }

    fn send(
        &self,
        from: usize,
        dest: SocketAddrV4,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let Some((sock, state)) = self.socks.get(from) else {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        };
        let t = Transmit {
            destination: SocketAddr::V4(dest),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        state.try_send(sock.into(), &t)
    }

    /// As `send`, for a run whose bytes are gathered from several places (headers in the
    /// run's arena, payloads still in the TAP's read buffers): one `sendmsg` with
    /// `UDP_SEGMENT`. quinn-udp sends only contiguous buffers, hence nix here.
    fn send_gather(
        &self,
        from: usize,
        dest: SocketAddrV4,
        iov: &[IoSlice<'_>],
        segment: Option<usize>,
    ) -> io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn};
        let Some((sock, _)) = self.socks.get(from) else {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        };
        let to = SockaddrIn::from(dest);
        let seg = segment.unwrap_or(0) as u16;
        let gso = [ControlMessage::UdpGsoSegments(&seg)];
        let cmsgs: &[ControlMessage<'_>] = if segment.is_some() { &gso } else { &[] };
        sendmsg(
            sock.as_raw_fd(),
            iov,
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
            Some(&to),
        )
        .map(drop)
        .map_err(io::Error::from)
    }
}

/// A node's underlay: the receiving socket of each worker and the shared sending pool.
pub struct Sockets {
    pub rx: Vec<UdpSocket>,
    pub tx: Arc<SendPool>,
}

fn udp_socket(addr: SocketAddrV4, reuse_port: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_cloexec(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&SockAddr::from(addr))?;
    Ok(s)
}

fn buffers(s: &Socket) {
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
}

impl Sockets {
    /// Binds the VXLAN port of `addr` for `workers` workers, with its steering program, and
    /// the sending pool beside it. Fails if another process holds the port: the group is
    /// joined only after a plain bind of the port succeeded, so a second overlayd on the same
    /// address cannot silently share it.
    pub fn bind(addr: Ipv4Addr, port: u16, workers: usize) -> io::Result<Sockets> {
        let at = SocketAddrV4::new(addr, port);
        let workers = workers.max(1);
        drop(udp_socket(at, false)?);
        let mut rx = Vec::with_capacity(workers);
        for _ in 0..workers {
            let s = udp_socket(at, true)?;
            buffers(&s);
            rx.push(UdpSocket::from(s));
        }
        if let Some(first) = rx.first() {
            crate::sys::steer::attach(first, workers as u32)?;
        }
        let tx = SendPool::new(send_ports(addr)?)?;
        Ok(Sockets {
            rx,
            tx: Arc::new(tx),
        })
    }
}

impl Sockets {
    /// The underlay of an upgrade's successor: the predecessor's receiving sockets (`rx`,
    /// its `SO_REUSEPORT` group with its steering program, handed over by fd) and a sending
    /// pool of its own on `addr`.
    pub fn adopt(addr: Ipv4Addr, rx: Vec<std::os::fd::OwnedFd>) -> io::Result<Sockets> {
        if rx.is_empty() {
            return Err(io::Error::other("no underlay sockets were handed over"));
        }
        let rx: Vec<UdpSocket> = rx.into_iter().map(UdpSocket::from).collect();
        for s in &rx {
            if !matches!(s.local_addr()?, std::net::SocketAddr::V4(a) if *a.ip() == addr) {
                return Err(io::Error::other(
                    "the handed-over underlay sockets are not bound to --advertise-addr",
                ));
            }
        }
        let tx = SendPool::new(send_ports(addr)?)?;
        Ok(Sockets {
            rx,
            tx: Arc::new(tx),
        })
    }
}

/// [`SEND_PORTS`] sockets on consecutive ports of `addr`, a block aligned to its size in the
/// dynamic range (so that a receiver's `port % workers` spreads them evenly); ephemeral ports
/// if no free block is found after a few tries.
fn send_ports(addr: Ipv4Addr) -> io::Result<Vec<UdpSocket>> {
    let block = |base: u16| -> io::Result<Vec<UdpSocket>> {
        (0..SEND_PORTS)
            .map(|i| {
                let s = udp_socket(SocketAddrV4::new(addr, base + i), false)?;
                buffers(&s);
                // Nothing is sent to these ports; whatever is, is not kept.
                let _ = s.set_recv_buffer_size(0);
                Ok(UdpSocket::from(s))
            })
            .collect()
    };
    let blocks = (65_536 - 49_152) / u32::from(SEND_PORTS);
    for _ in 0..8 {
        let base = 49_152 + (rand::random::<u32>() % blocks) * u32::from(SEND_PORTS);
        if let Ok(b) = block(base as u16) {
            return Ok(b);
        }
    }
    block(0).or_else(|_| {
        (0..SEND_PORTS)
            .map(|_| {
                Ok(UdpSocket::from(udp_socket(
                    SocketAddrV4::new(addr, 0),
                    false,
                )?))
            })
            .collect()
    })
}

/// One worker's view of the underlay: its receiving socket and the node's sending pool.
pub struct Underlay {
    sock: UdpSocket,
    state: UdpSocketState,
    port: u16,
    pool: Arc<SendPool>,
}

impl Underlay {
    pub fn new(sock: UdpSocket, pool: Arc<SendPool>) -> io::Result<Underlay> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&sock).into())?;
        let port = sock.local_addr()?.port();
        Ok(Underlay {
            sock,
            state,
            port,
            pool,
        })
    }

    /// An underlay of one socket that also sends (tests, tools).
    pub fn single(sock: UdpSocket) -> io::Result<Underlay> {
        let pool = Arc::new(SendPool::new(vec![sock.try_clone()?])?);
        Underlay::new(sock, pool)
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    pub fn pool(&self) -> &SendPool {
        &self.pool
    }

    /// The local (VXLAN) port, which sealed datagrams name in their inner UDP header.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A run of VXLAN datagrams to one VTEP from one pool socket, all `seg` bytes but possibly
/// the last, laid end to end so that one GSO send carries them. Frames are written straight
/// into their place behind their headers ([`TxBatch::queue_with`]), or only their headers
/// are, and their payloads are gathered from the TAP's read buffer by the send itself
/// ([`TxBatch::queue_gather`]: a segment cut from a super-frame is not copied here at all).
pub struct TxBatch {
    /// Made once at full size and never zeroed again; `used` bytes are in use.
    arena: Box<[u8]>,
    used: usize,
    /// The run's bytes in order: ranges of the arena, and payloads gathered from elsewhere
    /// ([`TxBatch::queue_gather`]); `bytes` in all.
    pieces: Vec<Piece>,
    bytes: usize,
    /// The VTEP and the pool socket of the run.
    dest: Option<(SocketAddrV4, usize)>,
    seg: usize,
    count: usize,
    /// The last datagram was shorter than `seg`: nothing may follow it in this run.
    closed: bool,
    /// The worker whose counters the sends go to.
    lane: usize,
}

impl Default for TxBatch {
    fn default() -> Self {
        TxBatch::for_lane(0)
    }
}

impl TxBatch {
    /// The batch of the worker at `lane`.
    pub fn for_lane(lane: usize) -> TxBatch {
        TxBatch {
            arena: vec![0u8; MAX_GSO_BYTES].into_boxed_slice(),
            used: 0,
            pieces: Vec::with_capacity(2 * MAX_RUN + 1),
            bytes: 0,
            dest: None,
            seg: 0,
            count: 0,
            closed: false,
            lane,
        }
    }
}

/// Most datagrams in one run (the kernel's UDP GSO limit was 64 before Linux 6.9).
const MAX_RUN: usize = 64;

/// A piece of a run: bytes of the arena, or bytes of one of the caller's buffers (a TAP
/// read buffer, given again at [`TxBatch::flush`]).
#[derive(Debug, Clone)]
enum Piece {
    Arena(Range<usize>),
    Gathered(Gather),
}

/// A payload to gather: buffer `buf` of the caller's, bytes `range` of it.
#[derive(Debug, Clone)]
pub struct Gather {
    pub buf: usize,
    pub range: Range<usize>,
}

/// Where a frame goes: its network, the VTEP, and its flow (which picks the pool socket).
#[derive(Debug, Clone, Copy)]
pub struct Dest {
    pub vni: Vni,
    pub vtep: SocketAddrV4,
    pub flow: u32,
}

/// Sealing for an encrypted network: the SPI, the sending worker's key under it and the
/// datagram's sequence number.
pub struct Seal<'a> {
    pub sa: &'a TxSa,
    pub key: &'a esp::SenderKey,
    pub seq: u32,
}

impl TxBatch {
    /// Queues `frame` (of flow `flow`, [`protocol::flow::hash`]) for `vtep` in VXLAN with
    /// `vni` — sealed in ESP when `seal` is given; returns how many datagrams went out now (a
    /// run is sent when the next frame cannot join it). Sealed datagrams of equal frames are
    /// of equal length, so they form GSO runs like plain ones.
    #[allow(clippy::too_many_arguments)]
    pub fn queue(
        &mut self,
        u: &Underlay,
        counters: &Counters,
        vni: Vni,
        vtep: SocketAddrV4,
        flow: u32,
        frame: &[u8],
        seal: Option<Seal<'_>>,
    ) -> u64 {
        let to = Dest { vni, vtep, flow };
        self.queue_with(u, counters, to, frame.len(), seal, &[], |b| {
            b.copy_from_slice(frame)
        })
    }

    /// As [`TxBatch::queue`], for a frame of `frame_len` bytes that `fill` writes into its
    /// place in the run (every byte of the slice it is given). `bufs`: the caller's buffers
    /// that gathered payloads lie in, should the run be sent now.
    #[allow(clippy::too_many_arguments)]
    pub fn queue_with(
        &mut self,
        u: &Underlay,
        counters: &Counters,
        to: Dest,
        frame_len: usize,
        seal: Option<Seal<'_>>,
        bufs: &[Vec<u8>],
        fill: impl FnOnce(&mut [u8]),
    ) -> u64 {
        let vxlan_len = vxlan::HEADER_LEN + frame_len;
        let len = match &seal {
            Some(_) => esp::sealed_len(vxlan_len),
            None => vxlan_len,
        };
        let Some(sent) = self.make_room(u, counters, to, len, bufs) else {
            return 0;
        };
        let start = self.used;
        let inner = start
            + if seal.is_some() {
                esp::HEADER_LEN + esp::INNER_UDP_LEN
            } else {
                0
            };
        let body = inner + vxlan::HEADER_LEN;
        vxlan::Repr { vni: to.vni }.emit(&mut vxlan::Packet::new_unchecked(
            &mut self.arena[inner..body],
        ));
        fill(&mut self.arena[body..body + frame_len]);
        if let Some(Seal { sa, key, seq }) = seal {
            let port = u.port();
            let dgram = &mut self.arena[start..start + len];
            if esp::seal_in_place(dgram, vxlan_len, sa.spi, seq, key, port).is_err() {
                // Cannot happen (the room was checked above); never send the clear text.
                counters.count_drop(DropReason::EspNoKey);
                if self.count == 0 {
                    self.dest = None;
                }
                return sent;
            }
        }
        self.push_arena(start..start + len);
        self.added(len);
        sent
    }

    /// Queues a plain (unsealed) frame whose first `head_len` bytes `fill` writes into the
    /// run and whose rest is `payload`, gathered from the caller's `bufs` when the run is
    /// sent: a segment cut from a super-frame leaves without its payload being copied here.
    #[allow(clippy::too_many_arguments)]
    pub fn queue_gather(
        &mut self,
        u: &Underlay,
        counters: &Counters,
        to: Dest,
        head_len: usize,
        payload: Gather,
        bufs: &[Vec<u8>],
        fill: impl FnOnce(&mut [u8]),
    ) -> u64 {
        let head = vxlan::HEADER_LEN + head_len;
        let len = head + payload.range.len();
        let Some(sent) = self.make_room(u, counters, to, len, bufs) else {
            return 0;
        };
        let start = self.used;
        let body = start + vxlan::HEADER_LEN;
        vxlan::Repr { vni: to.vni }.emit(&mut vxlan::Packet::new_unchecked(
            &mut self.arena[start..body],
        ));
        fill(&mut self.arena[body..start + head]);
        self.push_arena(start..start + head);
        if !payload.range.is_empty() {
            self.pieces.push(Piece::Gathered(payload));
        }
        self.added(len);
        sent
    }

    /// Readies the run for a datagram of `len` bytes to `to`: sends the run first if the
    /// datagram cannot join it. None: the datagram can never be sent (counted).
    fn make_room(
        &mut self,
        u: &Underlay,
        counters: &Counters,
        to: Dest,
        len: usize,
        bufs: &[Vec<u8>],
    ) -> Option<u64> {
        let from = u.pool.pick(to.flow);
        if len > MAX_DGRAM {
            counters.count_drop(DropReason::OffloadMalformed);
            return None;
        }
        let fits = self.dest == Some((to.vtep, from))
            && !self.closed
            && len <= self.seg
            && self.count < u.pool.max_gso_segments(from).min(MAX_RUN)
            && self.bytes + len <= MAX_GSO_BYTES;
        let sent = if fits || self.count == 0 {
            0
        } else {
            self.flush(u, counters, bufs)
        };
        if self.count == 0 {
            self.dest = Some((to.vtep, from));
            self.seg = len;
        }
        Some(sent)
    }

    /// Adds arena bytes to the run, joining the previous piece when they follow it.
    fn push_arena(&mut self, r: Range<usize>) {
        self.used = r.end;
        if let Some(Piece::Arena(last)) = self.pieces.last_mut() {
            if last.end == r.start {
                last.end = r.end;
                return;
            }
        }
        self.pieces.push(Piece::Arena(r));
    }

    fn added(&mut self, len: usize) {
        self.bytes += len;
        self.count += 1;
        self.closed = len < self.seg;
    }

    /// Sends the queued run; returns how many datagrams it held (0 on failure, counted).
    /// `bufs`: the buffers gathered payloads lie in.
    pub fn flush(&mut self, u: &Underlay, counters: &Counters, bufs: &[Vec<u8>]) -> u64 {
        let (Some((dest, from)), n) = (self.dest, self.count) else {
            return 0;
        };
        if n == 0 {
            return 0;
        }
        let segment = (n > 1).then_some(self.seg);
        let result = match self.pieces.as_slice() {
            [Piece::Arena(r)] => u.pool.send(from, dest, &self.arena[r.clone()], segment),
            pieces => {
                let mut iov = [IoSlice::new(&[]); 2 * MAX_RUN + 1];
                let mut whole = pieces.len() <= iov.len();
                for (slot, p) in iov.iter_mut().zip(pieces) {
                    let bytes = match p {
                        Piece::Arena(r) => self.arena.get(r.clone()),
                        Piece::Gathered(g) => bufs.get(g.buf).and_then(|b| b.get(g.range.clone())),
                    };
                    match bytes {
                        Some(b) => *slot = IoSlice::new(b),
                        None => whole = false,
                    }
                }
                if whole {
                    u.pool
                        .send_gather(from, dest, &iov[..pieces.len()], segment)
                } else {
                    Err(io::Error::from(io::ErrorKind::InvalidInput))
                }
            }
        };
        let sent = match result {
            Ok(()) => {
                let w = counters.worker(self.lane);
                bump(&w.underlay_tx, n as u64);
                bump(&w.underlay_tx_bytes, self.bytes as u64);
                w.gso.record(n as u64);
                n as u64
            }
            Err(_) => {
                for _ in 0..n {
                    counters.count_drop(DropReason::WriteFailed);
                }
                0
            }
        };
        self.used = 0;
        self.bytes = 0;
        self.pieces.clear();
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

    /// Lists every received datagram (GRO-coalesced ones split by their stride) into `out`,
    /// by place, so that the caller may hold on to several at once (GRO keeps where the
    /// payloads lie, not copies).
    pub fn datagrams(&self, out: &mut Vec<Datagram>) {
        out.clear();
        for (buf, (m, b)) in self.meta[..self.filled].iter().zip(&self.bufs).enumerate() {
            let stride = m.stride.max(1);
            let len = m.len.min(b.len());
            out.extend((0..len).step_by(stride).map(|start| Datagram {
                from: m.addr,
                buf,
                start,
                end: (start + stride).min(len),
            }));
        }
    }

    /// A datagram's bytes, writable in place.
    pub fn bytes_mut(&mut self, d: &Datagram) -> &mut [u8] {
        &mut self.bufs[d.buf][d.start..d.end]
    }

    /// Bytes `range` of receive buffer `buf` (as a datagram's place names them).
    pub fn part(&self, buf: usize, range: std::ops::Range<usize>) -> &[u8] {
        &self.bufs[buf][range]
    }
}

/// Where a received datagram lies: a receive buffer and its bytes there, and its sender.
#[derive(Debug, Clone, Copy)]
pub struct Datagram {
    pub from: SocketAddr,
    pub buf: usize,
    pub start: usize,
    pub end: usize,
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
        (
            Underlay::single(a).unwrap(),
            Underlay::single(b).unwrap(),
            to,
        )
    }

    fn receive(u: &Underlay, want: usize) -> Vec<Vec<u8>> {
        let mut rx = RxBatch::new(u);
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < end {
            rx.recv(u).unwrap();
            let mut list = Vec::new();
            rx.datagrams(&mut list);
            got.extend(list.iter().map(|d| rx.bytes_mut(d).to_vec()));
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
            sent += tx.queue(&a, &counters, vni, to, 0, f, None);
        }
        sent += tx.flush(&a, &counters, &[]);
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
        let c = Underlay::single(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
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
            sent += tx.queue(&a, &counters, vni, to, 0, &vec![0xab; len], None);
        }
        sent += tx.flush(&a, &counters, &[]);
        assert_eq!(sent, 5);
        let lens: Vec<usize> = receive(&b, 4).iter().map(|d| d.len() - 8).collect();
        assert_eq!(lens, [1000, 200, 1000, 64]);
        assert_eq!(receive(&c, 1).len(), 1);
    }

    /// Segments whose headers are written into the run and whose payloads are gathered
    /// from the caller's buffers (some copied frames between them) leave in GSO runs of the
    /// same shape and arrive as if each had been copied whole; a payload whose buffer is
    /// missing at send time drops the run, counted, instead of sending garbage.
    #[test]
    fn gathered_payloads_arrive_behind_their_headers() {
        let (a, b, to) = pair();
        let counters = Counters::default();
        let vni = Vni::new(4097).unwrap();
        let dest = Dest {
            vni,
            vtep: to,
            flow: 0,
        };
        let bufs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 4000]).collect();
        let mut tx = TxBatch::default();
        let mut sent = 0;
        let mut want = Vec::new();
        for k in 0..90usize {
            let (buf, start) = (k % 3, (k / 3) % 2 * 1400);
            let head = [0x40 + (k % 7) as u8; 54];
            let payload = Gather {
                buf,
                range: start..start + 1400,
            };
            let mut whole = head.to_vec();
            whole.extend_from_slice(&bufs[buf][payload.range.clone()]);
            want.push(whole);
            sent += tx.queue_gather(&a, &counters, dest, 54, payload, &bufs, |h| {
                h.copy_from_slice(&head)
            });
        }
        let last = vec![0x99u8; 100];
        sent += tx.queue(&a, &counters, vni, to, 0, &last, None);
        want.push(last);
        sent += tx.flush(&a, &counters, &bufs);
        assert_eq!(sent, 91);
        let got = receive(&b, 91);
        assert_eq!(got.len(), 91);
        for (d, w) in got.iter().zip(&want) {
            let p = vxlan::Packet::new_checked(&d[..]).unwrap();
            assert_eq!(vxlan::Repr::parse(&p).unwrap().vni, vni);
            assert_eq!(p.payload(), &w[..]);
        }
        let payload = Gather {
            buf: 7,
            range: 0..100,
        };
        tx.queue_gather(&a, &counters, dest, 54, payload, &bufs, |h| h.fill(1));
        assert_eq!(tx.flush(&a, &counters, &bufs), 0);
        assert_eq!(counters.dropped(DropReason::WriteFailed), 1);
    }
}
