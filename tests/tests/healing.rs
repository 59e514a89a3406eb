//! A cluster that heals itself: a worker cut off from the underlay has its tasks replaced on
//! the surviving nodes once it has been down for `--reschedule-after`, with new addresses,
//! while the service's names keep resolving everywhere else; when its link returns it stops
//! the tasks it no longer owns, so no address answers twice and DNS converges. Needs root.
//!
//! The cut lasts 30 s, as the issue's scenario.

use overlay_e2e::{
    pings, require_root, script_dir, unique, wait_for, write_script, Node, Underlay,
};
use std::collections::BTreeSet;
use std::io::Read;
use std::time::{Duration, Instant};

/// How long the victim is cut off.
const CUT: Duration = Duration::from_secs(30);

/// Resolves `web` and `tasks.web` every 100 ms for N seconds from inside a task (through
/// the embedded resolver at 127.0.0.11); prints how many lookups failed.
const RESOLVE_LOOP: &str = r#"
import socket, sys, time
end = time.time() + float(sys.argv[1])
failed = 0
while time.time() < end:
    for name in ("web", "tasks.web"):
        try:
            socket.gethostbyname(name)
        except OSError:
            failed += 1
    time.sleep(0.1)
print(failed, flush=True)
"#;

/// The addresses `tasks.web` resolves to, seen from `task` on `node`.
fn task_addresses(node: &Node, task: &str) -> BTreeSet<String> {
    let out = node.exec(task, &["getent", "ahostsv4", "tasks.web"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The current tasks of `web`: (name, node, address, state).
fn web_tasks(n: &Node) -> Vec<(String, String, String, String)> {
    let v = n.json(&["inspect", "web.1", "web.2", "web.3"]);
    v.as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&t["name"]),
                s(&t["node"]),
                s(&t["attachments"][0]["address"]),
                s(&t["status"]["state"]),
            )
        })
        .collect()
}

#[test]
fn lost_worker_is_replaced_and_stands_down_on_return() {
    if !require_root("lost_worker_is_replaced_and_stands_down_on_return") {
        return;
    }
    const GRACE_S: u64 = 3;
    let tag = unique("hl");
    let dir = script_dir(&tag);
    let resolve = write_script(&dir, "resolve.py", RESOLVE_LOOP);
    let u = Underlay::new(&tag, 3, 14);
    let grace = format!("{GRACE_S}s");
    let n1 = Node::manager_with(&format!("{tag}a"), &u, 1, &["--reschedule-after", &grace]);
    let n2 = Node::worker(&format!("{tag}b"), &u, 2, &n1);
    let n3 = Node::worker(&format!("{tag}c"), &u, 3, &n1);
    n1.wait_ready(&[&n2, &n3]);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.71.0/24", "app"]);
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "client", "--network", "app", "--", "sleep", "infinity"]);
    n1.wait_running("client", 1);
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "web", "--network", "app", "--replicas", "3", "--", "sleep", "infinity"]);
    n1.wait_running("web", 3);
    let client_node = n1.node_of("client.1");
    // The victim: a worker that does not run the client.
    let (victim, victim_host) = if client_node == n3.name {
        (&n2, 2)
    } else {
        (&n3, 3)
    };
    let before = web_tasks(&n1);
    let nodes: BTreeSet<&String> = before.iter().map(|t| &t.1).collect();
    assert_eq!(nodes.len(), 3, "one replica per node: {before:?}");
    let (lost, _, lost_ip, _) = before
        .iter()
        .find(|t| t.1 == victim.name)
        .cloned()
        .expect("a replica on the victim");

    // Names keep resolving on the surviving nodes for the whole outage and after it.
    let mut resolver = n1
        .ctl_cmd(&["exec", "client.1", "--", "python3", &resolve, "45"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("resolver loop");

    // Cut the victim off the underlay.
    u.host(victim_host).ip(&["link", "set", "u0", "down"]);
    let cut = Instant::now();
    let moved = wait_for(Duration::from_secs(20), || {
        web_tasks(&n1)
            .iter()
            .any(|t| t.0 == lost && t.1 != victim.name && t.3 == "running")
    });
    let took = cut.elapsed();
    assert!(
        moved,
        "{lost} not replaced:\n{}",
        n1.ctl_ok(&["service", "ps", "web"])
    );
    // Down after 3 s of silence, replaced after the grace, running a moment later.
    assert!(
        took <= Duration::from_secs(3 + GRACE_S + 5),
        "replaced after {took:?}"
    );
    let after = web_tasks(&n1);
    let (_, new_node, new_ip, _) = after.iter().find(|t| t.0 == lost).cloned().expect("slot");
    assert_ne!(new_node, victim.name);
    assert_ne!(new_ip, lost_ip, "the lost task's address stays reserved");
    let ps = n1.ctl_ok(&["service", "ps", "web"]);
    assert!(
        ps.contains(&format!("\\_ {lost}")) && ps.contains(&format!("node {} down", victim.name)),
        "{ps}"
    );
    // The survivors' view: three addresses, the new one among them, the lost one not.
    assert!(
        wait_for(Duration::from_secs(5), || {
            let a = task_addresses(&n1, "client.1");
            a.len() == 3 && a.contains(&new_ip) && !a.contains(&lost_ip)
        }),
        "{:?}",
        task_addresses(&n1, "client.1")
    );

    // The link returns after 30 s: the victim stops the task it no longer owns.
    let rest = CUT.saturating_sub(cut.elapsed());
    std::thread::sleep(rest);
    u.host(victim_host).ip(&["link", "set", "u0", "up"]);
    n1.wait_ready(&[victim]);
    assert!(
        wait_for(Duration::from_secs(10), || !victim
            .task_namespaces()
            .iter()
            .any(|n| n.ends_with(&format!("-{lost}")))),
        "{} still runs its superseded {lost}: {:?}",
        victim.name,
        victim.task_namespaces()
    );
    // No address answers twice, and names converge within 5 s: three tasks, three distinct
    // addresses, each the one its task holds now.
    let back = Instant::now();
    let want: BTreeSet<String> = web_tasks(&n1).into_iter().map(|t| t.2).collect();
    assert_eq!(want.len(), 3);
    assert!(
        wait_for(Duration::from_secs(5), || task_addresses(&n1, "client.1")
            == want),
        "{:?} != {want:?}",
        task_addresses(&n1, "client.1")
    );
    assert!(back.elapsed() < Duration::from_secs(5));
    assert!(!pings(&n1, "client.1", &lost_ip), "{lost_ip} still answers");
    assert!(pings(&n1, "client.1", &new_ip), "{new_ip} does not answer");
    // Once the victim has confirmed the stop, the old task is history only: the same slot
    // is not duplicated.
    let ps = n1.ctl_ok(&["service", "ps", "web"]);
    assert_eq!(
        ps.lines()
            .filter(|l| l.contains(&lost) && l.contains("Running"))
            .count(),
        1,
        "{ps}"
    );

    let mut failed = String::new();
    resolver
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut failed)
        .expect("resolver output");
    let _ = resolver.wait();
    assert_eq!(
        failed.trim(),
        "0",
        "lookups of web/tasks.web failed during the outage"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
