//! The protobuf wire types (generated from `proto/` at build time) and bounded decoding.

use prost::Message;

/// Generated types of package `mqtt_im.v1`; field docs live in `proto/mqtt_im/v1/im.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/mqtt_im.v1.rs"));
}

impl pb::Envelope {
    /// A chat envelope carrying one text message to `to`: what a client publishes to
    /// `im/u/{to}`.
    pub fn text(msg_id: impl Into<String>, to: impl Into<String>, text: impl Into<String>) -> Self {
        let message = pb::ChatMessage {
            msg_id: msg_id.into(),
            to: to.into(),
            chat_type: pb::ChatType::Single as i32,
            msg: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(text.into())),
            }),
            ..Default::default()
        };
        Self {
            cmd: pb::Cmd::Chat as i32,
            body: Some(pb::envelope::Body::Chat(message)),
            ..Default::default()
        }
    }
}

/// Why a payload was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Larger than the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Not a valid protobuf encoding of the expected type.
    #[error("payload is not a valid {what}: {reason}")]
    Malformed {
        /// The expected message type.
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
}

/// Decodes `T` from at most `limit` bytes.
///
/// # Errors
/// [`WireError::TooLarge`] before decoding anything, or [`WireError::Malformed`].
pub fn decode<T: Message + Default>(
    bytes: &[u8],
    limit: usize,
    what: &'static str,
) -> Result<T, WireError> {
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    T::decode(bytes).map_err(|e| WireError::Malformed {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bytes_and_oversize_are_errors() {
        let err = decode::<pb::Envelope>(&[0xff, 0xff, 0xff], 100, "Envelope").unwrap_err();
        assert!(matches!(err, WireError::Malformed { .. }));
        let err = decode::<pb::Envelope>(&[0u8; 10], 5, "Envelope").unwrap_err();
        assert_eq!(err, WireError::TooLarge { size: 10, limit: 5 });
        let ok = pb::Request {
            request_id: "r1".into(),
            kind: None,
        };
        let back = decode::<pb::Request>(&ok.encode_to_vec(), 100, "Request").unwrap();
        assert_eq!(back, ok);
    }
}
