//! The embedded backend's own failures, keeping their cause, and what they mean to callers:
//! a broken constraint is a refused write, anything else an outage worth retrying.

use std::path::PathBuf;

use crate::store::StoreError;

/// A failure inside the embedded backend.
#[derive(Debug, thiserror::Error)]
pub(super) enum SqliteError {
    /// SQLite itself.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database folder could not be made.
    #[error("cannot create {path}: {source}")]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The database file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the writer: {0}")]
    Thread(#[source] std::io::Error),
    /// The writer thread is gone.
    #[error("the writer stopped")]
    WriterStopped,
    /// Called after `close`.
    #[error("the store is closed")]
    Closed,
    /// A read on the blocking pool panicked or was cancelled.
    #[error("a read failed: {0}")]
    Read(#[source] tokio::task::JoinError),
}

impl SqliteError {
    fn is_constraint(&self) -> bool {
        matches!(
            self,
            SqliteError::Sqlite(rusqlite::Error::SqliteFailure(failure, _))
                if failure.code == rusqlite::ErrorCode::ConstraintViolation
        )
    }
}

impl From<SqliteError> for StoreError {
    fn from(error: SqliteError) -> Self {
        if error.is_constraint() {
            StoreError::Rejected(Box::new(error))
        } else {
            StoreError::Unavailable(Box::new(error))
        }
    }
}

/// A SQLite failure as the store reports it.
pub(super) fn sql_error(error: rusqlite::Error) -> StoreError {
    SqliteError::from(error).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_constraint_is_a_refused_write_not_an_outage() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);")
            .unwrap();
        let twice = conn.execute("INSERT INTO t VALUES (1)", []).unwrap_err();
        let error = sql_error(twice);
        assert!(matches!(error, StoreError::Rejected(_)), "{error:?}");
        assert!(
            std::error::Error::source(&error).is_some(),
            "the cause is kept"
        );
        let missing = conn
            .execute("INSERT INTO nowhere VALUES (1)", [])
            .unwrap_err();
        assert!(matches!(sql_error(missing), StoreError::Unavailable(_)));
    }
}
