//! Network namespaces: created from Rust (unshare + bind mount under `/run/netns/`, as
//! `ip netns add` does, so `ip netns exec` works for operators), entered by short-lived
//! threads, and removed with every process still inside them.
//!
//! A namespace is entered per thread (`setns` affects only the calling thread), so every
//! operation that needs one runs on a fresh thread that ends afterwards; the daemon's own
//! threads never change namespace.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// Where named namespaces live, shared with iproute2.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn ctx(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Creates a new network namespace and pins it at `/run/netns/<name>`. A stale namespace of
/// the same name (left by a crash) is removed first.
pub fn create(name: &str) -> io::Result<PathBuf> {
    let path = path_of(name);
    fs::create_dir_all(NETNS_DIR).map_err(ctx(format!("creating {NETNS_DIR}")))?;
    if path.exists() {
        remove(&path)?;
    }
    File::create(&path).map_err(ctx(format!("creating {}", path.display())))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| io::Error::other(format!("unshare: {e}")))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("bind-mounting to {}: {e}", target.display())))
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?;
    if let Err(e) = made {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Runs `f` on a new thread inside the namespace at `path` and returns its result.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(path).map_err(ctx(format!("opening namespace {}", path.display())))?;
    let shown = path.display().to_string();
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("entering namespace {shown}: {e}")))?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// Makes `cmd`'s child enter the network namespace `net`, and the mount namespace `mnt` if
/// given, before it execs.
pub fn spawn_inside(
    cmd: &mut std::process::Command,
    net: BorrowedFd<'_>,
    mnt: Option<BorrowedFd<'_>>,
) {
    let net = net.as_raw_fd();
    let mnt = mnt.map(|m| m.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which
    // is async-signal-safe; the fds stay open in the parent until spawn() returns, and the
    // child's copy of the descriptor table holds them too.
    unsafe {
        cmd.pre_exec(move || {
            setns(BorrowedFd::borrow_raw(net), CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            if let Some(m) = mnt {
                setns(BorrowedFd::borrow_raw(m), CloneFlags::CLONE_NEWNS)
                    .map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
}

/// The (device, inode) identity of the namespace at `path`.
fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Pids of the processes whose network namespace is the one at `path`.
pub fn pids_in(path: &Path) -> Vec<i32> {
    let Ok(id) = identity(path) else {
        return vec![];
    };
    let Ok(dir) = fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            identity(&Path::new("/proc").join(pid.to_string()).join("ns/net")).ok() == Some(id)
        })
        .collect()
}

/// Kills every process inside the namespace at `path`, unmounts and deletes it.
pub fn remove(path: &Path) -> io::Result<()> {
    for pid in pids_in(path) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    // Not mounted (a half-made namespace) is fine: the file still goes.
    let _ = umount2(path, MntFlags::MNT_DETACH);
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ctx(format!("removing {}", path.display()))(e)),
    }
}

/// Names under `/run/netns` that start with `prefix` (this node's leftovers after a crash).
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return vec![];
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}
