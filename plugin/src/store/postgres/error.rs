//! The PostgreSQL backend's own failures, keeping their cause, and what they mean to callers:
//! a broken constraint (SQLSTATE class 23) is a refused write, anything else an outage worth
//! retrying.

use deadpool_postgres::PoolError;
use tokio_postgres::types::FromSql;
use tokio_postgres::Row;

use crate::store::StoreError;

/// A failure inside the PostgreSQL backend.
#[derive(Debug, thiserror::Error)]
pub(super) enum PostgresError {
    /// The server, or the connection to it.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No pooled connection could be had.
    #[error("connection pool: {0}")]
    Pool(#[from] PoolError),
    /// The pool could not be set up.
    #[error("connection pool set-up: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    /// `store.postgres.url` does not parse.
    #[error("store.postgres.url: {0}")]
    Url(#[source] tokio_postgres::Error),
    /// The appender task is gone.
    #[error("the appender stopped")]
    AppenderStopped,
    /// Called after `close`.
    #[error("the store is closed")]
    Closed,
    /// A committed batch came back without a row it wrote.
    #[error("conversation {0} vanished from its batch")]
    Vanished(String),
}

impl PostgresError {
    fn is_constraint(&self) -> bool {
        let PostgresError::Postgres(e) = self else {
            return false;
        };
        e.code().is_some_and(|state| state.code().starts_with("23"))
    }
}

impl From<PostgresError> for StoreError {
    fn from(error: PostgresError) -> Self {
        if error.is_constraint() {
            StoreError::Rejected(Box::new(error))
        } else {
            StoreError::Unavailable(Box::new(error))
        }
    }
}

/// A PostgreSQL failure as the store reports it.
pub(super) fn pg_error(error: tokio_postgres::Error) -> StoreError {
    PostgresError::from(error).into()
}

/// A pool failure as the store reports it.
pub(super) fn pool_error(error: PoolError) -> StoreError {
    PostgresError::from(error).into()
}

/// Reading a row's columns without panicking on an unexpected type or NULL.
pub(super) trait Cells {
    /// Column `index`, or why it cannot be read.
    fn cell<'a, T: FromSql<'a>>(&'a self, index: usize) -> Result<T, StoreError>;
}

impl Cells for Row {
    fn cell<'a, T: FromSql<'a>>(&'a self, index: usize) -> Result<T, StoreError> {
        self.try_get(index).map_err(pg_error)
    }
}
