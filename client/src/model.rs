//! What an app sees: conversations, messages with their sending state, and events.

use std::fmt;

use crate::pb;

/// A conversation as the server names it: `u/{peer}` (one to one) or `g/{gid}` (a group).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId(String);

impl ConversationId {
    /// The one-to-one conversation with `peer`.
    pub fn direct(peer: &str) -> Self {
        Self(format!("u/{peer}"))
    }

    /// The conversation of group `gid`.
    pub fn group(gid: &str) -> Self {
        Self(format!("g/{gid}"))
    }

    /// Parses a server name; `None` for anything but `u/{id}` and `g/{id}`.
    pub fn parse(name: &str) -> Option<Self> {
        let (kind, id) = name.split_once('/')?;
        let valid = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.@".contains(c));
        (valid && (kind == "u" || kind == "g")).then(|| Self(name.to_owned()))
    }

    /// The name on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The group id, for a group conversation.
    pub fn gid(&self) -> Option<&str> {
        self.0.strip_prefix("g/")
    }

    /// The peer, for a one-to-one conversation.
    pub fn peer(&self) -> Option<&str> {
        self.0.strip_prefix("u/")
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Text.
    Text(String),
    /// Media: a URL (preferred) or small inline data.
    Media {
        /// MIME type.
        mime: String,
        /// Where the media is.
        url: String,
        /// Inline bytes, for small media.
        data: Vec<u8>,
    },
}

impl Content {
    pub(crate) fn to_wire(&self) -> pb::Content {
        let kind = match self {
            Self::Text(text) => pb::content::Kind::Text(text.clone()),
            Self::Media { mime, url, data } => pb::content::Kind::Media(pb::Media {
                mime: mime.clone(),
                url: url.clone(),
                data: data.clone(),
            }),
        };
        pb::Content { kind: Some(kind) }
    }

    pub(crate) fn from_wire(content: Option<pb::Content>) -> Self {
        match content.and_then(|c| c.kind) {
            Some(pb::content::Kind::Text(text)) => Self::Text(text),
            Some(pb::content::Kind::Media(media)) => Self::Media {
                mime: media.mime,
                url: media.url,
                data: media.data,
            },
            None => Self::Text(String::new()),
        }
    }

    /// The text, for a text message.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            Self::Media { .. } => None,
        }
    }
}

/// Where a message stands for this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Written by this device and in the outbox: shown at once (local echo), sent until the
    /// server confirms it. `attempts` > 1 or an `error` means it is being retried.
    Sending {
        /// Times it was published.
        attempts: u32,
        /// Why the last attempt did not go through, if it failed.
        error: Option<String>,
    },
    /// Stored by the server (it has its seq).
    Sent,
    /// Refused for good (the policy denied it, it is too large, not allowed): not retried.
    Failed {
        /// The MQTT 5 reason code of the refusal.
        code: u8,
        /// The server's reason.
        reason: String,
    },
    /// Received from someone else (or from another device of this user).
    Received,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The conversation it belongs to.
    pub conversation: ConversationId,
    /// The sender's id for it: unique per sender, the dedup key.
    pub msg_id: String,
    /// The sender (set by the server; this user for its own).
    pub from: String,
    /// The conversation's seq, once the server stored it.
    pub seq: Option<u64>,
    /// The sender's clock, milliseconds since the Unix epoch.
    pub time: i64,
    /// The server's clock when stored.
    pub server_time: Option<i64>,
    /// What it says.
    pub content: Content,
    /// Its state for this device.
    pub delivery: Delivery,
}

impl Message {
    pub(crate) fn from_wire(conversation: ConversationId, chat: pb::ChatMessage, me: &str) -> Self {
        let delivery = if chat.from == me {
            Delivery::Sent
        } else {
            Delivery::Received
        };
        Self {
            conversation,
            msg_id: chat.msg_id,
            from: chat.from,
            seq: (chat.seq > 0).then_some(chat.seq),
            time: chat.time,
            server_time: Some(chat.server_time),
            content: Content::from_wire(chat.msg),
            delivery,
        }
    }
}

/// A conversation's state on this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Its name.
    pub id: ConversationId,
    /// Messages from others after this user's read cursor.
    pub unread: u64,
    /// The newest seq the server has (as far as this device knows).
    pub max_seq: u64,
    /// This user's read cursor (any device of the user moves it).
    pub read_seq: u64,
    /// The furthest read cursor of the others (the peer's, in a one-to-one conversation).
    pub peer_read_seq: u64,
    /// Server time of the newest message.
    pub last_time: i64,
    /// Messages a backlog cap skipped for this device (History still has them).
    pub missed: u64,
    /// Messages retention deleted before this device fetched them.
    pub gone: u64,
    /// The newest message held locally.
    pub last_message: Option<Message>,
}

/// Unread counts: the badge of each conversation and their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unread {
    /// Sum over conversations.
    pub total: u64,
    /// Conversations with something unread.
    pub conversations: Vec<(ConversationId, u64)>,
}

/// The connection as the app shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting (again, after a backoff).
    Connecting,
    /// Connected, subscribed, the digest applied.
    Online,
    /// The connection dropped; it is retried with a jittered backoff.
    Offline {
        /// What ended it.
        reason: String,
    },
}

/// What happened, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message new to this device (received, fetched, or written here).
    Message(Message),
    /// A message changed (sent, failed, retrying).
    Updated(Message),
    /// A conversation's unread count changed.
    Unread {
        /// The conversation.
        conversation: ConversationId,
        /// Its badge now.
        unread: u64,
    },
    /// Someone's read cursor moved: messages up to `read_seq` are read by `uid`.
    Read {
        /// The conversation.
        conversation: ConversationId,
        /// The reader (another member, or this user on another device).
        uid: String,
        /// Their cursor.
        read_seq: u64,
    },
    /// A backlog cap skipped messages for this device: fetch them from History.
    Missed {
        /// The conversation.
        conversation: ConversationId,
        /// How many.
        count: u64,
    },
    /// Retention deleted messages before this device fetched them.
    Gone {
        /// The conversation.
        conversation: ConversationId,
        /// How many.
        count: u64,
    },
    /// Pushers of this device the server no longer has (the gateway rejected the pushkey,
    /// another device took it, or it was removed): register again with
    /// [`Client::set_pusher`](crate::Client::set_pusher) if the app still wants pushes.
    PushersGone(Vec<pb::PusherGone>),
    /// The connection changed.
    Connection(ConnectionState),
}

/// What fetching older messages found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Messages new to this device.
    pub added: usize,
    /// Nothing older is left to fetch.
    pub end: bool,
}

/// Who has read one message (from the members' read cursors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message.
    pub seq: u64,
    /// How many members other than its sender read it.
    pub read_count: u32,
    /// Their uids (at most 100).
    pub readers: Vec<String>,
}
