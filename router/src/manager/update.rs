//! Updates and rollbacks on the manager: a `service update` request becomes a new spec
//! ([`apply_update`]), installed by `ClusterState::update_service`; `service rollback` and
//! `service scale` go the same way. The rollouts they start are driven by
//! [`Manager::advance_rollouts`], every [`ROLLOUT_TICK`] while one is under way, with the
//! clock and the nodes' reports read as [`observe`] says.
//!
//! The decisions are `protocol::state`'s (`update.rs`, `rollout.rs`); this file only
//! translates the request, reads the status board and logs what happened.

use super::Manager;
use crate::clock::now_ms;
use crate::ids::new_id;
use protocol::api::{self, OpError, TaskHealth, TaskState, TaskStatus};
use protocol::state::{
    ClusterState, Observed, PortConfig, Service, Spec, StateError, Task, UpdateState,
};
use protocol::types::NetworkName;
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often the manager moves rollouts on while one is under way (a new task's report
/// arrives within a second; this keeps a rollout from adding much to it).
pub const ROLLOUT_TICK: Duration = Duration::from_millis(250);

/// `spec` as `u` asks it changed (all but `rollback`, which is not a change of spec).
pub fn apply_update(spec: &mut Spec, u: &api::ServiceUpdate, service: &str) -> Result<(), OpError> {
    let bad = |e: StateError| OpError::from(e);
    if let Some(args) = &u.args {
        spec.command = args.clone();
    }
    if let Some(image) = &u.image {
        match spec.image.as_mut() {
            Some(i) => i.image = image.clone(),
            None => {
                return Err(OpError::bad_request(format!(
                    "service {service} runs processes, not an image: --image applies only to \
                     services created with --image"
                )))
            }
        }
    }
    spec.edit_env(&u.env_add, &u.env_rm).map_err(bad)?;
    if let Some(n) = u.replicas {
        spec.replicas = n;
    }
    let name = |s: &str| NetworkName::new(s).map_err(|e| OpError::bad_request(e.to_string()));
    let add = u
        .network_add
        .iter()
        .map(|t| Ok((name(&t.target)?, t.aliases.clone())))
        .collect::<Result<Vec<_>, OpError>>()?;
    let rm = u
        .network_rm
        .iter()
        .map(|n| name(n))
        .collect::<Result<Vec<_>, _>>()?;
    spec.edit_networks(add, &rm).map_err(bad)?;
    let rm = u
        .publish_rm
        .iter()
        .map(|s| api::parse_publish_rm(s).map_err(OpError::bad_request))
        .collect::<Result<Vec<_>, _>>()?;
    let add: Vec<PortConfig> = u.publish_add.iter().map(|p| (*p).into()).collect();
    spec.edit_ports(add, &rm, service).map_err(bad)?;
    if let Some(mode) = u.endpoint_mode {
        spec.endpoint_mode = mode;
    }
    if let Some(t) = u.lb_idle_timeout {
        if t == 0 {
            return Err(OpError::bad_request(
                "--lb-idle-timeout must be at least one second",
            ));
        }
        spec.lb_idle_timeout = Some(t);
    }
    spec.healthcheck = u
        .health
        .applied_to(spec.healthcheck.take())
        .map_err(OpError::bad_request)?;
    if let Some(g) = u.stop_grace_period_s {
        spec.stop_grace_period_s = Some(g);
    }
    spec.update_config = u.update_config.applied_to(spec.update_config);
    spec.rollback_config = u.rollback_config.applied_to(spec.rollback_config);
    if u.force {
        spec.force_update += 1;
    }
    Ok(())
}

/// What a new task's reports say for a rollout: ready once running (and healthy if it has
/// a check), failed once it has failed, exited or turned unhealthy.
pub fn observe(task: &Task, status: Option<&TaskStatus>) -> Observed {
    let Some(st) = status else {
        return Observed::Starting;
    };
    if matches!(st.state, TaskState::Failed | TaskState::Shutdown)
        || st.restarts > 0
        || st.health == Some(TaskHealth::Unhealthy)
    {
        return Observed::Failed;
    }
    let healthy = task.spec.healthcheck.is_none() || st.health == Some(TaskHealth::Healthy);
    if st.state == TaskState::Running && healthy {
        Observed::Ready
    } else {
        Observed::Starting
    }
}

impl Manager {
    /// `service update` (or, with `rollback`, `service rollback`).
    pub fn update_service(
        &self,
        name: &str,
        update: api::ServiceUpdate,
    ) -> Result<Service, OpError> {
        if update.rollback {
            let only = api::ServiceUpdate {
                rollback: true,
                ..Default::default()
            };
            if update != only {
                return Err(OpError::bad_request(
                    "a rollback returns to the previous spec: it takes no other change",
                ));
            }
            return self.rollback_service(name);
        }
        let health = self.health.clone();
        let now = now_ms();
        self.commit(|s| {
            let svc = service(s, name)?;
            let mut spec = svc.spec(s);
            apply_update(&mut spec, &update, name)?;
            s.update_service(name, spec, now, &mut new_id, &|n| health.is_ready(n))?;
            Ok(service(s, name)?.clone())
        })
    }

    /// `service rollback`: the previous spec, rolled out under the rollback policy.
    pub fn rollback_service(&self, name: &str) -> Result<Service, OpError> {
        let health = self.health.clone();
        let now = now_ms();
        self.commit(|s| {
            s.rollback_service(name, now, &mut new_id, &|n| health.is_ready(n))?;
            Ok(service(s, name)?.clone())
        })
    }

    /// `service scale`: an update of the replica count (so a rollback returns to the
    /// count before, as in Swarm).
    pub fn scale_service(&self, name: &str, replicas: u32) -> Result<Service, OpError> {
        if self
            .snapshot()
            .services
            .get(name)
            .is_some_and(|s| s.mode == protocol::state::ServiceMode::Global)
        {
            return Err(StateError::NotReplicated("scale").into());
        }
        let update = api::ServiceUpdate {
            replicas: Some(replicas),
            ..Default::default()
        };
        self.update_service(name, update)
    }

    /// Moves every rollout under way one step at `now_ms` (Unix milliseconds), reading
    /// new tasks' states from the status board. Persists only what changed; does nothing
    /// while no rollout is under way.
    pub fn advance_rollouts(&self, now_ms: u64) {
        let before = self.snapshot();
        if !before.services.values().any(|s| s.deploy.rollout.is_some()) {
            return;
        }
        let board = self.statuses.read().map(|b| b.clone()).unwrap_or_default();
        let reported = |t: &Task| {
            let status = board.get(&t.name).filter(|e| e.id == t.id);
            observe(t, status.map(|e| &e.status))
        };
        let health = self.health.clone();
        let result = self.change_if(|s| {
            s.advance_rollouts(now_ms, &reported, &mut new_id, &|n| health.is_ready(n))
        });
        match result {
            Ok(true) => log_transitions(&before, &self.snapshot()),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cannot move rollouts on"),
        }
    }
}

fn service<'a>(s: &'a ClusterState, name: &str) -> Result<&'a Service, OpError> {
    s.services
        .get(name)
        .ok_or_else(|| StateError::NoSuchService(name.to_string()).into())
}

/// Logs rollouts that ended or turned, and tasks they placed or took out.
fn log_transitions(before: &ClusterState, after: &ClusterState) {
    let status = |s: &ClusterState| -> BTreeMap<String, Option<UpdateState>> {
        s.services
            .values()
            .map(|svc| {
                let st = svc.deploy.status.as_ref().map(|u| u.state);
                (svc.name.to_string(), st)
            })
            .collect()
    };
    let (was, now) = (status(before), status(after));
    for (name, state) in &now {
        if was.get(name) != Some(state) {
            let message = after
                .services
                .get(name.as_str())
                .and_then(|s| s.deploy.status.as_ref())
                .map(|u| u.message.clone())
                .unwrap_or_default();
            info!(service = %name, state = ?state, %message, "rollout");
        }
    }
    for t in after.tasks.values() {
        if !before.tasks.contains_key(&t.name) {
            debug!(task = %t.name, id = %t.id, node = %t.node, "rollout placed a task");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::api::{HealthUpdate, NetworkTarget, ServiceUpdate};
    use protocol::state::{
        EndpointMode, FailureAction, HealthCheck, PortProtocol, PublishMode, UpdateConfig,
        UpdateConfigChange, UpdateOrder,
    };

    fn spec() -> Spec {
        Spec {
            networks: vec![NetworkName::new("a").unwrap()],
            aliases: Default::default(),
            replicas: 3,
            command: vec!["sleep".into(), "1000".into()],
            env: vec!["V=1".into()],
            endpoint_mode: EndpointMode::Vip,
            lb_idle_timeout: None,
            ports: vec![],
            healthcheck: None,
            stop_grace_period_s: None,
            force_update: 0,
            update_config: UpdateConfig::default(),
            rollback_config: UpdateConfig::default(),
            mode: Default::default(),
            image: None,
        }
    }

    #[test]
    fn image_updates_apply_to_image_services_only() {
        let u = ServiceUpdate {
            image: Some("bb:2".into()),
            ..Default::default()
        };
        let mut s = spec();
        assert!(
            apply_update(&mut s, &u, "web").is_err(),
            "a process service"
        );
        s.image = Some(protocol::state::ContainerImage {
            image: "bb:1".into(),
            workdir: Some("/www".into()),
            ..Default::default()
        });
        apply_update(&mut s, &u, "web").unwrap();
        let image = s.image.unwrap();
        assert_eq!(
            (image.image.as_str(), image.workdir.as_deref()),
            ("bb:2", Some("/www"))
        );
    }

    #[test]
    fn every_field_of_an_update_lands_in_the_spec() {
        let mut s = spec();
        let u = ServiceUpdate {
            args: Some(vec!["python3".into(), "-m".into(), "http.server".into()]),
            env_add: vec!["V=2".into(), "W=1".into()],
            replicas: Some(5),
            network_add: vec![NetworkTarget {
                target: "b".into(),
                aliases: vec!["db".into()],
            }],
            network_rm: vec!["a".into()],
            endpoint_mode: Some(EndpointMode::Dnsrr),
            lb_idle_timeout: Some(90),
            publish_add: vec![api::parse_publish("8080:80").unwrap()],
            health: HealthUpdate {
                command: Some(vec!["sh".into(), "-c".into(), "true".into()]),
                retries: Some(5),
                ..Default::default()
            },
            stop_grace_period_s: Some(20),
            update_config: UpdateConfigChange {
                parallelism: Some(2),
                failure_action: Some(FailureAction::Rollback),
                ..Default::default()
            },
            rollback_config: UpdateConfigChange {
                order: Some(UpdateOrder::StartFirst),
                ..Default::default()
            },
            force: true,
            ..Default::default()
        };
        apply_update(&mut s, &u, "web").unwrap();
        assert_eq!(s.command, ["python3", "-m", "http.server"]);
        assert_eq!(s.env, ["V=2", "W=1"]);
        assert_eq!(s.replicas, 5);
        assert_eq!(s.networks, [NetworkName::new("b").unwrap()]);
        assert_eq!(s.aliases[&NetworkName::new("b").unwrap()], ["db"]);
        assert_eq!(
            (s.endpoint_mode, s.lb_idle_timeout, s.stop_grace_period_s),
            (EndpointMode::Dnsrr, Some(90), Some(20))
        );
        assert_eq!(
            (s.ports[0].published, s.ports[0].protocol, s.ports[0].mode),
            (8080, PortProtocol::Tcp, PublishMode::Ingress)
        );
        let h = s.healthcheck.clone().unwrap();
        assert_eq!(
            (h.interval_s, h.timeout_s, h.retries, h.start_period_s),
            (30, 30, 5, 0),
            "Docker's defaults for what is not given"
        );
        assert_eq!(s.update_config.parallelism, 2);
        assert_eq!(s.update_config.failure_action, FailureAction::Rollback);
        assert_eq!(s.update_config.monitor_ms, 5_000);
        assert_eq!(s.rollback_config.order, UpdateOrder::StartFirst);
        assert_eq!(s.force_update, 1);
        // An empty update changes nothing; --no-healthcheck removes the check.
        let before = s.clone();
        apply_update(&mut s, &ServiceUpdate::default(), "web").unwrap();
        assert_eq!(s, before);
        let off = ServiceUpdate {
            health: HealthUpdate {
                disable: true,
                ..Default::default()
            },
            env_rm: vec!["W".into()],
            publish_rm: vec!["8080/tcp".into()],
            ..Default::default()
        };
        apply_update(&mut s, &off, "web").unwrap();
        assert_eq!((s.healthcheck.is_none(), s.ports.len()), (true, 0));
        assert_eq!(s.env, ["V=2"]);
    }

    #[test]
    fn bad_updates_are_refused() {
        let with = |u: ServiceUpdate| apply_update(&mut spec(), &u, "web").unwrap_err();
        let e = with(ServiceUpdate {
            lb_idle_timeout: Some(0),
            ..Default::default()
        });
        assert_eq!(e.status, 400);
        let e = with(ServiceUpdate {
            health: HealthUpdate {
                interval_s: Some(5),
                ..Default::default()
            },
            ..Default::default()
        });
        assert_eq!(
            e.message,
            "the service has no health check: give --health-cmd"
        );
        let e = with(ServiceUpdate {
            health: HealthUpdate {
                disable: true,
                retries: Some(1),
                ..Default::default()
            },
            ..Default::default()
        });
        assert!(e.message.contains("--no-healthcheck"), "{}", e.message);
        let e = with(ServiceUpdate {
            network_rm: vec!["zz".into()],
            ..Default::default()
        });
        assert_eq!(e.message, "the service is not attached to network zz");
        let e = with(ServiceUpdate {
            publish_rm: vec!["8080".into()],
            ..Default::default()
        });
        assert_eq!(
            (e.status, e.message.as_str()),
            (404, "service web publishes no port 8080")
        );
        let e = with(ServiceUpdate {
            env_add: vec!["NOVALUE".into()],
            ..Default::default()
        });
        assert_eq!(e.status, 400);
    }

    #[test]
    fn a_new_task_is_ready_once_running_and_healthy() {
        let mut task = Task {
            id: "t1".into(),
            name: "web.1".into(),
            service: protocol::types::ServiceName::new("web").unwrap(),
            slot: 1,
            node: protocol::types::NodeName::new("n1").unwrap(),
            attachments: vec![],
            spec: Default::default(),
        };
        let st = |state, health, restarts| TaskStatus {
            state,
            error: None,
            pid: None,
            restarts,
            since: 0,
            health,
        };
        use TaskState::*;
        assert_eq!(observe(&task, None), Observed::Starting);
        assert_eq!(
            observe(&task, Some(&st(Pending, None, 0))),
            Observed::Starting
        );
        assert_eq!(observe(&task, Some(&st(Running, None, 0))), Observed::Ready);
        assert_eq!(observe(&task, Some(&st(Failed, None, 0))), Observed::Failed);
        assert_eq!(
            observe(&task, Some(&st(Running, None, 1))),
            Observed::Failed,
            "it exited and was restarted"
        );
        task.spec.healthcheck = Some(HealthCheck {
            command: vec!["true".into()],
            interval_s: 1,
            timeout_s: 1,
            retries: 1,
            start_period_s: 0,
        });
        assert_eq!(
            observe(&task, Some(&st(Running, None, 0))),
            Observed::Starting
        );
        let starting = Some(TaskHealth::Starting);
        assert_eq!(
            observe(&task, Some(&st(Running, starting, 0))),
            Observed::Starting
        );
        let healthy = Some(TaskHealth::Healthy);
        assert_eq!(
            observe(&task, Some(&st(Running, healthy, 0))),
            Observed::Ready
        );
        let unhealthy = Some(TaskHealth::Unhealthy);
        assert_eq!(
            observe(&task, Some(&st(Running, unhealthy, 0))),
            Observed::Failed
        );
    }
}
