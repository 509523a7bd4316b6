//! Accepting a chat message: decode, validate, policy, store (dedup + seq), then deliver live
//! to the receiver's online devices. Offline devices find it counted in their next digest.

use bytes::Bytes;
use prost::Message;

use super::{conversation_name, direct_key, DeviceEvent, ImError, ImService};
use crate::policy::{Decision, MessageView};
use crate::store::{Device, NewMessage, StoredMessage};
use crate::wire::{self, pb};

/// Longest client-made message id.
const MAX_MSG_ID: usize = 128;

/// A stored chat message, as the sender learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The client's id of the message.
    pub msg_id: String,
    /// Its seq in the conversation.
    pub seq: u64,
    /// When it was stored.
    pub server_time: i64,
    /// It had been stored before (a retransmit).
    pub duplicate: bool,
    /// The sender asked for a `SendResult`.
    pub ack_flg: bool,
    /// The conversation as the sender names it.
    pub conversation: String,
}

impl Accepted {
    /// The `SendResult` for a sender that set `ack_flg`.
    pub fn send_result(&self) -> pb::SendResult {
        let status = if self.duplicate {
            pb::SendStatus::Duplicate
        } else {
            pb::SendStatus::Stored
        };
        pb::SendResult {
            msg_id: self.msg_id.clone(),
            seq: self.seq,
            server_time: self.server_time,
            status: status as i32,
            conversation: self.conversation.clone(),
        }
    }
}

impl ImService {
    /// Accepts a chat publish from `sender` to the inbox of `to`. Returns only once the
    /// message is durably stored (or was already).
    ///
    /// # Errors
    /// Bad payload, invalid fields, a policy denial, or a store failure (nothing stored).
    #[tracing::instrument(skip(self, payload), fields(uid = %sender.uid, client_id = %sender.client_id))]
    pub async fn send(
        &self,
        sender: &Device,
        to: &str,
        payload: &[u8],
    ) -> Result<Accepted, ImError> {
        let limit = self.inner.settings.max_message_bytes;
        let envelope: pb::Envelope = wire::decode(payload, limit, "Envelope")?;
        let (mut chat, time) = validate(envelope, to)?;
        chat.from = sender.uid.clone();
        chat.to = to.to_owned();
        chat.chat_type = pb::ChatType::Single as i32;
        let conversation = direct_key(&sender.uid, to);
        self.apply_policy(sender, &conversation, &mut chat).await?;
        let msg_id = chat.msg_id.clone();
        let ack_flg = chat.ack_flg;
        let appended = self
            .inner
            .store
            .append(NewMessage {
                conversation: conversation.clone(),
                members: vec![sender.uid.clone(), to.to_owned()],
                sender: sender.uid.clone(),
                sender_device: sender.client_id.clone(),
                msg_id: msg_id.clone(),
                server_time: now_ms(),
                body: chat.encode_to_vec(),
            })
            .await?;
        if !appended.duplicate {
            chat.seq = appended.seq;
            chat.server_time = appended.server_time;
            self.deliver_live(to, &conversation, chat, time);
        }
        tracing::debug!(seq = appended.seq, duplicate = appended.duplicate, "stored");
        Ok(Accepted {
            msg_id,
            seq: appended.seq,
            server_time: appended.server_time,
            duplicate: appended.duplicate,
            ack_flg,
            conversation: conversation_name(&conversation, &sender.uid),
        })
    }

    async fn apply_policy(
        &self,
        sender: &Device,
        conversation: &str,
        chat: &mut pb::ChatMessage,
    ) -> Result<(), ImError> {
        let (text, media_url) = match chat.msg.as_ref().and_then(|c| c.kind.as_ref()) {
            Some(pb::content::Kind::Text(text)) => (Some(text.clone()), None),
            Some(pb::content::Kind::Media(media)) => (None, Some(media.url.clone())),
            None => (None, None),
        };
        let view = MessageView {
            from: chat.from.clone(),
            to: chat.to.clone(),
            chat_type: "single",
            text,
            media_url,
            msg_id: chat.msg_id.clone(),
            client_id: sender.client_id.clone(),
            conversation: conversation_name(conversation, &sender.uid),
        };
        match self.inner.policy.on_message(&view).await {
            Decision::Deny(reason) => Err(ImError::Denied(reason)),
            Decision::Allow(rewritten) => {
                if let (Some(text), Some(content)) = (rewritten, chat.msg.as_mut()) {
                    content.kind = Some(pb::content::Kind::Text(text));
                }
                Ok(())
            }
        }
    }

    fn deliver_live(&self, to: &str, conversation: &str, chat: pb::ChatMessage, time: i64) {
        let sinks = self.inner.presence.sinks(to);
        if sinks.is_empty() && self.inner.cluster.is_none() {
            return;
        }
        let envelope = pb::Envelope {
            cmd: pb::Cmd::Chat as i32,
            time,
            uid: chat.from.clone(),
            client_info: None,
            body: Some(pb::envelope::Body::Chat(chat.clone())),
        };
        let payload = Bytes::from(envelope.encode_to_vec());
        self.hand_over(to, conversation, chat.seq, &payload);
        for sink in sinks {
            let delivered = sink.push(DeviceEvent::Chat {
                conversation: conversation.to_owned(),
                seq: chat.seq,
                payload: payload.clone(),
            });
            if !delivered {
                tracing::debug!(to, seq = chat.seq, "device busy; left in its backlog");
            }
        }
    }
}

/// Checks an inbound envelope and returns its chat message and client time.
fn validate(envelope: pb::Envelope, to: &str) -> Result<(pb::ChatMessage, i64), ImError> {
    if envelope.cmd != pb::Cmd::Chat as i32 {
        return Err(ImError::Invalid(format!(
            "envelope cmd must be CMD_CHAT ({}), got {}",
            pb::Cmd::Chat as i32,
            envelope.cmd
        )));
    }
    let Some(pb::envelope::Body::Chat(chat)) = envelope.body else {
        return Err(ImError::Invalid("envelope has no chat body".into()));
    };
    if chat.msg_id.is_empty() || chat.msg_id.len() > MAX_MSG_ID {
        return Err(ImError::Invalid(format!(
            "msg_id must be 1 to {MAX_MSG_ID} bytes"
        )));
    }
    let single = [
        pb::ChatType::Unspecified as i32,
        pb::ChatType::Single as i32,
    ];
    if !single.contains(&chat.chat_type) {
        return Err(ImError::Invalid(
            "chat_type must be CHAT_TYPE_SINGLE on a user inbox".into(),
        ));
    }
    if !chat.to.is_empty() && chat.to != to {
        return Err(ImError::Invalid(format!(
            "to is {:?} but the message was published to the inbox of {to:?}",
            chat.to
        )));
    }
    if chat.msg.as_ref().and_then(|c| c.kind.as_ref()).is_none() {
        return Err(ImError::Invalid("message has no content (msg)".into()));
    }
    let time = if envelope.time != 0 {
        envelope.time
    } else {
        chat.time
    };
    Ok((chat, time))
}

/// A stored message as the client sees it: the body with the server's fields filled in.
pub(crate) fn rehydrate(stored: &StoredMessage) -> pb::ChatMessage {
    let mut chat = pb::ChatMessage::decode(stored.body.as_slice()).unwrap_or_else(|e| {
        tracing::error!(seq = stored.seq, error = %e, "stored body does not decode");
        pb::ChatMessage::default()
    });
    chat.seq = stored.seq;
    chat.server_time = stored.server_time;
    chat.from = stored.sender.clone();
    chat
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
