//! Any DNS query a task sends the embedded resolver, as far as a fuzz target can reach it.
//!
//! The resolver's decision (`router::dns::answer::handle`: parse, answer from the cluster's
//! names, or forward) lives in the router crate, which a fuzz target cannot depend on; its
//! property test `any_bytes_never_panic` feeds it random bytes. Reached here, with the same
//! hickory-proto version and the same calls in the same order as `handle`: parsing the
//! message, reading its one query (name as text, type, class, EDNS size), building the
//! answer (an A or PTR record, the query echoed) and its truncated form, and the error
//! reply made from the raw header. And the datapath's half of DNS at a gateway: whether the
//! frame carrying the query is one to punt (`datapath::answer::is_dns_query`), for a query
//! to the gateway's port 53 and for one elsewhere.
#![no_main]
use datapath::answer::is_dns_query;
use etherparse::PacketBuilder;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;

/// `router::dns::answer::error_reply`: an error answer built from a raw header.
fn error_reply(packet: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let op = OpCode::from_u8((packet[2] >> 3) & 0x0f);
    let mut m = Message::error_msg(id, op, code);
    m.metadata.recursion_desired = packet[2] & 0x01 != 0;
    m.metadata.recursion_available = true;
    m.to_vec().ok()
}

/// The hickory calls of `router::dns::answer::handle`, answering every A query with one
/// address and every PTR with one name.
fn answer(packet: &[u8]) -> Option<Vec<u8>> {
    let Ok(query) = Message::from_vec(packet) else {
        return error_reply(packet, ResponseCode::FormErr);
    };
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    if query.metadata.op_code != OpCode::Query {
        return error_reply(packet, ResponseCode::NotImp);
    }
    let [q] = query.queries.as_slice() else {
        return error_reply(packet, ResponseCode::FormErr);
    };
    let _ = q.query_class();
    let name = q.name().to_ascii();
    let mut answers = Vec::new();
    match q.query_type() {
        RecordType::PTR => {
            let target = Name::from_ascii(format!("{}.x.", name.trim_end_matches('.'))).ok()?;
            answers.push(Record::from_rdata(
                q.name().clone(),
                1,
                RData::PTR(PTR(target)),
            ));
        }
        RecordType::A => answers.push(Record::from_rdata(
            q.name().clone(),
            1,
            RData::A(A(Ipv4Addr::new(10, 0, 0, 2))),
        )),
        _ => {}
    }
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = ResponseCode::NoError;
    reply.add_query(q.clone());
    reply.add_answers(answers);
    let limit = match &query.edns {
        Some(e) => usize::from(e.max_payload()).clamp(512, 4096),
        None => 512,
    };
    match reply.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Some(bytes),
        Ok(_) => {
            reply.answers.clear();
            reply.metadata.truncation = true;
            reply.to_vec().ok()
        }
        Err(_) => error_reply(packet, ResponseCode::ServFail),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = answer(data) {
        // What the resolver sends back is a message a client can read.
        let m = Message::from_vec(&bytes).expect("an answer parses");
        assert_eq!(m.metadata.message_type, MessageType::Response);
    }
    let gw = Ipv4Addr::new(10, 0, 0, 1);
    for (to, port) in [(gw, 53), (gw, 5353), (Ipv4Addr::new(10, 0, 0, 7), 53)] {
        let builder = PacketBuilder::ethernet2([2, 0x42, 10, 0, 0, 9], [2, 0x42, 10, 0, 0, 1])
            .ipv4([10, 0, 0, 9], to.octets(), 64)
            .udp(40_000, port);
        let mut frame = Vec::with_capacity(builder.size(data.len()));
        if builder.write(&mut frame, data).is_ok() {
            assert_eq!(is_dns_query(gw, &frame), to == gw && port == 53);
        }
    }
});
