//! TAP devices through `/dev/net/tun`.
//!
//! Written against the kernel ABI instead of using a crate because the TAP must be created
//! from a thread that has entered the task's network namespace, and its raw fd is handed to
//! our own poll loop; the crates we looked at (tun-tap, tun-rs) configure addresses and
//! state themselves, which we do over netlink per namespace. The whole ABI used here is two
//! ioctls (`TUNSETIFF`, `TUNSETOFFLOAD`), and `TUNSETPERSIST` for a task's TAPs.
//!
//! A task's TAP is persistent: it outlives the fds of the overlayd that made it, so that a
//! task keeps its interface (address, MAC, routes) while no router runs, and the next
//! overlayd attaches to it again by name ([`create`] on an existing device does that). It is
//! deleted with the task's network namespace.
//!
//! A TAP has one queue per datapath worker (`IFF_MULTI_QUEUE`): each queue is its own fd,
//! opened by attaching to the device by name again. The task's kernel picks a queue per flow
//! by the steering program `tap_steer` attaches (the datapath's own flow hash), which
//! spreads a task's flows over the workers and keeps each on one.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use super::tap_steer;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Offloads we accept from the task's kernel: partial checksums, TCP segmentation over
/// IPv4 and IPv6 (with ECN) and, where the kernel has it (Linux 6.2+), UDP segmentation
/// (both flags are needed). The datapath completes or segments whatever leaves through the
/// underlay; and a TAP with USO also takes UDP super-frames the datapath merges (GRO) on
/// their way in.
const TUN_F_CSUM: libc::c_int = 0x01;
const TUN_F_TSO4: libc::c_int = 0x02;
const TUN_F_TSO6: libc::c_int = 0x04;
const TUN_F_TSO_ECN: libc::c_int = 0x08;
const TUN_F_USO4: libc::c_int = 0x20;
const TUN_F_USO6: libc::c_int = 0x40;
const OFFLOADS: libc::c_int = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;

/// Whether this kernel's TAPs take UDP segmentation offload (learnt from the first TAP).
static UDP_OFFLOAD: AtomicBool = AtomicBool::new(false);

/// Whether the TAPs made so far take UDP super-frames (`vnet::GSO_UDP_L4`) both ways.
pub fn udp_offload() -> bool {
    UDP_OFFLOAD.load(Ordering::Relaxed)
}
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags, padded to the union's size.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

// TUNSETIFF = _IOW('T', 202, int); the kernel reads a whole `struct ifreq` from the pointer.
nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, IfReq);
// TUNSETOFFLOAD = _IOW('T', 208, unsigned int); the flags are passed by value.
nix::ioctl_write_int_bad!(tunsetoffload, 0x4004_54d0);
// TUNSETPERSIST = _IOW('T', 203, int); the flag is passed by value.
nix::ioctl_write_int_bad!(tunsetpersist, 0x4004_54cb);

/// Creates TAP device `name` with `queues` queues in the calling thread's network namespace
/// (or attaches to it again, if it exists with the same flags: a persistent one) and returns
/// their fds, non-blocking. The device lives as long as one of them, or until it is deleted
/// if it is persistent ([`persist`]). Every frame
/// read from or written to it carries a virtio-net header (`datapath::vnet`), and the task's
/// kernel may hand over TCP (and, with USO, UDP) super-frames and partial checksums. With
/// several queues, the flow steering program (`tap_steer`) is attached.
pub fn create(name: &str, queues: usize) -> io::Result<Vec<OwnedFd>> {
    let fds = (0..queues.max(1))
        .map(|_| open_queue(name, queues > 1))
        .collect::<io::Result<Vec<_>>>()?;
    if fds.len() > 1 {
        // Without the program the kernel's own steering still works, only less steadily.
        if let Err(e) = tap_steer::attach(&fds[0]) {
            tracing::warn!(tap = name, error = %e, "no flow steering program on the TAP");
        }
    }
    Ok(fds)
}

/// Makes the TAP behind `fd` outlive every fd of it (`TUNSETPERSIST`).
pub fn persist(fd: &OwnedFd) -> io::Result<()> {
    set_persist(fd, true)
}

/// Undoes [`persist`]: the TAP behind `fd` goes once its last fd is closed, wherever it is
/// (an image task's TAP may be inside its container's namespace or back in overlayd's).
pub fn unpersist(fd: &OwnedFd) -> io::Result<()> {
    set_persist(fd, false)
}

fn set_persist(fd: &OwnedFd, on: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its flag by value; the fd is an attached TAP queue.
    unsafe { tunsetpersist(fd.as_raw_fd(), libc::c_int::from(on)) }
        .map(drop)
        .map_err(|e| io::Error::other(format!("TUNSETPERSIST: {e}")))
}

fn open_queue(name: &str, multi: bool) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | if multi { IFF_MULTI_QUEUE } else { 0 },
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a properly sized, initialised `struct ifreq` that outlives the call,
    // and the fd is an open /dev/net/tun descriptor.
    unsafe { tunsetiff(file.as_raw_fd(), &req) }
        .map_err(|e| io::Error::other(format!("TUNSETIFF {name}: {e}")))?;
    // SAFETY: TUNSETOFFLOAD takes its flags by value; the fd is the TAP just configured.
    // A kernel without USO refuses the whole set with EINVAL: then without it.
    let fd = file.as_raw_fd();
    let uso = unsafe { tunsetoffload(fd, OFFLOADS | TUN_F_USO4 | TUN_F_USO6) }.is_ok();
    if !uso {
        // SAFETY: as above.
        unsafe { tunsetoffload(fd, OFFLOADS) }
            .map_err(|e| io::Error::other(format!("TUNSETOFFLOAD {name}: {e}")))?;
    }
    UDP_OFFLOAD.store(uso, Ordering::Relaxed);
    Ok(OwnedFd::from(file))
}
