//! DNS at a network's gateway address: the embedded resolver's names over UDP to
//! `GATEWAY:53`, for runtimes whose own resolver holds 127.0.0.11, such as Docker's
//! (`docker run --dns GATEWAY`). The datapath recognises such a query and hands it over
//! (`Punt::GatewayDns`); the worker answers it here and writes the reply frame back out of
//! the port the query came from. Queries to a gateway are rare next to the frames the
//! datapath switches, so this answer may allocate (hickory-proto does).

use super::answer::{error_reply, handle, Outcome};
use super::server::Shared;
use super::stats;
use datapath::table::NetTable;
use datapath::vocab::DropReason;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use hickory_proto::op::ResponseCode;

/// Answers a DNS query over UDP to the gateway of `net` from the names of the networks its
/// table names (`NetTable::dns`); a name the cluster does not have gets SERVFAIL, so that the
/// client (Docker's resolver) asks its next server. The reply frame goes into `reply`; its
/// length comes back. An answer too large for `reply` (the client's EDNS size allows up to
/// 4 096 bytes, a frame holds less) goes out truncated with TC set, so the client asks again
/// over TCP, as a DNS server does. A message not worth an answer is `MalformedIp`; a frame
/// that is not such a query (which the datapath does not punt) is `NoRoute`.
pub fn answer(
    shared: &Shared,
    net: &NetTable,
    frame: &[u8],
    reply: &mut [u8],
) -> Result<usize, DropReason> {
    let (Some(own_ip), Some(networks)) = (net.gateway_ip, &net.dns) else {
        return Err(DropReason::NoRoute);
    };
    let packet = SlicedPacket::from_ethernet(frame).map_err(|_| DropReason::MalformedIp)?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) =
        (&packet.net, &packet.transport)
    else {
        return Err(DropReason::NoRoute);
    };
    if ip.header().destination_addr() != own_ip || udp.destination_port() != 53 {
        return Err(DropReason::NoRoute);
    }
    let query = udp.payload();
    let outcome = match handle(&shared.view.load(), networks, query, true) {
        Outcome::Forward => error_reply(query, ResponseCode::ServFail),
        other => other,
    };
    let Outcome::Reply(mut answer) = outcome else {
        shared.stats.count(query, stats::Outcome::Dropped);
        return Err(DropReason::MalformedIp);
    };
    shared
        .stats
        .count(query, stats::Outcome::of_own_reply(&answer));
    let room = reply.len().saturating_sub(FRAME_HEADERS);
    if answer.len() > room {
        answer = truncated(&answer).ok_or(DropReason::Oversize)?;
    }
    let src_mac: [u8; 6] = frame[6..12].try_into().map_err(|_| DropReason::Runt)?;
    PacketBuilder::ethernet2(net.gateway_mac.0, src_mac)
        .ipv4(own_ip.octets(), ip.header().source_addr().octets(), 64)
        .udp(53, udp.source_port())
        .write_to_slice(reply, &answer)
        .map_err(|_| DropReason::Oversize)
}

/// Ethernet, IPv4 (no options) and UDP headers of a reply frame.
const FRAME_HEADERS: usize = 14 + 20 + 8;

/// `answer` without its records and with TC set: the client asks again over TCP.
fn truncated(answer: &[u8]) -> Option<Vec<u8>> {
    let mut m = hickory_proto::op::Message::from_vec(answer).ok()?;
    m.answers.clear();
    m.authorities.clear();
    m.additionals.clear();
    m.metadata.truncation = true;
    m.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::names::{DnsView, NetNames};
    use arc_swap::ArcSwap;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    use protocol::types::MacAddr;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

    fn shared() -> Shared {
        let mut net = NetNames::default();
        net.a
            .insert("whoami".into(), vec![Ipv4Addr::new(10, 0, 0, 2)]);
        let mut view = DnsView::default();
        view.networks.insert("demo".into(), net);
        Shared {
            view: ArcSwap::from_pointee(view),
            upstreams: Vec::new(),
            stats: Default::default(),
        }
    }

    fn net() -> NetTable {
        NetTable {
            gateway_ip: Some(GW),
            gateway_mac: MacAddr::from_ipv4(GW),
            dns: Some(Arc::from(["demo".to_string()])),
            ..NetTable::default()
        }
    }

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let mut f = Vec::new();
        PacketBuilder::ethernet2(MacAddr::from_ipv4(CLIENT).0, MacAddr::from_ipv4(GW).0)
            .ipv4(CLIENT.octets(), GW.octets(), 64)
            .udp(40000, 53)
            .write(&mut f, &m.to_vec().unwrap())
            .unwrap();
        f
    }

    /// The DNS message of a reply frame, after checking it goes from the gateway's port 53
    /// back to the client's.
    fn answered(reply: &[u8]) -> Message {
        let p = SlicedPacket::from_ethernet(reply).unwrap();
        let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (&p.net, &p.transport)
        else {
            panic!("not UDP/IPv4");
        };
        assert_eq!(&reply[6..12], MacAddr::from_ipv4(GW).as_bytes());
        assert_eq!(ip.header().source_addr(), GW);
        assert_eq!((udp.source_port(), udp.destination_port()), (53, 40000));
        Message::from_vec(udp.payload()).unwrap()
    }

    #[test]
    fn cluster_names_are_answered_and_others_get_servfail() {
        let (shared, net) = (shared(), net());
        let mut reply = vec![0u8; datapath::switch::MAX_FRAME];
        let n = answer(&shared, &net, &query("whoami."), &mut reply).unwrap();
        let m = answered(&reply[..n]);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        let n = answer(&shared, &net, &query("example.com."), &mut reply).unwrap();
        assert_eq!(
            answered(&reply[..n]).metadata.response_code,
            ResponseCode::ServFail
        );
        // Not even the truncated answer fits: dropped as oversize.
        let mut tiny = [0u8; 60];
        assert_eq!(
            answer(&shared, &net, &query("whoami."), &mut tiny),
            Err(DropReason::Oversize)
        );
    }

    #[test]
    fn an_answer_larger_than_a_frame_goes_out_truncated() {
        // 200 tasks: about 3.2 KB of A records, within the client's 4 096-byte EDNS size
        // but over a 1 518-byte frame.
        let mut names = NetNames::default();
        let many: Vec<Ipv4Addr> = (0..200u32)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + 10 + i))
            .collect();
        names.a.insert("tasks.big".into(), many);
        let mut view = DnsView::default();
        view.networks.insert("demo".into(), names);
        let shared = Shared {
            view: ArcSwap::from_pointee(view),
            upstreams: Vec::new(),
            stats: Default::default(),
        };
        let mut m = Message::query();
        m.metadata.id = 9;
        m.add_query(Query::query(
            Name::from_ascii("tasks.big.").unwrap(),
            RecordType::A,
        ));
        let mut edns = hickory_proto::op::Edns::new();
        edns.set_max_payload(4096);
        m.edns = Some(edns);
        let mut f = Vec::new();
        PacketBuilder::ethernet2(MacAddr::from_ipv4(CLIENT).0, MacAddr::from_ipv4(GW).0)
            .ipv4(CLIENT.octets(), GW.octets(), 64)
            .udp(40000, 53)
            .write(&mut f, &m.to_vec().unwrap())
            .unwrap();
        let mut reply = vec![0u8; datapath::switch::MAX_FRAME];
        let n = answer(&shared, &net(), &f, &mut reply).expect("answered, not dropped");
        let got = answered(&reply[..n]);
        assert!(got.metadata.truncation, "TC set");
        assert!(got.answers.is_empty());
        assert_eq!(got.metadata.id, 9);
    }
}
