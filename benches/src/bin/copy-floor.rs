//! The floor of any overlay router built on a TAP and a UDP socket: a relay that does
//! nothing but the four copies such a design cannot avoid, and nothing else.
//!
//! `copy-floor --tap NAME --local ADDR:PORT --peer ADDR:PORT` creates TAP `NAME` with the
//! same offloads as overlayd's (partial checksums, TSO, USO; `router::sys::tap`), then
//! relays in two blocking threads until killed:
//! - TAP → peer: each frame read from the TAP (a super-frame of up to 64 KiB with its
//!   virtio-net header) leaves as one UDP datagram, as read: no switching, no headers, no
//!   segmentation, no checksum;
//! - peer → TAP: each datagram is written to the TAP as received.
//!
//! That is one copy out of the kernel and one back in per node (TAP read, socket send;
//! socket receive, TAP write) and a system call per 64 KiB, with the underlay's MTU raised
//! so that the datagrams cross it whole. No real router can do less on a TAP and a socket:
//! it must also switch, encapsulate and fit its datagrams to a real underlay's MTU.
//! `benches/copy-floor.sh` runs it next to the kernel's VXLAN path and overlayd, in one run.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::{env, io, thread};

use nix::sys::socket::{setsockopt, sockopt};

/// Room for the largest TAP super-frame (64 KiB and the virtio-net header) or datagram.
const BUF: usize = 65_600;

struct Args {
    tap: String,
    local: SocketAddr,
    peer: SocketAddr,
}

fn parse() -> Result<Args, String> {
    let mut it = env::args().skip(1);
    let (mut tap, mut local, mut peer) = (None, None, None);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let addr = |v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| format!("{flag} {v}: {e}"))
        };
        match flag.as_str() {
            "--tap" => tap = Some(value),
            "--local" => local = Some(addr(&value)?),
            "--peer" => peer = Some(addr(&value)?),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    match (tap, local, peer) {
        (Some(tap), Some(local), Some(peer)) => Ok(Args { tap, local, peer }),
        _ => Err("usage: copy-floor --tap NAME --local ADDR:PORT --peer ADDR:PORT".into()),
    }
}

fn blocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads from the TAP and sends each frame as one datagram. Returns only on a TAP error.
fn tap_to_peer(tap: Arc<OwnedFd>, sock: UdpSocket, drops: Arc<AtomicU64>) -> io::Error {
    let mut buf = vec![0u8; BUF];
    loop {
        // SAFETY: `buf` is valid for `BUF` bytes of writes for the duration of the call.
        let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), BUF) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return e;
        }
        // A datagram too large for UDP, or a full socket: counted, as a router drops.
        if sock.send(&buf[..n as usize]).is_err() {
            drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Receives datagrams and writes each to the TAP. Returns only on a socket error.
fn peer_to_tap(tap: Arc<OwnedFd>, sock: UdpSocket, drops: Arc<AtomicU64>) -> io::Error {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return e,
        };
        // SAFETY: the first `n` bytes of `buf` are initialised and valid for reads.
        if unsafe { libc::write(tap.as_raw_fd(), buf.as_ptr().cast(), n) } < 0 {
            drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn run(args: Args) -> io::Result<()> {
    let fd = router::sys::tap::create(&args.tap, 1)?
        .pop()
        .ok_or_else(|| io::Error::other("no TAP queue"))?;
    blocking(&fd)?;
    let tap = Arc::new(fd);
    let sock = UdpSocket::bind(args.local)?;
    sock.connect(args.peer)?;
    // overlayd's underlay buffers, so that neither side queues less than the other.
    let size = router::forward::underlay::SOCKET_BUFFER;
    setsockopt(&sock, sockopt::RcvBuf, &size)?;
    setsockopt(&sock, sockopt::SndBuf, &size)?;
    let drops = Arc::new(AtomicU64::new(0));
    let out = {
        let (tap, sock, drops) = (tap.clone(), sock.try_clone()?, drops.clone());
        thread::spawn(move || tap_to_peer(tap, sock, drops))
    };
    let err = peer_to_tap(tap, sock, drops.clone());
    let _ = out.join();
    Err(io::Error::new(
        err.kind(),
        format!(
            "relay stopped ({} drops): {err}",
            drops.load(Ordering::Relaxed)
        ),
    ))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("copy-floor: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("copy-floor: {e}");
            ExitCode::FAILURE
        }
    }
}
