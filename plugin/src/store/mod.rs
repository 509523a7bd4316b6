//! Persistence behind one trait. The store knows conversations, members, devices and opaque
//! message bodies; it knows nothing of MQTT, protobuf or Lua.
//!
//! Every backend gives the same guarantees, checked by the conformance suite in
//! [`conformance`]: a method that returns `Ok` has committed what it wrote.

mod bounded;
mod conversation;
mod embedded;
mod migrate;
mod postgres;
pub(crate) mod ranges;
mod redis;

#[cfg(test)]
pub(crate) mod conformance;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;

pub use self::redis::RedisBus;
pub use bounded::Bounded;
pub use conversation::Conversation;
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
    /// The conversation; a 1:1 chat is created with its two members on first use.
    pub conversation: Conversation,
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

/// Runs on the store's writer once a message is committed, in commit order (so in seq order
/// within a conversation, across every sender), before its append resolves: work that must
/// follow seq order, such as live delivery, goes here. It must not block.
pub type OnCommit = Box<dyn FnOnce(&Appended) + Send>;

/// An append handed to the store's writer, waiting for its group commit.
#[derive(Debug)]
pub struct QueuedAppend {
    done: oneshot::Receiver<Result<Appended, StoreError>>,
    /// When waiting for the commit stops, and the limit that set it ([`Bounded`] stores).
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
}

impl QueuedAppend {
    pub(crate) fn new(done: oneshot::Receiver<Result<Appended, StoreError>>) -> Self {
        Self {
            done,
            deadline: None,
        }
    }

    /// The same append, waited for at most `limit` from now.
    pub(crate) fn within(self, limit: std::time::Duration) -> Self {
        Self {
            deadline: Some((tokio::time::Instant::now() + limit, limit)),
            ..self
        }
    }

    /// Waits for the commit: the message's seq, or why it was not stored.
    ///
    /// # Errors
    /// The commit failed or the writer stopped (nothing was stored), or the deadline passed
    /// (it may still commit; a retransmission is then a duplicate).
    pub async fn committed(self) -> Result<Appended, StoreError> {
        let stopped = |_| StoreError::Unavailable("the writer stopped".into());
        match self.deadline {
            None => self.done.await.map_err(stopped)?,
            Some((at, limit)) => match tokio::time::timeout_at(at, self.done).await {
                Ok(answer) => answer.map_err(stopped)?,
                Err(_) => Err(bounded::timed_out(limit)),
            },
        }
    }
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
    /// The conversation.
    pub conversation: Conversation,
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

/// What a recorded digest remembers of one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DigestEntry {
    /// The conversation.
    pub(crate) conversation: Conversation,
    /// The last seq the digest covered (what `ClearCounters` clears up to).
    pub(crate) max_seq: u64,
    /// The others' read cursor it reported.
    pub(crate) peer_read_seq: u64,
}

impl From<&ConversationState> for DigestEntry {
    fn from(state: &ConversationState) -> Self {
        Self {
            conversation: state.conversation.clone(),
            max_seq: state.max_seq,
            peer_read_seq: state.peer_read_seq,
        }
    }
}

/// Trims a digest's entries before it is recorded ([`Store::fitted_digest`]).
pub type DigestFit = dyn Fn(&mut Vec<ConversationState>) + Send + Sync;

/// One device's digest among several built together ([`Store::fitted_digests`]).
pub struct DigestRequest {
    /// The device.
    pub device: Device,
    /// What its client can take (see [`Store::fitted_digest`]).
    pub fit: Box<DigestFit>,
}

impl std::fmt::Debug for DigestRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestRequest")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// A digest as recorded: `version` identifies what [`Store::clear_counters`] will clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestSnapshot {
    /// Per-device digest version.
    pub version: u64,
    /// Conversations with something unacked or counted.
    pub conversations: Vec<ConversationState>,
}

/// A member's standing in a conversation; only groups use more than `Member`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads and writes.
    Member,
    /// Also adds and removes members.
    Admin,
    /// Also adds and removes admins; one per group.
    Owner,
}

impl Role {
    /// The stored code.
    pub(crate) fn code(self) -> i16 {
        match self {
            Role::Member => 1,
            Role::Admin => 2,
            Role::Owner => 3,
        }
    }

    /// From a stored code (unknown codes read as the least privileged role).
    pub(crate) fn from_code(code: i64) -> Self {
        match code {
            3 => Role::Owner,
            2 => Role::Admin,
            _ => Role::Member,
        }
    }
}

/// One member of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The user.
    pub uid: String,
    /// What the member may do.
    pub role: Role,
    /// The member's read cursor.
    pub read_seq: u64,
}

/// Who has read one message, from the members' read cursors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message.
    pub seq: u64,
    /// Its sender (never counted as a reader).
    pub sender: String,
    /// How many other members' read cursors reached it.
    pub read_count: u64,
    /// Some of them (at most the limit asked for), most recent readers first.
    pub readers: Vec<String>,
}

/// A member removed from a conversation, in the order removals happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Increasing id of the removal.
    pub id: u64,
    /// The conversation.
    pub conversation: Conversation,
    /// The removed user.
    pub uid: String,
}

/// How much a store holds, for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreSizes {
    /// Stored messages (every conversation's seqs are gap-free, so the sum of its last seqs).
    pub messages: u64,
    /// Conversations, 1:1 and group.
    pub conversations: u64,
    /// Groups.
    pub groups: u64,
    /// Users that have connected at least once.
    pub users: u64,
    /// Devices (client ids) that have connected at least once.
    pub devices: u64,
}

/// The sizes in one query both backends understand; counts conversations and devices, never
/// messages, so it stays cheap on a large store.
pub(crate) const SIZES_QUERY: &str = "SELECT \
    CAST(COALESCE(SUM(max_seq), 0) AS BIGINT), COUNT(*), \
    COUNT(*) FILTER (WHERE key LIKE 'g:%'), \
    (SELECT COUNT(DISTINCT uid) FROM devices), (SELECT COUNT(*) FROM devices) \
    FROM conversations";

impl StoreSizes {
    /// The sizes from the row of [`SIZES_QUERY`].
    pub(crate) fn from_counts(counts: [i64; 5]) -> Self {
        let [messages, conversations, groups, users, devices] =
            counts.map(|n| u64::try_from(n).unwrap_or(0));
        Self {
            messages,
            conversations,
            groups,
            users,
            devices,
        }
    }
}

/// Receipts for `seqs` from the senders of those messages and the members whose cursor is
/// at least the smallest of them (shared by the backends).
pub(crate) fn receipts_from(
    senders: &[(u64, String)],
    readers: &[(String, u64)],
    max_readers: usize,
) -> Vec<Receipt> {
    senders
        .iter()
        .map(|(seq, sender)| {
            let mut who = readers
                .iter()
                .filter(|(uid, read)| read >= seq && uid != sender)
                .map(|(uid, _)| uid);
            let listed: Vec<String> = who.by_ref().take(max_readers).cloned().collect();
            let read_count = (listed.len() + who.count()) as u64;
            Receipt {
                seq: *seq,
                sender: sender.clone(),
                read_count,
                readers: listed,
            }
        })
        .collect()
}

/// The cause of a failed group commit, shared by every append of the batch: it reads as the
/// backend's own cause, so the error of each append does not say "store unavailable" twice.
#[derive(Debug)]
struct BatchCause(Arc<StoreError>);

impl std::fmt::Display for BatchCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::error::Error::source(self.0.as_ref()) {
            Some(cause) => std::fmt::Display::fmt(cause, f),
            None => std::fmt::Display::fmt(&self.0, f),
        }
    }
}

impl std::error::Error for BatchCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(self.0.as_ref()).and_then(std::error::Error::source)
    }
}

/// The cause of a failure inside a backend, kept for the log.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a store call failed. Each backend has a private error of its own that keeps the
/// cause, mapped into these; what a client may see of them is decided by the IM service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend cannot be reached or failed; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The backend refused a write as breaking a rule of the schema (a constraint): the same
    /// write fails again, so it is not an outage to retry.
    #[error("store refused the write: {0}")]
    Rejected(#[source] BoxError),
    /// The database schema is newer than this binary understands.
    #[error("database schema version {found} is newer than this binary supports ({supported}); upgrade mqtt-im")]
    SchemaTooNew {
        /// Version recorded in the database.
        found: u32,
        /// Newest version this binary knows.
        supported: u32,
    },
    /// A migration failed to apply.
    #[error("migration {version} failed: {source}")]
    Migration {
        /// The migration number.
        version: u32,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// The request named something out of range (a seq above the conversation's last one).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A digest version that was never handed to this device.
    #[error("not found: {0}")]
    NotFound(String),
    /// Something to create exists already.
    #[error("already exists: {0}")]
    Conflict(String),
}

impl StoreError {
    /// The failure of a batch that failed as a whole, for each of its callers: the cause is
    /// shared, and so is whether a retry can help.
    pub(crate) fn of_batch(cause: &Arc<StoreError>) -> Self {
        let source: BoxError = Box::new(BatchCause(Arc::clone(cause)));
        match cause.as_ref() {
            StoreError::Rejected(_) => StoreError::Rejected(source),
            _ => StoreError::Unavailable(source),
        }
    }

    /// A seq past the conversation's last one.
    pub(crate) fn past_end(seq: u64, max_seq: u64) -> Self {
        Self::Invalid(format!(
            "seq {seq} is past the conversation's last seq {max_seq}"
        ))
    }

    /// A conversation (a group) that does not exist.
    pub(crate) fn no_conversation() -> Self {
        Self::NotFound("no such conversation".into())
    }

    /// A conversation nobody has written to yet.
    pub(crate) fn no_messages() -> Self {
        Self::NotFound("the conversation has no messages yet".into())
    }
}

/// The storage contract shared by every backend.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Hands a message to the writer and returns once it is queued; the seq comes with the
    /// commit ([`QueuedAppend::committed`]). The next seq of its conversation is assigned
    /// inside the committing transaction, in the order messages were queued, so messages
    /// queued one after another get increasing seqs and a reader never sees seq `n` before
    /// `n - 1`. A `(sender, msg_id)` already stored resolves to the first copy's seq with
    /// `duplicate = true` and writes nothing. `on_commit` runs as [`OnCommit`] says, on
    /// success only.
    async fn queue_append(
        &self,
        message: NewMessage,
        on_commit: Option<OnCommit>,
    ) -> Result<QueuedAppend, StoreError>;

    /// Appends a message and waits for its commit ([`Store::queue_append`] without a hook).
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        self.queue_append(message, None).await?.committed().await
    }

    /// Records a device; a device seen for the first time starts with what any device of its
    /// user has already acknowledged.
    async fn register_device(&self, device: &Device) -> Result<(), StoreError>;

    /// Builds and records the next digest of a device: one entry per conversation with
    /// something unacked, each with its `last_n` newest messages. `fit` sees the built
    /// entries first and may drop entries and previews (what does not fit the client's
    /// packet size); only what it keeps is recorded, so [`Store::clear_counters`] clears
    /// exactly what the device was shown.
    async fn fitted_digest(
        &self,
        device: &Device,
        last_n: usize,
        fit: &DigestFit,
    ) -> Result<DigestSnapshot, StoreError>;

    /// [`Store::fitted_digest`] for many devices at once (a reconnect storm), the results in
    /// request order; a backend that can reads them all in one round, the others build them
    /// concurrently.
    async fn fitted_digests(
        &self,
        requests: &[DigestRequest],
        last_n: usize,
    ) -> Vec<Result<DigestSnapshot, StoreError>> {
        let digests = requests
            .iter()
            .map(|request| self.fitted_digest(&request.device, last_n, &*request.fit));
        futures::future::join_all(digests).await
    }

    /// [`Store::fitted_digest`] keeping everything.
    async fn digest(&self, device: &Device, last_n: usize) -> Result<DigestSnapshot, StoreError> {
        self.fitted_digest(device, last_n, &|_| {}).await
    }

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
        conversation: &Conversation,
        ack: Option<SeqRange>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Acknowledges a range of seqs for a device, clamped to the conversation's last seq;
    /// returns the last seq it acknowledged.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the conversation has no message yet;
    /// [`StoreError::Invalid`] if the range starts past its last seq.
    async fn ack(
        &self,
        device: &Device,
        conversation: &Conversation,
        range: SeqRange,
    ) -> Result<u64, StoreError>;

    /// Messages older than `before` (all when `None`), newest first; acks are untouched.
    async fn history(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Moves a member's read cursor forward (never back); returns the cursor before and after.
    async fn mark_read(
        &self,
        uid: &str,
        conversation: &Conversation,
        seq: u64,
    ) -> Result<(u64, u64), StoreError>;

    /// Creates a group conversation with `owner` and `members`.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if the conversation exists.
    async fn create_group(
        &self,
        conversation: &Conversation,
        owner: &str,
        members: &[String],
    ) -> Result<(), StoreError>;

    /// Adds users to an existing conversation, starting after its current last seq (what was
    /// said before they joined is not in their backlog); existing members are only ever
    /// promoted to `role`. Returns the users that were not members before.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the conversation does not exist.
    async fn add_members(
        &self,
        conversation: &Conversation,
        uids: &[String],
        role: Role,
    ) -> Result<Vec<String>, StoreError>;

    /// Removes members (logged for [`Store::removals_since`]); returns those that were.
    async fn remove_members(
        &self,
        conversation: &Conversation,
        uids: &[String],
    ) -> Result<Vec<String>, StoreError>;

    /// The members of a conversation.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the conversation does not exist.
    async fn members(&self, conversation: &Conversation) -> Result<Vec<Member>, StoreError>;

    /// A user's role in a conversation; `None` if not a member.
    async fn role(
        &self,
        uid: &str,
        conversation: &Conversation,
    ) -> Result<Option<Role>, StoreError>;

    /// The groups `uid` belongs to, with its roles.
    async fn group_memberships(&self, uid: &str) -> Result<Vec<(Conversation, Role)>, StoreError>;

    /// Who has read each of `seqs` (listing at most `max_readers` names per message);
    /// seqs that do not exist are left out.
    async fn receipts(
        &self,
        conversation: &Conversation,
        seqs: &[u64],
        max_readers: usize,
    ) -> Result<Vec<Receipt>, StoreError>;

    /// The distinct senders of the messages in `range`.
    async fn senders(
        &self,
        conversation: &Conversation,
        range: SeqRange,
    ) -> Result<Vec<String>, StoreError>;

    /// Removals with an id above `after`, oldest first (at most `limit`).
    async fn removals_since(&self, after: u64, limit: usize) -> Result<Vec<Removal>, StoreError>;

    /// How many messages, conversations, groups, users and devices the store holds.
    async fn sizes(&self) -> Result<StoreSizes, StoreError>;

    /// Flushes pending writes and stops background work; later calls fail as unavailable.
    async fn close(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_says_what_failed_once() {
        let cause = Arc::new(StoreError::Unavailable("connection reset".into()));
        let error = StoreError::of_batch(&cause);
        assert_eq!(error.to_string(), "store unavailable: connection reset");
        assert!(matches!(error, StoreError::Unavailable(_)));
    }
}
