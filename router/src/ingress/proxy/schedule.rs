//! Which TCP connections the proxy's next turn visits: those marked ready (their client
//! socket signalled, a segment arrived for them, the proxy reset them) and those whose
//! smoltcp deadline (retransmit, delayed ACK, keep-alive, user timeout, connect timeout)
//! has come. Everything else is left alone, so that an idle connection costs no time per
//! turn: marking is O(1), a deadline is kept in a `BTreeSet` (O(log n) to set, move or
//! expire).
//!
//! Time is an argument ([`Schedule::expire`]); nothing here reads a clock.

use mio::Token;
use smoltcp::time::Instant;
use std::collections::{BTreeSet, HashMap, HashSet};

#[derive(Default)]
pub(super) struct Schedule {
    ready: Vec<Token>,
    queued: HashSet<Token>,
    deadline: HashMap<Token, Instant>,
    timers: BTreeSet<(Instant, Token)>,
}

impl Schedule {
    /// The connection is visited in the next turn (once, however often it is marked).
    pub(super) fn mark(&mut self, t: Token) {
        if self.queued.insert(t) {
            self.ready.push(t);
        }
    }

    /// Sets (or clears, with `None`) the connection's one deadline.
    pub(super) fn set_deadline(&mut self, t: Token, at: Option<Instant>) {
        let old = match at {
            Some(at) => self.deadline.insert(t, at),
            None => self.deadline.remove(&t),
        };
        if old == at {
            return;
        }
        if let Some(old) = old {
            self.timers.remove(&(old, t));
        }
        if let Some(at) = at {
            self.timers.insert((at, t));
        }
    }

    /// Forgets the connection (it has ended).
    pub(super) fn remove(&mut self, t: Token) {
        self.set_deadline(t, None);
        // A stale entry in `ready` is skipped by the caller (the connection is gone).
        self.queued.remove(&t);
    }

    /// Marks every connection whose deadline is at or before `now`.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(at, t)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            self.deadline.remove(&t);
            self.mark(t);
        }
    }

    /// The connections to visit now; those marked while they are visited wait for the
    /// next turn.
    pub(super) fn take_ready(&mut self) -> Vec<Token> {
        self.queued.clear();
        std::mem::take(&mut self.ready)
    }

    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The earliest deadline.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|&(at, _)| at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: i64) -> Instant {
        Instant::from_millis(n)
    }

    #[test]
    fn marked_once_per_turn() {
        let mut s = Schedule::default();
        s.mark(Token(5));
        s.mark(Token(5));
        s.mark(Token(6));
        assert_eq!(s.take_ready(), vec![Token(5), Token(6)]);
        assert!(!s.has_ready());
        s.mark(Token(5));
        assert_eq!(s.take_ready(), vec![Token(5)]);
    }

    #[test]
    fn deadlines_move_expire_and_clear() {
        let mut s = Schedule::default();
        s.set_deadline(Token(1), Some(ms(100)));
        s.set_deadline(Token(2), Some(ms(50)));
        s.set_deadline(Token(1), Some(ms(30)));
        assert_eq!(s.next_deadline(), Some(ms(30)));
        s.expire(ms(40));
        assert_eq!(s.take_ready(), vec![Token(1)]);
        assert_eq!(s.next_deadline(), Some(ms(50)));
        s.set_deadline(Token(2), None);
        assert_eq!(s.next_deadline(), None);
        s.expire(ms(1_000));
        assert!(!s.has_ready());
    }

    #[test]
    fn removed_connection_has_no_deadline() {
        let mut s = Schedule::default();
        s.set_deadline(Token(3), Some(ms(10)));
        s.remove(Token(3));
        s.expire(ms(20));
        assert!(!s.has_ready());
        assert_eq!(s.next_deadline(), None);
    }
}
