//! What rumqttd sends a client: publishes (through the topic ACL, under client-side packet
//! ids), the answers to the client's publishes, its half of SUBACKs and UNSUBACKs, and its
//! DISCONNECT.

use rumqttd::protocol::{Packet, SubscribeReasonCode};

use super::outcome::PendingAck;
use super::{deliver, upstream_acks, Session};
use crate::auth::acl::Access;
use crate::edge::carry;
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
                let mut held = Vec::with_capacity(pending.relayed.len());
                for (filter, code) in pending.relayed.into_iter().zip(granted) {
                    if code < 0x80 {
                        held.push(filter);
                    } else if !self.routes.contains_key(&filter.path) {
                        self.subscriptions.remove(&filter.path);
                    }
                }
                held.extend(pending.joined);
                self.answer_subscribe(suback.pkid, codes, held)
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

    /// A publish for the client as MQTT says it gets it (see `deliver`), unless the topic
    /// ACL, no-local or Retain Handling keeps it from the client, or it is a second copy for
    /// overlapping subscriptions, or too large for the client: then it is taken off
    /// rumqttd's hands, so rumqttd does not resend it.
    fn on_upstream_publish(&mut self, frame: Frame) -> Result<(), EdgeError> {
        let mut publish = Publish::parse(&frame, Protocol::V5)?;
        let sent_qos = publish.qos();
        let answer = upstream_acks::answer_for(sent_qos);
        let retained = publish.flags & 1 == 1;
        let (carried, mut properties) = carry::take(&publish.properties);
        let copy = !retained && carried.is_some_and(|c| !self.recent.first(c.message));
        let delivery = match copy {
            true => None,
            false => deliver::decide(
                &self.subscriptions,
                publish.topic_str(),
                carried.as_ref(),
                sent_qos,
                retained,
                self.publisher,
            ),
        };
        let allowed = || self.acl_allows(publish.topic_str(), Access::Read, false, "deliver");
        let Some(delivery) = delivery.filter(|_| allowed()) else {
            self.taken_off_rumqttd(publish.pkid, answer);
            return Ok(());
        };
        carry::push_subscription_ids(&mut properties, &delivery.ids);
        publish.properties = properties.into();
        publish.flags = (publish.flags & 0b1000) | (delivery.qos << 1) | u8::from(delivery.retain);
        if !self.outbox.fits_publish(&publish) {
            tracing::debug!(
                topic = publish.topic_str(),
                "publish exceeds the client's maximum packet size; not sent"
            );
            self.ctx.im.metrics().count_undelivered("too_large");
            self.taken_off_rumqttd(publish.pkid, answer);
            return Ok(());
        }
        if let Some(notifier) = &self.notifier {
            notifier.delivered(Message {
                topic: publish.topic_str().to_owned(),
                qos: delivery.qos,
                retain: delivery.retain,
                payload: publish.payload.clone(),
            });
        }
        match answer {
            // rumqttd keeps it until the client's answer (its PUBACK may stand for PUBREC).
            Some(answer) if delivery.qos > 0 => {
                self.upstream_acks.forwarded(publish.pkid, answer);
                self.outbox.upstream_publish(publish)
            }
            // rumqttd sent less than the client gets (one copy of overlapping ones), or more
            // (QoS 0 published): the hook layer delivers it on its own.
            _ => {
                self.taken_off_rumqttd(publish.pkid, answer);
                let (topic, qos) = (publish.topic_str().to_owned(), delivery.qos);
                let properties = match self.version {
                    Protocol::V5 => &publish.properties[..],
                    Protocol::V4 => &[],
                };
                self.outbox
                    .own_publish(&topic, qos, properties, &publish.payload);
                Ok(())
            }
        }
    }

    /// Answers rumqttd's publish `pkid` now (in its turn), the client never seeing it.
    fn taken_off_rumqttd(&mut self, pkid: u16, answer: Option<u8>) {
        if let Some(answer) = answer {
            self.upstream_acks
                .dropped(pkid, answer, &mut self.to_rumqttd);
        }
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
