//! The datapath's I/O thread: it owns every TAP fd, waits on them with `mio`, reads frames in
//! batches, asks [`switch::from_port`] what to do with each and does it. It allocates nothing
//! per frame: frame buffers and the reply buffer are made once. Tables are read from an
//! `ArcSwap` snapshot once per batch; ports come and go through a command channel and a waker.

use super::stats::{Counters, DropReason};
use super::switch::{self, Verdict, MAX_FRAME};
use super::table::{PortId, Tables};
use arc_swap::ArcSwap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use tracing::{debug, warn};

/// Frames read from one port before the loop moves to the next one.
pub const BATCH: usize = 64;
const WAKE: Token = Token(usize::MAX);

enum Command {
    AddPort(PortId, OwnedFd),
    RemovePort(PortId),
    Stop,
}

/// Handle to the running datapath thread.
pub struct Datapath {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    tables: Arc<ArcSwap<Tables>>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl Datapath {
    pub fn start(counters: Arc<Counters>) -> io::Result<Datapath> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let tables = Arc::new(ArcSwap::from_pointee(Tables::default()));
        let (tx, rx) = mpsc::channel();
        let mut worker = Worker {
            poll,
            commands: rx,
            tables: tables.clone(),
            counters: counters.clone(),
            ports: HashMap::new(),
            ready: VecDeque::new(),
            frames: vec![[0u8; MAX_FRAME + 64]; BATCH],
            lens: [0; BATCH],
            reply: vec![0u8; MAX_FRAME],
        };
        let thread = std::thread::Builder::new()
            .name("datapath".into())
            .spawn(move || worker.run())?;
        Ok(Datapath {
            commands: tx,
            waker,
            tables,
            counters,
            thread: Some(thread),
        })
    }

    fn send(&self, c: Command) {
        if self.commands.send(c).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Hands a TAP fd to the datapath; frames from it are switched once the tables bind it.
    pub fn add_port(&self, port: PortId, fd: OwnedFd) {
        self.send(Command::AddPort(port, fd));
    }

    /// Closes a port's fd (which deletes a non-persistent TAP).
    pub fn remove_port(&self, port: PortId) {
        self.send(Command::RemovePort(port));
    }

    /// Publishes new tables; the next batch uses them.
    pub fn publish(&self, tables: Tables) {
        self.tables.store(Arc::new(tables));
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    pub fn stop(&mut self) {
        self.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    poll: Poll,
    commands: mpsc::Receiver<Command>,
    tables: Arc<ArcSwap<Tables>>,
    counters: Arc<Counters>,
    ports: HashMap<PortId, OwnedFd>,
    /// Ports that may have more to read (edge-triggered polling: a port stays here until a
    /// read says WouldBlock).
    ready: VecDeque<PortId>,
    frames: Vec<[u8; MAX_FRAME + 64]>,
    lens: [usize; BATCH],
    reply: Vec<u8>,
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
                if ev.token() == WAKE {
                    continue;
                }
                let port = PortId(ev.token().0 as u32);
                if !self.ready.contains(&port) {
                    self.ready.push_back(port);
                }
            }
            if !self.drain_commands() {
                return;
            }
            // One batch per ready port per round, so a busy port cannot starve the others.
            for _ in 0..self.ready.len() {
                let Some(port) = self.ready.pop_front() else {
                    break;
                };
                if self.service(port) {
                    self.ready.push_back(port);
                }
            }
        }
    }

    /// Applies queued commands; false when the thread should stop.
    fn drain_commands(&mut self) -> bool {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::AddPort(port, fd) => {
                    let raw = fd.as_raw_fd();
                    let reg = self.poll.registry().register(
                        &mut SourceFd(&raw),
                        Token(port.0 as usize),
                        Interest::READABLE,
                    );
                    match reg {
                        Ok(()) => {
                            self.ports.insert(port, fd);
                            self.ready.push_back(port);
                        }
                        Err(e) => warn!(port = port.0, error = %e, "cannot poll port"),
                    }
                }
                Command::RemovePort(port) => {
                    if let Some(fd) = self.ports.remove(&port) {
                        let raw = fd.as_raw_fd();
                        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
                    }
                    self.ready.retain(|p| *p != port);
                }
                Command::Stop => return false,
            }
        }
        true
    }

    /// Reads and handles one batch from `port`; true if the port may have more.
    fn service(&mut self, port: PortId) -> bool {
        let Some(fd) = self.ports.get(&port) else {
            return false;
        };
        let mut n = 0;
        let mut more = true;
        while n < BATCH {
            match nix::unistd::read(fd, &mut self.frames[n]) {
                Ok(0) => {
                    more = false;
                    break;
                }
                Ok(len) => {
                    self.lens[n] = len;
                    n += 1;
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    more = false;
                    break;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    debug!(port = port.0, error = %e, "read from port failed");
                    more = false;
                    break;
                }
            }
        }
        if n == 0 {
            return false;
        }
        Counters::add(&self.counters.rx_frames, n as u64);
        let tables = self.tables.load();
        let mut tx = 0u64;
        for i in 0..n {
            let frame = &self.frames[i][..self.lens[i]];
            match switch::from_port(&tables, port, frame, &mut self.reply) {
                Verdict::Forward(to) => tx += self.write(to, frame),
                Verdict::Reply(len) => {
                    tx += write_fd(&self.ports, &self.counters, port, &self.reply[..len]);
                    Counters::add(&self.counters.replies, 1);
                }
                Verdict::Flood(vni) => {
                    Counters::add(&self.counters.flooded, 1);
                    if let Some(net) = tables.networks.get(&vni) {
                        for to in net.local_ports.iter().filter(|p| **p != port) {
                            tx += self.write(*to, frame);
                        }
                    }
                }
                Verdict::Encap { .. } => {
                    // No underlay socket on a single node: nothing is remote.
                    self.counters.count_drop(DropReason::UnknownDestination);
                }
                Verdict::Drop(reason) => self.counters.count_drop(reason),
            }
        }
        Counters::add(&self.counters.tx_frames, tx);
        more
    }

    fn write(&self, to: PortId, frame: &[u8]) -> u64 {
        write_fd(&self.ports, &self.counters, to, frame)
    }
}

fn write_fd(
    ports: &HashMap<PortId, OwnedFd>,
    counters: &Counters,
    to: PortId,
    frame: &[u8],
) -> u64 {
    let Some(fd) = ports.get(&to) else {
        counters.count_drop(DropReason::UnknownPort);
        return 0;
    };
    match nix::unistd::write(fd, frame) {
        Ok(_) => 1,
        Err(_) => {
            counters.count_drop(DropReason::WriteFailed);
            0
        }
    }
}
