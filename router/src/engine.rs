//! The node's Docker Engine, through its API on `--docker-host` (HTTP/1.1 over its Unix
//! socket, hyper's client as the Docker plugin uses): what running services from images
//! needs of it — images (inspect, pull), networks of driver `overlayd` (overlayd's own
//! plugin, `docker.rs`), containers (create, connect, start, inspect, stop, remove, logs)
//! and the events stream that tells how each container ends ([`Events`]).
//!
//! Every failure is an [`EngineError`] that says what was being done and carries the
//! engine's own message, which ends up in `service ps`.

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::broadcast;
use tracing::{info, warn};

/// The label every container overlayd runs carries, with its node's name: the events
/// stream and the leftover sweep are filtered by it.
pub const NODE_LABEL: &str = "com.overlay.node";
/// Swarm's labels on a task's container.
pub const SERVICE_LABEL: &str = "com.docker.swarm.service.name";
pub const TASK_ID_LABEL: &str = "com.docker.swarm.task.id";
pub const TASK_NAME_LABEL: &str = "com.docker.swarm.task.name";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine's socket does not answer (not running, wrong `--docker-host`).
    #[error("Docker Engine at {sock} is unreachable: {why}")]
    Unreachable { sock: String, why: String },
    /// The engine answered with an error status; `message` is its own words.
    #[error("{what}: {message}")]
    Refused {
        what: String,
        status: u16,
        message: String,
    },
    #[error("{what}: {why}")]
    Broken { what: String, why: String },
    /// No answer within the call's time limit (a hung engine must not hang the agent).
    #[error("{what}: the Docker Engine did not answer within {} s", after.as_secs())]
    TimedOut { what: String, after: Duration },
}

/// How long a call may take, unless it says otherwise: the engine answers them at once, or
/// is stuck.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a pull may take (the engine downloads the image meanwhile).
const PULL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// `call` if it ends within `limit`; [`EngineError::TimedOut`] otherwise.
async fn limited<T>(
    limit: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| EngineError::TimedOut {
            what: what.to_string(),
            after: limit,
        })?
}

/// `image` with the tag `latest` if it names neither a tag nor a digest: the Engine API
/// pulls every tag of a repository given without one.
pub fn with_tag(image: &str) -> String {
    let name = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || name.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

impl EngineError {
    pub fn status(&self) -> Option<u16> {
        match self {
            EngineError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One of this node's containers as the engine lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labelled {
    pub id: String,
    pub name: String,
    /// Its task's id (Swarm's label), if it has one.
    pub task_id: Option<String>,
    pub running: bool,
}

impl Labelled {
    /// One entry of `GET /containers/json`.
    fn of(c: &Value) -> Option<Labelled> {
        Some(Labelled {
            id: c["Id"].as_str()?.to_string(),
            name: c["Names"][0].as_str()?.trim_start_matches('/').to_string(),
            task_id: c["Labels"][TASK_ID_LABEL].as_str().map(str::to_string),
            running: c["State"].as_str() == Some("running"),
        })
    }
}

/// A client of one engine.
#[derive(Debug, Clone)]
pub struct Engine {
    sock: PathBuf,
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Engine {
    pub fn new(sock: &Path) -> Engine {
        Engine {
            sock: sock.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// Sends one request; the response's body is left to the caller (streams). The
    /// connection and the response's head must come within [`CALL_TIMEOUT`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response<Incoming>, EngineError> {
        let what = format!("calling {path}");
        limited(CALL_TIMEOUT, &what, self.send_now(method, path, body)).await
    }

    async fn send_now(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response<Incoming>, EngineError> {
        let unreachable = |why: String| EngineError::Unreachable {
            sock: self.sock.display().to_string(),
            why,
        };
        let stream = tokio::net::UnixStream::connect(&self.sock)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let req = Request::builder()
            .method(method)
            .uri(format!("http://docker{path}"))
            .header("host", "docker")
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .map_err(|e| EngineError::Broken {
                what: format!("request {path}"),
                why: e.to_string(),
            })?;
        sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))
    }

    /// One call whose whole answer is read within [`CALL_TIMEOUT`]: its status and body,
    /// an error status turned into [`EngineError::Refused`] with the engine's `message`.
    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Bytes, EngineError> {
        self.call_within(CALL_TIMEOUT, what, method, path, body)
            .await
    }

    /// [`Engine::call`] with its own time limit.
    async fn call_within(
        &self,
        limit: Duration,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Bytes, EngineError> {
        limited(limit, what, self.call_now(what, method, path, body)).await
    }

    async fn call_now(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Bytes, EngineError> {
        let resp = self.send_now(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| EngineError::Broken {
                what: what.to_string(),
                why: e.to_string(),
            })?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(refused(what, status, &bytes))
    }

    async fn call_json(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, EngineError> {
        let bytes = self.call(what, method, path, body).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| EngineError::Broken {
            what: what.to_string(),
            why: format!("unreadable answer: {e}"),
        })
    }

    /// Whether the engine has `image`.
    pub async fn has_image(&self, image: &str) -> Result<bool, EngineError> {
        let path = format!("/images/{}/json", encode(image));
        match self
            .call("inspecting the image", Method::GET, &path, None)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Pulls `image` (its `latest` tag if it names none); the engine reports a failure
    /// inside its progress stream, as a line with `error`, which becomes the error.
    pub async fn pull(&self, image: &str) -> Result<(), EngineError> {
        let what = format!("pulling {image}");
        let path = format!("/images/create?fromImage={}", encode(&with_tag(image)));
        let bytes = self
            .call_within(PULL_TIMEOUT, &what, Method::POST, &path, None)
            .await?;
        for line in bytes.split(|b| *b == b'\n') {
            let Ok(v) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            if let Some(e) = v.get("error").and_then(Value::as_str) {
                return Err(EngineError::Refused {
                    what,
                    status: 500,
                    message: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Makes sure the engine has a network `name` of driver `overlayd` on `subnet` (the
    /// cluster network's; the plugin then binds the two).
    pub async fn ensure_network(&self, name: &str, subnet: &str) -> Result<(), EngineError> {
        let what = format!("making Docker network {name}");
        let path = format!("/networks/{}", encode(name));
        match self.call(&what, Method::GET, &path, None).await {
            Ok(_) => return Ok(()),
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e),
        }
        let body = json!({
            "Name": name,
            "Driver": "overlayd",
            "CheckDuplicate": true,
            "IPAM": { "Driver": "overlayd", "Config": [{ "Subnet": subnet }] },
        });
        match self
            .call(&what, Method::POST, "/networks/create", Some(&body))
            .await
        {
            Ok(_) => Ok(()),
            // Another task of this node made it meanwhile.
            Err(e) if e.status() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates container `name` from `body` (the Engine API's create body); its id.
    pub async fn create(&self, name: &str, body: &Value) -> Result<String, EngineError> {
        let what = format!("creating container {name}");
        let path = format!("/containers/create?name={}", encode(name));
        let v = self
            .call_json(&what, Method::POST, &path, Some(body))
            .await?;
        v.get("Id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(EngineError::Broken {
                what,
                why: "no Id in the answer".into(),
            })
    }

    /// Connects `container` to network `network` with `address` before it starts.
    pub async fn connect(
        &self,
        network: &str,
        container: &str,
        address: &str,
    ) -> Result<(), EngineError> {
        let body = json!({
            "Container": container,
            "EndpointConfig": { "IPAMConfig": { "IPv4Address": address } },
        });
        let path = format!("/networks/{}/connect", encode(network));
        self.call(
            &format!("connecting to network {network}"),
            Method::POST,
            &path,
            Some(&body),
        )
        .await
        .map(|_| ())
    }

    pub async fn start(&self, id: &str) -> Result<(), EngineError> {
        let path = format!("/containers/{}/start", encode(id));
        self.call("starting the container", Method::POST, &path, None)
            .await
            .map(|_| ())
    }

    pub async fn inspect(&self, id: &str) -> Result<Value, EngineError> {
        let path = format!("/containers/{}/json", encode(id));
        self.call_json("inspecting the container", Method::GET, &path, None)
            .await
    }

    /// `docker stop -t GRACE`: SIGTERM (or the image's stop signal), SIGKILL after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), EngineError> {
        let path = format!("/containers/{}/stop?t={}", encode(id), grace.as_secs());
        // The engine answers once the container stopped: up to `grace` and the kill.
        match self
            .call_within(
                grace + CALL_TIMEOUT,
                "stopping the container",
                Method::POST,
                &path,
                None,
            )
            .await
        {
            // 304: it was stopped already.
            Err(e) if e.status() == Some(304) || e.status() == Some(404) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// `docker rm -f`; a container that is not there is fine.
    pub async fn remove(&self, id: &str) -> Result<(), EngineError> {
        let path = format!("/containers/{}?force=true", encode(id));
        match self
            .call("removing the container", Method::DELETE, &path, None)
            .await
        {
            Err(e) if e.status() == Some(404) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The containers labelled with this node (running or not).
    pub async fn labelled(&self, node: &str) -> Result<Vec<Labelled>, EngineError> {
        let filters = json!({ "label": [format!("{NODE_LABEL}={node}")] }).to_string();
        let path = format!("/containers/json?all=true&filters={}", encode(&filters));
        let v = self
            .call_json("listing containers", Method::GET, &path, None)
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Labelled::of)
            .collect())
    }

    /// The container's log as the engine streams it (`follow`, `tail`, `timestamps` as
    /// `docker logs`); the body is Docker's multiplexed stream ([`demux`]).
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
        tail: Option<u64>,
        timestamps: bool,
    ) -> Result<Incoming, EngineError> {
        let tail = tail.map_or("all".to_string(), |n| n.to_string());
        let path = format!(
            "/containers/{}/logs?stdout=true&stderr=true&follow={follow}&tail={tail}&timestamps={timestamps}",
            encode(id)
        );
        self.logs_at(&path).await
    }

    /// The container's lines (with their timestamps) from `since_ns` (Unix nanoseconds) on,
    /// not followed: what a node answers when another node follows the task.
    pub async fn logs_since(&self, id: &str, since_ns: u64) -> Result<Incoming, EngineError> {
        let path = format!(
            "/containers/{}/logs?stdout=true&stderr=true&timestamps=true&since={}.{:09}",
            encode(id),
            since_ns / 1_000_000_000,
            since_ns % 1_000_000_000
        );
        self.logs_at(&path).await
    }

    async fn logs_at(&self, path: &str) -> Result<Incoming, EngineError> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Err(refused("reading the container's log", status, &bytes))
    }
}

fn refused(what: &str, status: StatusCode, body: &[u8]) -> EngineError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    EngineError::Refused {
        what: what.to_string(),
        status: status.as_u16(),
        message,
    }
}

/// Splits Docker's multiplexed log stream (8-byte frame headers: stream, 3 zero bytes, a
/// big-endian length) off the front of `buf`: the payloads of the whole frames in it, and
/// how many bytes they took. A stream without headers (a TTY container) is not produced here:
/// overlayd creates no TTY.
pub fn demux(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 8 {
        let len = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]) as usize;
        if buf.len() < at + 8 + len {
            break;
        }
        out.push(&buf[at + 8..at + 8 + len]);
        at += 8 + len;
    }
    (out, at)
}

/// What the events stream says of one of this node's containers, or of the stream itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// A container event: `action` as Docker names it (`start`, `die`, `oom`, `kill`, ...);
    /// `exit_code` with `die`.
    Container {
        id: String,
        action: String,
        exit_code: Option<i64>,
    },
    /// The stream is open (again): what happened meanwhile is replayed first.
    Up,
    /// The stream broke or cannot be opened: the engine is down (why).
    Down(String),
}

/// One events stream per node, filtered by the node's label, shared by every image task's
/// supervisor (`broadcast`). It reconnects after a break with `since` the last event it
/// saw, so no container's end is missed while the engine restarts.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<EngineEvent>,
}

impl Events {
    /// Starts following the engine's events for `node`'s containers.
    pub fn start(engine: Engine, node: String) -> Events {
        let (tx, _) = broadcast::channel(1024);
        let events = Events { tx: tx.clone() };
        tokio::spawn(follow(engine, node, tx));
        events
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.tx.subscribe()
    }
}

/// Parses one line of the events stream.
fn parse_event(line: &[u8]) -> Option<(EngineEvent, Option<i64>)> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let time = v.get("timeNano").and_then(Value::as_i64);
    if v.get("Type").and_then(Value::as_str) != Some("container") {
        return None;
    }
    let id = v["Actor"]["ID"].as_str()?.to_string();
    let action = v["Action"].as_str()?.to_string();
    let exit_code = v["Actor"]["Attributes"]["exitCode"]
        .as_str()
        .and_then(|c| c.parse().ok());
    Some((
        EngineEvent::Container {
            id,
            action,
            exit_code,
        },
        time,
    ))
}

async fn follow(engine: Engine, node: String, tx: broadcast::Sender<EngineEvent>) {
    let filters = json!({
        "type": ["container"],
        "label": [format!("{NODE_LABEL}={node}")],
    })
    .to_string();
    // Replays from when this node started looking: nothing it runs can have ended before.
    let mut since_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let mut backoff = Duration::from_millis(500);
    let mut was_down = false;
    loop {
        let since = format!(
            "{}.{:09}",
            since_ns / 1_000_000_000,
            since_ns % 1_000_000_000
        );
        let path = format!("/events?since={since}&filters={}", encode(&filters));
        let opened = engine.send(Method::GET, &path, None).await;
        let why = match opened {
            Ok(resp) if resp.status().is_success() => {
                if was_down {
                    info!("Docker Engine's events stream is back");
                }
                was_down = false;
                backoff = Duration::from_millis(500);
                let _ = tx.send(EngineEvent::Up);
                let mut body = resp.into_body();
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                buf.extend_from_slice(data);
                            }
                            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                                let line: Vec<u8> = buf.drain(..=nl).collect();
                                if let Some((ev, time)) = parse_event(&line) {
                                    if let Some(t) = time {
                                        since_ns = since_ns.max(t + 1);
                                    }
                                    let _ = tx.send(ev);
                                }
                            }
                        }
                        Some(Err(e)) => break e.to_string(),
                        None => break "the engine closed its events stream".to_string(),
                    }
                }
            }
            Ok(resp) => format!("events stream refused: {}", resp.status()),
            Err(e) => e.to_string(),
        };
        if !was_down {
            warn!(error = %why, "Docker Engine's events stream is down");
        }
        was_down = true;
        let _ = tx.send(EngineEvent::Down(why));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_without_a_tag_or_digest_is_pulled_at_latest() {
        assert_eq!(with_tag("nginx"), "nginx:latest");
        assert_eq!(with_tag("nginx:1.27"), "nginx:1.27");
        assert_eq!(
            with_tag("registry:5000/team/app"),
            "registry:5000/team/app:latest"
        );
        assert_eq!(
            with_tag("registry:5000/team/app:v2"),
            "registry:5000/team/app:v2"
        );
        assert_eq!(with_tag("app@sha256:abcd"), "app@sha256:abcd");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("bb:1"), "bb%3A1");
        assert_eq!(encode("web.1.x-y_z~"), "web.1.x-y_z~");
        assert_eq!(encode("{\"a\": [1]}"), "%7B%22a%22%3A%20%5B1%5D%7D");
    }

    #[test]
    fn log_frames_are_split_whole() {
        let mut s = vec![1, 0, 0, 0, 0, 0, 0, 3];
        s.extend_from_slice(b"ab\n");
        s.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 2]);
        s.extend_from_slice(b"c\n");
        s.extend_from_slice(&[1, 0, 0, 0, 0, 0]);
        let (frames, used) = demux(&s);
        assert_eq!(frames, [&b"ab\n"[..], &b"c\n"[..]]);
        assert_eq!(used, 21);
    }

    #[test]
    fn die_events_carry_the_exit_code() {
        let line = br#"{"status":"die","id":"abc","Type":"container","Action":"die","Actor":{"ID":"abc","Attributes":{"exitCode":"137","name":"web.1.x"}},"time":1,"timeNano":1000000001}"#;
        let (ev, t) = parse_event(line).unwrap();
        assert_eq!(
            ev,
            EngineEvent::Container {
                id: "abc".into(),
                action: "die".into(),
                exit_code: Some(137)
            }
        );
        assert_eq!(t, Some(1_000_000_001));
        assert!(parse_event(br#"{"Type":"network","Action":"connect"}"#).is_none());
        assert!(parse_event(b"garbage").is_none());
    }

    #[test]
    fn a_listed_container_gives_its_id_name_task_and_state() {
        let c: Value = serde_json::from_str(
            r#"{"Id":"c0","Names":["/web.1.abc"],"State":"running",
                "Labels":{"com.docker.swarm.task.id":"abc","com.overlay.node":"n1"}}"#,
        )
        .unwrap();
        let l = Labelled::of(&c).unwrap();
        assert_eq!(
            l,
            Labelled {
                id: "c0".into(),
                name: "web.1.abc".into(),
                task_id: Some("abc".into()),
                running: true,
            }
        );
        let exited = json!({"Id":"c1","Names":["/x"],"State":"exited","Labels":{}});
        let l = Labelled::of(&exited).unwrap();
        assert_eq!((l.task_id, l.running), (None, false));
    }
}
