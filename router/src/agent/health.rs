//! A task's health check as Docker runs it (`HEALTHCHECK`, `--health-*`), without I/O: which
//! command a check runs ([`Probe`], from Docker's three forms) and what its results mean
//! ([`Monitor`], a state machine fed each check's outcome and when it began). The task's
//! supervisor (`crate::task`) runs the probes inside the task's namespaces, feeds the results
//! in and reports the health it gives; the views of backends (`crate::services`) read that
//! health from every node's reports.
//!
//! Docker's rules, kept here: a task is `starting` until a check passes; `retries` failed
//! checks in a row make it `unhealthy`; a failure during `start_period` does not count unless
//! a check has passed already; a check that runs longer than `timeout` failed. One difference:
//! the first check runs as soon as the process is up rather than one interval later, so a
//! ready task takes traffic within a check instead of after a whole interval (30 s by
//! default), which is what a start-first update waits for.

use protocol::api::TaskHealth;
use protocol::state::HealthCheck;
use std::time::Duration;

/// Docker's defaults for a field left at 0.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_RETRIES: u32 = 3;
/// Docker keeps this much of a check's output.
pub const MAX_OUTPUT: usize = 4096;

/// The command a check runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `["CMD", program, args...]`: run as is.
    Exec(Vec<String>),
    /// `["CMD-SHELL", command]`, or a plain list (its words joined): `/bin/sh -c command`.
    Shell(String),
}

impl Probe {
    /// Reads Docker's forms; `None` for no check (`[]`, `["NONE"]`, or a form with nothing
    /// to run).
    pub fn parse(command: &[String]) -> Option<Probe> {
        let (first, rest) = command.split_first()?;
        match first.as_str() {
            "NONE" => None,
            "CMD" => (!rest.is_empty()).then(|| Probe::Exec(rest.to_vec())),
            "CMD-SHELL" => {
                let cmd = rest.join(" ");
                (!cmd.trim().is_empty()).then_some(Probe::Shell(cmd))
            }
            _ => Some(Probe::Shell(command.join(" "))),
        }
    }

    /// The program and arguments to execute.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Probe::Exec(argv) => argv.clone(),
            Probe::Shell(cmd) => vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
        }
    }
}

/// What one check gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// Failed, with what it said (or why it could not run, or that it timed out).
    Failed(String),
}

/// One process's health, from its checks' outcomes. Time is the time since the process
/// started, passed in.
#[derive(Debug, Clone)]
pub struct Monitor {
    probe: Probe,
    interval: Duration,
    timeout: Duration,
    start_period: Duration,
    retries: u32,
    health: TaskHealth,
    /// Failed checks in a row that count.
    failures: u32,
    /// A check has passed since the process started (the start period is over then).
    passed: bool,
    last_output: String,
}

impl Monitor {
    /// A monitor for a process that just started; `None` if `check` runs nothing.
    pub fn new(check: &HealthCheck) -> Option<Monitor> {
        let or = |s: u64, d: Duration| if s == 0 { d } else { Duration::from_secs(s) };
        Some(Monitor {
            probe: Probe::parse(&check.command)?,
            interval: or(check.interval_s, DEFAULT_INTERVAL),
            timeout: or(check.timeout_s, DEFAULT_TIMEOUT),
            start_period: Duration::from_secs(check.start_period_s),
            retries: if check.retries == 0 {
                DEFAULT_RETRIES
            } else {
                check.retries
            },
            health: TaskHealth::Starting,
            failures: 0,
            passed: false,
            last_output: String::new(),
        })
    }

    pub fn health(&self) -> TaskHealth {
        self.health
    }

    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// How long a check may run before it is killed and counted failed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// What the last failed check said.
    pub fn last_output(&self) -> &str {
        &self.last_output
    }

    /// When the next check starts: at once for the first, then one interval after the
    /// previous one ended (`previous_end`).
    pub fn next_at(&self, previous_end: Option<Duration>) -> Duration {
        previous_end.map_or(Duration::ZERO, |end| end + self.interval)
    }

    /// Records the outcome of a check that began at `began`; returns the new health if it
    /// changed. Unhealthy is final: the process is replaced, with a new monitor.
    pub fn record(&mut self, began: Duration, outcome: Outcome) -> Option<TaskHealth> {
        if self.health == TaskHealth::Unhealthy {
            return None;
        }
        let before = self.health;
        match outcome {
            Outcome::Passed => {
                self.passed = true;
                self.failures = 0;
                self.health = TaskHealth::Healthy;
            }
            Outcome::Failed(output) => {
                self.last_output = clip(output);
                let grace = !self.passed && began < self.start_period;
                if !grace {
                    self.failures += 1;
                    if self.failures >= self.retries {
                        self.health = TaskHealth::Unhealthy;
                    }
                }
            }
        }
        (self.health != before).then_some(self.health)
    }
}

/// `output` cut to [`MAX_OUTPUT`] bytes (on a character boundary), trimmed.
fn clip(output: String) -> String {
    let mut end = output.len().min(MAX_OUTPUT);
    while !output.is_char_boundary(end) {
        end -= 1;
    }
    output[..end].trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(command: &[&str], retries: u32, start_period_s: u64) -> HealthCheck {
        HealthCheck {
            command: command.iter().map(|s| s.to_string()).collect(),
            interval_s: 2,
            timeout_s: 1,
            retries,
            start_period_s,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn fail(why: &str) -> Outcome {
        Outcome::Failed(why.into())
    }

    #[test]
    fn docker_command_forms() {
        let p = |c: &[&str]| Probe::parse(&c.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            p(&["CMD", "curl", "-f", "http://x/"]).unwrap().argv(),
            ["curl", "-f", "http://x/"]
        );
        assert_eq!(
            p(&["CMD-SHELL", "test -f /ok || exit 1"]).unwrap().argv(),
            ["/bin/sh", "-c", "test -f /ok || exit 1"]
        );
        // A plain list is the shell form of its words.
        assert_eq!(
            p(&["test", "-f", "/ok"]).unwrap(),
            Probe::Shell("test -f /ok".into())
        );
        assert_eq!(
            p(&["test -f /ok"]).unwrap(),
            Probe::Shell("test -f /ok".into())
        );
        for none in [&[][..], &["NONE"], &["CMD"], &["CMD-SHELL", " "]] {
            assert_eq!(p(none), None, "{none:?}");
        }
        assert!(Monitor::new(&check(&["NONE"], 3, 0)).is_none());
    }

    #[test]
    fn starting_until_a_check_passes_unhealthy_after_retries_failures_in_a_row() {
        let mut m = Monitor::new(&check(&["true"], 3, 0)).unwrap();
        assert_eq!(m.health(), TaskHealth::Starting);
        // The first check at once, the next one interval after the previous ended.
        assert_eq!(m.next_at(None), Duration::ZERO);
        assert_eq!(
            m.next_at(Some(Duration::from_millis(300))),
            Duration::from_millis(2300)
        );
        assert_eq!(
            m.record(secs(0), Outcome::Passed),
            Some(TaskHealth::Healthy)
        );
        assert_eq!(m.record(secs(2), Outcome::Passed), None);
        // Two failures, a pass: the count starts again.
        assert_eq!(m.record(secs(4), fail("no")), None);
        assert_eq!(m.record(secs(6), fail("no")), None);
        assert_eq!(m.record(secs(8), Outcome::Passed), None);
        assert_eq!(m.health(), TaskHealth::Healthy);
        assert_eq!(m.record(secs(10), fail("a")), None);
        assert_eq!(m.record(secs(12), fail("b")), None);
        assert_eq!(
            m.record(secs(14), fail("  connection refused\n")),
            Some(TaskHealth::Unhealthy)
        );
        assert_eq!(m.last_output(), "connection refused");
        // Final: a passing check does not bring this process back.
        assert_eq!(m.record(secs(16), Outcome::Passed), None);
        assert_eq!(m.health(), TaskHealth::Unhealthy);
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_until_a_check_passed() {
        let mut m = Monitor::new(&check(&["true"], 2, 5)).unwrap();
        for t in [0, 2, 4] {
            assert_eq!(m.record(secs(t), fail("booting")), None, "{t}");
        }
        assert_eq!(m.health(), TaskHealth::Starting);
        // The start period is over: failures count.
        assert_eq!(m.record(secs(6), fail("x")), None);
        assert_eq!(m.record(secs(8), fail("x")), Some(TaskHealth::Unhealthy));

        // A pass within the start period ends it: failures count from then on.
        let mut m = Monitor::new(&check(&["true"], 2, 60)).unwrap();
        assert_eq!(
            m.record(secs(1), Outcome::Passed),
            Some(TaskHealth::Healthy)
        );
        assert_eq!(m.record(secs(3), fail("x")), None);
        assert_eq!(m.record(secs(5), fail("x")), Some(TaskHealth::Unhealthy));

        // Without a start period, never passing: unhealthy after `retries` failures.
        let mut m = Monitor::new(&check(&["true"], 1, 0)).unwrap();
        assert_eq!(m.record(secs(0), fail("x")), Some(TaskHealth::Unhealthy));
    }

    #[test]
    fn zero_fields_take_dockers_defaults_and_output_is_bounded() {
        let zero = HealthCheck {
            command: vec!["true".into()],
            interval_s: 0,
            timeout_s: 0,
            retries: 0,
            start_period_s: 0,
        };
        let mut m = Monitor::new(&zero).unwrap();
        assert_eq!(m.timeout(), secs(30));
        assert_eq!(m.next_at(Some(secs(1))), secs(31));
        assert_eq!(m.record(secs(0), fail(&"é".repeat(3000))), None);
        assert!(m.last_output().len() <= MAX_OUTPUT);
        assert_eq!(m.record(secs(31), fail("x")), None);
        assert_eq!(m.record(secs(62), fail("x")), Some(TaskHealth::Unhealthy));
    }
}
