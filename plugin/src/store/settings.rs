//! The `[store]` section: which backend keeps messages, and how.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{Period, Problems, DAY};

/// Storage backend selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// SQLite file, no server needed.
    Embedded,
    /// PostgreSQL (messages, members, cursors).
    Postgres,
}

impl Backend {
    /// As the status endpoint names it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Postgres => "postgres",
        }
    }
}

/// The PostgreSQL backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// Connection URL (`postgres://user[:password]@host:port/database`).
    pub url: String,
    /// Schema holding mqtt-im's tables (created if missing).
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Time to get a connection before a store call fails as unavailable.
    pub connect_timeout: Period,
    /// Longest a store call (a commit included) may take before it fails as unavailable;
    /// also the server's statement timeout.
    pub call_timeout: Period,
}

/// Storage settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Which backend.
    pub backend: Backend,
    /// SQLite file of the embedded backend.
    pub path: PathBuf,
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// The PostgreSQL backend, used when `backend = "postgres"`.
    pub postgres: PostgresSettings,
}

impl Settings {
    /// Values that parse but cannot work.
    pub fn check(&self, problems: &mut Problems) {
        problems.check(self.max_batch >= 1, "store.max_batch: at least 1");
        self.postgres.check(problems);
    }
}

impl PostgresSettings {
    /// Values that parse but cannot work.
    pub fn check(&self, problems: &mut Problems) {
        problems.check(self.pool_size >= 1, "store.postgres.pool_size: at least 1");
        problems.within(
            "store.postgres.connect_timeout",
            self.connect_timeout,
            Duration::from_millis(1),
            DAY,
        );
        problems.within(
            "store.postgres.call_timeout",
            self.call_timeout,
            Duration::from_millis(100),
            DAY,
        );
        let schema = &self.schema;
        problems.check(
            !schema.is_empty()
                && schema.len() <= 63
                && schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "store.postgres.schema: 1-63 characters of letters, digits and '_'",
        );
    }
}
