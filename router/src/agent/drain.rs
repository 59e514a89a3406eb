//! How a task stops while it serves traffic, without I/O: the decisions of the stop sequence
//! ([`Plan`]) and what counts as a connection it still serves ([`served_connections`], over
//! the text of `/proc/PID/net/tcp{,6}`, which shows the sockets of that process's network
//! namespace). The task's supervisor (`crate::task`) reads the tables, asks the plan, and
//! signals the process.
//!
//! The sequence, for a task that leaves the desired state (scaled down, replaced, removed,
//! drained away) or whose health check failed:
//!
//! 1. It has left every rotation by the time its node starts: the views of backends are
//!    built from the same state (or status) on every node. Other nodes need that state to
//!    reach them, so the task is kept at least [`SETTLE_LEFT`] (a desired-state change is
//!    pushed to every node at once) or [`SETTLE_UNHEALTHY`] (a status goes to the manager
//!    and back on the once-a-second report and push) before anything else is decided: a new
//!    connection balanced to it by a node that had not heard yet is served.
//! 2. It keeps running while it serves connections, until none is left or the stop grace
//!    period (`--stop-grace-period`, Docker's 10 s by default) has passed since the stop
//!    began. Its flows keep reaching it meanwhile (the load balancers and the mesh keep the
//!    connections of tasks on their way out).
//! 3. Then SIGTERM, and SIGKILL if it still runs one grace period later (Docker's order).

use std::collections::BTreeSet;
use std::time::Duration;

/// How long a task that left the desired state is kept before its connections are counted:
/// the change is pushed to every node as it is made, and each node's agent rebuilds its
/// views at once, so a node that has not dropped the task after this (twice a slow
/// round trip plus a QUIC retransmission) is not reachable anyway.
pub const SETTLE_LEFT: Duration = Duration::from_secs(2);
/// The same for a task whose health check failed: its status reaches the manager with the
/// node's next report (every second) and the other nodes with the manager's next push
/// (every second), and each agent looks four times a second.
pub const SETTLE_UNHEALTHY: Duration = Duration::from_secs(3);
/// How often the connections are counted while the task drains.
pub const RECOUNT: Duration = Duration::from_millis(250);

/// What to do next while a task drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Look again after this long (or when the process exits by itself).
    Wait(Duration),
    /// Send SIGTERM now.
    Terminate(Why),
}

/// Why the wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// It serves no connection any more.
    Drained,
    /// The grace period passed with this many connections open.
    GraceOver(usize),
}

/// The decisions of one stop: `settle` to let every node drop the task, `grace` for its
/// connections to finish (counted from when the stop began, the settling included).
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    settle: Duration,
    grace: Duration,
}

impl Plan {
    /// A grace of 0 (`--stop-grace-period 0s`) stops at once: no settling either.
    pub fn new(settle: Duration, grace: Duration) -> Plan {
        Plan {
            settle: settle.min(grace),
            grace,
        }
    }

    /// What to do `elapsed` after the stop began, the task serving `open` connections.
    pub fn next(&self, elapsed: Duration, open: usize) -> Next {
        if elapsed < self.settle {
            return Next::Wait(self.settle - elapsed);
        }
        if open == 0 {
            return Next::Terminate(Why::Drained);
        }
        if elapsed >= self.grace {
            return Next::Terminate(Why::GraceOver(open));
        }
        Next::Wait(RECOUNT.min(self.grace - elapsed))
    }
}

/// TCP states (`include/net/tcp_states.h`) of a connection that still has bytes to move:
/// ESTABLISHED, SYN_RECV, FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING.
const BUSY: [u8; 6] = [0x01, 0x03, 0x04, 0x08, 0x09, 0x0B];
const LISTEN: u8 = 0x0A;

/// One row of `/proc/net/tcp{,6}`: local port and state.
fn row(line: &str) -> Option<(u16, u8)> {
    let mut cols = line.split_whitespace();
    let _slot = cols.next()?.strip_suffix(':')?;
    let local = cols.next()?;
    let _remote = cols.next()?;
    let state = u8::from_str_radix(cols.next()?, 16).ok()?;
    let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
    Some((port, state))
}

/// The connections a task serves, from the text of its `/proc/PID/net/tcp` and `tcp6`:
/// sockets on a port it listens on (its service's ports, whichever way clients came: VIP,
/// mesh, or straight) that are established or still have bytes to move. Its own outgoing
/// connections do not hold it back. Lines that do not parse are skipped.
pub fn served_connections(tables: &[&str]) -> usize {
    let rows: Vec<(u16, u8)> = tables
        .iter()
        .flat_map(|t| t.lines().skip(1))
        .filter_map(row)
        .collect();
    let listening: BTreeSet<u16> = rows
        .iter()
        .filter(|(_, st)| *st == LISTEN)
        .map(|(p, _)| *p)
        .collect();
    rows.iter()
        .filter(|(port, st)| BUSY.contains(st) && listening.contains(port))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task listening on 8000 (IPv4) and 7000 (IPv6, dual stack), from a real
    /// `/proc/PID/net/tcp{,6}`: two clients on 8000 (one established, one whose request
    /// is still being answered after it half-closed: CLOSE_WAIT), one in TIME_WAIT, one on
    /// 7000 over IPv4-mapped IPv6, and the task's own connection out to port 5432.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 346 1 000000004a786c48 100 0 0 10 0
   1: 0300000A:1F40 0900000A:B1C2 01 00000000:00000000 02:000A7D1E 00000000     0        0 3573 2 00000000d2b4c2a9 20 4 30 10 -1
   2: 0300000A:1F40 0900000A:B1C4 08 00000000:00000000 00:00000000 00000000     0        0 3574 1 00000000d2b4c2aa 20 4 30 10 -1
   3: 0300000A:1F40 0900000A:B1C0 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   4: 0300000A:9C40 0500000A:1538 01 00000000:00000000 02:000A7D1E 00000000     0        0 3575 2 00000000d2b4c2ab 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1B58 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 401 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000300000A:1B58 0000000000000000FFFF00000900000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 402 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn counts_the_connections_on_listening_ports_that_still_move_bytes() {
        assert_eq!(served_connections(&[TCP, TCP6]), 3);
        assert_eq!(served_connections(&[TCP]), 2);
        // Nothing listens (the process went): nothing served.
        assert_eq!(served_connections(&[""]), 0);
        assert_eq!(served_connections(&["header\n garbage line\n0: zz:zz"]), 0);
    }

    #[test]
    fn the_stop_waits_to_settle_then_for_connections_within_the_grace() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let plan = Plan::new(SETTLE_LEFT, s(10));
        // Settling: whatever the count, nothing happens.
        assert_eq!(plan.next(s(0), 0), Next::Wait(SETTLE_LEFT));
        assert_eq!(plan.next(ms(1500), 5), Next::Wait(ms(500)));
        // Settled, no connection: stop now.
        assert_eq!(plan.next(s(2), 0), Next::Terminate(Why::Drained));
        // Connections: count again shortly, until the grace is over.
        assert_eq!(plan.next(s(2), 3), Next::Wait(RECOUNT));
        assert_eq!(plan.next(ms(9900), 1), Next::Wait(ms(100)));
        assert_eq!(plan.next(s(10), 1), Next::Terminate(Why::GraceOver(1)));
        assert_eq!(plan.next(s(7), 0), Next::Terminate(Why::Drained));
        // A grace shorter than the settling cuts it; a grace of 0 stops at once.
        let short = Plan::new(SETTLE_UNHEALTHY, s(1));
        assert_eq!(short.next(s(0), 4), Next::Wait(s(1)));
        assert_eq!(short.next(s(1), 4), Next::Terminate(Why::GraceOver(4)));
        let none = Plan::new(SETTLE_LEFT, s(0));
        assert_eq!(none.next(s(0), 9), Next::Terminate(Why::GraceOver(9)));
    }
}
