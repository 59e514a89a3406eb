//! Harness for the end-to-end tests: real `overlayd` processes, real namespaces, real
//! clients. Every resource a test makes is owned by a guard whose `Drop` releases it, so a
//! failing (panicking) test still leaves no daemon, namespace or TAP behind.
//!
//! These tests need root (namespaces, TAP devices). Unprivileged, each test prints a visible
//! `SKIP` line and passes; CI runs as root.

pub mod dockerd;
pub mod etcd;
pub mod rounds;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True when the test can run; otherwise prints why it is skipped.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() && Path::new("/dev/net/tun").exists() {
        return true;
    }
    // Straight to the stderr handle: libtest captures eprintln! of a passing test, and a
    // skip must be seen.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: needs root and /dev/net/tun (network namespaces, TAP devices)"
    );
    false
}

/// Path of a workspace binary (`overlayd`, `overlayctl`), built by `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A short name unique to this test process and tag, usable in node and namespace names.
pub fn unique(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

/// Runs a command and returns its output; panics only if it cannot be started at all.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A network namespace made by the test (`ip netns add`), deleted with all its processes.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = run(Command::new("ip").args(["netns", "del", name]));
        let out = run(Command::new("ip").args(["netns", "add", name]));
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`, asserting success.
    pub fn ip(&self, args: &[&str]) {
        let out = run(Command::new("ip").arg("-n").arg(&self.name).args(args));
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command that will run inside this namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

/// Kills every process in the named namespace and deletes it.
pub fn remove_netns(name: &str) {
    let pids = run(Command::new("ip").args(["netns", "pids", name]));
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        if let Ok(p) = pid.parse::<i32>() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL);
        }
    }
    let _ = run(Command::new("ip").args(["netns", "del", name]));
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

/// One `overlayd` under test, with its own state directory and socket.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// Namespace the daemon runs in (None: the test's own).
    pub netns: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// The overlayd binary it starts (`bin("overlayd")` unless a test set another path).
    pub exe: PathBuf,
    child: Option<Child>,
    /// A daemon of this node that is not our child: the one an upgrade in place started.
    successor: Option<u32>,
}

impl Node {
    /// Starts `overlayd --node NAME` with a fresh state directory.
    pub fn start(name: &str, extra_args: &[&str]) -> Node {
        Node::start_in(name, None, extra_args)
    }

    pub fn start_in(name: &str, netns: Option<PathBuf>, extra_args: &[&str]) -> Node {
        let dir = std::env::temp_dir().join(format!("overlay-e2e-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut node = Node {
            name: name.to_string(),
            socket: dir.join("api.sock"),
            dir,
            netns,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            exe: bin("overlayd"),
            child: None,
            successor: None,
        };
        node.launch();
        node
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("overlayd.log"))
            .expect("log file");
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--node")
            .arg(&self.name)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--log-level")
            .arg("debug")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(ns) = &self.netns {
            let f = std::fs::File::open(ns).expect("open netns");
            // SAFETY: runs in the forked child before exec; setns(2) is async-signal-safe and
            // `f` is kept open until spawn() returns.
            unsafe {
                use std::os::fd::{AsRawFd, BorrowedFd};
                let raw = f.as_raw_fd();
                cmd.pre_exec(move || {
                    nix::sched::setns(
                        BorrowedFd::borrow_raw(raw),
                        nix::sched::CloneFlags::CLONE_NEWNET,
                    )
                    .map_err(std::io::Error::from)
                });
            }
            self.child = Some(cmd.spawn().expect("spawn overlayd"));
            drop(f);
        } else {
            self.child = Some(cmd.spawn().expect("spawn overlayd"));
        }
        let sock = self.socket.clone();
        let ok = wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        assert!(
            ok,
            "overlayd {} did not come up; log:\n{}",
            self.name,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("overlayd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.successor.or(self.child.as_ref().map(|c| c.id()))
    }

    /// After an upgrade in place to `pid`: waits (15 s at most) for the old daemon, our
    /// child, to exit; from then on `pid` is this node's daemon. Returns whether the old
    /// one exited.
    pub fn upgraded_to(&mut self, pid: u32) -> bool {
        let exited = match (self.child.as_mut(), self.successor) {
            (Some(child), _) => wait_for(Duration::from_secs(15), || {
                matches!(child.try_wait(), Ok(Some(_)))
            }),
            (None, Some(old)) => wait_for(Duration::from_secs(15), || !process_alive(old)),
            (None, None) => false,
        };
        if exited {
            self.child = None;
            self.successor = Some(pid);
        }
        exited
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited within the timeout.
    pub fn stop(&mut self) -> bool {
        if let Some(pid) = self.successor.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGTERM,
            );
            let exited = wait_for(Duration::from_secs(15), || !process_alive(pid));
            if !exited {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
            return exited;
        }
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::SIGTERM,
        );
        let exited = wait_for(Duration::from_secs(15), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        exited
    }

    /// Kills the daemon without letting it clean up (a crash).
    pub fn kill(&mut self) {
        if let Some(pid) = self.successor.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
            wait_for(Duration::from_secs(5), || !process_alive(pid));
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again (after [`Node::stop`] or [`Node::kill`]) on the same state
    /// directory and socket, with the current arguments.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none() && self.successor.is_none(),
            "{} still runs",
            self.name
        );
        self.launch();
    }

    /// Starts the daemon again on the same state directory and socket.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Runs `overlayctl --socket S ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run(&mut self.ctl_cmd(args))
    }

    /// An overlayctl command for this node, not started yet (for clients run in the
    /// background).
    pub fn ctl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("overlayctl"));
        c.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs overlayctl and returns stdout, panicking with stderr if it failed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "overlayctl {args:?} failed: {}\n--- overlayd log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs overlayctl expecting failure; returns stderr.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            !out.status.success(),
            "overlayctl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ctl_ok(args)).expect("JSON output")
    }

    /// `overlayctl exec TASK -- CMD...`
    pub fn exec(&self, task: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", task, "--"];
        args.extend_from_slice(cmd);
        self.ctl(&args)
    }

    /// Waits until every task of `service` reports running, and there are `n` of them.
    pub fn wait_running(&self, service: &str, n: usize) {
        let ok = wait_for(Duration::from_secs(20), || {
            let out = self.ctl(&["service", "inspect", service]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v[0]["Running"].as_u64())
                    == Some(n as u64)
        });
        assert!(
            ok,
            "{service} did not reach {n} running tasks:\n{}\n{}",
            self.ctl_ok(&["service", "ps", service]),
            self.log()
        );
    }

    /// The address of `task` on its first network.
    pub fn task_ip(&self, task: &str) -> String {
        let v = self.task_view(task);
        v["attachments"][0]["address"]
            .as_str()
            .expect("address")
            .to_string()
    }

    /// A service's (first) VIP, from `service inspect` as Docker shapes it.
    pub fn vip_of(&self, service: &str) -> String {
        self.json(&["service", "inspect", service])[0]["Endpoint"]["VirtualIPs"][0]["Addr"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .expect("VIP")
            .to_string()
    }

    /// `overlayctl inspect TASK` (the API's task view as JSON).
    pub fn task_view(&self, task: &str) -> serde_json::Value {
        self.json(&["inspect", task])[0].clone()
    }

    /// Names of this node's task namespaces that exist right now.
    pub fn task_namespaces(&self) -> Vec<String> {
        let prefix = format!("ov-{}-", self.name);
        let mut v: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        // Whatever the daemon did not clean up (it crashed, or the test killed it).
        for ns in self.task_namespaces() {
            remove_netns(&ns);
        }
        // And the tasks' mount namespaces, pinned under /run/overlay/mntns.
        let prefix = format!("ov-{}-", self.name);
        if let Ok(dir) = std::fs::read_dir("/run/overlay/mntns") {
            for e in dir.filter_map(|e| e.ok()) {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("overlayd {} log kept in {}", self.name, self.dir.display());
        }
    }
}

/// Whether process `pid` runs (not gone, not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `ping` from `task` to `ip` gets an answer (one probe, up to three tries).
pub fn pings(node: &Node, task: &str, ip: &str) -> bool {
    (0..3).any(|_| {
        node.exec(task, &["ping", "-c", "1", "-W", "1", ip])
            .status
            .success()
    })
}

/// A test underlay: one switch namespace with a bridge, and one namespace per host, each
/// with a veth `u0` on the bridge and address 198.18.<net>.<i>/24 (198.18.0.0/15 is
/// reserved for benchmarking and never routed).
pub struct Underlay {
    pub switch: Netns,
    pub hosts: Vec<Netns>,
    pub net: u8,
}

impl Underlay {
    pub fn new(tag: &str, hosts: usize, net: u8) -> Underlay {
        let switch = Netns::new(&format!("{tag}-sw"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut u = Underlay {
            switch,
            hosts: Vec::new(),
            net,
        };
        for i in 1..=hosts {
            u.add_host(&format!("{tag}-h{i}"));
        }
        u
    }

    /// Adds a host namespace on the bridge; returns its index (address .index+1).
    pub fn add_host(&mut self, name: &str) -> usize {
        let i = self.hosts.len() + 1;
        let ns = Netns::new(name);
        let port = format!("p{i}");
        self.switch.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "u0", "netns", name,
        ]);
        self.switch
            .ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{}/24", self.addr(i)), "dev", "u0"]);
        ns.ip(&["link", "set", "u0", "up"]);
        self.hosts.push(ns);
        i
    }

    /// Underlay address of host `i` (1-based).
    pub fn addr(&self, i: usize) -> String {
        format!("198.18.{}.{}", self.net, i)
    }

    pub fn host(&self, i: usize) -> &Netns {
        &self.hosts[i - 1]
    }
}

impl Node {
    /// Starts `overlayd --init` as a cluster manager in host `i` of `u`.
    pub fn manager(name: &str, u: &Underlay, i: usize) -> Node {
        Node::manager_with(name, u, i, &[])
    }

    /// The same, with more daemon flags.
    pub fn manager_with(name: &str, u: &Underlay, i: usize, extra: &[&str]) -> Node {
        let addr = u.addr(i);
        let mut args = vec!["--advertise-addr", &addr, "--init"];
        args.extend_from_slice(extra);
        Node::start_in(name, Some(u.host(i).path()), &args)
    }

    /// Starts a node in host `i` of `u` that joins `manager`.
    pub fn worker(name: &str, u: &Underlay, i: usize, manager: &Node) -> Node {
        Node::worker_with(name, u, i, manager, &[])
    }

    /// The same, with more daemon flags.
    pub fn worker_with(name: &str, u: &Underlay, i: usize, manager: &Node, extra: &[&str]) -> Node {
        let token = manager.ctl_ok(&["cluster", "join-token", "-q"]);
        let mgr = manager.advertise().expect("manager address");
        let addr = u.addr(i);
        let mut args = vec![
            "--advertise-addr",
            &addr,
            "--join",
            &mgr,
            "--token",
            token.trim(),
        ];
        args.extend_from_slice(extra);
        Node::start_in(name, Some(u.host(i).path()), &args)
    }

    /// Drops `flag` (and its value) from the arguments of the next start.
    pub fn remove_flag(&mut self, flag: &str, with_value: bool) {
        if let Some(i) = self.extra_args.iter().position(|a| a == flag) {
            let end = if with_value { i + 2 } else { i + 1 };
            self.extra_args.drain(i..end.min(self.extra_args.len()));
        }
    }

    /// The --advertise-addr this node was started with.
    pub fn advertise(&self) -> Option<String> {
        let i = self
            .extra_args
            .iter()
            .position(|a| a == "--advertise-addr")?;
        self.extra_args.get(i + 1).cloned()
    }

    /// Node state ("ready"/"down") of `node` as this node's API reports it.
    pub fn node_state(&self, node: &str) -> String {
        // A node not (yet) known here has no state: a worker's API socket is up before its
        // join reached the manager.
        let out = self.ctl(&["node", "inspect", node]);
        if !out.status.success() {
            return String::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
        v[0]["Status"]["State"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until this node reports every one of `nodes` Ready (10 s at most).
    pub fn wait_ready(&self, nodes: &[&Node]) {
        for n in nodes {
            let ready = || self.node_state(&n.name) == "ready";
            assert!(
                wait_for(Duration::from_secs(10), ready),
                "{} did not become ready",
                n.name
            );
        }
    }

    /// A manager (`TAGa`, host 1) and a worker (`TAGb`, host 2) of `u`, the worker Ready.
    pub fn pair(tag: &str, u: &Underlay) -> (Node, Node) {
        let n1 = Node::manager(&format!("{tag}a"), u, 1);
        let n2 = Node::worker(&format!("{tag}b"), u, 2, &n1);
        n1.wait_ready(&[&n2]);
        (n1, n2)
    }

    /// The node `task` runs on.
    pub fn node_of(&self, task: &str) -> String {
        self.task_view(task)["node"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Starts `overlayctl exec TASK -- CMD... READY` in the background with its output
    /// captured, and waits until the command creates the file READY (its sign that it
    /// listens).
    pub fn exec_ready(&self, task: &str, cmd: &[&str], ready: &Path) -> Child {
        let mut args = vec!["exec", task, "--"];
        args.extend_from_slice(cmd);
        let child = self
            .ctl_cmd(&args)
            .arg(ready)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("overlayctl exec");
        assert!(
            wait_for(Duration::from_secs(10), || ready.exists()),
            "{task}: {cmd:?} did not get ready"
        );
        child
    }

    /// Panics if this node counted any drop for `reason` (`overlayctl stats`).
    pub fn assert_no_drops(&self, reason: &str) {
        let drops = &self.json(&["stats"])["drops"];
        assert!(
            drops.get(reason).is_none(),
            "{}: drops for {reason}: {drops}",
            self.name
        );
    }

    /// Of `candidates`, the task that runs on the node of `task`; panics if none does.
    pub fn task_next_to<'a>(&self, task: &str, candidates: &[&'a str]) -> &'a str {
        let node = self.node_of(task);
        candidates
            .iter()
            .find(|t| self.node_of(t) == node)
            .unwrap_or_else(|| panic!("none of {candidates:?} next to {task}"))
    }
}

/// Bytes the receiver got, from `iperf3 -J` output; panics with the output if it failed.
pub fn iperf_received(out: &Output) -> u64 {
    assert!(
        out.status.success(),
        "iperf3 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("bytes received")
}

/// Runs a 2-second iperf3 TCP test from task `client` to `server_ip`; returns bytes received.
pub fn iperf_bytes(node: &Node, client: &str, server_ip: &str) -> u64 {
    iperf_received(&node.exec(
        client,
        &[
            "iperf3",
            "-c",
            server_ip,
            "-t",
            "2",
            "-J",
            "--connect-timeout",
            "3000",
        ],
    ))
}

/// A command's standard output, trimmed.
pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The output of a command that must have succeeded (`what` names it in the failure).
pub fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        out(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    out(&o)
}

/// A fresh directory for a test's helper scripts, named after its tag.
pub fn script_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("overlay-e2e-{tag}-scripts"));
    std::fs::create_dir_all(&dir).expect("script dir");
    dir
}

/// Writes a test's helper script into `dir`; returns its path.
pub fn write_script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("script");
    p.display().to_string()
}

/// A task's HTTP server on port 8000 answering every GET with the task's name, with a real
/// server's backlog (clients may arrive by the hundred at once).
pub const WHOAMI_PY: &str = r#"
import http.server, os
name = os.environ["OVERLAY_TASK_NAME"]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer.request_queue_size = 1024
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// A task's UDP echo server on port 9000.
pub const ECHO_PY: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9000))
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"#;

/// A task's server on port 7000 (of `0.0.0.0`, or of the address given, e.g. `::`): reads
/// a whole stream until the client half-closes, then answers its SHA-256 and length.
pub const SINK_PY: &str = r#"
import socket, hashlib, threading, sys
addr = sys.argv[1] if len(sys.argv) > 1 else "0.0.0.0"
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, 7000))
s.listen(64)
def serve(c):
    h, n = hashlib.sha256(), 0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        h.update(d)
        n += len(d)
    c.sendall(f"{h.hexdigest()} {n}\n".encode())
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Sends `MB` random megabytes to HOST:PORT (a [`SINK_PY`]), half-closes, and prints
/// `intact` if the answer is their SHA-256 and length.
pub const UPLOAD_PY: &str = r#"
import socket, sys, hashlib, os
host, port, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(mb << 20)
s = socket.create_connection((host, port), timeout=30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
r = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    r += d
want = f"{hashlib.sha256(data).hexdigest()} {len(data)}"
print("intact" if r.decode().strip() == want else f"corrupt: {r!r} want {want}")
"#;

/// Python for the test clients: `ask(s)` sends one HTTP/1.1 GET on connected socket `s` and
/// returns the body (by Content-Length), or "" if the connection closed first. Put in front
/// of a client script.
pub const HTTP_ASK_PY: &str = r#"
def ask(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: whoami\r\n\r\n")
    d = b""
    while b"\r\n\r\n" not in d:
        c = s.recv(4096)
        if not c:
            return ""
        d += c
    head, body = d.split(b"\r\n\r\n", 1)
    n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(body) < n:
        c = s.recv(4096)
        if not c:
            return ""
        body += c
    return body.decode().strip()
"#;

/// Runs `overlayd --join` in host `i` and expects it to fail; returns its stderr. Its state
/// directory is its own (not that of a stopped [`Node`] of the same name).
pub fn join_fails(u: &Underlay, i: usize, name: &str, manager: &str, token: &str) -> String {
    let dir = std::env::temp_dir().join(format!("overlay-e2e-{name}-joining"));
    let _ = std::fs::remove_dir_all(&dir);
    let out = run(u
        .host(i)
        .cmd(bin("overlayd").to_str().unwrap_or_default())
        .args([
            "--node",
            name,
            "--advertise-addr",
            &u.addr(i),
            "--join",
            manager,
            "--token",
            token,
            "--state-dir",
            dir.join("state").to_str().unwrap_or_default(),
            "--socket",
            dir.join("api.sock").to_str().unwrap_or_default(),
        ]));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "join with {token:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
