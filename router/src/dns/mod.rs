//! The embedded DNS resolver every task finds at 127.0.0.11, as in Swarm: the cluster's
//! names per network ([`names`]), the decision per message ([`answer`], pure), and the
//! sockets and upstream forwarding ([`server`]).

pub mod answer;
pub mod names;
pub mod server;
