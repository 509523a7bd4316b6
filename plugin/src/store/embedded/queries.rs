//! The SQL of the embedded backend: plain functions over a connection, called inside the
//! writer's transaction or on a read connection.

use crate::domain::Uid;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::store::ranges::{self, SeqRange};
use crate::store::{
    Appended, Conversation, ConversationState, Device, DigestEntry, DigestShape, NewMessage, Page,
    Skipped, StoreError, StoredMessage,
};

pub(super) use super::error::sql_error;

pub(super) type Result<T> = std::result::Result<T, StoreError>;

/// A conversation's stored key reads back as the [`Conversation`] it was written from.
impl rusqlite::types::FromSql for Conversation {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let key = value.as_str()?;
        Conversation::from_key(key).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(format!("not a conversation key: {key:?}").into())
        })
    }
}

/// A conversation row.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConversationRow {
    pub(super) id: i64,
    pub(super) max_seq: u64,
    pub(super) last_time: i64,
    /// Every seq up to this one was deleted by retention.
    pub(super) gone_seq: u64,
}

pub(super) fn conversation(conn: &Connection, key: &str) -> Result<Option<ConversationRow>> {
    conn.prepare_cached("SELECT id, max_seq, last_time, gone_seq FROM conversations WHERE key = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([key], |row| {
                Ok(ConversationRow {
                    id: row.get(0)?,
                    max_seq: row.get(1)?,
                    last_time: row.get(2)?,
                    gone_seq: row.get(3)?,
                })
            })
            .optional()
        })
        .map_err(sql_error)
}

pub(super) fn append(conn: &Connection, message: &NewMessage) -> Result<Appended> {
    let existing = conn
        .prepare_cached("SELECT seq, server_time FROM messages WHERE sender = ?1 AND msg_id = ?2")
        .and_then(|mut stmt| {
            stmt.query_row(params![message.sender, message.msg_id], |row| {
                Ok(Appended {
                    seq: row.get(0)?,
                    server_time: row.get(1)?,
                    duplicate: true,
                })
            })
            .optional()
        })
        .map_err(sql_error)?;
    if let Some(first) = existing {
        return Ok(first);
    }
    let conv = create_conversation(conn, &message.conversation)?;
    let seq = conv.max_seq + 1;
    conn.prepare_cached("UPDATE conversations SET max_seq = ?2, last_time = ?3 WHERE id = ?1")
        .and_then(|mut stmt| stmt.execute(params![conv.id, seq, message.server_time]))
        .map_err(sql_error)?;
    conn.prepare_cached(
        "INSERT INTO messages (conv_id, seq, sender, sender_device, msg_id, server_time, body, kind)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            conv.id,
            seq,
            message.sender,
            message.sender_device,
            message.msg_id,
            message.server_time,
            message.body,
            message.conversation.kind().code()
        ])
    })
    .map_err(sql_error)?;
    super::push::enqueue(conn, conv.id, seq, &message.sender, message.server_time)?;
    Ok(Appended {
        seq,
        server_time: message.server_time,
        duplicate: false,
    })
}

/// The conversation's row; a 1:1 chat's is created with its two members on first use.
fn create_conversation(conn: &Connection, conversation: &Conversation) -> Result<ConversationRow> {
    let key = conversation.key();
    if let Some(conv) = self::conversation(conn, &key)? {
        return Ok(conv);
    }
    conn.prepare_cached("INSERT INTO conversations (key) VALUES (?1)")
        .and_then(|mut stmt| stmt.execute([&key]))
        .map_err(sql_error)?;
    let id = conn.last_insert_rowid();
    let mut add = conn
        .prepare_cached("INSERT OR IGNORE INTO members (uid, conv_id) VALUES (?1, ?2)")
        .map_err(sql_error)?;
    for uid in conversation.direct_members().into_iter().flatten() {
        add.execute(params![uid, id]).map_err(sql_error)?;
    }
    Ok(ConversationRow {
        id,
        max_seq: 0,
        last_time: 0,
        gone_seq: 0,
    })
}

/// `(conversation, lo, hi)` rows of `sql` (parameters: the device's uid and client id),
/// sorted by conversation, merged into one range list per conversation.
fn acked_by_conversation(
    conn: &Connection,
    sql: &str,
    device: &Device,
) -> Result<Vec<(i64, Vec<SeqRange>)>> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_error)?;
    let rows = stmt
        .query_map(params![device.uid, device.client_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                SeqRange {
                    lo: row.get(1)?,
                    hi: row.get(2)?,
                },
            ))
        })
        .map_err(sql_error)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)?;
    Ok(ranges::union_by_conversation(rows))
}

pub(super) fn register_device(conn: &Connection, device: &Device, now_ms: i64) -> Result<()> {
    let seen = conn
        .prepare_cached("UPDATE devices SET last_seen = ?3 WHERE uid = ?1 AND client_id = ?2")
        .and_then(|mut stmt| stmt.execute(params![device.uid, device.client_id, now_ms]))
        .map_err(sql_error)?;
    if seen > 0 {
        return Ok(());
    }
    conn.prepare_cached("INSERT INTO devices (uid, client_id, last_seen) VALUES (?1, ?2, ?3)")
        .and_then(|mut stmt| stmt.execute(params![device.uid, device.client_id, now_ms]))
        .map_err(sql_error)?;
    // First sight: start from the union of what the user's other devices acknowledged.
    let union = acked_by_conversation(
        conn,
        "SELECT conv_id, lo, hi FROM acked WHERE uid = ?1 AND client_id != ?2
         ORDER BY conv_id, lo",
        device,
    )?;
    for (conv_id, ranges) in union {
        save_acked(conn, device, conv_id, &ranges)?;
    }
    Ok(())
}

/// The device's acknowledged ranges of a conversation; what was sent before its user joined
/// counts as acknowledged.
fn acked(conn: &Connection, device: &Device, conv_id: i64) -> Result<Vec<SeqRange>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT lo, hi FROM acked WHERE uid = ?1 AND client_id = ?2 AND conv_id = ?3
             UNION ALL
             SELECT 1, joined_seq FROM members WHERE uid = ?1 AND conv_id = ?3 AND joined_seq > 0",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(params![device.uid, device.client_id, conv_id], |row| {
            Ok(SeqRange {
                lo: row.get(0)?,
                hi: row.get(1)?,
            })
        })
        .map_err(sql_error)?;
    let rows = rows
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)?;
    Ok(ranges::normalized(rows))
}

fn save_acked(conn: &Connection, device: &Device, conv_id: i64, ranges: &[SeqRange]) -> Result<()> {
    conn.prepare_cached("DELETE FROM acked WHERE uid = ?1 AND client_id = ?2 AND conv_id = ?3")
        .and_then(|mut stmt| stmt.execute(params![device.uid, device.client_id, conv_id]))
        .map_err(sql_error)?;
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO acked (uid, client_id, conv_id, lo, hi) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(sql_error)?;
    for range in ranges {
        insert
            .execute(params![
                device.uid,
                device.client_id,
                conv_id,
                range.lo,
                range.hi
            ])
            .map_err(sql_error)?;
    }
    Ok(())
}

pub(super) fn ack(conn: &Connection, device: &Device, key: &str, range: SeqRange) -> Result<u64> {
    let conv = conversation(conn, key)?.ok_or_else(StoreError::no_messages)?;
    let clamped = ranges::clamped_ack(range, conv.max_seq)?;
    let ranges = ranges::insert(&acked(conn, device, conv.id)?, clamped);
    save_acked(conn, device, conv.id, &ranges)?;
    Ok(clamped.hi)
}

fn stored(row: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        seq: row.get(0)?,
        sender: row.get(1)?,
        server_time: row.get(2)?,
        body: row.get(3)?,
    })
}

pub(super) fn pull(
    conn: &Connection,
    device: &Device,
    key: &str,
    ack: Option<SeqRange>,
    limit: usize,
) -> Result<Page> {
    let Some(conv) = conversation(conn, key)? else {
        return match ack {
            Some(range) => Err(StoreError::past_end(range.lo, 0)),
            None => Ok(nothing_left()),
        };
    };
    let mut done = acked(conn, device, conv.id)?;
    if let Some(range) = ack {
        done = ranges::insert(&done, ranges::clamped_ack(range, conv.max_seq)?);
    }
    let gone = ranges::uncovered(&done, conv.gone_seq);
    done = ranges::with_gone(&done, conv.gone_seq);
    if ack.is_some() || gone > 0 {
        save_acked(conn, device, conv.id, &done)?;
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, sender, server_time, body FROM messages
             WHERE conv_id = ?1 AND seq BETWEEN ?2 AND ?3
               AND NOT (sender = ?4 AND sender_device = ?5)
             ORDER BY seq DESC LIMIT ?6",
        )
        .map_err(sql_error)?;
    // One more than asked tells whether anything is left after this page.
    let mut messages = Vec::with_capacity(limit + 1);
    for gap in ranges::gaps_newest_first(&done, conv.max_seq) {
        let wanted = limit + 1 - messages.len();
        let rows = stmt
            .query_map(
                params![
                    conv.id,
                    gap.lo,
                    gap.hi,
                    device.uid,
                    device.client_id,
                    wanted
                ],
                stored,
            )
            .map_err(sql_error)?;
        for row in rows {
            messages.push(row.map_err(sql_error)?);
        }
        if messages.len() > limit {
            break;
        }
    }
    let end = messages.len() <= limit;
    messages.truncate(limit);
    Ok(Page {
        messages,
        end,
        gone,
    })
}

/// The answer for a conversation that does not exist yet.
fn nothing_left() -> Page {
    Page {
        end: true,
        ..Page::default()
    }
}

pub(super) fn history(
    conn: &Connection,
    key: &str,
    before: Option<u64>,
    limit: usize,
) -> Result<Page> {
    let Some(conv) = conversation(conn, key)? else {
        return Ok(nothing_left());
    };
    let before = before.unwrap_or(u64::MAX).min(conv.max_seq + 1);
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, sender, server_time, body FROM messages
             WHERE conv_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
        )
        .map_err(sql_error)?;
    let mut messages = stmt
        .query_map(params![conv.id, before, limit + 1], stored)
        .map_err(sql_error)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)?;
    let end = messages.len() <= limit;
    messages.truncate(limit);
    Ok(Page {
        messages,
        end,
        gone: 0,
    })
}

pub(super) fn mark_read(conn: &Connection, uid: &Uid, key: &str, seq: u64) -> Result<(u64, u64)> {
    let conv = conversation(conn, key)?.ok_or_else(StoreError::no_messages)?;
    if seq > conv.max_seq {
        return Err(StoreError::past_end(seq, conv.max_seq));
    }
    // Runs in the writer's transaction: nothing moves the cursor in between.
    let before: u64 = conn
        .prepare_cached("SELECT read_seq FROM members WHERE uid = ?1 AND conv_id = ?2")
        .and_then(|mut stmt| stmt.query_row(params![uid, conv.id], |row| row.get(0)))
        .optional()
        .map_err(sql_error)?
        .ok_or_else(|| {
            StoreError::NotFound(format!("{uid} is not a member of the conversation"))
        })?;
    let after = before.max(seq);
    conn.prepare_cached("UPDATE members SET read_seq = ?3 WHERE uid = ?1 AND conv_id = ?2")
        .and_then(|mut stmt| stmt.execute(params![uid, conv.id, after]))
        .map_err(sql_error)?;
    Ok((before, after))
}

/// A conversation the device's user belongs to, with what the digest needs of it, read for
/// all conversations at once (one query per conversation and field made a 1,000-conversation
/// digest cost about 50 ms).
#[derive(Debug)]
pub(super) struct Membership {
    conv: ConversationRow,
    conversation: Conversation,
    read_seq: u64,
    /// The device's cleared floor.
    cleared: u64,
    /// Messages a backlog cap ever skipped for the device.
    missed_total: u64,
    /// How many of them a cleared digest reported.
    missed_cleared: u64,
    /// The others' read cursor the device's last digest reported.
    seen: u64,
    /// The user's own read cursor the device's last digest reported.
    read_seen: u64,
    /// The others' read cursor now.
    peer_read_seq: u64,
    /// The device's acknowledged ranges (what was sent before the user joined and what
    /// retention deleted included).
    acked: Vec<SeqRange>,
}

pub(super) fn memberships(conn: &Connection, device: &Device) -> Result<Vec<Membership>> {
    let mut acked: std::collections::HashMap<i64, Vec<SeqRange>> = acked_by_conversation(
        conn,
        "SELECT conv_id, lo, hi FROM acked WHERE uid = ?1 AND client_id = ?2
         UNION ALL
         SELECT conv_id, 1, joined_seq FROM members WHERE uid = ?1 AND joined_seq > 0
         UNION ALL
         SELECT c.id, 1, c.gone_seq FROM members m JOIN conversations c ON c.id = m.conv_id
         WHERE m.uid = ?1 AND c.gone_seq > 0
         ORDER BY 1, 2",
        device,
    )?
    .into_iter()
    .collect();
    let mut stmt = conn
        .prepare_cached(
            "SELECT c.id, c.max_seq, c.last_time, c.gone_seq, c.key, m.read_seq,
                    COALESCE(cl.cleared_seq, 0), COALESCE(cl.missed, 0),
                    COALESCE(cl.missed_cleared, 0),
                    COALESCE(rs.peer_read_seq, 0), COALESCE(rs.read_seq, 0),
                    (SELECT COALESCE(MAX(o.read_seq), 0) FROM members o
                     WHERE o.conv_id = c.id AND o.uid != m.uid)
             FROM members m JOIN conversations c ON c.id = m.conv_id
             LEFT JOIN cleared cl
               ON cl.uid = m.uid AND cl.client_id = ?2 AND cl.conv_id = c.id
             LEFT JOIN read_seen rs
               ON rs.uid = m.uid AND rs.client_id = ?2 AND rs.conv_id = c.id
             WHERE m.uid = ?1",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(params![device.uid, device.client_id], |row| {
            let id: i64 = row.get(0)?;
            Ok(Membership {
                conv: ConversationRow {
                    id,
                    max_seq: row.get(1)?,
                    last_time: row.get(2)?,
                    gone_seq: row.get(3)?,
                },
                conversation: row.get(4)?,
                read_seq: row.get(5)?,
                cleared: row.get(6)?,
                missed_total: row.get(7)?,
                missed_cleared: row.get(8)?,
                seen: row.get(9)?,
                read_seen: row.get(10)?,
                peer_read_seq: row.get(11)?,
                acked: Vec::new(),
            })
        })
        .map_err(sql_error)?;
    let mut members = rows
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)?;
    for member in &mut members {
        member.acked = acked.remove(&member.conv.id).unwrap_or_default();
    }
    Ok(members)
}

/// The digest entry of one conversation, or `None` when nothing is unacked or counted and the
/// others' read cursor has not moved since the device's last digest.
pub(super) fn conversation_state(
    conn: &Connection,
    device: &Device,
    member: &Membership,
    shape: DigestShape,
) -> Result<Option<ConversationState>> {
    let conv = member.conv;
    let cut = ranges::backlog_cut(&member.acked, conv.max_seq, shape.max_backlog);
    // What the cut skips is counted in messages from others, as `unacked` counts.
    let skipped = match cut {
        Some(cut) => Some(Skipped {
            count: count_unacked(conn, device, member, &member.acked, cut.upto)?.0,
            ..cut
        }),
        None => None,
    };
    let acked = match cut.and_then(|cut| SeqRange::new(1, cut.upto)) {
        Some(cut) => ranges::insert(&member.acked, cut),
        None => member.acked.clone(),
    };
    let missed_total = member.missed_total + skipped.map_or(0, |cut| cut.count);
    let missed = missed_total.saturating_sub(member.missed_cleared);
    let (unacked, count) = count_unacked(conn, device, member, &acked, conv.max_seq)?;
    if unacked == 0
        && count == 0
        && missed == 0
        && member.peer_read_seq <= member.seen
        && member.read_seq <= member.read_seen
    {
        return Ok(None);
    }
    Ok(Some(ConversationState {
        conversation: member.conversation.clone(),
        count,
        unacked,
        max_seq: conv.max_seq,
        last_time: conv.last_time,
        acked_seq: ranges::watermark(&acked),
        read_seq: member.read_seq,
        peer_read_seq: member.peer_read_seq,
        last: history(conn, &member.conversation.key(), None, shape.last_n)?.messages,
        missed,
        skipped,
        missed_total,
    }))
}

/// `(unacked, count)` of the gaps `acked` leaves in `1..=upto`: the messages not sent by this
/// device, and those of them from others above the device's cleared floor.
fn count_unacked(
    conn: &Connection,
    device: &Device,
    member: &Membership,
    acked: &[SeqRange],
    upto: u64,
) -> Result<(u64, u64)> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(NOT (sender = ?4 AND sender_device = ?5)), 0),
                    COALESCE(SUM(sender != ?4 AND seq > ?6), 0)
             FROM messages WHERE conv_id = ?1 AND seq BETWEEN ?2 AND ?3",
        )
        .map_err(sql_error)?;
    let (mut unacked, mut count) = (0u64, 0u64);
    for gap in ranges::gaps_newest_first(acked, upto) {
        let (u, c): (u64, u64) = stmt
            .query_row(
                params![
                    member.conv.id,
                    gap.lo,
                    gap.hi,
                    device.uid,
                    device.client_id,
                    member.cleared
                ],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(sql_error)?;
        unacked += u;
        count += c;
    }
    Ok((unacked, count))
}

/// Records digest `version`'s entries and returns it.
pub(super) fn record_digest(
    conn: &Connection,
    device: &Device,
    entries: &[DigestEntry],
    now_ms: i64,
) -> Result<u64> {
    let version: u64 = conn
        .prepare_cached(
            "INSERT INTO devices (uid, client_id, digest_version, last_seen) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (uid, client_id)
             DO UPDATE SET digest_version = digest_version + 1, last_seen = excluded.last_seen
             RETURNING digest_version",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![device.uid, device.client_id, now_ms], |row| {
                row.get(0)
            })
        })
        .map_err(sql_error)?;
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO digest_entries (uid, client_id, version, conv_id, max_seq, missed)
             SELECT ?1, ?2, ?3, id, ?5, ?6 FROM conversations WHERE key = ?4",
        )
        .map_err(sql_error)?;
    let mut seen = conn
        .prepare_cached(
            "INSERT INTO read_seen (uid, client_id, conv_id, peer_read_seq, read_seq)
             SELECT ?1, ?2, id, ?4, ?5 FROM conversations WHERE key = ?3
             ON CONFLICT (uid, client_id, conv_id) DO UPDATE
             SET peer_read_seq = excluded.peer_read_seq, read_seq = excluded.read_seq",
        )
        .map_err(sql_error)?;
    for entry in entries {
        insert
            .execute(params![
                device.uid,
                device.client_id,
                version,
                entry.conversation.key(),
                entry.max_seq,
                entry.missed_total
            ])
            .map_err(sql_error)?;
        seen.execute(params![
            device.uid,
            device.client_id,
            entry.conversation.key(),
            entry.peer_read_seq,
            entry.read_seq
        ])
        .map_err(sql_error)?;
        if let Some(skipped) = entry.skipped {
            skip_backlog(conn, device, &entry.conversation.key(), skipped)?;
        }
    }
    // A client confirms the digest it just got; older versions are kept only briefly.
    conn.prepare_cached(
        "DELETE FROM digest_entries WHERE uid = ?1 AND client_id = ?2 AND version + 8 < ?3",
    )
    .and_then(|mut stmt| stmt.execute(params![device.uid, device.client_id, version]))
    .map_err(sql_error)?;
    Ok(version)
}

/// Records what a backlog cap skipped: acknowledged for the device, and missed until cleared.
fn skip_backlog(conn: &Connection, device: &Device, key: &str, skipped: Skipped) -> Result<()> {
    let (Some(conv), Some(cut)) = (conversation(conn, key)?, SeqRange::new(1, skipped.upto)) else {
        return Ok(());
    };
    let ranges = ranges::insert(&acked(conn, device, conv.id)?, cut);
    save_acked(conn, device, conv.id, &ranges)?;
    conn.prepare_cached(
        "INSERT INTO cleared (uid, client_id, conv_id, cleared_seq, missed) VALUES (?1, ?2, ?3, 0, ?4)
         ON CONFLICT (uid, client_id, conv_id) DO UPDATE SET missed = missed + excluded.missed",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![device.uid, device.client_id, conv.id, skipped.count])
    })
    .map_err(sql_error)?;
    Ok(())
}

pub(super) fn clear_counters(conn: &Connection, device: &Device, version: u64) -> Result<()> {
    let handed_out: Option<u64> = conn
        .prepare_cached("SELECT digest_version FROM devices WHERE uid = ?1 AND client_id = ?2")
        .and_then(|mut stmt| {
            stmt.query_row(params![device.uid, device.client_id], |row| row.get(0))
                .optional()
        })
        .map_err(sql_error)?;
    if version == 0 || handed_out.is_none_or(|latest| version > latest) {
        return Err(StoreError::NotFound(format!(
            "digest version {version} was never sent to this device"
        )));
    }
    conn.prepare_cached(
        "INSERT INTO cleared (uid, client_id, conv_id, cleared_seq, missed_cleared)
         SELECT uid, client_id, conv_id, max_seq, missed FROM digest_entries
         WHERE uid = ?1 AND client_id = ?2 AND version = ?3
         ON CONFLICT (uid, client_id, conv_id)
         DO UPDATE SET cleared_seq = MAX(cleared_seq, excluded.cleared_seq),
                       missed_cleared = MAX(missed_cleared, excluded.missed_cleared)",
    )
    .and_then(|mut stmt| stmt.execute(params![device.uid, device.client_id, version]))
    .map_err(sql_error)?;
    Ok(())
}
