//! Who may change what: the manager's decision on every forwarded `Request`, from the role
//! of the certificate it verified and the role the desired state gives the node (never from
//! anything the node says).
//!
//! A manager may make any change. A worker may only change what belongs to it: the
//! interfaces its runtimes (CNI, Docker) make on it, its Docker's attachment to a network,
//! and a new key for an encrypted network (its datapath asks for one when its sequence
//! numbers run high; that changes no desired state). Anything else is refused with a line
//! that says where changes are made.
//!
//! A worker's API asks the same question of its last snapshot before forwarding, so an
//! operator on a worker is answered at once, even while the manager is away.

use protocol::api::OpError;
use protocol::control::Op;
use protocol::state::{ClusterState, Endpoint, Role};
use protocol::types::NodeName;
use std::net::SocketAddr;

/// HTTP's "forbidden": the request is understood and not allowed to this node.
pub const FORBIDDEN: u16 = 403;

/// The role a session acts with: a manager only if both its certificate and the desired
/// state say so. A certificate without a role (made before roles existed) is a worker's; a
/// node demoted in the state loses its rights at once, and a promoted one gains them once
/// it holds a manager's certificate (it renews as soon as it sees its new role).
pub fn effective_role(cert: Option<Role>, state: Option<Role>) -> Role {
    match (cert, state) {
        (Some(Role::Manager), Some(Role::Manager)) => Role::Manager,
        _ => Role::Worker,
    }
}

/// The managers an operator can turn to, for refusals: each manager node of the state, the
/// one serving the control endpoint at `control` with that address.
pub fn managers(state: &ClusterState, control: SocketAddr) -> String {
    let list: Vec<String> = state
        .nodes
        .values()
        .filter(|n| n.role == Role::Manager)
        .map(|n| match n.advertise_addr {
            Some(ip) if std::net::IpAddr::V4(ip) == control.ip() => {
                format!("{} at {control}", n.name)
            }
            _ => n.name.to_string(),
        })
        .collect();
    if list.is_empty() {
        format!("at {control}")
    } else {
        list.join(", ")
    }
}

/// What a worker is told when it asks for a change only managers make.
pub fn worker_refusal(state: &ClusterState, control: SocketAddr) -> OpError {
    OpError {
        status: FORBIDDEN,
        message: format!(
            "this node is a worker: changes are made on a manager ({})",
            managers(state, control)
        ),
    }
}

/// Whether `node`, acting with `role`, may make `op` on `state`. `control` is the manager's
/// control address, named in refusals.
pub fn authorize(
    op: &Op,
    node: &NodeName,
    role: Role,
    state: &ClusterState,
    control: SocketAddr,
) -> Result<(), OpError> {
    if role == Role::Manager {
        return Ok(());
    }
    let own = |owner: &NodeName, what: &str| {
        if owner == node {
            Ok(())
        } else {
            Err(OpError {
                status: FORBIDDEN,
                message: format!("node {node} may not change {what} of node {owner}"),
            })
        }
    };
    let endpoint = |container: &str, ifname: &str| {
        state
            .endpoints
            .get(&Endpoint::key(container, ifname))
            .map(|e| e.node.clone())
    };
    match op {
        Op::AddEndpoint(req) => own(&req.node, "the interfaces"),
        Op::RemoveEndpoint { container, ifname }
        | Op::BindEndpoint {
            container, ifname, ..
        } => match endpoint(container, ifname) {
            Some(owner) => own(&owner, "the interfaces"),
            // Nothing to take from anyone: the manager answers as it would anyone.
            None => Ok(()),
        },
        Op::DockerAttach { node: owner, .. } => match NodeName::new(owner.as_str()) {
            Ok(owner) => own(&owner, "the Docker networks"),
            Err(e) => Err(OpError::bad_request(e.to_string())),
        },
        Op::RotateKey(_) => Ok(()),
        Op::CreateNetwork(_)
        | Op::RemoveNetwork(_)
        | Op::CreateService(_)
        | Op::ScaleService { .. }
        | Op::RemoveService(_)
        | Op::UpdateService { .. }
        | Op::AddVtep { .. }
        | Op::RemoveVtep { .. }
        | Op::UpdateNode { .. }
        | Op::SetRole { .. }
        | Op::RemoveNode { .. } => Err(worker_refusal(state, control)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::state::{Availability, EndpointRequest, Node};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (name, role, ip) in [
            ("n1", Role::Manager, [198, 18, 0, 1]),
            ("n2", Role::Worker, [198, 18, 0, 2]),
            ("n3", Role::Worker, [198, 18, 0, 3]),
        ] {
            let n = NodeName::new(name).unwrap();
            s.nodes.insert(
                n.clone(),
                Node {
                    name: n,
                    role,
                    availability: Availability::Active,
                    advertise_addr: Some(ip.into()),
                    data_port: 4789,
                    joined_at: 0,
                    control_addr: None,
                },
            );
        }
        s
    }

    fn control() -> SocketAddr {
        "198.18.0.1:2377".parse().unwrap()
    }

    fn n(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    #[test]
    fn the_role_comes_from_the_certificate_and_the_state_together() {
        use Role::*;
        assert_eq!(effective_role(Some(Manager), Some(Manager)), Manager);
        // Demoted in the state: its manager certificate no longer counts.
        assert_eq!(effective_role(Some(Manager), Some(Worker)), Worker);
        // Promoted, not renewed yet.
        assert_eq!(effective_role(Some(Worker), Some(Manager)), Worker);
        // A certificate from before roles existed, or a node the state does not know.
        assert_eq!(effective_role(None, Some(Manager)), Worker);
        assert_eq!(effective_role(Some(Manager), None), Worker);
    }

    #[test]
    fn a_worker_is_refused_changes_with_the_managers_named() {
        let s = state();
        let op = Op::ScaleService {
            name: "web".into(),
            replicas: 3,
        };
        let err = authorize(&op, &n("n2"), Role::Worker, &s, control()).unwrap_err();
        assert_eq!(err.status, FORBIDDEN);
        assert_eq!(
            err.message,
            "this node is a worker: changes are made on a manager (n1 at 198.18.0.1:2377)"
        );
        assert!(authorize(&op, &n("n1"), Role::Manager, &s, control()).is_ok());
        for op in [
            Op::RemoveNetwork("a".into()),
            Op::UpdateNode {
                node: "n3".into(),
                availability: Availability::Drain,
            },
            Op::SetRole {
                node: "n2".into(),
                role: Role::Manager,
            },
            Op::RemoveNode {
                node: "n3".into(),
                force: true,
            },
        ] {
            assert!(
                authorize(&op, &n("n2"), Role::Worker, &s, control()).is_err(),
                "{op:?}"
            );
        }
    }

    #[test]
    fn a_worker_may_change_only_its_own_endpoints() {
        let mut s = state();
        let req = |node: &str| EndpointRequest {
            container: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/c1".into(),
            node: n(node),
            network: "a".into(),
            runtime: "cni".into(),
            address: None,
        };
        let w = |op: &Op, s: &ClusterState| authorize(op, &n("n2"), Role::Worker, s, control());
        assert!(w(&Op::AddEndpoint(req("n2")), &s).is_ok());
        let err = w(&Op::AddEndpoint(req("n3")), &s).unwrap_err();
        assert_eq!(
            err.message,
            "node n2 may not change the interfaces of node n3"
        );
        // An endpoint of n3's: n2 may neither remove nor bind it.
        let ep = Endpoint {
            container: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/c1".into(),
            node: n("n3"),
            network: protocol::types::NetworkName::new("a").unwrap(),
            runtime: "cni".into(),
            address: "10.0.0.2".parse().unwrap(),
            mac: protocol::types::MacAddr::from_ipv4("10.0.0.2".parse().unwrap()),
        };
        s.endpoints.insert(Endpoint::key("c1", "eth0"), ep);
        let rm = Op::RemoveEndpoint {
            container: "c1".into(),
            ifname: "eth0".into(),
        };
        assert!(w(&rm, &s).is_err());
        assert!(authorize(&rm, &n("n3"), Role::Worker, &s, control()).is_ok());
        let gone = Op::RemoveEndpoint {
            container: "c9".into(),
            ifname: "eth0".into(),
        };
        assert!(w(&gone, &s).is_ok());
        let attach = |node: &str| Op::DockerAttach {
            network: "a".into(),
            node: node.into(),
            attached: true,
        };
        assert!(w(&attach("n2"), &s).is_ok());
        assert!(w(&attach("n3"), &s).is_err());
        assert!(w(&Op::RotateKey("sec".into()), &s).is_ok());
    }
}
