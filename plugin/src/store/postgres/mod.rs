//! The PostgreSQL backend (deadpool-postgres): messages, members and cursors in one schema.
//! Appends are group-committed by one task; other calls use pooled connections, with ack and
//! page of a Pull in one transaction. Every call that returns `Ok` has committed.

mod append;
mod queries;

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

use super::{
    migrate, Appended, Device, DigestSnapshot, NewMessage, Page, SeqRange, Store, StoreError,
};
use crate::config::PostgresSettings;

/// Appends waiting for the writer task.
const APPEND_QUEUE: usize = 16_384;

/// PostgreSQL store.
#[derive(Debug)]
pub struct PostgresStore {
    pool: Pool,
    appender: Mutex<Option<mpsc::Sender<append::Request>>>,
    appender_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

pub(super) fn pg_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
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
    /// which commits up to `max_batch` messages per transaction.
    ///
    /// # Errors
    /// The server cannot be reached, a migration fails, or the schema is newer than this
    /// binary.
    pub async fn open(settings: &PostgresSettings, max_batch: usize) -> Result<Self, StoreError> {
        let pool = pool(settings)?;
        let mut setup = connect(settings).await?;
        setup
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", settings.schema))
            .await
            .map_err(pg_error)?;
        migrate::apply_postgres(&mut setup).await?;
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        let task = tokio::spawn(append::run(pool.clone(), rx, max_batch.max(1)));
        Ok(Self {
            pool,
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

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

fn pg_config(settings: &PostgresSettings) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config =
        settings.url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Unavailable(format!("store.postgres.url: {e}"))
        })?;
    // The schema name is validated by the configuration (letters, digits, '_').
    config.options(format!("-c search_path={}", settings.schema));
    config.connect_timeout(Duration::from_millis(settings.connect_timeout_ms));
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
    let timeout = Some(Duration::from_millis(settings.connect_timeout_ms));
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .build()
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}

async fn connect(settings: &PostgresSettings) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) = pg_config(settings)?
        .connect(NoTls)
        .await
        .map_err(pg_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "set-up connection closed");
        }
    });
    Ok(client)
}

#[async_trait]
impl Store for PostgresStore {
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        let sender = self
            .appender
            .lock()
            .map_err(|_| StoreError::Unavailable("appender lock poisoned".into()))?
            .clone()
            .ok_or_else(|| StoreError::Unavailable("store is closed".into()))?;
        let (reply, done) = oneshot::channel();
        sender
            .send((message, reply))
            .await
            .map_err(|_| StoreError::Unavailable("appender stopped".into()))?;
        done.await
            .map_err(|_| StoreError::Unavailable("appender stopped".into()))?
    }

    async fn register_device(&self, device: &Device) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        queries::register_device(&tx, device).await?;
        tx.commit().await.map_err(pg_error)
    }

    async fn digest(&self, device: &Device, last_n: usize) -> Result<DigestSnapshot, StoreError> {
        let mut client = self.client().await?;
        let conversations = queries::digest_states(&client, device, last_n).await?;
        let entries: Vec<(String, u64)> = conversations
            .iter()
            .map(|c| (c.conversation.clone(), c.max_seq))
            .collect();
        let tx = client.transaction().await.map_err(pg_error)?;
        let version = queries::record_digest(&tx, device, &entries).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(DigestSnapshot {
            version,
            conversations,
        })
    }

    async fn clear_counters(&self, device: &Device, version: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        queries::clear_counters(&client, device, version).await
    }

    async fn pull(
        &self,
        device: &Device,
        conversation: &str,
        ack: Option<SeqRange>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let page = queries::pull(&tx, device, conversation, ack, limit).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(page)
    }

    async fn ack(
        &self,
        device: &Device,
        conversation: &str,
        range: SeqRange,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        queries::ack(&tx, device, conversation, range).await?;
        tx.commit().await.map_err(pg_error)
    }

    async fn history(
        &self,
        conversation: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let client = self.client().await?;
        queries::history(&client, conversation, before, limit).await
    }

    async fn mark_read(&self, uid: &str, conversation: &str, seq: u64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        queries::mark_read(&client, uid, conversation, seq).await
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
    use crate::store::conformance;

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
            connect_timeout_ms: 3000,
        })
    }

    #[tokio::test]
    async fn conformance_suite() {
        let Some(settings) = test_settings() else {
            eprintln!("skipped: MQTT_IM_TEST_POSTGRES_URL is not set");
            return;
        };
        let store = PostgresStore::open(&settings, 64).await.unwrap();
        conformance::run_all(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn batch_with_duplicates_inside_assigns_gap_free_seqs() {
        let Some(settings) = test_settings() else {
            return;
        };
        let store = std::sync::Arc::new(PostgresStore::open(&settings, 64).await.unwrap());
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("m{}", i % 150);
                store
                    .append(NewMessage {
                        conversation: "dm:a:b".into(),
                        members: vec!["a".into(), "b".into()],
                        sender: "a".into(),
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
