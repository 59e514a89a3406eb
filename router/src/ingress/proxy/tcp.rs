//! TCP through the proxy: an accepted client stream joined to a smoltcp TCP socket that
//! connects from the ingress endpoint to a task, and the bytes pumped between the two.
//!
//! A connection moves data only when the other side can take it: client bytes are read
//! straight into the smoltcp socket's send buffer while it has room, and backend bytes are
//! written from its receive buffer while the client's socket takes them, so every buffer is
//! bounded and a slow reader slows the writer down (TCP windows do the rest). Half-close is
//! passed on in both directions; a reset on either side resets the other; a connection
//! whose task leaves the service's backends is reset at once, unless the task is draining
//! (on its way out: it finishes what it serves). With `proxy=v2` a PROXY
//! protocol v2 header naming the client goes ahead of its bytes.
//!
//! Each connection's smoltcp socket sits in a `SocketSet` of its own, over buffers that are
//! returned when it idles ([`TcpSlot`], `slot`). The proxy visits a connection only when it
//! is ready or its deadline comes (`schedule`), and a segment is handed to its connection's
//! set by its local port (`demux`).

use super::listener::{ListenerKey, Socket};
use super::slot::TcpSlot;
use super::{Owner, Proxy};
use crate::ingress::stats::PortCounters;
use mio::net::TcpStream;
use mio::Interest;
use protocol::state::ProxyProtocol;
use smoltcp::socket::tcp;
use smoltcp::time::Instant as StackInstant;
use smoltcp::wire::{IpAddress, IpEndpoint};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tcp::State;
use tracing::{debug, warn};

/// Closed sockets kept for reuse: a reused socket skips a mapping and its page faults.
/// Few: each may hold pages its last connection touched.
const IDLE_SOCKETS: usize = 64;
/// A task that does not answer a SYN in this long: the client is reset.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) slot: TcpSlot,
    pub(super) local_port: u16,
    pub(super) backend: Ipv4Addr,
    pub(super) listener: ListenerKey,
    pub(super) counters: Arc<PortCounters>,
    /// PROXY protocol header still to send ahead of the client's bytes.
    pub(super) header: Option<Vec<u8>>,
    /// When the connect began (the stack's clock), for [`CONNECT_TIMEOUT`].
    pub(super) opened: StackInstant,
    pub(super) readable: bool,
    pub(super) writable: bool,
    /// The client sent FIN (read returned 0).
    pub(super) client_eof: bool,
    /// FIN queued towards the task.
    pub(super) fin_sent: bool,
    /// FIN passed on to the client.
    pub(super) client_shut: bool,
    /// Ends after the next poll of the interface (so that a reset goes out first).
    pub(super) done: Option<End>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    Clean,
    Reset,
}

/// Sets SO_LINGER to zero: closing the socket then sends RST instead of FIN.
fn linger_zero(stream: &TcpStream) {
    let l = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    let _ = unsafe {
        nix::libc::setsockopt(
            stream.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_LINGER,
            (&l as *const nix::libc::linger).cast(),
            std::mem::size_of::<nix::libc::linger>() as nix::libc::socklen_t,
        )
    };
}

fn proxy_header(client: SocketAddr, local: SocketAddr) -> Option<Vec<u8>> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (client, local),
    )
    .build()
    .ok()
}

impl Proxy {
    pub(super) fn accept(&mut self, key: ListenerKey) {
        loop {
            let Some(l) = self.listeners.get_mut(&key) else {
                return;
            };
            let Some(Socket::Tcp(listener)) = &l.socket else {
                return;
            };
            let (stream, client) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    return;
                }
            };
            let counters = l.counters.clone();
            let backend = if self.conns.len() >= self.max_connections {
                None
            } else {
                l.pick()
            };
            let Some((backend, local_port)) =
                backend.and_then(|b| Some((b, self.local_ports.take()?)))
            else {
                PortCounters::inc(&counters.refused);
                linger_zero(&stream);
                continue;
            };
            let target = l.view.target;
            let header = match l.view.proxy {
                Some(ProxyProtocol::V2) => stream
                    .local_addr()
                    .ok()
                    .and_then(|local| proxy_header(client, local)),
                None => None,
            };
            let Some((iface, _)) = self.iface.as_mut() else {
                self.local_ports.release(local_port);
                return;
            };
            let mut slot = match self.idle_tcp.pop().map_or_else(TcpSlot::allocate, Ok) {
                Ok(slot) => slot,
                Err(e) => {
                    warn!(error = %e, "cannot map a connection's buffers");
                    self.local_ports.release(local_port);
                    PortCounters::inc(&counters.refused);
                    linger_zero(&stream);
                    continue;
                }
            };
            let remote = IpEndpoint::new(IpAddress::Ipv4(backend), target);
            if let Err(e) = slot.connect(iface, remote, local_port) {
                debug!(error = %e, "cannot connect to task");
                self.local_ports.release(local_port);
                PortCounters::inc(&counters.refused);
                linger_zero(&stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let token = self.token();
            let mut stream = stream;
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                warn!(error = %e, "cannot poll an accepted connection");
                self.local_ports.release(local_port);
                continue;
            }
            PortCounters::inc(&counters.accepted);
            PortCounters::inc(&counters.active);
            let opened = self.now();
            self.tokens.insert(token, Owner::Conn);
            self.warm.push(token);
            self.by_port.insert(local_port, token);
            self.schedule.mark(token);
            self.conns.insert(
                token,
                Conn {
                    stream,
                    slot,
                    local_port,
                    backend,
                    listener: key,
                    counters,
                    header,
                    opened,
                    readable: true,
                    writable: true,
                    client_eof: false,
                    fin_sent: false,
                    client_shut: false,
                    done: None,
                },
            );
        }
    }

    /// Removes an ended connection: its smoltcp socket (after its reset went out: the
    /// caller polled the interface for it first), its port, and the client's socket (closed
    /// with RST when the end was a reset).
    pub(super) fn finish(&mut self, t: mio::Token) {
        let Some(mut c) = self.conns.remove(&t) else {
            return;
        };
        let end = c.done.unwrap_or(End::Reset);
        self.tokens.remove(&t);
        self.by_port.remove(&c.local_port);
        self.schedule.remove(t);
        let _ = self.poll.registry().deregister(&mut c.stream);
        // Closed or in TIME-WAIT (a reset already went out): reusable as it is.
        if !c.slot.socket().is_open() && self.idle_tcp.len() < IDLE_SOCKETS {
            self.idle_tcp.push(c.slot);
        }
        self.local_ports.release(c.local_port);
        PortCounters::dec(&c.counters.active);
        if end == End::Reset {
            PortCounters::inc(&c.counters.reset);
            linger_zero(&c.stream);
        }
    }
}

/// Ends a connection with a reset both ways (its task left, or its port closed). The
/// caller marks it ready, so that the reset goes out and the connection is removed.
pub(super) fn reset(c: &mut Conn) {
    if c.done.is_none() {
        c.done = Some(End::Reset);
        c.slot.socket().abort();
    }
}

/// Moves what can move for one connection and notes when it has ended. A reset, whichever
/// side caused it, aborts the smoltcp socket so that the task gets an RST too.
pub(super) fn pump(c: &mut Conn, now: StackInstant) {
    if c.done.is_some() {
        return;
    }
    // Out of the connection while its other fields are borrowed (an empty slot allocates
    // nothing).
    let mut slot = std::mem::take(&mut c.slot);
    let mut moved = Moved::default();
    c.done = move_bytes(c, slot.socket(), now, &mut moved);
    PortCounters::add(&c.counters.bytes_in, moved.sent);
    PortCounters::add(&c.counters.bytes_out, moved.received);
    slot.delivered(moved.received);
    if moved.received > 0 || moved.sent > 0 {
        slot.used();
    }
    if c.done == Some(End::Reset) {
        slot.socket().abort();
    }
    c.slot = slot;
}

/// Bytes one visit moved through a connection's buffers.
#[derive(Default)]
struct Moved {
    /// Taken from the receive buffer (written to the client).
    received: usize,
    /// Queued in the send buffer (read from the client, or the PROXY header).
    sent: usize,
}

/// Moves bytes both ways, counting them in `moved`.
fn move_bytes(
    c: &mut Conn,
    sock: &mut tcp::Socket,
    now: StackInstant,
    moved: &mut Moved,
) -> Option<End> {
    // The PROXY header goes first, once the connection is up.
    if let Some(h) = &c.header {
        if sock.may_send() {
            if sock.send_slice(h) != Ok(h.len()) {
                return Some(End::Reset);
            }
            moved.sent += h.len();
            c.header = None;
        }
    }
    // Client → task, while the socket has room.
    while c.readable && !c.client_eof && c.header.is_none() && sock.may_send() {
        if sock.send_queue() >= sock.send_capacity() {
            break;
        }
        let stream = &mut c.stream;
        match sock.send(|buf| match stream.read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }) {
            Ok(Ok(0)) => c.client_eof = true,
            Ok(Ok(n)) => moved.sent += n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => return Some(End::Reset),
            Err(_) => break,
        }
    }
    if c.client_eof && !c.fin_sent && c.header.is_none() {
        sock.close();
        c.fin_sent = true;
    }
    // Task → client, while the client's socket takes it.
    while c.writable && sock.can_recv() {
        let stream = &mut c.stream;
        match sock.recv(|buf| match stream.write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }) {
            Ok(Ok(n)) => moved.received += n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => return Some(End::Reset),
            Err(_) => break,
        }
    }
    let state = sock.state();
    let remote_fin = matches!(
        state,
        State::CloseWait | State::LastAck | State::Closing | State::TimeWait
    );
    if remote_fin && !c.client_shut && sock.recv_queue() == 0 {
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        c.client_shut = true;
    }
    match state {
        State::Closed if c.fin_sent && c.client_shut => Some(End::Clean),
        // Reset by the task, or given up on (timeout).
        State::Closed => Some(End::Reset),
        State::TimeWait if c.client_shut => Some(End::Clean),
        State::SynSent if now - c.opened > CONNECT_TIMEOUT.into() => Some(End::Reset),
        _ => None,
    }
}
