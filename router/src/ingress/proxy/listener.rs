//! The published ports: one kernel listener (TCP) or socket (UDP) per port on every address
//! of the node, opened when a view names the port, retried while another process holds it,
//! and closed with its connections and mappings when the view drops it.

use super::tcp::reset;
use super::{Owner, Proxy};
use crate::ingress::stats::PortCounters;
use crate::ingress::ListenerView;
use mio::net::{TcpListener, UdpSocket};
use mio::{Interest, Token};
use protocol::state::PortProtocol;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{info, warn};

pub(super) type ListenerKey = (PortProtocol, u16);

pub(super) enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

pub(super) struct Listener {
    pub(super) view: ListenerView,
    pub(super) socket: Option<Socket>,
    pub(super) token: Token,
    /// Round-robin position.
    next: usize,
    pub(super) counters: Arc<PortCounters>,
}

impl Listener {
    pub(super) fn pick(&mut self) -> Option<Ipv4Addr> {
        let n = self.view.backends.len();
        if n == 0 {
            return None;
        }
        let b = self.view.backends[self.next % n];
        self.next = (self.next + 1) % n;
        Some(b)
    }
}

impl Proxy {
    pub(super) fn add_listener(&mut self, key: ListenerKey, view: ListenerView) {
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
    pub(super) fn open(&mut self, key: ListenerKey) {
        if self.iface.is_none() {
            return;
        }
        let Some(l) = self.listeners.get_mut(&key) else {
            return;
        };
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, key.1));
        // A predecessor's socket for the port (an upgrade): its backlog is served here, once
        // the view names the port's backends (right after the start the statuses may not
        // be in yet, and a connection accepted with no backend is reset); until then the
        // connections wait in the backlog (the successor closes an unclaimed socket after
        // a while).
        let name = handover_key(key);
        if l.view.backends.is_empty() && crate::upgrade::has_inherited(&name) {
            return;
        }
        let inherited = crate::upgrade::take_inherited(&name);
        let opened = match key.0 {
            PortProtocol::Tcp => match inherited {
                Some(fd) => {
                    let s = std::net::TcpListener::from(fd);
                    s.set_nonblocking(true).map(|()| TcpListener::from_std(s))
                }
                None => TcpListener::bind(addr),
            }
            .and_then(|mut s| {
                self.poll
                    .registry()
                    .register(&mut s, l.token, Interest::READABLE)?;
                Ok(Socket::Tcp(s))
            }),
            PortProtocol::Udp => match inherited {
                Some(fd) => {
                    let s = std::net::UdpSocket::from(fd);
                    s.set_nonblocking(true).map(|()| UdpSocket::from_std(s))
                }
                None => UdpSocket::bind(addr),
            }
            .and_then(|mut s| {
                self.poll
                    .registry()
                    .register(&mut s, l.token, Interest::READABLE)?;
                Ok(Socket::Udp(s))
            }),
        };
        match opened {
            Ok(s) => {
                use std::os::fd::AsFd;
                match &s {
                    Socket::Tcp(t) => crate::upgrade::note_listener(&name, t.as_fd()),
                    Socket::Udp(u) => crate::upgrade::note_listener(&name, u.as_fd()),
                }
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

    pub(super) fn close_listener(&mut self, key: ListenerKey) {
        crate::upgrade::forget_listener(&handover_key(key));
        self.close_listener_keeping_copy(key);
    }

    /// Closes a listener, its connections and mappings; the copy of its socket kept for an
    /// upgrade's successor (`crate::upgrade::note_listener`) stays, so a shutdown of the
    /// proxy does not close the port itself (the process's exit does).
    pub(super) fn close_listener_keeping_copy(&mut self, key: ListenerKey) {
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
        // Its connections and mappings go with it, but for those of tasks still draining
        // (its service was removed): they finish, or go when their task does.
        let draining = &self.draining;
        let conns = self.conns.iter_mut();
        for (t, c) in conns.filter(|(_, c)| c.listener == key && !draining.contains(&c.backend)) {
            reset(c);
            self.schedule.mark(*t);
        }
        self.drop_mappings(key, |_| true);
    }

    pub(super) fn on_listener(&mut self, key: ListenerKey) {
        match self.listeners.get(&key).map(|l| &l.socket) {
            Some(Some(Socket::Tcp(_))) => self.accept(key),
            Some(Some(Socket::Udp(_))) => self.receive_udp(key),
            _ => {}
        }
    }
}

/// A published port's name in an upgrade's handover (`crate::upgrade`): "tcp 8080".
fn handover_key(key: ListenerKey) -> String {
    match key.0 {
        PortProtocol::Tcp => format!("tcp {}", key.1),
        PortProtocol::Udp => format!("udp {}", key.1),
    }
}
