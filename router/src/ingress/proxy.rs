//! The proxy thread: kernel sockets towards clients, smoltcp sockets towards tasks, and the
//! bytes between them. One mio loop owns everything (listeners, accepted streams, the link
//! to the datapath and the smoltcp interface); nothing here is shared but the counters.
//!
//! A TCP connection moves data only when the other side can take it: client bytes are read
//! straight into the smoltcp socket's send buffer while it has room, and backend bytes are
//! written from its receive buffer while the client's socket takes them, so every buffer is
//! bounded and a slow reader slows the writer down (TCP windows do the rest). Half-close is
//! passed on in both directions; a reset on either side resets the other; a connection
//! whose task leaves the service's backends is reset at once.

use super::link::Link;
use super::stats::{PortCounters, Registry};
use super::{EndpointAddr, IngressView, ListenerView};
use datapath::stats::Counters;
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use protocol::state::{PortProtocol, ProxyProtocol};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

const LINK: Token = Token(0);
const WAKE: Token = Token(1);
/// Per-connection smoltcp buffers: a 64 KiB super-segment fits in either with room to spare,
/// and the window scales past 64 KiB. Untouched pages cost no memory.
const TCP_BUFFER: usize = 256 << 10;
/// Closed sockets kept for reuse: a new socket's buffers cost a 512 KiB memset (a third of
/// the proxy's time at 11k connections/s before reuse); a reused one clears two indices.
/// Few, because the interface walks every socket it holds per poll and per incoming segment.
const IDLE_SOCKETS: usize = 64;
const UDP_PACKETS: usize = 64;
const UDP_BUFFER: usize = 64 << 10;
/// A task that does not answer a SYN in this long: the client is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Probes on idle connections, and how long unacknowledged data may wait before the
/// connection is given up.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
const USER_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait of the loop: UDP mappings and connects are checked at least this often.
const TICK: Duration = Duration::from_millis(500);
/// The endpoint's own ports for connections to tasks.
const LOCAL_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;

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
            tokens: HashMap::new(),
            conns: HashMap::new(),
            udp: HashMap::new(),
            local_ports: PortAlloc::default(),
            idle_tcp: Vec::new(),
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

type ListenerKey = (PortProtocol, u16);

enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

struct Listener {
    view: ListenerView,
    socket: Option<Socket>,
    token: Token,
    /// Round-robin position.
    next: usize,
    counters: Arc<PortCounters>,
}

impl Listener {
    fn pick(&mut self) -> Option<Ipv4Addr> {
        let n = self.view.backends.len();
        if n == 0 {
            return None;
        }
        let b = self.view.backends[self.next % n];
        self.next = (self.next + 1) % n;
        Some(b)
    }
}

enum Owner {
    Listener(ListenerKey),
    Conn,
}

struct Conn {
    stream: TcpStream,
    handle: SocketHandle,
    local_port: u16,
    backend: Ipv4Addr,
    listener: ListenerKey,
    counters: Arc<PortCounters>,
    /// PROXY protocol header still to send ahead of the client's bytes.
    header: Option<Vec<u8>>,
    opened: Instant,
    readable: bool,
    writable: bool,
    /// The client sent FIN (read returned 0).
    client_eof: bool,
    /// FIN queued towards the task.
    fin_sent: bool,
    /// FIN passed on to the client.
    client_shut: bool,
    /// Ends after the next poll of the interface (so that a reset goes out first).
    done: Option<End>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Clean,
    Reset,
}

struct UdpMap {
    listener: ListenerKey,
    client: SocketAddr,
    handle: SocketHandle,
    local_port: u16,
    backend: Ipv4Addr,
    last: Instant,
}

/// The endpoint's ports: handed out in turn so that a port is reused as late as possible.
struct PortAlloc {
    next: u16,
    used: HashSet<u16>,
}

impl Default for PortAlloc {
    fn default() -> Self {
        PortAlloc {
            next: *LOCAL_PORTS.start(),
            used: HashSet::new(),
        }
    }
}

impl PortAlloc {
    fn take(&mut self) -> Option<u16> {
        for _ in LOCAL_PORTS {
            let p = self.next;
            self.next = if p == *LOCAL_PORTS.end() {
                *LOCAL_PORTS.start()
            } else {
                p + 1
            };
            if self.used.insert(p) {
                return Some(p);
            }
        }
        None
    }

    fn release(&mut self, p: u16) {
        self.used.remove(&p);
    }
}

/// Milliseconds for TCP timestamps: a task in TIME-WAIT takes a new SYN from a reused port
/// when its timestamp is newer (RFC 6191).
fn tsval() -> u32 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u32
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

struct Proxy {
    poll: Poll,
    rx: mpsc::Receiver<Msg>,
    link: Link,
    iface: Option<(Interface, EndpointAddr)>,
    sockets: SocketSet<'static>,
    listeners: HashMap<ListenerKey, Listener>,
    tokens: HashMap<Token, Owner>,
    conns: HashMap<Token, Conn>,
    udp: HashMap<(ListenerKey, SocketAddr), UdpMap>,
    local_ports: PortAlloc,
    /// Closed TCP sockets (buffers and settings kept) ready for the next connection.
    idle_tcp: Vec<SocketHandle>,
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
            let timeout = if self.link.readable && self.iface.is_some() {
                Some(Duration::ZERO)
            } else {
                let now = self.now();
                let delay = self
                    .iface
                    .as_mut()
                    .and_then(|(i, _)| i.poll_delay(now, &self.sockets));
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
        self.poll_iface();
        for c in self.conns.values_mut() {
            pump(c, &mut self.sockets);
        }
        self.pump_udp();
        self.settle();
    }

    fn poll_iface(&mut self) {
        let now = self.now();
        if let Some((iface, _)) = self.iface.as_mut() {
            iface.poll(now, &mut self.link, &mut self.sockets);
        }
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
    }

    /// Applies a new view: endpoint address, listeners opened and closed, connections to
    /// tasks that left reset.
    fn apply(&mut self, view: IngressView) {
        let endpoint_changed = self.iface.as_ref().map(|(_, e)| *e) != view.endpoint;
        if endpoint_changed {
            self.close_all();
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

    fn add_listener(&mut self, key: ListenerKey, view: ListenerView) {
        let counters = self
            .ports
            .port(&view.key(), view.service.as_str(), &view.mode.to_string());
        let token = self.token();
        self.listeners.insert(
            key,
            Listener {
                view,
                socket: None,
                token,
                next: 0,
                counters,
            },
        );
        self.tokens.insert(token, Owner::Listener(key));
        self.open(key);
    }

    /// Opens a listener's socket on every address of the node; a failure (port in use) is
    /// reported in the port's stats and retried on the next view.
    fn open(&mut self, key: ListenerKey) {
        if self.iface.is_none() {
            return;
        }
        let Some(l) = self.listeners.get_mut(&key) else {
            return;
        };
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, key.1));
        let opened = match key.0 {
            PortProtocol::Tcp => TcpListener::bind(addr).and_then(|mut s| {
                self.poll
                    .registry()
                    .register(&mut s, l.token, Interest::READABLE)?;
                Ok(Socket::Tcp(s))
            }),
            PortProtocol::Udp => UdpSocket::bind(addr).and_then(|mut s| {
                self.poll
                    .registry()
                    .register(&mut s, l.token, Interest::READABLE)?;
                Ok(Socket::Udp(s))
            }),
        };
        match opened {
            Ok(s) => {
                info!(port = %l.view.key(), service = %l.view.service, "published port open");
                l.socket = Some(s);
                l.counters.set_listening(Ok(()));
            }
            Err(e) => {
                if l.counters.listening.load(Ordering::Relaxed)
                    || l.counters.error.lock().map(|x| x.is_none()).unwrap_or(true)
                {
                    warn!(port = %l.view.key(), error = %e, "cannot open published port");
                }
                l.counters.set_listening(Err(e.to_string()));
            }
        }
    }

    fn close_listener(&mut self, key: ListenerKey) {
        if let Some(l) = self.listeners.remove(&key) {
            self.tokens.remove(&l.token);
            match l.socket {
                Some(Socket::Tcp(mut s)) => {
                    let _ = self.poll.registry().deregister(&mut s);
                }
                Some(Socket::Udp(mut s)) => {
                    let _ = self.poll.registry().deregister(&mut s);
                }
                None => {}
            }
            info!(port = %l.view.key(), "published port closed");
        }
        // Its connections and mappings go with it.
        for c in self.conns.values_mut().filter(|c| c.listener == key) {
            reset(c, &mut self.sockets);
        }
        let maps: Vec<_> = self.udp.keys().filter(|k| k.0 == key).copied().collect();
        for k in maps {
            self.drop_mapping(k);
        }
    }

    /// Resets connections and drops mappings whose task is no longer a backend.
    fn reset_departed(&mut self) {
        for c in self.conns.values_mut() {
            let alive = self
                .listeners
                .get(&c.listener)
                .is_some_and(|l| l.view.backends.contains(&c.backend));
            if !alive && c.done.is_none() {
                debug!(backend = %c.backend, "task left: resetting its connection");
                reset(c, &mut self.sockets);
            }
        }
        let gone: Vec<_> = self
            .udp
            .iter()
            .filter(|(_, m)| {
                !self
                    .listeners
                    .get(&m.listener)
                    .is_some_and(|l| l.view.backends.contains(&m.backend))
            })
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.drop_mapping(k);
        }
        // Let the resets go out now.
        self.settle();
    }

    /// Sends what the stack has to send (resets included), then removes ended connections.
    fn settle(&mut self) {
        self.poll_iface();
        self.reap();
        self.link.flush();
    }

    fn close_all(&mut self) {
        let keys: Vec<ListenerKey> = self.listeners.keys().copied().collect();
        for k in keys {
            self.close_listener(k);
        }
        self.settle();
    }

    fn shut_down(&mut self) {
        self.close_all();
    }

    fn on_listener(&mut self, key: ListenerKey) {
        match self.listeners.get(&key).map(|l| &l.socket) {
            Some(Some(Socket::Tcp(_))) => self.accept(key),
            Some(Some(Socket::Udp(_))) => self.receive_udp(key),
            _ => {}
        }
    }

    fn accept(&mut self, key: ListenerKey) {
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
            let handle = match self.idle_tcp.pop() {
                Some(h) => h,
                None => {
                    let mut sock = tcp::Socket::new(
                        tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
                        tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
                    );
                    sock.set_nagle_enabled(false);
                    sock.set_keep_alive(Some(KEEP_ALIVE.into()));
                    sock.set_timeout(Some(USER_TIMEOUT.into()));
                    sock.set_tsval_generator(Some(tsval));
                    self.sockets.add(sock)
                }
            };
            let remote = IpEndpoint::new(IpAddress::Ipv4(backend), target);
            let sock = self.sockets.get_mut::<tcp::Socket>(handle);
            if let Err(e) = sock.connect(iface.context(), remote, local_port) {
                debug!(error = %e, "cannot connect to task");
                self.sockets.remove(handle);
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
                self.sockets.get_mut::<tcp::Socket>(handle).abort();
                self.sockets.remove(handle);
                self.local_ports.release(local_port);
                continue;
            }
            PortCounters::inc(&counters.accepted);
            PortCounters::inc(&counters.active);
            self.tokens.insert(token, Owner::Conn);
            self.conns.insert(
                token,
                Conn {
                    stream,
                    handle,
                    local_port,
                    backend,
                    listener: key,
                    counters,
                    header,
                    opened: Instant::now(),
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

    /// Removes ended connections: their smoltcp socket (after its reset went out), their
    /// port, and the client's socket (closed with RST when the end was a reset).
    fn reap(&mut self) {
        let Proxy {
            conns,
            tokens,
            poll,
            sockets,
            idle_tcp,
            local_ports,
            ..
        } = self;
        conns.retain(|t, c| {
            let Some(end) = c.done else {
                return true;
            };
            tokens.remove(t);
            let _ = poll.registry().deregister(&mut c.stream);
            // Closed or in TIME-WAIT (a reset already went out): reusable as it is.
            let sock = sockets.get_mut::<tcp::Socket>(c.handle);
            if !sock.is_open() && idle_tcp.len() < IDLE_SOCKETS {
                idle_tcp.push(c.handle);
            } else {
                sock.abort();
                sockets.remove(c.handle);
            }
            local_ports.release(c.local_port);
            PortCounters::dec(&c.counters.active);
            if end == End::Reset {
                PortCounters::inc(&c.counters.reset);
                linger_zero(&c.stream);
            }
            false
        });
    }

    fn receive_udp(&mut self, key: ListenerKey) {
        loop {
            let Some(l) = self.listeners.get_mut(&key) else {
                return;
            };
            let Some(Socket::Udp(sock)) = &l.socket else {
                return;
            };
            let (n, client) = match sock.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let counters = l.counters.clone();
            let target = l.view.target;
            if !self.udp.contains_key(&(key, client)) {
                let full = self.udp.len() >= self.max_connections;
                let Some((backend, local_port)) = (!full)
                    .then(|| l.pick())
                    .flatten()
                    .and_then(|b| Some((b, self.local_ports.take()?)))
                else {
                    PortCounters::inc(&counters.refused);
                    continue;
                };
                let mut s = udp::Socket::new(
                    udp::PacketBuffer::new(
                        vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                        vec![0u8; UDP_BUFFER],
                    ),
                    udp::PacketBuffer::new(
                        vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                        vec![0u8; UDP_BUFFER],
                    ),
                );
                if s.bind(local_port).is_err() {
                    self.local_ports.release(local_port);
                    continue;
                }
                let handle = self.sockets.add(s);
                PortCounters::inc(&counters.accepted);
                PortCounters::inc(&counters.active);
                self.udp.insert(
                    (key, client),
                    UdpMap {
                        listener: key,
                        client,
                        handle,
                        local_port,
                        backend,
                        last: Instant::now(),
                    },
                );
            }
            let Some(m) = self.udp.get_mut(&(key, client)) else {
                continue;
            };
            m.last = Instant::now();
            let to = IpEndpoint::new(IpAddress::Ipv4(m.backend), target);
            let s = self.sockets.get_mut::<udp::Socket>(m.handle);
            if s.send_slice(&self.buf[..n], to).is_err() {
                PortCounters::inc(&counters.dropped);
            }
        }
    }

    /// Sends tasks' replies back to their clients, from the published port.
    fn pump_udp(&mut self) {
        for m in self.udp.values_mut() {
            let s = self.sockets.get_mut::<udp::Socket>(m.handle);
            let Some(Listener {
                socket: Some(Socket::Udp(out)),
                counters,
                ..
            }) = self.listeners.get(&m.listener)
            else {
                continue;
            };
            while let Ok((data, _)) = s.recv() {
                m.last = Instant::now();
                if out.send_to(data, m.client).is_err() {
                    PortCounters::inc(&counters.dropped);
                }
            }
        }
    }

    fn drop_mapping(&mut self, key: (ListenerKey, SocketAddr)) {
        if let Some(m) = self.udp.remove(&key) {
            self.sockets.remove(m.handle);
            self.local_ports.release(m.local_port);
            if let Some(l) = self.listeners.get(&m.listener) {
                PortCounters::dec(&l.counters.active);
            }
        }
    }

    /// Expires idle UDP mappings and retries published ports that could not be opened (a
    /// port in use by another process). Runs at least every [`TICK`], before a turn.
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
        let idle: Vec<_> = self
            .udp
            .iter()
            .filter(|(_, m)| {
                let limit = self
                    .listeners
                    .get(&m.listener)
                    .map_or(Duration::ZERO, |l| l.view.udp_idle);
                m.last.elapsed() > limit
            })
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.drop_mapping(k);
        }
        // Unanswered connects are given up by the turn that follows (`pump`).
    }
}

/// Ends a connection with a reset both ways (its task left, or its port closed).
fn reset(c: &mut Conn, sockets: &mut SocketSet<'static>) {
    if c.done.is_none() {
        c.done = Some(End::Reset);
        sockets.get_mut::<tcp::Socket>(c.handle).abort();
    }
}

/// Moves what can move for one connection and notes when it has ended. A reset, whichever
/// side caused it, aborts the smoltcp socket so that the task gets an RST too.
fn pump(c: &mut Conn, sockets: &mut SocketSet<'static>) {
    if c.done.is_some() {
        return;
    }
    let sock = sockets.get_mut::<tcp::Socket>(c.handle);
    c.done = move_bytes(c, sock);
    if c.done == Some(End::Reset) {
        sock.abort();
    }
}

fn move_bytes(c: &mut Conn, sock: &mut tcp::Socket) -> Option<End> {
    // The PROXY header goes first, once the connection is up.
    if let Some(h) = &c.header {
        if sock.may_send() {
            if sock.send_slice(h) != Ok(h.len()) {
                return Some(End::Reset);
            }
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
            Ok(Ok(_)) => {}
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
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => return Some(End::Reset),
            Err(_) => break,
        }
    }
    use tcp::State;
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
        State::SynSent if c.opened.elapsed() > CONNECT_TIMEOUT => Some(End::Reset),
        _ => None,
    }
}
