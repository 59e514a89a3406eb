//! Updates and rollbacks of a service: a new spec applied at once where no task has to
//! change, and rolled out slot by slot where tasks do.
//!
//! [`ClusterState::update_service`] installs a new spec (the one it replaces becomes the
//! previous spec) and [`ClusterState::rollback_service`] swaps the two. Either way, what
//! needs no new task applies in that same change: the replica count, published ports that
//! keep the ingress attachment, the endpoint mode (VIPs allocated or freed), the idle
//! timeout, the policies. A task is *outdated* when its spec (command, environment, health
//! check, grace period, `--force` count) or its networks differ from the service's; the
//! slots holding one are handed to a [`Rollout`] (`rollout.rs`) under the update or the
//! rollback policy. The manager's tick calls [`ClusterState::advance_rollouts`] with the
//! time and its reading of the nodes' reports; the rollout replaces tasks through
//! [`StateTarget`], and its end sets the service's [`UpdateStatus`] as Swarm does.
//!
//! Start-first: a slot's replacement runs beside its old task, both in `tasks`. Task names
//! are the keys of `tasks`, so the replacement is named `SERVICE.SLOT` if that is free and
//! `SERVICE.SLOT.ID` (Docker's container name) if the old task holds it; a slot's tasks are
//! found by service and slot, never by name (`task.rs`). Every node realises both as it
//! realises any task, and the old one leaves once the new one is ready.

use super::rollout::{Observed, Outcome, Replace, Retire, Rollout, RolloutKind, Target};
use super::{ClusterState, Service, Spec, StateError, Task, UpdateConfig, UpdateOrder};
use crate::types::{NodeName, ServiceName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a service changes: its spec version, its policies, the spec a rollback returns to,
/// the rollout under way and how the last one went.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Deploy {
    /// Bumped by every change of the spec (Docker's `Version.Index`).
    #[serde(default)]
    pub version: u64,
    /// `--force` count (see [`Spec::force_update`]).
    #[serde(default)]
    pub force_update: u64,
    #[serde(default)]
    pub update_config: UpdateConfig,
    #[serde(default)]
    pub rollback_config: UpdateConfig,
    /// The spec before the last change: what `service rollback` returns to.
    #[serde(default)]
    pub previous: Option<Box<Spec>>,
    #[serde(default)]
    pub status: Option<UpdateStatus>,
    #[serde(default)]
    pub rollout: Option<Rollout>,
}

/// Docker's `UpdateStatus.State`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

impl std::fmt::Display for UpdateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpdateState::Updating => "updating",
            UpdateState::Paused => "paused",
            UpdateState::Completed => "completed",
            UpdateState::RollbackStarted => "rollback_started",
            UpdateState::RollbackPaused => "rollback_paused",
            UpdateState::RollbackCompleted => "rollback_completed",
        })
    }
}

/// How the last update or rollback of a service went (Docker's `UpdateStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    /// Unix seconds.
    pub started_at: u64,
    pub completed_at: Option<u64>,
    pub message: String,
}

impl Service {
    /// Whether `task` runs what the service asks now (its spec and its networks).
    pub fn is_current(&self, task: &Task) -> bool {
        task.spec == self.task_spec()
            && task.attachments.len() == self.networks.len()
            && task
                .attachments
                .iter()
                .zip(&self.networks)
                .all(|(a, n)| &a.network == n)
    }
}

impl ClusterState {
    /// `service update`: gives service `name` the spec `spec` at `now_ms` (unix
    /// milliseconds); the spec it had becomes its previous one. What needs no new task
    /// applies at once; outdated tasks are replaced by a rollout under the update policy.
    /// An update supersedes a rollout under way (its start-first replacements that are not
    /// ready yet leave). Refused, changing nothing, if the spec is invalid or new replicas
    /// have nowhere to go.
    pub fn update_service(
        &mut self,
        name: &str,
        spec: Spec,
        now_ms: u64,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        self.respec(
            name,
            spec,
            RolloutKind::Update,
            None,
            now_ms,
            new_id,
            eligible,
        )
    }

    /// `service rollback`: returns service `name` to its previous spec (which the current
    /// one becomes: a second rollback undoes the first), rolled out under the rollback
    /// policy of the spec it returns to.
    pub fn rollback_service(
        &mut self,
        name: &str,
        now_ms: u64,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        let svc = self
            .services
            .get(name)
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))?;
        let previous = svc
            .deploy
            .previous
            .clone()
            .ok_or_else(|| StateError::NoPreviousSpec(svc.name.clone()))?;
        let why = Some("manually requested rollback");
        self.respec(
            name,
            *previous,
            RolloutKind::Rollback,
            why,
            now_ms,
            new_id,
            eligible,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn respec(
        &mut self,
        name: &str,
        spec: Spec,
        kind: RolloutKind,
        message: Option<&str>,
        now_ms: u64,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> Result<(), StateError> {
        let now = now_ms / 1000;
        let old = self
            .services
            .get(name)
            .ok_or_else(|| StateError::NoSuchService(name.to_string()))?;
        let previous = old.spec(self);
        let service = old.name.clone();
        let replicas = spec.replicas;
        // A global service's count follows its nodes: an update cannot set it (a rollback
        // returns to a spec whose count was the nodes' then, and ignores it too).
        let global = old.mode == super::ServiceMode::Global;
        if global && kind == RolloutKind::Update && replicas != old.replicas {
            return Err(StateError::NotReplicated("replicas"));
        }
        let mut next = self.clone();
        let reason = match kind {
            RolloutKind::Update => "task updated",
            RolloutKind::Rollback => "rolled back",
        };
        next.stop_rollout(&service, reason, now);
        let mut svc = next.services[&service].clone();
        spec.install(&mut svc);
        next.check_service(&svc)?;
        next.settle_ports(&mut svc)?;
        match svc.endpoint_mode {
            super::EndpointMode::Dnsrr => svc.vips.clear(),
            super::EndpointMode::Vip => {
                let attached = svc.networks.clone();
                svc.vips.retain(|n, _| attached.contains(n));
            }
        }
        svc.deploy.previous = Some(Box::new(previous));
        svc.deploy.version += 1;
        svc.updated_at = now;
        next.services.insert(service.clone(), svc);
        next.ensure_vips()?;
        if !global {
            next.scale_service_at(name, replicas, now, new_id, eligible)?;
        }
        next.start_rollout(&service, kind, message, now_ms);
        next.revision += 1;
        *self = next;
        Ok(())
    }

    /// The slots of service `name` whose task is outdated, with its id.
    pub fn outdated_slots(&self, name: &str) -> BTreeMap<u32, String> {
        let Some(svc) = self.services.get(name) else {
            return BTreeMap::new();
        };
        self.tasks
            .values()
            .filter(|t| t.service == svc.name && t.slot <= svc.replicas && !svc.is_current(t))
            .map(|t| (t.slot, t.id.clone()))
            .collect()
    }

    /// Starts the rollout of what is outdated, or says there is none to do.
    fn start_rollout(
        &mut self,
        name: &ServiceName,
        kind: RolloutKind,
        message: Option<&str>,
        now_ms: u64,
    ) {
        let outdated = self.outdated_slots(name.as_str());
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let now = now_ms / 1000;
        let d = &mut svc.deploy;
        if outdated.is_empty() {
            d.rollout = None;
            // As Swarm: an update with nothing to roll leaves no status; a rollback says
            // it is done.
            d.status = (kind == RolloutKind::Rollback).then(|| UpdateStatus {
                state: UpdateState::RollbackCompleted,
                started_at: now,
                completed_at: Some(now),
                message: rollback_completed(message),
            });
            return;
        }
        let (policy, state, default) = match kind {
            RolloutKind::Update => (d.update_config, UpdateState::Updating, "update in progress"),
            RolloutKind::Rollback => (
                d.rollback_config,
                UpdateState::RollbackStarted,
                "rollback in progress",
            ),
        };
        d.rollout = Some(Rollout::new(kind, policy, outdated, now_ms));
        d.status = Some(UpdateStatus {
            state,
            started_at: now,
            completed_at: None,
            message: message.unwrap_or(default).to_string(),
        });
    }

    /// Ends the rollout of `name` under way, if any: its start-first replacements that are
    /// not ready yet leave (their old tasks keep serving), with `reason`.
    fn stop_rollout(&mut self, name: &ServiceName, reason: &str, now: u64) {
        let Some(rollout) = self
            .services
            .get_mut(name)
            .and_then(|s| s.deploy.rollout.take())
        else {
            return;
        };
        for id in rollout.unready_successors() {
            if let Some(task) = self.task_key(name, id) {
                self.retire(&task, reason, now);
            }
        }
    }

    /// The key in `tasks` of service `service`'s task with this id.
    fn task_key(&self, service: &ServiceName, id: &str) -> Option<String> {
        self.tasks
            .values()
            .find(|t| &t.service == service && t.id == id)
            .map(|t| t.name.clone())
    }

    /// Moves every rollout under way one step at `now_ms` (unix milliseconds): `observe`
    /// reads a task's reports, new tasks go to active nodes `eligible` accepts. A rollout
    /// that ends sets its service's status; one whose failures ask for it starts the
    /// rollback. Returns whether anything changed (the revision moves then).
    pub fn advance_rollouts(
        &mut self,
        now_ms: u64,
        observe: &dyn Fn(&Task) -> Observed,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> bool {
        let rolling: Vec<ServiceName> = self
            .services
            .values()
            .filter(|s| s.deploy.rollout.is_some())
            .map(|s| s.name.clone())
            .collect();
        let mut changed = false;
        for name in rolling {
            changed |= self.advance_rollout(&name, now_ms, observe, new_id, eligible);
        }
        if changed {
            self.prune_history();
            self.revision += 1;
        }
        changed
    }

    fn advance_rollout(
        &mut self,
        name: &ServiceName,
        now_ms: u64,
        observe: &dyn Fn(&Task) -> Observed,
        new_id: &mut dyn FnMut() -> String,
        eligible: &dyn Fn(&NodeName) -> bool,
    ) -> bool {
        let Some(svc) = self.services.get_mut(name) else {
            return false;
        };
        let replicas = svc.replicas;
        let Some(mut rollout) = svc.deploy.rollout.take() else {
            return false;
        };
        let before = rollout.clone();
        let now = now_ms / 1000;
        rollout.forget_slots_above(replicas);
        let mut target = StateTarget {
            state: self,
            service: name.clone(),
            kind: rollout.kind,
            now,
            observe,
            new_id: &mut *new_id,
            eligible,
            changed: false,
        };
        let outcome = rollout.poll(now_ms, &mut target);
        let touched = target.changed;
        let kind = rollout.kind;
        let blocked = rollout.blocked.clone();
        let Some(svc) = self.services.get_mut(name) else {
            return touched;
        };
        let d = &mut svc.deploy;
        let set = |d: &mut Deploy, state: UpdateState, message: String, done: bool| {
            let started_at = d.status.as_ref().map_or(now, |s| s.started_at);
            d.status = Some(UpdateStatus {
                state,
                started_at,
                completed_at: done.then_some(now),
                message,
            });
        };
        match outcome {
            Outcome::InProgress => {
                let mut changed = touched || rollout != before;
                d.rollout = Some(rollout);
                // Say why a slot waits (no node, no address), as long as it does.
                if let Some(status) = d.status.as_mut() {
                    let base = match kind {
                        RolloutKind::Update => "update in progress",
                        RolloutKind::Rollback => "rollback in progress",
                    };
                    let want = match &blocked {
                        Some(why) => Some(format!("{base}: {why}")),
                        None if status.message.starts_with(&format!("{base}: ")) => {
                            Some(base.to_string())
                        }
                        None => None,
                    };
                    if let Some(want) = want.filter(|w| *w != status.message) {
                        status.message = want;
                        changed = true;
                    }
                }
                changed
            }
            Outcome::Completed => {
                let (state, message) = match kind {
                    RolloutKind::Update => (UpdateState::Completed, "update completed".into()),
                    RolloutKind::Rollback => {
                        let cause = d.status.as_ref().map(|s| s.message.as_str());
                        (UpdateState::RollbackCompleted, rollback_completed(cause))
                    }
                };
                set(d, state, message, true);
                true
            }
            Outcome::Paused(message) => {
                d.rollout = Some(rollout);
                let state = match kind {
                    RolloutKind::Update => UpdateState::Paused,
                    RolloutKind::Rollback => UpdateState::RollbackPaused,
                };
                set(d, state, message, false);
                self.stop_rollout(name, "update paused", now);
                true
            }
            Outcome::RollBack(message) => {
                d.rollout = Some(rollout);
                let previous = d.previous.clone();
                let back = previous.map(|p| {
                    self.respec(
                        name.as_str(),
                        *p,
                        RolloutKind::Rollback,
                        Some(&message),
                        now_ms,
                        new_id,
                        eligible,
                    )
                });
                if !matches!(back, Some(Ok(()))) {
                    let why = match back {
                        Some(Err(e)) => format!("{message}, but the rollback failed: {e}"),
                        _ => format!("{message}, but there is no previous spec"),
                    };
                    if let Some(svc) = self.services.get_mut(name) {
                        set(&mut svc.deploy, UpdateState::Paused, why, false);
                    }
                    self.stop_rollout(name, "update paused", now);
                }
                true
            }
        }
    }
}

/// Swarm's "rollback completed"; after a rollback that failures started, with their cause
/// (the rollback may be over before anyone saw the status that said why it began).
fn rollback_completed(started_by: Option<&str>) -> String {
    match started_by {
        Some(cause) if cause.starts_with("update rolled back") => {
            format!("rollback completed: {cause}")
        }
        _ => "rollback completed".into(),
    }
}

/// The cluster state as a rollout acts on it: one service's tasks, placed and retired at
/// `now` (unix seconds).
struct StateTarget<'a> {
    state: &'a mut ClusterState,
    service: ServiceName,
    kind: RolloutKind,
    now: u64,
    observe: &'a dyn Fn(&Task) -> Observed,
    new_id: &'a mut dyn FnMut() -> String,
    eligible: &'a dyn Fn(&NodeName) -> bool,
    /// Whether a task was placed or retired.
    changed: bool,
}

impl StateTarget<'_> {
    /// What `service ps` says of a task the rollout replaced.
    fn replaced(&self) -> &'static str {
        match self.kind {
            RolloutKind::Update => "task updated",
            RolloutKind::Rollback => "rolled back",
        }
    }
}

impl Target for StateTarget<'_> {
    fn observe(&self, task: &str) -> Observed {
        let found = self
            .state
            .task_key(&self.service, task)
            .and_then(|k| self.state.tasks.get(&k));
        match found {
            Some(t) => (self.observe)(t),
            None => Observed::Gone,
        }
    }

    fn replace(&mut self, slot: u32, old: &str, order: UpdateOrder) -> Replace {
        let Some(old) = self.state.task_key(&self.service, old) else {
            return Replace::NotNeeded;
        };
        // Stop-first: out first, so that the new task takes the slot's name. A placement
        // that fails changes nothing, and the old task goes back where it was.
        let old_id = self.state.tasks[&old].id.clone();
        let stop_first = order == UpdateOrder::StopFirst;
        if stop_first {
            self.state.retire(&old, self.replaced(), self.now);
        }
        match self
            .state
            .place_slot(&self.service, slot, self.new_id, self.eligible)
        {
            Ok(name) => {
                self.changed = true;
                Replace::Started(self.state.tasks[&name].id.clone())
            }
            Err(e) => {
                if stop_first {
                    if let Some(p) = self.state.history.remove(&old_id) {
                        self.state.tasks.insert(old, p.task);
                    }
                }
                Replace::Blocked(e.to_string())
            }
        }
    }

    fn retire(&mut self, task: &str, why: Retire) {
        let reason = match (why, self.kind) {
            (Retire::Superseded, _) => self.replaced(),
            (Retire::Failed, RolloutKind::Update) => "failed during update",
            (Retire::Failed, RolloutKind::Rollback) => "failed during rollback",
        };
        if let Some(key) = self.state.task_key(&self.service, task) {
            self.state.retire(&key, reason, self.now);
            self.changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{ids, net, state, svc};
    use crate::state::{Availability, EndpointMode, FailureAction, Node, Role};
    use crate::types::NetworkName;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// n1, n2; network a (10.0.2.0/24); `web`, 3 replicas.
    fn cluster() -> (ClusterState, impl FnMut() -> String) {
        let mut s = state();
        let n2 = NodeName::new("n2").unwrap();
        s.nodes.insert(
            n2.clone(),
            Node {
                name: n2,
                role: Role::Worker,
                availability: Availability::Active,
                advertise_addr: None,
                data_port: 4789,
                joined_at: 0,
                control_addr: None,
            },
        );
        net(&mut s, "a", Some("10.0.2.0/24")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["a"], 3), &mut id, &|_| true)
            .unwrap();
        (s, id)
    }

    /// The nodes as the tests see them: a task is starting on the first look, then ready,
    /// unless set otherwise.
    #[derive(Default)]
    struct Nodes {
        seen: RefCell<BTreeSet<String>>,
        set: RefCell<BTreeMap<String, Observed>>,
    }

    impl Nodes {
        fn observe(&self, t: &Task) -> Observed {
            if let Some(o) = self.set.borrow().get(&t.id) {
                return *o;
            }
            if self.seen.borrow_mut().insert(t.id.clone()) {
                Observed::Starting
            } else {
                Observed::Ready
            }
        }
        /// Every task of `s` seen (ready from now on).
        fn settle(&self, s: &ClusterState) {
            self.seen
                .borrow_mut()
                .extend(s.tasks.values().map(|t| t.id.clone()));
        }
    }

    fn status(s: &ClusterState) -> Option<(UpdateState, String)> {
        let st = s.services["web"].deploy.status.as_ref()?;
        Some((st.state, st.message.clone()))
    }

    fn env(s: &ClusterState) -> BTreeSet<Vec<String>> {
        s.tasks.values().map(|t| t.spec.env.clone()).collect()
    }

    /// Ticks every 100 ms from `t` until the rollout ends (60 s at most); checks on every
    /// tick that at most `down` slots lack a ready task. Returns the time it ended.
    fn run(
        s: &mut ClusterState,
        nodes: &Nodes,
        id: &mut dyn FnMut() -> String,
        mut t: u64,
        down: usize,
    ) -> u64 {
        let end = t + 60_000;
        while s.services["web"].deploy.rollout.is_some() {
            assert!(
                t < end,
                "rollout did not end: {:?}",
                s.services["web"].deploy
            );
            s.advance_rollouts(t, &|task| nodes.observe(task), id, &|_| true);
            let replicas = s.services["web"].replicas;
            let web = ServiceName::new("web").unwrap();
            let lacking = (1..=replicas)
                .filter(|slot| {
                    !s.slot_tasks(&web, *slot)
                        .any(|task| nodes.seen.borrow().contains(&task.id))
                })
                .count();
            assert!(lacking <= down, "{lacking} slots down at {t}");
            t += 100;
        }
        t
    }

    #[test]
    fn an_update_rolls_one_slot_at_a_time_and_completes() {
        let (mut s, mut id) = cluster();
        let nodes = Nodes::default();
        nodes.settle(&s);
        let before: BTreeSet<String> = s.tasks.values().map(|t| t.id.clone()).collect();
        let mut spec = s.services["web"].spec(&s);
        spec.edit_env(&["V=2".into()], &[]).unwrap();
        let rev = s.revision;
        s.update_service("web", spec, 1_000, &mut id, &|_| true)
            .unwrap();
        assert!(s.revision > rev);
        let d = &s.services["web"].deploy;
        assert_eq!(d.version, 2);
        assert!(d.previous.as_ref().is_some_and(|p| p.env.is_empty()));
        assert_eq!(
            status(&s),
            Some((UpdateState::Updating, "update in progress".into()))
        );
        assert_eq!(s.outdated_slots("web").len(), 3, "nothing replaced yet");
        let ended = run(&mut s, &nodes, &mut id, 1_000, 1);
        assert_eq!(
            status(&s),
            Some((UpdateState::Completed, "update completed".into()))
        );
        let st = s.services["web"].deploy.status.clone().unwrap();
        assert_eq!((st.started_at, st.completed_at), (1, Some(ended / 1000)));
        assert!(ended >= 1_000 + 5_000, "the last task monitored 5 s");
        assert_eq!(env(&s), [vec!["V=2".to_string()]].into());
        assert!(s.tasks.values().all(|t| !before.contains(&t.id)));
        assert_eq!(
            s.tasks.keys().collect::<Vec<_>>(),
            ["web.1", "web.2", "web.3"],
            "stop-first keeps the slots' names"
        );
        let past = s.past_tasks("web");
        assert_eq!(past.len(), 3);
        assert!(past
            .iter()
            .all(|p| p.reason == "task updated" && !p.released));
    }

    #[test]
    fn rollback_returns_and_a_second_rollback_undoes_it() {
        let (mut s, mut id) = cluster();
        let nodes = Nodes::default();
        nodes.settle(&s);
        assert!(matches!(
            s.rollback_service("web", 0, &mut id, &|_| true),
            Err(StateError::NoPreviousSpec(_))
        ));
        let mut spec = s.services["web"].spec(&s);
        spec.env = vec!["V=2".into()];
        s.update_service("web", spec, 0, &mut id, &|_| true)
            .unwrap();
        let t = run(&mut s, &nodes, &mut id, 0, 1);
        s.rollback_service("web", t, &mut id, &|_| true).unwrap();
        assert_eq!(
            status(&s),
            Some((
                UpdateState::RollbackStarted,
                "manually requested rollback".into()
            ))
        );
        assert!(s.services["web"].env.is_empty());
        let t = run(&mut s, &nodes, &mut id, t, 1);
        assert_eq!(
            status(&s),
            Some((UpdateState::RollbackCompleted, "rollback completed".into()))
        );
        assert_eq!(env(&s), [vec![]].into());
        assert!(s
            .past_tasks("web")
            .iter()
            .any(|p| p.reason == "rolled back"));
        // The rolled-back spec is the previous one now: rolling back again returns to it.
        s.rollback_service("web", t, &mut id, &|_| true).unwrap();
        run(&mut s, &nodes, &mut id, t, 1);
        assert_eq!(env(&s), [vec!["V=2".to_string()]].into());
        assert_eq!(s.services["web"].deploy.version, 4);
    }

    #[test]
    fn a_failing_update_pauses_or_rolls_back_by_itself() {
        for action in [FailureAction::Pause, FailureAction::Rollback] {
            let (mut s, mut id) = cluster();
            let nodes = Nodes::default();
            nodes.settle(&s);
            let old: BTreeSet<String> = s.tasks.values().map(|t| t.id.clone()).collect();
            let mut spec = s.services["web"].spec(&s);
            spec.command = vec!["false".into()];
            spec.update_config.failure_action = action;
            s.update_service("web", spec, 0, &mut id, &|_| true)
                .unwrap();
            // The first new task exits at once.
            s.advance_rollouts(0, &|t| nodes.observe(t), &mut id, &|_| true);
            let new = s.tasks.values().find(|t| !old.contains(&t.id)).unwrap();
            nodes
                .set
                .borrow_mut()
                .insert(new.id.clone(), Observed::Failed);
            let why = format!("due to failure or early termination of task {}", new.id);
            s.advance_rollouts(100, &|t| nodes.observe(t), &mut id, &|_| true);
            match action {
                FailureAction::Pause => {
                    assert_eq!(
                        status(&s),
                        Some((UpdateState::Paused, format!("update paused {why}")))
                    );
                    assert!(s.services["web"].deploy.rollout.is_none());
                    assert_eq!(s.services["web"].command, ["false"], "the spec stays");
                    // The other two slots keep their old tasks.
                    assert_eq!(s.tasks.values().filter(|t| old.contains(&t.id)).count(), 2);
                }
                _ => {
                    assert_eq!(
                        status(&s),
                        Some((
                            UpdateState::RollbackStarted,
                            format!("update rolled back {why}")
                        ))
                    );
                    assert_eq!(s.services["web"].command, ["sleep", "1000"]);
                    run(&mut s, &nodes, &mut id, 200, 1);
                    assert_eq!(
                        status(&s),
                        Some((
                            UpdateState::RollbackCompleted,
                            format!("rollback completed: update rolled back {why}")
                        ))
                    );
                    assert!(s
                        .tasks
                        .values()
                        .all(|t| t.spec.command == ["sleep", "1000"]));
                }
            }
        }
    }

    #[test]
    fn start_first_runs_both_tasks_of_a_slot_until_the_new_one_is_ready() {
        let (mut s, mut id) = cluster();
        let nodes = Nodes::default();
        nodes.settle(&s);
        let web = ServiceName::new("web").unwrap();
        let mut spec = s.services["web"].spec(&s);
        spec.env = vec!["V=2".into()];
        spec.update_config.order = UpdateOrder::StartFirst;
        s.update_service("web", spec, 0, &mut id, &|_| true)
            .unwrap();
        s.advance_rollouts(0, &|t| nodes.observe(t), &mut id, &|_| true);
        let slot1: Vec<&Task> = s.slot_tasks(&web, 1).collect();
        assert_eq!(slot1.len(), 2, "old and new side by side");
        let new = slot1.iter().find(|t| t.name != "web.1").unwrap();
        assert_eq!(new.name, format!("web.1.{}", new.id));
        assert_ne!(
            new.attachments[0].address,
            s.tasks["web.1"].attachments[0].address
        );
        assert!(s.missing_slots().is_empty());
        // Paused by a new update before it is ready: the replacement goes, the old stays.
        let mut spec = s.services["web"].spec(&s);
        spec.env = vec!["V=3".into()];
        s.update_service("web", spec, 50, &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.slot_tasks(&web, 1).count(), 1);
        assert!(s.tasks.contains_key("web.1"));
        // Run to the end: never a slot without a ready task; names alternate.
        run(&mut s, &nodes, &mut id, 100, 0);
        assert_eq!(status(&s).unwrap().0, UpdateState::Completed);
        assert_eq!(env(&s), [vec!["V=3".to_string()]].into());
        assert!(s.tasks.keys().all(|k| k.starts_with("web.") && k.len() > 6));
        assert!((1..=3).all(|slot| s.slot_tasks(&web, slot).count() == 1));
        // The next stop-first update gives the slots back their short names.
        let mut spec = s.services["web"].spec(&s);
        spec.update_config.order = UpdateOrder::StopFirst;
        spec.force_update += 1;
        s.update_service("web", spec, 10_000, &mut id, &|_| true)
            .unwrap();
        run(&mut s, &nodes, &mut id, 10_000, 1);
        assert_eq!(
            s.tasks.keys().collect::<Vec<_>>(),
            ["web.1", "web.2", "web.3"]
        );
    }

    #[test]
    fn a_slot_without_an_address_waits_and_keeps_its_task() {
        // A /29: gateway, VIP, three tasks and one free address.
        let mut s = state();
        net(&mut s, "small", Some("10.3.0.0/29")).unwrap();
        let mut id = ids();
        s.create_service(svc("web", &["small"], 3), &mut id, &|_| true)
            .unwrap();
        let nodes = Nodes::default();
        nodes.settle(&s);
        let mut spec = s.services["web"].spec(&s);
        spec.env = vec!["V=2".into()];
        s.update_service("web", spec, 0, &mut id, &|_| true)
            .unwrap();
        let advance = |s: &mut ClusterState, t, id: &mut dyn FnMut() -> String| {
            s.advance_rollouts(t, &|task| nodes.observe(task), id, &|_| true)
        };
        advance(&mut s, 0, &mut id); // web.1 replaced: the last free address
        advance(&mut s, 100, &mut id); // starting
        advance(&mut s, 200, &mut id); // ready; web.2 has nowhere to go
        let old2 = s.tasks["web.2"].clone();
        assert!(old2.spec.env.is_empty(), "web.2 kept its old task");
        let (_, message) = status(&s).unwrap();
        assert!(
            message
                .starts_with("update in progress: slot 2: no free address left in network small"),
            "{message}"
        );
        // The old web.1 stops on its node: its address is free, and web.2 goes on.
        let running: BTreeSet<String> = s.tasks.values().map(|t| t.id.clone()).collect();
        s.release_stopped("n1", &running);
        advance(&mut s, 300, &mut id);
        assert_ne!(s.tasks["web.2"].id, old2.id);
        assert_eq!(status(&s).unwrap().1, "update in progress");
    }

    #[test]
    fn changes_without_new_tasks_apply_at_once() {
        let (mut s, mut id) = cluster();
        let a = NetworkName::new("a").unwrap();
        let tasks = s.tasks.clone();
        let mut spec = s.services["web"].spec(&s);
        spec.lb_idle_timeout = Some(60);
        spec.update_config.parallelism = 2;
        spec.rollback_config.order = UpdateOrder::StartFirst;
        spec.endpoint_mode = EndpointMode::Dnsrr;
        s.update_service("web", spec, 0, &mut id, &|_| true)
            .unwrap();
        let web = &s.services["web"];
        assert!(web.vips.is_empty(), "dnsrr: the VIP is freed at once");
        assert_eq!(
            (web.lb_idle_timeout, web.deploy.update_config.parallelism),
            (Some(60), 2)
        );
        assert!(web.deploy.rollout.is_none() && web.deploy.status.is_none());
        assert_eq!(s.tasks, tasks, "no task changed");
        let mut spec = s.services["web"].spec(&s);
        spec.endpoint_mode = EndpointMode::Vip;
        spec.replicas = 4;
        s.update_service("web", spec, 0, &mut id, &|_| true)
            .unwrap();
        assert!(s.services["web"].vips.contains_key(&a), "VIP again");
        assert_eq!(s.tasks.len(), 4);
        assert!(s.services["web"].deploy.rollout.is_none());
        // --force: the same spec, every task outdated.
        let mut spec = s.services["web"].spec(&s);
        spec.force_update += 1;
        s.update_service("web", spec, 0, &mut id, &|_| true)
            .unwrap();
        assert_eq!(s.outdated_slots("web").len(), 4);
        assert_eq!(
            s.services["web"].deploy.rollout.as_ref().unwrap().total(),
            4
        );
    }

    #[test]
    fn network_changes_roll_and_keep_the_old_network_in_use() {
        let (mut s, mut id) = cluster();
        net(&mut s, "b", Some("10.0.3.0/24")).unwrap();
        let nodes = Nodes::default();
        nodes.settle(&s);
        let (a, b) = (
            NetworkName::new("a").unwrap(),
            NetworkName::new("b").unwrap(),
        );
        let mut spec = s.services["web"].spec(&s);
        spec.edit_networks(vec![(b.clone(), vec![])], std::slice::from_ref(&a))
            .unwrap();
        s.update_service("web", spec, 0, &mut id, &|_| true)
            .unwrap();
        assert!(
            s.services["web"].vips.contains_key(&b) && !s.services["web"].vips.contains_key(&a)
        );
        assert!(matches!(
            s.remove_network("a"),
            Err(StateError::NetworkInUse { .. })
        ));
        run(&mut s, &nodes, &mut id, 0, 1);
        assert!(s.tasks.values().all(|t| t.attachments[0].network == b));
        s.remove_network("a").unwrap();
    }

    #[test]
    fn invalid_specs_are_refused_and_change_nothing() {
        let (mut s, mut id) = cluster();
        let before = s.clone();
        let spec = s.services["web"].spec(&s);
        let mut bad = spec.clone();
        bad.command.clear();
        let mut no_net = spec.clone();
        no_net.networks.clear();
        let mut health = spec.clone();
        health.healthcheck = Some(crate::state::HealthCheck {
            command: vec!["true".into()],
            interval_s: 0,
            timeout_s: 1,
            retries: 3,
            start_period_s: 0,
        });
        let mut policy = spec.clone();
        policy.rollback_config.failure_action = FailureAction::Rollback;
        let mut many = spec;
        many.replicas = crate::state::MAX_REPLICAS + 1;
        for (spec, want) in [
            (bad, "a service needs a command to run"),
            (no_net, "a service needs at least one network"),
            (health, "invalid health check: its interval and timeout must be at least 1s"),
            (policy, "invalid update policy: a rollback cannot roll back: --rollback-failure-action is pause or continue"),
            (many, "1001 replicas is more than the limit of 1000"),
        ] {
            let e = s.update_service("web", spec, 0, &mut id, &|_| true).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        assert_eq!(s, before);
    }
}
