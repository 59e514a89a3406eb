//! `overlayctl exec TASK -- CMD`: runs CMD inside the task's network and mount namespaces
//! (its interfaces, its resolv.conf naming 127.0.0.11, its /etc/hosts and /sys) with the
//! caller's stdin, stdout and stderr, and returns CMD's exit status, as `docker exec` does.
//! The namespaces are entered in the child between fork and exec, so no daemon round trip
//! carries the caller's terminal.

use anyhow::Context;
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;

/// Runs `cmd` in the namespace at `netns` (and the mount namespace at `mountns`, if the
/// task has one); returns the exit code to exit with.
pub fn run(netns: &Path, mountns: Option<&Path>, cmd: &[String]) -> anyhow::Result<i32> {
    let ns = File::open(netns)
        .with_context(|| format!("opening the task's namespace {}", netns.display()))?;
    let mnt = match mountns.filter(|m| m.exists()) {
        Some(m) => Some(
            File::open(m)
                .with_context(|| format!("opening the task's mount namespace {}", m.display()))?,
        ),
        None => None,
    };
    let raw = ns.as_raw_fd();
    let raw_mnt = mnt.as_ref().map(|m| m.as_raw_fd());
    let mut command = std::process::Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    // SAFETY: the closure runs in the forked child before exec and calls only setns(2), which
    // is async-signal-safe; `ns` and `mnt` stay open until spawn() has returned.
    unsafe {
        command.pre_exec(move || {
            setns(BorrowedFd::borrow_raw(raw), CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            if let Some(m) = raw_mnt {
                setns(BorrowedFd::borrow_raw(m), CloneFlags::CLONE_NEWNS)
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("overlayctl: exec {:?}: executable file not found", cmd[0]);
            return Ok(127);
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied
                && e.raw_os_error() == Some(libc_eperm()) =>
        {
            anyhow::bail!("entering the task's namespace needs root: {e}");
        }
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {
            anyhow::bail!(
                "{} is not a network namespace here: is overlayd running in another mount \
                 namespace (started with `ip netns exec`)? Start it with `nsenter --net=...`",
                netns.display()
            );
        }
        Err(e) => {
            eprintln!("overlayctl: exec {:?}: {e}", cmd[0]);
            return Ok(126);
        }
    };
    drop(ns);
    drop(mnt);
    let status = child.wait().context("waiting for the command")?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn libc_eperm() -> i32 {
    nix::errno::Errno::EPERM as i32
}
