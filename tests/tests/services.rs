//! Swarm's service scenario on three nodes, with real clients inside a client task: curl,
//! dig, nslookup, getent and ping, against service VIPs load-balanced in overlayd's datapath
//! and the embedded resolver at 127.0.0.11. One cluster serves every check, in order. Needs
//! root.
//!
//! - `whoami` (3 replicas, one per node): 6 requests to whoami:8000 are answered by each
//!   replica twice, in turn; nslookup names server 127.0.0.11 and gives the VIP; tasks.whoami
//!   gives the task addresses; PTR names the task; ping answers from the VIP;
//! - a dnsrr service resolves to its tasks; a UDP echo service answers through its VIP;
//!   iperf3 through a VIP runs at the order of the direct path;
//! - garbage to 127.0.0.11 leaves it answering; an outside name is forwarded to the
//!   upstream (a resolver in the test's underlay); one the upstream ignores gets SERVFAIL
//!   within 5 s;
//! - `--lb-idle-timeout 10s`: a connection idle 5 s still works, one idle 13 s is gone;
//! - scaling 3 -> 2 and back to 3: DNS and rotation follow, no request fails;
//! - a node killed with SIGKILL leaves the rotation once it is marked down, a client
//!   connected to its replica through the VIP is reset (not left hanging); no later request
//!   fails.

use overlay_e2e::{
    iperf_bytes, ok, out, require_root, script_dir, unique, wait_for, write_script, Node, Underlay,
    ECHO_PY, HTTP_ASK_PY, WHOAMI_PY,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// A resolver for the test's underlay: answers `ext.test` A 192.0.2.7 and ignores the rest.
const UPSTREAM: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5353))
while True:
    q, a = s.recvfrom(2048)
    if len(q) < 17 or b"\x03ext\x04test\x00" not in q:
        continue
    end = q.index(b"\x00", 12) + 5
    r = q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:end]
    r += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 7])
    s.sendto(r, a)
"#;

/// Keeps one HTTP connection to whoami:8000 and reports what happens to it:
/// `idle A B`: a request, A seconds idle, a request, B seconds idle, a last request.
/// `pin NAME`: opens connections until one is served by NAME, keeps it, and says how it ends.
const CLIENT: &str = r#"
import socket, sys, time
if sys.argv[1] == "idle":
    s = socket.create_connection(("whoami", 8000), timeout=3)
    print("first", ask(s), flush=True)
    time.sleep(float(sys.argv[2]))
    print("after-short", ask(s), flush=True)
    time.sleep(float(sys.argv[3]))
    try:
        print("after-long", ask(s) or "closed", flush=True)
    except Exception as e:
        print("after-long", type(e).__name__, flush=True)
else:
    for _ in range(12):
        s = socket.create_connection(("whoami", 8000), timeout=3)
        if ask(s) == sys.argv[2]:
            break
        s.close()
    else:
        print("unpinned", flush=True)
        sys.exit(1)
    print("pinned", flush=True)
    s.settimeout(30)
    try:
        d = s.recv(100)
        print("closed" if not d else "data", flush=True)
    except Exception as e:
        print(type(e).__name__, flush=True)
"#;

fn curl(n: &Node, client: &str, url: &str) -> String {
    ok(
        n.exec(client, &["curl", "-sS", "--max-time", "5", url]),
        &format!("curl {url}"),
    )
}

/// `count` requests to whoami:8000; all must succeed.
fn rotation(n: &Node, client: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| curl(n, client, "http://whoami:8000/"))
        .collect()
}

fn dig(n: &Node, client: &str, args: &[&str]) -> String {
    let mut cmd = vec!["dig", "+short", "+tries=1", "+time=4"];
    cmd.extend_from_slice(args);
    ok(n.exec(client, &cmd), &format!("dig {args:?}"))
}

fn lines(s: &str) -> BTreeSet<String> {
    s.lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn services_vips_and_dns_on_three_nodes() {
    if !require_root("services_vips_and_dns_on_three_nodes") {
        return;
    }
    let tag = unique("sv");
    let dir = script_dir(&tag);
    let whoami = write_script(&dir, "whoami.py", WHOAMI_PY);
    let echo = write_script(&dir, "echo.py", ECHO_PY);
    let upstream = write_script(&dir, "upstream.py", UPSTREAM);
    let client_py = write_script(&dir, "client.py", &[HTTP_ASK_PY, CLIENT].concat());

    let u = Underlay::new(&tag, 3, 3);
    // The upstream resolver lives on host 3's underlay address.
    let mut resolver = u
        .host(3)
        .cmd("python3")
        .args([&upstream, &u.addr(3)])
        .spawn()
        .expect("upstream resolver");
    let up = format!("{}:5353", u.addr(3));
    let metrics: Vec<String> = (1..=3).map(|i| format!("{}:9323", u.addr(i))).collect();
    let flags = |i: usize| {
        [
            "--dns-upstream",
            up.as_str(),
            "--metrics-addr",
            &metrics[i - 1],
        ]
    };
    let n1 = Node::manager_with(&format!("{tag}a"), &u, 1, &flags(1));
    let mut n2 = Node::worker_with(&format!("{tag}b"), &u, 2, &n1, &flags(2));
    let mut n3 = Node::worker_with(&format!("{tag}c"), &u, 3, &n1, &flags(3));
    n1.wait_ready(&[&n2, &n3]);

    n1.ctl_ok(&["network", "create", "--subnet", "10.0.20.0/24", "demo"]);
    let create = |args: &[&str]| n1.ctl_ok(&[&["service", "create"][..], args].concat());
    #[rustfmt::skip]
    create(&[
        "--name", "whoami", "--network", "name=demo,alias=who", "--replicas", "3",
        "--lb-idle-timeout", "10s", "--", "python3", &whoami,
    ]);
    create(&[
        "--name",
        "client",
        "--network",
        "demo",
        "--",
        "sleep",
        "infinity",
    ]);
    create(&[
        "--name",
        "echo",
        "--network",
        "demo",
        "--",
        "python3",
        &echo,
    ]);
    #[rustfmt::skip]
    create(&[
        "--name", "rr", "--endpoint-mode", "dnsrr", "--network", "demo", "--replicas", "2",
        "--", "sleep", "infinity",
    ]);
    create(&["--name", "perf", "--network", "demo", "--", "iperf3", "-s"]);
    for (svc, n) in [
        ("whoami", 3),
        ("client", 1),
        ("echo", 1),
        ("rr", 2),
        ("perf", 1),
    ] {
        n1.wait_running(svc, n);
    }
    let c = "client.1";
    let cn_name = n1.node_of(c);
    // The client's node, and a worker without the client to kill at the end.
    let ci = [&n1, &n2, &n3]
        .iter()
        .position(|n| n.name == cn_name)
        .expect("the client's node")
        + 1;
    let (cn, victim) = if n1.name == cn_name {
        (&n1, &mut n3)
    } else if n2.name == cn_name {
        (&n2, &mut n3)
    } else {
        (&n3, &mut n2)
    };
    let vip = n1.vip_of("whoami");
    let placed: BTreeSet<String> = (1..=3)
        .map(|i| n1.node_of(&format!("whoami.{i}")))
        .collect();
    assert_eq!(placed.len(), 3, "one replica per node");

    // The resolver every task sees, and what it says.
    let ns = ok(cn.exec(c, &["nslookup", "whoami"]), "nslookup");
    assert!(ns.contains("127.0.0.11"), "{ns}");
    assert!(ns.contains(&vip), "{ns}");
    let names: BTreeSet<String> = (1..=3)
        .map(|i| cn.task_ip(&format!("whoami.{i}")))
        .collect();
    assert!(wait_for(Duration::from_secs(5), || lines(&dig(
        cn,
        c,
        &["tasks.whoami"]
    )) == names));
    assert_eq!(dig(cn, c, &["who"]), vip, "alias");
    let ptr = dig(cn, c, &["-x", &cn.task_ip("whoami.2")]);
    let id2 = cn.task_view("whoami.2")["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(ptr, format!("whoami.2.{id2}.demo."));
    assert!(ok(cn.exec(c, &["getent", "hosts", "whoami"]), "getent").starts_with(&vip));
    ok(
        cn.exec(c, &["ping", "-c", "1", "-W", "2", "whoami"]),
        "ping whoami",
    );

    // Tasks count as running once their process starts; wait until the servers listen.
    let answers = |n: &Node, t: &str| {
        let url = format!("http://{}:8000/", n.task_ip(t));
        n.exec(c, &["curl", "-sS", "--max-time", "2", &url])
            .status
            .success()
    };
    for i in 1..=3 {
        assert!(wait_for(Duration::from_secs(10), || answers(
            cn,
            &format!("whoami.{i}")
        )));
    }

    // Round robin over the three replicas, in turn.
    let got = rotation(cn, c, 6);
    let distinct: BTreeSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), 3, "{got:?}");
    assert_eq!(got[..3], got[3..], "each replica twice, in turn: {got:?}");

    // dnsrr: the name gives the tasks; no VIP.
    let rr_ips: BTreeSet<String> = (1..=2).map(|i| cn.task_ip(&format!("rr.{i}"))).collect();
    assert_eq!(lines(&dig(cn, c, &["rr"])), rr_ips);
    let rr = &n1.json(&["service", "inspect", "rr"])[0];
    assert_eq!(
        rr["Endpoint"]["VirtualIPs"].as_array().map(Vec::len),
        Some(0)
    );

    // UDP through a VIP.
    let udp = ok(
        cn.exec(
            c,
            &["python3", "-c", "import socket;s=socket.socket(2,2);s.settimeout(3);s.sendto(b'marco',('echo',9000));print(s.recv(100).decode())"],
        ),
        "udp echo",
    );
    assert_eq!(udp, "marco");

    // TCP super-frames through the VIP: the same order of throughput as straight to the task.
    let direct = iperf_bytes(cn, c, &cn.task_ip("perf.1"));
    let via_vip = iperf_bytes(cn, c, &n1.vip_of("perf"));
    assert!(
        via_vip * 3 >= direct,
        "iperf3 via VIP {via_vip} B vs direct {direct} B"
    );

    // Hostile bytes leave the resolver answering; outside names go upstream, bounded.
    ok(
        cn.exec(
            c,
            &["python3", "-c", "import socket,os;s=socket.socket(2,2)\nfor n in range(200): s.sendto(os.urandom(n % 60), ('127.0.0.11',53))"],
        ),
        "garbage",
    );
    assert_eq!(dig(cn, c, &["whoami"]), vip);
    assert_eq!(dig(cn, c, &["ext.test"]), "192.0.2.7", "forwarded upstream");
    let t = Instant::now();
    let o = cn.exec(c, &["dig", "+tries=1", "+time=5", "nothere.test"]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(out(&o).contains("SERVFAIL"), "{}", out(&o));

    // --lb-idle-timeout 10s: idle 5 s is fine, idle 13 s is gone.
    let idle = ok(
        cn.exec(c, &["python3", &client_py, "idle", "5", "13"]),
        "idle client",
    );
    let idle: BTreeMap<&str, &str> = idle.lines().filter_map(|l| l.split_once(' ')).collect();
    assert!(idle["after-short"].starts_with("whoami."), "{idle:?}");
    assert!(!idle["after-long"].starts_with("whoami."), "{idle:?}");
    let stats = cn.json(&["stats"]);
    assert!(
        stats["drops"]["lb_no_flow"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );

    // Scale down and up: DNS and the rotation follow, no request fails.
    n1.ctl_ok(&["service", "scale", "whoami=2"]);
    assert!(wait_for(Duration::from_secs(5), || lines(&dig(
        cn,
        c,
        &["tasks.whoami"]
    ))
    .len()
        == 2));
    let two: BTreeSet<String> = rotation(cn, c, 4).into_iter().collect();
    assert_eq!(two.len(), 2, "{two:?}");
    n1.ctl_ok(&["service", "scale", "whoami=3"]);
    n1.wait_running("whoami", 3);
    assert!(wait_for(Duration::from_secs(10), || answers(
        cn, "whoami.3"
    )));
    assert!(wait_for(Duration::from_secs(5), || lines(&dig(
        cn,
        c,
        &["tasks.whoami"]
    ))
    .len()
        == 3));
    assert!(wait_for(Duration::from_secs(5), || rotation(cn, c, 3)
        .into_iter()
        .collect::<BTreeSet<_>>()
        .len()
        == 3));

    // The cluster map of the client's node shows every node and task, and the flows its
    // client makes while it makes them; with OVERLAY_MAP_SCREENSHOT=FILE, a headless
    // Chromium draws it into FILE (scripts/map-screenshot.sh).
    cluster_map(&u, &metrics, cn, c, ci);

    // A node killed outright: its tasks go on but nothing forwards for them (their TAPs have no
    // reader while the router is down).
    // Once it is marked down its replica leaves the rotation, and a client connected to it
    // through the VIP gets a reset instead of hanging.
    let gone = (1..=3)
        .map(|i| format!("whoami.{i}"))
        .find(|t| n1.node_of(t) == victim.name)
        .expect("a replica on the victim");
    let mut pinned = cn
        .ctl_cmd(&["exec", c, "--", "python3", &client_py, "pin", &gone])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pinned client");
    let mut reader = std::io::BufReader::new(pinned.stdout.take().expect("stdout"));
    let mut said = String::new();
    std::io::BufRead::read_line(&mut reader, &mut said).expect("pinned client output");
    assert_eq!(said.trim(), "pinned");
    victim.kill();
    assert!(wait_for(Duration::from_secs(10), || n1
        .node_state(&victim.name)
        == "down"));
    let down = Instant::now();
    said.clear();
    std::io::Read::read_to_string(&mut reader, &mut said).expect("pinned client output");
    let _ = pinned.wait();
    assert_eq!(
        said.trim(),
        "ConnectionResetError",
        "the client was not reset"
    );
    assert!(
        down.elapsed() < Duration::from_secs(5),
        "reset {:?} after down",
        down.elapsed()
    );
    // Names and the VIP's backends are published together.
    assert!(wait_for(Duration::from_secs(5), || lines(&dig(
        cn,
        c,
        &["tasks.whoami"]
    ))
    .len()
        == 2));
    let after = rotation(cn, c, 6);
    assert!(!after.contains(&gone), "{gone} still served: {after:?}");
    let _ = resolver.kill();
    let _ = resolver.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The map at `/` and its data at `/map.json` on the client's node, under a bounded load of
/// requests through the VIP.
/// `cn` is host `i` of `u`.
fn cluster_map(u: &Underlay, metrics: &[String], cn: &Node, client: &str, i: usize) {
    let get = |path: &str| {
        let o = u
            .host(i)
            .cmd("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}{path}", metrics[i - 1]))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(get("/").contains("<svg"), "the map's page");
    let mut load = cn
        .ctl_cmd(&[
            "exec", client, "--", "sh", "-c",
            "for i in $(seq 1 200); do curl -s -o /dev/null --max-time 2 http://whoami:8000/; sleep 0.03; done",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("load");
    let view = || serde_json::from_str::<serde_json::Value>(&get("/map.json")).unwrap_or_default();
    let flowing = wait_for(Duration::from_secs(10), || {
        view()["rates"]["flows"]["whoami"].as_f64().unwrap_or(0.0) > 1.0
    });
    let v = view();
    assert!(flowing, "no flows/s for whoami on the map: {v}");
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3), "{v}");
    let running = v["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["state"] == "running")
        .count();
    assert!(running >= 8, "{v}");
    if let Ok(file) = std::env::var("OVERLAY_MAP_SCREENSHOT") {
        let o = u
            .host(i)
            .cmd("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1400,760",
            ])
            .arg(format!("--screenshot={file}"))
            .arg(format!("http://{}/", metrics[i - 1]))
            .output()
            .expect("chromium");
        assert!(
            o.status.success(),
            "chromium: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let _ = load.wait();
}
