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
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketSet};
use smoltcp::socket::tcp::State as tcp_state;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

const LINK: Token = Token(0);
const WAKE: Token = Token(1);
/// Longest wait of the loop: UDP mappings and connects are checked at least this often.
const TICK: Duration = Duration::from_millis(500);

enum Msg {
    View(IngressView),
    Stop,
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
            local_ports: PortAlloc::default(),
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
                    WAKE => {}
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
                    Ok(Msg::View(v)) => self.apply(v),
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
        }
    }

    /// Frames in, the stack, bytes between the sockets, frames out.
    fn turn(&mut self) {
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
