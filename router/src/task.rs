//! One task's process: started through its shim (`task_shim`) inside the task's network and
//! mount namespaces, its output copied into its log by the shim (`task_log`: mode 0640,
//! rotated by size), its health checked if its spec has a check, restarted with back-off
//! when it exits, cannot start, or turns unhealthy, and stopped when the task leaves the
//! desired state. Every change is reported on the status board.
//!
//! The process does not belong to this daemon: when overlayd stops (or crashes) the task
//! runs on under its shim, and the next overlayd resumes its supervision ([`supervise`] with
//! the adopted [`Shim`]). Only `overlayd --stop-tasks` stops tasks with the daemon.
//!
//! Stopping has two speeds ([`Stop`]). A task that leaves the desired state, or whose health
//! check failed, is drained first (`agent::drain`: it stays up while it serves connections,
//! within its stop grace period), then sent SIGTERM, then SIGKILL one grace period later.
//! When the daemon stops with `--stop-tasks`, every task gets SIGTERM at once and SIGKILL
//! after [`SHUTDOWN_GRACE`]. The health logic itself is `agent::health`, without I/O; this
//! file runs its probes.

use crate::agent::drain::{self, Next, Plan};
use crate::agent::health::{Monitor, Outcome, Probe};
use crate::clock::now;
use crate::manager::{StatusBoard, StatusEntry};
use crate::sys::netns;
use crate::task_shim::{Launch, Shim};
use protocol::api::{TaskHealth, TaskState, TaskStatus};
use protocol::state::HealthCheck;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A process that ran this long is considered healthy: its next restart starts from
/// the minimum back-off again.
pub(crate) const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Between SIGTERM and SIGKILL when the daemon shuts down.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Everything needed to run a task's process.
#[derive(Debug, Clone)]
pub struct TaskProcess {
    pub name: String,
    pub id: String,
    pub service: String,
    pub slot: u32,
    pub node: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub netns: PathBuf,
    /// The task's mount namespace (resolv.conf naming 127.0.0.11, its own /etc/hosts).
    pub mntns: Option<PathBuf>,
    pub log: PathBuf,
    /// Where its shim writes how the process ended, and where the pair is recorded for
    /// the next overlayd (`task_shim`).
    pub exit_file: PathBuf,
    pub record: PathBuf,
    /// Its health check, if it has one.
    pub healthcheck: Option<HealthCheck>,
    /// How long its connections may take to finish once it stops, and then how long it has
    /// between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

/// How the agent ends a task's supervision.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// The task left the desired state: drain it, then stop it, then return.
    pub leave: CancellationToken,
    /// The daemon shuts down with `--stop-tasks`: stop it at once.
    pub now: CancellationToken,
    /// The daemon shuts down and leaves the task running: end the supervision only.
    pub detach: CancellationToken,
}

/// The status-board key of a task that left the desired state and is still draining. Its
/// node must keep reporting its id until it is gone, so that its addresses stay reserved
/// (`manager::healing`), while another task of the same name may be placed here already.
pub fn leaving_key(name: &str, id: &str) -> String {
    format!("{name}@{id}")
}

/// Waits `wait` before a task's next start, unless it is stopped first: then reports it
/// shut down (under its leaving key if it left the desired state) and returns false.
pub(crate) async fn wait_unless_stopped(
    wait: Duration,
    stop: &Stop,
    rep: &mut Reporter,
    name: &str,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.leave.cancelled() => {
            rep.leave(name);
            rep.set(TaskState::Shutdown, None, None, None);
            false
        }
        _ = stop.now.cancelled() => {
            rep.set(TaskState::Shutdown, None, None, None);
            false
        }
        _ = stop.detach.cancelled() => false,
    }
}

pub(crate) struct Reporter {
    pub(crate) board: StatusBoard,
    /// Where its status goes: its name, or its [`leaving_key`] once it left.
    pub(crate) key: String,
    pub(crate) id: String,
    pub(crate) restarts: u32,
}

impl Reporter {
    pub(crate) fn set(
        &self,
        state: TaskState,
        error: Option<String>,
        pid: Option<u32>,
        health: Option<TaskHealth>,
    ) {
        let status = TaskStatus {
            state,
            error,
            pid,
            restarts: self.restarts,
            since: now(),
            health,
        };
        if let Ok(mut b) = self.board.write() {
            b.insert(
                self.key.clone(),
                StatusEntry {
                    id: self.id.clone(),
                    status,
                },
            );
        }
    }

    /// From now on, reports under the task's [`leaving_key`].
    pub(crate) fn leave(&mut self, name: &str) {
        if let Ok(mut b) = self.board.write() {
            if b.get(&self.key).is_some_and(|e| e.id == self.id) {
                b.remove(&self.key);
            }
        }
        self.key = leaving_key(name, &self.id);
    }
}

/// The variables every process of a task gets, then those of its spec.
fn environment(p: &TaskProcess) -> Vec<(String, String)> {
    let mut env = vec![
        ("OVERLAY_TASK_NAME".to_string(), p.name.clone()),
        ("OVERLAY_TASK_ID".to_string(), p.id.clone()),
        ("OVERLAY_TASK_SLOT".to_string(), p.slot.to_string()),
        ("OVERLAY_SERVICE_NAME".to_string(), p.service.clone()),
        ("OVERLAY_NODE".to_string(), p.node.clone()),
    ];
    for kv in &p.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.push((k.to_string(), v.to_string()));
        }
    }
    env
}

/// Starts a health check's `argv` inside the task's namespaces, with its environment, in a
/// process group of its own, its output captured.
fn spawn_probe(p: &TaskProcess, argv: &[String]) -> Result<Child, String> {
    let program = argv.first().ok_or("empty command")?;
    let ns = File::open(&p.netns).map_err(|e| format!("opening {}: {e}", p.netns.display()))?;
    let mnt = match &p.mntns {
        Some(m) => Some(File::open(m).map_err(|e| format!("opening {}: {e}", m.display()))?),
        None => None,
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&argv[1..])
        .envs(environment(p))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/")
        .process_group(0)
        .kill_on_drop(true);
    netns::spawn_inside(
        cmd.as_std_mut(),
        ns.as_fd(),
        mnt.as_ref().map(|m| m.as_fd()),
    );
    cmd.spawn()
        .map_err(|e| format!("starting {program:?}: {e}"))
}

/// Starts the task's process through a new shim.
async fn start(p: &TaskProcess) -> Result<Shim, String> {
    let p = p.clone();
    tokio::task::spawn_blocking(move || {
        let env = environment(&p);
        Shim::start(&Launch {
            command: &p.command,
            env: &env,
            netns: &p.netns,
            mntns: p.mntns.as_deref(),
            log: &p.log,
            exit_file: &p.exit_file,
            record: &p.record,
            task_id: &p.id,
        })
    })
    .await
    .map_err(|e| format!("start thread failed: {e}"))?
}

/// Runs one health check inside the task's namespaces (with its environment, as Docker
/// does), killed with its whole process group after `timeout`.
async fn run_probe(p: &TaskProcess, probe: &Probe, timeout: Duration) -> Outcome {
    let child = match spawn_probe(p, &probe.argv()) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot run the health check: {e}")),
    };
    let group = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Outcome::Passed,
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            if text.trim().is_empty() {
                text = format!("health check failed ({})", out.status);
            }
            Outcome::Failed(text)
        }
        Ok(Err(e)) => Outcome::Failed(format!("waiting for the health check: {e}")),
        Err(_) => {
            if let Some(pg) = group {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pg as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
            Outcome::Failed(format!(
                "health check exceeded its timeout ({} s)",
                timeout.as_secs()
            ))
        }
    }
}

/// The connections the process's network namespace serves (`agent::drain`).
pub(crate) async fn served_connections(pid: u32) -> usize {
    let read = |table: &str| tokio::fs::read_to_string(format!("/proc/{pid}/net/{table}"));
    let (v4, v6) = tokio::join!(read("tcp"), read("tcp6"));
    drain::served_connections(&[v4.as_deref().unwrap_or(""), v6.as_deref().unwrap_or("")])
}

/// SIGTERM, then SIGKILL if the process still runs after `grace`; if `now` fires meanwhile
/// (the daemon shuts down), after [`SHUTDOWN_GRACE`] at most.
async fn terminate(shim: &Shim, grace: Duration, now: Option<&CancellationToken>) {
    use nix::sys::signal::Signal;
    shim.signal(Signal::SIGTERM);
    let cut = async {
        match now {
            Some(now) => now.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let waited = tokio::select! {
        r = tokio::time::timeout(grace, shim.ended()) => Some(r.is_ok()),
        _ = cut => None,
    };
    let exited = match waited {
        Some(exited) => exited,
        None => tokio::time::timeout(SHUTDOWN_GRACE.min(grace), shim.ended())
            .await
            .is_ok(),
    };
    if !exited {
        shim.signal(Signal::SIGKILL);
        shim.ended().await;
    }
}

/// The stop sequence of a task on its way out (`agent::drain`): kept while it serves
/// connections, within its grace period, then terminated. `now` cuts it short.
async fn drain_and_stop(p: &TaskProcess, shim: &Shim, settle: Duration, now: &CancellationToken) {
    let plan = Plan::new(settle, p.stop_grace);
    let began = Instant::now();
    loop {
        let open = served_connections(shim.pid()).await;
        let wait = match plan.next(began.elapsed(), open) {
            Next::Wait(d) => d,
            Next::Terminate(why) => {
                info!(task = %p.name, ?why, after = ?began.elapsed(), "drained: stopping");
                break;
            }
        };
        let woke = tokio::select! {
            _ = tokio::time::sleep(wait) => None,
            status = shim.ended() => Some(status),
            _ = now.cancelled() => break,
        };
        if let Some(status) = woke {
            info!(task = %p.name, %status, "exited while draining");
            return;
        }
    }
    if now.is_cancelled() {
        terminate(shim, SHUTDOWN_GRACE, None).await;
    } else {
        terminate(shim, p.stop_grace, Some(now)).await;
    }
}

/// How a running process's watch ended.
enum Ended {
    /// It exited by itself (why).
    Exited(String),
    /// Its health check failed `retries` times in a row (what it said last).
    Unhealthy(String),
    /// The task left the desired state.
    Leave,
    /// The daemon shuts down with `--stop-tasks`.
    Now,
    /// The daemon shuts down and leaves the process running.
    Detach,
}

/// Watches a running process: its exit, its health checks, and the agent's stop.
async fn watch(p: &TaskProcess, shim: &Shim, rep: &Reporter, stop: &Stop) -> Ended {
    let mut monitor = p.healthcheck.as_ref().and_then(Monitor::new);
    let pid = Some(shim.pid());
    rep.set(
        TaskState::Running,
        None,
        pid,
        monitor.as_ref().map(Monitor::health),
    );
    let started = tokio::time::Instant::now();
    let mut last_end = None;
    loop {
        let due = monitor.as_ref().map(|m| {
            (
                started + m.next_at(last_end),
                m.probe().clone(),
                m.timeout(),
            )
        });
        let check = async {
            match &due {
                None => std::future::pending().await,
                Some((at, probe, timeout)) => {
                    tokio::time::sleep_until(*at).await;
                    let began = started.elapsed();
                    (began, run_probe(p, probe, *timeout).await)
                }
            }
        };
        let (began, outcome) = tokio::select! {
            status = shim.ended() => return Ended::Exited(status),
            _ = stop.now.cancelled() => return Ended::Now,
            _ = stop.detach.cancelled() => return Ended::Detach,
            _ = stop.leave.cancelled() => return Ended::Leave,
            checked = check => checked,
        };
        last_end = Some(started.elapsed());
        let Some(m) = monitor.as_mut() else {
            continue;
        };
        if let Some(health) = m.record(began, outcome) {
            info!(task = %p.name, %health, output = m.last_output(), "health changed");
            rep.set(TaskState::Running, None, pid, Some(health));
            if health == TaskHealth::Unhealthy {
                return Ended::Unhealthy(m.last_output().to_string());
            }
        }
    }
}

/// Runs and supervises the task's process until `stop` says otherwise; `adopted` is a
/// process an earlier overlayd started, supervised from where it is.
pub async fn supervise(p: TaskProcess, board: StatusBoard, stop: Stop, adopted: Option<Shim>) {
    let mut rep = Reporter {
        board,
        key: p.name.clone(),
        id: p.id.clone(),
        restarts: 0,
    };
    let mut backoff = BACKOFF_MIN;
    let mut adopted = adopted;
    loop {
        let started = match adopted.take() {
            Some(shim) => {
                info!(task = %p.name, pid = shim.pid(), "task adopted");
                Ok(shim)
            }
            None => {
                rep.set(TaskState::Starting, None, None, None);
                start(&p).await
            }
        };
        match started {
            Err(error) => {
                warn!(task = %p.name, %error, "task failed to start");
                rep.set(TaskState::Failed, Some(error), None, None);
            }
            Ok(shim) => {
                info!(task = %p.name, pid = shim.pid(), "task running");
                let began = Instant::now();
                match watch(&p, &shim, &rep, &stop).await {
                    Ended::Exited(error) => {
                        warn!(task = %p.name, %error, "task exited; restarting");
                        rep.set(TaskState::Failed, Some(error), None, None);
                        if began.elapsed() >= HEALTHY_AFTER {
                            backoff = BACKOFF_MIN;
                        }
                    }
                    Ended::Unhealthy(output) => {
                        // Its status already takes it out of every rotation; it is replaced
                        // (restarted here) once its connections are done. A daemon that
                        // stops meanwhile leaves it to the next one, which checks it again.
                        warn!(task = %p.name, %output, "task unhealthy: draining, then restarting");
                        tokio::select! {
                            _ = drain_and_stop(&p, &shim, drain::SETTLE_UNHEALTHY, &stop.now) => {}
                            _ = stop.detach.cancelled() => return,
                        }
                        let error = format!("unhealthy: {output}");
                        if stop.leave.is_cancelled() {
                            rep.leave(&p.name);
                        }
                        if stop.leave.is_cancelled() || stop.now.is_cancelled() {
                            rep.set(TaskState::Shutdown, Some(error), None, None);
                            return;
                        }
                        rep.set(TaskState::Failed, Some(error), None, None);
                    }
                    Ended::Leave => {
                        rep.leave(&p.name);
                        rep.set(TaskState::Shutdown, None, Some(shim.pid()), None);
                        drain_and_stop(&p, &shim, drain::SETTLE_LEFT, &stop.now).await;
                        rep.set(TaskState::Shutdown, None, None, None);
                        return;
                    }
                    Ended::Now => {
                        terminate(&shim, SHUTDOWN_GRACE, None).await;
                        rep.set(TaskState::Shutdown, None, None, None);
                        return;
                    }
                    Ended::Detach => return,
                }
            }
        }
        if !wait_unless_stopped(backoff, &stop, &mut rep, &p.name).await {
            return;
        }
        rep.restarts += 1;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
