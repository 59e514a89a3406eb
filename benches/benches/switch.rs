//! The per-frame switching decision (`datapath::switch::from_port`): the work the
//! datapath does for every frame between its read and its write.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datapath::conntrack::ConnTable;
use datapath::nat::L4Csum;
use datapath::switch::{from_port, Context, MAX_FRAME};
use datapath::table::{BackendSpec, Tables};
use datapath::vocab::{PortBinding, PortId, Verdict};
use protocol::types::{MacAddr, Vni};
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

/// The decision for one frame from port 1 (complete checksums).
fn decide(cx: &Context<'_>, f: &mut [u8], reply: &mut [u8]) -> Verdict {
    from_port(
        black_box(cx),
        PortId(1),
        black_box(f),
        L4Csum::Complete,
        reply,
    )
}

/// A TCP/IPv4 frame from `src` to `dst` (1464 bytes in all).
fn tcp(src: Ipv4Addr, dst: Ipv4Addr, dst_mac: MacAddr, sport: u16, syn: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(MacAddr::from_ipv4(src).0, dst_mac.0)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, 80, 1, 65000);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut v, &[7u8; 1464 - 54]).expect("frame");
    v
}

/// The decision's context over `tables` and the node's connection table, at time zero.
fn context<'a>(tables: &'a Tables, flows: &'a ConnTable) -> Context<'a> {
    Context {
        tables,
        flows,
        now_ms: 0,
    }
}

fn bench(c: &mut Criterion) {
    let t = tables();
    let flows = ConnTable::default();
    let cx = context(&t, &flows);
    let src = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 0, 2));
    let local = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 0, 3));
    let remote = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 16, 7));
    let mut reply = vec![0u8; MAX_FRAME];
    let mut g = c.benchmark_group("switch");
    g.throughput(Throughput::Elements(1));

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("unicast_local_1464B", frame(local, src, 0x0800, 1464)),
        ("unicast_remote_1464B", frame(remote, src, 0x0800, 1464)),
    ];
    let mut arp = frame(MacAddr::BROADCAST, src, 0x0806, 42);
    arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp[22..28].copy_from_slice(&src.0);
    arp[28..32].copy_from_slice(&[10, 0, 0, 2]);
    arp[38..42].copy_from_slice(&[10, 0, 16, 7]);
    cases.push(("arp_proxy_reply", arp));
    let unknown = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 0, 99));
    cases.push(("drop_unknown_destination", frame(unknown, src, 0x0800, 64)));
    let expect = |v: Verdict, name: &str| match name {
        "unicast_local_1464B" => v == Verdict::Forward(PortId(2)),
        "unicast_remote_1464B" => matches!(v, Verdict::Encap { .. }),
        "arp_proxy_reply" => v == Verdict::Reply(42),
        _ => true,
    };
    for (name, mut f) in cases {
        assert!(
            expect(decide(&cx, &mut f.clone(), &mut reply), name),
            "{name}"
        );
        g.bench_function(name, |b| b.iter(|| decide(&cx, &mut f, &mut reply)));
    }

    // The same node with a service VIP (10.0.0.200) balanced over ports 2 and 3.
    let mut t = tables();
    let vni = Vni::new(4097).unwrap();
    let vip = Ipv4Addr::new(10, 0, 0, 200);
    let backends: Vec<BackendSpec> = [3u32, 4]
        .iter()
        .map(|i| BackendSpec {
            ip: Ipv4Addr::from(0x0a00_0000 + i),
            mac: MacAddr::from_ipv4(Ipv4Addr::from(0x0a00_0000 + i)),
            flows: Default::default(),
        })
        .collect();
    t.add_vip(
        vni,
        vip,
        Default::default(),
        &backends,
        (86_400_000, 60_000),
    );
    let cx = context(&t, &flows);
    let client = Ipv4Addr::new(10, 0, 0, 2);
    let mut syn = tcp(client, vip, MacAddr::from_ipv4(vip), 40000, true);
    assert_eq!(
        decide(&cx, &mut syn, &mut reply),
        Verdict::Forward(PortId(2))
    );
    // Every packet of a flow: lookup, destination NAT (the frame is rewritten back to the
    // VIP between iterations, outside the measurement).
    let to_vip = tcp(client, vip, MacAddr::from_ipv4(vip), 40000, false);
    g.bench_function("vip_flow_1464B", |b| {
        b.iter_batched_ref(
            || to_vip.clone(),
            |f| decide(&cx, f, &mut reply),
            criterion::BatchSize::SmallInput,
        )
    });
    // What every frame between tasks now pays where VIPs exist: port 2 (a backend) sending
    // to port 1 outside any flow (a reply lookup that misses).
    let b2 = Ipv4Addr::new(10, 0, 0, 3);
    let mut direct = tcp(b2, client, src, 80, false);
    g.bench_function("unicast_local_from_backend_1464B", |b| {
        b.iter(|| {
            from_port(
                black_box(&cx),
                PortId(2),
                black_box(&mut direct),
                L4Csum::Complete,
                &mut reply,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
