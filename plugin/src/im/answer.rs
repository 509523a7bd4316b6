//! What a client is told of a failure: a stable code and a short, clean message. A client's
//! own mistake is explained to it; a failure inside the server is logged in full under a
//! fresh id, and the client gets only that id to quote.

use super::ImError;
use crate::store::StoreError;
use crate::throttle::Throttle;
use crate::wire::{pb, WireError};

/// Longest error message a client gets.
pub const MAX_MESSAGE: usize = 256;

/// An error as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    /// The stable code.
    pub code: pb::ErrorCode,
    /// What went wrong, without anything internal; at most [`MAX_MESSAGE`] bytes.
    pub message: String,
}

impl ImError {
    /// What the client is told (logging the details of an internal failure once, here).
    pub fn to_client(&self) -> ClientError {
        let code = self.code();
        let message = match self {
            ImError::Store(
                StoreError::Invalid(text) | StoreError::NotFound(text) | StoreError::Conflict(text),
            ) => text.clone(),
            ImError::Store(StoreError::Unavailable(_)) => {
                let id = incident(self);
                format!("the store is unavailable, retry later (error {id})")
            }
            ImError::Store(_) => format!("internal error (error {})", incident(self)),
            other => other.to_string(),
        };
        ClientError {
            code,
            message: crate::text::clean(&message, MAX_MESSAGE),
        }
    }

    /// The wire code of the error.
    pub fn code(&self) -> pb::ErrorCode {
        match self {
            ImError::Wire(WireError::TooLarge { .. }) => pb::ErrorCode::TooLarge,
            ImError::Wire(_) | ImError::Invalid(_) => pb::ErrorCode::BadRequest,
            ImError::Denied(_) => pb::ErrorCode::Denied,
            ImError::NotAuthorized(_) => pb::ErrorCode::NotAuthorized,
            ImError::NotFound(_) => pb::ErrorCode::NotFound,
            ImError::Store(StoreError::Invalid(_)) => pb::ErrorCode::BadRequest,
            ImError::Store(StoreError::NotFound(_)) => pb::ErrorCode::NotFound,
            ImError::Store(StoreError::Conflict(_)) => pb::ErrorCode::BadRequest,
            ImError::Store(StoreError::Unavailable(_)) => pb::ErrorCode::Unavailable,
            ImError::Store(_) => pb::ErrorCode::Internal,
        }
    }

    /// Whether the client may simply send the same thing again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ImError::Store(StoreError::Unavailable(_)))
    }
}

/// Store outages, logged once per interval: every refused call of an outage has one cause.
static OUTAGE: Throttle = Throttle::new();

/// Logs an internal failure with its causes under a fresh id, and returns the id. During a
/// store outage one line per interval is written (with how many ids it stands for).
fn incident(error: &ImError) -> String {
    let id = format!("{:08x}", rand::random::<u32>());
    let also = if error.is_retryable() {
        match OUTAGE.admit() {
            Some(also) => also,
            None => return id,
        }
    } else {
        0
    };
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    tracing::error!(error_id = %id, %error, causes = ?causes, also_since_last = also, "request failed inside the server");
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_text_never_reaches_the_client() {
        let secret = "connection to 10.1.2.3:5432 refused; password authentication failed";
        for error in [
            StoreError::Unavailable(secret.into()),
            StoreError::Rejected(secret.into()),
        ] {
            let retryable = matches!(error, StoreError::Unavailable(_));
            let error = ImError::Store(error);
            let told = error.to_client();
            assert!(!told.message.contains("10.1.2.3"), "{}", told.message);
            assert!(told.message.contains("(error "), "{}", told.message);
            assert_eq!(error.is_retryable(), retryable);
        }
        let rejected = ImError::Store(StoreError::Rejected(secret.into())).to_client();
        assert_eq!(
            rejected.code,
            pb::ErrorCode::Internal,
            "not an outage to retry"
        );
    }

    #[test]
    fn a_client_mistake_is_explained_bounded_and_clean() {
        let told = ImError::Invalid(format!("bad\nname {}", "x".repeat(1000))).to_client();
        assert_eq!(told.code, pb::ErrorCode::BadRequest);
        assert!(told.message.starts_with("invalid message: bad name"));
        assert!(told.message.len() <= MAX_MESSAGE);
        assert!(!told.message.contains('\n'));
    }
}
