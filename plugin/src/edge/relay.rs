//! Packet handling at packet boundaries: client → (hook | rumqttd) and rumqttd → client.

use rumqttd::protocol::{
    self, Filter, Packet, QoS, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, UnsubAckReason,
    Unsubscribe,
};

use super::acl::{self, FilterAccess, PublishAccess};
use super::codec::{self, kind, Frame, PublishView as Publish, Version};
use super::connection::{Connection, PendingAck};
use super::limits::Throttled;
use super::packet_ids::Origin;
use super::reply::{Outcome, Refusal, ReplyTarget};
use super::topics::Route;
use super::upstream_acks;
use super::EdgeError;
use crate::auth::acl::Access;
use crate::policy::{Decision, PublishView, SubscribeView};

/// SUBACK code the hook layer uses for a refused filter (0x87 in MQTT 5, 0x80 in 3.1.1).
const NOT_AUTHORIZED: u8 = 0x87;
const FILTER_INVALID: u8 = 0x8f;

impl Connection {
    pub(super) async fn on_client_frame(&mut self, frame: Frame) -> Result<(), EdgeError> {
        match frame.kind() {
            kind::PUBLISH => self.on_client_publish(&frame),
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
                Ok(())
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
                if self.im_qos2.remove(&pkid) || !self.upstream.is_linked() {
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
                Ok(())
            }
            kind::SUBSCRIBE => match frame.decode(self.version, self.ctx.max_packet)? {
                Packet::Subscribe(subscribe, properties) => {
                    self.on_subscribe(subscribe, properties).await
                }
                _ => Err(EdgeError::Protocol("malformed SUBSCRIBE")),
            },
            kind::UNSUBSCRIBE => match frame.decode(self.version, self.ctx.max_packet)? {
                Packet::Unsubscribe(unsubscribe, properties) => {
                    self.on_unsubscribe(unsubscribe, properties)
                }
                _ => Err(EdgeError::Protocol("malformed UNSUBSCRIBE")),
            },
            kind::PINGREQ => {
                self.client_out.extend_from_slice(&[kind::PINGRESP << 4, 0]);
                Ok(())
            }
            kind::DISCONNECT => {
                // Told to rumqttd, if it has this client, so that it drops the will.
                match self.version {
                    _ if !self.upstream.is_linked() => {}
                    Version::V5 => self.up_out.extend_from_slice(&frame.bytes),
                    Version::V4 => self.up_out.extend_from_slice(&[kind::DISCONNECT << 4, 0]),
                }
                self.client_disconnected = true;
                Ok(())
            }
            _ => Err(EdgeError::Protocol("unexpected packet type from client")),
        }
    }

    fn on_client_publish(&mut self, frame: &Frame) -> Result<(), EdgeError> {
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
                self.pause_reads(wait);
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
                if !self.ctx.policy.checks_publishes() {
                    match self.version {
                        Version::V5 => self.rumqttd_out().extend_from_slice(&frame.bytes),
                        Version::V4 => publish.write(Version::V5, pkid, self.rumqttd_out()),
                    }
                    return Ok(());
                }
                // Judged by the policy in arrival order, with this connection's other work.
                let upstream = match self.version {
                    Version::V5 => frame.bytes.clone(),
                    Version::V4 => {
                        let mut out = bytes::BytesMut::new();
                        publish.write(Version::V5, pkid, &mut out);
                        out.freeze()
                    }
                };
                let view = PublishView {
                    uid: self.device.uid.clone(),
                    client_id: self.device.client_id.clone(),
                    topic: publish.topic_str().to_owned(),
                    qos,
                    retain: publish.flags & 1 == 1,
                    payload: publish.payload.clone(),
                };
                let policy = std::sync::Arc::clone(&self.ctx.policy);
                self.ops.push_back(Box::pin(async move {
                    let topic = view.topic.clone();
                    let decision = policy.on_publish(view).await;
                    Outcome::Relay {
                        pkid,
                        qos,
                        topic,
                        upstream,
                        decision,
                    }
                }));
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
                self.ops.push_back(Box::pin(async move {
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
                }));
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
                self.ops.push_back(Box::pin(async move {
                    let response = im.request(&device, &payload).await;
                    Outcome::Reply {
                        pkid,
                        qos,
                        target,
                        response,
                    }
                }));
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
        let Packet::Publish(_, properties) = frame.decode(Version::V5, self.ctx.max_packet)? else {
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

    async fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        properties: Option<protocol::SubscribeProperties>,
    ) -> Result<(), EdgeError> {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut relayed: Vec<Filter> = Vec::new();
        for filter in subscribe.filters {
            // rumqttd 0.20 ends the whole link on a `$` filter other than `$share/...`.
            let dollar = filter.path.starts_with('$') && !filter.path.starts_with("$share/");
            if !protocol::valid_filter(&filter.path) || dollar {
                codes.push(Some(FILTER_INVALID));
                continue;
            }
            match acl::subscribe(&self.ctx.topics, self.im_uid(), &filter.path) {
                FilterAccess::PassThrough
                    if !self.acl_allows(&filter.path, Access::Read, true, "subscribe") =>
                {
                    tracing::debug!(filter = filter.path, "subscribe denied by the ACL");
                    codes.push(Some(NOT_AUTHORIZED));
                }
                FilterAccess::PassThrough => {
                    let view = SubscribeView {
                        uid: self.device.uid.clone(),
                        client_id: self.device.client_id.clone(),
                        filter: filter.path.clone(),
                        qos: filter.qos as u8,
                    };
                    let metrics = self.ctx.im.metrics();
                    if let Decision::Deny(reason) = self.ctx.policy.on_subscribe(view).await {
                        metrics.verdict("subscribe", "deny");
                        tracing::debug!(filter = filter.path, %reason, "subscribe denied by policy");
                        codes.push(Some(NOT_AUTHORIZED));
                    } else {
                        metrics.verdict("subscribe", "allow");
                        codes.push(None);
                        relayed.push(filter);
                    }
                }
                FilterAccess::Im => {
                    let qos = (filter.qos as u8).min(1);
                    self.im_filters.insert(filter.path, qos);
                    codes.push(Some(qos));
                }
                FilterAccess::Group(gid) => {
                    let gid = gid.to_owned();
                    if self.join_group(&gid).await {
                        let qos = (filter.qos as u8).min(1);
                        self.im_filters.insert(filter.path, qos);
                        codes.push(Some(qos));
                    } else {
                        codes.push(Some(NOT_AUTHORIZED));
                    }
                }
                FilterAccess::Denied => {
                    tracing::debug!(filter = filter.path, "subscribe denied");
                    codes.push(Some(NOT_AUTHORIZED));
                }
            }
        }
        let pkid = subscribe.pkid;
        if relayed.is_empty() {
            self.write_suback(pkid, codes.into_iter().flatten().collect())
        } else {
            self.pending.insert(pkid, PendingAck { codes });
            let subscribe = Subscribe {
                pkid,
                filters: relayed,
            };
            codec::write_packet(
                self.rumqttd_out(),
                Version::V5,
                Packet::Subscribe(subscribe, properties),
            )?;
            Ok(())
        }
    }

    fn write_suback(&mut self, pkid: u16, codes: Vec<u8>) -> Result<(), EdgeError> {
        let return_codes = codes
            .into_iter()
            .map(|code| match (code, self.version) {
                (0, _) => SubscribeReasonCode::Success(QoS::AtMostOnce),
                (1, _) => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                (2, _) => SubscribeReasonCode::Success(QoS::ExactlyOnce),
                (_, Version::V4) => SubscribeReasonCode::Failure,
                (NOT_AUTHORIZED, Version::V5) => SubscribeReasonCode::NotAuthorized,
                (FILTER_INVALID, Version::V5) => SubscribeReasonCode::TopicFilterInvalid,
                (_, Version::V5) => SubscribeReasonCode::Unspecified,
            })
            .collect();
        let suback = SubAck { pkid, return_codes };
        codec::write_packet(
            &mut self.client_out,
            self.version,
            Packet::SubAck(suback, None),
        )?;
        self.after_subscribe();
        Ok(())
    }

    /// Presence and the once-per-connection digest follow the SUBACK.
    pub(super) fn after_subscribe(&mut self) {
        let inbox = self.ctx.topics.inbox(&self.device.uid);
        if self.granted_qos(&inbox).is_some() {
            self.go_online();
        }
        let digest = self.ctx.topics.digest(&self.device.uid);
        if !self.digest_sent && self.granted_qos(&digest).is_some() {
            self.digest_sent = true;
            let (im, device) = (self.ctx.im.clone(), self.device.clone());
            let register = !self.registered;
            self.registered = true;
            let budget = self.payload_budget(&digest, 0);
            self.ops.push_back(Box::pin(async move {
                if register {
                    if let Err(e) = im.connected(&device).await {
                        return Outcome::Digest(Err(e));
                    }
                }
                Outcome::Digest(im.digest(&device, budget).await)
            }));
        }
    }

    fn on_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        properties: Option<protocol::UnsubscribeProperties>,
    ) -> Result<(), EdgeError> {
        let mut codes = Vec::with_capacity(unsubscribe.filters.len());
        let mut relayed = Vec::new();
        for filter in unsubscribe.filters {
            if self.ctx.topics.strip_prefix(&filter).is_some() {
                if let Route::Group(gid) = self.ctx.topics.route(&filter) {
                    self.ctx.im.unwatch_group(gid, self.id);
                }
                let existed = self.im_filters.remove(&filter).is_some();
                codes.push(Some(if existed { 0 } else { 0x11 }));
            } else if self.upstream.is_linked() {
                codes.push(None);
                relayed.push(filter);
            } else {
                // rumqttd never had this client, so it has none of its subscriptions.
                codes.push(Some(0x11));
            }
        }
        let inbox = self.ctx.topics.inbox(&self.device.uid);
        if self.granted_qos(&inbox).is_none() {
            self.go_offline();
        }
        let pkid = unsubscribe.pkid;
        if relayed.is_empty() {
            return self.write_unsuback(pkid, codes.into_iter().flatten().collect());
        }
        self.pending.insert(pkid, PendingAck { codes });
        let unsubscribe = Unsubscribe {
            pkid,
            filters: relayed,
        };
        codec::write_packet(
            &mut self.up_out,
            Version::V5,
            Packet::Unsubscribe(unsubscribe, properties),
        )?;
        Ok(())
    }

    /// Members only: watches the group for live messages; `false` for a non-member (or when
    /// membership cannot be checked now).
    pub(super) async fn join_group(&mut self, gid: &str) -> bool {
        match self.ctx.im.group_role(&self.device.uid, gid).await {
            Ok(Some(_)) => {
                self.ctx
                    .im
                    .watch_group(gid, &self.device, self.id, self.sink());
                true
            }
            Ok(None) => {
                tracing::debug!(gid, "group subscribe by a non-member denied");
                false
            }
            Err(e) => {
                tracing::warn!(gid, error = %e, "group membership not checkable; subscribe refused");
                false
            }
        }
    }

    /// The groups this connection's filters name.
    pub(super) fn group_filters(&self) -> Vec<(String, String)> {
        self.im_filters
            .keys()
            .filter_map(|filter| match self.ctx.topics.route(filter) {
                Route::Group(gid) => Some((filter.clone(), gid.to_owned())),
                _ => None,
            })
            .collect()
    }

    fn write_unsuback(&mut self, pkid: u16, codes: Vec<u8>) -> Result<(), EdgeError> {
        let reasons = codes
            .into_iter()
            .map(|code| match code {
                0 => UnsubAckReason::Success,
                _ => UnsubAckReason::NoSubscriptionExisted,
            })
            .collect();
        let unsuback = UnsubAck { pkid, reasons };
        codec::write_packet(
            &mut self.client_out,
            self.version,
            Packet::UnsubAck(unsuback, None),
        )?;
        Ok(())
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
                let pkid = if publish.qos() > 0 {
                    match self.ids.for_upstream(publish.pkid) {
                        Some(pkid) => pkid,
                        None => return Err(EdgeError::Protocol("client packet ids exhausted")),
                    }
                } else {
                    0
                };
                publish.write(self.version, pkid, &mut self.client_out);
                Ok(())
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
