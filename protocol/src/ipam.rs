//! IP address management: carving network subnets out of an address pool and handing out
//! addresses inside a subnet. Pure functions over what is already in use; the caller (the
//! manager) owns the state and persists it.

use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Docker's default pool for overlay networks: 10.0.0.0/8 in /24 steps (10.0.0.0/24,
/// 10.0.1.0/24, ...).
pub const DEFAULT_POOL: &str = "10.0.0.0/8";
pub const DEFAULT_POOL_PREFIX: u8 = 24;
/// The subnet of the routing mesh's `ingress` network; never handed to user networks.
pub const INGRESS_SUBNET: &str = "10.255.0.0/16";

pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first `prefix`-sized subnet of `pool` that overlaps none of `used`.
pub fn next_subnet(pool: Ipv4Net, prefix: u8, used: &[Ipv4Net]) -> Option<Ipv4Net> {
    let subnets = pool.subnets(prefix).ok()?;
    subnets
        .into_iter()
        .find(|candidate| !used.iter().any(|u| overlaps(candidate, u)))
}

/// Whether `ip` may be given to an endpoint of `subnet`: inside it, and neither its network
/// nor its broadcast address (for prefixes shorter than /31).
pub fn is_host_address(subnet: &Ipv4Net, ip: Ipv4Addr) -> bool {
    if !subnet.contains(&ip) {
        return false;
    }
    subnet.prefix_len() >= 31 || (ip != subnet.network() && ip != subnet.broadcast())
}

/// The lowest host address of `subnet` not in `used`.
pub fn next_address(subnet: &Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    subnet
        .hosts()
        .find(|ip| !used.contains(ip) && is_host_address(subnet, *ip))
}

/// The gateway Docker picks for a subnet: its first host address (.1 of a /24).
pub fn default_gateway(subnet: &Ipv4Net) -> Option<Ipv4Addr> {
    subnet.hosts().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn pools_count_up_like_docker() {
        let pool = net(DEFAULT_POOL);
        let a = next_subnet(pool, 24, &[]).unwrap();
        assert_eq!(a, net("10.0.0.0/24"));
        let b = next_subnet(pool, 24, &[a]).unwrap();
        assert_eq!(b, net("10.0.1.0/24"));
        // A user subnet that covers 10.0.2.0/24 is skipped.
        let c = next_subnet(pool, 24, &[a, b, net("10.0.2.0/23")]).unwrap();
        assert_eq!(c, net("10.0.4.0/24"));
    }

    #[test]
    fn pool_exhaustion() {
        let pool = net("10.9.0.0/23");
        let used = vec![net("10.9.0.0/24"), net("10.9.1.0/24")];
        assert_eq!(next_subnet(pool, 24, &used), None);
    }

    #[test]
    fn addresses_skip_used_and_reuse_freed() {
        let s = net("10.0.2.0/29");
        let mut used: BTreeSet<_> = [Ipv4Addr::new(10, 0, 2, 1)].into();
        let mut got = vec![];
        while let Some(ip) = next_address(&s, &used) {
            used.insert(ip);
            got.push(ip.octets()[3]);
        }
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
        used.remove(&Ipv4Addr::new(10, 0, 2, 4));
        assert_eq!(next_address(&s, &used), Some(Ipv4Addr::new(10, 0, 2, 4)));
    }

    #[test]
    fn host_addresses() {
        let s = net("10.0.2.0/24");
        assert!(!is_host_address(&s, Ipv4Addr::new(10, 0, 2, 0)));
        assert!(!is_host_address(&s, Ipv4Addr::new(10, 0, 2, 255)));
        assert!(!is_host_address(&s, Ipv4Addr::new(10, 0, 3, 1)));
        assert!(is_host_address(&s, Ipv4Addr::new(10, 0, 2, 1)));
        assert_eq!(default_gateway(&s), Some(Ipv4Addr::new(10, 0, 2, 1)));
    }
}
