//! Any frame from a task's TAP or from the underlay: the switching decision never panics.
//! The first byte picks the port or VNI, the rest is the frame.
#![no_main]
use datapath::conntrack::ConnTable;
use datapath::nat::L4Csum;
use datapath::switch::{from_port, from_underlay, Context, MAX_FRAME};
use datapath::table::Tables;
use datapath::vocab::{PortBinding, PortId};
use libfuzzer_sys::fuzz_target;
use protocol::types::{MacAddr, Vni};
use std::net::Ipv4Addr;

fn tables() -> Tables {
    let vni = Vni::new(4097).expect("vni");
    let mut t = Tables::default();
    for i in 0..3u32 {
        let ip = Ipv4Addr::from(0x0a00_0002 + i);
        t.add_port(
            PortId(i + 1),
            PortBinding {
                vni,
                mac: MacAddr::from_ipv4(ip),
                ip,
            },
        );
    }
    let remote = Ipv4Addr::new(10, 0, 0, 9);
    t.add_remote(
        vni,
        MacAddr::from_ipv4(remote),
        Some(remote),
        "198.18.0.3:4789".parse().expect("addr"),
    );
    t.set_gateway(vni, Ipv4Addr::new(10, 0, 0, 1));
    t
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let (t, flows) = (tables(), ConnTable::new(16));
    let cx = Context {
        tables: &t,
        flows: &flows,
        now_ms: 0,
    };
    let mut reply = vec![0u8; MAX_FRAME];
    let csum = if sel & 0x40 == 0 {
        L4Csum::Complete
    } else {
        L4Csum::Partial
    };
    let _ = from_port(
        &cx,
        PortId(u32::from(sel % 5)),
        &mut frame.to_vec(),
        csum,
        &mut reply,
    );
    let vni = Vni::new(4096 + u32::from(sel % 3)).expect("vni");
    let from = if sel & 0x80 == 0 {
        Ipv4Addr::new(198, 18, 0, 3)
    } else {
        Ipv4Addr::new(198, 18, 0, 66)
    };
    let _ = from_underlay(
        &cx,
        vni,
        from,
        &mut frame.to_vec(),
        L4Csum::Complete,
        &mut reply,
    );
});
