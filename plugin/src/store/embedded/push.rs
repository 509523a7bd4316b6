//! The push queue: what each user's pushers are owed per conversation (see the migration).

use rusqlite::{params, Connection};

use super::queries::{sql_error, Result};
use crate::domain::{Conversation, Uid};
use crate::store::{PushDue, PushTiming};

/// Queues a committed message for the members (not its sender) that have a pusher.
pub(super) fn enqueue(
    conn: &Connection,
    conv_id: i64,
    seq: u64,
    sender: &Uid,
    stored_at: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO push_queue (uid, conv_id, last_seq, pending_since)
         SELECT m.uid, ?1, ?2, ?3 FROM members m
         WHERE m.conv_id = ?1 AND m.uid <> ?4
           AND EXISTS (SELECT 1 FROM pushers p WHERE p.uid = m.uid)
         ON CONFLICT (uid, conv_id) DO UPDATE SET
           pending_since = CASE WHEN push_queue.last_seq <= push_queue.handled_seq
                           THEN excluded.pending_since ELSE push_queue.pending_since END,
           last_seq = MAX(push_queue.last_seq, excluded.last_seq)",
    )
    .and_then(|mut queue| queue.execute(params![conv_id, seq, stored_at, sender]))
    .map_err(sql_error)?;
    Ok(())
}

/// The rows due at `?1` (now) after the delay `?2` and the coalescing window `?3`, not
/// claimed: one condition for [`any_due`] and [`claim`].
const DUE: &str = "last_seq > handled_seq AND pending_since <= ?1 - ?2
    AND (sent_at = 0 OR sent_at <= ?1 - ?3) AND next_at <= ?1 AND claimed_until <= ?1";

/// Whether anything is due: a read, so that an idle queue costs no write (and no commit)
/// per round.
pub(super) fn any_due(conn: &Connection, timing: PushTiming) -> Result<bool> {
    let PushTiming {
        now_ms,
        delay_ms,
        coalesce_ms,
        ..
    } = timing;
    conn.prepare_cached(&format!(
        "SELECT EXISTS (SELECT 1 FROM push_queue WHERE {DUE})"
    ))
    .and_then(|mut due| due.query_row(params![now_ms, delay_ms, coalesce_ms], |row| row.get(0)))
    .map_err(sql_error)
}

pub(super) fn claim(
    conn: &Connection,
    node: &str,
    timing: PushTiming,
    limit: usize,
) -> Result<Vec<PushDue>> {
    let PushTiming {
        now_ms,
        delay_ms,
        coalesce_ms,
        lease_ms,
    } = timing;
    let mut stmt = conn
        .prepare_cached(&format!(
            "UPDATE push_queue SET claimed_by = ?4, claimed_until = ?1 + ?5,
               sending_seq = CASE WHEN sending_seq > handled_seq THEN sending_seq ELSE last_seq END
             WHERE (uid, conv_id) IN (
               SELECT uid, conv_id FROM push_queue WHERE {DUE}
               ORDER BY pending_since LIMIT ?6)
             RETURNING uid, sending_seq, attempts,
               (SELECT key FROM conversations c WHERE c.id = push_queue.conv_id)"
        ))
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(
            params![now_ms, delay_ms, coalesce_ms, node, lease_ms, limit as u64],
            |row| {
                let key: Option<String> = row.get(3)?;
                Ok(PushDue {
                    uid: row.get(0)?,
                    conversation: key.as_deref().and_then(Conversation::from_key),
                    seq: row.get(1)?,
                    attempts: row.get(2)?,
                })
            },
        )
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}

/// The row's conversation id: 0 for a counts-only update.
const CONV_ID: &str = "COALESCE((SELECT id FROM conversations WHERE key = ?2), 0)";

fn key(due: &PushDue) -> String {
    due.conversation
        .as_ref()
        .map(Conversation::key)
        .unwrap_or_default()
}

pub(super) fn done(conn: &Connection, due: &PushDue, now_ms: i64, sent: bool) -> Result<()> {
    conn.prepare_cached(&format!(
        "UPDATE push_queue SET handled_seq = MAX(handled_seq, ?3),
           sent_at = CASE WHEN ?5 THEN ?4 ELSE sent_at END,
           pending_since = ?4, attempts = 0, next_at = 0, claimed_by = '', claimed_until = 0
         WHERE uid = ?1 AND conv_id = {CONV_ID}"
    ))
    .and_then(|mut stmt| stmt.execute(params![due.uid, key(due), due.seq, now_ms, sent]))
    .map_err(sql_error)?;
    Ok(())
}

pub(super) fn failed(conn: &Connection, due: &PushDue, retry_at_ms: i64) -> Result<()> {
    conn.prepare_cached(&format!(
        "UPDATE push_queue SET attempts = attempts + 1, next_at = ?3, claimed_by = '',
           claimed_until = 0
         WHERE uid = ?1 AND conv_id = {CONV_ID}"
    ))
    .and_then(|mut stmt| stmt.execute(params![due.uid, key(due), retry_at_ms]))
    .map_err(sql_error)?;
    Ok(())
}

pub(super) fn handled(
    conn: &Connection,
    uid: &Uid,
    read: Option<(&Conversation, u64)>,
    now_ms: i64,
) -> Result<()> {
    match read {
        None => conn
            .prepare_cached(
                "UPDATE push_queue SET handled_seq = last_seq
                 WHERE uid = ?1 AND conv_id <> 0 AND last_seq > handled_seq",
            )
            .and_then(|mut stmt| stmt.execute([uid])),
        Some((conversation, seq)) => conn
            .prepare_cached(&format!(
                "UPDATE push_queue SET handled_seq = MAX(handled_seq, ?3)
                 WHERE uid = ?1 AND conv_id = {CONV_ID}"
            ))
            .and_then(|mut stmt| stmt.execute(params![uid, conversation.key(), seq]))
            .and_then(|_| {
                // The badge moved: a counts-only update for the user's pushers.
                conn.prepare_cached(
                    "INSERT INTO push_queue (uid, conv_id, last_seq, pending_since)
                     SELECT ?1, 0, 1, ?2 WHERE EXISTS (SELECT 1 FROM pushers WHERE uid = ?1)
                     ON CONFLICT (uid, conv_id) DO UPDATE SET
                       pending_since = CASE WHEN push_queue.last_seq > push_queue.handled_seq
                                       THEN push_queue.pending_since ELSE ?2 END,
                       last_seq = CASE WHEN push_queue.last_seq > push_queue.handled_seq
                                  THEN push_queue.last_seq ELSE push_queue.handled_seq + 1 END",
                )?
                .execute(params![uid, now_ms])
            }),
    }
    .map_err(sql_error)?;
    Ok(())
}

/// Oldest first beyond the newest `keep`; claimed ones are being sent and stay.
pub(super) fn trim(conn: &Connection, keep: usize, now_ms: i64) -> Result<u64> {
    let dropped = conn
        .prepare_cached(
            "UPDATE push_queue SET handled_seq = last_seq WHERE (uid, conv_id) IN (
               SELECT uid, conv_id FROM push_queue
               WHERE last_seq > handled_seq AND claimed_until <= ?2
               ORDER BY pending_since DESC LIMIT -1 OFFSET ?1)",
        )
        .and_then(|mut trim| trim.execute(params![keep as u64, now_ms]))
        .map_err(sql_error)?;
    Ok(dropped as u64)
}

pub(super) fn unread_total(conn: &Connection, uid: &Uid) -> Result<u64> {
    conn.prepare_cached(
        "SELECT COUNT(*) FROM members m
         JOIN messages x ON x.conv_id = m.conv_id AND x.seq > m.read_seq
         WHERE m.uid = ?1 AND x.sender <> ?1",
    )
    .and_then(|mut stmt| stmt.query_row([uid], |row| row.get(0)))
    .map_err(sql_error)
}
