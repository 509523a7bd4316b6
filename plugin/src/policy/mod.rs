//! The policy host: every intercepted chat message, every CONNECT and every subscription to a
//! non-IM topic is checked by the team's Lua scripts (see `scripts/README.md`).
//!
//! Each script returns a verdict — allow now, deny with a reason, rewrite and pass on, or pass
//! — in the shape of tower's `Predicate`. Scripts run sandboxed on Lua threads of their own,
//! each call under a memory limit, an instruction budget and a CPU-time deadline that no
//! script can catch or outlast; a failing script follows `policy.on_error`.

mod api;
mod patterns;
mod pool;
mod reload;
mod sandbox;
pub mod settings;
pub mod trial;
mod words;

#[cfg(test)]
mod tests;

use async_trait::async_trait;

use crate::hook::{Client, Hook, Interests, Message, Subscription, Verdict};

pub use pool::{FailureKind, LuaPolicy, PolicyStats, MAX_REASON};
pub(crate) use reload::watched;
pub use words::WordList;

/// What the policy sees of a chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    /// The authenticated sender.
    pub from: String,
    /// The addressee (a uid for 1:1 chats).
    pub to: String,
    /// `single` or `group`.
    pub chat_type: &'static str,
    /// The group id, for a group message.
    pub group: Option<String>,
    /// Text content, if the message is text.
    pub text: Option<String>,
    /// URL of media content, if the message is media.
    pub media_url: Option<String>,
    /// The client's message id.
    pub msg_id: String,
    /// The sender's client id.
    pub client_id: String,
    /// The conversation as the sender names it (`u/{peer}` or `g/{gid}`).
    pub conversation: String,
}

/// What the policy sees of a connecting client, after the broker's own authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    /// The resolved uid.
    pub uid: String,
    /// The MQTT client id.
    pub client_id: String,
    /// The username, if the client sent one.
    pub username: Option<String>,
    /// `"3.1.1"` or `"5"`.
    pub protocol: &'static str,
    /// The CONNECT's clean-session flag.
    pub clean_session: bool,
    /// The CONNECT's keep-alive, seconds.
    pub keep_alive: u16,
}

/// A subscription to a non-IM topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeView {
    /// The subscriber's uid.
    pub uid: String,
    /// The subscriber's client id.
    pub client_id: String,
    /// The topic filter.
    pub filter: String,
    /// Requested QoS.
    pub qos: u8,
}

/// A publish to a non-IM topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishView {
    /// The publisher's identity.
    pub uid: String,
    /// The publisher's client id.
    pub client_id: String,
    /// The topic.
    pub topic: String,
    /// QoS of the publish.
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// The payload.
    pub payload: bytes::Bytes,
}

/// A notification about to go to one device's push gateway, for `on_push`: a script may
/// skip it (deny) or rewrite the text it shows (mentions, muted conversations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushView {
    /// Whose device.
    pub uid: String,
    /// The device's client id.
    pub client_id: String,
    /// The pusher's app.
    pub app_id: String,
    /// The conversation as the user names it (`u/{peer}`, `g/{gid}`); empty for a
    /// counts-only update.
    pub conversation: String,
    /// The sender of the newest message, if any.
    pub from: Option<String>,
    /// Its text, if it is text.
    pub text: Option<String>,
    /// The badge the notification carries.
    pub unread: u64,
    /// The pusher's format: `event_id_only` shows no text whatever the script says.
    pub format: String,
}

/// What a client presented in its CONNECT, for a script acting as an auth provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthView {
    /// The client id.
    pub client_id: String,
    /// The CONNECT's username, if any.
    pub username: Option<String>,
    /// The CONNECT's password, if any.
    pub password: Option<Vec<u8>>,
    /// The client's address.
    pub peer: String,
    /// `3.1.1` or `5`.
    pub protocol: &'static str,
    /// `mqtt`, `tls`, `ws` or `wss`.
    pub transport: &'static str,
}

/// A script's answer to credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    /// Admitted, optionally under the uid the script named.
    Allow {
        /// The uid, if the script named one.
        uid: Option<String>,
    },
    /// Refused.
    Deny,
    /// No script decided: the next provider does.
    Next,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead; for a message, `Some(text)` replaces its text.
    Allow(Option<String>),
    /// Refuse; the reason goes back to the client.
    Deny(String),
}

/// Why the policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A script or word list could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A script failed to compile or its top-level code failed.
    #[error("script {script}: {message}")]
    Script {
        /// The script's path.
        script: String,
        /// Lua's message, with the line.
        message: String,
    },
    /// A word list could not be compiled.
    #[error("word list {name}: {message}")]
    Words {
        /// The list's name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// The Lua runtime itself failed (allocation of a state, a limit that cannot be set).
    #[error("lua: {0}")]
    Lua(String),
}

/// A [`Policy`] at the hook points: its `on_connect`, `on_subscribe` and `on_publish` decide
/// there (its `on_message` stays with the IM service). The policy bounds its own calls
/// (`policy.queue_timeout`, `policy.call_timeout`) and follows `policy.on_error`
/// itself; the hook's deadline is only a backstop.
#[derive(Debug, Clone)]
pub struct PolicyHook {
    policy: std::sync::Arc<dyn Policy>,
    on_error: crate::hook::OnError,
}

impl PolicyHook {
    /// `policy` as a hook that, should even the backstop fire, follows `on_error`.
    pub fn new(policy: std::sync::Arc<dyn Policy>, on_error: crate::hook::OnError) -> Self {
        Self { policy, on_error }
    }
}

impl From<Decision> for Verdict {
    fn from(decision: Decision) -> Self {
        match decision {
            Decision::Allow(_) => Verdict::Allow,
            Decision::Deny(reason) => Verdict::Deny(reason),
        }
    }
}

#[async_trait]
impl Hook for PolicyHook {
    fn name(&self) -> &str {
        "lua"
    }

    fn interests(&self) -> Interests {
        Interests {
            admit: true,
            subscribe: true,
            publish: self.policy.checks_publishes(),
            notifications: false,
        }
    }

    fn deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(60)
    }

    fn on_error(&self) -> crate::hook::OnError {
        self.on_error
    }

    async fn admit(&self, client: &Client) -> Verdict {
        let view = ClientView {
            uid: client.uid.clone(),
            client_id: client.client_id.clone(),
            username: client.username.clone(),
            protocol: client.protocol.name(),
            clean_session: client.clean_session,
            keep_alive: client.keep_alive,
        };
        self.policy.on_connect(view).await.into()
    }

    async fn subscribe(&self, client: &Client, subscription: &Subscription) -> Verdict {
        let view = SubscribeView {
            uid: client.uid.clone(),
            client_id: client.client_id.clone(),
            filter: subscription.filter.clone(),
            qos: subscription.qos,
        };
        self.policy.on_subscribe(view).await.into()
    }

    async fn publish(&self, client: &Client, message: &Message) -> Verdict {
        let view = PublishView {
            uid: client.uid.clone(),
            client_id: client.client_id.clone(),
            topic: message.topic.clone(),
            qos: message.qos,
            retain: message.retain,
            payload: message.payload.clone(),
        };
        self.policy.on_publish(view).await.into()
    }
}

/// A message, connection and subscription policy; implementations are called concurrently.
/// Views are handed over, so an implementation can move them to its own threads uncopied.
#[async_trait]
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// Decides on one chat message before it gets a seq.
    async fn on_message(&self, message: MessageView) -> Decision;
    /// Decides on a client after the broker's own authentication succeeded.
    async fn on_connect(&self, client: ClientView) -> Decision;
    /// Decides on a subscription to a non-IM topic filter.
    async fn on_subscribe(&self, subscription: SubscribeView) -> Decision;
    /// Whether [`Policy::on_publish`] has anything to decide: if not, pass-through publishes
    /// never wait for it.
    fn checks_publishes(&self) -> bool {
        false
    }
    /// Decides on a publish to a non-IM topic (after the topic ACL).
    async fn on_publish(&self, _publish: PublishView) -> Decision {
        Decision::Allow(None)
    }
    /// Decides on credentials as a link of the authentication chain.
    async fn on_auth(&self, _credentials: AuthView) -> AuthDecision {
        AuthDecision::Next
    }
    /// Whether [`Policy::on_push`] has anything to decide: if not, notifications never wait
    /// for it.
    fn checks_pushes(&self) -> bool {
        false
    }
    /// Decides on a notification for one device: allow (with a text to show instead), or
    /// deny to skip it.
    async fn on_push(&self, _push: PushView) -> Decision {
        Decision::Allow(None)
    }
}
