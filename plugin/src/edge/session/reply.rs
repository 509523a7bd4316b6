//! What the client is told about what the hook layer handled: PUBACK/PUBREC (with MQTT 5
//! reason codes and strings), replies on the response topic (with Correlation Data), and
//! error frames on `resp` for 3.1.1 clients.

use prost::Message;
use rumqttd::protocol::{
    Packet, PubAck, PubAckProperties, PubAckReason, PubRec, PubRecProperties, PubRecReason,
};

use super::outcome::{Refusal, ReplyTarget};
use super::{fit, Session};
use crate::edge::codec::{self, kind, Protocol};
use crate::edge::topics::Topics;
use crate::throttle::Throttle;
use crate::wire::pb;

fn pubrec_reason(reason: PubAckReason) -> PubRecReason {
    match reason {
        PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
        PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
        PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
        _ => PubRecReason::UnspecifiedError,
    }
}

impl Session {
    /// PUBACK (QoS 1) or PUBREC (QoS 2) for a publish the hook layer handled.
    pub(super) fn acknowledge(&mut self, qos: u8, pkid: u16) {
        match qos {
            1 => self.outbox.ack(kind::PUBACK, pkid),
            2 => {
                self.im_qos2.insert(pkid);
                self.outbox.ack(kind::PUBREC, pkid);
            }
            _ => {}
        }
    }

    /// Refuses a publish: MQTT 5 gets a reason code and string on its PUBACK/PUBREC;
    /// 3.1.1 (and any QoS 0 publish) also gets an error frame on `resp`.
    pub(super) fn refuse(&mut self, qos: u8, pkid: u16, topic: &str, refusal: &Refusal) {
        let properties = Some(refusal.message.clone());
        let written = match (self.version, qos) {
            (Protocol::V5, 1) => self
                .outbox
                .write_packet(Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: refusal.reason,
                    },
                    Some(PubAckProperties {
                        reason_string: properties,
                        user_properties: Vec::new(),
                    }),
                ))
                .is_ok(),
            (Protocol::V5, 2) => self
                .outbox
                .write_packet(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: pubrec_reason(refusal.reason),
                    },
                    Some(PubRecProperties {
                        reason_string: properties,
                        user_properties: Vec::new(),
                    }),
                ))
                .is_ok(),
            _ => {
                self.acknowledge(qos, pkid);
                false
            }
        };
        if qos == 2 && self.version == Protocol::V5 {
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
        if self.version == Protocol::V5 && qos > 0 {
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

    /// Tells the client on `resp` what was refused on `topic`, and why.
    pub(super) fn write_error_frame(&mut self, topic: &str, refusal: &Refusal) {
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
        // A client without an IM identity has no `resp` to be told on.
        if let Some(target) = self.default_target() {
            self.write_reply(&target, response);
        }
    }

    /// The 3.1.1 reply target: the user's own `resp`, if it has IM topics.
    pub(super) fn default_target(&self) -> Option<ReplyTarget> {
        Some(ReplyTarget {
            topic: self.own_topic(Topics::response)?,
            correlation: None,
        })
    }

    /// A response where the request asked for it, shrunk to the client's Maximum Packet
    /// Size (or replaced by an error that fits).
    pub(super) fn write_reply(&mut self, target: &ReplyTarget, mut response: pb::Response) {
        let properties = match (&target.correlation, self.version) {
            (Some(data), Protocol::V5) => codec::correlation_property(data),
            _ => Vec::new(),
        };
        let budget = self.outbox.payload_budget(&target.topic, properties.len());
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
        let payload = response.encode_to_vec();
        self.outbox
            .own_publish(&target.topic, 1, &properties, &payload);
    }
}
