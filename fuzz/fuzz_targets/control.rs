//! Any control-plane frame body from a peer: decoding never panics, and what decodes
//! re-encodes to something that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::control::{decode, encode, frame_len, ToManager, ToNode};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = frame_len([data[0], data[1], data[2], data[3]]);
    }
    if let Ok(m) = decode::<ToManager>(data) {
        let f = encode(&m).expect("re-encode");
        assert_eq!(decode::<ToManager>(&f[4..]).expect("decode again"), m);
    }
    if let Ok(m) = decode::<ToNode>(data) {
        let f = encode(&m).expect("re-encode");
        assert_eq!(decode::<ToNode>(&f[4..]).expect("decode again"), m);
    }
});
