//! The resolver's decision for one DNS message, sans-IO: parse it (hickory-proto), answer it
//! from the cluster's names if it asks for one, or say that it must go upstream. Hostile
//! input never panics: what does not parse gets FORMERR when it has a header to answer, and
//! is dropped otherwise.

use super::names::DnsView;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::net::Ipv4Addr;

/// TTL of the cluster's records: short, so that clients that cache follow changes quickly
/// (stale answers are a known Swarm complaint).
pub const TTL: u32 = 1;
/// Largest UDP answer without EDNS (RFC 1035).
pub const UDP_PLAIN: usize = 512;

/// What to do with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not the cluster's: forward the message upstream.
    Forward,
    /// Not worth an answer (too short to have a header, or itself a response).
    Drop,
}

/// An error reply to a message that has at least a header (its id and opcode are echoed).
pub fn error_reply(packet: &[u8], code: ResponseCode) -> Outcome {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let op = OpCode::from_u8((packet[2] >> 3) & 0x0f);
    let mut m = Message::error_msg(id, op, code);
    m.metadata.recursion_desired = packet[2] & 0x01 != 0;
    m.metadata.recursion_available = true;
    m.to_vec().map_or(Outcome::Drop, Outcome::Reply)
}

/// Decides for `packet` from a task on `networks`. `udp` says whether the answer must fit a
/// UDP datagram (512 bytes, or the client's EDNS size up to 4096).
pub fn handle(view: &DnsView, networks: &[String], packet: &[u8], udp: bool) -> Outcome {
    let Ok(query) = Message::from_vec(packet) else {
        return error_reply(packet, ResponseCode::FormErr);
    };
    if query.metadata.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    if query.metadata.op_code != OpCode::Query {
        return error_reply(packet, ResponseCode::NotImp);
    }
    let [q] = query.queries.as_slice() else {
        return error_reply(packet, ResponseCode::FormErr);
    };
    if q.query_class() != DNSClass::IN {
        return Outcome::Forward;
    }
    let mut answers = Vec::new();
    let name = q.name().to_ascii();
    match q.query_type() {
        RecordType::PTR => match reverse_ip(&name).and_then(|ip| view.reverse(networks, ip)) {
            Some(target) => {
                let Ok(target) = Name::from_ascii(format!("{target}.")) else {
                    return error_reply(packet, ResponseCode::ServFail);
                };
                answers.push(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::PTR(PTR(target)),
                ));
            }
            None => return Outcome::Forward,
        },
        qtype => match view.lookup(networks, &name) {
            // A known name answers A with its addresses and anything else (AAAA, MX...) with
            // no records, NOERROR: the name exists.
            Some(addrs) if qtype == RecordType::A => answers.extend(
                addrs
                    .iter()
                    .map(|ip| Record::from_rdata(q.name().clone(), TTL, RData::A(A(*ip)))),
            ),
            Some(_) => {}
            None => return Outcome::Forward,
        },
    }
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = ResponseCode::NoError;
    reply.add_query(q.clone());
    reply.add_answers(answers);
    let limit = match (&query.edns, udp) {
        (_, false) => usize::from(u16::MAX),
        (Some(e), true) => usize::from(e.max_payload()).clamp(UDP_PLAIN, 4096),
        (None, true) => UDP_PLAIN,
    };
    match reply.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Outcome::Reply(bytes),
        // Too many tasks for a datagram: the client retries over TCP.
        Ok(_) => {
            reply.answers.clear();
            reply.metadata.truncation = true;
            reply.to_vec().map_or(Outcome::Drop, Outcome::Reply)
        }
        Err(_) => error_reply(packet, ResponseCode::ServFail),
    }
}

/// The address of a reverse name `d.c.b.a.in-addr.arpa.`.
fn reverse_ip(name: &str) -> Option<Ipv4Addr> {
    let rest = name
        .trim_end_matches('.')
        .to_ascii_lowercase()
        .strip_suffix(".in-addr.arpa")?
        .to_string();
    let mut o = rest.split('.').map(|p| p.parse::<u8>().ok());
    let (d, c, b, a) = (o.next()??, o.next()??, o.next()??, o.next()??);
    o.next().is_none().then(|| Ipv4Addr::new(a, b, c, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::names::NetNames;
    use hickory_proto::op::Query;

    fn view() -> DnsView {
        let mut net = NetNames::default();
        net.a
            .insert("whoami".into(), vec!["10.0.0.2".parse().unwrap()]);
        net.a.insert(
            "tasks.whoami".into(),
            (3..=5).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(),
        );
        net.a.insert(
            "tasks.big".into(),
            (1..=200).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect(),
        );
        net.ptr
            .insert("10.0.0.3".parse().unwrap(), "whoami.1.abc.demo".into());
        let mut v = DnsView::default();
        v.networks.insert("demo".into(), net);
        v
    }

    fn ask(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 77;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn reply(o: Outcome) -> Message {
        match o {
            Outcome::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn nets() -> Vec<String> {
        vec!["demo".into()]
    }

    #[test]
    fn cluster_names_are_answered() {
        let r = reply(handle(
            &view(),
            &nets(),
            &ask("WhoAmI.", RecordType::A),
            true,
        ));
        assert_eq!(r.metadata.id, 77);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A("10.0.0.2".parse().unwrap())));
        let r = reply(handle(
            &view(),
            &nets(),
            &ask("tasks.whoami", RecordType::A),
            true,
        ));
        assert_eq!(r.answers.len(), 3);
        // AAAA of a known name: the name exists, with no such record.
        let r = reply(handle(
            &view(),
            &nets(),
            &ask("whoami", RecordType::AAAA),
            true,
        ));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let r = reply(handle(
            &view(),
            &nets(),
            &ask("3.0.0.10.in-addr.arpa.", RecordType::PTR),
            true,
        ));
        assert_eq!(r.answers[0].data.to_string(), "whoami.1.abc.demo.");
    }

    #[test]
    fn other_names_and_networks_go_upstream() {
        let q = ask("example.org", RecordType::A);
        assert_eq!(handle(&view(), &nets(), &q, true), Outcome::Forward);
        // A task not on `demo` does not see its names.
        let q = ask("whoami", RecordType::A);
        assert_eq!(
            handle(&view(), &["other".into()], &q, true),
            Outcome::Forward
        );
        let q = ask("9.9.9.10.in-addr.arpa", RecordType::PTR);
        assert_eq!(handle(&view(), &nets(), &q, true), Outcome::Forward);
    }

    #[test]
    fn large_answers_are_truncated_over_udp_only() {
        let q = ask("tasks.big", RecordType::A);
        let r = reply(handle(&view(), &nets(), &q, true));
        assert!(r.metadata.truncation && r.answers.is_empty());
        let r = reply(handle(&view(), &nets(), &q, false));
        assert_eq!(r.answers.len(), 200);
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        assert_eq!(handle(&view(), &nets(), b"", true), Outcome::Drop);
        assert_eq!(handle(&view(), &nets(), b"\x01\x02", true), Outcome::Drop);
        let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0, 5, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 40]);
        let r = reply(handle(&view(), &nets(), &junk, true));
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = handle(&view(), &nets(), &b, true);
        }
    }
}
