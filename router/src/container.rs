//! One image task's container (`service create --image`), run by the node's Docker Engine
//! ([`crate::engine`]) and supervised as `task.rs` supervises a process: pulled when the
//! engine lacks the image, created as `SERVICE.SLOT.TASKID` with Swarm's labels on the
//! Docker networks of driver `overlayd` that stand for the task's cluster networks (its
//! addresses as the preferred IPv4 addresses, so the plugin binds each endpoint to the
//! task's TAP instead of taking another address), connected, started; its end read from the
//! engine's events stream (exit code, OOM kill, `docker kill`, the engine going away), then
//! removed and made again with back-off. A task that leaves the desired state drains as a
//! process task does (`agent::drain`), then `docker stop -t GRACE` and removal. After an
//! overlayd restart the supervision starts on the running container the previous run left
//! ([`Adopted`]: same id and pid) instead of a new one.
//!
//! Every failure is reported on the status board with the engine's reason (`service ps`).

use crate::agent::drain::{self, Next, Plan};
use crate::engine::{self, Engine, EngineError, EngineEvent, Events};
use crate::manager::StatusBoard;
use crate::task::{self, Reporter, Stop};
use protocol::api::TaskState;
use protocol::state::{ContainerImage, MountKind};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tracing::{info, warn};

/// One of the task's network attachments as the engine sees it.
#[derive(Debug, Clone)]
pub struct NetAttach {
    /// The cluster network's name, which its Docker network takes too.
    pub network: String,
    pub subnet: String,
    pub address: String,
}

/// Everything needed to run a task's container.
#[derive(Debug, Clone)]
pub struct ContainerTask {
    pub name: String,
    pub id: String,
    pub service: String,
    pub slot: u32,
    pub node: String,
    pub image: ContainerImage,
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// In order: the first is the container's eth0 and default route.
    pub networks: Vec<NetAttach>,
    /// The resolver that answers the cluster's names: the first network's gateway.
    pub dns: String,
    pub stop_grace: Duration,
}

/// Swarm's name for a task's container: `SERVICE.SLOT.TASKID`.
pub fn container_name(service: &str, slot: u32, id: &str) -> String {
    format!("{service}.{slot}.{id}")
}

impl ContainerTask {
    pub fn container_name(&self) -> String {
        container_name(&self.service, self.slot, &self.id)
    }

    /// The Engine API's create body.
    pub fn create_body(&self) -> Value {
        let mut env = vec![
            format!("OVERLAY_TASK_NAME={}", self.name),
            format!("OVERLAY_TASK_ID={}", self.id),
            format!("OVERLAY_TASK_SLOT={}", self.slot),
            format!("OVERLAY_SERVICE_NAME={}", self.service),
            format!("OVERLAY_NODE={}", self.node),
        ];
        env.extend(self.env.iter().cloned());
        let labels: BTreeMap<&str, &str> = [
            (engine::NODE_LABEL, self.node.as_str()),
            (engine::SERVICE_LABEL, self.service.as_str()),
            (engine::TASK_ID_LABEL, self.id.as_str()),
            (engine::TASK_NAME_LABEL, self.name.as_str()),
        ]
        .into();
        let mounts: Vec<Value> = self
            .image
            .mounts
            .iter()
            .map(|m| {
                json!({
                    "Type": match m.kind { MountKind::Bind => "bind", MountKind::Volume => "volume" },
                    "Source": m.source,
                    "Target": m.target,
                    "ReadOnly": m.readonly,
                })
            })
            .collect();
        let first = &self.networks[0];
        let mut host = json!({
            "NetworkMode": first.network,
            "Dns": [self.dns],
            "RestartPolicy": { "Name": "no" },
            "Mounts": mounts,
        });
        if let Some(n) = self.image.nano_cpus {
            host["NanoCpus"] = json!(n);
        }
        if let Some(m) = self.image.memory_bytes {
            host["Memory"] = json!(m);
        }
        let mut body = json!({
            "Image": self.image.image,
            "Env": env,
            "Labels": labels,
            "HostConfig": host,
            "NetworkingConfig": { "EndpointsConfig": {
                first.network.clone(): { "IPAMConfig": { "IPv4Address": first.address } }
            } },
        });
        if !self.args.is_empty() {
            body["Cmd"] = json!(self.args);
        }
        for (k, v) in [
            ("WorkingDir", &self.image.workdir),
            ("User", &self.image.user),
            ("Hostname", &self.image.hostname),
        ] {
            if let Some(v) = v {
                body[k] = json!(v);
            }
        }
        body
    }
}

/// Makes, connects and starts the container; its id and main process's pid.
async fn launch(e: &Engine, c: &ContainerTask) -> Result<(String, u32), EngineError> {
    let name = c.container_name();
    // A container of that name is a previous run's (overlayd restarted): replace it.
    e.remove(&name).await?;
    if !e.has_image(&c.image.image).await? {
        info!(task = %c.name, image = %c.image.image, "pulling the image");
        e.pull(&c.image.image).await?;
    }
    for n in &c.networks {
        e.ensure_network(&n.network, &n.subnet).await?;
    }
    let id = e.create(&name, &c.create_body()).await?;
    let started = async {
        for n in &c.networks[1..] {
            e.connect(&n.network, &id, &n.address).await?;
        }
        e.start(&id).await?;
        let v = e.inspect(&id).await?;
        Ok::<u32, EngineError>(v["State"]["Pid"].as_u64().unwrap_or(0) as u32)
    };
    match started.await {
        Ok(pid) => Ok((id, pid)),
        Err(err) => {
            let _ = e.remove(&id).await;
            Err(err)
        }
    }
}

/// How a running container's watch ended.
enum Ended {
    /// It ended by itself (why; whether with a zero exit).
    Exited(String, bool),
    Leave,
    Now,
    Detach,
}

/// Why a container ended, as `service ps` shows it.
fn died(code: Option<i64>, oom: bool) -> String {
    match (code, oom) {
        (_, true) => format!(
            "OOM killed (exit code {})",
            code.map_or("unknown".into(), |c| c.to_string())
        ),
        (Some(0), false) => "task: exited (0)".into(),
        (Some(c), false) => format!("task: non-zero exit ({c})"),
        (None, false) => "task: ended (exit code unknown)".into(),
    }
}

/// Waits for the container `id` to end, or for the agent to stop it.
async fn watch(
    e: &Engine,
    id: &str,
    rx: &mut broadcast::Receiver<EngineEvent>,
    rep: &Reporter,
    pid: u32,
    stop: &Stop,
) -> Ended {
    let mut oom = false;
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = stop.now.cancelled() => return Ended::Now,
            _ = stop.detach.cancelled() => return Ended::Detach,
            _ = stop.leave.cancelled() => return Ended::Leave,
        };
        match ev {
            Ok(EngineEvent::Container {
                id: cid,
                action,
                exit_code,
            }) if cid == id => match action.as_str() {
                "oom" => oom = true,
                "die" => {
                    let clean = exit_code == Some(0) && !oom;
                    return Ended::Exited(died(exit_code, oom), clean);
                }
                "destroy" => return Ended::Exited("container removed".into(), false),
                _ => {}
            },
            Ok(EngineEvent::Down(why)) => {
                rep.set(
                    TaskState::Failed,
                    Some(format!("Docker Engine down: {why}")),
                    None,
                    None,
                );
            }
            // The stream is back (after a break, or events were dropped): look at the
            // container itself.
            Ok(EngineEvent::Up) | Err(broadcast::error::RecvError::Lagged(_)) => {
                match e.inspect(id).await {
                    Ok(v) if v["State"]["Running"].as_bool() == Some(true) => {
                        rep.set(TaskState::Running, None, Some(pid), None)
                    }
                    Ok(v) => {
                        let code = v["State"]["ExitCode"].as_i64();
                        let oom = v["State"]["OOMKilled"].as_bool().unwrap_or(false);
                        return Ended::Exited(died(code, oom), code == Some(0) && !oom);
                    }
                    Err(err) if err.status() == Some(404) => {
                        return Ended::Exited("container removed".into(), false)
                    }
                    Err(_) => {}
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// The stop of a container on its way out: kept while it serves connections (counted in its
/// network namespace through its pid), within its grace period, then `docker stop`.
async fn drain_and_stop(
    e: &Engine,
    c: &ContainerTask,
    id: &str,
    pid: u32,
    now: &tokio_util::sync::CancellationToken,
) {
    let plan = Plan::new(drain::SETTLE_LEFT, c.stop_grace);
    let began = Instant::now();
    loop {
        let open = if pid > 0 {
            task::served_connections(pid).await
        } else {
            0
        };
        match plan.next(began.elapsed(), open) {
            Next::Wait(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = now.cancelled() => break,
                }
            }
            Next::Terminate(why) => {
                info!(task = %c.name, ?why, after = ?began.elapsed(), "drained: stopping the container");
                break;
            }
        }
    }
    let grace = if now.is_cancelled() {
        task::SHUTDOWN_GRACE
    } else {
        c.stop_grace
    };
    if let Err(err) = e.stop(id, grace).await {
        warn!(task = %c.name, error = %err, "cannot stop the container");
    }
}

/// A running container a previous run of this node left, adopted by this one.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub id: String,
    pub pid: u32,
}

/// The pid of container `id`'s main process, if it runs.
pub async fn running_pid(e: &Engine, id: &str) -> Result<Option<u32>, EngineError> {
    let v = e.inspect(id).await?;
    let pid = v["State"]["Pid"].as_u64().unwrap_or(0) as u32;
    Ok((v["State"]["Running"].as_bool() == Some(true) && pid > 0).then_some(pid))
}

/// How a launch ended: done (started or failed), or cut short by a stop (`true`: the
/// task goes, so its container must too; `false`: the daemon detaches).
enum Launch {
    Done(Result<(String, u32), EngineError>),
    Stopped(bool),
}

/// [`launch`], unless the task is stopped first: a pull may take minutes, and leaving the
/// desired state, a shutdown or an upgrade must not wait for it.
async fn launch_unless_stopped(e: &Engine, c: &ContainerTask, stop: &Stop) -> Launch {
    tokio::select! {
        r = launch(e, c) => Launch::Done(r),
        _ = stop.leave.cancelled() => Launch::Stopped(true),
        _ = stop.now.cancelled() => Launch::Stopped(true),
        _ = stop.detach.cancelled() => Launch::Stopped(false),
    }
}

/// Runs and supervises the task's container until `stop` says otherwise; with `adopted`,
/// first the container a previous run left (same id and pid), as if it had just started it.
pub async fn supervise(
    c: ContainerTask,
    e: Engine,
    events: Events,
    board: StatusBoard,
    stop: Stop,
    mut adopted: Option<Adopted>,
) {
    let mut rep = Reporter {
        board,
        key: c.name.clone(),
        id: c.id.clone(),
        restarts: 0,
    };
    let mut backoff = task::BACKOFF_MIN;
    loop {
        // Subscribed before the start (or the adopted container's look), so that its end
        // cannot be missed.
        let mut rx = events.subscribe();
        let attempt = match adopted.take() {
            Some(a) => match running_pid(&e, &a.id).await {
                Ok(Some(pid)) => {
                    info!(task = %c.name, container = %c.container_name(), pid, "container adopted");
                    Launch::Done(Ok((a.id, pid)))
                }
                // It ended between the agent's look and this one: replaced as any that ends.
                Ok(None) | Err(_) => {
                    let _ = e.remove(&a.id).await;
                    rep.set(TaskState::Starting, None, None, None);
                    launch_unless_stopped(&e, &c, &stop).await
                }
            },
            None => {
                rep.set(TaskState::Starting, None, None, None);
                launch_unless_stopped(&e, &c, &stop).await
            }
        };
        let attempt = match attempt {
            Launch::Done(r) => r,
            Launch::Stopped(leaves) => {
                if leaves {
                    // A container made before the stop came is removed by its name.
                    let _ = e.remove(&c.container_name()).await;
                    rep.set(TaskState::Shutdown, None, None, None);
                }
                return;
            }
        };
        // How the attempt ended: why, and whether with a zero exit.
        let ended: (String, bool);
        match attempt {
            Err(err) => {
                warn!(task = %c.name, error = %err, "container failed to start");
                rep.set(TaskState::Failed, Some(err.to_string()), None, None);
                ended = (err.to_string(), false);
            }
            Ok((id, pid)) => {
                info!(task = %c.name, container = %c.container_name(), pid, "container running");
                rep.set(TaskState::Running, None, Some(pid), None);
                let began = Instant::now();
                match watch(&e, &id, &mut rx, &rep, pid, &stop).await {
                    Ended::Exited(error, clean) => {
                        warn!(task = %c.name, %error, "container ended");
                        rep.set(TaskState::Failed, Some(error.clone()), None, None);
                        if began.elapsed() >= task::HEALTHY_AFTER {
                            backoff = task::BACKOFF_MIN;
                        }
                        ended = (error, clean);
                    }
                    Ended::Leave => {
                        rep.leave(&c.name);
                        rep.set(TaskState::Shutdown, None, Some(pid), None);
                        drain_and_stop(&e, &c, &id, pid, &stop.now).await;
                        let _ = e.remove(&id).await;
                        rep.set(TaskState::Shutdown, None, None, None);
                        return;
                    }
                    Ended::Now => {
                        let _ = e.stop(&id, task::SHUTDOWN_GRACE).await;
                        let _ = e.remove(&id).await;
                        rep.set(TaskState::Shutdown, None, None, None);
                        return;
                    }
                    Ended::Detach => return,
                }
                if let Err(err) = e.remove(&id).await {
                    warn!(task = %c.name, error = %err, "cannot remove the ended container");
                }
            }
        }
        let policy = c.image.restart;
        let (why, clean) = ended;
        let wait = if policy.restarts(!clean, rep.restarts) {
            policy.delay_ms.map_or(backoff, Duration::from_millis)
        } else {
            // Not replaced (--restart-condition, --restart-max-attempts): it stays as it
            // ended until it leaves the desired state. A zero exit is Swarm's "complete".
            let (state, error) = if clean {
                (
                    TaskState::Shutdown,
                    format!("{why}: complete, not restarted (--restart-condition)"),
                )
            } else {
                (
                    TaskState::Failed,
                    format!(
                        "{why}; not restarted (--restart-*) after {} restarts",
                        rep.restarts
                    ),
                )
            };
            info!(task = %c.name, %error, "container not replaced");
            rep.set(state, Some(error), None, None);
            Duration::MAX
        };
        if !task::wait_unless_stopped(wait, &stop, &mut rep, &c.name).await {
            return;
        }
        rep.restarts += 1;
        backoff = (backoff * 2).min(task::BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_create_body_carries_names_labels_networks_and_options() {
        let c = ContainerTask {
            name: "web.1".into(),
            id: "abc".into(),
            service: "web".into(),
            slot: 1,
            node: "n1".into(),
            image: ContainerImage {
                image: "bb:1".into(),
                workdir: Some("/www".into()),
                memory_bytes: Some(64 << 20),
                ..Default::default()
            },
            args: vec!["httpd".into(), "-f".into()],
            env: vec!["A=1".into()],
            networks: vec![
                NetAttach {
                    network: "front".into(),
                    subnet: "10.0.1.0/24".into(),
                    address: "10.0.1.3".into(),
                },
                NetAttach {
                    network: "ingress".into(),
                    subnet: "10.255.0.0/16".into(),
                    address: "10.255.0.5".into(),
                },
            ],
            dns: "10.0.1.1".into(),
            stop_grace: Duration::from_secs(10),
        };
        assert_eq!(c.container_name(), "web.1.abc");
        let b = c.create_body();
        assert_eq!(b["Image"], "bb:1");
        assert_eq!(b["Cmd"], json!(["httpd", "-f"]));
        assert_eq!(b["WorkingDir"], "/www");
        assert_eq!(b["HostConfig"]["NetworkMode"], "front");
        assert_eq!(b["HostConfig"]["Dns"], json!(["10.0.1.1"]));
        assert_eq!(b["HostConfig"]["Memory"], json!(64u64 << 20));
        assert_eq!(
            b["NetworkingConfig"]["EndpointsConfig"]["front"]["IPAMConfig"]["IPv4Address"],
            "10.0.1.3"
        );
        assert_eq!(b["Labels"][engine::SERVICE_LABEL], "web");
        assert_eq!(b["Labels"][engine::TASK_ID_LABEL], "abc");
        assert!(b["Env"].as_array().unwrap().contains(&json!("A=1")));
    }
}
