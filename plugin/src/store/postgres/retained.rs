//! Retained messages shared by a cluster's nodes, kept whole.

use deadpool_postgres::GenericClient;

use super::error::Cells;
use super::pg_error;
use crate::store::{now_ms, Retained, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

pub(super) async fn put(c: &impl GenericClient, topic: &str, message: Option<&[u8]>) -> Result<()> {
    match message {
        Some(message) => {
            c.execute(
                "INSERT INTO retained (topic, message, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (topic) DO UPDATE SET message = $2, updated_at = $3",
                &[&topic, &message, &now_ms()],
            )
            .await
        }
        None => {
            c.execute("DELETE FROM retained WHERE topic = $1", &[&topic])
                .await
        }
    }
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn all(c: &impl GenericClient) -> Result<Vec<Retained>> {
    c.query("SELECT topic, message FROM retained ORDER BY topic", &[])
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| {
            Ok(Retained {
                topic: row.cell(0)?,
                message: row.cell(1)?,
            })
        })
        .collect()
}
