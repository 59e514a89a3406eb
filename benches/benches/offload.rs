//! The work a frame crossing nodes costs beyond the switch decision: cutting a TCP
//! super-frame into MSS-sized segments (userspace TSO) and completing partial checksums on
//! the way out, verifying and merging segments back into a super-frame (userspace GRO) on
//! the way in. Also the per-frame helpers of several workers: the flow hash that picks a
//! frame's source port (and so the receiving worker), and cutting segments straight into the
//! underlay's run next to cutting them into a scratch buffer and copying them there.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datapath::gro::{Coalescer, Push};
use datapath::vnet::{
    complete_checksum, offload_partial, segment_tcp, Segments, VnetHdr, F_NEEDS_CSUM, GSO_TCPV4,
    GSO_UDP_L4,
};
use datapath::vocab::PortId;
use std::hint::black_box;

/// A TCP/IPv4 frame (no options) with `payload` bytes, as a task's kernel hands it over.
fn frame(payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20 + payload];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[14 + 2..14 + 4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    f[14 + 8] = 64;
    f[14 + 9] = 6;
    f[26..30].copy_from_slice(&[10, 0, 0, 2]);
    f[30..34].copy_from_slice(&[10, 0, 0, 3]);
    f[34 + 12] = 0x50;
    f[34 + 13] = 0x10;
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// Lays every frame of `segs` into `run` behind an 8-byte VXLAN header, as `TxBatch` lays
/// them: whole, or only their headers (the payloads stay where they are, to be gathered).
fn into_run(segs: &Segments<'_>, run: &mut [u8], heads_only: bool) -> usize {
    let mut at = 0;
    for i in 0..segs.count() {
        let len = if heads_only {
            segs.head_len()
        } else {
            segs.len(i)
        };
        let out = &mut run[at + 8..at + 8 + len];
        if heads_only {
            segs.write_head(i, out);
        } else {
            segs.write(i, out);
        }
        at += 8 + len;
    }
    at
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("offload");
    let big = frame(64_000 - 54);
    let h = VnetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1398,
        ..Default::default()
    };
    let mut scratch = vec![0u8; 1600];
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("segment_tcp4_64KiB_into_1398B", |b| {
        b.iter(|| {
            let mut n = 0usize;
            segment_tcp(black_box(&big), &h, &mut scratch, |s| n += s.len()).unwrap();
            n
        })
    });
    // Into the underlay's run: each segment behind its 8-byte VXLAN header, laid end to end
    // (as `TxBatch` lays them), through a scratch buffer and a copy, or cut in place.
    let mut run = vec![0u8; 48 * 1500];
    g.bench_function("segment_then_copy_into_run_64KiB", |b| {
        b.iter(|| {
            let mut at = 0;
            segment_tcp(black_box(&big), &h, &mut scratch, |s| {
                run[at + 8..at + 8 + s.len()].copy_from_slice(s);
                at += 8 + s.len();
            })
            .unwrap();
            at
        })
    });
    g.bench_function("segment_in_place_into_run_64KiB", |b| {
        b.iter(|| {
            into_run(
                &Segments::new(black_box(&big), &h, 1600).unwrap(),
                &mut run,
                false,
            )
        })
    });
    // What a plain network's segments cost now: only the headers are written (checksums
    // summed over the payload where it lies), the payloads are gathered by the send.
    g.bench_function("segment_heads_only_64KiB", |b| {
        b.iter(|| {
            into_run(
                &Segments::new(black_box(&big), &h, 1600).unwrap(),
                &mut run,
                true,
            )
        })
    });
    // The checksum alone over a 64 KiB super-frame's bytes: etherparse's one carry chain,
    // the internet-checksum crate (scalar in a baseline x86-64 build), and ours.
    g.bench_function("checksum_64KiB_etherparse", |b| {
        b.iter(|| {
            etherparse::checksum::Sum16BitWords::new()
                .add_slice(black_box(&big))
                .ones_complement()
        })
    });
    g.bench_function("checksum_64KiB_internet_checksum", |b| {
        b.iter(|| internet_checksum::checksum(black_box(&big)))
    });
    g.bench_function("checksum_64KiB_ours", |b| {
        b.iter(|| {
            datapath::csum::Sum::new()
                .add_slice(black_box(&big))
                .ones_complement()
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("flow_hash_tcp4", |b| {
        b.iter(|| protocol::flow::hash(black_box(&big)))
    });
    // The receiving side: the same 46 segments, verified and merged back for the TAP.
    let mut segs = Vec::new();
    let mut whole = big.clone();
    whole[50..52].fill(0);
    segment_tcp(&whole, &h, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
    let mut gro = Coalescer::default();
    g.throughput(Throughput::Bytes(big.len() as u64));
    // Merging records where each payload lies (segment i in buffer i); nothing is copied but
    // the first headers.
    g.bench_function("gro_merge_46_segments", |b| {
        b.iter(|| {
            for (i, s) in segs.iter().enumerate() {
                let pushed = gro.push(PortId(1), black_box(s), (i, 0), false, true);
                assert_eq!(pushed, Push::Taken);
            }
            gro.take().map(|t| t.parts.len())
        })
    });
    let mut one = frame(1398);
    let ch = VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    g.throughput(Throughput::Bytes(one.len() as u64));
    g.bench_function("complete_checksum_1452B", |b| {
        b.iter(|| complete_checksum(black_box(&mut one), &ch).unwrap())
    });
    // For another overlayd node the sum is not completed but made partial: the pseudo-header
    // only, whatever the frame's size.
    g.bench_function("offload_partial_1452B", |b| {
        b.iter(|| offload_partial(black_box(&mut one), None))
    });
    // A UDP super-frame (a task's UDP_SEGMENT send) of 46 datagrams, cut into the run whole,
    // and as headers only with partial checksums (for another node; payloads gathered).
    let mut udp = big.clone();
    udp[14 + 9] = 17;
    let udp_len = (udp.len() - 34) as u16;
    udp[38..40].copy_from_slice(&udp_len.to_be_bytes());
    let uh = VnetHdr {
        gso_type: GSO_UDP_L4,
        gso_size: 1398,
        ..Default::default()
    };
    g.throughput(Throughput::Bytes(udp.len() as u64));
    g.bench_function("segment_udp_in_place_into_run_64KiB", |b| {
        b.iter(|| {
            into_run(
                &Segments::new(black_box(&udp), &uh, 1600).unwrap(),
                &mut run,
                false,
            )
        })
    });
    g.bench_function("segment_udp_heads_partial_64KiB", |b| {
        b.iter(|| {
            let segs = Segments::new(black_box(&udp), &uh, 1600).unwrap().partial();
            into_run(&segs, &mut run, true)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
