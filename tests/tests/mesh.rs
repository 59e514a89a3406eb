//! The routing mesh on three nodes, driven from a client namespace on the underlay, as an
//! outside user would: real curl, a real 50 MB upload, real UDP. One cluster serves every
//! check, in order. Needs root.
//!
//! - `whoami` (2 replicas on 2 of the 3 nodes) published 8080:8000: curl to every node,
//!   including the one with no task, is answered by both replicas in turn;
//! - a 50 MB upload through the mesh arrives intact (the task answers its SHA-256 after the
//!   client half-closes), and the answer comes back over the half-closed connection;
//! - 100 connections at once are all served; past `--ingress-max-connections` a node resets
//!   the extra ones, counts them, and serves again once they are gone;
//! - a UDP echo service published 9000/udp answers through every node, from the port;
//! - `mode=host` answers only on the node of its task; a second task of it on that node is
//!   refused with a placement error in `service ps`;
//! - PROXY protocol v2: a backend reads the client's own underlay address;
//! - a task that leaves (scale down) keeps the client connection it serves while it drains
//!   (its stop grace period, 10 s), which ends when the task stops;
//! - a client that does not read meets backpressure: the node's memory stays flat while a
//!   task pushes data at it, and every byte arrives once it reads;
//! - a port another process holds on one node is reported in that node's stats, served by
//!   the other nodes, and opened once it is free;
//! - publishing a port already published is refused, naming the holder; `--publish-rm`
//!   and `service rm` close the port on every node.

use overlay_e2e::{
    ok, require_root, script_dir, unique, wait_for, write_script, Node, Underlay, ECHO_PY,
    HTTP_ASK_PY, SINK_PY, UPLOAD_PY, WHOAMI_PY,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// Sends 64 KiB blocks for as long as the client reads.
const FIREHOSE: &str = r#"
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 6000))
s.listen(16)
block = b"x" * 65536
def serve(c):
    try:
        while True:
            c.sendall(block)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Reads a PROXY protocol v2 header and answers the client address it carries.
const PROXY_READER: &str = r#"
import socket, struct
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(16)
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
while True:
    c, _ = s.accept()
    h = b""
    while len(h) < 16:
        h += c.recv(16 - len(h))
    n = struct.unpack("!H", h[14:16])[0]
    body = b""
    while len(body) < n:
        body += c.recv(n - len(body))
    if h[:12] != SIG or h[12] != 0x21 or h[13] != 0x11:
        c.sendall(b"bad header\n")
    else:
        src = socket.inet_ntoa(body[0:4])
        port = struct.unpack("!H", body[8:10])[0]
        c.sendall(f"{src} {port}\n".encode())
    # Half-close, and let the client finish, so that its request is read, not reset.
    c.shutdown(socket.SHUT_WR)
    c.settimeout(5)
    try:
        while c.recv(4096):
            pass
    except OSError:
        pass
    c.close()
"#;

/// The outside client's tools: `udp HOST PORT`, `many HOST PORT N`,
/// `pin HOST PORT NAME` (keeps a connection served by NAME and says how it ends).
const CLIENT: &str = r#"
import select, socket, sys, threading, time
cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if cmd == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(2)
    for i in range(3):
        msg = f"ping {i}".encode()
        s.send(msg)
        try:
            if s.recv(2048) == msg:
                print("echoed")
                break
        except socket.timeout:
            pass
    else:
        print("no echo")
elif cmd == "flood":
    # Opens N connections at once and holds them; prints how many the node reset.
    n = int(sys.argv[4])
    socks = []
    reset = 0
    for _ in range(n):
        try:
            socks.append(socket.create_connection((host, port), timeout=10))
        except ConnectionResetError:
            # Accepted and reset before this client saw its handshake finish (a loaded
            # machine schedules the client late): reset all the same.
            reset += 1
    # The node resets the extra ones as it accepts them; a second is plenty.
    time.sleep(1)
    ready, _, _ = select.select(socks, [], [], 0)
    for s in ready:
        try:
            s.recv(1)
        except ConnectionResetError:
            reset += 1
    print(reset)
elif cmd == "many":
    n = int(sys.argv[4])
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
    answers = []
    def one(s):
        try:
            answers.append(ask(s))
        except Exception as e:
            answers.append(type(e).__name__)
    ts = [threading.Thread(target=one, args=(s,)) for s in socks]
    [t.start() for t in ts]
    [t.join() for t in ts]
    good = sum(1 for a in answers if a.startswith("whoami."))
    print(good if good == n else f"{good} {sorted(set(answers))}")
elif cmd == "slow":
    # Connect, read nothing for a while (the proxy must hold back), then read N MB.
    s = socket.create_connection((host, port), timeout=10)
    print("connected", flush=True)
    sys.stdin.readline()
    want, got = int(sys.argv[4]) << 20, 0
    while got < want:
        d = s.recv(1 << 16)
        if not d:
            break
        got += len(d)
    print("read", got >> 20)
elif cmd == "pin":
    for _ in range(8):
        s = socket.create_connection((host, port), timeout=5)
        if ask(s) == sys.argv[4]:
            break
        s.close()
    else:
        print("unpinned", flush=True)
        sys.exit(1)
    print("pinned", flush=True)
    s.settimeout(20)
    try:
        d = s.recv(100)
        print("closed" if not d else "data", flush=True)
    except Exception as e:
        print(type(e).__name__, flush=True)
"#;

#[test]
fn routing_mesh_on_three_nodes() {
    if !require_root("routing_mesh_on_three_nodes") {
        return;
    }
    let tag = unique("rm");
    let dir = script_dir(&tag);
    let whoami = write_script(&dir, "whoami.py", WHOAMI_PY);
    let sink = write_script(&dir, "sink.py", SINK_PY);
    let echo = write_script(&dir, "echo.py", ECHO_PY);
    let proxy_reader = write_script(&dir, "proxy.py", PROXY_READER);
    let firehose = write_script(&dir, "firehose.py", FIREHOSE);
    let upload = write_script(&dir, "upload.py", UPLOAD_PY);
    let client_py = write_script(&dir, "client.py", &[HTTP_ASK_PY, CLIENT].concat());

    let mut u = Underlay::new(&tag, 3, 8);
    let outside = u.add_host(&format!("{tag}-cl"));
    let client_addr = u.addr(outside);
    let n1 = Node::manager(&format!("{tag}a"), &u, 1);
    let n2 = Node::worker(&format!("{tag}b"), &u, 2, &n1);
    // Node 3 carries at most 40 connections at once.
    let n3 = Node::worker_with(
        &format!("{tag}c"),
        &u,
        3,
        &n1,
        &["--ingress-max-connections", "40"],
    );
    n1.wait_ready(&[&n2, &n3]);
    let nodes = [&n1, &n2, &n3];
    let addr_of: BTreeMap<String, String> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), u.addr(i + 1)))
        .collect();

    // The ingress network is there from the start, with an endpoint per node.
    let ing = n1.json(&["network", "inspect", "ingress"]);
    assert_eq!(ing[0]["Ingress"], true);
    assert_eq!(ing[0]["IPAM"]["Config"][0]["Subnet"], "10.255.0.0/16");
    assert_eq!(ing[0]["Containers"].as_object().map(|c| c.len()), Some(3));

    n1.ctl_ok(&["network", "create", "--subnet", "10.0.30.0/24", "front"]);
    let create = |args: &[&str]| n1.ctl_ok(&[&["service", "create"][..], args].concat());
    #[rustfmt::skip]
    create(&["--name", "whoami", "--network", "front", "--replicas", "2", "-p", "8080:8000",
        "--", "python3", &whoami]);
    #[rustfmt::skip]
    create(&["--name", "sink", "--network", "front", "--publish", "published=7000,target=7000",
        "--", "python3", &sink]);
    #[rustfmt::skip]
    create(&["--name", "echo", "--network", "front", "-p", "9000:9000/udp",
        "--", "python3", &echo]);
    #[rustfmt::skip]
    create(&["--name", "direct", "--network", "front",
        "--publish", "published=8081,target=8000,mode=host", "--", "python3", &whoami]);
    #[rustfmt::skip]
    create(&["--name", "who", "--network", "front",
        "--publish", "published=8082,target=8000,proxy=v2", "--", "python3", &proxy_reader]);
    #[rustfmt::skip]
    create(&["--name", "hose", "--network", "front", "-p", "6000:6000",
        "--", "python3", &firehose]);
    // Another process holds 8090 on node 1 before the service publishes it.
    let hold = "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',8090)); s.listen(); print('bound', flush=True); time.sleep(600)";
    let mut squatter = u
        .host(1)
        .cmd("python3")
        .args(["-c", hold])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("squatter");
    let mut bound = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squatter.stdout.as_mut().expect("stdout")),
        &mut bound,
    )
    .expect("squatter output");
    assert_eq!(bound.trim(), "bound");
    #[rustfmt::skip]
    create(&["--name", "late", "--network", "front", "-p", "8090:8000",
        "--", "python3", &whoami]);
    for (svc, n) in [
        ("whoami", 2),
        ("sink", 1),
        ("echo", 1),
        ("direct", 1),
        ("who", 1),
        ("hose", 1),
        ("late", 1),
    ] {
        n1.wait_running(svc, n);
    }
    let ls = n1.ctl_ok(&["service", "ls"]);
    assert!(ls.contains("*:8080->8000/tcp"), "{ls}");
    let inspect = n1.json(&["service", "inspect", "whoami"]);
    assert_eq!(inspect[0]["Endpoint"]["Ports"][0]["PublishedPort"], 8080);
    assert_eq!(inspect[0]["Endpoint"]["Ports"][0]["PublishMode"], "ingress");

    let client = u.host(outside);
    let curl = |addr: &str, port: u16| {
        client
            .cmd("curl")
            .args(["-sS", "--max-time", "5", &format!("http://{addr}:{port}/")])
            .output()
            .expect("curl")
    };
    let task_nodes: Vec<String> = ["whoami.1", "whoami.2"]
        .iter()
        .map(|t| n1.node_of(t))
        .collect();
    let empty = nodes
        .iter()
        .find(|n| !task_nodes.contains(&n.name))
        .expect("a node without a whoami task");

    // Every node, the empty one first, answers with both replicas in turn. The mesh is up
    // once each node's view has both backends; wait for the first answer.
    let mut order: Vec<&Node> = vec![empty];
    order.extend(nodes.iter().copied().filter(|n| n.name != empty.name));
    for n in &order {
        let addr = &addr_of[&n.name];
        // Each node learns that a task runs from the manager's next snapshot: wait until
        // this one balances over both.
        assert!(
            wait_for(Duration::from_secs(10), || {
                let a = curl(addr, 8080);
                let b = curl(addr, 8080);
                a.status.success() && b.status.success() && a.stdout != b.stdout
            }),
            "no answers from both replicas at {} ({addr}:8080)\n{}",
            n.name,
            n.log()
        );
        let answers: Vec<String> = (0..4).map(|_| ok(curl(addr, 8080), "curl")).collect();
        assert_ne!(answers[0], answers[1], "{}: {answers:?}", n.name);
        assert_eq!(answers[0], answers[2], "{}: {answers:?}", n.name);
        assert_eq!(answers[1], answers[3], "{}: {answers:?}", n.name);
        let mut seen = answers.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, ["whoami.1", "whoami.2"], "{}", n.name);
    }

    // 50 MB up through the node without the task, intact, answered after the half-close.
    let py = |args: &[&str]| {
        let o = client
            .cmd("python3")
            .arg(&client_py)
            .args(args)
            .output()
            .expect("client");
        ok(o, &format!("client {args:?}"))
    };
    let sink_node = n1.node_of("sink.1");
    let via = nodes
        .iter()
        .find(|n| n.name != sink_node)
        .expect("another node");
    let up = client
        .cmd("python3")
        .args([&upload, &addr_of[&via.name], "7000", "50"])
        .output()
        .expect("upload");
    assert_eq!(ok(up, "upload"), "intact");

    // Many at once.
    // Many at once (on a node with the default limit).
    let roomy = if empty.name == n3.name { &n1 } else { empty };
    let many = py(&["many", &addr_of[&roomy.name], "8080", "100"]);
    assert_eq!(many, "100", "{}", roomy.json(&["stats"]));
    // Past its limit, node 3 resets the extra connections, counts them, and serves again
    // once they are gone.
    let reset: u64 = py(&["flood", &addr_of[&n3.name], "8080", "60"])
        .parse()
        .expect("count");
    assert!(reset >= 20, "{reset} of 60 reset at a limit of 40");
    let refused = n3.json(&["stats"])["ingress"]["8080/tcp"]["refused"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused >= 20, "refused {refused}");
    assert!(wait_for(Duration::from_secs(10), || curl(
        &addr_of[&n3.name],
        8080
    )
    .status
    .success()));

    // UDP through every node, answered from the published port.
    for n in nodes {
        assert_eq!(
            py(&["udp", &addr_of[&n.name], "9000"]),
            "echoed",
            "{}",
            n.name
        );
    }

    // mode=host: only the task's node listens.
    let direct_node = n1.node_of("direct.1");
    for n in nodes {
        let addr = &addr_of[&n.name];
        if n.name == direct_node {
            assert!(wait_for(Duration::from_secs(5), || curl(addr, 8081)
                .status
                .success()));
            assert_eq!(ok(curl(addr, 8081), "host mode"), "direct.1");
        } else {
            assert!(!curl(addr, 8081).status.success(), "{} opened 8081", n.name);
        }
    }
    // A second task of it on the same node: refused, and said so.
    n1.ctl_ok(&["service", "scale", "direct=4"]);
    assert!(
        wait_for(Duration::from_secs(10), || n1
            .ctl_ok(&["service", "ps", "direct"])
            .contains("already taken on this node by direct.")),
        "{}",
        n1.ctl_ok(&["service", "ps", "direct"])
    );

    // PROXY v2: the backend sees the outside client's own address.
    let raw = client
        .cmd("curl")
        .args(["-sS", "--http0.9", "--max-time", "5"])
        .arg(format!("http://{}:8082/", addr_of[&empty.name]))
        .output()
        .expect("curl");
    let who = ok(raw, "proxy v2");
    assert!(
        who.starts_with(&format!("{client_addr} ")),
        "backend saw {who:?}, client is {client_addr}"
    );

    // Backpressure: a client that does not read leaves the node's memory flat.
    let rss = |n: &Node| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", n.pid().unwrap_or(0)))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut slow = client
        .cmd("python3")
        .args([&client_py, "slow", &addr_of[&empty.name], "6000", "100"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("slow client");
    let mut slow_out = std::io::BufReader::new(slow.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut slow_out, &mut line).expect("read");
    assert_eq!(line.trim(), "connected");
    std::thread::sleep(Duration::from_secs(1));
    let before = rss(empty);
    std::thread::sleep(Duration::from_secs(3));
    let held = rss(empty);
    assert!(
        held < before + 16 * 1024,
        "RSS grew from {before} to {held} KiB while the client did not read"
    );
    {
        use std::io::Write;
        let stdin = slow.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("go");
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut slow_out, &mut rest).expect("read");
    assert_eq!(rest.trim(), "read 100");
    let _ = slow.wait();

    // The port another process holds on node 1: reported there, served elsewhere, opened
    // once free.
    let late = |n: &Node| n.json(&["stats"])["ingress"]["8090/tcp"].clone();
    assert!(
        wait_for(Duration::from_secs(5), || late(&n1)["error"]
            .as_str()
            .is_some_and(|e| e.contains("in use"))),
        "{}",
        late(&n1)
    );
    assert_eq!(late(&n1)["listening"], false);
    assert!(
        wait_for(Duration::from_secs(5), || curl(&addr_of[&n2.name], 8090)
            .status
            .success()),
        "node 2 does not serve 8090"
    );
    assert_eq!(ok(curl(&addr_of[&n2.name], 8090), "late on n2"), "late.1");
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(
        wait_for(Duration::from_secs(10), || curl(&addr_of[&n1.name], 8090)
            .status
            .success()),
        "node 1 did not open 8090 once free: {}",
        late(&n1)
    );

    // A task that leaves keeps the connection it serves through its stop grace period (the
    // client is idle: nothing finishes it sooner); the connection ends when the task stops.
    let mut pin = client
        .cmd("python3")
        .args([&client_py, "pin", &addr_of[&empty.name], "8080", "whoami.2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pin");
    let mut first = String::new();
    {
        use std::io::BufRead;
        let stdout = pin.stdout.as_mut().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .expect("read");
    }
    assert_eq!(first.trim(), "pinned");
    let t0 = std::time::Instant::now();
    n1.ctl_ok(&["service", "scale", "whoami=1"]);
    let ended = ok(pin.wait_with_output().expect("pin"), "pin");
    assert!(
        ended == "ConnectionResetError" || ended == "closed",
        "pinned connection ended with {ended:?}"
    );
    let held = t0.elapsed();
    assert!(
        held >= Duration::from_secs(8) && held < Duration::from_secs(16),
        "{held:?}"
    );

    // A clash is refused, naming the holder.
    let err = n1.ctl_err(&[
        "service",
        "create",
        "--name",
        "dup",
        "--network",
        "front",
        "-p",
        "8080:80",
        "--",
        "sleep",
        "1",
    ]);
    assert!(
        err.contains("port 8080/tcp is already published by service whoami"),
        "{err}"
    );

    // --publish-rm closes the port everywhere; the others stay.
    n1.ctl_ok(&["service", "update", "--publish-rm", "8080", "whoami"]);
    for n in nodes {
        let addr = &addr_of[&n.name];
        assert!(
            wait_for(Duration::from_secs(10), || !curl(addr, 8080)
                .status
                .success()),
            "{} still answers on 8080",
            n.name
        );
    }
    assert_eq!(py(&["udp", &addr_of[&empty.name], "9000"]), "echoed");
    // service rm closes its ports too.
    n1.ctl_ok(&["service", "rm", "late"]);
    for n in nodes {
        let addr = &addr_of[&n.name];
        assert!(
            wait_for(Duration::from_secs(10), || !curl(addr, 8090)
                .status
                .success()),
            "{} still answers on 8090 after service rm",
            n.name
        );
    }
    let stats = n1.json(&["stats"]);
    assert!(
        stats["ingress"]["9000/udp"]["accepted"].as_u64() >= Some(1),
        "{stats}"
    );
    // A few clients, far below the port's cap: none made room for another.
    assert_eq!(
        stats["ingress"]["9000/udp"]["evicted"].as_u64(),
        Some(0),
        "{stats}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
