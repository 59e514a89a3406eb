//! Any virtio-net header and frame from a TAP, and any frames from the underlay: checksum
//! completion, TSO/USO segmentation (whole segments, or headers with the payload left in
//! place) and GRO merging never panic, every segment stays within a wire frame, and a
//! merged run only names bytes of the frames it was given.
#![no_main]
use datapath::gro::{Coalescer, Push};
use datapath::vnet::{complete_checksum, Segments, VnetHdr, HDR_LEN};
use datapath::vocab::PortId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(h) = VnetHdr::from_slice(data) else {
        return;
    };
    let mut frame = data[HDR_LEN..].to_vec();
    let _ = complete_checksum(&mut frame, &h);
    if let Ok(segs) = Segments::new(&frame, &h, 1600) {
        let mut out = vec![0u8; 1600];
        for k in 0..segs.count() {
            let len = segs.len(k);
            assert!(len <= 1600);
            segs.write(k, &mut out[..len]);
            let p = segs.payload(k);
            assert!(p.end <= frame.len() && segs.head_len() + p.len() == len);
            segs.write_head(k, &mut out[..segs.head_len()]);
        }
    }
    let chunks: Vec<&[u8]> = data.chunks(97).collect();
    let mut g = Coalescer::default();
    let udp = data.first().is_some_and(|b| b & 1 == 1);
    let check = |g: &mut Coalescer| {
        if let Some(run) = g.take() {
            for (b, r) in run.parts {
                assert!(*b < chunks.len() && r.end <= chunks[*b].len());
            }
        }
    };
    for (i, chunk) in chunks.iter().enumerate() {
        if g.push(PortId(1), chunk, (i, 0), false, udp) == Push::Refused {
            check(&mut g);
            let _ = g.push(PortId(1), chunk, (i, 0), false, udp);
        }
    }
    check(&mut g);
});
