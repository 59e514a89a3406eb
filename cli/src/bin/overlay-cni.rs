//! `overlay-cni`: a CNI plugin (spec 1.0, and the 0.3/0.4 result shape) that puts a
//! container on an overlayd network. The runtime runs it with the CNI environment variables
//! and the network configuration on stdin; it asks the node's overlayd over its API for an
//! endpoint (`POST /endpoints`), waits until overlayd has made and configured the interface
//! in the container's namespace (its address and default route in place), and prints the
//! result. DEL and CHECK go through the same API.
//!
//! Configuration (a conflist entry; see docs/CNI.md):
//!
//! ```json
//! { "cniVersion": "1.0.0", "name": "appnet", "type": "overlay-cni",
//!   "network": "appnet", "socket": "/run/overlay/n1.sock" }
//! ```
//!
//! `network` defaults to `name`; `socket` to the only socket in /run/overlay. Errors are the
//! spec's: a JSON object with `code`, `msg` and `details` on stdout, and exit status 1.

#[path = "../client.rs"]
#[allow(dead_code)]
mod client;

use client::Client;
use hyper::{Method, StatusCode};
use protocol::api::EndpointInfo;
use protocol::cni::{code, fail, CniError, Command, NetConf};
use serde_json::Value;
use std::io::Read;
use std::time::{Duration, Instant};

/// How long ADD waits for overlayd to make the interface.
const READY_WITHIN: Duration = Duration::from_secs(15);

fn env(name: &str) -> Result<String, CniError> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(fail(
            code::INVALID_ENV,
            format!("{name} is not set"),
            "the runtime must set CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME",
        )),
    }
}

fn main() {
    let version = std::cell::RefCell::new(String::from("1.0.0"));
    let outcome = run(&version);
    match outcome {
        Ok(Some(v)) => println!("{v}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", e.to_json(&version.borrow()));
            std::process::exit(1);
        }
    }
}

fn run(version: &std::cell::RefCell<String>) -> Result<Option<Value>, CniError> {
    let command = Command::parse(&env("CNI_COMMAND")?)?;
    if command == Command::Version {
        return Ok(Some(protocol::cni::version_info()));
    }
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).map_err(|e| {
        fail(
            code::IO_FAILURE,
            "cannot read the network configuration",
            e.to_string(),
        )
    })?;
    let conf = NetConf::decode(&input)?;
    // From here on, errors are in the configuration's version.
    *version.borrow_mut() = conf.cni_version.clone();
    conf.check()?;
    let socket = match &conf.socket {
        Some(s) => s.clone(),
        None => client::default_socket(std::path::Path::new("/run/overlay"))
            .map_err(|e| fail(code::INVALID_CONFIG, "no overlayd socket", e.to_string()))?,
    };
    let network = conf.network().to_string();
    let container = env("CNI_CONTAINERID")?;
    let ifname = env("CNI_IFNAME")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(code::IO_FAILURE, "cannot start", e.to_string()))?;
    let api = Client::new(socket);
    let path = format!("/endpoints/{container}/{ifname}");
    match command {
        Command::Add => {
            let netns = env("CNI_NETNS")?;
            let body = serde_json::json!({
                "container": container, "ifname": ifname, "netns": netns,
                "network": network, "runtime": "cni",
            });
            let info: EndpointInfo = rt
                .block_on(call(&api, Method::POST, "/endpoints", Some(body)))
                .map_err(|mut e| {
                    // Not found, for an ADD: the configuration names a network there is not.
                    if e.code == code::UNKNOWN_CONTAINER {
                        e.code = code::INVALID_CONFIG;
                    }
                    e
                })?;
            wait_for_interface(&netns, &ifname, &info)?;
            Ok(Some(protocol::cni::result(&conf.cni_version, &info)))
        }
        Command::Del => {
            // Idempotent: an endpoint that is not there (any more) is success.
            match rt.block_on(api.call_status(Method::DELETE, &path, None)) {
                Ok((s, _)) if s.is_success() || s == StatusCode::NOT_FOUND => Ok(None),
                Ok((s, body)) => Err(api_error(s, &body)),
                Err(e) => Err(fail(
                    code::TRY_AGAIN_LATER,
                    "cannot reach overlayd",
                    format!("{e:#}"),
                )),
            }
        }
        Command::Check => {
            let netns = env("CNI_NETNS")?;
            let info: EndpointInfo = rt.block_on(call(&api, Method::GET, &path, None))?;
            if info.network != network || info.netns != netns {
                return Err(fail(
                    code::UNKNOWN_CONTAINER,
                    format!(
                        "container {container} has {ifname} on {} in {}",
                        info.network, info.netns
                    ),
                    format!("expected network {network} in {netns}"),
                ));
            }
            if !interface_ready(&netns, &ifname, &info, Ready::Exists)? {
                return Err(fail(
                    code::UNKNOWN_CONTAINER,
                    format!("interface {ifname} is missing in {netns}"),
                    "overlayd makes it again within a few seconds if the namespace exists",
                ));
            }
            Ok(None)
        }
        Command::Version => Ok(Some(protocol::cni::version_info())),
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> CniError {
    let msg = serde_json::from_slice::<protocol::api::ErrorBody>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| format!("overlayd answered {status}"));
    let code = match status.as_u16() {
        404 => code::UNKNOWN_CONTAINER,
        400 | 409 => code::INVALID_CONFIG,
        503 => code::TRY_AGAIN_LATER,
        _ => code::IO_FAILURE,
    };
    fail(code, msg, format!("overlayd answered {status}"))
}

async fn call<T: serde::de::DeserializeOwned>(
    api: &Client,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<T, CniError> {
    let (status, bytes) = api.call_status(method, path, body).await.map_err(|e| {
        fail(
            code::TRY_AGAIN_LATER,
            "cannot reach overlayd",
            format!("{e:#}"),
        )
    })?;
    if !status.is_success() {
        return Err(api_error(status, &bytes));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        fail(
            code::DECODE_FAILURE,
            "cannot decode overlayd's answer",
            e.to_string(),
        )
    })
}

/// What ADD waits for in the container's namespace: the interface, and once overlayd has
/// configured it, its address and the default route through it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ready {
    Exists,
    Configured,
}

/// Whether `ifname` is there in the namespace at `netns` (looked up from a thread that
/// entered it, so nothing else of this process moves): only present, or also configured
/// with `info`'s address (and default route, when the network has a gateway).
fn interface_ready(
    netns: &str,
    ifname: &str,
    info: &EndpointInfo,
    want: Ready,
) -> Result<bool, CniError> {
    let ns = std::fs::File::open(netns).map_err(|e| {
        fail(
            code::UNKNOWN_CONTAINER,
            format!("cannot open namespace {netns}"),
            e.to_string(),
        )
    })?;
    let name = ifname.to_string();
    let address: Option<std::net::Ipv4Addr> =
        info.address.split('/').next().and_then(|a| a.parse().ok());
    let routed = !info.gateway.is_empty();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            fail(
                code::IO_FAILURE,
                "cannot enter the namespace",
                e.to_string(),
            )
        })?;
        if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
            return Ok(false);
        }
        if want == Ready::Exists {
            return Ok(true);
        }
        // overlayd sets the link up, then the address, then the route: the last one seen
        // means the interface is ready for the container.
        let has_address = nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
            addrs.any(|a| {
                a.interface_name == name
                    && a.address
                        .as_ref()
                        .and_then(|s| s.as_sockaddr_in())
                        .map(|s| s.ip())
                        == address
            })
        });
        // This thread's namespace (`/proc/self/net` would be the process's).
        let has_route = !routed
            || std::fs::read_to_string("/proc/thread-self/net/route").is_ok_and(|t| {
                t.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 2 && f[0] == name && f[1] == "00000000"
                })
            });
        Ok(has_address && has_route)
    })
    .join()
    .unwrap_or_else(|_| Err(fail(code::IO_FAILURE, "namespace thread failed", "")))
}

/// Waits until overlayd has made and configured the interface: a runtime starts the
/// container's process once ADD returns, and it must find its address there.
fn wait_for_interface(netns: &str, ifname: &str, info: &EndpointInfo) -> Result<(), CniError> {
    let end = Instant::now() + READY_WITHIN;
    while Instant::now() < end {
        if interface_ready(netns, ifname, info, Ready::Configured)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(fail(
        code::TRY_AGAIN_LATER,
        format!("overlayd did not make {ifname} in {netns} within {READY_WITHIN:?}"),
        "see overlayd's log",
    ))
}
