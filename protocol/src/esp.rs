//! The envelope of encrypted networks: ESP (RFC 4303) with AES-256-GCM (RFC 4106), carried
//! in UDP (RFC 3948) on the VXLAN port, in transport mode over the VXLAN datagram it
//! protects. Pure: bytes and keys in, bytes out; the datapath calls it in place on its run
//! buffers.
//!
//! ```text
//! outer IPv4 | UDP (to port 4789)
//!   | SPI (4) | sequence (4) | IV (8) = epoch (4) ‖ sequence (4)
//!   | AES-GCM ciphertext of: UDP header (8, to 4789) | VXLAN (8) | Ethernet frame
//!   |                        | padding (0-3) | pad length (1) | next header 17 (1)
//!   | ICV (16)
//! ```
//!
//! - SPI: `0x80 | key id` in the top byte, the network's VNI below. Its top bit tells an
//!   ESP datagram from a VXLAN one (whose first byte is 0x08) on the same port.
//! - Keys: the manager makes one 256-bit secret per network and key id. Every sender
//!   derives its own key and salt from it with HKDF-SHA256 (info: `overlay-esp-v1`, the
//!   sender's node name, its epoch), so nodes that share the network's secret never share a
//!   (key, nonce) pair. The epoch is a counter each node persists and raises at every start:
//!   a restarted node's sequence numbers start again at 1 under a new key.
//! - Nonce (RFC 4106): salt (4) ‖ IV (8). AAD: SPI ‖ sequence. A sender stops before its
//!   32-bit sequence number would wrap (the manager rotates the key long before).
//! - A receiver keeps a 64-packet sliding window per (SPI, sender) (RFC 4303 3.4.3) and
//!   only moves it after the ICV checked out.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;

/// Bytes before the ciphertext: SPI, sequence number, IV.
pub const HEADER_LEN: usize = 16;
/// The inner UDP header that makes the payload a UDP datagram (next header 17), as a
/// capture tool expects after ESP in transport mode.
pub const INNER_UDP_LEN: usize = 8;
/// The integrity check value (GCM tag).
pub const ICV_LEN: usize = 16;
/// Pad length and next header.
const TRAILER_LEN: usize = 2;
/// Most bytes ESP adds to a VXLAN datagram (with 3 bytes of padding).
pub const MAX_OVERHEAD: usize = HEADER_LEN + INNER_UDP_LEN + 3 + TRAILER_LEN + ICV_LEN;
/// IP protocol number of UDP, the payload's next header.
const NEXT_UDP: u8 = 17;
/// Length of a network's shared secret.
pub const SECRET_LEN: usize = 32;
const SALT_LEN: usize = 4;
/// Largest key id (7 bits of the SPI).
pub const MAX_KEY_ID: u8 = 0x7f;
/// Sequence numbers a sender may use under one key (it stops before wrapping).
pub const SEQ_LIMIT: u64 = u32::MAX as u64;
/// Past this many packets under one key, a sender asks for a new one.
pub const SEQ_REKEY: u64 = 1 << 31;
/// Packets the replay window covers behind the highest sequence number seen.
pub const WINDOW: u64 = 64;

/// The SPI of network `vni` under key `key_id`.
pub fn spi(vni: u32, key_id: u8) -> u32 {
    0x8000_0000 | (u32::from(key_id & MAX_KEY_ID) << 24) | (vni & 0x00ff_ffff)
}

/// Whether a datagram on the VXLAN port is ESP (the top bit of its first byte).
pub fn is_esp(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0x80 != 0)
}

/// The VNI and key id an SPI names.
pub fn parse_spi(spi: u32) -> (u32, u8) {
    (spi & 0x00ff_ffff, ((spi >> 24) & 0x7f) as u8)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EspError {
    #[error("datagram too short for ESP")]
    Short,
    #[error("integrity check failed")]
    Auth,
    #[error("padding or next header malformed")]
    Trailer,
    #[error("the buffer has no room for the sealed datagram")]
    NoRoom,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// One sender's key under one network key: what it seals with, and what receivers open its
/// datagrams with.
pub struct SenderKey {
    key: LessSafeKey,
    salt: [u8; SALT_LEN],
    pub epoch: u32,
}

impl std::fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl SenderKey {
    /// Derives `node`'s key for `epoch` from a network secret.
    pub fn derive(secret: &[u8; SECRET_LEN], node: &str, epoch: u32) -> SenderKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"overlay").extract(secret);
        let epoch_bytes = epoch.to_be_bytes();
        let info: [&[u8]; 4] = [b"overlay-esp-v1", node.as_bytes(), b"\0", &epoch_bytes];
        let mut okm = [0u8; SECRET_LEN + SALT_LEN];
        prk.expand(&info, Len(okm.len()))
            .and_then(|o| o.fill(&mut okm))
            .expect("HKDF-SHA256 yields 36 bytes");
        let unbound = UnboundKey::new(&AES_256_GCM, &okm[..SECRET_LEN]).expect("a 256-bit AES key");
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&okm[SECRET_LEN..]);
        SenderKey {
            key: LessSafeKey::new(unbound),
            salt,
            epoch,
        }
    }

    fn nonce(&self, seq: u32) -> Nonce {
        let mut n = [0u8; aead::NONCE_LEN];
        n[..4].copy_from_slice(&self.salt);
        n[4..8].copy_from_slice(&self.epoch.to_be_bytes());
        n[8..].copy_from_slice(&seq.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }
}

/// The length of the sealed datagram carrying a `vxlan_len`-byte VXLAN datagram.
pub fn sealed_len(vxlan_len: usize) -> usize {
    let body = INNER_UDP_LEN + vxlan_len + TRAILER_LEN;
    HEADER_LEN + body.next_multiple_of(4) + ICV_LEN
}

/// Seals in place. On entry `buf[HEADER_LEN + INNER_UDP_LEN..][..vxlan_len]` holds the VXLAN
/// datagram (header and frame) and `buf` is at least [`sealed_len`] long; on return
/// `buf[..sealed_len(vxlan_len)]` is the ESP datagram. `seq` must be new for this key.
pub fn seal_in_place(
    buf: &mut [u8],
    vxlan_len: usize,
    spi: u32,
    seq: u32,
    key: &SenderKey,
    vxlan_port: u16,
) -> Result<usize, EspError> {
    let total = sealed_len(vxlan_len);
    if buf.len() < total {
        return Err(EspError::NoRoom);
    }
    let body_end = total - ICV_LEN;
    buf[..4].copy_from_slice(&spi.to_be_bytes());
    buf[4..8].copy_from_slice(&seq.to_be_bytes());
    buf[8..12].copy_from_slice(&key.epoch.to_be_bytes());
    buf[12..16].copy_from_slice(&seq.to_be_bytes());
    // The inner UDP header: to and from the VXLAN port, no checksum (IPv4 allows it; the
    // ICV covers every byte).
    let udp_len = (INNER_UDP_LEN + vxlan_len) as u16;
    let u = HEADER_LEN;
    buf[u..u + 2].copy_from_slice(&vxlan_port.to_be_bytes());
    buf[u + 2..u + 4].copy_from_slice(&vxlan_port.to_be_bytes());
    buf[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
    buf[u + 6..u + 8].copy_from_slice(&[0, 0]);
    // Padding 1, 2, 3... (RFC 4303 2.4), pad length, next header.
    let pad_start = HEADER_LEN + INNER_UDP_LEN + vxlan_len;
    let pad = body_end - TRAILER_LEN - pad_start;
    for (i, b) in buf[pad_start..pad_start + pad].iter_mut().enumerate() {
        *b = i as u8 + 1;
    }
    buf[body_end - 2] = pad as u8;
    buf[body_end - 1] = NEXT_UDP;
    let mut aad = [0u8; 8];
    aad.copy_from_slice(&buf[..8]);
    let tag = key
        .key
        .seal_in_place_separate_tag(
            key.nonce(seq),
            Aad::from(aad),
            &mut buf[HEADER_LEN..body_end],
        )
        .map_err(|_| EspError::NoRoom)?;
    buf[body_end..total].copy_from_slice(tag.as_ref());
    Ok(total)
}

/// What the header of an ESP datagram says, before any key is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub spi: u32,
    pub seq: u32,
    pub epoch: u32,
}

pub fn parse_header(d: &[u8]) -> Result<Header, EspError> {
    if d.len() < HEADER_LEN + INNER_UDP_LEN + TRAILER_LEN + ICV_LEN {
        return Err(EspError::Short);
    }
    let word = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
    if word(4) != word(12) {
        // The IV's sequence half must repeat the header's: anything else is not ours.
        return Err(EspError::Auth);
    }
    Ok(Header {
        spi: word(0),
        seq: word(4),
        epoch: word(8),
    })
}

/// Opens in place; returns the range of `d` holding the VXLAN datagram.
pub fn open_in_place(
    d: &mut [u8],
    h: &Header,
    key: &SenderKey,
) -> Result<std::ops::Range<usize>, EspError> {
    if key.epoch != h.epoch {
        return Err(EspError::Auth);
    }
    let mut aad = [0u8; 8];
    aad.copy_from_slice(&d[..8]);
    let plain_len = key
        .key
        .open_in_place(key.nonce(h.seq), Aad::from(aad), &mut d[HEADER_LEN..])
        .map_err(|_| EspError::Auth)?
        .len();
    let end = HEADER_LEN + plain_len;
    if plain_len < INNER_UDP_LEN + TRAILER_LEN || d[end - 1] != NEXT_UDP {
        return Err(EspError::Trailer);
    }
    let pad = usize::from(d[end - 2]);
    let vxlan_end = end
        .checked_sub(TRAILER_LEN + pad)
        .filter(|e| *e >= HEADER_LEN + INNER_UDP_LEN)
        .ok_or(EspError::Trailer)?;
    Ok(HEADER_LEN + INNER_UDP_LEN..vxlan_end)
}

/// RFC 4303's sliding window for one sender under one key: the highest sequence number
/// seen, and which of the [`WINDOW`] below it arrived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    pub epoch: u32,
    top: u64,
    seen: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// New: may be delivered once its ICV checked out.
    Fresh,
    /// Seen before, or too old to tell.
    Replayed,
}

impl ReplayWindow {
    /// Whether `seq` of `epoch` may be new. Cheap; call before opening.
    pub fn check(&self, epoch: u32, seq: u32) -> Replay {
        let seq = u64::from(seq);
        if epoch < self.epoch || seq == 0 {
            return Replay::Replayed;
        }
        if epoch > self.epoch || seq > self.top {
            return Replay::Fresh;
        }
        let behind = self.top - seq;
        if behind >= WINDOW || self.seen & (1 << behind) != 0 {
            Replay::Replayed
        } else {
            Replay::Fresh
        }
    }

    /// Records an authenticated `seq` (after [`ReplayWindow::check`] said fresh). A newer
    /// epoch (the sender restarted) starts a new window.
    pub fn accept(&mut self, epoch: u32, seq: u32) {
        let seq = u64::from(seq);
        if epoch > self.epoch {
            *self = ReplayWindow {
                epoch,
                top: seq,
                seen: 1,
            };
            return;
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            } | 1;
            self.top = seq;
        } else {
            self.seen |= 1 << (self.top - seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PORT: u16 = 4789;

    fn key(node: &str, epoch: u32) -> SenderKey {
        SenderKey::derive(&[7u8; SECRET_LEN], node, epoch)
    }

    fn sealed(vxlan: &[u8], seq: u32, k: &SenderKey) -> Vec<u8> {
        let mut buf = vec![0u8; sealed_len(vxlan.len())];
        buf[HEADER_LEN + INNER_UDP_LEN..][..vxlan.len()].copy_from_slice(vxlan);
        let n = seal_in_place(&mut buf, vxlan.len(), spi(4097, 1), seq, k, PORT).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    #[test]
    fn seal_then_open_gives_the_datagram_back() {
        let k = key("n1", 3);
        for len in [16, 17, 18, 19, 64, 1464 + 8] {
            let vxlan: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut d = sealed(&vxlan, 9, &k);
            assert_eq!(d.len() % 4, 0);
            assert!(d.len() - vxlan.len() <= MAX_OVERHEAD);
            // The clear text is nowhere in the datagram.
            assert!(!d.windows(16).any(|w| w == &vxlan[..16]));
            let h = parse_header(&d).unwrap();
            assert_eq!((h.spi, h.seq, h.epoch), (spi(4097, 1), 9, 3));
            let r = open_in_place(&mut d, &h, &k).unwrap();
            assert_eq!(&d[r], &vxlan[..]);
        }
    }

    #[test]
    fn spi_is_never_taken_for_vxlan() {
        let s = spi(0x00ab_cdef, 0x7f);
        assert_eq!(parse_spi(s), (0x00ab_cdef, 0x7f));
        assert!(is_esp(&s.to_be_bytes()));
        assert!(!is_esp(&[0x08, 0, 0, 0]));
    }

    #[test]
    fn other_senders_epochs_and_secrets_cannot_open() {
        let vxlan = [1u8; 100];
        let d = sealed(&vxlan, 1, &key("n1", 1));
        let h = parse_header(&d).unwrap();
        for wrong in [key("n2", 1), SenderKey::derive(&[8u8; SECRET_LEN], "n1", 1)] {
            let mut c = d.clone();
            assert_eq!(open_in_place(&mut c, &h, &wrong), Err(EspError::Auth));
        }
        let mut c = d.clone();
        assert_eq!(
            open_in_place(&mut c, &h, &key("n1", 2)),
            Err(EspError::Auth)
        );
    }

    #[test]
    fn window_takes_each_number_once() {
        let mut w = ReplayWindow::default();
        for seq in [1, 3, 2, 70, 10, 69] {
            assert_eq!(w.check(0, seq), Replay::Fresh, "{seq}");
            w.accept(0, seq);
            assert_eq!(w.check(0, seq), Replay::Replayed, "{seq} again");
        }
        // 5 is more than 64 behind 70: too old to tell, refused.
        assert_eq!(w.check(0, 5), Replay::Replayed);
        assert_eq!(w.check(0, 0), Replay::Replayed);
        // A restarted sender (new epoch) starts over; its old epoch is refused.
        assert_eq!(w.check(1, 1), Replay::Fresh);
        w.accept(1, 1);
        assert_eq!(w.check(0, 71), Replay::Replayed);
    }

    proptest! {
        #[test]
        fn any_flipped_bit_is_refused(len in 16usize..400, bit in 0usize..8 * 460, seq in 1u32..) {
            let vxlan: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let k = key("n1", 5);
            let mut d = sealed(&vxlan, seq, &k);
            let bit = bit % (d.len() * 8);
            d[bit / 8] ^= 1 << (bit % 8);
            let opened = parse_header(&d).and_then(|h| open_in_place(&mut d, &h, &k).map(|_| ()));
            prop_assert!(opened.is_err());
        }

        #[test]
        fn garbage_never_panics(mut d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let k = key("n1", 0);
            if let Ok(h) = parse_header(&d) {
                let _ = open_in_place(&mut d, &h, &k);
            }
        }
    }
}
