//! Any ESP datagram on the VXLAN port: header parsing, opening under a key, and the replay
//! window must never panic, and nothing forged opens.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::esp::{open_in_place, parse_header, ReplayWindow, SenderKey, SECRET_LEN};

fuzz_target!(|data: &[u8]| {
    let key = SenderKey::derive(&[1u8; SECRET_LEN], "n1", 0);
    let mut d = data.to_vec();
    if let Ok(h) = parse_header(&d) {
        let mut w = ReplayWindow::default();
        let _ = w.check(h.epoch, h.seq);
        w.accept(h.epoch, h.seq);
        assert!(open_in_place(&mut d, &h, &key).is_err());
    }
});
