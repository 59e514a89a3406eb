//! Upgrade in place (issue 24): `overlayctl node upgrade` or SIGUSR2 starts the binary that
//! is on disk now (the file at the path this process was started from, which may have been
//! replaced since: not `/proc/self/exe`, the old inode), with the same arguments, and hands
//! the node over to it over a Unix socket in the state directory (`STATE/upgrade.sock`):
//!
//! ```text
//!  old overlayd                                 new overlayd (its child, OVERLAYD_UPGRADE_FROM=sock)
//!  bind STATE/upgrade.sock, spawn ──────────►   connect; pidfd(old) from SO_PEERCRED
//!  accept, peer is the child?  ◄── "ready PID"
//!  "stopping" ─────────────────────────────►   (committed) wait for the old to exit
//!  shut down as on SIGTERM (tasks left         …
//!  running), save the final flows, exit  ───►  pidfd readable: start as any start does
//!                                              (lock, sockets, adopt the tasks, saved flows)
//! ```
//!
//! Until "stopping" is sent nothing has changed: a binary that is missing, exits, or does not
//! say "ready" within [`READY_WAIT`] leaves this process serving, with the reason in its log
//! and in the API's answer. See docs/ARCHITECTURE.md, "Upgrade in place", for what is handed
//! over and what is not yet.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::info;

/// The environment variable that tells a new overlayd where its predecessor waits. Read
/// (and removed, so that tasks do not inherit it) by `main` before anything else runs.
pub const ENV: &str = "OVERLAYD_UPGRADE_FROM";

/// How long the old process waits for the new one to say "ready".
pub const READY_WAIT: Duration = Duration::from_secs(10);
/// How long the new process waits for the old one to answer "ready", then to exit.
pub const STOP_WAIT: Duration = Duration::from_secs(60);

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
    /// Commits the handover: from here on this process shuts down and the successor waits
    /// for it to exit.
    pub async fn commit(&mut self) -> anyhow::Result<()> {
        self.stream
            .write_all(b"stopping\n")
            .await
            .context("telling the new overlayd to take over")
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

/// New side: says "ready" to the process waiting at `sock`, then waits until it has
/// committed and exited (its node lock, sockets and datapath are then free). An error means
/// the old process goes on serving (or is gone without handing over): this one must not start.
pub async fn take_over(sock: &Path) -> anyhow::Result<()> {
    let stream = UnixStream::connect(sock)
        .await
        .with_context(|| format!("connecting to the running overlayd at {}", sock.display()))?;
    let old = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .context("the upgrade socket's peer has no pid")?;
    let old = u32::try_from(old).context("the old overlayd's pid")?;
    let exited = crate::sys::pidfd::watch(
        crate::sys::pidfd::open(old).with_context(|| format!("pidfd of the old overlayd {old}"))?,
    )?;
    let mut lines = BufReader::new(stream);
    lines
        .get_mut()
        .write_all(format!("ready {}\n", std::process::id()).as_bytes())
        .await
        .context("telling the old overlayd we are ready")?;
    let mut line = String::new();
    match tokio::time::timeout(STOP_WAIT, lines.read_line(&mut line)).await {
        Ok(Ok(_)) if line.trim() == "stopping" => {}
        Ok(Ok(_)) => bail!("the old overlayd (pid {old}) did not hand over"),
        Ok(Err(e)) => bail!("the old overlayd (pid {old}): {e}"),
        Err(_) => bail!("the old overlayd (pid {old}) did not answer within {STOP_WAIT:?}"),
    }
    info!(old, "taking over: waiting for the old overlayd to stop");
    let started = std::time::Instant::now();
    match tokio::time::timeout(STOP_WAIT, exited.readable()).await {
        Ok(_) => {
            info!(old, waited = ?started.elapsed(), "the old overlayd stopped; starting");
            Ok(())
        }
        Err(_) => bail!("the old overlayd (pid {old}) did not stop within {STOP_WAIT:?}"),
    }
}
