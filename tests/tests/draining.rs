//! A service changes under load and no client notices: two nodes, `web` (3 replicas with a
//! health check, published 8080:8000), a client task making one new TCP connection per
//! request at ~50 requests/s through the VIP, a client outside the cluster doing the same
//! through the routing mesh, and long downloads through the VIP (below). Every request is
//! logged; none may fail. Needs root. Underlay 198.18.23.0/24.
//!
//! - scale 3 -> 2: the task that leaves takes no new connection, and a download it serves
//!   (started just before) completes intact before it stops; back to 3: the new task, its
//!   server up but its check failing for 3 s, takes no request until its check passes;
//! - `service rm` of a second service while a download from it runs through its VIP: the
//!   download completes intact;
//! - a task made unhealthy (its health command checks a file the test removes with
//!   `overlayctl exec`) leaves the rotation on every node, is drained and restarted by its
//!   node, and comes back healthy once the file is back;
//! - rolling changes, parallelism 1, each waited for by the CLI: `service update --env-add
//!   V=2` (stop-first), `service update --update-order start-first --env-add V=3`, and
//!   `service rollback` (back to V=2). Each asserts no failed request from its start until
//!   after convergence, and that every answer after convergence comes from the new `V`
//!   (the server answers `web.1 V=2`), from all three new tasks.
//!
//! The long download runs from the start until the first update replaces its task
//! (`web.1`); each rolling change also carries a download from the slot it replaces last,
//! started before the change. Every download goes on 3 s on its task after that task was
//! replaced (left the rotation, draining), then ends, and must be intact: what a user
//! expects of a download in flight when its task is replaced, within the stop grace period
//! (10 s). (A download can outlive its task's replacement only by the grace period, so none
//! can run through all three changes.)
//!
//! The services are made through the API (`POST /services/create` on the Unix socket), which
//! takes the health check and stop grace period as JSON.

use draining_rig::rolling::roll;
use draining_rig::{epoch, failures, log_of, who, Bg, Rig, CLIENT_PY, SERVER_PY};
use overlay_e2e::{
    ok, require_root, run, script_dir, unique, wait_for, write_script, Node, Underlay,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod draining_rig;

/// `POST` of `body` to the API of `node` at `path`; panics unless it succeeds.
fn api_post(node: &Node, path: &str, body: &str) -> String {
    let url = format!("http://overlay{path}");
    let out = run(Command::new("curl")
        .args(["-sS", "--fail-with-body", "--unix-socket"])
        .arg(&node.socket)
        .args([
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            &url,
        ]));
    ok(out, &format!("POST {path} {body}"))
}

/// A service of `replicas` running the test's server on network `front` with `V=1`, and a
/// health check that passes while `HDIR/ok-SERVICE.SLOT` exists (a start-first task named
/// `web.1.ID` reads its slot's file) and the server answers. Updates and rollbacks keep
/// Docker's policies but monitor each new task for 1 s instead of 5 s: the monitor only
/// delays the end of a rollout (and the network has less time to settle before it).
fn web_service(name: &str, replicas: u32, server: &str, hdir: &Path, publish: bool) -> String {
    let check = format!(
        "test -f {}/ok-$OVERLAY_SERVICE_NAME.$OVERLAY_TASK_SLOT && \
         curl -sf -m 1 -o /dev/null http://127.0.0.1:8000/",
        hdir.display()
    );
    let ports = if publish {
        r#"[{"TargetPort": 8000, "PublishedPort": 8080}]"#
    } else {
        "[]"
    };
    format!(
        r#"{{"name": "{name}", "networks": ["front"], "replicas": {replicas},
            "command": ["python3", "{server}"], "env": ["V=1"], "ports": {ports},
            "healthcheck": {{"command": ["CMD-SHELL", "{check}"], "interval_s": 1,
                             "timeout_s": 2, "retries": 2, "start_period_s": 0}},
            "stop_grace_period_s": 10,
            "update_config": {{"monitor_ms": 1000}}, "rollback_config": {{"monitor_ms": 1000}}}}"#
    )
}

/// The task's status as the API of `n` shows it.
fn status(n: &Node, task: &str) -> serde_json::Value {
    n.task_view(task)["status"].clone()
}

fn healthy(n: &Node, task: &str) -> bool {
    let s = status(n, task);
    s["state"] == "running" && s["health"] == "healthy"
}

#[test]
fn changes_under_load_fail_no_request() {
    if !require_root("changes_under_load_fail_no_request") {
        return;
    }
    let tag = unique("dr");
    let dir = script_dir(&tag);
    let server = write_script(&dir, "server.py", SERVER_PY);
    let client = write_script(&dir, "client.py", CLIENT_PY);
    for i in 1..=3 {
        std::fs::write(dir.join(format!("ok-web.{i}")), "").expect("health file");
    }
    std::fs::write(dir.join("ok-old.1"), "").expect("health file");
    let stop_file = dir.join("stop");
    let _ = std::fs::remove_file(&stop_file);

    let mut u = Underlay::new(&tag, 2, 23);
    let outside = u.add_host(&format!("{tag}-cl"));
    let (n1, n2) = Node::pair(&tag, &u);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.40.0/24", "front"]);
    api_post(
        &n1,
        "/services/create",
        &web_service("web", 3, &server, &dir, true),
    );
    api_post(
        &n1,
        "/services/create",
        &web_service("old", 1, &server, &dir, false),
    );
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "client", "--network", "front", "--", "sleep", "infinity"]);
    n1.wait_running("client", 1);
    n1.wait_running("web", 3);
    n1.wait_running("old", 1);
    let t0 = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || (1..=3)
            .all(|i| healthy(&n1, &format!("web.{i}")))
            && healthy(&n1, "old.1")),
        "not healthy: {}",
        n1.ctl_ok(&["service", "ps", "web"])
    );
    eprintln!(
        "health: every task healthy {:?} after running",
        t0.elapsed()
    );
    let c = "client.1";
    let cn = if n1.node_of(c) == n1.name { &n1 } else { &n2 };
    let node_of: BTreeMap<String, String> = (1..=3)
        .map(|i| format!("web.{i}"))
        .map(|t| (t.clone(), n1.node_of(&t)))
        .collect();
    eprintln!("placement: client on {}, web on {node_of:?}", cn.name);

    let stop = stop_file.display().to_string();
    let vip_log = dir.join("vip.log");
    let mesh_log = dir.join("mesh.log");
    let vip_load = Bg::spawn(cn.ctl_cmd(&[
        "exec",
        c,
        "--",
        "python3",
        &client,
        "load",
        "web",
        "8000",
        "50",
        &vip_log.display().to_string(),
        &stop,
    ]));
    let mut mesh = u.host(outside).cmd("python3");
    mesh.args([
        &client,
        "load",
        &u.addr(2),
        "8080",
        "50",
        &mesh_log.display().to_string(),
        &stop,
    ]);
    let mesh_load = Bg::spawn(mesh);
    let rig = Rig {
        manager: &n1,
        client_node: cn,
        client_py: client.clone(),
        dir: dir.clone(),
        vip_log: vip_log.clone(),
        mesh_log: mesh_log.clone(),
    };
    let download = |want: &str, host: &str, secs: &str| rig.download(want, host, secs, &stop_file);
    // The long download, from a replica that stays until the first update replaces it.
    let long = rig.inflight(1);
    assert_eq!(long.task, "web.1");
    assert!(wait_for(Duration::from_secs(10), || log_of(&vip_log).len()
        > 50
        && log_of(&mesh_log).len() > 50));

    // Scale down: web.3 drains. A download it serves, started just before, completes.
    let drained = download("web.3", "web", "6");
    let t = Instant::now();
    let old_ns = format!("ov-{}-web.3", node_of["web.3"]);
    let scaled_down = epoch();
    n1.ctl_ok(&["service", "scale", "web=2"]);
    let got = drained.finish();
    let download_done = t.elapsed();
    assert!(got.starts_with("intact web.3"), "draining download: {got}");
    let web3_node = if node_of["web.3"] == n1.name {
        &n1
    } else {
        &n2
    };
    assert!(
        wait_for(Duration::from_secs(20), || !web3_node
            .task_namespaces()
            .contains(&old_ns)),
        "web.3 not stopped"
    );
    eprintln!(
        "scale 3->2: web.3's download ended intact {download_done:?} after the scale ({got}); \
         web.3 gone after {:?}",
        t.elapsed()
    );
    // Back to 3, the new web.3 not ready at first: its server answers, its check fails
    // (no file) for 3 s. It takes no request until its check passes.
    let ok3 = dir.join("ok-web.3");
    std::fs::remove_file(&ok3).expect("health file");
    let t = Instant::now();
    let scaled_up = epoch();
    n1.ctl_ok(&["service", "scale", "web=3"]);
    assert!(wait_for(Duration::from_secs(20), || status(&n1, "web.3")
        ["state"]
        == "running"));
    std::thread::sleep(Duration::from_secs(3));
    let unready = epoch();
    std::fs::write(&ok3, "").expect("health file");
    assert!(wait_for(Duration::from_secs(20), || healthy(&n1, "web.3")));
    let healthy_after = t.elapsed();
    assert!(
        wait_for(Duration::from_secs(10), || log_of(&vip_log)
            .iter()
            .chain(&log_of(&mesh_log))
            .any(|(t, r)| *t > unready && who(r) == "web.3")),
        "the new web.3 takes no traffic"
    );
    let before_ready = log_of(&vip_log)
        .iter()
        .chain(&log_of(&mesh_log))
        .filter(|(t, r)| *t > scaled_up && *t < unready && who(r) == "web.3")
        .count();
    assert_eq!(before_ready, 0, "requests to web.3 before it was healthy");
    eprintln!(
        "scale 2->3: the new web.3 ran {:.1} s with a failing check and took no request; \
         healthy {healthy_after:?} after the scale, then served",
        unready - scaled_up
    );

    // service rm of the second service while a download from it runs through its VIP.
    let old_node = n1.node_of("old.1");
    let from_old = download("old.1", "old", "5");
    let t = Instant::now();
    n1.ctl_ok(&["service", "rm", "old"]);
    let got = from_old.finish();
    assert!(
        got.starts_with("intact old.1"),
        "download from a removed service: {got}"
    );
    eprintln!(
        "service rm: old.1 (on {old_node}): its download ended intact {:?} after the rm",
        t.elapsed()
    );

    // A task made unhealthy: one on the node without the client (its status must travel).
    let sick = (2..=3)
        .map(|i| format!("web.{i}"))
        .find(|t| n1.node_of(t) != cn.name)
        .unwrap_or_else(|| "web.2".into());
    let sick_node = if n1.node_of(&sick) == n1.name {
        &n1
    } else {
        &n2
    };
    let other = if sick_node.name == n1.name { &n2 } else { &n1 };
    let restarts = status(&n1, &sick)["restarts"].as_u64().unwrap_or(0);
    let file = dir.join(format!("ok-{sick}")).display().to_string();
    let removed = epoch();
    ok(
        sick_node.exec(&sick, &["rm", "-f", &file]),
        "rm health file",
    );
    // When its own node, and the other one, see it unhealthy (the status travels from its
    // node to the manager and back to every node).
    let (mut seen_here, mut seen_there) = (None, None);
    assert!(
        wait_for(Duration::from_secs(10), || {
            for (n, seen) in [(sick_node, &mut seen_here), (other, &mut seen_there)] {
                if seen.is_none() && status(n, &sick)["health"] == "unhealthy" {
                    *seen = Some(epoch() - removed);
                }
            }
            seen_here.is_some() && seen_there.is_some()
        }),
        "{sick} not unhealthy: {}",
        status(&n1, &sick)
    );
    // Its node drains it (3 s to settle), stops it and restarts it: back once the file is.
    let mut error = String::new();
    assert!(
        wait_for(Duration::from_secs(20), || {
            let st = status(sick_node, &sick);
            if let Some(e) = st["error"].as_str() {
                error = e.to_string();
            }
            st["restarts"].as_u64().unwrap_or(0) > restarts
        }),
        "{sick} not restarted: {}",
        status(&n1, &sick)
    );
    let restarted = epoch() - removed;
    std::thread::sleep(Duration::from_secs(1));
    ok(
        sick_node.exec(&sick, &["touch", &file]),
        "restore health file",
    );
    let restored = epoch();
    assert!(
        wait_for(Duration::from_secs(20), || healthy(&n1, &sick)),
        "{sick} not healthy again: {}",
        status(&n1, &sick)
    );
    assert!(
        wait_for(Duration::from_secs(10), || log_of(&vip_log)
            .iter()
            .chain(&log_of(&mesh_log))
            .any(|(t, r)| *t > restored && who(r) == sick)),
        "{sick} takes no traffic after it is healthy again"
    );
    let back = epoch() - restored;

    // Rolling changes: each replaces the three tasks one at a time. The long download
    // ends 3 s after the first update replaced its task.
    roll(
        &rig,
        "update V=2 (stop-first)",
        "service update --env-add V=2 web",
        "2",
        vec![long],
    );
    let start_first = "service update --update-order start-first --env-add V=3 web";
    roll(&rig, "update V=3 (start-first)", start_first, "3", vec![]);
    roll(&rig, "rollback to V=2", "service rollback web", "2", vec![]);

    std::fs::write(&stop_file, "").expect("stop file");
    let vip_summary = vip_load.finish();
    let mesh_summary = mesh_load.finish();
    let (vip, mesh) = (log_of(&vip_log), log_of(&mesh_log));
    // The last request `task` answered between `from` and `to`, in seconds after `from`.
    let last = |log: &[(f64, String)], task: &str, from: f64, to: f64| {
        log.iter()
            .filter(|(t, r)| *t > from && *t < to && who(r) == task)
            .map(|(t, _)| t - from)
            .fold(0.0, f64::max)
    };
    let web3_last = last(&vip, "web.3", scaled_down, scaled_up).max(last(
        &mesh,
        "web.3",
        scaled_down,
        scaled_up,
    ));
    let sick_vip = last(&vip, &sick, removed, restored);
    let sick_mesh = last(&mesh, &sick, removed, restored);
    let rate = |log: &[(f64, String)]| {
        let span = log.last().map_or(0.0, |l| l.0) - log.first().map_or(0.0, |l| l.0);
        log.len() as f64 / span.max(1.0)
    };
    let (here, there) = (
        seen_here.unwrap_or_default(),
        seen_there.unwrap_or_default(),
    );
    eprintln!("scale 3->2: the last request web.3 answered came {web3_last:.2} s after the scale");
    eprintln!(
        "unhealthy {sick} (on {}): its file went at 0; unhealthy on its node at {here:.1} s, \
         on the other at {there:.1} s (interval 1 s x retries 2); the last request it \
         answered: {sick_vip:.2} s through the VIP (client on {}), {sick_mesh:.2} s through \
         the mesh (entered at {}); restarted at {restarted:.1} s ({error}); answered again \
         {back:.1} s after the file came back",
        sick_node.name, cn.name, n2.name,
    );
    eprintln!(
        "load: VIP {} requests at {:.0}/s ({vip_summary}), mesh {} at {:.0}/s \
         ({mesh_summary})",
        vip.len(),
        rate(&vip),
        mesh.len(),
        rate(&mesh)
    );
    assert!(
        failures(&vip).is_empty() && failures(&mesh).is_empty(),
        "failed requests: VIP {:?}, mesh {:?}",
        failures(&vip),
        failures(&mesh)
    );
    // The task that left took no new connection once every node had the change.
    assert!(
        web3_last < 2.0,
        "web.3 answered {web3_last:.2} s after the scale"
    );
    assert!(error.starts_with("unhealthy: "), "{error}");
    // It leaves within interval x retries, plus the time its status takes to reach the
    // other node (measured above), plus a second of slack for a loaded machine.
    let bound = 2.0 + (there - here).max(0.0) + 1.0;
    let last_served = sick_vip.max(sick_mesh);
    assert!(
        last_served < bound,
        "{sick} answered {last_served:.2} s after its file went (bound {bound:.1} s)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
