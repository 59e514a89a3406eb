//! The node's connection table for the service load balancer: which backend each
//! client-to-VIP flow was given, so that every packet of the flow goes to the same task and
//! every reply can be translated back to the VIP.
//!
//! One table per node, shared by every datapath worker and the sweeper. It is a lock-free
//! hash map (papaya): a lookup never blocks and takes no lock, an insert or removal by one
//! thread never stalls a reader in another (`docs/BENCHMARKS.md` has the figures that chose it
//! over dashmap's sharded locks and scc). Each flow sits under two keys, the 5-tuple as the
//! client sends it and as the backend answers, both pointing at one [`Flow`] whose few mutable
//! fields are atomics.
//!
//! The table is handed to the per-frame decision beside the tables snapshot, never inside it.
//! Time is an argument too (the I/O loop reads the clock once per round and passes it in;
//! the sweeper passes its own), so the table reads no clock and keeps none. Expiry is the
//! sweeper's job ([`ConnTable::sweep`], on its own thread): idle flows, closed TCP
//! connections after a short linger, and flows whose backend left the rotation, for which it
//! hands back what the client needs to be sent a reset.
//!
//! Established TCP flows outlive a restart of overlayd as [`Resumable`] flows: the router
//! saves them (client key and backend) every second, and the next run offers them back
//! ([`ConnTable::offer_resumable`]). A mid-connection segment that finds no flow looks for
//! its resumable one, in either direction ([`ConnTable::resumable`]), and the load balancer
//! rebuilds the flow to the same backend from the tables as they are now, if that backend
//! still serves the VIP.

use crate::nat::{PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::vocab::{Location, PortId};
use protocol::types::MacAddr;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Default idle timeout of a TCP flow: a day, as kube-proxy sets conntrack's (IPVS cuts idle
/// connections after 900 s, Swarm's most reported networking complaint).
pub const TCP_IDLE_MS: u64 = 24 * 3600 * 1000;
/// Default idle timeout of a UDP flow.
pub const UDP_IDLE_MS: u64 = 60 * 1000;
/// A TCP flow whose handshake never completed.
pub const SYN_IDLE_MS: u64 = 30 * 1000;
/// How long a closed TCP flow (RST, or FIN both ways) lingers for its last packets.
pub const LINGER_MS: u64 = 2000;
/// Default bound on flows in the table.
pub const DEFAULT_MAX_FLOWS: usize = 1 << 20;

/// A flow as one direction sees it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub vni: u32,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

impl FlowKey {
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            vni: self.vni,
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// Which way a key looks at its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to VIP: translate the destination to the backend.
    ToBackend,
    /// Backend to client: translate the source back to the VIP.
    ToClient,
}

/// Per service counters of one node's load balancer; they live as long as the service.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    pub rr: AtomicU64,
    pub new_flows: AtomicU64,
    pub refused: AtomicU64,
    pub active: AtomicU64,
}

/// One backend's counts on this node, kept across table rebuilds: its flows now, and the
/// frames and bytes of its flows that ended (a live flow's are its own, [`Flow::moved`]).
#[derive(Debug, Default)]
pub struct BackendCounters {
    pub active: AtomicU64,
    pub ended_frames: AtomicU64,
    pub ended_bytes: AtomicU64,
}

/// Frames and bytes of one direction of a flow. Each direction of a flow is carried by one
/// worker (the flow hash picks it, on TAPs and on the underlay alike), which alone writes
/// it: [`crate::stats::bump`], no locked instruction.
#[derive(Debug, Default)]
pub struct Moved {
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl Moved {
    fn count(&self, bytes: usize) {
        crate::stats::bump(&self.frames, 1);
        crate::stats::bump(&self.bytes, bytes as u64);
    }

    /// Frames and bytes so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.frames.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// TCP progress, as far as the load balancer cares.
const SYN_SENT: u8 = 0;
const ESTABLISHED: u8 = 1;
const CLOSED: u8 = 2;
const FIN_CLIENT: u8 = 1 << 2;
const FIN_BACKEND: u8 = 1 << 3;
/// Closed by a reset (from either side), not by FINs.
const RESET: u8 = 1 << 4;

/// One load-balanced flow.
#[derive(Debug)]
pub struct Flow {
    /// As the client sends it: client -> VIP.
    pub key: FlowKey,
    pub vip_mac: MacAddr,
    pub client_mac: MacAddr,
    pub client_port: PortId,
    pub backend_ip: Ipv4Addr,
    pub backend_mac: MacAddr,
    pub backend_at: Location,
    pub idle_ms: u64,
    pub service: Arc<ServiceCounters>,
    /// This backend's counts (shown per backend in the stats).
    pub backend_counts: Arc<BackendCounters>,
    /// When it was made, on the table's clock ([`ConnTable::now_ms`]).
    pub started_ms: u64,
    last_seen: AtomicU64,
    /// SYN_SENT / ESTABLISHED / CLOSED in the low bits, FIN flags above.
    state: AtomicU8,
    /// The sequence number the client expects next from the backend (for a reset).
    client_next: AtomicU32,
    /// Set by the first removal: a flow replaced by a new connection may be swept too, and
    /// must leave the counts only once.
    removed: AtomicBool,
    /// Frames and bytes each way; last, away from what every packet reads.
    to_backend: Moved,
    to_client: Moved,
}

impl Flow {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: FlowKey,
        vip_mac: MacAddr,
        client_mac: MacAddr,
        client_port: PortId,
        backend: (Ipv4Addr, MacAddr, Location),
        idle_ms: u64,
        service: Arc<ServiceCounters>,
        backend_counts: Arc<BackendCounters>,
        now_ms: u64,
    ) -> Flow {
        Flow {
            key,
            vip_mac,
            client_mac,
            client_port,
            backend_ip: backend.0,
            backend_mac: backend.1,
            backend_at: backend.2,
            idle_ms,
            service,
            backend_counts,
            started_ms: now_ms,
            last_seen: AtomicU64::new(now_ms),
            state: AtomicU8::new(SYN_SENT),
            client_next: AtomicU32::new(0),
            removed: AtomicBool::new(false),
            to_backend: Moved::default(),
            to_client: Moved::default(),
        }
    }

    /// Counts a frame of `bytes` in direction `dir` (a super-frame counts once).
    pub fn count(&self, dir: Dir, bytes: usize) {
        match dir {
            Dir::ToBackend => self.to_backend.count(bytes),
            Dir::ToClient => self.to_client.count(bytes),
        }
    }

    /// What the flow moved: client to backend, and back.
    pub fn moved(&self) -> ((u64, u64), (u64, u64)) {
        (self.to_backend.get(), self.to_client.get())
    }

    /// Notes a packet; the timestamp is written at most once a second, so a busy flow does
    /// not keep a shared cache line bouncing between workers.
    pub fn touch(&self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_seen.load(Ordering::Relaxed)) >= 1000 {
            self.last_seen.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Follows TCP flags seen in direction `dir`; `next_seq` is what the segment's receiver
    /// expects next (its sequence number plus what it occupies).
    pub fn track_tcp(&self, dir: Dir, flags: u8, next_seq: u32) {
        let old = self.state.load(Ordering::Relaxed);
        let mut new = old;
        if flags & TCP_RST != 0 {
            new = (new & !3) | CLOSED | RESET;
        }
        match dir {
            Dir::ToBackend => {
                if flags & TCP_FIN != 0 {
                    new |= FIN_CLIENT;
                }
            }
            Dir::ToClient => {
                if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK && old & 3 == SYN_SENT {
                    new = (new & !3) | ESTABLISHED;
                }
                if flags & TCP_FIN != 0 {
                    new |= FIN_BACKEND;
                }
                // Keep the highest (in sequence space) next number seen.
                let prev = self.client_next.load(Ordering::Relaxed);
                if old & 3 == SYN_SENT || (next_seq.wrapping_sub(prev) as i32) > 0 {
                    self.client_next.store(next_seq, Ordering::Relaxed);
                }
            }
        }
        if new & (FIN_CLIENT | FIN_BACKEND) == FIN_CLIENT | FIN_BACKEND {
            new = (new & !3) | CLOSED;
        }
        if new != old {
            self.state.store(new, Ordering::Relaxed);
        }
    }

    /// Marks a flow rebuilt from a [`Resumable`] as established (its handshake happened
    /// before the restart).
    pub fn resume_established(&self) {
        self.state.store(ESTABLISHED, Ordering::Relaxed);
    }

    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Relaxed) & 3 == CLOSED
    }

    /// Established TCP: a client that would be left hanging if its backend vanished.
    pub fn is_established(&self) -> bool {
        self.key.proto == PROTO_TCP && self.state.load(Ordering::Relaxed) & 3 == ESTABLISHED
    }

    /// Its state as `overlayctl flows` shows it: TCP `syn_sent`, `established`,
    /// `fin_client` / `fin_backend` (one side closed), `closed` (both), `reset`; UDP and
    /// ICMP `active`.
    pub fn state_name(&self) -> &'static str {
        let s = self.state.load(Ordering::Relaxed);
        if self.key.proto != PROTO_TCP {
            return "active";
        }
        match (s & 3, s & (FIN_CLIENT | FIN_BACKEND)) {
            (CLOSED, _) if s & RESET != 0 => "reset",
            (CLOSED, _) => "closed",
            (_, FIN_CLIENT) => "fin_client",
            (_, FIN_BACKEND) => "fin_backend",
            (ESTABLISHED, _) => "established",
            _ => "syn_sent",
        }
    }

    /// Milliseconds since its last packet (to within the second [`Flow::touch`] keeps).
    pub fn idle_for(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_seen.load(Ordering::Relaxed))
    }

    pub fn client_next(&self) -> u32 {
        self.client_next.load(Ordering::Relaxed)
    }

    fn expired(&self, now_ms: u64) -> bool {
        let idle = now_ms.saturating_sub(self.last_seen.load(Ordering::Relaxed));
        let state = self.state.load(Ordering::Relaxed) & 3;
        let limit = match (self.key.proto, state) {
            (_, CLOSED) => LINGER_MS,
            (PROTO_TCP, SYN_SENT) => SYN_IDLE_MS.min(self.idle_ms),
            _ => self.idle_ms,
        };
        idle >= limit
    }
}

/// What a table entry holds: the flow and which way this key looks at it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub dir: Dir,
    pub flow: Arc<Flow>,
}

/// The table was full: the new flow is refused, existing ones go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

type Map = papaya::HashMap<FlowKey, Slot, foldhash::fast::RandomState>;

/// An established TCP flow of a previous run: the client's key and the backend it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumable {
    /// As the client sends it: client -> VIP.
    pub key: FlowKey,
    pub backend_ip: Ipv4Addr,
}

impl Resumable {
    /// The key of the backend's replies (backend -> client).
    pub fn reply_key(&self) -> FlowKey {
        FlowKey {
            src: self.backend_ip,
            ..self.key.reversed()
        }
    }
}

type Resumables = papaya::HashMap<FlowKey, Resumable, foldhash::fast::RandomState>;

pub struct ConnTable {
    map: Map,
    flows: AtomicUsize,
    max: usize,
    /// Zero of the table's clock, which the datapath passes in as `now_ms`.
    epoch: Instant,
    /// Flows of a previous run not taken yet, under both their keys.
    resumable: Resumables,
    /// Whether `resumable` may hold any: the only cost to frames while it is empty.
    resuming: AtomicBool,
}

impl Default for ConnTable {
    fn default() -> Self {
        ConnTable::new(DEFAULT_MAX_FLOWS)
    }
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable")
            .field("flows", &self.len())
            .field("max", &self.max)
            .finish()
    }
}

impl ConnTable {
    /// A table that holds at most `max` flows.
    pub fn new(max: usize) -> ConnTable {
        ConnTable {
            map: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .resize_mode(papaya::ResizeMode::Incremental(1024))
                .build(),
            flows: AtomicUsize::new(0),
            max,
            epoch: Instant::now(),
            resumable: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .build(),
            resuming: AtomicBool::new(false),
        }
    }

    /// Zero of the clock the table's times are on: the datapath reads it as
    /// milliseconds since this, once per round.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Now on the table's clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Calls `f` on every flow once (by its client's key), without blocking the datapath.
    pub fn visit(&self, mut f: impl FnMut(&Flow)) {
        for (_, slot) in self.map.pin().iter() {
            if slot.dir == Dir::ToBackend {
                f(&slot.flow);
            }
        }
    }

    /// Offers a previous run's established flows (at most as many as the table holds) for
    /// their next segment to resume ([`ConnTable::resumable`]).
    pub fn offer_resumable(&self, flows: impl IntoIterator<Item = Resumable>) {
        let map = self.resumable.pin();
        for r in flows.into_iter().take(self.max) {
            map.insert(r.key, r);
            map.insert(r.reply_key(), r);
        }
        self.resuming.store(!map.is_empty(), Ordering::Release);
    }

    /// Whether flows of a previous run may still be resumed.
    #[inline]
    pub fn is_resuming(&self) -> bool {
        self.resuming.load(Ordering::Relaxed)
    }

    /// The resumable flow under `key` (its client's or its backend's), if any. It stays
    /// until [`ConnTable::resumed`]: a segment that comes before its backend is back in the
    /// tables must not use it up.
    pub fn resumable(&self, key: &FlowKey) -> Option<Resumable> {
        if !self.is_resuming() {
            return None;
        }
        self.resumable.pin().get(key).copied()
    }

    /// Notes that `r` was resumed (it is in the table again).
    pub fn resumed(&self, r: &Resumable) {
        let map = self.resumable.pin();
        map.remove(&r.key);
        map.remove(&r.reply_key());
    }

    /// Forgets the flows of a previous run not resumed by now.
    pub fn end_resuming(&self) {
        self.resuming.store(false, Ordering::Release);
        self.resumable.pin().clear();
    }

    /// The established TCP flows, for the next run to resume.
    pub fn established(&self) -> Vec<Resumable> {
        self.map
            .pin()
            .iter()
            .filter(|(_, s)| s.dir == Dir::ToBackend && s.flow.is_established())
            .map(|(_, s)| Resumable {
                key: s.flow.key,
                backend_ip: s.flow.backend_ip,
            })
            .collect()
    }

    /// Flows in the table.
    pub fn len(&self) -> usize {
        self.flows.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on the entry of `key`, if any, without taking a lock.
    #[inline]
    pub fn with<R>(&self, key: &FlowKey, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        self.map.pin().get(key).map(f)
    }

    /// Adds a flow under both its keys. A flow already under the client's key (a new
    /// connection reusing the 5-tuple of a closed one) is replaced.
    pub fn insert(&self, flow: Flow) -> Result<Arc<Flow>, Full> {
        let svc = flow.service.clone();
        // At the bound, only a flow that replaces another (whose room it takes) may go in.
        if self.flows.fetch_add(1, Ordering::Relaxed) >= self.max
            && !self.map.pin().contains_key(&flow.key)
        {
            self.flows.fetch_sub(1, Ordering::Relaxed);
            svc.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Full);
        }
        let flow = Arc::new(flow);
        let key = flow.key;
        let back = FlowKey {
            vni: key.vni,
            proto: key.proto,
            src: flow.backend_ip,
            sport: key.dport,
            dst: key.src,
            dport: key.sport,
        };
        let map = self.map.pin();
        let old = map.insert(
            key,
            Slot {
                dir: Dir::ToBackend,
                flow: flow.clone(),
            },
        );
        if let Some(old) = old {
            self.forget(&old.flow, false);
        }
        map.insert(
            back,
            Slot {
                dir: Dir::ToClient,
                flow: flow.clone(),
            },
        );
        svc.new_flows.fetch_add(1, Ordering::Relaxed);
        svc.active.fetch_add(1, Ordering::Relaxed);
        flow.backend_counts.active.fetch_add(1, Ordering::Relaxed);
        Ok(flow)
    }

    /// Removes a flow's reply key (and its client key too if `both`) and its counts.
    fn forget(&self, flow: &Arc<Flow>, both: bool) {
        if flow.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        let map = self.map.pin();
        let back = FlowKey {
            src: flow.backend_ip,
            ..flow.key.reversed()
        };
        // Only remove a key that still points at this very flow.
        let _ = map.remove_if(&back, |_, s| Arc::ptr_eq(&s.flow, flow));
        if both {
            let _ = map.remove_if(&flow.key, |_, s| Arc::ptr_eq(&s.flow, flow));
        }
        self.flows.fetch_sub(1, Ordering::Relaxed);
        flow.service.active.fetch_sub(1, Ordering::Relaxed);
        let b = &flow.backend_counts;
        b.active.fetch_sub(1, Ordering::Relaxed);
        let ((f1, b1), (f2, b2)) = flow.moved();
        b.ended_frames.fetch_add(f1 + f2, Ordering::Relaxed);
        b.ended_bytes.fetch_add(b1 + b2, Ordering::Relaxed);
    }

    /// Removes flows expired at `now_ms` (milliseconds on the scale the datapath's clock
    /// gives) and those whose backend `alive` rejects; each established TCP flow of a
    /// rejected backend is handed to `reset` first, so its client can be told. Returns how
    /// many flows went. Readers are never blocked while it runs.
    pub fn sweep(
        &self,
        now_ms: u64,
        alive: impl Fn(&Flow) -> bool,
        mut reset: impl FnMut(&Flow),
    ) -> usize {
        let map = self.map.pin();
        let mut gone = Vec::new();
        for (_, slot) in map.iter() {
            if slot.dir != Dir::ToBackend {
                continue;
            }
            let f = &slot.flow;
            if !alive(f) {
                if f.is_established() {
                    reset(f);
                }
                gone.push(f.clone());
            } else if f.expired(now_ms) {
                gone.push(f.clone());
            }
        }
        drop(map);
        for f in &gone {
            self.forget(f, true);
        }
        gone.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::PROTO_UDP;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn key(proto: u8, sport: u16) -> FlowKey {
        FlowKey {
            vni: 4097,
            proto,
            src: ip("10.0.0.9"),
            sport,
            dst: ip("10.0.0.2"),
            dport: 80,
        }
    }

    fn flow(k: FlowKey, svc: &Arc<ServiceCounters>, idle_ms: u64) -> Flow {
        Flow::new(
            k,
            MacAddr::from_ipv4(ip("10.0.0.2")),
            MacAddr::from_ipv4(ip("10.0.0.9")),
            PortId(1),
            (
                ip("10.0.0.5"),
                MacAddr::from_ipv4(ip("10.0.0.5")),
                Location::Local(PortId(2)),
            ),
            idle_ms,
            svc.clone(),
            Arc::default(),
            0,
        )
    }

    /// What a flow moved each way is its own while it lives, and its backend's once it ends.
    #[test]
    fn a_flow_counts_each_way_and_leaves_its_bytes_to_its_backend() {
        let t = ConnTable::new(10);
        let svc = Arc::new(ServiceCounters::default());
        let k = key(PROTO_UDP, 1000);
        let f = t.insert(flow(k, &svc, 1000)).unwrap();
        f.count(Dir::ToBackend, 100);
        f.count(Dir::ToBackend, 50);
        f.count(Dir::ToClient, 70);
        assert_eq!(f.moved(), ((2, 150), (1, 70)));
        let b = f.backend_counts.clone();
        assert_eq!(b.active.load(Ordering::Relaxed), 1);
        assert_eq!(t.sweep(5000, |_| true, |_| ()), 1);
        assert_eq!(b.active.load(Ordering::Relaxed), 0);
        assert_eq!(b.ended_frames.load(Ordering::Relaxed), 3);
        assert_eq!(b.ended_bytes.load(Ordering::Relaxed), 220);
    }

    #[test]
    fn both_directions_find_the_flow() {
        let t = ConnTable::new(10);
        let svc = Arc::new(ServiceCounters::default());
        let k = key(PROTO_TCP, 1000);
        t.insert(flow(k, &svc, TCP_IDLE_MS)).unwrap();
        assert_eq!(t.with(&k, |s| s.dir), Some(Dir::ToBackend));
        let back = FlowKey {
            src: ip("10.0.0.5"),
            ..k.reversed()
        };
        assert_eq!(t.with(&back, |s| s.dir), Some(Dir::ToClient));
        assert_eq!(t.len(), 1);
        assert_eq!(svc.active.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bound_refuses_new_flows_only() {
        let t = ConnTable::new(2);
        let svc = Arc::new(ServiceCounters::default());
        t.insert(flow(key(PROTO_UDP, 1), &svc, UDP_IDLE_MS))
            .unwrap();
        t.insert(flow(key(PROTO_UDP, 2), &svc, UDP_IDLE_MS))
            .unwrap();
        assert_eq!(
            t.insert(flow(key(PROTO_UDP, 3), &svc, UDP_IDLE_MS)).err(),
            Some(Full)
        );
        assert_eq!(svc.refused.load(Ordering::Relaxed), 1);
        assert!(t.with(&key(PROTO_UDP, 1), |_| ()).is_some());
        // Replacing a flow under the same key does not count twice.
        t.insert(flow(key(PROTO_UDP, 2), &svc, UDP_IDLE_MS))
            .unwrap();
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_flow_replaced_and_swept_leaves_the_counts_once() {
        let t = ConnTable::new(2);
        let svc = Arc::new(ServiceCounters::default());
        let old = t
            .insert(flow(key(PROTO_TCP, 1), &svc, TCP_IDLE_MS))
            .unwrap();
        // The sweeper decided to remove `old`; a new SYN on its 5-tuple replaces it first.
        t.insert(flow(key(PROTO_TCP, 1), &svc, TCP_IDLE_MS))
            .unwrap();
        t.forget(&old, true);
        assert_eq!(t.len(), 1);
        assert_eq!(svc.active.load(Ordering::Relaxed), 1);
        t.insert(flow(key(PROTO_TCP, 2), &svc, TCP_IDLE_MS))
            .unwrap();
        assert_eq!(t.len(), 2, "the bound still counts right");
    }

    #[test]
    fn default_idle_timeout_is_far_above_ipvs() {
        // IPVS (Swarm) forgets an idle TCP connection after 900 s.
        let t = ConnTable::new(10);
        let svc = Arc::new(ServiceCounters::default());
        let f = t
            .insert(flow(key(PROTO_TCP, 1), &svc, TCP_IDLE_MS))
            .unwrap();
        f.track_tcp(Dir::ToClient, TCP_SYN | TCP_ACK, 1);
        assert_eq!(
            t.sweep(3600 * 1000, |_| true, |_| {}),
            0,
            "an hour idle: still there"
        );
        assert_eq!(
            t.sweep(TCP_IDLE_MS, |_| true, |_| {}),
            1,
            "gone after the default"
        );
    }

    #[test]
    fn states_as_listed() {
        let t = ConnTable::new(10);
        let svc = Arc::new(ServiceCounters::default());
        let f = t.insert(flow(key(PROTO_TCP, 1), &svc, 10_000)).unwrap();
        assert_eq!(f.state_name(), "syn_sent");
        f.track_tcp(Dir::ToClient, TCP_SYN | TCP_ACK, 1);
        assert_eq!(f.state_name(), "established");
        f.track_tcp(Dir::ToBackend, TCP_FIN | TCP_ACK, 0);
        assert_eq!(f.state_name(), "fin_client");
        f.track_tcp(Dir::ToClient, TCP_FIN | TCP_ACK, 2);
        assert_eq!(f.state_name(), "closed");
        let r = t.insert(flow(key(PROTO_TCP, 2), &svc, 10_000)).unwrap();
        r.track_tcp(Dir::ToClient, TCP_SYN | TCP_ACK, 1);
        r.track_tcp(Dir::ToBackend, TCP_RST, 0);
        assert_eq!(r.state_name(), "reset");
        let u = t.insert(flow(key(PROTO_UDP, 3), &svc, 10_000)).unwrap();
        assert_eq!(u.state_name(), "active");
        let mut seen = 0;
        t.visit(|_| seen += 1);
        assert_eq!(seen, 3, "each flow once, not once per key");
    }

    #[test]
    fn idle_and_closed_flows_expire() {
        let t = ConnTable::new(10);
        let svc = Arc::new(ServiceCounters::default());
        let idle = t.insert(flow(key(PROTO_TCP, 1), &svc, 10_000)).unwrap();
        idle.track_tcp(Dir::ToClient, TCP_SYN | TCP_ACK, 1);
        let closed = t.insert(flow(key(PROTO_TCP, 2), &svc, 10_000)).unwrap();
        closed.track_tcp(Dir::ToClient, TCP_SYN | TCP_ACK, 1);
        closed.track_tcp(Dir::ToBackend, TCP_FIN | TCP_ACK, 0);
        closed.track_tcp(Dir::ToClient, TCP_FIN | TCP_ACK, 2);
        assert!(closed.is_closed());
        assert_eq!(
            t.sweep(LINGER_MS, |_| true, |_| {}),
            1,
            "closed flow goes after the linger"
        );
        assert_eq!(t.sweep(9_000, |_| true, |_| {}), 0, "idle 9 s of 10");
        idle.touch(9_000);
        assert_eq!(t.sweep(18_000, |_| true, |_| {}), 0, "touched at 9 s");
        assert_eq!(t.sweep(19_000, |_| true, |_| {}), 1);
        assert!(t.is_empty());
        assert_eq!(svc.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn dead_backend_flows_are_reset_and_removed() {
        let t = ConnTable::new(10);
        let svc = Arc::new(ServiceCounters::default());
        let f = t
            .insert(flow(key(PROTO_TCP, 1), &svc, TCP_IDLE_MS))
            .unwrap();
        f.track_tcp(Dir::ToClient, TCP_SYN | TCP_ACK, 500);
        f.track_tcp(Dir::ToClient, TCP_ACK, 620);
        f.track_tcp(Dir::ToClient, TCP_ACK, 560); // a retransmission: not a step back
        t.insert(flow(key(PROTO_UDP, 1), &svc, UDP_IDLE_MS))
            .unwrap();
        let mut resets = Vec::new();
        let gone = t.sweep(
            0,
            |_| false,
            |f| resets.push((f.key.sport, f.client_next())),
        );
        assert_eq!(gone, 2);
        assert_eq!(resets, [(1, 620)], "only the established TCP flow is reset");
        assert!(t.is_empty());
        // An RST from either side closes a flow.
        let g = t
            .insert(flow(key(PROTO_TCP, 2), &svc, TCP_IDLE_MS))
            .unwrap();
        g.track_tcp(Dir::ToBackend, TCP_RST, 0);
        assert!(g.is_closed());
    }
}
