//! What keeps the embedded store bounded: retention, device expiry, forgetting devices,
//! erasing users and the eviction log that has nodes close their connections.

use crate::domain::Uid;
use rusqlite::{params, Connection};

use super::queries::{sql_error, Result};
use crate::store::{
    now_ms, Collected, ConversationKind, Device, DeviceInfo, Erased, Eviction, GroupErasure,
};

/// Deletes at most `batch` of the oldest messages of `kind` stored before `cutoff`, as a
/// prefix of each conversation they belong to.
pub(super) fn expire_messages(
    conn: &Connection,
    kind: ConversationKind,
    cutoff: i64,
    batch: usize,
) -> Result<Collected> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT conv_id, MAX(seq), MIN(server_time), COUNT(*) FROM
               (SELECT conv_id, seq, server_time FROM messages
                WHERE kind = ?1 AND server_time < ?2 ORDER BY server_time LIMIT ?3)
             GROUP BY conv_id",
        )
        .map_err(sql_error)?;
    let due = stmt
        .query_map(params![kind.code(), cutoff, batch as u64], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, u64>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, u64>(3)?,
            ))
        })
        .map_err(sql_error)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)?;
    let mut delete = conn
        .prepare_cached(
            "DELETE FROM messages WHERE conv_id = ?1
               AND seq > (SELECT gone_seq FROM conversations WHERE id = ?1) AND seq <= ?2",
        )
        .map_err(sql_error)?;
    let mut advance = conn
        .prepare_cached("UPDATE conversations SET gone_seq = MAX(gone_seq, ?2) WHERE id = ?1")
        .map_err(sql_error)?;
    let mut collected = Collected::default();
    let mut selected = 0;
    for (conv_id, upto, oldest, rows) in due {
        collected.messages += delete.execute(params![conv_id, upto]).map_err(sql_error)? as u64;
        advance.execute(params![conv_id, upto]).map_err(sql_error)?;
        collected.behind_ms = collected.behind_ms.max(cutoff.saturating_sub(oldest));
        selected += rows;
    }
    collected.more = selected >= batch as u64;
    Ok(collected)
}

/// Forgets at most `batch` devices last seen before `cutoff`.
pub(super) fn expire_devices(conn: &Connection, cutoff: i64, batch: usize) -> Result<Collected> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT uid, client_id FROM devices WHERE last_seen < ?1 ORDER BY last_seen LIMIT ?2",
        )
        .map_err(sql_error)?;
    let due = stmt
        .query_map(params![cutoff, batch as u64], |row| {
            Ok(Device {
                uid: row.get(0)?,
                client_id: row.get(1)?,
            })
        })
        .map_err(sql_error)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)?;
    for device in &due {
        forget_device(conn, device)?;
    }
    Ok(Collected {
        devices: due.len() as u64,
        more: due.len() >= batch,
        ..Collected::default()
    })
}

/// Deletes at most `batch` entries of each log (removals, evictions) logged before `cutoff`.
pub(super) fn prune_logs(conn: &Connection, cutoff: i64, batch: usize) -> Result<Collected> {
    let mut more = false;
    for log in ["member_removals", "evictions"] {
        let deleted = conn
            .prepare_cached(&format!(
                "DELETE FROM {log} WHERE id IN
                   (SELECT id FROM {log} WHERE logged_at < ?1 ORDER BY id LIMIT ?2)"
            ))
            .and_then(|mut stmt| stmt.execute(params![cutoff, batch as u64]))
            .map_err(sql_error)?;
        more |= deleted >= batch;
    }
    Ok(Collected {
        more,
        ..Collected::default()
    })
}

/// Deletes a device's state; whether it was known.
pub(super) fn forget_device(conn: &Connection, device: &Device) -> Result<bool> {
    let which = "uid = ?1 AND client_id = ?2";
    let known = delete_device_state(conn, which, params![device.uid, device.client_id])?;
    Ok(known > 0)
}

/// Deletes the state of the devices `which` (a condition on `uid` and `client_id`)
/// selects; how many devices that was.
fn delete_device_state(
    conn: &Connection,
    which: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<u64> {
    let mut devices = 0;
    for table in crate::store::DEVICE_TABLES {
        let deleted = conn
            .prepare_cached(&format!("DELETE FROM {table} WHERE {which}"))
            .and_then(|mut stmt| stmt.execute(params))
            .map_err(sql_error)?;
        if table == "devices" {
            devices = deleted as u64;
        }
    }
    Ok(devices)
}

pub(super) fn touch_devices(conn: &Connection, devices: &[Device], now_ms: i64) -> Result<()> {
    let mut touch = conn
        .prepare_cached("UPDATE devices SET last_seen = ?3 WHERE uid = ?1 AND client_id = ?2")
        .map_err(sql_error)?;
    for device in devices {
        touch
            .execute(params![device.uid, device.client_id, now_ms])
            .map_err(sql_error)?;
    }
    Ok(())
}

pub(super) fn devices(conn: &Connection, uid: &Uid) -> Result<Vec<DeviceInfo>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT client_id, last_seen FROM devices WHERE uid = ?1 ORDER BY client_id",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map([uid], |row| {
            Ok(DeviceInfo {
                client_id: row.get(0)?,
                last_seen: row.get(1)?,
            })
        })
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}

pub(super) fn evict(conn: &Connection, uid: &Uid, client_id: Option<&str>) -> Result<()> {
    conn.prepare_cached("INSERT INTO evictions (uid, client_id, logged_at) VALUES (?1, ?2, ?3)")
        .and_then(|mut stmt| stmt.execute(params![uid, client_id.unwrap_or_default(), now_ms()]))
        .map_err(sql_error)?;
    Ok(())
}

pub(super) fn evictions_since(
    conn: &Connection,
    after: u64,
    limit: usize,
) -> Result<Vec<Eviction>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, uid, client_id FROM evictions WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(params![after, limit as u64], |row| {
            let client_id: String = row.get(2)?;
            Ok(Eviction {
                id: row.get(0)?,
                uid: row.get(1)?,
                client_id: (!client_id.is_empty()).then_some(client_id),
            })
        })
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}

/// Runs `sql` with the user's uid and returns how many rows it changed.
fn run(conn: &Connection, sql: &str, uid: &Uid) -> Result<u64> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute([uid]))
        .map(|n| n as u64)
        .map_err(sql_error)
}

pub(super) fn erase_user(conn: &Connection, uid: &Uid, groups: GroupErasure) -> Result<Erased> {
    let mut erased = Erased {
        devices: delete_device_state(conn, "uid = ?1", params![uid])?,
        ..Erased::default()
    };
    erased.messages_deleted += run(
        conn,
        "DELETE FROM messages WHERE sender = ?1 AND kind = 0",
        uid,
    )?;
    erased.messages_deleted += match groups {
        GroupErasure::Delete => run(
            conn,
            "DELETE FROM messages WHERE sender = ?1 AND kind = 1",
            uid,
        )?,
        GroupErasure::Redact => 0,
    };
    erased.messages_redacted += run(
        conn,
        "UPDATE messages SET body = X'', sender_device = '',
                msg_id = 'erased:' || conv_id || ':' || seq
         WHERE sender = ?1 AND kind = 1 AND msg_id NOT LIKE 'erased:%'",
        uid,
    )?;
    conn.prepare_cached(
        "INSERT INTO member_removals (conv_key, uid, logged_at)
         SELECT c.key, m.uid, ?2 FROM members m JOIN conversations c ON c.id = m.conv_id
         WHERE m.uid = ?1 AND c.kind = 1",
    )
    .and_then(|mut stmt| stmt.execute(params![uid, now_ms()]))
    .map_err(sql_error)?;
    let owned: Vec<i64> = {
        let mut stmt = conn
            .prepare_cached(
                "SELECT m.conv_id FROM members m JOIN conversations c ON c.id = m.conv_id
                 WHERE m.uid = ?1 AND c.kind = 1 AND m.role = 3",
            )
            .map_err(sql_error)?;
        let rows = stmt.query_map([uid], |row| row.get(0)).map_err(sql_error)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sql_error)?
    };
    erased.groups += run(
        conn,
        "DELETE FROM members WHERE uid = ?1
           AND conv_id IN (SELECT id FROM conversations WHERE kind = 1)",
        uid,
    )?;
    for conv_id in owned {
        conn.prepare_cached(
            "UPDATE members SET role = 3 WHERE conv_id = ?1 AND uid =
               (SELECT uid FROM members WHERE conv_id = ?1
                ORDER BY role DESC, joined_seq, uid LIMIT 1)",
        )
        .and_then(|mut stmt| stmt.execute([conv_id]))
        .map_err(sql_error)?;
    }
    run(conn, "UPDATE members SET read_seq = 0 WHERE uid = ?1", uid)?;
    evict(conn, uid, None)?;
    Ok(erased)
}
