//! Persistence behind one trait. The store knows conversations, members, devices and opaque
//! message bodies; it knows nothing of MQTT, protobuf or Lua.
//!
//! Every backend gives the same guarantees, checked by the conformance suite in
//! [`conformance`]: a method that returns `Ok` has committed what it wrote.

mod embedded;
mod migrate;
mod postgres;
pub(crate) mod ranges;
mod redis;

#[cfg(test)]
pub(crate) mod conformance;

use async_trait::async_trait;

pub use self::redis::RedisBus;
pub use embedded::EmbeddedStore;
pub use postgres::{DigestCache, PostgresStore};
pub use ranges::SeqRange;

/// A device is one client id of one user; offline state (acks, counters) is kept per device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Device {
    /// The authenticated user.
    pub uid: String,
    /// The MQTT client id of this device.
    pub client_id: String,
}

/// A message to append to a conversation.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Conversation key, e.g. `dm:alice:bob`; created with `members` on first use.
    pub conversation: String,
    /// Members of the conversation, recorded when it is created.
    pub members: Vec<String>,
    /// The authenticated sender.
    pub sender: String,
    /// The sender's client id: the sending device never gets its own message back in a pull.
    pub sender_device: String,
    /// Client-made id; `(sender, msg_id)` is stored at most once.
    pub msg_id: String,
    /// Server clock in milliseconds.
    pub server_time: i64,
    /// Opaque payload.
    pub body: Vec<u8>,
}

/// The outcome of [`Store::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Seq of the message in its conversation (the first one's, for a duplicate).
    pub seq: u64,
    /// Server time of the stored copy.
    pub server_time: i64,
    /// The message had been stored before; nothing was written.
    pub duplicate: bool,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Seq in its conversation.
    pub seq: u64,
    /// The authenticated sender.
    pub sender: String,
    /// When it was stored, milliseconds.
    pub server_time: i64,
    /// Opaque payload.
    pub body: Vec<u8>,
}

/// A page of messages, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// Newest first.
    pub messages: Vec<StoredMessage>,
    /// Nothing older is left (for this device, or in the conversation for history).
    pub end: bool,
}

/// One conversation in a device's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationState {
    /// Conversation key.
    pub conversation: String,
    /// Messages from others since the last cleared digest that this device has not acked.
    pub count: u64,
    /// Messages this device has not acked, its own excluded.
    pub unacked: u64,
    /// Last committed seq.
    pub max_seq: u64,
    /// Server time of the newest message.
    pub last_time: i64,
    /// Highest seq such that the device acked everything up to it.
    pub acked_seq: u64,
    /// The user's read cursor.
    pub read_seq: u64,
    /// Highest read cursor among the other members.
    pub peer_read_seq: u64,
    /// Newest messages, newest first.
    pub last: Vec<StoredMessage>,
}

/// A digest as recorded: `version` identifies what [`Store::clear_counters`] will clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestSnapshot {
    /// Per-device digest version.
    pub version: u64,
    /// Conversations with something unacked or counted.
    pub conversations: Vec<ConversationState>,
}

/// Why a store call failed. Backends map their own errors into these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend cannot be reached or failed; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database schema is newer than this binary understands.
    #[error("database schema version {found} is newer than this binary supports ({supported}); upgrade mqtt-im")]
    SchemaTooNew {
        /// Version recorded in the database.
        found: u32,
        /// Newest version this binary knows.
        supported: u32,
    },
    /// A migration failed to apply.
    #[error("migration {version} failed: {reason}")]
    Migration {
        /// The migration number.
        version: u32,
        /// What went wrong.
        reason: String,
    },
    /// The request named something out of range (a seq above the conversation's last one).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A digest version that was never handed to this device.
    #[error("not found: {0}")]
    NotFound(String),
}

/// The storage contract shared by every backend.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Appends a message, assigning the next seq of its conversation inside the committing
    /// transaction, so a reader never sees seq `n` before `n - 1`. A `(sender, msg_id)` already
    /// stored returns the first copy's seq with `duplicate = true` and writes nothing.
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError>;

    /// Records a device; a device seen for the first time starts with what any device of its
    /// user has already acknowledged.
    async fn register_device(&self, device: &Device) -> Result<(), StoreError>;

    /// Builds and records the next digest of a device: one entry per conversation with
    /// something unacked, each with its `last_n` newest messages.
    async fn digest(&self, device: &Device, last_n: usize) -> Result<DigestSnapshot, StoreError>;

    /// Clears the counters that digest `version` carried; increments since then stay.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if that version was never handed to this device.
    async fn clear_counters(&self, device: &Device, version: u64) -> Result<(), StoreError>;

    /// Acknowledges `ack` (if any) and returns the newest `limit` messages the device has not
    /// acknowledged, in one transaction.
    async fn pull(
        &self,
        device: &Device,
        conversation: &str,
        ack: Option<SeqRange>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Acknowledges a range of seqs for a device (clamped to the conversation's last seq).
    async fn ack(
        &self,
        device: &Device,
        conversation: &str,
        range: SeqRange,
    ) -> Result<(), StoreError>;

    /// Messages older than `before` (all when `None`), newest first; acks are untouched.
    async fn history(
        &self,
        conversation: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Moves a member's read cursor forward (never back) and returns the cursor now stored.
    async fn mark_read(&self, uid: &str, conversation: &str, seq: u64) -> Result<u64, StoreError>;

    /// Flushes pending writes and stops background work; later calls fail as unavailable.
    async fn close(&self);
}
