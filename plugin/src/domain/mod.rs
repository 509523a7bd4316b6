//! The nouns every layer shares, parsed once where they enter (a CONNECT, a topic, a
//! request, a stored key) and trusted from then on: users and groups ([`Uid`], [`Gid`]), a
//! user's [`Device`], a [`Conversation`], where a message goes ([`Recipient`]), the MQTT
//! [`Protocol`] a client speaks and the [`ListenerKind`] it came in on. Below the store:
//! they know nothing of MQTT packets, SQL or Lua.

mod conversation;
mod id;

use std::fmt;

pub use conversation::{Conversation, ConversationKind};
pub use id::{Gid, InvalidId, Uid};

/// A device is one client id of one user; offline state (acks, counters) is kept per device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Device {
    /// The authenticated user.
    pub uid: Uid,
    /// The MQTT client id of this device.
    pub client_id: String,
}

/// Where a chat message goes: a user's inbox (a 1:1 conversation) or a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recipient {
    /// A user: the 1:1 conversation with the sender.
    User(Uid),
    /// A group the sender belongs to.
    Group(Gid),
}

impl Recipient {
    /// The conversation a message from `sender` to this recipient belongs to.
    pub fn conversation(&self, sender: &Uid) -> Conversation {
        match self {
            Recipient::User(to) => Conversation::direct(sender, to),
            Recipient::Group(gid) => Conversation::group(gid),
        }
    }

    /// The id as the message's `to` names it.
    pub fn id(&self) -> &str {
        match self {
            Recipient::User(uid) => uid,
            Recipient::Group(gid) => gid,
        }
    }

    /// Whether it is a 1:1 chat or a group.
    pub fn kind(&self) -> ConversationKind {
        match self {
            Recipient::User(_) => ConversationKind::Direct,
            Recipient::Group(_) => ConversationKind::Group,
        }
    }
}

/// The MQTT version a client speaks, or a listener is bound to (rumqttd itself is always
/// spoken to in MQTT 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4; rumqttd's `v4` and `ws` listeners).
    V4,
    /// MQTT 5.
    V5,
}

impl Protocol {
    /// As scripts and metrics name it: `3.1.1` or `5`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V4 => "3.1.1",
            Protocol::V5 => "5",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which kind of public listener a connection came in on (a metrics label too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// MQTT over TCP.
    Tcp,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    /// The name used in configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "mqtt",
            Self::Tls => "tls",
            Self::Ws => "ws",
            Self::Wss => "wss",
        }
    }
}

impl fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ids and conversations from literals, for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Conversation, Device, Gid, Uid};

    pub(crate) fn uid(text: &str) -> Uid {
        Uid::parse(text).unwrap()
    }

    pub(crate) fn gid(text: &str) -> Gid {
        Gid::parse(text).unwrap()
    }

    pub(crate) fn direct(a: &str, b: &str) -> Conversation {
        Conversation::direct(&uid(a), &uid(b))
    }

    pub(crate) fn group(id: &str) -> Conversation {
        Conversation::group(&gid(id))
    }

    pub(crate) fn device(user: &str, client_id: &str) -> Device {
        Device {
            uid: uid(user),
            client_id: client_id.into(),
        }
    }
}
