//! The manager: owner of the desired cluster state. API requests become state operations
//! (from `protocol::state`), each one applied to a copy, persisted, and only then committed
//! and published to subscribers (the local agent; remote agents over the control plane).
//! A refused or unpersistable request changes nothing.
//!
//! Beside the desired state it keeps what is not persisted: which nodes are alive
//! ([`health`]), what they report about their tasks ([`statuses`]), and encrypted networks'
//! keys ([`keys`]), rotated by a periodic tick ([`Manager::rotate_due_keys`]). It also heals
//! the cluster on its own ([`healing`]): lost nodes' tasks rescheduled, empty slots filled,
//! stopped tasks' addresses released; and it drives services' rolling updates and
//! rollbacks ([`update`]).

pub mod healing;
pub mod health;
pub mod keys;
mod membership;
pub mod statuses;
pub mod update;

use crate::clock::{now, now_ms};
use crate::cluster::View;
use crate::ids::new_id;
use crate::store::{Store, StoreError};
use health::Health;
use keys::KeyRing;
use protocol::api::{self, OpError, TaskStatus};
use protocol::control::{Keyring, NodeHealth, Op, Snapshot};
use protocol::state::{
    Availability, ClusterState, Deploy, Network, NetworkRequest, Node, Pool, Role, Service,
    StateError, UpdateConfig,
};
use protocol::types::{NetworkName, NodeName, ServiceName};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A change that could not be persisted was not made: the caller sees an internal error,
/// or "unavailable" if the store may take it later (etcd down, leadership lost).
impl From<StoreError> for OpError {
    fn from(e: StoreError) -> OpError {
        if e.is_unavailable() {
            return OpError::unavailable(e.to_string());
        }
        OpError::internal(e.to_string())
    }
}

pub use healing::HEAL_TICK;

/// How long a manager that takes over counts the nodes its predecessor saw alive as alive
/// without hearing from them: enough for every node to notice the old leader is gone (5 s
/// of silence), find the new one and send its first report.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(15);
pub use keys::{DEFAULT_KEY_ROTATION, KEY_GRACE, KEY_LEAD, KEY_TICK};
pub use statuses::{StatusBoard, StatusEntry};

pub struct Manager {
    health: Arc<Health>,
    keys: Mutex<KeyRing>,
    state: Mutex<ClusterState>,
    store: Store,
    pool: Pool,
    published: watch::Sender<Arc<ClusterState>>,
    statuses: StatusBoard,
    /// The node's `service logs` hub (its view's): what the leader relays between members.
    logs: Arc<crate::cluster::logs::LogsHub>,
    /// `--reschedule-after`, in seconds ([`healing`]).
    reschedule_after_s: AtomicU64,
    /// The task ids each other node last reported ([`healing`]).
    reported: Mutex<BTreeMap<NodeName, BTreeSet<String>>>,
}

impl Manager {
    /// Loads the saved state and registers `node` (at `advertise`, if multi-node) as this
    /// cluster's manager. It publishes into `view` (the node's, which its agent follows) and
    /// keeps every node's task statuses on its board.
    pub fn open(
        store: Store,
        pool: Pool,
        node: &NodeName,
        advertise: Option<(Ipv4Addr, u16)>,
        view: &View,
    ) -> Result<Manager, StoreError> {
        let mut state = store.load()?;
        let before = state.revision;
        // Tasks saved before they carried their spec get their service's.
        state.ensure_task_specs();
        // Services saved before VIPs existed get theirs now; a full network keeps it without.
        if let Err(e) = state.ensure_vips() {
            tracing::warn!(error = %e, "cannot give every service a VIP");
        }
        state.upsert_node(Node {
            name: node.clone(),
            role: Role::Manager,
            availability: Availability::Active,
            advertise_addr: advertise.map(|a| a.0),
            data_port: advertise.map_or(protocol::vxlan::UDP_PORT, |a| a.1),
            joined_at: now(),
            control_addr: None,
        });
        // The routing mesh's network exists from cluster start (and appears in state saved
        // before it existed), with an address for every node's router.
        if let Err(e) = state.ensure_ingress(new_id(), now()) {
            tracing::warn!(error = %e, "cannot make the ingress network");
        }
        if state.revision != before {
            store.save(&state)?;
        }
        let published = view.state.clone();
        published.send_replace(Arc::new(state.clone()));
        let manager = Manager {
            health: Arc::new(Health::new(node.clone())),
            state: Mutex::new(state),
            store,
            pool,
            published,
            statuses: view.board.clone(),
            logs: view.logs.clone(),
            keys: Mutex::new(KeyRing::new(DEFAULT_KEY_ROTATION)),
            reschedule_after_s: AtomicU64::new(protocol::state::DEFAULT_RESCHEDULE_AFTER_S),
            reported: Mutex::default(),
        };
        manager.rotate_due_keys(now_ms());
        Ok(manager)
    }

    /// Continues where the previous leader stopped (a manager on etcd that has just taken
    /// over; `last` is the last snapshot it sent this node): the nodes it saw ready stay
    /// ready for [`TAKEOVER_GRACE`] while they reconnect, their tasks' statuses stay what it
    /// published (so VIPs, DNS and the routing mesh keep every backend), and the encrypted
    /// networks' keys it handed out stay live while new ones replace them.
    pub fn take_over(&self, last: &Snapshot) {
        let ready = last
            .health
            .iter()
            .filter(|(_, h)| **h == NodeHealth::Ready)
            .map(|(n, _)| n.clone());
        self.health.seed(ready, TAKEOVER_GRACE);
        let state = self.snapshot();
        if let Ok(mut board) = self.statuses.write() {
            for (name, (id, status)) in &last.statuses {
                let elsewhere = state
                    .tasks
                    .get(name)
                    .is_some_and(|t| t.id == *id && t.node != *self.health.me());
                if elsewhere && !board.contains_key(name) {
                    board.insert(
                        name.clone(),
                        StatusEntry {
                            id: id.clone(),
                            status: status.clone(),
                        },
                    );
                }
            }
        }
        if let Ok(mut k) = self.keys.lock() {
            k.take_over(last.keys.clone(), now_ms());
        }
        self.rotate_due_keys(now_ms());
    }

    /// Starts the manager's periodic work until `stop`: healing every [`HEAL_TICK`], keys
    /// every [`KEY_TICK`], rollouts every [`update::ROLLOUT_TICK`].
    pub fn spawn_ticks(self: &Arc<Self>, stop: CancellationToken) {
        tokio::spawn(heal(self.clone(), stop.clone()));
        tokio::spawn(roll(self.clone(), stop.clone()));
        tokio::spawn(rotate_keys(self.clone(), stop));
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.published.subscribe()
    }

    pub fn snapshot(&self) -> Arc<ClusterState> {
        self.published.borrow().clone()
    }

    /// Which nodes are heartbeating; placement only uses those.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// `service logs` questions this manager relays while it leads.
    pub fn logs(&self) -> &Arc<crate::cluster::logs::LogsHub> {
        &self.logs
    }

    pub fn statuses(&self) -> &StatusBoard {
        &self.statuses
    }

    pub fn state_dir(&self) -> &std::path::Path {
        self.store.dir()
    }

    /// Applies `op` to a copy of the state; persists and publishes it if `op` succeeds.
    fn change<T>(
        &self,
        op: impl FnOnce(&mut ClusterState) -> Result<T, StateError>,
    ) -> Result<T, OpError> {
        self.commit(|s| op(s).map_err(OpError::from))
    }

    /// [`Manager::change`] for operations with their own errors.
    fn commit<T>(
        &self,
        op: impl FnOnce(&mut ClusterState) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let mut guard = self.lock_state()?;
        let mut next = guard.clone();
        let out = op(&mut next)?;
        self.install(&mut guard, next)?;
        Ok(out)
    }

    /// Applies `op` to a copy of the state; persists and publishes it only if `op` says it
    /// changed something (the manager's own periodic work, which mostly changes nothing).
    fn change_if(&self, op: impl FnOnce(&mut ClusterState) -> bool) -> Result<bool, OpError> {
        let mut guard = self.lock_state()?;
        let mut next = guard.clone();
        if !op(&mut next) {
            return Ok(false);
        }
        self.install(&mut guard, next)?;
        Ok(true)
    }

    fn lock_state(&self) -> Result<std::sync::MutexGuard<'_, ClusterState>, OpError> {
        self.state
            .lock()
            .map_err(|_| OpError::internal("state lock poisoned"))
    }

    /// Persists `next`, then makes it the state and publishes it.
    fn install(&self, guard: &mut ClusterState, next: ClusterState) -> Result<(), OpError> {
        self.store.save(&next)?;
        *guard = next;
        // Keys follow the networks (a new encrypted network has one at once, a removed one
        // none) before the new state goes out.
        if let Ok(mut k) = self.keys.lock() {
            k.rotate_due(guard, now_ms());
        }
        self.published.send_replace(Arc::new(guard.clone()));
        Ok(())
    }

    /// Applies an operation (from this node's API or forwarded by another node) and returns
    /// the state revision that holds it.
    pub fn apply(&self, op: Op) -> Result<u64, OpError> {
        match op {
            Op::CreateNetwork(req) => self.create_network(req).map(|_| ()),
            Op::RemoveNetwork(name) => self.remove_network(&name),
            Op::CreateService(req) => self.create_service(*req).map(|_| ()),
            Op::ScaleService { name, replicas } => self.scale_service(&name, replicas).map(|_| ()),
            Op::RemoveService(name) => self.remove_service(&name),
            Op::UpdateService { name, update } => self.update_service(&name, *update).map(|_| ()),
            Op::RotateKey(name) => self.rotate_key(&name),
            Op::AddVtep { network, vtep } => self.change(|s| s.add_vtep(&network, vtep)),
            Op::RemoveVtep { network, mac } => self.change(|s| s.remove_vtep(&network, mac)),
            Op::AddEndpoint(req) => self.change(|s| s.add_endpoint(req).map(|_| ())),
            Op::DockerAttach {
                network,
                node,
                attached,
            } => {
                let node = NodeName::new(node).map_err(|e| OpError::bad_request(e.to_string()))?;
                self.change(|s| s.docker_attach(&network, &node, attached).map(|_| ()))
            }
            Op::BindEndpoint {
                container,
                ifname,
                netns,
            } => self.change(|s| s.bind_endpoint(&container, &ifname, &netns)),
            Op::RemoveEndpoint { container, ifname } => self.change(|s| {
                s.remove_endpoint(&container, &ifname);
                Ok(())
            }),
            Op::UpdateNode { node, availability } => {
                let health = self.health.clone();
                self.change(|s| {
                    s.set_availability_at(&node, availability, now(), &mut new_id, &|n| {
                        health.is_ready(n)
                    })
                })
            }
            Op::SetRole { node, role } => self.set_role(&node, role),
            Op::RemoveNode { node, force } => self.forget_node(&node, force),
        }?;
        Ok(self.snapshot().revision)
    }

    /// Admits a node (a join) or refreshes a member's addresses (a reconnect): its underlay
    /// address, and the control address a manager candidate serves at (`None` keeps the one
    /// recorded; see `ClusterState::upsert_node`).
    pub fn upsert_node(
        &self,
        name: &NodeName,
        addr: Ipv4Addr,
        data_port: u16,
        control_addr: Option<SocketAddr>,
    ) -> Result<(), OpError> {
        let node = Node {
            name: name.clone(),
            role: Role::Worker,
            availability: Availability::Active,
            advertise_addr: Some(addr),
            data_port,
            joined_at: now(),
            control_addr,
        };
        self.change(|s| {
            s.upsert_node(node);
            Ok(())
        })
    }

    pub fn create_network(&self, req: api::NetworkCreate) -> Result<Network, OpError> {
        let name =
            NetworkName::new(req.name.clone()).map_err(|e| OpError::bad_request(e.to_string()))?;
        let subnet = match req.subnet.as_deref() {
            Some(s) => Some(s.parse().map_err(|_| {
                OpError::bad_request(format!(
                    "invalid subnet {s:?}: expected CIDR such as 10.0.9.0/24"
                ))
            })?),
            None => None,
        };
        let gateway = match req.gateway.as_deref() {
            Some(g) => Some(g.parse().map_err(|_| {
                OpError::bad_request(format!("invalid gateway {g:?}: expected an IPv4 address"))
            })?),
            None => None,
        };
        if gateway.is_some() && subnet.is_none() {
            return Err(OpError::bad_request("--gateway needs --subnet"));
        }
        let request = NetworkRequest {
            driver: req.driver,
            subnet,
            gateway,
            options: req.options,
            ingress: req.ingress,
        };
        let pool = self.pool;
        self.change(|s| {
            s.create_network(name, request, pool, new_id(), now())
                .cloned()
        })
    }

    pub fn remove_network(&self, name: &str) -> Result<(), OpError> {
        self.change(|s| s.remove_network(name).map(|_| ()))
    }

    pub fn create_service(&self, req: api::ServiceCreate) -> Result<Service, OpError> {
        let bad = |e: protocol::types::BadName| OpError::bad_request(e.to_string());
        let name = ServiceName::new(req.name).map_err(bad)?;
        let mut networks = Vec::new();
        let mut aliases = BTreeMap::new();
        for target in req.networks {
            let net = NetworkName::new(target.target).map_err(bad)?;
            if !target.aliases.is_empty() {
                aliases.insert(net.clone(), target.aliases);
            }
            networks.push(net);
        }
        if req.lb_idle_timeout == Some(0) {
            return Err(OpError::bad_request(
                "--lb-idle-timeout must be at least one second",
            ));
        }
        let t = now();
        let deploy = Deploy {
            update_config: req.update_config.applied_to(UpdateConfig::default()),
            rollback_config: req.rollback_config.applied_to(UpdateConfig::default()),
            ..Default::default()
        };
        let svc = Service {
            id: new_id(),
            name,
            networks,
            replicas: req.replicas.unwrap_or(1),
            command: req.command,
            env: req.env,
            created_at: t,
            updated_at: t,
            endpoint_mode: req.endpoint_mode.unwrap_or_default(),
            vips: BTreeMap::new(),
            aliases,
            lb_idle_timeout: req.lb_idle_timeout,
            ports: req.ports.into_iter().map(Into::into).collect(),
            healthcheck: req.healthcheck,
            stop_grace_period_s: req.stop_grace_period_s,
            deploy,
            mode: req.mode.unwrap_or_default(),
            node_slots: BTreeMap::new(),
            image: req.image,
        };
        let health = self.health.clone();
        self.change(|s| {
            s.create_service(svc, &mut new_id, &|n| health.is_ready(n))
                .cloned()
        })
    }

    pub fn remove_service(&self, name: &str) -> Result<(), OpError> {
        self.change(|s| s.remove_service_at(name, now()).map(|_| ()))
    }

    /// Sets how often encrypted networks get a new key (`--key-rotation-interval`).
    pub fn set_key_rotation(&self, every: Duration) {
        if let Ok(mut k) = self.keys.lock() {
            k.set_rotation(every);
        }
    }

    /// The keys every node should hold now (a plain read: see [`Manager::rotate_due_keys`]).
    pub fn keys(&self) -> Keyring {
        self.keys
            .lock()
            .map(|k| k.keys().clone())
            .unwrap_or_default()
    }

    /// Brings encrypted networks' keys up to date at `now_ms` (Unix milliseconds): a key for
    /// each encrypted network, none for networks that are gone, retired keys dropped, and a
    /// new key where the newest is older than the rotation period. Called every
    /// [`KEY_TICK`] by the daemon, and after every state change.
    pub fn rotate_due_keys(&self, now_ms: u64) {
        let state = self.snapshot();
        if let Ok(mut k) = self.keys.lock() {
            k.rotate_due(&state, now_ms);
        }
    }

    /// `network rotate-key NAME`: a new key, received by every node before any sends with
    /// it; the old one is accepted for a grace period after. A rotation already under way
    /// (its key not yet in use) is left to finish.
    pub fn rotate_key(&self, name: &str) -> Result<(), OpError> {
        let state = self.snapshot();
        let net = state
            .networks
            .get(name)
            .ok_or_else(|| OpError::from(StateError::NoSuchNetwork(name.to_string())))?;
        if !net.encrypted() {
            return Err(OpError::bad_request(format!(
                "network {name} is not encrypted (create it with --opt encrypted)"
            )));
        }
        let mut k = self
            .keys
            .lock()
            .map_err(|_| OpError::internal("key lock poisoned"))?;
        let now = now_ms();
        k.rotate_due(&state, now);
        k.rotate_now(&net.name, now);
        Ok(())
    }

    /// The status of a task as last reported, or pending if its node has not reported it.
    pub fn task_status(&self, name: &str, id: &str) -> TaskStatus {
        let board = self.statuses.read();
        match board.ok().and_then(|b| b.get(name).cloned()) {
            Some(e) if e.id == id => e.status,
            _ => TaskStatus::pending(now()),
        }
    }
}

/// Heals the cluster every [`HEAL_TICK`] until `shutdown` (`Manager::heal`): lost nodes'
/// tasks rescheduled, empty slots filled, stopped tasks' addresses released.
async fn heal(manager: Arc<Manager>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HEAL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let m = manager.clone();
                // The tick may persist a change: off the runtime's threads, like `apply`.
                let _ = tokio::task::spawn_blocking(move || m.heal(now())).await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Moves rolling updates and rollbacks on every [`update::ROLLOUT_TICK`] until `shutdown`
/// (`Manager::advance_rollouts`, which does nothing while none is under way).
async fn roll(manager: Arc<Manager>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(update::ROLLOUT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if manager.snapshot().services.values().all(|s| s.deploy.rollout.is_none()) {
                    continue;
                }
                let m = manager.clone();
                // The tick may persist a change: off the runtime's threads, like `apply`.
                let _ = tokio::task::spawn_blocking(move || m.advance_rollouts(now_ms())).await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Gives encrypted networks their due keys every [`KEY_TICK`] until `shutdown`: a new key
/// when the rotation period has passed, retired ones dropped.
async fn rotate_keys(manager: Arc<Manager>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(KEY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => manager.rotate_due_keys(now_ms()),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// A manager of node `n1` on a fresh file store in a temporary directory named after `tag`
/// (for unit tests), with the view it feeds and the directory, which the caller removes.
#[cfg(test)]
pub(crate) fn standalone_for_test(tag: &str) -> (Manager, View, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("overlay-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let view = View::new(ClusterState::default());
    let node = NodeName::new("n1").expect("a valid name");
    let m = Manager::open(
        Store::open(&dir).unwrap(),
        Pool::default(),
        &node,
        None,
        &view,
    )
    .expect("a manager on a fresh store");
    (m, view, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_keys_changes_nothing_and_the_tick_rotates_them() {
        let (m, _view, dir) = standalone_for_test("manager-keys");
        let hour = Duration::from_secs(3600);
        m.set_key_rotation(hour);
        let req = api::NetworkCreate {
            name: "sec".into(),
            options: [("encrypted".to_string(), String::new())].into(),
            ..Default::default()
        };
        m.create_network(req).unwrap();
        // Made with the network, before the state that holds it went out.
        let first = m.keys();
        assert_eq!(first["sec"].len(), 1);
        let t0 = first["sec"][0].active_from_ms;
        assert_eq!(m.keys(), first, "a read is only a read");
        m.rotate_due_keys(t0 + 1000);
        assert_eq!(m.keys(), first, "nothing due yet");
        m.rotate_due_keys(t0 + hour.as_millis() as u64 + 1);
        let ids: Vec<u8> = m.keys()["sec"].iter().map(|k| k.id).collect();
        assert_eq!(ids, [0, 1]);
        m.remove_network("sec").unwrap();
        assert!(m.keys().is_empty(), "gone with its network");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The status board holds the tasks that exist, not every task there ever was: a
    /// removed service's statuses go once its nodes have let its tasks go.
    #[test]
    fn statuses_leave_the_board_with_their_tasks() {
        let dir =
            std::env::temp_dir().join(format!("overlay-manager-statuses-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (n1, n2) = (NodeName::new("n1").unwrap(), NodeName::new("n2").unwrap());
        let view = View::new(ClusterState::default());
        let m = Manager::open(
            Store::open(&dir).unwrap(),
            Pool::default(),
            &n1,
            Some((Ipv4Addr::new(198, 18, 0, 1), 4789)),
            &view,
        )
        .unwrap();
        m.upsert_node(&n2, Ipv4Addr::new(198, 18, 0, 2), 4789, None)
            .unwrap();
        m.health().beat(&n2);
        m.create_network(api::NetworkCreate {
            name: "a".into(),
            ..Default::default()
        })
        .unwrap();
        m.create_service(api::ServiceCreate {
            name: "web".into(),
            networks: vec![api::NetworkTarget {
                target: "a".into(),
                aliases: vec![],
            }],
            replicas: Some(2),
            command: vec!["sleep".into(), "infinity".into()],
            ..Default::default()
        })
        .unwrap();
        let tasks: Vec<_> = m.snapshot().tasks.values().cloned().collect();
        assert_eq!(tasks.len(), 2);
        let on = |n: &NodeName| tasks.iter().find(|t| t.node == *n).expect("one per node");
        let (mine, theirs) = (on(&n1).clone(), on(&n2).clone());
        let running = |id: &str| StatusEntry {
            id: id.into(),
            status: TaskStatus {
                state: api::TaskState::Running,
                ..TaskStatus::pending(0)
            },
        };
        let entries =
            |m: &Manager| -> Vec<String> { m.statuses().read().unwrap().keys().cloned().collect() };
        {
            let mut b = m.statuses().write().unwrap();
            // n1's agent and n2's reports; and a report of a task the state no longer holds.
            b.insert(mine.name.clone(), running(&mine.id));
            b.insert(theirs.name.clone(), running(&theirs.id));
            b.insert("old.1".into(), running("gone"));
        }
        m.note_reported(&n2, [theirs.id.clone()].into());
        m.heal(now());
        assert_eq!(entries(&m), [mine.name.clone(), theirs.name.clone()]);

        m.remove_service("web").unwrap();
        // Both tasks drain where they run: n1's agent reports its own under its leaving key.
        {
            let mut b = m.statuses().write().unwrap();
            let e = b.remove(&mine.name).unwrap();
            b.insert(crate::task::leaving_key(&mine.name, &mine.id), e);
        }
        m.heal(now());
        assert_eq!(entries(&m).len(), 2, "kept while their nodes may run them");
        // n2 has let its task go: its status goes with it.
        m.note_reported(&n2, BTreeSet::new());
        m.heal(now());
        assert_eq!(
            entries(&m),
            [crate::task::leaving_key(&mine.name, &mine.id)]
        );
        // n1's agent tore its task down (and dropped its entry): the board is empty, and
        // stays so.
        m.statuses().write().unwrap().clear();
        m.heal(now());
        assert!(entries(&m).is_empty());
        assert!(m.snapshot().unreleased_tasks().next().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
