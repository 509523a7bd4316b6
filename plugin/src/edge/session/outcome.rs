//! What the session's ordered operations finish with, and the pieces they carry: where a
//! reply goes, why a publish was refused, what each filter of a SUBSCRIBE was granted. Plain
//! data: the session applies them (`apply`); nothing here touches it.

use bytes::Bytes;
use rumqttd::protocol::{
    Filter, PubAckReason, SubscribeProperties, Unsubscribe, UnsubscribeProperties,
};

use crate::domain::Gid;
use crate::hook::Verdict;
use crate::im::{Accepted, ImError};
use crate::wire::pb;

/// A finished IM operation, applied to the connection in arrival order.
#[derive(Debug)]
pub(super) enum Outcome {
    /// A chat publish was stored, or refused.
    Chat {
        pkid: u16,
        qos: u8,
        topic: String,
        result: Result<Accepted, ImError>,
    },
    /// A request was answered.
    Reply {
        pkid: u16,
        qos: u8,
        target: ReplyTarget,
        response: pb::Response,
    },
    /// The digest for this connection.
    Digest(Result<pb::Digest, ImError>),
    /// A pass-through publish, relayed or refused in its turn.
    Relay {
        pkid: u16,
        qos: u8,
        topic: String,
        /// The publish as rumqttd gets it (MQTT 5).
        upstream: bytes::Bytes,
        /// What the hooks decided, if any judges publishes (a rewrite is already in
        /// `upstream`).
        decision: Option<Verdict>,
    },
    /// A SUBSCRIBE checked, ready to take effect.
    Subscribed(Subscription),
    /// An UNSUBSCRIBE in its turn.
    Unsubscribed(Unsubscribe, Option<UnsubscribeProperties>),
    /// A SUBACK that waited until the routes it grants were advertised to the other nodes.
    Advertised { pkid: u16, codes: Vec<u8> },
    /// The client's DISCONNECT, for rumqttd if it has this client (so that it drops the
    /// will).
    Farewell(bytes::Bytes),
}

/// Where a reply goes.
#[derive(Debug, Clone)]
pub(super) struct ReplyTarget {
    pub(super) topic: String,
    pub(super) correlation: Option<Bytes>,
}

/// Why a publish was refused, in both protocol versions' terms.
#[derive(Debug, Clone)]
pub(super) struct Refusal {
    pub(super) reason: PubAckReason,
    pub(super) code: pb::ErrorCode,
    pub(super) message: String,
}

impl Refusal {
    pub(super) fn not_authorized(message: &str) -> Self {
        Self {
            reason: PubAckReason::NotAuthorized,
            code: pb::ErrorCode::NotAuthorized,
            message: message.to_owned(),
        }
    }

    pub(super) fn from_im(error: &ImError) -> Self {
        let told = error.to_client();
        let reason = match told.code {
            pb::ErrorCode::TooLarge => PubAckReason::QuotaExceeded,
            pb::ErrorCode::BadRequest => PubAckReason::PayloadFormatInvalid,
            pb::ErrorCode::Denied | pb::ErrorCode::NotAuthorized | pb::ErrorCode::NotFound => {
                PubAckReason::NotAuthorized
            }
            _ => PubAckReason::UnspecifiedError,
        };
        Self {
            reason,
            code: told.code,
            message: told.message,
        }
    }
}

/// A subscribe or unsubscribe split between the hook layer and rumqttd, waiting for
/// rumqttd's half of the answer.
#[derive(Debug, Default)]
pub(super) struct PendingAck {
    /// One entry per filter: the hook layer's code, or `None` for rumqttd's.
    pub(super) codes: Vec<Option<u8>>,
    /// The filters rumqttd was asked about, in order.
    pub(super) relayed: Vec<Filter>,
    /// Shared subscriptions the hook layer took (in a cluster), routes to advertise before
    /// the SUBACK.
    pub(super) joined: Vec<Filter>,
}

/// One filter of a SUBSCRIBE, decided.
#[derive(Debug)]
pub(super) enum Granted {
    /// Refused by the hook layer with this code.
    Refused(u8),
    /// An IM topic of the client's own, at this QoS.
    Im { filter: String, qos: u8 },
    /// A group's topic, for a member.
    Group { filter: String, qos: u8, gid: Gid },
    /// For rumqttd to answer.
    Relay(Filter),
}

/// A SUBSCRIBE, or the IM filters of a resumed persistent session (no packet id: no
/// SUBACK), checked and ready to take effect.
#[derive(Debug)]
pub(super) struct Subscription {
    pub(super) pkid: Option<u16>,
    pub(super) properties: Option<SubscribeProperties>,
    pub(super) granted: Vec<Granted>,
}
