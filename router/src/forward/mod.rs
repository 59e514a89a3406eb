//! The data path: tables, the sans-IO per-frame decision, and the I/O loop that feeds it.
//!
//! ```text
//!  TAP fds ──read batch──► switch::from_port ──► Forward / Flood / Reply / Encap / Drop
//!                               ▲ tables (ArcSwap snapshot, published by the agent)
//! ```

pub mod answer;
pub mod conntrack;
pub mod crypto;
pub mod csum;
pub mod gro;
pub mod io;
pub mod lb;
pub mod nat;
pub mod stats;
pub mod switch;
pub mod table;
pub mod underlay;
pub mod vnet;
