//! Fixtures shared by the state tests: a one-node cluster, an id generator, and short
//! constructors of networks and services.

use super::{
    Availability, ClusterState, EndpointMode, Network, NetworkRequest, Node, Pool, Role, Service,
    StateError,
};
use crate::types::{NetworkName, NodeName, ServiceName};
use std::collections::BTreeMap;

pub(super) fn state() -> ClusterState {
    let mut s = ClusterState::default();
    let n1 = NodeName::new("n1").unwrap();
    s.nodes.insert(
        n1.clone(),
        Node {
            name: n1,
            role: Role::Manager,
            availability: Availability::Active,
            advertise_addr: None,
            data_port: 4789,
            joined_at: 0,
            control_addr: None,
        },
    );
    s
}

pub(super) fn ids() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("id{n}")
    }
}

pub(super) fn net(
    s: &mut ClusterState,
    name: &str,
    subnet: Option<&str>,
) -> Result<Network, StateError> {
    let req = NetworkRequest {
        subnet: subnet.map(|x| x.parse().unwrap()),
        ..Default::default()
    };
    s.create_network(
        NetworkName::new(name).unwrap(),
        req,
        Pool::default(),
        name.into(),
        0,
    )
    .cloned()
}

pub(super) fn svc(name: &str, nets: &[&str], replicas: u32) -> Service {
    Service {
        id: name.into(),
        name: ServiceName::new(name).unwrap(),
        networks: nets.iter().map(|n| NetworkName::new(*n).unwrap()).collect(),
        replicas,
        command: vec!["sleep".into(), "1000".into()],
        env: vec![],
        created_at: 0,
        updated_at: 0,
        endpoint_mode: EndpointMode::Vip,
        vips: BTreeMap::new(),
        aliases: BTreeMap::new(),
        lb_idle_timeout: None,
        ports: vec![],
        healthcheck: None,
        stop_grace_period_s: None,
        deploy: Default::default(),
        mode: Default::default(),
        node_slots: BTreeMap::new(),
        image: None,
    }
}

pub(super) fn meshed() -> ClusterState {
    let mut s = state();
    s.ensure_ingress("ing".into(), 0).unwrap();
    net(&mut s, "a", None).unwrap();
    s
}
