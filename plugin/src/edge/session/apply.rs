//! Finished IM operations, applied to the connection in the order they started: a chat
//! message stored or refused, a request answered, the digest, a pass-through publish judged
//! by the hooks, a SUBSCRIBE or UNSUBSCRIBE in its turn, the client's goodbye.

use prost::Message;

use super::outcome::{Outcome, Refusal};
use super::{End, Session};
use crate::edge::codec::{self, Protocol, PublishView};
use crate::edge::topics::Topics;
use crate::edge::EdgeError;
use crate::hook::Verdict;
use crate::im::{Accepted, ImError};
use crate::wire::pb;

impl Session {
    /// Applies a finished operation to what the client and rumqttd see.
    pub(super) fn apply(&mut self, outcome: Outcome) -> Result<(), EdgeError> {
        match outcome {
            Outcome::Relay {
                pkid,
                qos,
                topic,
                upstream,
                decision,
            } => self.relay(pkid, qos, &topic, &upstream, decision),
            Outcome::Subscribed(subscription) => return self.subscribed(subscription),
            Outcome::Unsubscribed(unsubscribe, properties) => {
                return self.unsubscribed(unsubscribe, properties)
            }
            Outcome::Farewell(disconnect) => {
                if self.linked {
                    self.to_rumqttd.extend_from_slice(&disconnect);
                }
            }
            Outcome::Chat {
                pkid,
                qos,
                topic,
                result: Ok(accepted),
            } => self.chat_stored(pkid, qos, &topic, &accepted),
            Outcome::Chat {
                pkid,
                qos,
                topic,
                result: Err(error),
            } => self.chat_refused(pkid, qos, &topic, &error),
            Outcome::Reply {
                pkid,
                qos,
                target,
                response,
            } => {
                self.acknowledge(qos, pkid);
                self.write_reply(&target, response);
            }
            Outcome::Digest(digest) => self.digest_ready(digest),
            Outcome::Advertised { pkid, codes } => return self.write_suback(pkid, codes),
        }
        Ok(())
    }

    /// A pass-through publish in its turn: to rumqttd (as a hook rewrote it), or refused.
    fn relay(
        &mut self,
        pkid: u16,
        qos: u8,
        topic: &str,
        upstream: &[u8],
        decision: Option<Verdict>,
    ) {
        match decision {
            None | Some(Verdict::Allow | Verdict::Rewrite(_)) => {
                self.rumqttd_out().extend_from_slice(upstream);
                if self.ctx.cluster.is_some() {
                    self.forward_relayed(upstream);
                }
            }
            Some(Verdict::Deny(reason)) => {
                let logged = crate::text::LoggedId(&reason);
                tracing::debug!(topic, reason = %logged, "publish denied by a hook");
                self.refuse_plain(qos, pkid, topic, &reason);
            }
        }
    }

    /// A relayed publish (MQTT 5 bytes, as rumqttd got them) for the other nodes too.
    fn forward_relayed(&mut self, upstream: &[u8]) {
        let mut bytes = bytes::BytesMut::from(upstream);
        if let Ok(Some(frame)) = codec::next_frame(&mut bytes, usize::MAX) {
            if let Ok(publish) = PublishView::parse(&frame, Protocol::V5) {
                self.forward_elsewhere(&publish);
            }
        }
    }

    /// A chat message is stored: acknowledged now, and its send result sent when asked for.
    fn chat_stored(&mut self, pkid: u16, qos: u8, topic: &str, accepted: &Accepted) {
        self.acknowledge(qos, pkid);
        if accepted.ack_flg {
            let response = pb::Response {
                request_id: accepted.msg_id.clone(),
                status: pb::Status::Ok as i32,
                error: None,
                result: Some(pb::response::Result::SendResult(accepted.send_result())),
            };
            if let Some(target) = self.default_target() {
                self.write_reply(&target, response);
            }
        }
        tracing::trace!(topic, seq = accepted.seq, "chat acknowledged");
    }

    /// A chat message was refused. A 3.1.1 client whose message could not be stored for now
    /// gets no PUBACK but an error frame, and then the connection closes: 3.1.1 clients
    /// retransmit only when they reconnect. Everything else is answered now.
    fn chat_refused(&mut self, pkid: u16, qos: u8, topic: &str, error: &ImError) {
        tracing::debug!(topic, %error, "chat refused");
        let refusal = Refusal::from_im(error);
        if error.is_retryable() && self.version == Protocol::V4 {
            self.write_error_frame(topic, &refusal);
            self.end.get_or_insert(End::Unstored);
            return;
        }
        self.refuse(qos, pkid, topic, &refusal);
    }

    /// The digest, if it fits the client's Maximum Packet Size; an error frame if it failed.
    fn digest_ready(&mut self, digest: Result<pb::Digest, ImError>) {
        let Some(topic) = self.own_topic(Topics::digest) else {
            return;
        };
        match digest {
            Ok(digest) => {
                let budget = self.outbox.payload_budget(&topic, 0);
                if digest.encoded_len() > budget {
                    tracing::warn!(budget, "digest cannot fit the client's maximum packet size");
                    return;
                }
                self.outbox
                    .own_publish(&topic, 1, &[], &digest.encode_to_vec());
            }
            Err(error) => {
                tracing::warn!(%error, "digest failed");
                self.write_error_frame(&topic, &Refusal::from_im(&error));
            }
        }
    }
}
