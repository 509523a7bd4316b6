//! What can go wrong, typed so an app can tell a refusal from a dropped connection.

use std::time::Duration;

use crate::pb;
use crate::store::StoreError;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The local database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The options cannot work (a bad server URL, an invalid user id).
    #[error("invalid options: {0}")]
    Options(String),
    /// An argument is invalid (an empty text, a malformed conversation name).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The call needs the server and the client is not connected now.
    #[error("not connected")]
    Offline,
    /// The connection dropped before the answer came.
    #[error("the connection dropped before the answer came")]
    Disconnected,
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The broker did not take the request (its PUBACK reason code; over the publish rate, say).
    #[error("the broker refused the request ({code:#04x}): {reason}")]
    Refused {
        /// The PUBACK reason code.
        code: u8,
        /// The broker's reason string.
        reason: String,
    },
    /// The server answered with an error.
    #[error("the server refused ({code:?}): {message}")]
    Server {
        /// The protocol's error code.
        code: pb::ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server answered something this client does not understand.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}
