//! UDP through the proxy: a mapping per (published port, client address), each a smoltcp
//! UDP socket on one of the endpoint's ports bound to one task. Datagrams from the client
//! go to that task; the task's replies leave from the published port. A mapping expires
//! after the service's idle time (`--lb-idle-timeout`, 60 s by default). A port keeps at
//! most [`UDP_MAPPINGS_PER_PORT`] of them (`mappings`): a new client beyond that takes the
//! place of the one idle the longest, counted as `evicted` in the port's stats.

use super::listener::{Listener, ListenerKey, Socket};
use super::mappings::{Mappings, UDP_MAPPINGS_PER_PORT};
use super::Proxy;
use crate::ingress::stats::PortCounters;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::{IpAddress, IpEndpoint};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const UDP_PACKETS: usize = 64;
const UDP_BUFFER: usize = 64 << 10;

/// One client's mapping: its smoltcp socket towards the task.
pub(super) struct UdpMap {
    pub(super) handle: SocketHandle,
    pub(super) local_port: u16,
    pub(super) backend: Ipv4Addr,
}

impl Proxy {
    pub(super) fn receive_udp(&mut self, key: ListenerKey) {
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
            let now = Instant::now();
            let target = l.view.target;
            let counters = l.counters.clone();
            let known = self
                .udp
                .get_mut(&key)
                .and_then(|t| t.get(&client, now))
                .map(|m| (m.handle, m.backend));
            let Some((handle, backend)) = known.or_else(|| self.map_client(key, client, now))
            else {
                PortCounters::inc(&counters.refused);
                continue;
            };
            let to = IpEndpoint::new(IpAddress::Ipv4(backend), target);
            let s = self.sockets.get_mut::<udp::Socket>(handle);
            match s.send_slice(&self.buf[..n], to) {
                Ok(()) => PortCounters::add(&counters.bytes_in, n),
                Err(_) => PortCounters::inc(&counters.dropped),
            }
        }
    }

    /// Makes a mapping for a new client of the port `key`, to the next task in turn; at the
    /// port's cap, or the node's (`--ingress-max-connections`), the port's mapping idle the
    /// longest makes room. None (refused) when no task serves the port or no room can be
    /// made.
    fn map_client(
        &mut self,
        key: ListenerKey,
        client: SocketAddr,
        now: Instant,
    ) -> Option<(SocketHandle, Ipv4Addr)> {
        let l = self.listeners.get_mut(&key)?;
        let backend = l.pick()?;
        let counters = l.counters.clone();
        let node_full = self.udp.values().map(Mappings::len).sum::<usize>() >= self.max_connections;
        let table = self
            .udp
            .entry(key)
            .or_insert_with(|| Mappings::new(UDP_MAPPINGS_PER_PORT));
        if node_full || table.is_full() {
            let (_, oldest) = table.evict_oldest()?;
            self.release(key, oldest);
            PortCounters::inc(&counters.evicted);
        }
        let local_port = self.local_ports.take()?;
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
            return None;
        }
        let handle = self.sockets.add(s);
        PortCounters::inc(&counters.accepted);
        PortCounters::inc(&counters.active);
        let m = UdpMap {
            handle,
            local_port,
            backend,
        };
        let table = self
            .udp
            .entry(key)
            .or_insert_with(|| Mappings::new(UDP_MAPPINGS_PER_PORT));
        // Room was made above, so this evicts nothing; were it to, the count stays true.
        if let Some((_, oldest)) = table.insert(client, m, now) {
            self.release(key, oldest);
            PortCounters::inc(&counters.evicted);
        }
        Some((handle, backend))
    }

    /// Sends tasks' replies back to their clients, from the published port.
    pub(super) fn pump_udp(&mut self) {
        let now = Instant::now();
        let sockets = &mut self.sockets;
        for (key, table) in self.udp.iter_mut() {
            let Some(Listener {
                socket: Some(Socket::Udp(out)),
                counters,
                ..
            }) = self.listeners.get(key)
            else {
                continue;
            };
            table.visit(now, |client, m| {
                let s = sockets.get_mut::<udp::Socket>(m.handle);
                let mut replied = false;
                while let Ok((data, _)) = s.recv() {
                    replied = true;
                    match out.send_to(data, client) {
                        Ok(n) => PortCounters::add(&counters.bytes_out, n),
                        Err(_) => PortCounters::inc(&counters.dropped),
                    }
                }
                replied
            });
        }
    }

    /// Frees a mapping's socket and endpoint port.
    fn release(&mut self, key: ListenerKey, m: UdpMap) {
        self.sockets.remove(m.handle);
        self.local_ports.release(m.local_port);
        if let Some(l) = self.listeners.get(&key) {
            PortCounters::dec(&l.counters.active);
        }
    }

    /// Drops the mappings of the port `key` that `doomed` picks (all of them: `|_| true`).
    pub(super) fn drop_mappings(&mut self, key: ListenerKey, doomed: impl FnMut(&UdpMap) -> bool) {
        let Some(table) = self.udp.get_mut(&key) else {
            return;
        };
        let gone = table.remove_where(doomed);
        if table.is_empty() {
            self.udp.remove(&key);
        }
        for (_, m) in gone {
            self.release(key, m);
        }
    }

    /// Drops the mappings idle for longer than their service allows: the oldest of each
    /// port, until one is young enough.
    pub(super) fn expire_udp(&mut self) {
        let now = Instant::now();
        let keys: Vec<ListenerKey> = self.udp.keys().copied().collect();
        for key in keys {
            let limit = self
                .listeners
                .get(&key)
                .map_or(Duration::ZERO, |l| l.view.udp_idle);
            let mut idle = Vec::new();
            if let Some(table) = self.udp.get_mut(&key) {
                while let Some((_, m)) = table.pop_idle(now, limit) {
                    idle.push(m);
                }
                if table.is_empty() {
                    self.udp.remove(&key);
                }
            }
            for m in idle {
                self.release(key, m);
            }
        }
    }
}
