//! Versioned schema migrations, embedded in the binary and applied in order at start-up.

use rusqlite::Connection;

use super::StoreError;

/// One numbered migration of one backend.
#[derive(Debug)]
pub(crate) struct Migration {
    pub(crate) version: u32,
    pub(crate) sql: &'static str,
}

/// The SQLite migrations, `migrations/sqlite/NNNN_*.sql`.
pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../migrations/sqlite/0002_groups.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../migrations/sqlite/0003_bounded.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../../migrations/sqlite/0004_conversation_kind.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../../migrations/sqlite/0005_retained.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../../migrations/sqlite/0006_own_read_seen.sql"),
    },
    Migration {
        version: 7,
        sql: include_str!("../../migrations/sqlite/0007_push.sql"),
    },
];

/// The PostgreSQL migrations, `migrations/postgres/NNNN_*.sql` (same numbering; a number
/// only one backend needs is missing from the other: PostgreSQL has had `conversations.kind`
/// since 0003, SQLite gains it in 0004).
pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../migrations/postgres/0002_groups.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../migrations/postgres/0003_bounded.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../../migrations/postgres/0005_retained.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../../migrations/postgres/0006_own_read_seen.sql"),
    },
    Migration {
        version: 7,
        sql: include_str!("../../migrations/postgres/0007_push.sql"),
    },
];

/// Applies the PostgreSQL migrations the schema lacks, under an advisory lock so that nodes
/// starting together migrate once, and returns the resulting version.
pub(crate) async fn apply_postgres(client: &mut tokio_postgres::Client) -> Result<u32, StoreError> {
    let unavailable = |e: tokio_postgres::Error| StoreError::Unavailable(Box::new(e));
    let tx = client.transaction().await.map_err(unavailable)?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7283401);
         CREATE TABLE IF NOT EXISTS mqtt_im_schema (version INTEGER NOT NULL)",
    )
    .await
    .map_err(unavailable)?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM mqtt_im_schema", &[])
        .await
        .map_err(unavailable)?
        .try_get(0)
        .map_err(unavailable)?;
    let current = u32::try_from(current).unwrap_or(0);
    let supported = latest(POSTGRES);
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for migration in POSTGRES.iter().filter(|m| m.version > current) {
        let failed = |e: tokio_postgres::Error| StoreError::Migration {
            version: migration.version,
            source: Box::new(e),
        };
        tx.batch_execute(migration.sql).await.map_err(failed)?;
        let version = i32::try_from(migration.version).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO mqtt_im_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(failed)?;
    }
    tx.commit().await.map_err(unavailable)?;
    Ok(supported)
}

/// Newest schema version a list of migrations reaches.
fn latest(migrations: &[Migration]) -> u32 {
    migrations.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Applies the SQLite migrations the database lacks, each in its own transaction, and
/// returns the resulting version. A database newer than this binary is refused.
pub(crate) fn apply_sqlite(conn: &mut Connection) -> Result<u32, StoreError> {
    let unavailable = |e: rusqlite::Error| StoreError::Unavailable(Box::new(e));
    let current: u32 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(unavailable)?;
    let supported = latest(SQLITE);
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for migration in SQLITE.iter().filter(|m| m.version > current) {
        let failed = |e: rusqlite::Error| StoreError::Migration {
            version: migration.version,
            source: Box::new(e),
        };
        let tx = conn.transaction().map_err(failed)?;
        tx.execute_batch(migration.sql).map_err(failed)?;
        tx.pragma_update(None, "user_version", migration.version)
            .map_err(failed)?;
        tx.commit().map_err(failed)?;
    }
    Ok(supported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_once_and_refuses_a_newer_schema() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(apply_sqlite(&mut conn).unwrap(), 7);
        assert_eq!(apply_sqlite(&mut conn).unwrap(), 7);
        // Conversations know their kind, as PostgreSQL's do.
        conn.execute_batch("INSERT INTO conversations (key) VALUES ('g:team'), ('dm:a:b')")
            .unwrap();
        let kinds: Vec<(String, i64)> = conn
            .prepare("SELECT key, kind FROM conversations ORDER BY key")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(kinds, vec![("dm:a:b".into(), 0), ("g:team".into(), 1)]);
        conn.pragma_update(None, "user_version", 99).unwrap();
        let err = apply_sqlite(&mut conn).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }));
    }
}
