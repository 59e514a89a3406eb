//! The proxy thread: kernel sockets towards clients, smoltcp sockets towards tasks, and the
//! bytes between them. One mio loop owns everything (listeners, accepted streams, the link
//! to the datapath and the smoltcp interface); nothing here is shared but the counters.
//!
//! This file holds the thread and its loop: the view it is handed (`apply`), the smoltcp
//! `Interface` of the node's ingress endpoint, and the periodic sweep. What each kind of
//! socket does lives beside it: `listener` (the published ports: kernel listeners opened,
//! retried and closed), `tcp` (accepted streams pumped to and from smoltcp TCP sockets),
//! `udp` (one smoltcp UDP socket per client address, kept per port in `mappings`, capped,
//! least recently used first out) and `ports` (the endpoint's own ports for both); `demux`
//! (which sockets an arriving frame goes to) and `schedule` (which connections a turn
//! visits).
//!
//! A turn's work follows what is ready, not what exists: each TCP connection's socket is a
//! smoltcp `SocketSet` of its own, an arriving segment goes to its connection's set by the
//! local port, and only connections that are ready (their client socket signalled, a
//! segment came, they were reset) or whose deadline has come are pumped and polled for
//! egress. The shared set holds the UDP sockets; frames for no connection go there too.

mod demux;
mod listener;
mod mappings;
mod ports;
mod schedule;
mod slot;
mod tcp;
mod udp;

/// The endpoint's per-connection pieces, for the endpoint bench (benches/benches/endpoint.rs)
/// to drive without fds: the demux and a connection's socket set.
#[doc(hidden)]
pub mod endpoint {
    pub use super::demux::{classify, Dest};
    pub use super::slot::{Segment, TcpSlot};
}

use self::demux::{classify, Dest};
use self::listener::{Listener, ListenerKey};
use self::mappings::Mappings;
use self::ports::PortAlloc;
use self::schedule::Schedule;
use self::slot::TcpSlot;
use self::tcp::{pump, reset, Conn, CONNECT_TIMEOUT};
use self::udp::UdpMap;
use super::link::Link;
use super::stats::Registry;
use super::{EndpointAddr, IngressView, ListenerView};
use datapath::stats::Counters;
use datapath::vocab::DropReason;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketSet};
use smoltcp::socket::tcp::State as tcp_state;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

const LINK: Token = Token(0);
const WAKE: Token = Token(1);
/// The link to an upgrade's predecessor draining its connections (tokens handed out start
/// above it).
const PREDECESSOR: Token = Token(2);
/// Longest wait of the loop: UDP mappings and connects are checked at least this often.
const TICK: Duration = Duration::from_millis(500);

enum Msg {
    View(IngressView),
    /// An upgrade's old process: accept no more, keep the established connections.
    Leave,
    /// An upgrade's old process, its datapath about to stop: frames go over this link (to
    /// the successor's proxy, which sends them through its datapath) from now on.
    Relink(OwnedFd),
    Stop,
}

/// Sends one message (virtio-net header and frame) over a drain link; false if it could not.
fn send_frame(fd: &OwnedFd, msg: &[u8]) -> bool {
    loop {
        match nix::sys::socket::send(
            fd.as_raw_fd(),
            msg,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.is_ok(),
        }
    }
}

/// Handle to the proxy thread.
pub struct Ingress {
    tx: mpsc::Sender<Msg>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Ingress {
    /// Starts the thread on `link` (the endpoint's end of the link pair); the link counts
    /// into the datapath's `counters`, the listeners into `ports`.
    pub fn start(
        link: OwnedFd,
        counters: Arc<Counters>,
        ports: Arc<Registry>,
        max_connections: usize,
    ) -> io::Result<Ingress> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let link = Link::new(link, protocol::state::DEFAULT_MTU, counters.clone());
        poll.registry().register(
            &mut SourceFd(&link.raw_fd()),
            LINK,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let (tx, rx) = mpsc::channel();
        let half = crate::upgrade::mesh_half();
        let predecessor = crate::upgrade::take_predecessor().and_then(|(h, fd)| {
            poll.registry()
                .register(
                    &mut SourceFd(&fd.as_raw_fd()),
                    PREDECESSOR,
                    Interest::READABLE,
                )
                .ok()?;
            info!(
                half = h,
                "passing the old overlayd's mesh connections on to it while they drain"
            );
            Some((h, fd))
        });
        let mut proxy = Proxy {
            poll,
            rx,
            link,
            iface: None,
            sockets: SocketSet::new(Vec::new()),
            listeners: HashMap::new(),
            draining: BTreeSet::new(),
            tokens: HashMap::new(),
            conns: HashMap::new(),
            udp: HashMap::new(),
            local_ports: PortAlloc::of_half(half),
            half,
            predecessor,
            leaving: false,
            idle_tcp: Vec::new(),
            warm: Vec::new(),
            by_port: HashMap::new(),
            schedule: Schedule::default(),
            next_token: 2,
            epoch: Instant::now(),
            ports,
            max_connections,
            buf: vec![0u8; 65_536],
        };
        let thread = std::thread::Builder::new()
            .name("ingress".into())
            .spawn(move || proxy.run())?;
        Ok(Ingress {
            tx,
            waker,
            thread: Some(thread),
        })
    }

    /// An upgrade's old process: closes the listeners (their sockets' copies go to the
    /// successor) and keeps the established connections until they end.
    pub fn leave(&self) {
        if self.tx.send(Msg::Leave).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// An upgrade's old process, leaving: its frames go over `link` (the drain link to
    /// the successor) from now on, since its own datapath stops.
    pub fn relink(&self, link: OwnedFd) {
        if self.tx.send(Msg::Relink(link)).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Waits until a leaving proxy's last connection ended (true), or `timeout` (false: it
    /// is stopped, what remains is reset).
    pub fn wait_drained(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let drained = loop {
            match &self.thread {
                Some(t) if !t.is_finished() => {}
                _ => break true,
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.stop();
        drained
    }

    /// Hands the thread a new view (listeners, backends, the endpoint's address).
    pub fn update(&self, view: IngressView) {
        if self.tx.send(Msg::View(view)).is_ok() {
            let _ = self.waker.wake();
        }
    }

    pub fn stop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Owner {
    Listener(ListenerKey),
    Conn,
}

struct Proxy {
    poll: Poll,
    rx: mpsc::Receiver<Msg>,
    link: Link,
    iface: Option<(Interface, EndpointAddr)>,
    /// The shared set: UDP sockets (TCP connections each have their own).
    sockets: SocketSet<'static>,
    listeners: HashMap<ListenerKey, Listener>,
    /// Ingress addresses of tasks whose connections are draining ([`IngressView::draining`]).
    draining: BTreeSet<Ipv4Addr>,
    tokens: HashMap<Token, Owner>,
    conns: HashMap<Token, Conn>,
    /// Each published UDP port's mappings, by client address (none: no mapping yet).
    udp: HashMap<ListenerKey, Mappings<UdpMap>>,
    local_ports: PortAlloc,
    /// This process's half of the local ports (`crate::upgrade::mesh_half`).
    half: u16,
    /// An upgrade's predecessor still draining: its half and its end of the drain link.
    predecessor: Option<(u16, OwnedFd)>,
    /// An upgrade's old process: no listeners, established connections only; the thread
    /// ends with the last one.
    leaving: bool,
    /// Closed TCP sockets (buffers and settings kept) ready for the next connection.
    idle_tcp: Vec<TcpSlot>,
    /// Connections whose buffers may hold pages: the sweep trims those idle since the last
    /// sweep (`TcpSlot::trim_if_idle`), so that its work follows recent use.
    warm: Vec<Token>,
    /// TCP connections by the endpoint's local port (unique among live connections).
    by_port: HashMap<u16, Token>,
    /// Connections the next turn visits, and their deadlines.
    schedule: Schedule,
    next_token: usize,
    epoch: Instant,
    /// The per-port counters the API reports.
    ports: Arc<Registry>,
    max_connections: usize,
    /// One UDP datagram.
    buf: Vec<u8>,
}

impl Proxy {
    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        loop {
            let busy = self.link.readable || (self.schedule.has_ready() && self.link.writable);
            let timeout = if busy && self.iface.is_some() {
                Some(Duration::ZERO)
            } else {
                let now = self.now();
                let shared = self
                    .iface
                    .as_mut()
                    .and_then(|(i, _)| i.poll_at(now, &self.sockets));
                let next = match (shared, self.schedule.next_deadline()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let delay = next.map(|at| {
                    if at > now {
                        at - now
                    } else {
                        Default::default()
                    }
                });
                Some(delay.map_or(TICK, |d| Duration::from(d).min(TICK)))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(error = %e, "ingress poll failed; stopping");
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    LINK => {
                        self.link.readable |= ev.is_readable();
                        self.link.writable |= ev.is_writable();
                    }
                    WAKE | PREDECESSOR => {}
                    t => match self.tokens.get(&t) {
                        Some(Owner::Listener(key)) => {
                            let key = *key;
                            self.on_listener(key);
                        }
                        Some(Owner::Conn) => {
                            if let Some(c) = self.conns.get_mut(&t) {
                                c.readable |=
                                    ev.is_readable() || ev.is_read_closed() || ev.is_error();
                                c.writable |= ev.is_writable();
                                self.schedule.mark(t);
                            }
                        }
                        None => {}
                    },
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(Msg::View(v)) if !self.leaving => self.apply(v),
                    Ok(Msg::View(_)) => {}
                    Ok(Msg::Leave) => self.leave(),
                    Ok(Msg::Relink(fd)) => self.relink(fd),
                    Ok(Msg::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                        self.shut_down();
                        return;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if self.iface.is_none() {
                // No endpoint: frames from the datapath have nowhere to go.
                self.link.read_frames();
                self.link.clear();
                continue;
            }
            if last_sweep.elapsed() >= TICK {
                last_sweep = Instant::now();
                self.sweep();
            }
            self.turn();
            if self.leaving && self.conns.is_empty() {
                self.link.flush();
                info!("the last mesh connection of this overlayd ended");
                return;
            }
        }
    }

    /// Accepts no more (the listeners' sockets stay open in their copies for the
    /// successor) and drops the UDP mappings; TCP connections go on until they end.
    fn leave(&mut self) {
        self.leaving = true;
        let keys: Vec<ListenerKey> = self.listeners.keys().copied().collect();
        for key in keys {
            if let Some(l) = self.listeners.remove(&key) {
                self.tokens.remove(&l.token);
                match l.socket {
                    Some(listener::Socket::Tcp(mut s)) => {
                        let _ = self.poll.registry().deregister(&mut s);
                    }
                    Some(listener::Socket::Udp(mut s)) => {
                        let _ = self.poll.registry().deregister(&mut s);
                    }
                    None => {}
                }
            }
            self.drop_mappings(key, |_| true);
        }
        info!(
            connections = self.conns.len(),
            "leaving: accepting no more, established mesh connections drain"
        );
    }

    /// Sends and receives over `fd` instead of the link to the datapath (which stops).
    fn relink(&mut self, fd: OwnedFd) {
        // What the datapath handed over already goes to the stack first.
        self.turn();
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&self.link.raw_fd()));
        let old = self.link.swap_fd(fd);
        drop(old);
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&self.link.raw_fd()),
            LINK,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!(error = %e, "cannot poll the drain link");
        }
    }

    /// Writes frames of the predecessor's connections to it, and those it sends to the
    /// datapath (as if from this endpoint). Its end closing (it exited) ends the passing.
    fn pass_from_predecessor(&mut self) {
        let Some((_, fd)) = &self.predecessor else {
            return;
        };
        let mut gone = false;
        // Until the socket is empty (edge-triggered), what does not fit counted.
        loop {
            match nix::sys::socket::recv(
                fd.as_raw_fd(),
                &mut self.buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    gone = true;
                    break;
                }
                Ok(n) => {
                    if !self.link.push_tx_raw(&self.buf[..n]) {
                        self.link.flush();
                        if !self.link.push_tx_raw(&self.buf[..n]) {
                            self.link.count_drop(DropReason::WriteFailed);
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            if let Some((_, fd)) = self.predecessor.take() {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&fd.as_raw_fd()));
            }
            info!("the old overlayd's mesh connections have drained");
        }
    }

    /// Frames in, the stack, bytes between the sockets, frames out.
    fn turn(&mut self) {
        self.pass_from_predecessor();
        self.link.read_frames();
        self.ingress();
        self.pump_udp();
        self.settle();
    }

    /// Hands each frame read from the link to the stack with the sockets it concerns: a TCP
    /// segment to its connection's set (which is then ready), anything else to the shared
    /// set. An ARP frame wakes the connections to its sender (they may wait for it).
    fn ingress(&mut self) {
        let now = self.now();
        let Some((iface, _)) = self.iface.as_mut() else {
            return;
        };
        while let Some(frame) = self.link.peek_rx() {
            let dest = classify(frame);
            // An upgrade's predecessor's connections are its own; one leaving takes only
            // its own connections' segments, and ARP.
            let theirs = match &dest {
                Dest::Tcp(seg) => {
                    !ports::in_half(seg.port, self.half)
                        && self
                            .predecessor
                            .as_ref()
                            .is_some_and(|(h, _)| ports::in_half(seg.port, *h))
                }
                Dest::Arp(_) => self.predecessor.is_some(),
                Dest::Other => false,
            };
            let mine = match &dest {
                Dest::Tcp(seg) => !self.leaving || self.by_port.contains_key(&seg.port),
                Dest::Arp(_) => true,
                Dest::Other => !self.leaving,
            };
            if theirs {
                let sent = self.predecessor.as_ref().is_some_and(|(_, fd)| {
                    send_frame(fd, self.link.peek_rx_raw().unwrap_or_default())
                });
                if !sent {
                    self.link.count_drop(DropReason::WriteFailed);
                }
            }
            if (theirs && !matches!(dest, Dest::Arp(_))) || !mine {
                if !theirs {
                    self.link.count_drop(DropReason::UnknownPort);
                }
                if let Some((b, _)) = self.link.pop_rx_raw() {
                    self.link.done(b);
                }
                continue;
            }
            let conn = match &dest {
                Dest::Tcp(seg) => self.by_port.get(&seg.port).copied(),
                Dest::Arp(sender) => {
                    for (t, c) in &self.conns {
                        if c.backend == *sender {
                            self.schedule.mark(*t);
                        }
                    }
                    None
                }
                Dest::Other => None,
            };
            let r = match (conn.and_then(|t| self.conns.get_mut(&t)), &dest) {
                (Some(c), Dest::Tcp(seg)) => {
                    c.slot.seen(seg);
                    c.slot.ingress(iface, now, &mut self.link)
                }
                _ => iface.poll_ingress_single(now, &mut self.link, &mut self.sockets),
            };
            if matches!(r, PollIngressSingleResult::None) {
                // The link's queue towards the datapath is full: the frame waits.
                break;
            }
            if let Some(t) = conn {
                self.schedule.mark(t);
            }
        }
    }

    /// Visits the connections that are ready or due: bytes moved, what the stack has to
    /// send sent, the next deadline set; ended ones (their reset sent) removed.
    fn pump_ready(&mut self) {
        let now = self.now();
        self.schedule.expire(now);
        let Some((iface, _)) = self.iface.as_mut() else {
            return;
        };
        let mut ended = Vec::new();
        for t in self.schedule.take_ready() {
            let Some(c) = self.conns.get_mut(&t) else {
                continue;
            };
            let was_warm = c.slot.is_warm();
            pump(c, now);
            let before = c.slot.socket().state();
            let mut at = c.slot.egress(iface, now, &mut self.link);
            if c.done.is_some() {
                ended.push(t);
                continue;
            }
            if !was_warm && c.slot.is_warm() {
                self.warm.push(t);
            }
            let state = c.slot.socket().state();
            if state == tcp_state::SynSent {
                let give_up = c.opened + CONNECT_TIMEOUT.into();
                at = Some(at.map_or(give_up, |a| a.min(give_up)));
            }
            match at {
                // Its state moved while sending (a timeout closed it), or the link was full:
                // the next turn looks again.
                _ if state != before => self.schedule.mark(t),
                Some(at) if at <= now => self.schedule.mark(t),
                at => self.schedule.set_deadline(t, at),
            }
        }
        for t in ended {
            self.finish(t);
        }
    }

    /// Sends what the shared set (UDP) has to send.
    fn egress_shared(&mut self) {
        let now = self.now();
        if let Some((iface, _)) = self.iface.as_mut() {
            while !matches!(
                iface.poll_egress(now, &mut self.link, &mut self.sockets),
                PollResult::None
            ) {}
        }
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
    }

    /// Applies a new view: endpoint address, listeners opened and closed, connections to
    /// tasks that left reset (not those of tasks still draining).
    fn apply(&mut self, view: IngressView) {
        // First: a port closed below keeps the connections of its draining tasks.
        self.draining = view.draining;
        let endpoint_changed = self.iface.as_ref().map(|(_, e)| *e) != view.endpoint;
        if endpoint_changed {
            self.close_all(false);
            let now = self.now();
            self.iface = view.endpoint.map(|e| {
                self.link.clear();
                self.link.set_mtu(e.mtu);
                let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(e.mac.0)));
                config.random_seed = rand::random();
                let mut iface = Interface::new(config, &mut self.link, now);
                iface.update_ip_addrs(|a| {
                    let _ = a.push(IpCidr::new(IpAddress::Ipv4(e.ip), e.prefix_len));
                });
                info!(address = %e.ip, "ingress endpoint up");
                (iface, e)
            });
        }
        let wanted: HashMap<ListenerKey, ListenerView> = view
            .listeners
            .into_iter()
            .map(|l| ((l.protocol, l.port), l))
            .collect();
        let gone: Vec<ListenerKey> = self
            .listeners
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.close_listener(key);
        }
        for (key, v) in wanted {
            match self.listeners.get_mut(&key) {
                Some(l) if l.view.service == v.service && l.view.mode == v.mode => {
                    l.view = v;
                    if l.socket.is_none() {
                        self.open(key);
                    }
                }
                Some(_) => {
                    self.close_listener(key);
                    self.add_listener(key, v);
                }
                None => self.add_listener(key, v),
            }
        }
        let keys: Vec<String> = self.listeners.values().map(|l| l.view.key()).collect();
        self.ports.retain(&keys);
        self.reset_departed();
    }

    /// Resets connections and drops mappings whose task is neither a backend nor draining
    /// (a task on its way out keeps the connections it has until it is gone).
    fn reset_departed(&mut self) {
        for (t, c) in self.conns.iter_mut() {
            let alive = self.draining.contains(&c.backend)
                || self
                    .listeners
                    .get(&c.listener)
                    .is_some_and(|l| l.view.backends.contains(&c.backend));
            if !alive && c.done.is_none() {
                debug!(backend = %c.backend, "task left: resetting its connection");
                reset(c);
                self.schedule.mark(*t);
            }
        }
        let ports: Vec<ListenerKey> = self.udp.keys().copied().collect();
        let draining = self.draining.clone();
        for key in ports {
            let serving = self
                .listeners
                .get(&key)
                .map(|l| l.view.backends.clone())
                .unwrap_or_default();
            self.drop_mappings(key, |m| {
                !serving.contains(&m.backend) && !draining.contains(&m.backend)
            });
        }
        // Let the resets go out now.
        self.settle();
    }

    /// Visits the ready connections (resets go out, ended ones are removed), sends what the
    /// shared set has, and writes the frames to the link.
    fn settle(&mut self) {
        self.pump_ready();
        self.egress_shared();
        self.link.flush();
    }

    /// Closes every listener; `keep_copies` (shutting down) leaves the copies of their
    /// sockets kept for an upgrade's successor.
    fn close_all(&mut self, keep_copies: bool) {
        let keys: Vec<ListenerKey> = self.listeners.keys().copied().collect();
        for k in keys {
            if keep_copies {
                self.close_listener_keeping_copy(k);
            } else {
                self.close_listener(k);
            }
        }
        self.settle();
    }

    fn shut_down(&mut self) {
        if self.leaving {
            // The drain timeout: what remains is reset both ways.
            for (t, c) in self.conns.iter_mut() {
                reset(c);
                self.schedule.mark(*t);
            }
        }
        self.close_all(true);
    }

    /// Returns the buffer pages of connections that moved nothing since the last sweep and
    /// hold nothing.
    fn trim_idle(&mut self) {
        let conns = &mut self.conns;
        self.warm
            .retain(|t| conns.get_mut(t).is_some_and(|c| !c.slot.trim_if_idle()));
    }

    /// Retries published ports that could not be opened (a port in use by another
    /// process) and expires idle UDP mappings. Runs at least every [`TICK`], before a turn.
    fn sweep(&mut self) {
        let closed: Vec<ListenerKey> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.socket.is_none())
            .map(|(k, _)| *k)
            .collect();
        for k in closed {
            self.open(k);
        }
        self.expire_udp();
        self.trim_idle();
        // Unanswered connects are given up by the turn that follows (`pump`).
    }
}
