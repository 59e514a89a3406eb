//! Membership: which certificates the cluster accepts for each node, a node's role
//! (promote, demote) and `node rm`'s checks (the removal itself is `node.rs`'s
//! `remove_node`).
//!
//! The manager records every node certificate it signs ([`NodeCert`]: serial and expiry).
//! A member session is admitted only with a certificate on that list (an allow list), so a
//! node removed with `node rm` cannot come back with its old certificate, and a node that
//! joins again gets a fresh identity that replaces the old one. Entries leave the list when
//! their certificate expires, so it stays as small as the cluster. A node with no entry at
//! all holds a certificate from before the list existed; it is accepted until its first
//! renewal records one.

use super::{ClusterState, Role, StateError};
use crate::types::NodeName;
use serde::{Deserialize, Serialize};

/// A node certificate the manager signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCert {
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// Unix seconds after which it is no longer valid.
    pub not_after: u64,
    /// The role it carries.
    pub role: Role,
}

/// Why a membership change was refused (it changes nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("node {0} not found")]
    NoSuchNode(String),
    #[error("node {0} is the last manager: promote another node first")]
    LastManager(NodeName),
    #[error("node {0} is not down and can't be removed (use --force)")]
    NotDown(NodeName),
    #[error("node {0} is a manager: demote it before removing it")]
    IsManager(NodeName),
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<MembershipError> for crate::api::OpError {
    fn from(e: MembershipError) -> Self {
        let status = match e {
            MembershipError::State(e) => return e.into(),
            MembershipError::NoSuchNode(_) => 404,
            _ => 409,
        };
        crate::api::OpError {
            status,
            message: e.to_string(),
        }
    }
}

impl ClusterState {
    /// Whether a certificate with `serial` may open a session for `node` at `now` (Unix
    /// seconds): `node` is a member and the certificate is one of its recorded, unexpired
    /// ones, or the node has none recorded (a certificate older than the list).
    pub fn cert_allowed(&self, node: &NodeName, serial: &str, now: u64) -> bool {
        if !self.nodes.contains_key(node) {
            return false;
        }
        match self.certs.get(node) {
            None => true,
            Some(certs) => certs
                .iter()
                .any(|c| c.serial == serial && c.not_after > now),
        }
    }

    /// Records a certificate signed for `node` at `now`. With `fresh` (a join), it replaces
    /// every earlier one: the node's old identity is gone. Expired entries are dropped.
    pub fn record_cert(&mut self, node: &NodeName, cert: NodeCert, fresh: bool, now: u64) {
        let certs = self.certs.entry(node.clone()).or_default();
        if fresh {
            certs.clear();
        }
        certs.retain(|c| c.not_after > now);
        certs.push(cert);
        self.revision += 1;
    }

    /// The newest certificate recorded for `node`.
    pub fn current_cert(&self, node: &NodeName) -> Option<&NodeCert> {
        self.certs.get(node)?.iter().max_by_key(|c| c.not_after)
    }

    /// `node promote` / `node demote`: sets a node's role. Demoting the last manager is
    /// refused. The node's certificate follows at its next renewal (the node asks for one
    /// as soon as it sees its new role).
    pub fn set_role(&mut self, node: &str, role: Role) -> Result<(), MembershipError> {
        let n = self
            .nodes
            .get(node)
            .ok_or_else(|| MembershipError::NoSuchNode(node.to_string()))?;
        if n.role == role {
            return Ok(());
        }
        let managers = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Manager)
            .count();
        if role == Role::Worker && managers <= 1 {
            return Err(MembershipError::LastManager(n.name.clone()));
        }
        if let Some(n) = self.nodes.get_mut(node) {
            n.role = role;
        }
        self.revision += 1;
        Ok(())
    }

    /// `node rm [--force]`: a node that is `up` is refused unless `force` (Docker's "node
    /// is not down and can't be removed"), a manager is refused (demote it first); then
    /// [`ClusterState::remove_node`] takes it out (with `force`, also with tasks or
    /// endpoints still on it), and its certificates go with it, so they are refused from
    /// now on.
    pub fn forget_node(
        &mut self,
        node: &str,
        up: bool,
        force: bool,
        now: u64,
    ) -> Result<(), MembershipError> {
        let n = self
            .nodes
            .get(node)
            .ok_or_else(|| MembershipError::NoSuchNode(node.to_string()))?;
        if n.role == Role::Manager {
            return Err(MembershipError::IsManager(n.name.clone()));
        }
        if up && !force {
            return Err(MembershipError::NotDown(n.name.clone()));
        }
        let mut next = self.clone();
        let removed = next.remove_node(node, force, now)?;
        next.certs.remove(&removed.name);
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};
    use crate::state::StateError;
    use crate::state::{Availability, Node};

    fn add(s: &mut ClusterState, name: &str, role: Role) -> NodeName {
        let n = NodeName::new(name).unwrap();
        s.nodes.insert(
            n.clone(),
            Node {
                name: n.clone(),
                role,
                availability: Availability::Active,
                advertise_addr: None,
                data_port: 4789,
                joined_at: 0,
                control_addr: None,
            },
        );
        n
    }

    fn cert(serial: &str, not_after: u64) -> NodeCert {
        NodeCert {
            serial: serial.into(),
            not_after,
            role: Role::Worker,
        }
    }

    #[test]
    fn only_recorded_unexpired_certificates_open_sessions() {
        let mut s = state();
        let n2 = add(&mut s, "n2", Role::Worker);
        // Before anything is recorded: a certificate from before the list.
        assert!(s.cert_allowed(&n2, "old", 0));
        s.record_cert(&n2, cert("a", 100), true, 0);
        assert!(s.cert_allowed(&n2, "a", 50));
        assert!(!s.cert_allowed(&n2, "old", 50), "the list now decides");
        assert!(!s.cert_allowed(&n2, "a", 100), "expired");
        // A renewal adds; the old one stays valid until it expires, then leaves the list.
        s.record_cert(&n2, cert("b", 200), false, 50);
        assert!(s.cert_allowed(&n2, "a", 60) && s.cert_allowed(&n2, "b", 60));
        s.record_cert(&n2, cert("c", 300), false, 150);
        assert_eq!(s.certs[&n2].len(), 2);
        assert_eq!(s.current_cert(&n2).unwrap().serial, "c");
        // A join replaces the identity.
        s.record_cert(&n2, cert("d", 400), true, 160);
        assert!(!s.cert_allowed(&n2, "c", 170));
        // Not a member: nothing opens a session.
        let ghost = NodeName::new("ghost").unwrap();
        assert!(!s.cert_allowed(&ghost, "d", 0));
    }

    #[test]
    fn the_last_manager_cannot_be_demoted() {
        let mut s = state();
        add(&mut s, "n2", Role::Worker);
        let before = s.clone();
        assert_eq!(
            s.set_role("n1", Role::Worker),
            Err(MembershipError::LastManager(NodeName::new("n1").unwrap()))
        );
        assert_eq!(s, before);
        s.set_role("n2", Role::Manager).unwrap();
        assert!(s.revision > before.revision);
        s.set_role("n1", Role::Worker).unwrap();
        assert_eq!(s.nodes["n1"].role, Role::Worker);
        assert!(s.set_role("n2", Role::Worker).is_err());
        assert!(matches!(
            s.set_role("nope", Role::Manager),
            Err(MembershipError::NoSuchNode(_))
        ));
    }

    #[test]
    fn removing_a_node_needs_it_down_or_force_and_forgets_its_certificates() {
        let mut s = state();
        let n2 = add(&mut s, "n2", Role::Worker);
        s.record_cert(&n2, cert("a", 100), true, 0);
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 2), &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.tasks_on(&n2).count(), 1);
        let before = s.clone();
        assert!(matches!(
            s.forget_node("n2", true, false, 10),
            Err(MembershipError::NotDown(_))
        ));
        assert!(matches!(
            s.forget_node("n1", false, true, 10),
            Err(MembershipError::IsManager(_))
        ));
        // Down, but a task is still placed on it: `remove_node`'s refusal.
        assert!(matches!(
            s.forget_node("n2", false, false, 10),
            Err(MembershipError::State(StateError::NodeInUse { .. }))
        ));
        assert_eq!(s, before, "refusals change nothing");
        s.forget_node("n2", true, true, 10).unwrap();
        assert!(!s.nodes.contains_key("n2"));
        assert!(!s.cert_allowed(&n2, "a", 0), "its certificate is refused");
        assert!(!s.certs.contains_key("n2"));
        assert_eq!(s.tasks_on(&n2).count(), 0);
    }
}
