//! The wire between the ingress endpoint's TCP/IP stack and the datapath: a Unix
//! `SOCK_SEQPACKET` socket pair, one frame per message with the virtio-net header a TAP uses.
//! The datapath holds one end exactly as it holds a task's TAP fd, so the endpoint's frames
//! go through the same switch (ARP answers, VXLAN, offloads) with no special case there; this
//! module is the other end, as a smoltcp [`Device`].
//!
//! Frames for the stack are read in batches into recycled buffers; frames from it are queued
//! and written when the socket takes them. Checksums: the stack computes none for TCP and
//! UDP. What it sends carries a partial checksum and, for TCP super-segments (smoltcp's
//! segmentation offload), a GSO request, which the datapath completes or segments like a
//! task's ([`vnet::offload_partial`]). What it receives is not verified again: frames come
//! from a local TAP (the kernel's own, possibly still partial) or from the underlay, whose
//! UDP checksum covered them.

use datapath::stats::Counters;
use datapath::switch::MAX_SUPER_FRAME;
use datapath::vnet::{self, VnetHdr};
use datapath::vocab::DropReason;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// One message: header and the largest (super-)frame.
const BUF: usize = vnet::HDR_LEN + MAX_SUPER_FRAME;
/// Frames read ahead for the stack, and frames waiting for the socket.
const RX_QUEUE: usize = 256;
const TX_QUEUE: usize = 256;
/// Recycled buffers kept (up to 64 KiB each): 8 MiB at most, however busy the link was.
const POOL: usize = 128;
/// Largest frame the stack may hand over as one TCP super-segment (IPv4 length ≤ 64 KiB).
const TSO_FRAME: usize = 14 + 65_000;
/// Socket buffer of each end: room for a few dozen super-frames in flight.
const SOCKET_BUFFER: usize = 4 << 20;

/// Makes the pair: (the datapath's end, the endpoint's end), both nonblocking.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?;
    for fd in [&a, &b] {
        socket::setsockopt(fd, socket::sockopt::SndBuf, &SOCKET_BUFFER)?;
        socket::setsockopt(fd, socket::sockopt::RcvBuf, &SOCKET_BUFFER)?;
    }
    Ok((a, b))
}

/// The endpoint's end of the link, as smoltcp's device.
pub struct Link {
    fd: OwnedFd,
    /// IP MTU of the network (the stack's segments for the wire stay within it).
    mtu: usize,
    /// Buffers and the length of the message in each.
    rx: VecDeque<(Vec<u8>, usize)>,
    tx: VecDeque<(Vec<u8>, usize)>,
    /// Recycled buffers. They keep their length (only ever grown), so that reusing one
    /// costs no zeroing.
    pool: RefCell<Vec<Vec<u8>>>,
    /// The socket may have frames to read (edge-triggered: true until a read would block).
    pub readable: bool,
    /// The socket may take frames (true until a write would block).
    pub writable: bool,
    /// Where frames that could not be written (the datapath is gone) or were too short are
    /// counted, as the datapath counts its own.
    counters: Arc<Counters>,
}

impl Link {
    pub fn new(fd: OwnedFd, mtu: u16, counters: Arc<Counters>) -> Link {
        Link {
            fd,
            mtu: usize::from(mtu),
            rx: VecDeque::with_capacity(RX_QUEUE),
            tx: VecDeque::with_capacity(TX_QUEUE),
            pool: RefCell::new(Vec::new()),
            readable: true,
            writable: true,
            counters,
        }
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    pub fn set_mtu(&mut self, mtu: u16) {
        self.mtu = usize::from(mtu);
    }

    /// A buffer of at least `len` bytes.
    fn buffer(pool: &RefCell<Vec<Vec<u8>>>, len: usize) -> Vec<u8> {
        let mut b = pool.borrow_mut().pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }

    fn recycle(pool: &RefCell<Vec<Vec<u8>>>, b: Vec<u8>) {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL {
            pool.push(b);
        }
    }

    /// Reads frames for the stack until the socket is empty or the queue is full.
    pub fn read_frames(&mut self) {
        while self.readable && self.rx.len() < RX_QUEUE {
            let mut b = Link::buffer(&self.pool, BUF);
            match nix::unistd::read(&self.fd, &mut b[..BUF]) {
                Ok(n) if n >= vnet::HDR_LEN + 14 => self.rx.push_back((b, n)),
                Ok(0) => {
                    self.readable = false;
                    Link::recycle(&self.pool, b);
                }
                Ok(_) => {
                    self.counters.count_drop(DropReason::Runt);
                    Link::recycle(&self.pool, b);
                }
                Err(nix::errno::Errno::EINTR) => Link::recycle(&self.pool, b),
                Err(_) => {
                    // EAGAIN, or the datapath's end closed: nothing more for now.
                    self.readable = false;
                    Link::recycle(&self.pool, b);
                }
            }
        }
    }

    /// Whether frames wait for the stack.
    pub fn has_rx(&self) -> bool {
        !self.rx.is_empty()
    }

    /// The next frame the stack will receive (Ethernet, without the virtio-net header), so
    /// that the proxy can choose which sockets it goes to.
    pub fn peek_rx(&self) -> Option<&[u8]> {
        self.rx.front().map(|(b, len)| &b[vnet::HDR_LEN..*len])
    }

    /// Writes queued frames until the socket is full.
    pub fn flush(&mut self) {
        while self.writable {
            let Some((b, len)) = self.tx.front() else {
                return;
            };
            match socket::send(self.fd.as_raw_fd(), &b[..*len], MsgFlags::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => {
                    self.writable = false;
                    return;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => self.counters.count_drop(DropReason::WriteFailed),
            }
            if let Some((b, _)) = self.tx.pop_front() {
                Link::recycle(&self.pool, b);
            }
        }
    }

    /// Puts `fd` in place of the socket, queues kept (an upgrade's predecessor, draining:
    /// its datapath stops, its frames go through the successor's from now on). Returns the
    /// socket it replaced.
    pub fn swap_fd(&mut self, fd: OwnedFd) -> OwnedFd {
        self.readable = true;
        self.writable = true;
        std::mem::replace(&mut self.fd, fd)
    }

    /// Takes the next frame for the stack as it came (virtio-net header and frame), for
    /// another process's endpoint; `done` gives the buffer back.
    pub fn pop_rx_raw(&mut self) -> Option<(Vec<u8>, usize)> {
        self.rx.pop_front()
    }

    /// The next frame for the stack as it came (virtio-net header and frame).
    pub fn peek_rx_raw(&self) -> Option<&[u8]> {
        self.rx.front().map(|(b, len)| &b[..*len])
    }

    /// Counts a frame the endpoint dropped.
    pub fn count_drop(&self, reason: DropReason) {
        self.counters.count_drop(reason);
    }

    /// Gives back a buffer of [`Link::pop_rx_raw`].
    pub fn done(&self, b: Vec<u8>) {
        Link::recycle(&self.pool, b);
    }

    /// Queues a message as it came from another process's endpoint (virtio-net header and
    /// frame) for the datapath; false if the queue is full.
    pub fn push_tx_raw(&mut self, msg: &[u8]) -> bool {
        if self.tx.len() >= TX_QUEUE {
            return false;
        }
        let mut b = Link::buffer(&self.pool, msg.len());
        b[..msg.len()].copy_from_slice(msg);
        self.tx.push_back((b, msg.len()));
        true
    }

    /// Drops every queued frame (the endpoint is being rebuilt).
    pub fn clear(&mut self) {
        self.rx.clear();
        self.tx.clear();
    }
}

pub struct RxToken<'a> {
    frame: (Vec<u8>, usize),
    pool: &'a RefCell<Vec<Vec<u8>>>,
}

pub struct TxToken<'a> {
    tx: &'a mut VecDeque<(Vec<u8>, usize)>,
    pool: &'a RefCell<Vec<Vec<u8>>>,
    gso: Option<u16>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let (b, len) = self.frame;
        let r = f(&b[vnet::HDR_LEN..len]);
        Link::recycle(self.pool, b);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let total = vnet::HDR_LEN + len;
        let mut b = Link::buffer(self.pool, total);
        let (hdr, frame) = b[..total].split_at_mut(vnet::HDR_LEN);
        let r = f(frame);
        let h: VnetHdr = vnet::offload_partial(frame, self.gso);
        let hdr: &mut [u8; vnet::HDR_LEN] = hdr.try_into().expect("header slice");
        h.emit(hdr);
        self.tx.push_back((b, total));
        r
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.gso = meta.segmentation_offload_size.map(|s| s.get());
    }
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.tx.len() >= TX_QUEUE {
            return None;
        }
        let frame = self.rx.pop_front()?;
        Some((
            RxToken {
                frame,
                pool: &self.pool,
            },
            TxToken {
                tx: &mut self.tx,
                pool: &self.pool,
                gso: None,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        if self.tx.len() >= TX_QUEUE {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            pool: &self.pool,
            gso: None,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        let mut csum = ChecksumCapabilities::ignored();
        // IPv4 headers and ICMP answers are whole; TCP and UDP are left to the datapath.
        csum.ipv4 = Checksum::Tx;
        csum.icmpv4 = Checksum::Tx;
        caps.checksum = csum;
        caps.segmentation.tcpv4 = NonZeroUsize::new(TSO_FRAME);
        caps
    }
}
