//! A task's mount namespace, as `ip netns exec` makes one but kept for the task's life:
//! `/etc/resolv.conf` and `/etc/hosts` bound from the task's own files, and `/sys` mounted
//! afresh so that it shows the task's network namespace. Pinned by a bind mount under
//! [`MNTNS_DIR`] so that the task's process and `overlayctl exec` can enter it.
//!
//! A mount namespace can only be pinned from the namespace it was made in, onto a mount that
//! does not propagate into it: [`MNTNS_DIR`] is made a private mount of its own, and a
//! helper thread (which unshares, sets up, and then waits) has its namespace bound there by
//! the daemon's own thread.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Where task mount namespaces are pinned.
pub const MNTNS_DIR: &str = "/run/overlay/mntns";

pub fn path_of(name: &str) -> PathBuf {
    Path::new(MNTNS_DIR).join(name)
}

fn err(what: impl std::fmt::Display) -> impl FnOnce(nix::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// Makes [`MNTNS_DIR`] a private mount of itself, once.
fn prepare_dir() -> io::Result<()> {
    fs::create_dir_all(MNTNS_DIR)?;
    let mounted = fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(MNTNS_DIR));
    if !mounted {
        mount(
            Some(MNTNS_DIR),
            MNTNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err(format!("bind-mounting {MNTNS_DIR}")))?;
    }
    mount(
        None::<&str>,
        MNTNS_DIR,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err(format!("making {MNTNS_DIR} private")))
}

/// Sets up the namespace in the calling (helper) thread.
fn setup(netns: &File, binds: &[(PathBuf, &str)]) -> io::Result<()> {
    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(err("entering the network namespace"))?;
    unshare(CloneFlags::CLONE_NEWNS).map_err(err("unshare(CLONE_NEWNS)"))?;
    // Nothing done here may leak back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(err("making / a slave mount"))?;
    for (from, to) in binds {
        mount(
            Some(from.as_path()),
            *to,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err(format!("binding {} over {to}", from.display())))?;
    }
    let _ = umount2("/sys", MntFlags::MNT_DETACH);
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(err("mounting /sys"))
}

/// Creates the mount namespace pinned at `path` for the task whose network namespace is at
/// `netns`, with `resolv_conf` and `hosts` in place of the host's.
pub fn create(path: &Path, netns: &Path, resolv_conf: &Path, hosts: &Path) -> io::Result<()> {
    prepare_dir()?;
    if path.exists() {
        remove(path)?;
    }
    File::create(path)?;
    let net = File::open(netns)?;
    let binds = vec![
        (resolv_conf.to_path_buf(), "/etc/resolv.conf"),
        (hosts.to_path_buf(), "/etc/hosts"),
    ];
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<i32>>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let helper = std::thread::spawn(move || {
        let r = setup(&net, &binds).map(|()| nix::unistd::gettid().as_raw());
        let _ = ready_tx.send(r);
        // Stay alive (and in the namespace) until it is pinned.
        let _ = done_rx.recv();
    });
    let pinned = ready_rx
        .recv()
        .map_err(|_| io::Error::other("mount namespace helper died"))
        .and_then(|r| r)
        .and_then(|tid| {
            let ns = format!("/proc/self/task/{tid}/ns/mnt");
            mount(
                Some(ns.as_str()),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(err(format!(
                "pinning the mount namespace at {}",
                path.display()
            )))
        });
    let _ = done_tx.send(());
    let _ = helper.join();
    if pinned.is_err() {
        let _ = fs::remove_file(path);
    }
    pinned
}

/// Unpins and deletes a task's mount namespace (gone once its last process exits).
pub fn remove(path: &Path) -> io::Result<()> {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
