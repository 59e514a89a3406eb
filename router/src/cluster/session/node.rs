//! A member node's side of its link to the manager, as a state machine without I/O.
//!
//! [`NodeSession`] lives as long as the link: it asks its driver (`worker.rs`) to connect,
//! greets the manager with `Hello`, keeps the newest snapshot by revision (the session's
//! first push is whole, the next ones are deltas applied to the push it holds; one that does
//! not apply asks for a whole one with `Resync`), asks for a
//! heartbeat `Report` every [`REPORT_EVERY`], numbers forwarded requests and times them out,
//! notices a session that stalls (no snapshot for [`STALL_AFTER`]), and decides when to
//! reconnect (back-off from [`RECONNECT_MIN`] doubling to [`RECONNECT_MAX`]), and renews the
//! node's certificate over the session when its driver says it is due (`super::renewal`
//! decides when; a renewal unanswered within [`RENEW_TIMEOUT`] is retried after
//! [`RENEW_RETRY`]; the session is never interrupted for it). It never reads
//! a clock or touches a stream: the driver passes `now`, does what [`NodeSession::poll`]
//! says and sleeps until [`NodeSession::poll_timeout`].
//!
//! It also decides which manager each attempt goes to ([`super::candidates`]): the next
//! candidate after a failure, the leader a `Redirect` names after only [`RECONNECT_MIN`],
//! and the leader its driver names ([`NodeSession::retarget`]) at once.

use super::candidates::Candidates;
use protocol::control::{Op, OpError, Snapshot, ToManager, ToNode};
use protocol::state::ClusterState;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Heartbeats: the manager marks a node down after three missed ones.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
pub const RECONNECT_MIN: Duration = Duration::from_millis(500);
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long a forwarded change may wait for the manager's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that brings no snapshot (nor, at first, a `Welcome`) for this long is stalled
/// and replaced. Snapshots come every second; this is also QUIC's idle timeout, after which
/// a silent peer is gone.
pub const STALL_AFTER: Duration = Duration::from_secs(5);
/// How long a renewal may wait for the manager's answer, and how long until the next try.
pub const RENEW_TIMEOUT: Duration = Duration::from_secs(10);
pub const RENEW_RETRY: Duration = Duration::from_secs(5);

/// Why a forwarded change has no revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// There was no session: it was not sent.
    NotConnected,
    /// It was sent, and no answer came within [`REQUEST_TIMEOUT`].
    TimedOut,
    /// The session ended before the answer came.
    Lost,
    /// The manager refused it.
    Refused(OpError),
}

/// What the driver does next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Open a connection and a stream to the manager at `to`, then call
    /// [`NodeSession::connected`] (or [`NodeSession::connection_lost`]).
    Connect { to: SocketAddr },
    /// Write this message.
    Send(ToManager),
    /// Write a `Report` of this node's tasks (the heartbeat).
    SendReport,
    /// The manager welcomed us: the session is up.
    Up,
    /// A snapshot newer than (or as new as) the last one: adopt it.
    Snapshot(Box<Snapshot>),
    /// A push said nothing changed: the snapshot held is current now.
    Current,
    /// The outcome of the request [`NodeSession::request`] numbered `id`.
    Answer {
        id: u64,
        result: Result<u64, RequestError>,
    },
    /// The leader asks for this node's lines: answer with `ToManager::LogsLines` `id`
    /// ([`NodeSession::send`]).
    LogsFetch {
        id: u64,
        query: protocol::control::LogsQuery,
    },
    /// The leader's answer to this node's `ToManager::Logs` `id`.
    LogsLines {
        id: u64,
        answer: Result<protocol::control::LogsAnswer, String>,
    },
    /// The session is over (`error` says why): drop the connection. A new one is asked for
    /// with [`Event::Connect`] after the back-off.
    Down { error: String },
    /// The manager does not lead, and the next attempt goes to the `leader` it named
    /// (`None`: it named none, and the next candidate is tried). An [`Event::Down`] follows.
    Redirect { leader: Option<SocketAddr> },
    /// The managers this link tries changed (in order): keep them for the next start.
    Managers(Vec<SocketAddr>),
    /// The certificate is due for renewal: make a new key and a CSR for it, then call
    /// [`NodeSession::send_renewal`].
    MakeCsr,
    /// The manager signed the renewal's CSR: keep this certificate (and the new key) for the
    /// next connection, and say when the next renewal is due
    /// ([`NodeSession::schedule_renewal`]).
    Renewed { cert_pem: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// No connection; the next attempt is at `connect_at`.
    Idle { connect_at: Instant },
    /// The driver is connecting (QUIC's handshake has its own timeout).
    Connecting,
    /// `Hello` sent; `Welcome` expected before `stall_at`.
    Greeting { stall_at: Instant },
    /// The session is up.
    Open {
        stall_at: Instant,
        next_report: Instant,
        /// The revision of the newest snapshot of this session.
        newest: Option<u64>,
        /// The push this session holds (its number), which the next delta applies to.
        held: Option<(u64, Box<Snapshot>)>,
        /// A `Resync` was sent: deltas are ignored until a whole snapshot comes.
        resyncing: bool,
    },
}

/// A member node's side of its link to the manager.
#[derive(Debug)]
pub struct NodeSession {
    hello: ToManager,
    phase: Phase,
    /// The managers to try, and which one is next.
    candidates: Candidates,
    backoff: Duration,
    next_id: u64,
    /// Forwarded requests awaiting an answer: id → deadline. Ids grow with time and every
    /// request has the same timeout, so the first entry is always the next to expire.
    pending: BTreeMap<u64, Instant>,
    events: VecDeque<Event>,
    /// When the certificate is due for renewal (`None`: not known yet, or just renewed).
    renew_at: Option<Instant>,
    /// A renewal under way: until when its answer is awaited.
    renewing: Option<Instant>,
}

impl NodeSession {
    /// A link that starts at `now`, tries the `managers` in turn (first one first) and greets
    /// them with `hello` (`ToManager::Hello`) on every connection.
    pub fn new(now: Instant, hello: ToManager, managers: Vec<SocketAddr>) -> NodeSession {
        let own = match &hello {
            ToManager::Hello { control_addr, .. } => *control_addr,
            _ => None,
        };
        NodeSession {
            hello,
            phase: Phase::Idle { connect_at: now },
            candidates: Candidates::new(managers, own),
            backoff: RECONNECT_MIN,
            next_id: 1,
            pending: BTreeMap::new(),
            events: VecDeque::new(),
            renew_at: None,
            renewing: None,
        }
    }

    /// The certificate is due for renewal at `at` (the driver computes it with
    /// `super::renewal`; `now` for a new role). A renewal under way is left to finish.
    pub fn schedule_renewal(&mut self, at: Instant) {
        self.renew_at = Some(at);
    }

    /// Whether a renewal is under way.
    pub fn is_renewing(&self) -> bool {
        self.renewing.is_some()
    }

    /// The driver made a key and its CSR for an [`Event::MakeCsr`]: send it.
    pub fn send_renewal(&mut self, now: Instant, csr_pem: String) {
        if self.is_open() && self.renewing.is_some() {
            self.renewing = Some(now + RENEW_TIMEOUT);
            self.events
                .push_back(Event::Send(ToManager::Renew { csr_pem }));
        }
    }

    /// The driver could not make a CSR: try again later.
    pub fn renewal_failed(&mut self, now: Instant) {
        self.renewing = None;
        self.renew_at = Some(now + RENEW_RETRY);
    }

    /// The next renewal step's deadline, while the session is open.
    fn renewal_timeout(&self) -> Option<Instant> {
        if !self.is_open() {
            return None;
        }
        match self.renewing {
            Some(deadline) => Some(deadline),
            None => self.renew_at,
        }
    }

    fn handle_renewal_timeout(&mut self, now: Instant) {
        if !self.is_open() {
            return;
        }
        match self.renewing {
            Some(deadline) if now >= deadline => self.renewal_failed(now),
            Some(_) => {}
            None => {
                if self.renew_at.is_some_and(|at| now >= at) {
                    self.renewing = Some(now + RENEW_TIMEOUT);
                    self.events.push_back(Event::MakeCsr);
                }
            }
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
    }

    /// The manager of the current or last attempt (before the first, the first candidate).
    pub fn manager(&self) -> Option<SocketAddr> {
        self.candidates.current()
    }

    /// The managers this link tries, in order.
    pub fn managers(&self) -> &[SocketAddr] {
        self.candidates.list()
    }

    /// Takes in the managers `state` lists: the driver passes its last known state at start;
    /// adopted snapshots are taken in here. An [`Event::Managers`] says when they changed.
    pub fn learn_managers(&mut self, state: &ClusterState) {
        if self.candidates.learn(state) {
            let list = self.candidates.list().to_vec();
            self.events.push_back(Event::Managers(list));
        }
    }

    /// The leader is at `leader` (a follower manager learns it from the state store): unless
    /// this link is in a session with it or connecting to it, it ends what it has and
    /// connects there at once.
    pub fn retarget(&mut self, now: Instant, leader: SocketAddr) {
        let idle = matches!(self.phase, Phase::Idle { .. });
        if !idle && self.candidates.current() == Some(leader) {
            return;
        }
        self.candidates.pin(leader);
        if idle {
            self.phase = Phase::Idle { connect_at: now };
        } else {
            self.end(now, format!("the leader is at {leader}"), Duration::ZERO);
        }
    }

    /// Ends the session on purpose (the driver has a certificate with a new role to show):
    /// the next attempt goes to the same manager, after [`RECONNECT_MIN`].
    pub fn reconnect(&mut self, now: Instant, why: String) {
        if matches!(self.phase, Phase::Idle { .. }) {
            return;
        }
        if let Some(manager) = self.candidates.current() {
            self.candidates.pin(manager);
        }
        self.end(now, why, RECONNECT_MIN);
    }

    /// "the manager at ADDR", for errors.
    fn manager_name(&self) -> String {
        match self.candidates.current() {
            Some(a) => format!("the manager at {a}"),
            None => "the manager".into(),
        }
    }

    /// The next thing for the driver to do.
    pub fn poll(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`NodeSession::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match &self.phase {
            // With no manager known, only a retarget starts an attempt.
            Phase::Idle { connect_at } => self.candidates.next().map(|_| *connect_at),
            Phase::Connecting => None,
            Phase::Greeting { stall_at } => Some(*stall_at),
            Phase::Open {
                stall_at,
                next_report,
                ..
            } => Some((*stall_at).min(*next_report)),
        };
        let request = self.pending.values().next().copied();
        [phase, request, self.renewal_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((&id, &deadline)) = self.pending.iter().next() {
            if deadline > now {
                break;
            }
            self.pending.remove(&id);
            self.events.push_back(Event::Answer {
                id,
                result: Err(RequestError::TimedOut),
            });
        }
        self.handle_renewal_timeout(now);
        match &mut self.phase {
            Phase::Idle { connect_at } if now >= *connect_at => {
                if let Some(to) = self.candidates.start() {
                    self.phase = Phase::Connecting;
                    self.events.push_back(Event::Connect { to });
                }
            }
            Phase::Greeting { stall_at } if now >= *stall_at => {
                self.down(
                    now,
                    format!("no answer to Hello within {} s", STALL_AFTER.as_secs()),
                );
            }
            Phase::Open { stall_at, .. } if now >= *stall_at => {
                self.down(
                    now,
                    format!(
                        "no snapshot from the manager for {} s",
                        STALL_AFTER.as_secs()
                    ),
                );
            }
            Phase::Open { next_report, .. } if now >= *next_report => {
                *next_report += REPORT_EVERY;
                if *next_report <= now {
                    *next_report = now + REPORT_EVERY;
                }
                self.events.push_back(Event::SendReport);
            }
            _ => {}
        }
    }

    /// The driver's connection and stream are open: greet the manager.
    pub fn connected(&mut self, now: Instant) {
        if self.phase != Phase::Connecting {
            return;
        }
        self.phase = Phase::Greeting {
            stall_at: now + STALL_AFTER,
        };
        self.events.push_back(Event::Send(self.hello.clone()));
    }

    /// Connecting, reading or writing failed (`error` says how).
    pub fn connection_lost(&mut self, now: Instant, error: String) {
        if !matches!(self.phase, Phase::Idle { .. }) {
            self.down(now, error);
        }
    }

    /// A message from the manager arrived.
    pub fn handle_message(&mut self, now: Instant, msg: ToNode) {
        match (&mut self.phase, msg) {
            (Phase::Greeting { .. }, ToNode::Welcome { .. }) => {
                self.phase = Phase::Open {
                    stall_at: now + STALL_AFTER,
                    next_report: now + REPORT_EVERY,
                    newest: None,
                    held: None,
                    resyncing: false,
                };
                // A session that came up is a success: the next failure starts over.
                self.backoff = RECONNECT_MIN;
                self.events.push_back(Event::Up);
                self.events.push_back(Event::SendReport);
            }
            (Phase::Greeting { .. } | Phase::Open { .. }, ToNode::Refused { reason }) => {
                self.down(now, format!("refused: {reason}"));
            }
            // Followed in a session too: a leader that steps down can send its members to
            // its successor at once, instead of leaving them to notice its silence after
            // STALL_AFTER. Only a manager the cluster CA vouches for can say it.
            (Phase::Greeting { .. } | Phase::Open { .. }, ToNode::Redirect { leader, reason }) => {
                self.redirected(now, leader, reason);
            }
            (Phase::Greeting { .. }, _) => {
                self.down(now, "unexpected answer to Hello".into());
            }
            (
                Phase::Open {
                    stall_at,
                    newest,
                    held,
                    resyncing,
                    ..
                },
                ToNode::Snapshot { push, snapshot },
            ) => {
                *stall_at = now + STALL_AFTER;
                *resyncing = false;
                *held = Some((push, snapshot.clone()));
                // Within a session a snapshot never takes the node back; the first one of a
                // session is taken whatever its revision (it resynchronises the node).
                let revision = snapshot.state.revision;
                if newest.is_none_or(|n| revision >= n) {
                    *newest = Some(revision);
                    self.adopt(snapshot);
                }
            }
            (
                Phase::Open {
                    stall_at,
                    newest,
                    held,
                    resyncing,
                    ..
                },
                ToNode::Delta { base, push, delta },
            ) => {
                *stall_at = now + STALL_AFTER;
                match held {
                    Some((number, snap)) if *number == base => {
                        *number = push;
                        if delta.is_empty() {
                            self.events.push_back(Event::Current);
                            return;
                        }
                        delta.apply(snap);
                        let revision = snap.state.revision;
                        if newest.is_none_or(|n| revision >= n) {
                            *newest = Some(revision);
                            let snap = snap.clone();
                            self.adopt(snap);
                        }
                    }
                    _ if *resyncing => {}
                    _ => {
                        *held = None;
                        *resyncing = true;
                        self.events.push_back(Event::Send(ToManager::Resync));
                    }
                }
            }
            (Phase::Open { .. }, ToNode::Renewed { cert_pem }) if self.renewing.is_some() => {
                self.renewing = None;
                self.renew_at = None;
                self.events.push_back(Event::Renewed { cert_pem });
            }
            // An answer after its timeout finds nobody waiting (the arm below ignores it).
            (Phase::Open { .. }, ToNode::Response { id, result })
                if self.pending.contains_key(&id) =>
            {
                self.pending.remove(&id);
                self.events.push_back(Event::Answer {
                    id,
                    result: result.map_err(RequestError::Refused),
                });
            }
            (Phase::Open { .. }, ToNode::LogsFetch { id, query }) => {
                self.events.push_back(Event::LogsFetch { id, query });
            }
            (Phase::Open { .. }, ToNode::LogsLines { id, answer }) => {
                self.events.push_back(Event::LogsLines { id, answer });
            }
            // `Joined`/`Welcome` in a session, or anything without one: nothing to do.
            _ => {}
        }
    }

    /// Hands a snapshot to the driver, and the managers it names if they are news.
    fn adopt(&mut self, snap: Box<Snapshot>) {
        let learned = self.candidates.learn(&snap.state);
        self.events.push_back(Event::Snapshot(snap));
        if learned {
            let list = self.candidates.list().to_vec();
            self.events.push_back(Event::Managers(list));
        }
    }

    /// Sends `msg` (a logs question or answer) if a session is open; `false` if none is.
    pub fn send(&mut self, msg: ToManager) -> bool {
        if !self.is_open() {
            return false;
        }
        self.events.push_back(Event::Send(msg));
        true
    }

    /// Forwards a change. Its outcome comes as an [`Event::Answer`] with the returned id,
    /// unless there is no session (then it is not sent at all).
    pub fn request(&mut self, now: Instant, op: Op) -> Result<u64, RequestError> {
        if !self.is_open() {
            return Err(RequestError::NotConnected);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, now + REQUEST_TIMEOUT);
        self.events
            .push_back(Event::Send(ToManager::Request { id, op }));
        Ok(id)
    }

    /// A manager that does not lead answered: the next attempt goes to the leader it named
    /// after [`RECONNECT_MIN`] (the back-off is not doubled: nothing failed), or, if it
    /// named none (or itself), to the next candidate after the usual back-off.
    fn redirected(&mut self, now: Instant, leader: Option<SocketAddr>, reason: String) {
        let reason = match reason.as_str() {
            "" => reason,
            r => format!(": {r}"),
        };
        let by = self.candidates.current();
        match leader.filter(|l| Some(*l) != by) {
            Some(leader) => {
                self.candidates.pin(leader);
                self.events.push_back(Event::Redirect {
                    leader: Some(leader),
                });
                let error = format!("redirected to the leader at {leader}{reason}");
                self.end(now, error, RECONNECT_MIN);
            }
            None => {
                self.events.push_back(Event::Redirect { leader: None });
                let error = match leader {
                    Some(_) => format!(
                        "{} does not lead, yet names itself the leader{reason}",
                        self.manager_name()
                    ),
                    None => format!(
                        "{} does not lead and knows no leader{reason}",
                        self.manager_name()
                    ),
                };
                self.down(now, error);
            }
        }
    }

    /// The attempt or session failed: the next candidate, after the back-off.
    fn down(&mut self, now: Instant, error: String) {
        self.candidates.move_on();
        let backoff = self.backoff;
        self.backoff = (backoff * 2).min(RECONNECT_MAX);
        self.end(now, error, backoff);
    }

    /// Ends the session, or the attempt, with `error`: the next attempt is `retry_in` from
    /// `now`.
    fn end(&mut self, now: Instant, error: String, retry_in: Duration) {
        self.phase = Phase::Idle {
            connect_at: now + retry_in,
        };
        // A renewal in flight is lost with its session; it is asked again in the next one.
        if self.renewing.take().is_some() {
            self.renew_at = Some(now);
        }
        self.events.push_back(Event::Down { error });
        for id in std::mem::take(&mut self.pending).into_keys() {
            self.events.push_back(Event::Answer {
                id,
                result: Err(RequestError::Lost),
            });
        }
    }
}
