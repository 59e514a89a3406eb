//! The resolver's counters, shared by every task's resolver and the gateways' of one node:
//! queries by record type and outcome (relaxed atomics, one increment per query), and how
//! long upstream resolvers took (a histogram). Read by the metrics endpoint at scrape time.

use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The record types counted by name; every other type counts as `other`, so the label set
/// stays bounded whatever clients ask.
pub const TYPES: [&str; 9] = [
    "A", "AAAA", "PTR", "SRV", "TXT", "MX", "CNAME", "ANY", "other",
];

/// What became of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the cluster's names.
    Cluster,
    /// Answered by an upstream resolver (whatever its code).
    Upstream,
    /// SERVFAIL: no upstream answered within the budget, none is configured, too many
    /// queries were waiting, or (at a gateway) the name is not the cluster's.
    ServFail,
    /// FORMERR or NOTIMP: the message was not a query the resolver takes.
    Refused,
    /// Not answered (no header to answer, or itself a response).
    Dropped,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Cluster,
        Outcome::Upstream,
        Outcome::ServFail,
        Outcome::Refused,
        Outcome::Dropped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Cluster => "cluster",
            Outcome::Upstream => "upstream",
            Outcome::ServFail => "servfail",
            Outcome::Refused => "refused",
            Outcome::Dropped => "dropped",
        }
    }

    /// The outcome of a reply the resolver made itself, from its response code.
    pub fn of_own_reply(reply: &[u8]) -> Outcome {
        match reply.get(3).map(|b| b & 0x0f) {
            Some(0) | Some(3) => Outcome::Cluster,
            Some(2) => Outcome::ServFail,
            _ => Outcome::Refused,
        }
    }
}

/// Upper bounds of the upstream latency histogram, in seconds: 1 ms to the 1.8 s budget.
const UPSTREAM_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.8];

/// The node's resolver counters.
#[derive(Debug)]
pub struct DnsStats {
    queries: [[AtomicU64; Outcome::ALL.len()]; TYPES.len()],
    /// Seconds from sending a query upstream to its answer (answered ones only).
    pub upstream: Histogram,
}

impl Default for DnsStats {
    fn default() -> DnsStats {
        DnsStats {
            queries: Default::default(),
            upstream: Histogram::new(UPSTREAM_BUCKETS),
        }
    }
}

impl DnsStats {
    /// Counts one query of `packet` (its question's type, read from the wire) ending in
    /// `outcome`.
    pub fn count(&self, packet: &[u8], outcome: Outcome) {
        let t = type_index(packet);
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(0);
        self.queries[t][o].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_answered(&self, took: Duration) {
        self.upstream.observe(took.as_secs_f64());
    }

    /// Every (type, outcome) with its count, zeros included.
    pub fn queries(&self) -> impl Iterator<Item = (&'static str, Outcome, u64)> + '_ {
        TYPES.iter().enumerate().flat_map(move |(t, name)| {
            Outcome::ALL.iter().enumerate().map(move |(o, outcome)| {
                (*name, *outcome, self.queries[t][o].load(Ordering::Relaxed))
            })
        })
    }
}

/// The index in [`TYPES`] of the question's type: the two bytes after the first question's
/// name (labels walked within the packet; a compression pointer or anything malformed is
/// `other`).
fn type_index(packet: &[u8]) -> usize {
    let other = TYPES.len() - 1;
    let mut at = 12;
    loop {
        let Some(&len) = packet.get(at) else {
            return other;
        };
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return other;
        }
        at += 1 + usize::from(len);
    }
    let Some(t) = packet.get(at + 1..at + 3) else {
        return other;
    };
    let name = match u16::from_be_bytes([t[0], t[1]]) {
        1 => "A",
        28 => "AAAA",
        12 => "PTR",
        33 => "SRV",
        16 => "TXT",
        15 => "MX",
        5 => "CNAME",
        255 => "ANY",
        _ => "other",
    };
    TYPES.iter().position(|n| *n == name).unwrap_or(other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn counts_by_the_questions_type_and_bounds_the_rest() {
        let s = DnsStats::default();
        s.count(&query("whoami.", RecordType::A), Outcome::Cluster);
        s.count(&query("tasks.whoami.", RecordType::AAAA), Outcome::Cluster);
        s.count(&query("x.", RecordType::CAA), Outcome::Upstream);
        s.count(b"\x01", Outcome::Dropped);
        // A name running past the end, and a pointer where a label should be.
        s.count(b"\0\0\0\0\0\0\0\0\0\0\0\0\x3fab", Outcome::Refused);
        s.count(b"\0\0\0\0\0\0\0\0\0\0\0\0\xc0\x0c\0\x01", Outcome::Refused);
        let n = |t: &str, o: Outcome| {
            s.queries()
                .find(|(tt, oo, _)| *tt == t && *oo == o)
                .map(|x| x.2)
        };
        assert_eq!(n("A", Outcome::Cluster), Some(1));
        assert_eq!(n("AAAA", Outcome::Cluster), Some(1));
        assert_eq!(n("other", Outcome::Upstream), Some(1));
        assert_eq!(n("other", Outcome::Dropped), Some(1));
        assert_eq!(n("other", Outcome::Refused), Some(2));
        assert_eq!(s.queries().count(), TYPES.len() * Outcome::ALL.len());
    }

    #[test]
    fn own_replies_by_code() {
        assert_eq!(Outcome::of_own_reply(b"\0\0\x81\x80"), Outcome::Cluster);
        assert_eq!(Outcome::of_own_reply(b"\0\0\x81\x82"), Outcome::ServFail);
        assert_eq!(Outcome::of_own_reply(b"\0\0\x81\x81"), Outcome::Refused);
        assert_eq!(Outcome::of_own_reply(b""), Outcome::Refused);
    }
}
