//! Frames the router answers itself instead of switching: ARP requests for every address it
//! knows (proxy ARP, so broadcast never has to cross the underlay) and ICMP echo to a
//! network's gateway or a service VIP. Pure functions that allocate nothing: a request frame
//! in, a reply frame written into a caller-owned buffer, its length out.
//!
//! DNS over UDP at the gateway (the embedded resolver's names, for runtimes whose own resolver
//! holds 127.0.0.11, such as Docker's: `docker run --dns GATEWAY`) is recognised here
//! ([`is_dns_query`]) but answered by the router, which owns the resolver.

use crate::table::NetTable;
use crate::vocab::DropReason;
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, ArpPacketSlice, EtherType, Icmpv4Type, NetSlice,
    PacketBuilder, SlicedPacket, TransportSlice,
};
use protocol::types::MacAddr;
use std::net::Ipv4Addr;

const ETH_HEADER: usize = 14;

/// Answers an ARP request (the frame's EtherType is ARP) from the table of its network.
pub fn arp(net: &NetTable, frame: &[u8], reply: &mut [u8]) -> Result<usize, DropReason> {
    let body = frame.get(ETH_HEADER..).ok_or(DropReason::Runt)?;
    let arp = ArpPacketSlice::from_slice(body).map_err(|_| DropReason::ArpMalformed)?;
    if arp.hw_addr_type() != ArpHardwareId::ETHERNET
        || arp.proto_addr_type() != EtherType::IPV4
        || arp.hw_addr_size() != 6
        || arp.proto_addr_size() != 4
    {
        return Err(DropReason::ArpMalformed);
    }
    if arp.operation() != ArpOperation::REQUEST {
        return Err(DropReason::ArpNotRequest);
    }
    let sender_mac: [u8; 6] = arp
        .sender_hw_addr()
        .try_into()
        .map_err(|_| DropReason::ArpMalformed)?;
    let sender_ip: [u8; 4] = arp
        .sender_protocol_addr()
        .try_into()
        .map_err(|_| DropReason::ArpMalformed)?;
    let target_ip: [u8; 4] = arp
        .target_protocol_addr()
        .try_into()
        .map_err(|_| DropReason::ArpMalformed)?;
    let owner = *net
        .arp
        .get(&Ipv4Addr::from(target_ip))
        .ok_or(DropReason::ArpUnknownTarget)?;
    // A host asking for its own address (a duplicate-address probe) gets no answer.
    if owner.0 == sender_mac {
        return Err(DropReason::ArpUnknownTarget);
    }
    let answer = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REPLY,
        owner.as_bytes(),
        &target_ip,
        &sender_mac,
        &sender_ip,
    )
    .map_err(|_| DropReason::ArpMalformed)?;
    PacketBuilder::ethernet2(owner.0, sender_mac)
        .arp(answer)
        .write_to_slice(reply)
        .map_err(|_| DropReason::ArpMalformed)
}

/// Answers an IPv4 frame addressed to the gateway's MAC: echo requests to the gateway address
/// get an echo reply; anything else has nowhere to go yet. (DNS queries to its port 53 are
/// not answered here: see [`is_dns_query`].)
pub fn gateway(net: &NetTable, frame: &[u8], reply: &mut [u8]) -> Result<usize, DropReason> {
    let gw = net.gateway_ip.ok_or(DropReason::NoRoute)?;
    echo(gw, net.gateway_mac, frame, reply)
}

/// Whether `frame` is a DNS query over UDP/IPv4 to `own_ip`:53, which the router answers
/// outside the decision ([`crate::vocab::Punt::GatewayDns`]): the answer is built by a DNS
/// library that allocates, and queries to a gateway are rare next to the frames it switches.
pub fn is_dns_query(own_ip: Ipv4Addr, frame: &[u8]) -> bool {
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return false;
    };
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) =
        (&packet.net, &packet.transport)
    else {
        return false;
    };
    ip.header().destination_addr() == own_ip && udp.destination_port() == 53
}

/// Answers an ICMP echo request to an address the router owns (a gateway, a service VIP)
/// from that address and MAC. Anything else to it is `NoRoute`.
pub fn echo(
    own_ip: Ipv4Addr,
    own_mac: MacAddr,
    frame: &[u8],
    reply: &mut [u8],
) -> Result<usize, DropReason> {
    let packet = SlicedPacket::from_ethernet(frame).map_err(|_| DropReason::MalformedIp)?;
    let Some(NetSlice::Ipv4(ip)) = &packet.net else {
        return Err(DropReason::NoRoute);
    };
    let header = ip.header();
    if header.destination_addr() != own_ip {
        return Err(DropReason::NoRoute);
    }
    let Some(TransportSlice::Icmpv4(icmp)) = &packet.transport else {
        return Err(DropReason::NoRoute);
    };
    let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
        return Err(DropReason::NoRoute);
    };
    let src_mac = MacAddr(frame[6..12].try_into().map_err(|_| DropReason::Runt)?);
    PacketBuilder::ethernet2(own_mac.0, src_mac.0)
        .ipv4(own_ip.octets(), header.source_addr().octets(), 64)
        .icmpv4_echo_reply(echo.id, echo.seq)
        .write_to_slice(reply, icmp.payload())
        .map_err(|_| DropReason::Oversize)
}
