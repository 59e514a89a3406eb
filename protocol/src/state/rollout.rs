//! The rollout state machine: which slots of a service to replace next, when, and what a
//! failure means, as Swarm's updater decides it. Pure: time comes in as an argument, and
//! what it does to the cluster goes through a [`Target`] (the cluster state in `update.rs`,
//! a fake in the tests), so every decision can be replayed.
//!
//! A [`Rollout`] starts with the slots whose task is outdated (or all, for `--force`) and
//! one of the service's [`UpdateConfig`]s. Each [`Rollout::poll`]:
//!
//! 1. looks at the new tasks under way: one that is *ready* (running, and healthy if it has
//!    a check) frees its lane after `delay` and is *monitored* for `monitor`; one that fails
//!    before it is ready, or within `monitor` after, counts as a failure. With `start-first`
//!    the old task of the slot leaves only once its replacement is ready; a replacement
//!    that fails leaves instead, and the old task keeps serving.
//! 2. If the failures are more than `max_failure_ratio` of the slots, applies the failure
//!    action: `pause` (a rollback that fails pauses too), `rollback`, or `continue`.
//! 3. Starts the next waiting slots while fewer than `parallelism` lanes are busy (a lane is
//!    busy while its new task is not ready yet, then for `delay`): `stop-first` takes the
//!    old task out and places the new one in one change; `start-first` places the new one
//!    beside it.
//! 4. Completes once every slot is done or failed, the last ones monitored.

use super::policy::{FailureAction, UpdateConfig, UpdateOrder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Whether a rollout goes to a new spec or back to the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutKind {
    Update,
    Rollback,
}

/// What the machine sees of a new task (the caller's reading of its node's reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Placed, not ready yet: pending, starting, or running but not yet healthy.
    Starting,
    /// Running, and healthy if it has a health check.
    Ready,
    /// Failed to start, exited, was restarted, or turned unhealthy.
    Failed,
    /// No longer in the desired state (scaled down, rescheduled, drained, removed).
    Gone,
}

/// What [`Target::replace`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replace {
    /// A new task (this id) was placed for the slot.
    Started(String),
    /// The old task is no longer there (something else replaced it): nothing to do.
    NotNeeded,
    /// It cannot be placed now (why: no node, no address); tried again on the next poll.
    Blocked(String),
}

/// Why [`Target::retire`] takes a task out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// start-first: the old task, now that its replacement is ready.
    Superseded,
    /// start-first: a replacement that failed; the old task stays.
    Failed,
}

/// What a rollout acts on.
pub trait Target {
    /// The state of the task with this id.
    fn observe(&self, task: &str) -> Observed;
    /// Replaces the task `old` of `slot`: with `StopFirst` takes it out and places a new
    /// one; with `StartFirst` places a new one beside it.
    fn replace(&mut self, slot: u32, old: &str, order: UpdateOrder) -> Replace;
    /// Takes the task with this id out of the desired state.
    fn retire(&mut self, task: &str, why: Retire);
}

/// Where one slot of a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotStep {
    /// To be replaced; `old` is the id of its outdated task.
    Waiting {
        old: String,
    },
    /// Its new task is placed and not ready yet; `old` is start-first's old task, still
    /// running beside it (None with stop-first: it left when the new one was placed).
    Starting {
        new: String,
        old: Option<String>,
    },
    /// Its new task is ready; a failure before `until_ms` still counts.
    Monitoring {
        new: String,
        until_ms: u64,
    },
    Done,
    /// Its new task failed (counted in [`Rollout::failed`]).
    Failed {
        new: String,
    },
}

/// How a poll left the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    InProgress,
    /// Every slot is replaced (or failed, with `continue`) and monitored.
    Completed,
    /// Stopped by failures; the message says which task (Docker's wording).
    Paused(String),
    /// Failures ask to return to the previous spec (an update with `rollback`).
    RollBack(String),
}

/// One rollout under way: a service going to its current spec, slot by slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub kind: RolloutKind,
    /// The policy in force: the service's update config, or its rollback config.
    pub policy: UpdateConfig,
    /// Unix milliseconds.
    pub started_at_ms: u64,
    /// Every slot the rollout replaces, in the order it does.
    pub slots: BTreeMap<u32, SlotStep>,
    /// Ids of the new tasks that failed, oldest first.
    pub failed: Vec<String>,
    /// When lanes busy with a delay free again, unix milliseconds.
    pub cooldowns: Vec<u64>,
    /// Why the next slot could not be placed on the last poll, if it could not.
    pub blocked: Option<String>,
}

impl Rollout {
    /// A rollout of `slots` (slot, id of its outdated task) under `policy`.
    pub fn new(
        kind: RolloutKind,
        policy: UpdateConfig,
        slots: impl IntoIterator<Item = (u32, String)>,
        now_ms: u64,
    ) -> Rollout {
        Rollout {
            kind,
            policy,
            started_at_ms: now_ms,
            slots: slots
                .into_iter()
                .map(|(slot, old)| (slot, SlotStep::Waiting { old }))
                .collect(),
            failed: Vec::new(),
            cooldowns: Vec::new(),
            blocked: None,
        }
    }

    /// Slots the rollout replaces.
    pub fn total(&self) -> usize {
        self.slots.len()
    }

    /// New tasks placed start-first and not ready yet: what has to go if the rollout stops
    /// (their old tasks keep serving).
    pub fn unready_successors(&self) -> Vec<&str> {
        self.slots
            .values()
            .filter_map(|s| match s {
                SlotStep::Starting { new, old: Some(_) } => Some(new.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Drops the slots above `replicas` (the service was scaled down meanwhile).
    pub fn forget_slots_above(&mut self, replicas: u32) {
        self.slots.retain(|slot, _| *slot <= replicas);
    }

    /// One step at `now_ms` (see the module doc).
    pub fn poll(&mut self, now_ms: u64, target: &mut dyn Target) -> Outcome {
        let failure = self.watch(now_ms, target);
        if let Some(task) = failure {
            if self
                .policy
                .max_failure_ratio
                .exceeded(self.failed.len(), self.total())
            {
                let why = format!("due to failure or early termination of task {task}");
                match (self.policy.failure_action, self.kind) {
                    (FailureAction::Continue, _) => {}
                    (FailureAction::Rollback, RolloutKind::Update) => {
                        return Outcome::RollBack(format!("update rolled back {why}"))
                    }
                    (_, RolloutKind::Update) => {
                        return Outcome::Paused(format!("update paused {why}"))
                    }
                    (_, RolloutKind::Rollback) => {
                        return Outcome::Paused(format!("rollback paused {why}"))
                    }
                }
            }
        }
        self.start_slots(now_ms, target);
        let finished = self
            .slots
            .values()
            .all(|s| matches!(s, SlotStep::Done | SlotStep::Failed { .. }));
        if finished {
            Outcome::Completed
        } else {
            Outcome::InProgress
        }
    }

    /// Step 1: the new tasks under way. Returns the last task that failed in this step.
    fn watch(&mut self, now_ms: u64, target: &mut dyn Target) -> Option<String> {
        let (monitor, delay) = (self.policy.monitor_ms, self.policy.delay_ms);
        let mut failure = None;
        for step in self.slots.values_mut() {
            let next = match step {
                SlotStep::Starting { new, old } => match target.observe(new) {
                    Observed::Starting => continue,
                    Observed::Ready => {
                        if let Some(old) = old.take() {
                            target.retire(&old, Retire::Superseded);
                        }
                        self.cooldowns.push(now_ms + delay);
                        SlotStep::Monitoring {
                            new: std::mem::take(new),
                            until_ms: now_ms + monitor,
                        }
                    }
                    Observed::Failed => {
                        if old.is_some() {
                            target.retire(new, Retire::Failed);
                        }
                        self.cooldowns.push(now_ms + delay);
                        self.failed.push(new.clone());
                        failure = Some(new.clone());
                        SlotStep::Failed {
                            new: std::mem::take(new),
                        }
                    }
                    // Replaced by something else (drained, rescheduled): with stop-first
                    // its replacement has the new spec; with start-first the old task is
                    // still there and waits for another turn.
                    Observed::Gone => {
                        self.cooldowns.push(now_ms + delay);
                        match old.take() {
                            Some(old) => SlotStep::Waiting { old },
                            None => SlotStep::Done,
                        }
                    }
                },
                SlotStep::Monitoring { new, until_ms } => match target.observe(new) {
                    // The window is over: whatever happens now is the healer's business.
                    _ if now_ms >= *until_ms => SlotStep::Done,
                    Observed::Failed => {
                        self.failed.push(new.clone());
                        failure = Some(new.clone());
                        SlotStep::Failed {
                            new: std::mem::take(new),
                        }
                    }
                    Observed::Gone => SlotStep::Done,
                    _ => continue,
                },
                _ => continue,
            };
            *step = next;
        }
        failure
    }

    /// Step 3: start waiting slots while lanes are free.
    fn start_slots(&mut self, now_ms: u64, target: &mut dyn Target) {
        let lanes = match self.policy.parallelism {
            0 => usize::MAX,
            n => n as usize,
        };
        let starting = self
            .slots
            .values()
            .filter(|s| matches!(s, SlotStep::Starting { .. }))
            .count();
        let cooling = self.cooldowns.iter().filter(|t| **t > now_ms).count();
        let mut busy = starting + cooling;
        if busy >= lanes
            || !self
                .slots
                .values()
                .any(|s| matches!(s, SlotStep::Waiting { .. }))
        {
            return;
        }
        self.cooldowns.retain(|t| *t > now_ms);
        let order = self.policy.order;
        for (slot, step) in self.slots.iter_mut() {
            if busy >= lanes {
                break;
            }
            let SlotStep::Waiting { old } = step else {
                continue;
            };
            match target.replace(*slot, old, order) {
                Replace::Started(new) => {
                    let old = std::mem::take(old);
                    *step = SlotStep::Starting {
                        new,
                        old: (order == UpdateOrder::StartFirst).then_some(old),
                    };
                    self.blocked = None;
                    busy += 1;
                }
                Replace::NotNeeded => *step = SlotStep::Done,
                Replace::Blocked(why) => {
                    self.blocked = Some(format!("slot {slot}: {why}"));
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::policy::FailureRatio;
    use std::collections::BTreeMap;

    /// A cluster reduced to task ids and what they look like; logs what the rollout did.
    #[derive(Default)]
    struct Fake {
        tasks: BTreeMap<String, Observed>,
        log: Vec<String>,
        blocked: Option<String>,
        made: u32,
    }

    impl Fake {
        /// Slots 1..=n, each with a running old task `oN`.
        fn with(n: u32) -> (Fake, Vec<(u32, String)>) {
            let mut f = Fake::default();
            let slots: Vec<(u32, String)> = (1..=n).map(|s| (s, format!("o{s}"))).collect();
            for (_, old) in &slots {
                f.tasks.insert(old.clone(), Observed::Ready);
            }
            (f, slots)
        }

        fn set(&mut self, task: &str, o: Observed) {
            self.tasks.insert(task.to_string(), o);
        }

        /// The log since the last call.
        fn take(&mut self) -> Vec<String> {
            std::mem::take(&mut self.log)
        }
    }

    impl Target for Fake {
        fn observe(&self, task: &str) -> Observed {
            self.tasks.get(task).copied().unwrap_or(Observed::Gone)
        }
        fn replace(&mut self, slot: u32, old: &str, order: UpdateOrder) -> Replace {
            if let Some(why) = &self.blocked {
                return Replace::Blocked(why.clone());
            }
            if !self.tasks.contains_key(old) {
                return Replace::NotNeeded;
            }
            self.made += 1;
            let new = format!("n{slot}.{}", self.made);
            if order == UpdateOrder::StopFirst {
                self.tasks.remove(old);
            }
            self.tasks.insert(new.clone(), Observed::Starting);
            self.log.push(format!("{order} {slot}: {old} -> {new}"));
            Replace::Started(new)
        }
        fn retire(&mut self, task: &str, why: Retire) {
            self.tasks.remove(task);
            self.log.push(format!("retire {task} ({why:?})"));
        }
    }

    fn policy(parallelism: u32) -> UpdateConfig {
        UpdateConfig {
            parallelism,
            monitor_ms: 1_000,
            ..Default::default()
        }
    }

    fn rollout(p: UpdateConfig, slots: Vec<(u32, String)>) -> Rollout {
        Rollout::new(RolloutKind::Update, p, slots, 0)
    }

    /// The ids of the new tasks being started.
    fn starting(r: &Rollout) -> Vec<String> {
        r.slots
            .values()
            .filter_map(|s| match s {
                SlotStep::Starting { new, .. } => Some(new.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_slot_at_a_time_each_after_the_last_is_ready() {
        let (mut f, slots) = Fake::with(3);
        let mut r = rollout(policy(1), slots);
        assert_eq!(r.poll(0, &mut f), Outcome::InProgress);
        assert_eq!(f.take(), ["stop-first 1: o1 -> n1.1"]);
        // Not ready: nothing else starts, however long it takes.
        assert_eq!(r.poll(60_000, &mut f), Outcome::InProgress);
        assert!(f.take().is_empty());
        f.set("n1.1", Observed::Ready);
        r.poll(60_100, &mut f);
        assert_eq!(f.take(), ["stop-first 2: o2 -> n2.2"]);
        f.set("n2.2", Observed::Ready);
        r.poll(60_200, &mut f);
        f.set("n3.3", Observed::Ready);
        // The last one is ready at 60 300: complete once monitored, 1 s later.
        assert_eq!(r.poll(60_300, &mut f), Outcome::InProgress);
        assert_eq!(r.poll(61_299, &mut f), Outcome::InProgress);
        assert_eq!(r.poll(61_300, &mut f), Outcome::Completed);
        assert!(r.failed.is_empty());
        assert_eq!(
            f.tasks.keys().collect::<Vec<_>>(),
            ["n1.1", "n2.2", "n3.3"],
            "every old task replaced"
        );
    }

    #[test]
    fn parallelism_bounds_the_slots_under_way() {
        let (mut f, slots) = Fake::with(5);
        let mut r = rollout(policy(2), slots.clone());
        r.poll(0, &mut f);
        assert_eq!(starting(&r), ["n1.1", "n2.2"]);
        f.set("n1.1", Observed::Ready);
        r.poll(10, &mut f);
        assert_eq!(starting(&r), ["n2.2", "n3.3"], "a lane freed, one more");
        // 0: all at once.
        let (mut f, slots) = Fake::with(5);
        let mut r = rollout(policy(0), slots);
        r.poll(0, &mut f);
        assert_eq!(starting(&r).len(), 5);
    }

    #[test]
    fn delay_holds_the_lane_after_a_slot_is_ready() {
        let (mut f, slots) = Fake::with(2);
        let p = UpdateConfig {
            delay_ms: 10_000,
            ..policy(1)
        };
        let mut r = rollout(p, slots);
        r.poll(0, &mut f);
        f.set("n1.1", Observed::Ready);
        r.poll(1_000, &mut f);
        f.take();
        r.poll(10_999, &mut f);
        assert!(f.take().is_empty(), "still in the delay");
        r.poll(11_000, &mut f);
        assert_eq!(f.take(), ["stop-first 2: o2 -> n2.2"]);
    }

    #[test]
    fn a_failure_within_the_monitor_window_counts_after_it_does_not() {
        for (fail_at, counted) in [(1_500, true), (2_000, false)] {
            let (mut f, slots) = Fake::with(2);
            let p = UpdateConfig {
                failure_action: FailureAction::Continue,
                ..policy(2)
            };
            let mut r = rollout(p, slots);
            r.poll(0, &mut f);
            f.set("n1.1", Observed::Ready);
            f.set("n2.2", Observed::Ready);
            r.poll(1_000, &mut f); // monitored until 2 000
            f.set("n1.1", Observed::Failed);
            r.poll(fail_at, &mut f);
            assert_eq!(r.failed.len(), counted as usize, "failure at {fail_at}");
            assert_eq!(r.poll(2_000, &mut f), Outcome::Completed);
        }
    }

    #[test]
    fn failing_before_ready_pauses_by_default() {
        let (mut f, slots) = Fake::with(3);
        let mut r = rollout(policy(1), slots);
        r.poll(0, &mut f);
        f.set("n1.1", Observed::Failed);
        assert_eq!(
            r.poll(1, &mut f),
            Outcome::Paused(
                "update paused due to failure or early termination of task n1.1".into()
            )
        );
        assert_eq!(r.failed, ["n1.1"]);
        // Nothing more started; the other slots keep their old tasks.
        assert!(f.tasks.contains_key("o2") && f.tasks.contains_key("o3"));
    }

    #[test]
    fn failure_ratio_and_continue() {
        // 4 slots, ratio 0.5: two failures are not more than half, the third is.
        let (mut f, slots) = Fake::with(4);
        let p = UpdateConfig {
            max_failure_ratio: FailureRatio::from_f64(0.5).unwrap(),
            ..policy(1)
        };
        let mut r = rollout(p, slots);
        let mut outcomes = Vec::new();
        for t in 0..3u64 {
            r.poll(t * 10, &mut f);
            let new = starting(&r).pop().expect("a slot under way");
            f.set(&new, Observed::Failed);
            outcomes.push(r.poll(t * 10 + 5, &mut f));
        }
        assert!(matches!(
            outcomes[..2],
            [Outcome::InProgress, Outcome::InProgress]
        ));
        assert!(matches!(outcomes[2], Outcome::Paused(_)), "{outcomes:?}");
        // continue: every slot tried, completed with its failures.
        let (mut f, slots) = Fake::with(3);
        let p = UpdateConfig {
            failure_action: FailureAction::Continue,
            ..policy(0)
        };
        let mut r = rollout(p, slots);
        r.poll(0, &mut f);
        for new in starting(&r) {
            f.set(&new, Observed::Failed);
        }
        assert_eq!(r.poll(1, &mut f), Outcome::Completed);
        assert_eq!(r.failed.len(), 3);
    }

    #[test]
    fn rollback_action_rolls_back_an_update_and_pauses_a_rollback() {
        let p = UpdateConfig {
            failure_action: FailureAction::Rollback,
            ..policy(1)
        };
        for (kind, want) in [
            (
                RolloutKind::Update,
                Outcome::RollBack(
                    "update rolled back due to failure or early termination of task n1.1".into(),
                ),
            ),
            (
                RolloutKind::Rollback,
                Outcome::Paused(
                    "rollback paused due to failure or early termination of task n1.1".into(),
                ),
            ),
        ] {
            let (mut f, slots) = Fake::with(2);
            let mut r = Rollout::new(kind, p, slots, 0);
            r.poll(0, &mut f);
            f.set("n1.1", Observed::Failed);
            assert_eq!(r.poll(1, &mut f), want);
        }
    }

    #[test]
    fn start_first_keeps_the_old_task_until_the_new_one_is_ready() {
        let (mut f, slots) = Fake::with(2);
        let p = UpdateConfig {
            order: UpdateOrder::StartFirst,
            failure_action: FailureAction::Continue,
            ..policy(1)
        };
        let mut r = rollout(p, slots);
        r.poll(0, &mut f);
        assert_eq!(f.take(), ["start-first 1: o1 -> n1.1"]);
        assert!(f.tasks.contains_key("o1"), "both run");
        assert_eq!(r.unready_successors(), ["n1.1"]);
        f.set("n1.1", Observed::Ready);
        r.poll(10, &mut f);
        assert_eq!(
            f.take(),
            ["retire o1 (Superseded)", "start-first 2: o2 -> n2.2"]
        );
        // A replacement that fails goes; the old task stays.
        f.set("n2.2", Observed::Failed);
        r.poll(20, &mut f);
        assert_eq!(f.take(), ["retire n2.2 (Failed)"]);
        assert!(f.tasks.contains_key("o2"));
        assert!(r.unready_successors().is_empty());
        assert_eq!(r.poll(2_000, &mut f), Outcome::Completed);
        // The same with stop-first: the old task leaves when the new one is placed.
        let (mut f, slots) = Fake::with(1);
        let mut r = rollout(policy(1), slots);
        r.poll(0, &mut f);
        assert!(!f.tasks.contains_key("o1"));
        assert!(r.unready_successors().is_empty());
    }

    #[test]
    fn slots_replaced_elsewhere_or_blocked() {
        let (mut f, slots) = Fake::with(3);
        let mut r = rollout(policy(1), slots);
        // o2 went away before its turn (drained: its replacement has the new spec).
        f.tasks.remove("o2");
        f.blocked = Some("no free address".into());
        r.poll(0, &mut f);
        assert_eq!(r.blocked.as_deref(), Some("slot 1: no free address"));
        assert!(starting(&r).is_empty(), "tried again next time");
        f.blocked = None;
        r.poll(1, &mut f);
        assert_eq!(r.blocked, None);
        f.set("n1.1", Observed::Ready);
        r.poll(2, &mut f);
        assert_eq!(r.slots[&2], SlotStep::Done, "nothing to replace");
        // The new task of slot 3 is rescheduled away: done, not a failure.
        f.tasks.remove("n3.2");
        r.poll(3, &mut f);
        assert_eq!(r.slots[&3], SlotStep::Done);
        assert!(r.failed.is_empty());
        // Scaled down below a slot: it is forgotten.
        r.forget_slots_above(1);
        assert_eq!(r.total(), 1);
        assert_eq!(r.poll(5_000, &mut f), Outcome::Completed);
    }

    #[test]
    fn rollouts_serialize_in_json_and_postcard() {
        let (mut f, slots) = Fake::with(2);
        let mut r = rollout(policy(1), slots);
        r.poll(0, &mut f);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Rollout>(&json).unwrap(), r);
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(postcard::from_bytes::<Rollout>(&bytes).unwrap(), r);
    }
}
