//! A task's log: its process's stdout and stderr, through one pipe the daemon reads, into
//! `STATE_DIR/logs/TASK.log` ([`naming::task_log`]), mode 0640 whatever the umask, rotated
//! at [`MAX_SIZE`] with [`MAX_FILES`] files kept: `TASK.log` (being written), `TASK.log.1`
//! (the one before), `TASK.log.2` (the oldest, gone at the next rotation). These are the
//! `max-size` and `max-file` of Docker's json-file driver, with the same naming; Docker
//! leaves them unlimited unless told, which is how its hosts fill their disks.
//!
//! Why a pipe and not the file itself as the process's stdout: a process that holds its log
//! file open keeps writing to it after any rename, so rotating would need it to reopen
//! (which a task cannot be asked to do), or a copy-and-truncate, which loses what is written
//! between the copy and the truncation and copies every byte again. With a pipe the reader
//! is the only writer and cuts where it wants, as Docker does with a container's output.
//! The reader is the task's shim (`task_shim`), not overlayd: the task's output keeps its
//! reader (and the task never sees EPIPE) while overlayd is stopped or restarting. The cost
//! is one read and one write per chunk (up to [`CHUNK`] bytes), in the shim's copying
//! thread; the write lands in the page cache. A task that writes faster than that waits on
//! its full pipe, as under Docker.
//!
//! Both streams share the pipe, so their lines stay in the order the process wrote them, as
//! when both went to one file.

use crate::naming;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Size at which a task's log is rotated: 10 MiB, a common `max-size` for Docker's
/// json-file driver, so that a task keeps at most 30 MiB of output on its node and a
/// hundred tasks 3 GiB.
pub const MAX_SIZE: u64 = 10 << 20;
/// Files kept per task, the one being written included (Docker's `max-file`).
pub const MAX_FILES: usize = 3;
/// Owner reads and writes, the group (an operator's) reads, others nothing: task output may
/// hold what the task prints of its environment.
pub const MODE: u32 = 0o640;
/// Logs kept of tasks that left this node, the most recently written first: a task's log
/// outlives it for a look after a failed update or a crash, as Swarm keeps the last tasks of
/// each slot (`--task-history-limit`, 5), but the task names a node ever ran (every
/// start-first replacement has a new one) cannot fill its disk: the logs directory holds at
/// most (running tasks + 20) × [`MAX_FILES`] files.
pub const KEEP_DEPARTED: usize = 20;
/// Most bytes read from the pipe at once: a pipe holds 64 KiB, and a quarter of that per
/// read keeps each running task's buffer small.
const CHUNK: usize = 16 << 10;

/// A task's log file, rotated by size.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    /// Bytes in the file being written.
    size: u64,
    max_size: u64,
    max_files: usize,
}

/// Opens (or creates) `path` for appending, with mode [`MODE`] set explicitly: a file made by
/// an earlier version under the umask is put right too.
fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(MODE))?;
    Ok(file)
}

impl LogFile {
    /// The log at `path`, appended to (a restarted task's output follows its earlier one),
    /// rotated at `max_size` bytes keeping `max_files` files.
    pub fn open(path: &Path, max_size: u64, max_files: usize) -> io::Result<LogFile> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            size,
            max_size: max_size.max(1),
            max_files: max_files.max(1),
        })
    }

    /// Appends `data`, rotating whenever the file would pass its size. Lines stay whole: a
    /// cut falls after the last line that fits, and a line that does not fit begins the
    /// next file, unless it is longer than a whole file (then it is cut where the file is
    /// full).
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room =
                usize::try_from(self.max_size.saturating_sub(self.size)).unwrap_or(usize::MAX);
            if data.len() <= room {
                self.file.write_all(data)?;
                self.size += data.len() as u64;
                return Ok(());
            }
            let first_line = data
                .iter()
                .position(|&b| b == b'\n')
                .map_or(data.len(), |i| i + 1);
            let cut = match data[..room].iter().rposition(|&b| b == b'\n') {
                Some(nl) => nl + 1,
                None if self.size > 0 && first_line as u64 <= self.max_size => 0,
                None => room,
            };
            self.file.write_all(&data[..cut])?;
            self.size += cut as u64;
            data = &data[cut..];
            self.rotate()?;
        }
        Ok(())
    }

    /// `TASK.log.N-1` is dropped, each `TASK.log.i` becomes `.i+1`, `TASK.log` becomes `.1`,
    /// and a new `TASK.log` is begun. Each step is a rename, so a reader sees whole files.
    fn rotate(&mut self) -> io::Result<()> {
        if self.max_files == 1 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        for i in (1..self.max_files - 1).rev() {
            match std::fs::rename(
                naming::rotated_log(&self.path, i),
                naming::rotated_log(&self.path, i + 1),
            ) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, naming::rotated_log(&self.path, 1))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// The task a file of the logs directory belongs to: `TASK.log` or `TASK.log.N`.
fn task_of(file: &str) -> Option<&str> {
    let log = match file.rsplit_once('.') {
        Some((rest, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => rest,
        _ => file,
    };
    log.strip_suffix(".log").filter(|t| !t.is_empty())
}

/// Removes the logs of tasks not in `live` (this node's tasks, running or draining), but for
/// the `keep` written last. Returns how many tasks' logs went.
pub fn prune_departed(
    dir: &Path,
    live: &std::collections::BTreeSet<&str>,
    keep: usize,
) -> io::Result<usize> {
    use std::collections::BTreeMap;
    // Departed task → (its newest write, its files).
    let mut departed: BTreeMap<String, (std::time::SystemTime, Vec<PathBuf>)> = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(task) = name.to_str().and_then(task_of) else {
            continue;
        };
        if live.contains(task) {
            continue;
        }
        let written = entry.metadata()?.modified()?;
        let e = departed
            .entry(task.to_string())
            .or_insert((written, Vec::new()));
        e.0 = e.0.max(written);
        e.1.push(entry.path());
    }
    let mut by_age: Vec<_> = departed.into_values().collect();
    by_age.sort_by_key(|(written, _)| std::cmp::Reverse(*written));
    let mut removed = 0;
    for (_, files) in by_age.into_iter().skip(keep) {
        for f in files {
            match std::fs::remove_file(&f) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        removed += 1;
    }
    Ok(removed)
}

/// Copies what a task's process writes into its log until every writer has closed the pipe
/// (the process and whatever it left running). A log that cannot be written has that
/// output dropped, so that the process never blocks on a full pipe; the first failure is
/// returned once the copy ends.
pub fn copy(mut from: impl Read, log: &mut LogFile) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut failed = None;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = log.write(&buf[..n]) {
            failed.get_or_insert(e);
        }
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("overlay-log-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Every file of the log, the newest first, with its mode and size.
    fn files(log: &Path) -> Vec<(PathBuf, u32, u64)> {
        std::iter::once(log.to_path_buf())
            .chain((1..10).map(|i| naming::rotated_log(log, i)))
            .filter_map(|p| {
                let m = std::fs::metadata(&p).ok()?;
                Some((p, m.mode() & 0o777, m.len()))
            })
            .collect()
    }

    #[test]
    fn writing_past_the_cap_keeps_at_most_max_files_of_at_most_max_size() {
        let d = dir("cap");
        let path = d.join("web.1.log");
        let mut log = LogFile::open(&path, 1000, 3).unwrap();
        // 20 000 bytes of numbered lines, in chunks that do not follow the lines.
        let text: String = (0..400)
            .map(|i| format!("line {i:05} of the task's output ..........\n"))
            .collect();
        for chunk in text.as_bytes().chunks(777) {
            log.write(chunk).unwrap();
        }
        let found = files(&path);
        assert_eq!(found.len(), 3, "{found:?}");
        for (p, mode, size) in &found {
            assert_eq!(*mode, MODE, "{}", p.display());
            assert!(*size <= 1000, "{} has {size} bytes", p.display());
        }
        // Cut at lines; the newest output is in TASK.log, the rest in order before it.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let kept: String = found.iter().rev().map(|(p, _, _)| read(p)).collect();
        let line = text.lines().next().unwrap().len();
        assert!(kept.lines().all(|l| l.len() == line), "lines stay whole");
        assert!(
            text.ends_with(&kept),
            "the last {} bytes, in order",
            kept.len()
        );
        assert!(kept.len() > 2000);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_mode_is_0640_whatever_was_there_and_appending_resumes() {
        let d = dir("mode");
        let path = d.join("web.2.log");
        // A log an earlier version made under a permissive umask.
        std::fs::write(&path, "before\n").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o666)).unwrap();
        let mut log = LogFile::open(&path, 16, 2).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, MODE);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        log.write(b"after\n").unwrap();
        assert_eq!(read(&path), "before\nafter\n", "appended");
        // A line that does not fit begins the next file.
        log.write(b"next line\n").unwrap();
        let old = naming::rotated_log(&path, 1);
        assert_eq!(
            (read(&path), read(&old)),
            ("next line\n".into(), "before\nafter\n".into())
        );
        // A line longer than a whole file is cut where the file is full; with two files
        // kept, the oldest goes and no third appears.
        log.write(b"0123456789abcdefghij\n").unwrap();
        assert_eq!(read(&old), "next line\n012345");
        assert_eq!(read(&path), "6789abcdefghij\n");
        assert_eq!(files(&path).len(), 2);
        assert!(files(&path).iter().all(|(_, m, s)| *m == MODE && *s <= 16));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn departed_tasks_keep_only_the_newest_logs() {
        assert_eq!(task_of("web.1.log"), Some("web.1"));
        assert_eq!(task_of("web.1.abc123.log.2"), Some("web.1.abc123"));
        assert_eq!(
            (task_of("web.1.log.x"), task_of(".log"), task_of("x")),
            (None, None, None)
        );
        let d = dir("prune");
        let at = |s: u64| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        // Six departed tasks (written at 1..=6 s), each with a rotated file, and a live one.
        for i in 1..=6u64 {
            for f in [format!("old.{i}.log"), format!("old.{i}.log.1")] {
                let f = File::create(d.join(f)).unwrap();
                f.set_modified(at(i)).unwrap();
            }
        }
        File::create(d.join("web.1.log"))
            .unwrap()
            .set_modified(at(0))
            .unwrap();
        std::fs::write(d.join("notes.txt"), "not a log").unwrap();
        let live = ["web.1"].into_iter().collect();
        assert_eq!(prune_departed(&d, &live, 2).unwrap(), 4);
        let mut left: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "notes.txt",
                "old.5.log",
                "old.5.log.1",
                "old.6.log",
                "old.6.log.1",
                "web.1.log"
            ]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_process_output_reaches_its_log_through_the_pipe() {
        let d = dir("pipe");
        let path = d.join("echo.1.log");
        let mut log = LogFile::open(&path, 4096, 3).unwrap();
        let (rx, tx) = std::io::pipe().unwrap();
        let err = tx.try_clone().unwrap();
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "echo out; echo err >&2; head -c 10000 /dev/zero | tr '\\0' x",
            ])
            .stdout(tx)
            .stderr(err)
            .spawn()
            .unwrap();
        // The command's copies of the write end are its own now: the copy ends when it does.
        copy(rx, &mut log).unwrap();
        assert!(child.wait().unwrap().success());
        let all: String = files(&path)
            .iter()
            .rev()
            .map(|(p, _, _)| std::fs::read_to_string(p).unwrap_or_default())
            .collect();
        // 10 008 bytes written; 3 files of 4 096 hold them all.
        assert!(all.starts_with("out\nerr\n"), "{:?}", &all[..16]);
        assert_eq!(all.len(), 8 + 10_000);
        assert!(files(&path)
            .iter()
            .all(|(_, m, s)| *m == MODE && *s <= 4096));
        let _ = std::fs::remove_dir_all(&d);
    }
}
