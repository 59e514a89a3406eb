//! A node's whole per-frame path with every table filled: a service VIP with local and
//! remote backends over a shared connection table (the load balancer and its NAT both
//! ways), an encrypted network (its keys, ESP opening with the worker's replay windows and
//! rate limit, sealing of what goes out), and DNS at the gateway (recognised and punted).
//! Never panics; what is sealed for the underlay opens on the receiving node to the same
//! VXLAN datagram; an answer fits the reply buffer.
//!
//! Input: byte 0 shapes the tables (which backends the VIP has, whether network 4097 is
//! encrypted and has DNS, how small the connection table is); then records of
//! `[selector][length: 2 bytes][bytes]`, one frame or datagram each. The selector's low two
//! bits say where it comes from (a local port; plain VXLAN from the underlay; ESP this
//! harness seals with a member's key, so it opens; raw bytes as an ESP datagram), the next
//! three which port or VNI, bit 5 whether its TCP/UDP checksum is partial, bits 6-7 how
//! much time passes first.
#![no_main]
use datapath::conntrack::{ConnTable, ServiceCounters, TCP_IDLE_MS, UDP_IDLE_MS};
use datapath::crypto::EspState;
use datapath::keys::{lane_epoch, NetCrypto, Secret, TxSa};
use datapath::nat::L4Csum;
use datapath::switch::{from_port, from_underlay, Context, MAX_FRAME};
use datapath::table::{BackendSpec, Tables};
use datapath::vocab::{PortBinding, PortId, Punt, Verdict};
use libfuzzer_sys::fuzz_target;
use protocol::esp::{self, SenderKey};
use protocol::types::{MacAddr, Vni};
use protocol::vxlan;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};

const PLAIN_OR_SEALED: u32 = 4097;
const SEALED: u32 = 4098;
const KEY_ID: u8 = 3;
/// The other node: its underlay address and name.
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const PEER_NAME: &str = "n2";
const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ME_NAME: &str = "n1";
const VTEP_PORT: u16 = 4789;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

fn vni(v: u32) -> Vni {
    Vni::new(v).expect("vni")
}

/// The keys of an encrypted network as `me` holds them: the secret to open with, and its
/// own sending key (one lane).
fn crypto(secret: &Secret, me: &str, vni: u32) -> Arc<NetCrypto> {
    let key = SenderKey::derive(secret, me, lane_epoch(5, 0));
    Arc::new(NetCrypto {
        tx: Some(TxSa {
            spi: esp::spi(vni, KEY_ID),
            keys: vec![key],
        }),
        rx: [(KEY_ID, secret.clone())].into_iter().collect(),
    })
}

/// This node's tables. Network 4097: ports 1 (client .9), 2 (backend .3), 3 (.5); remote
/// .4 and .6 behind the peer; gateway .1; VIP .2 over the backends `shape` picks. Network
/// 4098, always encrypted: port 4 (.9), remote .4, gateway .1, VIP .2 over .4.
fn tables(shape: u8, secret: &Secret) -> Tables {
    let mut t = Tables::default();
    let peer = SocketAddrV4::new(PEER, VTEP_PORT);
    for (port, v, last) in [
        (1, PLAIN_OR_SEALED, 9),
        (2, PLAIN_OR_SEALED, 3),
        (3, PLAIN_OR_SEALED, 5),
        (4, SEALED, 9),
    ] {
        t.add_port(
            PortId(port),
            PortBinding {
                vni: vni(v),
                mac: MacAddr::from_ipv4(ip(last)),
                ip: ip(last),
            },
        );
    }
    for (v, last) in [(PLAIN_OR_SEALED, 4), (PLAIN_OR_SEALED, 6), (SEALED, 4)] {
        t.add_remote(vni(v), MacAddr::from_ipv4(ip(last)), Some(ip(last)), peer);
    }
    let spec = |last: u8| BackendSpec {
        ip: ip(last),
        mac: MacAddr::from_ipv4(ip(last)),
        flows: Default::default(),
    };
    let backends: Vec<BackendSpec> = [3u8, 5, 4, 6]
        .iter()
        .enumerate()
        .filter(|(i, _)| shape & (1 << i) != 0)
        .map(|(_, last)| spec(*last))
        .collect();
    // Short idle times when bit 6 is set, so that time passing expires flows.
    let idle = if shape & 0x40 != 0 {
        (2_000, 1_000)
    } else {
        (TCP_IDLE_MS, UDP_IDLE_MS)
    };
    for v in [PLAIN_OR_SEALED, SEALED] {
        t.set_gateway(vni(v), ip(1));
        let b = if v == SEALED {
            vec![spec(4)]
        } else {
            backends.clone()
        };
        t.add_vip(
            vni(v),
            ip(2),
            Arc::new(ServiceCounters::default()),
            &b,
            idle,
        );
    }
    let dns: Arc<[String]> = Arc::from(vec!["front".to_string()]);
    for (v, encrypted) in [(PLAIN_OR_SEALED, shape & 0x10 != 0), (SEALED, true)] {
        let net = t.networks.get_mut(&vni(v)).expect("network");
        if encrypted {
            net.crypto = Some(crypto(secret, ME_NAME, v));
        }
        if shape & 0x20 != 0 || v == SEALED {
            net.dns = Some(dns.clone());
        }
    }
    t.senders.insert(PEER, PEER_NAME.to_string());
    t
}

/// The peer's view, enough to open what this node seals: this node as a sender, the
/// networks' secret.
fn peer_tables(secret: &Secret) -> Tables {
    let mut t = Tables::default();
    for v in [PLAIN_OR_SEALED, SEALED] {
        t.networks.entry(vni(v)).or_default().crypto = Some(crypto(secret, PEER_NAME, v));
    }
    t.senders.insert(ME, ME_NAME.to_string());
    t
}

/// `frame` in VXLAN with `vni`.
fn vxlan_datagram(vni: Vni, frame: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; vxlan::HEADER_LEN + frame.len()];
    vxlan::Repr { vni }.emit(&mut vxlan::Packet::new_unchecked(&mut d[..]));
    d[vxlan::HEADER_LEN..].copy_from_slice(frame);
    d
}

/// `vxlan` sealed under `key` with sequence number `seq`.
fn seal(vxlan: &[u8], spi: u32, seq: u32, key: &SenderKey) -> Vec<u8> {
    let mut d = vec![0u8; esp::sealed_len(vxlan.len())];
    d[esp::HEADER_LEN + esp::INNER_UDP_LEN..][..vxlan.len()].copy_from_slice(vxlan);
    let n = esp::seal_in_place(&mut d, vxlan.len(), spi, seq, key, VTEP_PORT).expect("room");
    d.truncate(n);
    d
}

struct Node {
    tables: Tables,
    flows: ConnTable,
    esp: EspState,
    /// The peer's receiving side, to check what this node seals.
    peer: (Tables, EspState),
    /// The peer's sending key and next sequence number, for what it sends here.
    peer_key: SenderKey,
    peer_seq: u32,
    now_ms: u64,
    reply: Vec<u8>,
}

impl Node {
    fn cx(&self) -> Context<'_> {
        Context {
            tables: &self.tables,
            flows: &self.flows,
            now_ms: self.now_ms,
        }
    }

    /// What the I/O side does with a verdict, as far as it is pure.
    fn carry_out(&mut self, verdict: Verdict, frame: &[u8]) {
        match verdict {
            Verdict::Forward(p) => assert!(self.tables.ports.contains_key(&p)),
            Verdict::Reply(n) => assert!((14..=MAX_FRAME).contains(&n)),
            Verdict::ReplyRemote { vni, len, .. } => {
                assert!((14..=MAX_FRAME).contains(&len));
                let reply = self.reply[..len].to_vec();
                self.send(vni, &reply);
            }
            Verdict::Encap { vni, .. } => self.send(vni, frame),
            Verdict::Punt(Punt::GatewayDns { vni }) => {
                let net = &self.tables.networks[&vni];
                assert!(net.dns.is_some());
                let gw = net.gateway_ip.expect("gateway");
                assert!(datapath::answer::is_dns_query(gw, frame));
            }
            Verdict::Flood(_) | Verdict::Drop(_) => {}
        }
    }

    /// A frame for the peer on `vni`: sealed if the network is encrypted, and then it must
    /// open on the peer to the same VXLAN datagram.
    fn send(&mut self, vni: Vni, frame: &[u8]) {
        let Some(c) = self.tables.networks[&vni].crypto.as_ref() else {
            return;
        };
        let sa = c.tx.as_ref().expect("a sending key");
        let Ok(key) = self.esp.key(sa) else {
            return;
        };
        let Some(seq) = self.esp.next_seq(sa.spi) else {
            return;
        };
        let vxlan = vxlan_datagram(vni, frame);
        let mut d = seal(&vxlan, sa.spi, seq, key);
        let (t, st) = &mut self.peer;
        if let Ok((range, v)) = st.open(t, ME, &mut d, self.now_ms) {
            assert_eq!(v, vni.get());
            assert_eq!(&d[range], &vxlan[..]);
        }
    }

    /// A datagram from the underlay, as the worker takes it: ESP opened first, then VXLAN.
    fn underlay(&mut self, from: Ipv4Addr, mut d: Vec<u8>, csum: L4Csum) {
        let (range, sealed) = if esp::is_esp(&d) {
            match self.esp.open(&self.tables, from, &mut d, self.now_ms) {
                Ok((range, v)) => (range, Some(v)),
                Err(_) => return,
            }
        } else {
            (0..d.len(), None)
        };
        let d = &mut d[range];
        let Ok(p) = vxlan::Packet::new_checked(&*d) else {
            return;
        };
        let Ok(repr) = vxlan::Repr::parse(&p) else {
            return;
        };
        let encrypted = self
            .tables
            .networks
            .get(&repr.vni)
            .is_some_and(|n| n.crypto.is_some());
        match sealed {
            Some(v) if v != repr.vni.get() => return,
            None if encrypted => return,
            _ => {}
        }
        let mut frame = d[vxlan::HEADER_LEN..].to_vec();
        let mut reply = std::mem::take(&mut self.reply);
        let verdict = from_underlay(&self.cx(), repr.vni, from, &mut frame, csum, &mut reply);
        self.reply = reply;
        self.carry_out(verdict, &frame);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, mut rest)) = data.split_first() else {
        return;
    };
    let secret: Secret = Arc::new([7u8; esp::SECRET_LEN]);
    let worn = Arc::new(Mutex::new(Vec::new()));
    let mut node = Node {
        tables: tables(shape, &secret),
        flows: ConnTable::new(if shape & 0x80 != 0 { 2 } else { 64 }),
        esp: EspState::new(0, worn.clone(), true),
        peer: (peer_tables(&secret), EspState::new(0, worn, true)),
        peer_key: SenderKey::derive(&secret, PEER_NAME, lane_epoch(9, 0)),
        peer_seq: 0,
        now_ms: 1_000,
        reply: vec![0u8; MAX_FRAME],
    };
    while let [sel, a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        node.now_ms += [0, 700, 30_000, 600_000][usize::from(sel >> 6)];
        let csum = if sel & 0x20 != 0 {
            L4Csum::Partial
        } else {
            L4Csum::Complete
        };
        let which = (sel >> 2) & 0x7;
        match sel & 0x3 {
            0 => {
                let mut frame = bytes.to_vec();
                let mut reply = std::mem::take(&mut node.reply);
                let port = PortId(u32::from(which % 5));
                let verdict = from_port(&node.cx(), port, &mut frame, csum, &mut reply);
                node.reply = reply;
                node.carry_out(verdict, &frame);
            }
            1 => {
                let v = vni(PLAIN_OR_SEALED + u32::from(which % 3));
                let from = if which & 4 == 0 { PEER } else { ME };
                node.underlay(from, vxlan_datagram(v, bytes), csum);
            }
            2 => {
                let v = if which & 1 == 0 {
                    PLAIN_OR_SEALED
                } else {
                    SEALED
                };
                node.peer_seq = node.peer_seq.wrapping_add(1).max(1);
                // Bit 2: a replay of the sequence number before.
                let seq = node.peer_seq - u32::from(which & 4 != 0 && node.peer_seq > 1);
                let d = seal(
                    &vxlan_datagram(vni(v), bytes),
                    esp::spi(v, KEY_ID),
                    seq,
                    &node.peer_key,
                );
                node.underlay(PEER, d, csum);
            }
            _ => node.underlay(PEER, bytes.to_vec(), csum),
        }
        node.flows.sweep(node.now_ms, |_| true, |_| {});
    }
    node.flows.sweep(u64::MAX, |_| false, |_| {});
    assert!(node.flows.is_empty());
});
