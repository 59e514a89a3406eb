//! Where a frame that reaches the ingress endpoint goes, decided from its headers before
//! smoltcp sees it: a TCP segment to one of the endpoint's ports goes to that connection's
//! socket alone (each TCP connection is its own smoltcp `SocketSet`, so the stack's socket
//! lookup walks one socket, not all of them); everything else (UDP, ARP, ICMP, segments for
//! no connection) goes to the shared set. An ARP frame names its sender, so that
//! connections waiting for that neighbour can be woken.

use super::slot::Segment;
use smoltcp::wire::{
    ArpPacket, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket,
};

#[derive(Debug, PartialEq, Eq)]
pub enum Dest {
    /// A TCP segment (IPv4, first or only fragment) to a local port.
    Tcp(Segment),
    /// An ARP packet from this IPv4 address.
    Arp(Ipv4Address),
    Other,
}

/// Classifies an Ethernet frame.
pub fn classify(frame: &[u8]) -> Dest {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Dest::Other;
    };
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return Dest::Other;
            };
            if ip.next_header() != IpProtocol::Tcp || ip.frag_offset() != 0 {
                return Dest::Other;
            }
            match TcpPacket::new_checked(ip.payload()) {
                Ok(tcp) => Dest::Tcp(Segment {
                    port: tcp.dst_port(),
                    seq: tcp.seq_number().0 as u32,
                    len: tcp.payload().len() as u32,
                    syn: tcp.syn(),
                }),
                Err(_) => Dest::Other,
            }
        }
        EthernetProtocol::Arp => match ArpPacket::new_checked(eth.payload()) {
            Ok(arp) if arp.source_protocol_addr().len() == 4 => {
                let a = arp.source_protocol_addr();
                Dest::Arp(Ipv4Address::new(a[0], a[1], a[2], a[3]))
            }
            _ => Dest::Other,
        },
        _ => Dest::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SYN-ACK from 10.255.0.5:80 to the endpoint 10.255.0.2:1025, as the task sends it.
    const SYN_ACK: [u8; 58] = [
        0x02, 0x42, 0x0a, 0xff, 0x00, 0x02, 0x02, 0x42, 0x0a, 0xff, 0x00, 0x05, 0x08,
        0x00, // eth
        0x45, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, // ipv4
        0x0a, 0xff, 0x00, 0x05, 0x0a, 0xff, 0x00, 0x02, //
        0x00, 0x50, 0x04, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, // tcp
        0x60, 0x12, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4,
    ];
    /// An ARP reply from 10.255.0.5.
    const ARP_REPLY: [u8; 42] = [
        0x02, 0x42, 0x0a, 0xff, 0x00, 0x02, 0x02, 0x42, 0x0a, 0xff, 0x00, 0x05, 0x08, 0x06, //
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02, //
        0x02, 0x42, 0x0a, 0xff, 0x00, 0x05, 0x0a, 0xff, 0x00, 0x05, //
        0x02, 0x42, 0x0a, 0xff, 0x00, 0x02, 0x0a, 0xff, 0x00, 0x02,
    ];

    #[test]
    fn tcp_segment_goes_to_its_port() {
        assert_eq!(
            classify(&SYN_ACK),
            Dest::Tcp(Segment {
                port: 1025,
                seq: 1,
                len: 0,
                syn: true
            })
        );
    }

    #[test]
    fn arp_names_its_sender() {
        assert_eq!(
            classify(&ARP_REPLY),
            Dest::Arp(Ipv4Address::new(10, 255, 0, 5))
        );
    }

    #[test]
    fn udp_truncated_and_fragments_are_other() {
        let mut udp = SYN_ACK;
        udp[23] = 17;
        assert_eq!(classify(&udp), Dest::Other);
        assert_eq!(classify(&SYN_ACK[..40]), Dest::Other);
        let mut frag = SYN_ACK;
        frag[20] = 0x00;
        frag[21] = 0x10; // offset 16 × 8 bytes
        assert_eq!(classify(&frag), Dest::Other);
        assert_eq!(classify(&[]), Dest::Other);
    }
}
