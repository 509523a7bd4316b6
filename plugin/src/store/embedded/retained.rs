//! Retained messages shared by a cluster's nodes, kept whole.

use rusqlite::{params, Connection};

use super::queries::{sql_error, Result};
use crate::store::{now_ms, Retained};

pub(super) fn put(conn: &Connection, topic: &str, message: Option<&[u8]>) -> Result<()> {
    match message {
        Some(message) => conn
            .prepare_cached(
                "INSERT INTO retained (topic, message, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic) DO UPDATE SET message = ?2, updated_at = ?3",
            )
            .and_then(|mut put| put.execute(params![topic, message, now_ms()])),
        None => conn
            .prepare_cached("DELETE FROM retained WHERE topic = ?1")
            .and_then(|mut delete| delete.execute([topic])),
    }
    .map_err(sql_error)?;
    Ok(())
}

pub(super) fn all(conn: &Connection) -> Result<Vec<Retained>> {
    let mut stmt = conn
        .prepare_cached("SELECT topic, message FROM retained ORDER BY topic")
        .map_err(sql_error)?;
    let rows = stmt
        .query_map([], |row| {
            Ok(Retained {
                topic: row.get(0)?,
                message: row.get(1)?,
            })
        })
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}
