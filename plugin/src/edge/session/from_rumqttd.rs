//! What rumqttd sends a client: publishes (through the topic ACL, under client-side packet
//! ids), the answers to the client's publishes, its half of SUBACKs and UNSUBACKs, and its
//! DISCONNECT.

use rumqttd::protocol::{Packet, SubscribeReasonCode};

use super::outcome::PendingAck;
use super::{upstream_acks, Session};
use crate::auth::acl::Access;
use crate::edge::codec::{self, kind, Frame, Protocol, PublishView as Publish};
use crate::edge::EdgeError;
use crate::hook::Message;

impl Session {
    /// Handles one frame from rumqttd.
    pub(in crate::edge) fn on_upstream_frame(&mut self, frame: Frame) -> Result<(), EdgeError> {
        match frame.kind() {
            kind::PUBLISH => self.on_upstream_publish(frame),
            kind::PUBACK | kind::PUBREC | kind::PUBCOMP => {
                match self.version {
                    Protocol::V5 => self.outbox.raw(&frame.bytes),
                    Protocol::V4 => self.outbox.ack(frame.kind(), frame.ack_pkid()?),
                }
                Ok(())
            }
            kind::PUBREL => {
                let upstream = frame.ack_pkid()?;
                match self.outbox.mapped(upstream) {
                    Some(pkid) => self.outbox.ack(kind::PUBREL, pkid),
                    // A QoS 2 message the ACL kept from the client: complete it upstream.
                    None => codec::write_ack(&mut self.to_rumqttd, kind::PUBCOMP, upstream),
                }
                Ok(())
            }
            kind::SUBACK => {
                let Packet::SubAck(suback, _) = frame.decode_upstream()? else {
                    return Err(EdgeError::Protocol("malformed SUBACK from rumqttd"));
                };
                let granted: Vec<u8> = suback.return_codes.iter().map(suback_code).collect();
                let (codes, pending) = self.merge(suback.pkid, granted.iter().copied());
                let held = pending
                    .relayed
                    .into_iter()
                    .zip(granted)
                    .filter(|(_, code)| *code < 0x80)
                    .map(|(filter, _)| filter)
                    .chain(pending.joined);
                self.answer_subscribe(suback.pkid, codes, held.collect())
            }
            kind::UNSUBACK => {
                let pkid = frame.ack_pkid()?;
                let (codes, pending) = self.merge(pkid, std::iter::repeat(0));
                self.release_routes(&super::routes::paths(&pending.relayed));
                self.write_unsuback(pkid, codes)
            }
            kind::DISCONNECT => {
                if self.version == Protocol::V5 {
                    self.outbox.raw(&frame.bytes);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A publish for the client, unless the topic ACL keeps it from the client (then it is
    /// taken off rumqttd's hands, so rumqttd does not resend it).
    fn on_upstream_publish(&mut self, frame: Frame) -> Result<(), EdgeError> {
        let publish = Publish::parse(&frame, Protocol::V5)?;
        let answer = upstream_acks::answer_for(publish.qos());
        if !self.acl_allows(publish.topic_str(), Access::Read, false, "deliver") {
            if let Some(answer) = answer {
                self.upstream_acks
                    .dropped(publish.pkid, answer, &mut self.to_rumqttd);
            }
            return Ok(());
        }
        if let Some(answer) = answer {
            self.upstream_acks.forwarded(publish.pkid, answer);
        }
        if let Some(notifier) = &self.notifier {
            notifier.delivered(Message {
                topic: publish.topic_str().to_owned(),
                qos: publish.qos(),
                retain: publish.flags & 1 == 1,
                payload: publish.payload.clone(),
            });
        }
        self.outbox.upstream_publish(frame)
    }

    /// Fills rumqttd's codes into the pending answer for `pkid`; also returns what was
    /// pending besides the codes.
    fn merge(
        &mut self,
        pkid: u16,
        mut upstream: impl Iterator<Item = u8>,
    ) -> (Vec<u8>, PendingAck) {
        match self.pending.remove(&pkid) {
            Some(mut pending) => {
                let codes = std::mem::take(&mut pending.codes)
                    .into_iter()
                    .map(|code| code.unwrap_or_else(|| upstream.next().unwrap_or(0x80)))
                    .collect();
                (codes, pending)
            }
            None => (upstream.collect(), PendingAck::default()),
        }
    }
}

fn suback_code(code: &SubscribeReasonCode) -> u8 {
    match code {
        SubscribeReasonCode::Success(qos) => *qos as u8,
        SubscribeReasonCode::QoS0 => 0,
        SubscribeReasonCode::QoS1 => 1,
        SubscribeReasonCode::QoS2 => 2,
        _ => 0x80,
    }
}
