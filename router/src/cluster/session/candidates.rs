//! Which manager a member's link tries next, without I/O.
//!
//! The candidates are the addresses the link was given (`--join`, or the state directory's
//! `manager` file), then the control address of every manager the desired state lists, each
//! once. Attempts go round them in turn; a redirect, or the driver, can name the next one
//! (the leader) instead. [`super::node::NodeSession`] asks [`Candidates::start`] at each
//! attempt and feeds it the states it adopts.

use protocol::state::{ClusterState, Role};
use std::net::SocketAddr;

/// The managers to try, in order: `seeds` as given, then the control address of every
/// manager node of `state` (by name), each once; never `own` (this node's own control
/// address: a follower manager does not connect to itself).
pub fn candidates(
    seeds: &[SocketAddr],
    state: &ClusterState,
    own: Option<SocketAddr>,
) -> Vec<SocketAddr> {
    let managers = state
        .nodes
        .values()
        .filter(|n| n.role == Role::Manager)
        .filter_map(|n| n.control_addr);
    let mut list = Vec::new();
    for addr in seeds.iter().copied().chain(managers) {
        if Some(addr) != own && !list.contains(&addr) {
            list.push(addr);
        }
    }
    list
}

/// The candidates, and where the round robin stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    seeds: Vec<SocketAddr>,
    own: Option<SocketAddr>,
    list: Vec<SocketAddr>,
    /// The entry of `list` the round robin is at.
    cursor: usize,
    /// The manager the next attempt goes to instead (a leader named by a redirect).
    pinned: Option<SocketAddr>,
    /// The manager of the current or last attempt.
    current: Option<SocketAddr>,
}

impl Candidates {
    /// `seeds` first one first; never `own`.
    pub fn new(seeds: Vec<SocketAddr>, own: Option<SocketAddr>) -> Candidates {
        let list = candidates(&seeds, &ClusterState::default(), own);
        Candidates {
            seeds,
            own,
            list,
            cursor: 0,
            pinned: None,
            current: None,
        }
    }

    pub fn list(&self) -> &[SocketAddr] {
        &self.list
    }

    /// The manager the next attempt goes to, if any is known.
    pub fn next(&self) -> Option<SocketAddr> {
        self.pinned.or_else(|| self.list.get(self.cursor).copied())
    }

    /// The manager of the current or last attempt (before the first, the next one).
    pub fn current(&self) -> Option<SocketAddr> {
        self.current.or_else(|| self.next())
    }

    /// An attempt starts: it goes to [`Candidates::next`].
    pub fn start(&mut self) -> Option<SocketAddr> {
        let to = self.next();
        self.pinned = None;
        if to.is_some() {
            self.current = to;
        }
        to
    }

    /// The attempt or its session failed: the next one goes to the next candidate.
    pub fn move_on(&mut self) {
        self.pinned = None;
        if !self.list.is_empty() {
            self.cursor = (self.cursor + 1) % self.list.len();
        }
    }

    /// The next attempt goes to `addr`; if it is a candidate, the round robin goes on from
    /// there.
    pub fn pin(&mut self, addr: SocketAddr) {
        self.pinned = Some(addr);
        if let Some(i) = self.list.iter().position(|a| *a == addr) {
            self.cursor = i;
        }
    }

    /// Takes in the managers `state` lists; says whether the candidates changed.
    pub fn learn(&mut self, state: &ClusterState) -> bool {
        let list = candidates(&self.seeds, state, self.own);
        if list == self.list {
            return false;
        }
        // The round robin stays on its manager while it is a candidate.
        let at = self.list.get(self.cursor);
        self.cursor = at
            .and_then(|a| list.iter().position(|b| b == a))
            .unwrap_or(0);
        self.list = list;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::state::{Availability, Node};
    use protocol::types::NodeName;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn state(nodes: &[(&str, Role, Option<&str>)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (name, role, control) in nodes {
            let name = NodeName::new(*name).unwrap();
            s.nodes.insert(
                name.clone(),
                Node {
                    name,
                    role: *role,
                    availability: Availability::Active,
                    advertise_addr: None,
                    data_port: 4789,
                    joined_at: 0,
                    control_addr: control.map(addr),
                },
            );
        }
        s
    }

    #[test]
    fn seeds_come_first_then_the_states_managers_each_once() {
        let s = state(&[
            ("m3", Role::Manager, Some("10.0.0.3:2377")),
            ("m1", Role::Manager, Some("10.0.0.1:2377")),
            // A manager that serves no control endpoint (promoted, not a candidate).
            ("m4", Role::Manager, None),
            // A demoted manager's address stays in its entry, and counts no more.
            ("w1", Role::Worker, Some("10.0.0.9:2377")),
            ("m2", Role::Manager, Some("10.0.0.2:2377")),
        ]);
        let seeds = [addr("10.0.0.2:2377"), addr("192.0.2.7:2377")];
        assert_eq!(
            candidates(&seeds, &s, None),
            [
                "10.0.0.2:2377",
                "192.0.2.7:2377",
                "10.0.0.1:2377",
                "10.0.0.3:2377"
            ]
            .map(addr)
        );
        // Never this node's own endpoint, even as a seed.
        assert_eq!(
            candidates(&seeds, &s, Some(addr("10.0.0.2:2377"))),
            ["192.0.2.7:2377", "10.0.0.1:2377", "10.0.0.3:2377"].map(addr)
        );
        assert!(candidates(&[], &ClusterState::default(), None).is_empty());
    }

    #[test]
    fn attempts_go_round_and_a_pinned_leader_goes_first() {
        let [a, b, c, leader] = [
            "10.0.0.1:2377",
            "10.0.0.2:2377",
            "10.0.0.3:2377",
            "10.0.0.4:2377",
        ]
        .map(addr);
        let mut k = Candidates::new(vec![a, b, c], None);
        assert_eq!((k.current(), k.start()), (Some(a), Some(a)));
        k.move_on();
        assert_eq!(k.start(), Some(b));
        // b redirects to a leader that is no candidate; when that fails, c is next.
        k.pin(leader);
        assert_eq!((k.start(), k.current()), (Some(leader), Some(leader)));
        k.move_on();
        assert_eq!(k.start(), Some(c));
        k.move_on();
        assert_eq!(k.start(), Some(a));
        // A pinned candidate: the round robin goes on after it.
        k.pin(c);
        assert_eq!(k.start(), Some(c));
        k.move_on();
        assert_eq!(k.start(), Some(a));
    }

    #[test]
    fn learning_keeps_the_round_robin_on_its_manager() {
        let [a, b, c] = ["10.0.0.1:2377", "10.0.0.2:2377", "10.0.0.3:2377"].map(addr);
        let mut k = Candidates::new(vec![a], None);
        let s = state(&[
            ("m2", Role::Manager, Some("10.0.0.2:2377")),
            ("m3", Role::Manager, Some("10.0.0.3:2377")),
        ]);
        assert!(k.learn(&s));
        assert!(!k.learn(&s), "the same managers change nothing");
        assert_eq!(k.list(), [a, b, c]);
        k.move_on();
        assert_eq!(k.start(), Some(b));
        // m2 is demoted: b leaves the list, the round robin starts over from the seeds.
        let s = state(&[("m3", Role::Manager, Some("10.0.0.3:2377"))]);
        assert!(k.learn(&s));
        assert_eq!(k.list(), [a, c]);
        assert_eq!(k.start(), Some(a));
        // Nothing known: no attempt.
        let mut none = Candidates::new(vec![], None);
        assert_eq!(
            (none.next(), none.start(), none.current()),
            (None, None, None)
        );
        none.move_on();
        assert_eq!(none.start(), None);
    }
}
