//! overlay's datapath without I/O: the forwarding tables, the per-frame decision and what it
//! needs (load balancing, NAT, connection tracking, ESP state, virtio-net offloads), as pure
//! functions over byte slices and tables. No fd, no socket, no thread, no clock: the router
//! (`overlayd`'s `forward` module) owns those, reads frames in batches, hands each to
//! [`switch::from_port`] or [`switch::from_underlay`] with the current tables, the node's
//! connection table and the time, and carries out the [`vocab::Verdict`].
//!
//! ```text
//!  frame ─► switch ─► Forward / Flood / Reply / Encap / Punt / Drop(reason)
//!             │ ▲ table (immutable snapshot)   conntrack (shared, lock-free)   now_ms
//!             ├─► answer (ARP, ICMP echo: into a caller-owned buffer)
//!             └─► lb ─► nat (in-place rewrite, incremental checksums)
//! ```
//!
//! Modules depend only downward, never on each other in a cycle:
//!
//! - [`vocab`]: the leaf every other module speaks: ports, locations, verdicts, drop reasons.
//! - [`csum`], [`vnet`], [`gro`], [`nat`]: byte-level work on frames.
//! - [`bucket`]: a token bucket (time passed in), for work done on an unproven word.
//! - [`keys`]: an encrypted network's keys as the tables carry them.
//! - [`conntrack`]: the node's connection table (below the tables, which name its counters).
//! - [`table`]: the tables the control side builds and publishes.
//! - [`crypto`]: a worker's ESP state (sequence numbers, replay windows) over the tables' keys.
//! - [`answer`]: frames the router answers itself.
//! - [`lb`]: VIP decisions; [`switch`]: the per-frame decision.
//! - [`stats`]: counters (what the router reports of them).

pub mod answer;
pub mod bucket;
pub mod conntrack;
pub mod crypto;
pub mod csum;
pub mod gro;
pub mod keys;
pub mod lb;
pub mod nat;
pub mod stats;
pub mod switch;
pub mod table;
pub mod vnet;
pub mod vocab;
