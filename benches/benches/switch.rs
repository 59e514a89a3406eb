//! The per-frame switching decision (`router::datapath::switch::from_port`): the work the
//! datapath does for every frame between its read and its write.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use protocol::types::{MacAddr, Vni};
use router::datapath::nat::L4Csum;
use router::datapath::switch::{from_port, Verdict, MAX_FRAME};
use router::datapath::table::{PortBinding, PortId, Tables};
use std::hint::black_box;
use std::net::Ipv4Addr;

/// One network with 64 local ports and 1000 remote endpoints, like a busy node.
fn tables() -> Tables {
    let vni = Vni::new(4097).unwrap();
    let mut t = Tables::default();
    for i in 0..64u32 {
        let ip = Ipv4Addr::from(0x0a00_0002 + i);
        t.add_port(
            PortId(i + 1),
            PortBinding {
                vni,
                mac: MacAddr::from_ipv4(ip),
                ip,
            },
        );
    }
    for i in 0..1000u32 {
        let ip = Ipv4Addr::from(0x0a00_1000 + i);
        t.add_remote(
            vni,
            MacAddr::from_ipv4(ip),
            Some(ip),
            "198.18.0.3:4789".parse().unwrap(),
        );
    }
    t.set_gateway(vni, Ipv4Addr::new(10, 0, 0, 1));
    t
}

fn frame(dst: MacAddr, src: MacAddr, ethertype: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f
}

fn bench(c: &mut Criterion) {
    let t = tables();
    let src = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 0, 2));
    let local = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 0, 3));
    let remote = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 16, 7));
    let mut reply = vec![0u8; MAX_FRAME];
    let mut g = c.benchmark_group("switch");
    g.throughput(Throughput::Elements(1));

    let mut f = frame(local, src, 0x0800, 1464);
    assert_eq!(
        from_port(&t, PortId(1), &mut f.clone(), L4Csum::Complete, &mut reply),
        Verdict::Forward(PortId(2))
    );
    g.bench_function("unicast_local_1464B", |b| {
        b.iter(|| {
            from_port(
                black_box(&t),
                PortId(1),
                black_box(&mut f),
                L4Csum::Complete,
                &mut reply,
            )
        })
    });

    let mut f = frame(remote, src, 0x0800, 1464);
    assert!(matches!(
        from_port(&t, PortId(1), &mut f.clone(), L4Csum::Complete, &mut reply),
        Verdict::Encap { .. }
    ));
    g.bench_function("unicast_remote_1464B", |b| {
        b.iter(|| {
            from_port(
                black_box(&t),
                PortId(1),
                black_box(&mut f),
                L4Csum::Complete,
                &mut reply,
            )
        })
    });

    let mut arp = frame(MacAddr::BROADCAST, src, 0x0806, 42);
    arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp[22..28].copy_from_slice(&src.0);
    arp[28..32].copy_from_slice(&[10, 0, 0, 2]);
    arp[38..42].copy_from_slice(&[10, 0, 16, 7]);
    assert!(matches!(
        from_port(
            &t,
            PortId(1),
            &mut arp.clone(),
            L4Csum::Complete,
            &mut reply
        ),
        Verdict::Reply(42)
    ));
    g.bench_function("arp_proxy_reply", |b| {
        b.iter(|| {
            from_port(
                black_box(&t),
                PortId(1),
                black_box(&mut arp),
                L4Csum::Complete,
                &mut reply,
            )
        })
    });

    let mut f = frame(
        MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 0, 99)),
        src,
        0x0800,
        64,
    );
    g.bench_function("drop_unknown_destination", |b| {
        b.iter(|| {
            from_port(
                black_box(&t),
                PortId(1),
                black_box(&mut f),
                L4Csum::Complete,
                &mut reply,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
