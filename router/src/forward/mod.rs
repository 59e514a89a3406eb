//! Forwarding: the I/O side of the datapath, the part that owns fds. Worker threads read
//! frames from TAPs and datagrams from the underlay in batches, hand each to the pure
//! decision in the `datapath` crate (`switch::from_port` / `from_underlay`) with the current
//! tables, the node's connection table and the time, and carry out the verdicts.
//!
//! ```text
//!  TAP fds ──read batch──► datapath::switch ──► Forward / Flood / Reply / Encap / Punt / Drop
//!  underlay ─recvmmsg/GRO─┘    ▲ Tables (ArcSwap snapshot, published by the agent)
//!                              ▲ ConnTable (one per node, beside the snapshot) and now_ms
//! ```
//!
//! - [`io`]: the workers' mio loops, the connection-table sweeper, and the answers the
//!   decision punts here (DNS at a gateway, [`crate::dns::gateway`]).
//! - [`underlay`]: the batched UDP sockets (quinn-udp, GSO/GRO, the reuseport group).

pub mod io;
pub mod saved_flows;
pub mod underlay;
