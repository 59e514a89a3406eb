//! Encrypted networks in the datapath: which key seals this node's frames for a network,
//! and the receiving side's per-sender keys and replay windows. The sealing and opening
//! themselves are [`protocol::esp`]'s, done in place on the underlay's run buffers.
//!
//! Keys in [`Tables`] ([`crate::keys`]) are immutable and rebuilt by the agent when the keyring
//! changes; what moves per packet (sequence numbers, windows, derived keys of senders) lives
//! in [`EspState`], one per datapath worker, so no lock is taken per datagram.
//!
//! Every worker is a sender of its own: its key is derived with an epoch whose low byte is
//! its lane (the worker's index), so workers never share a (key, nonce) pair and each keeps
//! its own sequence numbers. A receiver keeps one window per (SPI, sender, lane), and the
//! underlay's steering (the router's `sys::steer`) brings every datagram of one lane to the
//! same worker, so each window sees all the datagrams it must judge.

use crate::keys::{Secret, TxSa};
use crate::table::Tables;
use crate::vocab::{DropReason, FastHash};
use protocol::esp::{self, Replay, ReplayWindow, SenderKey};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// A sender's key and window, as this node last saw them.
struct RxSa {
    secret: Secret,
    key: SenderKey,
    window: ReplayWindow,
}

/// A datapath worker's side: sequence numbers it sent, windows of what it received.
#[derive(Default)]
pub struct EspState {
    /// The worker's lane: which of a [`TxSa`]'s keys it seals with.
    pub lane: u8,
    seq: HashMap<u32, u64, FastHash>,
    /// By SPI, sender and the sender's lane.
    rx: HashMap<(u32, Ipv4Addr, u8), RxSa, FastHash>,
    /// SPIs whose sequence numbers passed [`esp::SEQ_REKEY`]: the agent asks the manager
    /// for a new key of their network, long before the numbers run out.
    pub worn: Arc<Mutex<Vec<u32>>>,
}

impl EspState {
    /// The state of the worker at `lane`; `worn` collects worn SPIs for the agent.
    pub fn new(lane: u8, worn: Arc<Mutex<Vec<u32>>>) -> EspState {
        EspState {
            lane,
            worn,
            ..EspState::default()
        }
    }

    /// The key this worker seals with under `sa` (None if the agent made fewer keys than
    /// there are workers, which it does not).
    pub fn key<'a>(&self, sa: &'a TxSa) -> Option<&'a SenderKey> {
        sa.keys.get(usize::from(self.lane))
    }

    /// The next sequence number under `spi`; None once the key is used up.
    pub fn next_seq(&mut self, spi: u32) -> Option<u32> {
        let s = self.seq.entry(spi).or_insert(0);
        if *s >= esp::SEQ_LIMIT {
            return None;
        }
        *s += 1;
        if *s == esp::SEQ_REKEY {
            if let Ok(mut w) = self.worn.lock() {
                w.push(spi);
            }
        }
        u32::try_from(*s).ok()
    }

    /// Checks and opens an ESP datagram from `from` in place; returns the VXLAN datagram's
    /// range and the VNI the SPI names.
    pub fn open(
        &mut self,
        t: &Tables,
        from: Ipv4Addr,
        d: &mut [u8],
    ) -> Result<(Range<usize>, u32), DropReason> {
        let h = esp::parse_header(d).map_err(|e| match e {
            esp::EspError::Auth => DropReason::EspAuthFailed,
            _ => DropReason::EspMalformed,
        })?;
        let (vni, key_id) = esp::parse_spi(h.spi);
        let secret = protocol::types::Vni::new(vni)
            .ok()
            .and_then(|v| t.networks.get(&v))
            .and_then(|n| n.crypto.as_ref())
            .and_then(|c| c.rx.get(&key_id))
            .ok_or(DropReason::EspUnknownKey)?;
        let sender = t.senders.get(&from).ok_or(DropReason::EspUnknownKey)?;
        let start = || RxSa {
            secret: secret.clone(),
            key: SenderKey::derive(secret, sender, h.epoch),
            window: ReplayWindow::default(),
        };
        let sa = self
            .rx
            .entry((h.spi, from, h.epoch as u8))
            .or_insert_with(start);
        if !Arc::ptr_eq(&sa.secret, secret) {
            // The key id names a new secret (a restarted manager): start over.
            *sa = start();
        }
        if sa.window.check(h.epoch, h.seq) == Replay::Replayed {
            return Err(DropReason::EspReplay);
        }
        let fresh_epoch;
        let key = if sa.key.epoch == h.epoch {
            fresh_epoch = None;
            &sa.key
        } else {
            // The sender restarted: its new key, kept only once a datagram opens with it.
            fresh_epoch = Some(SenderKey::derive(secret, sender, h.epoch));
            fresh_epoch.as_ref().unwrap_or(&sa.key)
        };
        let range = esp::open_in_place(d, &h, key).map_err(|e| match e {
            esp::EspError::Auth => DropReason::EspAuthFailed,
            _ => DropReason::EspMalformed,
        })?;
        if let Some(k) = fresh_epoch {
            sa.key = k;
        }
        sa.window.accept(h.epoch, h.seq);
        Ok((range, vni))
    }

    /// Forgets senders' state under keys that are gone.
    pub fn retain_live(&mut self, t: &Tables) {
        self.rx.retain(|(spi, _, _), _| {
            let (vni, key_id) = esp::parse_spi(*spi);
            protocol::types::Vni::new(vni)
                .ok()
                .and_then(|v| t.networks.get(&v))
                .and_then(|n| n.crypto.as_ref())
                .is_some_and(|c| c.rx.contains_key(&key_id))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{lane_epoch, NetCrypto};
    use crate::table::NetTable;
    use protocol::types::Vni;

    const VNI: u32 = 4097;

    fn tables(secret: &Secret) -> Tables {
        let mut t = Tables::default();
        let mut rx = HashMap::new();
        rx.insert(2u8, secret.clone());
        t.networks.insert(
            Vni::new(VNI).unwrap(),
            NetTable {
                crypto: Some(Arc::new(NetCrypto { tx: None, rx })),
                ..NetTable::default()
            },
        );
        t.senders.insert(Ipv4Addr::new(198, 18, 0, 1), "n1".into());
        t
    }

    fn sealed(secret: &Secret, epoch: u32, seq: u32) -> Vec<u8> {
        let key = SenderKey::derive(secret, "n1", epoch);
        let vxlan = [0x08u8, 0, 0, 0, 0, 0x10, 0x01, 0, 1, 2, 3, 4];
        let mut d = vec![0u8; esp::sealed_len(vxlan.len())];
        d[esp::HEADER_LEN + esp::INNER_UDP_LEN..][..vxlan.len()].copy_from_slice(&vxlan);
        esp::seal_in_place(&mut d, vxlan.len(), esp::spi(VNI, 2), seq, &key, 4789).unwrap();
        d
    }

    #[test]
    fn opens_once_per_sequence_number_and_follows_restarts() {
        let secret: Secret = Arc::new([5u8; esp::SECRET_LEN]);
        let t = tables(&secret);
        let n1 = Ipv4Addr::new(198, 18, 0, 1);
        let mut st = EspState::default();
        let (e7, e8) = (lane_epoch(7, 0), lane_epoch(8, 0));
        let d = sealed(&secret, e7, 1);
        let (r, vni) = st.open(&t, n1, &mut d.clone()).unwrap();
        assert_eq!((r.len(), vni), (12, VNI));
        assert_eq!(st.open(&t, n1, &mut d.clone()), Err(DropReason::EspReplay));
        // From an address outside the cluster: unknown.
        let other = Ipv4Addr::new(198, 18, 0, 9);
        assert_eq!(
            st.open(&t, other, &mut d.clone()),
            Err(DropReason::EspUnknownKey)
        );
        // Another worker of the same sender (lane 1) has its own key and numbers: its
        // sequence number 1 is new, and replayed once it was seen.
        let lane1 = sealed(&secret, lane_epoch(7, 1), 1);
        assert!(st.open(&t, n1, &mut lane1.clone()).is_ok());
        assert_eq!(
            st.open(&t, n1, &mut lane1.clone()),
            Err(DropReason::EspReplay)
        );
        // The sender restarted (epoch 8): its sequence numbers start over, accepted; the
        // old epoch is refused from then on.
        assert!(st.open(&t, n1, &mut sealed(&secret, e8, 1)).is_ok());
        assert_eq!(
            st.open(&t, n1, &mut sealed(&secret, e7, 2)),
            Err(DropReason::EspReplay)
        );
        // A forged epoch does not move the window: authentication fails first.
        let mut forged = sealed(&secret, e8, 2);
        forged[8..12].copy_from_slice(&lane_epoch(9, 0).to_be_bytes());
        assert_eq!(st.open(&t, n1, &mut forged), Err(DropReason::EspAuthFailed));
        assert!(st.open(&t, n1, &mut sealed(&secret, e8, 2)).is_ok());
        // A new secret under the same key id (a restarted manager) is followed.
        let fresh: Secret = Arc::new([6u8; esp::SECRET_LEN]);
        let t2 = tables(&fresh);
        assert!(st.open(&t2, n1, &mut sealed(&fresh, e8, 3)).is_ok());
        assert_eq!(
            st.open(&t2, n1, &mut sealed(&secret, e8, 4)),
            Err(DropReason::EspAuthFailed)
        );
    }

    #[test]
    fn sequence_numbers_stop_before_wrapping() {
        let mut st = EspState::default();
        st.seq.insert(1, esp::SEQ_LIMIT - 1);
        assert_eq!(st.next_seq(1), Some(u32::MAX));
        assert_eq!(st.next_seq(1), None);
        st.seq.insert(2, esp::SEQ_REKEY - 1);
        st.next_seq(2);
        assert_eq!(*st.worn.lock().unwrap(), vec![2]);
    }
}
