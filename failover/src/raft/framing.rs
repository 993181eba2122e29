//! Length-prefixed frames for a stream transport (the QUIC implementation of
//! [`RaftTransport`](super::network::RaftTransport) uses one bidirectional
//! stream per call: request frame one way, reply frame back).
//!
//! ```text
//!  frame = len: u32 big-endian | len bytes     (len ≤ MAX_RPC_BYTES)
//! ```
//!
//! A peer announcing a larger frame is refused before anything is allocated.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::network::{MAX_RPC_BYTES, TransportError};

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), TransportError> {
    if payload.len() > MAX_RPC_BYTES {
        return Err(TransportError::TooLarge(payload.len()));
    }
    let len = u32::try_from(payload.len()).map_err(|_| TransportError::TooLarge(payload.len()))?;
    let io = |e: std::io::Error| TransportError::Unreachable("peer".into(), e.to_string());
    w.write_all(&len.to_be_bytes()).await.map_err(io)?;
    w.write_all(payload).await.map_err(io)?;
    w.flush().await.map_err(io)
}

/// Reads one frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, TransportError> {
    let io = |e: std::io::Error| TransportError::Unreachable("peer".into(), e.to_string());
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_RPC_BYTES {
        return Err(TransportError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(io)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"hello").await.unwrap();
            write_frame(&mut a, b"").await.unwrap();
        });
        assert_eq!(read_frame(&mut b).await.unwrap(), b"hello");
        assert_eq!(read_frame(&mut b).await.unwrap(), b"");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_announcement_is_refused_without_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert_eq!(
            read_frame(&mut b).await.unwrap_err(),
            TransportError::TooLarge(u32::MAX as usize)
        );
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"abc").await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b).await,
            Err(TransportError::Unreachable(..))
        ));
    }
}
