//! Encrypted networks' per-frame work: sealing a VXLAN datagram in ESP and opening it, per
//! frame size, and a whole GSO run (44 full segments, what one 64 KiB TCP super-frame
//! becomes); and the two AEADs ring offers on this CPU, raw, to back the cipher choice.
//! Then what a flood of forged datagrams costs a receiver: one key derivation (the work an
//! unseen epoch asks for), and 100 000 datagrams with random epochs from one sender in one
//! simulated second through a worker's `EspState`, which derives at most its bucket's worth.
//! And the genuine receive path through `EspState` (`esp_state/open_1414`): a held sender's
//! full frame, its window checked, opened and moved, what every encrypted datagram costs.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use datapath::crypto::EspState;
use datapath::keys::{NetCrypto, Secret};
use datapath::table::{NetTable, Tables};
use protocol::esp::{self, SenderKey};
use protocol::types::Vni;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use std::collections::HashMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

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

/// A receiver's tables: one encrypted network (VNI 4097, key id 2) and one member, n1.
fn receiver(secret: &Secret) -> Tables {
    let mut t = Tables::default();
    let mut rx = HashMap::new();
    rx.insert(2u8, secret.clone());
    t.networks.insert(
        Vni::new(4097).expect("vni"),
        NetTable {
            crypto: Some(Arc::new(NetCrypto { tx: None, rx })),
            ..NetTable::default()
        },
    );
    t.senders.insert(Ipv4Addr::new(198, 18, 0, 1), "n1".into());
    t
}

/// `count` datagrams from n1 with random epochs and sequence numbers and forged tags.
fn forged(secret: &Secret, count: usize) -> Vec<Vec<u8>> {
    let key = SenderKey::derive(secret, "n1", 7 << 8);
    let mut template = datagram(8 + 64);
    esp::seal_in_place(&mut template, 8 + 64, esp::spi(4097, 2), 1, &key, PORT).expect("seal");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut d = template.clone();
            let seq = ((x >> 32) as u32 | 1).to_be_bytes();
            d[4..8].copy_from_slice(&seq);
            d[12..16].copy_from_slice(&seq);
            d[8..12].copy_from_slice(&(x as u32).to_be_bytes());
            d
        })
        .collect()
}

fn flood(c: &mut Criterion) {
    let secret: Secret = Arc::new([5u8; esp::SECRET_LEN]);
    let mut g = c.benchmark_group("esp_flood");
    let mut epoch = 0u32;
    g.bench_function("derive", |b| {
        b.iter(|| {
            epoch = epoch.wrapping_add(1);
            SenderKey::derive(&secret, "n1", black_box(epoch))
        })
    });
    let t = receiver(&secret);
    let n1 = Ipv4Addr::new(198, 18, 0, 1);
    const N: usize = 100_000;
    let datagrams = forged(&secret, N);
    g.sample_size(20);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("forged_epochs_100k_in_1s", |b| {
        b.iter_batched_ref(
            || (EspState::default(), datagrams.clone()),
            |(st, ds)| {
                let mut opened = 0usize;
                for (i, d) in ds.iter_mut().enumerate() {
                    let now_ms = (i * 1_000 / N) as u64;
                    opened += usize::from(st.open(&t, n1, d, now_ms).is_ok());
                }
                opened
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// The receive path of every genuine datagram: a held sender's window checked, its frame
/// opened in place and the window moved (no derivation: the key is held).
fn held_sender(c: &mut Criterion) {
    let secret: Secret = Arc::new([5u8; esp::SECRET_LEN]);
    let t = receiver(&secret);
    let n1 = Ipv4Addr::new(198, 18, 0, 1);
    let key = SenderKey::derive(&secret, "n1", 7 << 8);
    let vxlan_len = 8 + 1414;
    let mut st = EspState::default();
    let mut first = datagram(vxlan_len);
    esp::seal_in_place(&mut first, vxlan_len, esp::spi(4097, 2), 1, &key, PORT).expect("seal");
    st.open(&t, n1, &mut first, 0)
        .expect("the first datagram opens");
    // Sealed in the untimed setup with rising sequence numbers, so none is a replay.
    let mut seq = 1u32;
    let mut g = c.benchmark_group("esp_state");
    g.throughput(Throughput::Bytes(1414));
    g.bench_function("open_1414", |b| {
        b.iter_batched_ref(
            || {
                seq += 1;
                let mut d = datagram(vxlan_len);
                esp::seal_in_place(&mut d, vxlan_len, esp::spi(4097, 2), seq, &key, PORT)
                    .expect("seal");
                d
            },
            |d| st.open(&t, n1, black_box(d), 1).map(|(r, _)| r.len()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench, flood, held_sender);
criterion_main!(benches);
