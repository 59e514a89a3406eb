//! Any datagram on the VXLAN port: the header decoder must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::vxlan::{Packet, Repr};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::new_checked(data) {
        if let Ok(r) = Repr::parse(&p) {
            assert!(r.vni.get() > 0);
            assert!(p.payload().len() >= 14);
        }
    }
});
