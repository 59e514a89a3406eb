//! Any input a runtime gives `overlay-cni`: `CNI_COMMAND` and the network configuration on
//! stdin, through [`protocol::cni`] as the binary calls it (decode, check, the network it
//! names), never panics; errors print as the spec's JSON; a configuration that decodes gives
//! a result (for a fixed endpoint) in its own version that is JSON again.
//!
//! The input is `CNI_COMMAND` up to the first NUL byte, then stdin; without a NUL, all of it
//! is stdin. The plugin reads no other CNI_* value but as an opaque string (CNI_ARGS not at
//! all), so there is nothing more to parse. Not reached: the API calls and the wait for the
//! interface in the container's namespace (see docs/FUZZING.md).
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::api::EndpointInfo;
use protocol::cni::{self, Command, NetConf};

fn endpoint() -> EndpointInfo {
    EndpointInfo {
        container: "c0ffee".into(),
        ifname: "eth0".into(),
        netns: "/var/run/netns/c0ffee".into(),
        node: "n1".into(),
        network: "appnet".into(),
        runtime: "cni".into(),
        address: "10.0.9.2/24".into(),
        gateway: "10.0.9.1".into(),
        mac: "02:42:0a:00:09:02".into(),
        mtu: 1450,
        dns: "127.0.0.11".into(),
    }
}

fuzz_target!(|data: &[u8]| {
    let (command, stdin) = match data.iter().position(|&b| b == 0) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    if let Some(Ok(c)) = command.map(std::str::from_utf8) {
        match Command::parse(c) {
            Ok(Command::Version) => {
                let _ = cni::version_info().to_string();
            }
            Ok(_) => {}
            Err(e) => {
                let _ = e.to_json("1.0.0").to_string();
            }
        }
    }
    // The binary reads stdin to a String: bytes that are not UTF-8 stop there.
    let Ok(input) = std::str::from_utf8(stdin) else {
        return;
    };
    let conf = match NetConf::decode(input) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_json("1.0.0").to_string();
            return;
        }
    };
    assert!(cni::SUPPORTED.contains(&conf.cni_version.as_str()));
    if let Err(e) = conf.check() {
        let _ = e.to_json(&conf.cni_version).to_string();
        return;
    }
    let _ = conf.network();
    let out = cni::result(&conf.cni_version, &endpoint()).to_string();
    let back: serde_json::Value = serde_json::from_str(&out).expect("the result is JSON");
    assert_eq!(back["cniVersion"].as_str(), Some(conf.cni_version.as_str()));
});
