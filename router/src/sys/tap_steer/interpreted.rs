//! The steering program run in userspace, with rbpf's interpreter, and checked against
//! [`protocol::flow::hash`] on arbitrary frames: a change to either side fails every
//! `cargo test`, where the kernel test beside it needs root.
//!
//! rbpf (0.4) cannot run the legacy packet loads as the kernel does. Its `LD_ABS`/`LD_IND`
//! read the VM's `mem` in host byte order, bounds-check 8 bytes whatever the size, and fail
//! the run past the end; the kernel reads network order into host order and, past the end,
//! ends the program with 0. So [`for_rbpf`] rewrites each of those loads the way the kernel's
//! verifier does (`bpf_gen_ld_abs`: the load becomes a few ordinary instructions and an exit
//! with 0 when it falls outside the frame), here with a direct load from the frame, whose
//! start and end the program finds behind its context pointer (`EbpfVmMbuff`, R1 and, as the
//! kernel requires of these loads, R6). R1–R5 are left clobbered, as after the kernel's
//! helper call, so a program that relied on them surviving a load would show it here too.
//! Everything else the program does (ALU, jumps, the stack) rbpf interprets as it is.

use super::*;
use proptest::prelude::*;
use rbpf::ebpf;

/// Where the context (rbpf's `mbuff`) holds the frame's start and end.
const DATA: i16 = 0;
const DATA_END: i16 = 8;

fn bytes(i: Insn) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = i.code;
    b[1] = i.regs;
    b[2..4].copy_from_slice(&i.off.to_le_bytes());
    b[4..8].copy_from_slice(&i.imm.to_le_bytes());
    b
}

/// The program with each `LD_ABS`/`LD_IND` replaced by what the kernel means by it:
/// `r0 = ntoh(frame[offset..offset + size])`, or the program ends with 0 when that is not
/// inside the frame. Jumps are re-aimed over the longer code.
fn for_rbpf(prog: &[Insn]) -> Vec<u8> {
    let mut out: Vec<Insn> = Vec::new();
    // New index of each old instruction (and of the end), to re-aim jumps.
    let mut at = Vec::with_capacity(prog.len() + 1);
    // Indices of the jumps to the shared "out of the frame" exit.
    let mut outs = Vec::new();
    for i in prog {
        at.push(out.len());
        let indirect = match i.code & 0xe7 {
            0x20 => false, // BPF_LD | BPF_ABS
            0x40 => true,  // BPF_LD | BPF_IND
            _ => {
                out.push(*i);
                continue;
            }
        };
        let (size, load, swap) = match i.code & 0x18 {
            0x10 => (1, ebpf::LD_B_REG, None),
            0x08 => (2, ebpf::LD_H_REG, Some(16)),
            0x00 => (4, ebpf::LD_W_REG, Some(32)),
            _ => panic!("no such packet load in the kernel: {i:?}"),
        };
        // r2 = offset (the kernel: src + imm for LD_IND, imm for LD_ABS).
        if indirect {
            out.push(insn(MOV_X, R2, i.regs >> 4, 0, 0));
            out.push(insn(ebpf::ADD64_IMM, R2, 0, 0, i.imm));
        } else {
            out.push(insn(MOV_K, R2, 0, 0, i.imm));
        }
        outs.push(out.len());
        out.push(insn(ebpf::JSLT_IMM, R2, 0, 0, 0));
        // r1 = start + offset, r4 = its end, r3 = the frame's end; R6 is the context.
        out.push(insn(LDX_DW, R1, R6, DATA, 0));
        out.push(insn(LDX_DW, R3, R6, DATA_END, 0));
        out.push(insn(ebpf::ADD64_REG, R1, R2, 0, 0));
        out.push(insn(MOV_X, 4, R1, 0, 0));
        out.push(insn(ebpf::ADD64_IMM, 4, 0, 0, size));
        outs.push(out.len());
        out.push(insn(ebpf::JGT_REG, 4, R3, 0, 0));
        out.push(insn(load, R0, R1, 0, 0));
        if let Some(bits) = swap {
            out.push(insn(ebpf::BE, R0, 0, 0, bits));
        }
        // The caller-saved registers after the kernel's helper call: not to be relied on.
        out.push(insn(MOV_K, 5, 0, 0, 0x5eed));
    }
    at.push(out.len());
    let exit_zero = out.len();
    out.push(insn(MOV_K, R0, 0, 0, 0));
    out.push(insn(EXIT, 0, 0, 0, 0));
    // Jumps of the original program (JMP and JMP32 classes, not calls or exits).
    for (old, i) in prog.iter().enumerate() {
        let class = i.code & 0x07;
        let op = i.code & 0xf0;
        if (class == 0x05 || class == 0x06) && op != 0x80 && op != 0x90 {
            let target = (old as i64 + 1 + i64::from(i.off)) as usize;
            let new = at[old];
            out[new].off = (at[target] as i64 - new as i64 - 1) as i16;
        }
    }
    for j in outs {
        out[j].off = (exit_zero as i64 - j as i64 - 1) as i16;
    }
    out.into_iter().flat_map(bytes).collect()
}

/// The program under rbpf, built once per test.
struct Vm {
    code: Vec<u8>,
}

impl Vm {
    fn new() -> Vm {
        Vm {
            code: for_rbpf(&program()),
        }
    }

    /// What the program returns for `frame`, as the kernel keeps it (the low 32 bits).
    fn run(&self, frame: &[u8]) -> u32 {
        let vm = rbpf::EbpfVmMbuff::new(Some(&self.code)).expect("rbpf's verifier takes it");
        let start = frame.as_ptr() as u64;
        let mut context = [0u8; 16];
        context[DATA as usize..][..8].copy_from_slice(&start.to_ne_bytes());
        context[DATA_END as usize..][..8]
            .copy_from_slice(&(start + frame.len() as u64).to_ne_bytes());
        vm.execute_program(frame, &context)
            .expect("the program runs to its end") as u32
    }
}

/// What the kernel takes from the program for `frame`: `flow::hash` of an IPv4 frame that
/// holds every byte the program loads; 0 for anything else (not IPv4), and 0 when a load
/// would pass the frame's end, which ends a socket filter with 0. The datapath's hash falls
/// back to the MAC addresses (header cut short) or zero ports (ports cut off) there instead;
/// such frames are no flow's, and queue 0 is as good as any for them.
fn kernel_queue_hash(frame: &[u8]) -> u32 {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return 0;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    let ports = ihl >= 20 && !fragment && matches!(ip[9], 6 | 17 | 132 | 136);
    if ports && ip.len() < ihl + 4 {
        return 0;
    }
    protocol::flow::hash(frame)
}

/// Frames from IPv4 TCP, UDP, SCTP, DCCP and other protocols (with and without options,
/// fragments, equal endpoints) to ARP, IPv6, other EtherTypes, bad versions and header
/// lengths, and cuts anywhere.
fn frames() -> impl Strategy<Value = Vec<u8>> {
    let ethertype = prop_oneof![
        8 => Just(0x0800u16),
        1 => Just(0x86dd),
        1 => Just(0x0806),
        1 => any::<u16>(),
    ];
    let version = prop_oneof![8 => Just(4u8), 1 => 0u8..16];
    let ihl = prop_oneof![4 => Just(5u8), 2 => 6u8..16, 1 => 0u8..5];
    // Flags and fragment offset: none, DF, MF (a first fragment), anything.
    let fragment = prop_oneof![
        4 => Just(0u16),
        2 => Just(0x4000),
        1 => Just(0x2000),
        1 => any::<u16>(),
    ];
    let protocol = prop_oneof![
        3 => Just(6u8),
        3 => Just(17),
        1 => Just(132),
        1 => Just(136),
        1 => Just(1),
        1 => any::<u8>(),
    ];
    // 0: as drawn; 1: one address at both ends; 2: one endpoint (address and port) at both.
    let mirror = prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(2)];
    let cut = proptest::option::weighted(0.2, any::<prop::sample::Index>());
    (
        (ethertype, version, ihl, fragment, protocol, mirror),
        proptest::collection::vec(any::<u8>(), 34..140),
        cut,
    )
        .prop_map(
            |((ethertype, version, ihl, fragment, protocol, mirror), mut f, cut)| {
                f[12..14].copy_from_slice(&ethertype.to_be_bytes());
                f[14] = version << 4 | ihl;
                f[14 + 6..14 + 8].copy_from_slice(&fragment.to_be_bytes());
                f[14 + 9] = protocol;
                if mirror > 0 {
                    f.copy_within(14 + 12..14 + 16, 14 + 16);
                }
                let l4 = 14 + usize::from(ihl) * 4;
                if mirror > 1 && f.len() >= l4 + 4 {
                    f.copy_within(l4..l4 + 2, l4 + 2);
                }
                if let Some(cut) = cut {
                    f.truncate(cut.index(f.len() + 1));
                }
                f
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// The interpreted program returns what the kernel should use: `flow::hash`, or 0.
    #[test]
    fn the_program_computes_the_flow_hash(frame in frames()) {
        let vm = Vm::new();
        prop_assert_eq!(vm.run(&frame), kernel_queue_hash(&frame), "frame {:02x?}", frame);
    }
}

/// Real frames (etherparse-built) of each kind hash as `flow::hash` says, not to 0: the
/// property above does not hold by both sides answering 0.
#[test]
fn real_frames_hash_as_the_datapath_does() {
    use etherparse::PacketBuilder;
    let vm = Vm::new();
    let eth = || PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut frames = Vec::new();
    let mut udp = Vec::new();
    eth()
        .ipv4([10, 0, 0, 2], [10, 0, 0, 3], 64)
        .udp(40_000, 53)
        .write(&mut udp, b"query")
        .expect("UDP frame");
    frames.push(udp.clone());
    let mut tcp = Vec::new();
    eth()
        .ipv4([10, 0, 0, 3], [10, 0, 0, 2], 64)
        .tcp(80, 40_000, 1, 1000)
        .write(&mut tcp, b"reply")
        .expect("TCP frame");
    frames.push(tcp);
    // The same datagram with 8 bytes of IP options (two NOPs and padding): its ports are
    // found behind them.
    let mut options = udp.clone();
    options[14] = 0x47;
    options.splice(34..34, [1u8, 1, 0, 0, 0, 0, 0, 0]);
    frames.push(options);
    for f in &frames {
        let h = protocol::flow::hash(f);
        assert_ne!(h, 0);
        assert_eq!(vm.run(f), h, "frame {f:02x?}");
    }
    // Both directions of a flow on one queue.
    let mut back = Vec::new();
    eth()
        .ipv4([10, 0, 0, 3], [10, 0, 0, 2], 64)
        .udp(53, 40_000)
        .write(&mut back, b"answer")
        .expect("UDP frame");
    assert_eq!(vm.run(&udp), vm.run(&back));
    // ARP, and a datagram whose ports are cut off: queue 0.
    let mut arp = udp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(vm.run(&arp), 0);
    assert_eq!(vm.run(&udp[..14 + 20 + 3]), 0);
}
