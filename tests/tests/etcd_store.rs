//! The manager's desired state on a real etcd (`overlayd --store etcd`). etcd (Debian's
//! etcd-server, `/usr/bin/etcd`) runs in the test's host namespace on 198.18.14.1:2379, with
//! its data in the test's temporary directory; a guard kills it. Needs root.
//!
//! - a manager that ran on the file store moves to etcd: its state.json is imported, and its
//!   CA and join secrets (the join tokens do not change);
//! - a change writes one key per object; a restart reloads the same networks, services,
//!   VIPs and task addresses from etcd alone;
//! - the leader key names the manager and its control address;
//! - a second `--init` on the same prefix does not start while the first leads;
//! - fencing: with the leader key taken by someone else, the manager follows it: a change is
//!   refused naming the holder and nothing is written; once the key is free it leads again;
//! - etcd frozen (SIGSTOP): a change is refused within 5 s instead of hanging; one that
//!   etcd took late is overwritten by the manager's next write;
//! - etcd stopped: a change is refused within 5 s saying why, while tasks keep talking;
//!   etcd back: changes work again;
//! - a node joined with the worker token refuses `--store etcd`.

use overlay_e2e::etcd::{require_etcd, Etcd};
use overlay_e2e::{bin, out, pings, require_root, run, unique, wait_for, Node, Underlay};

use std::time::{Duration, Instant};

/// Every key under the cluster's state prefix.
fn state_keys(etcd: &Etcd) -> Vec<String> {
    etcd.ctl_ok(&["get", "--prefix", "--keys-only", "/overlay/state/"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The leader key's value: `{"node": NAME, "control": ADDR}`.
fn leader_key(etcd: &Etcd) -> serde_json::Value {
    let value = etcd.ctl_ok(&["get", "--print-value-only", "/overlay/leader"]);
    serde_json::from_str(value.trim()).unwrap_or_else(|e| panic!("{value:?}: {e}"))
}

/// What a restart must keep: networks, services with their VIPs, tasks with addresses.
fn view(n: &Node) -> (String, String, Vec<(String, String)>) {
    let nets = n.ctl_ok(&["network", "ls", "-q"]);
    let mut nets: Vec<&str> = nets.lines().collect();
    nets.sort();
    let vip = n.vip_of("web");
    let tasks = ["web.1", "web.2", "db.1"]
        .iter()
        .filter(|t| n.ctl(&["inspect", t]).status.success())
        .map(|t| (t.to_string(), n.task_ip(t)))
        .collect();
    (nets.join(","), vip, tasks)
}

#[test]
fn state_on_etcd() {
    if !require_root("state_on_etcd") {
        return;
    }
    if !require_etcd("state_on_etcd") {
        return;
    }
    let started = Instant::now();
    let tag = unique("et");
    let u = Underlay::new(&tag, 1, 14);
    let mut etcd = Etcd::single(&u.host(1).name, &u.addr(1), &tag);

    // A manager on the file store, with a network and a service.
    let mut n1 = Node::manager(&format!("{tag}a"), &u, 1);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.14.0/24", "front"]);
    n1.ctl_ok(&[
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
        "1000",
    ]);
    n1.wait_running("web", 2);
    let before = view(&n1);
    let tokens = |n: &Node| {
        ["worker", "manager"].map(|role| n.ctl_ok(&["cluster", "join-token", role, "-q"]))
    };
    let tokens_before = tokens(&n1);

    // Moved to etcd: state.json is imported, and renamed; the CA and the join secrets are
    // imported too, so the tokens stay what they were.
    let state_dir = n1.dir.join("state");
    n1.extra_args.extend(
        ["--store", "etcd", "--etcd-endpoints", &etcd.url]
            .iter()
            .map(|s| s.to_string()),
    );
    n1.restart();
    n1.wait_running("web", 2);
    assert_eq!(view(&n1), before, "the imported state");
    assert!(!state_dir.join("state.json").exists());
    assert!(state_dir.join("state.json.imported").exists());
    assert!(n1.log().contains("imported state.json into etcd"));
    assert!(n1
        .log()
        .contains("imported the CA and join secrets into etcd"));
    let secrets = etcd.ctl_ok(&["get", "--prefix", "--keys-only", "/overlay/secrets/"]);
    for name in ["ca.key", "ca.pem", "join-secret", "join-secret-manager"] {
        let key = format!("/overlay/secrets/{name}");
        assert!(secrets.lines().any(|l| l == key), "{key} in {secrets}");
    }
    assert_eq!(tokens(&n1), tokens_before, "the same join tokens");

    // A change on etcd: one key per object.
    n1.ctl_ok(&["network", "create", "back"]);
    n1.ctl_ok(&[
        "service",
        "create",
        "--name",
        "db",
        "--network",
        "back",
        "--",
        "sleep",
        "1000",
    ]);
    n1.wait_running("db", 1);
    let keys = state_keys(&etcd);
    for k in [
        "/overlay/state/meta",
        "/overlay/state/networks/front",
        "/overlay/state/networks/back",
        "/overlay/state/networks/ingress",
        "/overlay/state/services/web",
        "/overlay/state/services/db",
        "/overlay/state/tasks/web.1",
        "/overlay/state/tasks/web.2",
        "/overlay/state/tasks/db.1",
        &format!("/overlay/state/nodes/{}", n1.name),
        // The manager's own member certificate, for following another leader later.
        &format!("/overlay/state/certs/{}", n1.name),
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} in {keys:?}");
    }
    assert_eq!(keys.len(), 11, "one key per object: {keys:?}");
    assert_eq!(leader_key(&etcd)["node"], n1.name.as_str());
    assert_eq!(
        leader_key(&etcd)["control"],
        format!("{}:2377", u.addr(1)).as_str()
    );
    assert!(
        !state_dir.join("state.json").exists(),
        "nothing on the file"
    );

    // Restarted with no state file at all: the same state, from etcd.
    let before = view(&n1);
    let _ = std::fs::remove_file(state_dir.join("state.json.imported"));
    n1.restart();
    n1.wait_running("db", 1);
    n1.wait_running("web", 2);
    assert_eq!(view(&n1), before, "reloaded from etcd");

    // A second `--init` on the same prefix cannot lead while the first holds the key: it
    // waits for the key to be free (8 s at most), then refuses to start, naming the holder.
    let sdir = std::env::temp_dir().join(format!("overlay-e2e-{tag}b"));
    let t = Instant::now();
    let o = run(u
        .host(1)
        .cmd(&bin("overlayd").to_string_lossy())
        .args(["--node", &format!("{tag}b"), "--state-dir"])
        .arg(&sdir)
        .arg("--socket")
        .arg(sdir.join("api.sock"))
        .args(["--advertise-addr", &u.addr(1), "--init", "--store", "etcd"])
        .args(["--etcd-endpoints", &etcd.url]));
    let _ = std::fs::remove_dir_all(&sdir);
    let said = String::from_utf8_lossy(&o.stderr);
    eprintln!("second manager, after {:?}: {}", t.elapsed(), said.trim());
    assert!(!o.status.success());
    assert!(
        said.contains("another manager leads") && said.contains(&format!("held by {}", n1.name)),
        "{said}"
    );
    assert!(n1.ctl(&["network", "ls"]).status.success());

    // Fencing: someone else holds the leader key (put as earlier versions did, a bare name);
    // n1 steps down and follows, the change is refused, nothing written. n1 is frozen
    // meanwhile: it would take the key back as soon as it saw it deleted.
    let n1_pid = nix::unistd::Pid::from_raw(n1.pid().expect("n1 runs") as i32);
    nix::sys::signal::kill(n1_pid, nix::sys::signal::SIGSTOP).expect("SIGSTOP n1");
    etcd.ctl_ok(&["del", "/overlay/leader"]);
    etcd.ctl_ok(&["put", "/overlay/leader", "intruder"]);
    nix::sys::signal::kill(n1_pid, nix::sys::signal::SIGCONT).expect("SIGCONT n1");
    let err = n1.ctl_err(&["network", "create", "x"]);
    eprintln!("fenced: {err}");
    // The intruder serves no control endpoint: n1 cannot forward the change to it.
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(!state_keys(&etcd).iter().any(|k| k.ends_with("/networks/x")));
    assert!(!n1.ctl_ok(&["network", "ls", "-q"]).contains('x'));
    etcd.ctl_ok(&["del", "/overlay/leader"]);
    let mut last = String::new();
    let led = wait_for(Duration::from_secs(10), || {
        let o = n1.ctl(&["network", "create", "x"]);
        last = out(&o);
        o.status.success()
    });
    assert!(led, "the manager leads again once the key is free: {last}");
    assert_eq!(leader_key(&etcd)["node"], n1.name.as_str());

    // etcd frozen (it takes the request and never answers): refused within 5 s, not hung.
    let peer = n1.task_ip("web.2");
    assert!(pings(&n1, "web.1", &peer));
    let pid = nix::unistd::Pid::from_raw(etcd.child.as_ref().expect("etcd").id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGSTOP).expect("SIGSTOP etcd");
    let t = Instant::now();
    let err = n1.ctl_err(&["network", "create", "frozen"]);
    let took = t.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT).expect("SIGCONT etcd");
    eprintln!("etcd frozen: refused after {took:?}: {err}");
    assert!(
        took < Duration::from_secs(5),
        "refused after {took:?}: {err}"
    );
    assert!(err.contains("is unavailable"), "{err}");
    // The unanswered write may have landed late; the manager's next write is its own view.
    let thawed = wait_for(Duration::from_secs(10), || {
        let o = n1.ctl(&["network", "create", "thawed"]);
        last = out(&o);
        o.status.success()
    });
    assert!(thawed, "a change once etcd answers again: {last}");
    let keys = state_keys(&etcd);
    assert!(
        !keys.iter().any(|k| k.ends_with("/networks/frozen")),
        "{keys:?}"
    );
    assert!(keys.iter().any(|k| k.ends_with("/networks/thawed")));

    // etcd stopped: a change is refused within 5 s, saying why; tasks keep talking.
    etcd.stop();
    let t = Instant::now();
    let err = n1.ctl_err(&["network", "create", "y"]);
    let took = t.elapsed();
    eprintln!("etcd stopped: refused after {took:?}: {err}");
    assert!(
        took < Duration::from_secs(5),
        "refused after {took:?}: {err}"
    );
    assert!(
        err.contains(&format!(
            "the state store (etcd at {}) is unavailable",
            etcd.url
        )),
        "{err}"
    );
    assert!(
        pings(&n1, "web.1", &peer),
        "forwarding goes on without etcd"
    );
    assert!(!n1.ctl_ok(&["network", "ls", "-q"]).contains('y'));

    // etcd back: changes work again.
    etcd.launch();
    let back = wait_for(Duration::from_secs(15), || {
        let o = n1.ctl(&["network", "create", "y"]);
        last = out(&o);
        o.status.success()
    });
    assert!(back, "a change once etcd is back: {last}");
    assert!(state_keys(&etcd).iter().any(|k| k.ends_with("/networks/y")));

    // A node that joins with the worker token cannot run as a manager on etcd: its
    // certificate says worker. (Beside n1 in its namespace: other ports.)
    let wdir = std::env::temp_dir().join(format!("overlay-e2e-{tag}w"));
    let token = n1.ctl_ok(&["cluster", "join-token", "worker", "-q"]);
    let o = run(u
        .host(1)
        .cmd(&bin("overlayd").to_string_lossy())
        .args(["--node", &format!("{tag}w"), "--state-dir"])
        .arg(&wdir)
        .arg("--socket")
        .arg(wdir.join("api.sock"))
        .args(["--advertise-addr", &u.addr(1), "--data-path-port", "4790"])
        .args(["--listen-addr", &format!("{}:2378", u.addr(1))])
        .args(["--join", &u.addr(1), "--token", token.trim()])
        .args(["--store", "etcd", "--etcd-endpoints", &etcd.url]));
    let _ = std::fs::remove_dir_all(&wdir);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        said.contains("certificate is a worker's: --store etcd is for managers"),
        "{said}"
    );

    n1.stop();
    eprintln!("state_on_etcd took {:?}", started.elapsed());
}
