//! Any body a client sends the node API: each request type of [`protocol::api`] through
//! serde_json, as the API's JSON extractor reads it (bytes, not necessarily UTF-8), never
//! panics; what parses serialises and parses back to the same value; the strings the
//! manager parses further (`publish_rm` entries, and `--publish` as the CLI reads it) never
//! panic either.
//!
//! The Docker network plugin's JSON and the CNI plugin's stdin have targets of their own
//! (`docker_plugin`, `cni`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::api::{
    parse_publish, parse_publish_rm, EndpointCreate, NetworkCreate, NodeUpdate, ServiceCreate,
    ServiceScale, ServiceUpdate, VtepAdd,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

/// Parses `data` as a `T`; if it parses, its JSON parses back to an equal value.
fn round_trip<T: DeserializeOwned + Serialize + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(data).ok()?;
    let json = serde_json::to_vec(&v).expect("a parsed body serialises");
    let again: T = serde_json::from_slice(&json).expect("its JSON parses back");
    assert_eq!(again, v);
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    let _ = round_trip::<NetworkCreate>(data);
    let _ = round_trip::<ServiceCreate>(data);
    if let Some(u) = round_trip::<ServiceUpdate>(data) {
        for s in &u.publish_rm {
            let _ = parse_publish_rm(s);
        }
    }
    let _ = round_trip::<EndpointCreate>(data);
    let _ = round_trip::<NodeUpdate>(data);
    let _ = round_trip::<VtepAdd>(data);
    // ServiceScale has no PartialEq: parse and serialise only.
    if let Ok(s) = serde_json::from_slice::<ServiceScale>(data) {
        let _ = serde_json::to_vec(&s);
    }
    // The CLI's --publish and --publish-rm, and a publish_rm entry, from any text.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_publish(s);
        let _ = parse_publish_rm(s);
    }
});
