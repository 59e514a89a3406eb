//! A minimal HTTP/1.1 client over the node's Unix socket (hyper), returning parsed JSON or
//! the API's one-line error message.

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use protocol::api::ErrorBody;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client { socket }
    }

    /// Waits until the process serving the socket is `pid` (a new overlayd after an upgrade
    /// in place) and it answers `GET /info`.
    pub async fn wait_served_by(
        &self,
        pid: u32,
        within: std::time::Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(s) = UnixStream::connect(&self.socket).await {
                let peer = s.peer_cred().ok().and_then(|c| c.pid());
                drop(s);
                if peer == Some(pid as i32)
                    && self.call_status(Method::GET, "/info", None).await.is_ok()
                {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the new overlayd (pid {pid}) does not serve {} after {within:?}",
                    self.socket.display()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// An HTTP/1 connection to overlayd's socket.
    async fn connect(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "cannot reach overlayd at {} (is it running?)",
                self.socket.display()
            )
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with overlayd")?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Calls the API; returns the status and body as they came.
    pub async fn call_status(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut sender = self.connect().await?;
        let body = match body {
            Some(v) => Full::new(Bytes::from(serde_json::to_vec(&v)?)),
            None => Full::new(Bytes::new()),
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("http://overlayd{path}"))
            .header("host", "overlayd")
            .header("content-type", "application/json")
            .body(body)?;
        let resp = sender
            .send_request(req)
            .await
            .context("sending request to overlayd")?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading overlayd's answer")?
            .to_bytes();
        Ok((status, bytes))
    }

    /// Calls the API; a non-2xx answer becomes an error carrying the API's message.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Bytes> {
        let (status, bytes) = self.call_status(method, path, body).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| format!("overlayd answered {status}"));
            bail!(message);
        }
        Ok(bytes)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let bytes = self.request(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| anyhow!("unexpected answer from overlayd: {e}"))
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<T> {
        let bytes = self.request(Method::POST, path, Some(body)).await?;
        serde_json::from_slice(&bytes).map_err(|e| anyhow!("unexpected answer from overlayd: {e}"))
    }

    /// GETs `path` and writes its body to stdout as it arrives (a followed log).
    pub async fn stream_to_stdout(&self, path: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut sender = self.connect().await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("http://overlayd{path}"))
            .header("host", "overlayd")
            .body(Full::new(Bytes::new()))?;
        let resp = sender
            .send_request(req)
            .await
            .context("sending request to overlayd")?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            bail!("{}", String::from_utf8_lossy(&bytes).trim());
        }
        let mut out = std::io::stdout().lock();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading overlayd's answer")?;
            if let Some(d) = frame.data_ref() {
                out.write_all(d)?;
                out.flush()?;
            }
        }
        Ok(())
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.request(Method::DELETE, path, None).await.map(|_| ())
    }
}

/// The socket to use: the flag or OVERLAY_SOCKET, else the only one under /run/overlay.
pub fn default_socket(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut socks: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    match socks.len() {
        1 => Ok(socks.remove(0)),
        0 => bail!(
            "no overlayd socket found in {} (is overlayd running? pass --socket)",
            dir.display()
        ),
        _ => bail!(
            "several overlayd sockets in {}: choose one with --socket or OVERLAY_SOCKET",
            dir.display()
        ),
    }
}

/// Percent-encodes one path segment (names are restricted, but task ids and user typos
/// must not break the URL).
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
