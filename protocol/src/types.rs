//! Typed identifiers that cross module boundaries: MAC addresses, VXLAN network ids and the
//! names of networks, services and nodes. Constructors check their input once, so code that
//! holds one of these never re-validates it.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// The MAC Docker gives an endpoint: `02:42:` followed by the four IPv4 address bytes.
    pub fn from_ipv4(ip: Ipv4Addr) -> MacAddr {
        let o = ip.octets();
        MacAddr([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }

    /// Group (multicast or broadcast) addresses have the low bit of the first octet set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex octets such as 02:42:0a:00:00:02")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(|| BadMac(s.to_string()))?;
            if part.len() != 2 {
                return Err(BadMac(s.to_string()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| BadMac(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(BadMac(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A VXLAN network identifier: 24 bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Vni(u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VNI {0} is out of range: a VXLAN id has 24 bits (1..=16777215)")]
pub struct BadVni(pub u32);

impl Vni {
    pub const MAX: u32 = 0x00ff_ffff;
    /// The VNI of the first user network, as Swarm numbers them (4096 is `ingress`).
    pub const FIRST_USER: u32 = 4097;
    /// The default `ingress` network's.
    pub const INGRESS: Vni = Vni(4096);

    pub fn new(v: u32) -> Result<Vni, BadVni> {
        if v == 0 || v > Self::MAX {
            Err(BadVni(v))
        } else {
            Ok(Vni(v))
        }
    }

    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Vni {
    type Error = BadVni;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Vni::new(v)
    }
}

impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vni({})", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: use 1-{max} characters from a-z A-Z 0-9 _ - and start with a letter or digit")]
pub struct BadName {
    pub kind: &'static str,
    pub name: String,
    pub max: usize,
}

/// Checks a user-chosen object name (network, service, node). Names end up in namespace file
/// names, DNS labels and log lines, so the alphabet is kept small.
pub fn check_name(kind: &'static str, name: &str, max: usize) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BadName {
            kind,
            name: name.to_string(),
            max,
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn new(s: impl Into<String>) -> Result<Self, BadName> {
                let s = s.into();
                check_name($kind, &s, $max)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = BadName;
            fn try_from(s: String) -> Result<Self, BadName> {
                Self::new(s)
            }
        }
        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }
        impl FromStr for $ty {
            type Err = BadName;
            fn from_str(s: &str) -> Result<Self, BadName> {
                Self::new(s)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The name of an overlay network (`my-demo`).
    NetworkName, "network", 63
);
name_type!(
    /// The name of a service (`whoami`). Its tasks are `whoami.1`, `whoami.2`, ...
    ServiceName, "service", 48
);
name_type!(
    /// The name of a node (`n1`), unique in a cluster.
    NodeName, "node", 32
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_from_ip_matches_docker() {
        let mac = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 2, 7));
        assert_eq!(mac.to_string(), "02:42:0a:00:02:07");
        assert_eq!("02:42:0a:00:02:07".parse::<MacAddr>().unwrap(), mac);
    }

    #[test]
    fn mac_rejects_garbage() {
        for s in [
            "",
            "02:42",
            "02:42:0a:00:02:07:09",
            "zz:42:0a:00:02:07",
            "2:42:a:0:2:7",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
    }

    #[test]
    fn vni_range() {
        assert!(Vni::new(0).is_err());
        assert!(Vni::new(1 << 24).is_err());
        assert_eq!(Vni::new(4097).unwrap().get(), 4097);
        assert!(serde_json::from_str::<Vni>("16777216").is_err());
    }

    #[test]
    fn names() {
        assert!(NetworkName::new("my-demo").is_ok());
        assert!(NetworkName::new("").is_err());
        assert!(NetworkName::new("-x").is_err());
        assert!(ServiceName::new("a.b").is_err());
        assert!(ServiceName::new("a/b").is_err());
        assert!(serde_json::from_str::<NodeName>("\"../etc\"").is_err());
    }
}
