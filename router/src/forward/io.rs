//! The datapath's workers: threads that each own one queue of every TAP and one underlay
//! socket, wait on them with `mio`, read frames in batches, ask [`switch`] what to do with
//! each and do it. There is one worker per core by default (`--datapath-workers`).
//!
//! Workers share nothing they write per frame but the connection table (lock-free) and the
//! counters (atomics): each has its own buffers, GRO run, underlay batch and ESP state. The
//! kernel spreads the work: a multi-queue TAP hands each flow a task sends to one queue, and
//! the underlay's `SO_REUSEPORT` steering hands each flow arriving from another node to one
//! worker ([`crate::sys::steer`]), so a flow stays on one worker and in order. A worker
//! writes to a port through its own queue of it; a port with one fd (the ingress link) is
//! read by worker 0 and written by all.
//!
//! A worker allocates nothing per frame: frame buffers, the reply buffer and the underlay's
//! batch buffers ([`super::underlay`]) are made once (a DNS query to a gateway, punted here
//! by the decision, is answered with an allocation: it is rare). Frames for other nodes are queued into
//! runs that go out with one GSO send per run; datagrams come in with recvmmsg and GRO. Tables
//! are read from an `ArcSwap` snapshot once per batch, the clock once per round; both go to
//! the decision with the node's one connection table. Ports come and go through a command
//! channel and a waker per worker.

use super::saved_flows;
use super::underlay::{self, Datagram, Dest, Gather, RxBatch, Seal, Sockets, TxBatch, Underlay};
use crate::dns;
use arc_swap::ArcSwap;
use datapath::conntrack::{ConnTable, Flow};
use datapath::crypto::EspState;
use datapath::gro::{self, Coalescer, Push};
use datapath::lb;
use datapath::nat::L4Csum;
use datapath::stats::{bump, Counters, NetCounters, NetLane, MAX_WORKERS};
use datapath::switch::{self, Context, MAX_FRAME, MAX_SUPER_FRAME};
use datapath::table::Tables;
use datapath::vnet::{self, Segments, VnetHdr};
use datapath::vocab::{DropReason, FastHash, PortId, Punt, Verdict};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use protocol::esp;
use protocol::types::Vni;
use protocol::vxlan;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Frames read from one port before the loop moves to the next one.
pub const BATCH: usize = 64;
/// A TAP read: virtio-net header + (super-)frame.
const PORT_BUF: usize = vnet::HDR_LEN + MAX_SUPER_FRAME;
/// The header written in front of frames the router makes or receives from the underlay:
/// no offload, checksums complete.
const PLAIN: [u8; vnet::HDR_LEN] = [0; vnet::HDR_LEN];
const WAKE: Token = Token(usize::MAX);
const UNDERLAY: Token = Token(usize::MAX - 1);

/// How often the sweeper looks for new tables (a backend may have left: its flows are
/// retired at once).
const SWEEP_CHECK: Duration = Duration::from_millis(250);
/// Flows saved per second at most: a larger table is saved less often (one more second per
/// this many flows), so that saving costs at most this many lines a second.
const SAVE_PER_SECOND: usize = 100_000;

/// How long after the last save the established flows are saved again, for a table of
/// `flows` flows.
fn save_every(flows: usize) -> Duration {
    Duration::from_secs((flows / SAVE_PER_SECOND).max(1) as u64)
}

/// How long the flows a previous run saved may be resumed: a connection silent for longer
/// is not resumed (its next segment is dropped as `lb_no_flow`).
pub const RESUME_WINDOW: Duration = Duration::from_secs(60);
/// How often the sweeper walks the whole table to expire idle and closed flows even when
/// the tables did not change.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

enum Command {
    /// A port and its fds: a TAP's queues (one per worker), or a single fd.
    AddPort(PortId, PortFds),
    RemovePort(PortId),
    /// A frame the router made (a reset for a client whose backend left), for a port.
    Inject(PortId, Vec<u8>),
    /// Start reading the underlay socket (a datapath started holding it).
    ReadUnderlay,
    Stop,
}

/// One running worker, as the control side holds it.
struct Handle {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    fn send(&self, c: Command) {
        if self.commands.send(c).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// Handle to the running datapath workers and the connection-table sweeper.
pub struct Datapath {
    /// This run's epoch for encrypted networks: the node's sending keys are derived with
    /// it (and each worker's lane), so that sequence numbers that start again at 1 after a
    /// restart use a new key. 0 when the node could not keep one: its workers then seal
    /// nothing (`esp_no_epoch`), so keys derived with it are never used.
    pub esp_epoch: u32,
    esp_worn: Arc<std::sync::Mutex<Vec<u32>>>,
    workers: Vec<Handle>,
    tables: Arc<ArcSwap<Tables>>,
    flows: Arc<ConnTable>,
    sweeper: Option<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

/// Milliseconds since `epoch`: the connection table's clock.
fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

impl Datapath {
    /// Starts `workers` datapath workers and the sweeper. `underlay` holds the bound VXLAN
    /// sockets of a multi-node node, one receiving socket per worker (None on a standalone
    /// node: nothing is remote); `flows` is the node's connection table, handed to every
    /// worker and the sweeper; `dns` the embedded resolver, which answers DNS at gateways;
    /// `esp_epoch` this run's epoch for encrypted networks, None if it could not be kept on
    /// disk (then nothing is sealed: a repeated epoch would reuse nonces); `save_flows` the
    /// state directory the sweeper saves the established flows in (`saved_flows`), if any.
    /// Without `read_underlay` the workers leave the underlay unread until
    /// [`Datapath::read_underlay`]: an upgrade's successor, whose predecessor reads the same
    /// sockets, reads them once its tables are published (until then it would drop what it
    /// read).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        counters: Arc<Counters>,
        underlay: Option<Sockets>,
        flows: Arc<ConnTable>,
        dns: Arc<dns::server::Shared>,
        workers: usize,
        esp_epoch: Option<u32>,
        save_flows: Option<PathBuf>,
        read_underlay: bool,
    ) -> io::Result<Datapath> {
        let workers = workers.clamp(1, MAX_WORKERS);
        if let Some(u) = &underlay {
            if u.rx.len() != workers {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "one underlay socket per worker is needed",
                ));
            }
        }
        let tables = Arc::new(ArcSwap::from_pointee(Tables::default()));
        // The workers' clock is the connection table's, so that the API reads flows' times
        // on it too.
        let epoch = flows.epoch();
        let esp_worn = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut rx_socks, pool) = match underlay {
            Some(u) => (u.rx.into_iter().map(Some).collect(), Some(u.tx)),
            None => (Vec::new(), None),
        };
        rx_socks.resize_with(workers, || None);
        let mut handles = Vec::with_capacity(workers);
        for (lane, sock) in rx_socks.into_iter().enumerate() {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            let underlay = match (sock, &pool) {
                (Some(s), Some(p)) => Some(Underlay::new(s, p.clone())?),
                _ => None,
            };
            if let Some(u) = underlay.as_ref().filter(|_| read_underlay) {
                let raw = u.socket().as_raw_fd();
                poll.registry()
                    .register(&mut SourceFd(&raw), UNDERLAY, Interest::READABLE)?;
            }
            let (tx, rx) = mpsc::channel();
            let mut worker = Worker {
                epoch,
                poll,
                commands: rx,
                tables: tables.clone(),
                flows: flows.clone(),
                now_ms: 0,
                dns: dns.clone(),
                counters: counters.clone(),
                ports: Ports {
                    lane,
                    fds: HashMap::default(),
                },
                rxb: underlay.as_ref().map(RxBatch::new),
                dgrams: Vec::new(),
                underlay,
                txb: TxBatch::for_lane(lane),
                ready: VecDeque::new(),
                frames: vec![vec![0u8; PORT_BUF]; BATCH],
                lens: [0; BATCH],
                reply: vec![0u8; MAX_FRAME],
                gro: Coalescer::default(),
                esp: EspState::new(lane as u8, esp_worn.clone(), esp_epoch.is_some()),
                seen_tables: 0,
                esp_evicted: 0,
                esp_counted: (0, 0),
            };
            let thread = std::thread::Builder::new()
                .name(format!("datapath-{lane}"))
                .spawn(move || worker.run())?;
            handles.push(Handle {
                commands: tx,
                waker,
                thread: Some(thread),
            });
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let sweeper = {
            // Resets go out through worker 0, which can write to every port.
            let (tables, flows, tx, waker, stopping) = (
                tables.clone(),
                flows.clone(),
                handles[0].commands.clone(),
                handles[0].waker.clone(),
                stopping.clone(),
            );
            std::thread::Builder::new()
                .name("conntrack-sweep".into())
                .spawn(move || {
                    let save = save_flows.as_deref();
                    sweep_loop(epoch, &tables, &flows, &tx, &waker, &stopping, save)
                })?
        };
        Ok(Datapath {
            esp_epoch: esp_epoch.unwrap_or(0),
            esp_worn,
            workers: handles,
            tables,
            flows,
            sweeper: Some(sweeper),
            stopping,
            counters,
        })
    }

    /// Makes the workers read the underlay (after a [`Datapath::start`] without
    /// `read_underlay`; a no-op otherwise).
    pub fn read_underlay(&self) {
        for w in &self.workers {
            w.send(Command::ReadUnderlay);
        }
    }

    /// How many workers run: how many queues a TAP should have.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Hands a port's fds to the datapath: a TAP's queues, one per worker, or a single fd
    /// that worker 0 reads and every worker writes. Frames from it are switched once the
    /// tables bind it. `udp_gso`: the port takes UDP super-frames (a TAP with USO), so UDP
    /// datagrams bound for it are merged; any other port gets them one by one. Its frames
    /// are counted in its network's counters (network `vni`).
    pub fn add_port(&self, port: PortId, fds: Vec<OwnedFd>, udp_gso: bool, vni: Vni) {
        if fds.is_empty() {
            return;
        }
        let net = self.counters.nets.network(vni.get());
        let fds = PortFds {
            queues: fds.into(),
            udp_gso,
            net,
        };
        for w in &self.workers {
            w.send(Command::AddPort(port, fds.clone()));
        }
    }

    /// Closes a port's fds (which deletes a non-persistent TAP once every worker let go).
    pub fn remove_port(&self, port: PortId) {
        for w in &self.workers {
            w.send(Command::RemovePort(port));
        }
    }

    /// Publishes new tables; the next batch uses them (with the same connection table).
    pub fn publish(&self, tables: Tables) {
        self.tables.store(Arc::new(tables));
    }

    /// SPIs that passed the rekey mark since the last call.
    pub fn take_worn_keys(&self) -> Vec<u32> {
        self.esp_worn
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    }

    pub fn flows(&self) -> &Arc<ConnTable> {
        &self.flows
    }

    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        for w in &mut self.workers {
            w.send(Command::Stop);
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(t) = self.sweeper.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sweeper: expires flows by its own clock (the datapath may be idle), and retires flows
/// whose backend is neither among its VIP's backends nor draining (a task that is stopping
/// keeps its flows until it is gone), sending established TCP clients a reset through the
/// datapath so none is left hanging. After each walk it saves the established flows in
/// `save` (`saved_flows`), for the next run; flows a previous run saved that were not
/// resumed within [`RESUME_WINDOW`] are forgotten.
fn sweep_loop(
    epoch: Instant,
    tables: &ArcSwap<Tables>,
    flows: &ConnTable,
    commands: &mpsc::Sender<Command>,
    waker: &Waker,
    stopping: &AtomicBool,
    save: Option<&Path>,
) {
    let mut rst = vec![0u8; MAX_FRAME];
    let mut swept = (Instant::now(), tables.load_full());
    let began = Instant::now();
    let mut saved_none = false;
    let mut saved_at = Instant::now();
    while !stopping.load(Ordering::Relaxed) {
        if flows.is_resuming() && began.elapsed() >= RESUME_WINDOW {
            flows.end_resuming();
        }
        std::thread::sleep(SWEEP_CHECK);
        let t = tables.load_full();
        // A walk costs time on every core the node has; take it only when it can find work.
        if Arc::ptr_eq(&t, &swept.1) && swept.0.elapsed() < SWEEP_EVERY {
            continue;
        }
        swept = (Instant::now(), t.clone());
        let mut resets = 0;
        flows.sweep(
            ms_since(epoch),
            |f: &Flow| t.holds_flow(f),
            |f| {
                if let Some(n) = lb::reset_for(f, &mut rst) {
                    if commands
                        .send(Command::Inject(f.client_port, rst[..n].to_vec()))
                        .is_ok()
                    {
                        resets += 1;
                    }
                }
            },
        );
        if resets > 0 {
            debug!(resets, "reset clients of backends that left");
            let _ = waker.wake();
        }
        if let Some(dir) = save.filter(|_| saved_at.elapsed() >= save_every(flows.len())) {
            saved_at = Instant::now();
            let established = flows.established();
            if !(established.is_empty() && saved_none) {
                match saved_flows::save(dir, &established) {
                    Ok(()) => saved_none = established.is_empty(),
                    Err(e) => debug!(error = %e, "cannot save the established flows"),
                }
            }
        }
    }
}

/// A port's fds, shared by the workers, and what it takes.
#[derive(Clone)]
struct PortFds {
    queues: Arc<[OwnedFd]>,
    udp_gso: bool,
    /// Its network's frame and byte counts.
    net: Arc<NetCounters>,
}

/// A worker's view of the local ports: each port's fds. The worker reads the queue at its
/// lane (if the port has one) and writes through queue `lane % len`.
struct Ports {
    lane: usize,
    fds: HashMap<PortId, PortFds, FastHash>,
}

impl Ports {
    fn reader(&self, port: PortId) -> Option<(&OwnedFd, &NetLane)> {
        let p = self.fds.get(&port)?;
        Some((p.queues.get(self.lane)?, p.net.lane(self.lane)))
    }

    /// The fd to write to, whether it takes UDP super-frames, and the port's network's
    /// counters for this worker.
    fn writer(&self, port: PortId) -> Option<(&OwnedFd, bool, &NetLane)> {
        let p = self.fds.get(&port)?;
        let q = &p.queues;
        Some((
            q.get(self.lane % q.len().max(1))?,
            p.udp_gso,
            p.net.lane(self.lane),
        ))
    }

    fn udp_gso(&self, port: PortId) -> bool {
        self.fds.get(&port).is_some_and(|p| p.udp_gso)
    }
}

struct Worker {
    epoch: Instant,
    poll: Poll,
    commands: mpsc::Receiver<Command>,
    tables: Arc<ArcSwap<Tables>>,
    /// The node's connection table, which the decision reads and writes beside the tables.
    flows: Arc<ConnTable>,
    /// The clock as this round read it (milliseconds since the datapath started).
    now_ms: u64,
    /// The embedded resolver, for DNS queries at a gateway.
    dns: Arc<dns::server::Shared>,
    counters: Arc<Counters>,
    ports: Ports,
    underlay: Option<Underlay>,
    /// Frames queued for other nodes, sent at the end of each batch (or sooner).
    txb: TxBatch,
    rxb: Option<RxBatch>,
    /// Where the datagrams of the last receive lie.
    dgrams: Vec<Datagram>,
    /// Sources that may have more to read (edge-triggered polling: a source stays here until
    /// a read says WouldBlock).
    ready: VecDeque<Token>,
    /// TAP reads: header then frame, `lens[i]` bytes in all.
    frames: Vec<Vec<u8>>,
    lens: [usize; BATCH],
    reply: Vec<u8>,
    /// Segments from the underlay being merged for a TAP.
    gro: Coalescer,
    /// Sequence numbers and replay windows of encrypted networks.
    esp: EspState,
    /// The tables last seen (to forget senders' state under keys that went away).
    seen_tables: usize,
    /// `esp.evicted()` and `esp.sealed_opened()` as last added to the node's counters.
    esp_evicted: u64,
    esp_counted: (u64, u64),
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = if self.ready.is_empty() {
                None
            } else {
                Some(std::time::Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(error = %e, "datapath poll failed; stopping");
                return;
            }
            for ev in events.iter() {
                if ev.token() != WAKE && !self.ready.contains(&ev.token()) {
                    self.ready.push_back(ev.token());
                }
            }
            if !self.drain_commands() {
                return;
            }
            self.now_ms = ms_since(self.epoch);
            {
                let t = self.tables.load();
                let at = Arc::as_ptr(&*t) as usize;
                if at != self.seen_tables {
                    self.seen_tables = at;
                    self.esp.retain_live(&t);
                }
            }
            // One batch per ready source per round, so a busy one cannot starve the others.
            for _ in 0..self.ready.len() {
                let Some(token) = self.ready.pop_front() else {
                    break;
                };
                let more = if token == UNDERLAY {
                    self.service_underlay()
                } else {
                    self.service_port(PortId(token.0 as u32))
                };
                if more {
                    self.ready.push_back(token);
                }
            }
        }
    }

    /// Applies queued commands; false when the thread should stop.
    fn drain_commands(&mut self) -> bool {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::AddPort(port, fds) => {
                    let token = Token(port.0 as usize);
                    if let Some(fd) = fds.queues.get(self.ports.lane) {
                        let raw = fd.as_raw_fd();
                        let reg = self.poll.registry().register(
                            &mut SourceFd(&raw),
                            token,
                            Interest::READABLE,
                        );
                        match reg {
                            Ok(()) => self.ready.push_back(token),
                            Err(e) => warn!(port = port.0, error = %e, "cannot poll port"),
                        }
                    }
                    self.ports.fds.insert(port, fds);
                }
                Command::RemovePort(port) => {
                    if let Some((fd, _)) = self.ports.reader(port) {
                        let raw = fd.as_raw_fd();
                        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
                    }
                    self.ports.fds.remove(&port);
                    self.ready.retain(|t| *t != Token(port.0 as usize));
                }
                Command::Inject(port, frame) => {
                    let n = write_port(&self.ports, &self.counters, port, &PLAIN, &frame);
                    Counters::add(&self.counters.replies, n);
                }
                Command::ReadUnderlay => {
                    if let Some(u) = &self.underlay {
                        let raw = u.socket().as_raw_fd();
                        // Already registered (a datapath that read it from the start): EEXIST.
                        if self
                            .poll
                            .registry()
                            .register(&mut SourceFd(&raw), UNDERLAY, Interest::READABLE)
                            .is_ok()
                            && !self.ready.contains(&UNDERLAY)
                        {
                            self.ready.push_back(UNDERLAY);
                        }
                    }
                }
                Command::Stop => return false,
            }
        }
        true
    }

    /// Reads one batch from a TAP; returns its size and whether the port may have more.
    /// Counted in the port's network's counters.
    fn read_port(&mut self, port: PortId) -> (usize, bool) {
        let Some((fd, net)) = self.ports.reader(port) else {
            return (0, false);
        };
        let (mut n, mut bytes) = (0, 0);
        let more = loop {
            if n == BATCH {
                break true;
            }
            match nix::unistd::read(fd, &mut self.frames[n]) {
                Ok(0) => break false,
                Ok(len) => {
                    self.lens[n] = len;
                    bytes += len.saturating_sub(vnet::HDR_LEN);
                    n += 1;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => break false,
                Err(e) => {
                    debug!(port = port.0, error = %e, "read from port failed");
                    break false;
                }
            }
        };
        bump(&net.from_ports, n as u64);
        bump(&net.from_ports_bytes, bytes as u64);
        (n, more)
    }

    fn service_port(&mut self, port: PortId) -> bool {
        let (n, more) = self.read_port(port);
        if n == 0 {
            return more;
        }
        Counters::add(&self.counters.worker(self.ports.lane).rx_frames, n as u64);
        let tables = self.tables.load();
        let mut tx = 0u64;
        for i in 0..n {
            let len = self.lens[i];
            if len < vnet::HDR_LEN {
                self.counters.count_drop(DropReason::Runt);
                continue;
            }
            // First with the frame writable: the decision (which may rewrite it), and for a
            // whole frame leaving through the underlay, its checksum made partial (for
            // another overlayd node) or completed (for anyone else).
            let (verdict, h) = {
                let (hdr, frame) = self.frames[i][..len].split_at_mut(vnet::HDR_LEN);
                let h = VnetHdr::from_slice(hdr).unwrap_or_default();
                let csum = if h.flags & vnet::F_NEEDS_CSUM != 0 {
                    L4Csum::Partial
                } else {
                    L4Csum::Complete
                };
                let cx = Context {
                    tables: &tables,
                    flows: &self.flows,
                    now_ms: self.now_ms,
                };
                let v = switch::from_port(&cx, port, frame, csum, &mut self.reply);
                let v = match v {
                    Verdict::Encap { vtep, .. } if !h.is_gso() => {
                        // Another overlayd node takes TCP/UDP over IPv4 with the checksum
                        // partial, whatever the TAP gave; anything else leaves whole.
                        let to_node = tables.senders.contains_key(vtep.ip());
                        let partial = to_node && vnet::offload_partial(frame, None).flags != 0;
                        let whole_partial = h.flags & vnet::F_NEEDS_CSUM != 0;
                        if !partial && whole_partial && vnet::complete_checksum(frame, &h).is_err()
                        {
                            Verdict::Drop(DropReason::OffloadMalformed)
                        } else {
                            v
                        }
                    }
                    v => v,
                };
                (v, h)
            };
            // Then read-only, so that segments may leave with their payloads gathered from
            // the read buffers (the run is sent before they are read into again).
            let frames = &self.frames;
            let (hdr, frame) = frames[i][..len].split_at(vnet::HDR_LEN);
            match verdict {
                // Between TAPs the header travels with the frame: super-frames and partial
                // checksums are the receiving kernel's to handle.
                Verdict::Forward(to) => {
                    tx += write_port(&self.ports, &self.counters, to, hdr, frame)
                }
                Verdict::Flood(vni) => {
                    tx += flood(
                        &self.ports,
                        &self.counters,
                        &tables,
                        vni,
                        Some(port),
                        hdr,
                        frame,
                    )
                }
                Verdict::Reply(rlen) => {
                    tx += write_port(
                        &self.ports,
                        &self.counters,
                        port,
                        &PLAIN,
                        &self.reply[..rlen],
                    );
                    Counters::add(&self.counters.replies, 1);
                }
                Verdict::Encap { vni, vtep } => {
                    let Some(u) = &self.underlay else {
                        self.counters.count_drop(DropReason::UnknownDestination);
                        continue;
                    };
                    // On the wire a frame must be whole: a super-frame is segmented.
                    let to = Dest {
                        vni,
                        vtep,
                        flow: protocol::flow::hash(frame),
                    };
                    let (txb, counters, esp) = (&mut self.txb, &self.counters, &mut self.esp);
                    let mut out = Encap {
                        txb,
                        esp,
                        u,
                        counters,
                        tables: &tables,
                        bufs: frames,
                    };
                    if !h.is_gso() {
                        tx += out.queue(to, frame);
                        continue;
                    }
                    // Segments for another overlayd node leave with partial checksums: their
                    // payloads are not summed here (the receiving task's kernel trusts them,
                    // the underlay's UDP checksum or ESP tag covering them on the way).
                    let to_node = tables.senders.contains_key(vtep.ip());
                    let segs = Segments::new(frame, &h, MAX_FRAME).map(|s| {
                        if to_node {
                            s.partial()
                        } else {
                            s
                        }
                    });
                    // Sealing needs each segment whole in the run; plain ones are gathered.
                    let sealed = tables
                        .networks
                        .get(&vni)
                        .is_some_and(|n| n.crypto.is_some());
                    match segs {
                        Ok(segs) => {
                            for k in 0..segs.count() {
                                tx += if sealed {
                                    out.queue_with(to, segs.len(k), |b| segs.write(k, b))
                                } else {
                                    out.queue_gathered(to, &segs, k, i)
                                };
                            }
                        }
                        Err(_) => self.counters.count_drop(DropReason::OffloadMalformed),
                    }
                }
                Verdict::Punt(Punt::GatewayDns { vni }) => {
                    let net = tables.networks.get(&vni);
                    let answer = net.map_or(Err(DropReason::NoRoute), |net| {
                        dns::gateway::answer(&self.dns, net, frame, &mut self.reply)
                    });
                    match answer {
                        Ok(rlen) => {
                            tx += write_port(
                                &self.ports,
                                &self.counters,
                                port,
                                &PLAIN,
                                &self.reply[..rlen],
                            );
                            Counters::add(&self.counters.replies, 1);
                        }
                        Err(reason) => self.counters.count_drop(reason),
                    }
                }
                Verdict::ReplyRemote { .. } => {}
                Verdict::Drop(reason) => self.counters.count_drop(reason),
            }
        }
        if let Some(u) = &self.underlay {
            tx += self.txb.flush(u, &self.counters, &self.frames);
        }
        Counters::add(&self.counters.worker(self.ports.lane).tx_frames, tx);
        self.count_esp();
        more
    }

    /// Adds what this worker sealed and opened since the last call to the node's counters
    /// (once per batch: the per-datagram counts are the worker's own).
    fn count_esp(&mut self) {
        let (sealed, opened) = self.esp.sealed_opened();
        let (s0, o0) = self.esp_counted;
        if (sealed, opened) != (s0, o0) {
            Counters::add(&self.counters.esp_sealed, sealed - s0);
            Counters::add(&self.counters.esp_opened, opened - o0);
            self.esp_counted = (sealed, opened);
        }
    }

    /// Handles one recvmmsg worth of VXLAN datagrams; returns whether more may be waiting.
    fn service_underlay(&mut self) -> bool {
        let (Some(u), Some(rxb)) = (&self.underlay, &mut self.rxb) else {
            return false;
        };
        let more = match rxb.recv(u) {
            Ok(more) => more,
            Err(e) => {
                debug!(error = %e, "underlay receive failed");
                return false;
            }
        };
        let tables = self.tables.load();
        let (mut rx, mut tx) = (0u64, 0u64);
        rxb.datagrams(&mut self.dgrams);
        let mine = self.counters.worker(self.ports.lane);
        bump(&mine.underlay_rx, self.dgrams.len() as u64);
        bump(
            &mine.underlay_rx_bytes,
            self.dgrams.iter().map(|d| (d.end - d.start) as u64).sum(),
        );
        for d in &self.dgrams {
            rx += 1;
            let Some(from) = underlay::ipv4_of(d.from) else {
                self.counters.count_drop(DropReason::VxlanMalformed);
                continue;
            };
            let dgram = rxb.bytes_mut(d);
            // An encrypted network's frames arrive only in ESP, opened in place here.
            let (dgram, sealed_vni, opened) = if esp::is_esp(dgram) {
                match self.esp.open(&tables, from, dgram, self.now_ms) {
                    Ok((range, vni)) => {
                        let at = range.start;
                        (&mut dgram[range], Some(vni), at)
                    }
                    Err(reason) => {
                        self.counters.count_drop(reason);
                        continue;
                    }
                }
            } else {
                (dgram, None, 0)
            };
            // Where the inner frame lies in the receive buffer, for GRO to write it from.
            let at = (d.buf, d.start + opened + vxlan::HEADER_LEN);
            let inner = vxlan::Packet::new_checked(dgram)
                .and_then(|p| vxlan::Repr::parse(&p).map(|r| (r, p)));
            let Ok((repr, mut packet)) = inner else {
                self.counters.count_drop(DropReason::VxlanMalformed);
                continue;
            };
            let encrypted = tables
                .networks
                .get(&repr.vni)
                .is_some_and(|n| n.crypto.is_some());
            match sealed_vni {
                Some(v) if v != repr.vni.get() => {
                    self.counters.count_drop(DropReason::EspMalformed);
                    continue;
                }
                None if encrypted => {
                    self.counters.count_drop(DropReason::EspCleartext);
                    continue;
                }
                _ => {}
            }
            let frame = packet.payload_mut();
            // From another overlayd node (ESP comes only from one): covered end to end, its
            // TCP/UDP checksum partial, as sent (`Encap`).
            let covered = sealed_vni.is_some() || tables.senders.contains_key(&from);
            let csum = if covered {
                L4Csum::Partial
            } else {
                L4Csum::Complete
            };
            let cx = Context {
                tables: &tables,
                flows: &self.flows,
                now_ms: self.now_ms,
            };
            match switch::from_underlay(&cx, repr.vni, from, frame, csum, &mut self.reply) {
                Verdict::Forward(to) => {
                    // Merge bulk TCP and UDP for the TAP; anything else flushes the run
                    // first, so a flow's frames keep their order.
                    let udp_gso = self.ports.udp_gso(to);
                    let len = frame.len();
                    if self.gro.push(to, frame, at, covered, udp_gso) == Push::Refused {
                        let (gro, ports, counters) = (&mut self.gro, &self.ports, &self.counters);
                        tx += flush_gro(gro, rxb, ports, counters);
                        let frame = rxb.part(at.0, at.1..at.1 + len);
                        if gro.push(to, frame, at, covered, udp_gso) == Push::Refused {
                            let hdr = delivery_header(frame, covered);
                            tx += write_port(ports, counters, to, &hdr, frame);
                        }
                    }
                }
                Verdict::Flood(vni) => {
                    let hdr = delivery_header(frame, covered);
                    tx += flood(&self.ports, &self.counters, &tables, vni, None, &hdr, frame)
                }
                Verdict::ReplyRemote { vni, vtep, len } => {
                    let mut out = Encap {
                        txb: &mut self.txb,
                        esp: &mut self.esp,
                        u,
                        counters: &self.counters,
                        tables: &tables,
                        bufs: &[],
                    };
                    let reply = &self.reply[..len];
                    let flow = protocol::flow::hash(reply);
                    tx += out.queue(Dest { vni, vtep, flow }, reply);
                    tx += self.txb.flush(u, &self.counters, &[]);
                    Counters::add(&self.counters.replies, 1);
                }
                Verdict::Drop(reason) => self.counters.count_drop(reason),
                Verdict::Reply(_) | Verdict::Encap { .. } | Verdict::Punt(_) => {}
            }
        }
        tx += flush_gro(&mut self.gro, rxb, &self.ports, &self.counters);
        let mine = self.counters.worker(self.ports.lane);
        Counters::add(&mine.rx_frames, rx);
        Counters::add(&mine.tx_frames, tx);
        self.count_esp();
        let evicted = self.esp.evicted();
        if evicted != self.esp_evicted {
            Counters::add(&self.counters.esp_evicted, evicted - self.esp_evicted);
            self.esp_evicted = evicted;
        }
        more
    }
}

/// Frames on their way to the underlay: plain VXLAN, or sealed in ESP for an encrypted
/// network (dropped, never sent in the clear, while this node has no key for it).
struct Encap<'a> {
    txb: &'a mut TxBatch,
    esp: &'a mut EspState,
    u: &'a Underlay,
    counters: &'a Counters,
    tables: &'a Tables,
    /// The TAP read buffers segments' payloads are gathered from (empty: none).
    bufs: &'a [Vec<u8>],
}

impl Encap<'_> {
    fn queue(&mut self, to: Dest, frame: &[u8]) -> u64 {
        self.queue_with(to, frame.len(), |b| b.copy_from_slice(frame))
    }

    /// Queues segment `k` of a super-frame read into TAP buffer `buf`, for a plain network:
    /// only its headers are written into the run, and its payload is gathered from the
    /// buffer when the run is sent.
    fn queue_gathered(&mut self, to: Dest, segs: &Segments<'_>, k: usize, buf: usize) -> u64 {
        let p = segs.payload(k);
        let payload = Gather {
            buf,
            range: vnet::HDR_LEN + p.start..vnet::HDR_LEN + p.end,
        };
        let (u, counters, bufs) = (self.u, self.counters, self.bufs);
        self.txb
            .queue_gather(u, counters, to, segs.head_len(), payload, bufs, |b| {
                segs.write_head(k, b)
            })
    }

    /// Queues a frame of `len` bytes that `fill` writes in place.
    fn queue_with(&mut self, to: Dest, len: usize, fill: impl FnOnce(&mut [u8])) -> u64 {
        let crypto = self
            .tables
            .networks
            .get(&to.vni)
            .and_then(|n| n.crypto.as_ref());
        let seal = match crypto {
            None => None,
            Some(c) => {
                let Some(sa) = &c.tx else {
                    self.counters.count_drop(DropReason::EspNoKey);
                    return 0;
                };
                let key = match self.esp.key(sa) {
                    Ok(key) => key,
                    Err(reason) => {
                        self.counters.count_drop(reason);
                        return 0;
                    }
                };
                let Some(seq) = self.esp.next_seq(sa.spi) else {
                    self.counters.count_drop(DropReason::EspSeqExhausted);
                    return 0;
                };
                Some(Seal { sa, key, seq })
            }
        };
        self.txb
            .queue_with(self.u, self.counters, to, len, seal, self.bufs, fill)
    }
}

/// The virtio-net header for a frame from the underlay: plain, or for a frame from another
/// overlayd node one that leaves its partial TCP/UDP checksum to the task's kernel.
fn delivery_header(frame: &[u8], covered: bool) -> [u8; vnet::HDR_LEN] {
    let mut hdr = PLAIN;
    if covered {
        vnet::partial_header(frame).emit(&mut hdr);
    }
    hdr
}

/// Writes the merged run, if any, with one `writev` from the receive buffers; returns how
/// many of the original frames it delivered.
fn flush_gro(gro: &mut Coalescer, rxb: &RxBatch, ports: &Ports, counters: &Counters) -> u64 {
    let Some(run) = gro.take() else {
        return 0;
    };
    let Some((fd, _, net)) = ports.writer(run.port) else {
        counters.count_drop(DropReason::UnknownPort);
        return 0;
    };
    let mut iov = [IoSlice::new(&[]); 2 + gro::MAX_SEGMENTS];
    iov[0] = IoSlice::new(&run.hdr);
    iov[1] = IoSlice::new(run.head);
    for (slot, (buf, range)) in iov[2..].iter_mut().zip(run.parts) {
        *slot = IoSlice::new(rxb.part(*buf, range.clone()));
    }
    let segments = run.parts.len() as u64;
    let iov = &iov[..2 + run.parts.len()];
    if write_fd(fd, counters, iov) == 0 {
        return 0;
    }
    counters.worker(ports.lane).gro.record(segments);
    count_to(net, 1, iov[1..].iter().map(|s| s.len()).sum());
    segments
}

/// Counts frames written to a port of the network whose (worker's) counters are `net`.
fn count_to(net: &NetLane, frames: u64, bytes: usize) {
    bump(&net.to_ports, frames);
    bump(&net.to_ports_bytes, bytes as u64);
}

/// Copies `frame` (with its virtio-net header) to every local port of `vni` but `except`.
fn flood(
    ports: &Ports,
    counters: &Counters,
    tables: &Tables,
    vni: Vni,
    except: Option<PortId>,
    hdr: &[u8],
    frame: &[u8],
) -> u64 {
    Counters::add(&counters.flooded, 1);
    let Some(net) = tables.networks.get(&vni) else {
        return 0;
    };
    net.local_ports
        .iter()
        .filter(|p| Some(**p) != except)
        .map(|to| write_port(ports, counters, *to, hdr, frame))
        .sum()
}

/// Writes a virtio-net header and a frame to a TAP in one system call. A UDP super-frame
/// for a port that does not take one (the ingress endpoint's link) is cut into its
/// datagrams first.
fn write_port(ports: &Ports, counters: &Counters, to: PortId, hdr: &[u8], frame: &[u8]) -> u64 {
    let Some((fd, udp_gso, net)) = ports.writer(to) else {
        counters.count_drop(DropReason::UnknownPort);
        return 0;
    };
    let h = VnetHdr::from_slice(hdr).unwrap_or_default();
    if h.gso_type & !vnet::GSO_ECN == vnet::GSO_UDP_L4 && !udp_gso {
        let Ok(segs) = vnet::Segments::new(frame, &h, MAX_FRAME) else {
            counters.count_drop(DropReason::OffloadMalformed);
            return 0;
        };
        // Rare (a task's UDP_SEGMENT send to a published port's client): one buffer per
        // super-frame is fine here.
        let mut out = vec![0u8; MAX_FRAME];
        return (0..segs.count())
            .map(|i| {
                let b = &mut out[..segs.len(i)];
                segs.write(i, b);
                let n = write_fd(fd, counters, &[IoSlice::new(&PLAIN), IoSlice::new(b)]);
                count_to(net, n, b.len() * n as usize);
                n
            })
            .sum();
    }
    let n = write_fd(fd, counters, &[IoSlice::new(hdr), IoSlice::new(frame)]);
    count_to(net, n, frame.len() * n as usize);
    n
}

fn write_fd(fd: &OwnedFd, counters: &Counters, iov: &[IoSlice<'_>]) -> u64 {
    match nix::sys::uio::writev(fd, iov) {
        Ok(_) => 1,
        Err(_) => {
            counters.count_drop(DropReason::WriteFailed);
            0
        }
    }
}
