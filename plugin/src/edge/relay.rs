//! Packet handling at packet boundaries: client → (hook | rumqttd) and rumqttd → client.

use rumqttd::protocol::{self, Packet, SubscribeReasonCode};

use super::acl::{self, PublishAccess};
use super::codec::{self, kind, Frame, PublishView as Publish, Version};
use super::limits::Throttled;
use super::packet_ids::Origin;
use super::reply::{Outcome, Refusal, ReplyTarget};
use super::session::Session;
use super::upstream_acks;
use super::EdgeError;
use crate::auth::acl::Access;
use crate::hook::{Message, Verdict};
use tokio::time::Instant;

impl Session {
    /// Handles one frame from the client, which arrived at `now`.
    pub(super) fn on_client_frame(&mut self, frame: Frame, now: Instant) -> Result<(), EdgeError> {
        match frame.kind() {
            kind::PUBLISH => self.on_client_publish(&frame, now),
            kind::PUBACK => {
                match self.ids.release(frame.ack_pkid()?) {
                    Some(Origin::Upstream(pkid)) => {
                        self.upstream_acks
                            .answered(pkid, kind::PUBACK, &mut self.up_out);
                    }
                    Some(Origin::Chat { conversation, seq }) => {
                        self.ctx.im.delivered(&self.device, &conversation, seq);
                    }
                    Some(Origin::Own) | None => {}
                }
                self.release_held()
            }
            kind::PUBREC => {
                if let Some(Origin::Upstream(pkid)) = self.ids.owner(frame.ack_pkid()?) {
                    let pkid = *pkid;
                    self.upstream_acks
                        .answered(pkid, kind::PUBREC, &mut self.up_out);
                }
                Ok(())
            }
            kind::PUBREL => {
                let pkid = frame.ack_pkid()?;
                if self.im_qos2.remove(&pkid) || !self.linked() {
                    // Ours, or unknown to anyone (rumqttd never had this client).
                    codec::write_ack(&mut self.client_out, kind::PUBCOMP, pkid);
                } else {
                    codec::write_ack(&mut self.up_out, kind::PUBREL, pkid);
                }
                Ok(())
            }
            kind::PUBCOMP => {
                if let Some(Origin::Upstream(pkid)) = self.ids.release(frame.ack_pkid()?) {
                    codec::write_ack(&mut self.up_out, kind::PUBCOMP, pkid);
                }
                self.release_held()
            }
            kind::SUBSCRIBE => match frame.decode(self.version, self.listener.max_packet)? {
                Packet::Subscribe(subscribe, properties) => {
                    self.on_subscribe(subscribe, properties);
                    Ok(())
                }
                _ => Err(EdgeError::Protocol("malformed SUBSCRIBE")),
            },
            kind::UNSUBSCRIBE => match frame.decode(self.version, self.listener.max_packet)? {
                Packet::Unsubscribe(unsubscribe, properties) => {
                    self.on_unsubscribe(unsubscribe, properties);
                    Ok(())
                }
                _ => Err(EdgeError::Protocol("malformed UNSUBSCRIBE")),
            },
            kind::PINGREQ => {
                self.client_out.extend_from_slice(&[kind::PINGRESP << 4, 0]);
                Ok(())
            }
            kind::DISCONNECT => {
                let farewell = match self.version {
                    Version::V5 => frame.bytes,
                    Version::V4 => bytes::Bytes::from_static(&[kind::DISCONNECT << 4, 0]),
                };
                // After what the client sent before it (still in the ordered operations).
                self.start(std::future::ready(Outcome::Farewell(farewell)));
                self.client_disconnected = true;
                Ok(())
            }
            _ => Err(EdgeError::Protocol("unexpected packet type from client")),
        }
    }

    fn on_client_publish(&mut self, frame: &Frame, now: Instant) -> Result<(), EdgeError> {
        let publish = Publish::parse(frame, self.version)?;
        if publish.topic.is_empty() {
            // Topic aliases are not offered (CONNACK advertises a maximum of 0).
            return Err(EdgeError::Protocol("publish without topic"));
        }
        if !protocol::valid_topic(publish.topic_str()) {
            return Err(EdgeError::Protocol("wildcard in a publish topic"));
        }
        let (qos, pkid) = (publish.qos(), publish.pkid);
        match self.publish_limits.charge(frame.bytes.len()) {
            Throttled::No => {}
            Throttled::Rate(_) if self.version == Version::V5 => {
                // PUBACK has no "message rate too high" (0x96 is a DISCONNECT code): quota
                // exceeded, with the reason in words.
                self.ctx.im.metrics().count_limited("rate");
                let refusal = Refusal {
                    reason: rumqttd::protocol::PubAckReason::QuotaExceeded,
                    code: crate::wire::pb::ErrorCode::Denied,
                    message: "message rate too high".into(),
                };
                if qos > 0 {
                    self.refuse(qos, pkid, publish.topic_str(), &refusal);
                }
                return Ok(());
            }
            // 3.1.1 has no way to say it: the client is slowed down instead.
            throttled @ (Throttled::Rate(wait) | Throttled::Bytes(wait)) => {
                let limit = match throttled {
                    Throttled::Rate(_) => "rate",
                    _ => "bytes",
                };
                self.ctx.im.metrics().count_limited(limit);
                self.pause_reads(now, wait);
            }
        }
        match acl::publish(&self.ctx.topics, self.im_uid(), publish.topic_str()) {
            PublishAccess::PassThrough => {
                if !self.acl_allows(publish.topic_str(), Access::Write, false, "publish") {
                    self.refuse_plain(
                        qos,
                        pkid,
                        publish.topic_str(),
                        "not allowed by the topic ACL",
                    );
                    return Ok(());
                }
                let judged = self.ctx.hooks.interests().publish;
                if !judged && !self.busy() {
                    match self.version {
                        Version::V5 => self.rumqttd_out().extend_from_slice(&frame.bytes),
                        Version::V4 => publish.write(Version::V5, pkid, self.rumqttd_out()),
                    }
                    return Ok(());
                }
                // In arrival order with this connection's other work: judged by the hooks,
                // or passed on behind a SUBSCRIBE still being checked.
                let upstream = match self.version {
                    Version::V5 => frame.bytes.clone(),
                    Version::V4 => {
                        let mut out = bytes::BytesMut::new();
                        publish.write(Version::V5, pkid, &mut out);
                        out.freeze()
                    }
                };
                let topic = publish.topic_str().to_owned();
                if !judged {
                    let relay = Outcome::Relay {
                        pkid,
                        qos,
                        topic,
                        upstream,
                        decision: None,
                    };
                    self.start(std::future::ready(relay));
                    return Ok(());
                }
                let message = Message {
                    topic: topic.clone(),
                    qos,
                    retain: publish.flags & 1 == 1,
                    payload: publish.payload.clone(),
                };
                let (hooks, client) = (self.ctx.hooks.clone(), self.client.clone());
                let max_packet = self.ctx.broker.max_packet;
                self.start(async move {
                    let (upstream, decision) = match hooks.publish(&client, message).await {
                        Verdict::Rewrite(payload) => rewritten(publish, pkid, payload, max_packet),
                        verdict => (upstream, verdict),
                    };
                    Outcome::Relay {
                        pkid,
                        qos,
                        topic,
                        upstream,
                        decision: Some(decision),
                    }
                });
                Ok(())
            }
            access @ (PublishAccess::Chat(_) | PublishAccess::GroupChat(_)) => {
                let (im, device) = (self.ctx.im.clone(), self.device.clone());
                let topic = publish.topic_str().to_owned();
                let payload = publish.payload.clone();
                let (to, group) = match access {
                    PublishAccess::GroupChat(gid) => (gid.to_owned(), true),
                    PublishAccess::Chat(uid) => (uid.to_owned(), false),
                    _ => return Ok(()),
                };
                // The order is pinned now, as the packet arrives.
                let turn = self.send_order.next_turn();
                self.start(async move {
                    let result = if group {
                        im.send_group(&device, &to, &payload, turn).await
                    } else {
                        im.send(&device, &to, &payload, turn).await
                    };
                    Outcome::Chat {
                        pkid,
                        qos,
                        topic,
                        result,
                    }
                });
                Ok(())
            }
            PublishAccess::Request => {
                let target = match self.reply_target(frame)? {
                    Ok(target) => target,
                    Err(refusal) => {
                        self.refuse(qos, pkid, publish.topic_str(), &refusal);
                        return Ok(());
                    }
                };
                let (im, device) = (self.ctx.im.clone(), self.device.clone());
                let payload = publish.payload.clone();
                let registration = self.registration();
                self.start(async move {
                    // A device's requests read and write its own state: after it is recorded.
                    if let Some(registration) = registration {
                        let _ = registration.await;
                    }
                    let response = im.request(&device, &payload).await;
                    Outcome::Reply {
                        pkid,
                        qos,
                        target,
                        response,
                    }
                });
                Ok(())
            }
            PublishAccess::Denied(reason) => {
                tracing::debug!(topic = publish.topic_str(), reason, "publish denied");
                self.refuse(
                    qos,
                    pkid,
                    publish.topic_str(),
                    &Refusal::not_authorized(reason),
                );
                Ok(())
            }
        }
    }

    /// MQTT 5 Response Topic (inside the user's own tree) and Correlation Data; 3.1.1 `resp`.
    fn reply_target(&self, frame: &Frame) -> Result<Result<ReplyTarget, Refusal>, EdgeError> {
        if self.version == Version::V4 {
            return Ok(Ok(self.default_target()));
        }
        let Packet::Publish(_, properties) =
            frame.decode(Version::V5, self.ctx.broker.max_packet)?
        else {
            return Err(EdgeError::Protocol("malformed PUBLISH"));
        };
        let properties = properties.unwrap_or_default();
        let mut target = self.default_target();
        target.correlation = properties.correlation_data;
        if let Some(topic) = properties.response_topic {
            let own = format!("{}/", self.ctx.topics.inbox(&self.device.uid));
            let allowed = topic.starts_with(&own)
                && protocol::valid_topic(&topic)
                && !topic.ends_with("/req");
            if !allowed {
                return Ok(Err(Refusal::not_authorized(
                    "response topic must lie under your own inbox tree",
                )));
            }
            target.topic = topic;
        }
        Ok(Ok(target))
    }

    pub(super) fn on_upstream_frame(&mut self, frame: Frame) -> Result<(), EdgeError> {
        match frame.kind() {
            kind::PUBLISH => {
                let publish = Publish::parse(&frame, Version::V5)?;
                let answer = upstream_acks::answer_for(publish.qos());
                if !self.acl_allows(publish.topic_str(), Access::Read, false, "deliver") {
                    // Taken off rumqttd's hands and dropped: rumqttd must not resend it.
                    if let Some(answer) = answer {
                        self.upstream_acks
                            .dropped(publish.pkid, answer, &mut self.up_out);
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
                self.forward_upstream_publish(frame)
            }
            kind::PUBACK | kind::PUBREC | kind::PUBCOMP => {
                match self.version {
                    Version::V5 => self.client_out.extend_from_slice(&frame.bytes),
                    Version::V4 => {
                        codec::write_ack(&mut self.client_out, frame.kind(), frame.ack_pkid()?)
                    }
                }
                Ok(())
            }
            kind::PUBREL => {
                let upstream = frame.ack_pkid()?;
                match self.ids.mapped(upstream) {
                    Some(pkid) => codec::write_ack(&mut self.client_out, kind::PUBREL, pkid),
                    // A QoS 2 message the ACL kept from the client: complete it upstream.
                    None => codec::write_ack(&mut self.up_out, kind::PUBCOMP, upstream),
                }
                Ok(())
            }
            kind::SUBACK => {
                let Packet::SubAck(suback, _) = frame.decode_upstream()? else {
                    return Err(EdgeError::Protocol("malformed SUBACK from rumqttd"));
                };
                let codes = self.merge(suback.pkid, suback.return_codes.iter().map(suback_code));
                self.write_suback(suback.pkid, codes)
            }
            kind::UNSUBACK => {
                let pkid = frame.ack_pkid()?;
                let codes = self.merge(pkid, std::iter::repeat(0));
                self.write_unsuback(pkid, codes)
            }
            kind::DISCONNECT => {
                if self.version == Version::V5 {
                    self.client_out.extend_from_slice(&frame.bytes);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Fills rumqttd's codes into the pending answer for `pkid`.
    fn merge(&mut self, pkid: u16, mut upstream: impl Iterator<Item = u8>) -> Vec<u8> {
        match self.pending.remove(&pkid) {
            Some(pending) => pending
                .codes
                .into_iter()
                .map(|code| code.unwrap_or_else(|| upstream.next().unwrap_or(0x80)))
                .collect(),
            None => upstream.collect(),
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

/// The publish for rumqttd with the payload a hook rewrote, unless the rewrite outgrew the
/// largest packet rumqttd takes (then it is refused, as a client's own would be).
fn rewritten(
    mut publish: Publish,
    pkid: u16,
    payload: bytes::Bytes,
    max_packet: usize,
) -> (bytes::Bytes, Verdict) {
    publish.payload = payload;
    let mut out = bytes::BytesMut::new();
    publish.write(Version::V5, pkid, &mut out);
    if out.len() > max_packet {
        let refusal = Verdict::Deny("rewritten publish too large".into());
        return (bytes::Bytes::new(), refusal);
    }
    (out.freeze(), Verdict::Allow)
}
