//! What the CNI plugin `overlay-cni` reads and writes (CNI spec 1.0, and the 0.3/0.4 result
//! shape): the network configuration a runtime gives on stdin, the `CNI_COMMAND` it sets,
//! the spec's errors, and the result printed after ADD. Pure: the binary
//! (`cli/src/bin/overlay-cni.rs`) reads stdin and the environment, talks to overlayd and
//! waits for the interface; everything it decodes comes through here, so the fuzz target
//! `cni` reaches all of it.

use crate::api::EndpointInfo;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;

/// The spec versions the plugin speaks.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The spec's well-known error codes (CNI 1.0, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
}

/// An error as the spec has the plugin print it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

pub fn fail(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

impl CniError {
    /// The error's JSON, for a configuration of spec `version`.
    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        match s {
            "ADD" => Ok(Command::Add),
            "DEL" => Ok(Command::Del),
            "CHECK" => Ok(Command::Check),
            "VERSION" => Ok(Command::Version),
            other => Err(fail(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?}"),
                "ADD, DEL, CHECK or VERSION",
            )),
        }
    }
}

/// The answer to `VERSION`.
pub fn version_info() -> Value {
    json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED })
}

/// The network configuration (a conflist entry; see docs/CNI.md). Other keys the runtime
/// adds (`prevResult`, `runtimeConfig`, `args`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// The overlayd network; `name` when absent.
    pub network: Option<String>,
    /// overlayd's API socket; the only one in /run/overlay when absent.
    pub socket: Option<PathBuf>,
}

impl NetConf {
    /// Decodes the configuration on stdin, of a supported version.
    pub fn decode(input: &str) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_str(input).map_err(|e| {
            fail(
                code::DECODE_FAILURE,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED.contains(&conf.cni_version.as_str()) {
            return Err(fail(
                code::INCOMPATIBLE_VERSION,
                format!("CNI version {} is not supported", conf.cni_version),
                format!("supported: {}", SUPPORTED.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// What a decoded configuration must hold: a name.
    pub fn check(&self) -> Result<(), CniError> {
        if self.name.is_empty() {
            return Err(fail(
                code::INVALID_CONFIG,
                "the configuration has no name",
                "",
            ));
        }
        Ok(())
    }

    /// The overlayd network this configuration puts containers on.
    pub fn network(&self) -> &str {
        self.network.as_deref().unwrap_or(&self.name)
    }
}

/// The spec's result: the interface in the sandbox, its address, the default route and the
/// resolver. Versions before 1.0 also name the IP version.
pub fn result(version: &str, i: &EndpointInfo) -> Value {
    let mut ip = json!({ "address": i.address, "gateway": i.gateway, "interface": 0 });
    if version.starts_with("0.") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [{ "name": i.ifname, "mac": i.mac, "sandbox": i.netns }],
        "ips": [ip],
        "routes": [{ "dst": "0.0.0.0/0", "gw": i.gateway }],
        "dns": { "nameservers": [i.dns] },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflist_entry_decodes() {
        // As containerd and cnitool pass it: the runtime adds keys of its own.
        let c = NetConf::decode(
            r#"{"cniVersion":"1.0.0","name":"appnet","type":"overlay-cni",
                "socket":"/run/overlay/n1.sock","runtimeConfig":{},"args":{"cni":{}}}"#,
        )
        .unwrap();
        assert_eq!(c.network(), "appnet");
        assert_eq!(c.socket, Some(PathBuf::from("/run/overlay/n1.sock")));
        let c = NetConf::decode(r#"{"cniVersion":"0.4.0","name":"x","network":"y"}"#).unwrap();
        assert_eq!(c.network(), "y");
    }

    #[test]
    fn bad_configurations_get_the_specs_codes() {
        let code_of = |s: &str| match NetConf::decode(s) {
            Ok(c) => c.check().unwrap_err().code,
            Err(e) => e.code,
        };
        assert_eq!(code_of("{"), code::DECODE_FAILURE);
        assert_eq!(code_of(r#"{"name":"x"}"#), code::DECODE_FAILURE);
        assert_eq!(
            code_of(r#"{"cniVersion":"0.2.0","name":"x"}"#),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":""}"#),
            code::INVALID_CONFIG
        );
        assert_eq!(Command::parse("ADD").unwrap(), Command::Add);
        assert_eq!(Command::parse("add").unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn results_before_1_0_name_the_ip_version() {
        let i = EndpointInfo {
            container: "c".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/c".into(),
            node: "n1".into(),
            network: "appnet".into(),
            runtime: "cni".into(),
            address: "10.0.9.2/24".into(),
            gateway: "10.0.9.1".into(),
            mac: "02:42:0a:00:09:02".into(),
            mtu: 1450,
            dns: "127.0.0.11".into(),
        };
        assert_eq!(result("0.4.0", &i)["ips"][0]["version"], "4");
        assert!(result("1.0.0", &i)["ips"][0].get("version").is_none());
        assert_eq!(result("1.0.0", &i)["interfaces"][0]["name"], "eth0");
    }
}
