//! Control messages over QUIC streams: one length-prefixed postcard frame per message
//! (`protocol::control`), with the frame size checked before the body is read.

use protocol::control::{self, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
}

pub async fn send<T: Serialize>(stream: &mut quinn::SendStream, msg: &T) -> Result<(), WireError> {
    let frame = control::encode(msg)?;
    stream.write_all(&frame).await?;
    Ok(())
}

/// Writes a frame encoded beforehand (one encoding shared by many streams).
pub async fn send_frame(stream: &mut quinn::SendStream, frame: &[u8]) -> Result<(), WireError> {
    stream.write_all(frame).await?;
    Ok(())
}

pub async fn recv<T: DeserializeOwned>(stream: &mut quinn::RecvStream) -> Result<T, WireError> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = control::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(control::decode(&body)?)
}

/// QUIC transport settings of the control plane: keep-alives every second, and a peer that
/// says nothing for five seconds is gone (so a dead manager or node is noticed quickly).
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .expect("5 s fits a VarInt"),
    ));
    Arc::new(t)
}
