//! The manager's side of one control connection, as a state machine without I/O.
//!
//! [`MemberSession`] takes what arrives (the first message, then the node's `Report`s and
//! `Request`s), "the state changed" notifications and the time, and answers with
//! [`Action`]s for its driver (`server.rs`): messages to send, snapshots to push, operations
//! to apply, heartbeats to record, certificates to renew, refusals. It decides whom to
//! admit, from the facts a [`Roster`] gives it, and whether a forwarded change is allowed,
//! from the role of the certificate the node showed and the desired state
//! ([`super::authz`]). It never reads a clock or touches a stream: the driver passes `now`
//! and sleeps until [`MemberSession::poll_timeout`].

use super::authz;
use protocol::control::{Op, OpError, TaskReport, ToManager, ToNode, VERSION};
use protocol::state::{ClusterState, Role};
use protocol::types::NodeName;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a connection may stay silent before its first message.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshots are pushed on every change and at least this often (statuses, health).
pub const PUSH_EVERY: Duration = Duration::from_secs(1);
/// The least time a member keeps its name against a `Join` once it is down ([`name_held_for`]).
pub const NAME_HELD_MIN: Duration = Duration::from_secs(10 * 60);

/// How long a down member keeps its name: a `Join` under it is refused until the member
/// has been down this long (or was removed with `node rm`). A join under a member's name
/// takes its place: it replaces the member's certificates, so the node itself is locked
/// out, and whatever the state still places on that name goes to the joiner. Hence the
/// longer of
/// - `--reschedule-after`: until then the down node keeps its tasks (and their addresses
///   and traffic), which a joiner under its name would be given; and
/// - [`NAME_HELD_MIN`] (10 minutes): a daemon restarting, a host rebooting, a network
///   outage or a manager taking over (nodes reconnect within seconds of it) is over well
///   within that, so a token holder cannot race a node's restart to lock it out.
///
/// A node whose state directory was lost, or whose certificate expired while it was away,
/// joins again under its name at once after `overlayctl node rm NAME`, as in Swarm.
pub fn name_held_for(reschedule_after: Duration) -> Duration {
    reschedule_after.max(NAME_HELD_MIN)
}

/// What the manager knows that decides whom it admits and what it allows; the driver
/// answers from its state.
pub trait Roster {
    /// The role a join token's `secret` admits with, if it is a current one (compared in
    /// constant time).
    fn join_role(&self, secret: &str) -> Option<Role>;
    /// Whether `node` is in the desired state's node list.
    fn is_member(&self, node: &NodeName) -> bool;
    /// How long the member `node` has been down: zero while it heartbeats; `None` if no
    /// member has that name.
    fn member_down_for(&self, node: &NodeName) -> Option<Duration>;
    /// `--reschedule-after`: how long a down node keeps its tasks ([`name_held_for`]).
    fn reschedule_after(&self) -> Duration;
    /// Whether the certificate with `serial` is one the cluster still accepts for `node`
    /// (not removed, not replaced by a new join, not expired).
    fn cert_allowed(&self, node: &NodeName, serial: &str) -> bool;
    /// The desired state (roles, endpoints' owners), for authorizing requests.
    fn state(&self) -> Arc<ClusterState>;
    /// The manager's control address, named in refusals.
    fn control_addr(&self) -> SocketAddr;
}

/// What the manager read from the certificate a peer showed (verified against the cluster
/// CA by TLS before the session exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub name: String,
    /// `None`: a certificate from before roles existed (a worker's).
    pub role: Option<Role>,
    pub serial: String,
}

/// A certificate with a name only (tests, and certificates without a role).
impl From<&str> for PeerCert {
    fn from(name: &str) -> PeerCert {
        PeerCert {
            name: name.to_string(),
            role: None,
            serial: String::new(),
        }
    }
}

impl From<String> for PeerCert {
    fn from(name: String) -> PeerCert {
        PeerCert::from(name.as_str())
    }
}

/// What the driver does next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this message.
    Send(ToNode),
    /// Bring the node to the newest push: what changed since the push it holds, or the whole
    /// snapshot if it holds none.
    PushSnapshot,
    /// The node cannot apply what it was sent: forget which push it holds, then push.
    Resync,
    /// A valid join: sign `csr_pem` for `node` with `role` (the token's), record the node
    /// and its certificate, then call [`MemberSession::joined`], or
    /// [`MemberSession::refuse`] if any of that fails.
    Join {
        node: NodeName,
        role: Role,
        advertise_addr: Ipv4Addr,
        data_port: u16,
        csr_pem: String,
    },
    /// A valid member: record its (possibly new) addresses, then call
    /// [`MemberSession::admitted`], or [`MemberSession::refuse`] if that fails.
    Admit {
        node: NodeName,
        advertise_addr: Ipv4Addr,
        data_port: u16,
        /// Where it serves the control endpoint, if it is a manager candidate.
        control_addr: Option<SocketAddr>,
    },
    /// The session is up: record a first heartbeat for `node`.
    Up { node: NodeName },
    /// A heartbeat: record it, and the statuses of the node's own tasks.
    Heartbeat {
        node: NodeName,
        statuses: Vec<TaskReport>,
    },
    /// Apply a forwarded change, then call [`MemberSession::applied`] with its result.
    Apply { id: u64, op: Op },
    /// The member asks for `query.node`'s lines of a service: answer with
    /// `ToNode::LogsLines` of the same `id`.
    Logs {
        id: u64,
        query: protocol::control::LogsQuery,
    },
    /// The member answered the leader's `LogsFetch` `id`.
    LogsLines {
        node: NodeName,
        id: u64,
        answer: Result<protocol::control::LogsAnswer, String>,
    },
    /// Sign `csr_pem` for `node` with its role in the desired state, record the
    /// certificate, then call [`MemberSession::renewed`] (or nothing if that fails: the
    /// node asks again later).
    Renew { node: NodeName, csr_pem: String },
    /// A message that has no place in a member session; it changes nothing.
    Ignored { what: &'static str },
    /// Refuse: write `Refused { reason }`, finish the stream and let it go.
    Refuse { reason: String },
    /// The session is over (the stream failed); close it.
    Close { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for `Join` or `Hello` until the deadline.
    First { deadline: Instant },
    /// A `Join` passed the checks; the driver is signing and recording.
    Joining,
    /// A `Hello` passed the checks; the driver is recording the node.
    Admitting { node: NodeName },
    /// A member session: snapshots go out, reports and requests come in.
    Open { node: NodeName, next_push: Instant },
    /// Refused, joined or failed: nothing more happens.
    Closed,
}

/// The manager's side of one control connection.
#[derive(Debug)]
pub struct MemberSession {
    /// The verified client certificate (`None`: a join connection).
    cert: Option<PeerCert>,
    phase: Phase,
    actions: VecDeque<Action>,
}

/// Why a first message's version is refused, or nothing.
pub fn check_version(version: u32) -> Result<(), String> {
    if version == VERSION {
        Ok(())
    } else {
        Err(format!(
            "control protocol version {version} is not this manager's {VERSION}"
        ))
    }
}

/// The name of a message for logs (its payload may hold secrets or be large).
fn kind(msg: &ToManager) -> &'static str {
    match msg {
        ToManager::Join { .. } => "Join",
        ToManager::Hello { .. } => "Hello",
        ToManager::Report { .. } => "Report",
        ToManager::Request { .. } => "Request",
        ToManager::Renew { .. } => "Renew",
        ToManager::Resync => "Resync",
        ToManager::Logs { .. } => "Logs",
        ToManager::LogsLines { .. } => "LogsLines",
    }
}

/// Why a `Join` may not take the name `node`, if it may not: a member holds it
/// ([`name_held_for`]).
fn name_taken(node: &NodeName, roster: &dyn Roster) -> Option<String> {
    let down_for = roster.member_down_for(node)?;
    let held_for = name_held_for(roster.reschedule_after());
    if down_for >= held_for {
        return None;
    }
    let holder = if down_for.is_zero() {
        "a live member".to_string()
    } else {
        format!(
            "a member down for {} (a down member keeps its name for {})",
            span(down_for),
            span(held_for)
        )
    };
    Some(format!(
        "node name {node} is in use by {holder}; to give it to a new node, remove the member \
         first: overlayctl node rm {node}"
    ))
}

/// A duration as a refusal states it: seconds up to two minutes, then minutes.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    if s < 120 {
        format!("{s} s")
    } else {
        format!("{} min", s / 60)
    }
}

impl MemberSession {
    /// A connection accepted at `now`, whose peer showed `cert` (verified against the
    /// cluster CA), or none.
    pub fn new(now: Instant, cert: Option<PeerCert>) -> MemberSession {
        MemberSession {
            cert,
            phase: Phase::First {
                deadline: now + FIRST_MESSAGE_TIMEOUT,
            },
            actions: VecDeque::new(),
        }
    }

    /// The member's name once its `Hello` was accepted.
    pub fn node(&self) -> Option<&NodeName> {
        match &self.phase {
            Phase::Admitting { node } | Phase::Open { node, .. } => Some(node),
            _ => None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The next thing for the driver to do.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`MemberSession::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::First { deadline } => Some(*deadline),
            Phase::Open { next_push, .. } => Some(*next_push),
            Phase::Joining | Phase::Admitting { .. } | Phase::Closed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::First { deadline } if now >= *deadline => {
                self.refuse(format!(
                    "no message within {} s",
                    FIRST_MESSAGE_TIMEOUT.as_secs()
                ));
            }
            Phase::Open { next_push, .. } if now >= *next_push => {
                // A driver that fell behind pushes once, not once per missed period.
                *next_push += PUSH_EVERY;
                if *next_push <= now {
                    *next_push = now + PUSH_EVERY;
                }
                self.actions.push_back(Action::PushSnapshot);
            }
            _ => {}
        }
    }

    /// A message arrived. The first one decides what the connection is (a join or a member
    /// session, checked against `roster`); later ones are a member's reports and requests.
    pub fn handle_message(&mut self, msg: ToManager, roster: &dyn Roster) {
        match &self.phase {
            Phase::First { .. } => self.first(msg, roster),
            Phase::Open { node, .. } => {
                let node = node.clone();
                match msg {
                    ToManager::Report { statuses } => {
                        self.actions.push_back(Action::Heartbeat { node, statuses })
                    }
                    ToManager::Request { id, op } => {
                        let action = match self.authorize(&node, &op, roster) {
                            Ok(()) => Action::Apply { id, op },
                            Err(e) => Action::Send(ToNode::Response { id, result: Err(e) }),
                        };
                        self.actions.push_back(action)
                    }
                    ToManager::Renew { csr_pem } => {
                        self.actions.push_back(Action::Renew { node, csr_pem })
                    }
                    ToManager::Resync => self.actions.push_back(Action::Resync),
                    // Any member may read logs: its own API serves `service logs` too.
                    ToManager::Logs { id, query } => {
                        self.actions.push_back(Action::Logs { id, query })
                    }
                    ToManager::LogsLines { id, answer } => self
                        .actions
                        .push_back(Action::LogsLines { node, id, answer }),
                    other => self
                        .actions
                        .push_back(Action::Ignored { what: kind(&other) }),
                }
            }
            // Nothing a peer says matters while it is being admitted or once it is closed.
            Phase::Joining | Phase::Admitting { .. } | Phase::Closed => {}
        }
    }

    /// Whether this session's node may make `op`: from the role of the certificate it
    /// showed and its role in the desired state, never from what it says.
    fn authorize(&self, node: &NodeName, op: &Op, roster: &dyn Roster) -> Result<(), OpError> {
        let state = roster.state();
        let role = authz::effective_role(
            self.cert.as_ref().and_then(|c| c.role),
            state.nodes.get(node).map(|n| n.role),
        );
        authz::authorize(op, node, role, &state, roster.control_addr())
    }

    fn first(&mut self, msg: ToManager, roster: &dyn Roster) {
        match msg {
            ToManager::Join {
                version,
                node,
                advertise_addr,
                data_port,
                secret,
                csr_pem,
            } => {
                if let Err(reason) = check_version(version) {
                    return self.refuse(reason);
                }
                let Some(role) = roster.join_role(&secret) else {
                    return self.refuse("invalid join token".into());
                };
                if let Some(reason) = name_taken(&node, roster) {
                    return self.refuse(reason);
                }
                self.phase = Phase::Joining;
                self.actions.push_back(Action::Join {
                    node,
                    role,
                    advertise_addr,
                    data_port,
                    csr_pem,
                });
            }
            ToManager::Hello {
                version,
                node,
                advertise_addr,
                data_port,
                control_addr,
            } => {
                if let Err(reason) = check_version(version) {
                    return self.refuse(reason);
                }
                let serial = match &self.cert {
                    Some(c) if c.name == node.as_str() => c.serial.clone(),
                    Some(c) => {
                        return self.refuse(format!("certificate is for {}, not {node}", c.name))
                    }
                    None => {
                        return self.refuse("a member session needs a cluster certificate".into())
                    }
                };
                if !roster.is_member(&node) {
                    return self.refuse(format!("{node} is not a member of this cluster"));
                }
                if !roster.cert_allowed(&node, &serial) {
                    return self.refuse(format!(
                        "this certificate of {node} is no longer accepted (the node was \
                         removed, or joined again): join with a token"
                    ));
                }
                self.phase = Phase::Admitting { node: node.clone() };
                self.actions.push_back(Action::Admit {
                    node,
                    advertise_addr,
                    data_port,
                    control_addr,
                });
            }
            _ => self.refuse("expected Join or Hello first".into()),
        }
    }

    /// The driver recorded the node of an [`Action::Admit`]: welcome it and start pushing.
    pub fn admitted(&mut self, now: Instant) {
        let Phase::Admitting { node } = &self.phase else {
            return;
        };
        let node = node.clone();
        self.actions
            .push_back(Action::Send(ToNode::Welcome { version: VERSION }));
        self.actions.push_back(Action::Up { node: node.clone() });
        // The first snapshot goes out at once, then every PUSH_EVERY.
        self.actions.push_back(Action::PushSnapshot);
        self.phase = Phase::Open {
            node,
            next_push: now + PUSH_EVERY,
        };
    }

    /// The driver signed and recorded the node of an [`Action::Join`]: hand it its
    /// certificate and the CA. The connection has served its purpose.
    pub fn joined(&mut self, cert_pem: String, ca_pem: String) {
        if self.phase == Phase::Joining {
            self.phase = Phase::Closed;
            self.actions
                .push_back(Action::Send(ToNode::Joined { cert_pem, ca_pem }));
        }
    }

    /// Refuses the connection with `reason` (also what the driver calls when admitting or
    /// joining failed on its side).
    pub fn refuse(&mut self, reason: String) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.actions.push_back(Action::Refuse { reason });
    }

    /// The driver signed the certificate of an [`Action::Renew`]: hand it to the node.
    pub fn renewed(&mut self, cert_pem: String) {
        if self.is_open() {
            self.actions
                .push_back(Action::Send(ToNode::Renewed { cert_pem }));
        }
    }

    /// The answer to an [`Action::Apply`].
    pub fn applied(&mut self, id: u64, result: Result<u64, OpError>) {
        if self.is_open() {
            self.actions
                .push_back(Action::Send(ToNode::Response { id, result }));
        }
    }

    /// The desired state changed: push it now (the periodic push keeps its own rhythm). A
    /// node that is no longer a member (`node rm`) is refused and receives nothing more.
    pub fn state_changed(&mut self, roster: &dyn Roster) {
        let Phase::Open { node, .. } = &self.phase else {
            return;
        };
        if roster.is_member(node) {
            self.actions.push_back(Action::PushSnapshot);
        } else {
            let reason = format!("{node} was removed from the cluster");
            self.refuse(reason);
        }
    }

    /// Reading or writing the stream failed (`error` says how).
    pub fn stream_failed(&mut self, error: String) {
        match self.phase {
            Phase::First { .. } => self.refuse(format!("unreadable first message: {error}")),
            Phase::Closed => {}
            _ => {
                self.phase = Phase::Closed;
                self.actions.push_back(Action::Close { reason: error });
            }
        }
    }
}
