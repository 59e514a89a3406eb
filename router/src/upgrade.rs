//! Upgrade in place (issue 24): `overlayctl node upgrade` or SIGUSR2 starts the binary that
//! is on disk now (the file at the path this process was started from, which may have been
//! replaced since: not `/proc/self/exe`, the old inode), with the same arguments, and hands
//! the node over to it over a Unix socket in the state directory (`STATE/upgrade.sock`):
//!
//! ```text
//!  old overlayd                                  new overlayd (its child, OVERLAYD_UPGRADE_FROM=sock)
//!  bind STATE/upgrade.sock, spawn ───────────►   connect; the old pid from SO_PEERCRED
//!  accept, the peer is the child? ◄── "ready PID"
//!  stop the control plane, API, agent (tasks
//!  left running); the mesh accepts no more,
//!  keeps its connections; keep the datapath
//!  forwarding; release lock and sockets
//!  "released" + SCM_RIGHTS(underlay fds,  ───►   start as any start does, but with the
//!   listening sockets, the drain link)           underlay sockets received (same SO_REUSEPORT
//!                                                group); adopt the tasks (queues of its own on
//!                                                their TAPs), publish the tables; the mesh
//!                                                passes the old half's segments on
//!  the mesh moves to the drain link, stop ◄─ "up"
//!  the datapath (close its queues)
//!  save its final flows, "flows"  ───────────►   offer them to its table
//!  last mesh connection ends (or the drain
//!  timeout): exit
//! ```
//!
//! Until "released" is sent nothing has changed: a binary that is missing, exits, or does not
//! say "ready" within [`READY_WAIT`] leaves this process serving, with the reason in its log
//! and in the API's answer. A successor that fails after that (no "up" within [`UP_WAIT`])
//! makes the old process start afresh from its own binary (`exec`, same pid), as a restart
//! would. See docs/ARCHITECTURE.md, "Upgrade in place".

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

/// The environment variable that tells a new overlayd where its predecessor waits. Read
/// (and removed, so that tasks do not inherit it) by `main` before anything else runs.
pub const ENV: &str = "OVERLAYD_UPGRADE_FROM";

/// How long the old process waits for the new one to say "ready".
pub const READY_WAIT: Duration = Duration::from_secs(10);
/// How long the new process waits for the old one to release the node.
pub const STOP_WAIT: Duration = Duration::from_secs(30);
/// How long the old process, released, forwards while it waits for the new one to be up.
pub const UP_WAIT: Duration = Duration::from_secs(30);
/// How long a successor retries what its predecessor may still hold for a moment (the
/// node lock, the store's lock, the API socket, the control port).
const PATIENCE: Duration = Duration::from_secs(5);

/// Whether this process is taking over from another ([`patiently`] retries).
static TAKING_OVER: AtomicBool = AtomicBool::new(false);

/// Runs `f`; while taking over, retries it for up to [`PATIENCE`] while it fails (what the
/// predecessor released may still be held by one of its tasks for a moment).
pub fn patiently<T, E>(mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    if !TAKING_OVER.load(Ordering::Relaxed) {
        return f();
    }
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The routing mesh's open listening sockets (published ports), by "tcp 8080" / "udp 9000":
/// copies, so that a successor can take them over with their backlog (no connection is
/// refused while neither process accepts).
static LISTENERS: std::sync::Mutex<BTreeMap<String, OwnedFd>> =
    std::sync::Mutex::new(BTreeMap::new());
/// Listening sockets a predecessor handed over, until the mesh opens their ports.
static INHERITED: std::sync::Mutex<BTreeMap<String, OwnedFd>> =
    std::sync::Mutex::new(BTreeMap::new());
/// At most this many fds go in the handover (one `SCM_RIGHTS` message holds 253): ports
/// beyond are opened afresh by the successor.
const MAX_HANDED_FDS: usize = 250;

/// Notes a published port's open socket (`ingress::proxy`), for a successor.
pub fn note_listener(key: &str, fd: std::os::fd::BorrowedFd) {
    if let (Ok(dup), Ok(mut l)) = (fd.try_clone_to_owned(), LISTENERS.lock()) {
        l.insert(key.to_string(), dup);
    }
}

/// Forgets a published port's socket (closed).
pub fn forget_listener(key: &str) {
    if let Ok(mut l) = LISTENERS.lock() {
        l.remove(key);
    }
}

/// The socket a predecessor handed over for the published port `key`, if any.
pub fn take_inherited(key: &str) -> Option<OwnedFd> {
    INHERITED.lock().ok()?.remove(key)
}

/// Whether a predecessor handed over a socket for the published port `key`.
pub fn has_inherited(key: &str) -> bool {
    INHERITED.lock().is_ok_and(|l| l.contains_key(key))
}

/// Closes the handed-over sockets no port of this process took (unpublished meanwhile).
pub fn drop_unclaimed() {
    if let Ok(mut l) = INHERITED.lock() {
        if !l.is_empty() {
            info!(ports = ?l.keys().collect::<Vec<_>>(), "closing handed-over ports nobody publishes");
        }
        l.clear();
    }
}

/// This process's half of the mesh endpoint's local ports (0: even, 1: odd): the other one
/// than its predecessor's, so that each one's connections are known by their local port.
static MESH_HALF: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
/// The predecessor's end of the drain link (`ingress::link::pair`) and its half: segments
/// for its ports go to it while it drains its established mesh connections.
static PREDECESSOR: std::sync::Mutex<Option<(u16, OwnedFd)>> = std::sync::Mutex::new(None);
/// The line that names the drain link in the handover ("mesh-drain HALF", its fd last).
const DRAIN_LINE: &str = "mesh-drain ";

/// This process's half of the mesh endpoint's local ports.
pub fn mesh_half() -> u16 {
    MESH_HALF.load(Ordering::Relaxed)
}

/// The link to the predecessor still draining its mesh connections, and its half (taken
/// once, by the proxy).
pub fn take_predecessor() -> Option<(u16, OwnedFd)> {
    PREDECESSOR.lock().ok()?.take()
}

/// The binary this process was started from, as its path read at start ([`remember_binary`]).
static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Notes the path of the binary this process runs, before anyone could have replaced or
/// moved it: `/proc/self/exe` follows the old file (a rename of it moves the link; a new
/// file renamed over it leaves the old one " (deleted)"), so it is read once, at start.
pub fn remember_binary() {
    if let Ok(p) = current_exe() {
        let _ = BINARY.set(p);
    }
}

fn current_exe() -> anyhow::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe").context("reading /proc/self/exe")?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe.clone(),
    })
}

/// The binary to start: the file now at the path this process was started from (the new
/// binary after an upgrade replaced it; not `/proc/self/exe`, the old inode).
pub fn binary_path() -> anyhow::Result<PathBuf> {
    match BINARY.get() {
        Some(p) => Ok(p.clone()),
        None => current_exe(),
    }
}

/// The new process, started and ready to take over.
pub struct Successor {
    pub pid: u32,
    pub binary: PathBuf,
    stream: UnixStream,
}

impl Successor {
    /// Hands the node over: this process has stopped everything but its datapath and let go
    /// of its locks and sockets; `underlay` are its underlay receiving sockets, for the
    /// successor's datapath; `drain` the successor's end of the link over which it passes
    /// this process's mesh connections' segments while they drain.
    pub fn release(&self, underlay: &[OwnedFd], drain: Option<&OwnedFd>) -> anyhow::Result<()> {
        let mut fds: Vec<RawFd> = underlay.iter().map(|f| f.as_raw_fd()).collect();
        let mut text = format!("released {}\n", underlay.len());
        // The mesh's listening sockets, copies this process holds while its proxy is gone.
        let listeners = LISTENERS
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for (key, fd) in &listeners {
            if fds.len() >= MAX_HANDED_FDS {
                warn!(port = %key, "too many published ports to hand over: the successor opens it afresh");
                continue;
            }
            fds.push(fd.as_raw_fd());
            text.push_str(key);
            text.push('\n');
        }
        // Last: a predecessor that does not know this line takes it for a port nobody
        // publishes, and closes it (its connections are then reset as before).
        if let Some(d) = drain {
            fds.push(d.as_raw_fd());
            text.push_str(&format!("{DRAIN_LINE}{}\n", mesh_half()));
        }
        let msg = text.as_bytes();
        let iov = [std::io::IoSlice::new(msg)];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let cmsgs: &[nix::sys::socket::ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let sent = nix::sys::socket::sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            cmsgs,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .context("handing the underlay sockets over")?;
        if sent != msg.len() {
            bail!("handing over: short write");
        }
        drop(listeners);
        Ok(())
    }

    /// Waits (at most [`UP_WAIT`]) until the successor says its datapath is up: `Ok(true)`;
    /// `Ok(false)` if it still runs but is not up yet (it waits for its first state, from a
    /// manager it cannot reach: it has the node and will forward once it gets it); an error
    /// if it ended.
    pub async fn wait_up(&mut self) -> anyhow::Result<bool> {
        let mut line = String::new();
        let mut r = BufReader::new(&mut self.stream);
        match tokio::time::timeout(UP_WAIT, r.read_line(&mut line)).await {
            Ok(Ok(_)) if line.trim() == "up" => Ok(true),
            Ok(Ok(_)) => bail!("the new overlayd (pid {}) ended before it was up", self.pid),
            Ok(Err(e)) => bail!("the new overlayd (pid {}): {e}", self.pid),
            Err(_) => Ok(false),
        }
    }

    /// Tells the successor that this process's final flows are saved in
    /// [`final_flows_dir`].
    pub async fn flows_saved(&mut self) {
        let _ = self.stream.write_all(b"flows\n").await;
    }
}

/// Where the old process saves its final flows (`forward::saved_flows`, in a directory of
/// their own: the successor's sweeper saves its own in the state directory meanwhile).
pub fn final_flows_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade")
}

/// Starts this process again from its own binary (`/proc/self/exe`, the old inode) with the
/// same arguments and pid: after a successor failed once this one had let go of the node.
/// Returns only on an error.
/// The failed successor may not have let go of the node's locks and ports yet (it may be
/// ending still): the restarted process is patient with them ([`patiently`]).
pub fn restart_self() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .env_remove(ENV)
        .env(RESTARTED_ENV, "1")
        .exec()
}

/// Set by [`restart_self`] for the process it starts.
const RESTARTED_ENV: &str = "OVERLAYD_RESTARTED_AFTER_UPGRADE";

/// At start: a process that [`restart_self`] started waits for what its failed successor
/// may still hold, as a successor waits for its predecessor's.
pub fn note_restart() {
    if std::env::var_os(RESTARTED_ENV).is_some() {
        TAKING_OVER.store(true, Ordering::Relaxed);
    }
}

/// Old side: starts the binary on disk with this process's arguments and waits (at most
/// [`READY_WAIT`]) until it says it is ready to take over. On an error the new process is
/// killed and nothing else has changed.
pub async fn start_successor(state_dir: &Path) -> anyhow::Result<Successor> {
    let binary = binary_path()?;
    match std::fs::metadata(&binary) {
        Ok(m) if m.is_file() => {}
        Ok(_) => bail!("the new binary {} is not a file", binary.display()),
        Err(e) => bail!("the new binary {}: {e}", binary.display()),
    }
    let sock = crate::naming::upgrade_socket(state_dir);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("binding the upgrade socket {}", sock.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("securing {}", sock.display()))?;
    }
    let result = spawn_and_wait(&binary, &sock, &listener).await;
    let _ = std::fs::remove_file(&sock);
    let (pid, stream) = result?;
    Ok(Successor {
        pid,
        binary,
        stream,
    })
}

async fn spawn_and_wait(
    binary: &Path,
    sock: &Path,
    listener: &UnixListener,
) -> anyhow::Result<(u32, UnixStream)> {
    let mut child = tokio::process::Command::new(binary)
        .args(std::env::args_os().skip(1))
        .env(ENV, sock)
        .spawn()
        .with_context(|| format!("starting the new binary {}", binary.display()))?;
    let Some(pid) = child.id() else {
        bail!("the new overlayd exited at once");
    };
    info!(pid, binary = %binary.display(), "started the new overlayd; waiting for it to be ready");
    let ready = async {
        loop {
            let (stream, _) = listener.accept().await.context("accepting")?;
            // Only the child may take over.
            match stream.peer_cred().ok().and_then(|c| c.pid()) {
                Some(p) if p as u32 == pid => {}
                _ => continue,
            }
            let mut lines = BufReader::new(stream);
            let mut line = String::new();
            lines.read_line(&mut line).await.context("reading")?;
            if line.trim() != format!("ready {pid}") {
                bail!("the new overlayd said {:?}, not ready", line.trim());
            }
            return Ok(lines.into_inner());
        }
    };
    let outcome = tokio::time::timeout(READY_WAIT, async {
        tokio::select! {
            r = ready => r,
            st = child.wait() => match st {
                Ok(st) => bail!("the new overlayd ({}) exited before taking over: {st}", binary.display()),
                Err(e) => bail!("waiting for the new overlayd: {e}"),
            },
        }
    })
    .await;
    let outcome = match outcome {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "the new overlayd ({}) did not say it was ready within {READY_WAIT:?}",
            binary.display()
        )),
    };
    match outcome {
        Ok(stream) => Ok((pid, stream)),
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(e)
        }
    }
}

/// What a new process got from its predecessor.
pub struct Handover {
    /// The predecessor's underlay receiving sockets (its `SO_REUSEPORT` group), in order.
    pub underlay: Vec<OwnedFd>,
    stream: std::os::unix::net::UnixStream,
    old: u32,
}

impl Handover {
    /// Tells the predecessor that this process's datapath is up (it then stops its own),
    /// and returns the flows it saved once it stopped forwarding (empty after a timeout).
    pub fn up(mut self, state_dir: &Path) -> Vec<datapath::conntrack::Resumable> {
        if let Err(e) = self.stream.write_all(b"up\n") {
            warn!(error = %e, old = self.old, "cannot tell the old overlayd we are up");
            return vec![];
        }
        info!(old = self.old, "up: the old overlayd stops forwarding");
        let mut line = String::new();
        let _ = self.stream.set_read_timeout(Some(UP_WAIT));
        let mut r = std::io::BufReader::new(&self.stream);
        if r.read_line(&mut line).is_err() || line.trim() != "flows" {
            warn!(
                old = self.old,
                "the old overlayd did not send its final flows"
            );
            return vec![];
        }
        let dir = final_flows_dir(state_dir);
        let flows = match crate::forward::saved_flows::load(&dir) {
            Ok((f, _)) => f,
            Err(e) => {
                warn!(error = %e, "cannot read the old overlayd's final flows");
                vec![]
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        flows
    }
}

/// New side: says "ready" to the process waiting at `sock`, then waits until it has
/// stopped all but its datapath and released the node. An error means the old process goes
/// on serving (or is gone without handing over): this one must not start.
pub fn take_over(sock: &Path) -> anyhow::Result<Handover> {
    let mut stream = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to the running overlayd at {}", sock.display()))?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .context("the upgrade socket's peer")?;
    let old = u32::try_from(cred.pid()).context("the old overlayd's pid")?;
    stream
        .write_all(format!("ready {}\n", std::process::id()).as_bytes())
        .context("telling the old overlayd we are ready")?;
    stream.set_read_timeout(Some(STOP_WAIT))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; 256]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = nix::sys::socket::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .with_context(|| format!("waiting for the old overlayd (pid {old}) to release the node"))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().context("reading the handed-over fds")? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: the kernel installed these fds in this process for this message.
            fds.extend(
                got.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let mut lines = text.lines();
    let Some(k) = lines
        .next()
        .and_then(|l| l.strip_prefix("released "))
        .and_then(|k| k.parse::<usize>().ok())
        .filter(|k| *k <= fds.len())
    else {
        bail!("the old overlayd (pid {old}) did not hand over: {text:?}");
    };
    let mut listeners = fds.split_off(k).into_iter();
    let underlay = fds;
    if let Ok(mut inherited) = INHERITED.lock() {
        for key in lines {
            let Some(fd) = listeners.next() else { break };
            match key.strip_prefix(DRAIN_LINE).map(str::parse::<u16>) {
                Some(Ok(half)) => {
                    MESH_HALF.store((half + 1) & 1, Ordering::Relaxed);
                    if let Ok(mut p) = PREDECESSOR.lock() {
                        *p = Some((half & 1, fd));
                    }
                }
                Some(Err(_)) => {}
                None => {
                    inherited.insert(key.to_string(), fd);
                }
            }
        }
    }
    TAKING_OVER.store(true, Ordering::Relaxed);
    info!(
        old,
        underlay = underlay.len(),
        "the old overlayd released the node; taking over"
    );
    Ok(Handover {
        underlay,
        stream,
        old,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The handover's messages over a real Unix socket: "ready", then "released" with the
    /// underlay sockets and a published port's listening socket, then "up" and "flows".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hands_over_sockets_and_ports() {
        let dir = std::env::temp_dir().join(format!("overlay-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("upgrade.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let udp_port = udp.local_addr().expect("addr").port();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        let tcp_port = tcp.local_addr().expect("addr").port();
        note_listener(&format!("tcp {tcp_port}"), tcp.as_fd());
        drop(tcp); // the copy keeps it listening
        let new_side = {
            let sock = sock.clone();
            let dir = dir.clone();
            std::thread::spawn(move || {
                let h = take_over(&sock).expect("take over");
                assert_eq!(h.underlay.len(), 1);
                let got = std::net::UdpSocket::from(h.underlay.into_iter().next().unwrap());
                assert_eq!(got.local_addr().expect("addr").port(), udp_port);
                let h = Handover {
                    underlay: vec![],
                    ..h
                };
                assert!(has_inherited(&format!("tcp {tcp_port}")));
                // The drain link is not a port: the predecessor had the even half, this
                // process takes the odd one.
                assert!(!has_inherited("mesh-drain 0"));
                let (half, _link) = take_predecessor().expect("drain link");
                assert_eq!((half, mesh_half()), (0, 1));
                MESH_HALF.store(0, Ordering::Relaxed);
                let port = take_inherited(&format!("tcp {tcp_port}")).expect("inherited");
                let port = std::net::TcpListener::from(port);
                assert_eq!(port.local_addr().expect("addr").port(), tcp_port);
                h.up(&dir)
            })
        };
        let (stream, _) = listener.accept().await.expect("accept");
        let mut lines = BufReader::new(stream);
        let mut line = String::new();
        lines.read_line(&mut line).await.expect("read");
        assert_eq!(line, format!("ready {}\n", std::process::id()));
        let mut old = Successor {
            pid: std::process::id(),
            binary: PathBuf::from("/bin/true"),
            stream: lines.into_inner(),
        };
        let (_mine, theirs) = crate::ingress::link::pair().expect("drain link");
        old.release(&[OwnedFd::from(udp)], Some(&theirs))
            .expect("release");
        assert!(old.wait_up().await.expect("up"));
        old.flows_saved().await;
        let flows = tokio::task::spawn_blocking(move || new_side.join().expect("new side"))
            .await
            .expect("join");
        assert!(flows.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
