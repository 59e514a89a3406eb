//! Real Docker containers on the overlay, through overlayd's Docker network and IPAM plugin:
//! two nodes on one machine, each with its own dockerd (Debian's docker.io, vfs storage, no
//! iptables rules of its own, no bridge) running in the node's network namespace and in a
//! private mount namespace whose /run/docker/plugins is that node's plugin directory. The
//! image is busybox, imported from Debian's busybox-static. One cluster for every check.
//! Needs root and dockerd.
//!
//! Checked: `docker network create -d overlayd --ipam-driver overlayd` on one host makes the
//! cluster network (with its --subnet), on the other attaches to it; containers on both hosts
//! get addresses from the cluster, ping and fetch HTTP from each other, reach a task on the
//! other node and a service VIP balanced over both replicas, and resolve the cluster's names
//! with `--dns GATEWAY`; `network inspect` lists them; a task reaches a container; overlayd
//! restarting keeps a running container connected; `docker network disconnect` and
//! `docker rm` remove its endpoint everywhere; `docker network rm` on the last host releases the cluster network once no
//! endpoint remains; the plugin refuses a malformed call in Docker's error shape.

use overlay_e2e::dockerd::{DockerPair, Dockerd};
use overlay_e2e::{require_root, unique, wait_for, write_script, Node, WHOAMI_PY};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

fn plugin_call(sock: &Path, call: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("plugin socket");
    let req = format!(
        "POST /{call} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn listed(n: &Node, network: &str) -> usize {
    n.json(&["network", "inspect", network])[0]["Containers"]
        .as_object()
        .map_or(0, |c| c.keys().filter(|k| k.ends_with("/eth0")).count())
}

#[test]
fn docker_containers_join_cluster_networks() {
    if !require_root("docker_containers_join_cluster_networks") {
        return;
    }
    let tag = unique("dk");
    // `_u` keeps the underlay (its namespaces) until the end.
    let DockerPair {
        work,
        rootfs,
        plugins,
        u: _u,
        n1,
        mut n2,
        d1,
        d2,
    } = DockerPair::start(&tag, "docker", 12);
    let whoami = write_script(&work, "whoami.py", WHOAMI_PY);
    d1.import_busybox(&rootfs, "bb:latest");
    d2.import_busybox(&rootfs, "bb:latest");

    // The plugin answers Docker's calls, and a malformed one in Docker's error shape.
    let (status, v) = plugin_call(&plugins[0].join("overlayd.sock"), "Plugin.Activate", "");
    assert_eq!(status, 200);
    assert_eq!(
        v["Implements"],
        serde_json::json!(["NetworkDriver", "IpamDriver"])
    );
    let (status, v) = plugin_call(
        &plugins[0].join("overlayd.sock"),
        "NetworkDriver.Join",
        "{}",
    );
    assert_eq!(status, 500);
    assert!(
        v["Err"].as_str().unwrap_or("").contains("NetworkID")
            || v["Err"].as_str().unwrap_or("").contains("EndpointID"),
        "{v}"
    );

    // Host 1 makes the network (its subnet becomes the cluster network's), host 2 attaches.
    let create = [
        "network",
        "create",
        "-d",
        "overlayd",
        "--ipam-driver",
        "overlayd",
    ];
    d1.ok(&[&create[..], &["--subnet", "10.0.63.0/24", "appnet"]].concat());
    assert!(
        wait_for(Duration::from_secs(10), || n2
            .ctl_ok(&["network", "ls"])
            .contains("10.0.63.0/24")),
        "the cluster network appnet is made from host 1's docker network"
    );
    d2.ok(&[&create[..], &["appnet"]].concat());
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "web", "--network", "appnet", "--replicas", "2",
        "--", "python3", &whoami]);
    n1.wait_running("web", 2);

    let serve = "echo $(hostname) > /index.html && exec httpd -f -p 80 -h /";
    let run_on = |d: &Dockerd, name: &str| {
        d.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            "appnet",
            "--dns",
            "10.0.63.1",
            "bb",
            "sh",
            "-c",
            serve,
        ])
    };
    run_on(&d1, "ca");
    run_on(&d2, "cb");
    let (a, b) = (d1.ip_of("ca"), d2.ip_of("cb"));
    assert!(
        a.starts_with("10.0.63.") && b.starts_with("10.0.63.") && a != b,
        "{a} {b}"
    );
    assert!(wait_for(Duration::from_secs(10), || listed(&n1, "appnet") == 2));
    let link = d1.ok(&["exec", "ca", "ip", "link", "show", "eth0"]);
    assert!(
        link.contains("mtu 1450") && link.contains("02:42:0a:00:3f:"),
        "{link}"
    );

    // Across hosts both ways, HTTP, a task on the other node, the VIP and names.
    assert!(d1
        .docker(&["exec", "ca", "ping", "-c", "1", "-W", "2", &b])
        .status
        .success());
    assert_eq!(d1.fetch("ca", &format!("http://{b}/")), "cb");
    assert_eq!(d2.fetch("cb", &format!("http://{a}/")), "ca");
    let task_on_2 = if n1.node_of("web.1") == n2.name {
        "web.1"
    } else {
        "web.2"
    };
    let task_ip = n1.task_ip(task_on_2);
    assert!(d1
        .docker(&["exec", "ca", "ping", "-c", "1", "-W", "2", &task_ip])
        .status
        .success());
    assert!(
        overlay_e2e::pings(&n1, task_on_2, &a),
        "a task reaches a container"
    );
    let vip = n1.vip_of("web");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        seen.insert(d1.fetch("ca", &format!("http://{vip}:8000/")));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["web.1", "web.2"],
        "VIP from a container"
    );
    let ns = d1.ok(&["exec", "ca", "nslookup", "web"]);
    assert!(ns.contains(&vip), "web through --dns GATEWAY: {ns}");
    let ns = d1.ok(&["exec", "ca", "nslookup", "tasks.web"]);
    assert_eq!(ns.matches("Address: 10.0.63.").count(), 2, "{ns}");

    // overlayd on host 2 restarts: its container keeps (gets back) its interface.
    n2.restart();
    assert!(
        wait_for(Duration::from_secs(20), || d1
            .docker(&["exec", "ca", "ping", "-c", "1", "-W", "1", &b])
            .status
            .success()),
        "b reachable after its overlayd restarted"
    );

    // -o options reach the cluster network: an encrypted one, MTU 1400, ESP between hosts.
    d1.ok(&[
        &create[..],
        &["--subnet", "10.0.64.0/24", "-o", "encrypted", "secnet"],
    ]
    .concat());
    assert!(wait_for(Duration::from_secs(10), || n2
        .ctl_ok(&["network", "ls"])
        .contains("10.0.64.0/24")));
    // A --subnet that disagrees with the cluster network is refused at `docker run`, with
    // what to do.
    d2.ok(&[&create[..], &["--subnet", "10.0.65.0/24", "secnet"]].concat());
    let o = d2.docker(&[
        "run",
        "-d",
        "--name",
        "wrong",
        "--network",
        "secnet",
        "bb",
        "true",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && err.contains("cluster network secnet is 10.0.64.0/24"),
        "{err}"
    );
    let _ = d2.docker(&["rm", "-f", "wrong"]);
    d2.ok(&["network", "rm", "secnet"]);
    d2.ok(&[&create[..], &["secnet"]].concat());
    for (d, name) in [(&d1, "sa"), (&d2, "sb")] {
        d.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "secnet",
            "bb",
            "sleep",
            "600",
        ]);
    }
    let link = d1.ok(&["exec", "sa", "ip", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    let sb = d2.ip_of("sb");
    assert!(d1
        .docker(&["exec", "sa", "ping", "-c", "1", "-W", "2", &sb])
        .status
        .success());
    let sealed = n1.json(&["stats"])["drops"]["esp_cleartext"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(sealed, 0, "nothing in the clear on the encrypted network");
    assert_eq!(
        n1.json(&["network", "inspect", "secnet"])[0]["Options"]["encrypted"],
        ""
    );
    d1.ok(&["rm", "-f", "sa"]);
    d2.ok(&["rm", "-f", "sb"]);
    // Host 2 is a worker's: only the manager's host may release a cluster network, so it
    // goes first.
    d2.ok(&["network", "rm", "secnet"]);
    d1.ok(&["network", "rm", "secnet"]);

    // Removal: the endpoint goes everywhere; the network outlives one host's docker network
    // while another host's remains, and goes with the last (on the manager's host: a
    // worker's may not remove cluster networks).
    d1.ok(&["network", "disconnect", "appnet", "ca"]);
    assert!(wait_for(Duration::from_secs(10), || listed(&n2, "appnet") == 1));
    d2.ok(&["rm", "-f", "cb"]);
    d2.ok(&["network", "rm", "appnet"]);
    assert!(
        n1.ctl_ok(&["network", "ls"]).contains("appnet"),
        "host 1 still has it"
    );
    n1.ctl_ok(&["service", "rm", "web"]);
    d1.ok(&["rm", "-f", "ca"]);
    assert!(wait_for(Duration::from_secs(10), || listed(&n1, "appnet") == 0));
    d1.ok(&["network", "rm", "appnet"]);
    assert!(
        wait_for(Duration::from_secs(10), || !n1
            .ctl_ok(&["network", "ls"])
            .contains("appnet")),
        "the last docker network rm releases the cluster network"
    );
    drop((d1, d2));
    let _ = std::fs::remove_dir_all(&work);
}
