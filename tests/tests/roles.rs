//! Node roles and lifecycle, as Swarm's: only managers change the cluster; a join token per
//! role, and rotation; `node promote|demote|rm`; node certificates that expire and renew
//! themselves over the session while traffic flows. Needs root.

use overlay_e2e::{join_fails, require_root, unique, wait_for, Node, Underlay};
use std::process::Stdio;
use std::time::Duration;

fn inspect(on: &Node, node: &str) -> serde_json::Value {
    on.json(&["node", "inspect", node])[0].clone()
}

fn cert_serial(on: &Node, node: &str) -> String {
    inspect(on, node)["Certificate"]["Serial"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn roles_tokens_removal_and_renewal() {
    if !require_root("roles_tokens_removal_and_renewal") {
        return;
    }
    let tag = unique("ro");
    let u = Underlay::new(&tag, 3, 14);
    // Certificates last 30 s: workers renew theirs 16 to 26 s after they got them.
    let m = Node::manager_with(&format!("{tag}a"), &u, 1, &["--cert-expiry", "30s"]);
    let w = Node::worker(&format!("{tag}b"), &u, 2, &m);
    m.wait_ready(&[&w]);
    let w_cert = w.dir.join("state").join("node.pem");
    let first_cert = std::fs::read_to_string(&w_cert).expect("worker certificate");
    let first_serial = cert_serial(&m, &w.name);
    assert!(!first_serial.is_empty());

    // A worker cannot change the cluster: it says where changes are made. Reads still work.
    let err = w.ctl_err(&["network", "create", "nope"]);
    let on_manager = format!(
        "this node is a worker: changes are made on a manager ({} at {}:2377)",
        m.name,
        u.addr(1)
    );
    assert!(err.contains(&on_manager), "{err}");
    assert!(w.ctl_ok(&["node", "ls"]).contains(&m.name));

    // Traffic between tasks on the two nodes, for the renewal below.
    m.ctl_ok(&["network", "create", "--subnet", "10.0.74.0/24", "app"]);
    #[rustfmt::skip]
    m.ctl_ok(&["service", "create", "--name", "p", "--network", "app", "--replicas", "2",
        "--", "sleep", "infinity"]);
    m.wait_running("p", 2);
    let (on_m, on_w) = if m.node_of("p.1") == m.name {
        ("p.1", "p.2")
    } else {
        ("p.2", "p.1")
    };
    assert_eq!(m.node_of(on_w), w.name, "one task per node");
    let w_ip = m.task_ip(on_w);
    let ping = m
        .ctl_cmd(&[
            "exec", on_m, "--", "ping", "-i", "0.2", "-c", "175", "-W", "1", &w_ip,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ping");

    // node inspect: Docker's shape, with the certificate's role and expiry.
    let v = inspect(&m, &w.name);
    assert_eq!(v["Spec"]["Role"], "worker", "{v}");
    assert_eq!(v["Spec"]["Availability"], "active", "{v}");
    assert_eq!(v["Status"]["State"], "ready", "{v}");
    assert_eq!(v["Status"]["Addr"], u.addr(2), "{v}");
    assert_eq!(v["Certificate"]["Role"], "worker", "{v}");
    assert!(v["Certificate"]["NotAfter"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z') && t.contains('T')));
    assert!(v.get("ManagerStatus").is_none(), "{v}");
    let v = inspect(&m, &m.name);
    assert_eq!(v["ManagerStatus"]["Leader"], true, "{v}");
    assert_eq!(v["ManagerStatus"]["Addr"], format!("{}:2377", u.addr(1)));

    // Two tokens; rotating the worker's refuses the old one for new joins.
    let old = m
        .ctl_ok(&["cluster", "join-token", "-q"])
        .trim()
        .to_string();
    assert_eq!(
        old,
        m.ctl_ok(&["cluster", "join-token", "worker", "-q"]).trim()
    );
    let manager_token = m
        .ctl_ok(&["cluster", "join-token", "manager", "-q"])
        .trim()
        .to_string();
    assert_ne!(old, manager_token);
    let rotated = m
        .ctl_ok(&["cluster", "join-token", "worker", "--rotate", "-q"])
        .trim()
        .to_string();
    assert_ne!(rotated, old);
    let err = join_fails(&u, 3, &format!("{tag}x"), &u.addr(1), &old);
    assert!(err.contains("invalid join token"), "{err}");

    // The manager token joins a manager: its changes (forwarded) are accepted.
    let c = Node::start_in(
        &format!("{tag}c"),
        Some(u.host(3).path()),
        &[
            "--advertise-addr",
            &u.addr(3),
            "--join",
            &u.addr(1),
            "--token",
            &manager_token,
        ],
    );
    m.wait_ready(&[&c]);
    let v = inspect(&m, &c.name);
    assert_eq!(v["Spec"]["Role"], "manager", "{v}");
    assert_eq!(v["Certificate"]["Role"], "manager", "{v}");
    assert_eq!(v["ManagerStatus"]["Leader"], false, "{v}");
    c.ctl_ok(&["network", "create", "fromc"]);
    assert!(m.ctl_ok(&["network", "ls"]).contains("fromc"));

    // Demoted, it may no longer, and renews its certificate as a worker's.
    m.ctl_ok(&["node", "demote", &c.name]);
    assert!(wait_for(Duration::from_secs(5), || c
        .ctl_err(&["network", "rm", "fromc"])
        .contains("this node is a worker")));
    assert!(
        wait_for(Duration::from_secs(10), || inspect(&m, &c.name)
            ["Certificate"]["Role"]
            == "worker"),
        "{}",
        c.log()
    );
    let err = m.ctl_err(&["node", "demote", &m.name]);
    assert!(err.contains("is the last manager"), "{err}");

    // node rm: refused while the node is up; forced, its certificate is refused from then
    // on, and it is gone from the list.
    let err = m.ctl_err(&["node", "rm", &c.name]);
    assert!(err.contains("is not down and can't be removed"), "{err}");
    m.ctl_ok(&["node", "rm", "--force", &c.name]);
    assert!(!m.ctl_ok(&["node", "ls"]).contains(&c.name));
    assert!(
        wait_for(Duration::from_secs(10), || c
            .log()
            .contains("not a member of this cluster")),
        "the removed node got back in:\n{}",
        c.log()
    );
    assert!(!c.json(&["info"])["manager_reachable"]
        .as_bool()
        .unwrap_or(true));
    assert!(!m.ctl_ok(&["node", "ls"]).contains(&c.name));
    drop(c);

    // Meanwhile the old worker is unaffected by the rotation, and renews its certificate
    // over its session (a new serial in the manager's records) while the ping flows.
    assert!(
        wait_for(Duration::from_secs(40), || std::fs::read_to_string(&w_cert)
            .is_ok_and(|c| c != first_cert)),
        "the worker's certificate was not renewed:\n{}",
        w.log()
    );
    assert!(w.log().contains("renewed this node's certificate"));
    assert_ne!(cert_serial(&m, &w.name), first_serial);
    let out = ping.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let received: u32 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(received >= 170, "the ping stalled: {text}");
    assert!(
        !w.log().contains("control session down"),
        "the worker's session dropped:\n{}",
        w.log()
    );
    assert_eq!(m.node_state(&w.name), "ready");
    drop(w);
    drop(m);
}
