//! UDP through the proxy: a mapping per (published port, client address), each a smoltcp
//! UDP socket on one of the endpoint's ports bound to one task. Datagrams from the client
//! go to that task; the task's replies leave from the published port. A mapping expires
//! after the service's idle time (`--lb-idle-timeout`, 60 s by default).

use super::listener::{Listener, ListenerKey, Socket};
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

pub(super) struct UdpMap {
    pub(super) listener: ListenerKey,
    pub(super) client: SocketAddr,
    pub(super) handle: SocketHandle,
    pub(super) local_port: u16,
    pub(super) backend: Ipv4Addr,
    pub(super) last: Instant,
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
    pub(super) fn pump_udp(&mut self) {
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

    pub(super) fn drop_mapping(&mut self, key: (ListenerKey, SocketAddr)) {
        if let Some(m) = self.udp.remove(&key) {
            self.sockets.remove(m.handle);
            self.local_ports.release(m.local_port);
            if let Some(l) = self.listeners.get(&m.listener) {
                PortCounters::dec(&l.counters.active);
            }
        }
    }

    /// Drops the mappings idle for longer than their service allows.
    pub(super) fn expire_udp(&mut self) {
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
    }
}
