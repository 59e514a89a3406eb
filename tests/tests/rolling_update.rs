//! Rolling updates and rollbacks on two nodes, with real tasks serving what they were made
//! with. Needs root.
//!
//! `web` (3 replicas over 2 nodes) answers HTTP on port 8000 with its `$V`:
//! - `service update --env-add V=2` (parallelism 1) replaces every task, one slot at a time:
//!   sampled every 100 ms, never more than one slot lacks a running task; it prints Docker's
//!   progress, `service inspect` says completed, every task answers V=2 and `service ps`
//!   lists the replaced ones under their slots;
//! - `service rollback` returns every task to V=1; a start-first update never has a slot
//!   down (each new task runs beside the old one until ready), and is rolled back too;
//! - an update whose command exits at once pauses (failure action pause) with Docker's
//!   message, the old tasks still answering; `service rollback` recovers;
//! - the same update with `--update-failure-action rollback` returns to the previous spec
//!   by itself.
//!
//! Zero failed requests under load is the draining tests' (the node side's) to show.

use overlay_e2e::{
    ok, require_root, run, script_dir, unique, wait_for, write_script, Node, Underlay,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An HTTP server on port 8000 answering every GET with `V=$V`.
const SERVE_V: &str = r#"
import http.server, os
body = ("V=" + os.environ.get("V", "") + "\n").encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// The service's tasks as the API lists them (current ones, without history).
fn tasks(n: &Node) -> Vec<serde_json::Value> {
    tasks_at(&n.socket)
}

/// The same, from the API socket at `socket`.
fn tasks_at(socket: &Path) -> Vec<serde_json::Value> {
    let out = run(Command::new("curl").args([
        "-s",
        "--max-time",
        "2",
        "--unix-socket",
        socket.to_str().unwrap_or_default(),
        "http://overlayd/tasks?service=web",
    ]));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// How many of the 3 slots have no running task right now (None: the API did not answer).
fn slots_down(socket: &Path) -> Option<usize> {
    let all = tasks_at(socket);
    if all.is_empty() {
        return None;
    }
    let mut running: BTreeMap<u64, bool> = (1..=3).map(|s| (s, false)).collect();
    for t in &all {
        if t["status"]["state"] == "running" {
            running.insert(t["slot"].as_u64().unwrap_or_default(), true);
        }
    }
    Some(running.values().filter(|r| !**r).count())
}

/// What each current task of `web` answers, asked from `client.1` at its own address.
fn answers(n: &Node) -> Vec<String> {
    let mut out: Vec<String> = tasks(n)
        .iter()
        .map(|t| {
            let ip = t["attachments"][0]["address"].as_str().unwrap_or_default();
            let url = format!("http://{ip}:8000/");
            let o = n.exec("client.1", &["curl", "-sS", "--max-time", "3", &url]);
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
        .collect();
    out.sort();
    out
}

/// Waits until every task of `web` answers `want` (3 of them).
fn wait_answers(n: &Node, want: &str) {
    let all = vec![want.to_string(); 3];
    assert!(
        wait_for(Duration::from_secs(20), || answers(n) == all),
        "web does not answer {want} everywhere: {:?}\n{}",
        answers(n),
        n.ctl_ok(&["service", "ps", "web"])
    );
}

fn update_status(n: &Node) -> (String, String) {
    let v = n.json(&["service", "inspect", "web"]);
    let s = |k: &str| {
        v[0]["UpdateStatus"][k]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (s("State"), s("Message"))
}

/// Runs overlayctl `args` (which must succeed) while sampling every 100 ms how many slots
/// of `web` lack a running task; returns its output, the worst sample and the count.
fn watched(n: &Node, args: &[&str]) -> (String, usize, usize) {
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, socket) = (done.clone(), n.socket.clone());
        std::thread::spawn(move || {
            let (mut worst, mut samples) = (0, 0);
            while !done.load(Ordering::Relaxed) {
                if let Some(d) = slots_down(&socket) {
                    worst = worst.max(d);
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (worst, samples)
        })
    };
    let out = n.ctl_ok(args);
    done.store(true, Ordering::Relaxed);
    let (worst, samples) = watcher.join().expect("watcher");
    (out, worst, samples)
}

#[test]
fn rolling_update_rollback_and_failure_actions() {
    if !require_root("rolling_update_rollback_and_failure_actions") {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must run the end-to-end tests as root"
        );
        return;
    }
    let tag = unique("ru");
    let dir = script_dir(&tag);
    let serve = write_script(&dir, "serve_v.py", SERVE_V);
    let u = Underlay::new(&tag, 2, 27);
    let (n1, n2) = Node::pair(&tag, &u);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.87.0/24", "app"]);
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "client", "--network", "app", "--", "sleep", "infinity"]);
    #[rustfmt::skip]
    n1.ctl_ok(&[
        "service", "create", "--name", "web", "--network", "app", "--replicas", "3",
        "--env", "V=1", "--update-monitor", "2s", "--rollback-monitor", "2s",
        "--", "python3", &serve,
    ]);
    n1.wait_running("client", 1);
    n1.wait_running("web", 3);
    let nodes: std::collections::BTreeSet<String> = tasks(&n1)
        .iter()
        .map(|t| t["node"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(nodes.len(), 2, "3 replicas over both nodes: {nodes:?}");
    wait_answers(&n1, "V=1");

    // The update, watched every 100 ms: at most one slot down at any moment.
    let before: Vec<serde_json::Value> = tasks(&n1);
    let (progress, worst, samples) =
        watched(&n1, &["service", "update", "--env-add", "V=2", "web"]);
    eprintln!("rolling update: {samples} samples, at most {worst} slot(s) down at once");
    assert!(samples >= 10, "only {samples} samples");
    assert!(worst <= 1, "{worst} slots down at once");
    assert!(
        progress.contains("overall progress: 3 out of 3 tasks")
            && progress.contains("3/3: running   [")
            && progress.contains("verify: Service converged"),
        "{progress}"
    );
    assert_eq!(
        update_status(&n1),
        ("completed".into(), "update completed".into())
    );
    let after = tasks(&n1);
    assert!(
        after
            .iter()
            .all(|t| before.iter().all(|b| b["id"] != t["id"]) && t["up_to_date"] == true),
        "every task replaced"
    );
    wait_answers(&n1, "V=2");
    let ps = n1.ctl_ok(&["service", "ps", "web"]);
    assert_eq!(
        ps.lines()
            .filter(|l| l.contains("\\_ web.") && l.contains("task updated"))
            .count(),
        3,
        "{ps}"
    );
    let v = n1.json(&["service", "inspect", "web"]);
    assert_eq!(v[0]["PreviousSpec"]["ContainerSpec"]["Env"][0], "V=1");
    let version = v[0]["Version"]["Index"].as_u64().expect("version");

    // Rollback: V=1 again, the rolled-back tasks listed as such.
    let out = n1.ctl_ok(&["service", "rollback", "web"]);
    assert!(
        out.contains("rollback: manually requested rollback")
            && out.contains("verify: Service converged"),
        "{out}"
    );
    assert_eq!(update_status(&n1).0, "rollback_completed");
    wait_answers(&n1, "V=1");
    assert!(n1.ctl_ok(&["service", "ps", "web"]).contains("rolled back"));
    let v = n1.json(&["service", "inspect", "web"]);
    assert!(v[0]["Version"]["Index"].as_u64() > Some(version));
    assert_eq!(v[0]["Spec"]["ContainerSpec"]["Env"][0], "V=1");

    // start-first: each new task runs beside the old one (under its own name) until it is
    // ready: no slot is ever down. Then back to V=1.
    #[rustfmt::skip]
    let (_, worst, samples) = watched(&n1, &[
        "service", "update", "--update-order", "start-first", "--env-add", "V=3", "web",
    ]);
    eprintln!("start-first update: {samples} samples, at most {worst} slot(s) down at once");
    assert!(
        samples >= 10 && worst == 0,
        "{worst} slots down in {samples} samples"
    );
    wait_answers(&n1, "V=3");
    assert!(
        tasks(&n1).iter().any(|t| t["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("web.") && n.len() > 6)),
        "start-first replacements are named web.N.ID"
    );
    n1.ctl_ok(&["service", "rollback", "web"]);
    wait_answers(&n1, "V=1");

    // A command that exits at once: the update pauses on the first task, with Docker's
    // message; the other slots keep their tasks, which still answer.
    let old: Vec<String> = tasks(&n1)
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let err = n1.ctl_err(&["service", "update", "--args", "sh -c 'exit 1'", "web"]);
    assert!(
        err.contains(
            "service update paused: update paused due to failure or early termination of task"
        ),
        "{err}"
    );
    let (state, message) = update_status(&n1);
    assert_eq!(state, "paused", "{message}");
    let still: Vec<serde_json::Value> = tasks(&n1)
        .into_iter()
        .filter(|t| old.iter().any(|o| t["id"] == o.as_str()))
        .collect();
    assert_eq!(still.len(), 2, "two slots untouched");
    for t in &still {
        let ip = t["attachments"][0]["address"].as_str().unwrap_or_default();
        let url = format!("http://{ip}:8000/");
        let o = n1.exec("client.1", &["curl", "-sS", "--max-time", "3", &url]);
        assert_eq!(ok(o, "an old task answers"), "V=1");
    }
    n1.ctl_ok(&["service", "rollback", "web"]);
    wait_answers(&n1, "V=1");

    // The same failure with --update-failure-action rollback: back to the previous spec
    // by itself.
    #[rustfmt::skip]
    let err = n1.ctl_err(&[
        "service", "update", "--update-failure-action", "rollback",
        "--args", "sh -c 'exit 1'", "web",
    ]);
    assert!(
        err.contains(
            "service rolled back: update rolled back due to failure or early termination of task"
        ),
        "{err}"
    );
    let (state, message) = update_status(&n1);
    assert_eq!(state, "rollback_completed", "{message}");
    let v = n1.json(&["service", "inspect", "web"]);
    assert_eq!(v[0]["Spec"]["ContainerSpec"]["Command"][0], "python3");
    wait_answers(&n1, "V=1");
    n1.ctl_ok(&["service", "rm", "web", "client"]);
    drop(n2);
    let _ = std::fs::remove_dir_all(&dir);
}
