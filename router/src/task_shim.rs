//! A task's shim: the small process between overlayd and a task's process, so that the task
//! outlives overlayd (a stop, a crash, an upgrade) as a container outlives dockerd with
//! containerd-shim or conmon.
//!
//! overlayd starts the shim (its own binary again: `overlayd task-shim`) inside the task's
//! network and mount namespaces, in a process group of its own. The shim starts the task's command
//! (in a process group of its own, stdin from /dev/null), writes its pid on its stdout (a pipe
//! overlayd reads once), copies the command's output into the task's log ([`task_log`]: the
//! shim is the pipe's reader, so the task never sees EPIPE when overlayd is gone), waits for
//! it, writes how it ended into the task's exit file, and exits. It is std only and
//! blocking: one thread copies, the main one waits.
//!
//! overlayd keeps the pair in a [`Record`] in the task's directory of its state dir (shim and
//! process, each with its pid and start time) and holds both by pidfd ([`Shim`]): the shim's
//! tells when the task ended, the process's carries the signals (SIGTERM to stop, SIGKILL
//! after the grace period). A restarted overlayd adopts the pair from the record if both
//! pids still name the same processes (their start times match), so a reused pid is never
//! adopted.

use crate::durable;
use crate::sys::{netns, pidfd};
use crate::task_log::{self, LogFile};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// The subcommand of `overlayd` that runs a shim.
pub const SUBCOMMAND: &str = "task-shim";
/// How long the shim keeps copying output after its command exited (what the command's own
/// children still write), before it exits.
const LINGER: Duration = Duration::from_secs(1);

/// Which processes run a task, as overlayd wrote them down when it started them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The task's id: a record of an earlier task of the same name is not adopted.
    pub task_id: String,
    pub shim_pid: u32,
    pub shim_start: u64,
    pub pid: u32,
    pub pid_start: u64,
}

// ---- The shim process ----

/// `overlayd task-shim --log PATH --exit PATH -- COMMAND...`: runs COMMAND as described in
/// the module doc. Exit code 0 once COMMAND ended (how is in the exit file), 127 if it could
/// not be started (the reason is on stdout), 2 on bad arguments.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let Some((log, exit, argv)) = parse_args(args) else {
        eprintln!("usage: overlayd {SUBCOMMAND} --log PATH --exit PATH -- COMMAND...");
        return ExitCode::from(2);
    };
    // Out of overlayd's process group: a terminal's ^C (sent to the foreground group) does
    // not reach the task. Not out of its session: with the kernel's autogroup scheduling
    // every session is a CPU group of its own, and a task in one of its own competes with
    // the router as an equal (measured: a stream across nodes at 0.58–0.65 of the kernel's
    // instead of 0.82–0.86, `benches/e2e-compare.sh`).
    let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return refuse(&format!("making the output's pipe: {e}")),
    };
    let spawned = writer.try_clone().and_then(|w2| {
        Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(w2)
            .current_dir("/")
            .process_group(0)
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return refuse(&format!("starting {:?}: {e}", argv[0])),
    };
    // The command's pid, for overlayd; nothing else is written there. (An overlayd gone
    // meanwhile is no reason to stop: the next one adopts by the record, or removes.)
    let _ = writeln!(std::io::stdout(), "{}", child.id());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        copy_output(reader, &log);
        let _ = done_tx.send(());
    });
    let ended = match child.wait() {
        Ok(s) => format!("process exited ({s})"),
        Err(e) => format!("waiting for process: {e}"),
    };
    let _ = done_rx.recv_timeout(LINGER);
    if let Err(e) = durable::write_atomic(&exit, ended.as_bytes(), 0o600) {
        eprintln!("writing {}: {e}", exit.display());
    }
    ExitCode::SUCCESS
}

fn parse_args(args: Vec<OsString>) -> Option<(PathBuf, PathBuf, Vec<OsString>)> {
    let mut it = args.into_iter();
    let (mut log, mut exit) = (None, None);
    loop {
        let a = it.next()?;
        match a.to_str()? {
            "--log" => log = Some(PathBuf::from(it.next()?)),
            "--exit" => exit = Some(PathBuf::from(it.next()?)),
            "--" => break,
            _ => return None,
        }
    }
    let argv: Vec<OsString> = it.collect();
    (!argv.is_empty()).then_some((log?, exit?, argv))
}

/// Tells overlayd why the command could not start.
fn refuse(why: &str) -> ExitCode {
    let _ = writeln!(std::io::stdout(), "error: {why}");
    ExitCode::from(127)
}

/// Copies the command's output into its log ([`task_log::copy`]); a log that cannot be
/// opened drops it (the task never blocks on a full pipe).
fn copy_output(from: std::io::PipeReader, log: &Path) {
    match LogFile::open(log, task_log::MAX_SIZE, task_log::MAX_FILES) {
        Ok(mut file) => {
            if let Err(e) = task_log::copy(from, &mut file) {
                eprintln!("copying the task's output to {}: {e}", log.display());
            }
        }
        Err(e) => {
            eprintln!("opening {}: {e}", log.display());
            let _ = std::io::copy(&mut { from }, &mut std::io::sink());
        }
    }
}

// ---- overlayd's side ----

/// Where a task's process is started: its namespaces, its environment, its files.
pub struct Launch<'a> {
    pub command: &'a [String],
    pub env: &'a [(String, String)],
    pub netns: &'a Path,
    pub mntns: Option<&'a Path>,
    pub log: &'a Path,
    pub exit_file: &'a Path,
    pub record: &'a Path,
    pub task_id: &'a str,
}

/// A task's running shim and process, held by pidfd.
pub struct Shim {
    record: Record,
    shim: AsyncFd<OwnedFd>,
    process: OwnedFd,
    exit_file: PathBuf,
}

impl Shim {
    /// Starts a shim for `l` and waits for it to start the command (blocking: run it off the
    /// runtime's threads, with the runtime entered for the pidfd's registration).
    pub fn start(l: &Launch<'_>) -> Result<Shim, String> {
        let ns = File::open(l.netns).map_err(|e| format!("opening {}: {e}", l.netns.display()))?;
        let mnt = match l.mntns {
            Some(m) => Some(File::open(m).map_err(|e| format!("opening {}: {e}", m.display()))?),
            None => None,
        };
        let exe = std::env::current_exe().map_err(|e| format!("finding overlayd's binary: {e}"))?;
        match std::fs::remove_file(l.exit_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("removing {}: {e}", l.exit_file.display()))
            }
            _ => {}
        }
        let mut cmd = Command::new(exe);
        cmd.arg(SUBCOMMAND)
            .arg("--log")
            .arg(l.log)
            .arg("--exit")
            .arg(l.exit_file)
            .arg("--")
            .args(l.command)
            .envs(l.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .current_dir("/");
        netns::spawn_inside(&mut cmd, ns.as_fd(), mnt.as_ref().map(|m| m.as_fd()));
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting the task's shim: {e}"))?;
        let shim_pid = child.id();
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let pid = match line.trim().parse::<u32>() {
            Ok(pid) => pid,
            Err(_) => {
                let _ = child.wait();
                let why = line.trim().strip_prefix("error: ").unwrap_or(line.trim());
                return Err(if why.is_empty() {
                    "the task's shim ended before starting the command".to_string()
                } else {
                    why.to_string()
                });
            }
        };
        // `child` is not waited for here: the shim is reaped when its pidfd says it ended.
        let held = Shim::record_and_hold(l, shim_pid, pid);
        if held.is_err() {
            // Not supervised, not adoptable: it must not run on unseen.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
            let _ = child.wait();
        }
        held
    }

    /// Holds the shim and process just started by pidfd and writes their record.
    fn record_and_hold(l: &Launch<'_>, shim_pid: u32, pid: u32) -> Result<Shim, String> {
        let record = Record {
            task_id: l.task_id.to_string(),
            shim_pid,
            shim_start: pidfd::start_time(shim_pid).map_err(|e| format!("the shim: {e}"))?,
            pid,
            pid_start: pidfd::start_time(pid).map_err(|e| format!("the process: {e}"))?,
        };
        let shim = Shim::hold(record, l.exit_file)?;
        let json = serde_json::to_vec(&shim.record).map_err(|e| e.to_string())?;
        durable::write_atomic(l.record, &json, 0o600)
            .map_err(|e| format!("writing {}: {e}", l.record.display()))?;
        Ok(shim)
    }

    /// Takes over the shim and process `record` (read from the task's directory) names, if
    /// both still run as the same processes (same start times). Needs the runtime.
    pub fn adopt(record_file: &Path, exit_file: &Path, task_id: &str) -> Result<Shim, String> {
        let bytes = std::fs::read(record_file)
            .map_err(|e| format!("reading {}: {e}", record_file.display()))?;
        let record: Record = serde_json::from_slice(&bytes)
            .map_err(|e| format!("parsing {}: {e}", record_file.display()))?;
        if record.task_id != task_id {
            return Err(format!("the record is of task {}", record.task_id));
        }
        let same = |pid, start| pidfd::start_time(pid).is_ok_and(|s| s == start);
        if !same(record.shim_pid, record.shim_start) || !same(record.pid, record.pid_start) {
            return Err("its process is no longer running".to_string());
        }
        let shim = Shim::hold(record, exit_file)?;
        // Checked again now that the pidfds are held: a pid reused in between is caught.
        let r = &shim.record;
        if !same(r.shim_pid, r.shim_start) || !same(r.pid, r.pid_start) {
            return Err("its process is no longer running".to_string());
        }
        Ok(shim)
    }

    fn hold(record: Record, exit_file: &Path) -> Result<Shim, String> {
        let shim = pidfd::open(record.shim_pid).map_err(|e| format!("pidfd of the shim: {e}"))?;
        let process = pidfd::open(record.pid).map_err(|e| format!("pidfd of the process: {e}"))?;
        let shim = pidfd::watch(shim).map_err(|e| format!("watching the shim: {e}"))?;
        Ok(Shim {
            record,
            shim,
            process,
            exit_file: exit_file.to_path_buf(),
        })
    }

    /// The task's process's pid.
    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// Sends `signal` to the task's process (nothing if it has exited).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = pidfd::send_signal(&self.process, signal);
    }

    /// Waits until the task ended (its shim exited) and says how.
    pub async fn ended(&self) -> String {
        if let Ok(guard) = self.shim.readable().await {
            // Readiness stays: a later call returns at once.
            drop(guard);
        }
        // Reaped if it is our child; a shim adopted from an earlier run is not (ECHILD).
        let pid = nix::unistd::Pid::from_raw(self.record.shim_pid as i32);
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        match std::fs::read_to_string(&self.exit_file) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => "its shim ended without recording how the process ended".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_need_log_exit_and_a_command() {
        let (log, exit, argv) =
            parse_args(os(&["--log", "/l", "--exit", "/e", "--", "sh", "-c", "x"])).unwrap();
        assert_eq!((log, exit), (PathBuf::from("/l"), PathBuf::from("/e")));
        assert_eq!(argv, os(&["sh", "-c", "x"]));
        assert!(parse_args(os(&["--log", "/l", "--exit", "/e", "--"])).is_none());
        assert!(parse_args(os(&["--log", "/l", "--", "sh"])).is_none());
        assert!(parse_args(os(&["--what", "--", "sh"])).is_none());
    }
}
