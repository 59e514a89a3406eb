//! Following a service until it converges, as `docker service update` does: an overall
//! count, a bar per slot (up to 20), `verify: Service converged` at the end; a paused
//! update or rollback ends with Docker's message and an error.
//!
//! It polls the API: the service's `UpdateStatus` (set by the manager's rollout) and its
//! tasks, of which only those made from the current spec (`up_to_date`) count. On a
//! terminal the block is redrawn in place; otherwise each line is printed when it changes.

use crate::client::{seg, Client};
use anyhow::bail;
use protocol::api::{ServiceInspect, TaskHealth, TaskState, TaskView};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Docker's progress bars end at "running", the 9th of its task states.
const STEPS: u64 = 9;
const BAR_WIDTH: u64 = 50;
/// More slots than this: only the overall line (as Docker).
const MAX_BARS: u32 = 20;
const POLL: Duration = Duration::from_millis(200);

/// How a task of a slot shows in its progress line.
fn task_line(t: &TaskView) -> String {
    let (name, step) = match (t.status.state, t.status.health) {
        (TaskState::Pending, _) => ("pending", 3),
        (TaskState::Starting, _) => ("starting", 8),
        (TaskState::Running, Some(TaskHealth::Starting)) => ("starting", 8),
        (TaskState::Running, Some(TaskHealth::Unhealthy)) => ("unhealthy", 8),
        (TaskState::Running, _) => ("running", STEPS),
        (TaskState::Unknown, _) => ("unknown", 3),
        (TaskState::Failed | TaskState::Shutdown, _) => {
            let err = t.status.error.clone().unwrap_or_else(|| "failed".into());
            return truncate(&err.replace('\n', " "));
        }
    };
    let filled = BAR_WIDTH * step / STEPS;
    let bar = format!(
        "[{}>{}]",
        "=".repeat(filled as usize),
        " ".repeat((BAR_WIDTH - filled) as usize)
    );
    format!("{name:<9} {bar}")
}

/// Docker keeps error lines to 75 characters.
fn truncate(s: &str) -> String {
    if s.chars().count() > 75 {
        let mut t: String = s.chars().take(74).collect();
        t.push('…');
        t
    } else {
        s.to_string()
    }
}

/// Whether a task counts as converged: running, and healthy if it has a check.
fn settled(t: &TaskView) -> bool {
    t.status.state == TaskState::Running
        && matches!(t.status.health, None | Some(TaskHealth::Healthy))
}

/// The progress lines for `svc` and its tasks, and whether every slot is settled.
pub fn render(svc: &ServiceInspect, tasks: &[TaskView], rollback: bool) -> (Vec<String>, bool) {
    let replicas = svc.spec.replicas;
    // Per slot, the up-to-date task to show: a settled one if any.
    let mut by_slot: BTreeMap<u32, &TaskView> = BTreeMap::new();
    for t in tasks
        .iter()
        .filter(|t| t.up_to_date && t.desired_state == "running")
    {
        let keep = by_slot.get(&t.slot).is_some_and(|o| settled(o));
        if !keep {
            by_slot.insert(t.slot, t);
        }
    }
    let running = by_slot.values().filter(|t| settled(t)).count();
    let overall = if rollback {
        format!("overall progress: rolling back update: {running} out of {replicas} tasks")
    } else {
        format!("overall progress: {running} out of {replicas} tasks")
    };
    let mut lines = vec![overall];
    if replicas <= MAX_BARS && matches!(svc.spec.mode, protocol::api::ModeView::Global {}) {
        // A global service's slots follow its nodes: a line per node, as Docker's.
        for t in by_slot.values() {
            lines.push(
                format!("{}: {}", t.node, task_line(t))
                    .trim_end()
                    .to_string(),
            );
        }
    } else if replicas <= MAX_BARS {
        for slot in 1..=replicas {
            let line = by_slot.get(&slot).map(|t| task_line(t)).unwrap_or_default();
            lines.push(format!("{slot}/{replicas}: {line}").trim_end().to_string());
        }
    }
    (lines, running as u32 == replicas)
}

/// Prints blocks of progress lines: redrawn in place on a terminal, changed lines only
/// otherwise; nothing if quiet.
struct Printer {
    tty: bool,
    quiet: bool,
    last: Vec<String>,
}

impl Printer {
    fn block(&mut self, lines: Vec<String>) {
        if self.quiet || lines == self.last {
            return;
        }
        let mut out = std::io::stdout().lock();
        if self.tty {
            if !self.last.is_empty() {
                let _ = write!(out, "\x1b[{}A", self.last.len());
            }
            for l in &lines {
                let _ = writeln!(out, "\x1b[2K{l}");
            }
        } else {
            for (i, l) in lines.iter().enumerate() {
                if self.last.get(i) != Some(l) {
                    let _ = writeln!(out, "{l}");
                }
            }
        }
        let _ = out.flush();
        self.last = lines;
    }

    fn line(&mut self, l: &str) {
        if !self.quiet {
            println!("{l}");
            // A line printed under the block: the next block starts below it.
            self.last.clear();
        }
    }
}

/// Follows service `name` until it converges. `rolling_back`: this is `service rollback`
/// (whose rollback is the point, not a failure of an update).
pub async fn follow(c: &Client, name: &str, rolling_back: bool, quiet: bool) -> anyhow::Result<()> {
    let mut p = Printer {
        tty: std::io::stdout().is_terminal(),
        quiet,
        last: Vec::new(),
    };
    let mut rollback_said = false;
    loop {
        let svc: ServiceInspect = c.get(&format!("/services/{}", seg(name))).await?;
        let tasks: Vec<TaskView> = c.get(&format!("/tasks?service={}", seg(name))).await?;
        let (state, message) = match &svc.update_status {
            Some(u) => (u.state.as_str(), u.message.as_str()),
            None => ("", ""),
        };
        let rollback = rolling_back || state.starts_with("rollback");
        // An automatic rollback's completion names its cause.
        let cause = message.trim_start_matches("rollback completed: ");
        match state {
            "paused" => bail!("service update paused: {message}"),
            "rollback_paused" => bail!("service rollback paused: {message}"),
            "rollback_started" | "rollback_completed" if !rollback_said => {
                p.line(&format!("rollback: {cause}"));
                rollback_said = true;
            }
            _ => {}
        }
        let (lines, all_settled) = render(&svc, &tasks, rollback);
        p.block(lines);
        let under_way = matches!(state, "updating" | "rollback_started");
        if all_settled && !under_way {
            p.line("verify: Service converged");
            if state == "rollback_completed" && !rolling_back {
                bail!("service rolled back: {cause}");
            }
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::api::{TaskStatusView, UpdateStatusView};
    use protocol::timestamp::Timestamp;

    fn task(slot: u32, state: TaskState, up_to_date: bool) -> TaskView {
        TaskView {
            id: format!("t{slot}"),
            name: format!("web.{slot}"),
            service: "web".into(),
            slot,
            node: "n1".into(),
            desired_state: "running".into(),
            status: TaskStatusView {
                state,
                error: None,
                pid: None,
                restarts: 0,
                since: Timestamp::default(),
                health: None,
            },
            attachments: vec![],
            netns: String::new(),
            mountns: None,
            up_to_date,
        }
    }

    fn service(replicas: u32) -> ServiceInspect {
        let v = serde_json::json!({
            "ID": "s", "CreatedAt": "1970-01-01T00:00:00Z", "UpdatedAt": "1970-01-01T00:00:00Z",
            "Running": 0,
            "Spec": {
                "Name": "web",
                "ContainerSpec": {"Command": ["x"], "Env": []},
                "Networks": [], "Replicas": replicas,
                "EndpointSpec": {"Mode": "vip"},
                "UpdateConfig": {"Parallelism": 1, "Delay": 0, "FailureAction": "pause",
                    "Monitor": 5000000000u64, "MaxFailureRatio": 0.0, "Order": "stop-first"},
                "RollbackConfig": {"Parallelism": 1, "Delay": 0, "FailureAction": "pause",
                    "Monitor": 5000000000u64, "MaxFailureRatio": 0.0, "Order": "stop-first"}
            },
            "Endpoint": {"Spec": {"Mode": "vip"}, "VirtualIPs": []}
        });
        let mut s: ServiceInspect = serde_json::from_value(v).unwrap();
        s.update_status = Some(UpdateStatusView {
            state: "updating".into(),
            started_at: Timestamp::default(),
            completed_at: None,
            message: "update in progress".into(),
        });
        s
    }

    #[test]
    fn docker_shaped_progress_lines() {
        let svc = service(3);
        let tasks = vec![
            task(1, TaskState::Running, true),
            task(2, TaskState::Starting, true),
            task(2, TaskState::Running, false),
            task(3, TaskState::Running, false),
        ];
        let (lines, done) = render(&svc, &tasks, false);
        assert!(!done);
        assert_eq!(lines[0], "overall progress: 1 out of 3 tasks");
        assert_eq!(lines[1], format!("1/3: running   [{}>]", "=".repeat(50)));
        assert_eq!(
            lines[2],
            format!("2/3: starting  [{}>{}]", "=".repeat(44), " ".repeat(6))
        );
        assert_eq!(lines[3], "3/3:", "the old task does not count");
        let mut failed = task(3, TaskState::Failed, true);
        failed.status.error = Some("process exited with status 1".into());
        let (lines, _) = render(&svc, &[failed], true);
        assert_eq!(
            lines[0],
            "overall progress: rolling back update: 0 out of 3 tasks"
        );
        assert_eq!(lines[3], "3/3: process exited with status 1");
        let all: Vec<TaskView> = (1..=3).map(|s| task(s, TaskState::Running, true)).collect();
        assert!(render(&svc, &all, false).1);
        // Many replicas: the overall line only.
        assert_eq!(render(&service(21), &all, false).0.len(), 1);
    }
}
