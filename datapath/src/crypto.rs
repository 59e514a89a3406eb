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
//!
//! What a worker keeps is bounded. Receiving state goes with its key and its sender: when the
//! tables change (a key retired, a node gone), [`EspState::retain_live`] forgets what they no
//! longer name, and the map never holds more than [`RX_MAX`] entries (the least recently used
//! one makes room, counted as `esp_evicted`). Sending sequence numbers are kept for the whole
//! run on purpose (see [`EspState::next_seq`]): there are at most 128 per network.

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

/// Most (SPI, sender, lane) entries a worker keeps: a sender's derived key and replay window
/// each, 624 bytes (ring's AES-256-GCM key schedule and GHASH table), 5 MiB per worker when
/// full (7 168 is what a hash table of 8 192 buckets holds). A cluster needs one per live key
/// (two during a rotation), per other node and per lane of that node the steering brings to
/// this worker: 100 nodes of 16 workers with 4 encrypted networks mid-rotation is
/// 100 × 16 × 8 = 12 800 in all, 6 400 per worker of a two-worker node. Beyond that only a
/// member sealing under lanes and keys it does not use (it holds the secret: nothing else
/// gets an entry) makes more, and the least recently used entry is evicted for the new one
/// (`esp_evicted`). An evicted sender's next datagram derives its key again (rate-limited)
/// and starts a new window, which would accept a replay of that sender's earlier datagrams
/// once; so the bound sits above a large cluster's need, where an eviction only ever takes a
/// lane that fell silent.
pub const RX_MAX: usize = 7_168;

/// A sender's key and window, as this node last saw them.
struct RxSa {
    secret: Secret,
    key: SenderKey,
    window: ReplayWindow,
    /// When a datagram last opened under it: the least recent is evicted first.
    last_ms: u64,
}

/// A datapath worker's side: sequence numbers it sent, windows of what it received.
pub struct EspState {
    /// The worker's lane: which of a [`TxSa`]'s keys it seals with.
    pub lane: u8,
    seq: HashMap<u32, u64, FastHash>,
    /// By SPI, sender and the sender's lane; only what a datagram that opened proved.
    rx: HashMap<(u32, Ipv4Addr, u8), RxSa, FastHash>,
    /// Most entries `rx` holds ([`RX_MAX`]; smaller in tests).
    rx_cap: usize,
    /// Entries of `rx` evicted to stay within `rx_cap`, since the start.
    evicted: u64,
    /// Datagrams given a sequence number to be sealed, and datagrams opened, since the
    /// start.
    sealed: u64,
    opened: u64,
    /// Derivations left to each sender address for epochs not seen yet.
    derivations: HashMap<Ipv4Addr, Bucket, FastHash>,
    /// This node could not keep its epoch on disk, so its keys may repeat an earlier run's:
    /// it seals nothing (`esp_no_epoch`) rather than risk reusing a nonce.
    no_epoch: bool,
    /// SPIs whose sequence numbers passed [`esp::SEQ_REKEY`]: the agent asks the manager
    /// for a new key of their network, long before the numbers run out.
    pub worn: Arc<Mutex<Vec<u32>>>,
}

impl Default for EspState {
    fn default() -> Self {
        EspState {
            lane: 0,
            seq: HashMap::default(),
            rx: HashMap::default(),
            rx_cap: RX_MAX,
            evicted: 0,
            sealed: 0,
            opened: 0,
            derivations: HashMap::default(),
            no_epoch: false,
            worn: Arc::default(),
        }
    }
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
    ///
    /// These numbers are never forgotten during a run, not even when their key is retired:
    /// a key's nonces are its epoch and these numbers, and a key seen retired may come back
    /// (a manager that takes over from an older snapshot of the keyring, a network that
    /// leaves this node's tables and returns), and starting its numbers at 1 again would
    /// reuse a nonce. They stay bounded all the same: one per SPI, and an SPI is a network's
    /// VNI with one of 128 key ids (`esp::MAX_KEY_ID`), so 16 bytes × 128 per network at
    /// most, and VNIs of removed networks are reused.
    pub fn next_seq(&mut self, spi: u32) -> Option<u32> {
        let s = self.seq.entry(spi).or_insert(0);
        if *s >= esp::SEQ_LIMIT {
            return None;
        }
        *s += 1;
        self.sealed += 1;
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
    /// ([`DERIVE_RATE`]); beyond it the datagram is dropped as `esp_rate_limited`. A new
    /// entry beyond [`RX_MAX`] takes the place of the least recently used one.
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
                sa.last_ms = now_ms;
            }
            (None, Some(key)) => {
                let mut window = ReplayWindow::default();
                window.accept(h.epoch, h.seq);
                let sa = RxSa {
                    secret: secret.clone(),
                    key,
                    window,
                    last_ms: now_ms,
                };
                if self.rx.len() >= self.rx_cap && !self.rx.contains_key(&slot) {
                    self.evict_oldest();
                }
                self.rx.insert(slot, sa);
            }
            (None, None) => {}
        }
        self.opened += 1;
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

    /// Forgets the least recently used entry. A scan of at most [`RX_MAX`] entries, done only
    /// when a new entry is due and the map is full: a new entry needs a datagram that opened
    /// under a freshly derived key, which [`DERIVE_RATE`] limits per sender.
    fn evict_oldest(&mut self) {
        let oldest = self
            .rx
            .iter()
            .min_by_key(|(_, sa)| sa.last_ms)
            .map(|(slot, _)| *slot);
        if let Some(slot) = oldest {
            self.rx.remove(&slot);
            self.evicted += 1;
        }
    }

    /// How many (SPI, sender, lane) keys and windows this worker holds.
    pub fn senders_held(&self) -> usize {
        self.rx.len()
    }

    /// How many of those were evicted to stay within [`RX_MAX`] since the start; the worker
    /// adds them to the node's counters (`esp_evicted`).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Datagrams this worker sealed (given a sequence number) and opened since the start;
    /// the worker adds them to the node's counters.
    pub fn sealed_opened(&self) -> (u64, u64) {
        (self.sealed, self.opened)
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

    /// `secret` under key id `id`, sealed by `sender` (its key derived with its name).
    fn sealed_by(secret: &Secret, id: u8, sender: &str, epoch: u32, seq: u32) -> Vec<u8> {
        let key = SenderKey::derive(secret, sender, epoch);
        let vxlan = [0x08u8, 0, 0, 0, 0, 0x10, 0x01, 0, 1, 2, 3, 4];
        let mut d = vec![0u8; esp::sealed_len(vxlan.len())];
        d[esp::HEADER_LEN + esp::INNER_UDP_LEN..][..vxlan.len()].copy_from_slice(&vxlan);
        esp::seal_in_place(&mut d, vxlan.len(), esp::spi(VNI, id), seq, &key, 4789).unwrap();
        d
    }

    /// The network's live keys are `keys`; the cluster's members are `senders`.
    fn tables_with(keys: &[(u8, &Secret)], senders: &[(Ipv4Addr, String)]) -> Tables {
        let mut t = Tables::default();
        let rx = keys.iter().map(|(id, s)| (*id, (*s).clone())).collect();
        t.networks.insert(
            Vni::new(VNI).unwrap(),
            NetTable {
                crypto: Some(Arc::new(NetCrypto { tx: None, rx })),
                ..NetTable::default()
            },
        );
        t.senders.extend(senders.iter().cloned());
        t
    }

    #[test]
    fn retired_keys_take_their_receiving_state_with_them() {
        let (old, new): (Secret, Secret) = (Arc::new([5u8; 32]), Arc::new([6u8; 32]));
        let n1 = Ipv4Addr::new(198, 18, 0, 1);
        let members = [(n1, "n1".to_string())];
        let mut st = EspState::default();
        // Mid-rotation: both keys live, n1 sending under each from two lanes.
        let both = tables_with(&[(2, &old), (3, &new)], &members);
        for (id, secret) in [(2, &old), (3, &new)] {
            for lane in 0..2 {
                let mut d = sealed_by(secret, id, "n1", lane_epoch(7, lane), 1);
                assert!(st.open(&both, n1, &mut d, 0).is_ok());
            }
        }
        assert_eq!(st.senders_held(), 4);
        // Key 2 retired (the keyring's next tables): its windows and keys go.
        let after = tables_with(&[(3, &new)], &members);
        st.retain_live(&after);
        assert_eq!(st.senders_held(), 2);
        assert!(st.rx.keys().all(|(spi, _, _)| esp::parse_spi(*spi).1 == 3));
        // A datagram under the retired key is refused and keeps nothing.
        let mut d = sealed_by(&old, 2, "n1", lane_epoch(7, 0), 2);
        assert_eq!(
            st.open(&after, n1, &mut d, 0),
            Err(DropReason::EspUnknownKey)
        );
        assert_eq!(st.senders_held(), 2);
        // The last key retired too (the network left the node's tables): nothing is left.
        st.retain_live(&tables_with(&[], &members));
        assert_eq!(st.senders_held(), 0);
    }

    #[test]
    fn sending_numbers_outlive_their_key() {
        // A key retired and then seen again (a manager taking over from an older keyring)
        // must go on from its last number: starting at 1 again would reuse nonces.
        let mut st = EspState::default();
        let spi = esp::spi(VNI, 2);
        assert_eq!((st.next_seq(spi), st.next_seq(spi)), (Some(1), Some(2)));
        st.retain_live(&Tables::default());
        assert_eq!(st.next_seq(spi), Some(3));
    }

    #[test]
    fn a_flood_of_senders_stays_under_the_cap_and_keeps_the_active_one() {
        let secret: Secret = Arc::new([5u8; esp::SECRET_LEN]);
        // 200 members, each sending one genuine datagram, one a millisecond; n0 keeps
        // talking throughout.
        let members: Vec<(Ipv4Addr, String)> = (0..200u16)
            .map(|i| {
                (
                    Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8),
                    format!("n{i}"),
                )
            })
            .collect();
        let t = tables_with(&[(2, &secret)], &members);
        let mut st = EspState {
            rx_cap: 32,
            ..EspState::default()
        };
        let e = lane_epoch(7, 0);
        let (n0, name0) = &members[0];
        for (i, (addr, name)) in members.iter().enumerate() {
            let now = i as u64 + 1;
            let mut d = sealed_by(&secret, 2, name, e, 1);
            assert!(st.open(&t, *addr, &mut d, now).is_ok(), "{name}");
            let mut d0 = sealed_by(&secret, 2, name0, e, now as u32 + 1);
            assert!(st.open(&t, *n0, &mut d0, now).is_ok(), "n0 at {now}");
            assert!(st.senders_held() <= 32);
        }
        assert_eq!(st.senders_held(), 32);
        assert_eq!(st.evicted(), 200 - 32);
        // The held ones are n0 and the 31 most recent; the oldest went first.
        let mut held: Vec<Ipv4Addr> = st.rx.keys().map(|(_, from, _)| *from).collect();
        held.sort();
        let mut want: Vec<Ipv4Addr> = std::iter::once(*n0)
            .chain(members[200 - 31..].iter().map(|(a, _)| *a))
            .collect();
        want.sort();
        assert_eq!(held, want);
        // n0's window was kept: its numbers are still judged (a replay is refused).
        let mut again = sealed_by(&secret, 2, name0, e, 2);
        assert_eq!(
            st.open(&t, *n0, &mut again, 300),
            Err(DropReason::EspReplay)
        );
    }

    #[test]
    fn the_cap_is_a_few_mib() {
        // What RX_MAX's doc says an entry costs, with the map's own overhead.
        let entry = std::mem::size_of::<((u32, Ipv4Addr, u8), RxSa)>();
        assert!(entry <= 640, "{entry} bytes an entry");
        // hashbrown keeps 7/8 of its buckets full at most, and a control byte per bucket.
        let buckets = (RX_MAX * 8 / 7).next_power_of_two();
        assert_eq!(buckets, 8192, "RX_MAX fills its table");
        assert!(buckets * (entry + 1) <= 6 << 20);
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
