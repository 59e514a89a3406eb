//! Tables at cluster scale: one overlay network of 100 or 10 000 running tasks (10 or 1 000
//! services of 10 tasks, each with a VIP) over 50 nodes, seen from one of them. Measures what
//! the agent does on every change (`Views::build`: the VIPs, the resolvers' names and the
//! routing mesh's view; then `agent::tables::build`: the datapath's tables), the same after
//! one task added, one removed and one service scaled, the switch's per-frame decision over
//! the small and the large tables (it must not depend on their size), the manager's placement
//! of one more task (`ClusterState::scale_service_at`), and the memory the tables hold
//! (counted by the allocator of this binary, printed before the timings).
//!
//! `cargo bench -p overlay-benches --bench tables`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use datapath::conntrack::ConnTable;
use datapath::nat::L4Csum;
use datapath::stats::LbRegistry;
use datapath::switch::{from_port, Context, MAX_FRAME};
use datapath::table::Tables;
use datapath::vocab::{PortBinding, PortId, Verdict};
use protocol::api::{TaskState, TaskStatus};
use protocol::control::NodeHealth;
use protocol::state::{
    Availability, ClusterState, EndpointMode, NetworkRequest, Node, Pool, Role, Service, Task,
};
use protocol::types::{MacAddr, NetworkName, NodeName, ServiceName};
use router::agent::tables::{build, Views};
use router::services::{Statuses, VipView};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

/// The system allocator, counting the bytes live: what a value holds is the difference
/// around building it (single-threaded here, so nothing else allocates in between).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed straight to the system allocator; the counter is a side effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes `make`'s value holds (allocated while it was made and not freed since).
fn held<T>(make: impl FnOnce() -> T) -> (T, isize) {
    let before = LIVE.load(Ordering::Relaxed);
    let v = make();
    (v, LIVE.load(Ordering::Relaxed) - before)
}

const NODES: u32 = 50;
const PER_SERVICE: u32 = 10;
const NET: &str = "big";

/// A cluster as this node sees it: the state, every task running, every node up.
struct Cluster {
    state: ClusterState,
    statuses: Statuses,
    health: BTreeMap<NodeName, NodeHealth>,
    me: NodeName,
}

fn node_name(i: u32) -> NodeName {
    NodeName::new(format!("n{i:02}")).unwrap()
}

fn service_name(i: u32) -> ServiceName {
    ServiceName::new(format!("s{i:04}")).unwrap()
}

fn service(i: u32, vip: Ipv4Addr) -> Service {
    let net = NetworkName::new(NET).unwrap();
    Service {
        id: format!("svc{i}"),
        name: service_name(i),
        networks: vec![net.clone()],
        replicas: PER_SERVICE,
        command: vec!["sleep".into(), "1000".into()],
        env: vec![],
        created_at: 0,
        updated_at: 0,
        endpoint_mode: EndpointMode::Vip,
        vips: BTreeMap::from([(net, vip)]),
        aliases: BTreeMap::new(),
        lb_idle_timeout: None,
        ports: vec![],
        healthcheck: None,
        stop_grace_period_s: None,
        deploy: Default::default(),
        mode: Default::default(),
        node_slots: BTreeMap::new(),
        image: None,
    }
}

fn running() -> TaskStatus {
    TaskStatus {
        state: TaskState::Running,
        error: None,
        pid: Some(1),
        restarts: 0,
        since: 0,
        health: None,
    }
}

/// `services` services of 10 tasks on one /18 network, task `k` of the cluster on node
/// `k % 50`: the state the manager would have made (VIPs first, then tasks in order), built
/// directly because making it through placement is what is being measured.
fn cluster(services: u32) -> Cluster {
    let mut state = ClusterState::default();
    for i in 0..NODES {
        let name = node_name(i);
        state.nodes.insert(
            name.clone(),
            Node {
                name,
                role: if i == 0 { Role::Manager } else { Role::Worker },
                availability: Availability::Active,
                advertise_addr: Some(Ipv4Addr::new(198, 18, 0, 10 + i as u8)),
                data_port: 4789,
                joined_at: 0,
                control_addr: None,
            },
        );
    }
    let req = NetworkRequest {
        subnet: Some("10.128.0.0/18".parse().unwrap()),
        ..Default::default()
    };
    let net = NetworkName::new(NET).unwrap();
    let base = state
        .create_network(net.clone(), req, Pool::default(), "net".into(), 0)
        .unwrap()
        .subnet
        .network();
    let addr = |n: u32| Ipv4Addr::from(u32::from(base) + n);
    let mut statuses = Statuses::new();
    for s in 0..services {
        let svc = service(s, addr(2 + s));
        for slot in 1..=PER_SERVICE {
            let k = s * PER_SERVICE + slot - 1;
            let address = addr(2 + services + k);
            let task = Task {
                id: format!("t{k}"),
                name: format!("{}.{slot}", svc.name),
                service: svc.name.clone(),
                slot,
                node: node_name(k % NODES),
                attachments: vec![protocol::state::Attachment {
                    network: net.clone(),
                    address,
                    mac: MacAddr::from_ipv4(address),
                }],
                spec: svc.task_spec(),
            };
            statuses.insert(task.name.clone(), (task.id.clone(), running()));
            state.tasks.insert(task.name.clone(), task);
        }
        state.services.insert(svc.name.clone(), svc);
    }
    state.revision = 1;
    Cluster {
        state,
        statuses,
        health: BTreeMap::new(),
        me: node_name(0),
    }
}

impl Cluster {
    /// This node's ports: one per local task, numbered from 1 in task-name order.
    fn ports(&self) -> Vec<(PortId, PortBinding)> {
        let vni = self.state.networks[NET].vni;
        self.state
            .tasks_on(&self.me)
            .enumerate()
            .map(|(i, t)| {
                let a = &t.attachments[0];
                let binding = PortBinding {
                    vni,
                    mac: a.mac,
                    ip: a.address,
                };
                (PortId(i as u32 + 1), binding)
            })
            .collect()
    }

    /// What the agent does on a change: the views, then the tables from them.
    fn rebuild(&self, lb: &LbRegistry, previous: &[VipView]) -> (Views, Tables) {
        let views = Views::build(
            &self.state,
            &self.statuses,
            &self.health,
            &self.me,
            previous,
        );
        let tables = build(&self.state, &self.me, self.ports(), &views.vips, lb, 4789);
        (views, tables)
    }

    /// Scales `service` to `replicas` through the manager's own path, the new tasks running.
    fn scale(&mut self, service: u32, replicas: u32) {
        let mut n = 0;
        let mut id = || {
            n += 1;
            format!("new{n}")
        };
        let name = service_name(service);
        self.state
            .scale_service_at(name.as_str(), replicas, 0, &mut id, &|_| true)
            .unwrap();
        for t in self.state.tasks.values() {
            if t.service == name {
                self.statuses
                    .insert(t.name.clone(), (t.id.clone(), running()));
            }
        }
    }
}

fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f
}

/// A TCP/IPv4 frame of 1464 bytes.
fn tcp(src: Ipv4Addr, dst: Ipv4Addr, syn: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b =
        etherparse::PacketBuilder::ethernet2(MacAddr::from_ipv4(src).0, MacAddr::from_ipv4(dst).0)
            .ipv4(src.octets(), dst.octets(), 64)
            .tcp(40000, 80, 1, 65000);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut v, &[7u8; 1464 - 54]).expect("frame");
    v
}

/// Memory of the tables and views, printed: what the figures in BENCHMARKS.md quote.
fn memory(c: &Cluster, label: &str) {
    let lb = LbRegistry::default();
    let (state, state_bytes) = held(|| c.state.clone());
    drop(state);
    let (views, views_bytes) = held(|| Views::build(&c.state, &c.statuses, &c.health, &c.me, &[]));
    let (tables, table_bytes) = held(|| build(&c.state, &c.me, c.ports(), &views.vips, &lb, 4789));
    let (names, names_bytes) = held(|| views.names.clone());
    let (vips, vips_bytes) = held(|| views.vips.clone());
    println!(
        "memory {label}: state {state_bytes} B, tables {table_bytes} B (+ lb counters), \
         views {views_bytes} B (VIPs {vips_bytes} B, names {names_bytes} B), \
         {} local ports, {} MACs",
        tables.ports.len(),
        tables
            .networks
            .values()
            .map(|n| n.macs.len())
            .sum::<usize>()
    );
    drop((names, vips));
}

fn bench(c: &mut Criterion) {
    let small = cluster(10);
    let large = cluster(1000);
    memory(&small, "100 endpoints");
    memory(&large, "10000 endpoints");

    let mut g = c.benchmark_group("tables");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for (label, cl) in [("100", &small), ("10000", &large)] {
        let lb = LbRegistry::default();
        let (views, _) = cl.rebuild(&lb, &[]);
        g.bench_function(format!("views_{label}"), |b| {
            b.iter(|| {
                Views::build(
                    black_box(&cl.state),
                    &cl.statuses,
                    &cl.health,
                    &cl.me,
                    &views.vips,
                )
            })
        });
        g.bench_function(format!("tables_{label}"), |b| {
            b.iter(|| {
                build(
                    black_box(&cl.state),
                    &cl.me,
                    cl.ports(),
                    &views.vips,
                    &lb,
                    4789,
                )
            })
        });
        g.bench_function(format!("change_full_{label}"), |b| {
            b.iter(|| cl.rebuild(&lb, &views.vips))
        });
    }
    // One change at 10 000: the rebuild the agent does after it.
    let lb = LbRegistry::default();
    let (views, _) = large.rebuild(&lb, &[]);
    for (label, service, replicas) in [
        ("task_added", 500, 11),
        ("task_removed", 500, 9),
        ("service_scaled_10_to_20", 500, 20),
    ] {
        let mut changed = cluster(1000);
        changed.scale(service, replicas);
        g.bench_function(format!("rebuild_after_{label}_10000"), |b| {
            b.iter(|| changed.rebuild(&lb, &views.vips))
        });
    }
    // The manager's placement of one more task, on a copy of the state per iteration; and,
    // for reference, one copy of the state (placement makes one, to refuse all or nothing).
    for (label, cl) in [("100", &small), ("10000", &large)] {
        g.bench_function(format!("clone_state_{label}"), |b| {
            b.iter(|| black_box(&cl.state).clone())
        });
        g.bench_function(format!("place_one_task_{label}"), |b| {
            b.iter_batched(
                || cl.state.clone(),
                |mut s| {
                    s.scale_service_at("s0005", 11, 0, &mut || "x".into(), &|_| true)
                        .unwrap();
                    s
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    // The per-frame decision over the small and the large tables: must be flat.
    let mut g = c.benchmark_group("tables_switch");
    for (label, cl) in [("100", &small), ("10000", &large)] {
        let lb = LbRegistry::default();
        let (views, tables) = cl.rebuild(&lb, &[]);
        let flows = ConnTable::default();
        let cx = Context {
            tables: &tables,
            flows: &flows,
            now_ms: 0,
        };
        let mut reply = vec![0u8; MAX_FRAME];
        let ports = cl.ports();
        let (in_port, me) = ports[0];
        // A task on another node: the last one of the cluster.
        let remote = cl.state.tasks.values().find(|t| t.node != cl.me).unwrap();
        let mut unicast = frame(remote.attachments[0].mac, me.mac, 1464);
        let v = from_port(&cx, in_port, &mut unicast, L4Csum::Complete, &mut reply);
        assert!(matches!(v, Verdict::Encap { .. }), "{v:?}");
        g.bench_function(format!("unicast_remote_{label}"), |b| {
            b.iter(|| {
                from_port(
                    black_box(&cx),
                    in_port,
                    black_box(&mut unicast),
                    L4Csum::Complete,
                    &mut reply,
                )
            })
        });
        // A flow to the last service's VIP: its first packet places it, the bench measures
        // the ones after (the frame is rewritten back to the VIP outside the measurement).
        let vip = views.vips.last().unwrap().ip;
        let mut syn = tcp(me.ip, vip, true);
        let v = from_port(&cx, in_port, &mut syn, L4Csum::Complete, &mut reply);
        assert!(
            matches!(v, Verdict::Encap { .. } | Verdict::Forward(_)),
            "{v:?}"
        );
        let to_vip = tcp(me.ip, vip, false);
        g.bench_function(format!("vip_flow_{label}"), |b| {
            b.iter_batched_ref(
                || to_vip.clone(),
                |f| from_port(black_box(&cx), in_port, f, L4Csum::Complete, &mut reply),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
