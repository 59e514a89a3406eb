//! Any virtio-net header and frame from a TAP, and any frames from the underlay: checksum
//! completion, TSO segmentation and GRO merging never panic, and every segment stays within
//! a wire frame.
#![no_main]
use libfuzzer_sys::fuzz_target;
use router::datapath::gro::Coalescer;
use router::datapath::table::PortId;
use router::datapath::vnet::{complete_checksum, segment_tcp4, VnetHdr, HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(h) = VnetHdr::from_slice(data) else {
        return;
    };
    let mut frame = data[HDR_LEN..].to_vec();
    let _ = complete_checksum(&mut frame, &h);
    let mut scratch = vec![0u8; 1600];
    let _ = segment_tcp4(&frame, &h, &mut scratch, |s| assert!(s.len() <= 1600));
    let mut g = Coalescer::default();
    for chunk in data.chunks(97) {
        if g.push(PortId(1), chunk, false) == router::datapath::gro::Push::Refused {
            let _ = g.take();
            let _ = g.push(PortId(1), chunk, false);
        }
    }
    let _ = g.take();
});
