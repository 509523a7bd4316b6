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
use crate::domain::{Device, Recipient};
use crate::edge::acl::{self, PublishAccess};
use crate::edge::carry::{self, Carried};
use crate::edge::codec::{Frame, Protocol, PublishView as Publish};
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
        if publish.qos() > 0 && !self.outbox.received(publish.pkid) {
            self.disconnected = true;
            self.end.get_or_insert(super::End::ReceiveMaximumExceeded);
            return Ok(());
        }
        if !self.within_limits(&publish, frame.bytes.len(), now) {
            return Ok(());
        }
        let access = acl::publish(&self.ctx.topics, self.im_uid(), publish.topic_str());
        // Chat and requests come only from a client with an IM identity.
        let denied = match (access, self.im.clone()) {
            (PublishAccess::PassThrough, _) => {
                self.publish_plain(publish);
                return Ok(());
            }
            (PublishAccess::Chat(to), Some(device)) => {
                self.publish_chat(device, &publish, to);
                return Ok(());
            }
            (PublishAccess::Request, Some(device)) => {
                return self.publish_request(device, frame, &publish)
            }
            (PublishAccess::Denied(reason), _) => reason,
            (PublishAccess::Chat(_) | PublishAccess::Request, None) => acl::NO_IM_IDENTITY,
        };
        tracing::debug!(
            topic = publish.topic_str(),
            reason = denied,
            "publish denied"
        );
        let refusal = Refusal::not_authorized(denied);
        self.refuse(publish.qos(), publish.pkid, publish.topic_str(), &refusal);
        Ok(())
    }

    /// Charges the publish to the connection's rate and bandwidth. An MQTT 5 client over its
    /// rate is refused (`false`); a 3.1.1 one, which has no way to be told, is slowed down
    /// instead, as is any client over its bandwidth.
    fn within_limits(&mut self, publish: &Publish, bytes: usize, now: Instant) -> bool {
        let (qos, pkid) = (publish.qos(), publish.pkid);
        match self.publish_limits.charge(bytes) {
            Throttled::No => true,
            Throttled::Rate(_) if self.version == Protocol::V5 => {
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
    fn publish_plain(&mut self, mut publish: Publish) {
        let (qos, pkid) = (publish.qos(), publish.pkid);
        if !self.acl_allows(publish.topic_str(), Access::Write, false, "publish") {
            let reason = "not allowed by the topic ACL";
            self.refuse_plain(qos, pkid, publish.topic_str(), reason);
            return;
        }
        let carried = Carried::new(qos, publish.flags & 1 == 1, self.publisher);
        publish.properties = carry::attach(&publish.properties, &carried).into();
        let judged = self.ctx.hooks.interests().publish;
        if !judged && !self.busy() {
            publish.write(Protocol::V5, pkid, self.rumqttd_out());
            self.forward_elsewhere(&publish);
            return;
        }
        let mut out = BytesMut::new();
        publish.write(Protocol::V5, pkid, &mut out);
        let upstream = out.freeze();
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

    /// A chat message from `device` to user or group `to`: its place in the connection's
    /// order is pinned now, as the packet arrives, and its seqs follow that order.
    fn publish_chat(&mut self, device: Device, publish: &Publish, to: Recipient) {
        let im = self.ctx.im.clone();
        let (pkid, qos) = (publish.pkid, publish.qos());
        let topic = publish.topic_str().to_owned();
        let payload = publish.payload.clone();
        let turn = self.send_order.next_turn();
        self.start(async move {
            let result = im.send(&device, &to, &payload, turn).await;
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
    fn publish_request(
        &mut self,
        device: Device,
        frame: &Frame,
        publish: &Publish,
    ) -> Result<(), EdgeError> {
        let (pkid, qos) = (publish.pkid, publish.qos());
        let target = match self.reply_target(frame, &device)? {
            Ok(target) => target,
            Err(refusal) => {
                self.refuse(qos, pkid, publish.topic_str(), &refusal);
                return Ok(());
            }
        };
        let im = self.ctx.im.clone();
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
    fn reply_target(
        &self,
        frame: &Frame,
        device: &Device,
    ) -> Result<Result<ReplyTarget, Refusal>, EdgeError> {
        let mut target = ReplyTarget {
            topic: self.ctx.topics.response(&device.uid),
            correlation: None,
        };
        if self.version == Protocol::V4 {
            return Ok(Ok(target));
        }
        let Packet::Publish(_, properties) =
            frame.decode(Protocol::V5, self.ctx.broker.max_packet)?
        else {
            return Err(EdgeError::Protocol("malformed PUBLISH"));
        };
        let properties = properties.unwrap_or_default();
        target.correlation = properties.correlation_data;
        if let Some(topic) = properties.response_topic {
            let own = format!("{}/", self.ctx.topics.inbox(&device.uid));
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
    publish.write(Protocol::V5, pkid, &mut out);
    if out.len() > max_packet {
        let refusal = Verdict::Deny("rewritten publish too large".into());
        return (Bytes::new(), refusal);
    }
    (out.freeze(), Verdict::Allow)
}
