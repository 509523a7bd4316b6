//! The PostgreSQL backend (deadpool-postgres): messages, members and cursors in one schema.
//! Appends are group-committed by one task; other calls use pooled connections, with ack and
//! page of a Pull in one transaction. Every call that returns `Ok` has committed.

mod append;
mod cache;
mod error;
mod groups;
mod lifecycle;
mod push;
mod pushers;
mod queries;
mod retained;

use crate::domain::Uid;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

use super::settings::PostgresSettings;
use super::{
    bounded, migrate, now_ms, Collected, Conversation, ConversationKind, ConversationState,
    Cutoffs, Device, DeviceInfo, DigestEntry, DigestFit, DigestShape, DigestSnapshot, Erased,
    Eviction, GroupErasure, Member, NewMessage, OnCommit, Page, PushDue, PushTiming, Pusher,
    PusherGone, PusherSaved, QueuedAppend, Receipt, Removal, Retained, Role, SeqRange, Store,
    StoreError, StoreSizes, SIZES_QUERY,
};
pub use cache::DigestCache;
use error::PostgresError;
use error::{pg_error, pool_error};

/// Appends waiting for the writer task.
const APPEND_QUEUE: usize = 16_384;
/// Idle time before a backend socket is probed, and the time between probes.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// PostgreSQL store.
#[derive(Debug)]
pub struct PostgresStore {
    pool: Pool,
    cache: Option<DigestCache>,
    appender: Mutex<Option<mpsc::Sender<append::Request>>>,
    appender_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Seqs and counts are stored as BIGINT and never negative.
pub(super) fn uint(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl PostgresStore {
    /// Connects, creates the schema if needed, applies migrations and starts the appender,
    /// which commits up to `max_batch` messages per transaction. With `cache`, digest
    /// counters and previews are kept in Redis as well.
    ///
    /// # Errors
    /// The server cannot be reached, a migration fails, or the schema is newer than this
    /// binary.
    pub async fn open(
        settings: &PostgresSettings,
        max_batch: usize,
        cache: Option<DigestCache>,
    ) -> Result<Self, StoreError> {
        let pool = pool(settings)?;
        let mut setup = connect(settings).await?;
        setup
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", settings.schema))
            .await
            .map_err(pg_error)?;
        migrate::apply_postgres(&mut setup).await?;
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        let updates = cache.as_ref().map(DigestCache::spawn_updater);
        let limit = settings.call_timeout.0;
        let writer = append::Writer {
            pool: pool.clone(),
            max_batch: max_batch.max(1),
            limit,
            cache: updates,
        };
        let task = tokio::spawn(writer.run(rx));
        Ok(Self {
            pool,
            cache,
            appender: Mutex::new(Some(tx)),
            appender_task: Mutex::new(Some(task)),
        })
    }

    /// Applies migrations and returns the schema version, without starting a store.
    ///
    /// # Errors
    /// As [`PostgresStore::open`].
    pub async fn migrate(settings: &PostgresSettings) -> Result<u32, StoreError> {
        let mut client = connect(settings).await?;
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", settings.schema))
            .await
            .map_err(pg_error)?;
        migrate::apply_postgres(&mut client).await
    }

    async fn client(&self) -> Result<Lease, StoreError> {
        Lease::get(&self.pool).await
    }
}

/// A pooled connection for one call. A call abandoned at its deadline may have left it
/// mid-exchange with a stalled server (where it would stall every later call), so it is then
/// closed instead of going back to the pool.
pub(super) struct Lease {
    client: Option<deadpool_postgres::Client>,
    abandoned: Option<Arc<AtomicBool>>,
}

impl Lease {
    pub(super) async fn get(pool: &Pool) -> Result<Self, StoreError> {
        let abandoned = bounded::abandonment();
        let client = pool.get().await.map_err(pool_error)?;
        Ok(Self {
            client: Some(client),
            abandoned,
        })
    }

    fn client(&self) -> &deadpool_postgres::Client {
        match &self.client {
            Some(client) => client,
            None => unreachable!("a lease holds its client until dropped"),
        }
    }
}

impl std::ops::Deref for Lease {
    type Target = deadpool_postgres::Client;

    fn deref(&self) -> &Self::Target {
        self.client()
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match &mut self.client {
            Some(client) => client,
            None => unreachable!("a lease holds its client until dropped"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let abandoned = self
            .abandoned
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed));
        if let (true, Some(client)) = (abandoned, self.client.take()) {
            tracing::debug!("closing a connection whose call was abandoned");
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Acknowledgements commit without waiting for the WAL flush (a fsync per Pull was most of
/// its latency). Only a crash of PostgreSQL itself within the WAL writer's delay can lose
/// one, and then a page is offered again: messages are never at risk, their appends commit
/// synchronously.
async fn relaxed_commit(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .map_err(pg_error)
}

fn pg_config(settings: &PostgresSettings) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = settings.url.parse().map_err(PostgresError::Url)?;
    // The schema name is validated by the configuration (letters, digits, '_'). The server
    // ends a statement or an idle transaction that outlives the client's deadline.
    let call = settings.call_timeout.0.as_millis();
    config.options(format!(
        "{} -c statement_timeout={call} -c idle_in_transaction_session_timeout={}",
        search_path(settings),
        call.saturating_mul(2)
    ));
    config.connect_timeout(settings.connect_timeout.0);
    // A dead peer is noticed by probes, and unacknowledged writes give up, long before the
    // kernel's defaults (hours; ~15 minutes).
    config.keepalives(true);
    config.keepalives_idle(KEEPALIVE);
    config.keepalives_interval(KEEPALIVE);
    config.keepalives_retries(3);
    config.tcp_user_timeout(settings.call_timeout.0);
    Ok(config)
}

fn pool(settings: &PostgresSettings) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        pg_config(settings)?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let timeout = Some(settings.connect_timeout.0);
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .build()
        .map_err(|e| PostgresError::from(e).into())
}

/// The server option that puts mqtt-im's tables first.
fn search_path(settings: &PostgresSettings) -> String {
    format!("-c search_path={}", settings.schema)
}

/// The set-up connection (schema and migrations), without the per-call statement timeout: a
/// migration of a large deployment may take longer than any call.
async fn connect(settings: &PostgresSettings) -> Result<tokio_postgres::Client, StoreError> {
    let mut config = pg_config(settings)?;
    config.options(search_path(settings));
    let (client, connection) = config.connect(NoTls).await.map_err(pg_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "set-up connection closed");
        }
    });
    Ok(client)
}

#[async_trait]
impl Store for PostgresStore {
    async fn queue_append(
        &self,
        message: NewMessage,
        on_commit: Option<OnCommit>,
    ) -> Result<QueuedAppend, StoreError> {
        let sender = self
            .appender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(PostgresError::Closed)?;
        let (reply, done) = oneshot::channel();
        let request = append::Request {
            message,
            on_commit,
            reply,
        };
        sender
            .send(request)
            .await
            .map_err(|_| PostgresError::AppenderStopped)?;
        Ok(QueuedAppend::new(done))
    }

    async fn register_device(&self, device: &Device) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        queries::register_device(&tx, device, now_ms()).await?;
        tx.commit().await.map_err(pg_error)
    }

    async fn fitted_digest(
        &self,
        device: &Device,
        shape: DigestShape,
        fit: &DigestFit,
    ) -> Result<DigestSnapshot, StoreError> {
        let mut client = self.client().await?;
        let cache = self.cache.as_ref();
        let built = queries::digest_states(&*client, device, shape, cache).await?;
        // What each entry was counted against, for the cache (none without one).
        let counted: HashMap<Conversation, cache::Counted> = match cache {
            Some(_) => built
                .iter()
                .map(|(state, counted)| (state.conversation.clone(), *counted))
                .collect(),
            None => HashMap::new(),
        };
        let mut conversations: Vec<ConversationState> =
            built.into_iter().map(|(state, _)| state).collect();
        fit(&mut conversations);
        let entries: Vec<DigestEntry> = conversations.iter().map(DigestEntry::from).collect();
        let tx = client.transaction().await.map_err(pg_error)?;
        let version = queries::record_digest(&tx, device, &entries, now_ms()).await?;
        tx.commit().await.map_err(pg_error)?;
        if let Some(cache) = cache {
            let keyed: Vec<(String, cache::Counted)> = conversations
                .iter()
                .filter_map(|state| {
                    let counted = *counted.get(&state.conversation)?;
                    Some((state.conversation.key(), counted))
                })
                .collect();
            let carried: Vec<(&str, cache::Counted)> = keyed
                .iter()
                .map(|(key, counted)| (key.as_str(), *counted))
                .collect();
            cache.record_digest(device, version, &carried).await;
        }
        Ok(DigestSnapshot {
            version,
            conversations,
        })
    }

    async fn clear_counters(&self, device: &Device, version: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        queries::clear_counters(&*client, device, version).await?;
        if let Some(cache) = &self.cache {
            cache.cleared(device, version).await;
        }
        Ok(())
    }

    async fn pull(
        &self,
        device: &Device,
        conversation: &Conversation,
        ack: Option<SeqRange>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if ack.is_some() {
            relaxed_commit(&tx).await?;
        }
        let page = queries::pull(&tx, device, &conversation.key(), ack, limit).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(page)
    }

    async fn ack(
        &self,
        device: &Device,
        conversation: &Conversation,
        range: SeqRange,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        relaxed_commit(&tx).await?;
        let acked = queries::ack(&tx, device, &conversation.key(), range).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(acked)
    }

    async fn history(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let client = self.client().await?;
        queries::history(&*client, &conversation.key(), before, limit).await
    }

    async fn mark_read(
        &self,
        uid: &Uid,
        conversation: &Conversation,
        seq: u64,
    ) -> Result<(u64, u64), StoreError> {
        let client = self.client().await?;
        queries::mark_read(&*client, uid, &conversation.key(), seq).await
    }

    async fn create_group(
        &self,
        conversation: &Conversation,
        owner: &Uid,
        members: &[Uid],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        groups::create_group(&tx, &conversation.key(), owner, members).await?;
        tx.commit().await.map_err(pg_error)
    }

    async fn add_members(
        &self,
        conversation: &Conversation,
        uids: &[Uid],
        role: Role,
    ) -> Result<Vec<Uid>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let added = groups::add_members(&tx, &conversation.key(), uids, role).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(added)
    }

    async fn remove_members(
        &self,
        conversation: &Conversation,
        uids: &[Uid],
    ) -> Result<Vec<Uid>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let removed = groups::remove_members(&tx, &conversation.key(), uids).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(removed)
    }

    async fn members(&self, conversation: &Conversation) -> Result<Vec<Member>, StoreError> {
        groups::members(&*self.client().await?, &conversation.key()).await
    }

    async fn role(
        &self,
        uid: &Uid,
        conversation: &Conversation,
    ) -> Result<Option<Role>, StoreError> {
        groups::role(&*self.client().await?, uid, &conversation.key()).await
    }

    async fn group_memberships(&self, uid: &Uid) -> Result<Vec<(Conversation, Role)>, StoreError> {
        groups::group_memberships(&*self.client().await?, uid).await
    }

    async fn receipts(
        &self,
        conversation: &Conversation,
        seqs: &[u64],
        max_readers: usize,
    ) -> Result<Vec<Receipt>, StoreError> {
        groups::receipts(
            &*self.client().await?,
            &conversation.key(),
            seqs,
            max_readers,
        )
        .await
    }

    async fn senders(
        &self,
        conversation: &Conversation,
        range: SeqRange,
    ) -> Result<Vec<Uid>, StoreError> {
        groups::senders(&*self.client().await?, &conversation.key(), range).await
    }

    async fn removals_since(&self, after: u64, limit: usize) -> Result<Vec<Removal>, StoreError> {
        groups::removals_since(&*self.client().await?, after, limit).await
    }

    async fn sizes(&self) -> Result<StoreSizes, StoreError> {
        let client = self.client().await?;
        let row = client.query_one(SIZES_QUERY, &[]).await.map_err(pg_error)?;
        let count = |i| row.try_get::<_, i64>(i).map_err(pg_error);
        let counts = [
            count(0)?,
            count(1)?,
            count(2)?,
            count(3)?,
            count(4)?,
            count(5)?,
            count(6)?,
        ];
        Ok(StoreSizes::from_counts(counts))
    }

    async fn collect_garbage(
        &self,
        cutoffs: Cutoffs,
        batch: usize,
    ) -> Result<Collected, StoreError> {
        let client = self.client().await?;
        let mut collected = Collected::default();
        for kind in ConversationKind::ALL {
            if let Some(cutoff) = cutoffs.messages(kind) {
                let step = lifecycle::expire_messages(&*client, kind, cutoff, batch).await?;
                collected = collected.plus(step);
            }
        }
        if let Some(cutoff) = cutoffs.devices {
            let due = lifecycle::expired_devices(&*client, cutoff, batch).await?;
            let devices = lifecycle::forget_devices(&*client, &due).await?;
            if let Some(cache) = &self.cache {
                cache.forget_devices(&due).await;
            }
            collected = collected.plus(Collected {
                devices,
                more: due.len() >= batch,
                ..Collected::default()
            });
        }
        if let Some(cutoff) = cutoffs.logs {
            let step = lifecycle::prune_logs(&*client, cutoff, batch).await?;
            collected = collected.plus(step);
        }
        Ok(collected)
    }

    async fn touch_devices(&self, devices: &[Device], now_ms: i64) -> Result<(), StoreError> {
        lifecycle::touch_devices(&*self.client().await?, devices, now_ms).await
    }

    async fn devices(&self, uid: &Uid) -> Result<Vec<DeviceInfo>, StoreError> {
        lifecycle::devices(&*self.client().await?, uid).await
    }

    async fn forget_device(&self, device: &Device) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let known = lifecycle::forget_devices(&tx, std::slice::from_ref(device)).await? > 0;
        lifecycle::evict(&tx, &device.uid, Some(&device.client_id)).await?;
        tx.commit().await.map_err(pg_error)?;
        if let Some(cache) = &self.cache {
            cache.forget_devices(std::slice::from_ref(device)).await;
        }
        Ok(known)
    }

    async fn evict(&self, uid: &Uid, client_id: Option<&str>) -> Result<(), StoreError> {
        lifecycle::evict(&*self.client().await?, uid, client_id).await
    }

    async fn evictions_since(&self, after: u64, limit: usize) -> Result<Vec<Eviction>, StoreError> {
        lifecycle::evictions_since(&*self.client().await?, after, limit).await
    }

    async fn put_retained(&self, topic: &str, message: Option<Vec<u8>>) -> Result<(), StoreError> {
        retained::put(&*self.client().await?, topic, message.as_deref()).await
    }

    async fn retained(&self) -> Result<Vec<Retained>, StoreError> {
        retained::all(&*self.client().await?).await
    }

    async fn set_pusher(
        &self,
        pusher: &Pusher,
        per_device: usize,
    ) -> Result<PusherSaved, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let saved = pushers::set(&tx, pusher, per_device).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(saved)
    }

    async fn remove_pusher(
        &self,
        uid: &Uid,
        app_id: &str,
        pushkey: &str,
        reason: &str,
    ) -> Result<Option<Pusher>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let removed = pushers::remove(&tx, uid, app_id, pushkey, reason).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(removed)
    }

    async fn take_pushers_gone(
        &self,
        device: &Device,
        limit: usize,
    ) -> Result<Vec<PusherGone>, StoreError> {
        pushers::take_gone(&*self.client().await?, device, limit).await
    }

    async fn pushers(&self, uid: &Uid) -> Result<Vec<Pusher>, StoreError> {
        pushers::of_user(&*self.client().await?, uid).await
    }

    async fn claim_pushes(
        &self,
        node: &str,
        timing: PushTiming,
        limit: usize,
    ) -> Result<Vec<PushDue>, StoreError> {
        push::claim(&*self.client().await?, node, timing, limit).await
    }

    async fn push_done(&self, due: &PushDue, now_ms: i64, sent: bool) -> Result<(), StoreError> {
        push::done(&*self.client().await?, due, now_ms, sent).await
    }

    async fn push_failed(&self, due: &PushDue, retry_at_ms: i64) -> Result<(), StoreError> {
        push::failed(&*self.client().await?, due, retry_at_ms).await
    }

    async fn push_handled(
        &self,
        uid: &Uid,
        read: Option<(&Conversation, u64)>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        push::handled(&tx, uid, read, now_ms()).await?;
        tx.commit().await.map_err(pg_error)
    }

    async fn trim_push_queue(&self, keep: usize, now_ms: i64) -> Result<u64, StoreError> {
        push::trim(&*self.client().await?, keep, now_ms).await
    }

    async fn unread_total(&self, uid: &Uid) -> Result<u64, StoreError> {
        push::unread_total(&*self.client().await?, uid).await
    }

    async fn erase_user(&self, uid: &Uid, groups: GroupErasure) -> Result<Erased, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let (erased, mine, touched) = lifecycle::erase_user(&tx, uid, groups).await?;
        tx.commit().await.map_err(pg_error)?;
        if let Some(cache) = &self.cache {
            cache.forget_devices(&mine).await;
            cache.forget_conversations(&touched).await;
        }
        Ok(erased)
    }

    async fn close(&self) {
        if let Ok(mut appender) = self.appender.lock() {
            appender.take();
        }
        let task = self.appender_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            // The appender commits what is queued before it returns.
            let _ = task.await;
        }
        self.pool.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::*;
    use crate::store::conformance;
    use prometheus_client::metrics::counter::Counter;

    /// The test database: MQTT_IM_TEST_POSTGRES_URL, or the local CI service when services
    /// are required. `None` skips (only allowed when MQTT_IM_REQUIRE_SERVICES is not 1).
    pub(crate) fn test_settings() -> Option<PostgresSettings> {
        let required = std::env::var("MQTT_IM_REQUIRE_SERVICES").as_deref() == Ok("1");
        let url = match std::env::var("MQTT_IM_TEST_POSTGRES_URL") {
            Ok(url) => url,
            Err(_) if required => "postgres://postgres@127.0.0.1:5432/test".into(),
            Err(_) => return None,
        };
        Some(PostgresSettings {
            url,
            schema: format!("t_{:016x}", rand::random::<u64>()),
            pool_size: 4,
            connect_timeout: crate::settings::Period::millis(3000),
            call_timeout: crate::settings::Period::millis(5000),
        })
    }

    #[tokio::test]
    async fn conformance_suite() {
        let Some(settings) = test_settings() else {
            eprintln!("skipped: MQTT_IM_TEST_POSTGRES_URL is not set");
            return;
        };
        let store = PostgresStore::open(&settings, 64, None).await.unwrap();
        conformance::run_all(&store).await;
        store.close().await;
    }

    /// Redis of the tests: MQTT_IM_TEST_REDIS_URL, or the local CI service when services are
    /// required; with `cluster`, the seeds of a Redis Cluster (MQTT_IM_TEST_REDIS_CLUSTER_URL,
    /// which `.ci/run` sets).
    fn test_redis(cluster: bool) -> Option<String> {
        let required = std::env::var("MQTT_IM_REQUIRE_SERVICES").as_deref() == Ok("1");
        if cluster {
            let seeds = std::env::var("MQTT_IM_TEST_REDIS_CLUSTER_URL").ok();
            assert!(
                seeds.is_some() || !required,
                "MQTT_IM_TEST_REDIS_CLUSTER_URL is not set"
            );
            return seeds;
        }
        match std::env::var("MQTT_IM_TEST_REDIS_URL") {
            Ok(url) => Some(url),
            Err(_) if required => Some("redis://127.0.0.1:6379".into()),
            Err(_) => None,
        }
    }

    async fn test_cache(
        settings: &PostgresSettings,
        cluster: bool,
    ) -> Option<(DigestCache, String)> {
        let url = test_redis(cluster)?;
        let prefix = format!("test-{}", settings.schema);
        let redis = crate::store::RedisSettings {
            url: &url,
            cluster,
            prefix: &prefix,
            timeout: Duration::from_millis(500),
        };
        let cache = DigestCache::new(&redis, 3, Counter::default()).unwrap();
        Some((cache, url))
    }

    #[tokio::test]
    async fn conformance_suite_with_digest_cache() {
        conformance_suite_with_cache_on(false).await;
    }

    #[tokio::test]
    async fn conformance_suite_with_digest_cache_on_a_redis_cluster() {
        conformance_suite_with_cache_on(true).await;
    }

    async fn conformance_suite_with_cache_on(cluster: bool) {
        let Some(settings) = test_settings() else {
            return;
        };
        let Some((cache, _)) = test_cache(&settings, cluster).await else {
            eprintln!("skipped: Redis is not configured");
            return;
        };
        let store = PostgresStore::open(&settings, 64, Some(cache))
            .await
            .unwrap();
        conformance::run_all(&store).await;
        store.close().await;
    }

    /// Deletes every key of the test's prefix (what FLUSHALL does to a deployment, without
    /// disturbing other tests sharing the server).
    /// `url` may be a Redis Cluster's seeds: each is flushed (one key per DEL, as keys of
    /// several slots cannot go in one).
    async fn flush(url: &str, prefix: &str) {
        for url in url.split(',') {
            let client = redis::Client::open(url).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut connection)
                .await
                .unwrap();
            for key in keys {
                let _: () = redis::cmd("DEL")
                    .arg(key)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
            }
        }
    }

    /// A small deterministic generator, so a failing sequence of operations can be replayed.
    struct Steps(u64);

    impl Steps {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (self.0 >> 33) % n
        }
    }

    /// Random appends, pulls, acks, digests and clears — with the cache flushed twice on the
    /// way — and after every digest the cached store must say exactly what PostgreSQL alone
    /// says; the cache must also have answered, not only been bypassed.
    #[tokio::test]
    async fn digest_cache_always_agrees_with_postgres() {
        digest_cache_agrees_on(false).await;
    }

    #[tokio::test]
    async fn digest_cache_on_a_redis_cluster_always_agrees_with_postgres() {
        digest_cache_agrees_on(true).await;
    }

    async fn digest_cache_agrees_on(cluster: bool) {
        let Some(settings) = test_settings() else {
            return;
        };
        let Some((cache, url)) = test_cache(&settings, cluster).await else {
            return;
        };
        let prefix = format!("test-{}", settings.schema);
        let cached = PostgresStore::open(&settings, 64, Some(cache.clone()))
            .await
            .unwrap();
        let plain = PostgresStore::open(&settings, 64, None).await.unwrap();
        let devices = [("a", "a-1"), ("a", "a-2"), ("b", "b-1"), ("c", "c-1")];
        let conversations = [
            (direct("a", "b"), ["a", "b"]),
            (direct("a", "c"), ["a", "c"]),
            (direct("b", "c"), ["b", "c"]),
        ];
        let mut steps = Steps(7);
        let mut last_page: std::collections::HashMap<(usize, usize), SeqRange> =
            std::collections::HashMap::new();
        let mut versions: Vec<Vec<u64>> = vec![Vec::new(); devices.len()];
        for step in 0..600u64 {
            let d = steps.below(devices.len() as u64) as usize;
            let device = Device {
                uid: uid(devices[d].0),
                client_id: devices[d].1.into(),
            };
            let mine: Vec<usize> = (0..conversations.len())
                .filter(|c| conversations[*c].1.contains(&devices[d].0))
                .collect();
            let conv = mine[steps.below(mine.len() as u64) as usize];
            let key = &conversations[conv].0;
            match steps.below(11) {
                0..=4 => {
                    let appended = cached
                        .append(NewMessage {
                            conversation: key.clone(),
                            sender: device.uid.clone(),
                            sender_device: device.client_id.clone(),
                            msg_id: format!("m{step}"),
                            server_time: i64::try_from(step).unwrap(),
                            body: step.to_be_bytes().to_vec(),
                        })
                        .await
                        .unwrap();
                    assert!(!appended.duplicate);
                }
                5 | 6 => {
                    let ack = last_page.remove(&(d, conv));
                    let page = cached.pull(&device, key, ack, 3).await.unwrap();
                    if let (Some(first), Some(last)) = (page.messages.first(), page.messages.last())
                    {
                        last_page.insert((d, conv), SeqRange::new(last.seq, first.seq).unwrap());
                    }
                }
                7 => {
                    let _ = cached.ack(&device, key, SeqRange::new(1, 2).unwrap()).await;
                }
                8 => {
                    // A late or repeated clear of any digest this device got.
                    let sent = &versions[d];
                    if !sent.is_empty() {
                        let version = sent[steps.below(sent.len() as u64) as usize];
                        cached.clear_counters(&device, version).await.unwrap();
                    }
                }
                _ => {
                    if step % 50 == 0 {
                        flush(&url, &prefix).await;
                    }
                    // Let the updater catch up sometimes, and sometimes race it.
                    if steps.below(2) == 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let with_cache = cached.digest(&device, 3).await.unwrap();
                    let without = plain.digest(&device, 3).await.unwrap();
                    assert_eq!(
                        with_cache.conversations, without.conversations,
                        "step {step}, device {device:?}"
                    );
                    versions[d].extend([with_cache.version, without.version]);
                    if steps.below(2) == 0 {
                        cached
                            .clear_counters(&device, with_cache.version)
                            .await
                            .unwrap();
                    }
                }
            }
        }
        let stats = cache.stats();
        let hits = stats
            .counter_hits
            .load(std::sync::atomic::Ordering::Relaxed);
        let previews = stats
            .preview_hits
            .load(std::sync::atomic::Ordering::Relaxed);
        let misses = stats
            .counter_misses
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(hits > 0 && previews > 0, "hits {hits}, previews {previews}");
        eprintln!("counter hits {hits}, misses {misses}, preview hits {previews}");
        cached.close().await;
        plain.close().await;
        flush(&url, &prefix).await;
    }

    /// A node whose cache update was lost (here: a second store without the cache) leaves a
    /// hole; the next message's update must not count over it.
    #[tokio::test]
    async fn lost_cache_update_is_recounted() {
        let Some(settings) = test_settings() else {
            return;
        };
        let Some((cache, url)) = test_cache(&settings, false).await else {
            return;
        };
        let cached = PostgresStore::open(&settings, 64, Some(cache))
            .await
            .unwrap();
        let lost = PostgresStore::open(&settings, 64, None).await.unwrap();
        let bob = Device {
            uid: uid("bob"),
            client_id: "bob-phone".into(),
        };
        let chat = direct("alice", "bob");
        conformance::append_n(&cached, &chat, "alice", 5).await;
        let _ = cached.digest(&bob, 3).await.unwrap();
        let send = |id: &str| conformance::message(&chat, "alice", id);
        lost.append(send("lost")).await.unwrap();
        cached.append(send("after")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let digest = cached.digest(&bob, 3).await.unwrap();
        let state = &digest.conversations[0];
        assert_eq!((state.max_seq, state.count, state.unacked), (7, 7, 7));
        let previews: Vec<u64> = state.last.iter().map(|m| m.seq).collect();
        assert_eq!(previews, vec![7, 6, 5]);
        cached.close().await;
        lost.close().await;
        flush(&url, &format!("test-{}", settings.schema)).await;
    }

    /// An offline device's backlog is counted in Redis as it arrives: its next digest reads
    /// no counter and no preview from PostgreSQL.
    #[tokio::test]
    async fn offline_backlog_digest_comes_from_the_cache() {
        let Some(settings) = test_settings() else {
            return;
        };
        let Some((cache, url)) = test_cache(&settings, false).await else {
            return;
        };
        let store = PostgresStore::open(&settings, 64, Some(cache.clone()))
            .await
            .unwrap();
        let bob = Device {
            uid: uid("bob"),
            client_id: "bob-phone".into(),
        };
        store.register_device(&bob).await.unwrap();
        let (alice, carol, dave) = (
            direct("alice", "bob"),
            direct("bob", "carol"),
            direct("bob", "dave"),
        );
        conformance::append_n(&store, &alice, "alice", 1).await;
        conformance::append_n(&store, &carol, "carol", 1).await;
        let first = store.digest(&bob, 3).await.unwrap();
        store.clear_counters(&bob, first.version).await.unwrap();
        let stats = cache.stats();
        let counter_misses = stats
            .counter_misses
            .load(std::sync::atomic::Ordering::Relaxed);
        // Offline now: a backlog in both conversations and a new one.
        for (chat, sender) in [(&alice, "alice"), (&carol, "carol"), (&dave, "dave")] {
            for i in 0..20 {
                let message = conformance::message(chat, sender, &format!("later-{i}"));
                store.append(message).await.unwrap();
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let misses = || {
                (
                    stats
                        .counter_misses
                        .load(std::sync::atomic::Ordering::Relaxed),
                    stats
                        .preview_misses
                        .load(std::sync::atomic::Ordering::Relaxed),
                )
            };
            let before = misses();
            let digest = store.digest(&bob, 3).await.unwrap();
            if misses() == before {
                let counts: Vec<(Conversation, u64, u64)> = digest
                    .conversations
                    .iter()
                    .map(|c| (c.conversation.clone(), c.count, c.unacked))
                    .collect();
                assert_eq!(
                    counts,
                    vec![(alice, 20, 21), (carol, 20, 21), (dave, 20, 20)]
                );
                break;
            }
            // The updater had not caught up yet; the digest recounted and stays right.
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cache never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(counter_misses > 0, "the first digest had to count");
        store.close().await;
        flush(&url, &format!("test-{}", settings.schema)).await;
    }

    #[tokio::test]
    async fn batch_with_duplicates_inside_assigns_gap_free_seqs() {
        let Some(settings) = test_settings() else {
            return;
        };
        let store = std::sync::Arc::new(PostgresStore::open(&settings, 64, None).await.unwrap());
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("m{}", i % 150);
                store
                    .append(NewMessage {
                        conversation: direct("a", "b"),
                        sender: uid("a"),
                        sender_device: "a-1".into(),
                        msg_id: id,
                        server_time: 1,
                        body: vec![1],
                    })
                    .await
                    .unwrap()
            }));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            let appended = task.await.unwrap();
            if !appended.duplicate {
                seqs.push(appended.seq);
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=150).collect::<Vec<_>>());
        store.close().await;
    }
}
