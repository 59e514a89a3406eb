//! Which datapath worker receives a VXLAN datagram: a classic BPF program attached to the
//! underlay's `SO_REUSEPORT` group (`SO_ATTACH_REUSEPORT_CBPF`), run by the kernel for every
//! datagram to pick the socket, hence the worker.
//!
//! - An ESP datagram (first byte with the top bit set, `protocol::esp`) goes to the worker
//!   named by the low byte of its IV's epoch: the sending worker's lane. All datagrams under
//!   one (SPI, sender, lane) reach one worker, whose replay window is then the only one that
//!   can see them; a replay with a rewritten outer header cannot reach another worker's
//!   window (and a rewritten lane fails authentication, since the IV is part of the nonce).
//! - Anything else goes by its outer UDP source port, which the sender derived from the inner
//!   flow (RFC 7348 section 5): one flow, one worker, in order. The kernel's own VXLAN does
//!   the same, so its flows spread too.
//!
//! The program sees the UDP payload at offset 0 (the kernel pulls the UDP header first); the
//! source port is read relative to the network header, assuming a 20-byte IPv4 header (no
//! options; with options the index is still valid, just another one). A load past the end
//! makes the program return 0: worker 0. The kernel's own crate-less ABI is a few constants
//! and one setsockopt, hence no dependency.

use std::io;
use std::os::fd::AsRawFd;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; libc defines it only for Android).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// Offset of the IPv4 source port relative to the network header, for cBPF's negative loads.
const NET_OFF_SPORT: u32 = (libc::SKF_NET_OFF + 20) as u32;
/// Offset of the low byte of the epoch in an ESP datagram: SPI (4), sequence (4), epoch (4).
const ESP_LANE_BYTE: u32 = 11;

fn op(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The program for a group of `workers` sockets.
pub fn program(workers: u32) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_H, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_MOD, BPF_RET,
    };
    let n = workers.max(1);
    vec![
        // A = first payload byte; ESP if its top bit is set.
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 0),
        op(BPF_JMP | BPF_JSET | BPF_K, 0, 3, 0x80),
        // ESP: A = lane byte % n.
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, ESP_LANE_BYTE),
        op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, n),
        op(BPF_RET | BPF_A, 0, 0, 0),
        // VXLAN: A = outer source port % n.
        op(BPF_LD | BPF_H | BPF_ABS, 0, 0, NET_OFF_SPORT),
        op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, n),
        op(BPF_RET | BPF_A, 0, 0, 0),
    ]
}

/// Attaches the steering program for `workers` sockets to the reuseport group of `sock`.
pub fn attach(sock: &impl AsRawFd, workers: u32) -> io::Result<()> {
    let mut prog = program(workers);
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies the
    // program and keeps no pointer to it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use crate::forward::underlay::Sockets;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::time::Duration;

    /// Which of `rx` gets a datagram (None: none within a second).
    fn receiver(rx: &[UdpSocket]) -> Option<usize> {
        let mut buf = [0u8; 64];
        for _ in 0..100 {
            for (i, s) in rx.iter().enumerate() {
                if s.recv_from(&mut buf).is_ok() {
                    return Some(i);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// The real kernel runs the program: over loopback, a VXLAN datagram goes to the socket
    /// its source port names (port % workers), the same one every time; an ESP datagram to
    /// the one its lane byte names, whatever its source port.
    #[test]
    fn the_kernel_steers_by_source_port_and_by_esp_lane() {
        let lo = Ipv4Addr::LOCALHOST;
        // A free port for the group.
        let port = UdpSocket::bind((lo, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let group = Sockets::bind(lo, port, 2).unwrap();
        for s in &group.rx {
            s.set_nonblocking(true).unwrap();
        }
        let vxlan = [0x08u8, 0, 0, 0, 0, 0x10, 0x01, 0];
        for _ in 0..3 {
            for sender in 0..4 {
                let from = UdpSocket::bind((lo, 0)).unwrap();
                let sport = from.local_addr().unwrap().port();
                from.send_to(&vxlan, (lo, port)).unwrap();
                assert_eq!(
                    receiver(&group.rx),
                    Some(usize::from(sport) % 2),
                    "sender {sender}"
                );
            }
        }
        // ESP: SPI (top bit set), sequence, then the epoch whose low byte is the lane.
        for lane in [0u8, 1, 2, 3] {
            let mut esp = [0u8; 24];
            esp[0] = 0x81;
            esp[11] = lane;
            let from = UdpSocket::bind((lo, 0)).unwrap();
            from.send_to(&esp, (lo, port)).unwrap();
            assert_eq!(
                receiver(&group.rx),
                Some(usize::from(lane) % 2),
                "lane {lane}"
            );
        }
    }
}
