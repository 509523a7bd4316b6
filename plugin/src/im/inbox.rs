//! Accepting a chat message (1:1 or group): decode, validate, policy, store (dedup + seq), then
//! deliver live to the online devices. Offline devices find it counted in their next digest.

use bytes::Bytes;
use prost::Message;

use super::order::Turn;
use super::{DeviceEvent, DeviceSink, ImError, ImService};
use crate::domain::{Conversation, ConversationKind, Device, Gid, Recipient, Uid};
use crate::metrics::{ChatLabels, RefusalLabels};
use crate::policy::{Decision, MessageView};
use crate::store::{Appended, NewMessage, OnCommit, StoredMessage};
use crate::wire::{self, pb, WireError};

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

/// A chat message that passed validation and the policy, ready to store.
#[derive(Debug)]
struct Checked {
    conversation: Conversation,
    chat: pb::ChatMessage,
    /// The client's time of the envelope.
    time: i64,
    to: Recipient,
}

/// The `chat` label of the message metrics.
fn labels(to: &Recipient) -> ChatLabels {
    let chat = match to.kind() {
        ConversationKind::Direct => "direct",
        ConversationKind::Group => "group",
    };
    ChatLabels { chat }
}

impl ImError {
    /// The `reason` label of a refused message.
    fn refusal(&self) -> RefusalLabels {
        let reason = match self {
            ImError::Wire(_) | ImError::Invalid(_) => "invalid",
            ImError::Denied(_) => "denied",
            ImError::NotAuthorized(_) | ImError::NotFound(_) => "not_authorized",
            ImError::Store(_) => "store",
        };
        RefusalLabels { reason }
    }
}

impl ImService {
    /// Accepts a chat publish from `sender` to `to`: a user's inbox, or a group the sender
    /// must belong to (one copy is stored whatever the group's size; the members' online
    /// devices get it live and the others count it from their cursors). Returns only once
    /// the message is durably stored (or was already). `turn` is the message's place in its
    /// connection's arrival order, which its seq follows.
    ///
    /// # Errors
    /// Bad payload, invalid fields, not a member of the group, a policy denial, or a store
    /// failure (nothing stored).
    #[tracing::instrument(skip(self, payload, turn), fields(uid = %sender.uid, client_id = %crate::text::LoggedId(&sender.client_id)))]
    pub async fn send(
        &self,
        sender: &Device,
        to: &Recipient,
        payload: &[u8],
        turn: Turn,
    ) -> Result<Accepted, ImError> {
        self.accept(sender, to.clone(), payload, turn).await
    }

    /// Stores a message and counts what became of it.
    async fn accept(
        &self,
        sender: &Device,
        target: Recipient,
        payload: &[u8],
        turn: Turn,
    ) -> Result<Accepted, ImError> {
        let metrics = self.metrics();
        let labels = labels(&target);
        metrics.messages_received.get_or_create(&labels).inc();
        let accepted = self.store_message(sender, target, payload, turn).await;
        match &accepted {
            Ok(accepted) if accepted.duplicate => metrics.messages_duplicate.inc(),
            Ok(_) => metrics.messages_stored.get_or_create(&labels).inc(),
            Err(e) => metrics.messages_refused.get_or_create(&e.refusal()).inc(),
        };
        accepted
    }

    /// Checks a message (concurrently with its neighbours), then hands it to the store in
    /// its turn and waits for the commit; live delivery runs at the commit, in seq order.
    async fn store_message(
        &self,
        sender: &Device,
        target: Recipient,
        payload: &[u8],
        turn: Turn,
    ) -> Result<Accepted, ImError> {
        let checked = self.check(sender, target, payload).await;
        // Refused messages wait too: a turn released early would let a later message
        // overtake an earlier one still being checked.
        turn.wait().await;
        let checked = checked?;
        let message = NewMessage {
            conversation: checked.conversation.clone(),
            sender: sender.uid.clone(),
            sender_device: sender.client_id.clone(),
            msg_id: checked.chat.msg_id.clone(),
            server_time: now_ms(),
            body: checked.chat.encode_to_vec(),
        };
        let (msg_id, ack_flg) = (checked.chat.msg_id.clone(), checked.chat.ack_flg);
        let conversation = checked.conversation.name_for(&sender.uid);
        let on_commit = self.live_delivery(sender, checked);
        let store = &self.inner.store;
        let append = async move {
            let queued = store.queue_append(message, Some(on_commit)).await;
            drop(turn);
            queued?.committed().await
        };
        let appended = self.metrics().store_call("append", append).await?;
        tracing::debug!(seq = appended.seq, duplicate = appended.duplicate, "stored");
        Ok(Accepted {
            msg_id,
            seq: appended.seq,
            server_time: appended.server_time,
            duplicate: appended.duplicate,
            ack_flg,
            conversation,
        })
    }

    /// Decodes, validates and runs the policy over a chat publish.
    async fn check(
        &self,
        sender: &Device,
        target: Recipient,
        payload: &[u8],
    ) -> Result<Checked, ImError> {
        if let Recipient::Group(gid) = &target {
            self.require_member(&sender.uid, gid).await?;
        }
        let limit = self.inner.settings.max_message_bytes;
        let envelope: pb::Envelope = wire::decode(payload, limit, "Envelope")?;
        let (mut chat, time) = validate(envelope, &target)?;
        chat.from = sender.uid.to_string();
        chat.to = target.id().to_owned();
        chat.chat_type = match target.kind() {
            ConversationKind::Direct => pb::ChatType::Single,
            ConversationKind::Group => pb::ChatType::Group,
        } as i32;
        let conversation = target.conversation(&sender.uid);
        self.apply_policy(sender, &conversation, &mut chat).await?;
        Ok(Checked {
            conversation,
            chat,
            time,
            to: target,
        })
    }

    /// The commit hook of a checked message: delivers a newly stored one live.
    fn live_delivery(&self, sender: &Device, checked: Checked) -> OnCommit {
        let (service, sender) = (self.clone(), sender.clone());
        Box::new(move |appended: &Appended| {
            if appended.duplicate {
                return;
            }
            let Checked {
                conversation,
                mut chat,
                time,
                to,
                ..
            } = checked;
            chat.seq = appended.seq;
            chat.server_time = appended.server_time;
            let payload = envelope_bytes(chat, time);
            match to {
                Recipient::User(to) => {
                    service.deliver_live(&to, &conversation, appended.seq, &payload);
                }
                Recipient::Group(gid) => {
                    service.deliver_group(&sender, &gid, &conversation, appended.seq, &payload);
                }
            }
        })
    }

    async fn apply_policy(
        &self,
        sender: &Device,
        conversation: &Conversation,
        chat: &mut pb::ChatMessage,
    ) -> Result<(), ImError> {
        let (text, media_url) = match chat.msg.as_ref().and_then(|c| c.kind.as_ref()) {
            Some(pb::content::Kind::Text(text)) => (Some(text.clone()), None),
            Some(pb::content::Kind::Media(media)) => (None, Some(media.url.clone())),
            None => (None, None),
        };
        let group = conversation.gid().map(Gid::to_string);
        let view = MessageView {
            from: chat.from.clone(),
            to: chat.to.clone(),
            chat_type: if group.is_some() { "group" } else { "single" },
            group,
            text,
            media_url,
            msg_id: chat.msg_id.clone(),
            client_id: sender.client_id.clone(),
            conversation: conversation.name_for(&sender.uid),
        };
        let decision = self.inner.policy.on_message(view).await;
        let verdict = match &decision {
            Decision::Deny(_) => "deny",
            Decision::Allow(Some(_)) => "rewrite",
            Decision::Allow(None) => "allow",
        };
        self.metrics().verdict("message", verdict);
        match decision {
            Decision::Deny(reason) => Err(ImError::Denied(reason)),
            Decision::Allow(rewritten) => {
                if let (Some(text), Some(content)) = (rewritten, chat.msg.as_mut()) {
                    content.kind = Some(pb::content::Kind::Text(text));
                    // A rewrite meets the same limit as what the client sent.
                    let (size, limit) = (chat.encoded_len(), self.inner.settings.max_message_bytes);
                    if size > limit {
                        return Err(WireError::TooLarge { size, limit }.into());
                    }
                }
                Ok(())
            }
        }
    }

    fn deliver_live(&self, to: &Uid, conversation: &Conversation, seq: u64, payload: &Bytes) {
        self.hand_over(to, conversation, seq, payload);
        let sinks = self.inner.presence.sinks(to);
        if sinks.is_empty() {
            if self.inner.cluster.is_none() {
                // With a cluster, the hand-over finds out whether another node holds a device.
                self.metrics().counted_offline.inc();
            }
            return;
        }
        let event = DeviceEvent::Chat {
            conversation: conversation.clone(),
            seq,
            payload: payload.clone(),
        };
        if self.push_live(&sinks, &event) < sinks.len() {
            tracing::debug!(%to, seq, "device busy; left in its backlog");
        }
    }

    /// Pushes a live message to each sink; returns and counts how many took it (a busy
    /// device leaves it in its backlog).
    pub(super) fn push_live(
        &self,
        sinks: &[std::sync::Arc<dyn DeviceSink>],
        event: &DeviceEvent,
    ) -> usize {
        let taken = sinks.iter().filter(|sink| sink.push(event.clone())).count();
        self.metrics().delivered_live.inc_by(taken as u64);
        taken
    }

    /// To the group's subscribed connections on this node (the sending device excepted) and
    /// to every other node's: work per online subscriber, none per member.
    fn deliver_group(
        &self,
        sender: &Device,
        gid: &Gid,
        conversation: &Conversation,
        seq: u64,
        payload: &Bytes,
    ) {
        self.hand_over_group(gid, conversation, seq, payload);
        let event = DeviceEvent::Chat {
            conversation: conversation.clone(),
            seq,
            payload: payload.clone(),
        };
        self.push_live(&self.group_sinks(gid, sender), &event);
    }
}

/// The `Envelope` a device receives for a stored message.
fn envelope_bytes(chat: pb::ChatMessage, time: i64) -> Bytes {
    let envelope = pb::Envelope {
        cmd: pb::Cmd::Chat as i32,
        time,
        uid: chat.from.clone(),
        client_info: None,
        body: Some(pb::envelope::Body::Chat(chat)),
    };
    Bytes::from(envelope.encode_to_vec())
}

/// Checks an inbound envelope and returns its chat message and client time.
fn validate(envelope: pb::Envelope, target: &Recipient) -> Result<(pb::ChatMessage, i64), ImError> {
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
    let (expected, what) = match target.kind() {
        ConversationKind::Direct => (pb::ChatType::Single, "CHAT_TYPE_SINGLE on a user inbox"),
        ConversationKind::Group => (pb::ChatType::Group, "CHAT_TYPE_GROUP on a group topic"),
    };
    if chat.chat_type != pb::ChatType::Unspecified as i32 && chat.chat_type != expected as i32 {
        return Err(ImError::Invalid(format!("chat_type must be {what}")));
    }
    let to = target.id();
    if !chat.to.is_empty() && chat.to != to {
        return Err(ImError::Invalid(format!(
            "to is {:?} but the message was published to {to:?}",
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
    chat.from = stored.sender.to_string();
    chat
}

pub(crate) use crate::store::now_ms;
