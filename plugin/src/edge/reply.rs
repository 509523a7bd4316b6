//! What the client sees of IM outcomes: PUBACK/PUBREC (with MQTT 5 reason codes and
//! strings), replies on the response topic (with Correlation Data), error frames on `resp`
//! for 3.1.1 clients, and digests.

use crate::throttle::Throttle;
use bytes::Bytes;
use prost::Message;
use rumqttd::protocol::{
    Packet, PubAck, PubAckProperties, PubAckReason, PubRec, PubRecProperties, PubRecReason,
};

use super::codec::{self, kind, Version};
use super::fit;
use super::session::Session;
use super::subscribe::Subscription;
use super::EdgeError;
use crate::hook::Verdict;
use crate::im::{Accepted, ImError};
use crate::wire::pb;
use rumqttd::protocol::{Unsubscribe, UnsubscribeProperties};

/// Where a reply goes.
#[derive(Debug, Clone)]
pub(super) struct ReplyTarget {
    pub(super) topic: String,
    pub(super) correlation: Option<Bytes>,
}

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
        decision: Option<crate::hook::Verdict>,
    },
    /// A SUBSCRIBE checked, ready to take effect.
    Subscribed(Subscription),
    /// An UNSUBSCRIBE in its turn.
    Unsubscribed(Unsubscribe, Option<UnsubscribeProperties>),
    /// The client's DISCONNECT, for rumqttd if it has this client (so that it drops the
    /// will).
    Farewell(bytes::Bytes),
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

    fn from_im(error: &ImError) -> Self {
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

fn pubrec_reason(reason: PubAckReason) -> PubRecReason {
    match reason {
        PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
        PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
        PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
        _ => PubRecReason::UnspecifiedError,
    }
}

impl Session {
    /// Applies a finished operation to what the client sees.
    pub(super) fn apply(&mut self, outcome: Outcome) -> Result<(), EdgeError> {
        match outcome {
            Outcome::Relay {
                pkid,
                qos,
                topic,
                upstream,
                decision,
            } => {
                match decision {
                    None | Some(Verdict::Allow | Verdict::Rewrite(_)) => {
                        self.rumqttd_out().extend_from_slice(&upstream)
                    }
                    Some(Verdict::Deny(reason)) => {
                        let logged = crate::text::LoggedId(&reason);
                        tracing::debug!(topic, reason = %logged, "publish denied by a hook");
                        self.refuse_plain(qos, pkid, &topic, &reason);
                    }
                }
                Ok(())
            }
            Outcome::Subscribed(subscription) => self.subscribed(subscription),
            Outcome::Farewell(disconnect) => {
                if self.linked() {
                    self.up_out.extend_from_slice(&disconnect);
                }
                Ok(())
            }
            Outcome::Unsubscribed(unsubscribe, properties) => {
                self.unsubscribed(unsubscribe, properties)
            }
            Outcome::Chat {
                pkid,
                qos,
                topic,
                result: Ok(accepted),
            } => {
                self.acknowledge(qos, pkid);
                if accepted.ack_flg {
                    let response = pb::Response {
                        request_id: accepted.msg_id.clone(),
                        status: pb::Status::Ok as i32,
                        error: None,
                        result: Some(pb::response::Result::SendResult(accepted.send_result())),
                    };
                    let target = self.default_target();
                    self.write_reply(&target, response);
                }
                tracing::trace!(topic, seq = accepted.seq, "chat acknowledged");
                Ok(())
            }
            Outcome::Chat {
                pkid,
                qos,
                topic,
                result: Err(error),
            } => {
                tracing::debug!(topic, %error, "chat refused");
                // A 3.1.1 client whose message could not be stored for now gets no PUBACK but
                // an error frame, and then the connection closes: 3.1.1 clients retransmit
                // only when they reconnect. Everything else is answered now.
                if error.is_retryable() && self.version == Version::V4 {
                    self.write_error_frame(&topic, &Refusal::from_im(&error));
                    self.unstored = true;
                    return Ok(());
                }
                self.refuse(qos, pkid, &topic, &Refusal::from_im(&error));
                Ok(())
            }
            Outcome::Reply {
                pkid,
                qos,
                target,
                response,
            } => {
                self.acknowledge(qos, pkid);
                self.write_reply(&target, response);
                Ok(())
            }
            Outcome::Digest(Ok(digest)) => {
                let topic = self.ctx.topics.digest(&self.device.uid);
                let budget = self.payload_budget(&topic, 0);
                if digest.encoded_len() > budget {
                    tracing::warn!(budget, "digest cannot fit the client's maximum packet size");
                    return Ok(());
                }
                self.write_own_publish(&topic, 1, &[], &digest.encode_to_vec());
                Ok(())
            }
            Outcome::Digest(Err(error)) => {
                tracing::warn!(%error, "digest failed");
                let topic = self.ctx.topics.digest(&self.device.uid);
                self.write_error_frame(&topic, &Refusal::from_im(&error));
                Ok(())
            }
        }
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) for a publish the hook layer handled.
    pub(super) fn acknowledge(&mut self, qos: u8, pkid: u16) {
        match qos {
            1 => codec::write_ack(&mut self.client_out, kind::PUBACK, pkid),
            2 => {
                self.im_qos2.insert(pkid);
                codec::write_ack(&mut self.client_out, kind::PUBREC, pkid);
            }
            _ => {}
        }
    }

    /// Refuses a publish: MQTT 5 gets a reason code and string on its PUBACK/PUBREC;
    /// 3.1.1 (and any QoS 0 publish) also gets an error frame on `resp`.
    pub(super) fn refuse(&mut self, qos: u8, pkid: u16, topic: &str, refusal: &Refusal) {
        let properties = Some(refusal.message.clone());
        let written = match (self.version, qos) {
            (Version::V5, 1) => codec::write_packet(
                &mut self.client_out,
                Version::V5,
                Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: refusal.reason,
                    },
                    Some(PubAckProperties {
                        reason_string: properties,
                        user_properties: Vec::new(),
                    }),
                ),
            )
            .is_ok(),
            (Version::V5, 2) => codec::write_packet(
                &mut self.client_out,
                Version::V5,
                Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: pubrec_reason(refusal.reason),
                    },
                    Some(PubRecProperties {
                        reason_string: properties,
                        user_properties: Vec::new(),
                    }),
                ),
            )
            .is_ok(),
            _ => {
                self.acknowledge(qos, pkid);
                false
            }
        };
        if qos == 2 && self.version == Version::V5 {
            // An error PUBREC ends the exchange; a PUBREL may still come and gets PUBCOMP.
            self.im_qos2.insert(pkid);
        }
        if !written {
            self.write_error_frame(topic, refusal);
        }
    }

    /// Refuses a non-IM publish (the topic ACL or the policy said no), as Mosquitto does:
    /// MQTT 5 PUBACK/PUBREC 0x87 with `reason`; 3.1.1 (and QoS 0) acknowledged and dropped,
    /// logged once per burst.
    pub(super) fn refuse_plain(&mut self, qos: u8, pkid: u16, topic: &str, reason: &str) {
        if self.version == Version::V5 && qos > 0 {
            let reason = crate::text::clean(reason, crate::policy::MAX_REASON);
            return self.refuse(qos, pkid, topic, &Refusal::not_authorized(&reason));
        }
        self.acknowledge(qos, pkid);
        static DROPPED: Throttle = Throttle::new();
        if let Some(also) = DROPPED.admit() {
            tracing::info!(
                topic = crate::text::clean(topic, 256),
                also_since_last = also,
                reason = crate::text::clean(reason, 256),
                "publish dropped"
            );
        }
    }

    fn write_error_frame(&mut self, topic: &str, refusal: &Refusal) {
        let response = pb::Response {
            request_id: String::new(),
            status: pb::Status::Error as i32,
            error: Some(pb::Error {
                code: refusal.code as i32,
                message: refusal.message.clone(),
                topic: topic.to_owned(),
            }),
            result: None,
        };
        let target = self.default_target();
        self.write_reply(&target, response);
    }

    /// The 3.1.1 reply target: the user's own `resp`.
    pub(super) fn default_target(&self) -> ReplyTarget {
        ReplyTarget {
            topic: self.ctx.topics.response(&self.device.uid),
            correlation: None,
        }
    }

    /// Payload bytes a publish on `topic` may carry to this client.
    pub(super) fn payload_budget(&self, topic: &str, properties: usize) -> usize {
        self.max_packet.map_or(usize::MAX, |max| {
            max.saturating_sub(fit::overhead(topic, properties))
        })
    }

    fn write_reply(&mut self, target: &ReplyTarget, mut response: pb::Response) {
        let properties = match (&target.correlation, self.version) {
            (Some(data), Version::V5) => codec::correlation_property(data),
            _ => Vec::new(),
        };
        let budget = self.payload_budget(&target.topic, properties.len());
        if !fit::response(&mut response, budget) {
            response = pb::Response {
                request_id: response.request_id,
                status: pb::Status::Error as i32,
                error: Some(pb::Error {
                    code: pb::ErrorCode::TooLarge as i32,
                    message: "the reply exceeds your maximum packet size".into(),
                    topic: target.topic.clone(),
                }),
                result: None,
            };
        }
        self.write_own_publish(&target.topic, 1, &properties, &response.encode_to_vec());
    }
}
