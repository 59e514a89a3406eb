//! The routing mesh's endpoint with many established connections: one segment out (the
//! connection's bytes) and one segment in (the task's, demuxed by local port to its
//! connection's socket set, taken by the proxy), at 100, 10 000 and 64 000 connections.
//! `100 active`: the cost must not grow with the number of (idle) connections beside the
//! busy ones (docs/BENCHMARKS.md, issue 21). `all busy`: every connection in turn, which
//! adds what the memory hierarchy charges for more sockets' state.
//!
//! No fds: the smoltcp side only, the pieces the proxy uses
//! (`router::ingress::endpoint`: `classify`, `TcpSlot`), over an in-memory device fed with
//! crafted Ethernet/IPv4/TCP frames. 64 000 and not more: the endpoint has one address and
//! connects from its own ports, 1024–65535, so 64 512 connections is its ceiling.
//!
//! Setting up also measures memory: resident bytes per connection once it is established
//! and has carried one request and response, then after its buffers are trimmed.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use router::ingress::endpoint::{classify, Dest, TcpSlot};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpProtocol, Ipv4Address,
    Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use std::collections::HashMap;
use std::hint::black_box;

const ENDPOINT_MAC: EthernetAddress = EthernetAddress([0x02, 0x42, 10, 255, 0, 2]);
const TASK_MAC: EthernetAddress = EthernetAddress([0x02, 0x42, 10, 255, 0, 5]);
const ENDPOINT_IP: Ipv4Address = Ipv4Address::new(10, 255, 0, 2);
const TASK_IP: Ipv4Address = Ipv4Address::new(10, 255, 0, 5);
const TASK_PORT: u16 = 80;
const FIRST_PORT: u16 = 1024;
/// The task's initial sequence number, on every connection.
const TASK_ISN: u32 = 0x1000_0000;
/// Bytes each way per segment in the measured exchange.
const PAYLOAD: usize = 64;

/// The device: the frame the bench hands in, and the last frame the stack sent. Checksum
/// capabilities as the proxy's link has them.
#[derive(Default)]
struct Wire {
    rx: Option<Vec<u8>>,
    tx: Vec<u8>,
    sent: u64,
}

struct Rx(Vec<u8>);
struct Tx<'a> {
    buf: &'a mut Vec<u8>,
    sent: &'a mut u64,
}

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.buf.resize(len, 0);
        *self.sent += 1;
        f(self.buf)
    }
}

impl phy::Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.take()?;
        Some((
            Rx(frame),
            Tx {
                buf: &mut self.tx,
                sent: &mut self.sent,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx {
            buf: &mut self.tx,
            sent: &mut self.sent,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        let mut csum = ChecksumCapabilities::ignored();
        csum.ipv4 = Checksum::Tx;
        caps.checksum = csum;
        caps
    }
}

/// A frame from the task to the endpoint's `port`.
fn from_task(port: u16, seq: u32, ack: Option<u32>, syn: bool, payload: &[u8]) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: TASK_PORT,
        dst_port: port,
        control: if syn {
            TcpControl::Syn
        } else {
            TcpControl::None
        },
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65_535,
        window_scale: None,
        max_seg_size: syn.then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: TASK_IP,
        dst_addr: ENDPOINT_IP,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut frame = vec![0u8; 14 + ip.buffer_len() + tcp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: TASK_MAC,
        dst_addr: ENDPOINT_MAC,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let csum = ChecksumCapabilities::default();
    let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut ipp, &csum);
    tcp.emit(
        &mut TcpPacket::new_unchecked(ipp.payload_mut()),
        &IpAddress::Ipv4(TASK_IP),
        &IpAddress::Ipv4(ENDPOINT_IP),
        &csum,
    );
    frame
}

/// The task's ARP reply, so that the endpoint knows its address.
fn task_arp() -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: TASK_MAC,
        source_protocol_addr: TASK_IP,
        target_hardware_addr: ENDPOINT_MAC,
        target_protocol_addr: ENDPOINT_IP,
    };
    let mut frame = vec![0u8; 14 + arp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: TASK_MAC,
        dst_addr: ENDPOINT_MAC,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    frame
}

/// Sequence number and payload length of the frame the endpoint sent last.
fn last_sent(wire: &Wire) -> (u32, u32) {
    let eth = EthernetFrame::new_checked(&wire.tx[..]).expect("ethernet");
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
    let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
    (tcp.seq_number().0 as u32, tcp.payload().len() as u32)
}

/// One established connection and where each side's sequence is.
struct Conn {
    slot: TcpSlot,
    port: u16,
    /// The task's next sequence number, and the endpoint's.
    task_next: u32,
    ours_next: u32,
}

struct Endpoint {
    iface: Interface,
    wire: Wire,
    now: Instant,
    conns: Vec<Conn>,
    /// As the proxy's: the connection by the endpoint's local port.
    by_port: HashMap<u16, usize>,
}

impl Endpoint {
    fn new() -> Endpoint {
        let mut wire = Wire::default();
        let now = Instant::from_secs(1);
        let mut config = Config::new(HardwareAddress::Ethernet(ENDPOINT_MAC));
        config.random_seed = 7;
        let mut iface = Interface::new(config, &mut wire, now);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ENDPOINT_IP), 16));
        });
        let mut shared = SocketSet::new(Vec::new());
        wire.rx = Some(task_arp());
        iface.poll_ingress_single(now, &mut wire, &mut shared);
        Endpoint {
            iface,
            wire,
            now,
            conns: Vec::new(),
            by_port: HashMap::new(),
        }
    }

    /// A frame from the task, as the proxy's ingress hands it on: demuxed by local port to
    /// its connection's socket set, its sequence noted.
    fn deliver(&mut self, frame: Vec<u8>) -> usize {
        let Dest::Tcp(seg) = classify(&frame) else {
            panic!("not a TCP segment");
        };
        let i = self.by_port[&seg.port];
        let c = &mut self.conns[i];
        c.slot.seen(&seg);
        self.wire.rx = Some(frame);
        c.slot.ingress(&mut self.iface, self.now, &mut self.wire);
        i
    }

    fn egress(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.slot.egress(&mut self.iface, self.now, &mut self.wire);
    }

    /// Connects, is answered, and carries one request and its response.
    fn open(&mut self) {
        let port = FIRST_PORT + self.conns.len() as u16;
        let mut slot = TcpSlot::allocate().expect("mapping a connection's buffers");
        let remote = IpEndpoint::new(IpAddress::Ipv4(TASK_IP), TASK_PORT);
        slot.connect(&mut self.iface, remote, port)
            .expect("connect");
        let i = self.conns.len();
        self.conns.push(Conn {
            slot,
            port,
            task_next: TASK_ISN.wrapping_add(1),
            ours_next: 0,
        });
        self.by_port.insert(port, i);
        self.egress(i);
        let (isn, _) = last_sent(&self.wire);
        self.conns[i].ours_next = isn.wrapping_add(1);
        self.deliver(from_task(
            port,
            TASK_ISN,
            Some(isn.wrapping_add(1)),
            true,
            &[],
        ));
        self.egress(i);
        let sock = self.conns[i].slot.socket();
        assert!(sock.may_send(), "not established: {}", sock.state());
        self.exchange(i, 100, 200);
    }

    /// The connection's reply goes out (`ours` bytes), the task's segment comes in
    /// (`theirs` bytes, acknowledging the reply), and the proxy takes what came in.
    fn exchange(&mut self, i: usize, ours: usize, theirs: usize) {
        let out = [0x61u8; 1460];
        let c = &mut self.conns[i];
        c.slot.socket().send_slice(&out[..ours]).expect("send");
        c.slot.used();
        self.egress(i);
        let c = &mut self.conns[i];
        c.ours_next = c.ours_next.wrapping_add(ours as u32);
        let frame = from_task(
            c.port,
            c.task_next,
            Some(c.ours_next),
            false,
            &out[..theirs],
        );
        c.task_next = c.task_next.wrapping_add(theirs as u32);
        self.deliver(frame);
        let c = &mut self.conns[i];
        let mut got = [0u8; 1460];
        let n = c.slot.socket().recv_slice(&mut got).expect("recv");
        assert_eq!(n, theirs);
        c.slot.delivered(n);
    }
}

/// Resident bytes of this process.
fn resident() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm's resident field");
    pages * 4096
}

fn endpoint(n: usize) -> Endpoint {
    let mut ep = Endpoint::new();
    ep.conns.reserve(n);
    ep.by_port.reserve(n);
    let before = resident();
    for _ in 0..n {
        ep.open();
    }
    let open = resident();
    for c in &mut ep.conns {
        assert!(c.slot.trim(), "an idle, empty connection is trimmed");
    }
    let trimmed = resident();
    eprintln!(
        "{n} connections: {:.1} KiB resident each after one request and response, \
         {:.1} KiB once trimmed",
        (open - before) as f64 / 1024.0 / n as f64,
        trimmed.saturating_sub(before) as f64 / 1024.0 / n as f64,
    );
    ep
}

fn bench(c: &mut Criterion) {
    for n in [100usize, 10_000, 64_000] {
        let mut ep = endpoint(n);
        // Every connection carries one exchange again (its pages faulted back in), so that
        // what follows measures the steady state, not the first touch after a trim.
        for i in 0..n {
            ep.exchange(i, PAYLOAD, PAYLOAD);
        }
        // 100 connections busy, spread over the n, the others idle: what issue 21 claims
        // (an idle connection costs no time).
        let active: Vec<usize> = (0..100).map(|k| k * n / 100).collect();
        let mut k = 0usize;
        let mut g = c.benchmark_group("endpoint/100 active");
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) % active.len();
                ep.exchange(black_box(active[k]), PAYLOAD, PAYLOAD);
            })
        });
        g.finish();
        // Every connection busy in turn, in a scattered order (a step coprime with n): the
        // same work, now also paying the memory hierarchy for n sockets' state.
        let step = (40_503 % n.max(2)) | 1;
        let step = if gcd(step, n) == 1 { step } else { 1 };
        let mut i = 0usize;
        let mut g = c.benchmark_group("endpoint/all busy");
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                i = (i + step) % n;
                ep.exchange(black_box(i), PAYLOAD, PAYLOAD);
            })
        });
        g.finish();
        eprintln!("{n} connections: {} frames sent", ep.wire.sent);
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
