//! Pure wire formats and state types shared by `overlayd` and `overlayctl`.
//!
//! Nothing in this crate touches a socket, a file, a clock or a thread: bytes in, values out.
//! That keeps every decoder of untrusted input testable with byte vectors and fuzzable.
//!
//! - [`types`]: small typed identifiers (`MacAddr`, `Vni`, names) with checked constructors.
//! - [`flow`]: the hash of the flow an inner frame belongs to (the underlay's entropy).
//! - [`vxlan`]: the RFC 7348 VXLAN header as a zero-copy `Packet` view plus a `Repr`.
//! - [`state`]: the cluster's desired state (networks, services, tasks) and its invariants.
//! - [`ipam`]: subnet pools and address allocation.
//! - [`api`]: request and response bodies of the node API (HTTP + JSON on a Unix socket).
//! - [`docker`]: the requests of Docker's network and IPAM plugin protocol, decoded.
//! - [`cni`]: the CNI plugin's network configuration, its errors and its result.
//! - [`timestamp`]: moments as the API writes them, RFC 3339 as Docker's.
//! - [`control`]: control-plane messages between nodes and the manager, and their framing.
//! - [`delta`]: what changed between two snapshots, as the manager pushes it.

pub mod api;
pub mod cni;
pub mod control;
pub mod delta;
pub mod docker;
pub mod esp;
pub mod flow;
pub mod ipam;
pub mod state;
pub mod timestamp;
pub mod types;
pub mod vxlan;
