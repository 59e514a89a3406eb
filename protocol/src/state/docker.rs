//! Docker's bookkeeping: which nodes' Docker has a network for one of ours.
//!
//! The Docker network plugin (`router/src/docker.rs`) records each node's create and delete
//! here, so that the last node to delete a network the plugin made releases it.

use super::{ClusterState, StateError};
use crate::types::NodeName;
use std::collections::BTreeSet;

impl ClusterState {
    /// Records that `node`'s Docker has (`attached`) or no longer has a network for `network`;
    /// returns the nodes whose Docker still has one.
    pub fn docker_attach(
        &mut self,
        network: &str,
        node: &NodeName,
        attached: bool,
    ) -> Result<BTreeSet<NodeName>, StateError> {
        let net = self
            .networks
            .get_mut(network)
            .ok_or_else(|| StateError::NoSuchNetwork(network.to_string()))?;
        let changed = if attached {
            net.docker_nodes.insert(node.clone())
        } else {
            net.docker_nodes.remove(node)
        };
        if changed {
            self.revision += 1;
        }
        Ok(net.docker_nodes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{net, state};

    #[test]
    fn docker_attachments_are_counted_per_node() {
        let mut s = state();
        net(&mut s, "app", None).unwrap();
        let n1 = NodeName::new("n1").unwrap();
        let n2 = NodeName::new("n2").unwrap();
        assert_eq!(s.docker_attach("app", &n1, true).unwrap().len(), 1);
        let rev = s.revision;
        assert_eq!(s.docker_attach("app", &n1, true).unwrap().len(), 1);
        assert_eq!(s.revision, rev, "attaching twice changes nothing");
        assert_eq!(s.docker_attach("app", &n2, true).unwrap().len(), 2);
        assert_eq!(
            s.docker_attach("app", &n1, false).unwrap(),
            [n2.clone()].into()
        );
        assert!(s.docker_attach("app", &n2, false).unwrap().is_empty());
        assert!(matches!(
            s.docker_attach("nonet", &n1, true),
            Err(StateError::NoSuchNetwork(_))
        ));
    }
}
