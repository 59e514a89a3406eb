//! Three nodes on this machine, each `overlayd` in its own network namespace on a bridged
//! underlay (198.18.1.0/24): one overlay network spanning all three, carried as VXLAN over
//! UDP 4789 between the daemons, with the control plane over QUIC + mutual TLS. Needs root.
//!
//! - tasks on different nodes reach each other (ping, iperf3 TCP);
//! - `service logs` on either node shows both nodes' tasks (`--tail`, `-f` from the other
//!   node's task);
//! - state changes may be issued on a worker (forwarded to the manager);
//! - a node that joins late gets the state and takes tasks;
//! - a killed worker is marked down; it rejoins on restart with its certificate;
//! - with the manager killed, tasks on the workers keep talking; changes are refused clearly;
//!   when the manager is back, the workers resynchronise.

use overlay_e2e::{iperf_bytes, pings, require_root, unique, wait_for, Node, Underlay};
use std::time::Duration;

fn running_on(node: &Node, service: &str) -> Vec<(String, String)> {
    let tasks = node.json(&[
        "inspect",
        &format!("{service}.1"),
        &format!("{service}.2"),
        &format!("{service}.3"),
    ]);
    tasks
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("").to_string(),
                t["node"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// `service logs` asked on either node shows the lines of the tasks on both, with Docker's
/// `NAME.SLOT.ID@NODE | ` prefix; `--tail 1` one line per task; `-f` a line the other
/// node's task prints after it started.
fn service_logs_from_both_nodes(n1: &Node, n2: &Node) {
    let go = n1.dir.join("talk-go");
    let script = format!(
        "echo one; echo two; while [ ! -e {} ]; do sleep 0.1; done; echo late; exec sleep 600",
        go.display()
    );
    n1.ctl_ok(&[
        "service",
        "create",
        "--name",
        "talk",
        "--network",
        "span",
        "--replicas",
        "2",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    n1.wait_running("talk", 2);
    let prefix = |task: &str| {
        let v = n1.task_view(task);
        format!(
            "{task}.{}@{} | ",
            v["id"].as_str().expect("id"),
            v["node"].as_str().expect("node")
        )
    };
    let (p1, p2) = (prefix("talk.1"), prefix("talk.2"));
    let nodes = [n1.node_of("talk.1"), n1.node_of("talk.2")];
    assert!(
        nodes.contains(&n1.name) && nodes.contains(&n2.name),
        "{nodes:?}"
    );
    for n in [n1, n2] {
        let mut all = String::new();
        let both = wait_for(Duration::from_secs(10), || {
            all = n.ctl_ok(&["service", "logs", "talk"]);
            [&p1, &p2]
                .iter()
                .all(|p| all.contains(&format!("{p}one\n")) && all.contains(&format!("{p}two\n")))
        });
        assert!(both, "service logs on {}: {all}", n.name);
        let tail = n.ctl_ok(&["service", "logs", "--tail", "1", "talk"]);
        let mut got: Vec<&str> = tail.lines().collect();
        got.sort();
        let mut want = vec![format!("{p1}two"), format!("{p2}two")];
        want.sort();
        assert_eq!(got, want, "--tail 1 on {}", n.name);
    }
    // Follow on the worker; the manager's task prints a line after it started.
    let other = if nodes[0] == n1.name { &p1 } else { &p2 };
    let mut follow = n2
        .ctl_cmd(&["service", "logs", "-f", "--tail", "1", "talk"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("service logs -f");
    // Bounded: a follow that shows nothing more is killed after 20 s (reads then end).
    let pid = nix::unistd::Pid::from_raw(follow.id() as i32);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
    });
    let mut out = std::io::BufReader::new(follow.stdout.take().expect("stdout"));
    let (mut seen, mut line) = (Vec::new(), String::new());
    // Both tasks' last line first, then (once the file exists) the late one.
    while seen.len() < 2 && std::io::BufRead::read_line(&mut out, &mut line).unwrap_or(0) > 0 {
        seen.push(std::mem::take(&mut line));
    }
    std::fs::write(&go, b"").expect("go file");
    let want = format!("{other}late");
    while !seen.iter().any(|l| l.trim_end() == want)
        && std::io::BufRead::read_line(&mut out, &mut line).unwrap_or(0) > 0
    {
        seen.push(std::mem::take(&mut line));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        seen.iter().any(|l| l.trim_end() == want),
        "followed on {}: {seen:?}",
        n2.name
    );
    // Bad input: a clear error.
    let err = n2.ctl_err(&["service", "logs", "--tail", "1000000", "talk"]);
    assert!(err.contains("--tail may be at most 100000"), "{err}");
    let err = n2.ctl_err(&["service", "logs", "nosuch"]);
    assert!(err.contains("no such service: nosuch"), "{err}");
    n1.ctl_ok(&["service", "rm", "talk"]);
}

#[test]
fn three_node_overlay() {
    if !require_root("three_node_overlay") {
        return;
    }
    let tag = unique("mn");
    let mut u = Underlay::new(&tag, 2, 1);
    let (mut n1, n2) = Node::pair(&tag, &u);

    // Only managers change the cluster: a worker says where changes are made.
    let err = n2.ctl_err(&["network", "create", "--subnet", "10.0.7.0/24", "span"]);
    let on_manager = format!(
        "this node is a worker: changes are made on a manager ({} at {}:2377)",
        n1.name,
        u.addr(1)
    );
    assert!(err.contains(&on_manager), "{err}");
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.7.0/24", "span"]);
    n1.ctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "span",
        "--replicas",
        "2",
        "--",
        "iperf3",
        "-s",
    ]);
    n1.wait_running("web", 2);
    assert_eq!(n1.json(&["network", "inspect", "span"])[0]["VNI"], 4097);
    service_logs_from_both_nodes(&n1, &n2);

    // A third node joins late: it gets the state and takes the next task.
    let h3 = u.add_host(&format!("{tag}-h3"));
    let n3 = Node::worker(&format!("{tag}c"), &u, h3, &n1);
    assert!(wait_for(Duration::from_secs(10), || n3
        .ctl_ok(&["network", "ls", "-q"])
        .contains("span")));
    n1.ctl_ok(&["service", "scale", "web=3"]);
    n1.wait_running("web", 3);
    let placed = running_on(&n1, "web");
    let nodes: std::collections::BTreeSet<&str> = placed.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(nodes.len(), 3, "spread over three nodes: {placed:?}");
    let ls = n3.ctl_ok(&["node", "ls"]);
    assert_eq!(ls.matches("Ready").count(), 3, "{ls}");

    // Task to task across nodes, from every node's view of the same names.
    let on = |node: &str| {
        placed
            .iter()
            .find(|(_, n)| n == node)
            .map(|(t, _)| t.clone())
            .expect("task")
    };
    let (t1, t2, t3) = (on(&n1.name), on(&n2.name), on(&n3.name));
    let ip2 = n1.task_ip(&t2);
    let ip3 = n1.task_ip(&t3);
    assert!(pings(&n1, &t1, &ip2), "{t1} -> {t2}");
    assert!(pings(&n1, &t1, &ip3), "{t1} -> {t3}");
    assert!(pings(&n2, &t2, &ip3), "{t2} -> {t3}");
    assert!(pings(&n3, &t3, "10.0.7.1"), "gateway on n3");
    let bytes = iperf_bytes(&n1, &t1, &ip3);
    assert!(
        bytes > 1_000_000,
        "cross-node iperf3 moved only {bytes} bytes"
    );
    for n in [&n1, &n3] {
        let stats = n.json(&["stats"]);
        assert!(stats["tx_frames"].as_u64().unwrap_or(0) > 1000, "{stats}");
        assert!(
            stats["drops"]["write_failed"].is_null(),
            "underlay sends failed: {stats}"
        );
        assert!(stats["drops"]["vxlan_malformed"].is_null(), "{stats}");
        // Super-frames from the tasks were all segmented for the underlay.
        assert!(stats["drops"]["offload_malformed"].is_null(), "{stats}");
    }

    // Draining a node moves its task elsewhere; the service stays whole and reachable.
    n1.ctl_ok(&["node", "update", "--availability", "drain", &n3.name]);
    n1.wait_running("web", 3);
    let after = running_on(&n1, "web");
    assert!(after.iter().all(|(_, n)| *n != n3.name), "{after:?}");
    assert!(n1.ctl_ok(&["node", "ls"]).contains("Drain"));
    let moved = after
        .iter()
        .find(|(t, _)| *t == t3)
        .map(|(t, _)| t.clone())
        .expect("moved task");
    assert!(pings(&n1, &t1, &n1.task_ip(&moved)), "moved task reachable");
    n1.ctl_ok(&["node", "update", "--availability", "active", &n3.name]);
    // Back to where it was: scale down and up so the slot lands on n3 again.
    n1.ctl_ok(&["service", "scale", "web=2"]);
    n1.ctl_ok(&["service", "scale", "web=3"]);
    n1.wait_running("web", 3);
    assert_eq!(
        running_on(&n1, "web")
            .iter()
            .filter(|(_, n)| *n == n3.name)
            .count(),
        1
    );
    let ip3 = n1.task_ip(&t3);

    // A killed worker is marked down within seconds; restarted, it comes back with its
    // certificate (no token needed) and its task runs again.
    let mut n3 = n3;
    n3.kill();
    assert!(
        wait_for(Duration::from_secs(8), || n1.node_state(&n3.name) == "down"),
        "{}",
        n1.ctl_ok(&["node", "ls"])
    );
    // Its tasks' logs are said to be unavailable, at once, on the manager and on a worker.
    for n in [&n1, &n2] {
        let asked = std::time::Instant::now();
        let logs = n.ctl_ok(&["service", "logs", "web"]);
        let want = format!("@{} | (logs unavailable: node {} ", n3.name, n3.name);
        assert!(logs.contains(&want), "service logs on {}: {logs}", n.name);
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "{:?}",
            asked.elapsed()
        );
    }
    n3.remove_flag("--token", true);
    n3.remove_flag("--join", true);
    n3.restart();
    n1.wait_ready(&[&n3]);
    n1.wait_running("web", 3);
    assert!(pings(&n2, &t2, &ip3), "after worker restart");

    // The manager dies: the workers keep forwarding on the last known state.
    n1.kill();
    assert!(
        pings(&n2, &t2, &ip3),
        "worker to worker without the manager"
    );
    assert!(iperf_bytes(&n2, &t2, &ip3) > 1_000_000);
    // A worker refuses changes itself, from its last snapshot, manager or not.
    let err = n2.ctl_err(&["network", "create", "later"]);
    assert!(err.contains(&on_manager), "{err}");
    assert!(wait_for(Duration::from_secs(10), || !n2.json(&["info"])
        ["manager_reachable"]
        .as_bool()
        .unwrap_or(true)));
    // Reads still answer, from the last known state.
    assert!(n2.ctl_ok(&["service", "ls"]).contains("web"));

    // The manager comes back: workers resynchronise and see its changes again.
    n1.remove_flag("--init", false);
    n1.restart();
    let mut last = String::new();
    let created = wait_for(Duration::from_secs(15), || {
        let out = n1.ctl(&["network", "create", "later"]);
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success()
    });
    assert!(
        created,
        "the manager could not create after its restart: {last}"
    );
    assert!(wait_for(Duration::from_secs(10), || n2.json(&["info"])
        ["manager_reachable"]
        .as_bool()
        .unwrap_or(false)));
    assert!(wait_for(Duration::from_secs(5), || n3
        .ctl_ok(&["network", "ls", "-q"])
        .contains("later")));
    assert!(pings(&n3, &t3, &ip2), "after manager restart");
    // Workers first, so they do not spend their shutdown reconnecting to a stopped manager;
    // the underlay (`u`) goes last, when it falls out of scope.
    drop(n3);
    drop(n2);
    drop(n1);
}
