//! Persistence behind one trait. The store knows conversations, members, devices and opaque
//! message bodies; it knows nothing of MQTT, protobuf or Lua.
//!
//! Every backend gives the same guarantees, checked by the conformance suite in
//! `conformance` (run by each backend's tests): a method that returns `Ok` has committed what it
//! wrote.

mod bounded;
mod embedded;
mod ids;
mod migrate;
mod postgres;
pub(crate) mod ranges;
mod redis;
pub mod settings;

#[cfg(test)]
pub(crate) mod conformance;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;

pub use self::redis::{ClusterMessage, Destination, RedisBus, RedisSettings, RemoteRoutes};
pub use crate::domain::{Conversation, ConversationKind, Device, Gid, Uid};
pub use bounded::Bounded;
pub use embedded::EmbeddedStore;
pub use postgres::{DigestCache, PostgresStore};
pub use ranges::SeqRange;

/// A message to append to a conversation.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The conversation; a 1:1 chat is created with its two members on first use.
    pub conversation: Conversation,
    /// The authenticated sender.
    pub sender: Uid,
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
    pub sender: Uid,
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
    /// Messages this device had not acknowledged that retention deleted before it pulled
    /// them (a Pull only): reported once, then counted as acknowledged.
    pub gone: u64,
}

/// The oldest unacknowledged seqs of a device that a backlog cap skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// Everything up to this seq counts as acknowledged for the device once recorded.
    pub upto: u64,
    /// How many of those seqs the device had not acknowledged.
    pub count: u64,
}

/// What a digest holds per conversation besides counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DigestShape {
    /// Newest messages per conversation.
    pub last_n: usize,
    /// Unacknowledged messages a device keeps per conversation (0: no cap); older ones are
    /// skipped and reported as `missed`.
    pub max_backlog: u64,
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
    /// Messages a backlog cap skipped for this device that no cleared digest reported yet:
    /// it will not get them by Pull (History still has them).
    pub missed: u64,
    /// What this digest skips, recorded with it (counted in `missed` already).
    pub skipped: Option<Skipped>,
    /// Every message a cap ever skipped for the device here, this digest's included: what
    /// clearing this digest clears `missed` up to.
    pub(crate) missed_total: u64,
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
    /// The user's own read cursor it reported.
    pub(crate) read_seq: u64,
    /// The skipped total it reported (what `ClearCounters` clears `missed` up to).
    pub(crate) missed_total: u64,
    /// What it skips for the device.
    pub(crate) skipped: Option<Skipped>,
}

impl From<&ConversationState> for DigestEntry {
    fn from(state: &ConversationState) -> Self {
        Self {
            conversation: state.conversation.clone(),
            max_seq: state.max_seq,
            peer_read_seq: state.peer_read_seq,
            read_seq: state.read_seq,
            missed_total: state.missed_total,
            skipped: state.skipped,
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

/// Where one garbage-collection step cuts, in server milliseconds: messages stored before
/// their kind's cutoff and devices last seen before theirs are deleted. `None` keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cutoffs {
    /// Messages of 1:1 chats.
    pub direct: Option<i64>,
    /// Messages of groups.
    pub group: Option<i64>,
    /// Devices.
    pub devices: Option<i64>,
    /// Entries of the removal and eviction logs (nodes have read them long before).
    pub logs: Option<i64>,
}

impl Cutoffs {
    /// The cutoff of one kind of conversation.
    pub fn messages(&self, kind: ConversationKind) -> Option<i64> {
        match kind {
            ConversationKind::Direct => self.direct,
            ConversationKind::Group => self.group,
        }
    }
}

/// What one garbage-collection step deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Messages past their retention.
    pub messages: u64,
    /// Devices past their time to live.
    pub devices: u64,
    /// How long before its cutoff the oldest message of the step was stored: how far
    /// retention is behind (0 when nothing was due).
    pub behind_ms: i64,
    /// The step hit its batch size: more is due now.
    pub more: bool,
}

impl Collected {
    /// Two steps' work together (more is due if it is after either).
    pub fn plus(self, other: Collected) -> Collected {
        Collected {
            messages: self.messages + other.messages,
            devices: self.devices + other.devices,
            behind_ms: self.behind_ms.max(other.behind_ms),
            more: self.more || other.more,
        }
    }
}

/// A device as operators list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The MQTT client id.
    pub client_id: String,
    /// When it last connected (or was connected during a garbage collection), ms.
    pub last_seen: i64,
}

/// Connections every node must close: one device's, or all of a user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// Increasing id.
    pub id: u64,
    /// The user.
    pub uid: Uid,
    /// The device; `None` for every device of the user.
    pub client_id: Option<String>,
}

/// A retained message of a plain topic, shared by a cluster's nodes: `message` is kept whole
/// as its owner encoded it (the store does not read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    /// The topic it is retained for.
    pub topic: String,
    /// The encoded message.
    pub message: Vec<u8>,
}

/// A device's registration with a push gateway (the Matrix Push Gateway API): unique by
/// `app_id` and `pushkey` on the whole server. The store keeps what it is given; the
/// service validates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pusher {
    /// The device it notifies.
    pub device: Device,
    /// The app, as the gateway knows it.
    pub app_id: String,
    /// The platform's token for the app on that device.
    pub pushkey: String,
    /// The gateway's notify URL.
    pub url: String,
    /// `event_id_only` or `full`.
    pub format: String,
    /// The app's language.
    pub lang: String,
    /// A JSON object handed to the gateway with each notification.
    pub data_json: String,
    /// When it was set (ms since the epoch).
    pub created_ms: i64,
}

/// A notification owed to a user's pushers, claimed by one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushDue {
    /// Whose pushers.
    pub uid: Uid,
    /// The conversation with new messages; `None` for a counts-only update (a read).
    pub conversation: Option<Conversation>,
    /// The newest message it covers: the same across its retries.
    pub seq: u64,
    /// Earlier attempts that failed.
    pub attempts: u32,
}

/// When owed notifications are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushTiming {
    /// Now, in ms since the epoch.
    pub now_ms: i64,
    /// How long after the oldest new message a notification waits (a read or a connect
    /// in between cancels it).
    pub delay_ms: i64,
    /// At most one notification per user and conversation this often.
    pub coalesce_ms: i64,
    /// How long a claim keeps other nodes off.
    pub lease_ms: i64,
}

/// A pusher a device lost, to be told at its next connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PusherGone {
    /// The app.
    pub app_id: String,
    /// The pushkey it no longer has.
    pub pushkey: String,
    /// `rejected`, `moved` or `removed`.
    pub reason: String,
}

/// What saving a pusher did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PusherSaved {
    /// Saved; it had belonged to this other device, which no longer has it.
    Saved {
        /// The device that held the same app and pushkey before (not this one).
        displaced: Option<Device>,
    },
    /// Not saved: the device already has as many other pushers as it may.
    Full,
}

/// What erasing a user does to the messages it sent in groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupErasure {
    /// Keep each message's seq with an empty body: the other members' pages, counts and
    /// receipts stay as they were.
    Redact,
    /// Delete the messages.
    Delete,
}

/// What erasing a user removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Erased {
    /// Devices and their offline state.
    pub devices: u64,
    /// Group memberships.
    pub groups: u64,
    /// Messages deleted.
    pub messages_deleted: u64,
    /// Group messages whose content was replaced.
    pub messages_redacted: u64,
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
    pub uid: Uid,
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
    pub sender: Uid,
    /// How many other members' read cursors reached it.
    pub read_count: u64,
    /// Some of them (at most the limit asked for), most recent readers first.
    pub readers: Vec<Uid>,
}

/// A member removed from a conversation, in the order removals happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Increasing id of the removal.
    pub id: u64,
    /// The conversation.
    pub conversation: Conversation,
    /// The removed user.
    pub uid: Uid,
}

/// How much a store holds, for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreSizes {
    /// Stored messages (every conversation's seqs are gap-free and retention deletes a
    /// prefix, so the sum of its last seqs less its deleted ones; erased messages are not
    /// subtracted).
    pub messages: u64,
    /// Conversations, 1:1 and group.
    pub conversations: u64,
    /// Groups.
    pub groups: u64,
    /// Users that have connected at least once.
    pub users: u64,
    /// Devices (client ids) that have connected at least once.
    pub devices: u64,
    /// Registered pushers.
    pub pushers: u64,
    /// User and conversation pairs with a notification owed (the push queue's backlog).
    pub pushes_pending: u64,
}

/// The sizes in one query both backends understand; counts conversations and devices, never
/// messages, so it stays cheap on a large store.
pub(crate) const SIZES_QUERY: &str = "SELECT \
    CAST(COALESCE(SUM(max_seq - gone_seq), 0) AS BIGINT), COUNT(*), \
    COUNT(*) FILTER (WHERE kind = 1), \
    (SELECT COUNT(DISTINCT uid) FROM devices), (SELECT COUNT(*) FROM devices), \
    (SELECT COUNT(*) FROM pushers), \
    (SELECT COUNT(*) FROM push_queue WHERE last_seq > handled_seq) \
    FROM conversations";

impl StoreSizes {
    /// The sizes from the row of [`SIZES_QUERY`].
    pub(crate) fn from_counts(counts: [i64; 7]) -> Self {
        let [messages, conversations, groups, users, devices, pushers, pushes_pending] =
            counts.map(|n| u64::try_from(n).unwrap_or(0));
        Self {
            messages,
            conversations,
            groups,
            users,
            devices,
            pushers,
            pushes_pending,
        }
    }
}

/// Tables holding state per device, all with `uid` and `client_id` columns: what forgetting
/// a device deletes, on both backends.
pub(crate) const DEVICE_TABLES: [&str; 7] = [
    "devices",
    "acked",
    "cleared",
    "digest_entries",
    "read_seen",
    "pushers",
    "pushers_gone",
];

/// The server clock in milliseconds, as stores record when devices were seen.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Receipts for `seqs` from the senders of those messages and the members whose cursor is
/// at least the smallest of them (shared by the backends).
pub(crate) fn receipts_from(
    senders: &[(u64, Uid)],
    readers: &[(Uid, u64)],
    max_readers: usize,
) -> Vec<Receipt> {
    senders
        .iter()
        .map(|(seq, sender)| {
            let mut who = readers
                .iter()
                .filter(|(uid, read)| read >= seq && uid != sender)
                .map(|(uid, _)| uid);
            let listed: Vec<Uid> = who.by_ref().take(max_readers).cloned().collect();
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
    /// something unacked, each with its `shape.last_n` newest messages. A conversation with
    /// more than `shape.max_backlog` unacknowledged seqs skips the oldest for this device
    /// (recorded as acknowledged, reported as `missed` until a `ClearCounters`). `fit` sees the built
    /// entries first and may drop entries and previews (what does not fit the client's
    /// packet size); only what it keeps is recorded, so [`Store::clear_counters`] clears
    /// exactly what the device was shown.
    async fn fitted_digest(
        &self,
        device: &Device,
        shape: DigestShape,
        fit: &DigestFit,
    ) -> Result<DigestSnapshot, StoreError>;

    /// [`Store::fitted_digest`] for many devices at once (a reconnect storm), the results in
    /// request order; a backend that can reads them all in one round, the others build them
    /// concurrently.
    async fn fitted_digests(
        &self,
        requests: &[DigestRequest],
        shape: DigestShape,
    ) -> Vec<Result<DigestSnapshot, StoreError>> {
        let digests = requests
            .iter()
            .map(|request| self.fitted_digest(&request.device, shape, &*request.fit));
        futures::future::join_all(digests).await
    }

    /// [`Store::fitted_digest`] keeping everything, without a backlog cap.
    async fn digest(&self, device: &Device, last_n: usize) -> Result<DigestSnapshot, StoreError> {
        let shape = DigestShape {
            last_n,
            max_backlog: 0,
        };
        self.fitted_digest(device, shape, &|_| {}).await
    }

    /// Clears the counters that digest `version` carried; increments since then stay.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if that version was never handed to this device.
    async fn clear_counters(&self, device: &Device, version: u64) -> Result<(), StoreError>;

    /// Acknowledges `ack` (if any) and returns the newest `limit` messages the device has not
    /// acknowledged, in one transaction. Seqs retention deleted count as acknowledged; the
    /// first Pull after they went reports how many of them the device had not acknowledged.
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
        uid: &Uid,
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
        owner: &Uid,
        members: &[Uid],
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
        uids: &[Uid],
        role: Role,
    ) -> Result<Vec<Uid>, StoreError>;

    /// Removes members (logged for [`Store::removals_since`]); returns those that were.
    async fn remove_members(
        &self,
        conversation: &Conversation,
        uids: &[Uid],
    ) -> Result<Vec<Uid>, StoreError>;

    /// The members of a conversation.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the conversation does not exist.
    async fn members(&self, conversation: &Conversation) -> Result<Vec<Member>, StoreError>;

    /// A user's role in a conversation; `None` if not a member.
    async fn role(
        &self,
        uid: &Uid,
        conversation: &Conversation,
    ) -> Result<Option<Role>, StoreError>;

    /// The groups `uid` belongs to, with its roles.
    async fn group_memberships(&self, uid: &Uid) -> Result<Vec<(Conversation, Role)>, StoreError>;

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
    ) -> Result<Vec<Uid>, StoreError>;

    /// Removals with an id above `after`, oldest first (at most `limit`).
    async fn removals_since(&self, after: u64, limit: usize) -> Result<Vec<Removal>, StoreError>;

    /// How many messages, conversations, groups, users and devices the store holds.
    async fn sizes(&self) -> Result<StoreSizes, StoreError>;

    /// One bounded step of retention, device expiry and log pruning: at most `batch`
    /// messages per kind
    /// (the oldest; each conversation loses a prefix, every seq up to its newest deleted one
    /// counting as acknowledged from then on) and at most `batch` devices, each in a short
    /// transaction of its own.
    async fn collect_garbage(
        &self,
        cutoffs: Cutoffs,
        batch: usize,
    ) -> Result<Collected, StoreError>;

    /// Marks devices as seen at `now_ms` (the connected ones, which expiry must not take).
    async fn touch_devices(&self, devices: &[Device], now_ms: i64) -> Result<(), StoreError>;

    /// A user's devices, by client id.
    async fn devices(&self, uid: &Uid) -> Result<Vec<DeviceInfo>, StoreError>;

    /// Deletes a device's offline state (its next connection starts as a new device) and
    /// logs an eviction of its connections; whether the device was known.
    async fn forget_device(&self, device: &Device) -> Result<bool, StoreError>;

    /// Logs an eviction: every node closes the connections of the user (or of one device).
    async fn evict(&self, uid: &Uid, client_id: Option<&str>) -> Result<(), StoreError>;

    /// Evictions with an id above `after`, oldest first (at most `limit`).
    async fn evictions_since(&self, after: u64, limit: usize) -> Result<Vec<Eviction>, StoreError>;

    /// Erases a user: its devices and their state, its group memberships (a group it owned
    /// passes to its next member), its read cursors, the 1:1 messages it sent and, as
    /// `groups` says, its group messages; logs an eviction. Running it again finds nothing.
    async fn erase_user(&self, uid: &Uid, groups: GroupErasure) -> Result<Erased, StoreError>;

    /// Keeps `message` as what future subscribers of `topic` get on every node, replacing
    /// the one before; `None` removes it.
    async fn put_retained(&self, topic: &str, message: Option<Vec<u8>>) -> Result<(), StoreError>;

    /// Every retained message, for a node that starts.
    async fn retained(&self) -> Result<Vec<Retained>, StoreError>;

    /// Saves `pusher` (replacing the one with the same app and pushkey, whoever held it: that
    /// device is told it `moved`) unless its device already holds `per_device` others.
    async fn set_pusher(
        &self,
        pusher: &Pusher,
        per_device: usize,
    ) -> Result<PusherSaved, StoreError>;

    /// Removes the pusher of `uid` with this app and pushkey (its device is told why:
    /// `reason`); the one removed, if any.
    async fn remove_pusher(
        &self,
        uid: &Uid,
        app_id: &str,
        pushkey: &str,
        reason: &str,
    ) -> Result<Option<Pusher>, StoreError>;

    /// The pushers `device` lost since it was last told (at most `limit`), now told.
    async fn take_pushers_gone(
        &self,
        device: &Device,
        limit: usize,
    ) -> Result<Vec<PusherGone>, StoreError>;

    /// A user's pushers, on all of its devices, oldest first.
    async fn pushers(&self, uid: &Uid) -> Result<Vec<Pusher>, StoreError>;

    /// Claims for `node` up to `limit` notifications that are due (stored messages are queued
    /// for members with a pusher as they are committed); a claim another node holds is left
    /// alone until its lease ends.
    async fn claim_pushes(
        &self,
        node: &str,
        timing: PushTiming,
        limit: usize,
    ) -> Result<Vec<PushDue>, StoreError>;

    /// `due` is done: its messages are handled. If it was `sent`, newer ones wait for the
    /// next coalescing window; if it was moot (the user online), they do not.
    async fn push_done(&self, due: &PushDue, now_ms: i64, sent: bool) -> Result<(), StoreError>;

    /// `due` failed: tried again (with the same seq, so the same id) at `retry_at_ms`.
    async fn push_failed(&self, due: &PushDue, retry_at_ms: i64) -> Result<(), StoreError>;

    /// Nothing is owed to `uid` for messages it has seen: up to `seq` in `conversation` (a
    /// read, which also queues a counts-only update), or everything (a device connected).
    async fn push_handled(
        &self,
        uid: &Uid,
        read: Option<(&Conversation, u64)>,
    ) -> Result<(), StoreError>;

    /// Drops the oldest owed notifications beyond the newest `keep` (a queue that cannot
    /// drain, its gateways down for long); how many were dropped.
    async fn trim_push_queue(&self, keep: usize, now_ms: i64) -> Result<u64, StoreError>;

    /// The user's badge: stored messages after its read cursors, not its own, over all its
    /// conversations (what the digest's counts add up to).
    async fn unread_total(&self, uid: &Uid) -> Result<u64, StoreError>;

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
