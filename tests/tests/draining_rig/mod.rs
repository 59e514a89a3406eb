//! The load rig of the draining test (`draining.rs`): the task's servers and the clients
//! (Python, run inside tasks and outside the cluster), the clients run in the background,
//! their logs, and downloads pinned to a task. [`rolling`] holds the rolling changes.

pub mod rolling;

use overlay_e2e::Node;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// The task's servers: HTTP on 8000 answering its name and `$V` (`web.1 V=1`; one thread
/// per connection), and downloads on 7000. A download client sends `SECS\n`; the server
/// answers its name, then 16 KiB chunks, each `C` + sha256(index) x 512, 50 a second, for
/// SECS seconds (0: until the client half-closes), then `D` + the chunk count and a
/// newline, and closes.
pub const SERVER_PY: &str = r#"
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
pub const CLIENT_PY: &str = r#"
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
pub fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A client running in the background with its stdout readable line by line.
pub struct Bg {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Bg {
    pub fn spawn(mut cmd: Command) -> Bg {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Bg { child, out }
    }

    /// The next line it prints (blocking: its scripts bound their own time).
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        let _ = self.out.read_line(&mut l);
        l.trim().to_string()
    }

    pub fn finish(mut self) -> String {
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
pub fn log_of(path: &Path) -> Vec<(f64, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (t, r) = l.split_once(' ')?;
            Some((t.parse().ok()?, r.to_string()))
        })
        .collect()
}

pub fn failures(log: &[(f64, String)]) -> Vec<&(f64, String)> {
    log.iter().filter(|(_, r)| r.starts_with("ERR")).collect()
}

/// The task that gave an answer: `web.1` of `web.1 V=2`.
pub fn who(answer: &str) -> &str {
    answer.split(' ').next().unwrap_or_default()
}

/// Where the load runs: the manager, the client task `client.1` (on `client_node`) with the
/// client script, and the load clients' logs; `dir` holds the stop files of downloads.
pub struct Rig<'a> {
    pub manager: &'a Node,
    /// The node of `client.1`, the task that makes the requests through the VIP and the
    /// downloads.
    pub client_node: &'a Node,
    pub client_py: String,
    pub dir: PathBuf,
    pub vip_log: PathBuf,
    pub mesh_log: PathBuf,
}

impl Rig<'_> {
    /// A download from `client.1` through the VIP of `host`, served by task `want`
    /// (reconnecting until it is), `secs` long, or until the file `stop` exists (`0`).
    pub fn download(&self, want: &str, host: &str, secs: &str, stop: &Path) -> Bg {
        let stop = stop.display().to_string();
        #[rustfmt::skip]
        let mut d = Bg::spawn(self.client_node.ctl_cmd(&[
            "exec", "client.1", "--", "python3", &self.client_py, "download", host, "7000", secs, want, &stop,
        ]));
        assert_eq!(d.line(), "pinned", "download from {want}");
        d
    }
}
