//! The VXLAN header (RFC 7348 §5), in the smoltcp style: a zero-copy [`Packet`] view whose
//! constructor checks the length once, and a plain [`Repr`] with `parse` and `emit`.
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//! The inner Ethernet frame follows the 8-byte header.

use crate::types::Vni;

/// Well-known UDP destination port of VXLAN (IANA).
pub const UDP_PORT: u16 = 4789;
/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// Bytes VXLAN adds in front of an inner frame on an IPv4 underlay:
/// outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) = 50, which is why overlay
/// interfaces have MTU 1450 on a 1500-byte underlay.
pub const OVERHEAD_IPV4: usize = 50;

mod field {
    use core::ops::Range;
    pub const FLAGS: usize = 0;
    pub const RESERVED1: Range<usize> = 1..4;
    pub const VNI: Range<usize> = 4..7;
    pub const RESERVED2: usize = 7;
    pub const PAYLOAD: usize = 8;
}

/// The "I" flag: the VNI field is valid.
const FLAG_I: u8 = 0x08;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("VXLAN datagram shorter than its 8-byte header")]
    Truncated,
    #[error("VXLAN header without the I flag")]
    NoVniFlag,
    #[error("VXLAN header carries VNI 0")]
    ZeroVni,
    #[error("VXLAN payload shorter than an Ethernet header")]
    NoInnerFrame,
}

/// A read/write view of a VXLAN datagram (header + inner frame).
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors may panic on a short buffer.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking that it holds at least a header.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    pub fn vni_raw(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VNI];
        u32::from_be_bytes([0, b[0], b[1], b[2]])
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// The inner Ethernet frame, writable (the load balancer translates it in place).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }

    pub fn set_flags(&mut self, v: u8) {
        self.buffer.as_mut()[field::FLAGS] = v;
    }

    pub fn set_vni_raw(&mut self, v: u32) {
        let b = v.to_be_bytes();
        self.buffer.as_mut()[field::VNI].copy_from_slice(&b[1..4]);
    }

    pub fn clear_reserved(&mut self) {
        let buf = self.buffer.as_mut();
        buf[field::RESERVED1].fill(0);
        buf[field::RESERVED2] = 0;
    }
}

/// The meaning of a VXLAN header: which network the inner frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub vni: Vni,
}

impl Repr {
    /// Parses and validates a header. Reserved bits are ignored on receipt, as RFC 7348 asks.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, Error> {
        if packet.flags() & FLAG_I == 0 {
            return Err(Error::NoVniFlag);
        }
        let vni = Vni::new(packet.vni_raw()).map_err(|_| Error::ZeroVni)?;
        if packet.payload().len() < 14 {
            return Err(Error::NoInnerFrame);
        }
        Ok(Repr { vni })
    }

    /// Writes the header into the first 8 bytes of `packet`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_flags(FLAG_I);
        packet.clear_reserved();
        packet.set_vni_raw(self.vni.get());
    }

    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A VXLAN header for VNI 4097 followed by the first bytes of an inner frame, as the Linux
    // kernel's vxlan device emits it (captured with tcpdump -XX on the underlay).
    const KERNEL_VNI_4097: [u8; 22] = [
        0x08, 0x00, 0x00, 0x00, 0x00, 0x10, 0x01, 0x00, // VXLAN: I flag, VNI 0x001001
        0x02, 0x42, 0x0a, 0x00, 0x02, 0x03, // inner dst MAC
        0x02, 0x42, 0x0a, 0x00, 0x02, 0x02, // inner src MAC
        0x08, 0x00, // IPv4
    ];

    #[test]
    fn parses_kernel_header() {
        let p = Packet::new_checked(&KERNEL_VNI_4097[..]).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.vni.get(), 4097);
        assert_eq!(&p.payload()[..6], &[0x02, 0x42, 0x0a, 0x00, 0x02, 0x03]);
    }

    #[test]
    fn emits_kernel_header() {
        let mut buf = [0xffu8; 22];
        buf[8..].copy_from_slice(&KERNEL_VNI_4097[8..]);
        let mut p = Packet::new_unchecked(&mut buf[..]);
        Repr {
            vni: Vni::new(4097).unwrap(),
        }
        .emit(&mut p);
        assert_eq!(buf, KERNEL_VNI_4097);
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(
            Packet::new_checked(&[0u8; 7][..]).unwrap_err(),
            Error::Truncated
        );
        let mut no_flag = KERNEL_VNI_4097;
        no_flag[0] = 0;
        let p = Packet::new_checked(&no_flag[..]).unwrap();
        assert_eq!(Repr::parse(&p), Err(Error::NoVniFlag));
        let mut zero = KERNEL_VNI_4097;
        zero[4..7].fill(0);
        assert_eq!(
            Repr::parse(&Packet::new_checked(&zero[..]).unwrap()),
            Err(Error::ZeroVni)
        );
        assert_eq!(
            Repr::parse(&Packet::new_checked(&KERNEL_VNI_4097[..12]).unwrap()),
            Err(Error::NoInnerFrame)
        );
    }

    proptest! {
        #[test]
        fn parse_emit_roundtrip(vni in 1u32..=Vni::MAX, junk in any::<[u8; 8]>()) {
            let mut buf = [0u8; 8 + 14];
            buf[..8].copy_from_slice(&junk);
            let repr = Repr { vni: Vni::new(vni).unwrap() };
            repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&buf[..]).unwrap()), Ok(repr));
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = Repr::parse(&p);
            }
        }
    }
}
