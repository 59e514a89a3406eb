//! Which queue of a multi-queue TAP, hence which datapath worker, gets a frame the task's
//! kernel sends: an eBPF program attached to the TAP (`TUNSETSTEERINGEBPF`) that computes
//! [`protocol::flow::hash`] for IPv4 frames; the kernel takes it modulo the queue count.
//!
//! Without it the kernel steers by its own hash and then by where the flow's replies were
//! last written ("automq"), an entry that expires three seconds after the last reply: a
//! one-way flow (a UDP stream) moves to another queue, hence another worker, mid-stream,
//! which may reorder it. With it a flow always takes one queue. And since the hash is the
//! one the datapath picks the sending socket by (the outer source port, `port % workers` at
//! the receiving node), a connection's both directions are handled by the same worker on
//! every node when the worker count divides the 16 sending ports.
//!
//! Frames that are not IPv4 return 0 (queue 0): ARP, IPv6. A load past the frame's end
//! aborts the program, which also returns 0.
//!
//! Written by hand like `steer.rs`: the program is 93 instructions with no maps and no
//! helpers (packet loads are the legacy `LD_ABS`/`LD_IND` instructions socket filters keep),
//! and the ABI is one `bpf(BPF_PROG_LOAD)` and one ioctl; a loader crate (aya, libbpf-rs)
//! would bring an ELF toolchain for nothing more.
//!
//! Two tests hold it to `flow::hash`: `interpreted` runs it in userspace (rbpf) on arbitrary
//! frames in every `cargo test`, and a root-only test has the kernel steer a real TAP by it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `TUNSETSTEERINGEBPF` = `_IOR('T', 224, int)`: takes a pointer to the program's fd.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// One eBPF instruction (`struct bpf_insn`): the registers share a byte, dst in the low half.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: src << 4 | dst,
        off,
        imm,
    }
}

// Opcodes used (linux/bpf.h, bpf_common.h).
const LD_ABS_B: u8 = 0x30;
const LD_ABS_H: u8 = 0x28;
const LD_ABS_W: u8 = 0x20;
const LD_IND_H: u8 = 0x48;
const STX_DW: u8 = 0x7b;
const LDX_DW: u8 = 0x79;
const ST_DW: u8 = 0x7a;
const MOV_K: u8 = 0xb7;
const MOV_X: u8 = 0xbf;
const AND_K: u8 = 0x57;
const LSH_K: u8 = 0x67;
const RSH_K: u8 = 0x77;
const OR_X: u8 = 0x4f;
const XOR_X: u8 = 0xaf;
const MUL_X: u8 = 0x2f;
const LD_IMM64: u8 = 0x18;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JLT_K: u8 = 0xa5;
const JLE_X: u8 = 0xbd;
const JA: u8 = 0x05;
const EXIT: u8 = 0x95;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const FP: u8 = 10;

/// A program under construction, with forward jumps patched by label.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    /// (instruction index, label) of jumps to patch.
    fixups: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn op(&mut self, i: Insn) -> &mut Self {
        self.code.push(i);
        self
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: &'static str) -> &mut Self {
        self.fixups.push((self.code.len(), to));
        self.op(insn(code, dst, src, 0, imm))
    }

    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.code.len()));
        self
    }

    fn imm64(&mut self, dst: u8, v: u64) -> &mut Self {
        self.op(insn(LD_IMM64, dst, 0, 0, v as u32 as i32));
        self.op(insn(0, 0, 0, 0, (v >> 32) as u32 as i32))
    }

    /// SplitMix64's finaliser on `x`, as `protocol::flow`'s `mix`; clobbers `t`.
    fn mix(&mut self, x: u8, t: u8) -> &mut Self {
        for (shift, mul) in [(30, 0xbf58_476d_1ce4_e5b9u64), (27, 0x94d0_49bb_1331_11eb)] {
            self.op(insn(MOV_X, t, x, 0, 0))
                .op(insn(RSH_K, t, 0, 0, shift))
                .op(insn(XOR_X, x, t, 0, 0))
                .imm64(t, mul)
                .op(insn(MUL_X, x, t, 0, 0));
        }
        self.op(insn(MOV_X, t, x, 0, 0))
            .op(insn(RSH_K, t, 0, 0, 31))
            .op(insn(XOR_X, x, t, 0, 0))
    }

    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in std::mem::take(&mut self.fixups) {
            let target = self
                .labels
                .iter()
                .find(|(name, _)| *name == to)
                .map(|(_, i)| *i)
                .expect("jump to a defined label");
            self.code[at].off = (target - at - 1) as i16;
        }
        self.code
    }
}

/// The steering program: `flow::hash` of an IPv4 frame, 0 for anything else.
pub fn program() -> Vec<Insn> {
    let mut a = Asm::default();
    // Stack: -8 source port, -16 destination port (0 when the frame has none), -24 source.
    a.op(insn(MOV_X, R6, R1, 0, 0))
        .op(insn(ST_DW, FP, 0, -8, 0))
        .op(insn(ST_DW, FP, 0, -16, 0))
        .op(insn(LD_ABS_H, 0, 0, 0, 12))
        .jump(JNE_K, R0, 0, 0x0800, "other")
        .op(insn(LD_ABS_B, 0, 0, 0, 14))
        .op(insn(MOV_X, R7, R0, 0, 0))
        .op(insn(AND_K, R7, 0, 0, 0xf0))
        .jump(JNE_K, R7, 0, 0x40, "other")
        // r9 = header length in bytes; r7 = protocol; r8 = fragment bits.
        .op(insn(AND_K, R0, 0, 0, 0x0f))
        .op(insn(LSH_K, R0, 0, 0, 2))
        .op(insn(MOV_X, R9, R0, 0, 0))
        .op(insn(LD_ABS_B, 0, 0, 0, 14 + 9))
        .op(insn(MOV_X, R7, R0, 0, 0))
        .op(insn(LD_ABS_H, 0, 0, 0, 14 + 6))
        .op(insn(MOV_X, R8, R0, 0, 0))
        .op(insn(AND_K, R8, 0, 0, 0x3fff))
        .jump(JNE_K, R8, 0, 0, "addresses")
        .jump(JLT_K, R9, 0, 20, "addresses")
        .jump(JEQ_K, R7, 0, 6, "ports")
        .jump(JEQ_K, R7, 0, 17, "ports")
        .jump(JEQ_K, R7, 0, 132, "ports")
        .jump(JEQ_K, R7, 0, 136, "ports")
        .jump(JA, 0, 0, 0, "addresses")
        .label("ports")
        .op(insn(LD_IND_H, 0, R9, 0, 14))
        .op(insn(STX_DW, FP, R0, -8, 0))
        .op(insn(LD_IND_H, 0, R9, 0, 14 + 2))
        .op(insn(STX_DW, FP, R0, -16, 0))
        .label("addresses")
        .op(insn(LD_ABS_W, 0, 0, 0, 14 + 12))
        .op(insn(STX_DW, FP, R0, -24, 0))
        .op(insn(LD_ABS_W, 0, 0, 0, 14 + 16))
        // Endpoints as address << 16 | port: r1 = source, r2 = destination; lower first.
        .op(insn(LDX_DW, R1, FP, -24, 0))
        .op(insn(LSH_K, R1, 0, 0, 16))
        .op(insn(LDX_DW, R3, FP, -8, 0))
        .op(insn(OR_X, R1, R3, 0, 0))
        .op(insn(MOV_X, R2, R0, 0, 0))
        .op(insn(LSH_K, R2, 0, 0, 16))
        .op(insn(LDX_DW, R3, FP, -16, 0))
        .op(insn(OR_X, R2, R3, 0, 0))
        .jump(JLE_X, R1, R2, 0, "ordered")
        .op(insn(MOV_X, R3, R1, 0, 0))
        .op(insn(MOV_X, R1, R2, 0, 0))
        .op(insn(MOV_X, R2, R3, 0, 0))
        .label("ordered")
        // r0 = addresses (a << 32 | b); r8 = ports (a << 16 | b) << 8 | protocol.
        .op(insn(MOV_X, R0, R1, 0, 0))
        .op(insn(RSH_K, R0, 0, 0, 16))
        .op(insn(LSH_K, R0, 0, 0, 32))
        .op(insn(MOV_X, R3, R2, 0, 0))
        .op(insn(RSH_K, R3, 0, 0, 16))
        .op(insn(OR_X, R0, R3, 0, 0))
        .op(insn(MOV_X, R8, R1, 0, 0))
        .op(insn(AND_K, R8, 0, 0, 0xffff))
        .op(insn(LSH_K, R8, 0, 0, 16))
        .op(insn(AND_K, R2, 0, 0, 0xffff))
        .op(insn(OR_X, R8, R2, 0, 0))
        .op(insn(LSH_K, R8, 0, 0, 8))
        .op(insn(OR_X, R8, R7, 0, 0))
        .mix(R0, R3)
        .op(insn(XOR_X, R0, R8, 0, 0))
        .mix(R0, R3)
        // The 32-bit hash: h ^ h >> 32 (the kernel keeps the low 32 bits).
        .op(insn(MOV_X, R3, R0, 0, 0))
        .op(insn(RSH_K, R3, 0, 0, 32))
        .op(insn(XOR_X, R0, R3, 0, 0))
        .op(insn(EXIT, 0, 0, 0, 0))
        .label("other")
        .op(insn(MOV_K, R0, 0, 0, 0))
        .op(insn(EXIT, 0, 0, 0, 0));
    a.finish()
}

/// Loads the program; the fd keeps it alive until attached.
fn load() -> io::Result<OwnedFd> {
    let prog = program();
    let license = b"Dual MIT/GPL\0";
    // `union bpf_attr` for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, then zeros
    // (no log, no name): 128 bytes cover every field the kernel reads for this command.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCKET_FILTER.to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(prog.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is a valid bpf_attr whose pointers (the program and the license)
    // outlive the call; the kernel copies both and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Attaches the steering program to the TAP that `queue` (any of its queues) belongs to.
pub fn attach(queue: &impl AsRawFd) -> io::Result<()> {
    let prog = load().map_err(|e| io::Error::new(e.kind(), format!("loading: {e}")))?;
    let fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: TUNSETSTEERINGEBPF reads one int (the program fd) from the pointer, which is
    // valid for the call; the TAP takes its own reference to the program.
    let rc = unsafe { libc::ioctl(queue.as_raw_fd(), TUNSETSTEERINGEBPF as _, &fd) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod interpreted;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{netns, tap};
    use std::net::UdpSocket;
    use std::path::PathBuf;
    use std::process::Command;

    struct Namespace(PathBuf);

    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = netns::remove(&self.0);
        }
    }

    fn ip(ns: &str, args: &str) {
        let st = Command::new("ip")
            .args(["-n", ns])
            .args(args.split(' '))
            .status()
            .expect("ip");
        assert!(st.success(), "ip -n {ns} {args}");
    }

    /// The real kernel runs the program: in a namespace of its own, datagrams of sixteen
    /// UDP flows sent through a two-queue TAP each come out of queue `flow::hash % 2`, every
    /// datagram of a flow on the same queue, and both queues carry flows.
    #[test]
    fn the_kernel_steers_a_tap_by_the_datapath_flow_hash() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED the_kernel_steers_a_tap_by_the_datapath_flow_hash: needs root");
            return;
        }
        let name = format!("ovt-steer-{}", std::process::id());
        let ns = Namespace(netns::create(&name).expect("namespace"));
        let queues = netns::run_in(&ns.0, || tap::create("st0", 2)).expect("TAP");
        // `tap::create` attached it already; attaching again (replacing it) must work too.
        attach(&queues[0]).expect("the kernel takes the program");
        for q in &queues {
            nix::fcntl::fcntl(
                q,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .expect("nonblocking");
        }
        ip(&name, "link set st0 up");
        ip(&name, "addr add 10.9.0.1/24 dev st0");
        ip(
            &name,
            "neigh add 10.9.0.2 lladdr 02:00:00:00:00:02 dev st0 nud permanent",
        );
        netns::run_in(&ns.0, || {
            for flow in 0..16u16 {
                let s = UdpSocket::bind(("10.9.0.1", 40_000 + flow))?;
                for _ in 0..3 {
                    s.send_to(b"steer", ("10.9.0.2", 5000 + flow))?;
                }
            }
            Ok(())
        })
        .expect("send");
        let mut seen = [0usize; 2];
        let mut buf = vec![0u8; 70_000];
        for (i, q) in queues.iter().enumerate() {
            while let Ok(n) = nix::unistd::read(q, &mut buf) {
                let frame = &buf[datapath::vnet::HDR_LEN..n];
                // IPv4/UDP only (router solicitations and the like go elsewhere).
                if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
                    continue;
                }
                let want = protocol::flow::hash(frame) % 2;
                assert_eq!(i as u32, want, "a datagram on queue {i}, hash says {want}");
                seen[i] += 1;
            }
        }
        assert_eq!(seen[0] + seen[1], 48, "every datagram came out: {seen:?}");
        assert!(
            seen.iter().all(|n| *n > 0),
            "both queues carry flows: {seen:?}"
        );
    }

    #[test]
    fn jumps_land_on_their_labels_and_the_program_is_small() {
        let p = program();
        assert!(p.len() < 100, "{} instructions", p.len());
        assert_eq!(p.last().map(|i| i.code), Some(EXIT));
        // Every jump stays inside the program.
        for (i, x) in p.iter().enumerate() {
            if x.code & 0x07 == 0x05 && x.code != EXIT {
                let to = i as i64 + 1 + i64::from(x.off);
                assert!((0..p.len() as i64).contains(&to), "jump at {i} to {to}");
            }
        }
    }
}
