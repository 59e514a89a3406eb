//! A member node and the manager, session against session, over a simulated link on a
//! virtual clock: messages take a latency, and a test may drop, delay (and so reorder)
//! any of them, stall the manager or make it unreachable. Several managers may answer at
//! several addresses: the leader, followers that redirect, and ones that vanish. No
//! sockets, no threads, no sleeping: time only moves when [`Sim::run_until`] says so.

use super::manager::{self, Action, MemberSession, PeerCert, Roster, NAME_HELD_MIN};
use super::node::{
    self, Event, NodeSession, RequestError, RECONNECT_MAX, RECONNECT_MIN, REQUEST_TIMEOUT,
    STALL_AFTER,
};
use protocol::control::{LogsAnswer, LogsQuery, Op, OpError, Snapshot, ToManager, ToNode, VERSION};
use protocol::state::{Availability, ClusterState, Node, Role};
use protocol::types::NodeName;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LATENCY: Duration = Duration::from_millis(10);
/// The leader's control address (the roster's).
const LEADER: &str = "198.18.0.1:2377";
/// How long a QUIC connection attempt to an unreachable manager takes to fail.
const CONNECT_FAILS_AFTER: Duration = Duration::from_secs(5);

fn name(n: &str) -> NodeName {
    NodeName::new(n).unwrap()
}

fn addr(a: &str) -> SocketAddr {
    a.parse().unwrap()
}

fn hello(node: &str, version: u32) -> ToManager {
    ToManager::Hello {
        version,
        node: name(node),
        advertise_addr: Ipv4Addr::new(198, 18, 0, 2),
        data_port: 4789,
        control_addr: None,
    }
}

/// Members are managers unless listed in `workers`, and up unless listed in `down` (with
/// how long they have been down); a certificate whose serial is "revoked" is no longer
/// accepted.
struct TestRoster {
    members: BTreeSet<NodeName>,
    down: BTreeMap<NodeName, Duration>,
    workers: BTreeSet<NodeName>,
    reschedule_after: Duration,
}

impl Roster for TestRoster {
    fn join_role(&self, secret: &str) -> Option<Role> {
        match secret {
            "s3cret" => Some(Role::Worker),
            "m4nager" => Some(Role::Manager),
            _ => None,
        }
    }
    fn is_member(&self, node: &NodeName) -> bool {
        self.members.contains(node)
    }
    fn member_down_for(&self, node: &NodeName) -> Option<Duration> {
        self.is_member(node)
            .then(|| self.down.get(node).copied().unwrap_or_default())
    }
    fn reschedule_after(&self) -> Duration {
        self.reschedule_after
    }
    fn cert_allowed(&self, node: &NodeName, serial: &str) -> bool {
        self.is_member(node) && serial != "revoked"
    }
    fn state(&self) -> Arc<ClusterState> {
        let mut s = ClusterState::default();
        for (i, n) in self.members.iter().enumerate() {
            let role = if self.workers.contains(n) {
                Role::Worker
            } else {
                Role::Manager
            };
            s.nodes.insert(
                n.clone(),
                Node {
                    name: n.clone(),
                    role,
                    availability: Availability::Active,
                    advertise_addr: Some(Ipv4Addr::new(198, 18, 0, i as u8 + 1)),
                    data_port: 4789,
                    joined_at: 0,
                    control_addr: None,
                },
            );
        }
        Arc::new(s)
    }
    fn control_addr(&self) -> SocketAddr {
        addr(LEADER)
    }
}

/// A manager's certificate for `node`, as the simulated node shows it.
fn manager_cert(node: &str) -> PeerCert {
    PeerCert {
        name: node.into(),
        role: Some(Role::Manager),
        serial: "s1".into(),
    }
}

/// What answers at a manager's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// The leader: sessions open.
    Leads,
    /// A manager that does not lead: it answers the first message with a redirect to this
    /// leader.
    Follows(Option<SocketAddr>),
    /// Nothing (any address not listed): attempts fail, and a connection that was open
    /// hears nothing more.
    Gone,
}

/// What a message's trip does: arrive after this long, or never.
#[derive(Debug, Clone, Copy)]
enum Fate {
    After(Duration),
    Lost,
}

/// Something a test can look at afterwards, stamped with the virtual time since the start.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// The manager pushed a snapshot of this revision.
    Pushed(u64),
    /// The node adopted a snapshot of this revision.
    Adopted(u64),
    Connect(SocketAddr),
    Up,
    /// The node was redirected to this leader (or to none).
    Redirect(Option<SocketAddr>),
    /// The node's managers to try changed.
    Managers(Vec<SocketAddr>),
    /// The node received its renewed certificate.
    Renewed(String),
    Down(String),
    Report,
    Answer(u64, Result<u64, RequestError>),
    /// The node received the answer to its logs question `id`.
    LogsAnswer(u64),
    /// The manager received node `.0`'s answer to its logs question `.1`.
    LogsRelayed(String, u64),
}

struct Flight<T> {
    at: Instant,
    seq: u64,
    conn: u64,
    msg: T,
}

struct Sim {
    start: Instant,
    now: Instant,
    node: NodeSession,
    /// The manager's side of the current connection.
    member: Option<MemberSession>,
    /// The current connection's number; what is in flight on an older one is gone.
    conn: u64,
    connect_done: Option<Instant>,
    /// Who answers where; the leader at [`LEADER`] unless a test says otherwise.
    peers: BTreeMap<SocketAddr, Peer>,
    /// The manager at the other end of the current (or last) connection.
    serving: Option<SocketAddr>,
    /// The managers the desired state lists, with their control addresses.
    managers: BTreeMap<NodeName, SocketAddr>,
    cert_name: Option<String>,
    roster: TestRoster,
    /// The manager's desired-state revision.
    revision: u64,
    /// An unreachable manager: connection attempts fail.
    unreachable: bool,
    /// A stalled manager: it accepts messages and does nothing with them.
    stalled: bool,
    to_node: Vec<Flight<ToNode>>,
    to_manager: Vec<Flight<ToManager>>,
    seq: u64,
    downlink: Box<dyn FnMut(&ToNode) -> Fate>,
    uplink: Box<dyn FnMut(&ToManager) -> Fate>,
    seen: Vec<(Duration, Seen)>,
}

impl Sim {
    fn new() -> Sim {
        Sim::with_hello(hello("n2", VERSION), Some("n2"))
    }

    /// A node that tries the managers at `seeds`, whoever answers there.
    fn with_managers(seeds: &[&str], peers: &[(&str, Peer)]) -> Sim {
        let mut sim = Sim::new();
        sim.node = NodeSession::new(
            sim.start,
            hello("n2", VERSION),
            seeds.iter().map(|a| addr(a)).collect(),
        );
        sim.peers = peers.iter().map(|(a, p)| (addr(a), *p)).collect();
        sim
    }

    fn with_hello(hello: ToManager, cert_name: Option<&str>) -> Sim {
        let start = Instant::now();
        Sim {
            start,
            now: start,
            node: NodeSession::new(start, hello, vec![addr(LEADER)]),
            member: None,
            conn: 0,
            connect_done: None,
            peers: [(addr(LEADER), Peer::Leads)].into(),
            serving: None,
            managers: BTreeMap::new(),
            cert_name: cert_name.map(Into::into),
            roster: TestRoster {
                members: [name("n1"), name("n2")].into(),
                down: [(name("n2"), Duration::from_secs(60))].into(),
                workers: BTreeSet::new(),
                reschedule_after: Duration::from_secs(10),
            },
            revision: 1,
            unreachable: false,
            stalled: false,
            to_node: Vec::new(),
            to_manager: Vec::new(),
            seq: 0,
            downlink: Box::new(|_| Fate::After(LATENCY)),
            uplink: Box::new(|_| Fate::After(LATENCY)),
            seen: Vec::new(),
        }
    }

    fn at(&self, t: Duration) -> Instant {
        self.start + t
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn see(&mut self, s: Seen) {
        self.seen.push((self.elapsed(), s));
    }

    fn seen(&self, f: impl Fn(&Seen) -> bool) -> Vec<Duration> {
        self.seen
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(t, _)| *t)
            .collect()
    }

    fn adopted(&self) -> Vec<u64> {
        self.seen
            .iter()
            .filter_map(|(_, s)| match s {
                Seen::Adopted(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn connects(&self) -> Vec<(Duration, SocketAddr)> {
        self.seen
            .iter()
            .filter_map(|(t, s)| match s {
                Seen::Connect(to) => Some((*t, *to)),
                _ => None,
            })
            .collect()
    }

    fn peer(&self, at: SocketAddr) -> Peer {
        self.peers.get(&at).copied().unwrap_or(Peer::Gone)
    }

    /// Whether the manager at the other end hears nothing and says nothing: stalled, or
    /// gone since the connection opened.
    fn silent(&self) -> bool {
        self.stalled || self.serving.is_some_and(|a| self.peer(a) == Peer::Gone)
    }

    fn downs(&self) -> Vec<(Duration, String)> {
        self.seen
            .iter()
            .filter_map(|(t, s)| match s {
                Seen::Down(e) => Some((*t, e.clone())),
                _ => None,
            })
            .collect()
    }

    /// A change made on the manager (by its own API, say): the state moves on.
    fn change(&mut self) {
        self.revision += 1;
        if let Some(m) = self.member.as_mut() {
            m.state_changed(&self.roster);
        }
        self.settle();
    }

    /// An operator's change on the node; returns its id.
    fn request(&mut self) -> Result<u64, RequestError> {
        let r = self.node.request(
            self.now,
            Op::ScaleService {
                name: "web".into(),
                replicas: 3,
            },
        );
        self.settle();
        r
    }

    fn snapshot(&self) -> ToNode {
        let mut state = ClusterState {
            revision: self.revision,
            ..ClusterState::default()
        };
        for (name, control) in &self.managers {
            state.nodes.insert(
                name.clone(),
                Node {
                    name: name.clone(),
                    role: Role::Manager,
                    availability: Availability::Active,
                    advertise_addr: None,
                    data_port: 4789,
                    joined_at: 0,
                    control_addr: Some(*control),
                },
            );
        }
        ToNode::Snapshot {
            push: self.revision,
            snapshot: Box::new(Snapshot {
                state: state.into(),
                statuses: Default::default(),
                health: Default::default(),
                keys: Default::default(),
            }),
        }
    }

    fn send_down(&mut self, msg: ToNode) {
        if let Fate::After(d) = (self.downlink)(&msg) {
            self.seq += 1;
            self.to_node.push(Flight {
                at: self.now + d,
                seq: self.seq,
                conn: self.conn,
                msg,
            });
        }
    }

    fn send_up(&mut self, msg: ToManager) {
        if let Fate::After(d) = (self.uplink)(&msg) {
            self.seq += 1;
            self.to_manager.push(Flight {
                at: self.now + d,
                seq: self.seq,
                conn: self.conn,
                msg,
            });
        }
    }

    /// Does everything both sides asked for, until neither asks for more.
    fn settle(&mut self) {
        loop {
            let mut busy = false;
            while let Some(e) = self.node.poll() {
                busy = true;
                self.node_event(e);
            }
            while let Some(a) = self.member.as_mut().and_then(|m| m.poll()) {
                busy = true;
                self.member_action(a);
            }
            if !busy {
                return;
            }
        }
    }

    fn node_event(&mut self, e: Event) {
        match e {
            Event::Connect { to } => {
                self.see(Seen::Connect(to));
                self.serving = Some(to);
                let after = if self.unreachable || self.peer(to) == Peer::Gone {
                    CONNECT_FAILS_AFTER
                } else {
                    LATENCY
                };
                self.connect_done = Some(self.now + after);
            }
            Event::Redirect { leader } => self.see(Seen::Redirect(leader)),
            Event::Managers(list) => self.see(Seen::Managers(list)),
            Event::Send(msg) => self.send_up(msg),
            Event::SendReport => {
                self.see(Seen::Report);
                self.send_up(ToManager::Report { statuses: vec![] })
            }
            Event::Up => self.see(Seen::Up),
            Event::Current => {}
            Event::Snapshot(s) => self.see(Seen::Adopted(s.state.revision)),
            Event::Answer { id, result } => self.see(Seen::Answer(id, result)),
            Event::MakeCsr => {
                let now = self.now;
                self.node.send_renewal(now, "csr".into());
            }
            Event::Renewed { cert_pem } => self.see(Seen::Renewed(cert_pem)),
            Event::LogsFetch { id, .. } => self.send_up(ToManager::LogsLines {
                id,
                answer: Ok(LogsAnswer::default()),
            }),
            Event::LogsLines { id, .. } => self.see(Seen::LogsAnswer(id)),
            Event::Down { error } => {
                self.see(Seen::Down(error));
                // The connection is dropped (or its attempt): the manager's side goes, and
                // what is in flight.
                self.member = None;
                self.connect_done = None;
                self.conn += 1;
            }
        }
    }

    fn member_action(&mut self, a: Action) {
        let now = self.now;
        let Some(m) = self.member.as_mut() else {
            return;
        };
        match a {
            Action::Send(msg) => self.send_down(msg),
            Action::PushSnapshot | Action::Resync => {
                self.see(Seen::Pushed(self.revision));
                let s = self.snapshot();
                self.send_down(s);
            }
            Action::Join { node, .. } => m.joined(format!("cert of {node}"), "ca".into()),
            Action::Admit { .. } => m.admitted(now),
            Action::Apply { id, .. } => {
                self.revision += 1;
                m.applied(id, Ok(self.revision));
                m.state_changed(&self.roster);
            }
            Action::Refuse { reason } => self.send_down(ToNode::Refused { reason }),
            Action::Close { .. } => self.member = None,
            Action::Up { .. } | Action::Heartbeat { .. } | Action::Ignored { .. } => {}
            Action::Renew { node, .. } => m.renewed(format!("renewed cert of {node}")),
            Action::Logs { id, .. } => self.send_down(ToNode::LogsLines {
                id,
                answer: Ok(LogsAnswer::default()),
            }),
            Action::LogsLines { node, id, .. } => self.see(Seen::LogsRelayed(node.to_string(), id)),
        }
    }

    /// Moves the virtual clock to `t` (since the start), handling everything due on the way
    /// in time order.
    fn run_until(&mut self, t: Duration) {
        let end = self.at(t);
        loop {
            self.settle();
            // A stalled manager's timers never fire.
            let member = self.member.as_ref().filter(|_| !self.silent());
            let next = [
                self.node.poll_timeout(),
                member.and_then(|m| m.poll_timeout()),
                self.connect_done,
                self.to_node.iter().map(|f| f.at).min(),
                self.to_manager.iter().map(|f| f.at).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next.filter(|n| *n <= end) else {
                self.now = end;
                return;
            };
            self.now = self.now.max(next);
            self.step();
        }
    }

    fn step(&mut self) {
        let now = self.now;
        if self.connect_done.is_some_and(|t| t <= now) {
            self.connect_done = None;
            let peer = self.serving.map_or(Peer::Gone, |a| self.peer(a));
            if self.unreachable || peer == Peer::Gone {
                self.node
                    .connection_lost(now, "connecting: timed out".into());
            } else {
                self.conn += 1;
                let cert = self.cert_name.as_deref().map(manager_cert);
                // A follower runs no member session: it only redirects.
                self.member = (peer == Peer::Leads).then(|| MemberSession::new(now, cert));
                self.node.connected(now);
            }
            return;
        }
        if let Some(i) = due(&self.to_manager, now) {
            let f = self.to_manager.remove(i);
            if f.conn == self.conn && !self.silent() {
                if let Some(m) = self.member.as_mut() {
                    m.handle_message(f.msg, &self.roster);
                } else if let Some(Peer::Follows(leader)) = self.serving.map(|a| self.peer(a)) {
                    self.send_down(ToNode::Redirect {
                        leader,
                        reason: "this manager follows".into(),
                    });
                }
            }
            return;
        }
        if let Some(i) = due(&self.to_node, now) {
            let f = self.to_node.remove(i);
            if f.conn == self.conn {
                self.node.handle_message(now, f.msg);
            }
            return;
        }
        if !self.silent() {
            if let Some(m) = self.member.as_mut() {
                m.handle_timeout(now);
            }
        }
        self.node.handle_timeout(now);
    }
}

/// The earliest flight due at `now` (by arrival, then by sending order).
fn due<T>(flights: &[Flight<T>], now: Instant) -> Option<usize> {
    flights
        .iter()
        .enumerate()
        .filter(|(_, f)| f.at <= now)
        .min_by_key(|(_, f)| (f.at, f.seq))
        .map(|(i, _)| i)
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[test]
fn a_session_comes_up_and_snapshots_come_every_second() {
    let mut sim = Sim::new();
    sim.run_until(ms(10000));
    // Connect (10 ms), Hello (10 ms), Welcome and the first snapshot (10 ms).
    assert_eq!(sim.seen(|s| *s == Seen::Up), vec![ms(30)]);
    assert_eq!(sim.downs(), vec![]);
    let pushes = sim.seen(|s| matches!(s, Seen::Pushed(_)));
    let expected: Vec<_> = (0..10).map(|i| ms(20 + 1000 * i)).collect();
    assert_eq!(pushes, expected, "at admission, then every PUSH_EVERY");
    assert!(sim.adopted().iter().all(|r| *r == 1));
    // A heartbeat at once, then every second.
    let reports = sim.seen(|s| *s == Seen::Report);
    let expected: Vec<_> = (0..10).map(|i| ms(30 + 1000 * i)).collect();
    assert_eq!(reports, expected);
    assert!(sim.node.is_open());
}

#[test]
fn a_certificate_is_renewed_over_the_session_without_interrupting_it() {
    let mut sim = Sim::new();
    sim.run_until(ms(1000));
    sim.node.schedule_renewal(sim.start + ms(2500));
    sim.run_until(ms(5000));
    // Due at 2.5 s: the CSR goes up (10 ms), the certificate comes down (10 ms).
    assert_eq!(sim.seen(|s| matches!(s, Seen::Renewed(_))), vec![ms(2520)]);
    assert_eq!(sim.downs(), vec![]);
    assert!(sim.node.is_open() && !sim.node.is_renewing());
    // Snapshots kept coming throughout.
    let pushes = sim.seen(|s| matches!(s, Seen::Pushed(_)));
    assert_eq!(pushes.len(), 5);
}

#[test]
fn an_unanswered_renewal_is_tried_again() {
    let mut sim = Sim::new();
    sim.run_until(ms(1000));
    // The CSR is lost, then the session with it (the manager stops answering).
    sim.uplink = Box::new(|m| match m {
        ToManager::Renew { .. } => Fate::Lost,
        _ => Fate::After(LATENCY),
    });
    sim.node.schedule_renewal(sim.start + ms(1100));
    sim.run_until(ms(1200));
    assert!(sim.node.is_renewing());
    sim.uplink = Box::new(|_| Fate::After(LATENCY));
    // Unanswered for RENEW_TIMEOUT: tried again RENEW_RETRY later, and this time answered.
    sim.run_until(ms(20000));
    let renewed = sim.seen(|s| matches!(s, Seen::Renewed(_)));
    assert_eq!(renewed, vec![ms(1100 + 10_000 + 5_000 + 20)]);
    assert_eq!(sim.downs(), vec![]);
}

#[test]
fn logs_questions_and_answers_travel_in_a_session_and_only_in_one() {
    let mut sim = Sim::new();
    let query = LogsQuery {
        service: "web".into(),
        node: NodeName::new("n1").unwrap(),
        tail: None,
        timestamps: false,
        from: BTreeMap::new(),
    };
    // Before the session is up nothing is sent: the asker is told at once.
    assert!(!sim.node.send(ToManager::Logs {
        id: 0,
        query: query.clone()
    }));
    sim.run_until(ms(1000));
    // The node asks; the leader answers (10 ms each way).
    assert!(sim.node.send(ToManager::Logs { id: 7, query }));
    sim.run_until(ms(1100));
    assert_eq!(sim.seen(|s| *s == Seen::LogsAnswer(7)), vec![ms(1020)]);
    // The leader asks the node; the node's answer names it.
    sim.send_down(ToNode::LogsFetch {
        id: 3,
        query: LogsQuery {
            service: "web".into(),
            node: NodeName::new("n2").unwrap(),
            tail: Some(1),
            timestamps: false,
            from: BTreeMap::new(),
        },
    });
    sim.run_until(ms(1200));
    assert_eq!(
        sim.seen(|s| *s == Seen::LogsRelayed("n2".into(), 3)),
        vec![ms(1120)]
    );
    assert_eq!(sim.downs(), vec![]);
}

#[test]
fn a_change_is_pushed_at_once_without_moving_the_periodic_push() {
    let mut sim = Sim::new();
    sim.run_until(ms(1500));
    sim.change();
    assert_eq!(sim.seen.last(), Some(&(ms(1500), Seen::Pushed(2))));
    sim.run_until(ms(1520));
    assert_eq!(sim.adopted().last(), Some(&2));
    sim.run_until(ms(3000));
    let pushes = sim.seen(|s| matches!(s, Seen::Pushed(_)));
    assert_eq!(
        pushes,
        vec![ms(20), ms(1020), ms(1500), ms(2020)],
        "the change's push came on top of the periodic ones"
    );
}

#[test]
fn a_lost_snapshot_is_recovered_by_the_next_periodic_push() {
    let mut sim = Sim::new();
    sim.run_until(ms(1500));
    let mut lost = false;
    sim.downlink = Box::new(move |m| match m {
        ToNode::Snapshot { snapshot: s, .. } if s.state.revision == 2 && !lost => {
            lost = true;
            Fate::Lost
        }
        _ => Fate::After(LATENCY),
    });
    sim.change();
    sim.run_until(ms(2000));
    assert_eq!(sim.adopted().last(), Some(&1), "the change's push was lost");
    sim.run_until(ms(2100));
    let t = sim.seen(|s| *s == Seen::Adopted(2));
    assert_eq!(
        t.first(),
        Some(&ms(2030)),
        "the next periodic push brings it"
    );
}

#[test]
fn reordered_snapshots_never_move_a_node_backwards() {
    let mut sim = Sim::new();
    sim.run_until(ms(1000));
    // Each snapshot takes less time than the one before: they arrive in reverse order.
    let mut delay = 500u64;
    sim.downlink = Box::new(move |m| match m {
        ToNode::Snapshot { .. } => {
            delay = delay.saturating_sub(100);
            Fate::After(Duration::from_millis(delay + 10))
        }
        _ => Fate::After(LATENCY),
    });
    for i in 0..4 {
        sim.run_until(ms(1050 + 10 * i));
        sim.change();
    }
    sim.run_until(ms(3000));
    let adopted = sim.adopted();
    assert!(
        adopted.windows(2).all(|w| w[0] <= w[1]),
        "went backwards: {adopted:?}"
    );
    assert_eq!(adopted.last(), Some(&5));
    // Revisions 2 to 4 arrived after 5 and were ignored.
    for r in 2..5 {
        assert!(!adopted.contains(&r), "{r} adopted: {adopted:?}");
    }
}

#[test]
fn the_first_snapshot_of_a_new_session_resynchronises_whatever_its_revision() {
    let mut sim = Sim::new();
    sim.run_until(ms(1000));
    sim.change();
    sim.run_until(ms(2000));
    assert_eq!(sim.adopted().last(), Some(&2));
    // The manager comes back from a backup, behind: the node follows it.
    sim.node
        .connection_lost(sim.now, "stream read: connection lost".into());
    sim.revision = 1;
    sim.run_until(ms(3000));
    assert_eq!(sim.adopted().last(), Some(&1));
}

#[test]
fn a_forwarded_request_is_answered_with_its_revision() {
    let mut sim = Sim::new();
    sim.run_until(ms(1000));
    let id = sim.request().unwrap();
    sim.run_until(ms(1100));
    let answers = sim.seen(|s| *s == Seen::Answer(id, Ok(2)));
    assert_eq!(answers, vec![ms(1020)]);
    // The snapshot holding the change was pushed as it was applied.
    assert_eq!(
        sim.seen(|s| *s == Seen::Adopted(2)).first(),
        Some(&ms(1020))
    );
}

#[test]
fn a_request_whose_answer_is_lost_times_out() {
    let mut sim = Sim::new();
    sim.run_until(ms(1000));
    sim.downlink = Box::new(|m| match m {
        ToNode::Response { .. } => Fate::Lost,
        _ => Fate::After(LATENCY),
    });
    let id = sim.request().unwrap();
    sim.run_until(ms(20000));
    let answers: Vec<_> = sim
        .seen
        .iter()
        .filter(|(_, s)| matches!(s, Seen::Answer(..)))
        .cloned()
        .collect();
    assert_eq!(
        answers,
        vec![(
            ms(1000) + REQUEST_TIMEOUT,
            Seen::Answer(id, Err(RequestError::TimedOut))
        )]
    );
    // The change itself was applied; the session stays up (snapshots still come).
    assert_eq!(sim.adopted().last(), Some(&2));
    assert_eq!(sim.downs(), vec![]);
}

#[test]
fn a_late_answer_finds_nobody_waiting() {
    let mut sim = Sim::new();
    sim.run_until(ms(1000));
    sim.downlink = Box::new(|m| match m {
        ToNode::Response { .. } => Fate::After(REQUEST_TIMEOUT + ms(1000)),
        _ => Fate::After(LATENCY),
    });
    let id = sim.request().unwrap();
    sim.run_until(ms(15000));
    let answers = sim.seen(|s| matches!(s, Seen::Answer(..)));
    assert_eq!(answers.len(), 1);
    assert!(sim
        .seen
        .contains(&(ms(11000), Seen::Answer(id, Err(RequestError::TimedOut)))));
}

#[test]
fn a_request_without_a_session_is_not_sent() {
    let mut sim = Sim::new();
    assert_eq!(sim.request(), Err(RequestError::NotConnected));
    sim.run_until(ms(1000));
    assert!(sim.request().is_ok());
}

#[test]
fn pending_requests_are_lost_with_their_session() {
    let mut sim = Sim::new();
    sim.run_until(ms(1000));
    sim.stalled = true;
    let a = sim.request().unwrap();
    let b = sim.request().unwrap();
    assert_ne!(a, b);
    sim.run_until(ms(10000));
    let lost = sim.seen(|s| matches!(s, Seen::Answer(_, Err(RequestError::Lost))));
    assert_eq!(lost.len(), 2);
    let (down_at, _) = sim.downs()[0];
    assert!(lost.iter().all(|t| *t == down_at));
}

#[test]
fn a_stalled_manager_is_detected_within_the_limit_and_left() {
    let mut sim = Sim::new();
    sim.run_until(ms(2000));
    let last = *sim.seen(|s| matches!(s, Seen::Adopted(_))).last().unwrap();
    // The connection stays up (QUIC would keep it alive) but the manager's side is stuck.
    sim.stalled = true;
    sim.run_until(ms(10000));
    let downs = sim.downs();
    assert_eq!(
        downs[0],
        (
            last + STALL_AFTER,
            "no snapshot from the manager for 5 s".into()
        )
    );
    // It reconnects after the back-off; the manager is still stuck, so Hello goes unanswered.
    let connects = sim.seen(|s| matches!(s, Seen::Connect(_)));
    assert_eq!(connects[1], downs[0].0 + RECONNECT_MIN);
    sim.stalled = false;
    sim.run_until(ms(30000));
    assert!(sim.node.is_open(), "{:?}", sim.downs());
    assert!(sim
        .downs()
        .iter()
        .any(|(_, e)| e == "no answer to Hello within 5 s"));
}

#[test]
fn reconnects_back_off_from_half_a_second_to_five_and_start_over_after_a_session() {
    let mut sim = Sim::new();
    sim.unreachable = true;
    sim.run_until(ms(60000));
    let connects = sim.seen(|s| matches!(s, Seen::Connect(_)));
    let waits: Vec<Duration> = connects
        .windows(2)
        .map(|w| w[1] - w[0] - CONNECT_FAILS_AFTER)
        .collect();
    assert_eq!(
        &waits[..6],
        &[
            ms(500),
            ms(1000),
            ms(2000),
            ms(4000),
            RECONNECT_MAX,
            RECONNECT_MAX
        ]
    );
    // The manager is back: a session comes up, then is lost; the back-off starts over.
    sim.unreachable = false;
    sim.run_until(ms(80000));
    assert!(sim.node.is_open());
    sim.node
        .connection_lost(sim.now, "stream read: reset".into());
    sim.run_until(ms(81000));
    let connects = sim.seen(|s| matches!(s, Seen::Connect(_)));
    assert_eq!(*connects.last().unwrap(), ms(80000) + RECONNECT_MIN);
}

#[test]
fn a_refused_hello_brings_the_session_down_with_the_reason() {
    let old = format!("control protocol version 1 is not this manager's {VERSION}");
    for (hello, cert, reason) in [
        (hello("n2", 1), Some("n2"), old.as_str()),
        (
            hello("n2", VERSION),
            Some("n3"),
            "certificate is for n3, not n2",
        ),
        (
            hello("n2", VERSION),
            None,
            "a member session needs a cluster certificate",
        ),
        (
            hello("n9", VERSION),
            Some("n9"),
            "n9 is not a member of this cluster",
        ),
    ] {
        let mut sim = Sim::with_hello(hello, cert);
        sim.run_until(ms(200));
        assert_eq!(sim.downs(), vec![(ms(30), format!("refused: {reason}"))]);
        assert!(sim.seen(|s| matches!(s, Seen::Pushed(_))).is_empty());
    }
}

const FOLLOWER: &str = "198.18.0.5:2377";
const OTHER: &str = "198.18.0.6:2377";

#[test]
fn a_node_redirected_by_a_follower_reaches_the_leader_within_reconnect_min_and_a_round_trip() {
    let mut sim = Sim::with_managers(
        &[FOLLOWER],
        &[
            (FOLLOWER, Peer::Follows(Some(addr(LEADER)))),
            (LEADER, Peer::Leads),
        ],
    );
    sim.run_until(ms(2000));
    // Connect (10 ms), Hello (10 ms), the redirect (10 ms).
    assert_eq!(
        sim.downs(),
        vec![(
            ms(30),
            format!("redirected to the leader at {LEADER}: this manager follows")
        )]
    );
    assert!(sim
        .seen
        .contains(&(ms(30), Seen::Redirect(Some(addr(LEADER))))));
    // Then the leader, after RECONNECT_MIN: connect, Hello, Welcome.
    assert_eq!(
        sim.connects(),
        vec![
            (ms(0), addr(FOLLOWER)),
            (ms(30) + RECONNECT_MIN, addr(LEADER))
        ]
    );
    let up = ms(30) + RECONNECT_MIN + 3 * LATENCY;
    assert_eq!(sim.seen(|s| *s == Seen::Up), vec![up]);
    assert_eq!(sim.node.manager(), Some(addr(LEADER)));
    assert!(sim.node.is_open());
}

#[test]
fn redirects_are_followed_without_doubling_the_back_off() {
    // Two followers, the first one's view behind the second's.
    let mut sim = Sim::with_managers(
        &[FOLLOWER],
        &[
            (FOLLOWER, Peer::Follows(Some(addr(OTHER)))),
            (OTHER, Peer::Follows(Some(addr(LEADER)))),
            (LEADER, Peer::Leads),
        ],
    );
    sim.run_until(ms(3000));
    let hop = RECONNECT_MIN + 3 * LATENCY;
    assert_eq!(
        sim.connects(),
        vec![
            (ms(0), addr(FOLLOWER)),
            (hop, addr(OTHER)),
            (hop * 2, addr(LEADER))
        ]
    );
    assert_eq!(sim.seen(|s| *s == Seen::Up), vec![hop * 2 + 3 * LATENCY]);
}

#[test]
fn a_follower_that_names_no_leader_sends_the_node_to_the_next_candidate() {
    for (leader, error) in [
        (
            None,
            format!(
                "the manager at {FOLLOWER} does not lead and knows no leader: this manager follows"
            ),
        ),
        (
            Some(addr(FOLLOWER)),
            format!(
                "the manager at {FOLLOWER} does not lead, yet names itself the leader: this \
                 manager follows"
            ),
        ),
    ] {
        let mut sim = Sim::with_managers(
            &[FOLLOWER, LEADER],
            &[(FOLLOWER, Peer::Follows(leader)), (LEADER, Peer::Leads)],
        );
        sim.run_until(ms(2000));
        assert_eq!(sim.downs(), vec![(ms(30), error)]);
        assert!(sim.seen.contains(&(ms(30), Seen::Redirect(None))));
        // The usual back-off, to the next candidate.
        assert_eq!(
            sim.connects(),
            vec![
                (ms(0), addr(FOLLOWER)),
                (ms(30) + RECONNECT_MIN, addr(LEADER))
            ]
        );
        assert!(sim.node.is_open());
    }
}

#[test]
fn a_node_fails_over_to_a_manager_it_learned_when_its_manager_vanishes() {
    // The node was given the leader only; the state lists a second manager.
    let mut sim = Sim::with_managers(
        &[LEADER],
        &[
            (LEADER, Peer::Leads),
            (OTHER, Peer::Follows(Some(addr(LEADER)))),
        ],
    );
    sim.managers = [(name("n1"), addr(LEADER)), (name("n3"), addr(OTHER))].into();
    sim.run_until(ms(2000));
    // Learned from the first snapshot, once.
    let list = vec![addr(LEADER), addr(OTHER)];
    assert_eq!(sim.seen(|s| matches!(s, Seen::Managers(_))), vec![ms(30)]);
    assert!(sim.seen.contains(&(ms(30), Seen::Managers(list.clone()))));
    assert_eq!(sim.node.managers(), &list[..]);
    // The leader's host vanishes; the other manager takes over.
    let last = *sim.seen(|s| matches!(s, Seen::Adopted(_))).last().unwrap();
    sim.peers.insert(addr(LEADER), Peer::Gone);
    sim.peers.insert(addr(OTHER), Peer::Leads);
    sim.run_until(ms(20000));
    let down = last + STALL_AFTER;
    assert_eq!(
        sim.downs(),
        vec![(down, "no snapshot from the manager for 5 s".into())]
    );
    assert_eq!(
        sim.connects().last(),
        Some(&(down + RECONNECT_MIN, addr(OTHER)))
    );
    let up = *sim.seen(|s| *s == Seen::Up).last().unwrap();
    assert_eq!(up, down + RECONNECT_MIN + 3 * LATENCY);
    assert!(up - last <= STALL_AFTER + RECONNECT_MIN + 3 * LATENCY);
    assert!(sim.node.is_open());
    assert_eq!(sim.node.manager(), Some(addr(OTHER)));
}

#[test]
fn an_unreachable_manager_is_passed_over_for_the_next_one() {
    let mut sim = Sim::with_managers(&[OTHER, LEADER], &[(LEADER, Peer::Leads)]);
    sim.run_until(ms(10000));
    assert_eq!(
        sim.connects(),
        vec![
            (ms(0), addr(OTHER)),
            (CONNECT_FAILS_AFTER + RECONNECT_MIN, addr(LEADER))
        ]
    );
    assert!(sim.node.is_open());
}

#[test]
fn a_leader_that_steps_down_sends_its_members_on_at_once() {
    let mut sim = Sim::with_managers(&[LEADER], &[(LEADER, Peer::Leads), (OTHER, Peer::Leads)]);
    sim.run_until(ms(1000));
    let pending = sim.request().unwrap();
    sim.send_down(ToNode::Redirect {
        leader: Some(addr(OTHER)),
        reason: "n1 steps down".into(),
    });
    sim.run_until(ms(2000));
    assert_eq!(
        sim.downs(),
        vec![(
            ms(1010),
            format!("redirected to the leader at {OTHER}: n1 steps down")
        )]
    );
    assert!(sim
        .seen
        .contains(&(ms(1010), Seen::Answer(pending, Err(RequestError::Lost)))));
    assert_eq!(
        sim.connects().last(),
        Some(&(ms(1010) + RECONNECT_MIN, addr(OTHER)))
    );
    assert!(sim.node.is_open());
}

#[test]
fn retargeting_moves_to_the_leader_at_once_unless_already_there() {
    let mut sim = Sim::with_managers(
        &[LEADER, OTHER],
        &[(LEADER, Peer::Leads), (OTHER, Peer::Leads)],
    );
    sim.run_until(ms(1000));
    // Already in a session with it: nothing happens.
    sim.node.retarget(sim.now, addr(LEADER));
    sim.run_until(ms(1500));
    assert_eq!(sim.downs(), vec![]);
    // A session with another manager is left at once, without back-off.
    sim.node.retarget(sim.now, addr(OTHER));
    sim.run_until(ms(2000));
    assert_eq!(
        sim.downs(),
        vec![(ms(1500), format!("the leader is at {OTHER}"))]
    );
    assert_eq!(sim.connects().last(), Some(&(ms(1500), addr(OTHER))));
    assert_eq!(sim.seen(|s| *s == Seen::Up).last(), Some(&ms(1530)));
    sim.node.retarget(sim.now, addr(LEADER));
    sim.run_until(ms(2100));
    assert_eq!(sim.connects().last(), Some(&(ms(2000), addr(LEADER))));
    // An attempt stuck on a vanished manager (it would take CONNECT_FAILS_AFTER to fail)
    // is dropped for the leader at once too.
    sim.peers.insert(addr(LEADER), Peer::Gone);
    sim.peers.insert(addr(OTHER), Peer::Gone);
    sim.node
        .connection_lost(sim.now, "stream read: reset".into());
    sim.run_until(ms(3000));
    assert_eq!(sim.connects().last(), Some(&(ms(2600), addr(OTHER))));
    sim.peers.insert(addr(LEADER), Peer::Leads);
    sim.node.retarget(sim.now, addr(LEADER));
    sim.run_until(ms(3100));
    assert_eq!(sim.connects().last(), Some(&(ms(3000), addr(LEADER))));
    assert_eq!(sim.seen(|s| *s == Seen::Up).last(), Some(&ms(3030)));
    assert!(sim.node.is_open());
}

#[test]
fn reconnecting_for_a_new_certificate_stays_with_the_manager() {
    let mut sim = Sim::with_managers(
        &[LEADER, OTHER],
        &[(LEADER, Peer::Leads), (OTHER, Peer::Leads)],
    );
    sim.run_until(ms(1000));
    sim.node.reconnect(sim.now, "a new certificate".into());
    sim.run_until(ms(2000));
    assert_eq!(
        sim.connects().last(),
        Some(&(ms(1000) + RECONNECT_MIN, addr(LEADER)))
    );
    assert!(sim.node.is_open());
}

/// The manager's side alone: what it makes of first messages.
mod first_message {
    use super::*;

    fn roster() -> TestRoster {
        TestRoster {
            members: [name("n1"), name("n2"), name("n3"), name("n5")].into(),
            // n3 is long gone; n5 has been down for half a minute.
            down: [
                (name("n3"), Duration::from_secs(3600)),
                (name("n5"), Duration::from_secs(30)),
            ]
            .into(),
            workers: [name("n2"), name("n3"), name("n5")].into(),
            reschedule_after: Duration::from_secs(10),
        }
    }

    fn actions(m: &mut MemberSession) -> Vec<Action> {
        std::iter::from_fn(|| m.poll()).collect()
    }

    fn refusal(cert: Option<&str>, msg: ToManager) -> Vec<Action> {
        let mut m = MemberSession::new(Instant::now(), cert.map(Into::into));
        m.handle_message(msg, &roster());
        assert!(m.is_closed());
        actions(&mut m)
    }

    fn join(version: u32, node: &str, secret: &str) -> ToManager {
        ToManager::Join {
            version,
            node: name(node),
            advertise_addr: Ipv4Addr::new(198, 18, 0, 3),
            data_port: 4789,
            secret: secret.into(),
            csr_pem: "csr".into(),
        }
    }

    fn refuse(reason: &str) -> Vec<Action> {
        vec![Action::Refuse {
            reason: reason.into(),
        }]
    }

    #[test]
    fn joins_are_checked_in_order() {
        assert_eq!(
            refusal(None, join(1, "n3", "bad")),
            refuse(&format!(
                "control protocol version 1 is not this manager's {VERSION}"
            ))
        );
        assert_eq!(
            refusal(None, join(VERSION, "n3", "bad")),
            refuse("invalid join token")
        );
        assert_eq!(
            refusal(None, join(VERSION, "n2", "s3cret")),
            refuse(
                "node name n2 is in use by a live member; to give it to a new node, remove \
                 the member first: overlayctl node rm n2"
            )
        );
        let mut m = MemberSession::new(Instant::now(), None);
        m.handle_message(join(VERSION, "n3", "s3cret"), &roster());
        assert_eq!(
            actions(&mut m),
            vec![Action::Join {
                node: name("n3"),
                role: Role::Worker,
                advertise_addr: Ipv4Addr::new(198, 18, 0, 3),
                data_port: 4789,
                csr_pem: "csr".into(),
            }]
        );
        m.joined("cert".into(), "ca".into());
        assert_eq!(
            actions(&mut m),
            vec![Action::Send(ToNode::Joined {
                cert_pem: "cert".into(),
                ca_pem: "ca".into()
            })]
        );
        assert!(m.is_closed());
    }

    /// A token holder cannot take the name of a member that is merely restarting or
    /// rebooting: a down member keeps it for the longer of the reschedule grace and ten
    /// minutes (or until `node rm`).
    #[test]
    fn a_member_keeps_its_name_until_long_down() {
        let refused = |roster: &TestRoster, node: &str| {
            let mut m = MemberSession::new(Instant::now(), None);
            m.handle_message(join(VERSION, node, "s3cret"), roster);
            match &actions(&mut m)[..] {
                [Action::Refuse { reason }] => Some(reason.clone()),
                [Action::Join { .. }] => None,
                other => panic!("{other:?}"),
            }
        };
        let mut r = roster();
        assert_eq!(
            refused(&r, "n5").as_deref(),
            Some(
                "node name n5 is in use by a member down for 30 s (a down member keeps its \
                 name for 10 min); to give it to a new node, remove the member first: \
                 overlayctl node rm n5"
            )
        );
        // Long gone (an hour): its name may be taken.
        assert_eq!(refused(&r, "n3"), None);
        // Just past the bound, and not before.
        r.down.insert(name("n5"), NAME_HELD_MIN);
        assert_eq!(refused(&r, "n5"), None);
        r.down
            .insert(name("n5"), NAME_HELD_MIN - Duration::from_secs(1));
        assert!(refused(&r, "n5").is_some());
        // A reschedule grace longer than the bound holds the name as long.
        r.reschedule_after = Duration::from_secs(2 * 3600);
        let reason = refused(&r, "n3").expect("held while its tasks are its own");
        assert!(reason.contains("down for 60 min"), "{reason}");
        assert!(reason.contains("keeps its name for 120 min"), "{reason}");
        // Removed (`node rm`): no member holds it.
        r.members.remove(&name("n3"));
        assert_eq!(refused(&r, "n3"), None);
        // This manager's own name is never down.
        assert!(refused(&r, "n1").is_some_and(|e| e.contains("a live member")));
    }

    #[test]
    fn the_manager_token_joins_a_manager() {
        let mut m = MemberSession::new(Instant::now(), None);
        m.handle_message(join(VERSION, "n4", "m4nager"), &roster());
        assert!(matches!(
            &actions(&mut m)[..],
            [Action::Join {
                role: Role::Manager,
                ..
            }]
        ));
    }

    #[test]
    fn a_removed_or_replaced_certificate_opens_no_session() {
        let revoked = PeerCert {
            serial: "revoked".into(),
            ..PeerCert::from("n2")
        };
        let mut m = MemberSession::new(Instant::now(), Some(revoked));
        m.handle_message(hello("n2", VERSION), &roster());
        assert_eq!(
            actions(&mut m),
            refuse(
                "this certificate of n2 is no longer accepted (the node was removed, or \
                 joined again): join with a token"
            )
        );
    }

    /// Opens a session for `cert` and sends `op` in it; returns what the session asks.
    fn request_from(cert: PeerCert, op: Op) -> Vec<Action> {
        let t0 = Instant::now();
        let node = cert.name.clone();
        let mut m = MemberSession::new(t0, Some(cert));
        m.handle_message(hello(&node, VERSION), &roster());
        m.admitted(t0);
        let _ = actions(&mut m);
        m.handle_message(ToManager::Request { id: 3, op }, &roster());
        actions(&mut m)
    }

    #[test]
    fn a_worker_certificate_cannot_change_the_cluster() {
        let op = Op::RemoveService("web".into());
        let refused = vec![Action::Send(ToNode::Response {
            id: 3,
            result: Err(OpError {
                status: 403,
                message: "this node is a worker: changes are made on a manager \
                          (n1 at 198.18.0.1:2377)"
                    .into(),
            }),
        })];
        // A worker's certificate, and one from before roles (no role): refused.
        let worker = PeerCert {
            role: Some(Role::Worker),
            ..PeerCert::from("n2")
        };
        assert_eq!(request_from(worker, op.clone()), refused);
        assert_eq!(request_from("n2".into(), op.clone()), refused);
        // A manager's certificate for a node the state says is a worker (demoted): refused.
        assert_eq!(request_from(manager_cert("n2"), op.clone()), refused);
        // A manager's certificate for a manager: applied.
        assert_eq!(
            request_from(manager_cert("n1"), op.clone()),
            vec![Action::Apply { id: 3, op }]
        );
    }

    #[test]
    fn a_removed_member_is_refused_and_gets_no_more_snapshots() {
        let t0 = Instant::now();
        let mut m = MemberSession::new(t0, Some("n3".into()));
        m.handle_message(hello("n3", VERSION), &roster());
        m.admitted(t0);
        let _ = actions(&mut m);
        m.state_changed(&roster());
        assert_eq!(actions(&mut m), vec![Action::PushSnapshot]);
        let mut removed = roster();
        removed.members.remove(&name("n3"));
        m.state_changed(&removed);
        assert_eq!(actions(&mut m), refuse("n3 was removed from the cluster"));
        assert!(m.is_closed());
    }

    #[test]
    fn a_member_renews_over_its_session() {
        let t0 = Instant::now();
        let mut m = MemberSession::new(t0, Some("n2".into()));
        m.handle_message(hello("n2", VERSION), &roster());
        m.admitted(t0);
        let _ = actions(&mut m);
        m.handle_message(
            ToManager::Renew {
                csr_pem: "csr".into(),
            },
            &roster(),
        );
        assert_eq!(
            actions(&mut m),
            vec![Action::Renew {
                node: name("n2"),
                csr_pem: "csr".into()
            }]
        );
        m.renewed("cert".into());
        assert_eq!(
            actions(&mut m),
            vec![Action::Send(ToNode::Renewed {
                cert_pem: "cert".into()
            })]
        );
        assert!(m.is_open(), "the session goes on");
    }

    #[test]
    fn a_join_the_driver_cannot_complete_is_refused() {
        let mut m = MemberSession::new(Instant::now(), None);
        m.handle_message(join(VERSION, "n3", "s3cret"), &roster());
        let _ = actions(&mut m);
        m.refuse("bad CSR".into());
        assert_eq!(actions(&mut m), refuse("bad CSR"));
    }

    #[test]
    fn a_session_must_open_with_join_or_hello_within_ten_seconds() {
        assert_eq!(
            refusal(Some("n2"), ToManager::Report { statuses: vec![] }),
            refuse("expected Join or Hello first")
        );
        let t0 = Instant::now();
        let mut m = MemberSession::new(t0, Some("n2".into()));
        assert_eq!(m.poll_timeout(), Some(t0 + manager::FIRST_MESSAGE_TIMEOUT));
        m.handle_timeout(t0 + ms(9900));
        assert!(actions(&mut m).is_empty());
        m.handle_timeout(t0 + ms(10000));
        assert_eq!(actions(&mut m), refuse("no message within 10 s"));
        assert_eq!(m.poll_timeout(), None);

        let mut m = MemberSession::new(t0, Some("n2".into()));
        m.stream_failed("malformed control message: unexpected end".into());
        assert_eq!(
            actions(&mut m),
            refuse("unreadable first message: malformed control message: unexpected end")
        );
    }

    #[test]
    fn a_manager_candidate_is_admitted_with_its_control_address() {
        let control: SocketAddr = "198.18.0.2:2377".parse().unwrap();
        let mut m = MemberSession::new(Instant::now(), Some(manager_cert("n1")));
        let mut hello = hello("n1", VERSION);
        if let ToManager::Hello { control_addr, .. } = &mut hello {
            *control_addr = Some(control);
        }
        m.handle_message(hello, &roster());
        assert_eq!(
            actions(&mut m),
            vec![Action::Admit {
                node: name("n1"),
                advertise_addr: Ipv4Addr::new(198, 18, 0, 2),
                data_port: 4789,
                control_addr: Some(control),
            }]
        );
    }

    #[test]
    fn an_admission_the_driver_cannot_record_is_refused() {
        let mut m = MemberSession::new(Instant::now(), Some("n2".into()));
        m.handle_message(hello("n2", VERSION), &roster());
        assert!(matches!(actions(&mut m)[..], [Action::Admit { .. }]));
        m.refuse("cannot persist".into());
        assert_eq!(actions(&mut m), refuse("cannot persist"));
    }

    #[test]
    fn in_a_session_reports_are_heartbeats_and_requests_are_applied() {
        let t0 = Instant::now();
        let mut m = MemberSession::new(t0, Some("n2".into()));
        m.handle_message(hello("n2", VERSION), &roster());
        let _ = actions(&mut m);
        m.admitted(t0);
        assert_eq!(
            actions(&mut m),
            vec![
                Action::Send(ToNode::Welcome { version: VERSION }),
                Action::Up { node: name("n2") },
                Action::PushSnapshot,
            ]
        );
        m.handle_message(ToManager::Report { statuses: vec![] }, &roster());
        let op = Op::RotateKey("sec".into());
        m.handle_message(
            ToManager::Request {
                id: 7,
                op: op.clone(),
            },
            &roster(),
        );
        m.handle_message(hello("n2", VERSION), &roster());
        assert_eq!(
            actions(&mut m),
            vec![
                Action::Heartbeat {
                    node: name("n2"),
                    statuses: vec![]
                },
                Action::Apply { id: 7, op },
                Action::Ignored { what: "Hello" },
            ]
        );
        let err = OpError {
            status: 404,
            message: "network sec not found".into(),
        };
        m.applied(7, Err(err.clone()));
        assert_eq!(
            actions(&mut m),
            vec![Action::Send(ToNode::Response {
                id: 7,
                result: Err(err)
            })]
        );
        m.stream_failed("stream read: reset".into());
        assert_eq!(
            actions(&mut m),
            vec![Action::Close {
                reason: "stream read: reset".into()
            }]
        );
    }

    #[test]
    fn a_late_driver_pushes_once_and_keeps_the_rhythm() {
        let t0 = Instant::now();
        let mut m = MemberSession::new(t0, Some("n2".into()));
        m.handle_message(hello("n2", VERSION), &roster());
        m.admitted(t0);
        let _ = actions(&mut m);
        m.handle_timeout(t0 + ms(3500));
        assert_eq!(actions(&mut m), vec![Action::PushSnapshot]);
        assert_eq!(m.poll_timeout(), Some(t0 + ms(4500)));
    }
}

/// The node's side alone.
#[test]
fn a_node_that_knows_no_manager_waits_for_one_to_be_named() {
    let t0 = Instant::now();
    let mut n = NodeSession::new(t0, hello("n2", VERSION), vec![]);
    assert_eq!((n.poll_timeout(), n.manager()), (None, None));
    n.handle_timeout(t0 + ms(1000));
    assert_eq!(n.poll(), None);
    n.retarget(t0 + ms(2000), addr(LEADER));
    assert_eq!(n.poll_timeout(), Some(t0 + ms(2000)));
    n.handle_timeout(t0 + ms(2000));
    assert_eq!(n.poll(), Some(Event::Connect { to: addr(LEADER) }));
}

#[test]
fn a_manager_candidate_never_tries_its_own_endpoint() {
    let t0 = Instant::now();
    let mut hello = hello("n2", VERSION);
    if let ToManager::Hello { control_addr, .. } = &mut hello {
        *control_addr = Some(addr(OTHER));
    }
    let n = NodeSession::new(t0, hello, vec![addr(OTHER), addr(LEADER)]);
    assert_eq!(n.managers(), [addr(LEADER)]);
}

#[test]
fn a_node_greets_and_ignores_what_comes_outside_a_session() {
    let t0 = Instant::now();
    let mut n = NodeSession::new(t0, hello("n2", VERSION), vec![addr(LEADER)]);
    assert_eq!(n.poll_timeout(), Some(t0));
    n.handle_timeout(t0);
    assert_eq!(n.poll(), Some(Event::Connect { to: addr(LEADER) }));
    assert_eq!(n.poll_timeout(), None, "QUIC times the handshake out");
    n.connected(t0);
    assert_eq!(n.poll(), Some(Event::Send(hello("n2", VERSION))));
    n.handle_message(
        t0,
        ToNode::Snapshot {
            push: 1,
            snapshot: Box::new(Snapshot {
                state: ClusterState::default().into(),
                statuses: Default::default(),
                health: Default::default(),
                keys: Default::default(),
            }),
        },
    );
    assert!(
        matches!(n.poll(), Some(Event::Down { error }) if error == "unexpected answer to Hello")
    );
    assert_eq!(n.poll_timeout(), Some(t0 + node::RECONNECT_MIN));
}

/// A node session that came up (Welcome received), with its first events drained.
fn open_node_session(t0: Instant) -> NodeSession {
    let mut n = NodeSession::new(t0, hello("n2", VERSION), vec![addr(LEADER)]);
    n.handle_timeout(t0);
    n.connected(t0);
    n.handle_message(t0, ToNode::Welcome { version: VERSION });
    while n.poll().is_some() {}
    n
}

fn full(push: u64, snap: &Snapshot) -> ToNode {
    ToNode::Snapshot {
        push,
        snapshot: Box::new(snap.clone()),
    }
}

fn delta(base: u64, old: &Snapshot, new: &Snapshot) -> ToNode {
    ToNode::Delta {
        base,
        push: base + 1,
        delta: Box::new(protocol::delta::SnapshotDelta::between(old, new)),
    }
}

fn with_revision(snap: &Snapshot, revision: u64, node: &str) -> Snapshot {
    let mut next = snap.clone();
    let state = Arc::make_mut(&mut next.state);
    state.revision = revision;
    state.nodes.insert(
        name(node),
        Node {
            name: name(node),
            role: Role::Worker,
            availability: Availability::Active,
            advertise_addr: None,
            data_port: 4789,
            joined_at: 0,
            control_addr: None,
        },
    );
    next
}

#[test]
fn deltas_apply_to_the_push_the_node_holds() {
    let t0 = Instant::now();
    let mut n = open_node_session(t0);
    let s1 = with_revision(
        &Snapshot {
            state: Arc::new(ClusterState::default()),
            statuses: Default::default(),
            health: Default::default(),
            keys: Default::default(),
        },
        1,
        "n1",
    );
    n.handle_message(t0, full(4, &s1));
    assert_eq!(n.poll(), Some(Event::Snapshot(Box::new(s1.clone()))));
    let s2 = with_revision(&s1, 2, "n2");
    n.handle_message(t0, delta(4, &s1, &s2));
    assert_eq!(
        n.poll(),
        Some(Event::Snapshot(Box::new(s2.clone()))),
        "the delta gives the manager's snapshot"
    );
    // Nothing changed: nothing to adopt, but the manager was heard from.
    n.handle_message(t0 + ms(4000), delta(5, &s2, &s2));
    assert_eq!(n.poll(), Some(Event::Current));
    assert_eq!(n.poll(), None);
    n.handle_timeout(t0 + ms(6000));
    let events: Vec<Event> = std::iter::from_fn(|| n.poll()).collect();
    assert!(
        !events.iter().any(|e| matches!(e, Event::Down { .. })),
        "an empty delta keeps the session from stalling: {events:?}"
    );
}

#[test]
fn a_delta_that_does_not_apply_asks_once_for_a_whole_snapshot() {
    let t0 = Instant::now();
    let mut n = open_node_session(t0);
    let s0 = Snapshot {
        state: Arc::new(ClusterState::default()),
        statuses: Default::default(),
        health: Default::default(),
        keys: Default::default(),
    };
    let s1 = with_revision(&s0, 1, "n1");
    let s2 = with_revision(&s1, 2, "n3");
    // A delta before any whole snapshot, then another one: one Resync.
    n.handle_message(t0, delta(1, &s0, &s1));
    assert_eq!(n.poll(), Some(Event::Send(ToManager::Resync)));
    n.handle_message(t0, delta(2, &s1, &s2));
    assert_eq!(n.poll(), None, "asked already");
    n.handle_message(t0, full(3, &s2));
    assert_eq!(n.poll(), Some(Event::Snapshot(Box::new(s2.clone()))));
    // Push 4 lost: the delta from 4 to 5 does not apply to push 3.
    let s3 = with_revision(&s2, 3, "n4");
    n.handle_message(t0, delta(4, &s2, &s3));
    assert_eq!(n.poll(), Some(Event::Send(ToManager::Resync)));
}

#[test]
fn the_manager_side_answers_resync_with_a_push() {
    let t0 = Instant::now();
    let roster = TestRoster {
        members: [name("n2")].into(),
        down: BTreeMap::new(),
        workers: BTreeSet::new(),
        reschedule_after: Duration::from_secs(10),
    };
    let mut m = MemberSession::new(t0, Some(PeerCert::from("n2")));
    m.handle_message(hello("n2", VERSION), &roster);
    while m.poll().is_some() {}
    m.admitted(t0);
    while m.poll().is_some() {}
    m.handle_message(ToManager::Resync, &roster);
    assert_eq!(m.poll(), Some(Action::Resync));
}
