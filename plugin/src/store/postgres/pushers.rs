//! Devices' pushers: one row per app and pushkey, moved to whichever device set it last.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::error::Cells;
use super::pg_error;
use crate::domain::Uid;
use crate::store::{now_ms, Device, Pusher, PusherGone, PusherSaved, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

const COLUMNS: &str = "uid, client_id, app_id, pushkey, url, format, lang, data_json, created_at";

fn pusher(row: &Row) -> Result<Pusher> {
    Ok(Pusher {
        device: Device {
            uid: row.cell(0)?,
            client_id: row.cell(1)?,
        },
        app_id: row.cell(2)?,
        pushkey: row.cell(3)?,
        url: row.cell(4)?,
        format: row.cell(5)?,
        lang: row.cell(6)?,
        data_json: row.cell(7)?,
        created_ms: row.cell(8)?,
    })
}

/// Call inside a transaction: the count, the holder and the write must see one state.
pub(super) async fn set(
    c: &impl GenericClient,
    pusher: &Pusher,
    per_device: usize,
) -> Result<PusherSaved> {
    let (uid, client_id) = (pusher.device.uid.as_str(), pusher.device.client_id.as_str());
    let (app_id, pushkey) = (pusher.app_id.as_str(), pusher.pushkey.as_str());
    // Serialises the device's pushers (the count) and this key (its holder); the lengths
    // keep two different pairs from naming one lock.
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))",
        &[&format!("pusher:{}:{app_id}:{pushkey}", app_id.len())],
    )
    .await
    .map_err(pg_error)?;
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))",
        &[&format!("pushers:{}:{uid}:{client_id}", uid.len())],
    )
    .await
    .map_err(pg_error)?;
    let others: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM pushers
             WHERE uid = $1 AND client_id = $2 AND NOT (app_id = $3 AND pushkey = $4)",
            &[&uid, &client_id, &app_id, &pushkey],
        )
        .await
        .map_err(pg_error)?
        .cell(0)?;
    if others >= i64::try_from(per_device).unwrap_or(i64::MAX) {
        return Ok(PusherSaved::Full);
    }
    let holder = c
        .query_opt(
            "SELECT uid, client_id FROM pushers WHERE app_id = $1 AND pushkey = $2",
            &[&app_id, &pushkey],
        )
        .await
        .map_err(pg_error)?
        .map(|row| {
            Ok::<_, StoreError>(Device {
                uid: row.cell(0)?,
                client_id: row.cell(1)?,
            })
        })
        .transpose()?;
    c.execute(
        &format!(
            "INSERT INTO pushers ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (app_id, pushkey) DO UPDATE SET uid = $1, client_id = $2, url = $5,
               format = $6, lang = $7, data_json = $8, created_at = $9"
        ),
        &[
            &uid,
            &client_id,
            &app_id,
            &pushkey,
            &pusher.url,
            &pusher.format,
            &pusher.lang,
            &pusher.data_json,
            &pusher.created_ms,
        ],
    )
    .await
    .map_err(pg_error)?;
    let displaced = holder.filter(|device| device != &pusher.device);
    if let Some(previous) = &displaced {
        gone(c, previous, app_id, pushkey, "moved").await?;
    }
    Ok(PusherSaved::Saved { displaced })
}

/// Notes that `device` lost a pusher, for its next digest.
async fn gone(
    c: &impl GenericClient,
    device: &Device,
    app_id: &str,
    pushkey: &str,
    reason: &str,
) -> Result<()> {
    c.execute(
        "INSERT INTO pushers_gone (uid, client_id, app_id, pushkey, reason, gone_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (uid, client_id, app_id, pushkey) DO UPDATE SET reason = $5, gone_at = $6",
        &[
            &device.uid.as_str(),
            &device.client_id,
            &app_id,
            &pushkey,
            &reason,
            &now_ms(),
        ],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn take_gone(
    c: &impl GenericClient,
    device: &Device,
    limit: usize,
) -> Result<Vec<PusherGone>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    c.query(
        "DELETE FROM pushers_gone WHERE (uid, client_id, app_id, pushkey) IN (
           SELECT uid, client_id, app_id, pushkey FROM pushers_gone
           WHERE uid = $1 AND client_id = $2 ORDER BY gone_at LIMIT $3)
         RETURNING app_id, pushkey, reason",
        &[&device.uid.as_str(), &device.client_id, &limit],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| {
        Ok(PusherGone {
            app_id: row.cell(0)?,
            pushkey: row.cell(1)?,
            reason: row.cell(2)?,
        })
    })
    .collect()
}

/// Call inside a transaction: the removal and its note go together.
pub(super) async fn remove(
    c: &impl GenericClient,
    uid: &Uid,
    app_id: &str,
    pushkey: &str,
    reason: &str,
) -> Result<Option<Pusher>> {
    let removed = c
        .query_opt(
            &format!(
                "DELETE FROM pushers WHERE uid = $1 AND app_id = $2 AND pushkey = $3
             RETURNING {COLUMNS}"
            ),
            &[&uid.as_str(), &app_id, &pushkey],
        )
        .await
        .map_err(pg_error)?
        .as_ref()
        .map(pusher)
        .transpose()?;
    if let Some(removed) = &removed {
        gone(c, &removed.device, app_id, pushkey, reason).await?;
    }
    Ok(removed)
}

pub(super) async fn of_user(c: &impl GenericClient, uid: &Uid) -> Result<Vec<Pusher>> {
    c.query(
        &format!(
            "SELECT {COLUMNS} FROM pushers WHERE uid = $1 ORDER BY created_at, app_id, pushkey"
        ),
        &[&uid.as_str()],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(pusher)
    .collect()
}
