//! An encrypted network's keys as the forwarding tables carry them: every live secret (to
//! open what other nodes sealed) and this node's sending keys, one per worker lane. Immutable
//! data, rebuilt by the agent when the keyring changes; the per-datagram state that goes with
//! them (sequence numbers, replay windows) is each worker's `EspState`
//! (the `crypto` module, above the tables).

use protocol::esp::{self, SenderKey};
use std::collections::HashMap;
use std::sync::Arc;

/// A network's secret under one key id, shared by every node.
pub type Secret = Arc<[u8; esp::SECRET_LEN]>;

/// An encrypted network's keys on this node.
#[derive(Debug, Default)]
pub struct NetCrypto {
    /// What this node seals with now (None: no key yet, so nothing is sent).
    pub tx: Option<TxSa>,
    /// Every live secret, by key id: frames under any of them are accepted.
    pub rx: HashMap<u8, Secret>,
}

/// This node's sending side under one key: one derived key per worker lane.
#[derive(Debug)]
pub struct TxSa {
    pub spi: u32,
    pub keys: Vec<SenderKey>,
}

/// The epoch a worker's keys are derived with: the node's epoch (raised at every start) above
/// the worker's lane.
pub fn lane_epoch(node_epoch: u32, lane: u8) -> u32 {
    (node_epoch << 8) | u32::from(lane)
}
