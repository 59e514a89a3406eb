//! Any body Docker (or anything that can reach the plugin's socket) POSTs to the network and
//! IPAM plugin: every call's decoder of [`protocol::docker`] on the same bytes, as the
//! router's handlers call them, never panics; then the pure work the plugin does on what
//! decoded: the pool id it hands out parses back to the same subnet, the gateway it would
//! give (the pool's first host), the first free address of a pool, the endpoint's key.
//!
//! Not reached from here: what the handlers do next (the cluster state, Docker's API for a
//! network's name, the TAP), in the router crate (see docs/FUZZING.md).
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::docker;
use protocol::state::Endpoint;
use std::collections::BTreeSet;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = docker::parse(data) {
        let _ = docker::generic_options(&v);
        let _ = docker::field(&v, "NetworkID");
    }
    if let Ok(asked) = docker::request_pool(data) {
        if let Some(pool) = asked {
            // The ids `RequestPool` answers with, as `RequestAddress` reads them back.
            assert_eq!(docker::pool_of(&pool.to_string()), Ok((pool, true)));
            assert_eq!(docker::pool_of(&format!("auto:{pool}")), Ok((pool, false)));
        }
    }
    if let Ok(a) = docker::request_address(data) {
        // The gateway of a pool no cluster network has yet, and the address `RequestAddress`
        // picks when none is asked for.
        let _ = a.pool.hosts().next().unwrap_or(a.pool.network());
        if a.address.is_none() && a.pool.prefix_len() >= 16 {
            let _ = protocol::ipam::next_address(&a.pool, &BTreeSet::new());
        }
    }
    if let Ok(n) = docker::create_network(data) {
        assert!(n.pool.prefix_len() <= 32);
    }
    if let Ok(e) = docker::create_endpoint(data) {
        let _ = Endpoint::key(&e.endpoint_id, "eth0");
    }
    if let Ok(j) = docker::join(data) {
        let _ = format!("/proc/1/root{}", j.sandbox_key);
    }
    let _ = docker::delete_network(data);
    let _ = docker::delete_endpoint(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = docker::pool_of(s);
    }
});
