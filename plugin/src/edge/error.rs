//! Why a connection ended abnormally.

use super::codec::CodecError;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EdgeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection refused: {0}")]
    Refused(&'static str),
    #[error("websocket: {0}")]
    WebSocket(String),
}
