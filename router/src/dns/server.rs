//! The resolver's sockets: one UDP socket and one TCP listener on 127.0.0.11:53 inside each
//! task's network namespace (made there, served here: a socket stays in the namespace it
//! was created in), and forwarding to the node's upstream resolvers. Every wait is bounded:
//! an upstream that fails or stays silent gives SERVFAIL within [`UPSTREAM_BUDGET`], a TCP
//! client that goes quiet is dropped, and the number of queries in flight per task is capped.

use super::answer::{self, Outcome};
use super::names::DnsView;
use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
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
/// query's id wins.
async fn forward(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    if upstreams.is_empty() || query.len() < 2 {
        return None;
    }
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
            Ok(Some(answer)) => return Some(answer),
            _ => debug!(upstream = %up, "upstream resolver gave no answer"),
        }
    }
    None
}

/// The answer for `packet`: from the cluster's names, or upstream, or SERVFAIL.
async fn resolve(
    shared: &Shared,
    networks: &[String],
    packet: &[u8],
    udp: bool,
) -> Option<Vec<u8>> {
    let outcome = answer::handle(&shared.view.load(), networks, packet, udp);
    match outcome {
        Outcome::Reply(b) => Some(b),
        Outcome::Drop => None,
        Outcome::Forward => match forward(&shared.upstreams, packet).await {
            Some(b) => Some(b),
            None => match answer::error_reply(packet, ResponseCode::ServFail) {
                Outcome::Reply(b) => Some(b),
                _ => None,
            },
        },
    }
}

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
    let conns = Arc::new(Semaphore::new(TCP_CONNS));
    let mut buf = vec![0u8; 65535];
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = udp.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let packet = buf[..n].to_vec();
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    if let Outcome::Reply(b) = answer::error_reply(&packet, ResponseCode::ServFail) {
                        let _ = udp.send_to(&b, from).await;
                    }
                    continue;
                };
                let (udp, shared, networks) = (udp.clone(), shared.clone(), networks.clone());
                tokio::spawn(async move {
                    if let Some(b) = resolve(&shared, &networks, &packet, true).await {
                        let _ = udp.send_to(&b, from).await;
                    }
                    drop(permit);
                });
            }
            r = tcp.accept() => {
                let Ok((stream, _)) = r else { continue };
                let Ok(permit) = conns.clone().try_acquire_owned() else { continue };
                let (shared, networks, cancel) = (shared.clone(), networks.clone(), cancel.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve_tcp(stream, &shared, &networks) => {}
                        _ = cancel.cancelled() => {}
                    }
                    drop(permit);
                });
            }
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
