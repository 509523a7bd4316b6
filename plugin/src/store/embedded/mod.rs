//! The embedded backend: one SQLite file in WAL mode with `synchronous = FULL`, so a commit
//! is on disk before anyone is told. Writes go through one group-committing thread; reads use
//! a small pool of read connections, which only ever see committed transactions.

mod error;
mod groups;
mod lifecycle;
mod push;
mod pushers;
mod queries;
mod retained;
mod writer;

use crate::domain::Uid;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::migrate;
use super::{
    now_ms, Collected, Conversation, ConversationKind, ConversationState, Cutoffs, Device,
    DeviceInfo, DigestEntry, DigestFit, DigestRequest, DigestShape, DigestSnapshot, Erased,
    Eviction, GroupErasure, Member, NewMessage, OnCommit, Page, PushDue, PushTiming, Pusher,
    PusherGone, PusherSaved, QueuedAppend, Receipt, Removal, Retained, Role, SeqRange, Store,
    StoreError, StoreSizes, SIZES_QUERY,
};
use error::{sql_error, SqliteError};
use writer::{AfterCommit, Call, Job};

/// Bounded queue of writes waiting for the writer thread.
const WRITE_QUEUE: usize = 16_384;

/// SQLite store; see the module docs for its durability and batching.
#[derive(Debug)]
pub struct EmbeddedStore {
    path: PathBuf,
    writer: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database at `path`, applies migrations and starts the
    /// writer thread, which commits up to `max_batch` writes per transaction.
    ///
    /// # Errors
    /// The file cannot be opened, a migration fails, or the schema is newer than this binary.
    pub fn open(path: &Path, max_batch: usize) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SqliteError::Folder {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = open_connection(path)?;
        migrate::apply_sqlite(&mut conn)?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let thread = std::thread::Builder::new()
            .name("mqtt-im-sqlite-writer".into())
            .spawn(move || writer::run(conn, rx, max_batch.max(1)))
            .map_err(SqliteError::Thread)?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            readers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Applies migrations and returns the schema version, without starting a store.
    ///
    /// # Errors
    /// As [`EmbeddedStore::open`].
    pub fn migrate(path: &Path) -> Result<u32, StoreError> {
        let mut conn = open_connection(path)?;
        migrate::apply_sqlite(&mut conn)
    }

    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.queue(work, None)
            .await?
            .await
            .map_err(|_| SqliteError::WriterStopped)?
    }

    /// Hands `work` to the writer; the receiver yields its result after the commit.
    async fn queue<T, F>(
        &self,
        work: F,
        after_commit: Option<AfterCommit<T>>,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let sender = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(SqliteError::Closed)?;
        let (job, done) = Call::job(work, after_commit);
        sender
            .send(job)
            .await
            .map_err(|_| SqliteError::WriterStopped)?;
        Ok(done)
    }

    /// Keeps what `fit` leaves of a device's digest and records it as the device's next.
    async fn record_digest(
        &self,
        device: &Device,
        mut conversations: Vec<ConversationState>,
        fit: &DigestFit,
    ) -> Result<DigestSnapshot, StoreError> {
        fit(&mut conversations);
        let entries: Vec<DigestEntry> = conversations.iter().map(DigestEntry::from).collect();
        let device = device.clone();
        let version = self
            .write(move |conn| queries::record_digest(conn, &device, &entries, now_ms()))
            .await?;
        Ok(DigestSnapshot {
            version,
            conversations,
        })
    }

    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = Arc::clone(&self.readers);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = pool.lock().ok().and_then(|mut idle| idle.pop());
            let conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&path)?,
            };
            let result = work(&conn);
            if let Ok(mut idle) = pool.lock() {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(SqliteError::Read)?
    }
}

/// The conversations a digest of `device` lists, each with its `shape.last_n` newest messages.
fn digest_states(
    conn: &Connection,
    device: &Device,
    shape: DigestShape,
) -> Result<Vec<ConversationState>, StoreError> {
    let mut states = Vec::new();
    for member in queries::memberships(conn, device)? {
        if let Some(state) = queries::conversation_state(conn, device, &member, shape)? {
            states.push(state);
        }
    }
    Ok(states)
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|source| SqliteError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
    )
    .map_err(sql_error)?;
    Ok(conn)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn queue_append(
        &self,
        message: NewMessage,
        on_commit: Option<OnCommit>,
    ) -> Result<QueuedAppend, StoreError> {
        let queued = self
            .queue(move |conn| queries::append(conn, &message), on_commit)
            .await?;
        Ok(QueuedAppend::new(queued))
    }

    async fn register_device(&self, device: &Device) -> Result<(), StoreError> {
        let device = device.clone();
        self.write(move |conn| queries::register_device(conn, &device, now_ms()))
            .await
    }

    async fn fitted_digest(
        &self,
        device: &Device,
        shape: DigestShape,
        fit: &DigestFit,
    ) -> Result<DigestSnapshot, StoreError> {
        let reader_device = device.clone();
        let conversations = self
            .read(move |conn| digest_states(conn, &reader_device, shape))
            .await?;
        self.record_digest(device, conversations, fit).await
    }

    /// All the devices' conversations in one read (one blocking hop, one connection), then
    /// their records through the writer, which commits them together.
    async fn fitted_digests(
        &self,
        requests: &[DigestRequest],
        shape: DigestShape,
    ) -> Vec<Result<DigestSnapshot, StoreError>> {
        let devices: Vec<Device> = requests.iter().map(|r| r.device.clone()).collect();
        let read = self
            .read(move |conn| {
                Ok(devices
                    .iter()
                    .map(|device| digest_states(conn, device, shape))
                    .collect::<Vec<_>>())
            })
            .await;
        let states = match read {
            Ok(states) => states,
            Err(e) => {
                let shared = Arc::new(e);
                return requests
                    .iter()
                    .map(|_| Err(StoreError::of_batch(&shared)))
                    .collect();
            }
        };
        let records = requests
            .iter()
            .zip(states)
            .map(|(request, states)| async move {
                self.record_digest(&request.device, states?, &*request.fit)
                    .await
            });
        futures::future::join_all(records).await
    }

    async fn clear_counters(&self, device: &Device, version: u64) -> Result<(), StoreError> {
        let device = device.clone();
        self.write(move |conn| queries::clear_counters(conn, &device, version))
            .await
    }

    async fn pull(
        &self,
        device: &Device,
        conversation: &Conversation,
        ack: Option<SeqRange>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let (device, key) = (device.clone(), conversation.key());
        self.write(move |conn| queries::pull(conn, &device, &key, ack, limit))
            .await
    }

    async fn ack(
        &self,
        device: &Device,
        conversation: &Conversation,
        range: SeqRange,
    ) -> Result<u64, StoreError> {
        let (device, key) = (device.clone(), conversation.key());
        self.write(move |conn| queries::ack(conn, &device, &key, range))
            .await
    }

    async fn history(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let key = conversation.key();
        self.read(move |conn| queries::history(conn, &key, before, limit))
            .await
    }

    async fn mark_read(
        &self,
        uid: &Uid,
        conversation: &Conversation,
        seq: u64,
    ) -> Result<(u64, u64), StoreError> {
        let (uid, key) = (uid.to_owned(), conversation.key());
        self.write(move |conn| queries::mark_read(conn, &uid, &key, seq))
            .await
    }

    async fn create_group(
        &self,
        conversation: &Conversation,
        owner: &Uid,
        members: &[Uid],
    ) -> Result<(), StoreError> {
        let (key, owner, members) = (conversation.key(), owner.to_owned(), members.to_vec());
        self.write(move |conn| groups::create_group(conn, &key, &owner, &members))
            .await
    }

    async fn add_members(
        &self,
        conversation: &Conversation,
        uids: &[Uid],
        role: Role,
    ) -> Result<Vec<Uid>, StoreError> {
        let (key, uids) = (conversation.key(), uids.to_vec());
        self.write(move |conn| groups::add_members(conn, &key, &uids, role))
            .await
    }

    async fn remove_members(
        &self,
        conversation: &Conversation,
        uids: &[Uid],
    ) -> Result<Vec<Uid>, StoreError> {
        let (key, uids) = (conversation.key(), uids.to_vec());
        self.write(move |conn| groups::remove_members(conn, &key, &uids))
            .await
    }

    async fn members(&self, conversation: &Conversation) -> Result<Vec<Member>, StoreError> {
        let key = conversation.key();
        self.read(move |conn| groups::members(conn, &key)).await
    }

    async fn role(
        &self,
        uid: &Uid,
        conversation: &Conversation,
    ) -> Result<Option<Role>, StoreError> {
        let (uid, key) = (uid.to_owned(), conversation.key());
        self.read(move |conn| groups::role(conn, &uid, &key)).await
    }

    async fn group_memberships(&self, uid: &Uid) -> Result<Vec<(Conversation, Role)>, StoreError> {
        let uid = uid.to_owned();
        self.read(move |conn| groups::group_memberships(conn, &uid))
            .await
    }

    async fn receipts(
        &self,
        conversation: &Conversation,
        seqs: &[u64],
        max_readers: usize,
    ) -> Result<Vec<Receipt>, StoreError> {
        let (key, seqs) = (conversation.key(), seqs.to_vec());
        self.read(move |conn| groups::receipts(conn, &key, &seqs, max_readers))
            .await
    }

    async fn senders(
        &self,
        conversation: &Conversation,
        range: SeqRange,
    ) -> Result<Vec<Uid>, StoreError> {
        let key = conversation.key();
        self.read(move |conn| groups::senders(conn, &key, range))
            .await
    }

    async fn removals_since(&self, after: u64, limit: usize) -> Result<Vec<Removal>, StoreError> {
        self.read(move |conn| groups::removals_since(conn, after, limit))
            .await
    }

    async fn sizes(&self) -> Result<StoreSizes, StoreError> {
        self.read(|conn| {
            let counts = conn.query_row(SIZES_QUERY, [], |row| {
                Ok([
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                ])
            });
            let counts = counts.map_err(sql_error)?;
            Ok(StoreSizes::from_counts(counts))
        })
        .await
    }

    async fn collect_garbage(
        &self,
        cutoffs: Cutoffs,
        batch: usize,
    ) -> Result<Collected, StoreError> {
        let mut collected = Collected::default();
        // One writer job per kind and one for devices: appends wait for one step at most.
        for kind in ConversationKind::ALL {
            if let Some(cutoff) = cutoffs.messages(kind) {
                let step = self
                    .write(move |conn| lifecycle::expire_messages(conn, kind, cutoff, batch))
                    .await?;
                collected = collected.plus(step);
            }
        }
        if let Some(cutoff) = cutoffs.devices {
            let step = self
                .write(move |conn| lifecycle::expire_devices(conn, cutoff, batch))
                .await?;
            collected = collected.plus(step);
        }
        if let Some(cutoff) = cutoffs.logs {
            let step = self
                .write(move |conn| lifecycle::prune_logs(conn, cutoff, batch))
                .await?;
            collected = collected.plus(step);
        }
        Ok(collected)
    }

    async fn touch_devices(&self, devices: &[Device], now_ms: i64) -> Result<(), StoreError> {
        let devices = devices.to_vec();
        self.write(move |conn| lifecycle::touch_devices(conn, &devices, now_ms))
            .await
    }

    async fn devices(&self, uid: &Uid) -> Result<Vec<DeviceInfo>, StoreError> {
        let uid = uid.to_owned();
        self.read(move |conn| lifecycle::devices(conn, &uid)).await
    }

    async fn forget_device(&self, device: &Device) -> Result<bool, StoreError> {
        let device = device.clone();
        self.write(move |conn| {
            let known = lifecycle::forget_device(conn, &device)?;
            lifecycle::evict(conn, &device.uid, Some(&device.client_id))?;
            Ok(known)
        })
        .await
    }

    async fn evict(&self, uid: &Uid, client_id: Option<&str>) -> Result<(), StoreError> {
        let (uid, client_id) = (uid.to_owned(), client_id.map(str::to_owned));
        self.write(move |conn| lifecycle::evict(conn, &uid, client_id.as_deref()))
            .await
    }

    async fn evictions_since(&self, after: u64, limit: usize) -> Result<Vec<Eviction>, StoreError> {
        self.read(move |conn| lifecycle::evictions_since(conn, after, limit))
            .await
    }

    async fn erase_user(&self, uid: &Uid, groups: GroupErasure) -> Result<Erased, StoreError> {
        let uid = uid.to_owned();
        self.write(move |conn| lifecycle::erase_user(conn, &uid, groups))
            .await
    }

    async fn put_retained(&self, topic: &str, message: Option<Vec<u8>>) -> Result<(), StoreError> {
        let topic = topic.to_owned();
        self.write(move |conn| retained::put(conn, &topic, message.as_deref()))
            .await
    }

    async fn retained(&self) -> Result<Vec<Retained>, StoreError> {
        self.read(retained::all).await
    }

    async fn set_pusher(
        &self,
        pusher: &Pusher,
        per_device: usize,
    ) -> Result<PusherSaved, StoreError> {
        let pusher = pusher.clone();
        self.write(move |conn| pushers::set(conn, &pusher, per_device))
            .await
    }

    async fn remove_pusher(
        &self,
        uid: &Uid,
        app_id: &str,
        pushkey: &str,
        reason: &str,
    ) -> Result<Option<Pusher>, StoreError> {
        let (uid, app_id, pushkey) = (uid.to_owned(), app_id.to_owned(), pushkey.to_owned());
        let reason = reason.to_owned();
        self.write(move |conn| pushers::remove(conn, &uid, &app_id, &pushkey, &reason))
            .await
    }

    async fn take_pushers_gone(
        &self,
        device: &Device,
        limit: usize,
    ) -> Result<Vec<PusherGone>, StoreError> {
        let device = device.clone();
        self.write(move |conn| pushers::take_gone(conn, &device, limit))
            .await
    }

    async fn pushers(&self, uid: &Uid) -> Result<Vec<Pusher>, StoreError> {
        let uid = uid.to_owned();
        self.read(move |conn| pushers::of_user(conn, &uid)).await
    }

    async fn claim_pushes(
        &self,
        node: &str,
        timing: PushTiming,
        limit: usize,
    ) -> Result<Vec<PushDue>, StoreError> {
        if !self.read(move |conn| push::any_due(conn, timing)).await? {
            return Ok(Vec::new());
        }
        let node = node.to_owned();
        self.write(move |conn| push::claim(conn, &node, timing, limit))
            .await
    }

    async fn push_done(&self, due: &PushDue, now_ms: i64, sent: bool) -> Result<(), StoreError> {
        let due = due.clone();
        self.write(move |conn| push::done(conn, &due, now_ms, sent))
            .await
    }

    async fn push_failed(&self, due: &PushDue, retry_at_ms: i64) -> Result<(), StoreError> {
        let due = due.clone();
        self.write(move |conn| push::failed(conn, &due, retry_at_ms))
            .await
    }

    async fn push_handled(
        &self,
        uid: &Uid,
        read: Option<(&Conversation, u64)>,
    ) -> Result<(), StoreError> {
        let (uid, read) = (uid.to_owned(), read.map(|(c, seq)| (c.clone(), seq)));
        self.write(move |conn| {
            let read = read.as_ref().map(|(c, seq)| (c, *seq));
            push::handled(conn, &uid, read, now_ms())
        })
        .await
    }

    async fn trim_push_queue(&self, keep: usize, now_ms: i64) -> Result<u64, StoreError> {
        self.write(move |conn| push::trim(conn, keep, now_ms)).await
    }

    async fn unread_total(&self, uid: &Uid) -> Result<u64, StoreError> {
        let uid = uid.to_owned();
        self.read(move |conn| push::unread_total(conn, &uid)).await
    }

    async fn close(&self) {
        if let Ok(mut writer) = self.writer.lock() {
            writer.take();
        }
        let thread = self.writer_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            // The writer drains its queue and commits before it returns.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::*;
    use crate::store::conformance;

    fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
        EmbeddedStore::open(&dir.path().join("im.db"), 64).unwrap()
    }

    #[tokio::test]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        conformance::run_all(&open(&dir)).await;
    }

    #[tokio::test]
    async fn reopening_keeps_every_committed_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let chat = direct("a", "b");
        conformance::append_n(&store, &chat, "a", 10).await;
        store.close().await;
        let store = open(&dir);
        let page = store.history(&chat, None, 100).await.unwrap();
        assert_eq!(page.messages.len(), 10);
    }
}
