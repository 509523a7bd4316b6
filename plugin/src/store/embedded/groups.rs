//! Members, roles, receipts and the removal log of the embedded backend.

use crate::domain::Uid;
use rusqlite::{params, Connection, OptionalExtension};

use super::queries::{conversation, sql_error, Result};
use crate::store::{
    now_ms, receipts_from, Conversation, Member, Receipt, Removal, Role, SeqRange, StoreError,
};

pub(super) fn create_group(
    conn: &Connection,
    key: &str,
    owner: &Uid,
    members: &[Uid],
) -> Result<()> {
    let created = conn
        .prepare_cached("INSERT OR IGNORE INTO conversations (key) VALUES (?1)")
        .and_then(|mut stmt| stmt.execute([key]))
        .map_err(sql_error)?;
    if created == 0 {
        return Err(StoreError::Conflict(
            "the conversation exists already".into(),
        ));
    }
    add_members(conn, key, &[owner.to_owned()], Role::Owner)?;
    add_members(conn, key, members, Role::Member)?;
    Ok(())
}

pub(super) fn add_members(
    conn: &Connection,
    key: &str,
    uids: &[Uid],
    role: Role,
) -> Result<Vec<Uid>> {
    let conv = conversation(conn, key)?.ok_or_else(StoreError::no_conversation)?;
    let mut add = conn
        .prepare_cached(
            "INSERT INTO members (uid, conv_id, role, joined_seq) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (uid, conv_id) DO UPDATE SET role = MAX(role, excluded.role)",
        )
        .map_err(sql_error)?;
    let mut is_member = conn
        .prepare_cached("SELECT 1 FROM members WHERE uid = ?1 AND conv_id = ?2")
        .map_err(sql_error)?;
    let mut added = Vec::new();
    for uid in uids {
        let existed = is_member
            .query_row(params![uid, conv.id], |_| Ok(()))
            .optional()
            .map_err(sql_error)?
            .is_some();
        add.execute(params![uid, conv.id, role.code(), conv.max_seq])
            .map_err(sql_error)?;
        if !existed && !added.contains(uid) {
            added.push(uid.clone());
        }
    }
    Ok(added)
}

pub(super) fn remove_members(conn: &Connection, key: &str, uids: &[Uid]) -> Result<Vec<Uid>> {
    let Some(conv) = conversation(conn, key)? else {
        return Ok(Vec::new());
    };
    let mut remove = conn
        .prepare_cached("DELETE FROM members WHERE uid = ?1 AND conv_id = ?2")
        .map_err(sql_error)?;
    let mut log = conn
        .prepare_cached(
            "INSERT INTO member_removals (conv_key, uid, logged_at) VALUES (?1, ?2, ?3)",
        )
        .map_err(sql_error)?;
    let mut removed = Vec::new();
    for uid in uids {
        if remove.execute(params![uid, conv.id]).map_err(sql_error)? > 0 {
            log.execute(params![key, uid, now_ms()])
                .map_err(sql_error)?;
            removed.push(uid.clone());
        }
    }
    Ok(removed)
}

pub(super) fn members(conn: &Connection, key: &str) -> Result<Vec<Member>> {
    let conv = conversation(conn, key)?.ok_or_else(StoreError::no_conversation)?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT uid, role, read_seq FROM members WHERE conv_id = ?1 ORDER BY role DESC, uid",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map([conv.id], |row| {
            Ok(Member {
                uid: row.get(0)?,
                role: Role::from_code(row.get(1)?),
                read_seq: row.get(2)?,
            })
        })
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}

pub(super) fn role(conn: &Connection, uid: &Uid, key: &str) -> Result<Option<Role>> {
    conn.prepare_cached(
        "SELECT m.role FROM members m JOIN conversations c ON c.id = m.conv_id
         WHERE c.key = ?1 AND m.uid = ?2",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![key, uid], |row| row.get::<_, i64>(0))
            .optional()
    })
    .map(|code| code.map(Role::from_code))
    .map_err(sql_error)
}

pub(super) fn group_memberships(conn: &Connection, uid: &Uid) -> Result<Vec<(Conversation, Role)>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT c.key, m.role FROM members m JOIN conversations c ON c.id = m.conv_id
             WHERE m.uid = ?1 AND c.kind = 1 ORDER BY c.key",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(params![uid], |row| {
            Ok((row.get(0)?, Role::from_code(row.get(1)?)))
        })
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}

pub(super) fn receipts(
    conn: &Connection,
    key: &str,
    seqs: &[u64],
    max_readers: usize,
) -> Result<Vec<Receipt>> {
    let Some(conv) = conversation(conn, key)? else {
        return Ok(Vec::new());
    };
    let mut sender_of = conn
        .prepare_cached("SELECT sender FROM messages WHERE conv_id = ?1 AND seq = ?2")
        .map_err(sql_error)?;
    let mut senders = Vec::new();
    for seq in seqs {
        if let Some(sender) = sender_of
            .query_row(params![conv.id, seq], |row| row.get::<_, Uid>(0))
            .optional()
            .map_err(sql_error)?
        {
            senders.push((*seq, sender));
        }
    }
    let Some(lowest) = senders.iter().map(|(seq, _)| *seq).min() else {
        return Ok(Vec::new());
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT uid, read_seq FROM members WHERE conv_id = ?1 AND read_seq >= ?2
             ORDER BY read_seq DESC, uid",
        )
        .map_err(sql_error)?;
    let readers = stmt
        .query_map(params![conv.id, lowest], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .map_err(sql_error)?
        .collect::<rusqlite::Result<Vec<(Uid, u64)>>>()
        .map_err(sql_error)?;
    Ok(receipts_from(&senders, &readers, max_readers))
}

pub(super) fn senders(conn: &Connection, key: &str, range: SeqRange) -> Result<Vec<Uid>> {
    let Some(conv) = conversation(conn, key)? else {
        return Ok(Vec::new());
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT DISTINCT sender FROM messages WHERE conv_id = ?1 AND seq BETWEEN ?2 AND ?3",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(params![conv.id, range.lo, range.hi], |row| row.get(0))
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<Uid>>>()
        .map_err(sql_error)
}

pub(super) fn removals_since(conn: &Connection, after: u64, limit: usize) -> Result<Vec<Removal>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, conv_key, uid FROM member_removals WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(params![after, limit as u64], |row| {
            Ok(Removal {
                id: row.get(0)?,
                conversation: row.get(1)?,
                uid: row.get(2)?,
            })
        })
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}
