//! `service logs` across nodes: this node's side of the control plane's logs messages.
//!
//! A node answers for its own tasks ([`LocalLogs`]: process tasks' log files read from an
//! offset, image tasks' lines from the engine since a time), bounded by [`MAX_LOGS_ANSWER`] bytes per
//! answer. The [`LogsHub`] (one per node, in its [`View`](super::View)) holds the questions in
//! flight: on a worker, those it sent the leader (`ToManager::Logs`); on the leader, those
//! it sent a member (`ToNode::LogsFetch`), answered by the member's `ToManager::LogsLines`
//! and relayed back to the asker. Every question times out ([`LOGS_TIMEOUT`]): a node that
//! is down or silent is reported, never waited for.

use crate::engine::{self, Engine};
use crate::manager::Manager;
use crate::naming;
use http_body_util::BodyExt;
use protocol::control::{LogsAnswer, LogsQuery, TaskLines, ToNode, MAX_LOGS_ANSWER, MAX_LOGS_TAIL};
use protocol::state::ClusterState;
use protocol::types::NodeName;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long the leader waits for a member's answer (a worker waits a little longer, so the
/// leader's "did not answer" reaches it first).
pub const LOGS_TIMEOUT: Duration = Duration::from_secs(5);

pub type LogsResult = Result<LogsAnswer, String>;

/// Where this node's own tasks' lines are.
#[derive(Debug, Clone)]
pub struct LocalLogs {
    pub node: NodeName,
    pub state_dir: PathBuf,
    /// The node's Docker Engine, for image tasks (`None`: their lines cannot be had).
    pub docker_host: Option<PathBuf>,
}

/// A question this node sent, until its answer comes or it times out.
struct Waiting {
    /// The node that must answer (`None`: the leader, over this worker's link).
    from: Option<NodeName>,
    reply: oneshot::Sender<LogsResult>,
}

/// The logs questions in flight on this node, and (on the leader) the member sessions they
/// go out on.
#[derive(Default)]
pub struct LogsHub {
    local: OnceLock<LocalLogs>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Waiting>>,
    /// The leader's member sessions: node → what its session driver writes to it.
    sessions: Mutex<HashMap<NodeName, mpsc::Sender<ToNode>>>,
}

impl LogsHub {
    /// Says where this node's own tasks' lines are (once, at start).
    pub fn set_local(&self, local: LocalLogs) {
        let _ = self.local.set(local);
    }

    /// This node's name, once [`LogsHub::set_local`] was called.
    pub fn node(&self) -> Option<&NodeName> {
        self.local.get().map(|l| &l.node)
    }

    /// This node's own lines for `q`, from `state`.
    pub async fn local_answer(&self, state: &ClusterState, q: &LogsQuery) -> LogsResult {
        match self.local.get() {
            Some(l) => l.answer(state, q).await,
            None => Err("this node does not serve logs".into()),
        }
    }

    /// A new question to wait on, answered by `from`.
    pub fn wait(&self, from: Option<NodeName>) -> (u64, oneshot::Receiver<LogsResult>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        lock(&self.pending).insert(id, Waiting { from, reply });
        (id, rx)
    }

    /// An answer to question `id` came from `from` (`None`: the leader). An answer from a
    /// node that was not asked, or after the question timed out, is dropped.
    pub fn complete(&self, id: u64, from: Option<&NodeName>, answer: LogsResult) {
        let mut pending = lock(&self.pending);
        if pending.get(&id).is_some_and(|w| w.from.as_ref() == from) {
            if let Some(w) = pending.remove(&id) {
                let _ = w.reply.send(answer);
            }
        }
    }

    /// Waits for question `id` for at most `timeout`; `who` names the node for the error.
    pub async fn answer_of(
        &self,
        id: u64,
        rx: oneshot::Receiver<LogsResult>,
        timeout: Duration,
        who: &str,
    ) -> LogsResult {
        let r = tokio::time::timeout(timeout, rx).await;
        lock(&self.pending).remove(&id);
        match r {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(format!("lost {who} before it answered")),
            Err(_) => Err(format!(
                "{who} did not answer within {} s",
                timeout.as_secs()
            )),
        }
    }

    /// The leader: `node`'s session is up, written through `tx`.
    pub fn attach(&self, node: NodeName, tx: mpsc::Sender<ToNode>) {
        lock(&self.sessions).insert(node, tx);
    }

    /// The leader: the session that wrote through `tx` ended.
    pub fn detach(&self, node: &NodeName, tx: &mpsc::Sender<ToNode>) {
        let mut s = lock(&self.sessions);
        if s.get(node).is_some_and(|t| t.same_channel(tx)) {
            s.remove(node);
        }
    }

    /// The leader answers `q`: from its own tasks, or by asking `q.node` over its session
    /// (at once "down" when it does not heartbeat: its session may not have ended yet).
    pub async fn fetch_as_leader(&self, manager: &Manager, q: LogsQuery) -> LogsResult {
        if self.node() == Some(&q.node) {
            return self.local_answer(&manager.snapshot(), &q).await;
        }
        let node = q.node.clone();
        if !manager.health().is_ready(&node) {
            return Err(format!("node {node} is down"));
        }
        let Some(tx) = lock(&self.sessions).get(&node).cloned() else {
            return Err(format!("node {node} is not connected to the manager"));
        };
        let (id, rx) = self.wait(Some(node.clone()));
        if tx.try_send(ToNode::LogsFetch { id, query: q }).is_err() {
            lock(&self.pending).remove(&id);
            return Err(format!("node {node}'s control session is busy or gone"));
        }
        self.answer_of(id, rx, LOGS_TIMEOUT, &format!("node {node}"))
            .await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalLogs {
    /// This node's lines of `q.service`'s tasks, at most [`MAX_LOGS_ANSWER`] bytes in all.
    pub async fn answer(&self, state: &ClusterState, q: &LogsQuery) -> LogsResult {
        if !state.services.contains_key(q.service.as_str()) {
            return Err(format!("no such service: {}", q.service));
        }
        if q.tail.is_some_and(|n| n > MAX_LOGS_TAIL) {
            return Err(format!("--tail may be at most {MAX_LOGS_TAIL}"));
        }
        let mut budget = MAX_LOGS_ANSWER;
        let mut tasks = Vec::new();
        let mine = state
            .tasks
            .values()
            .filter(|t| t.service.as_str() == q.service && t.node == self.node);
        for t in mine {
            let from = q.from.get(&t.id).copied();
            let lines = if t.spec.image.is_some() {
                let container = crate::container::container_name(t.service.as_str(), t.slot, &t.id);
                self.container_chunk(&t.id, &container, from, q, budget)
                    .await
            } else {
                let file = naming::task_log(&self.state_dir, &t.name);
                let (tail, id) = (q.tail, t.id.clone());
                tokio::task::spawn_blocking(move || match read_chunk(&file, from, tail, budget) {
                    Ok((data, next, more)) => TaskLines {
                        task: id,
                        data,
                        next,
                        more,
                        error: None,
                    },
                    Err(e) => TaskLines {
                        task: id,
                        data: Vec::new(),
                        next: from.unwrap_or(0),
                        more: false,
                        error: Some(format!("reading {}: {e}", file.display())),
                    },
                })
                .await
                .map_err(|e| e.to_string())?
            };
            budget = budget.saturating_sub(lines.data.len());
            tasks.push(lines);
        }
        Ok(LogsAnswer { tasks })
    }

    /// An image task's lines from the engine: all (or the tail) on the first question, then
    /// those after the newest line's timestamp (`from`, Unix nanoseconds: the engine's logs
    /// are read by time, not by offset). Asked with timestamps, which are taken off again
    /// unless `-t`.
    async fn container_chunk(
        &self,
        task: &str,
        container: &str,
        from: Option<u64>,
        q: &LogsQuery,
        budget: usize,
    ) -> TaskLines {
        let asked_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut lines = TaskLines {
            task: task.to_string(),
            data: Vec::new(),
            next: from.unwrap_or(asked_at),
            more: false,
            error: None,
        };
        let Some(host) = &self.docker_host else {
            lines.error = Some("this node has no Docker Engine configured".into());
            return lines;
        };
        let e = Engine::new(host);
        let body = match from {
            Some(ns) => e.logs_since(container, ns + 1).await,
            None => e.logs(container, false, q.tail, true).await,
        };
        let mut body = match body {
            Ok(b) => b,
            Err(err) => {
                lines.error = Some(err.to_string());
                return lines;
            }
        };
        let (mut raw, mut stamped) = (Vec::new(), Vec::new());
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(d) = frame.data_ref() {
                raw.extend_from_slice(d);
            }
            let (payloads, used) = engine::demux(&raw);
            for p in payloads {
                stamped.extend_from_slice(p);
            }
            raw.drain(..used);
        }
        let mut newest = None;
        for line in stamped.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            let (stamp, rest) = match line.iter().position(|b| *b == b' ') {
                Some(sp) => (&line[..sp], &line[sp + 1..]),
                None => (&line[..0], line),
            };
            if let Some(ns) = std::str::from_utf8(stamp).ok().and_then(rfc3339_ns) {
                newest = Some(ns);
            }
            lines
                .data
                .extend_from_slice(if q.timestamps { line } else { rest });
        }
        if let Some(ns) = newest {
            lines.next = ns;
        }
        // The newest lines when there are too many.
        if lines.data.len() > budget {
            let cut = lines.data.len() - budget;
            let cut = lines.data[cut..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(lines.data.len(), |p| cut + p + 1);
            lines.data.drain(..cut);
        }
        lines
    }
}

/// Unix nanoseconds of an RFC 3339 UTC time as the engine writes it
/// (`2026-12-08T00:35:12.123456789Z`, the fraction of any length or none).
fn rfc3339_ns(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let nanos = if frac.is_empty() {
        0
    } else {
        frac.parse::<u64>().ok()? * 10u64.pow(9 - frac.len() as u32)
    };
    Some(((days * 86_400 + h * 3600 + min * 60 + sec) * 1_000_000_000) + nanos)
}

/// The last `tail` lines of `text` (all without `tail`).
pub fn last_lines(text: &[u8], tail: Option<u64>) -> &[u8] {
    let Some(n) = tail else { return text };
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    if n == 0 {
        &text[text.len()..]
    } else {
        text
    }
}

/// Whole lines of the log `file` from offset `from` (a file shorter than that was rotated:
/// from its start), or from its last `tail` lines, at most `budget` bytes (unless one line
/// is longer). Returns the lines, where the next ones start, and whether lines were left
/// out. A log not written yet has no lines.
fn read_chunk(
    file: &Path,
    from: Option<u64>,
    tail: Option<u64>,
    budget: usize,
) -> std::io::Result<(Vec<u8>, u64, bool)> {
    let mut f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Vec::new(), from.unwrap_or(0), false))
        }
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = match (from, tail) {
        (Some(o), _) if o <= len => o,
        (Some(_), _) | (None, None) => 0,
        (None, Some(_)) => {
            let mut all = Vec::new();
            f.read_to_end(&mut all)?;
            // The last lines among the finished ones (an unfinished one comes later).
            let whole = all.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
            (whole - last_lines(&all[..whole], tail).len()) as u64
        }
    };
    f.seek(SeekFrom::Start(start))?;
    let mut data = Vec::new();
    f.take(budget.max(1) as u64).read_to_end(&mut data)?;
    let full = data.len() >= budget.max(1);
    match data.iter().rposition(|b| *b == b'\n') {
        Some(p) => data.truncate(p + 1),
        // One line longer than the budget goes whole; an unfinished one waits.
        None if full => {}
        None => data.clear(),
    }
    let next = start + data.len() as u64;
    Ok((data, next, full && next < len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let t = b"a\nb\nc\n";
        assert_eq!(last_lines(t, None), t);
        assert_eq!(last_lines(t, Some(2)), b"b\nc\n");
        assert_eq!(last_lines(t, Some(5)), t);
        assert_eq!(last_lines(t, Some(0)), b"");
    }

    #[test]
    fn engine_timestamps_read_as_unix_nanoseconds() {
        assert_eq!(rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ns("2024-02-29T12:34:56.123456789Z"),
            Some(1_709_210_096_123_456_789)
        );
        assert_eq!(
            rfc3339_ns("2024-02-29T12:34:56.5Z"),
            Some(1_709_210_096_500_000_000)
        );
        assert_eq!(rfc3339_ns("2024-13-01T00:00:00Z"), None);
        assert_eq!(rfc3339_ns("hello"), None);
    }

    #[test]
    fn chunks_are_whole_lines_from_an_offset() {
        let dir = std::env::temp_dir().join(format!("logs-chunk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("web.1.log");
        std::fs::write(&file, b"one\ntwo\nthree\npart").unwrap();
        assert_eq!(
            read_chunk(&file, None, Some(1), 100).unwrap(),
            (b"three\n".to_vec(), 14, false)
        );
        assert_eq!(
            read_chunk(&file, None, None, 9).unwrap(),
            (b"one\ntwo\n".to_vec(), 8, true)
        );
        assert_eq!(
            read_chunk(&file, Some(8), None, 100).unwrap(),
            (b"three\n".to_vec(), 14, false)
        );
        // Rotated: shorter than the offset, read from its start.
        assert_eq!(
            read_chunk(&file, Some(500), None, 100).unwrap().0,
            b"one\ntwo\nthree\n"
        );
        assert_eq!(
            read_chunk(&dir.join("none.log"), Some(3), None, 100).unwrap(),
            (Vec::new(), 3, false)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
