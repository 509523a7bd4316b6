//! The `postgres` provider: the team's own users table. A configured query gets the username
//! (`$1`, and the client id as `$2` if it asks for it) and returns the password hash, then
//! optionally the uid, a superuser flag and topic rules (JSON, as [`super::acl::rules_from_json`]
//! reads them). Rows, and the absence of one, are cached for `cache_ttl` (bounded), so a
//! reconnect storm does not become a query storm; passwords are never cached, only checked
//! against the cached hash. Every query has a deadline; a failure follows `on_error`.

use std::str::FromStr;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::cache::TtlCache;
use super::hash::StoredHash;
use super::settings::{PostgresAuthSettings, ProviderOutage};
use super::{AuthError, Credentials, Grant, Hashing, Provider, Refusal, Verdict};

/// One user's row.
#[derive(Debug, Clone)]
struct UserRow {
    hash: Arc<StoredHash>,
    uid: Option<String>,
    superuser: bool,
    acl: Option<Vec<super::acl::Rule>>,
}

/// A configured users table.
pub(super) struct Postgres {
    settings: PostgresAuthSettings,
    pool: Pool,
    hashing: Arc<Hashing>,
    /// Rows (or their absence) by username and client id.
    cache: TtlCache<(String, String), Option<UserRow>>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

impl Postgres {
    pub(super) fn new(
        settings: &PostgresAuthSettings,
        hashing: Arc<Hashing>,
    ) -> Result<Self, AuthError> {
        let problem =
            |what: &str| AuthError::Unavailable(format!("auth.providers postgres: {what}"));
        let mut config = tokio_postgres::Config::from_str(&settings.url)
            .map_err(|_| problem("url does not parse"))?;
        let timeout = settings.timeout.0;
        config.connect_timeout(timeout);
        config.keepalives(true);
        config.tcp_user_timeout(timeout);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .build()
            .map_err(|_| problem("cannot build the pool"))?;
        Ok(Self {
            settings: settings.clone(),
            pool,
            hashing,
            cache: TtlCache::new(settings.cache_ttl.0),
        })
    }

    /// The user's row, or `None` if the query returns none.
    async fn fetch(&self, username: &str, client_id: &str) -> Result<Option<UserRow>, AuthError> {
        let unavailable =
            |e: &dyn std::fmt::Display| AuthError::Unavailable(format!("users table: {e}"));
        // The pool waits at most the deadline for a connection.
        let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let query = async {
            let statement = client
                .prepare_cached(&self.settings.query)
                .await
                .map_err(|e| unavailable(&e))?;
            let rows = if statement.params().len() >= 2 {
                client.query(&statement, &[&username, &client_id]).await
            } else {
                client.query(&statement, &[&username]).await
            }
            .map_err(|e| unavailable(&e))?;
            rows.first().map(row_from).transpose()
        };
        let deadline = self.settings.timeout.0;
        match tokio::time::timeout(deadline, query).await {
            Ok(answer) => answer,
            Err(_) => {
                // A query abandoned mid-flight leaves its connection unusable (a stalled
                // socket stalls every later query): close it rather than pool it again.
                drop(deadpool_postgres::Object::take(client));
                Err(AuthError::Timeout(deadline))
            }
        }
    }
}

fn row_from(row: &tokio_postgres::Row) -> Result<UserRow, AuthError> {
    let bad = |what: &str| AuthError::Unavailable(format!("users table row: {what}"));
    let stored: String = row
        .try_get(0)
        .map_err(|_| bad("column 1 is no password hash text"))?;
    let hash = StoredHash::parse(&stored, false).map_err(|e| bad(&e.to_string()))?;
    let uid = if row.len() > 1 {
        row.try_get::<_, Option<String>>(1)
            .map_err(|_| bad("column 2 (uid) is no text"))?
    } else {
        None
    };
    let superuser = if row.len() > 2 {
        row.try_get::<_, Option<bool>>(2)
            .map_err(|_| bad("column 3 (superuser) is no boolean"))?
            .unwrap_or(false)
    } else {
        false
    };
    let acl = if row.len() > 3 {
        let json = row
            .try_get::<_, Option<String>>(3)
            .map_err(|_| bad("column 4 (acl) is no text; cast it with ::text"))?;
        match json {
            Some(text) => {
                let value = serde_json::from_str(&text).map_err(|_| bad("acl is no JSON"))?;
                Some(super::acl::rules_from_json(&value).map_err(|e| bad(&e))?)
            }
            None => None,
        }
    } else {
        None
    };
    Ok(UserRow {
        hash: Arc::new(hash),
        uid,
        superuser,
        acl,
    })
}

#[async_trait::async_trait]
impl Provider for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn outage(&self) -> ProviderOutage {
        self.settings.on_error
    }

    async fn check(&self, credentials: &Credentials) -> Result<Verdict, AuthError> {
        let Some(username) = credentials.username.as_deref() else {
            return Ok(Verdict::Next);
        };
        let key = (username.to_owned(), credentials.client_id.clone());
        let row = match self.cache.get(&key) {
            Some(row) => row,
            None => {
                let row = self.fetch(username, &credentials.client_id).await?;
                self.cache.put(key, row.clone());
                row
            }
        };
        let Some(row) = row else {
            return Ok(Verdict::Next);
        };
        let password = credentials.password.as_deref().unwrap_or_default();
        if !self.hashing.verify(&row.hash, password).await? {
            return Ok(Verdict::Deny(Refusal::BadCredentials));
        }
        Ok(Verdict::Allow(Grant {
            uid: row.uid,
            superuser: row.superuser,
            acl: row.acl,
            expires: None,
        }))
    }
}
