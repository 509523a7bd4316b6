//! A PUBLISH from the client, by route: checked and limited as it arrives, then passed
//! through to rumqttd (after the topic ACL and the hooks), handed to the IM service as chat
//! or as a request, or refused. Whatever needs a hook or the store is started as an ordered
//! operation, so answers follow arrival order.

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{self, Packet};
use tokio::time::Instant;

use super::outcome::{Outcome, Refusal, ReplyTarget};
use super::Session;
use crate::auth::acl::Access;
use crate::edge::acl::{self, PublishAccess};
use crate::edge::codec::{Frame, PublishView as Publish, Version};
use crate::edge::limits::Throttled;
use crate::edge::EdgeError;
use crate::hook::{Message, Verdict};

impl Session {
    pub(super) fn on_client_publish(
        &mut self,
        frame: &Frame,
        now: Instant,
    ) -> Result<(), EdgeError> {
        let publish = Publish::parse(frame, self.version)?;
        if publish.topic.is_empty() {
            // Topic aliases are not offered (CONNACK advertises a maximum of 0).
            return Err(EdgeError::Protocol("publish without topic"));
        }
        if !protocol::valid_topic(publish.topic_str()) {
            return Err(EdgeError::Protocol("wildcard in a publish topic"));
        }
        if !self.within_limits(&publish, frame.bytes.len(), now) {
            return Ok(());
        }
        match acl::publish(&self.ctx.topics, self.im_uid(), publish.topic_str()) {
            PublishAccess::PassThrough => self.publish_plain(frame, publish),
            PublishAccess::Chat(uid) => {
                let to = uid.to_owned();
                self.publish_chat(&publish, to, false);
            }
            PublishAccess::GroupChat(gid) => {
                let to = gid.to_owned();
                self.publish_chat(&publish, to, true);
            }
            PublishAccess::Request => self.publish_request(frame, &publish)?,
            PublishAccess::Denied(reason) => {
                tracing::debug!(topic = publish.topic_str(), reason, "publish denied");
                let refusal = Refusal::not_authorized(reason);
                self.refuse(publish.qos(), publish.pkid, publish.topic_str(), &refusal);
            }
        }
        Ok(())
    }

    /// Charges the publish to the connection's rate and bandwidth. An MQTT 5 client over its
    /// rate is refused (`false`); a 3.1.1 one, which has no way to be told, is slowed down
    /// instead, as is any client over its bandwidth.
    fn within_limits(&mut self, publish: &Publish, bytes: usize, now: Instant) -> bool {
        let (qos, pkid) = (publish.qos(), publish.pkid);
        match self.publish_limits.charge(bytes) {
            Throttled::No => true,
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
                false
            }
            throttled @ (Throttled::Rate(wait) | Throttled::Bytes(wait)) => {
                let limit = match throttled {
                    Throttled::Rate(_) => "rate",
                    _ => "bytes",
                };
                self.ctx.im.metrics().count_limited(limit);
                self.pause_reads(now, wait);
                true
            }
        }
    }

    /// A non-IM publish: the topic ACL decides now; then it goes straight to rumqttd, or in
    /// its turn behind this connection's earlier work when the hooks judge publishes or a
    /// SUBSCRIBE is still being checked.
    fn publish_plain(&mut self, frame: &Frame, publish: Publish) {
        let (qos, pkid) = (publish.qos(), publish.pkid);
        if !self.acl_allows(publish.topic_str(), Access::Write, false, "publish") {
            let reason = "not allowed by the topic ACL";
            self.refuse_plain(qos, pkid, publish.topic_str(), reason);
            return;
        }
        let judged = self.ctx.hooks.interests().publish;
        if !judged && !self.busy() {
            match self.version {
                Version::V5 => self.rumqttd_out().extend_from_slice(&frame.bytes),
                Version::V4 => publish.write(Version::V5, pkid, self.rumqttd_out()),
            }
            return;
        }
        let upstream = match self.version {
            Version::V5 => frame.bytes.clone(),
            Version::V4 => {
                let mut out = BytesMut::new();
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
            return;
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
    }

    /// A chat message to user or group `to`: its place in the connection's order is pinned
    /// now, as the packet arrives, and its seqs follow that order.
    fn publish_chat(&mut self, publish: &Publish, to: String, group: bool) {
        let (im, device) = (self.ctx.im.clone(), self.device.clone());
        let (pkid, qos) = (publish.pkid, publish.qos());
        let topic = publish.topic_str().to_owned();
        let payload = publish.payload.clone();
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
    }

    /// A request on the client's own `req`, answered where it asked (or refused when it
    /// asked for a reply outside its own tree).
    fn publish_request(&mut self, frame: &Frame, publish: &Publish) -> Result<(), EdgeError> {
        let (pkid, qos) = (publish.pkid, publish.qos());
        let target = match self.reply_target(frame)? {
            Ok(target) => target,
            Err(refusal) => {
                self.refuse(qos, pkid, publish.topic_str(), &refusal);
                return Ok(());
            }
        };
        let (im, device) = (self.ctx.im.clone(), self.device.clone());
        let payload = publish.payload.clone();
        let registration = self.registration.clone();
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
}

/// The publish for rumqttd with the payload a hook rewrote, unless the rewrite outgrew the
/// largest packet rumqttd takes (then it is refused, as a client's own would be).
fn rewritten(
    mut publish: Publish,
    pkid: u16,
    payload: Bytes,
    max_packet: usize,
) -> (Bytes, Verdict) {
    publish.payload = payload;
    let mut out = BytesMut::new();
    publish.write(Version::V5, pkid, &mut out);
    if out.len() > max_packet {
        let refusal = Verdict::Deny("rewritten publish too large".into());
        return (Bytes::new(), refusal);
    }
    (out.freeze(), Verdict::Allow)
}
