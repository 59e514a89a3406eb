//! The flags `service create` and `service update` share, as Docker spells them: the health
//! check (`--health-*`), the stop grace period, the update and rollback policies
//! (`--update-*`, `--rollback-*`), and the parsers of their values (Go-style durations,
//! `--args` split as a shell would).

use clap::Args;
use protocol::api::HealthUpdate;
use protocol::state::{FailureAction, FailureRatio, UpdateConfigChange, UpdateOrder};

/// `--health-*` and `--no-healthcheck`.
#[derive(Args, Debug, Default, Clone)]
pub struct HealthFlags {
    /// Command to run to check health, with `sh -c` inside the task (Docker's CMD-SHELL).
    #[arg(long = "health-cmd")]
    pub health_cmd: Option<String>,
    /// Time between running the check [default: 30s].
    #[arg(long = "health-interval", value_parser = parse_whole_secs)]
    pub health_interval: Option<u64>,
    /// Maximum time to allow one check to run [default: 30s].
    #[arg(long = "health-timeout", value_parser = parse_whole_secs)]
    pub health_timeout: Option<u64>,
    /// Consecutive failures needed to report unhealthy [default: 3].
    #[arg(long = "health-retries")]
    pub health_retries: Option<u32>,
    /// Start period for the task to initialize before failures count [default: 0s].
    #[arg(long = "health-start-period", value_parser = parse_whole_secs)]
    pub health_start_period: Option<u64>,
    /// Disable any health check.
    #[arg(long = "no-healthcheck")]
    pub health_disable: bool,
}

impl HealthFlags {
    /// The change these flags ask for.
    pub fn to_update(&self) -> HealthUpdate {
        HealthUpdate {
            command: self.health_cmd.as_ref().map(|c| shell_command(c)),
            interval_s: self.health_interval,
            timeout_s: self.health_timeout,
            retries: self.health_retries,
            start_period_s: self.health_start_period,
            disable: self.health_disable,
        }
    }
}

/// `--update-*`.
#[derive(Args, Debug, Default, Clone)]
pub struct UpdateFlags {
    /// Maximum number of tasks updated simultaneously (0 to update all at once) [default: 1].
    #[arg(long = "update-parallelism")]
    pub update_parallelism: Option<u32>,
    /// Delay between updates (ns|us|ms|s|m|h) [default: 0s].
    #[arg(long = "update-delay", value_parser = parse_duration_ms)]
    pub update_delay: Option<u64>,
    /// Action on update failure [default: pause].
    #[arg(long = "update-failure-action", value_parser = ["pause", "continue", "rollback"])]
    pub update_failure_action: Option<String>,
    /// Duration after each task update to monitor for failure (ns|us|ms|s|m|h) [default: 5s].
    #[arg(long = "update-monitor", value_parser = parse_duration_ms)]
    pub update_monitor: Option<u64>,
    /// Failure rate to tolerate during an update [default: 0].
    #[arg(long = "update-max-failure-ratio")]
    pub update_max_failure_ratio: Option<FailureRatio>,
    /// Update order [default: stop-first].
    #[arg(long = "update-order", value_parser = ["start-first", "stop-first"])]
    pub update_order: Option<String>,
}

/// `--rollback-*`.
#[derive(Args, Debug, Default, Clone)]
pub struct RollbackFlags {
    /// Maximum number of tasks rolled back simultaneously (0 to roll back all at once)
    /// [default: 1].
    #[arg(long = "rollback-parallelism")]
    pub rollback_parallelism: Option<u32>,
    /// Delay between task rollbacks (ns|us|ms|s|m|h) [default: 0s].
    #[arg(long = "rollback-delay", value_parser = parse_duration_ms)]
    pub rollback_delay: Option<u64>,
    /// Action on rollback failure [default: pause].
    #[arg(long = "rollback-failure-action", value_parser = ["pause", "continue"])]
    pub rollback_failure_action: Option<String>,
    /// Duration after each task rollback to monitor for failure (ns|us|ms|s|m|h)
    /// [default: 5s].
    #[arg(long = "rollback-monitor", value_parser = parse_duration_ms)]
    pub rollback_monitor: Option<u64>,
    /// Failure rate to tolerate during a rollback [default: 0].
    #[arg(long = "rollback-max-failure-ratio")]
    pub rollback_max_failure_ratio: Option<FailureRatio>,
    /// Rollback order [default: stop-first].
    #[arg(long = "rollback-order", value_parser = ["start-first", "stop-first"])]
    pub rollback_order: Option<String>,
}

/// The policy change from the six flags' values (already checked by clap).
fn change(
    parallelism: Option<u32>,
    delay_ms: Option<u64>,
    failure_action: Option<&str>,
    monitor_ms: Option<u64>,
    max_failure_ratio: Option<FailureRatio>,
    order: Option<&str>,
) -> anyhow::Result<UpdateConfigChange> {
    let failure_action = failure_action
        .map(|a| a.parse::<FailureAction>().map_err(anyhow::Error::msg))
        .transpose()?;
    let order = order
        .map(|o| o.parse::<UpdateOrder>().map_err(anyhow::Error::msg))
        .transpose()?;
    Ok(UpdateConfigChange {
        parallelism,
        delay_ms,
        failure_action,
        monitor_ms,
        max_failure_ratio,
        order,
    })
}

impl UpdateFlags {
    pub fn to_change(&self) -> anyhow::Result<UpdateConfigChange> {
        change(
            self.update_parallelism,
            self.update_delay,
            self.update_failure_action.as_deref(),
            self.update_monitor,
            self.update_max_failure_ratio,
            self.update_order.as_deref(),
        )
    }
}

impl RollbackFlags {
    pub fn to_change(&self) -> anyhow::Result<UpdateConfigChange> {
        change(
            self.rollback_parallelism,
            self.rollback_delay,
            self.rollback_failure_action.as_deref(),
            self.rollback_monitor,
            self.rollback_max_failure_ratio,
            self.rollback_order.as_deref(),
        )
    }
}

/// `--health-cmd CMD` as the argv the task runs: Docker's CMD-SHELL.
pub fn shell_command(cmd: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), cmd.into()]
}

/// A Go-style duration in milliseconds, as Docker takes them: `1m30s`, `500ms`, `10s`,
/// `2h`, `0s`; a bare number is seconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 1m30s, 2h");
    if s.is_empty() {
        return Err(bad());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1000))
            .ok_or_else(bad);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let ms = match unit {
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(bad()),
        };
        total += n * ms;
        rest = tail;
    }
    if !total.is_finite() || total > u64::MAX as f64 / 2.0 {
        return Err(bad());
    }
    Ok(total.round() as u64)
}

/// A duration in whole seconds (`--health-*`, `--stop-grace-period`): the same forms.
pub fn parse_whole_secs(s: &str) -> Result<u64, String> {
    let ms = parse_duration_ms(s)?;
    if ms % 1000 != 0 {
        return Err(format!(
            "invalid duration {s:?}: whole seconds only (e.g. 1s, 30s, 1m)"
        ));
    }
    Ok(ms / 1000)
}

/// Splits `--args "..."` into words as a POSIX shell would: blanks separate words,
/// single quotes keep everything, double quotes keep all but `\"`, `\\`, and a backslash
/// outside quotes keeps the next character.
pub fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => w.push(x),
                        None => return Err(format!("unterminated single quote in {s:?}")),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x @ ('"' | '\\' | '$' | '`')) => w.push(x),
                            Some(x) => {
                                w.push('\\');
                                w.push(x);
                            }
                            None => return Err(format!("unterminated double quote in {s:?}")),
                        },
                        Some(x) => w.push(x),
                        None => return Err(format!("unterminated double quote in {s:?}")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(x) => word.get_or_insert_with(String::new).push(x),
                None => return Err(format!("trailing backslash in {s:?}")),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1_500));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("30"), Ok(30_000), "bare seconds");
        for bad in ["", "s", "10x", "1m30", "-1s", "ms10"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_whole_secs("1m"), Ok(60));
        assert!(parse_whole_secs("1500ms").is_err());
    }

    #[test]
    fn args_split_like_a_shell() {
        assert_eq!(
            split_args(r#"python3 -c 'print("hi there")' --x "a b" c\ d"#).unwrap(),
            ["python3", "-c", r#"print("hi there")"#, "--x", "a b", "c d"]
        );
        assert_eq!(
            split_args(r#"sh -c "echo \"$V\"""#).unwrap(),
            ["sh", "-c", r#"echo "$V""#]
        );
        assert_eq!(split_args("  a   ''  ").unwrap(), ["a", ""]);
        assert!(split_args("'open").is_err());
        assert!(split_args("\"open").is_err());
        assert!(split_args("end\\").is_err());
    }

    #[test]
    fn flags_become_changes() {
        let h = HealthFlags {
            health_cmd: Some("curl -f localhost".into()),
            health_retries: Some(5),
            ..Default::default()
        };
        let u = h.to_update();
        assert_eq!(u.command.unwrap(), ["sh", "-c", "curl -f localhost"]);
        assert_eq!((u.retries, u.interval_s, u.disable), (Some(5), None, false));
        let f = UpdateFlags {
            update_failure_action: Some("rollback".into()),
            update_order: Some("start-first".into()),
            update_delay: Some(10_000),
            ..Default::default()
        };
        let c = f.to_change().unwrap();
        assert_eq!(c.failure_action, Some(FailureAction::Rollback));
        assert_eq!(c.order, Some(UpdateOrder::StartFirst));
        assert_eq!((c.delay_ms, c.parallelism), (Some(10_000), None));
        assert!(RollbackFlags::default().to_change().unwrap().is_empty());
    }
}
