//! The control plane's sessions as state machines without I/O (quinn-proto's model).
//!
//! [`manager::MemberSession`] is the manager's side of one connection: whom to admit, when to
//! push snapshots, what to apply. [`node::NodeSession`] is a member node's side of its link:
//! greeting, keeping the newest snapshot, heartbeats, forwarded requests and their timeouts,
//! stall detection, reconnect back-off, following the leader and certificate renewal.
//! [`authz`] decides who may change what, [`renewal`] when a node renews its certificate,
//! [`candidates`] which manager a node tries next. Both sessions take messages and `now` and
//! return what to do and when to wake them; neither owns a socket, a task or a clock. The
//! async drivers (`server.rs`, `worker.rs`) move frames between them and QUIC streams, and
//! the tests here drive a pair through a simulated link on a virtual clock.

pub mod authz;
pub mod candidates;
pub mod manager;
pub mod node;
pub mod renewal;

#[cfg(test)]
mod sim;
