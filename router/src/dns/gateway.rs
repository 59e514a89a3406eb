//! DNS at a network's gateway address: the embedded resolver's names over UDP to
//! `GATEWAY:53`, for runtimes whose own resolver holds 127.0.0.11, such as Docker's
//! (`docker run --dns GATEWAY`). The datapath recognises such a query and hands it over
//! (`Punt::GatewayDns`); the worker answers it here and writes the reply frame back out of
//! the port the query came from. Queries to a gateway are rare next to the frames the
//! datapath switches, so this answer may allocate (hickory-proto does).

use super::answer::{error_reply, handle, Outcome};
use super::server::Shared;
use datapath::table::NetTable;
use datapath::vocab::DropReason;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use hickory_proto::op::ResponseCode;

/// Answers a DNS query over UDP to the gateway of `net` from the names of the networks its
/// table names (`NetTable::dns`); a name the cluster does not have gets SERVFAIL, so that the
/// client (Docker's resolver) asks its next server. The reply frame goes into `reply`; its
/// length comes back. A message not worth an answer is `MalformedIp`, an answer too large for
/// `reply` `Oversize`; a frame that is not such a query (which the datapath does not punt) is
/// `NoRoute`.
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
    let Outcome::Reply(answer) = outcome else {
        return Err(DropReason::MalformedIp);
    };
    let src_mac: [u8; 6] = frame[6..12].try_into().map_err(|_| DropReason::Runt)?;
    PacketBuilder::ethernet2(net.gateway_mac.0, src_mac)
        .ipv4(own_ip.octets(), ip.header().source_addr().octets(), 64)
        .udp(53, udp.source_port())
        .write_to_slice(reply, &answer)
        .map_err(|_| DropReason::Oversize)
}
