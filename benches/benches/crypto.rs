//! Encrypted networks' per-frame work: sealing a VXLAN datagram in ESP and opening it, per
//! frame size, and a whole GSO run (44 full segments, what one 64 KiB TCP super-frame
//! becomes); and the two AEADs ring offers on this CPU, raw, to back the cipher choice.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use protocol::esp::{self, SenderKey};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use std::hint::black_box;

const PORT: u16 = 4789;

/// A buffer laid out as the datapath's run arena holds a datagram before sealing.
fn datagram(vxlan_len: usize) -> Vec<u8> {
    let mut b = vec![0u8; esp::sealed_len(vxlan_len)];
    for (i, x) in b[esp::HEADER_LEN + esp::INNER_UDP_LEN..][..vxlan_len]
        .iter_mut()
        .enumerate()
    {
        *x = i as u8;
    }
    b
}

fn bench(c: &mut Criterion) {
    let key = SenderKey::derive(&[7u8; esp::SECRET_LEN], "n1", 1);
    let spi = esp::spi(4097, 0);
    let mut g = c.benchmark_group("esp");
    // 64-byte and 512-byte frames, and a full frame of a 1400-MTU encrypted network.
    for frame in [64usize, 512, 1414] {
        let vxlan_len = 8 + frame;
        g.throughput(Throughput::Bytes(frame as u64));
        let mut buf = datagram(vxlan_len);
        let mut seq = 0u32;
        g.bench_with_input(BenchmarkId::new("seal", frame), &frame, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1).max(1);
                esp::seal_in_place(black_box(&mut buf), vxlan_len, spi, seq, &key, PORT)
            })
        });
        let mut sealed = datagram(vxlan_len);
        esp::seal_in_place(&mut sealed, vxlan_len, spi, 1, &key, PORT).expect("seal");
        let mut scratch = sealed.clone();
        g.bench_with_input(BenchmarkId::new("open", frame), &frame, |b, _| {
            b.iter(|| {
                scratch.copy_from_slice(&sealed);
                let h = esp::parse_header(&scratch).expect("header");
                esp::open_in_place(black_box(&mut scratch), &h, &key).map(|r| r.len())
            })
        });
    }
    // A GSO run: 44 segments of a 1400-MTU network (1348-byte TCP payloads).
    let seg = 8 + 14 + 1400;
    let one = esp::sealed_len(seg);
    let mut run = vec![0u8; one * 44];
    g.throughput(Throughput::Bytes((44 * (14 + 1400)) as u64));
    let mut seq = 0u32;
    g.bench_function("seal_run_44", |b| {
        b.iter(|| {
            for d in run.chunks_mut(one) {
                seq = seq.wrapping_add(1).max(1);
                let _ = esp::seal_in_place(d, seg, spi, seq, &key, PORT);
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("aead_1400");
    g.throughput(Throughput::Bytes(1400));
    for (name, alg) in [
        ("aes_256_gcm", &aead::AES_256_GCM),
        ("chacha20_poly1305", &aead::CHACHA20_POLY1305),
    ] {
        let k = LessSafeKey::new(UnboundKey::new(alg, &[3u8; 32]).expect("key"));
        let mut buf = vec![0u8; 1400];
        g.bench_function(name, |b| {
            b.iter(|| {
                k.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([1u8; 12]),
                    Aad::from([0u8; 8]),
                    black_box(&mut buf),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
