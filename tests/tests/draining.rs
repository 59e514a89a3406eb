//! A service changes under load and no client notices: two nodes, `web` (3 replicas with a
//! health check, published 8080:8000), a client task making one new TCP connection per
//! request at ~50 requests/s through the VIP, a client outside the cluster doing the same
//! through the routing mesh, and long downloads through the VIP (below). Every request is
//! logged; none may fail. Needs root. Underlay 198.18.23.0/24.
//!
//! - scale 3 -> 2: the task that leaves takes no new connection, and a download it serves
//!   (started just before) completes intact before it stops; back to 3: the new task, its
//!   server up but its check failing for 3 s, takes no request until its check passes;
//! - `service rm` of a second service while a download from it runs through its VIP: the
//!   download completes intact;
//! - a task made unhealthy (its health command checks a file the test removes with
//!   `overlayctl exec`) leaves the rotation on every node, is drained and restarted by its
//!   node, and comes back healthy once the file is back;
//! - rolling changes, parallelism 1, each waited for by the CLI: `service update --env-add
//!   V=2` (stop-first), `service update --update-order start-first --env-add V=3`, and
//!   `service rollback` (back to V=2). Each asserts no failed request from its start until
//!   after convergence, and that every answer after convergence comes from the new `V`
//!   (the server answers `web.1 V=2`), from all three new tasks.
//!
//! The long download runs from the start until the first update replaces its task
//! (`web.1`); each rolling change also carries a download from the slot it replaces last,
//! started before the change. Every download goes on 3 s on its task after that task was
//! replaced (left the rotation, draining), then ends, and must be intact: what a user
//! expects of a download in flight when its task is replaced, within the stop grace period
//! (10 s). (A download can outlive its task's replacement only by the grace period, so none
//! can run through all three changes.)
//!
//! The services are made through the API (`POST /services/create` on the Unix socket), which
//! takes the health check and stop grace period as JSON.

use overlay_e2e::{
    ok, require_root, run, script_dir, unique, wait_for, write_script, Node, Underlay,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The task's servers: HTTP on 8000 answering its name and `$V` (`web.1 V=1`; one thread
/// per connection), and downloads on 7000. A download client sends `SECS\n`; the server
/// answers its name, then 16 KiB chunks, each `C` + sha256(index) x 512, 50 a second, for
/// SECS seconds (0: until the client half-closes), then `D` + the chunk count and a
/// newline, and closes.
const SERVER_PY: &str = r#"
import hashlib, http.server, os, select, socket, threading, time
name = os.environ["OVERLAY_TASK_NAME"]
answer = name + " V=" + os.environ.get("V", "")
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (answer + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
def chunk(i):
    return b"C" + hashlib.sha256(str(i).encode()).digest() * 512
def download(c):
    try:
        line = b""
        while not line.endswith(b"\n"):
            d = c.recv(64)
            if not d:
                return
            line += d
        secs = float(line)
        c.sendall((name + "\n").encode())
        end = time.time() + secs if secs > 0 else None
        i = 0
        while end is None or time.time() < end:
            if end is None and select.select([c], [], [], 0)[0] and not c.recv(64):
                break
            c.sendall(chunk(i))
            i += 1
            time.sleep(0.02)
        c.sendall(f"D{i}\n".encode())
    finally:
        c.close()
def downloads():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7000))
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=download, args=(c,), daemon=True).start()
threading.Thread(target=downloads, daemon=True).start()
http.server.ThreadingHTTPServer.request_queue_size = 1024
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// The clients. `load HOST PORT RATE LOG STOP`: one new connection per request, RATE a
/// second, each logged as `TIME NAME` or `TIME ERR WHY`, until the file STOP exists; then
/// prints `TOTAL FAILED`. `download HOST PORT SECS WANT STOP`: connects until the download
/// is served by task WANT, prints `pinned`, checks every chunk, half-closes when STOP exists
/// (SECS 0), and prints `intact NAME CHUNKS SECONDS` or what broke.
const CLIENT_PY: &str = r#"
import hashlib, os, socket, sys, threading, time
cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
addr = socket.gethostbyname(host)
def ask():
    s = socket.create_connection((addr, port), timeout=3)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        d = b""
        while b"\r\n\r\n" not in d:
            c = s.recv(4096)
            if not c:
                return "ERR closed"
            d += c
        head, body = d.split(b"\r\n\r\n", 1)
        n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        while len(body) < n:
            c = s.recv(4096)
            if not c:
                return "ERR short"
            body += c
        return body.decode().strip()
    finally:
        s.close()
if cmd == "load":
    rate, log, stop = float(sys.argv[4]), sys.argv[5], sys.argv[6]
    total = failed = 0
    start = time.time()
    with open(log, "w") as f:
        while not os.path.exists(stop):
            t = time.time()
            try:
                r = ask()
            except Exception as e:
                r = "ERR " + type(e).__name__
            total += 1
            failed += r.startswith("ERR")
            f.write(f"{t:.3f} {r}\n")
            f.flush()
            wait = start + total / rate - time.time()
            if wait > 0:
                time.sleep(wait)
    print(total, failed, flush=True)
else:
    secs, want, stop = sys.argv[4], sys.argv[5], sys.argv[6]
    for _ in range(40):
        s = socket.create_connection((addr, port), timeout=5)
        s.sendall(f"{secs}\n".encode())
        f = s.makefile("rb")
        if f.readline().decode().strip() == want:
            break
        f.close()
        s.close()
    else:
        print("unpinned", flush=True)
        sys.exit(1)
    print("pinned", flush=True)
    s.settimeout(30)
    if float(secs) == 0:
        def closer():
            while not os.path.exists(stop):
                time.sleep(0.1)
            s.shutdown(socket.SHUT_WR)
        threading.Thread(target=closer, daemon=True).start()
    t0, n = time.time(), 0
    try:
        while True:
            kind = f.read(1)
            if kind == b"C":
                c = f.read(16384)
                if c != hashlib.sha256(str(n).encode()).digest() * 512:
                    print(f"corrupt chunk {n}", flush=True)
                    sys.exit(1)
                n += 1
            elif kind == b"D":
                count = int(f.readline())
                ok = count == n and f.read(1) == b""
                print(f"intact {want} {n} {time.time() - t0:.1f}" if ok else f"bad end {count} {n}", flush=True)
                break
            else:
                print(f"cut after {n} chunks ({kind!r})", flush=True)
                break
    except Exception as e:
        print(f"{type(e).__name__} after {n} chunks", flush=True)
"#;

/// Seconds since the epoch, as the clients log them.
fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `POST` of `body` to the API of `node` at `path`; panics unless it succeeds.
fn api_post(node: &Node, path: &str, body: &str) -> String {
    let url = format!("http://overlay{path}");
    let out = run(Command::new("curl")
        .args(["-sS", "--fail-with-body", "--unix-socket"])
        .arg(&node.socket)
        .args([
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            &url,
        ]));
    ok(out, &format!("POST {path} {body}"))
}

/// A service of `replicas` running the test's server on network `front` with `V=1`, and a
/// health check that passes while `HDIR/ok-SERVICE.SLOT` exists (a start-first task named
/// `web.1.ID` reads its slot's file) and the server answers. Updates and rollbacks keep
/// Docker's policies but monitor each new task for 1 s instead of 5 s: the monitor only
/// delays the end of a rollout (and the network has less time to settle before it).
fn web_service(name: &str, replicas: u32, server: &str, hdir: &Path, publish: bool) -> String {
    let check = format!(
        "test -f {}/ok-$OVERLAY_SERVICE_NAME.$OVERLAY_TASK_SLOT && \
         curl -sf -m 1 -o /dev/null http://127.0.0.1:8000/",
        hdir.display()
    );
    let ports = if publish {
        r#"[{"TargetPort": 8000, "PublishedPort": 8080}]"#
    } else {
        "[]"
    };
    format!(
        r#"{{"name": "{name}", "networks": ["front"], "replicas": {replicas},
            "command": ["python3", "{server}"], "env": ["V=1"], "ports": {ports},
            "healthcheck": {{"command": ["CMD-SHELL", "{check}"], "interval_s": 1,
                             "timeout_s": 2, "retries": 2, "start_period_s": 0}},
            "stop_grace_period_s": 10,
            "update_config": {{"monitor_ms": 1000}}, "rollback_config": {{"monitor_ms": 1000}}}}"#
    )
}

/// A client running in the background with its stdout readable line by line.
struct Bg {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Bg {
    fn spawn(mut cmd: Command) -> Bg {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Bg { child, out }
    }

    /// The next line it prints (blocking: its scripts bound their own time).
    fn line(&mut self) -> String {
        let mut l = String::new();
        let _ = self.out.read_line(&mut l);
        l.trim().to_string()
    }

    fn finish(mut self) -> String {
        let l = self.line();
        let _ = self.child.wait();
        l
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(time, answer)` of every request a load client logged.
fn log_of(path: &Path) -> Vec<(f64, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (t, r) = l.split_once(' ')?;
            Some((t.parse().ok()?, r.to_string()))
        })
        .collect()
}

fn failures(log: &[(f64, String)]) -> Vec<&(f64, String)> {
    log.iter().filter(|(_, r)| r.starts_with("ERR")).collect()
}

/// The task's status as the API of `n` shows it.
fn status(n: &Node, task: &str) -> serde_json::Value {
    n.task_view(task)["status"].clone()
}

fn healthy(n: &Node, task: &str) -> bool {
    let s = status(n, task);
    s["state"] == "running" && s["health"] == "healthy"
}

/// The task that gave an answer: `web.1` of `web.1 V=2`.
fn who(answer: &str) -> &str {
    answer.split(' ').next().unwrap_or_default()
}

/// The current tasks of `web` (`/tasks?service=web`: not the history) as `(slot, name, id)`;
/// empty if the API did not answer.
fn web_tasks(n: &Node) -> Vec<(u64, String, String)> {
    let out = run(Command::new("curl")
        .args(["-s", "--max-time", "2", "--unix-socket"])
        .arg(&n.socket)
        .arg("http://overlay/tasks?service=web"));
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    all.iter()
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            (t["slot"].as_u64().unwrap_or_default(), s("name"), s("id"))
        })
        .collect()
}

/// How long a download goes on after its task was replaced before its client ends it:
/// longer than a node keeps a leaving task before it counts its connections
/// (`SETTLE_LEFT`, 2 s), so the drain has to wait for it, and well inside the stop grace
/// period (10 s).
const AFTER_LEFT: f64 = 3.0;

/// What the rolling changes need of the test's setup.
struct Rig<'a> {
    manager: &'a Node,
    /// The node of `client.1`, the task that makes the requests through the VIP and the
    /// downloads.
    client_node: &'a Node,
    client_py: String,
    dir: std::path::PathBuf,
    vip_log: std::path::PathBuf,
    mesh_log: std::path::PathBuf,
}

impl Rig<'_> {
    /// A download from `client.1` through the VIP of `host`, served by task `want`
    /// (reconnecting until it is), `secs` long, or until the file `stop` exists (`0`).
    fn download(&self, want: &str, host: &str, secs: &str, stop: &Path) -> Bg {
        let stop = stop.display().to_string();
        #[rustfmt::skip]
        let mut d = Bg::spawn(self.client_node.ctl_cmd(&[
            "exec", "client.1", "--", "python3", &self.client_py, "download", host, "7000", secs, want, &stop,
        ]));
        assert_eq!(d.line(), "pinned", "download from {want}");
        d
    }

    /// An endless download from the current task of `slot` of `web`, to be ended
    /// [`AFTER_LEFT`] after that task is replaced.
    fn inflight(&self, slot: u64) -> Inflight {
        let (_, task, id) = web_tasks(self.manager)
            .into_iter()
            .find(|t| t.0 == slot)
            .unwrap_or_else(|| panic!("no task in slot {slot} of web"));
        let stop = self.dir.join(format!("stop-{id}"));
        let bg = self.download(&task, "web", "0", &stop);
        Inflight {
            bg,
            task,
            id,
            stop,
            left: None,
        }
    }
}

/// A download whose task a rolling change replaces while it runs.
struct Inflight {
    bg: Bg,
    /// The task serving it, and its id.
    task: String,
    id: String,
    /// The file that tells its client to end it.
    stop: std::path::PathBuf,
    /// When its task left the service's current tasks.
    left: Option<f64>,
}

/// One rolling change of `web` (3 replicas, parallelism 1) under the load: `overlayctl
/// COMMAND`, which waits until the service converges. Besides `inflight`, a download from the
/// slot the change replaces last runs from before the change until [`AFTER_LEFT`] after its
/// task left. Asserts: the change converges; no request fails from its start until 30
/// requests of each client came after convergence; every one of those comes from `V=v`, and
/// from all three new tasks; every download is intact. Prints what it measured.
fn roll(rig: &Rig, what: &str, command: &str, v: &str, mut inflight: Vec<Inflight>) {
    let began = epoch();
    inflight.push(rig.inflight(3));
    let args: Vec<&str> = command.split(' ').collect();
    let cmd = rig.manager.ctl_cmd(&args);
    let cli = std::thread::spawn(move || {
        let mut cmd = cmd;
        (cmd.output(), epoch())
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids: Vec<String> = web_tasks(rig.manager).into_iter().map(|t| t.2).collect();
        let now = epoch();
        for d in &mut inflight {
            if d.left.is_none() && !ids.is_empty() && !ids.contains(&d.id) {
                d.left = Some(now);
            }
            if d.left.is_some_and(|l| now - l >= AFTER_LEFT) && !d.stop.exists() {
                std::fs::write(&d.stop, "").expect("download stop file");
            }
        }
        if cli.is_finished() && inflight.iter().all(|d| d.stop.exists()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not converged after 60 s, or a download's task not replaced: {}",
            rig.manager.ctl_ok(&["service", "ps", "web"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (out, converged) = cli.join().expect("overlayctl thread");
    let out = out.expect("overlayctl");
    let progress = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && progress.contains("verify: Service converged"),
        "{what}: {progress}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut downloads = Vec::new();
    for d in inflight {
        let got = d.bg.finish();
        let left = d.left.unwrap_or_default() - began;
        assert!(
            got.starts_with(&format!("intact {} ", d.task)),
            "{what}: the download from {} (replaced {left:.1} s into the change): {got}",
            d.task
        );
        downloads.push(format!("{} replaced at {left:.1} s, then {got}", d.task));
    }
    let after = |log: &Path| log_of(log).iter().filter(|(t, _)| *t > converged).count();
    assert!(
        wait_for(Duration::from_secs(10), || after(&rig.vip_log) >= 30
            && after(&rig.mesh_log) >= 30),
        "{what}: no load after convergence"
    );
    let ended = epoch();
    let mut counts = Vec::new();
    for (via, path) in [("VIP", &rig.vip_log), ("mesh", &rig.mesh_log)] {
        let log = log_of(path);
        let during: Vec<&(f64, String)> = log
            .iter()
            .filter(|(t, _)| *t >= began && *t < ended)
            .collect();
        let failed: Vec<_> = during
            .iter()
            .filter(|(_, r)| r.starts_with("ERR"))
            .collect();
        assert!(
            failed.is_empty(),
            "{what}: failed requests through the {via}: {failed:?}"
        );
        let since: Vec<&str> = during
            .iter()
            .filter(|(t, _)| *t > converged)
            .map(|(_, r)| r.as_str())
            .collect();
        let stale: Vec<&&str> = since
            .iter()
            .filter(|r| !r.ends_with(&format!(" V={v}")))
            .collect();
        assert!(
            stale.is_empty(),
            "{what}: answers through the {via} after convergence not from V={v}: {stale:?}"
        );
        let tasks: BTreeSet<&str> = since.iter().map(|r| who(r)).collect();
        assert_eq!(
            tasks.len(),
            3,
            "{what}: tasks answering through the {via} after convergence: {tasks:?}"
        );
        counts.push(format!(
            "{via} {} requests, {} failed, {} after convergence all V={v}",
            during.len(),
            failed.len(),
            since.len()
        ));
    }
    eprintln!(
        "{what}: converged {:.1} s after it began; {}; downloads: {}",
        converged - began,
        counts.join("; "),
        downloads.join("; ")
    );
}

#[test]
fn changes_under_load_fail_no_request() {
    if !require_root("changes_under_load_fail_no_request") {
        return;
    }
    let tag = unique("dr");
    let dir = script_dir(&tag);
    let server = write_script(&dir, "server.py", SERVER_PY);
    let client = write_script(&dir, "client.py", CLIENT_PY);
    for i in 1..=3 {
        std::fs::write(dir.join(format!("ok-web.{i}")), "").expect("health file");
    }
    std::fs::write(dir.join("ok-old.1"), "").expect("health file");
    let stop_file = dir.join("stop");
    let _ = std::fs::remove_file(&stop_file);

    let mut u = Underlay::new(&tag, 2, 23);
    let outside = u.add_host(&format!("{tag}-cl"));
    let (n1, n2) = Node::pair(&tag, &u);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.40.0/24", "front"]);
    api_post(
        &n1,
        "/services/create",
        &web_service("web", 3, &server, &dir, true),
    );
    api_post(
        &n1,
        "/services/create",
        &web_service("old", 1, &server, &dir, false),
    );
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "client", "--network", "front", "--", "sleep", "infinity"]);
    n1.wait_running("client", 1);
    n1.wait_running("web", 3);
    n1.wait_running("old", 1);
    let t0 = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || (1..=3)
            .all(|i| healthy(&n1, &format!("web.{i}")))
            && healthy(&n1, "old.1")),
        "not healthy: {}",
        n1.ctl_ok(&["service", "ps", "web"])
    );
    eprintln!(
        "health: every task healthy {:?} after running",
        t0.elapsed()
    );
    let c = "client.1";
    let cn = if n1.node_of(c) == n1.name { &n1 } else { &n2 };
    let node_of: BTreeMap<String, String> = (1..=3)
        .map(|i| format!("web.{i}"))
        .map(|t| (t.clone(), n1.node_of(&t)))
        .collect();
    eprintln!("placement: client on {}, web on {node_of:?}", cn.name);

    let stop = stop_file.display().to_string();
    let vip_log = dir.join("vip.log");
    let mesh_log = dir.join("mesh.log");
    let vip_load = Bg::spawn(cn.ctl_cmd(&[
        "exec",
        c,
        "--",
        "python3",
        &client,
        "load",
        "web",
        "8000",
        "50",
        &vip_log.display().to_string(),
        &stop,
    ]));
    let mut mesh = u.host(outside).cmd("python3");
    mesh.args([
        &client,
        "load",
        &u.addr(2),
        "8080",
        "50",
        &mesh_log.display().to_string(),
        &stop,
    ]);
    let mesh_load = Bg::spawn(mesh);
    let rig = Rig {
        manager: &n1,
        client_node: cn,
        client_py: client.clone(),
        dir: dir.clone(),
        vip_log: vip_log.clone(),
        mesh_log: mesh_log.clone(),
    };
    let download = |want: &str, host: &str, secs: &str| rig.download(want, host, secs, &stop_file);
    // The long download, from a replica that stays until the first update replaces it.
    let long = rig.inflight(1);
    assert_eq!(long.task, "web.1");
    assert!(wait_for(Duration::from_secs(10), || log_of(&vip_log).len()
        > 50
        && log_of(&mesh_log).len() > 50));

    // Scale down: web.3 drains. A download it serves, started just before, completes.
    let drained = download("web.3", "web", "6");
    let t = Instant::now();
    let old_ns = format!("ov-{}-web.3", node_of["web.3"]);
    let scaled_down = epoch();
    n1.ctl_ok(&["service", "scale", "web=2"]);
    let got = drained.finish();
    let download_done = t.elapsed();
    assert!(got.starts_with("intact web.3"), "draining download: {got}");
    let web3_node = if node_of["web.3"] == n1.name {
        &n1
    } else {
        &n2
    };
    assert!(
        wait_for(Duration::from_secs(20), || !web3_node
            .task_namespaces()
            .contains(&old_ns)),
        "web.3 not stopped"
    );
    eprintln!(
        "scale 3->2: web.3's download ended intact {download_done:?} after the scale ({got}); \
         web.3 gone after {:?}",
        t.elapsed()
    );
    // Back to 3, the new web.3 not ready at first: its server answers, its check fails
    // (no file) for 3 s. It takes no request until its check passes.
    let ok3 = dir.join("ok-web.3");
    std::fs::remove_file(&ok3).expect("health file");
    let t = Instant::now();
    let scaled_up = epoch();
    n1.ctl_ok(&["service", "scale", "web=3"]);
    assert!(wait_for(Duration::from_secs(20), || status(&n1, "web.3")
        ["state"]
        == "running"));
    std::thread::sleep(Duration::from_secs(3));
    let unready = epoch();
    std::fs::write(&ok3, "").expect("health file");
    assert!(wait_for(Duration::from_secs(20), || healthy(&n1, "web.3")));
    let healthy_after = t.elapsed();
    assert!(
        wait_for(Duration::from_secs(10), || log_of(&vip_log)
            .iter()
            .chain(&log_of(&mesh_log))
            .any(|(t, r)| *t > unready && who(r) == "web.3")),
        "the new web.3 takes no traffic"
    );
    let before_ready = log_of(&vip_log)
        .iter()
        .chain(&log_of(&mesh_log))
        .filter(|(t, r)| *t > scaled_up && *t < unready && who(r) == "web.3")
        .count();
    assert_eq!(before_ready, 0, "requests to web.3 before it was healthy");
    eprintln!(
        "scale 2->3: the new web.3 ran {:.1} s with a failing check and took no request; \
         healthy {healthy_after:?} after the scale, then served",
        unready - scaled_up
    );

    // service rm of the second service while a download from it runs through its VIP.
    let old_node = n1.node_of("old.1");
    let from_old = download("old.1", "old", "5");
    let t = Instant::now();
    n1.ctl_ok(&["service", "rm", "old"]);
    let got = from_old.finish();
    assert!(
        got.starts_with("intact old.1"),
        "download from a removed service: {got}"
    );
    eprintln!(
        "service rm: old.1 (on {old_node}): its download ended intact {:?} after the rm",
        t.elapsed()
    );

    // A task made unhealthy: one on the node without the client (its status must travel).
    let sick = (2..=3)
        .map(|i| format!("web.{i}"))
        .find(|t| n1.node_of(t) != cn.name)
        .unwrap_or_else(|| "web.2".into());
    let sick_node = if n1.node_of(&sick) == n1.name {
        &n1
    } else {
        &n2
    };
    let other = if sick_node.name == n1.name { &n2 } else { &n1 };
    let restarts = status(&n1, &sick)["restarts"].as_u64().unwrap_or(0);
    let file = dir.join(format!("ok-{sick}")).display().to_string();
    let removed = epoch();
    ok(
        sick_node.exec(&sick, &["rm", "-f", &file]),
        "rm health file",
    );
    // When its own node, and the other one, see it unhealthy (the status travels from its
    // node to the manager and back to every node).
    let (mut seen_here, mut seen_there) = (None, None);
    assert!(
        wait_for(Duration::from_secs(10), || {
            for (n, seen) in [(sick_node, &mut seen_here), (other, &mut seen_there)] {
                if seen.is_none() && status(n, &sick)["health"] == "unhealthy" {
                    *seen = Some(epoch() - removed);
                }
            }
            seen_here.is_some() && seen_there.is_some()
        }),
        "{sick} not unhealthy: {}",
        status(&n1, &sick)
    );
    // Its node drains it (3 s to settle), stops it and restarts it: back once the file is.
    let mut error = String::new();
    assert!(
        wait_for(Duration::from_secs(20), || {
            let st = status(sick_node, &sick);
            if let Some(e) = st["error"].as_str() {
                error = e.to_string();
            }
            st["restarts"].as_u64().unwrap_or(0) > restarts
        }),
        "{sick} not restarted: {}",
        status(&n1, &sick)
    );
    let restarted = epoch() - removed;
    std::thread::sleep(Duration::from_secs(1));
    ok(
        sick_node.exec(&sick, &["touch", &file]),
        "restore health file",
    );
    let restored = epoch();
    assert!(
        wait_for(Duration::from_secs(20), || healthy(&n1, &sick)),
        "{sick} not healthy again: {}",
        status(&n1, &sick)
    );
    assert!(
        wait_for(Duration::from_secs(10), || log_of(&vip_log)
            .iter()
            .chain(&log_of(&mesh_log))
            .any(|(t, r)| *t > restored && who(r) == sick)),
        "{sick} takes no traffic after it is healthy again"
    );
    let back = epoch() - restored;

    // Rolling changes: each replaces the three tasks one at a time. The long download
    // ends 3 s after the first update replaced its task.
    roll(
        &rig,
        "update V=2 (stop-first)",
        "service update --env-add V=2 web",
        "2",
        vec![long],
    );
    let start_first = "service update --update-order start-first --env-add V=3 web";
    roll(&rig, "update V=3 (start-first)", start_first, "3", vec![]);
    roll(&rig, "rollback to V=2", "service rollback web", "2", vec![]);

    std::fs::write(&stop_file, "").expect("stop file");
    let vip_summary = vip_load.finish();
    let mesh_summary = mesh_load.finish();
    let (vip, mesh) = (log_of(&vip_log), log_of(&mesh_log));
    // The last request `task` answered between `from` and `to`, in seconds after `from`.
    let last = |log: &[(f64, String)], task: &str, from: f64, to: f64| {
        log.iter()
            .filter(|(t, r)| *t > from && *t < to && who(r) == task)
            .map(|(t, _)| t - from)
            .fold(0.0, f64::max)
    };
    let web3_last = last(&vip, "web.3", scaled_down, scaled_up).max(last(
        &mesh,
        "web.3",
        scaled_down,
        scaled_up,
    ));
    let sick_vip = last(&vip, &sick, removed, restored);
    let sick_mesh = last(&mesh, &sick, removed, restored);
    let rate = |log: &[(f64, String)]| {
        let span = log.last().map_or(0.0, |l| l.0) - log.first().map_or(0.0, |l| l.0);
        log.len() as f64 / span.max(1.0)
    };
    let (here, there) = (
        seen_here.unwrap_or_default(),
        seen_there.unwrap_or_default(),
    );
    eprintln!("scale 3->2: the last request web.3 answered came {web3_last:.2} s after the scale");
    eprintln!(
        "unhealthy {sick} (on {}): its file went at 0; unhealthy on its node at {here:.1} s, \
         on the other at {there:.1} s (interval 1 s x retries 2); the last request it \
         answered: {sick_vip:.2} s through the VIP (client on {}), {sick_mesh:.2} s through \
         the mesh (entered at {}); restarted at {restarted:.1} s ({error}); answered again \
         {back:.1} s after the file came back",
        sick_node.name, cn.name, n2.name,
    );
    eprintln!(
        "load: VIP {} requests at {:.0}/s ({vip_summary}), mesh {} at {:.0}/s \
         ({mesh_summary})",
        vip.len(),
        rate(&vip),
        mesh.len(),
        rate(&mesh)
    );
    assert!(
        failures(&vip).is_empty() && failures(&mesh).is_empty(),
        "failed requests: VIP {:?}, mesh {:?}",
        failures(&vip),
        failures(&mesh)
    );
    // The task that left took no new connection once every node had the change.
    assert!(
        web3_last < 2.0,
        "web.3 answered {web3_last:.2} s after the scale"
    );
    assert!(error.starts_with("unhealthy: "), "{error}");
    // It leaves within interval x retries, plus the time its status takes to reach the
    // other node (measured above), plus a second of slack for a loaded machine.
    let bound = 2.0 + (there - here).max(0.0) + 1.0;
    let last_served = sick_vip.max(sick_mesh);
    assert!(
        last_served < bound,
        "{sick} answered {last_served:.2} s after its file went (bound {bound:.1} s)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
