//! `overlayd`'s library: everything a node runs.
//!
//! - [`forward`]: the datapath's I/O side: worker threads over TAP devices and the underlay's
//!   sockets, feeding frames to the sans-IO decision of the `datapath` crate (tables, switch,
//!   load balancing, NAT, connection tracking), which this crate only calls.
//! - [`sys`]: the few fenced unsafe pieces: TAP ioctls and network-namespace syscalls, plus
//!   interface configuration over netlink.
//! - [`manager`]: the desired cluster state, its persistence and the API's operations.
//! - [`agent`]: realises this node's share of the state: namespaces, TAPs, task processes.
//! - [`container`]: one image task's container, run by the node's Docker Engine through
//!   [`engine`] (its API client and events stream), supervised.
//! - [`task`]: one task's process, supervised; [`task_log`]: its output, through a pipe into
//!   a log file of mode 0640, rotated by size.
//! - [`ingress`]: the routing mesh: published ports, proxied to tasks by the router's own
//!   TCP/IP endpoint (smoltcp) on the ingress network.
//! - [`api`]: the HTTP+JSON API on a Unix socket.
//! - [`daemon`]: wiring and graceful shutdown.
//! - [`clock`] and [`ids`]: the wall clock and fresh random ids, each read in one place.
//! - [`durable`]: the one way durable state is written (temporary file, fsync, rename).
//! - [`epoch`]: this run's epoch for encrypted networks, kept durably or not used.
//! - [`naming`]: every name the node derives (namespaces, interfaces, state-directory files).

pub mod agent;
pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod container;
pub mod daemon;
pub mod dns;
pub mod docker;
pub mod durable;
pub mod engine;
pub mod epoch;
pub mod forward;
pub mod ids;
pub mod ingress;
pub mod manager;
pub mod metrics;
pub mod naming;
pub mod services;
pub mod store;
pub mod sys;
pub mod task;
pub mod task_log;
pub mod task_shim;
pub mod upgrade;
