//! The ingress endpoint's own ports, from which it connects to tasks (TCP) and sends them
//! clients' datagrams (UDP).
//!
//! A process takes only the ports of its half of the range (even or odd, its generation:
//! `crate::upgrade::mesh_half`), so that during an upgrade a segment's destination port
//! tells whose connection it belongs to: the successor passes the predecessor's on to it
//! while it drains (docs/ARCHITECTURE.md, "Upgrade in place").

use std::collections::HashSet;

/// The endpoint's own ports for connections to tasks.
const LOCAL_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;

/// The endpoint's ports of one half (even or odd): handed out in turn so that a port is
/// reused as late as possible.
pub(super) struct PortAlloc {
    next: u16,
    half: u16,
    used: HashSet<u16>,
}

impl Default for PortAlloc {
    fn default() -> Self {
        PortAlloc::of_half(0)
    }
}

/// Whether `port` is one of the half `half` (0: even, 1: odd).
pub(super) fn in_half(port: u16, half: u16) -> bool {
    port & 1 == half & 1
}

impl PortAlloc {
    /// The allocator of the ports of half `half` (0: even, 1: odd).
    pub(super) fn of_half(half: u16) -> PortAlloc {
        let half = half & 1;
        PortAlloc {
            next: *LOCAL_PORTS.start() + half,
            half,
            used: HashSet::new(),
        }
    }

    fn first(&self) -> u16 {
        *LOCAL_PORTS.start() + self.half
    }

    fn last(&self) -> u16 {
        *LOCAL_PORTS.end() - 1 + self.half
    }

    pub(super) fn take(&mut self) -> Option<u16> {
        for _ in 0..=(self.last() - self.first()) / 2 {
            let p = self.next;
            self.next = if p >= self.last() {
                self.first()
            } else {
                p + 2
            };
            if self.used.insert(p) {
                return Some(p);
            }
        }
        None
    }

    pub(super) fn release(&mut self, p: u16) {
        self.used.remove(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A released port comes back only after every other port has had its turn, so a task
    /// sees a (port, endpoint) pair again as late as possible.
    #[test]
    fn ports_are_handed_out_in_turn_and_reused_last() {
        let mut ports = PortAlloc::default();
        assert_eq!(ports.take(), Some(1024));
        assert_eq!(ports.take(), Some(1026));
        ports.release(1024);
        assert_eq!(ports.take(), Some(1028));
        ports.next = 65534;
        assert_eq!(ports.take(), Some(65534));
        // Wrapped around: 1024 is free again, 1026 and 1028 are still taken.
        assert_eq!(ports.take(), Some(1024));
        assert_eq!(ports.take(), Some(1030));
    }

    #[test]
    fn a_full_range_refuses() {
        for half in [0, 1] {
            let mut ports = PortAlloc::of_half(half);
            let n = LOCAL_PORTS.count() / 2;
            assert!((0..n).all(|_| ports.take().is_some_and(|p| in_half(p, half))));
            assert_eq!(ports.take(), None);
            ports.release(4000 + half);
            assert_eq!(ports.take(), Some(4000 + half));
        }
    }

    /// The odd half runs from 1025 to 65535 and wraps around.
    #[test]
    fn the_odd_half() {
        let mut ports = PortAlloc::of_half(1);
        assert_eq!(ports.take(), Some(1025));
        ports.next = 65535;
        assert_eq!(ports.take(), Some(65535));
        assert_eq!(ports.take(), Some(1027));
    }
}
