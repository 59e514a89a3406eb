//! The ingress endpoint's own ports, from which it connects to tasks (TCP) and sends them
//! clients' datagrams (UDP).

use std::collections::HashSet;

/// The endpoint's own ports for connections to tasks.
const LOCAL_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;

/// The endpoint's ports: handed out in turn so that a port is reused as late as possible.
pub(super) struct PortAlloc {
    next: u16,
    used: HashSet<u16>,
}

impl Default for PortAlloc {
    fn default() -> Self {
        PortAlloc {
            next: *LOCAL_PORTS.start(),
            used: HashSet::new(),
        }
    }
}

impl PortAlloc {
    pub(super) fn take(&mut self) -> Option<u16> {
        for _ in LOCAL_PORTS {
            let p = self.next;
            self.next = if p == *LOCAL_PORTS.end() {
                *LOCAL_PORTS.start()
            } else {
                p + 1
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
        assert_eq!(ports.take(), Some(1025));
        ports.release(1024);
        assert_eq!(ports.take(), Some(1026));
        ports.next = *LOCAL_PORTS.end();
        assert_eq!(ports.take(), Some(65535));
        // Wrapped around: 1024 is free again, 1025 and 1026 are still taken.
        assert_eq!(ports.take(), Some(1024));
        assert_eq!(ports.take(), Some(1027));
    }

    #[test]
    fn a_full_range_refuses() {
        let mut ports = PortAlloc::default();
        let n = LOCAL_PORTS.count();
        assert!((0..n).all(|_| ports.take().is_some()));
        assert_eq!(ports.take(), None);
        ports.release(4000);
        assert_eq!(ports.take(), Some(4000));
    }
}
