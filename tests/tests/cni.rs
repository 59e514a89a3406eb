//! The CNI plugin driven exactly as a runtime drives it: `overlay-cni` run with the CNI
//! environment variables and the network configuration on stdin, for network namespaces the
//! test makes (the "containers"), on a two-node cluster. One cluster for every check, about
//! half a minute. Needs root.
//!
//! Checked: VERSION; ADD's result (CNI 1.0 shape) and the interface it made; the container
//! talks to a task on the other node both ways, reaches a service VIP balanced over both
//! replicas and resolves service names at 127.0.0.11; `network inspect` lists it and the
//! network cannot be removed under it; CHECK; overlayd restarting re-makes the interface; a
//! container whose namespace vanished without DEL is cleaned up; DEL (twice); and the
//! spec's errors for a bad version, bad input, missing variables and an unknown network.

use overlay_e2e::{
    bin, require_root, script_dir, unique, wait_for, write_script, Netns, Node, Underlay,
    HTTP_ASK_PY, WHOAMI_PY,
};
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs the plugin like a runtime: `env` and the configuration on stdin.
fn cni(env: &[(&str, &str)], conf: &str) -> (Output, Value) {
    let mut cmd = Command::new(bin("overlay-cni"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_PATH", "/opt/cni/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run overlay-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.as_bytes())
        .expect("write the configuration");
    let out = child.wait_with_output().expect("overlay-cni");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, v)
}

fn conf(version: &str, network: &str, socket: &std::path::Path) -> String {
    serde_json::json!({
        "cniVersion": version, "name": network, "type": "overlay-cni",
        "socket": socket.display().to_string(),
    })
    .to_string()
}

fn env<'a>(cmd: &'a str, id: &'a str, ns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", ns),
        ("CNI_IFNAME", "eth0"),
    ]
}

fn in_ns(ns: &Netns, args: &[&str]) -> Output {
    let (program, rest) = args.split_first().expect("a command");
    ns.cmd(program)
        .args(rest)
        .output()
        .expect("run in namespace")
}

fn pings(ns: &Netns, ip: &str) -> bool {
    (0..3).any(|_| {
        in_ns(ns, &["ping", "-c", "1", "-W", "1", ip])
            .status
            .success()
    })
}

fn listed(n: &Node, network: &str, container: &str) -> bool {
    n.json(&["network", "inspect", network])[0]["Containers"]
        .as_object()
        .is_some_and(|c| c.contains_key(&format!("{container}/eth0")))
}

const ASK_TWICE: &str = r#"
import socket, sys
seen = set()
for _ in range(6):
    s = socket.create_connection((sys.argv[1], 8000), timeout=5)
    seen.add(ask(s))
    s.close()
print(" ".join(sorted(seen)))
"#;

#[test]
fn cni_plugin_puts_containers_on_the_overlay() {
    if !require_root("cni_plugin_puts_containers_on_the_overlay") {
        return;
    }
    let tag = unique("cn");
    let dir = script_dir(&tag);
    let whoami = write_script(&dir, "whoami.py", WHOAMI_PY);
    let client = write_script(&dir, "client.py", &[HTTP_ASK_PY, ASK_TWICE].concat());

    let u = Underlay::new(&tag, 2, 11);
    let (mut n1, n2) = Node::pair(&tag, &u);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.61.0/24", "appnet"]);
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "web", "--network", "appnet", "--replicas", "2",
        "--", "python3", &whoami]);
    n1.wait_running("web", 2);
    let remote_task = if n1.node_of("web.1") == n2.name {
        "web.1"
    } else {
        "web.2"
    };
    let remote_ip = n1.task_ip(remote_task);

    // VERSION needs nothing else.
    let (out, v) = cni(&[("CNI_COMMAND", "VERSION")], "");
    assert!(out.status.success(), "{v}");
    assert!(v["supportedVersions"]
        .as_array()
        .is_some_and(|a| a.contains(&"1.0.0".into())));

    // ADD for a container on node 1.
    let c1 = Netns::new(&format!("{tag}-c1"));
    let ns1 = c1.path().display().to_string();
    let conf1 = conf("1.0.0", "appnet", &n1.socket);
    let (out, r) = cni(&env("ADD", "c1", &ns1), &conf1);
    assert!(
        out.status.success(),
        "ADD: {r} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["cniVersion"], "1.0.0");
    assert_eq!(r["interfaces"][0]["name"], "eth0");
    assert_eq!(r["interfaces"][0]["sandbox"], ns1.as_str());
    let addr = r["ips"][0]["address"]
        .as_str()
        .expect("address")
        .to_string();
    assert!(addr.starts_with("10.0.61.") && addr.ends_with("/24"), "{r}");
    assert!(
        r["ips"][0].get("version").is_none(),
        "1.0 results carry no version: {r}"
    );
    assert_eq!(r["ips"][0]["gateway"], "10.0.61.1");
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(r["dns"]["nameservers"][0], "127.0.0.11");
    let ip = addr.trim_end_matches("/24").to_string();
    let mac = r["interfaces"][0]["mac"].as_str().unwrap_or("").to_string();
    assert!(mac.starts_with("02:42:0a:00:3d:"), "{r}");
    // The interface the runtime sees: the address, the MAC and the MTU of the network.
    let link = String::from_utf8_lossy(&in_ns(&c1, &["ip", "-o", "addr", "show", "eth0"]).stdout)
        .to_string();
    assert!(link.contains(&addr), "{link}");
    let show =
        String::from_utf8_lossy(&in_ns(&c1, &["ip", "link", "show", "eth0"]).stdout).to_string();
    assert!(show.contains("mtu 1450") && show.contains(&mac), "{show}");

    // Both ways across nodes, the VIP (both replicas), and names.
    assert!(
        pings(&c1, &remote_ip),
        "container -> task on the other node"
    );
    assert!(
        overlay_e2e::pings(&n1, remote_task, &ip),
        "task on the other node -> container"
    );
    let vip = n1.vip_of("web");
    let seen = String::from_utf8_lossy(&in_ns(&c1, &["python3", &client, &vip]).stdout)
        .trim()
        .to_string();
    assert_eq!(seen, "web.1 web.2", "through the VIP from the container");
    let dig = in_ns(&c1, &["dig", "+short", "+time=2", "@127.0.0.11", "web"]);
    assert_eq!(
        String::from_utf8_lossy(&dig.stdout).trim(),
        vip,
        "web at 127.0.0.11"
    );
    let dig = in_ns(
        &c1,
        &["dig", "+short", "+time=2", "@127.0.0.11", "tasks.web"],
    );
    assert_eq!(String::from_utf8_lossy(&dig.stdout).lines().count(), 2);

    // The cluster knows it, from either node; its network cannot go under it.
    assert!(listed(&n2, "appnet", "c1"));
    n1.ctl_ok(&["service", "rm", "web"]);
    let err = n1.ctl_err(&["network", "rm", "appnet"]);
    assert!(err.contains("in use by container(s) c1"), "{err}");
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "web", "--network", "appnet", "--replicas", "2",
        "--", "python3", &whoami]);
    n1.wait_running("web", 2);
    let remote_task = if n1.node_of("web.1") == n2.name {
        "web.1"
    } else {
        "web.2"
    };
    let remote_ip = n1.task_ip(remote_task);

    // CHECK agrees; for a container it does not know it answers code 3.
    let (out, v) = cni(&env("CHECK", "c1", &ns1), &conf1);
    assert!(out.status.success(), "CHECK: {v}");
    let (out, v) = cni(&env("CHECK", "nobody", &ns1), &conf1);
    assert!(!out.status.success());
    assert_eq!(v["code"], 3, "{v}");

    // overlayd restarts: the container's interface is made again, same address.
    n1.restart();
    assert!(
        wait_for(Duration::from_secs(20), || pings(&c1, &remote_ip)),
        "container reachable again after a restart"
    );
    let link = String::from_utf8_lossy(&in_ns(&c1, &["ip", "-o", "addr", "show", "eth0"]).stdout)
        .to_string();
    assert!(link.contains(&addr), "{link}");

    // A container that vanished without a DEL is cleaned up everywhere. Node 2 asks its
    // manager, which just restarted: until they are back in touch the plugin answers code
    // 11 (try again later), and the test retries as a runtime would.
    let c2 = Netns::new(&format!("{tag}-c2"));
    let ns2 = c2.path().display().to_string();
    let conf2 = conf("0.4.0", "appnet", &n2.socket);
    let mut add = cni(&env("ADD", "c2", &ns2), &conf2);
    for _ in 0..40 {
        if add.1["code"] != 11 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        add = cni(&env("ADD", "c2", &ns2), &conf2);
    }
    let (out, v) = add;
    assert!(out.status.success(), "ADD on node 2: {v}");
    assert_eq!(
        v["ips"][0]["version"], "4",
        "0.4.0 results name the IP version"
    );
    let c2_ip = v["ips"][0]["address"]
        .as_str()
        .unwrap_or("")
        .trim_end_matches("/24")
        .to_string();
    assert!(pings(&c1, &c2_ip), "container to container across nodes");
    drop(c2);
    assert!(
        wait_for(Duration::from_secs(15), || !listed(&n1, "appnet", "c2")),
        "a vanished container's endpoint is removed"
    );

    // DEL removes it everywhere and takes the interface away; a second DEL is fine.
    let (out, v) = cni(&env("DEL", "c1", &ns1), &conf1);
    assert!(out.status.success(), "DEL: {v}");
    assert!(
        !listed(&n2, "appnet", "c1")
            || wait_for(Duration::from_secs(5), || !listed(&n2, "appnet", "c1"))
    );
    assert!(
        wait_for(Duration::from_secs(10), || !in_ns(
            &c1,
            &["ip", "link", "show", "eth0"]
        )
        .status
        .success()),
        "the interface went with DEL"
    );
    let (out, v) = cni(&env("DEL", "c1", &ns1), &conf1);
    assert!(out.status.success(), "a repeated DEL: {v}");

    // The spec's errors.
    let (out, v) = cni(
        &env("ADD", "c3", &ns1),
        &conf("9.9.9", "appnet", &n1.socket),
    );
    assert!(!out.status.success());
    assert_eq!(v["code"], 1, "{v}");
    let (_, v) = cni(&env("ADD", "c3", &ns1), "{not json");
    assert_eq!(v["code"], 6, "{v}");
    let (_, v) = cni(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", &ns1),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf1,
    );
    assert_eq!(v["code"], 4, "{v}");
    let (_, v) = cni(&env("ADD", "c3", &ns1), &conf("1.0.0", "nonet", &n1.socket));
    assert_eq!(v["code"], 7, "{v}");
    assert!(v["msg"].as_str().unwrap_or("").contains("nonet"), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
