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
//!
//! Before a datagram's tag is checked, nothing is kept on its word, and the one costly step
//! (deriving the key of an epoch not seen yet) is rate-limited per sender ([`DERIVE_RATE`]).

use crate::bucket::{Bucket, Rate};
use crate::keys::{Secret, TxSa};
use crate::table::Tables;
use crate::vocab::{DropReason, FastHash};
use protocol::esp::{self, Replay, ReplayWindow, SenderKey};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// How many keys of epochs not seen yet a worker derives for one sender address: enough for
/// a sender that restarts with every lane and every encrypted network at once (one epoch per
/// lane and SPI, a few dozen), then a trickle. Each derivation costs an HKDF-SHA256 and an
/// AES-256 key schedule, 1.2 µs (`cargo bench --bench crypto esp_flood`), so a flood of
/// datagrams with forged epochs costs a worker at most `per_sec` of them a second per sender
/// address, whatever its rate. A sender's address must be a member's (`Tables::senders`) to
/// get that far, so there are as many buckets as the cluster has nodes.
pub const DERIVE_RATE: Rate = Rate {
    burst: 64,
    per_sec: 32,
};

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
    /// By SPI, sender and the sender's lane; only what a datagram that opened proved.
    rx: HashMap<(u32, Ipv4Addr, u8), RxSa, FastHash>,
    /// Derivations left to each sender address for epochs not seen yet.
    derivations: HashMap<Ipv4Addr, Bucket, FastHash>,
    /// This node could not keep its epoch on disk, so its keys may repeat an earlier run's:
    /// it seals nothing (`esp_no_epoch`) rather than risk reusing a nonce.
    no_epoch: bool,
    /// SPIs whose sequence numbers passed [`esp::SEQ_REKEY`]: the agent asks the manager
    /// for a new key of their network, long before the numbers run out.
    pub worn: Arc<Mutex<Vec<u32>>>,
}

impl EspState {
    /// The state of the worker at `lane`; `worn` collects worn SPIs for the agent.
    /// `epoch_kept`: whether the node's epoch for this run was kept on disk (if not, the
    /// worker seals nothing).
    pub fn new(lane: u8, worn: Arc<Mutex<Vec<u32>>>, epoch_kept: bool) -> EspState {
        EspState {
            lane,
            worn,
            no_epoch: !epoch_kept,
            ..EspState::default()
        }
    }

    /// The key this worker seals with under `sa`: none while the node has no kept epoch
    /// (`EspNoEpoch`), or if the agent made fewer keys than there are workers, which it does
    /// not (`EspNoKey`).
    pub fn key<'a>(&self, sa: &'a TxSa) -> Result<&'a SenderKey, DropReason> {
        if self.no_epoch {
            return Err(DropReason::EspNoEpoch);
        }
        sa.keys
            .get(usize::from(self.lane))
            .ok_or(DropReason::EspNoKey)
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

    /// Checks and opens an ESP datagram from `from` in place at `now_ms`; returns the VXLAN
    /// datagram's range and the VNI the SPI names.
    ///
    /// Nothing is kept on a datagram's word until its tag checks out: a new (SPI, sender,
    /// lane) and a new epoch of a known one are remembered only once a datagram opens under
    /// them. Deriving the key of an epoch not seen yet (an HKDF and an AES key schedule,
    /// before the tag can be checked) is limited per sender address by a token bucket
    /// ([`DERIVE_RATE`]); beyond it the datagram is dropped as `esp_rate_limited`.
    pub fn open(
        &mut self,
        t: &Tables,
        from: Ipv4Addr,
        d: &mut [u8],
        now_ms: u64,
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
        let slot = (h.spi, from, h.epoch as u8);
        // What this worker holds for the slot, unless the key id names a new secret since
        // (a restarted manager): then it starts over, as if never seen.
        let known = self
            .rx
            .get_mut(&slot)
            .filter(|sa| Arc::ptr_eq(&sa.secret, secret));
        if let Some(sa) = &known {
            if sa.window.check(h.epoch, h.seq) == Replay::Replayed {
                return Err(DropReason::EspReplay);
            }
        }
        // The key to open with: the one held, or (rate-limited) the one of an epoch not seen.
        let fresh = match &known {
            Some(sa) if sa.key.epoch == h.epoch => None,
            _ => {
                let bucket = self
                    .derivations
                    .entry(from)
                    .or_insert_with(|| Bucket::full(DERIVE_RATE, now_ms));
                if !bucket.take(DERIVE_RATE, now_ms) {
                    return Err(DropReason::EspRateLimited);
                }
                Some(SenderKey::derive(secret, sender, h.epoch))
            }
        };
        let key = fresh
            .as_ref()
            .or(known.as_deref().map(|sa| &sa.key))
            .ok_or(DropReason::EspUnknownKey)?;
        let range = esp::open_in_place(d, &h, key).map_err(|e| match e {
            esp::EspError::Auth => DropReason::EspAuthFailed,
            _ => DropReason::EspMalformed,
        })?;
        // Authenticated: from here on the datagram's epoch and number are taken at its word.
        match (known, fresh) {
            (Some(sa), fresh) => {
                if let Some(k) = fresh {
                    // The sender restarted: its new key.
                    sa.key = k;
                }
                sa.window.accept(h.epoch, h.seq);
            }
            (None, Some(key)) => {
                let mut window = ReplayWindow::default();
                window.accept(h.epoch, h.seq);
                let sa = RxSa {
                    secret: secret.clone(),
                    key,
                    window,
                };
                self.rx.insert(slot, sa);
            }
            (None, None) => {}
        }
        Ok((range, vni))
    }

    /// Forgets senders' state under keys that are gone, and of senders that left.
    pub fn retain_live(&mut self, t: &Tables) {
        self.rx.retain(|(spi, from, _), _| {
            let (vni, key_id) = esp::parse_spi(*spi);
            t.senders.contains_key(from)
                && protocol::types::Vni::new(vni)
                    .ok()
                    .and_then(|v| t.networks.get(&v))
                    .and_then(|n| n.crypto.as_ref())
                    .is_some_and(|c| c.rx.contains_key(&key_id))
        });
        self.derivations
            .retain(|from, _| t.senders.contains_key(from));
    }

    /// How many (SPI, sender, lane) keys and windows this worker holds.
    pub fn senders_held(&self) -> usize {
        self.rx.len()
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
        let (r, vni) = st.open(&t, n1, &mut d.clone(), 0).unwrap();
        assert_eq!((r.len(), vni), (12, VNI));
        assert_eq!(
            st.open(&t, n1, &mut d.clone(), 0),
            Err(DropReason::EspReplay)
        );
        // From an address outside the cluster: unknown.
        let other = Ipv4Addr::new(198, 18, 0, 9);
        assert_eq!(
            st.open(&t, other, &mut d.clone(), 0),
            Err(DropReason::EspUnknownKey)
        );
        // Another worker of the same sender (lane 1) has its own key and numbers: its
        // sequence number 1 is new, and replayed once it was seen.
        let lane1 = sealed(&secret, lane_epoch(7, 1), 1);
        assert!(st.open(&t, n1, &mut lane1.clone(), 0).is_ok());
        assert_eq!(
            st.open(&t, n1, &mut lane1.clone(), 0),
            Err(DropReason::EspReplay)
        );
        // The sender restarted (epoch 8): its sequence numbers start over, accepted; the
        // old epoch is refused from then on.
        assert!(st.open(&t, n1, &mut sealed(&secret, e8, 1), 0).is_ok());
        assert_eq!(
            st.open(&t, n1, &mut sealed(&secret, e7, 2), 0),
            Err(DropReason::EspReplay)
        );
        // A forged epoch does not move the window: authentication fails first.
        let mut forged = sealed(&secret, e8, 2);
        forged[8..12].copy_from_slice(&lane_epoch(9, 0).to_be_bytes());
        assert_eq!(
            st.open(&t, n1, &mut forged, 0),
            Err(DropReason::EspAuthFailed)
        );
        assert!(st.open(&t, n1, &mut sealed(&secret, e8, 2), 0).is_ok());
        // A new secret under the same key id (a restarted manager) is followed.
        let fresh: Secret = Arc::new([6u8; esp::SECRET_LEN]);
        let t2 = tables(&fresh);
        assert!(st.open(&t2, n1, &mut sealed(&fresh, e8, 3), 0).is_ok());
        assert_eq!(
            st.open(&t2, n1, &mut sealed(&secret, e8, 4), 0),
            Err(DropReason::EspAuthFailed)
        );
    }

    /// Datagrams from `n1` under SPI (VNI, 2) whose epochs (so lanes) are random and whose
    /// tags are forged: what someone who can send from a member's address can do.
    fn forged(secret: &Secret, count: usize) -> Vec<Vec<u8>> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let template = sealed(secret, lane_epoch(7, 0), 1);
        (0..count)
            .map(|_| {
                // xorshift64: reproducible, no dependency.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut d = template.clone();
                let seq = ((x >> 32) as u32 | 1).to_be_bytes();
                // The header's sequence number and the IV's (which must repeat it).
                d[4..8].copy_from_slice(&seq);
                d[12..16].copy_from_slice(&seq);
                d[8..12].copy_from_slice(&(x as u32).to_be_bytes());
                d
            })
            .collect()
    }

    #[test]
    fn a_flood_of_forged_epochs_costs_at_most_the_bucket() {
        let secret: Secret = Arc::new([5u8; esp::SECRET_LEN]);
        let t = tables(&secret);
        let n1 = Ipv4Addr::new(198, 18, 0, 1);
        let mut st = EspState::default();
        // A genuine sender, seen before the flood: its key is held, no derivation needed.
        let e7 = lane_epoch(7, 0);
        assert!(st.open(&t, n1, &mut sealed(&secret, e7, 1), 0).is_ok());
        let held = st.senders_held();
        // 100 000 forged datagrams within one second (time passed in, 10 µs apart).
        let n = 100_000;
        let (mut limited, mut derived) = (0u32, 0u32);
        for (i, mut d) in forged(&secret, n).into_iter().enumerate() {
            let now_ms = 1_000 + (i as u64 * 1_000) / n as u64;
            match st.open(&t, n1, &mut d, now_ms) {
                Err(DropReason::EspRateLimited) => limited += 1,
                // Every other one was derived for and then failed its tag (or was an older
                // epoch of the held lane: refused before any derivation).
                Err(DropReason::EspAuthFailed) => derived += 1,
                Err(DropReason::EspReplay) => {}
                other => panic!("a forged datagram got {other:?}"),
            }
        }
        // The burst, plus one second of refill, at most.
        let bound = DERIVE_RATE.burst + DERIVE_RATE.per_sec;
        assert!(derived <= bound, "{derived} derivations > {bound}");
        assert!(limited as usize >= n - bound as usize - 1_000);
        // Nothing kept on a forged word: no new keys or windows, one bucket.
        assert_eq!(st.senders_held(), held);
        assert_eq!(st.derivations.len(), 1);
        // The genuine sender's datagrams under its held key go on during the flood.
        assert!(st.open(&t, n1, &mut sealed(&secret, e7, 2), 1_999).is_ok());
        // Its restart (a new epoch) waits for the bucket: refused in the flood's second,
        // accepted once a token came back.
        let e8 = lane_epoch(8, 0);
        assert_eq!(
            st.open(&t, n1, &mut sealed(&secret, e8, 1), 1_999),
            Err(DropReason::EspRateLimited)
        );
        assert!(st.open(&t, n1, &mut sealed(&secret, e8, 1), 2_100).is_ok());
    }

    #[test]
    fn state_is_kept_only_for_members_and_live_keys() {
        let secret: Secret = Arc::new([5u8; esp::SECRET_LEN]);
        let mut t = tables(&secret);
        let n1 = Ipv4Addr::new(198, 18, 0, 1);
        let mut st = EspState::default();
        assert!(st
            .open(&t, n1, &mut sealed(&secret, lane_epoch(7, 0), 1), 0)
            .is_ok());
        assert!(st
            .open(&t, n1, &mut sealed(&secret, lane_epoch(7, 1), 1), 0)
            .is_ok());
        assert_eq!((st.senders_held(), st.derivations.len()), (2, 1));
        // A forged datagram for a lane never seen: derived for, refused, not kept.
        let mut f = sealed(&secret, lane_epoch(7, 2), 1);
        f[8..12].copy_from_slice(&lane_epoch(7, 3).to_be_bytes());
        assert_eq!(st.open(&t, n1, &mut f, 0), Err(DropReason::EspAuthFailed));
        assert_eq!(st.senders_held(), 2);
        st.retain_live(&t);
        assert_eq!(st.senders_held(), 2);
        // The sender left the cluster: its keys, windows and bucket go.
        t.senders.clear();
        st.retain_live(&t);
        assert_eq!((st.senders_held(), st.derivations.len()), (0, 0));
    }

    #[test]
    fn without_a_kept_epoch_nothing_is_sealed() {
        let key = SenderKey::derive(&[5u8; esp::SECRET_LEN], "n1", 0);
        let sa = TxSa {
            spi: esp::spi(VNI, 2),
            keys: vec![key],
        };
        let worn = Arc::new(Mutex::new(Vec::new()));
        let kept = EspState::new(0, worn.clone(), true);
        assert!(kept.key(&sa).is_ok());
        let lost = EspState::new(0, worn.clone(), false);
        assert_eq!(lost.key(&sa).err(), Some(DropReason::EspNoEpoch));
        // A lane the agent made no key for is the other refusal.
        let lane1 = EspState::new(1, worn, true);
        assert_eq!(lane1.key(&sa).err(), Some(DropReason::EspNoKey));
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
