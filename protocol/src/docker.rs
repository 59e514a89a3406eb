//! The requests of Docker's network and IPAM plugin protocol (libnetwork's remote driver:
//! JSON bodies POSTed to `/NetworkDriver.*` and `/IpamDriver.*`), decoded into what the
//! plugin acts on. Pure: bytes in, values out. The router's `docker` module serves the calls
//! and does the work (cluster state, Docker's API, interfaces); everything it reads from a
//! body comes through here, so the fuzz target `docker_plugin` reaches all of it.
//!
//! Docker sends more fields than these (`Options`, `IPv6Data`, ...); unknown ones are
//! ignored, as libnetwork's own drivers do.

use ipnet::Ipv4Net;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Docker's option key for a network's `-o` options.
pub const GENERIC: &str = "com.docker.network.generic";
/// `RequestAddress`'s option that asks for the network's gateway.
const GATEWAY_ASK: &str = "com.docker.network.gateway";

/// A request the plugin cannot act on, said the way Docker shows it to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

/// A body as JSON; an empty body (Docker sends none to some calls) is `null`.
pub fn parse(body: &[u8]) -> Result<Value, RequestError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| RequestError(format!("invalid request: {e}")))
}

/// The string field `key` of a request.
pub fn field<'a>(v: &'a Value, key: &str) -> Result<&'a str, RequestError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| RequestError(format!("request without {key}")))
}

/// The `-o` options of a `CreateNetwork`, as strings (a number or a bool as its JSON).
pub fn generic_options(req: &Value) -> BTreeMap<String, String> {
    req.pointer(&format!("/Options/{}", GENERIC.replace('/', "~1")))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The subnet a pool id names, and whether the user chose it (`--subnet`): the plugin's own
/// choices are `auto:SUBNET`.
pub fn pool_of(id: &str) -> Result<(Ipv4Net, bool), RequestError> {
    let (explicit, s) = match id.strip_prefix("auto:") {
        Some(s) => (false, s),
        None => (true, id),
    };
    let net = s
        .parse()
        .map_err(|_| RequestError(format!("unknown pool {id:?}")))?;
    Ok((net, explicit))
}

/// `IpamDriver.RequestPool`: the subnet given with `--subnet`, or `None` for the plugin to
/// pick one. IPv6 pools are refused.
pub fn request_pool(body: &[u8]) -> Result<Option<Ipv4Net>, RequestError> {
    let req = parse(body)?;
    if req.get("V6").and_then(Value::as_bool) == Some(true) {
        return Err(RequestError("overlayd networks are IPv4 only".into()));
    }
    let asked = req.get("Pool").and_then(Value::as_str).unwrap_or("");
    if asked.is_empty() {
        return Ok(None);
    }
    asked
        .parse()
        .map(Some)
        .map_err(|_| RequestError(format!("invalid subnet {asked:?}")))
}

/// `IpamDriver.RequestAddress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRequest {
    /// The pool's subnet, and whether the user chose it (see [`pool_of`]).
    pub pool: Ipv4Net,
    pub explicit: bool,
    /// Docker asks for the network's gateway (at `docker network create`).
    pub gateway: bool,
    /// The address asked for (`--ip`), if any.
    pub address: Option<Ipv4Addr>,
}

pub fn request_address(body: &[u8]) -> Result<AddressRequest, RequestError> {
    let req = parse(body)?;
    let (pool, explicit) = pool_of(field(&req, "PoolID")?)?;
    let gateway = req
        .pointer("/Options/RequestAddressType")
        .and_then(Value::as_str)
        == Some(GATEWAY_ASK);
    let asked = req.get("Address").and_then(Value::as_str).unwrap_or("");
    let address = if asked.is_empty() {
        None
    } else {
        Some(
            asked
                .parse()
                .map_err(|_| RequestError(format!("invalid address {asked:?}")))?,
        )
    };
    Ok(AddressRequest {
        pool,
        explicit,
        gateway,
        address,
    })
}

/// `NetworkDriver.CreateNetwork`: Docker's network id, its IPv4 pool, its `-o` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateNetwork {
    pub network_id: String,
    pub pool: Ipv4Net,
    pub options: BTreeMap<String, String>,
}

pub fn create_network(body: &[u8]) -> Result<CreateNetwork, RequestError> {
    let req = parse(body)?;
    let network_id = field(&req, "NetworkID")?.to_string();
    let pool = req
        .pointer("/IPv4Data/0/Pool")
        .and_then(Value::as_str)
        .ok_or_else(|| RequestError("overlayd networks need an IPv4 pool".into()))?
        .parse::<Ipv4Net>()
        .map_err(|e| RequestError(format!("invalid pool: {e}")))?;
    Ok(CreateNetwork {
        network_id,
        pool,
        options: generic_options(&req),
    })
}

/// `NetworkDriver.CreateEndpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateEndpoint {
    pub network_id: String,
    pub endpoint_id: String,
    /// The address IPAM gave (`Interface.Address`, `A.B.C.D/LEN`), if any.
    pub address: Option<Ipv4Addr>,
    /// Docker chose the MAC address (then the reply must not name one).
    pub has_mac: bool,
}

pub fn create_endpoint(body: &[u8]) -> Result<CreateEndpoint, RequestError> {
    let req = parse(body)?;
    let network_id = field(&req, "NetworkID")?.to_string();
    let endpoint_id = field(&req, "EndpointID")?.to_string();
    let addr = req
        .pointer("/Interface/Address")
        .and_then(Value::as_str)
        .unwrap_or("");
    let address = match addr.split('/').next() {
        Some(a) if !a.is_empty() => Some(
            a.parse()
                .map_err(|_| RequestError(format!("invalid address {addr:?}")))?,
        ),
        _ => None,
    };
    let has_mac = !req
        .pointer("/Interface/MacAddress")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty();
    Ok(CreateEndpoint {
        network_id,
        endpoint_id,
        address,
        has_mac,
    })
}

/// `NetworkDriver.Join`: the endpoint and its container's sandbox (a path in dockerd's
/// mount namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub endpoint_id: String,
    pub sandbox_key: String,
}

pub fn join(body: &[u8]) -> Result<Join, RequestError> {
    let req = parse(body)?;
    Ok(Join {
        endpoint_id: field(&req, "EndpointID")?.to_string(),
        sandbox_key: field(&req, "SandboxKey")?.to_string(),
    })
}

/// `NetworkDriver.DeleteNetwork`: Docker's network id.
pub fn delete_network(body: &[u8]) -> Result<String, RequestError> {
    Ok(field(&parse(body)?, "NetworkID")?.to_string())
}

/// `NetworkDriver.DeleteEndpoint`: the endpoint id.
pub fn delete_endpoint(body: &[u8]) -> Result<String, RequestError> {
    Ok(field(&parse(body)?, "EndpointID")?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn pool_ids_say_who_chose_the_subnet() {
        assert_eq!(
            pool_of("10.0.9.0/24").unwrap(),
            ("10.0.9.0/24".parse().unwrap(), true)
        );
        assert_eq!(
            pool_of("auto:10.0.1.0/24").unwrap(),
            ("10.0.1.0/24".parse().unwrap(), false)
        );
        assert!(pool_of("auto:garbage").is_err());
        assert!(pool_of("").is_err());
    }

    #[test]
    fn network_options_come_as_strings() {
        let req = json!({
            "NetworkID": "x",
            "Options": {
                "com.docker.network.enable_ipv6": false,
                "com.docker.network.generic": { "encrypted": "", "com.docker.network.driver.mtu": "1400", "n": 5 }
            }
        });
        let opts = generic_options(&req);
        assert_eq!(opts.get("encrypted").map(String::as_str), Some(""));
        assert_eq!(
            opts.get("com.docker.network.driver.mtu")
                .map(String::as_str),
            Some("1400")
        );
        assert_eq!(opts.get("n").map(String::as_str), Some("5"));
        assert!(generic_options(&json!({})).is_empty());
        assert!(
            generic_options(&json!({ "Options": { "com.docker.network.generic": 7 } })).is_empty()
        );
    }

    /// Bodies as Docker 20.10 sends them (captured from the e2e test's dockerd).
    #[test]
    fn dockers_requests_decode() {
        let pool = body(json!({"AddressSpace": "overlayd", "Pool": "10.0.9.0/24",
            "SubPool": "", "Options": {}, "V6": false}));
        assert_eq!(
            request_pool(&pool).unwrap(),
            Some("10.0.9.0/24".parse().unwrap())
        );
        assert_eq!(
            request_pool(&body(json!({"Pool": "", "V6": false}))).unwrap(),
            None
        );
        assert!(request_pool(&body(json!({"V6": true}))).is_err());
        assert!(request_pool(&body(json!({"Pool": "10.0.9.0/33"}))).is_err());

        let gw = body(json!({"PoolID": "auto:10.0.1.0/24", "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"}}));
        let a = request_address(&gw).unwrap();
        assert!(a.gateway && !a.explicit && a.address.is_none());
        let ip = request_address(&body(
            json!({"PoolID": "10.0.9.0/24", "Address": "10.0.9.7"}),
        ))
        .unwrap();
        assert_eq!(ip.address, Some(Ipv4Addr::new(10, 0, 9, 7)));
        assert!(request_address(&body(json!({"PoolID": "10.0.9.0/24", "Address": "x"}))).is_err());
        assert!(request_address(b"").is_err());

        let net = create_network(&body(json!({"NetworkID": "abc",
            "Options": {"com.docker.network.generic": {"encrypted": ""}},
            "IPv4Data": [{"AddressSpace": "overlayd", "Gateway": "10.0.9.1/24", "Pool": "10.0.9.0/24"}],
            "IPv6Data": []})))
        .unwrap();
        assert_eq!(net.pool, "10.0.9.0/24".parse::<Ipv4Net>().unwrap());
        assert!(net.options.contains_key("encrypted"));
        assert!(create_network(&body(json!({"NetworkID": "abc", "IPv4Data": []}))).is_err());

        let ep = create_endpoint(&body(json!({"NetworkID": "abc", "EndpointID": "e1",
            "Interface": {"Address": "10.0.9.2/24", "AddressIPv6": "", "MacAddress": ""},
            "Options": {}})))
        .unwrap();
        assert_eq!(ep.address, Some(Ipv4Addr::new(10, 0, 9, 2)));
        assert!(!ep.has_mac);
        assert!(
            create_endpoint(&body(json!({"NetworkID": "abc", "EndpointID": "e1",
            "Interface": {"Address": "/24"}})))
            .unwrap()
            .address
            .is_none()
        );

        let j = join(&body(json!({"NetworkID": "abc", "EndpointID": "e1",
            "SandboxKey": "/var/run/docker/netns/1f2e", "Options": {}})))
        .unwrap();
        assert_eq!(j.sandbox_key, "/var/run/docker/netns/1f2e");
        assert_eq!(
            delete_endpoint(&body(json!({"NetworkID": "abc", "EndpointID": "e1"}))).unwrap(),
            "e1"
        );
        assert!(delete_network(b"null").is_err());
        assert!(delete_network(b"{").is_err());
    }
}
