//! The embedded DNS resolver every task finds at 127.0.0.11, as in Swarm: the cluster's
//! names per network ([`names`]), the decision per message ([`answer`], pure), and the
//! sockets and upstream forwarding ([`server`]), counted ([`stats`]). The same names are answered at every
//! network's gateway address ([`gateway`]), for queries the datapath hands over.

pub mod answer;
pub mod gateway;
pub mod names;
pub mod server;
pub mod stats;
