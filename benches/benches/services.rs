//! The hot paths of service load balancing and DNS:
//! - the connection table: the candidates the design card asks us to weigh (papaya, which
//!   the router uses; dashmap, sharded RwLocks; scc's HashIndex, read-optimised), each
//!   measured for a lookup that hits, one that misses, and an insert + remove, while 0, 1 or
//!   3 other threads keep looking up flows in the same table (1, 2 and 4 concurrent readers);
//! - NAT of a 64-byte frame and of a 64 KiB super-frame (in place, incremental checksums);
//! - building DNS answers for a service name and for `tasks.NAME`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use datapath::conntrack::FlowKey;
use datapath::nat::{self, L4Csum, Side};
use etherparse::PacketBuilder;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use protocol::types::MacAddr;
use router::dns::answer;
use router::dns::names::{DnsView, NetNames};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

type Hasher = foldhash::fast::RandomState;
/// What the table holds per key in the router: a pointer to the flow.
type Value = Arc<u64>;

/// The operations the datapath needs, over each candidate.
trait Table: Send + Sync + 'static {
    fn get(&self, k: &FlowKey) -> Option<u64>;
    fn insert(&self, k: FlowKey, v: Value);
    fn remove(&self, k: &FlowKey);
}

impl Table for papaya::HashMap<FlowKey, Value, Hasher> {
    fn get(&self, k: &FlowKey) -> Option<u64> {
        self.pin().get(k).map(|v| **v)
    }
    fn insert(&self, k: FlowKey, v: Value) {
        self.pin().insert(k, v);
    }
    fn remove(&self, k: &FlowKey) {
        self.pin().remove(k);
    }
}

impl Table for dashmap::DashMap<FlowKey, Value, Hasher> {
    fn get(&self, k: &FlowKey) -> Option<u64> {
        dashmap::DashMap::get(self, k).map(|v| **v)
    }
    fn insert(&self, k: FlowKey, v: Value) {
        dashmap::DashMap::insert(self, k, v);
    }
    fn remove(&self, k: &FlowKey) {
        dashmap::DashMap::remove(self, k);
    }
}

impl Table for scc::HashIndex<FlowKey, Value, Hasher> {
    fn get(&self, k: &FlowKey) -> Option<u64> {
        self.peek_with(k, |_, v| **v)
    }
    fn insert(&self, k: FlowKey, v: Value) {
        let _ = self.insert_sync(k, v);
    }
    fn remove(&self, k: &FlowKey) {
        self.remove_sync(k);
    }
}

fn key(i: u32) -> FlowKey {
    FlowKey {
        vni: 4097,
        proto: 6,
        src: Ipv4Addr::from(0x0a00_0000 | (i >> 16)),
        sport: i as u16,
        dst: Ipv4Addr::new(10, 0, 0, 2),
        dport: 80,
    }
}

/// Flows in the table while measuring: a busy node.
const FLOWS: u32 = 100_000;

fn table_case<T: Table>(c: &mut Criterion, name: &str, make: impl Fn() -> T) {
    let mut g = c.benchmark_group(format!("conntrack/{name}"));
    for readers in [1usize, 2, 4] {
        let t = Arc::new(make());
        for i in 0..FLOWS {
            t.insert(key(i), Arc::new(u64::from(i)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let others: Vec<_> = (1..readers)
            .map(|r| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = r as u32 * 7919;
                    while !stop.load(Ordering::Relaxed) {
                        black_box(t.get(&key(i % FLOWS)));
                        i = i.wrapping_add(1);
                    }
                })
            })
            .collect();
        let mut i = 0u32;
        g.bench_function(BenchmarkId::new("hit", readers), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(t.get(&key(i % FLOWS)))
            })
        });
        g.bench_function(BenchmarkId::new("miss", readers), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(t.get(&key(FLOWS + i % FLOWS)))
            })
        });
        g.bench_function(BenchmarkId::new("insert+remove", readers), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let k = key(FLOWS + i % FLOWS);
                t.insert(k, Arc::new(1));
                t.remove(&k);
            })
        });
        stop.store(true, Ordering::Relaxed);
        for h in others {
            let _ = h.join();
        }
    }
    g.finish();
}

fn conntrack(c: &mut Criterion) {
    table_case(c, "papaya", || {
        papaya::HashMap::<FlowKey, Value, Hasher>::with_hasher(Hasher::default())
    });
    table_case(c, "dashmap", || {
        dashmap::DashMap::<FlowKey, Value, Hasher>::with_hasher(Hasher::default())
    });
    table_case(c, "scc-hashindex", || {
        scc::HashIndex::<FlowKey, Value, Hasher>::with_hasher(Hasher::default())
    });
}

fn tcp_frame(payload: usize) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 9], [2, 0x42, 10, 0, 0, 2])
        .ipv4([10, 0, 0, 9], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 1, 65000)
        .ack(1)
        .write(&mut v, &vec![7u8; payload])
        .expect("frame");
    v
}

fn nat_rewrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("nat");
    for (name, payload) in [("64B", 64 - 54), ("64KiB-super-frame", 65_535 - 40)] {
        let mut f = tcp_frame(payload);
        let backends = [Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 4)];
        let mut n = 0;
        g.bench_function(BenchmarkId::new("parse+rewrite-dst", name), |b| {
            b.iter(|| {
                n ^= 1;
                let l4 = nat::parse(black_box(&f)).expect("parses");
                let ip = backends[n];
                nat::rewrite(
                    &mut f,
                    &l4,
                    Side::Destination,
                    ip,
                    MacAddr::from_ipv4(ip),
                    L4Csum::Complete,
                );
            })
        });
    }
    g.finish();
}

fn dns_answers(c: &mut Criterion) {
    let mut net = NetNames::default();
    net.a
        .insert("whoami".into(), vec![Ipv4Addr::new(10, 0, 0, 2)]);
    net.a.insert(
        "tasks.whoami".into(),
        (3..6).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(),
    );
    let mut view = DnsView::default();
    view.networks.insert("demo".into(), net);
    let nets = vec!["demo".to_string()];
    let mut g = c.benchmark_group("dns");
    for name in ["whoami", "tasks.whoami"] {
        let mut q = Message::query();
        q.metadata.id = 1;
        q.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        let bytes = q.to_vec().expect("query");
        g.bench_function(BenchmarkId::new("answer", name), |b| {
            b.iter(|| answer::handle(&view, &nets, black_box(&bytes), true))
        });
    }
    g.finish();
}

criterion_group!(benches, conntrack, nat_rewrite, dns_answers);
criterion_main!(benches);
