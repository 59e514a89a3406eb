//! `service inspect --pretty`: Docker's human-readable layout of a service, with its update
//! status and its update and rollback policies.

use crate::table;
use protocol::api::{PortSpec, ServiceInspect, UpdateConfigView};
use protocol::state::PublishMode;
use std::fmt::Write;

/// A Go-style duration from nanoseconds, as Docker prints them: `5s`, `1m30s`, `500ms`.
pub fn go_duration(ns: u64) -> String {
    let ms = ns / 1_000_000;
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, rest) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if h > 0 || m > 0 {
        let _ = write!(out, "{m}m");
    }
    if rest > 0 {
        let _ = write!(out, "{s}.{}s", format!("{rest:03}").trim_end_matches('0'));
    } else {
        let _ = write!(out, "{s}s");
    }
    out
}

/// An update or rollback policy; `order` is the label of its last line (Docker's spacing).
fn policy(out: &mut String, title: &str, order: &str, c: &UpdateConfigView) {
    let _ = writeln!(out, "{title}:");
    let _ = writeln!(out, " Parallelism:\t{}", c.parallelism);
    if c.delay > 0 {
        let _ = writeln!(out, " Delay:\t\t{}", go_duration(c.delay));
    }
    let _ = writeln!(out, " On failure:\t{}", c.failure_action);
    if c.monitor > 0 {
        let _ = writeln!(out, " Monitoring Period: {}", go_duration(c.monitor));
    }
    let _ = writeln!(out, " Max failure ratio: {}", c.max_failure_ratio);
    let _ = writeln!(out, " {order}{}", c.order);
}

/// The pretty form of `s` at `now` (unix seconds).
pub fn render(s: &ServiceInspect, now: u64) -> String {
    let mut out = String::new();
    let spec = &s.spec;
    let _ = writeln!(out, "ID:\t\t{}", s.id);
    let _ = writeln!(out, "Name:\t\t{}", spec.name);
    match spec.mode {
        protocol::api::ModeView::Global {} => {
            let _ = writeln!(out, "Service Mode:\tGlobal");
        }
        protocol::api::ModeView::Replicated { .. } => {
            let _ = writeln!(out, "Service Mode:\tReplicated");
            let _ = writeln!(out, " Replicas:\t{}", spec.replicas);
        }
    }
    if let Some(u) = &s.update_status {
        let _ = writeln!(out, "UpdateStatus:");
        let _ = writeln!(out, " State:\t\t{}", u.state);
        let _ = writeln!(
            out,
            " Started:\t{}",
            table::ago(u.started_at.unix_secs(), now)
        );
        if let (Some(done), "completed") = (u.completed_at, u.state.as_str()) {
            let _ = writeln!(out, " Completed:\t{}", table::ago(done.unix_secs(), now));
        }
        let _ = writeln!(out, " Message:\t{}", u.message);
    }
    let _ = writeln!(out, "Placement:");
    policy(
        &mut out,
        "UpdateConfig",
        "Update order:      ",
        &spec.update_config,
    );
    policy(
        &mut out,
        "RollbackConfig",
        "Rollback order:    ",
        &spec.rollback_config,
    );
    let _ = writeln!(out, "ContainerSpec:");
    let c = &spec.container_spec;
    if !c.command.is_empty() {
        let _ = writeln!(out, " Args:\t\t{} ", c.command.join(" "));
    }
    if !c.env.is_empty() {
        let _ = writeln!(out, " Env:\t\t{} ", c.env.join(" "));
    }
    if let Some(g) = c.stop_grace_period {
        let _ = writeln!(out, " StopGracePeriod: {}", go_duration(g));
    }
    if !spec.networks.is_empty() {
        let names: Vec<&str> = spec.networks.iter().map(|n| n.target.as_str()).collect();
        let _ = writeln!(out, "Networks: {} ", names.join(" "));
    }
    let _ = writeln!(out, "Endpoint Mode:\t{}", spec.endpoint_spec.mode);
    let ports: &[PortSpec] = &s.endpoint.ports;
    if !ports.is_empty() {
        let _ = writeln!(out, "Ports:");
        for p in ports {
            let mode = match p.publish_mode {
                PublishMode::Ingress => "ingress",
                PublishMode::Host => "host",
            };
            let _ = writeln!(out, " PublishedPort = {}", p.published_port);
            let _ = writeln!(out, "  Protocol = {}", p.protocol);
            let _ = writeln!(out, "  TargetPort = {}", p.target_port);
            let _ = writeln!(out, "  PublishMode = {mode}");
        }
    }
    if let Some(h) = &c.healthcheck {
        let _ = writeln!(out, " Healthcheck:");
        let _ = writeln!(out, "  Interval = {}", go_duration(h.interval));
        let _ = writeln!(out, "  Retries = {}", h.retries);
        let _ = writeln!(out, "  StartPeriod =\t{}", go_duration(h.start_period));
        let _ = writeln!(out, "  Timeout =\t{}", go_duration(h.timeout));
        let _ = writeln!(out, "  Tests:");
        for t in &h.test {
            let _ = writeln!(out, "\t Test = {t}");
        }
    }
    expand_tabs(&out)
}

/// Docker aligns its pretty output with a tab writer; tabs to 8-column stops do the same
/// for these labels.
fn expand_tabs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.lines() {
        let mut col = 0;
        for ch in line.chars() {
            if ch == '\t' {
                let n = 8 - col % 8;
                out.extend(std::iter::repeat_n(' ', n));
                col += n;
            } else {
                out.push(ch);
                col += 1;
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_print_as_docker_does() {
        let s = 1_000_000_000;
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(5 * s), "5s");
        assert_eq!(go_duration(90 * s), "1m30s");
        assert_eq!(go_duration(3600 * s), "1h0m0s");
        assert_eq!(go_duration(500_000_000), "500ms");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
    }

    #[test]
    fn pretty_shows_the_update_status_and_policies() {
        let v = serde_json::json!({
            "ID": "abc", "Version": {"Index": 3}, "CreatedAt": "1970-01-01T00:00:00Z",
            "UpdatedAt": "1970-01-01T00:00:00Z", "Running": 3,
            "Spec": {
                "Name": "web",
                "ContainerSpec": {"Command": ["sleep", "1000"], "Env": ["V=2"],
                    "StopGracePeriod": 10000000000u64},
                "Networks": [{"Target": "app", "Aliases": []}], "Replicas": 3,
                "EndpointSpec": {"Mode": "vip"},
                "UpdateConfig": {"Parallelism": 1, "Delay": 10000000000u64,
                    "FailureAction": "pause", "Monitor": 5000000000u64,
                    "MaxFailureRatio": 0.0, "Order": "stop-first"},
                "RollbackConfig": {"Parallelism": 0, "Delay": 0, "FailureAction": "continue",
                    "Monitor": 5000000000u64, "MaxFailureRatio": 0.2, "Order": "start-first"}
            },
            "Endpoint": {"Spec": {"Mode": "vip"}, "VirtualIPs": []},
            "UpdateStatus": {"State": "completed", "StartedAt": "1970-01-01T00:01:40Z",
                "CompletedAt": "1970-01-01T00:02:10Z",
                "Message": "update completed"}
        });
        let s: ServiceInspect = serde_json::from_value(v).unwrap();
        let out = render(&s, 160);
        for want in [
            "Name:           web\n",
            " Replicas:      3\n",
            "UpdateStatus:\n State:         completed\n Started:       1 minute ago\n Completed:     30 seconds ago\n Message:       update completed\n",
            "UpdateConfig:\n Parallelism:   1\n Delay:         10s\n On failure:    pause\n Monitoring Period: 5s\n Max failure ratio: 0\n Update order:      stop-first\n",
            "RollbackConfig:\n Parallelism:   0\n On failure:    continue\n",
            " Max failure ratio: 0.2\n Rollback order:    start-first\n",
            " Args:          sleep 1000 \n Env:           V=2 \n",
            "Networks: app \nEndpoint Mode:  vip\n",
        ] {
            assert!(out.contains(want), "{want:?} not in:\n{out}");
        }
    }
}
