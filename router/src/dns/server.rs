//! The resolver's sockets: one UDP socket and one TCP listener on 127.0.0.11:53 inside each
//! task's network namespace (made there, served here: a socket stays in the namespace it
//! was created in), and forwarding to the node's upstream resolvers. Every wait is bounded:
//! an upstream that fails or stays silent gives SERVFAIL within [`UPSTREAM_BUDGET`], a TCP
//! client that goes quiet is dropped, and the number of queries in flight per task is capped.

use super::answer::{self, Outcome};
use super::names::DnsView;
use super::stats::{self, DnsStats};
use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Where every task's resolver listens, as in Docker.
pub const RESOLVER_ADDR: &str = "127.0.0.11:53";
/// The whole time a query may spend upstream before the client gets SERVFAIL.
pub const UPSTREAM_BUDGET: Duration = Duration::from_millis(1800);
/// Queries of one task waiting on upstream at once; more get SERVFAIL at once.
const IN_FLIGHT: usize = 64;
/// TCP connections of one task at once, and how long one may stay silent.
const TCP_CONNS: usize = 16;
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What every resolver of the node shares.
pub struct Shared {
    pub view: ArcSwap<DnsView>,
    pub upstreams: Vec<SocketAddr>,
    pub stats: DnsStats,
}

impl Shared {
    pub fn new(upstreams: Vec<SocketAddr>) -> Shared {
        Shared {
            view: ArcSwap::default(),
            upstreams,
            stats: DnsStats::default(),
        }
    }
}

/// The nameservers of a resolv.conf.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Sends `query` to the upstreams in turn within the budget; the first answer with the
/// query's id wins (and its wait is recorded).
async fn forward(shared: &Shared, query: &[u8]) -> Option<Vec<u8>> {
    let upstreams = &shared.upstreams;
    if upstreams.is_empty() || query.len() < 2 {
        return None;
    }
    let began = Instant::now();
    let each = UPSTREAM_BUDGET / upstreams.len() as u32;
    let mut buf = vec![0u8; 65535];
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let attempt = async {
            let sock = UdpSocket::bind(bind).await.ok()?;
            sock.connect(up).await.ok()?;
            sock.send(query).await.ok()?;
            loop {
                let n = sock.recv(&mut buf).await.ok()?;
                if n >= 12 && buf[..2] == query[..2] {
                    return Some(buf[..n].to_vec());
                }
            }
        };
        match tokio::time::timeout(each, attempt).await {
            Ok(Some(answer)) => {
                shared.stats.upstream_answered(began.elapsed());
                return Some(answer);
            }
            _ => debug!(upstream = %up, "upstream resolver gave no answer"),
        }
    }
    None
}

/// SERVFAIL for `packet`, if it deserves an answer.
fn servfail(packet: &[u8]) -> Option<Vec<u8>> {
    match answer::error_reply(packet, ResponseCode::ServFail) {
        Outcome::Reply(b) => Some(b),
        _ => None,
    }
}

/// The upstreams' answer for `packet`, or SERVFAIL; counted.
async fn upstream(shared: &Shared, packet: &[u8]) -> Option<Vec<u8>> {
    match forward(shared, packet).await {
        Some(b) => {
            shared.stats.count(packet, stats::Outcome::Upstream);
            Some(b)
        }
        None => refuse(shared, packet),
    }
}

/// SERVFAIL for `packet` (upstream failed, or too many queries wait on it); counted.
fn refuse(shared: &Shared, packet: &[u8]) -> Option<Vec<u8>> {
    shared.stats.count(packet, stats::Outcome::ServFail);
    servfail(packet)
}

/// The resolver's own reply (or none) for `packet`, counted.
fn own(shared: &Shared, packet: &[u8], reply: Option<Vec<u8>>) -> Option<Vec<u8>> {
    let outcome = match &reply {
        Some(b) => stats::Outcome::of_own_reply(b),
        None => stats::Outcome::Dropped,
    };
    shared.stats.count(packet, outcome);
    reply
}

/// The answer for `packet`: from the cluster's names, or upstream, or SERVFAIL.
async fn resolve(
    shared: &Shared,
    networks: &[String],
    packet: &[u8],
    udp: bool,
) -> Option<Vec<u8>> {
    match answer::handle(&shared.view.load(), networks, packet, udp) {
        Outcome::Reply(b) => own(shared, packet, Some(b)),
        Outcome::Drop => own(shared, packet, None),
        Outcome::Forward => upstream(shared, packet).await,
    }
}

/// UDP receive loops per task: queries are answered where they are read, and two loops
/// let a busy resolver use two runtime threads.
const UDP_LOOPS: usize = 2;

/// Serves one task's resolver sockets until `cancel`.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    networks: Vec<String>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let udp = Arc::new(udp);
    let networks: Arc<[String]> = networks.into();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    for _ in 1..UDP_LOOPS {
        let (udp, networks, shared, slots, cancel) = (
            udp.clone(),
            networks.clone(),
            shared.clone(),
            slots.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_udp(&udp, &networks, &shared, &slots) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
    let conns = Arc::new(Semaphore::new(TCP_CONNS));
    let accept = async {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                // Out of descriptors or similar: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                continue;
            };
            let (shared, networks, cancel) = (shared.clone(), networks.clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = serve_tcp(stream, &shared, &networks) => {}
                    _ = cancel.cancelled() => {}
                }
                drop(permit);
            });
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = serve_udp(&udp, &networks, &shared, &slots) => {}
        _ = accept => {}
    }
}

/// Sends a reply without yielding when the socket has room (nearly always).
async fn reply_to(udp: &UdpSocket, b: &[u8], to: SocketAddr) {
    match udp.try_send_to(b, to) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let _ = udp.send_to(b, to).await;
        }
        _ => {}
    }
}

/// One UDP receive loop: cluster names are answered here and now; only upstream waits get
/// a task of their own (at most [`IN_FLIGHT`] per task; past that, SERVFAIL at once).
async fn serve_udp(
    udp: &Arc<UdpSocket>,
    networks: &[String],
    shared: &Arc<Shared>,
    slots: &Arc<Semaphore>,
) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, from)) = udp.recv_from(&mut buf).await else {
            continue;
        };
        let packet = &buf[..n];
        let reply = match answer::handle(&shared.view.load(), networks, packet, true) {
            Outcome::Reply(b) => own(shared, packet, Some(b)),
            Outcome::Drop => own(shared, packet, None),
            Outcome::Forward => match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (udp, shared, packet) = (udp.clone(), shared.clone(), packet.to_vec());
                    tokio::spawn(async move {
                        if let Some(b) = upstream(&shared, &packet).await {
                            reply_to(&udp, &b, from).await;
                        }
                        drop(permit);
                    });
                    None
                }
                Err(_) => refuse(shared, packet),
            },
        };
        if let Some(b) = reply {
            reply_to(udp, &b, from).await;
        }
    }
}

/// DNS over TCP: length-prefixed messages, answered in order, until the client is done or
/// silent for [`TCP_IDLE`].
async fn serve_tcp(mut s: TcpStream, shared: &Shared, networks: &[String]) {
    let mut buf = vec![0u8; 65535];
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let n = usize::from(u16::from_be_bytes(len));
        let body = &mut buf[..n];
        if !matches!(
            tokio::time::timeout(TCP_IDLE, s.read_exact(body)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(answer) = resolve(shared, networks, body, false).await else {
            return;
        };
        let mut out = (answer.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&answer);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let t = "# comment\nnameserver 198.18.0.53\nsearch x\nnameserver ::1\nnameserver bad\n";
        let u = upstreams_from_resolv_conf(t);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].to_string(), "198.18.0.53:53");
    }
}
