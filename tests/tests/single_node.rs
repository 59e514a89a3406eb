//! One node, two networks, real tasks: what a user checks first. Needs root.
//!
//! - tasks on one network reach each other (ping, and a real TCP transfer with iperf3);
//! - tasks on different networks cannot; the gateway answers ping;
//! - `service scale` up and down adds and removes tasks, namespaces and addresses;
//! - a task's output reaches its log (mode 0640);
//! - garbage frames from a TAP are counted and dropped, and the node keeps forwarding;
//! - a restart of overlayd restores networks, services and tasks (same addresses);
//! - after removal, no namespace is left.

use overlay_e2e::{iperf_bytes, pings, require_root, unique, wait_for, Node};
use std::time::Duration;

/// Sends raw frames out of `task`'s eth0 with a packet socket: one with a forged source MAC,
/// one truncated ARP, one to a MAC nobody has.
fn send_garbage(node: &Node, task: &str) {
    let script = r#"
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
import sys
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
s.send(b"\xff" * 6 + b"\x02\x42\xde\xad\xbe\xef" + b"\x08\x00" + b"x" * 40)
s.send(b"\xff" * 6 + mac + b"\x08\x06" + b"\x00\x01\x08\x00")
s.send(b"\x02\x42\x01\x02\x03\x04" + mac + b"\x08\x00" + b"y" * 40)
"#;
    let mac = node.task_view(task)["attachments"][0]["mac"]
        .as_str()
        .expect("mac")
        .to_string();
    let out = node.exec(task, &["python3", "-c", script, &mac]);
    assert!(
        out.status.success(),
        "raw send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn single_node_overlay() {
    if !require_root("single_node_overlay") {
        return;
    }
    let mut node = Node::start(&unique("sn"), &[]);

    // Two networks: one from the default pool, one with an explicit subnet.
    node.ctl_ok(&["network", "create", "front"]);
    // Docker's MTU option, for underlays below 1500 bytes.
    node.ctl_ok(&[
        "network",
        "create",
        "--subnet",
        "10.0.9.0/24",
        "-o",
        "com.docker.network.driver.mtu=1400",
        "back",
    ]);
    let front = &node.json(&["network", "inspect", "front"])[0];
    assert_eq!(front["IPAM"]["Config"][0]["Subnet"], "10.0.0.0/24");
    assert_eq!(front["IPAM"]["Config"][0]["Gateway"], "10.0.0.1");

    node.ctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "front",
        "--replicas",
        "2",
        "--",
        "sleep",
        "infinity",
    ]);
    node.ctl_ok(&[
        "service",
        "create",
        "--name",
        "srv",
        "--network",
        "front",
        "--",
        "iperf3",
        "-s",
    ]);
    node.ctl_ok(&[
        "service",
        "create",
        "--name",
        "db",
        "--network",
        "back",
        "--",
        "sleep",
        "infinity",
    ]);
    node.wait_running("web", 2);
    node.wait_running("srv", 1);
    node.wait_running("db", 1);

    // The task's interface is what Swarm gives a container.
    let link = node.exec("web.1", &["ip", "-o", "link", "show", "eth0"]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("mtu 1450"), "{link}");
    let back_link = node.exec("db.1", &["ip", "-o", "link", "show", "eth0"]);
    assert!(String::from_utf8_lossy(&back_link.stdout).contains("mtu 1400"));
    // The VIP took .2; web.1 is .3.
    assert!(link.contains("link/ether 02:42:0a:00:00:03"), "{link}");
    let pid = node.task_view("web.2")["status"]["pid"]
        .as_u64()
        .expect("pid");
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("task environment");
    let env = String::from_utf8_lossy(&env);
    assert!(
        env.contains("OVERLAY_TASK_NAME=web.2\0") && env.contains("OVERLAY_TASK_SLOT=2\0"),
        "{env}"
    );
    let inspect = &node.json(&["network", "inspect", "front"])[0];
    let endpoints = inspect["Containers"].as_object().expect("containers");
    assert_eq!(endpoints.len(), 3);
    assert!(endpoints
        .values()
        .any(|e| e["Name"] == "web.1" && e["MacAddress"] == "02:42:0a:00:00:03"));
    // The service's VIP came first from the network's IPAM.
    let web = &node.json(&["service", "inspect", "web"])[0];
    assert_eq!(web["Endpoint"]["VirtualIPs"][0]["Addr"], "10.0.0.2/24");
    assert_eq!(web["Endpoint"]["VirtualIPs"][0]["NetworkID"], inspect["Id"]);

    // exec behaves like docker exec: the caller's stdin in, the command's status out.
    let mut child = std::process::Command::new(overlay_e2e::bin("overlayctl"))
        .arg("--socket")
        .arg(&node.socket)
        .args(["exec", "web.1", "--", "sh", "-c", "cat; exit 3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("overlayctl exec");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"through the pipe")
        .expect("write");
    let out = child.wait_with_output().expect("exec output");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through the pipe");

    // Same network: ping and a real TCP transfer. Gateway answers.
    let web2 = node.task_ip("web.2");
    let srv = node.task_ip("srv.1");
    let db = node.task_ip("db.1");
    assert!(pings(&node, "web.1", &web2), "web.1 -> web.2");
    assert!(pings(&node, "web.1", "10.0.0.1"), "gateway");
    assert!(pings(&node, "db.1", "10.0.9.1"), "gateway of back");
    let bytes = iperf_bytes(&node, "web.1", &srv);
    assert!(bytes > 1_000_000, "iperf3 moved only {bytes} bytes");
    // The server's output reached its log, through the daemon's pipe, in a file of mode
    // 0640 (not the umask's).
    let log = node.dir.join("state/logs/srv.1.log");
    assert!(
        wait_for(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("Server listening on 5201"))),
        "{}: {:?}",
        log.display(),
        std::fs::read_to_string(&log)
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&log).expect("log").permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "task log mode");
    }

    // Different networks: isolated, both ways.
    assert!(!node
        .exec("db.1", &["ping", "-c", "1", "-W", "1", &web2])
        .status
        .success());
    assert!(!node
        .exec("web.1", &["ping", "-c", "1", "-W", "1", &db])
        .status
        .success());

    // Hostile frames from a task are dropped with reasons; forwarding goes on.
    send_garbage(&node, "web.1");
    let counted = wait_for(Duration::from_secs(5), || {
        let stats = node.json(&["stats"]);
        ["spoofed_source", "arp_malformed", "unknown_destination"]
            .iter()
            .all(|r| stats["drops"][r].as_u64().unwrap_or(0) >= 1)
    });
    assert!(counted, "drops not counted: {}", node.json(&["stats"]));
    assert!(pings(&node, "web.1", &web2), "after garbage");

    // Scale up, then down: tasks, namespaces and addresses follow.
    node.ctl_ok(&["service", "scale", "web=3"]);
    node.wait_running("web", 3);
    let web3 = node.task_ip("web.3");
    assert!(pings(&node, "web.1", &web3), "new task reachable");
    node.ctl_ok(&["service", "scale", "web=1"]);
    node.wait_running("web", 1);
    assert!(wait_for(Duration::from_secs(10), || !node
        .task_namespaces()
        .iter()
        .any(|n| n.ends_with("web.3"))));
    let ps = node.ctl_ok(&["service", "ps", "web"]);
    assert!(ps.contains("web.1") && !ps.contains("web.2"), "{ps}");

    // Restart: state comes back, tasks are re-created with the same addresses.
    node.restart();
    node.wait_running("web", 1);
    node.wait_running("srv", 1);
    node.wait_running("db", 1);
    assert_eq!(node.task_ip("srv.1"), srv);
    assert!(pings(&node, "web.1", &srv), "after restart");
    let bytes = iperf_bytes(&node, "web.1", &srv);
    assert!(
        bytes > 1_000_000,
        "after restart iperf3 moved only {bytes} bytes"
    );

    // Removal returns everything.
    node.ctl_ok(&["service", "rm", "web", "srv", "db"]);
    node.ctl_ok(&["network", "rm", "front", "back"]);
    assert!(
        wait_for(Duration::from_secs(10), || node
            .task_namespaces()
            .is_empty()),
        "{:?}",
        node.task_namespaces()
    );
    assert!(node.stop(), "overlayd did not exit on SIGTERM");
    assert!(node.task_namespaces().is_empty());
}

#[test]
fn tasks_outlive_shutdown_and_crash_and_leftovers_are_cleaned() {
    if !require_root("tasks_outlive_shutdown_and_crash_and_leftovers_are_cleaned") {
        return;
    }
    let mut node = Node::start(&unique("sd"), &[]);
    node.ctl_ok(&["network", "create", "n"]);
    node.ctl_ok(&[
        "service",
        "create",
        "--name",
        "s",
        "--network",
        "n",
        "--replicas",
        "2",
        "--",
        "sleep",
        "infinity",
    ]);
    node.wait_running("s", 2);
    let pid = node.task_view("s.1")["status"]["pid"]
        .as_u64()
        .expect("pid");
    assert_eq!(node.task_namespaces().len(), 2);

    // A task whose process dies is restarted.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    );
    assert!(wait_for(Duration::from_secs(10), || {
        let v = node.task_view("s.1");
        v["status"]["state"] == "running" && v["status"]["pid"].as_u64() != Some(pid)
    }));
    assert!(node.task_view("s.1")["status"]["restarts"].as_u64() >= Some(1));

    // SIGTERM: the tasks keep running (same processes, namespaces, TAPs); the next start
    // adopts them.
    let pid = node.task_view("s.1")["status"]["pid"]
        .as_u64()
        .expect("pid");
    assert!(node.stop());
    assert_eq!(node.task_namespaces().len(), 2);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    node.start_again();
    node.wait_running("s", 2);
    assert_eq!(node.task_view("s.1")["status"]["pid"].as_u64(), Some(pid));
    assert!(pings(&node, "s.1", &node.task_ip("s.2")));

    // A crash: the same.
    node.kill();
    assert_eq!(node.task_namespaces().len(), 2);
    node.start_again();
    node.wait_running("s", 2);
    assert_eq!(node.task_view("s.1")["status"]["pid"].as_u64(), Some(pid));
    assert!(pings(&node, "s.1", &node.task_ip("s.2")));

    // A leftover that cannot be adopted (its record is gone) is removed, its process with
    // it, and the task started afresh.
    node.kill();
    let record = node.dir.join("state/tasks/s.1/process.json");
    std::fs::remove_file(&record).expect("the task's process record");
    node.start_again();
    assert!(wait_for(Duration::from_secs(10), || {
        let v = node.task_view("s.1");
        v["status"]["state"] == "running" && v["status"]["pid"].as_u64() != Some(pid)
    }));
    assert!(wait_for(Duration::from_secs(5), || !std::path::Path::new(
        &format!("/proc/{pid}")
    )
    .exists()));
    assert_eq!(node.task_namespaces().len(), 2);
    assert!(pings(&node, "s.1", &node.task_ip("s.2")));

    // --stop-tasks: processes, namespaces (and with them the TAPs) are gone.
    let pid = node.task_view("s.1")["status"]["pid"]
        .as_u64()
        .expect("pid");
    node.extra_args.push("--stop-tasks".into());
    assert!(node.stop());
    node.start_again();
    node.wait_running("s", 2);
    assert!(node.stop());
    assert!(
        node.task_namespaces().is_empty(),
        "{:?}",
        node.task_namespaces()
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
