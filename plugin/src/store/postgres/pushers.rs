//! Devices' pushers: one row per app and pushkey, moved to whichever device set it last.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::error::Cells;
use super::pg_error;
use crate::domain::Uid;
use crate::store::{Device, Pusher, PusherSaved, StoreError};

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
    Ok(PusherSaved::Saved {
        displaced: holder.filter(|device| device != &pusher.device),
    })
}

pub(super) async fn remove(
    c: &impl GenericClient,
    uid: &Uid,
    app_id: &str,
    pushkey: &str,
) -> Result<Option<Pusher>> {
    c.query_opt(
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
    .transpose()
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
