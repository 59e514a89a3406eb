//! `GET /services/{name}/logs` (`overlayctl service logs NAME [-f] [--tail N] [-t]`): the
//! output of every task of the service, each line prefixed as Docker does
//! (`web.1.TASKID@NODE | `). This node's: image tasks' from their engine (the container logs API, its
//! multiplexed stream split by `engine::demux`), process tasks' from their log files
//! (`task_log`; followed by looking at the file's size four times a second, a rotation seen
//! as the file getting shorter). A plain-text stream; with `follow` it lasts until the client
//! goes. Tasks on other nodes: asked for over the control plane, one question per node
//! (through the leader, [`crate::cluster::logs`]), each answer up to 512 KiB of whole lines
//! and where to ask from next (a file offset, or an image task's newest line's time);
//! followed by asking again every [`FOLLOW_REMOTE_EVERY`].
//! A node that does not answer has its tasks shown as `(logs unavailable: why)`.

use super::ApiState;
use crate::cluster::logs::last_lines;
use crate::cluster::Cluster;
use crate::engine::{self, Engine};
use crate::naming;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use protocol::control::{LogsQuery as NodeQuery, MAX_LOGS_TAIL};
use protocol::state::Task;
use protocol::types::NodeName;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(super) struct LogsQuery {
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    tail: Option<u64>,
    #[serde(default)]
    timestamps: bool,
}

/// How often a followed log file is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// How often another node is asked for a followed log's new lines.
const FOLLOW_REMOTE_EVERY: Duration = Duration::from_millis(500);

pub(super) async fn service_logs(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let snap = s.cluster.snapshot();
    if !snap.state.services.contains_key(name.as_str()) {
        return (StatusCode::NOT_FOUND, format!("no such service: {name}\n")).into_response();
    }
    if q.tail.is_some_and(|n| n > MAX_LOGS_TAIL) {
        return (
            StatusCode::BAD_REQUEST,
            format!("--tail may be at most {MAX_LOGS_TAIL}\n"),
        )
            .into_response();
    }
    let (tasks, others): (Vec<Task>, Vec<Task>) = snap
        .state
        .tasks
        .values()
        .filter(|t| t.service.as_str() == name)
        .cloned()
        .partition(|t| t.node == s.node);
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut by_node: BTreeMap<NodeName, HashMap<String, String>> = BTreeMap::new();
    for t in others {
        by_node
            .entry(t.node.clone())
            .or_default()
            .insert(t.id.clone(), prefix_of(&t));
    }
    for (node, prefixes) in by_node {
        tokio::spawn(remote_lines(
            s.cluster.clone(),
            name.clone(),
            node,
            prefixes,
            q,
            tx.clone(),
        ));
    }
    for t in tasks {
        let prefix = prefix_of(&t);
        let tx = tx.clone();
        if t.spec.image.is_some() {
            let Some(host) = s.docker_host.clone() else {
                continue;
            };
            let container = crate::container::container_name(t.service.as_str(), t.slot, &t.id);
            tokio::spawn(async move {
                let e = Engine::new(&host);
                if let Err(err) = container_lines(&e, &container, &q, &prefix, &tx).await {
                    let _ = tx.send(Bytes::from(format!("{prefix}({err})\n"))).await;
                }
            });
        } else {
            let file = naming::task_log(&s.state_dir, &t.name);
            let (follow, tail) = (q.follow, q.tail);
            tokio::spawn(file_lines(file, follow, tail, prefix, tx));
        }
    }
    drop(tx);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::io::Error>(b), rx))
    });
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// How Docker prefixes a task's lines: `web.1.TASKID@NODE | `.
fn prefix_of(t: &Task) -> String {
    format!("{}.{}.{}@{} | ", t.service, t.slot, t.id, t.node)
}

/// The lines of `service`'s tasks on `node` (their prefixes by task id), asked for over the
/// control plane until all are sent, and again every [`FOLLOW_REMOTE_EVERY`] when followed.
async fn remote_lines(
    cluster: Cluster,
    service: String,
    node: NodeName,
    prefixes: HashMap<String, String>,
    q: LogsQuery,
    tx: mpsc::Sender<Bytes>,
) {
    let mut from: BTreeMap<String, u64> = BTreeMap::new();
    // Whether the last question failed (said once, until it answers again).
    let mut failing = false;
    let mut told_errors = std::collections::HashSet::new();
    loop {
        let query = NodeQuery {
            service: service.clone(),
            node: node.clone(),
            tail: q.tail,
            timestamps: q.timestamps,
            from: from.clone(),
        };
        let mut more = false;
        match cluster.fetch_logs(query).await {
            Ok(answer) => {
                failing = false;
                for lines in answer.tasks {
                    let prefix = prefixes
                        .get(&lines.task)
                        .cloned()
                        .unwrap_or_else(|| format!("{service}.{}@{node} | ", lines.task));
                    if let Some(e) = &lines.error {
                        if told_errors.insert(lines.task.clone())
                            && tx
                                .send(Bytes::from(format!("{prefix}({e})\n")))
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                    let mut data = lines.data;
                    if send_lines(&mut data, &prefix, &tx).await.is_err() {
                        return;
                    }
                    more |= lines.more;
                    from.insert(lines.task, lines.next);
                }
            }
            Err(e) => {
                if !failing {
                    failing = true;
                    for prefix in prefixes.values() {
                        let line = format!("{prefix}(logs unavailable: {e})\n");
                        if tx.send(Bytes::from(line)).await.is_err() {
                            return;
                        }
                    }
                }
                if !q.follow {
                    return;
                }
            }
        }
        if more {
            continue;
        }
        if !q.follow {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_REMOTE_EVERY) => {}
            _ = tx.closed() => return,
        }
    }
}

/// The longest line kept whole: a task that writes more without a newline has it sent as
/// a line of its own (its memory here stays bounded).
const MAX_LINE: usize = 64 * 1024;

/// Prefixes every whole line of `pending` (keeping an unfinished one, up to [`MAX_LINE`])
/// and sends them.
async fn send_lines(
    pending: &mut Vec<u8>,
    prefix: &str,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), ()> {
    let mut out = Vec::new();
    while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
        out.extend_from_slice(prefix.as_bytes());
        out.extend(pending.drain(..=nl));
    }
    if pending.len() > MAX_LINE {
        out.extend_from_slice(prefix.as_bytes());
        out.append(pending);
        out.push(b'\n');
    }
    if out.is_empty() {
        return Ok(());
    }
    tx.send(Bytes::from(out)).await.map_err(|_| ())
}

async fn container_lines(
    e: &Engine,
    container: &str,
    q: &LogsQuery,
    prefix: &str,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), engine::EngineError> {
    let mut body = e.logs(container, q.follow, q.tail, q.timestamps).await?;
    let (mut raw, mut pending) = (Vec::new(), Vec::new());
    loop {
        // A client that went away ends this even while the container is quiet.
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tx.closed() => return Ok(()),
        };
        let Some(Ok(frame)) = frame else { break };
        if let Some(d) = frame.data_ref() {
            raw.extend_from_slice(d);
        }
        let (payloads, used) = engine::demux(&raw);
        for p in payloads {
            pending.extend_from_slice(p);
        }
        raw.drain(..used);
        if send_lines(&mut pending, prefix, tx).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

async fn file_lines(
    file: std::path::PathBuf,
    follow: bool,
    tail: Option<u64>,
    prefix: String,
    tx: mpsc::Sender<Bytes>,
) {
    let start = tokio::fs::read(&file).await.unwrap_or_default();
    let mut pending = last_lines(&start, tail).to_vec();
    if send_lines(&mut pending, &prefix, &tx).await.is_err() || !follow {
        return;
    }
    let mut offset = start.len() as u64;
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        if tx.is_closed() {
            return;
        }
        let (path, from) = (file.clone(), offset);
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64)> {
            let mut f = std::fs::File::open(&path)?;
            let len = f.metadata()?.len();
            // Rotated (or truncated): read the new file from its start.
            let from = if len < from { 0 } else { from };
            f.seek(SeekFrom::Start(from))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            Ok((buf, from))
        })
        .await;
        if let Ok(Ok((buf, from))) = read {
            offset = from + buf.len() as u64;
            pending.extend_from_slice(&buf);
            if send_lines(&mut pending, &prefix, &tx).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_line_without_end_is_sent_once_it_is_too_long() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut pending = b"one\ntw".to_vec();
        send_lines(&mut pending, "t | ", &tx).await.unwrap();
        assert_eq!(&rx.recv().await.unwrap()[..], b"t | one\n");
        assert_eq!(pending, b"tw");
        pending.extend(std::iter::repeat_n(b'x', MAX_LINE));
        send_lines(&mut pending, "t | ", &tx).await.unwrap();
        let got = rx.recv().await.unwrap();
        assert!(got.starts_with(b"t | twx") && got.ends_with(b"x\n"));
        assert!(pending.is_empty());
    }
}
