//! One task's process: started inside the task's network namespace, its output appended to a
//! log file, restarted with back-off when it exits or cannot start, and stopped (SIGTERM, then
//! SIGKILL after a grace period) when the task is removed or the daemon shuts down. Every
//! change is reported on the status board.

use crate::clock::now;
use crate::manager::{StatusBoard, StatusEntry};
use crate::sys::netns;
use protocol::api::{TaskState, TaskStatus};
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A process that ran this long is considered healthy: its next restart starts from
/// the minimum back-off again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(3);

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
}

struct Reporter {
    board: StatusBoard,
    name: String,
    id: String,
    restarts: u32,
}

impl Reporter {
    fn set(&self, state: TaskState, error: Option<String>, pid: Option<u32>) {
        let status = TaskStatus {
            state,
            error,
            pid,
            restarts: self.restarts,
            since: now(),
            health: None,
        };
        if let Ok(mut b) = self.board.write() {
            b.insert(
                self.name.clone(),
                StatusEntry {
                    id: self.id.clone(),
                    status,
                },
            );
        }
    }
}

fn open_log(path: &PathBuf) -> std::io::Result<(File, File)> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let g = f.try_clone()?;
    Ok((f, g))
}

fn spawn(p: &TaskProcess) -> Result<tokio::process::Child, String> {
    let program = p.command.first().ok_or("empty command")?;
    let ns = File::open(&p.netns).map_err(|e| format!("opening {}: {e}", p.netns.display()))?;
    let mnt = match &p.mntns {
        Some(m) => Some(File::open(m).map_err(|e| format!("opening {}: {e}", m.display()))?),
        None => None,
    };
    let (out, err) =
        open_log(&p.log).map_err(|e| format!("opening log {}: {e}", p.log.display()))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&p.command[1..])
        .env("OVERLAY_TASK_NAME", &p.name)
        .env("OVERLAY_TASK_ID", &p.id)
        .env("OVERLAY_TASK_SLOT", p.slot.to_string())
        .env("OVERLAY_SERVICE_NAME", &p.service)
        .env("OVERLAY_NODE", &p.node)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .current_dir("/")
        .process_group(0)
        .kill_on_drop(true);
    for kv in &p.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    netns::spawn_inside(
        cmd.as_std_mut(),
        ns.as_fd(),
        mnt.as_ref().map(|m| m.as_fd()),
    );
    cmd.spawn()
        .map_err(|e| format!("starting {program:?}: {e}"))
}

async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGTERM,
        );
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Runs and supervises the task's process until `cancel` fires.
pub async fn supervise(p: TaskProcess, board: StatusBoard, cancel: CancellationToken) {
    let mut rep = Reporter {
        board,
        name: p.name.clone(),
        id: p.id.clone(),
        restarts: 0,
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        rep.set(TaskState::Starting, None, None);
        match spawn(&p) {
            Err(error) => {
                warn!(task = %p.name, %error, "task failed to start");
                rep.set(TaskState::Failed, Some(error), None);
            }
            Ok(mut child) => {
                let pid = child.id();
                info!(task = %p.name, pid, "task started");
                rep.set(TaskState::Running, None, pid);
                let started = Instant::now();
                tokio::select! {
                    status = child.wait() => {
                        let error = match status {
                            Ok(s) => format!("process exited ({s})"),
                            Err(e) => format!("waiting for process: {e}"),
                        };
                        warn!(task = %p.name, %error, "task exited; restarting");
                        rep.set(TaskState::Failed, Some(error), None);
                        if started.elapsed() >= HEALTHY_AFTER {
                            backoff = BACKOFF_MIN;
                        }
                    }
                    _ = cancel.cancelled() => {
                        stop(&mut child).await;
                        rep.set(TaskState::Shutdown, None, None);
                        return;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => {
                rep.set(TaskState::Shutdown, None, None);
                return;
            }
        }
        rep.restarts += 1;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
