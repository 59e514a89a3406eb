//! The connection rig of the restart and upgrade tests: an echo service and a client
//! service, two tasks each (one per node). Each client holds one TCP connection to each echo
//! task (one to its own node, one across the underlay) and one to the echo service's VIP,
//! and sends a line on each every 100 ms, printing every round trip and the gap since the
//! previous one into its log (which its shim writes while overlayd is away). The test reads
//! the logs: rounds, gaps, errors.

use crate::{wait_for, Node};
use std::time::Duration;

/// An echo server on port 7000, a thread per connection.
pub const ECHO_PY: &str = r#"
import socket, threading
def serve(c):
    with c:
        while True:
            data = c.recv(4096)
            if not data:
                return
            c.sendall(data)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Connects to both echo tasks (found by `tasks.echo`) and to the service's VIP, then every
/// 100 ms sends a numbered line on each connection and waits for its echo: prints `ok SEQ GAP_MS` per round (the
/// time since the previous round's end), `error ...` and exits if a connection breaks.
pub const CLIENT_PY: &str = r#"
import socket, sys, time
while True:
    try:
        ips = sorted({a[4][0] for a in socket.getaddrinfo("tasks.echo", 7000, socket.AF_INET, socket.SOCK_STREAM)})
    except OSError:
        ips = []
    if len(ips) == 2:
        break
    time.sleep(0.2)
# And one through the service's VIP, load-balanced by the client's node.
while True:
    try:
        vip = socket.getaddrinfo("echo", 7000, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        break
    except OSError:
        time.sleep(0.2)
conns = []
for ip in ips + [vip]:
    while True:
        try:
            c = socket.create_connection((ip, 7000), timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    c.settimeout(30)
    conns.append((c, c.makefile("rb")))
print("connected", " ".join(ips), flush=True)
seq = 0
last = time.monotonic()
while True:
    seq += 1
    line = b"%d\n" % seq
    try:
        for c, r in conns:
            c.sendall(line)
            got = r.readline()
            if got != line:
                print("error: echo %r for %r" % (got, line), flush=True)
                sys.exit(1)
    except OSError as e:
        print("error:", e, "at %.3f" % time.time(), flush=True)
        sys.exit(1)
    now = time.monotonic()
    print("ok %d %d" % (seq, (now - last) * 1000), flush=True)
    last = now
    time.sleep(0.1)
"#;

/// What a client's log says: its rounds (seq, gap in ms) and its errors.
pub struct Progress {
    pub rounds: Vec<(u64, u64)>,
    pub errors: Vec<String>,
}

impl Progress {
    pub fn of(node: &Node, task: &str) -> Progress {
        let log = node.dir.join("state/logs").join(format!("{task}.log"));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let mut p = Progress {
            rounds: vec![],
            errors: vec![],
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["ok", seq, gap] => {
                    if let (Ok(s), Ok(g)) = (seq.parse(), gap.parse()) {
                        p.rounds.push((s, g));
                    }
                }
                _ if line.starts_with("error") => p.errors.push(line.to_string()),
                _ => {}
            }
        }
        p
    }

    pub fn last_seq(&self) -> u64 {
        self.rounds.last().map_or(0, |r| r.0)
    }

    /// The longest gap between rounds after round `after`.
    pub fn max_gap_after(&self, after: u64) -> u64 {
        self.rounds
            .iter()
            .filter(|r| r.0 > after)
            .map(|r| r.1)
            .max()
            .unwrap_or(0)
    }
}

pub const TASKS: [&str; 4] = ["echo.1", "echo.2", "client.1", "client.2"];

/// Every task's pid, as the manager reports it.
pub fn pids(manager: &Node) -> Vec<Option<u64>> {
    TASKS
        .iter()
        .map(|t| manager.task_view(t)["status"]["pid"].as_u64())
        .collect()
}

pub fn all_running(manager: &Node) -> bool {
    TASKS
        .iter()
        .all(|t| manager.task_view(t)["status"]["state"] == "running")
}

/// Waits until both clients completed `rounds` more rounds than at `before`.
pub fn wait_rounds(nodes: &[&Node], before: &[u64], rounds: u64) -> bool {
    wait_for(Duration::from_secs(20), || {
        ["client.1", "client.2"].iter().zip(before).all(|(t, b)| {
            nodes
                .iter()
                .any(|n| Progress::of(n, t).last_seq() >= b + rounds)
        })
    })
}

pub fn last_seqs(nodes: &[&Node]) -> Vec<u64> {
    ["client.1", "client.2"]
        .iter()
        .map(|t| {
            nodes
                .iter()
                .map(|n| Progress::of(n, t).last_seq())
                .max()
                .unwrap_or(0)
        })
        .collect()
}

/// The longest gap either client saw after rounds `before`, and every error they printed.
pub fn gaps_and_errors(nodes: &[&Node], before: &[u64]) -> (u64, Vec<String>) {
    let mut gap = 0;
    let mut errors = vec![];
    for (t, b) in ["client.1", "client.2"].iter().zip(before) {
        for n in nodes {
            let p = Progress::of(n, t);
            gap = gap.max(p.max_gap_after(*b));
            errors.extend(p.errors);
        }
    }
    (gap, errors)
}

/// Creates the rig's services on network `net` through `manager`: `echo` (the [`ECHO_PY`]
/// script, with `echo_flags` added to its `service create`) and `client` ([`CLIENT_PY`]),
/// two tasks each.
pub fn create_services(manager: &Node, echo: &str, client: &str, echo_flags: &[&str]) {
    let create = |name: &str, flags: &[&str], script: &str| {
        let mut args = vec![
            "service",
            "create",
            "--name",
            name,
            "--network",
            "net",
            "--replicas",
            "2",
        ];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "/usr/bin/python3", "-u", script]);
        manager.ctl_ok(&args);
    };
    create("echo", echo_flags, echo);
    create("client", &[], client);
}
