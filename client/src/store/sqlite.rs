//! The default store: one SQLite file (bundled, nothing to install), WAL mode.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use prost::Message as _;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{ConversationRecord, LocalStore, OutboxItem, SeqRange, StoreError};
use crate::model::{Content, ConversationId, Delivery, Message};
use crate::pb;

/// The schema; `user_version` says which one a file has.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    max_seq INTEGER NOT NULL, read_seq INTEGER NOT NULL, peer_read_seq INTEGER NOT NULL,
    last_time INTEGER NOT NULL, missed INTEGER NOT NULL, gone INTEGER NOT NULL,
    held TEXT NOT NULL, pull_lo INTEGER, pull_hi INTEGER, pull_end INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation TEXT NOT NULL, sender TEXT NOT NULL, msg_id TEXT NOT NULL,
    seq INTEGER, time INTEGER NOT NULL, server_time INTEGER, content BLOB NOT NULL,
    state INTEGER NOT NULL, attempts INTEGER NOT NULL, code INTEGER NOT NULL, error TEXT,
    UNIQUE (sender, msg_id)
);
CREATE INDEX IF NOT EXISTS messages_by_seq ON messages (conversation, seq);
CREATE TABLE IF NOT EXISTS outbox (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL UNIQUE, conversation TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS readers (
    conversation TEXT NOT NULL, uid TEXT NOT NULL, read_seq INTEGER NOT NULL,
    PRIMARY KEY (conversation, uid)
);
PRAGMA user_version = 1;
";

const SENDING: i64 = 0;
const SENT: i64 = 1;
const FAILED: i64 = 2;
const RECEIVED: i64 = 3;

const MESSAGE_COLUMNS: &str =
    "conversation, sender, msg_id, seq, time, server_time, content, state, attempts, code, error";

/// A SQLite file holding one user's data on one device.
#[derive(Debug)]
pub struct SqliteStore(Mutex<Connection>);

fn db(error: rusqlite::Error) -> StoreError {
    StoreError::Database(error.to_string())
}

impl SqliteStore {
    /// Opens (or creates) the file at `path`.
    ///
    /// # Errors
    /// The file cannot be opened, or was written by a newer version of this crate.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(db)?;
        if version > 1 {
            return Err(StoreError::Database(format!(
                "schema version {version} is newer than this client (1)"
            )));
        }
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(Self(Mutex::new(conn)))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn held_text(held: &[SeqRange]) -> String {
    held.iter()
        .map(|r| format!("{}-{}", r.lo, r.hi))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_held(text: &str) -> Vec<SeqRange> {
    text.split(',')
        .filter_map(|part| {
            let (lo, hi) = part.split_once('-')?;
            Some(SeqRange {
                lo: lo.parse().ok()?,
                hi: hi.parse().ok()?,
            })
        })
        .collect()
}

/// The conversation name in column `index`; a row no client wrote is an error, not a guess.
fn conversation_at(row: &Row<'_>, index: usize) -> rusqlite::Result<ConversationId> {
    let name: String = row.get(index)?;
    ConversationId::parse(&name).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("{name:?} is not a conversation").into(),
        )
    })
}

fn record_from(row: &Row<'_>) -> rusqlite::Result<ConversationRecord> {
    let pull: (Option<u64>, Option<u64>) = (row.get(8)?, row.get(9)?);
    Ok(ConversationRecord {
        id: conversation_at(row, 0)?,
        max_seq: row.get(1)?,
        read_seq: row.get(2)?,
        peer_read_seq: row.get(3)?,
        last_time: row.get(4)?,
        missed: row.get(5)?,
        gone: row.get(6)?,
        held: parse_held(&row.get::<_, String>(7)?),
        pull_cursor: match pull {
            (Some(lo), Some(hi)) => Some(SeqRange { lo, hi }),
            _ => None,
        },
        pull_end: row.get(10)?,
    })
}

fn message_from(row: &Row<'_>) -> rusqlite::Result<Message> {
    let content: Vec<u8> = row.get(6)?;
    let delivery = match row.get::<_, i64>(7)? {
        SENDING => Delivery::Sending {
            attempts: row.get(8)?,
            error: row.get(10)?,
        },
        SENT => Delivery::Sent,
        FAILED => Delivery::Failed {
            code: row.get(9)?,
            reason: row.get::<_, Option<String>>(10)?.unwrap_or_default(),
        },
        _ => Delivery::Received,
    };
    Ok(Message {
        conversation: conversation_at(row, 0)?,
        from: row.get(1)?,
        msg_id: row.get(2)?,
        seq: row.get(3)?,
        time: row.get(4)?,
        server_time: row.get(5)?,
        content: Content::from_wire(pb::Content::decode(content.as_slice()).ok()),
        delivery,
    })
}

fn save_record(conn: &Connection, record: &ConversationRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO conversations (id, max_seq, read_seq, peer_read_seq, last_time,
             missed, gone, held, pull_lo, pull_hi, pull_end)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        record.id.as_str(),
        record.max_seq,
        record.read_seq,
        record.peer_read_seq,
        record.last_time,
        record.missed,
        record.gone,
        held_text(&record.held),
        record.pull_cursor.map(|c| c.lo),
        record.pull_cursor.map(|c| c.hi),
        record.pull_end,
    ])?;
    Ok(())
}

/// (state, attempts, code, error) columns of a delivery.
fn delivery_columns(delivery: &Delivery) -> (i64, u32, u8, Option<&str>) {
    match delivery {
        Delivery::Sending { attempts, error } => (SENDING, *attempts, 0, error.as_deref()),
        Delivery::Sent => (SENT, 0, 0, None),
        Delivery::Failed { code, reason } => (FAILED, 0, *code, Some(reason)),
        Delivery::Received => (RECEIVED, 0, 0, None),
    }
}

fn insert_message(conn: &Connection, message: &Message) -> rusqlite::Result<bool> {
    let (state, attempts, code, error) = delivery_columns(&message.delivery);
    let inserted = conn
        .prepare_cached(&format!(
            "INSERT OR IGNORE INTO messages ({MESSAGE_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
        ))?
        .execute(params![
            message.conversation.as_str(),
            message.from,
            message.msg_id,
            message.seq,
            message.time,
            message.server_time,
            message.content.to_wire().encode_to_vec(),
            state,
            attempts,
            code,
            error,
        ])?;
    Ok(inserted == 1)
}

impl LocalStore for SqliteStore {
    fn bind_user(&self, uid: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('uid', ?1)",
            [uid],
        )
        .map_err(db)?;
        let owner: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'uid'", [], |row| {
                row.get(0)
            })
            .map_err(db)?;
        if owner == uid {
            Ok(())
        } else {
            Err(StoreError::OtherUser {
                owner,
                uid: uid.to_owned(),
            })
        }
    }

    fn conversation(&self, id: &ConversationId) -> Result<Option<ConversationRecord>, StoreError> {
        self.conn()
            .prepare_cached("SELECT * FROM conversations WHERE id = ?1")
            .and_then(|mut stmt| stmt.query_row([id.as_str()], record_from).optional())
            .map_err(db)
    }

    fn conversations(&self) -> Result<Vec<ConversationRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT * FROM conversations ORDER BY id")
            .map_err(db)?;
        let rows = stmt.query_map([], record_from).map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn insert_all(
        &self,
        batch: &[(ConversationRecord, Vec<Message>)],
    ) -> Result<Vec<Vec<bool>>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db)?;
        let new = batch
            .iter()
            .map(|(conversation, messages)| {
                save_record(&tx, conversation)?;
                messages.iter().map(|m| insert_message(&tx, m)).collect()
            })
            .collect::<rusqlite::Result<Vec<Vec<bool>>>>()
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(new)
    }

    fn enqueue(&self, message: &Message, item: &OutboxItem) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db)?;
        insert_message(&tx, message).map_err(db)?;
        tx.execute(
            "INSERT OR IGNORE INTO outbox (msg_id, conversation, topic, payload)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                item.msg_id,
                item.conversation.as_str(),
                item.topic,
                item.payload
            ],
        )
        .map_err(db)?;
        tx.commit().map_err(db)
    }

    fn update(
        &self,
        message: &Message,
        done: Option<&ConversationRecord>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db)?;
        let (state, attempts, code, error) = delivery_columns(&message.delivery);
        tx.execute(
            "UPDATE messages SET seq = ?3, server_time = ?4, state = ?5, attempts = ?6,
                 code = ?7, error = ?8
             WHERE sender = ?1 AND msg_id = ?2",
            params![
                message.from,
                message.msg_id,
                message.seq,
                message.server_time,
                state,
                attempts,
                code,
                error
            ],
        )
        .map_err(db)?;
        if let Some(record) = done {
            tx.execute("DELETE FROM outbox WHERE msg_id = ?1", [&message.msg_id])
                .map_err(db)?;
            save_record(&tx, record).map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    fn message(&self, from: &str, msg_id: &str) -> Result<Option<Message>, StoreError> {
        self.conn()
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender = ?1 AND msg_id = ?2"
            ))
            .and_then(|mut stmt| stmt.query_row([from, msg_id], message_from).optional())
            .map_err(db)
    }

    fn messages(
        &self,
        conversation: &ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE conversation = ?1
                   AND (CASE WHEN ?2 IS NULL THEN 1 ELSE seq < ?2 END)
                 ORDER BY seq IS NULL DESC, seq DESC, id DESC LIMIT ?3"
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map(
                params![conversation.as_str(), before, limit as i64],
                message_from,
            )
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn count_from(
        &self,
        conversation: &ConversationId,
        uid: &str,
        after: u64,
    ) -> Result<u64, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT COUNT(*) FROM messages WHERE conversation = ?1 AND sender = ?2 AND seq > ?3",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![conversation.as_str(), uid, after], |row| row.get(0))
            })
            .map_err(db)
    }

    fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT msg_id, conversation, topic, payload FROM outbox ORDER BY position",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |row| {
                Ok(OutboxItem {
                    msg_id: row.get(0)?,
                    conversation: conversation_at(row, 1)?,
                    topic: row.get(2)?,
                    payload: row.get(3)?,
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn set_reader(
        &self,
        conversation: &ConversationId,
        uid: &str,
        read_seq: u64,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO readers (conversation, uid, read_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conversation, uid) DO UPDATE
                 SET read_seq = MAX(read_seq, excluded.read_seq)",
                params![conversation.as_str(), uid, read_seq],
            )
            .map(drop)
            .map_err(db)
    }

    fn readers(&self, conversation: &ConversationId) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT uid, read_seq FROM readers WHERE conversation = ?1 ORDER BY uid",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([conversation.as_str()], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }
}
