//! The UDP mappings of one published port, by client address, in the order they were last
//! used, with a cap ([`UDP_MAPPINGS_PER_PORT`]). A datagram's source address is whatever the
//! sender wrote, so without a cap a flood of spoofed sources would grow the table (and its
//! smoltcp sockets and endpoint ports) without end. At the cap a new client takes the place
//! of the mapping idle the longest, as the kernel's conntrack drops an old entry early
//! rather than refuse new ones. Expiry pops idle mappings from the old end, so its work is
//! proportional to what expires, not to what exists.
//!
//! Plain data with the time passed in; `udp` does the I/O (sockets, ports, counters) for what
//! comes out of here.

use lru::LruCache;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Most UDP mappings (client addresses) one published port keeps on a node. Each holds a
/// smoltcp socket with 64 KiB buffers each way (allocated zeroed, so resident only as far as
/// datagrams reached) and one of the endpoint's 64 512 ports: 4 096 clients active within
/// the idle time (60 s by default) is a busy port, and 15 ports that full would take nearly
/// all the endpoint's ports, so a flood on one port cannot starve the others.
/// `--ingress-max-connections` stays the node's limit over all ports together.
pub const UDP_MAPPINGS_PER_PORT: usize = 4096;

struct Entry<V> {
    value: V,
    /// When a datagram last went through it, either way.
    last: Instant,
}

/// One published port's mappings.
pub(super) struct Mappings<V> {
    lru: LruCache<SocketAddr, Entry<V>>,
    cap: usize,
}

impl<V> Mappings<V> {
    /// An empty table for at most `cap` clients (at least one).
    pub(super) fn new(cap: usize) -> Self {
        Mappings {
            lru: LruCache::unbounded(),
            cap: cap.max(1),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.lru.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    pub(super) fn is_full(&self) -> bool {
        self.lru.len() >= self.cap
    }

    /// The mapping of `client`, marked used at `now`.
    pub(super) fn get(&mut self, client: &SocketAddr, now: Instant) -> Option<&mut V> {
        let e = self.lru.get_mut(client)?;
        e.last = now;
        Some(&mut e.value)
    }

    /// Adds `client`'s mapping, used at `now`. At the cap the mapping idle the longest makes
    /// room: it is returned, for its socket and port to be released.
    pub(super) fn insert(
        &mut self,
        client: SocketAddr,
        value: V,
        now: Instant,
    ) -> Option<(SocketAddr, V)> {
        let evicted = if self.is_full() && !self.lru.contains(&client) {
            self.evict_oldest()
        } else {
            None
        };
        self.lru.put(client, Entry { value, last: now });
        evicted
    }

    /// Removes the mapping idle the longest.
    pub(super) fn evict_oldest(&mut self) -> Option<(SocketAddr, V)> {
        self.lru.pop_lru().map(|(k, e)| (k, e.value))
    }

    /// Removes the mapping idle the longest if it was idle for more than `limit` at `now`.
    pub(super) fn pop_idle(&mut self, now: Instant, limit: Duration) -> Option<(SocketAddr, V)> {
        let (_, oldest) = self.lru.peek_lru()?;
        if now.saturating_duration_since(oldest.last) > limit {
            self.evict_oldest()
        } else {
            None
        }
    }

    /// Calls `f` on every mapping; those for which it returns true were used at `now`.
    pub(super) fn visit(&mut self, now: Instant, mut f: impl FnMut(SocketAddr, &mut V) -> bool) {
        let mut used = Vec::new();
        for (client, e) in self.lru.iter_mut() {
            if f(*client, &mut e.value) {
                e.last = now;
                used.push(*client);
            }
        }
        // Promoted oldest first, so that their order among themselves stays as it was.
        for client in used.iter().rev() {
            self.lru.promote(client);
        }
    }

    /// Removes and returns the mappings `doomed` picks.
    pub(super) fn remove_where(
        &mut self,
        mut doomed: impl FnMut(&V) -> bool,
    ) -> Vec<(SocketAddr, V)> {
        let keys: Vec<SocketAddr> = self
            .lru
            .iter()
            .filter(|(_, e)| doomed(&e.value))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.lru.pop(&k).map(|e| (k, e.value)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn client(i: u32) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 40_000))
    }

    #[test]
    fn a_flood_of_sources_stays_at_the_cap_and_evicts_the_oldest_idle() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = Mappings::new(UDP_MAPPINGS_PER_PORT);
        // A real client first, then 10 000 spoofed sources, one a millisecond; the real
        // client sends a datagram every second and gets a reply in between.
        let real = client(1_000_000);
        assert!(m.insert(real, u32::MAX, at(0)).is_none());
        let mut evicted = Vec::new();
        for i in 0..10_000u32 {
            let now = at(u64::from(i) + 1);
            if let Some((gone, v)) = m.insert(client(i), i, now) {
                evicted.push((gone, v));
            }
            if i % 1_000 == 500 {
                assert!(m.get(&real, now).is_some(), "the real client at {i}");
            }
            if i % 1_000 == 900 {
                m.visit(now, |c, _| c == real);
            }
            assert!(m.len() <= UDP_MAPPINGS_PER_PORT);
        }
        assert_eq!(m.len(), UDP_MAPPINGS_PER_PORT);
        // Every source past the cap took one place: the oldest idle ones, in order.
        let cap = UDP_MAPPINGS_PER_PORT as u32;
        assert_eq!(evicted.len(), 10_000 - cap as usize + 1);
        let spoofed: Vec<u32> = evicted.iter().map(|(_, v)| *v).collect();
        assert_eq!(spoofed, (0..=10_000 - cap).collect::<Vec<_>>());
        // The recently active client survived; the newest sources are there.
        assert!(m.get(&real, at(10_001)).is_some());
        assert!(m.get(&client(9_999), at(10_001)).is_some());
        assert!(m.get(&client(0), at(10_001)).is_none());
    }

    #[test]
    fn a_known_client_takes_no_place() {
        let t0 = Instant::now();
        let mut m = Mappings::new(2);
        assert!(m.insert(client(1), 1, t0).is_none());
        assert!(m.insert(client(2), 2, t0).is_none());
        assert!(m.is_full());
        assert!(
            m.insert(client(2), 22, t0).is_none(),
            "replaced, not evicted"
        );
        assert_eq!(m.insert(client(3), 3, t0), Some((client(1), 1)));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn expiry_pops_only_what_is_idle() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut m = Mappings::new(8);
        for i in 0..4 {
            m.insert(client(i), i, at(u64::from(i)));
        }
        // Client 0 replied to at 10 s: it is younger than 1, 2 and 3 now.
        m.visit(at(10), |c, _| c == client(0));
        let limit = Duration::from_secs(60);
        let mut gone = Vec::new();
        while let Some((_, v)) = m.pop_idle(at(63), limit) {
            gone.push(v);
        }
        assert_eq!(gone, [1, 2]);
        assert_eq!(m.len(), 2);
        assert_eq!(m.remove_where(|v| *v == 0).len(), 1);
        assert_eq!(m.remove_where(|_| true).len(), 1);
        assert!(m.is_empty());
    }
}
