//! The policy hook point: every intercepted chat message is checked before it gets a seq.
//! The Lua host plugs in here; until then [`AllowAll`] lets everything through.

/// What the policy sees of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    /// The authenticated sender.
    pub from: String,
    /// The addressee (a uid for 1:1 chats).
    pub to: String,
    /// `single` or `group`.
    pub chat_type: &'static str,
    /// Text content, if the message is text.
    pub text: Option<String>,
    /// The sender's client id.
    pub client_id: String,
    /// Conversation key.
    pub conversation: String,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store and deliver `text` (possibly rewritten) in place of the original.
    Allow(Option<String>),
    /// Refuse; the reason goes back to the sender.
    Deny(String),
}

/// A message policy; implementations must be cheap to call concurrently.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// Decides on one message.
    fn check(&self, message: &MessageView) -> Decision;
}

/// Accepts every message unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn check(&self, message: &MessageView) -> Decision {
        Decision::Allow(message.text.clone())
    }
}
