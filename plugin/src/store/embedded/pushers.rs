//! Devices' pushers: one row per app and pushkey, moved to whichever device set it last.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::queries::{sql_error, Result};
use crate::domain::Uid;
use crate::store::{now_ms, Device, Pusher, PusherGone, PusherSaved};

const COLUMNS: &str = "uid, client_id, app_id, pushkey, url, format, lang, data_json, created_at";

fn pusher(row: &Row<'_>) -> rusqlite::Result<Pusher> {
    Ok(Pusher {
        device: Device {
            uid: row.get(0)?,
            client_id: row.get(1)?,
        },
        app_id: row.get(2)?,
        pushkey: row.get(3)?,
        url: row.get(4)?,
        format: row.get(5)?,
        lang: row.get(6)?,
        data_json: row.get(7)?,
        created_ms: row.get(8)?,
    })
}

pub(super) fn set(conn: &Connection, pusher: &Pusher, per_device: usize) -> Result<PusherSaved> {
    let (app_id, pushkey) = (&pusher.app_id, &pusher.pushkey);
    let others: u64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM pushers
             WHERE uid = ?1 AND client_id = ?2 AND NOT (app_id = ?3 AND pushkey = ?4)",
        )
        .and_then(|mut count| {
            count.query_row(
                params![pusher.device.uid, pusher.device.client_id, app_id, pushkey],
                |row| row.get(0),
            )
        })
        .map_err(sql_error)?;
    if others >= per_device as u64 {
        return Ok(PusherSaved::Full);
    }
    let holder: Option<Device> = conn
        .prepare_cached("SELECT uid, client_id FROM pushers WHERE app_id = ?1 AND pushkey = ?2")
        .and_then(|mut held| {
            held.query_row(params![app_id, pushkey], |row| {
                Ok(Device {
                    uid: row.get(0)?,
                    client_id: row.get(1)?,
                })
            })
            .optional()
        })
        .map_err(sql_error)?;
    conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO pushers ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    ))
    .and_then(|mut put| {
        put.execute(params![
            pusher.device.uid,
            pusher.device.client_id,
            app_id,
            pushkey,
            pusher.url,
            pusher.format,
            pusher.lang,
            pusher.data_json,
            pusher.created_ms,
        ])
    })
    .map_err(sql_error)?;
    let displaced = holder.filter(|device| device != &pusher.device);
    if let Some(previous) = &displaced {
        gone(conn, previous, app_id, pushkey, "moved")?;
    }
    Ok(PusherSaved::Saved { displaced })
}

/// Notes that `device` lost a pusher, for its next digest.
fn gone(
    conn: &Connection,
    device: &Device,
    app_id: &str,
    pushkey: &str,
    reason: &str,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO pushers_gone (uid, client_id, app_id, pushkey, reason, gone_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut note| {
        note.execute(params![
            device.uid,
            device.client_id,
            app_id,
            pushkey,
            reason,
            now_ms()
        ])
    })
    .map_err(sql_error)?;
    Ok(())
}

pub(super) fn take_gone(
    conn: &Connection,
    device: &Device,
    limit: usize,
) -> Result<Vec<PusherGone>> {
    conn.prepare_cached(
        "DELETE FROM pushers_gone WHERE (uid, client_id, app_id, pushkey) IN (
           SELECT uid, client_id, app_id, pushkey FROM pushers_gone
           WHERE uid = ?1 AND client_id = ?2 ORDER BY gone_at LIMIT ?3)
         RETURNING app_id, pushkey, reason",
    )
    .and_then(|mut take| {
        take.query_map(params![device.uid, device.client_id, limit as u64], |row| {
            Ok(PusherGone {
                app_id: row.get(0)?,
                pushkey: row.get(1)?,
                reason: row.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()
    })
    .map_err(sql_error)
}

pub(super) fn remove(
    conn: &Connection,
    uid: &Uid,
    app_id: &str,
    pushkey: &str,
    reason: &str,
) -> Result<Option<Pusher>> {
    let removed = conn
        .prepare_cached(&format!(
            "DELETE FROM pushers WHERE uid = ?1 AND app_id = ?2 AND pushkey = ?3 \
             RETURNING {COLUMNS}"
        ))
        .and_then(|mut delete| {
            delete
                .query_row(params![uid.as_str(), app_id, pushkey], pusher)
                .optional()
        })
        .map_err(sql_error)?;
    if let Some(removed) = &removed {
        gone(conn, &removed.device, app_id, pushkey, reason)?;
    }
    Ok(removed)
}

pub(super) fn of_user(conn: &Connection, uid: &Uid) -> Result<Vec<Pusher>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM pushers WHERE uid = ?1 ORDER BY created_at, app_id, pushkey"
        ))
        .map_err(sql_error)?;
    let rows = stmt.query_map([uid.as_str()], pusher).map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}
