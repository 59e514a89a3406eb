//! Control messages over QUIC streams: one length-prefixed postcard frame per message
//! (`protocol::control`), with the frame size checked before the body is read.
//!
//! A connection's first message (`Join` or `Hello`) comes from a peer the manager has not
//! admitted yet, so it is read with [`recv_first`], capped at [`FIRST_FRAME_MAX`]: nobody
//! makes the manager allocate more than that on their word before they are a member.

use protocol::control::{self, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// The largest first message of a connection. A `Join` (a name, an address, the token's
/// secret and a CSR for a P-256 key) is under 1 KiB and a `Hello` under 100 bytes; 64 KiB
/// leaves room for growth and costs nothing to a peer that is refused.
pub const FIRST_FRAME_MAX: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(
        "a first control message (Join or Hello) of {0} bytes exceeds the \
         {FIRST_FRAME_MAX}-byte limit; refused unread"
    )]
    FirstTooLarge(usize),
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
    recv_at_most(stream, usize::MAX).await
}

/// Reads a connection's first message, from a peer not admitted yet: a length over
/// [`FIRST_FRAME_MAX`] is refused before anything is allocated for the body.
pub async fn recv_first<T: DeserializeOwned>(
    stream: &mut quinn::RecvStream,
) -> Result<T, WireError> {
    recv_at_most(stream, FIRST_FRAME_MAX).await
}

async fn recv_at_most<T: DeserializeOwned>(
    stream: &mut quinn::RecvStream,
    max: usize,
) -> Result<T, WireError> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = frame_len_within(prefix, max)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(control::decode(&body)?)
}

/// A frame's length from its prefix, within `max` (a first message's cap, checked first) and
/// the protocol's own limit.
fn frame_len_within(prefix: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::FirstTooLarge(len));
    }
    Ok(control::frame_len(prefix)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_frame_is_capped_before_its_body_is_read() {
        let prefix = |n: u32| n.to_be_bytes();
        assert_eq!(frame_len_within(prefix(900), FIRST_FRAME_MAX).unwrap(), 900);
        let at_cap = FIRST_FRAME_MAX as u32;
        assert_eq!(
            frame_len_within(prefix(at_cap), FIRST_FRAME_MAX).unwrap(),
            FIRST_FRAME_MAX
        );
        let e = frame_len_within(prefix(at_cap + 1), FIRST_FRAME_MAX).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a first control message (Join or Hello) of 65537 bytes exceeds the 65536-byte \
             limit; refused unread"
        );
        assert!(matches!(
            frame_len_within(prefix(u32::MAX), FIRST_FRAME_MAX),
            Err(WireError::FirstTooLarge(_))
        ));
        // Later frames: the protocol's own limit.
        assert_eq!(
            frame_len_within(prefix(1 << 20), usize::MAX).unwrap(),
            1 << 20
        );
        assert!(matches!(
            frame_len_within(prefix(u32::MAX), usize::MAX),
            Err(WireError::Frame(FrameError::TooLarge(_)))
        ));
    }

    /// What a node sends first fits the cap with room to spare.
    #[test]
    fn a_real_join_is_far_below_the_cap() {
        let (_, csr_pem) = super::super::pki::node_key_and_csr("a-node-name").unwrap();
        let join = protocol::control::ToManager::Join {
            version: protocol::control::VERSION,
            node: protocol::types::NodeName::new("a-node-name").unwrap(),
            advertise_addr: std::net::Ipv4Addr::new(198, 18, 0, 2),
            data_port: 4789,
            secret: "s".repeat(64),
            csr_pem,
        };
        let frame = control::encode(&join).unwrap();
        assert!(frame.len() < 2048, "{}", frame.len());
    }
}
