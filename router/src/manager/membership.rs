//! The manager's side of membership: recording the certificates it signs (joins and
//! renewals), roles (`node promote` / `node demote`) and removal (`node rm`). The rules are
//! `protocol::state`'s (`membership.rs`); this applies them to the desired state, with
//! the liveness only the manager knows.

use super::Manager;
use crate::clock::now;
use protocol::api::OpError;
use protocol::state::{Availability, Node, NodeCert, Role};
use protocol::types::NodeName;
use std::net::Ipv4Addr;

impl Manager {
    /// Admits a node that joined with a token for `role`: records it (or its new address,
    /// if it joins again under its name) and its certificate, which replaces any earlier
    /// one: a node that joins again has a new identity.
    pub fn admit_joined(
        &self,
        name: &NodeName,
        addr: Ipv4Addr,
        data_port: u16,
        role: Role,
        cert: NodeCert,
    ) -> Result<(), OpError> {
        let node = Node {
            name: name.clone(),
            role,
            availability: Availability::Active,
            advertise_addr: Some(addr),
            data_port,
            joined_at: now(),
            control_addr: None,
        };
        self.commit(|s| {
            s.upsert_node(node);
            if let Some(n) = s.nodes.get_mut(name) {
                n.role = role;
            }
            s.record_cert(name, cert, true, now());
            Ok(())
        })
    }

    /// Records a certificate renewed for a member (its earlier ones stay valid until they
    /// expire).
    pub fn record_renewal(&self, name: &NodeName, cert: NodeCert) -> Result<(), OpError> {
        self.commit(|s| {
            if !s.nodes.contains_key(name) {
                return Err(OpError::not_found(format!("node {name} not found")));
            }
            s.record_cert(name, cert, false, now());
            Ok(())
        })
    }

    /// A member's role in the desired state.
    pub fn role_of(&self, node: &NodeName) -> Option<Role> {
        self.snapshot().nodes.get(node).map(|n| n.role)
    }

    /// `node promote` / `node demote`.
    pub(super) fn set_role(&self, node: &str, role: Role) -> Result<(), OpError> {
        self.commit(|s| s.set_role(node, role).map_err(OpError::from))
    }

    /// `node rm [--force]`: refused while the node is up, unless `force`. Its slots are
    /// filled on live nodes by the healing tick.
    pub(super) fn forget_node(&self, node: &str, force: bool) -> Result<(), OpError> {
        let up = NodeName::new(node).is_ok_and(|n| self.health.is_ready(&n));
        self.commit(|s| s.forget_node(node, up, force, now()).map_err(OpError::from))
    }
}
