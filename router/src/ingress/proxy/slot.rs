//! One proxied TCP connection's side in the ingress endpoint: its smoltcp socket, in a
//! `SocketSet` of its own (the interface, polled for one connection, walks that one socket:
//! smoltcp 0.14 finds a segment's socket, and sends, by walking the whole set it is given),
//! and the memory of its two buffers.
//!
//! The buffers are one mapping of our own ([`Pages`]), not the allocator's: an idle
//! connection's buffers are returned to the kernel ([`TcpSlot::trim`]) once both are empty,
//! so that it costs its socket struct and no buffer page; the next byte faults a page back
//! in. "Empty" must include the receive buffer's out-of-order data, which smoltcp keeps
//! beyond its queue and does not show: the slot follows the sequence numbers itself
//! ([`Segment`], [`TcpSlot::seen`], [`TcpSlot::delivered`]) and trims only when every byte
//! the task sent has been handed to the client.

use crate::sys::pages::Pages;
use smoltcp::iface::{Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::IpEndpoint;
use std::io;
use std::sync::OnceLock;

/// Per-connection smoltcp buffers, each: a 64 KiB super-segment fits in either with room to
/// spare, and the window scales past 64 KiB. Untouched pages cost no memory.
pub const TCP_BUFFER: usize = 256 << 10;
/// Probes on idle connections, and how long unacknowledged data may wait before the
/// connection is given up.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
const USER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the endpoint's demux reads of a TCP segment: enough to route it and to follow the
/// receive sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The endpoint's (local) port.
    pub port: u16,
    pub seq: u32,
    /// Payload bytes (SYN and FIN not counted).
    pub len: u32,
    pub syn: bool,
}

/// One smoltcp TCP socket in a set of its own, over buffers it can give back.
pub struct TcpSlot {
    /// Declared before `pages`: dropped first, so that the socket's borrowed buffers end
    /// before their mapping does.
    set: SocketSet<'static>,
    handle: SocketHandle,
    pages: Pages,
    /// The task's next sequence number in order: its SYN's + 1 + bytes handed to the client
    /// (`None` until its SYN-ACK is seen).
    next: Option<u32>,
    /// The end of the furthest payload the task has sent.
    furthest: u32,
    /// Pages may be resident (not trimmed since last used).
    warm: bool,
    /// Bytes moved since the last [`TcpSlot::trim_if_idle`].
    used: bool,
}

impl Default for TcpSlot {
    /// No socket and no buffers: a placeholder only.
    fn default() -> TcpSlot {
        TcpSlot {
            set: SocketSet::new(Vec::new()),
            handle: SocketHandle::default(),
            pages: Pages::none(),
            next: None,
            furthest: 0,
            warm: false,
            used: false,
        }
    }
}

impl TcpSlot {
    /// A new socket; its buffers mapped, no page resident.
    pub fn allocate() -> io::Result<TcpSlot> {
        let mut pages = Pages::map(2 * TCP_BUFFER)?;
        // SAFETY: the slices live in the socket, which lives in `set`; `set` is dropped
        // before `pages` (field order) and nothing else takes them out; called once.
        let (rx, tx) = unsafe { pages.halves() };
        let mut sock = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        sock.set_nagle_enabled(false);
        sock.set_keep_alive(Some(KEEP_ALIVE));
        sock.set_timeout(Some(USER_TIMEOUT));
        sock.set_tsval_generator(Some(tsval));
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let handle = set.add(sock);
        Ok(TcpSlot {
            set,
            handle,
            pages,
            next: None,
            furthest: 0,
            warm: false,
            used: false,
        })
    }

    pub fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.set.get_mut::<tcp::Socket>(self.handle)
    }

    /// Opens a connection from the endpoint's `local_port` to `remote`.
    pub fn connect(
        &mut self,
        iface: &mut Interface,
        remote: IpEndpoint,
        local_port: u16,
    ) -> Result<(), tcp::ConnectError> {
        self.next = None;
        self.furthest = 0;
        self.used();
        self.socket().connect(iface.context(), remote, local_port)
    }

    /// Hands the frame at the head of `device`'s queue (a segment for this connection) to
    /// its socket.
    pub fn ingress<D: Device>(
        &mut self,
        iface: &mut Interface,
        now: Instant,
        device: &mut D,
    ) -> PollIngressSingleResult {
        iface.poll_ingress_single(now, device, &mut self.set)
    }

    /// Sends what the socket has to send; the socket's next deadline.
    pub fn egress<D: Device>(
        &mut self,
        iface: &mut Interface,
        now: Instant,
        device: &mut D,
    ) -> Option<Instant> {
        while !matches!(
            iface.poll_egress(now, device, &mut self.set),
            PollResult::None
        ) {}
        iface.poll_at(now, &self.set)
    }

    /// Notes a segment from the task (before the socket gets it).
    pub fn seen(&mut self, seg: &Segment) {
        if seg.syn {
            let first = seg.seq.wrapping_add(1);
            self.next = Some(first);
            self.furthest = first;
            return;
        }
        let end = seg.seq.wrapping_add(seg.len);
        if self.next.is_some() && after(end, self.furthest) {
            self.furthest = end;
        }
    }

    /// Notes `n` bytes taken from the receive buffer.
    pub fn delivered(&mut self, n: usize) {
        if let Some(next) = &mut self.next {
            *next = next.wrapping_add(n as u32);
        }
    }

    /// Notes that bytes moved through the buffers (their pages may be resident).
    pub fn used(&mut self) {
        self.warm = true;
        self.used = true;
    }

    /// Trims the buffers if no bytes moved since the last call ([`TcpSlot::trim`]).
    /// True when the buffers are cold (nothing left to trim).
    pub fn trim_if_idle(&mut self) -> bool {
        if std::mem::take(&mut self.used) {
            return false;
        }
        self.trim()
    }

    /// Pages may be resident.
    pub fn is_warm(&self) -> bool {
        self.warm
    }

    /// Returns the buffers' pages if both hold nothing: nothing to send or unacknowledged,
    /// nothing received and not yet handed on, in order or not. True when trimmed (or
    /// already cold).
    pub fn trim(&mut self) -> bool {
        if !self.warm {
            return true;
        }
        let in_order = self.next == Some(self.furthest);
        let sock = self.socket();
        if !in_order || sock.send_queue() != 0 || sock.recv_queue() != 0 {
            return false;
        }
        self.pages.discard();
        self.warm = false;
        true
    }
}

/// `a` is after `b` in sequence space (RFC 793's modular comparison).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Milliseconds for TCP timestamps: a task in TIME-WAIT takes a new SYN from a reused port
/// when its timestamp is newer (RFC 6191).
fn tsval() -> u32 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, len: u32, syn: bool) -> Segment {
        Segment {
            port: 1025,
            seq,
            len,
            syn,
        }
    }

    #[test]
    fn in_order_until_a_gap_and_back_once_delivered() {
        let mut s = TcpSlot::allocate().unwrap();
        s.used();
        // No SYN-ACK yet: nothing is known, nothing is trimmed.
        assert!(!s.trim());
        s.seen(&seg(u32::MAX - 1, 0, true));
        assert!(s.trim());
        s.used();
        // Bytes 0..100 in order, 200..300 beyond a gap.
        s.seen(&seg(u32::MAX, 100, false));
        s.seen(&seg(u32::MAX.wrapping_add(200), 100, false));
        s.delivered(100);
        assert!(!s.trim(), "out-of-order data must keep its pages");
        // The gap filled and everything handed on; a stale retransmission changes nothing.
        s.seen(&seg(u32::MAX.wrapping_add(100), 100, false));
        s.delivered(200);
        s.seen(&seg(u32::MAX, 100, false));
        assert!(s.trim());
        assert!(!s.is_warm());
    }

    #[test]
    fn sequence_comparison_wraps() {
        assert!(after(5, u32::MAX));
        assert!(!after(u32::MAX, 5));
        assert!(!after(7, 7));
    }
}
